"""Apache Kafka brokers failing under the live path: `mur ingest` (a paced replay of real
trades) -> the session's 3-node cluster (replication factor 3, min.insync.replicas 2) ->
`mur worker` -> Redis, with an API watching. One broker is killed (kill -9)
and restarted, one is paused (SIGSTOP, a network pause) and resumed, then all three are
restarted in turn. Nothing is lost or doubled: the trades topic holds each trade once
(idempotent producer), Redis what an undisturbed run makes, the candles and predictions
topics each of its records (at least once: the worker's default guarantee); the
ingestor and the worker ride it out on their own; /readyz says which partitions lost a
replica while a broker is away."""

import re
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import redis
from kafka import KafkaAdminClient

from kit.api import serve_in_thread
from kit.broker import Broker
from kit.builders import topic_trades
from kit.klines import TRADES_SLICE
from kit.worker import (
    expected_events,
    namespaced_settings,
    reference_outputs,
    start_ingest,
    stored_outputs,
    topic_counts,
    topic_records,
    wait_until,
    worker_processes,
    worker_stats,
)
from makeusrich.core.apache_kafka import ApacheKafka, KafkaNode
from makeusrich.core.embedded import EmbeddedService
from makeusrich.core.schemas import EndOfStream, Trade
from makeusrich.core.settings import Settings
from makeusrich.stream.sources import read_trades

pytestmark = [pytest.mark.slow, pytest.mark.integration, pytest.mark.faults,
              pytest.mark.apache, pytest.mark.parametrize("kafka", ["apache"], indirect=True)]

TRADES = list(read_trades(TRADES_SLICE))  # 00:00-00:29 of 2019-04-01, 6,475 trades
END = EndOfStream("BTCUSDT", TRADES[-1].ts_event, 0, "replay")
# The 30 minutes in about 2.5 minutes: the faults below take about 1.5 of them.
SPEED = 12.0


@pytest.fixture
def cluster(kafka: Broker) -> Iterator[ApacheKafka]:
    """The session's cluster, whole again (every node running and registered) afterwards."""
    assert kafka.cluster is not None
    yield kafka.cluster
    for node in kafka.cluster.nodes:
        node.resume()
        node.start()
    kafka.cluster.wait_ready()


def _readyz(base_url: str) -> dict[str, Any]:
    body: dict[str, Any] = httpx.get(f"{base_url}/readyz", timeout=20).json()
    return body


def _wait_ready_status(base_url: str, status: str, what: str) -> dict[str, Any]:
    seen: list[dict[str, Any]] = []

    def reached() -> bool:
        seen.append(_readyz(base_url))
        return bool(seen[-1]["status"] == status)

    wait_until(reached, what, timeout_s=90)
    return seen[-1]


def _leader_of(settings: Settings, partition: int) -> int:
    admin = KafkaAdminClient(bootstrap_servers=settings.kafka_bootstrap)
    try:
        [topic] = admin.describe_topics([settings.topics.trades])
    finally:
        admin.close()
    return int(next(p["leader_id"] for p in topic["partitions"]
                    if p["partition_index"] == partition))


def _node_away(node: KafkaNode, base_url: str, how: str) -> None:
    """/readyz, while ``node`` is away: 200, degraded, naming under-replicated partitions
    that lack that node."""
    body = _wait_ready_status(base_url, "degraded", f"/readyz to see node {node.node_id} {how}")
    detail = body["checks"]["kafka"]["detail"]
    assert body["degraded"] == ["kafka"] and body["failed"] == [], body
    in_sync = [{int(n) for n in found.split(",")}
               for found in re.findall(r"in sync: \[([0-9, ]+)\]", detail)]
    assert "under-replicated" in detail and in_sync, detail
    assert all(node.node_id not in nodes for nodes in in_sync), detail


def test_broker_killed_paused_and_rolled_lose_and_double_nothing(
    kafka: Broker, cluster: ApacheKafka, redis_server: EmbeddedService,
    redis_client: redis.Redis, tmp_path: Path,
) -> None:
    settings = namespaced_settings(kafka, redis_server.url, tmp_path, intervals=("1m", "5m"),
                                   source=f"replay:{TRADES_SLICE}", replay_speed=SPEED)
    reference = reference_outputs(settings, [*TRADES, END])
    with worker_processes() as start, serve_in_thread(settings) as api:
        worker = start(settings)
        ingest = start_ingest(settings)
        try:
            wait_until(lambda: worker_stats(redis_client, settings).get("trades", 0) > 0,
                       "the worker to fold in the first trades")
            _wait_ready_status(api.base_url, "ok", "/readyz to be ok before the faults")

            # kill -9 the leader of the BTCUSDT trades partition: leadership moves.
            leader = cluster.node(_leader_of(settings, 0))
            leader.kill()
            _node_away(leader, api.base_url, "killed")
            assert _leader_of(settings, 0) != leader.node_id
            leader.start()
            cluster.wait_ready()
            _wait_ready_status(api.base_url, "ok", "the killed node to catch up")

            # A network pause: SIGSTOP past the broker session (9 s), then SIGCONT.
            paused = next(node for node in cluster.nodes if node is not leader)
            paused.pause()
            _node_away(paused, api.base_url, "paused")
            paused.resume()
            _wait_ready_status(api.base_url, "ok", "the paused node to catch up")

            # A rolling restart: each node stopped (SIGTERM) and started, in turn.
            for node in cluster.nodes:
                node.stop()
                node.start()
                cluster.wait_ready()
                _wait_ready_status(api.base_url, "ok", f"node {node.node_id} to catch up")
            assert ingest.poll() is None, "the replay ended before the faults did: lower SPEED"
            assert worker.poll() is None
        finally:
            for node in cluster.nodes:
                node.resume()
        # The ingestor ends by itself once the replay is published, cleanly.
        assert ingest.wait(300) == 0
        wait_until(lambda: worker_stats(redis_client, settings).get("end_of_streams", 0) >= 1,
                   "the worker to fold in the end of the replay", timeout_s=120)
        assert worker.poll() is None

    published = topic_trades(r.value for r in topic_records(settings, settings.topics.trades))
    trades = Counter((m.symbol, m.trade_id) for m in published if isinstance(m, Trade))
    assert trades == Counter((t.symbol, t.trade_id) for t in TRADES)  # each once
    assert stored_outputs(redis_client, settings) == reference
    # At-least-once (the default): every candle and prediction on the topics, maybe twice.
    assert set(topic_counts(settings)) == set(expected_events(reference))
