"""Live forecast quality: every served prediction scored once its target candle has closed.

Scores follow :func:`makeusrich.trainer.evaluate.forecast_metrics`, over a rolling window of
the last ``window`` scored predictions per (symbol, interval, model version), so live figures
read like the validation figures in a model's manifest. Timestamps come from the candles,
never the wall clock, so a replay gives the same snapshots every time.
"""

import math
from collections import deque
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, NamedTuple

import msgspec
import numpy as np

from makeusrich.core.schemas import Candle, Prediction
from makeusrich.inference.scoring import pinball

__all__ = ["DayQuality", "LiveQuality", "QualitySnapshot"]

_Key = tuple[str, str, str]  # symbol, interval, model version
_DAY_MS = 86_400_000
#: UTC days of per-day scores kept per series: the target's day and the seven before it.
DAYS_KEPT = 8


class DayQuality(msgspec.Struct, frozen=True, kw_only=True):
    """Scores of one UTC day's targets (``day``: YYYY-MM-DD): how many were scored, the
    share of closes inside the 80% interval, and the mean pinball loss in basis points
    (None when none of them has one, see :class:`QualitySnapshot`)."""

    day: str
    scored: int
    coverage_80: float
    pinball_bp: float | None


class QualitySnapshot(msgspec.Struct, frozen=True, kw_only=True):
    """Rolling scores of one model version on one series.

    ``window``: predictions in the rolling window; ``scored``: all ever scored. ``mae`` and
    ``mae_persistence`` (quote currency) on the same target candles; ``skill`` = 1 - mae /
    mae_persistence and ``error_ratio`` = mae / mae_persistence (None when persistence was
    exact on every candle). ``hit_rate``: share of moved closes whose direction the forecast
    called (a forecast of no move counts half, unmoved closes are left out; None when none
    moved). ``coverage_80``: share of closes inside [lower, upper]. ``pinball_bp``: mean
    pinball loss of the three quantiles in basis points of the last close
    (:func:`makeusrich.inference.pinball`, the main score; None while the window holds only
    scores restored from a state saved before it was kept). ``updated_at``: close time (UTC
    epoch ms) of the last scored candle. ``days``: the same scores per UTC day of the target
    candles, newest first, for the last :data:`DAYS_KEPT` days (not rolling: whole days).
    """

    symbol: str
    interval: str
    model_version: str
    window: int
    scored: int
    mae: float
    mae_persistence: float
    skill: float | None
    hit_rate: float | None
    coverage_80: float
    error_ratio: float | None
    updated_at: int
    pinball_bp: float | None = None
    days: list[DayQuality] = []


@dataclass
class _Day:
    """Sums over the scored targets of one UTC day."""

    scored: int = 0
    inside: int = 0
    pinball_sum: float = 0.0
    pinball_count: int = 0

    def quality(self, day_ms: int) -> DayQuality:
        return DayQuality(
            day=datetime.fromtimestamp(day_ms / 1000, UTC).strftime("%Y-%m-%d"),
            scored=self.scored,
            coverage_80=self.inside / self.scored,
            pinball_bp=self.pinball_sum / self.pinball_count if self.pinball_count else None,
        )


class _Score(NamedTuple):
    error: float  # |predicted - close|
    persistence_error: float  # |last_close - close|
    hit: float | None  # 1, 0.5 or 0; None when the close did not move
    inside: bool  # lower <= close <= upper
    pinball_bp: float | None  # None: restored from a state saved without it


@dataclass
class _Series:
    """Running sums over the scores in ``scores``: each update adds one and drops one."""

    window: int
    scores: deque[_Score] = field(default_factory=deque)
    scored: int = 0
    updated_at: int = 0
    last_target_open_time: int = -(2**63)
    order: int = 0  # when it was last updated, among all series
    days: dict[int, _Day] = field(default_factory=dict)  # UTC day start (ms) -> its sums
    error_sum: float = 0.0
    persistence_sum: float = 0.0
    hit_sum: float = 0.0
    moves: int = 0
    inside: int = 0
    # Removing floats from a running sum leaves rounding residue behind; re-adding the
    # window from scratch once per `window` evictions keeps it bounded at O(1) amortised.
    evictions: int = 0

    def add(self, score: _Score) -> None:
        self.scores.append(score)
        self._count(score, 1)
        if len(self.scores) > self.window:
            self._count(self.scores.popleft(), -1)
            self.evictions += 1
            if self.evictions >= self.window:
                self.resum()

    def count_day(self, target_open_time: int, score: _Score) -> None:
        start = target_open_time - target_open_time % _DAY_MS
        day = self.days.setdefault(start, _Day())
        day.scored += 1
        day.inside += score.inside
        if score.pinball_bp is not None:
            day.pinball_sum += score.pinball_bp
            day.pinball_count += 1
        for old in [d for d in self.days if d <= start - DAYS_KEPT * _DAY_MS]:
            del self.days[old]

    def _count(self, score: _Score, sign: int) -> None:
        self.error_sum += sign * score.error
        self.persistence_sum += sign * score.persistence_error
        if score.hit is not None:
            self.hit_sum += sign * score.hit
            self.moves += sign
        self.inside += sign * score.inside

    def resum(self) -> None:
        self.evictions = 0
        self.error_sum = math.fsum(s.error for s in self.scores)
        self.persistence_sum = math.fsum(s.persistence_error for s in self.scores)
        self.hit_sum = math.fsum(s.hit for s in self.scores if s.hit is not None)
        self.moves = sum(s.hit is not None for s in self.scores)
        self.inside = sum(s.inside for s in self.scores)

    def snapshot(self, key: _Key) -> QualitySnapshot:
        n = len(self.scores)
        mae = max(self.error_sum, 0.0) / n
        mae_persistence = max(self.persistence_sum, 0.0) / n
        # No close moved = persistence was exact. Counted, not read off the running sum,
        # which may hold rounding residue instead of a clean zero.
        ratio = mae / mae_persistence if self.moves and mae_persistence > 0 else None
        # Summed afresh, not kept running: pinball losses are not exact binary fractions
        # like the errors of prices on ticks, and a restored window must read the same.
        losses = [s.pinball_bp for s in self.scores if s.pinball_bp is not None]
        return QualitySnapshot(
            symbol=key[0],
            interval=key[1],
            model_version=key[2],
            window=n,
            scored=self.scored,
            mae=mae,
            mae_persistence=mae_persistence,
            skill=None if ratio is None else 1.0 - ratio,
            hit_rate=self.hit_sum / self.moves if self.moves else None,
            coverage_80=self.inside / n,
            error_ratio=ratio,
            updated_at=self.updated_at,
            pinball_bp=math.fsum(losses) / len(losses) if losses else None,
            days=[self.days[d].quality(d) for d in sorted(self.days, reverse=True)],
        )


def _score(prediction: Prediction, close: float) -> _Score | None:
    values = (
        prediction.predicted_close,
        prediction.last_close,
        prediction.lower,
        prediction.upper,
        close,
    )
    if not all(math.isfinite(v) for v in values):
        return None
    last = prediction.last_close
    realised = _sign(close - last)
    called = _sign(prediction.predicted_close - last)
    if realised == 0:
        hit = None
    elif called == 0:
        hit = 0.5  # no move called: a coin flip, as forecast_metrics counts it
    else:
        hit = 1.0 if called == realised else 0.0
    band = np.array([[prediction.lower, prediction.predicted_close, prediction.upper]])
    return _Score(
        error=abs(prediction.predicted_close - close),
        persistence_error=abs(last - close),
        hit=hit,
        inside=prediction.lower <= close <= prediction.upper,
        pinball_bp=float(pinball(band, np.array([last]), np.array([close]))[0]),
    )


def _sign(value: float) -> int:
    return (value > 0) - (value < 0)


class LiveQuality:
    """Rolling quality of served predictions, per (symbol, interval, model version).

    Predictions labelled ``naive`` (the warm-up baseline) are scored under that label:
    they are what clients received.
    """

    def __init__(self, window: int) -> None:
        if window < 1:
            raise ValueError(f"window must be at least 1, got {window}")
        self.window = window
        self._series: dict[_Key, _Series] = {}
        self._updates = 0

    def score(self, prediction: Prediction, candle: Candle) -> QualitySnapshot | None:
        """Score ``prediction`` against ``candle``, the closed candle it targeted, and
        return the updated snapshot of its model version on that series.

        None, and nothing counted, when ``candle`` is not the prediction's target (another
        series or open time), when a value is not finite, or when a target at or before
        this one was already scored for that version and series: a redelivered message
        must not count twice.
        """
        if (
            candle.symbol != prediction.symbol
            or candle.interval != prediction.interval
            or candle.open_time != prediction.target_open_time
        ):
            return None
        key = (prediction.symbol, prediction.interval, prediction.model_version)
        series = self._series.get(key)
        if series is not None and candle.open_time <= series.last_target_open_time:
            return None
        score = _score(prediction, candle.close)
        if score is None:
            return None
        if series is None:
            series = self._series[key] = _Series(self.window)
        series.add(score)
        series.count_day(candle.open_time, score)
        series.scored += 1
        series.updated_at = candle.close_time
        series.last_target_open_time = candle.open_time
        self._updates += 1
        series.order = self._updates
        return series.snapshot(key)

    def snapshot(self, symbol: str, interval: str) -> list[QualitySnapshot]:
        """Every model version scored on the series, most recently updated first."""
        found = [
            (series.order, key, series)
            for key, series in self._series.items()
            if key[0] == symbol and key[1] == interval
        ]
        found.sort(key=lambda item: item[0], reverse=True)
        return [series.snapshot(key) for _, key, series in found]

    def to_state(self) -> dict[str, Any]:
        """Everything needed to resume, as plain JSON-able values (see :meth:`from_state`)."""
        ordered = sorted(self._series.items(), key=lambda item: item[1].order)
        return {
            "window": self.window,
            "series": [
                {
                    "symbol": key[0],
                    "interval": key[1],
                    "model_version": key[2],
                    "scored": series.scored,
                    "updated_at": series.updated_at,
                    "last_target_open_time": series.last_target_open_time,
                    # error, persistence error, hit (None: no move), inside (0/1), pinball
                    "scores": [
                        [s.error, s.persistence_error, s.hit, int(s.inside), s.pinball_bp]
                        for s in series.scores
                    ],
                    # day start (ms), scored, inside, pinball sum, pinball count
                    "days": [[start, d.scored, d.inside, d.pinball_sum, d.pinball_count]
                             for start, d in sorted(series.days.items())],
                }
                for key, series in ordered
            ],
        }

    @classmethod
    def from_state(cls, state: dict[str, Any], window: int | None = None) -> "LiveQuality":
        """Resume from :meth:`to_state`. ``window`` (default: the saved one) may differ
        from the saved window; a smaller one keeps the newest scores."""
        quality = cls(int(state["window"]) if window is None else window)
        for item in state.get("series", []):
            series = _Series(quality.window)
            kept = item["scores"][-quality.window :]
            if not kept:
                continue
            # States saved before pinball was kept have four values per score.
            series.scores.extend(
                _Score(float(e), float(p), None if h is None else float(h), bool(i),
                       None if not rest or rest[0] is None else float(rest[0]))
                for e, p, h, i, *rest in kept
            )
            series.resum()
            series.days = {int(start): _Day(int(n), int(inside), float(total), int(count))
                           for start, n, inside, total, count in item.get("days", [])}
            series.scored = int(item["scored"])
            series.updated_at = int(item["updated_at"])
            series.last_target_open_time = int(item["last_target_open_time"])
            quality._updates += 1
            series.order = quality._updates
            key = (str(item["symbol"]), str(item["interval"]), str(item["model_version"]))
            quality._series[key] = series
        return quality
