"""Event-time OHLCV candles with the exact semantics of Binance klines.

Pure code, no broker: ``CandleBuilder.update(trade)`` folds one trade in, ``closed()``
hands back the candles that event time has closed since the last call. The Faust agent is
a thin adapter around this (see ``stream.app``).

``update_batch(columns)`` folds a whole batch of one symbol's trades (numpy columns) with
numpy: the same candles, bit for bit, as ``update`` called per trade in the same order (sums
accumulate sequentially, as ``+=`` does), at a cost per batch and per candle it touches
rather than per trade.

Semantics (per symbol and interval):

- ``open_time`` is aligned to the interval in UTC; ``close_time = open_time + interval - 1``.
- open/close are the first/last trade by trade id (ids increase per symbol on Binance, and the
  ingestor publishes in id order), high/low the extremes, volume/quote volume the sums,
  taker-buy volumes the sums over trades whose buyer was the taker (``is_buyer_maker`` false),
  ``large_trade_quote_volume`` the quote volume of trades whose ``quote_qty`` (their notional,
  price * qty) is at least ``large_trade_quote`` (never above ``quote_volume``).
- A candle closes once the watermark (highest ``ts_event`` seen) passes its end plus
  ``grace_ms``; until then out-of-order trades still land in it.
- A trade for an already closed candle is *late*: counted and reported to the caller (which
  dead-letters it), never folded in silently.
- An interval without trades still yields a candle: open=high=low=close=previous close,
  zero volume and zero trades.
"""

import enum
import itertools
import math
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt

from makeusrich.core.intervals import interval_ms as _interval_ms
from makeusrich.core.schemas import LARGE_TRADE_QUOTE, Candle, Source, Trade, TradeBatch, now_ms

__all__ = ["CandleBuilder", "TradeColumns", "UpdateResult"]

Mask = npt.NDArray[np.bool_]


@dataclass(frozen=True, slots=True)
class TradeColumns:
    """One symbol's trades as numpy columns, in arrival order: the batch path's input."""

    symbol: str
    source: Source
    ts_ingest: int
    trade_id: npt.NDArray[np.int64]
    price: npt.NDArray[np.float64]
    qty: npt.NDArray[np.float64]
    quote_qty: npt.NDArray[np.float64]
    is_buyer_maker: Mask
    ts_event: npt.NDArray[np.int64]

    @classmethod
    def of(cls, batch: TradeBatch) -> "TradeColumns":
        """``batch`` as columns; OverflowError for an integer beyond int64."""
        return cls(
            batch.symbol, batch.source, batch.ts_ingest,
            np.array(batch.trade_id, dtype=np.int64),
            np.array(batch.price, dtype=np.float64),
            np.array(batch.qty, dtype=np.float64),
            np.array(batch.quote_qty, dtype=np.float64),
            np.array(batch.is_buyer_maker, dtype=np.bool_),
            np.array(batch.ts_event, dtype=np.int64),
        )

    def __len__(self) -> int:
        return len(self.trade_id)

    def select(self, rows: Mask | npt.NDArray[np.intp]) -> "TradeColumns":
        """The trades where ``rows`` is true (or at the positions it lists)."""
        return TradeColumns(
            self.symbol, self.source, self.ts_ingest, self.trade_id[rows], self.price[rows],
            self.qty[rows], self.quote_qty[rows], self.is_buyer_maker[rows],
            self.ts_event[rows],
        )

    def trades(self) -> list[Trade]:
        """The columns as single trades (for the few that leave the batch path: late ones)."""
        return [
            Trade(self.symbol, trade_id, price, qty, quote_qty, maker, ts_event,
                  self.ts_ingest, self.source)
            for trade_id, price, qty, quote_qty, maker, ts_event in zip(
                self.trade_id.tolist(), self.price.tolist(), self.qty.tolist(),
                self.quote_qty.tolist(), self.is_buyer_maker.tolist(),
                self.ts_event.tolist(), strict=True)
        ]


def _before(running: npt.NDArray[np.int64], initial: int) -> npt.NDArray[np.int64]:
    """For each position i: max(initial, running[i - 1]), where ``running`` is a running max."""
    before = np.empty_like(running)
    before[0] = initial
    np.maximum(running[:-1], initial, out=before[1:])
    return before


class UpdateResult(enum.Enum):
    ACCEPTED = "accepted"
    DUPLICATE = "duplicate"
    LATE = "late"


class _OpenCandle:
    """Mutable accumulator; slots keep the per-trade update to a few attribute writes."""

    __slots__ = (
        "close", "high", "large_trade_quote_volume", "low", "open", "quote_volume",
        "taker_buy_quote_volume", "taker_buy_volume", "trades", "volume",
    )

    def __init__(self, price: float) -> None:
        self.open = self.high = self.low = self.close = price
        self.volume = self.quote_volume = 0.0
        self.taker_buy_volume = self.taker_buy_quote_volume = 0.0
        # NaN = unknown (a candle restored from a snapshot taken before the field existed);
        # sums keep it NaN, and the closed candle says None.
        self.large_trade_quote_volume = 0.0
        self.trades = 0


# An open candle in a snapshot: its values in this order. Snapshots taken before
# large_trade_quote_volume existed end before it.
_STATE = (
    "close", "high", "low", "open", "quote_volume", "taker_buy_quote_volume",
    "taker_buy_volume", "trades", "volume", "large_trade_quote_volume",
)


def _known(large_trade_quote_volume: float) -> float | None:
    """An open candle's large-trade volume as a candle or snapshot holds it (None: unknown)."""
    return None if math.isnan(large_trade_quote_volume) else large_trade_quote_volume


class CandleBuilder:
    """Builds the candles of one symbol at one interval from its trades."""

    def __init__(
        self, symbol: str, interval: str, grace_ms: int,
        large_trade_quote: float = LARGE_TRADE_QUOTE,
    ) -> None:
        self.symbol = symbol
        self.interval = interval
        self.interval_ms = _interval_ms(interval)
        self.grace_ms = grace_ms
        self.large_trade_quote = large_trade_quote
        self.watermark_ms = -1
        self.last_trade_id = -1
        self.late_trades = 0
        self.duplicate_trades = 0
        self._open: dict[int, _OpenCandle] = {}
        self._next_open_ms: int | None = None  # open_time of the oldest candle not yet closed
        self._last_close: float | None = None
        self._source: Source = "live"
        self._closed: list[Candle] = []

    def update(self, trade: Trade) -> UpdateResult:
        """Fold one trade in. Candles it closes are returned by the next ``closed()``."""
        if trade.trade_id <= self.last_trade_id:
            self.duplicate_trades += 1
            return UpdateResult.DUPLICATE
        self.last_trade_id = trade.trade_id
        ts = trade.ts_event
        open_ms = ts - ts % self.interval_ms
        next_open = self._next_open_ms
        if next_open is None or open_ms < next_open:
            if open_ms + self.interval_ms + self.grace_ms <= self.watermark_ms:
                self.late_trades += 1
                return UpdateResult.LATE
            # Earlier than the first candle but still within grace: start the series there.
            self._next_open_ms = next_open = open_ms

        candle = self._open.get(open_ms)
        price = trade.price
        if candle is None:
            candle = self._open[open_ms] = _OpenCandle(price)
        elif price > candle.high:
            candle.high = price
        elif price < candle.low:
            candle.low = price
        candle.close = price
        candle.volume += trade.qty
        candle.quote_volume += trade.quote_qty
        if trade.quote_qty >= self.large_trade_quote:
            candle.large_trade_quote_volume += trade.quote_qty
        candle.trades += 1
        if not trade.is_buyer_maker:
            candle.taker_buy_volume += trade.qty
            candle.taker_buy_quote_volume += trade.quote_qty
        self._source = trade.source

        if ts > self.watermark_ms:
            self.watermark_ms = ts
            if next_open + self.interval_ms + self.grace_ms <= ts:
                self._close_until(ts - self.grace_ms)
        return UpdateResult.ACCEPTED

    def update_batch(self, trades: TradeColumns) -> tuple[Mask, Mask]:
        """Fold a batch in, exactly as ``update`` on each trade in order would; returns the
        (duplicate, late) masks over its trades."""
        ids, ts = trades.trade_id, trades.ts_event
        if not len(ids):
            return np.zeros(0, np.bool_), np.zeros(0, np.bool_)
        # A trade is a duplicate unless its id is above every id before it.
        ids_max = np.maximum.accumulate(ids)
        duplicate = ids <= _before(ids_max, self.last_trade_id)
        self.last_trade_id = max(self.last_trade_id, int(ids_max[-1]))
        # The watermark each trade meets: its own candle has closed if it is past
        # open + interval + grace (late trades never raise it: they are older).
        step = self.interval_ms
        open_ms = ts - ts % step
        watermark = np.maximum.accumulate(np.where(duplicate, -1, ts))
        late = ~duplicate & (open_ms + (step + self.grace_ms) <= _before(watermark,
                                                                       self.watermark_ms))
        accepted = ~(duplicate | late)
        self.duplicate_trades += int(np.count_nonzero(duplicate))
        self.late_trades += int(np.count_nonzero(late))
        if accepted.any():
            self._fold(open_ms[accepted], trades.select(accepted))
            self._source = trades.source
            newest = int(watermark[-1])
            if newest > self.watermark_ms:
                self.watermark_ms = newest
                assert self._next_open_ms is not None
                if self._next_open_ms + step + self.grace_ms <= newest:
                    self._close_until(newest - self.grace_ms)
        return duplicate, late

    def _fold(self, open_ms: npt.NDArray[np.int64], trades: TradeColumns) -> None:
        """Fold accepted trades into their open candles, candle by candle."""
        first_open = int(open_ms.min())
        if self._next_open_ms is None or first_open < self._next_open_ms:
            self._next_open_ms = first_open  # within grace: the series starts there
        if len(open_ms) > 1 and not (open_ms[1:] >= open_ms[:-1]).all():
            order = np.argsort(open_ms, kind="stable")  # stable: arrival order per candle
            open_ms, trades = open_ms[order], trades.select(order)
        taker = ~trades.is_buyer_maker
        large = trades.quote_qty >= self.large_trade_quote
        # Sums in arrival order; adding 0.0 for the trades a sum leaves out (maker trades,
        # small ones) leaves a float sum unchanged.
        amounts = np.column_stack((trades.qty, trades.quote_qty,
                                   np.where(taker, trades.qty, 0.0),
                                   np.where(taker, trades.quote_qty, 0.0),
                                   np.where(large, trades.quote_qty, 0.0)))
        price = trades.price
        starts = np.flatnonzero(np.diff(open_ms)) + 1
        bounds = zip([0, *starts.tolist()], [*starts.tolist(), len(open_ms)], strict=True)
        for start, end in bounds:
            key = int(open_ms[start])
            candle = self._open.get(key)
            if candle is None:
                candle = self._open[key] = _OpenCandle(float(price[start]))
            prices = price[start:end]
            candle.high = max(candle.high, float(prices.max()))
            candle.low = min(candle.low, float(prices.min()))
            candle.close = float(prices[-1])
            totals = np.add.accumulate(np.vstack((
                [candle.volume, candle.quote_volume, candle.taker_buy_volume,
                 candle.taker_buy_quote_volume, candle.large_trade_quote_volume],
                amounts[start:end])), axis=0)[-1].tolist()
            (candle.volume, candle.quote_volume, candle.taker_buy_volume,
             candle.taker_buy_quote_volume, candle.large_trade_quote_volume) = totals
            candle.trades += end - start

    def advance(self, ts_event: int) -> None:
        """Move event time forward without a trade (e.g. an end-of-stream marker's time)."""
        if ts_event > self.watermark_ms:
            self.watermark_ms = ts_event
            self._close_until(ts_event - self.grace_ms)

    def flush(self) -> None:
        """Close every open candle now (end of a replay)."""
        if self._open:
            self._close_until(max(self._open) + self.interval_ms)

    def closed(self) -> list[Candle]:
        """Candles closed since the last call, oldest first."""
        out, self._closed = self._closed, []
        return out

    def _close_until(self, end_ms: int) -> None:
        """Close every candle whose end (open_time + interval) is <= ``end_ms``."""
        next_open = self._next_open_ms
        if next_open is None:
            return
        step = self.interval_ms
        now = now_ms()
        while next_open + step <= end_ms:
            self._closed.append(self._finish(next_open, self._open.pop(next_open, None), now))
            next_open += step
        self._next_open_ms = next_open

    def _finish(self, open_ms: int, candle: _OpenCandle | None, now: int) -> Candle:
        close_ms = open_ms + self.interval_ms - 1
        if candle is None:
            price = self._last_close
            assert price is not None, "a series starts at a candle with trades"
            return Candle(
                self.symbol, self.interval, open_ms, close_ms, price, price, price, price,
                0.0, 0.0, 0, 0.0, 0.0, self._source, close_ms, now, 0.0,
            )
        self._last_close = candle.close
        return Candle(
            self.symbol, self.interval, open_ms, close_ms, candle.open, candle.high,
            candle.low, candle.close, candle.volume, candle.quote_volume, candle.trades,
            candle.taker_buy_volume, candle.taker_buy_quote_volume, self._source, close_ms, now,
            _known(candle.large_trade_quote_volume),
        )

    # Snapshots let a restarted worker resume mid-candle (stored in a Faust table).
    def snapshot(self) -> dict[str, Any]:
        return {
            "watermark_ms": self.watermark_ms,
            "last_trade_id": self.last_trade_id,
            "late_trades": self.late_trades,
            "duplicate_trades": self.duplicate_trades,
            "next_open_ms": self._next_open_ms,
            "last_close": self._last_close,
            "source": self._source,
            "open": {
                str(open_ms): [*(getattr(c, name) for name in _STATE[:-1]),
                               _known(c.large_trade_quote_volume)]
                for open_ms, c in self._open.items()
            },
        }

    @classmethod
    def restore(
        cls, symbol: str, interval: str, grace_ms: int, state: dict[str, Any],
        large_trade_quote: float = LARGE_TRADE_QUOTE,
    ) -> "CandleBuilder":
        """The builder :meth:`snapshot` saved; an open candle of a snapshot taken before
        ``large_trade_quote_volume`` existed gets it unknown (its candle closes with None)."""
        builder = cls(symbol, interval, grace_ms, large_trade_quote)
        builder.watermark_ms = state["watermark_ms"]
        builder.last_trade_id = state["last_trade_id"]
        builder.late_trades = state["late_trades"]
        builder.duplicate_trades = state["duplicate_trades"]
        builder._next_open_ms = state["next_open_ms"]
        builder._last_close = state["last_close"]
        builder._source = state["source"]
        for open_ms, values in state["open"].items():
            candle = _OpenCandle(0.0)
            for name, value in itertools.zip_longest(_STATE, values):
                setattr(candle, name, math.nan if value is None else value)
            builder._open[int(open_ms)] = candle
        return builder
