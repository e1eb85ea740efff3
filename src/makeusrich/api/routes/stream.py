"""``GET /v1/stream``: Server-Sent Events of new candles and predictions.

Predictions are sent for horizon 1 only (the next candle, as before predictions had a
horizon) unless ``horizons`` names others; the filter is part of the client's
:class:`EventFilter`, so clients asking the same still share each burst's encoded frames.

Resuming with ``Last-Event-ID`` delivers exactly the missed events: the client subscribes
to the broadcaster *first*, then reads the backlog from the Redis events stream, then
takes live bursts while skipping every id it has already passed. An event published
while the backlog is read is thus in the backlog, in the live log, or both, and is sent
once.

The response is :class:`_LiveEvents`, not sse-starlette's ``EventSourceResponse`` (which
the backtest progress stream still uses): that one runs four tasks per connection and an
anyio cancel scope around every send, and measured at 1,000 clients (``bench.sse_latency``)
its path cost ~55 us a send, enough to hold the event loop for ~60 ms a burst. Here one
task writes (with the server's own send, past the middlewares), one more waits for the
disconnect, heartbeats come from the broadcaster's single timer, and the kernel drops a
client that stopped reading (``TCP_USER_TIMEOUT``, see
:func:`makeusrich.api.listen_socket`). Frames are still sse-starlette's ``ServerSentEvent``
encoding.
"""

import asyncio
import logging
from collections import Counter
from typing import Annotated, Final

from fastapi import APIRouter, Depends, FastAPI, HTTPException, Query
from redis.exceptions import RedisError
from sse_starlette import ServerSentEvent
from starlette.responses import Response
from starlette.types import ASGIApp, Receive, Scope, Send

from makeusrich.api.broadcast import (
    DEFAULT_HORIZONS,
    Broadcaster,
    Burst,
    Chunk,
    EventFilter,
    Subscription,
    chunk_of,
)
from makeusrich.api.deps import (
    MAX_HORIZON,
    BroadcasterDep,
    LastEventIdDep,
    OptionalIntervalDep,
    StoreDep,
    SymbolsDep,
    unprocessable,
)
from makeusrich.api.routes.metrics import ApiMetricsDep
from makeusrich.core.metrics import ApiMetrics
from makeusrich.core.store import RedisStore, parse_stream_id

__all__ = ["EVENT_TYPES", "install", "router"]

log = logging.getLogger(__name__)

router = APIRouter(tags=["stream"])

EVENT_TYPES: Final = ("candle", "prediction", "alert", "drift")
_BACKLOG_PAGE: Final = 500
_HEARTBEAT: Final = ServerSentEvent(comment="ping").encode()
_SERVER_SEND: Final = "mur.server_send"


class _KeepServerSend:
    """Puts the server's own ``send`` in the scope, for :class:`_LiveEvents`' body chunks.

    The middlewares inside act on the response's start and end only, yet each would pass
    every chunk on through a frame of its own (~1 us each, per chunk and client). The start
    and the end of a stream still go through them all.
    """

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        scope[_SERVER_SEND] = send
        await self.app(scope, receive, send)


def install(app: FastAPI) -> None:
    """Add :class:`_KeepServerSend`; call it after every other middleware (outermost)."""
    app.add_middleware(_KeepServerSend)


async def _events_query(
    events: Annotated[
        str | None,
        Query(description="comma-separated event types: candle, prediction, alert, drift; "
              "default: all"),
    ] = None,
) -> frozenset[str]:
    if events is None or not events.strip():
        return frozenset(EVENT_TYPES)
    wanted = frozenset(part.strip().lower() for part in events.split(",") if part.strip())
    unknown = sorted(wanted - set(EVENT_TYPES))
    if unknown:
        raise HTTPException(
            422, f"unknown event type '{unknown[0]}'; use one of {', '.join(EVENT_TYPES)}"
        )
    return wanted


_HORIZONS_HELP: Final = (f"use whole numbers of candles from 1 to {MAX_HORIZON}, "
                         "comma-separated or repeated, or 'all'")


async def _horizons_query(
    horizons: Annotated[
        list[str] | None,
        Query(description="prediction horizons to send, in candles ahead: comma-separated "
              "and/or repeated (e.g. `1,5,15,60`), or `all`; default: 1 only (the next "
              "candle). Other event types are not filtered by it"),
    ] = None,
) -> frozenset[int] | None:
    """The horizons asked for; None for all of them."""
    parts = [part.strip() for value in horizons or () for part in value.split(",")]
    parts = [part for part in parts if part]
    if not parts:
        return DEFAULT_HORIZONS
    if any(part.lower() == "all" for part in parts):
        return None
    wanted: set[int] = set()
    for part in parts:
        # isascii: str.isdigit() also takes digits int() refuses (e.g. superscripts).
        value = int(part) if part.isascii() and part.isdigit() else 0
        if not 1 <= value <= MAX_HORIZON:
            raise HTTPException(422, f"invalid horizon '{part}'; {_HORIZONS_HELP}")
        wanted.add(value)
    return DEFAULT_HORIZONS if wanted == DEFAULT_HORIZONS else frozenset(wanted)


def _live_chunk(bursts: list[Burst], event_filter: EventFilter,
                resume_key: tuple[int, int] | None) -> Chunk:
    """The frames of ``bursts`` for this client, skipping what the backlog sent (events up
    to ``resume_key``). Only the first bursts after a resume are filtered one by one; the
    rest are the chunks shared by every client with the same filter."""
    if resume_key is None or bursts[0].first_key > resume_key:
        chunks = [burst.chunk(event_filter) for burst in bursts]
        if len(chunks) == 1:
            return chunks[0]
        counts: Counter[str] = Counter()
        for chunk in chunks:
            counts.update(dict(chunk.counts))
        return Chunk(b"".join(chunk.body for chunk in chunks), tuple(counts.items()))
    return chunk_of(event for burst in bursts for event in burst.events
                    if event.key > resume_key and event_filter.accepts(event))


class _LiveEvents(Response):
    """One client's SSE stream: the backlog after ``Last-Event-ID``, then live bursts, one
    write each, until the client leaves, falls behind or the server stops."""

    media_type = "text/event-stream"

    def __init__(self, store: RedisStore, broadcaster: Broadcaster, event_filter: EventFilter,
                 resume_from: str | None, metrics: ApiMetrics) -> None:
        # No super().__init__(): it would set a body, hence a Content-Length.
        self.status_code = 200
        self.background = None
        self.init_headers({"Cache-Control": "no-store", "Connection": "keep-alive",
                           "X-Accel-Buffering": "no"})
        self._store = store
        self._broadcaster = broadcaster
        self._filter = event_filter
        self._resume_from = resume_from
        self._metrics = metrics
        self._sent = {kind: metrics.sse_events_sent.labels(kind) for kind in EVENT_TYPES}

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        # Subscribed before the backlog is read: nothing is missed in between.
        subscription = self._broadcaster.subscribe(self._filter)
        self._metrics.sse_clients.inc()
        # The writes run in a task of their own: waking this request's task would resume
        # every middleware's frame on the way down (~15), for each burst and client.
        streaming = asyncio.ensure_future(
            self._stream(send, scope.get(_SERVER_SEND, send), subscription))
        left = asyncio.ensure_future(self._until_disconnect(receive, subscription))
        try:
            await streaming
        finally:
            streaming.cancel()
            left.cancel()
            self._broadcaster.unsubscribe(subscription)
            self._metrics.sse_clients.dec()

    async def _stream(self, send: Send, body_send: Send, subscription: Subscription) -> None:
        """``body_send`` writes the chunks: the server's own send, past the middlewares."""
        await send({"type": "http.response.start", "status": self.status_code,
                    "headers": self.raw_headers})
        resume_key = await self._backlog(body_send, subscription)
        while (bursts := await subscription.next()) is not None:
            if not bursts:
                await self._write(body_send, Chunk(_HEARTBEAT, ()))
                continue
            chunk = _live_chunk(bursts, self._filter, resume_key)
            if resume_key is not None and bursts[-1].last_key > resume_key:
                resume_key = None  # past the backlog: no more filtering one by one
            if chunk.body:
                await self._write(body_send, chunk)
        # Left, dropped or shutting down: the client resumes with Last-Event-ID.
        await send({"type": "http.response.body", "body": b"", "more_body": False})

    async def _backlog(self, send: Send, subscription: Subscription) -> tuple[int, int] | None:
        """Send the events after ``Last-Event-ID``; the key of the last one read."""
        if self._resume_from is None:
            return None
        cursor, resume_key = self._resume_from, parse_stream_id(self._resume_from)
        while not subscription.closed:
            try:
                page = await self._store.events_after(cursor, _BACKLOG_PAGE)
            except RedisError as exc:
                # Headers are already sent: end the stream; the client retries later.
                log.warning("cannot read the SSE backlog: %r", exc)
                self._metrics.redis_errors.labels("stream").inc()
                self._broadcaster.unsubscribe(subscription)
                break
            if page:
                resume_key = page[-1].key
                chunk = chunk_of(e for e in page if self._filter.accepts(e))
                if chunk.body:
                    await self._write(send, chunk)
            if len(page) < _BACKLOG_PAGE:
                break
            cursor = page[-1].id
        return resume_key

    async def _write(self, send: Send, chunk: Chunk) -> None:
        await send({"type": "http.response.body", "body": chunk.body, "more_body": True})
        # Counted once written: events the client never got (it left) are not counted.
        for kind, count in chunk.counts:
            self._sent[kind].inc(count)

    async def _until_disconnect(self, receive: Receive, subscription: Subscription) -> None:
        while (await receive())["type"] != "http.disconnect":
            pass
        self._broadcaster.unsubscribe(subscription)  # wakes the stream, which then ends


@router.get(
    "/stream",
    response_class=_LiveEvents,
    status_code=200,
    responses={
        200: {
            "content": {"text/event-stream": {}},
            "description": "SSE: `id` = events-stream id, `event` = candle|prediction|alert|"
            "drift, `data` = the record JSON (a prediction's names its `horizon`)",
        },
        400: {"description": "malformed Last-Event-ID"},
        404: {"description": "unknown symbol, or interval not built here"},
        **unprocessable("an unsupported interval, event type or horizon"),
        503: {"description": "the live-event subscription to Redis is down"},
    },
)
async def stream(
    store: StoreDep,
    broadcaster: BroadcasterDep,
    symbols: SymbolsDep,
    interval: OptionalIntervalDep,
    events: Annotated[frozenset[str], Depends(_events_query)],
    horizons: Annotated[frozenset[int] | None, Depends(_horizons_query)],
    resume_from: LastEventIdDep,
    metrics: ApiMetricsDep,
) -> _LiveEvents:
    """Live events; with ``Last-Event-ID`` first the events missed since that id (those the
    filters take).

    Heartbeat comments keep idle connections open. Without ``Last-Event-ID`` only events
    from now on are sent. Predictions: horizon 1 only unless ``horizons`` says otherwise.
    """
    if not broadcaster.ready:
        raise HTTPException(503, "live events unavailable: the Redis subscription is down")
    event_filter = EventFilter(
        symbols=None if symbols is None else frozenset(symbols),
        types=events,
        interval=interval,
        horizons=horizons,
    )
    return _LiveEvents(store, broadcaster, event_filter, resume_from, metrics)
