"""Test kit: build Trade objects and seeded random trade sequences, a fake publisher, and
candles and predictions for scoring tests.

Import as ``from kit.builders import make_trade, random_trades, FakePublisher``. Kept free
of the code under test (no simulator reuse) so a bug there cannot hide in the fixtures.
"""

import itertools
import math
import random
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from makeusrich.core.schemas import (
    Candle,
    EndOfStream,
    Prediction,
    Source,
    Trade,
    TradeBatch,
    trade_decoder,
)

__all__ = [
    "T0_MS",
    "FakePublisher",
    "bootstrap_candles",
    "kline_candles",
    "make_candles",
    "make_predictions",
    "make_trade",
    "random_closes",
    "random_trades",
    "scale_volatility",
    "topic_trades",
]

T0_MS = 1_554_076_800_000  # 2019-04-01 00:00:00 UTC, the start of the tests/data slices
_STEP_MS = {"1s": 1_000, "1m": 60_000, "5m": 300_000, "1h": 3_600_000}


def make_trade(
    symbol: str = "BTCUSDT",
    trade_id: int = 1,
    price: float = 100.0,
    qty: float = 1.0,
    ts_event: int = T0_MS,
    *,
    is_buyer_maker: bool = False,
    quote_qty: float | None = None,
    ts_ingest: int | None = None,
    source: Source = "replay",
) -> Trade:
    """One trade; ``quote_qty`` defaults to price*qty and ``ts_ingest`` to ``ts_event``."""
    return Trade(
        symbol=symbol,
        trade_id=trade_id,
        price=price,
        qty=qty,
        quote_qty=price * qty if quote_qty is None else quote_qty,
        is_buyer_maker=is_buyer_maker,
        ts_event=ts_event,
        ts_ingest=ts_event if ts_ingest is None else ts_ingest,
        source=source,
    )


def random_trades(
    n: int,
    *,
    seed: int = 0,
    symbols: Iterable[str] = ("BTCUSDT",),
    start_ms: int = T0_MS,
    mean_gap_ms: float = 100.0,
    start_price: float = 100.0,
    source: Source = "replay",
) -> list[Trade]:
    """``n`` trades interleaved across ``symbols`` in time order, same list for the same seed.

    Gaps are exponential with mean ``mean_gap_ms`` (so several trades may share a
    millisecond), prices a small multiplicative random walk from ``start_price``, ids
    1, 2, 3, ... per symbol.
    """
    rng = random.Random(seed)
    names = list(symbols)
    prices = dict.fromkeys(names, start_price)
    next_ids = dict.fromkeys(names, 1)
    t_ms = float(start_ms)
    out: list[Trade] = []
    for _ in range(n):
        t_ms += rng.expovariate(1.0 / mean_gap_ms)
        symbol = rng.choice(names)
        prices[symbol] = round(prices[symbol] * (1.0 + rng.gauss(0.0, 0.0005)), 2)
        qty = round(rng.lognormvariate(0.0, 1.0), 5)
        out.append(
            make_trade(
                symbol,
                next_ids[symbol],
                prices[symbol],
                qty,
                int(t_ms),
                is_buyer_maker=rng.random() < 0.5,
                source=source,
            )
        )
        next_ids[symbol] += 1
    return out


def topic_trades(values: Iterable[bytes]) -> list[Trade | EndOfStream]:
    """The ``trades`` topic's messages, decoded, each batch expanded into its trades."""
    out: list[Trade | EndOfStream] = []
    for value in values:
        message = trade_decoder.decode(value)
        out.extend(message.trades() if isinstance(message, TradeBatch) else [message])
    return out


@dataclass
class FakePublisher:
    """In-memory stand-in for ``TradePublisher``: records what was sent and when."""

    sent: list[Trade | EndOfStream] = field(default_factory=list)
    sent_at_s: list[float] = field(default_factory=list)  # time.monotonic() per send
    flushes: int = 0
    batches: int = 0  # send_batch() calls
    dead_letters: list[tuple[str, str | bytes]] = field(default_factory=list)

    def send(self, trade: Trade | EndOfStream) -> None:
        self.sent.append(trade)
        self.sent_at_s.append(time.monotonic())

    def send_batch(self, batch: TradeBatch) -> None:
        self.batches += 1
        for trade in batch.trades():
            self.send(trade)

    def dead_letter(self, reason: str, payload: str | bytes, stage: str = "ingest") -> None:
        self.dead_letters.append((reason, payload))

    def flush(self, timeout_s: float = 30.0) -> None:
        self.flushes += 1

    @property
    def trades(self) -> list[Trade]:
        return [m for m in self.sent if isinstance(m, Trade)]

    @property
    def end_of_streams(self) -> list[EndOfStream]:
        return [m for m in self.sent if isinstance(m, EndOfStream)]


def random_closes(
    n: int, *, seed: int = 0, start: float = 100.0, sigma: float = 0.002
) -> list[float]:
    """``n`` closes of a seeded multiplicative random walk from ``start``."""
    rng = random.Random(seed)
    closes = [start]
    for _ in range(n - 1):
        closes.append(closes[-1] * (1.0 + rng.gauss(0.0, sigma)))
    return closes


def make_candles(
    closes: Sequence[float],
    *,
    symbol: str = "BTCUSDT",
    interval: str = "1m",
    start_ms: int = T0_MS,
    source: Source = "replay",
) -> list[Candle]:
    """Consecutive closed candles with the given closes (``interval`` one of 1s, 1m, 5m,
    1h); open = previous close, high/low 0.05% around the close."""
    step = _STEP_MS[interval]
    candles = []
    for i, close in enumerate(closes):
        open_time = start_ms + i * step
        candles.append(
            Candle(
                symbol=symbol,
                interval=interval,
                open_time=open_time,
                close_time=open_time + step - 1,
                open=closes[i - 1] if i else close,
                high=close * 1.0005,
                low=close * 0.9995,
                close=close,
                volume=1.0,
                quote_volume=close,
                trades=1,
                taker_buy_volume=0.5,
                taker_buy_quote_volume=close / 2,
                source=source,
                ts_event=open_time + step - 1,
                ts_ingest=open_time + step - 1,
            )
        )
    return candles


def make_predictions(
    candles: Sequence[Candle],
    predicted: Sequence[float],
    *,
    band: Sequence[tuple[float, float]] | None = None,
    model_version: str = "test-model",
    warmup: int = 0,
    horizon: int = 1,
) -> list[Prediction]:
    """One prediction at the close of each candle (``predicted[i]`` made at ``candles[i]``,
    targeting the open time ``horizon`` candles on, the next one by default), like the
    pipeline's. ``band``: (lower, upper) per prediction, else 0.5% either side of the
    predicted close. The first ``warmup`` are labelled ``naive``, as the pipeline labels its
    warm-up."""
    out = []
    for i, (candle, mid) in enumerate(zip(candles, predicted, strict=False)):
        lower, upper = (mid * 0.995, mid * 1.005) if band is None else band[i]
        step = candle.close_time + 1 - candle.open_time
        out.append(
            Prediction(
                symbol=candle.symbol,
                interval=candle.interval,
                candle_open_time=candle.open_time,
                target_open_time=candle.open_time + horizon * step,
                last_close=candle.close,
                predicted_close=mid,
                lower=lower,
                upper=upper,
                model_version="naive" if i < warmup else model_version,
                made_at=candle.close_time + 1,
                source=candle.source,
                ts_event=candle.close_time,
                ts_ingest=candle.close_time + 1,
                horizon=horizon,
            )
        )
    return out


def kline_candles(path: Path, *, symbol: str = "BTCUSDT", interval: str = "1m") -> list[Candle]:
    """The candles of a Binance kline CSV as the pipeline emits them (times in ms or µs,
    no header), e.g. ``tests/data/BTCUSDT-1m-2025-11-20.csv``."""
    candles = []
    for line in path.read_text().splitlines():
        f = line.split(",")
        open_time, close_time = int(f[0]), int(f[6])
        if open_time > 10**14:  # microseconds
            open_time, close_time = open_time // 1000, close_time // 1000
        candles.append(
            Candle(
                symbol=symbol,
                interval=interval,
                open_time=open_time,
                close_time=close_time,
                open=float(f[1]),
                high=float(f[2]),
                low=float(f[3]),
                close=float(f[4]),
                volume=float(f[5]),
                quote_volume=float(f[7]),
                trades=int(f[8]),
                taker_buy_volume=float(f[9]),
                taker_buy_quote_volume=float(f[10]),
                source="replay",
                ts_event=close_time,
                ts_ingest=close_time,
            )
        )
    return candles


def _shape(candle: Candle, previous_close: float) -> tuple[float, ...]:
    """Log open, high, low and close of ``candle`` relative to the close before it."""
    return tuple(
        math.log(price / previous_close)
        for price in (candle.open, candle.high, candle.low, candle.close)
    )


def _rebuilt(
    template: Candle,
    shape: Sequence[float],
    previous_close: float,
    open_time: int,
    *,
    volume: float,
    taker_buy_volume: float,
) -> Candle:
    open_, high, low, close = (previous_close * math.exp(x) for x in shape)
    step = template.close_time + 1 - template.open_time
    return Candle(
        symbol=template.symbol,
        interval=template.interval,
        open_time=open_time,
        close_time=open_time + step - 1,
        open=open_,
        high=high,
        low=low,
        close=close,
        volume=volume,
        quote_volume=volume * close,
        trades=template.trades,
        taker_buy_volume=taker_buy_volume,
        taker_buy_quote_volume=taker_buy_volume * close,
        source=template.source,
        ts_event=open_time + step - 1,
        ts_ingest=open_time + step - 1,
    )


def bootstrap_candles(
    candles: Sequence[Candle], n: int, *, seed: int = 0, start_ms: int | None = None
) -> list[Candle]:
    """``n`` consecutive candles whose shapes (open/high/low/close relative to the previous
    close, volume, taker-buy volume) are drawn with replacement from real ``candles``
    (seeded), chained from the first close and starting at ``start_ms`` (default: the
    first open time). Real marginal distributions without the intraday volatility cycle,
    so windows of them are alike: a stationary market made of real candles."""
    rng = random.Random(seed)
    shapes = [
        (_shape(c, p.close), c.volume, c.taker_buy_volume)
        for p, c in itertools.pairwise(candles)
    ]
    step = candles[0].close_time + 1 - candles[0].open_time
    t0 = candles[0].open_time if start_ms is None else start_ms
    close = candles[0].close
    out = []
    for i in range(n):
        shape, volume, taker = rng.choice(shapes)
        candle = _rebuilt(
            candles[0], shape, close, t0 + i * step, volume=volume, taker_buy_volume=taker
        )
        out.append(candle)
        close = candle.close
    return out


def scale_volatility(
    candles: Sequence[Candle], factor: float, *, start: int = 0, stop: int | None = None
) -> list[Candle]:
    """``candles`` with the log moves of candles ``start .. stop - 1`` (open, high, low and
    close relative to the previous close) multiplied by ``factor``, so their log returns
    and log ranges are ``factor`` times the originals; later candles keep their own moves
    from the new prices. Times and volumes are unchanged."""
    stop = len(candles) if stop is None else stop
    out = list(candles[:1])
    for i in range(1, len(candles)):
        shape = _shape(candles[i], candles[i - 1].close)
        if start <= i < stop:
            shape = tuple(factor * x for x in shape)
        out.append(
            _rebuilt(
                candles[i],
                shape,
                out[-1].close,
                candles[i].open_time,
                volume=candles[i].volume,
                taker_buy_volume=candles[i].taker_buy_volume,
            )
        )
    return out
