"""The bundled model and the naive baseline scored on a real day of 1m klines.

The bundled model's data ran 2025-08-01 .. 2025-11-23 and it held out everything from
2025-11-06 18:04 on for validation, so this day (2025-11-20) lies in its validation span: fair
to score on. Moved into its training span, the same candles overlap the training data.
"""

import math
from pathlib import Path

import pytest

from makeusrich.inference import OnnxForecaster, bundled_models_dir, load_forecaster
from makeusrich.trainer import load_series
from makeusrich.trainer.data import CandleSeries
from makeusrich.trainer.evaluate import MODEL, Report, evaluate, evaluate_paths

pytestmark = pytest.mark.slow

DAY = Path(__file__).parent.parent / "data" / "BTCUSDT-1m-2025-11-20.csv"
DAY_START_MS = 1763596800000
NAMES = (MODEL, "persistence", "ewma_vol", "drift", "ema", "garch")


def _assert_finite(report: Report) -> None:
    for scores in (report.overall, *report.symbols):
        assert set(scores.metrics) == set(NAMES)
        for m in scores.metrics.values():
            values = (m.mae, m.rmse, m.skill, m.directional_accuracy, m.coverage_80)
            assert all(v is not None and math.isfinite(v) for v in values)
            assert 0 <= m.coverage_80 <= 1 and m.interval_width_bp > 0


@pytest.fixture(scope="module")
def bundled() -> OnnxForecaster:
    forecaster = load_forecaster(None)
    assert isinstance(forecaster, OnnxForecaster)
    return forecaster


def test_bundled_model_on_a_day_of_its_validation_span(bundled: OnnxForecaster) -> None:
    report = evaluate_paths(bundled.version, [DAY], bundled_models_dir())

    assert report.model == bundled.version
    assert not report.overlaps_training
    assert "WARNING" not in report.render()
    assert report.overall.forecasts == 1440 - (bundled.window + 1)
    assert report.overall.first_target_open_time == DAY_START_MS + 31 * 60_000
    assert [(s.symbol, s.interval) for s in report.symbols] == [("BTCUSDT", "1m")]
    _assert_finite(report)
    metrics = report.overall.metrics
    assert metrics["persistence"].skill == 0.0
    # A one-minute BTC forecast is close to a random walk: near persistence, not far off.
    assert abs(metrics[MODEL].mae / metrics["persistence"].mae - 1) < 0.05
    assert 0.6 < metrics[MODEL].coverage_80 < 0.95
    # Champion (the bundled registry's newest) and a version path give the same answer.
    assert evaluate_paths("champion", [DAY], None) == report
    assert evaluate_paths(str(bundled.path), [DAY], None) == report


def test_naive_model_matches_the_persistence_baseline() -> None:
    report = evaluate_paths("naive", [DAY], None)

    assert not report.overlaps_training
    assert report.training_last_open_time is None
    _assert_finite(report)
    assert report.overall.metrics[MODEL] == report.overall.metrics["persistence"]
    assert report.overall.metrics[MODEL].skill == 0.0


def test_span_after_the_training_targets_does_not_overlap(bundled: OnnxForecaster) -> None:
    # The same day's candles also moved to a day of the training span: a span selected
    # after it (the real day, in the validation span) is free of the model's training data.
    real = load_series(DAY)[0]
    shift = bundled.manifest.training_data.first_open_time + 30 * 86_400_000 - DAY_START_MS
    earlier = CandleSeries(real.symbol, real.interval, real.open_time + shift, real.ohlcv, 0)

    both = evaluate(bundled, [earlier, real])
    after = evaluate(bundled, [earlier, real], start_open_time=int(real.open_time[0]))

    assert both.overlaps_training and not after.overlaps_training
    assert both.overall.forecasts == 2 * after.overall.forecasts
    # Same candles, same forecasts: only their times moved.
    assert after.overall.metrics == evaluate(bundled, real).overall.metrics
    assert both.overall.metrics[MODEL].mae == pytest.approx(after.overall.metrics[MODEL].mae)
