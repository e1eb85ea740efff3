"""Conformal calibration of the served band: split conformal (training) and adaptive
conformal (live and offline, which must agree)."""

import numpy as np
import pytest

from kit.builders import make_candles, random_closes
from makeusrich.inference import NaiveForecaster
from makeusrich.inference.conformal import (
    AdaptiveConformal,
    adaptive_log_quantiles,
    apply_scales,
    fit_calibration,
)
from makeusrich.stream.pipeline import TradePipeline
from makeusrich.trainer.evaluate import served_bands

Z80 = 1.2815515655446004


def _band(sigma: np.ndarray, lower_z: float = Z80, upper_z: float = Z80) -> np.ndarray:
    return np.stack([-lower_z * sigma, 0.0 * sigma, upper_z * sigma], axis=1)


def _coverage(band: np.ndarray, target: np.ndarray) -> float:
    return float(np.mean((target >= band[:, 0]) & (target <= band[:, 2])))


def test_split_conformal_fixes_a_too_wide_and_lopsided_band_on_fresh_data() -> None:
    rng = np.random.default_rng(3)
    sigma = rng.uniform(0.5, 2.0, 40_000)  # the model knows each return's volatility
    target = rng.normal(0.0, sigma)
    # Twice too wide below, too narrow above: both sides miss the wrong share.
    band = _band(sigma, lower_z=2 * Z80, upper_z=0.7 * Z80)
    fit, fresh = slice(0, 20_000), slice(20_000, None)

    calibration = fit_calibration(band[fit], target[fit])
    served = apply_scales(band[fresh], calibration.lower_scale, calibration.upper_scale)

    assert calibration.lower_scale == pytest.approx(0.5, abs=0.03)
    assert calibration.upper_scale == pytest.approx(1 / 0.7, abs=0.05)
    assert np.mean(target[fit] < band[fit, 0]) < 0.03  # raw: the sides miss 2% and 18%
    assert np.mean(target[fit] > band[fit, 2]) > 0.15
    assert calibration.windows == 20_000
    assert calibration.coverage_80 == pytest.approx(0.8, abs=0.005)
    assert np.mean(target[fresh] < served[:, 0]) == pytest.approx(0.1, abs=0.01)
    assert np.mean(target[fresh] > served[:, 2]) == pytest.approx(0.1, abs=0.01)
    np.testing.assert_array_equal(served[:, 1], band[fresh, 1])  # the median stays


def test_split_conformal_needs_a_band_with_width() -> None:
    with pytest.raises(ValueError, match="positive width"):
        fit_calibration(np.zeros((10, 3)), np.ones(10))


def test_adaptive_conformal_uses_only_earlier_targets() -> None:
    rng = np.random.default_rng(4)
    band = _band(np.ones(200))
    target = rng.normal(0, 1, 200)
    served = adaptive_log_quantiles(band, target, 0.05)
    changed = target.copy()
    changed[100] = 50.0  # a huge miss at forecast 100

    again = adaptive_log_quantiles(band, changed, 0.05)

    np.testing.assert_array_equal(served[:101], again[:101])
    assert again[101, 2] > served[101, 2]  # only later bands widen after it


def test_adaptive_conformal_recovers_coverage_after_volatility_doubles() -> None:
    rng = np.random.default_rng(5)
    band = _band(np.ones(30_000))  # the model believes sigma = 1 throughout
    target = rng.normal(0, 2, 30_000)  # the market moves twice as much

    served = adaptive_log_quantiles(band, target, 0.005)

    assert _coverage(band, target) < 0.5
    for week in np.array_split(np.arange(10_000, 30_000), 2):
        assert _coverage(served[week], target[week]) == pytest.approx(0.8, abs=0.02)


def test_step_zero_serves_the_band_unchanged() -> None:
    band = _band(np.ones(50))
    target = np.full(50, 10.0)  # every forecast misses above

    np.testing.assert_allclose(adaptive_log_quantiles(band, target, 0.0), band)


def test_live_tracker_serves_what_the_offline_recursion_scores() -> None:
    candles = make_candles(random_closes(400, seed=6, sigma=0.003))
    pipeline = TradePipeline(["1m"], 0, NaiveForecaster(), conformal_step=0.05)
    for candle in candles:
        pipeline.add_candle(candle)
    served = pipeline.drain().predictions[:-1]  # the last one's target never closed
    naive = NaiveForecaster()
    raw = [naive.predict(candles[: i + 1][-31:]) for i in range(len(served))]
    last = np.array([p.last_close for p in served])
    actual = np.array([c.close for c in candles[1 : len(served) + 1]])
    bands = np.array([(f.lower, f.predicted_close, f.upper) for f in raw if f is not None])

    offline = served_bands({"naive": bands}, last, actual, 0.05)["naive"]

    online = np.array([(p.lower, p.predicted_close, p.upper) for p in served])
    np.testing.assert_allclose(online, offline, rtol=1e-12)
    assert not np.allclose(online, bands, rtol=1e-6)  # the step did move the bands


def test_tracker_state_survives_a_snapshot() -> None:
    candles = make_candles(random_closes(300, seed=7, sigma=0.003))
    whole = TradePipeline(["1m"], 0, NaiveForecaster(), conformal_step=0.05)
    first = TradePipeline(["1m"], 0, NaiveForecaster(), conformal_step=0.05)
    for candle in candles[:150]:
        whole.add_candle(candle)
        first.add_candle(candle)
    resumed = TradePipeline(["1m"], 0, NaiveForecaster(), conformal_step=0.05)
    resumed.restore("BTCUSDT", first.snapshot("BTCUSDT"))
    whole.drain()
    for candle in candles[150:]:
        whole.add_candle(candle)
        resumed.add_candle(candle)

    def bands(pipeline: TradePipeline) -> list[tuple[float, ...]]:
        return [(p.lower, p.predicted_close, p.upper) for p in pipeline.drain().predictions]

    assert bands(resumed) == bands(whole)


def test_a_snapshot_restored_over_later_state_replaces_it() -> None:
    candles = make_candles(random_closes(300, seed=11, sigma=0.003))
    whole = TradePipeline(["1m"], 0, NaiveForecaster(horizons=(1, 5)), conformal_step=0.05)
    ahead = TradePipeline(["1m"], 0, NaiveForecaster(horizons=(1, 5)), conformal_step=0.05)
    # Snapshot before any horizon-5 target closed: its multipliers are not in it yet.
    for candle in candles[:3]:
        whole.add_candle(candle)
        ahead.add_candle(candle)
    state = ahead.snapshot("BTCUSDT")
    for candle in candles[3:50]:  # folded on, then the same partition is assigned again
        ahead.add_candle(candle)
    ahead.restore("BTCUSDT", state)
    whole.drain()
    ahead.drain()
    for candle in candles[3:]:
        whole.add_candle(candle)
        ahead.add_candle(candle)

    def bands(pipeline: TradePipeline) -> list[tuple[float, ...]]:
        return [(p.lower, p.upper) for p in pipeline.drain().predictions]

    assert bands(ahead) == bands(whole)


def test_a_forecast_is_scored_only_against_its_own_target_candle() -> None:
    tracker = AdaptiveConformal(0.5)
    band = [-0.01, 0.0, 0.01]
    tracker.adjust("BTCUSDT", "1m", "v1", 1, 120_000, 100.0, band)
    tracker.observe("BTCUSDT", "1m", 60_000, 200.0)  # an earlier candle: not the target
    tracker.observe("ETHUSDT", "1m", 120_000, 200.0)  # another symbol
    assert tracker.adjust("BTCUSDT", "1m", "v1", 1, 180_000, 100.0, band) == band
    tracker.observe("BTCUSDT", "1m", 180_000, 200.0)  # its target, far above the band

    widened = tracker.adjust("BTCUSDT", "1m", "v1", 1, 240_000, 100.0, band)
    assert widened[2] > band[2]  # the upper side missed: it widens
    assert band[0] < widened[0] < band[1]  # the lower side held: it narrows a little
    assert tracker.adjust("BTCUSDT", "1m", "v2", 1, 240_000, 100.0, band) == band  # per model
    assert tracker.adjust("BTCUSDT", "1m", "v1", 5, 480_000, 100.0, band) == band  # per horizon


def test_each_horizon_learns_from_its_own_target() -> None:
    tracker = AdaptiveConformal(0.5)
    band = [-0.01, 0.0, 0.01]
    tracker.adjust("BTCUSDT", "1m", "v1", 1, 60_000, 100.0, band)
    tracker.adjust("BTCUSDT", "1m", "v1", 3, 180_000, 100.0, band)
    tracker.observe("BTCUSDT", "1m", 60_000, 100.0)  # horizon 1's target, inside its band
    narrowed = tracker.adjust("BTCUSDT", "1m", "v1", 1, 120_000, 100.0, band)
    assert band[0] < narrowed[0] and narrowed[2] < band[2]
    assert tracker.adjust("BTCUSDT", "1m", "v1", 3, 240_000, 100.0, band) == band  # not yet
    tracker.observe("BTCUSDT", "1m", 180_000, 50.0)  # horizon 3's target, far below
    assert tracker.adjust("BTCUSDT", "1m", "v1", 3, 300_000, 100.0, band)[0] < band[0]


def test_the_pipeline_serves_every_horizon_of_its_model() -> None:
    candles = make_candles(random_closes(120, seed=3, sigma=0.002))
    pipeline = TradePipeline(["1m"], 0, NaiveForecaster(horizons=(1, 5, 15)),
                             conformal_step=0.0)
    for candle in candles:
        pipeline.add_candle(candle)
    predictions = pipeline.drain().predictions
    assert len(predictions) == 3 * len(candles)
    for candle, group in zip(candles, zip(*[iter(predictions)] * 3, strict=True), strict=True):
        assert [p.horizon for p in group] == [1, 5, 15]
        assert [p.target_open_time for p in group] == [
            candle.open_time + h * 60_000 for h in (1, 5, 15)]
        assert all(p.candle_open_time == candle.open_time for p in group)
        widths = [p.upper - p.lower for p in group]
        assert widths[0] < widths[1] < widths[2]  # a random walk spreads with the horizon
