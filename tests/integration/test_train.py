"""Training end to end on one real day of 1m klines, and the candle file readers."""

import hashlib
import math
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import msgspec
import numpy as np
import pyarrow.parquet as pq
import pytest

from kit.builders import kline_candles
from makeusrich.core.errors import TrainingError
from makeusrich.core.schemas import Candle
from makeusrich.inference import (
    FEATURES,
    MODEL_FILE,
    OHLCV_COLUMNS,
    OnnxForecaster,
    available_features,
    check_parity,
    load_forecaster,
    read_manifest,
)
from makeusrich.monitoring.reference import read_reference
from makeusrich.trainer import load_series, train
from makeusrich.trainer.archive import read_candles, read_part, write_candles

DAY = Path(__file__).parent.parent / "data" / "BTCUSDT-1m-2025-11-20.csv"
DAY_START_MS = 1763596800000
# Klines carry everything but the large-trade volume.
KLINE_FEATURES = tuple(f for f in FEATURES if f != "large_trade_share")


def _day_lines() -> list[str]:
    return DAY.read_text().splitlines()


def _built_from_trades(candles: list[Candle]) -> list[Candle]:
    """``candles`` as the pipeline builds them from trades: large-trade volume known."""
    return [
        msgspec.structs.replace(c, large_trade_quote_volume=c.quote_volume * (i % 5) / 10)
        for i, c in enumerate(candles)
    ]


def _write_jsonl(path: Path, candles: list[Candle]) -> Path:
    path.write_bytes(b"\n".join(msgspec.json.encode(c) for c in candles) + b"\n")
    return path


# --- training ---------------------------------------------------------------------------


@pytest.mark.train
@pytest.mark.slow
def test_train_writes_a_verified_loadable_version(tmp_path: Path) -> None:
    import torch  # the [train] extra must be installed: a missing torch fails this test

    version_dir = train(DAY, tmp_path / "models", epochs=1, hidden=16)

    manifest = read_manifest(version_dir)
    assert version_dir.parent == tmp_path / "models"
    assert version_dir.name == manifest.version
    assert manifest.sha256 == hashlib.sha256((version_dir / MODEL_FILE).read_bytes()).hexdigest()
    assert manifest.architecture.kind == "lstm"
    assert manifest.architecture.hidden == 16
    assert manifest.window == 30
    assert manifest.onnx.opset >= 17
    assert manifest.training["torch"] == str(torch.__version__)
    data = manifest.training_data
    assert data.symbols == ("BTCUSDT",)
    assert data.interval == "1m"
    assert data.candles == 1440
    assert data.filled_candles == 0
    assert data.first_open_time == DAY_START_MS  # µs in the file, ms in the manifest
    assert data.last_open_time == DAY_START_MS + 1439 * 60_000
    # Last 15% for validation, strictly after every training target.
    assert data.validation_windows == pytest.approx(0.15 * (1440 - 32), abs=2)
    assert data.validation_first_target_open_time > DAY_START_MS + 1200 * 60_000
    # Every feature klines have, in the supported order; the drift reference follows.
    assert manifest.features == KLINE_FEATURES
    assert len(manifest.normalisation.mean) == len(KLINE_FEATURES)
    reference = read_reference(version_dir)
    assert reference is not None and reference.features == manifest.features
    metrics = manifest.metrics
    assert metrics["onnx_torch_max_abs_diff"] < 1e-4
    assert metrics["mae_persistence"] > 0
    assert metrics["skill"] == pytest.approx(1 - metrics["mae"] / metrics["mae_persistence"])
    assert 0.0 <= metrics["coverage_80"] <= 1.0

    forecaster = load_forecaster(tmp_path / "models")
    assert isinstance(forecaster, OnnxForecaster)
    assert forecaster.version == manifest.version
    candles = kline_candles(DAY)
    forecast = forecaster.predict(candles)
    assert forecast is not None
    assert forecast.lower <= forecast.predicted_close <= forecast.upper
    assert abs(forecast.predicted_close / candles[-1].close - 1) < 0.01
    assert not list((tmp_path / "models").glob(".staging-*"))


@pytest.mark.train
@pytest.mark.slow
def test_training_is_deterministic_for_a_seed(tmp_path: Path) -> None:
    first = train(DAY, tmp_path / "a", epochs=1, hidden=8, seed=3)
    second = train(DAY, tmp_path / "b", epochs=1, hidden=8, seed=3)

    assert read_manifest(first).sha256 == read_manifest(second).sha256


@pytest.mark.train
@pytest.mark.slow
def test_a_model_of_several_horizons_serves_and_scores_each(tmp_path: Path) -> None:
    version_dir = train(DAY, tmp_path, horizons=(1, 5, 15), epochs=1, hidden=8)

    manifest = read_manifest(version_dir)
    assert manifest.horizons == (1, 5, 15)
    assert manifest.target == "log_return_ahead"
    # Split conformal per horizon, fitted on held-out windows to cover 80% there.
    assert [c.horizon for c in manifest.calibration] == [1, 5, 15]
    for calibration in manifest.calibration:
        assert calibration.lower_scale > 0 and calibration.upper_scale > 0
        # At least 80% (finite-sample valid), a little over on ~140 windows.
        assert 0.8 <= calibration.coverage_80 <= 0.86
    assert manifest.evaluation is not None
    assert sorted(manifest.evaluation["ahead"]) == ["15", "5"]  # JSON keys
    forecaster = OnnxForecaster(version_dir)
    assert check_parity(forecaster) < 1e-4
    candles = kline_candles(DAY)
    forecasts = forecaster.predict_horizons(candles)
    assert forecasts is not None
    assert [f.horizon for f in forecasts] == [1, 5, 15]
    for forecast in forecasts:
        assert forecast.lower <= forecast.predicted_close <= forecast.upper
    assert forecaster.predict(candles, 5) == forecasts[1]
    with pytest.raises(ValueError, match="serves horizons"):
        forecaster.predict(candles, 60)


@pytest.mark.train
@pytest.mark.slow
def test_garch_packaged_as_a_version_forecasts_its_variance_recursion(tmp_path: Path) -> None:
    import torch

    from makeusrich.trainer.garch import GarchModel

    version_dir = train(DAY, tmp_path, arch="garch", window=60, horizons=(1, 5))

    manifest = read_manifest(version_dir)
    assert manifest.architecture.kind == "garch" and manifest.architecture.parameters == 3
    assert manifest.features == ("log_return",)
    forecaster = OnnxForecaster(version_dir)
    assert check_parity(forecaster) < 1e-4
    candles = kline_candles(DAY)
    forecasts = forecaster.predict_horizons(candles)
    assert forecasts is not None
    for forecast in forecasts:  # no move, a band around it
        assert forecast.predicted_close == pytest.approx(candles[-1].close, rel=1e-12)
    assert forecasts[1].upper - forecasts[1].lower > forecasts[0].upper - forecasts[0].lower

    # The graph is the textbook recursion, seeded with the window's mean square.
    omega, alpha, beta = 0.5, 0.1, 0.85
    model = GarchModel(omega, alpha, beta, window=20, horizons=(1, 3), mean=0.0, std=1.0)
    returns = np.random.default_rng(1).normal(0, 2e-4, size=20)
    bp = returns * 1e4
    variance = float(np.mean(bp**2))
    for r in bp:
        variance = omega + alpha * r**2 + beta * variance
    level, phi = omega / (1 - alpha - beta), alpha + beta
    three = sum(level + phi ** (k - 1) * (variance - level) for k in (1, 2, 3))
    with torch.no_grad():
        out = model(torch.tensor(returns, dtype=torch.float32)[None, :, None]).numpy()[0]
    z80 = 1.2815515655446004
    np.testing.assert_allclose(out, [-z80 * math.sqrt(variance) / 1e4, 0.0,
                                     z80 * math.sqrt(variance) / 1e4,
                                     -z80 * math.sqrt(three) / 1e4, 0.0,
                                     z80 * math.sqrt(three) / 1e4], rtol=1e-5)


@pytest.mark.train
@pytest.mark.slow
def test_onnx_export_matches_torch(tmp_path: Path) -> None:
    import torch

    from makeusrich.trainer.model import INPUT_NAME, QuantileLSTM, export_onnx

    torch.manual_seed(0)
    model = QuantileLSTM(
        4, hidden=16, layers=2, target_scales=[1e-3], initial_quantiles=[-1e-3, 0, 1e-3]
    )
    export_onnx(model, tmp_path / MODEL_FILE, window=30, n_features=4)

    import onnxruntime as ort

    session = ort.InferenceSession(str(tmp_path / MODEL_FILE), providers=["CPUExecutionProvider"])
    for batch in (1, 7):
        x = np.random.default_rng(batch).normal(size=(batch, 30, 4)).astype(np.float32)
        with torch.no_grad():
            expected = model(torch.from_numpy(x)).numpy()
        (actual,) = session.run(None, {INPUT_NAME: x})
        assert actual.shape == (batch, 3)
        assert np.abs(actual - expected).max() < 1e-4


@pytest.mark.train
@pytest.mark.slow
def test_candles_from_trades_train_every_feature_or_those_asked_for(tmp_path: Path) -> None:
    built = _built_from_trades(kline_candles(DAY))
    data = _write_jsonl(tmp_path / "candles.jsonl", built)

    every = read_manifest(train(data, tmp_path / "a", epochs=1, hidden=8, stride=4))
    # Any subset, even one without the log return (the target is computed all the same).
    chosen = ("vwap_close", "log_range", "large_trade_share")
    version_dir = train(data, tmp_path / "b", epochs=1, hidden=8, stride=4, features=chosen)

    assert every.features == FEATURES
    manifest = read_manifest(version_dir)
    assert manifest.features == ("log_range", "vwap_close", "large_trade_share")
    forecaster = load_forecaster(version_dir)
    assert forecaster.predict(built) is not None
    assert forecaster.predict(kline_candles(DAY)) is None  # klines lack large trades


@pytest.mark.train
def test_features_that_are_unknown_or_missing_are_refused(tmp_path: Path) -> None:
    with pytest.raises(TrainingError, match="feature large_trade_share is not available"):
        train(DAY, tmp_path, features=["vwap_close", "large_trade_share"])
    with pytest.raises(TrainingError, match=r"unknown features \['rsi'\]"):
        train(DAY, tmp_path, features=["log_return", "rsi"])
    with pytest.raises(TrainingError, match="features is empty"):
        train(DAY, tmp_path, features=[])
    result = subprocess.run(
        [sys.executable, "-m", "makeusrich", "train", "--data", str(DAY), "--out",
         str(tmp_path), "--features", "log_return,large_trade_share"],
        capture_output=True, text=True, timeout=120, check=False,
    )
    assert result.returncode == 2
    assert "feature large_trade_share is not available" in result.stderr
    assert not any(tmp_path.iterdir())


@pytest.mark.train
@pytest.mark.slow
def test_too_few_candles_is_a_training_error(tmp_path: Path) -> None:
    short = tmp_path / "BTCUSDT-1m-2025-11-20.csv"
    short.write_text("\n".join(_day_lines()[:20]) + "\n")

    with pytest.raises(TrainingError, match="too few candles"):
        train(short, tmp_path / "models", epochs=1)
    assert not (tmp_path / "models").exists() or not any((tmp_path / "models").iterdir())


# --- reading candle files ---------------------------------------------------------------


def test_reads_zip_with_header_and_millisecond_times(tmp_path: Path) -> None:
    lines = _day_lines()[:100]
    ms_lines = [
        ",".join([str(int(f[0]) // 1000), *f[1:6], str(int(f[6]) // 1000), *f[7:]])
        for f in (line.split(",") for line in lines)
    ]
    header = (
        "open_time,open,high,low,close,volume,close_time,quote_volume,count,"
        "taker_buy_volume,taker_buy_quote_volume,ignore"
    )
    archive = tmp_path / "BTCUSDT-1m-2025-11-20.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        zf.writestr("BTCUSDT-1m-2025-11-20.csv", "\n".join([header, *ms_lines]) + "\n")

    from_zip = load_series(archive)
    from_csv = load_series(DAY)

    assert len(from_zip) == 1
    assert from_zip[0].open_time[0] == DAY_START_MS
    np.testing.assert_array_equal(from_zip[0].open_time, from_csv[0].open_time[:100])
    np.testing.assert_array_equal(from_zip[0].ohlcv, from_csv[0].ohlcv[:100])


def test_klines_give_quote_volume_and_trades_but_no_large_trades() -> None:
    (series,) = load_series(DAY)
    fields = [line.split(",") for line in _day_lines()]

    column = OHLCV_COLUMNS.index
    np.testing.assert_array_equal(
        series.ohlcv[:, column("quote_volume")], [float(f[7]) for f in fields]
    )
    np.testing.assert_array_equal(series.ohlcv[:, column("trades")], [int(f[8]) for f in fields])
    np.testing.assert_array_equal(
        series.ohlcv[:, column("taker_buy_volume")], [float(f[9]) for f in fields]
    )
    assert np.isnan(series.ohlcv[:, column("large_trade_quote_volume")]).all()
    assert available_features(series.ohlcv) == KLINE_FEATURES


def test_sorts_deduplicates_and_fills_gaps(tmp_path: Path) -> None:
    lines = _day_lines()[:10]
    shuffled = [lines[5], lines[0], lines[1], lines[1], *lines[6:], lines[2]]  # 3, 4 missing
    (tmp_path / "BTCUSDT-1m-2025-11-20.csv").write_text("\n".join(shuffled) + "\n")

    (series,) = load_series(tmp_path)

    assert len(series) == 10
    assert series.filled == 2
    np.testing.assert_array_equal(np.diff(series.open_time), 60_000)
    close_before_gap = float(lines[2].split(",")[4])
    np.testing.assert_array_equal(series.ohlcv[3:5, :4], close_before_gap)  # flat at prev close
    np.testing.assert_array_equal(series.ohlcv[3:5, 4:], 0.0)  # zero volume, trades, ...
    np.testing.assert_array_equal(series.ohlcv[5, 3], float(lines[5].split(",")[4]))


def test_long_gaps_split_the_series(tmp_path: Path) -> None:
    lines = _day_lines()
    (tmp_path / "BTCUSDT-1m-2025-11-20.csv").write_text("\n".join(lines[:50] + lines[500:]) + "\n")

    first, second = load_series(tmp_path, max_fill=60)

    assert (len(first), len(second)) == (50, 940)
    assert first.filled == second.filled == 0


def test_reads_pipeline_candles_as_jsonl(tmp_path: Path) -> None:
    candles = _built_from_trades(kline_candles(DAY)[:40])
    path = _write_jsonl(tmp_path / "candles.jsonl", candles[::-1])

    (series,) = load_series(path)

    assert (series.symbol, series.interval) == ("BTCUSDT", "1m")
    assert series.open_time[0] == candles[0].open_time
    np.testing.assert_array_equal(series.ohlcv[:, 3], [c.close for c in candles])
    large = OHLCV_COLUMNS.index("large_trade_quote_volume")
    np.testing.assert_array_equal(
        series.ohlcv[:, large], [c.large_trade_quote_volume for c in candles]
    )
    assert all(math.isfinite(v) for v in series.ohlcv.ravel())
    assert available_features(series.ohlcv) == FEATURES
    # Candles encoded before the field existed lack the key: unknown.
    old = tmp_path / "old" / "candles.jsonl"
    old.parent.mkdir()
    old.write_bytes(path.read_bytes().replace(b',"large_trade_quote_volume":', b',"x":'))
    (series,) = load_series(old)
    assert np.isnan(series.ohlcv[:, large]).all()


def test_archive_parts_keep_large_trades_and_parts_from_before_still_read(
    tmp_path: Path,
) -> None:
    klines = kline_candles(DAY)[:30]
    built = _built_from_trades(klines[10:])
    root = tmp_path / "archive"
    (old_part,) = write_candles(root, klines[:10])
    # A part written before large_trade_quote_volume existed has no such column.
    pq.write_table(read_part(old_part).drop_columns(["large_trade_quote_volume"]), old_part)
    write_candles(root, built)

    assert read_candles(root, "BTCUSDT", "1m") == [*klines[:10], *built]
    (series,) = load_series(root)
    large = series.ohlcv[:, OHLCV_COLUMNS.index("large_trade_quote_volume")]
    assert np.isnan(large[:10]).all()
    np.testing.assert_array_equal(large[10:], [c.large_trade_quote_volume for c in built])
    assert available_features(series.ohlcv[10:]) == FEATURES
    assert available_features(series.ohlcv) == KLINE_FEATURES


def test_glob_pattern_and_bad_inputs(tmp_path: Path) -> None:
    shutil.copy(DAY, tmp_path / DAY.name)

    (series,) = load_series(str(tmp_path / "BTCUSDT-1m-*.csv"))
    assert len(series) == 1440

    with pytest.raises(TrainingError, match="matches no files"):
        load_series(str(tmp_path / "ETHUSDT-*.csv"))
    with pytest.raises(TrainingError, match="does not exist"):
        load_series(tmp_path / "missing.csv")
    bad = tmp_path / "bad" / "BTCUSDT-1m-2025-11-21.csv"
    bad.parent.mkdir()
    bad.write_text("1763596800000000,abc,1,1,1,1,1,1,1,1,1,0\n")
    with pytest.raises(TrainingError, match="not a Binance kline CSV"):
        load_series(bad)


@pytest.mark.train
@pytest.mark.slow
def test_mur_train_command(tmp_path: Path) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "makeusrich", "train", "--data", str(DAY), "--out",
         str(tmp_path), "--epochs", "1"],
        capture_output=True, text=True, timeout=600, check=False,
    )
    assert result.returncode == 0, result.stderr
    version_dir = Path(result.stdout.strip().removeprefix("model written to "))
    assert version_dir.parent == tmp_path
    assert load_forecaster(tmp_path).version == read_manifest(version_dir).version
