"""Every architecture trains, exports ONNX that matches torch, loads in the server and passes
the parity check its manifest carries; a tampered parity sample fails it."""

import math
import shutil
from pathlib import Path

import msgspec
import pytest

from makeusrich.core.errors import ModelError, TrainingError
from makeusrich.core.schemas import Candle
from makeusrich.inference import MANIFEST_FILE, OnnxForecaster, load_forecaster, read_manifest
from makeusrich.inference.model import Parity, check_parity
from makeusrich.trainer import ARCHITECTURES, train

pytestmark = [pytest.mark.train, pytest.mark.slow]

DAY = Path(__file__).parent.parent / "data" / "BTCUSDT-1m-2025-11-20.csv"


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The real day, plus the same candles under another symbol for the filter to drop."""
    directory = tmp_path_factory.mktemp("data")
    shutil.copy(DAY, directory / DAY.name)
    shutil.copy(DAY, directory / DAY.name.replace("BTCUSDT", "ETHUSDT"))
    return directory


@pytest.fixture(scope="module", params=ARCHITECTURES)
def version_dir(
    request: pytest.FixtureRequest, data_dir: Path, tmp_path_factory: pytest.TempPathFactory
) -> Path:
    arch: str = request.param
    # One epoch on every 4th window keeps each training to a few seconds.
    return train(
        data_dir,
        tmp_path_factory.mktemp(arch),
        arch=arch,
        symbols=["BTCUSDT"],
        epochs=1,
        hidden=16,
        stride=4,
    )


def _day_candles() -> list[Candle]:
    candles = []
    for line in DAY.read_text().splitlines()[-100:]:
        f = line.split(",")
        open_ms, close_ms = int(f[0]) // 1000, int(f[6]) // 1000  # µs in the file
        candles.append(
            Candle(
                symbol="BTCUSDT", interval="1m", open_time=open_ms, close_time=close_ms,
                open=float(f[1]), high=float(f[2]), low=float(f[3]), close=float(f[4]),
                volume=float(f[5]), quote_volume=float(f[7]), trades=int(f[8]),
                taker_buy_volume=float(f[9]), taker_buy_quote_volume=float(f[10]),
                source="replay", ts_event=close_ms, ts_ingest=close_ms,
            )
        )
    return candles


def test_trains_exports_loads_and_passes_parity(version_dir: Path) -> None:
    manifest = read_manifest(version_dir)
    arch = manifest.architecture.kind

    assert arch in ARCHITECTURES
    assert version_dir.name == manifest.version
    assert manifest.version.startswith(f"{arch}-")
    assert manifest.architecture.hidden == 16
    assert manifest.architecture.layers >= 1
    assert manifest.onnx.opset >= 17
    assert manifest.training_data.symbols == ("BTCUSDT",)  # ETHUSDT filtered out
    assert manifest.training_data.candles == 1440
    assert manifest.metrics["onnx_torch_max_abs_diff"] < 1e-4
    assert manifest.training["seconds_per_epoch"] > 0
    assert manifest.parity is not None
    assert len(manifest.parity.input) == len(manifest.parity.output) == 2
    assert len(manifest.parity.input[0]) == manifest.window

    forecaster = load_forecaster(version_dir.parent)
    assert isinstance(forecaster, OnnxForecaster)
    assert forecaster.version == manifest.version
    assert check_parity(forecaster) < 1e-4
    candles = _day_candles()
    # One history alone and a batch: the exported batch axis is dynamic.
    for forecast in [forecaster.predict(candles), *forecaster.predict_batch([candles] * 100)]:
        assert forecast is not None
        values = (forecast.lower, forecast.predicted_close, forecast.upper)
        assert all(math.isfinite(v) for v in values)
        assert forecast.lower <= forecast.predicted_close <= forecast.upper
        assert abs(forecast.predicted_close / candles[-1].close - 1) < 0.01


def test_tampered_or_missing_parity_sample_fails_the_check(
    version_dir: Path, tmp_path: Path
) -> None:
    copy = Path(shutil.copytree(version_dir, tmp_path / version_dir.name))
    manifest = read_manifest(copy)
    assert manifest.parity is not None
    output = [row[:] for row in manifest.parity.output]
    output[1][1] += 1e-3

    def rewrite(parity: Parity | None) -> OnnxForecaster:
        fields = msgspec.to_builtins(msgspec.structs.replace(manifest, parity=parity))
        if parity is None:
            del fields["parity"]  # as in manifests written before parity samples
        (copy / MANIFEST_FILE).write_bytes(msgspec.json.encode(fields))
        return OnnxForecaster(copy)

    with pytest.raises(ModelError, match="differs from the exported outputs"):
        check_parity(rewrite(msgspec.structs.replace(manifest.parity, output=output)))
    assert check_parity(rewrite(manifest.parity), tolerance=0.0) == 0.0  # exact round trip
    with pytest.raises(ModelError, match="no parity sample"):
        check_parity(rewrite(None))


def test_unknown_architecture_or_symbol_is_a_training_error(tmp_path: Path) -> None:
    with pytest.raises(TrainingError, match=r"'rnn'.*lstm.*gru.*tcn.*transformer.*tft"):
        train(DAY, tmp_path / "models", arch="rnn")
    with pytest.raises(TrainingError, match=r"no candles of \['ETHUSDT'\].*BTCUSDT"):
        train(DAY, tmp_path / "models", symbols=["ETHUSDT"])
    assert not (tmp_path / "models").exists()


def test_tft_variable_selection_weights_are_a_softmax_over_features() -> None:
    import torch

    from makeusrich.trainer.model import QuantileTFT, build_model

    torch.manual_seed(0)
    model = build_model(
        "tft",
        n_features=4,
        window=30,
        hidden=16,
        layers=None,
        target_scales=[1e-3],
        initial_quantiles=[-1e-3, 0, 1e-3],
    )
    assert isinstance(model, QuantileTFT)
    assert model.layers == 1
    x = 3 * torch.randn(5, 30, 4)
    with torch.no_grad():
        weights = model.selection_weights(x)
        assert model.encode(x).shape == (5, 16)
    assert weights.shape == (5, 30, 4)
    assert (weights > 0).all()
    assert torch.allclose(weights.sum(-1), torch.ones(5, 30), atol=1e-6)
    assert not torch.allclose(weights[:, 0], weights[:, -1])  # chosen per step
