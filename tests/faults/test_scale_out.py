"""Scale-out: `mur worker` processes of one group share the trades partitions; one joining
and one killed while trades flow change nothing in what is stored."""

import itertools
import threading
import time
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import msgspec
import pytest
import redis

from kit.broker import Broker, on_both_brokers
from kit.builders import random_trades
from kit.worker import (
    Outputs,
    event_counts,
    expected_events,
    group_stats,
    namespaced_settings,
    reference_outputs,
    stored_outputs,
    topic_records,
    wait_until,
    without_wall_clock,
    worker_processes,
    worker_stats,
)
from makeusrich.core.embedded import EmbeddedService
from makeusrich.core.schemas import EndOfStream, Trade
from makeusrich.core.settings import Settings
from makeusrich.stream.publisher import TradePublisher

pytestmark = [pytest.mark.slow, pytest.mark.integration, pytest.mark.faults, on_both_brokers]

# Keyed by symbol, these four land on the four partitions of the trades topic (asserted).
SYMBOLS = ("XRPUSDT", "ETHUSDT", "BTCUSDT", "BNBUSDT")


class _Feed(threading.Thread):
    """Publishes ``messages`` in small batches at a steady pace; at each gate (a message
    index) it waits until the test opens it, so that trades keep flowing after each step
    of the test."""

    def __init__(self, settings: Settings, messages: Sequence[Trade | EndOfStream],
                 gates: Sequence[int]) -> None:
        super().__init__(name="trade-feed", daemon=True)
        self.settings, self.messages = settings, messages
        self.gates = {index: threading.Event() for index in gates}
        self.error: BaseException | None = None

    def open(self, gate: int) -> None:
        self.gates[gate].set()

    def run(self) -> None:
        publisher = TradePublisher(self.settings)
        try:
            bounds = sorted({0, *self.gates, len(self.messages)})
            for start, end in itertools.pairwise(bounds):
                if start in self.gates:
                    self.gates[start].wait(120)
                for message in self.messages[start:end]:
                    publisher.send(message)
                    if publisher.sent % 100 == 0:
                        publisher.flush()
                        time.sleep(0.05)
            publisher.close()
        except BaseException as exc:  # handed to the test thread
            self.error = exc


def _complete(client: redis.Redis, settings: Settings, reference: Outputs) -> bool:
    stored = stored_outputs(client, settings)
    return all(len(stored[key]) == len(records) for key, records in reference.items())


def _key(record: dict[str, Any], open_time: str) -> tuple[Any, ...]:
    # A prediction is one of a candle's horizons; a candle has none.
    return (record["symbol"], record["interval"], record[open_time], record.get("horizon"))


def _deduplicated(settings: Settings, topic: str, open_time: str) -> dict[Any, list[Any]]:
    """The records of an output topic grouped by (symbol, interval, open time, horizon),
    without wall-clock fields."""
    copies: dict[Any, list[Any]] = defaultdict(list)
    for record in topic_records(settings, topic):
        value = without_wall_clock([msgspec.json.decode(record.value)])[0]
        copies[_key(value, open_time)].append(value)
    return copies


def test_workers_join_and_die_while_trades_flow(
    kafka: Broker, redis_server: EmbeddedService, redis_client: redis.Redis,
    tmp_path: Path,
) -> None:
    def settings_of(instance: str) -> Settings:
        return group.model_copy(update={"worker_instance": instance,
                                        "state_dir": tmp_path / instance})

    group = namespaced_settings(kafka, redis_server.url, tmp_path, symbols=SYMBOLS)
    a, b, c = (settings_of(name) for name in "abc")
    trades = random_trades(8_000, seed=5, symbols=SYMBOLS, mean_gap_ms=225)  # 30 minutes
    last = {t.symbol: t.ts_event for t in trades}
    messages = [*trades, *(EndOfStream(s, last[s], 0, "replay") for s in SYMBOLS)]
    reference = reference_outputs(group, messages)
    feed = _Feed(group, messages, gates=(2_000, 4_000, 6_000))

    with worker_processes() as start:
        first = start(a)
        start(b)
        feed.start()  # a quarter at once, then it waits
        wait_until(lambda: all(worker_stats(redis_client, s).get("trades", 0) > 0
                               for s in (a, b)), "both workers to take partitions")
        start(c)
        feed.open(2_000)  # trades flow while the third one joins
        # (They may all be folded by the other two before it holds a partition.)
        wait_until(lambda: worker_stats(redis_client, c).get("partitions", 0) > 0,
                   "the third worker to be assigned partitions")
        feed.open(4_000)  # and to the third one's partitions
        wait_until(lambda: worker_stats(redis_client, c).get("trades", 0) > 0,
                   "the third worker to fold trades")
        first.kill()
        first.wait(30)
        feed.open(6_000)  # and while the group notices the dead one
        feed.join(120)
        assert feed.error is None and not feed.is_alive()
        wait_until(lambda: _complete(redis_client, group, reference), "every candle")

        assert stored_outputs(redis_client, group) == reference
        assert event_counts(redis_client, group) == expected_events(reference)
        # The group's counters sum its instances': every end-of-stream marker, no dead letter.
        wait_until(lambda: group_stats(redis_client, group).get("end_of_streams", 0)
                   >= len(SYMBOLS), "the group's counters")
        assert group_stats(redis_client, group)["dead_letters"] == 0

    # The symbols were spread over every partition, and both original workers had some.
    partitions = {(r.key.decode(), r.partition)
                  for r in topic_records(group, group.topics.trades)}
    assert sorted(p for _, p in partitions) == list(range(group.trades_partitions))
    assert all(worker_stats(redis_client, s)["trades"] > 0 for s in (a, b))

    # Kafka outputs are at-least-once: every record there, identical copies of each.
    for kind, topic, open_time in (("candle", group.topics.candles, "open_time"),
                                   ("prediction", group.topics.predictions,
                                    "candle_open_time")):
        copies = _deduplicated(group, topic, open_time)
        expected = {_key(record, open_time): record
                    for (k, _, _), records in reference.items() if k == kind
                    for record in records}
        assert copies.keys() == expected.keys()
        assert all(value == expected[key] for key, values in copies.items()
                   for value in values)
