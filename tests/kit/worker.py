"""Running `mur worker` children and watching them through what they write to Redis and
Kafka; the in-process reference their outputs must equal."""

import asyncio
import contextlib
import os
import subprocess
import sys
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

import msgspec
import redis
from kafka import KafkaConsumer

from kit.broker import Broker
from kit.metrics import total
from makeusrich.core.embedded import kill_with_parent, terminate
from makeusrich.core.schemas import EndOfStream, Trade
from makeusrich.core.settings import Settings
from makeusrich.stream.control import load_serving_models
from makeusrich.stream.pipeline import TradePipeline
from makeusrich.stream.publisher import TradePublisher, ensure_topics
from makeusrich.stream.sources import read_trades, run_replay

#: Fields stamped with the wall clock when a record is made: they differ between runs.
WALL_CLOCK_FIELDS = ("ts_ingest", "made_at")
_OPEN_TIME = {"candle": "open_time", "prediction": "candle_open_time"}

#: (kind, symbol, interval) -> that series' records, oldest first.
Outputs = dict[tuple[str, str, str], list[dict[str, Any]]]


def namespaced_settings(kafka: Broker, redis_at: str, state_dir: Path,
                        **overrides: Any) -> Settings:
    """Settings for a worker on the broker ``kafka`` and Redis URL ``redis_at`` in a
    namespace of its own (topics, Redis keys, consumer group; ``state_dir`` should be
    fresh), its topics created; ``overrides`` win. Killed workers leave the group after a
    shorter session than the default, so that restarts join sooner."""
    name = f"w-{uuid.uuid4().hex[:10]}"
    values: dict[str, Any] = {
        **kafka.settings, "redis_url": redis_at,
        "topic_prefix": f"{name}-", "redis_prefix": name, "worker_id": name,
        "state_dir": state_dir, "symbols": ("BTCUSDT",), "intervals": ("1m",),
        # Not auto: `mur worker` would add the bundled sample's symbol to the accepted ones.
        "source": "sim", "log_level": "INFO",
        "broker_session_timeout_s": 3.0, "broker_rebalance_timeout_s": 3.0,
    }
    settings = Settings(_env_file=None, **{**values, **overrides})
    ensure_topics(settings)
    return settings


def wait_until(predicate: Callable[[], bool], what: str, timeout_s: float = 90) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.1)
    raise AssertionError(f"timed out waiting for {what}")


def history(client: redis.Redis, settings: Settings, kind: str, symbol: str = "BTCUSDT",
            interval: str = "1m", horizon: int = 1) -> list[dict[str, Any]]:
    """Every candle or prediction record (of ``horizon``) stored for one series, oldest
    first."""
    key = settings.redis_keys.history(kind, symbol, interval, horizon)
    return [msgspec.json.decode(fields[b"d"]) for _, fields in client.xrange(key)]


def _all_horizons(client: redis.Redis, settings: Settings, symbol: str,
                  interval: str) -> list[dict[str, Any]]:
    """Every horizon's predictions of one series, in the order the worker makes them: by
    candle, then horizon."""
    further = client.keys(settings.redis_keys.history("prediction", symbol, interval) + ":h*")
    horizons = [1, *(int(key.rsplit(b":h", 1)[1]) for key in further)]
    records = [record for horizon in horizons
               for record in history(client, settings, "prediction", symbol, interval, horizon)]
    return sorted(records, key=lambda record: (record["candle_open_time"], record["horizon"]))


def _decoded(raw: dict[bytes, bytes]) -> dict[str, int]:
    return {k.decode(): int(v) for k, v in raw.items()}


def worker_stats(client: redis.Redis, settings: Settings) -> dict[str, int]:
    """The counters the worker of ``settings`` (its ``worker_instance``) last published."""
    key = settings.redis_keys.worker_stats(settings.worker_id, settings.worker_instance)
    return _decoded(client.hgetall(key))


def group_stats(client: redis.Redis, settings: Settings) -> dict[str, int]:
    """The counters of every instance of the worker group ``settings.worker_id``, summed."""
    base = settings.redis_keys.worker_stats(settings.worker_id)
    pattern = "".join(f"\\{c}" if c in "*?[]\\" else c for c in base) + ":*"
    totals: Counter[str] = Counter()
    for key in [base.encode(), *client.scan_iter(match=pattern)]:
        totals.update(_decoded(client.hgetall(key)))
    return dict(totals)


def start_worker(settings: Settings) -> "subprocess.Popen[bytes]":
    """`mur worker` on ``settings``, as a child that dies with the test process."""
    return subprocess.Popen([sys.executable, "-m", "makeusrich", "worker"],
                            env={**os.environ, **settings.as_env()},
                            preexec_fn=kill_with_parent)


def start_ingest(settings: Settings) -> "subprocess.Popen[bytes]":
    """`mur ingest` on ``settings``, as a child that dies with the test process."""
    return subprocess.Popen([sys.executable, "-m", "makeusrich", "ingest"],
                            env={**os.environ, **settings.as_env()},
                            preexec_fn=kill_with_parent)


@contextlib.contextmanager
def worker_processes() -> Iterator[Callable[[Settings], "subprocess.Popen[bytes]"]]:
    """A ``start_worker`` whose workers are all killed when the block ends."""
    started: list[subprocess.Popen[bytes]] = []

    def start(settings: Settings) -> "subprocess.Popen[bytes]":
        started.append(start_worker(settings))
        return started[-1]

    try:
        yield start
    finally:
        for proc in started:
            if proc.poll() is None:
                proc.kill()
            proc.wait(30)


def publish(settings: Settings, messages: Iterable[Trade | EndOfStream]) -> None:
    """Send ``messages`` to the settings' trades topic (keyed by symbol) and wait for acks."""
    publisher = TradePublisher(settings)
    try:
        for message in messages:
            publisher.send(message)
    finally:
        publisher.close()


@contextlib.contextmanager
def worker_over(settings: Settings, trades_file: Path) -> Iterator[None]:
    """Publish ``trades_file`` (with its end-of-stream markers) to the settings' trades topic
    and run `mur worker` until it has folded all of it in; it is stopped when the block
    ends."""
    ensure_topics(settings)
    publisher = TradePublisher(settings)
    asyncio.run(run_replay(read_trades(trades_file), publisher, asyncio.Event(), None))
    publisher.close()
    worker = start_worker(settings)
    client = redis.Redis.from_url(settings.redis_url or "")
    try:
        wait_until(lambda: worker_stats(client, settings).get("end_of_streams", 0) >= 1,
                   f"the worker to fold in {trades_file.name}")
        yield
    finally:
        terminate(worker, 30)
        client.close()


def without_wall_clock(records: Iterable[dict[str, Any]]) -> list[dict[str, Any]]:
    return [{k: v for k, v in record.items() if k not in WALL_CLOCK_FIELDS}
            for record in records]


def stored_outputs(client: redis.Redis, settings: Settings) -> Outputs:
    """Every candle and prediction (all horizons) history of ``settings``' symbols and
    intervals, without wall-clock fields."""
    return {
        (kind, symbol, interval): without_wall_clock(
            history(client, settings, kind, symbol, interval) if kind == "candle"
            else _all_horizons(client, settings, symbol, interval))
        for kind in _OPEN_TIME for symbol in settings.symbols for interval in settings.intervals
    }


def reference_outputs(settings: Settings, messages: Iterable[Trade | EndOfStream]) -> Outputs:
    """What a worker on ``settings`` must store for ``messages`` (valid ones, each symbol's
    in the order it consumes them): the worker's TradePipeline and model, run in-process
    without Kafka or Redis; no wall-clock fields."""
    shared, own = load_serving_models(settings)
    pipeline = TradePipeline(settings.intervals, settings.grace_ms, shared,
                             conformal_step=settings.conformal_step,
                             large_trade_quote=settings.large_trade_quote)
    for symbol, model in own.items():
        pipeline.set_forecaster(model, symbol)
    made: list[Any] = []
    for message in messages:
        pipeline.process(message)
        out = pipeline.drain()
        made += [*out.candles, *out.predictions]
    outputs: Outputs = {
        (kind, symbol, interval): []
        for kind in _OPEN_TIME for symbol in settings.symbols for interval in settings.intervals
    }
    for record in without_wall_clock(msgspec.to_builtins(made)):
        kind = "candle" if "open_time" in record else "prediction"
        outputs[kind, record["symbol"], record["interval"]].append(record)
    return outputs


#: (type, symbol, interval, open time, horizon; 0 for a candle)
EventKey = tuple[str, str, str, int, int]


def _event_key(kind: str, record: dict[str, Any]) -> EventKey:
    return (kind, record["symbol"], record["interval"], record[_OPEN_TIME[kind]],
            record.get("horizon", 0))


def event_counts(client: redis.Redis, settings: Settings) -> Counter[EventKey]:
    """How often each candle and each prediction (of one horizon) is on the events
    stream."""
    counts: Counter[EventKey] = Counter()
    for _, fields in client.xrange(settings.redis_keys.events):
        kind = fields[b"type"].decode()
        if kind in _OPEN_TIME:
            counts[_event_key(kind, msgspec.json.decode(fields[b"d"]))] += 1
    return counts


def expected_events(outputs: Outputs) -> Counter[EventKey]:
    """Each record of ``outputs`` once, keyed like :func:`event_counts`."""
    return Counter(_event_key(kind, record)
                   for (kind, _, _), records in outputs.items() for record in records)


def topic_records(settings: Settings, topic: str,
                  isolation_level: str = "read_uncommitted") -> list[Any]:
    """Every record of ``topic`` (all partitions; kafka-python ConsumerRecords with
    ``partition``, ``key``, ``value``), read until the topic stays quiet for 5 s;
    ``read_committed``: those of committed transactions only (and non-transactional ones)."""
    consumer = KafkaConsumer(topic, bootstrap_servers=settings.kafka_bootstrap,
                             auto_offset_reset="earliest", consumer_timeout_ms=5_000,
                             isolation_level=isolation_level)
    try:
        return list(consumer)
    finally:
        consumer.close()


def topic_counts(settings: Settings) -> Counter[EventKey]:
    """How often each candle and prediction is on the ``candles`` and ``predictions``
    topics as a ``read_committed`` consumer sees them, keyed like :func:`event_counts`."""
    counts: Counter[EventKey] = Counter()
    for kind, topic in (("candle", settings.topics.candles),
                        ("prediction", settings.topics.predictions)):
        for record in topic_records(settings, topic, "read_committed"):
            counts[_event_key(kind, msgspec.json.decode(record.value))] += 1
    return counts


def worker_metric(settings: Settings, name: str, **labels: str) -> float:
    """The sum of the samples ``name`` with ``labels`` that the worker of ``settings``
    serves on its ``worker_metrics_port`` (0 when it has none)."""
    return total(f"http://127.0.0.1:{settings.worker_metrics_port}", name, **labels)
