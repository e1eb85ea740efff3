"""Fan-out of live events from ONE Redis pub/sub subscription to every SSE client.

The cost of a burst (candles of many symbols close together) is O(events + clients):

- the broadcaster reads what Redis published in bursts: it waits for a message, then takes
  every message already received behind it, and appends the burst once to a shared log;
- a client holds only its position in that log. Woken once per burst, it takes every burst
  after its position at once and writes them in one send;
- a burst's SSE bytes are built once per distinct filter (:meth:`Burst.chunk`), not once per
  client: a thousand clients with the same query share one ``bytes`` object.

The log keeps the last ``queue_max`` events. A client further behind than that (it is not
reading) is dropped: its stream ends once its pending send is done, and the browser
reconnects with ``Last-Event-ID`` to replay what it missed from the events stream. Slow
clients therefore never delay the others. A client that stopped reading would hold that
send for ever: its connection is dropped by the kernel after
``Settings.api_send_timeout_s`` (see :func:`makeusrich.api.listen_socket`).

If the pub/sub connection drops, the broadcaster reconnects and replays the events stream
after the last id it took, so live clients see no gap and no duplicate.
"""

import asyncio
import contextlib
import functools
import logging
from collections import Counter, deque
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Final

from redis.asyncio.client import PubSub
from redis.exceptions import RedisError
from sse_starlette import ServerSentEvent

from makeusrich.api.latest import LatestPredictions
from makeusrich.core.metrics import ApiMetrics
from makeusrich.core.store import (
    RedisStore,
    StoredEvent,
    format_stream_id,
    parse_event_message,
    parse_stream_id,
)

__all__ = ["DEFAULT_HORIZONS", "Broadcaster", "Burst", "Chunk", "EventFilter", "Subscription",
           "chunk_of"]

log = logging.getLogger(__name__)

_MIN_BACKOFF_S: Final = 0.1
_MAX_BACKOFF_S: Final = 5.0
# get_message wakes up this often so redis-py can run its idle health check.
_POLL_S: Final = 1.0
_CATCH_UP_PAGE: Final = 1_000
# Events in one burst at most: a client's single write stays a reasonable size.
_BURST_MAX: Final = 1_000


#: The prediction horizons a client gets unless it asks for others: the next candle only,
#: all there was before predictions had a horizon.
DEFAULT_HORIZONS: Final = frozenset({1})


@dataclass(frozen=True, slots=True)
class EventFilter:
    """What one client asked for; hashable, so that clients asking the same share chunks.

    ``horizons`` applies to predictions only (None: every horizon)."""

    symbols: frozenset[str] | None
    types: frozenset[str]
    interval: str | None
    horizons: frozenset[int] | None = DEFAULT_HORIZONS

    def accepts(self, event: StoredEvent) -> bool:
        # Alerts (e.g. a rejected model) concern the whole service: no symbol filter drops them.
        return event.type in self.types and (
            not event.symbol
            or (
                (self.symbols is None or event.symbol in self.symbols)
                and (self.interval is None or event.interval == self.interval)
                # StoredEvent.horizon was read from the JSON once, for every client.
                and (event.type != "prediction" or self.horizons is None
                     or event.horizon in self.horizons)
            )
        )


@dataclass(frozen=True, slots=True)
class Chunk:
    """SSE frames ready to write, and how many events of each type they hold (for metrics)."""

    body: bytes
    counts: tuple[tuple[str, int], ...]


@functools.lru_cache(maxsize=4_096)
def _frame(event: StoredEvent) -> bytes:
    # Cached: clients resuming together read the same backlog events.
    return ServerSentEvent(data=event.data.decode(), id=event.id, event=event.type).encode()


def chunk_of(events: Iterable[StoredEvent]) -> Chunk:
    """``events`` as one chunk of SSE frames."""
    events = list(events)
    return Chunk(b"".join(_frame(event) for event in events),
                 tuple(Counter(event.type for event in events).items()))


class Burst:
    """Events that arrived together, in stream order, shared by every client."""

    __slots__ = ("_chunks", "events", "first_key", "last_key", "seq")

    def __init__(self, seq: int, events: list[StoredEvent]) -> None:
        self.seq = seq
        self.events = events
        self.first_key = events[0].key
        self.last_key = events[-1].key
        self._chunks: dict[EventFilter, Chunk] = {}

    def chunk(self, event_filter: EventFilter) -> Chunk:
        """The frames of the events ``event_filter`` accepts, built once per filter."""
        chunk = self._chunks.get(event_filter)
        if chunk is None:
            chunk = chunk_of(e for e in self.events if event_filter.accepts(e))
            self._chunks[event_filter] = chunk
        return chunk


class Subscription:
    """One client's position in the broadcaster's log."""

    __slots__ = ("_broadcaster", "_cursor", "_loop", "_ping", "_waiter", "closed", "filter",
                 "overflowed")

    def __init__(self, broadcaster: "Broadcaster", event_filter: EventFilter,
                 cursor: int) -> None:
        self._broadcaster = broadcaster
        self.filter = event_filter
        self._cursor = cursor  # seq of the next burst to hand out
        # Looked up once: asyncio.get_running_loop() makes a getpid() system call each time
        # (Python 3.11), 10% of the API's CPU when it ran once per client and burst.
        self._loop = asyncio.get_running_loop()
        self._waiter: asyncio.Future[None] | None = None
        self._ping = False
        self.closed = False
        self.overflowed = False

    async def next(self) -> list[Burst] | None:
        """Every burst after the ones already returned, waiting for one if there is none;
        [] when a heartbeat is due instead, None once the subscription is closed (the
        client fell behind, went away, or the server is stopping)."""
        while not self.closed:
            bursts = self._broadcaster._bursts_from(self._cursor)
            if bursts:
                self._cursor = bursts[-1].seq + 1
                return bursts
            if self._ping:
                self._ping = False
                return []
            self._waiter = self._loop.create_future()
            self._broadcaster._waiting.setdefault(self.filter, []).append(self)
            try:
                await self._waiter
            finally:
                self._waiter = None
        return None

    def _wake(self) -> None:
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_result(None)

    def _close(self) -> None:
        self.closed = True
        self._wake()


class Broadcaster:
    """Owns the process's single subscription to ``keys.events_channel``."""

    def __init__(self, store: RedisStore, *, queue_max: int, heartbeat_s: float,
                 metrics: ApiMetrics | None = None) -> None:
        self._store = store
        self._heartbeat_s = heartbeat_s
        self._metrics = metrics
        self._channel = store.keys.events_channel
        self._queue_max = queue_max
        self._subscribers: set[Subscription] = set()
        # Subscriptions waiting for the next burst, by filter: woken once, then forgotten.
        self._waiting: dict[EventFilter, list[Subscription]] = {}
        self._log: deque[Burst] = deque()
        self._logged_events = 0
        self._next_seq = 0
        self._tasks: list[asyncio.Task[None]] = []
        self._ready = asyncio.Event()
        self._first_attempt_done = asyncio.Event()
        # Newest event taken: (re)connects replay the stream after it.
        self._last_key: tuple[int, int] | None = None
        self.reconnects = 0  # subscriptions lost or failed, each followed by a retry
        #: The newest predictions, kept from the events (for the polling endpoints).
        self.latest = LatestPredictions(store, live=lambda: self.ready)

    @property
    def subscriber_count(self) -> int:
        return len(self._subscribers)

    @property
    def ready(self) -> bool:
        """True while the pub/sub subscription is live."""
        return self._ready.is_set()

    async def start(self, wait_s: float = 5.0) -> None:
        """Start listening; waits (up to ``wait_s``) for the first connection attempt but does
        not fail if Redis is down: it keeps retrying, and /readyz reports Redis."""
        if not self._tasks:
            self._tasks = [asyncio.create_task(self._run(), name="mur-broadcaster"),
                           asyncio.create_task(self._heartbeats(), name="mur-sse-heartbeats")]
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._first_attempt_done.wait(), wait_s)

    async def wait_ready(self, timeout_s: float) -> None:
        """Wait until the subscription is live; raises TimeoutError after ``timeout_s``."""
        await asyncio.wait_for(self._ready.wait(), timeout_s)

    async def stop(self) -> None:
        """Stop listening and end every client stream."""
        tasks, self._tasks = self._tasks, []
        for task in tasks:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        self.end_streams()

    def end_streams(self) -> None:
        """End every client stream (the server is stopping: they would never end)."""
        for subscription in list(self._subscribers):
            self.unsubscribe(subscription)

    def subscribe(self, event_filter: EventFilter) -> Subscription:
        """A subscription to the bursts from now on, for the events ``event_filter`` takes."""
        subscription = Subscription(self, event_filter, self._next_seq)
        self._subscribers.add(subscription)
        return subscription

    def unsubscribe(self, subscription: Subscription) -> None:
        self._subscribers.discard(subscription)
        subscription._close()

    def _bursts_from(self, seq: int) -> list[Burst]:
        behind = self._next_seq - seq  # usually 1: the client was waiting for this burst
        if behind <= 0 or behind > len(self._log):  # nothing new, or trimmed (being dropped)
            return []
        return [self._log[-i] for i in range(behind, 0, -1)]

    def _append(self, events: list[StoredEvent]) -> None:
        """Log one burst and wake once every waiting client it has events for."""
        if not events:
            return
        self.latest.take(events)
        burst = Burst(self._next_seq, events)
        self._log.append(burst)
        self._next_seq += 1
        self._logged_events += len(events)
        trimmed = False
        while len(self._log) > 1 and self._logged_events > self._queue_max:
            self._logged_events -= len(self._log.popleft().events)
            trimmed = True
        if trimmed:
            self._drop_behind(self._log[0].seq)
        waiting, self._waiting = self._waiting, {}
        for event_filter, group in waiting.items():
            if burst.chunk(event_filter).body:
                for subscription in group:
                    subscription._wake()
            else:  # nothing for them (e.g. predictions to candle-only clients): not woken
                group = [s for s in group if not s.closed]
                for subscription in group:
                    subscription._cursor = burst.seq + 1
                if group:
                    self._waiting[event_filter] = group

    async def _heartbeats(self) -> None:
        """Every ``heartbeat_s``, a heartbeat for each idle client: one timer for all."""
        while True:
            await asyncio.sleep(self._heartbeat_s)
            waiting, self._waiting = self._waiting, {}
            for group in waiting.values():
                for subscription in group:
                    subscription._ping = True
                    subscription._wake()

    def _drop_behind(self, oldest_seq: int) -> None:
        """Drop clients whose next burst is no longer in the log: they stopped reading."""
        for subscription in [s for s in self._subscribers if s._cursor < oldest_seq]:
            log.warning("SSE client too slow (over %d events behind); disconnecting it",
                        self._queue_max)
            subscription.overflowed = True
            self.unsubscribe(subscription)
            if self._metrics is not None:
                self._metrics.sse_clients_dropped.inc()

    def _new(self, events: Iterable[StoredEvent]) -> list[StoredEvent]:
        """The events not taken yet (catch-up and pub/sub overlap), noting the newest."""
        fresh = []
        for event in events:
            if self._last_key is None or event.key > self._last_key:
                fresh.append(event)
                self._last_key = event.key
        return fresh

    async def _catch_up(self) -> None:
        """Log the events written after the last one taken (while unsubscribed)."""
        assert self._last_key is not None
        while True:
            page = await self._store.events_after(format_stream_id(self._last_key),
                                                  _CATCH_UP_PAGE)
            self._append(self._new(page))
            if len(page) < _CATCH_UP_PAGE:
                return

    async def _read_burst(self, pubsub: PubSub) -> list[StoredEvent]:
        """Waits (up to ``_POLL_S``) for a message, then takes those already received."""
        events: list[StoredEvent] = []
        message = await pubsub.get_message(ignore_subscribe_messages=True, timeout=_POLL_S)
        while message is not None:
            if message.get("type") == "message":
                try:
                    events.append(parse_event_message(message["data"]))
                except ValueError as exc:
                    log.error("ignoring malformed event message: %s", exc)
            if len(events) >= _BURST_MAX:
                break
            message = await pubsub.get_message(ignore_subscribe_messages=True, timeout=0)
        return self._new(events)

    async def _run(self) -> None:
        backoff_s = _MIN_BACKOFF_S
        while True:
            pubsub = self._store.client.pubsub(ignore_subscribe_messages=True)
            try:
                if self._last_key is None:
                    # First connect: live starts at the current top. Read it before
                    # subscribing so that anything published in between is caught up.
                    top = await self._store.last_event_id()
                    self._last_key = (0, 0) if top is None else parse_stream_id(top)
                # Subscribe first, then catch up: nothing published in between is lost.
                await pubsub.subscribe(self._channel)
                await self._catch_up()
                self._ready.set()
                self._first_attempt_done.set()
                backoff_s = _MIN_BACKOFF_S
                while True:
                    self._append(await self._read_burst(pubsub))
            except (RedisError, OSError) as exc:
                self._first_attempt_done.set()
                self.reconnects += 1
                if self._metrics is not None:
                    self._metrics.redis_errors.labels("subscription").inc()
                log.warning("events subscription lost (%s); retrying in %.1fs", exc, backoff_s)
            except Exception:
                # A bug must not silently end live events for every client: log and retry.
                self._first_attempt_done.set()
                self.reconnects += 1
                log.exception("broadcaster failed; retrying in %.1fs", backoff_s)
            finally:
                self._ready.clear()
                self.latest.forget()
                with contextlib.suppress(RedisError, OSError):
                    await pubsub.aclose()
            await asyncio.sleep(backoff_s)
            backoff_s = min(backoff_s * 2, _MAX_BACKOFF_S)
