"""Live quality: rolling scores of served predictions, as the trainer's evaluation scores."""

import json
import random
from collections.abc import Sequence

import numpy as np
import pytest

from kit.builders import make_candles, make_predictions, random_closes
from makeusrich.core.schemas import Candle, Prediction
from makeusrich.inference import pinball
from makeusrich.monitoring.quality import LiveQuality, QualitySnapshot
from makeusrich.trainer.evaluate import forecast_metrics


def _score_all(
    quality: LiveQuality, candles: Sequence[Candle], predictions: Sequence[Prediction]
) -> list[QualitySnapshot | None]:
    """Score prediction i (made at candle i) against candle i + 1, as the worker will."""
    return [quality.score(p, c) for p, c in zip(predictions, candles[1:], strict=False)]


def _noisy_case(n: int, seed: int) -> tuple[list[Candle], list[Prediction]]:
    """Closes on a 0.5 tick (some do not move), forecasts that sometimes call no move."""
    rng = random.Random(seed)
    closes = [round(c * 2) / 2 for c in random_closes(n, seed=seed, start=1000.0, sigma=0.001)]
    candles = make_candles(closes)
    predicted = [c if rng.random() < 0.2 else c + rng.gauss(0, 1.0) for c in closes]
    band = [(p - rng.uniform(0, 2), p + rng.uniform(0, 2)) for p in predicted]
    return candles, make_predictions(candles, predicted, band=band)


def _expected(candles: Sequence[Candle], predictions: Sequence[Prediction]) -> dict[str, object]:
    """The trainer's metrics of the same forecasts (prediction i targets candle i + 1)."""
    band = np.array([(p.lower, p.predicted_close, p.upper) for p in predictions])
    last = np.array([p.last_close for p in predictions])
    actual = np.array([c.close for c in candles[1 : len(predictions) + 1]])
    base = float(np.mean(np.abs(last - actual)))
    m = forecast_metrics(band, last, actual, base, None)
    return {
        "pinball_bp": m.pinball_bp,
        "mae": m.mae,
        "mae_persistence": base,
        "skill": m.skill,
        "hit_rate": m.directional_accuracy,
        "coverage_80": m.coverage_80,
    }


def _actual(snapshot: QualitySnapshot | None) -> dict[str, object]:
    assert snapshot is not None
    return {
        "pinball_bp": snapshot.pinball_bp,
        "mae": snapshot.mae,
        "mae_persistence": snapshot.mae_persistence,
        "skill": snapshot.skill,
        "hit_rate": snapshot.hit_rate,
        "coverage_80": snapshot.coverage_80,
    }


def test_scores_agree_with_the_trainers_forecast_metrics() -> None:
    candles, predictions = _noisy_case(400, seed=3)
    quality = LiveQuality(window=1000)
    snapshot = _score_all(quality, candles, predictions)[-1]
    assert snapshot is not None
    assert (snapshot.window, snapshot.scored) == (399, 399)
    assert _actual(snapshot) == pytest.approx(_expected(candles, predictions[:399]))
    assert snapshot.error_ratio == pytest.approx(snapshot.mae / snapshot.mae_persistence)


def test_the_rolling_window_keeps_only_the_last_predictions() -> None:
    candles, predictions = _noisy_case(2_000, seed=4)
    quality = LiveQuality(window=50)
    snapshots = _score_all(quality, candles, predictions)
    # Checked all along: running sums, evictions and their periodic re-summing included.
    for end in (1, 49, 50, 51, 77, 1_000, 1_999):
        snapshot = snapshots[end - 1]
        assert snapshot is not None
        assert (snapshot.window, snapshot.scored) == (min(end, 50), end)
        first = max(0, end - 50)
        expected = _expected(candles[first:], predictions[first:end])
        actual = _actual(snapshot)
        assert actual.keys() == expected.keys()
        for name, value in expected.items():  # approx cannot take None with rel
            assert actual[name] == (None if value is None else pytest.approx(value, rel=1e-9))


def test_a_window_of_three_forgets_older_errors() -> None:
    candles = make_candles([100.0, 101.0, 102.0, 103.0, 104.0, 105.0])
    # Errors 10, 1, 2, 3, 4 against each next close.
    predictions = make_predictions(candles, [111.0, 103.0, 105.0, 107.0, 109.0])
    snapshot = _score_all(LiveQuality(window=3), candles, predictions)[-1]
    assert snapshot is not None
    assert snapshot.mae == pytest.approx(3.0)  # (2 + 3 + 4) / 3
    assert snapshot.mae_persistence == pytest.approx(1.0)
    assert snapshot.error_ratio == pytest.approx(3.0)
    assert snapshot.skill == pytest.approx(-2.0)
    assert (snapshot.window, snapshot.scored) == (3, 5)


def test_direction_flat_closes_are_left_out_and_flat_forecasts_count_half() -> None:
    candles = make_candles([100.0, 101.0, 100.0, 101.0, 101.0, 102.0])
    predictions = make_predictions(
        candles,
        [
            100.5,  # called up, went up: 1
            102.0,  # called up, went down: 0
            100.0,  # called no move, went up: 0.5
            100.0,  # close did not move: left out whatever was called
            101.0,  # called no move, went up: 0.5
        ],
    )
    snapshot = _score_all(LiveQuality(window=10), candles, predictions)[-1]
    assert snapshot is not None
    assert snapshot.hit_rate == pytest.approx(2.0 / 4)


def test_coverage_counts_closes_inside_the_band_edges_included() -> None:
    candles = make_candles([100.0, 101.0, 102.0, 103.0, 104.0])
    predictions = make_predictions(
        candles,
        [101.0] * 4,
        band=[(101.0, 101.5), (100.0, 101.9), (102.0, 103.0), (104.5, 105.0)],
    )
    snapshot = _score_all(LiveQuality(window=10), candles, predictions)[-1]
    assert snapshot is not None
    assert snapshot.coverage_80 == pytest.approx(2 / 4)  # 101 at the lower edge, 103 inside


def test_skill_is_undefined_when_no_close_moved() -> None:
    candles = make_candles([100.0] * 5)
    predictions = make_predictions(candles, [100.5] * 4)
    snapshot = _score_all(LiveQuality(window=10), candles, predictions)[-1]
    assert snapshot is not None
    assert snapshot.mae == pytest.approx(0.5)
    assert snapshot.mae_persistence == 0.0
    assert snapshot.skill is None
    assert snapshot.error_ratio is None
    assert snapshot.hit_rate is None
    assert snapshot.coverage_80 == 1.0


def test_each_model_version_is_scored_apart_naive_included() -> None:
    closes = random_closes(30, seed=5)
    candles = make_candles(closes)
    naive = make_predictions(candles, closes, model_version="naive")[:10]  # the warm-up
    model = make_predictions(candles, [c * 1.001 for c in closes], model_version="v2")[10:]
    quality = LiveQuality(window=100)
    _score_all(quality, candles, naive)
    _score_all(quality, candles[10:], model)
    eth = make_candles(closes, symbol="ETHUSDT")
    _score_all(quality, eth, make_predictions(eth, closes, model_version="v2"))
    snapshots = quality.snapshot("BTCUSDT", "1m")
    assert [(s.model_version, s.scored) for s in snapshots] == [("v2", 19), ("naive", 10)]
    v2, warm_up = snapshots
    assert v2.updated_at == candles[-1].close_time
    assert warm_up.updated_at == candles[10].close_time
    assert warm_up.mae == pytest.approx(warm_up.mae_persistence)  # persistence is naive
    assert quality.snapshot("ETHUSDT", "1m")[0].scored == 29
    assert quality.snapshot("BTCUSDT", "5m") == []


def test_only_the_target_candle_scores_and_only_once() -> None:
    candles = make_candles([100.0, 101.0, 102.0])
    prediction = make_predictions(candles, [100.5])[0]
    quality = LiveQuality(window=10)
    assert quality.score(prediction, candles[0]) is None  # not its target
    assert quality.score(prediction, make_candles([100.0, 101.0], symbol="ETHUSDT")[1]) is None
    assert quality.score(prediction, candles[1]) is not None
    assert quality.score(prediction, candles[1]) is None  # redelivered
    assert [s.scored for s in quality.snapshot("BTCUSDT", "1m")] == [1]


def test_state_round_trips_through_json_and_resumes_identically() -> None:
    candles, predictions = _noisy_case(300, seed=6)
    warm = make_predictions(candles, [c.close for c in candles], model_version="naive")
    original = LiveQuality(window=40)
    _score_all(original, candles[:20], warm[:20])
    _score_all(original, candles[:151], predictions[:150])
    state = json.loads(json.dumps(original.to_state()))
    restored = LiveQuality.from_state(state)
    assert restored.window == 40
    assert restored.snapshot("BTCUSDT", "1m") == original.snapshot("BTCUSDT", "1m")
    # Both go on to score the same predictions identically.
    rest = predictions[150:]
    assert _score_all(restored, candles[150:], rest) == _score_all(original, candles[150:], rest)
    # A redelivered, already scored prediction stays refused after a restart.
    assert restored.score(predictions[10], candles[11]) is None


def test_restoring_into_a_smaller_window_keeps_the_newest_scores() -> None:
    candles, predictions = _noisy_case(120, seed=7)
    original = LiveQuality(window=100)
    _score_all(original, candles, predictions)
    restored = LiveQuality.from_state(original.to_state(), window=20)
    fresh = LiveQuality(window=20)
    last = _score_all(fresh, candles, predictions)[-1]
    (snapshot,) = restored.snapshot("BTCUSDT", "1m")
    assert snapshot == last


def test_a_state_saved_without_pinball_scores_it_from_new_predictions_only() -> None:
    candles, predictions = _noisy_case(60, seed=8)
    original = LiveQuality(window=100)
    _score_all(original, candles[:31], predictions[:30])
    state = original.to_state()
    for series in state["series"]:  # as saved before pinball was kept
        series["scores"] = [score[:4] for score in series["scores"]]

    restored = LiveQuality.from_state(state)
    (before,) = restored.snapshot("BTCUSDT", "1m")
    assert before.pinball_bp is None
    assert before.mae == original.snapshot("BTCUSDT", "1m")[0].mae
    later = _score_all(restored, candles[30:], predictions[30:])[-1]
    fresh = LiveQuality(window=100)
    only_new = _score_all(fresh, candles[30:], predictions[30:])[-1]
    assert later is not None and only_new is not None
    assert later.pinball_bp == only_new.pinball_bp
    assert later.scored == 59 and later.window == 59


def test_scores_are_kept_per_utc_day_for_the_last_eight_days() -> None:
    rng = random.Random(9)
    hours = 24 * 10 + 1  # ten days of hourly candles from the epoch, and one more
    closes = [round(c * 2) / 2 for c in random_closes(hours, seed=9, start=1000.0,
                                                      sigma=0.003)]
    candles = make_candles(closes, interval="1h", start_ms=0)
    predicted = [c + rng.gauss(0, 1.0) for c in closes]
    band = [(p - rng.uniform(0, 4), p + rng.uniform(0, 4)) for p in predicted]
    predictions = make_predictions(candles, predicted, band=band)
    quality = LiveQuality(window=48)

    snapshot = _score_all(quality, candles, predictions)[-1]

    assert snapshot is not None
    # Targets run from hour 1 to hour 240 (day 11's first): the last eight days are kept.
    assert [d.day for d in snapshot.days] == [f"1970-01-{d:02d}" for d in range(11, 3, -1)]
    assert snapshot.days[0].scored == 1 and snapshot.days[1].scored == 24
    for day in snapshot.days:
        first = (int(day.day[-2:]) - 1) * 24
        pairs = [(p, c) for p, c in zip(predictions, candles[1:], strict=False)
                 if first <= c.open_time // 3_600_000 < first + 24]
        band_rows = np.array([(p.lower, p.predicted_close, p.upper) for p, _ in pairs])
        last = np.array([p.last_close for p, _ in pairs])
        actual = np.array([c.close for _, c in pairs])
        assert day.scored == len(pairs)
        assert day.coverage_80 == pytest.approx(
            np.mean((actual >= band_rows[:, 0]) & (actual <= band_rows[:, 2])))
        assert day.pinball_bp == pytest.approx(pinball(band_rows, last, actual).mean())
    restored = LiveQuality.from_state(json.loads(json.dumps(quality.to_state())))
    assert restored.snapshot("BTCUSDT", "1h") == [snapshot]
