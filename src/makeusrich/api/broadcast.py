"""Fan-out of live events from ONE Redis pub/sub subscription to every SSE client.

Each client gets a bounded queue. A client that cannot keep up (queue full) is dropped:
its queue is emptied and closed, its SSE generator ends once its pending send is done, and
the browser reconnects with ``Last-Event-ID`` to replay what it missed from the events
stream. Slow clients therefore never delay the others. A client that stopped reading would
hold that send for ever: its connection is dropped by the kernel after
``Settings.api_send_timeout_s`` (see :func:`makeusrich.api.listen_socket`).

If the pub/sub connection drops, the broadcaster reconnects and replays the events stream
after the last id it dispatched, so live clients see no gap and no duplicate.
"""

import asyncio
import contextlib
import logging
from typing import Final

from redis.exceptions import RedisError

from makeusrich.core.metrics import ApiMetrics
from makeusrich.core.store import (
    RedisStore,
    StoredEvent,
    format_stream_id,
    parse_event_message,
    parse_stream_id,
)

__all__ = ["Broadcaster", "Subscription"]

log = logging.getLogger(__name__)

_MIN_BACKOFF_S: Final = 0.1
_MAX_BACKOFF_S: Final = 5.0
# get_message wakes up this often so redis-py can run its idle health check.
_POLL_S: Final = 1.0
_CATCH_UP_PAGE: Final = 1_000


class Subscription:
    """One client's bounded queue. :meth:`get` returns None once the subscription is closed
    (queue overflow or broadcaster shutdown)."""

    def __init__(self, maxsize: int) -> None:
        self._queue: asyncio.Queue[StoredEvent | None] = asyncio.Queue(maxsize=maxsize)
        self.closed = False
        self.overflowed = False

    async def get(self) -> StoredEvent | None:
        if self.closed and self._queue.empty():
            return None
        return await self._queue.get()

    async def get_many(self, limit: int) -> list[StoredEvent]:
        """Waits for the next event, then takes those already queued behind it (at most
        ``limit`` in all); [] once the subscription is closed. Candles of many symbols close
        together: one write per burst instead of one per event."""
        first = await self.get()
        if first is None:
            return []
        events = [first]
        while len(events) < limit and not self._queue.empty():
            event = self._queue.get_nowait()
            if event is None:  # closed meanwhile: keep the end marker for the next call
                self._queue.put_nowait(None)
                break
            events.append(event)
        return events

    def _offer(self, event: StoredEvent) -> bool:
        """Queue an event; False when the queue is full."""
        try:
            self._queue.put_nowait(event)
        except asyncio.QueueFull:
            return False
        return True

    def _close(self) -> None:
        if self.closed:
            return
        self.closed = True
        # Make room for the end marker: a closed client resumes from the stream anyway.
        while not self._queue.empty():
            self._queue.get_nowait()
        self._queue.put_nowait(None)


class Broadcaster:
    """Owns the process's single subscription to ``keys.events_channel``."""

    def __init__(self, store: RedisStore, *, queue_max: int,
                 metrics: ApiMetrics | None = None) -> None:
        self._store = store
        self._metrics = metrics
        self._channel = store.keys.events_channel
        self._queue_max = queue_max
        self._subscribers: set[Subscription] = set()
        self._task: asyncio.Task[None] | None = None
        self._ready = asyncio.Event()
        self._first_attempt_done = asyncio.Event()
        # Newest event handed to subscribers: (re)connects replay the stream after it.
        self._last_key: tuple[int, int] | None = None
        self.reconnects = 0  # subscriptions lost or failed, each followed by a retry

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
        if self._task is None:
            self._task = asyncio.create_task(self._run(), name="mur-broadcaster")
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._first_attempt_done.wait(), wait_s)

    async def wait_ready(self, timeout_s: float) -> None:
        """Wait until the subscription is live; raises TimeoutError after ``timeout_s``."""
        await asyncio.wait_for(self._ready.wait(), timeout_s)

    async def stop(self) -> None:
        """Stop listening and end every client stream."""
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        for subscription in list(self._subscribers):
            self.unsubscribe(subscription)

    def subscribe(self) -> Subscription:
        subscription = Subscription(self._queue_max)
        self._subscribers.add(subscription)
        return subscription

    def unsubscribe(self, subscription: Subscription) -> None:
        self._subscribers.discard(subscription)
        subscription._close()

    def _dispatch(self, event: StoredEvent) -> None:
        if self._last_key is not None and event.key <= self._last_key:
            return  # already delivered (catch-up and pub/sub overlap)
        self._last_key = event.key
        for subscription in list(self._subscribers):
            if not subscription._offer(event):
                log.warning("SSE client too slow (%d queued events); disconnecting it",
                            self._queue_max)
                subscription.overflowed = True
                self.unsubscribe(subscription)
                if self._metrics is not None:
                    self._metrics.sse_clients_dropped.inc()

    async def _catch_up(self) -> None:
        """Dispatch events written after the last one dispatched (while unsubscribed)."""
        assert self._last_key is not None
        while True:
            page = await self._store.events_after(format_stream_id(self._last_key),
                                                  _CATCH_UP_PAGE)
            for event in page:
                self._dispatch(event)
            if len(page) < _CATCH_UP_PAGE:
                return

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
                    message = await pubsub.get_message(
                        ignore_subscribe_messages=True, timeout=_POLL_S
                    )
                    if message is None or message.get("type") != "message":
                        continue
                    try:
                        event = parse_event_message(message["data"])
                    except ValueError as exc:
                        log.error("ignoring malformed event message: %s", exc)
                        continue
                    self._dispatch(event)
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
                with contextlib.suppress(RedisError, OSError):
                    await pubsub.aclose()
            await asyncio.sleep(backoff_s)
            backoff_s = min(backoff_s * 2, _MAX_BACKOFF_S)
