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
import pytest

from kit.builders import kline_candles
from makeusrich.core.errors import TrainingError
from makeusrich.inference import (
    MODEL_FILE,
    OnnxForecaster,
    load_forecaster,
    read_manifest,
)
from makeusrich.trainer import load_series, train

DAY = Path(__file__).parent.parent / "data" / "BTCUSDT-1m-2025-11-20.csv"
DAY_START_MS = 1763596800000


def _day_lines() -> list[str]:
    return DAY.read_text().splitlines()


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
def test_onnx_export_matches_torch(tmp_path: Path) -> None:
    import torch

    from makeusrich.trainer.model import INPUT_NAME, QuantileLSTM, export_onnx

    torch.manual_seed(0)
    model = QuantileLSTM(
        4, hidden=16, layers=2, target_scale=1e-3, initial_quantiles=[-1e-3, 0, 1e-3]
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
    np.testing.assert_array_equal(series.ohlcv[3:5, 4:], 0.0)  # zero volume
    np.testing.assert_array_equal(series.ohlcv[5, 3], float(lines[5].split(",")[4]))


def test_long_gaps_split_the_series(tmp_path: Path) -> None:
    lines = _day_lines()
    (tmp_path / "BTCUSDT-1m-2025-11-20.csv").write_text("\n".join(lines[:50] + lines[500:]) + "\n")

    first, second = load_series(tmp_path, max_fill=60)

    assert (len(first), len(second)) == (50, 940)
    assert first.filled == second.filled == 0


def test_reads_pipeline_candles_as_jsonl(tmp_path: Path) -> None:
    candles = kline_candles(DAY)[:40]
    path = tmp_path / "candles.jsonl"
    path.write_bytes(b"\n".join(msgspec.json.encode(c) for c in reversed(candles)) + b"\n")

    (series,) = load_series(path)

    assert (series.symbol, series.interval) == ("BTCUSDT", "1m")
    assert series.open_time[0] == candles[0].open_time
    np.testing.assert_array_equal(series.ohlcv[:, 3], [c.close for c in candles])
    assert all(math.isfinite(v) for v in series.ohlcv.ravel())


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
