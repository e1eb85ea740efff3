"""Broker-free core of the worker: trades in, closed candles and predictions out.

``TradePipeline`` owns one ``CandleBuilder`` per (symbol, interval) and the recent candles
the forecaster needs. The Faust agent feeds it decoded messages (``process``: one trade or
end-of-stream; ``process_batch``: a batch's columns) and ships what ``drain()`` returns;
tests and benchmarks drive it directly.
"""

import math
import time
from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import msgspec
import numpy as np

from makeusrich.core.schemas import (
    LARGE_TRADE_QUOTE,
    Candle,
    EndOfStream,
    Prediction,
    Trade,
    now_ms,
)
from makeusrich.inference import Forecaster, NaiveForecaster
from makeusrich.inference.conformal import DEFAULT_STEP, AdaptiveConformal
from makeusrich.monitoring import Monitor, MonitorConfig, Observation
from makeusrich.stream.candles import CandleBuilder, TradeColumns, UpdateResult

__all__ = ["Outputs", "TradePipeline"]

_HISTORY_MIN = 64  # candles kept per series even for small model windows


@dataclass
class Outputs:
    candles: list[Candle] = field(default_factory=list)
    predictions: list[Prediction] = field(default_factory=list)
    late: list[Trade] = field(default_factory=list)
    # (model version, seconds) of each forecast made, for the inference-latency metric.
    inference_s: list[tuple[str, float]] = field(default_factory=list)
    monitoring: list[Observation] = field(default_factory=list)


class TradePipeline:
    """Per-symbol candle building and inference for a set of intervals.

    ``forecaster`` serves every symbol without a model of its own (``set_forecaster``).
    Served bands go through adaptive conformal with ``conformal_step`` (0: as the model
    gives them). ``large_trade_quote``: the candle builders' large-trade threshold."""

    def __init__(
        self, intervals: Iterable[str], grace_ms: int, forecaster: Forecaster,
        monitoring: MonitorConfig | None = None, conformal_step: float = DEFAULT_STEP,
        *, large_trade_quote: float = LARGE_TRADE_QUOTE,
    ) -> None:
        self.intervals = tuple(intervals)
        self.large_trade_quote = large_trade_quote
        # Live quality and drift, on every closed candle (None: not monitored).
        self.monitor = None if monitoring is None else Monitor(monitoring)
        self.grace_ms = grace_ms
        self.forecaster = forecaster
        self._own: dict[str, Forecaster] = {}  # symbol -> its own model
        # Until a series has a model's full window, and for intervals the model was not
        # trained on, the persistence baseline answers (labelled model_version "naive").
        self._baseline = NaiveForecaster()
        self.conformal = AdaptiveConformal(conformal_step)
        self.duplicates = 0
        self._builders: dict[str, tuple[CandleBuilder, ...]] = {}
        self._history: dict[tuple[str, str], deque[Candle]] = {}
        self._out = Outputs()

    def _builders_for(self, symbol: str) -> tuple[CandleBuilder, ...]:
        builders = self._builders.get(symbol)
        if builders is None:
            builders = self._builders[symbol] = tuple(
                CandleBuilder(symbol, interval, self.grace_ms, self.large_trade_quote)
                for interval in self.intervals
            )
        return builders

    def process(self, message: Trade | EndOfStream) -> None:
        """Fold one message in; results accumulate until ``drain()``."""
        builders = self._builders_for(message.symbol)
        if isinstance(message, EndOfStream):
            for builder in builders:
                builder.advance(message.ts_event)
                builder.flush()
                self._collect(builder)
            return
        late = duplicate = False
        for builder in builders:
            result = builder.update(message)
            if result is UpdateResult.ACCEPTED:
                self._collect(builder)
            elif result is UpdateResult.LATE:
                late = True
            else:
                duplicate = True
        if late:
            self._out.late.append(message)
        if duplicate:
            self.duplicates += 1

    def process_batch(self, trades: TradeColumns) -> None:
        """Fold a batch of one symbol's trades in, as ``process`` on each in order would."""
        duplicate = late = np.zeros(len(trades), np.bool_)
        for builder in self._builders_for(trades.symbol):
            builder_duplicate, builder_late = builder.update_batch(trades)
            self._collect(builder)
            duplicate = duplicate | builder_duplicate
            late = late | builder_late
        self.duplicates += int(np.count_nonzero(duplicate))
        if late.any():
            self._out.late.extend(trades.select(late).trades())

    def _collect(self, builder: CandleBuilder) -> None:
        for candle in builder.closed():
            self.add_candle(candle)

    def add_candle(self, candle: Candle) -> None:
        """Fold in a closed candle: keep it for the forecaster and predict the closes ahead.
        The builders' candles come through here; a replay of archived candles calls it
        directly."""
        key = (candle.symbol, candle.interval)
        history = self._history.get(key)
        if history is None:
            history = self._history[key] = deque(maxlen=self._history_len())
        history.append(candle)
        self._out.candles.append(candle)
        self.conformal.observe(candle.symbol, candle.interval, candle.open_time, candle.close)
        serving = self._serving(candle)
        predictions = self._predict(candle, history, serving)
        self._out.predictions.extend(predictions)
        if self.monitor is not None:  # live quality is of the next close (horizon 1)
            self._out.monitoring.append(self.monitor.observe(
                candle, history, serving, predictions[0] if predictions else None))

    def forecaster_for(self, symbol: str) -> Forecaster:
        """The model that predicts ``symbol``: its own, else the shared one."""
        return self._own.get(symbol, self.forecaster)

    def set_forecaster(self, model: Forecaster | None, symbol: str | None = None) -> None:
        """Serve ``model`` for ``symbol`` (None: back to the shared model), or as the shared
        model when ``symbol`` is None."""
        if symbol is None:
            if model is None:
                raise ValueError("the shared model cannot be removed")
            self.forecaster = model
        elif model is None:
            self._own.pop(symbol, None)
        else:
            self._own[symbol] = model
        # Histories kept so far may be shorter than a larger window needs: grow them.
        length = self._history_len()
        for key, history in self._history.items():
            if history.maxlen is not None and history.maxlen < length:
                self._history[key] = deque(history, maxlen=length)

    def _history_len(self) -> int:
        window = max([self.forecaster.window, *(f.window for f in self._own.values())])
        return max(_HISTORY_MIN, window + 1)

    def _serving(self, candle: Candle) -> Forecaster:
        """The model that forecasts ``candle``'s series once its window is full."""
        forecaster = self.forecaster_for(candle.symbol)
        if forecaster.interval not in (None, candle.interval):
            return self._baseline
        return forecaster

    def _predict(
        self, candle: Candle, history: deque[Candle], forecaster: Forecaster
    ) -> list[Prediction]:
        """One prediction per horizon the serving model has (horizon 1 first), or none."""
        recent = list(history)[-(forecaster.window + 1) :]
        started_s = time.perf_counter()
        forecasts = forecaster.predict_horizons(recent)
        if forecasts is None:  # the model's window is not full yet
            horizons = forecaster.horizons
            forecaster = self._baseline
            forecasts = [f for f in (forecaster.predict(recent, h) for h in horizons)
                         if f is not None]
        if not forecasts:
            return []
        self._out.inference_s.append((forecaster.version, time.perf_counter() - started_s))
        made_at = now_ms()
        step_ms = candle.close_time + 1 - candle.open_time
        predictions = []
        for forecast in forecasts:
            target_open_time = candle.open_time + forecast.horizon * step_ms
            lower, predicted, upper = (
                candle.close * math.exp(q)
                for q in self.conformal.adjust(
                    candle.symbol, candle.interval, forecaster.version, forecast.horizon,
                    target_open_time, candle.close,
                    [_log_ratio(value, candle.close) for value in
                     (forecast.lower, forecast.predicted_close, forecast.upper)],
                )
            )
            predictions.append(Prediction(
                symbol=candle.symbol,
                interval=candle.interval,
                candle_open_time=candle.open_time,
                target_open_time=target_open_time,
                last_close=candle.close,
                predicted_close=predicted,
                lower=lower,
                upper=upper,
                model_version=forecaster.version,
                made_at=made_at,
                source=candle.source,
                ts_event=candle.close_time,
                ts_ingest=made_at,
                horizon=forecast.horizon,
            ))
        return predictions

    @property
    def has_output(self) -> bool:
        return bool(self._out.candles or self._out.late)

    def drain(self) -> Outputs:
        out, self._out = self._out, Outputs()
        return out

    def forget(self, symbol: str) -> None:
        """Drop a symbol's state (its trades will be folded in again from scratch)."""
        self._builders.pop(symbol, None)
        for interval in self.intervals:
            self._history.pop((symbol, interval), None)
        self.conformal.forget(symbol)
        if self.monitor is not None:
            self.monitor.forget(symbol)

    # Snapshots of one symbol's state, for the worker's Faust table.
    def snapshot(self, symbol: str) -> dict[str, Any]:
        return {
            "builders": {b.interval: b.snapshot() for b in self._builders_for(symbol)},
            "history": {
                interval: msgspec.to_builtins(list(self._history.get((symbol, interval), ())))
                for interval in self.intervals
            },
            "monitor": None if self.monitor is None else self.monitor.snapshot(symbol),
            "conformal": self.conformal.snapshot(symbol),
        }

    def restore(self, symbol: str, state: dict[str, Any]) -> None:
        saved = state.get("builders", {})
        self._builders[symbol] = tuple(
            CandleBuilder.restore(symbol, interval, self.grace_ms, saved[interval],
                                  self.large_trade_quote)
            if interval in saved
            else CandleBuilder(symbol, interval, self.grace_ms, self.large_trade_quote)
            for interval in self.intervals
        )
        for interval, candles in state.get("history", {}).items():
            if interval in self.intervals:
                self._history[(symbol, interval)] = deque(
                    msgspec.convert(candles, list[Candle]), maxlen=self._history_len()
                )
        self.conformal.restore(symbol, state.get("conformal", {}))
        if self.monitor is not None and state.get("monitor") is not None:
            self.monitor.restore(symbol, state["monitor"], self.forecaster_for(symbol))


def _log_ratio(value: float, close: float) -> float:
    # A band edge at or below zero (absurd, but a model may say it) stays as far below.
    return math.log(value / close) if value > 0 < close else -math.inf
