"""Forecasters: the naive baseline, the bundled ONNX model and model loading errors."""

import csv
import hashlib
import itertools
import logging
import math
import shutil
import subprocess
import sys
from pathlib import Path

import msgspec
import pytest

from kit.registry import tiny_version
from makeusrich.core.errors import ModelError, ModelIntegrityError
from makeusrich.core.schemas import Candle
from makeusrich.inference import (
    FEATURES,
    MANIFEST_FILE,
    MODEL_FILE,
    Forecast,
    NaiveForecaster,
    OnnxForecaster,
    Registry,
    bundled_models_dir,
    load_forecaster,
    read_manifest,
)

KLINES = Path(__file__).parent.parent / "data" / "BTCUSDT-1m-2025-11-20.csv"


def _real_candles() -> list[Candle]:
    """The day of real Binance 1m klines in tests/data (times in µs there)."""
    with KLINES.open() as file:
        return [
            Candle(
                symbol="BTCUSDT",
                interval="1m",
                open_time=int(row[0]) // 1000,
                close_time=int(row[6]) // 1000,
                open=float(row[1]),
                high=float(row[2]),
                low=float(row[3]),
                close=float(row[4]),
                volume=float(row[5]),
                quote_volume=float(row[7]),
                trades=int(row[8]),
                taker_buy_volume=float(row[9]),
                taker_buy_quote_volume=float(row[10]),
                source="replay",
                ts_event=int(row[6]) // 1000,
                ts_ingest=int(row[6]) // 1000,
            )
            for row in csv.reader(file)
        ]


@pytest.fixture(scope="module")
def candles() -> list[Candle]:
    return _real_candles()


@pytest.fixture
def model_copy(tmp_path: Path) -> Path:
    """A writable copy of the bundled model version directory."""
    bundled = load_forecaster(None)
    assert isinstance(bundled, OnnxForecaster)
    return Path(shutil.copytree(bundled.path, tmp_path / bundled.version))


def _assert_sane(forecast: Forecast | None, last_close: float) -> None:
    assert forecast is not None
    values = (forecast.lower, forecast.predicted_close, forecast.upper)
    assert all(math.isfinite(v) for v in values)
    assert forecast.lower <= forecast.predicted_close <= forecast.upper
    assert forecast.lower < forecast.upper
    assert all(abs(v / last_close - 1) < 0.01 for v in values)


# --- naive baseline ---------------------------------------------------------------------


def test_naive_forecasts_from_the_first_candle(candles: list[Candle]) -> None:
    naive = NaiveForecaster()

    assert naive.version == "naive"
    assert naive.predict([]) is None
    for n in (1, 2):  # below three candles the band comes from the last candle's range
        last = candles[n - 1]
        forecast = naive.predict(candles[:n])
        assert forecast is not None
        assert forecast.predicted_close == last.close
        sigma = math.log(last.high / last.low) / (2 * math.sqrt(math.log(2)))
        assert forecast.upper == pytest.approx(last.close * math.exp(1.2815515655446004 * sigma))
        assert forecast.lower < last.close < forecast.upper


def test_naive_interval_is_an_80_percent_normal_band(candles: list[Candle]) -> None:
    naive = NaiveForecaster(window=3)
    history = candles[:10]
    closes = [c.close for c in history[-4:]]
    returns = [math.log(b / a) for a, b in itertools.pairwise(closes)]
    mean = sum(returns) / 3
    sigma = math.sqrt(sum((r - mean) ** 2 for r in returns) / 3)

    forecast = naive.predict(history)

    assert forecast is not None
    assert forecast.predicted_close == closes[-1]
    assert forecast.upper == pytest.approx(closes[-1] * math.exp(1.2816 * sigma), rel=1e-6)
    assert forecast.lower == pytest.approx(closes[-1] * math.exp(-1.2816 * sigma), rel=1e-6)


def test_naive_batch(candles: list[Candle]) -> None:
    forecasts = NaiveForecaster().predict_batch([candles[:40], candles[:1], []])

    _assert_sane(forecasts[0], candles[39].close)
    _assert_sane(forecasts[1], candles[0].close)
    assert forecasts[2] is None


# --- bundled ONNX model -----------------------------------------------------------------


def test_bundled_model_is_the_default(candles: list[Candle]) -> None:
    forecaster = load_forecaster(None)

    assert isinstance(forecaster, OnnxForecaster)
    assert forecaster.path.parent == bundled_models_dir()
    assert forecaster.version == forecaster.path.name
    assert forecaster.version == Registry(bundled_models_dir()).champion()  # chosen by the rule
    assert forecaster.horizons == (1, 5, 15, 60)
    assert forecaster.manifest.training_data.symbols == ("BTCUSDT",)
    assert (forecaster.path / MODEL_FILE).stat().st_size < 1_000_000


def test_bundled_model_predicts_ordered_quantiles_near_last_close(candles: list[Candle]) -> None:
    forecaster = load_forecaster(None)
    need = forecaster.window + 1

    assert forecaster.predict(candles[: need - 1]) is None
    for end in range(need, len(candles), 97):
        _assert_sane(forecaster.predict(candles[:end]), candles[end - 1].close)


def test_bundled_model_copes_with_empty_candles(candles: list[Candle]) -> None:
    forecaster = load_forecaster(None)
    last = candles[100]
    empty = [
        msgspec.structs.replace(
            last,
            open=last.close,
            high=last.close,
            low=last.close,
            volume=0.0,
            taker_buy_volume=0.0,
        )
    ] * forecaster.window

    _assert_sane(forecaster.predict([*candles[:101], *empty]), last.close)


def test_batch_matches_single_predictions(candles: list[Candle]) -> None:
    forecaster = load_forecaster(None)
    histories = [candles[:200], candles[:5], candles[:900]]

    batch = forecaster.predict_batch(histories)

    assert batch[1] is None
    for history, forecast in zip(histories, batch, strict=True):
        single = forecaster.predict(history)
        if forecast is None or single is None:
            assert forecast is single
            continue
        assert forecast.predicted_close == pytest.approx(single.predicted_close, rel=1e-9)
        assert forecast.lower == pytest.approx(single.lower, rel=1e-9)
        assert forecast.upper == pytest.approx(single.upper, rel=1e-9)


def test_manifest_describes_the_model() -> None:
    forecaster = load_forecaster(None)
    assert isinstance(forecaster, OnnxForecaster)
    manifest = read_manifest(forecaster.path)

    model_bytes = (forecaster.path / MODEL_FILE).read_bytes()
    assert manifest.sha256 == hashlib.sha256(model_bytes).hexdigest()
    assert manifest.quantiles == (0.1, 0.5, 0.9)
    assert manifest.training_data.interval == "1m"
    for key in ("mae", "mae_persistence", "skill", "coverage_80", "onnx_torch_max_abs_diff"):
        assert math.isfinite(manifest.metrics[key])
    assert manifest.metrics["onnx_torch_max_abs_diff"] < 1e-4


def test_serving_does_not_import_torch() -> None:
    code = (
        "import sys, makeusrich.inference as i; i.load_forecaster(None); "
        "assert 'torch' not in sys.modules, 'torch imported'"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)


# --- loading and errors -----------------------------------------------------------------


def test_corrupt_model_fails_integrity_check(model_copy: Path) -> None:
    model = model_copy / MODEL_FILE
    data = bytearray(model.read_bytes())
    data[len(data) // 2] ^= 0xFF
    model.write_bytes(bytes(data))

    with pytest.raises(ModelIntegrityError, match="sha256"):
        load_forecaster(model_copy)


def test_garbage_manifest_is_a_model_error(model_copy: Path) -> None:
    (model_copy / MANIFEST_FILE).write_text("{not json")

    with pytest.raises(ModelError, match="not a valid model manifest"):
        load_forecaster(model_copy)


def test_missing_manifest_is_a_model_error(model_copy: Path) -> None:
    (model_copy / MANIFEST_FILE).unlink()

    with pytest.raises(ModelError, match="missing"):
        load_forecaster(model_copy)


def _edit_manifest(version_dir: Path, **changes: object) -> None:
    path = version_dir / MANIFEST_FILE
    manifest = msgspec.json.decode(path.read_bytes())
    manifest.update(changes)
    path.write_bytes(msgspec.json.encode(manifest))


def test_manifest_with_unknown_features_is_a_model_error(model_copy: Path) -> None:
    _edit_manifest(model_copy, features=["rsi", "macd", "log_return", "log_range"])

    with pytest.raises(ModelError, match=r"unknown features \['rsi', 'macd'\]"):
        load_forecaster(model_copy)


@pytest.mark.parametrize(
    ("features", "problem"),
    [
        (["log_return", "log_range", "log_range", "taker_buy_ratio"], "repeat"),
        (["log_range", "log_return", "log_volume_rel", "taker_buy_ratio"], "supported order"),
        ([], "no features"),
        (["log_return", "log_range", "taker_buy_ratio"], "normalisation mean/std"),
    ],
)
def test_manifest_feature_lists_that_are_refused(
    model_copy: Path, features: list[str], problem: str
) -> None:
    _edit_manifest(model_copy, features=features)

    with pytest.raises(ModelError, match=problem):
        read_manifest(model_copy)


def test_a_manifest_may_list_any_subset_of_the_supported_features(model_copy: Path) -> None:
    subset = ["log_return", "vwap_close", "large_trade_share"]
    _edit_manifest(model_copy, features=subset, normalisation={"mean": [0.0] * 3, "std": [1.0] * 3})

    assert read_manifest(model_copy).features == tuple(subset)
    # The bundled model.onnx still takes four features: the signature check refuses it.
    with pytest.raises(ModelError, match=r"does not match \(batch, 30, 3\)"):
        load_forecaster(model_copy)


def test_a_model_of_other_features_serves_them(candles: list[Candle], tmp_path: Path) -> None:
    features = ("log_return", "taker_buy_ratio", "vwap_close", "log_trades_rel")
    forecaster = load_forecaster(tiny_version(tmp_path / "tiny-v1", features))
    assert isinstance(forecaster, OnnxForecaster)
    assert forecaster.features == features

    forecast = forecaster.predict(candles[:200])

    _assert_sane(forecast, candles[199].close)


def test_candles_lacking_a_feature_get_no_forecast_logged_once(
    candles: list[Candle], tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    forecaster = load_forecaster(tiny_version(tmp_path / "tiny-v1", FEATURES))
    klines = candles[:200]  # from klines: large_trade_quote_volume unknown
    built = [
        msgspec.structs.replace(c, large_trade_quote_volume=c.quote_volume / 10) for c in klines
    ]

    with caplog.at_level(logging.WARNING, logger="makeusrich.inference.model"):
        batch = forecaster.predict_batch([klines, built, klines[:100]])
        again = forecaster.predict(klines)

    assert batch[0] is None and again is None
    _assert_sane(batch[1], built[-1].close)
    assert batch[2] is None
    # Only the candles the model reads count: an unknown one before its window does not.
    mixed = [*klines[:-30], *built[-30:]]
    _assert_sane(forecaster.predict(mixed), mixed[-1].close)
    (record,) = caplog.records
    assert "needs ['large_trade_share']" in record.getMessage()
    assert "BTCUSDT 1m" in record.getMessage()


def test_unloadable_onnx_is_a_model_error(model_copy: Path) -> None:
    garbage = b"this is not an onnx model"
    (model_copy / MODEL_FILE).write_bytes(garbage)
    path = model_copy / MANIFEST_FILE
    manifest = msgspec.json.decode(path.read_bytes())
    manifest["sha256"] = hashlib.sha256(garbage).hexdigest()
    path.write_bytes(msgspec.json.encode(manifest))

    with pytest.raises(ModelError, match="onnxruntime cannot load") as raised:
        load_forecaster(model_copy)
    assert not isinstance(raised.value, ModelIntegrityError)


def test_registry_directory_loads_the_newest_version(model_copy: Path, tmp_path: Path) -> None:
    registry = tmp_path / "registry"
    registry.mkdir()
    for name in ("lstm-20250101-000000-aaaaaaaa", "lstm-20250301-000000-bbbbbbbb"):
        shutil.copytree(model_copy, registry / name)
    (registry / ".staging-x").mkdir()  # an unfinished write is never picked
    (registry / "lstm-20250201-000000-cccccccc").mkdir()  # not a version: ignored

    forecaster = load_forecaster(registry)

    assert isinstance(forecaster, OnnxForecaster)
    assert forecaster.path.name == "lstm-20250301-000000-bbbbbbbb"


def test_directory_without_models_falls_back_to_naive(tmp_path: Path) -> None:
    assert isinstance(load_forecaster(tmp_path), NaiveForecaster)


def test_missing_path_is_a_model_error(tmp_path: Path) -> None:
    with pytest.raises(ModelError, match="does not exist"):
        load_forecaster(tmp_path / "nope")
