"""The SSE fan-out log, broker-free: bursts shared by every client, one wake-up and one
chunk per client per burst, slow clients dropped, one heartbeat timer for all, resumes skip
what the backlog sent."""

import asyncio
from types import SimpleNamespace
from typing import cast

import pytest
from fastapi import HTTPException

from makeusrich.api.broadcast import (
    DEFAULT_HORIZONS,
    Broadcaster,
    Burst,
    EventFilter,
    Subscription,
)
from makeusrich.api.routes.stream import _horizons_query, _live_chunk
from makeusrich.core.metrics import ApiMetrics
from makeusrich.core.store import RedisStore, StoredEvent

ALL = EventFilter(symbols=None, types=frozenset({"candle", "prediction"}), interval=None)
BTC_CANDLES = EventFilter(symbols=frozenset({"BTCUSDT"}), types=frozenset({"candle"}),
                          interval=None)


def _event(n: int, kind: str = "candle", symbol: str = "BTCUSDT",
           horizon: int | None = None) -> StoredEvent:
    data = b'{"n":%d}' % n if horizon is None else b'{"n":%d,"horizon":%d}' % (n, horizon)
    return StoredEvent(f"{1000 + n}-0", kind, symbol, "1m", data)


def _broadcaster(queue_max: int = 100, metrics: ApiMetrics | None = None) -> Broadcaster:
    # Only the channel name is read from the store until the broadcaster is started.
    store = SimpleNamespace(keys=SimpleNamespace(events_channel="events"))
    return Broadcaster(cast(RedisStore, store), queue_max=queue_max, heartbeat_s=0.01,
                       metrics=metrics)


async def _taken(subscription: Subscription) -> list[Burst]:
    bursts = await subscription.next()
    assert bursts is not None, "the subscription was closed"
    return bursts


def _ids(body: bytes) -> list[str]:
    return [line[4:] for line in body.decode().splitlines() if line.startswith("id: ")]


async def test_a_waiting_client_gets_the_burst_in_one_wake_up() -> None:
    broadcaster = _broadcaster()
    subscription = broadcaster.subscribe(ALL)
    waiter = asyncio.create_task(subscription.next())
    await asyncio.sleep(0)
    assert not waiter.done()
    broadcaster._append([_event(1), _event(2, "prediction"), _event(3)])
    bursts = await asyncio.wait_for(waiter, 1)
    assert bursts is not None and [len(b.events) for b in bursts] == [3]
    chunk = bursts[0].chunk(ALL)
    assert _ids(chunk.body) == ["1001-0", "1002-0", "1003-0"]
    assert dict(chunk.counts) == {"candle": 2, "prediction": 1}


async def test_a_busy_client_takes_every_burst_since_it_last_read_at_once() -> None:
    broadcaster = _broadcaster()
    subscription = broadcaster.subscribe(ALL)
    broadcaster._append([_event(1)])
    broadcaster._append([_event(2)])
    broadcaster._append([_event(3)])
    bursts = await _taken(subscription)
    assert [b.events[0].id for b in bursts] == ["1001-0", "1002-0", "1003-0"]
    assert _ids(_live_chunk(bursts, ALL, None).body) == ["1001-0", "1002-0", "1003-0"]


async def test_clients_with_the_same_filter_share_one_chunk() -> None:
    broadcaster = _broadcaster()
    first, second = broadcaster.subscribe(ALL), broadcaster.subscribe(ALL)
    broadcaster._append([_event(1), _event(2, symbol="ETHUSDT"), _event(3, "prediction")])
    [burst_a], [burst_b] = await _taken(first), await _taken(second)
    assert burst_a is burst_b
    same_query = EventFilter(symbols=frozenset({"BTCUSDT"}), types=frozenset({"candle"}),
                             interval=None)
    assert burst_a.chunk(BTC_CANDLES) is burst_b.chunk(same_query)
    assert _ids(burst_a.chunk(BTC_CANDLES).body) == ["1001-0"]


async def test_a_client_subscribed_later_starts_at_the_next_burst() -> None:
    broadcaster = _broadcaster()
    broadcaster._append([_event(1)])
    late = broadcaster.subscribe(ALL)
    broadcaster._append([_event(2)])
    assert [b.events[0].id for b in await _taken(late)] == ["1002-0"]


async def test_a_client_further_behind_than_the_log_is_dropped_the_others_are_not() -> None:
    metrics = ApiMetrics()
    broadcaster = _broadcaster(queue_max=4, metrics=metrics)
    stuck, reader = broadcaster.subscribe(ALL), broadcaster.subscribe(ALL)
    for n in range(4):
        broadcaster._append([_event(n)])
        assert len(await _taken(reader)) == 1
    assert not stuck.closed  # exactly queue_max behind: still in the log
    broadcaster._append([_event(4)])
    assert stuck.closed and stuck.overflowed
    assert await stuck.next() is None
    assert [b.events[0].id for b in await _taken(reader)] == ["1004-0"]
    assert not reader.closed
    assert broadcaster.subscriber_count == 1
    assert metrics.sse_clients_dropped._value.get() == 1


async def test_unsubscribe_ends_a_waiting_client() -> None:
    broadcaster = _broadcaster()
    subscription = broadcaster.subscribe(ALL)
    waiter = asyncio.create_task(subscription.next())
    await asyncio.sleep(0)
    broadcaster.unsubscribe(subscription)
    assert await asyncio.wait_for(waiter, 1) is None


def test_events_already_taken_are_not_logged_again() -> None:
    broadcaster = _broadcaster()
    assert [e.id for e in broadcaster._new([_event(1), _event(2)])] == ["1001-0", "1002-0"]
    # A catch-up page overlapping what pub/sub delivered: only the newer event is kept.
    assert [e.id for e in broadcaster._new([_event(2), _event(3)])] == ["1003-0"]


async def test_after_a_resume_only_events_past_the_backlog_are_sent() -> None:
    broadcaster = _broadcaster()
    subscription = broadcaster.subscribe(ALL)
    broadcaster._append([_event(1), _event(2)])
    broadcaster._append([_event(3), _event(4, "prediction"), _event(5)])
    bursts = await _taken(subscription)
    # The backlog went up to event 3: the first burst is skipped, the second cut after 3.
    chunk = _live_chunk(bursts, ALL, _event(3).key)
    assert _ids(chunk.body) == ["1004-0", "1005-0"]
    assert dict(chunk.counts) == {"prediction": 1, "candle": 1}
    assert _live_chunk(bursts, BTC_CANDLES, _event(3).key).counts == (("candle", 1),)


async def test_heartbeats_wake_idle_clients_with_no_bursts() -> None:
    broadcaster = _broadcaster()
    idle = broadcaster.subscribe(ALL)
    heartbeats = asyncio.create_task(broadcaster._heartbeats())
    try:
        assert await asyncio.wait_for(idle.next(), 1) == []  # a heartbeat, nothing else
        broadcaster._append([_event(1)])
        bursts = await asyncio.wait_for(idle.next(), 1)
        assert bursts is not None and [b.events[0].id for b in bursts] == ["1001-0"]
    finally:
        heartbeats.cancel()


async def test_end_streams_closes_every_subscription() -> None:
    broadcaster = _broadcaster()
    subscriptions = [broadcaster.subscribe(ALL) for _ in range(3)]
    broadcaster.end_streams()
    assert all(s.closed for s in subscriptions) and broadcaster.subscriber_count == 0
    assert await subscriptions[0].next() is None


async def test_clients_without_events_in_a_burst_are_not_woken_and_not_dropped() -> None:
    broadcaster = _broadcaster(queue_max=3)
    candles_only = broadcaster.subscribe(BTC_CANDLES)
    waiter = asyncio.create_task(candles_only.next())
    await asyncio.sleep(0)
    for n in range(5):  # more than the log holds, none of them for this client
        broadcaster._append([_event(n, "prediction")])
        await asyncio.sleep(0)
    assert not waiter.done() and not candles_only.closed
    broadcaster._append([_event(5)])
    bursts = await asyncio.wait_for(waiter, 1)
    assert bursts is not None
    assert _ids(_live_chunk(bursts, BTC_CANDLES, None).body) == ["1005-0"]


def _with_horizons(horizons: frozenset[int] | None) -> EventFilter:
    return EventFilter(symbols=None, types=frozenset({"candle", "prediction"}), interval=None,
                       horizons=horizons)


async def test_predictions_are_filtered_by_horizon_horizon_1_by_default() -> None:
    assert ALL.horizons == DEFAULT_HORIZONS == frozenset({1})
    broadcaster = _broadcaster()
    default = broadcaster.subscribe(ALL)
    some = broadcaster.subscribe(_with_horizons(frozenset({1, 5})))
    every = broadcaster.subscribe(_with_horizons(None))
    broadcaster._append([
        _event(1), _event(2, "prediction"), _event(3, "prediction", horizon=1),
        _event(4, "prediction", horizon=5), _event(5, "prediction", horizon=15),
    ])
    [burst] = await _taken(default)
    # A prediction without a horizon in its JSON (written before horizons) is horizon 1.
    assert _ids(burst.chunk(ALL).body) == ["1001-0", "1002-0", "1003-0"]
    assert _ids(burst.chunk(some.filter).body) == ["1001-0", "1002-0", "1003-0", "1004-0"]
    assert _ids(burst.chunk(every.filter).body) == [
        "1001-0", "1002-0", "1003-0", "1004-0", "1005-0"]
    # Clients asking the same horizons share the chunk; asking 1 is asking the default.
    assert burst.chunk(_with_horizons(frozenset({1, 5}))) is burst.chunk(some.filter)
    assert burst.chunk(_with_horizons(frozenset({1}))) is burst.chunk(ALL)
    # After a resume the filter still applies.
    assert _ids(_live_chunk([burst], some.filter, _event(2).key).body) == ["1003-0", "1004-0"]
    assert _ids(_live_chunk([burst], ALL, _event(2).key).body) == ["1003-0"]


async def test_a_burst_of_other_horizons_does_not_wake_a_default_client() -> None:
    broadcaster = _broadcaster()
    default = broadcaster.subscribe(ALL)
    waiter = asyncio.create_task(default.next())
    await asyncio.sleep(0)
    broadcaster._append([_event(1, "prediction", horizon=5)])
    await asyncio.sleep(0)
    assert not waiter.done()
    broadcaster._append([_event(2, "prediction", horizon=1)])
    bursts = await asyncio.wait_for(waiter, 1)
    assert bursts is not None
    assert _ids(_live_chunk(bursts, ALL, None).body) == ["1002-0"]


async def test_the_horizons_parameter() -> None:
    assert await _horizons_query(None) == DEFAULT_HORIZONS
    assert await _horizons_query([" ", ","]) == DEFAULT_HORIZONS
    assert await _horizons_query(["1"]) is DEFAULT_HORIZONS
    assert await _horizons_query(["1,5, 15", "60", "5"]) == frozenset({1, 5, 15, 60})
    assert await _horizons_query(["5"]) == frozenset({5})
    assert await _horizons_query(["1,ALL"]) is None
    assert await _horizons_query(["1440"]) == frozenset({1440})
    for bad in ("0", "-5", "1441", "five", "1.5", "\u00b2"):
        with pytest.raises(HTTPException) as raised:
            await _horizons_query([f"1,{bad}"])
        assert raised.value.status_code == 422
        assert raised.value.detail == (
            f"invalid horizon '{bad}'; use whole numbers of candles from 1 to 1440, "
            "comma-separated or repeated, or 'all'")
