"""Live Binance trades -> publisher, with our own reconnect loop and REST gap backfill.

python-binance's socket manager gives up after 5 reconnect attempts and dies when its queue
overflows, so the websocket is handled here with ``websockets``. python-binance is used for
the REST side only: symbol validation and ``historicalTrades`` backfill.

Exactly-once per trade id (within one process): ids at or below the last published id of a
symbol are duplicates and skipped; a jump in ids is filled from REST before the new trade
is published, so every symbol's trades are published complete and in id order.

Prometheus: :class:`makeusrich.core.metrics.IngestMetrics` exports the ingestor's counts
and, through :class:`MeteredSink`, every published trade of any source (``mur ingest``
serves them on ``Settings.ingest_metrics_port``).
"""

import asyncio
import contextlib
import logging
import random
from collections.abc import AsyncGenerator
from typing import Any, Literal

import msgspec
from aiohttp import ClientError
from binance import AsyncClient
from binance.exceptions import BinanceAPIException, BinanceRequestException
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosedError, InvalidHandshake, InvalidURI
from websockets.protocol import State

from makeusrich.core.errors import IngestError
from makeusrich.core.metrics import IngestMetrics
from makeusrich.core.schemas import EndOfStream, Trade, TradeBatch, now_ms
from makeusrich.core.settings import Settings
from makeusrich.stream.publisher import TradeSink

__all__ = [
    "REST_ERRORS",
    "BinanceIngestor",
    "CombinedStream",
    "MeteredSink",
    "backoff_s",
    "probe_binance",
    "rest_client",
    "run_live",
    "stream_url",
    "validate_symbols",
]

log = logging.getLogger(__name__)

_BACKOFF_BASE_S = 0.5
_HISTORY_PAGE_MAX = 1000  # Binance's largest historicalTrades page
_INVALID_SYMBOL = -1121
_CONNECT_ERRORS = (OSError, TimeoutError, InvalidHandshake)
#: Failures of a Binance REST call worth retrying (also used by `mur backfill`).
REST_ERRORS = (ClientError, TimeoutError, BinanceRequestException)


class _WsTrade(msgspec.Struct, frozen=True):
    event: Literal["trade"] = msgspec.field(name="e")
    symbol: str = msgspec.field(name="s")
    trade_id: int = msgspec.field(name="t")
    price: float = msgspec.field(name="p")
    qty: float = msgspec.field(name="q")
    ts_event: int = msgspec.field(name="T")
    is_buyer_maker: bool = msgspec.field(name="m")


class _WsMessage(msgspec.Struct, frozen=True):
    stream: str
    data: _WsTrade


class _RestTrade(msgspec.Struct, frozen=True):
    id: int
    price: float
    qty: float
    time: int
    is_buyer_maker: bool = msgspec.field(name="isBuyerMaker")


# strict=False lets msgspec parse Binance's decimal strings ("0.001") straight into floats.
_ws_decoder = msgspec.json.Decoder(_WsMessage, strict=False)


def stream_url(settings: Settings) -> str:
    """The combined trade-stream URL for ``settings.symbols``."""
    streams = "/".join(f"{symbol.lower()}@trade" for symbol in settings.symbols)
    return f"{settings.binance_ws_url.rstrip('/')}/stream?streams={streams}"


def backoff_s(failures: int, cap_s: float) -> float:
    """Exponential in the number of consecutive failures, capped, with jitter so many
    clients cut off together do not reconnect in lockstep."""
    return min(cap_s, _BACKOFF_BASE_S * 2.0 ** (failures - 1)) * random.uniform(0.5, 1.0)


async def _sleep_unless_stopped(stop: asyncio.Event, delay_s: float) -> bool:
    """Sleep ``delay_s``; True if ``stop`` was set meanwhile."""
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(stop.wait(), delay_s)
    return stop.is_set()


async def _close_when_stopped(ws: ClientConnection, stop: asyncio.Event) -> None:
    await stop.wait()
    await ws.close()


def _live_trade(
    symbol: str, trade_id: int, price: float, qty: float, is_buyer_maker: bool, ts_event: int
) -> Trade:
    # quote_qty is computed (not REST's quoteQty) so a trade's record is the same whether
    # the stream or the backfill delivered it.
    return Trade(
        symbol=symbol, trade_id=trade_id, price=price, qty=qty, quote_qty=price * qty,
        is_buyer_maker=is_buyer_maker, ts_event=ts_event, ts_ingest=now_ms(), source="live",
    )


def rest_client(settings: Settings) -> AsyncClient:
    # The plain constructor skips AsyncClient.create()'s ping and server-time calls;
    # API_URL is the instance attribute every public endpoint URL is built from.
    client = AsyncClient()
    client.API_URL = settings.binance_rest_url.rstrip("/")
    return client


async def _check_symbols(rest: AsyncClient, settings: Settings) -> None:
    for symbol in settings.symbols:
        try:
            # get_exchange_info() has no filter and would download every market.
            info = await rest._get("exchangeInfo", data={"symbol": symbol})
        except BinanceAPIException as exc:
            if exc.code == _INVALID_SYMBOL:
                raise IngestError(
                    f"Binance does not know symbol {symbol!r}; fix MUR_SYMBOLS / --symbols"
                ) from exc
            raise IngestError(f"Binance exchangeInfo failed for {symbol}: {exc}") from exc
        except REST_ERRORS as exc:
            raise IngestError(
                f"cannot reach Binance REST at {settings.binance_rest_url}: {exc!r}"
            ) from exc
        listed = {entry.get("symbol"): entry for entry in info.get("symbols", [])}
        if symbol not in listed:
            raise IngestError(f"Binance exchangeInfo does not list symbol {symbol!r}")
        if listed[symbol].get("status") != "TRADING":
            log.warning("%s is %s on Binance: expect no trades", symbol, listed[symbol]["status"])


async def validate_symbols(settings: Settings) -> None:
    """Raise IngestError unless Binance lists every symbol in ``settings.symbols``."""
    rest = rest_client(settings)
    try:
        await _check_symbols(rest, settings)
    finally:
        await rest.close_connection()


class CombinedStream:
    """Raw messages of Binance's combined trade stream; reconnects until ``stop`` is set.

    Binance closes every connection after 24 h, so a close is routine: reconnect at once
    after a connection that delivered messages, else back off (jittered, exponential,
    capped at ``reconnect_max_backoff_s``).
    """

    def __init__(self, settings: Settings, stop: asyncio.Event) -> None:
        self.url = stream_url(settings)
        self.reconnects = 0
        self._settings = settings
        self._stop = stop

    async def messages(self) -> AsyncGenerator[str | bytes, None]:
        """Yield each message as received. Use inside ``contextlib.aclosing``."""
        failures = 0
        connected_before = False
        while not self._stop.is_set():
            if failures and await _sleep_unless_stopped(
                self._stop, backoff_s(failures, self._settings.reconnect_max_backoff_s)
            ):
                return
            ws = await self._connect()
            if ws is None:
                failures += 1
                continue
            if connected_before:
                self.reconnects += 1
            connected_before = True
            healthy = False
            closer = asyncio.create_task(_close_when_stopped(ws, self._stop))
            try:
                # websockets answers Binance's pings; our own keepalive pings (its default)
                # also catch half-open TCP connections that would otherwise never end.
                async for raw in ws:
                    healthy = True
                    yield raw
                if not self._stop.is_set():
                    log.info("Binance closed the stream (code %s); reconnecting", ws.close_code)
            except ConnectionClosedError as exc:
                log.warning("Binance stream dropped (%s); reconnecting", exc)
            finally:
                closer.cancel()
                if ws.state is not State.CLOSED:
                    # Left mid-stream (the consumer stopped or failed): unread frames would
                    # stall the closing handshake for close_timeout, so drop the TCP link.
                    ws.transport.abort()
            failures = 0 if healthy else failures + 1

    async def _connect(self) -> ClientConnection | None:
        try:
            return await connect(
                self.url, open_timeout=self._settings.binance_connect_timeout_s
            )
        except InvalidURI as exc:
            raise IngestError(f"invalid binance_ws_url: {exc}") from exc
        except _CONNECT_ERRORS as exc:
            log.warning("cannot connect to %s: %r", self.url, exc)
            return None


class MeteredSink:
    """A :class:`TradeSink` that counts each trade it passes on in ``metrics``, whatever the
    source (live, replay or simulator)."""

    def __init__(self, sink: TradeSink, metrics: IngestMetrics) -> None:
        self._sink = sink
        self._metrics = metrics

    def send(self, trade: Trade | EndOfStream) -> None:
        self._sink.send(trade)
        if isinstance(trade, Trade):
            self._metrics.published(trade.symbol, trade.ts_event)

    def send_batch(self, batch: TradeBatch) -> None:
        self._sink.send_batch(batch)
        if batch:
            self._metrics.published(batch.symbol, max(batch.ts_event), len(batch))

    def dead_letter(self, reason: str, payload: str | bytes, stage: str = "ingest") -> None:
        self._sink.dead_letter(reason, payload, stage)

    def flush(self, timeout_s: float = 30.0) -> None:
        self._sink.flush(timeout_s)


class BinanceIngestor:
    """Publishes live trades of ``settings.symbols`` through ``publisher`` until stopped;
    its counts are exported by ``metrics`` when given."""

    def __init__(
        self, settings: Settings, publisher: TradeSink, metrics: IngestMetrics | None = None
    ) -> None:
        self.messages = 0
        self.gaps = 0
        self.published = 0
        self.duplicates_skipped = 0
        self.backfilled = 0
        self.bad_messages = 0
        self._settings = settings
        self._publisher = publisher
        self._symbols = frozenset(settings.symbols)
        self._last_id: dict[str, int] = {}
        self._stream: CombinedStream | None = None
        self._stop = asyncio.Event()
        if metrics is not None:
            metrics.watch(self)

    @property
    def reconnects(self) -> int:
        return self._stream.reconnects if self._stream else 0

    async def run(self, stop: asyncio.Event) -> None:
        """Validate the symbols (IngestError if unknown), then ingest until ``stop`` is set;
        flushes the publisher before returning."""
        self._stop = stop
        rest = rest_client(self._settings)
        try:
            await _check_symbols(rest, self._settings)
            self._stream = CombinedStream(self._settings, stop)
            async with contextlib.aclosing(self._stream.messages()) as messages:
                async for raw in messages:
                    await self._on_message(raw, rest)
        finally:
            await rest.close_connection()
        await asyncio.to_thread(self._publisher.flush)

    async def _on_message(self, raw: str | bytes, rest: AsyncClient) -> None:
        self.messages += 1
        try:
            trade = _ws_decoder.decode(raw).data
        except msgspec.DecodeError as exc:
            self._reject(raw, str(exc))
            return
        if trade.symbol not in self._symbols:
            self._reject(raw, f"unsubscribed symbol {trade.symbol}")
            return
        last_id = self._last_id.get(trade.symbol)
        if last_id is not None:
            if trade.trade_id <= last_id:
                self.duplicates_skipped += 1
                return
            if trade.trade_id > last_id + 1 and not await self._backfill(
                rest, trade.symbol, last_id + 1, trade.trade_id
            ):
                return  # stopped mid-backfill: publishing now would leave a hole
        self._publish(
            _live_trade(
                trade.symbol, trade.trade_id, trade.price, trade.qty, trade.is_buyer_maker,
                trade.ts_event,
            )
        )

    def _reject(self, raw: str | bytes, reason: str) -> None:
        self.bad_messages += 1
        log.warning("dead-lettering bad Binance message (%s): %.200r", reason, raw)
        self._publisher.dead_letter(reason, raw)

    def _publish(self, trade: Trade) -> None:
        self._publisher.send(trade)
        self._last_id[trade.symbol] = trade.trade_id
        self.published += 1

    async def _backfill(
        self, rest: AsyncClient, symbol: str, from_id: int, until_id: int
    ) -> bool:
        """Publish ids ``from_id .. until_id - 1`` from REST. False if stopped first."""
        log.info("%s: ids %d..%d missed on the stream; backfilling", symbol, from_id, until_id - 1)
        self.gaps += 1
        next_id = from_id
        while next_id < until_id:
            limit = min(_HISTORY_PAGE_MAX, until_id - next_id)
            page = await self._history_page(rest, symbol, next_id, limit)
            if page is None:
                return False
            progressed = False
            for row in page:
                if row.id >= until_id:
                    break
                self._publish(
                    _live_trade(symbol, row.id, row.price, row.qty, row.is_buyer_maker, row.time)
                )
                self.backfilled += 1
                next_id = row.id + 1
                progressed = True
            if not progressed:
                log.error(
                    "%s: Binance has no trades %d..%d; continuing without them",
                    symbol, next_id, until_id - 1,
                )
                break
        return True

    async def _history_page(
        self, rest: AsyncClient, symbol: str, from_id: int, limit: int
    ) -> list[_RestTrade] | None:
        """One historicalTrades page, retried with backoff on network errors, rate limits
        and 5xx until it arrives (None if stopped first)."""
        failures = 0
        while True:
            try:
                rows: Any = await rest.get_historical_trades(
                    symbol=symbol, fromId=from_id, limit=limit
                )
                return msgspec.convert(rows, list[_RestTrade], strict=False)
            except msgspec.ValidationError as exc:
                raise IngestError(f"unexpected historicalTrades response: {exc}") from exc
            except BinanceAPIException as exc:
                if exc.status_code not in (418, 429) and exc.status_code < 500:
                    raise IngestError(
                        f"Binance refused historicalTrades for {symbol}: {exc}"
                    ) from exc
                reason: object = exc
            except REST_ERRORS as exc:
                reason = exc
            failures += 1
            delay_s = backoff_s(failures, self._settings.reconnect_max_backoff_s)
            log.warning("historicalTrades %s fromId=%d failed (%r); retry in %.1f s", symbol,
                        from_id, reason, delay_s)
            if await _sleep_unless_stopped(self._stop, delay_s):
                return None


async def run_live(
    settings: Settings, publisher: TradeSink, stop: asyncio.Event,
    metrics: IngestMetrics | None = None,
) -> None:
    """Publish live Binance trades of ``settings.symbols`` until ``stop`` is set.

    Raises IngestError at start if a symbol is unknown or Binance REST is unreachable.
    """
    await BinanceIngestor(settings, publisher, metrics).run(stop)


async def probe_binance(settings: Settings) -> bool:
    """Whether the trade websocket accepts a connection within ``binance_connect_timeout_s``."""
    url = stream_url(settings)
    try:
        ws = await connect(url, open_timeout=settings.binance_connect_timeout_s)
    except (*_CONNECT_ERRORS, InvalidURI) as exc:
        log.info("Binance websocket %s unreachable: %r", url, exc)
        return False
    # The handshake was the whole test; a closing handshake could queue behind trades.
    ws.transport.abort()
    return True
