"""Drift of a served model: are live inputs still like its training data, and are its live
errors still like its validation errors?

Two signals per (symbol, interval), updated on every closed candle:

- **PSI** of each feature over the last ``window`` candles against the model's
  :class:`~makeusrich.monitoring.reference.FeatureReference`: a ring buffer of the rows' bins
  and per-bin counts, so an update costs O(features x bins) whatever the window.
- **error ratio drift**: the live ``mae / mae_persistence`` (from
  :class:`~makeusrich.monitoring.quality.LiveQuality`) over the same ratio on the model's
  validation span. Persistence is the yardstick on both sides, so a market that is simply
  more volatile than during training does not count as drift; a model that lost its edge
  over persistence does.

A series enters ``drift`` when either crosses its threshold and leaves it only when both are
below 0.8 x their thresholds, so a value hovering at a threshold does not flap. Only the
crossings are events (:meth:`DriftMonitor.drain_events`); the status is there on every
candle.

Without a reference (the naive baseline, or a version without ``reference.json``) neither
signal can be computed: there is no training distribution for PSI and no validation error
ratio to compare with. The status is then always ``ok`` and says why in ``reason``.
"""

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

import msgspec
import numpy as np
from numpy.typing import NDArray

from makeusrich.core.schemas import now_ms
from makeusrich.inference.features import FloatArray
from makeusrich.monitoring.quality import QualitySnapshot
from makeusrich.monitoring.reference import BINS, FeatureReference, bin_indices

__all__ = [
    "EXIT_FRACTION",
    "MIN_SCORED",
    "PSI_EPSILON",
    "DriftEvent",
    "DriftMonitor",
    "DriftState",
    "DriftStatus",
    "psi",
]

DriftState = Literal["warming_up", "ok", "drift"]
#: Floor on bin proportions in PSI: an empty bin would make ln(p_live / p_ref) infinite.
PSI_EPSILON = 1e-4
#: A drifting series recovers only when every signal is below this fraction of its threshold.
EXIT_FRACTION = 0.8
#: Fewest scored predictions for an error ratio drift (or window // 4 when that is more):
#: a ratio of a handful of errors is noise.
MIN_SCORED = 30


def psi(live: FloatArray, reference: FloatArray) -> FloatArray:
    """Population stability index along the last axis of bin proportions:
    sum((p_live - p_ref) * ln(p_live / p_ref)), both floored at :data:`PSI_EPSILON`.
    0 for identical distributions; above ~0.25 is conventionally a large shift."""
    p_live = np.maximum(live, PSI_EPSILON)
    p_ref = np.maximum(reference, PSI_EPSILON)
    values: FloatArray = np.sum((p_live - p_ref) * np.log(p_live / p_ref), axis=-1)
    return values


class DriftStatus(msgspec.Struct, frozen=True, kw_only=True):
    """Drift of one model version on one series after the candle closed at ``updated_at``.

    ``state``: ``warming_up`` until ``rows`` (feature rows in the window) reaches the
    window, then ``ok`` or ``drift``. ``psi``: per feature (empty while warming up or
    without a reference); ``psi_max`` its largest value (None then); a feature drifts above
    its entry in ``psi_limits``. ``error_ratio_drift``:
    live error ratio / validation error ratio (None: no reference ratio, or too few scored
    predictions yet). ``since``: ``ts_event`` of the candle at which ``state`` began.
    ``reason``: what crossed (or why nothing is judged). Times in UTC epoch ms.
    """

    symbol: str
    interval: str
    model_version: str
    state: DriftState
    psi: dict[str, float]
    psi_max: float | None
    error_ratio_drift: float | None
    psi_threshold: float
    psi_limits: dict[str, float]  # per feature: max(psi_threshold, the training's limit)
    error_ratio_threshold: float
    rows: int
    since: int
    updated_at: int
    reason: str


class DriftEvent(msgspec.Struct, frozen=True, kw_only=True):
    """A series entered (``drift``) or left (``recovered``) drift; one per crossing.
    ``ts_event``: close time of the candle that crossed; ``ts_ingest``: when it was seen."""

    symbol: str
    interval: str
    model_version: str
    status: Literal["drift", "recovered"]
    psi: dict[str, float]
    psi_max: float | None
    error_ratio_drift: float | None
    reason: str
    ts_event: int
    ts_ingest: int


@dataclass
class _Series:
    bins: NDArray[np.int8]  # (window, features) ring buffer of the rows' bins
    counts: NDArray[np.int64]  # (features, BINS) rows per bin in the ring buffer
    rows: int = 0
    next_slot: int = 0
    state: DriftState = "warming_up"
    since: int = 0
    last_ts_event: int = -(2**63)
    error_ratio_drift: float | None = None
    status: DriftStatus | None = None

    def add(self, row_bins: NDArray[np.int64]) -> None:
        features = np.arange(len(row_bins))
        if self.rows == len(self.bins):
            self.counts[features, self.bins[self.next_slot]] -= 1
        else:
            self.rows += 1
        self.bins[self.next_slot] = row_bins
        self.counts[features, row_bins] += 1
        self.next_slot = (self.next_slot + 1) % len(self.bins)

    def ordered_bins(self) -> NDArray[np.int8]:
        """The buffered rows' bins, oldest first."""
        if self.rows < len(self.bins):
            return self.bins[: self.rows]
        return np.roll(self.bins, -self.next_slot, axis=0)


class DriftMonitor:
    """Drift of one model version, per (symbol, interval) it serves.

    ``reference``: the version's training reference (None: nothing can drift, see the
    module docstring). ``window``: candles whose features are compared with it.
    ``model_version`` defaults to the reference's version, else ``naive``. ``clock`` gives
    events' ``ts_ingest`` (UTC epoch ms).
    """

    def __init__(
        self,
        reference: FeatureReference | None,
        window: int,
        psi_threshold: float,
        error_ratio_threshold: float,
        *,
        model_version: str | None = None,
        clock: Callable[[], int] = now_ms,
    ) -> None:
        if window < 1:
            raise ValueError(f"window must be at least 1, got {window}")
        if not psi_threshold > 0 or not error_ratio_threshold > 0:
            raise ValueError("thresholds must be positive")
        self.reference = reference
        self.window = window
        self.psi_threshold = psi_threshold
        self.error_ratio_threshold = error_ratio_threshold
        # A feature drifts when its PSI exceeds both the configured threshold and what the
        # training data itself reached in 99% of its windows of this length: minute-level
        # volatility swings so much that an absolute PSI threshold alone cries wolf.
        self.psi_limits = {} if reference is None else {
            name: max(psi_threshold, reference.psi_limit(name, window) or 0.0)
            for name in reference.features
        }
        if model_version is None:
            model_version = "naive" if reference is None else reference.version
        self.model_version = model_version
        self._clock = clock
        self._edges = None if reference is None else reference.edges_array()
        self._reference_shares = None if reference is None else reference.proportions_array()
        self._features = () if reference is None else reference.features
        self._series: dict[tuple[str, str], _Series] = {}
        self._events: list[DriftEvent] = []

    @property
    def min_scored(self) -> int:
        """Scored predictions a quality snapshot needs before its error ratio counts."""
        return max(MIN_SCORED, self.window // 4)

    def update(
        self,
        symbol: str,
        interval: str,
        features_row: FloatArray | None,
        quality: QualitySnapshot | None,
        ts_event: int,
    ) -> DriftStatus:
        """Fold in the candle closed at ``ts_event``: its feature row (see
        :func:`~makeusrich.monitoring.reference.feature_row`; None when the series is still
        too short for one) and the model's latest quality snapshot on the series.

        ``quality`` None, or a snapshot of another model version (e.g. a ``naive`` warm-up
        prediction, or one made before a model swap), is no news: the last error ratio
        stands. A candle at or before the last one folded in (a redelivery) changes
        nothing and gets the current status back. A crossing into or out of drift queues
        a :class:`DriftEvent` for :meth:`drain_events`.
        """
        if quality is not None and (quality.symbol, quality.interval) != (symbol, interval):
            raise ValueError(
                f"quality of {quality.symbol} {quality.interval} given for {symbol} {interval}"
            )
        series = self._series.get((symbol, interval))
        if series is None:
            series = self._series[(symbol, interval)] = self._new_series(ts_event)
        elif ts_event <= series.last_ts_event and series.status is not None:
            return series.status
        series.last_ts_event = ts_event
        if features_row is not None and self._edges is not None:
            row = np.asarray(features_row, dtype=np.float64)
            if row.shape != (len(self._features),):
                raise ValueError(f"expected {len(self._features)} features, got {row.shape}")
            series.add(bin_indices(self._edges, row))
        if quality is not None and quality.model_version == self.model_version:
            series.error_ratio_drift = self._error_ratio_drift(quality)
        status = self._judge(symbol, interval, series, ts_event)
        series.status = status
        return status

    def status(self, symbol: str, interval: str) -> DriftStatus | None:
        """The latest status of a series; None before its first update."""
        series = self._series.get((symbol, interval))
        return None if series is None else series.status

    def drain_events(self) -> list[DriftEvent]:
        """The crossings since the last call, oldest first."""
        events, self._events = self._events, []
        return events

    def _new_series(self, ts_event: int) -> _Series:
        features = len(self._features)
        return _Series(
            bins=np.zeros((self.window, features), dtype=np.int8),
            counts=np.zeros((features, BINS), dtype=np.int64),
            since=ts_event,
        )

    def _error_ratio_drift(self, quality: QualitySnapshot) -> float | None:
        reference_ratio = None if self.reference is None else self.reference.error_ratio
        if (
            reference_ratio is None
            or not reference_ratio > 0
            or quality.error_ratio is None
            or quality.window < self.min_scored
        ):
            return None
        return quality.error_ratio / reference_ratio

    def _psi(self, series: _Series) -> dict[str, float]:
        if self._reference_shares is None or series.rows < self.window:
            return {}
        values = psi(series.counts / series.rows, self._reference_shares)
        return {name: float(v) for name, v in zip(self._features, values, strict=True)}

    def _judge(self, symbol: str, interval: str, series: _Series, ts_event: int) -> DriftStatus:
        by_feature = self._psi(series)
        psi_max = max(by_feature.values()) if by_feature else None
        ratio = series.error_ratio_drift
        over = self._crossed(by_feature, ratio)
        if series.state == "drift":
            still = self._not_below_exit(by_feature, ratio)
            drifting = bool(still)
            if over:
                reason = "; ".join(over)
            elif still:
                reason = f"not yet below {EXIT_FRACTION:g} x threshold: " + "; ".join(still)
            else:
                reason = "recovered: " + self._below(by_feature, ratio)
        else:
            drifting = bool(over)
            reason = "; ".join(over) if over else self._calm_reason(series, psi_max, ratio)
        full = self.reference is None or series.rows >= self.window
        state: DriftState = "drift" if drifting else "ok" if full else "warming_up"
        if state != series.state:
            if "drift" in (state, series.state):
                self._events.append(
                    DriftEvent(
                        symbol=symbol,
                        interval=interval,
                        model_version=self.model_version,
                        status="drift" if drifting else "recovered",
                        psi=by_feature,
                        psi_max=psi_max,
                        error_ratio_drift=ratio,
                        reason=reason,
                        ts_event=ts_event,
                        ts_ingest=self._clock(),
                    )
                )
            series.state = state
            series.since = ts_event
        return DriftStatus(
            symbol=symbol,
            interval=interval,
            model_version=self.model_version,
            state=state,
            psi=by_feature,
            psi_max=psi_max,
            error_ratio_drift=ratio,
            psi_threshold=self.psi_threshold,
            psi_limits=self.psi_limits,
            error_ratio_threshold=self.error_ratio_threshold,
            rows=series.rows,
            since=series.since,
            updated_at=ts_event,
            reason=reason,
        )

    def _crossed(self, by_feature: dict[str, float], ratio: float | None) -> list[str]:
        """What is above its threshold, in words; most shifted feature first."""
        found = [
            f"PSI of {name} {value:.3f} > {self.psi_limits[name]:.3f}"
            for name, value in sorted(by_feature.items(), key=lambda item: -item[1])
            if value > self.psi_limits[name]
        ]
        if ratio is not None and ratio > self.error_ratio_threshold:
            found.append(f"error ratio drift {ratio:.3f} > {self.error_ratio_threshold:.3f}")
        return found

    def _not_below_exit(self, by_feature: dict[str, float], ratio: float | None) -> list[str]:
        """What keeps a drifting series in drift: not yet below its exit level, in words."""
        ratio_exit = EXIT_FRACTION * self.error_ratio_threshold
        found = [
            f"PSI of {name} {value:.3f} >= {EXIT_FRACTION * self.psi_limits[name]:.3f}"
            for name, value in sorted(by_feature.items(), key=lambda item: -item[1])
            if value >= EXIT_FRACTION * self.psi_limits[name]
        ]
        if ratio is not None and ratio >= ratio_exit:
            found.append(f"error ratio drift {ratio:.3f} >= {ratio_exit:.3f}")
        return found

    def _below(self, by_feature: dict[str, float], ratio: float | None) -> str:
        parts = []
        if by_feature:
            parts.append("every PSI below 0.8 x its limit")
        if ratio is not None:
            limit = EXIT_FRACTION * self.error_ratio_threshold
            parts.append(f"error ratio drift {ratio:.3f} < {limit:.3f}")
        return " and ".join(parts) or "no signal left to judge"

    def _calm_reason(self, series: _Series, psi_max: float | None, ratio: float | None) -> str:
        if self.reference is None:
            return "no training reference: PSI and error ratio drift cannot be computed"
        parts = []
        if psi_max is None:
            parts.append(f"warming up: {series.rows}/{self.window} feature rows")
        else:
            parts.append("every PSI within its limit")
        if ratio is None:
            why = (
                "no validation error ratio"
                if self.reference.error_ratio is None
                else f"fewer than {self.min_scored} scored predictions"
            )
            parts.append(f"error ratio drift n/a ({why})")
        else:
            parts.append(f"error ratio drift {ratio:.3f} <= {self.error_ratio_threshold:.3f}")
        return "; ".join(parts)

    def to_state(self) -> dict[str, Any]:
        """Everything needed to resume, as plain JSON-able values (see :meth:`from_state`)."""
        return {
            "model_version": self.model_version,
            "reference_version": None if self.reference is None else self.reference.version,
            "window": self.window,
            "series": [
                {
                    "symbol": symbol,
                    "interval": interval,
                    "state": series.state,
                    "since": series.since,
                    "last_ts_event": series.last_ts_event,
                    "error_ratio_drift": series.error_ratio_drift,
                    "bins": series.ordered_bins().tolist(),  # oldest first
                    "status": None if series.status is None else msgspec.to_builtins(series.status),
                }
                for (symbol, interval), series in self._series.items()
            ],
        }

    @classmethod
    def from_state(
        cls,
        state: dict[str, Any],
        reference: FeatureReference | None,
        window: int,
        psi_threshold: float,
        error_ratio_threshold: float,
        *,
        model_version: str | None = None,
        clock: Callable[[], int] = now_ms,
    ) -> "DriftMonitor":
        """A monitor configured like the constructor, resumed from :meth:`to_state`.

        A state saved for another model version or reference is ignored (the new model
        starts fresh). A different ``window`` keeps the newest rows that fit; a series
        then below its window warms up again. Thresholds apply from the next update.
        """
        monitor = cls(
            reference,
            window,
            psi_threshold,
            error_ratio_threshold,
            model_version=model_version,
            clock=clock,
        )
        reference_version = None if reference is None else reference.version
        if (
            state.get("model_version") != monitor.model_version
            or state.get("reference_version") != reference_version
        ):
            return monitor
        for item in state.get("series", []):
            series = monitor._new_series(int(item["since"]))
            for row_bins in item["bins"][-window:]:
                series.add(np.asarray(row_bins, dtype=np.int64))
            series.state = item["state"]
            series.last_ts_event = int(item["last_ts_event"])
            ratio = item["error_ratio_drift"]
            series.error_ratio_drift = None if ratio is None else float(ratio)
            if series.state != "drift" and series.rows < window and reference is not None:
                series.state = "warming_up"
            if item.get("status") is not None:
                series.status = msgspec.convert(item["status"], DriftStatus)
            monitor._series[(str(item["symbol"]), str(item["interval"]))] = series
        return monitor
