"""``GET /v1/stream``: Server-Sent Events of new candles and predictions.

Resuming with ``Last-Event-ID`` delivers exactly the missed events: the client subscribes
to the broadcaster *first*, then reads the backlog from the Redis events stream, then
drains live events while skipping every id it has already passed. An event published
while the backlog is read is thus in the backlog, in the live queue, or both, and is sent
once.
"""

import asyncio
import functools
import logging
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Annotated, Final

import anyio
from fastapi import APIRouter, Depends, HTTPException, Query
from redis.exceptions import RedisError
from sse_starlette import EventSourceResponse, ServerSentEvent

from makeusrich.api.broadcast import Broadcaster, Subscription
from makeusrich.api.deps import (
    BroadcasterDep,
    LastEventIdDep,
    OptionalIntervalDep,
    SettingsDep,
    StoreDep,
    SymbolsDep,
    unprocessable,
)
from makeusrich.api.routes.metrics import ApiMetricsDep
from makeusrich.core.metrics import ApiMetrics
from makeusrich.core.store import RedisStore, StoredEvent, parse_stream_id

__all__ = ["EVENT_TYPES", "router"]

log = logging.getLogger(__name__)

router = APIRouter(tags=["stream"])

EVENT_TYPES: Final = ("candle", "prediction", "alert", "drift")
_BACKLOG_PAGE: Final = 500
# Events written to a client in one send when they are already queued (a burst of closes).
_BATCH_MAX: Final = 500
# On server shutdown streams end by themselves (so the response completes cleanly) and
# are cancelled after this long; it must stay below serve()'s graceful-shutdown timeout.
_SHUTDOWN_GRACE_S: Final = 1.0


@dataclass(frozen=True, slots=True)
class _Filter:
    symbols: frozenset[str] | None
    types: frozenset[str]
    interval: str | None

    def accepts(self, event: StoredEvent) -> bool:
        # Alerts (e.g. a rejected model) concern the whole service: no symbol filter drops them.
        return event.type in self.types and (
            not event.symbol
            or (
                (self.symbols is None or event.symbol in self.symbols)
                and (self.interval is None or event.interval == self.interval)
            )
        )


def _events_query(
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


@functools.lru_cache(maxsize=4_096)
def _encoded(event: StoredEvent) -> bytes:
    """The SSE frame of ``event``, encoded once for all the clients it goes to (the
    broadcaster hands every queue the same object)."""
    return ServerSentEvent(data=event.data.decode(), id=event.id, event=event.type).encode()


async def _end_on_shutdown(
    shutdown: anyio.Event, broadcaster: Broadcaster, subscription: Subscription
) -> None:
    await shutdown.wait()
    broadcaster.unsubscribe(subscription)  # its get() now returns None: the stream ends


def _accepted(events: list[StoredEvent], event_filter: _Filter) -> list[StoredEvent]:
    return [event for event in events if event_filter.accepts(event)]


def _frames(events: list[StoredEvent]) -> bytes:
    """``events`` as one chunk: one write for a burst of events."""
    return b"".join(_encoded(event) for event in events)


async def _event_stream(
    store: RedisStore,
    broadcaster: Broadcaster,
    event_filter: _Filter,
    resume_from: str | None,
    shutdown: anyio.Event,
    metrics: ApiMetrics,
) -> AsyncIterator[bytes]:
    # Counted after each yield returns, i.e. once sse-starlette has written the event and
    # asks for the next: an event the client never got (it left) is not counted.
    sent = {kind: metrics.sse_events_sent.labels(kind) for kind in EVENT_TYPES}
    metrics.sse_clients.inc()
    subscription = broadcaster.subscribe()
    watcher = asyncio.create_task(_end_on_shutdown(shutdown, broadcaster, subscription))
    try:
        last_key: tuple[int, int] | None = None
        if resume_from is not None:
            cursor = resume_from
            last_key = parse_stream_id(resume_from)
            while True:
                try:
                    page = await store.events_after(cursor, _BACKLOG_PAGE)
                except RedisError as exc:
                    # Headers are already sent: end the stream; the client retries later.
                    log.warning("cannot read the SSE backlog: %r", exc)
                    metrics.redis_errors.labels("stream").inc()
                    return
                if page:
                    last_key = page[-1].key
                    if accepted := _accepted(page, event_filter):
                        yield _frames(accepted)
                        for event in accepted:
                            sent[event.type].inc()
                if len(page) < _BACKLOG_PAGE:
                    break
                cursor = page[-1].id
        while True:
            events = await subscription.get_many(_BATCH_MAX)
            if not events:
                return  # overflowed or shutting down: the client resumes with Last-Event-ID
            if last_key is not None:
                threshold = last_key
                events = [e for e in events if e.key > threshold]  # sent from the backlog
            if events:
                last_key = events[-1].key
                if accepted := _accepted(events, event_filter):
                    yield _frames(accepted)
                    for event in accepted:
                        sent[event.type].inc()
    finally:
        watcher.cancel()
        broadcaster.unsubscribe(subscription)
        metrics.sse_clients.dec()


@router.get(
    "/stream",
    response_class=EventSourceResponse,
    responses={
        200: {
            "content": {"text/event-stream": {}},
            "description": "SSE: `id` = events-stream id, `event` = candle|prediction, "
            "`data` = the record JSON",
        },
        400: {"description": "malformed Last-Event-ID"},
        404: {"description": "unknown symbol, or interval not built here"},
        **unprocessable("an unsupported interval or event type"),
        503: {"description": "the live-event subscription to Redis is down"},
    },
)
async def stream(
    settings: SettingsDep,
    store: StoreDep,
    broadcaster: BroadcasterDep,
    symbols: SymbolsDep,
    interval: OptionalIntervalDep,
    events: Annotated[frozenset[str], Depends(_events_query)],
    resume_from: LastEventIdDep,
    metrics: ApiMetricsDep,
) -> EventSourceResponse:
    """Live events; with ``Last-Event-ID`` first the events missed since that id.

    Heartbeat comments keep idle connections open. Without ``Last-Event-ID`` only events
    from now on are sent.
    """
    if not broadcaster.ready:
        raise HTTPException(503, "live events unavailable: the Redis subscription is down")
    event_filter = _Filter(
        symbols=None if symbols is None else frozenset(symbols),
        types=events,
        interval=interval,
    )
    shutdown = anyio.Event()
    return EventSourceResponse(
        _event_stream(store, broadcaster, event_filter, resume_from, shutdown, metrics),
        ping=settings.sse_heartbeat_s,
        # A client that accepts nothing for this long is dropped (on Linux the kernel does
        # it first, see makeusrich.api.listen_socket).
        send_timeout=settings.api_send_timeout_s,
        shutdown_event=shutdown,
        shutdown_grace_period=_SHUTDOWN_GRACE_S,
    )
