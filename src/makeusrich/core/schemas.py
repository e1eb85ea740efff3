"""Records that travel through Kafka and Redis, with their wire encoding.

msgspec Structs decode JSON straight into typed objects in about a microsecond, which is
what the trade hot path needs. Every record carries ``ts_event`` (exchange time) and
``ts_ingest`` (when this system first saw it), both integer UTC epoch milliseconds.
"""

import time
from typing import Literal

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


TradeMessage = Trade | EndOfStream


class Candle(msgspec.Struct, frozen=True):
    """A closed OHLCV candle with Binance kline semantics.

    ``ts_event`` is the candle's close_time; ``ts_ingest`` is when the worker closed it.
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


class Prediction(msgspec.Struct, frozen=True):
    """A forecast of the next candle's close, made when ``candle_open_time`` closed."""

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
trade_decoder = msgspec.json.Decoder(TradeMessage)
candle_decoder = msgspec.json.Decoder(Candle)
prediction_decoder = msgspec.json.Decoder(Prediction)
announcement_decoder = msgspec.json.Decoder(ModelAnnouncement)
