"""Records that travel through Kafka and Redis, with their wire encoding.

msgspec Structs decode JSON straight into typed objects in about a microsecond, which is
what the trade hot path needs. Every record carries ``ts_event`` (exchange time) and
``ts_ingest`` (when this system first saw it), both integer UTC epoch milliseconds.
"""

import itertools
import operator
import time
from collections.abc import Sequence
from typing import Final, Literal

import msgspec

Source = Literal["live", "replay", "sim"]


def now_ms() -> int:
    """Current UTC time in epoch milliseconds."""
    return time.time_ns() // 1_000_000


class Trade(msgspec.Struct, frozen=True, tag="trade", tag_field="kind"):
    """One exchange trade, as published on the ``trades`` topic (keyed by symbol)."""

    symbol: str
    trade_id: int
    price: float
    qty: float
    quote_qty: float
    is_buyer_maker: bool
    ts_event: int
    ts_ingest: int
    source: Source = "live"


class EndOfStream(msgspec.Struct, frozen=True, tag="eos", tag_field="kind"):
    """Sent by a finite source (replay, sim with a limit) after its last trade of a symbol:
    the worker then flushes that symbol's open candles."""

    symbol: str
    ts_event: int
    ts_ingest: int
    source: Source = "replay"


class TradeBatch(msgspec.Struct, frozen=True, tag="trades", tag_field="kind"):
    """Several trades of one symbol in one ``trades`` message, column by column: the
    i-th trade is (``trade_id[i]``, ``price[i]``, ...), in the order the source saw them.

    In memory the columns are plain values. On the wire a batch has two versions, both
    read by :data:`trade_decoder` (so old topics replay):

    - version 2, what :func:`encode_batch` writes (about 24 bytes a trade, 40% of version
      1): ``trade_id`` and ``ts_event`` as the first value then differences from the
      previous one; ``is_buyer_maker`` as a string of ``0``/``1``; ``quote_qty`` left out
      when every trade's is exactly ``price * qty`` (as the live ingestor computes it)::

        {"kind": "trades", "v": 2, "symbol": "BTCUSDT", "ts_ingest": 1764633600123,
         "trade_id": [5, 1], "price": [97000.1, 97000.0], "qty": [0.01, 0.2],
         "is_buyer_maker": "01", "ts_event": [1764633600101, 17]}

    - version 1, this struct verbatim (``encode(batch)``)::

        {"kind": "trades", "v": 1, "symbol": "BTCUSDT", "source": "live",
         "ts_ingest": 1764633600123, "trade_id": [5, 6], "price": [97000.1, 97000.0],
         "qty": [0.01, 0.2], "quote_qty": [970.001, 19400.0],
         "is_buyer_maker": [false, true], "ts_event": [1764633600101, 1764633600118]}

    ``ts_ingest`` is when the batch was published. A batch costs the worker one message,
    where single :class:`Trade` messages (still accepted) cost one each. Columns of unequal
    length make the whole message a dead letter."""

    symbol: str
    ts_ingest: int
    trade_id: list[int]
    price: list[float]
    qty: list[float]
    quote_qty: list[float]
    is_buyer_maker: list[bool]
    ts_event: list[int]
    source: Source = "live"
    v: Literal[1] = 1

    def __post_init__(self) -> None:
        # Raised while decoding, this makes the message undecodable (a dead letter).
        n = len(self.trade_id)
        if any(len(column) != n for column in (self.price, self.qty, self.quote_qty,
                                               self.is_buyer_maker, self.ts_event)):
            raise ValueError("the batch's columns differ in length")

    def __len__(self) -> int:
        return len(self.trade_id)

    @classmethod
    def of(cls, trades: Sequence[Trade], ts_ingest: int | None = None) -> "TradeBatch":
        """The batch of ``trades`` (one symbol, one source; at least one trade)."""
        first = trades[0]
        return cls(
            symbol=first.symbol,
            ts_ingest=first.ts_ingest if ts_ingest is None else ts_ingest,
            trade_id=[t.trade_id for t in trades],
            price=[t.price for t in trades],
            qty=[t.qty for t in trades],
            quote_qty=[t.quote_qty for t in trades],
            is_buyer_maker=[t.is_buyer_maker for t in trades],
            ts_event=[t.ts_event for t in trades],
            source=first.source,
        )

    def trades(self) -> list[Trade]:
        """The batch as single trades, each stamped with the batch's ``ts_ingest``."""
        return [
            Trade(self.symbol, trade_id, price, qty, quote_qty, maker, ts_event,
                  self.ts_ingest, self.source)
            for trade_id, price, qty, quote_qty, maker, ts_event in zip(
                self.trade_id, self.price, self.qty, self.quote_qty, self.is_buyer_maker,
                self.ts_event, strict=True)
        ]


class _WireBatch(msgspec.Struct, frozen=True, kw_only=True, omit_defaults=True,
                 tag="trades", tag_field="kind"):
    """A ``trades`` batch as it travels, either version (see :class:`TradeBatch`)."""

    v: Literal[1, 2] = 1
    symbol: str
    source: Source = "live"
    ts_ingest: int
    trade_id: list[int]
    price: list[float]
    qty: list[float]
    is_buyer_maker: list[bool] | str
    ts_event: list[int]
    quote_qty: list[float] | None = None

    def unpacked(self) -> TradeBatch:
        """The batch in memory; ValueError when the message breaks its version's rules."""
        maker, quote_qty = self.is_buyer_maker, self.quote_qty
        if self.v == 1:
            if isinstance(maker, str) or quote_qty is None:
                raise ValueError("a version 1 batch has is_buyer_maker and quote_qty lists")
            return TradeBatch(self.symbol, self.ts_ingest, self.trade_id, self.price, self.qty,
                              quote_qty, maker, self.ts_event, self.source)
        if not isinstance(maker, str) or maker.strip("01"):
            raise ValueError("a version 2 batch has is_buyer_maker as a string of 0 and 1")
        if quote_qty is None:
            quote_qty = list(map(operator.mul, self.price, self.qty))
        return TradeBatch(
            self.symbol, self.ts_ingest, list(itertools.accumulate(self.trade_id)),
            self.price, self.qty, quote_qty, list(map("1".__eq__, maker)),
            list(itertools.accumulate(self.ts_event)), self.source,
        )


_MAKER_DIGITS: Final = bytes.maketrans(b"\x00\x01", b"01")


def _differences(values: list[int]) -> list[int]:
    """The first value, then each value minus the one before it."""
    return values[:1] + list(map(operator.sub, values[1:], values[:-1]))


def encode_batch(batch: TradeBatch) -> bytes:
    """``batch`` as a version 2 ``trades`` message (see :class:`TradeBatch`)."""
    derived = all(map(operator.eq, batch.quote_qty, map(operator.mul, batch.price, batch.qty)))
    return encode(_WireBatch(
        v=2, symbol=batch.symbol, source=batch.source, ts_ingest=batch.ts_ingest,
        trade_id=_differences(batch.trade_id), price=batch.price, qty=batch.qty,
        is_buyer_maker=bytes(batch.is_buyer_maker).translate(_MAKER_DIGITS).decode("ascii"),
        ts_event=_differences(batch.ts_event),
        quote_qty=None if derived else batch.quote_qty,
    ))


TradeMessage = Trade | EndOfStream | TradeBatch

#: Default notional (quote units, USDT for BTCUSDT) from which a trade counts as large in
#: :attr:`Candle.large_trade_quote_volume`. In the real BTCUSDT websocket capture in
#: ``../shared/data/binance/ws`` (2026-04-11, 19,689 trades at ~72,700 USDT) trades of
#: 100,000 USDT or more are 0.02% of the trades (about the 99.98th percentile) yet 11% of the
#: quote volume: the rare block trades. 10,000 would already take in 59% of the volume.
LARGE_TRADE_QUOTE: Final = 100_000.0


class Candle(msgspec.Struct, frozen=True):
    """A closed OHLCV candle with Binance kline semantics.

    ``ts_event`` is the candle's close_time; ``ts_ingest`` is when the worker closed it.
    ``large_trade_quote_volume``, beyond the kline fields: the quote volume of the trades
    whose notional (``quote_qty``) reached the candle builder's ``large_trade_quote``
    threshold (0.0 for an empty candle); None when unknown, as for candles made from
    klines and those encoded before the field existed.
    """

    symbol: str
    interval: str
    open_time: int
    close_time: int
    open: float
    high: float
    low: float
    close: float
    volume: float
    quote_volume: float
    trades: int
    taker_buy_volume: float
    taker_buy_quote_volume: float
    source: Source
    ts_event: int
    ts_ingest: int
    large_trade_quote_volume: float | None = None


class Prediction(msgspec.Struct, frozen=True):
    """A forecast of a later candle's close, made when ``candle_open_time`` closed:
    ``horizon`` candles ahead (1: the next one), whose open time is ``target_open_time``.
    ``lower``/``upper`` bound the central 80% interval, ``predicted_close`` is the median."""

    symbol: str
    interval: str
    candle_open_time: int
    target_open_time: int
    last_close: float
    predicted_close: float
    lower: float
    upper: float
    model_version: str
    made_at: int
    source: Source
    ts_event: int
    ts_ingest: int
    horizon: int = 1


class DeadLetter(msgspec.Struct, frozen=True):
    """A message the pipeline could not use, kept with the reason instead of dropped."""

    reason: str
    payload: str
    stage: str
    ts_ingest: int


class ModelAnnouncement(msgspec.Struct, frozen=True):
    """On the ``model-control`` topic: every worker should now serve ``version`` from its
    model registry, whose ``model.onnx`` must have this ``sha256``. ``ts_event`` is when
    the version was promoted. With ``symbol``, only that symbol's model changes (its own
    champion, see ``Registry.promote``); without, the shared model."""

    version: str
    sha256: str
    ts_event: int
    ts_ingest: int
    symbol: str | None = None


class Alert(msgspec.Struct, frozen=True):
    """Something an operator should look at, sent to SSE clients as an ``alert`` event;
    ``kind`` names what happened (e.g. ``model_rejected``), ``model_version`` the version
    concerned (empty when unknown)."""

    kind: str
    message: str
    model_version: str
    ts_event: int
    ts_ingest: int


_encoder = msgspec.json.Encoder()
encode = _encoder.encode


class _TradeDecoder:
    """Decodes a ``trades`` message (a single trade, a batch of either version or an
    end-of-stream marker); msgspec.DecodeError or ValidationError when it cannot."""

    def __init__(self) -> None:
        self._wire = msgspec.json.Decoder(Trade | EndOfStream | _WireBatch)

    def decode(self, raw: bytes | str) -> TradeMessage:
        message: Trade | EndOfStream | _WireBatch = self._wire.decode(raw)
        if isinstance(message, _WireBatch):
            try:
                return message.unpacked()
            except ValueError as exc:
                raise msgspec.ValidationError(str(exc)) from None
        return message


trade_decoder = _TradeDecoder()
candle_decoder = msgspec.json.Decoder(Candle)
prediction_decoder = msgspec.json.Decoder(Prediction)
announcement_decoder = msgspec.json.Decoder(ModelAnnouncement)
