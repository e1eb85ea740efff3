"""Drift: PSI against the training reference, error ratio drift, hysteresis and events."""

import json
import math
from collections import deque
from collections.abc import Sequence
from pathlib import Path

import msgspec
import numpy as np
import pytest

from kit.builders import T0_MS, bootstrap_candles, kline_candles, scale_volatility
from makeusrich.core.schemas import Candle
from makeusrich.inference import FEATURES, candles_to_array
from makeusrich.monitoring.drift import PSI_EPSILON, DriftMonitor, DriftStatus, psi
from makeusrich.monitoring.quality import QualitySnapshot
from makeusrich.monitoring.reference import (
    BINS,
    FeatureBins,
    FeatureReference,
    build_reference,
    feature_row,
    feature_rows,
)
from makeusrich.trainer.data import CandleSeries

DAY = Path(__file__).parent.parent / "data" / "BTCUSDT-1m-2025-11-20.csv"
MODEL_WINDOW = 30
MODEL_FEATURES = FEATURES[:4]  # the bundled model's
DRIFT_WINDOW = 240
MINUTE = 60_000
CALM, WILD = 500, 500  # candles before the jump, and of x5 volatility after it


def _clock() -> int:
    return 42  # events' ts_ingest: fixed, so runs compare equal


def _monitor(
    reference: FeatureReference | None,
    window: int = DRIFT_WINDOW,
    psi_threshold: float = 0.25,
    error_ratio_threshold: float = 1.5,
) -> DriftMonitor:
    return DriftMonitor(reference, window, psi_threshold, error_ratio_threshold, clock=_clock)


@pytest.fixture(scope="module")
def day() -> list[Candle]:
    return kline_candles(DAY)


@pytest.fixture(scope="module")
def reference(day: list[Candle]) -> FeatureReference:
    """Training data: 3,000 candles resampled from a real day (a stationary market)."""
    candles = bootstrap_candles(day, 3_000, seed=101)
    series = CandleSeries(
        "BTCUSDT",
        "1m",
        np.array([c.open_time for c in candles], dtype=np.int64),
        candles_to_array(candles),
        filled=0,
    )
    return build_reference(
        [series], MODEL_WINDOW, "test-v1", error_ratio=1.0, features=MODEL_FEATURES
    )


@pytest.fixture(scope="module")
def volatility_jump(day: list[Candle]) -> list[Candle]:
    """Live candles like the training ones, x5 volatility from candle CALM for WILD candles,
    then calm again."""
    calm = bootstrap_candles(day, CALM + WILD + 600, seed=202, start_ms=T0_MS)
    return scale_volatility(calm, 5.0, start=CALM, stop=CALM + WILD)


def _run(monitor: DriftMonitor, candles: Sequence[Candle]) -> list[DriftStatus]:
    """Feed closed candles as the worker will: the live feature row of each."""
    history: deque[Candle] = deque(maxlen=64)
    statuses = []
    for candle in candles:
        history.append(candle)
        row = feature_row(history, MODEL_WINDOW, MODEL_FEATURES)
        statuses.append(monitor.update(candle.symbol, candle.interval, row, None, candle.ts_event))
    return statuses


def _uniform_reference(error_ratio: float | None = 1.0) -> FeatureReference:
    """Edges 1..9 and a tenth of the rows per bin for every feature: value v + 0.5 falls
    in bin v."""
    bins = FeatureBins(edges=tuple(float(e) for e in range(1, BINS)), proportions=(0.1,) * BINS)
    return FeatureReference(
        version="test-v1",
        features=MODEL_FEATURES,
        window=MODEL_WINDOW,
        symbols=("BTCUSDT",),
        interval="1m",
        first_open_time=0,
        last_open_time=0,
        samples=1_000,
        error_ratio=error_ratio,
        bins=dict.fromkeys(MODEL_FEATURES, bins),
    )


def _quality(
    error_ratio: float | None, window: int = 240, version: str = "test-v1"
) -> QualitySnapshot:
    return QualitySnapshot(
        symbol="BTCUSDT",
        interval="1m",
        model_version=version,
        window=window,
        scored=window,
        mae=1.0,
        mae_persistence=1.0,
        skill=None,
        hit_rate=None,
        coverage_80=0.8,
        error_ratio=error_ratio,
        updated_at=0,
    )


# --- PSI ------------------------------------------------------------------------------


def test_psi_of_identical_distributions_is_zero() -> None:
    shares = np.array([0.05, 0.15, 0.3, 0.2, 0.1, 0.0, 0.1, 0.05, 0.05, 0.0])
    assert psi(shares, shares) == pytest.approx(0.0, abs=1e-15)


def test_psi_matches_a_hand_computation() -> None:
    live = np.array([0.5, 0.5] + [0.0] * 8)
    reference = np.full(10, 0.1)
    expected = 2 * (0.4 * math.log(5.0)) + 8 * ((PSI_EPSILON - 0.1) * math.log(PSI_EPSILON / 0.1))
    assert psi(live, reference) == pytest.approx(expected)
    # The same through a monitor: a window of ten rows, log_return in bins 0 and 1 only,
    # every other feature spread evenly.
    monitor = _monitor(_uniform_reference(), window=10)
    for i in range(10):
        row = np.full(len(MODEL_FEATURES), i + 0.5)
        row[0] = i % 2 + 0.5
        status = monitor.update("BTCUSDT", "1m", row, None, i)
    assert status.psi["log_return"] == pytest.approx(expected)
    assert status.psi["log_range"] == pytest.approx(0.0, abs=1e-15)
    assert status.psi_max == status.psi["log_return"]


def test_a_window_of_the_training_rows_themselves_has_psi_zero(
    reference: FeatureReference, day: list[Candle]
) -> None:
    candles = bootstrap_candles(day, 3_000, seed=101)  # the reference's own candles
    rows = feature_rows(candles_to_array(candles), MODEL_WINDOW, MODEL_FEATURES)
    monitor = _monitor(reference, window=len(rows))
    for i, row in enumerate(rows):
        status = monitor.update("BTCUSDT", "1m", row, None, i)
    assert status.state == "ok"
    assert status.psi_max == pytest.approx(0.0, abs=1e-12)


def test_a_shifted_distribution_has_a_large_psi(
    reference: FeatureReference, volatility_jump: list[Candle]
) -> None:
    wild = volatility_jump[CALM : CALM + WILD]
    status = _run(_monitor(reference), wild)[-1]
    assert status.psi["log_range"] > 2.0
    assert status.psi["log_return"] > 0.5
    # Volume and order flow did not change.
    assert status.psi["log_volume_rel"] < 0.15
    assert status.psi["taker_buy_ratio"] < 0.15


# --- drift over a candle series ----------------------------------------------------------


def test_a_volatility_jump_is_one_drift_event_and_its_end_one_recovery(
    reference: FeatureReference, volatility_jump: list[Candle]
) -> None:
    monitor = _monitor(reference)
    statuses = _run(monitor, volatility_jump)
    events = monitor.drain_events()
    assert [e.status for e in events] == ["drift", "recovered"]
    drift, recovered = events
    at = {c.ts_event: i for i, c in enumerate(volatility_jump)}
    # Noticed within a quarter window of the jump, not before it.
    assert CALM <= at[drift.ts_event] < CALM + DRIFT_WINDOW // 4
    assert drift.reason.startswith("PSI of log_range")
    assert drift.psi_max is not None and drift.psi_max > 0.25
    assert drift.ts_ingest == 42
    # Recovered once the window holds mostly calm candles again, below 0.8 x threshold.
    assert CALM + WILD < at[recovered.ts_event] <= CALM + WILD + DRIFT_WINDOW + MODEL_WINDOW
    assert recovered.psi_max is not None and recovered.psi_max < 0.2
    assert recovered.reason == "recovered: every PSI below 0.8 x its limit"
    # Calm before the jump, even though PSI is never exactly 0 on a window.
    calm = statuses[MODEL_WINDOW + DRIFT_WINDOW : CALM]
    assert {s.state for s in calm} == {"ok"}
    assert max(s.psi_max or 0.0 for s in calm) < 0.2
    states = [s.state for s in statuses]
    drifting = [i for i, s in enumerate(states) if s == "drift"]
    assert drifting == list(range(at[drift.ts_event], at[recovered.ts_event]))
    assert statuses[at[drift.ts_event]].since == drift.ts_event
    assert statuses[-1].since == recovered.ts_event
    assert monitor.drain_events() == []


def test_warming_up_until_the_window_is_full(
    reference: FeatureReference, volatility_jump: list[Candle]
) -> None:
    statuses = _run(_monitor(reference), volatility_jump[: MODEL_WINDOW + DRIFT_WINDOW + 1])
    # No feature row before the model window, then one row per candle.
    assert [s.rows for s in statuses[: MODEL_WINDOW + 1]] == [0] * MODEL_WINDOW + [1]
    warming = statuses[: MODEL_WINDOW + DRIFT_WINDOW - 1]
    assert {s.state for s in warming} == {"warming_up"}
    assert all(s.psi == {} and s.psi_max is None for s in warming)
    assert "warming up: 239/240 feature rows" in warming[-1].reason
    full = statuses[MODEL_WINDOW + DRIFT_WINDOW - 1]
    assert (full.state, full.rows, set(full.psi)) == ("ok", DRIFT_WINDOW, set(MODEL_FEATURES))
    assert full.since == full.updated_at
    assert statuses[-1].since == full.since


def test_monitoring_is_deterministic(
    reference: FeatureReference, volatility_jump: list[Candle]
) -> None:
    runs = []
    for _ in range(2):
        monitor = _monitor(reference)
        runs.append((_run(monitor, volatility_jump), monitor.drain_events()))
    assert msgspec.to_builtins(runs[0]) == msgspec.to_builtins(runs[1])


def test_state_round_trips_and_resumes_identically(
    reference: FeatureReference, volatility_jump: list[Candle]
) -> None:
    straight = _monitor(reference)
    expected = _run(straight, volatility_jump)
    half = CALM + 100  # mid-drift
    first = _monitor(reference)
    _run(first, volatility_jump[:half])
    state = json.loads(json.dumps(first.to_state()))
    resumed = DriftMonitor.from_state(state, reference, DRIFT_WINDOW, 0.25, 1.5, clock=_clock)
    restored = resumed.status("BTCUSDT", "1m")
    assert restored == first.status("BTCUSDT", "1m")
    assert restored is not None and restored.state == "drift"
    # The worker's candle history is restored too: replay the model window before the cut.
    history: deque[Candle] = deque(volatility_jump[half - MODEL_WINDOW : half], maxlen=64)
    rest = []
    for candle in volatility_jump[half:]:
        history.append(candle)
        row = feature_row(history, MODEL_WINDOW, MODEL_FEATURES)
        rest.append(resumed.update(candle.symbol, candle.interval, row, None, candle.ts_event))
    assert rest == expected[half:]
    assert [e.status for e in first.drain_events() + resumed.drain_events()] == [
        "drift",
        "recovered",
    ]
    # Another model's state is not taken over.
    other = msgspec.structs.replace(reference, version="test-v2")
    fresh = DriftMonitor.from_state(state, other, DRIFT_WINDOW, 0.25, 1.5)
    assert fresh.status("BTCUSDT", "1m") is None


def test_a_redelivered_candle_changes_nothing() -> None:
    monitor = _monitor(_uniform_reference(), window=10)
    row = np.full(len(MODEL_FEATURES), 0.5)
    first = monitor.update("BTCUSDT", "1m", row, None, 1_000)
    assert monitor.update("BTCUSDT", "1m", row, None, 1_000) == first
    assert monitor.update("BTCUSDT", "1m", row, None, 999) == first
    assert first.rows == 1


# --- error ratio drift -----------------------------------------------------------------


def _calm_rows(n: int) -> list[np.ndarray]:
    """Rows spread evenly over the uniform reference's bins: PSI exactly 0 per ten."""
    return [np.full(len(MODEL_FEATURES), i % BINS + 0.5) for i in range(n)]


def test_an_error_ratio_drift_alone_enters_and_leaves_with_hysteresis() -> None:
    monitor = _monitor(_uniform_reference(error_ratio=0.8), window=20)
    rows = _calm_rows(20)
    for i, row in enumerate(rows):  # fill the window: PSI 0 throughout
        monitor.update("BTCUSDT", "1m", row, _quality(0.8), i)
    # Live error ratio over the validation one (0.8): 1.0 → 1.25, in drift above 1.5,
    # out of it only below 1.2.
    steps = [
        (0.8, "ok"),  # 1.0
        (1.28, "drift"),  # 1.6 > 1.5: enters
        (1.12, "drift"),  # 1.4: below the threshold, not below 0.8 x it
        (0.97, "drift"),  # 1.2125: still not below 1.2
        (0.944, "ok"),  # 1.18 < 1.2: recovered
        (1.19, "ok"),  # 1.4875: below the threshold, no new event
        (1.21, "drift"),  # 1.5125: enters again
    ]
    for i, (ratio, state) in enumerate(steps):
        status = monitor.update("BTCUSDT", "1m", rows[i % BINS], _quality(ratio), 100 + i)
        assert status.psi_max == pytest.approx(0.0, abs=1e-15)
        assert status.error_ratio_drift == pytest.approx(ratio / 0.8)
        assert status.state == state, (i, status)
    events = monitor.drain_events()
    assert [(e.status, e.ts_event) for e in events] == [
        ("drift", 101),
        ("recovered", 104),
        ("drift", 106),
    ]
    assert events[0].reason == "error ratio drift 1.600 > 1.500"
    assert (
        events[1].reason
        == "recovered: every PSI below 0.8 x its limit and error ratio drift 1.180 < 1.200"
    )
    assert events[0].psi_max == pytest.approx(0.0, abs=1e-15)


def test_error_ratio_needs_enough_scored_predictions_and_this_models_scores() -> None:
    monitor = _monitor(_uniform_reference(error_ratio=1.0), window=200)
    assert monitor.min_scored == 50  # max(30, 200 // 4)
    row = np.full(len(MODEL_FEATURES), 0.5)
    status = monitor.update("BTCUSDT", "1m", row, _quality(3.0, window=49), 1)
    assert status.error_ratio_drift is None
    assert "fewer than 50 scored predictions" in status.reason
    status = monitor.update("BTCUSDT", "1m", row, _quality(3.0, window=50), 2)
    assert status.error_ratio_drift == pytest.approx(3.0)
    assert status.state == "drift"  # allowed while PSI is still warming up
    # A naive warm-up score says nothing about this model; no score at all neither.
    status = monitor.update("BTCUSDT", "1m", row, _quality(1.0, version="naive"), 3)
    assert status.error_ratio_drift == pytest.approx(3.0)
    status = monitor.update("BTCUSDT", "1m", row, None, 4)
    assert status.error_ratio_drift == pytest.approx(3.0)
    with pytest.raises(ValueError, match="ETHUSDT"):
        monitor.update("ETHUSDT", "1m", row, _quality(1.0), 5)


def test_without_a_reference_nothing_can_drift() -> None:
    monitor = _monitor(None, window=30)
    assert monitor.model_version == "naive"
    row = np.full(len(MODEL_FEATURES), 0.5)
    for i in range(5):
        status = monitor.update("BTCUSDT", "1m", row, _quality(9.0, version="naive"), i)
    assert (status.state, status.psi, status.psi_max, status.error_ratio_drift) == (
        "ok",
        {},
        None,
        None,
    )
    assert "no training reference" in status.reason
    assert status.since == 0
    assert monitor.drain_events() == []
    # A reference without a validation error ratio judges PSI only.
    monitor = _monitor(_uniform_reference(error_ratio=None), window=10)
    for i, row in enumerate(_calm_rows(10)):
        status = monitor.update("BTCUSDT", "1m", row, _quality(9.0), i)
    assert (status.state, status.error_ratio_drift) == ("ok", None)
    assert "no validation error ratio" in status.reason


def test_restoring_into_a_smaller_window_keeps_the_newest_rows(
    reference: FeatureReference, volatility_jump: list[Candle]
) -> None:
    calm = volatility_jump[:CALM]
    big = _monitor(reference, window=DRIFT_WINDOW)
    _run(big, calm)
    small = DriftMonitor.from_state(big.to_state(), reference, 100, 0.25, 1.5, clock=_clock)
    last = calm[-1]
    row = feature_row(calm[-MODEL_WINDOW - 1 :], MODEL_WINDOW, MODEL_FEATURES)
    # One more candle (a redelivery would be refused, so the next minute's twin).
    twin = msgspec.structs.replace(last, ts_event=last.ts_event + MINUTE)
    resumed = small.update("BTCUSDT", "1m", row, None, twin.ts_event)
    fresh = _monitor(reference, window=100)
    _run(fresh, calm)
    expected = fresh.update("BTCUSDT", "1m", row, None, twin.ts_event)
    assert resumed.psi == pytest.approx(expected.psi)
    assert resumed.rows == 100
