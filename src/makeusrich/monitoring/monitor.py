"""What the worker runs on every closed candle: score the forecast that targeted it, and
judge drift of the model serving the series.

:class:`Monitor` keeps, per symbol, a :class:`LiveQuality` and one :class:`DriftMonitor` per
model version that served it (each with the version's training reference, read from its
``reference.json``), and the newest prediction per series, waiting for its target candle.
Its state is snapshotted per symbol with the candle builders, so a restarted worker carries
on with the same windows.
"""

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import msgspec

from makeusrich.core.errors import ModelError
from makeusrich.core.schemas import Candle, Prediction
from makeusrich.core.settings import Settings
from makeusrich.core.store import RedisStore
from makeusrich.inference import Forecaster
from makeusrich.monitoring.drift import DriftEvent, DriftMonitor, DriftStatus
from makeusrich.monitoring.quality import LiveQuality, QualitySnapshot
from makeusrich.monitoring.reference import FeatureReference, feature_row, read_reference

__all__ = ["Monitor", "MonitorConfig", "Observation", "latest_per_series", "store_observations"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class MonitorConfig:
    quality_window: int = 240
    drift_window: int = 240
    psi_threshold: float = 0.5
    error_ratio_threshold: float = 1.5

    @classmethod
    def from_settings(cls, settings: Settings) -> "MonitorConfig":
        return cls(settings.quality_window, settings.drift_window,
                   settings.drift_psi_threshold, settings.drift_error_ratio_threshold)


@dataclass
class Observation:
    """One series after one closed candle: its quality per model version (most recent
    first), the serving model's drift status, and the drift crossings it caused."""

    quality: list[QualitySnapshot]
    drift: DriftStatus
    events: list[DriftEvent] = field(default_factory=list)


class Monitor:
    def __init__(self, config: MonitorConfig) -> None:
        self.config = config
        self._quality: dict[str, LiveQuality] = {}
        self._drift: dict[tuple[str, str], DriftMonitor] = {}  # (symbol, version)
        self._pending: dict[tuple[str, str], Prediction] = {}  # (symbol, interval)
        self._references: dict[str, FeatureReference | None] = {}  # by version

    def observe(
        self, candle: Candle, history: Sequence[Candle], serving: Forecaster,
        prediction: Prediction | None,
    ) -> Observation:
        """``candle`` just closed (and is the last of ``history``); ``serving`` is the model
        that forecasts its series, ``prediction`` what it forecast at this close."""
        symbol, interval = candle.symbol, candle.interval
        quality = self._quality.setdefault(symbol, LiveQuality(self.config.quality_window))
        waiting = self._pending.pop((symbol, interval), None)
        scored = None if waiting is None else quality.score(waiting, candle)
        if prediction is not None:
            self._pending[(symbol, interval)] = prediction
        drift = self._drift_monitor(symbol, serving)
        reference = drift.reference
        row = (None if reference is None
               else feature_row(history, reference.window, reference.features))
        status = drift.update(symbol, interval, row, scored, candle.close_time)
        return Observation(quality.snapshot(symbol, interval), status, drift.drain_events())

    def _drift_monitor(self, symbol: str, serving: Forecaster) -> DriftMonitor:
        key = (symbol, serving.version)
        monitor = self._drift.get(key)
        if monitor is None:
            monitor = self._drift[key] = self._new_drift_monitor(serving)
        return monitor

    def _new_drift_monitor(self, serving: Forecaster,
                           state: dict[str, Any] | None = None) -> DriftMonitor:
        config = self.config
        args = (self._reference(serving), config.drift_window, config.psi_threshold,
                config.error_ratio_threshold)
        if state is not None:
            return DriftMonitor.from_state(state, *args, model_version=serving.version)
        return DriftMonitor(*args, model_version=serving.version)

    def _reference(self, serving: Forecaster) -> FeatureReference | None:
        if serving.version not in self._references:
            path = getattr(serving, "path", None)  # OnnxForecaster's version directory
            reference = None
            if path is not None:
                try:
                    reference = read_reference(path)
                except ModelError as exc:
                    log.error("drift of %s is not judged: %s", serving.version, exc)
            self._references[serving.version] = reference
        return self._references[serving.version]

    # ---- snapshots (one symbol at a time, with the worker's candle state) -----------------

    def snapshot(self, symbol: str) -> dict[str, Any]:
        quality = self._quality.get(symbol)
        return {
            "quality": None if quality is None else quality.to_state(),
            "drift": {version: monitor.to_state()
                      for (sym, version), monitor in self._drift.items() if sym == symbol},
            "pending": [msgspec.to_builtins(p) for (sym, _), p in self._pending.items()
                        if sym == symbol],
        }

    def restore(self, symbol: str, state: dict[str, Any], serving: Forecaster) -> None:
        """Resume ``symbol`` from :meth:`snapshot`. Drift state is kept only for the model
        that serves it now (another's would be judged against the wrong reference)."""
        self.forget(symbol)
        if state.get("quality") is not None:
            self._quality[symbol] = LiveQuality.from_state(state["quality"],
                                                           self.config.quality_window)
        saved = state.get("drift", {}).get(serving.version)
        if saved is not None:
            self._drift[(symbol, serving.version)] = self._new_drift_monitor(serving, saved)
        for raw in state.get("pending", []):
            prediction = msgspec.convert(raw, Prediction)
            self._pending[(symbol, prediction.interval)] = prediction

    def forget(self, symbol: str) -> None:
        self._quality.pop(symbol, None)
        for key in [key for key in self._drift if key[0] == symbol]:
            del self._drift[key]
        for key in [key for key in self._pending if key[0] == symbol]:
            del self._pending[key]


def latest_per_series(observations: Sequence[Observation]) -> list[Observation]:
    """The newest observation of each series (a message may close several candles)."""
    latest = {(o.drift.symbol, o.drift.interval): o for o in observations}
    return list(latest.values())


async def store_observations(store: RedisStore, observations: Sequence[Observation]) -> None:
    """Write what the API serves: each series' newest quality and drift status, and every
    drift crossing as a ``drift`` event on the SSE feed."""
    for observation in latest_per_series(observations):
        drift = observation.drift
        await store.set_monitoring(drift.symbol, drift.interval,
                                   quality=msgspec.json.encode(observation.quality),
                                   drift=msgspec.json.encode(drift))
    for observation in observations:
        for event in observation.events:
            await store.write_drift(event.symbol, event.interval, msgspec.json.encode(event))
