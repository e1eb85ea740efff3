"""Test kit: build Trade objects and seeded random trade sequences, and a fake publisher.

Import as ``from kit.builders import make_trade, random_trades, FakePublisher``. Kept free
of the code under test (no simulator reuse) so a bug there cannot hide in the fixtures.
"""

import random
import time
from collections.abc import Iterable
from dataclasses import dataclass, field

from makeusrich.core.schemas import EndOfStream, Source, Trade

__all__ = ["T0_MS", "FakePublisher", "make_trade", "random_trades"]

T0_MS = 1_554_076_800_000  # 2019-04-01 00:00:00 UTC, the start of the tests/data slices


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


@dataclass
class FakePublisher:
    """In-memory stand-in for ``TradePublisher``: records what was sent and when."""

    sent: list[Trade | EndOfStream] = field(default_factory=list)
    sent_at_s: list[float] = field(default_factory=list)  # time.monotonic() per send
    flushes: int = 0
    dead_letters: list[tuple[str, str | bytes]] = field(default_factory=list)

    def send(self, trade: Trade | EndOfStream) -> None:
        self.sent.append(trade)
        self.sent_at_s.append(time.monotonic())

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
