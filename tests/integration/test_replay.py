"""Replays against the real broker and redis-server: same results as the live path, kept
apart from live data, selected by event time."""

import asyncio
import itertools
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import msgspec
import pytest
import redis
from kafka import KafkaConsumer, KafkaProducer, TopicPartition

from kit.broker import Broker, on_both_brokers
from kit.worker import history, worker_over
from makeusrich.cli import BUNDLED_SAMPLE
from makeusrich.core.embedded import EmbeddedService
from makeusrich.core.errors import ConfigError, RegistryError, SourceFormatError
from makeusrich.core.schemas import EndOfStream, Trade, TradeBatch, encode, encode_batch
from makeusrich.core.settings import Settings
from makeusrich.inference import load_forecaster
from makeusrich.stream.publisher import ensure_topics
from makeusrich.stream.replay import (
    ReplaySpec,
    drop_namespace,
    replay,
    replay_settings,
    span_batches,
)
from makeusrich.stream.sources import read_trades
from makeusrich.trainer.archive import write_candles

pytestmark = [pytest.mark.integration, pytest.mark.slow, on_both_brokers]

MINUTE_MS = 60_000
START_MS = 1554076800000  # 2019-04-01T00:00Z, the bundled sample's first minute
# Fields stamped with the wall clock when a record is made; everything else must match.
_WALL_CLOCK = ("ts_ingest", "made_at")


def _comparable(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [{k: v for k, v in r.items() if k not in _WALL_CLOCK} for r in records]


def _snapshot(client: redis.Redis, prefix: str) -> dict[bytes, Any]:
    """Every live key under ``prefix`` (not the replays' ``prefix:replay:*``) with a digest
    of its content."""
    out: dict[bytes, Any] = {}
    for key in client.scan_iter(match=f"{prefix}:*"):
        if key.startswith(f"{prefix}:replay:".encode()):
            continue
        kind = client.type(key)
        if kind == b"stream":
            out[key] = (kind, client.xlen(key), client.xrevrange(key, count=1))
        elif kind == b"string":
            out[key] = (kind, client.get(key))
        elif kind == b"set":
            out[key] = (kind, sorted(client.smembers(key)))
        elif kind == b"hash":
            out[key] = (kind, sorted(client.hgetall(key)))  # the worker's counters: names only
    return out


def _end_offsets(settings: Settings) -> dict[TopicPartition, int]:
    consumer = KafkaConsumer(bootstrap_servers=settings.kafka_bootstrap)
    try:
        topic = settings.topics.trades
        tps = [TopicPartition(topic, p) for p in consumer.partitions_for_topic(topic)]
        return dict(consumer.end_offsets(tps))
    finally:
        consumer.close()


@pytest.fixture(scope="module")
def live(kafka: Broker, redis_server: EmbeddedService,
         tmp_path_factory: pytest.TempPathFactory) -> Iterator[Settings]:
    """The live path over the bundled hour of trades: ingest publishes them, `mur worker`
    folds them in; its candles and predictions stay in Redis for the module's tests."""
    settings = Settings(
        **kafka.settings, redis_url=redis_server.url, topic_prefix="replay-live-",
        redis_prefix="replay-live", worker_id="replay-live",
        state_dir=tmp_path_factory.mktemp("replay-live"), symbols=("BTCUSDT",),
        intervals=("1m",),
    )
    with worker_over(settings, BUNDLED_SAMPLE):
        pass
    yield settings


@pytest.fixture
def client(redis_server: EmbeddedService) -> Iterator[redis.Redis]:
    # Not the shared redis_client fixture: it flushes the database the live run lives in.
    client = redis.Redis.from_url(redis_server.url)
    yield client
    client.close()


def test_replay_of_a_file_equals_the_live_path_and_leaves_live_data_alone(
    live: Settings, client: redis.Redis
) -> None:
    before = _snapshot(client, live.redis_prefix)
    offsets_before = _end_offsets(live)
    result = asyncio.run(replay(live, ReplaySpec(source=str(BUNDLED_SAMPLE)), "same-as-live"))
    run = result.settings

    live_candles = history(client, live, "candle")
    live_predictions = history(client, live, "prediction")
    assert len(live_candles) == 60
    assert {p["model_version"] for p in live_predictions} - {"naive"}, "the model never served"
    assert _comparable(history(client, run, "candle")) == _comparable(live_candles)
    horizons = load_forecaster(None).horizons
    for horizon in horizons:
        assert (_comparable(history(client, run, "prediction", horizon=horizon))
                == _comparable(history(client, live, "prediction", horizon=horizon)))
    # One prediction a horizon per closed candle.
    assert (result.candles, result.predictions) == (60, len(live_predictions) * len(horizons))

    # Isolation: the live keys and topics are exactly as they were, the run's are its own.
    assert _snapshot(client, live.redis_prefix) == before
    assert _end_offsets(live) == offsets_before
    assert run.redis_prefix.startswith(f"{live.redis_prefix}:replay:")
    assert run.topics.trades != live.topics.trades
    drop_namespace(run)
    assert not list(client.scan_iter(match=f"{run.redis_prefix}:*"))


def test_replay_from_kafka_selects_the_span_by_event_time(
    live: Settings, client: redis.Redis
) -> None:
    start, end = START_MS + 35 * MINUTE_MS, START_MS + 50 * MINUTE_MS
    spec = ReplaySpec(source="kafka", symbols=("BTCUSDT",), start_ms=start, end_ms=end)
    result = asyncio.run(replay(live, spec, "from-kafka"))
    candles = history(client, result.settings, "candle")
    assert [c["open_time"] for c in candles] == list(range(start, end, MINUTE_MS))
    # Candles built from the selected trades equal the live ones for those minutes.
    live_candles = {c["open_time"]: c for c in _comparable(history(client, live, "candle"))}
    assert _comparable(candles) == [live_candles[c["open_time"]] for c in candles]
    assert start <= result.first_ts_event < result.last_ts_event < end
    drop_namespace(result.settings)


def _publish_mixed(settings: Settings, partition: int, trades: list[Trade]) -> None:
    """``trades`` (one symbol) into one partition of the ``trades`` topic: single trades
    (as ingest published before batching), then messages the live worker dead-lettered and
    a replay's end-of-stream marker, then batches in wire versions 1 and 2 by turns (as
    ingest published them, then publishes now)."""
    symbol = trades[0].symbol
    unequal = {**msgspec.json.decode(encode(TradeBatch.of(trades[:3]))), "price": [1.0]}
    values = [encode(trade) for trade in trades[:10]]
    values += [b"{not json", msgspec.json.encode(unequal),
               encode(EndOfStream(symbol=symbol, ts_event=trades[9].ts_event, ts_ingest=0))]
    values += [(encode_batch if n % 2 else encode)(TradeBatch.of(trades[i : i + 700]))
               for n, i in enumerate(range(10, len(trades), 700))]
    producer = KafkaProducer(bootstrap_servers=settings.kafka_bootstrap, acks="all")
    try:
        for value in values:
            producer.send(settings.topics.trades, value, key=symbol.encode(),
                          partition=partition)
        producer.flush()
    finally:
        producer.close()


def test_replay_from_kafka_expands_trade_batches_into_every_trade_once_in_order(
    live: Settings, client: redis.Redis, tmp_path: Path
) -> None:
    """Batches are expanded, what is no trade skipped; each partition is read as the merge
    needs it (span_batches), and the span replays like the live path."""
    name = f"replay-batches-{uuid.uuid4().hex[:8]}"
    source = live.model_copy(update={
        "topic_prefix": f"{name}-", "redis_prefix": name, "worker_id": name,
        "state_dir": tmp_path, "symbols": ("BTCUSDT", "ETHUSDT"),
    })
    ensure_topics(source)
    btc = list(read_trades(BUNDLED_SAMPLE))
    # A second symbol in another partition, so that partitions are merged.
    eth = [msgspec.structs.replace(t, symbol="ETHUSDT", price=t.price / 30,
                                   quote_qty=t.quote_qty / 30) for t in btc[::3]]
    _publish_mixed(source, 0, btc)
    _publish_mixed(source, 1, eth)

    batches = list(span_batches(source, ReplaySpec(source="kafka")))
    streamed = [trade for batch in batches for trade in batch.trades()]
    assert [t for t in streamed if t.symbol == "BTCUSDT"] == btc
    assert [t for t in streamed if t.symbol == "ETHUSDT"] == eth
    assert len(streamed) == len(btc) + len(eth)
    # Merged batch by batch: across partitions, by each batch's first trade.
    firsts = [batch.ts_event[0] for batch in batches]
    assert firsts == sorted(firsts)

    start, end = START_MS + 10 * MINUTE_MS, START_MS + 20 * MINUTE_MS
    result = asyncio.run(replay(source, ReplaySpec(source="kafka", start_ms=start, end_ms=end),
                                "from-batches"))
    in_span = [t for t in streamed if start <= t.ts_event < end]
    assert result.messages == len(in_span)
    assert result.symbols == ("BTCUSDT", "ETHUSDT")
    assert (result.first_ts_event, result.last_ts_event) == (in_span[0].ts_event,
                                                             in_span[-1].ts_event)
    candles = _comparable(history(client, result.settings, "candle"))
    assert [c["open_time"] for c in candles] == list(range(start, end, MINUTE_MS))
    live_candles = {c["open_time"]: c for c in _comparable(history(client, live, "candle"))}
    assert candles == [live_candles[c["open_time"]] for c in candles]
    assert len(history(client, result.settings, "candle", "ETHUSDT")) == 10
    drop_namespace(result.settings)
    drop_namespace(source)


def test_a_malformed_line_ends_a_file_replay_when_it_is_read(
    live: Settings, tmp_path: Path
) -> None:
    """The file is read while it is sent: a bad line after good trades ends the replay with
    its own error, not with a worker that stalled waiting for the rest."""
    rows = [f"{t.trade_id},{t.price},{t.qty},{t.quote_qty},{t.ts_event},{t.is_buyer_maker},True"
            for t in itertools.islice(read_trades(BUNDLED_SAMPLE), 100)]
    path = tmp_path / "BTCUSDT-trades-2019-04-01.csv"
    path.write_text("\n".join([*rows, "junk"]) + "\n")
    started_s = time.monotonic()
    with pytest.raises(SourceFormatError, match=":101: "):
        asyncio.run(replay(live, ReplaySpec(source=str(path)), "bad-line"))
    assert time.monotonic() - started_s < 60  # the stall timeout is 120 s
    drop_namespace(replay_settings(live, "bad-line"))


def test_replay_from_the_archive_predicts_what_the_worker_predicted(
    live: Settings, client: redis.Redis, tmp_path: Path
) -> None:
    """Archived candles skip the candle builder; the inference is the worker's own."""
    store_settings = live.model_copy(update={"archive_dir": tmp_path / "archive"})
    live_candles = asyncio.run(_read_candles(live))
    write_candles(store_settings.archive_dir, live_candles)
    result = asyncio.run(replay(store_settings, ReplaySpec(source="archive"), "from-archive"))
    run = result.settings
    assert _comparable(history(client, run, "candle")) == _comparable(history(client, live,
                                                                              "candle"))
    assert (_comparable(history(client, run, "prediction"))
            == _comparable(history(client, live, "prediction")))
    drop_namespace(run)


async def _read_candles(settings: Settings) -> list[Any]:
    from makeusrich.core.store import RedisStore

    store = RedisStore.from_settings(settings)
    try:
        return await store.candles("BTCUSDT", "1m", start_ms=0, limit=1_000)
    finally:
        await store.aclose()


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        (ReplaySpec(source=str(BUNDLED_SAMPLE), start_ms=START_MS + 3 * 3_600_000),
         "no trades in"),
        (ReplaySpec(source=str(BUNDLED_SAMPLE), symbols=("ETHUSDT",)), "no trades in"),
        (ReplaySpec(source="kafka", start_ms=START_MS - 3_600_000, end_ms=START_MS),
         "no trades in"),
        (ReplaySpec(source="/no/such/file.csv"), "not kafka, archive or a trades file"),
        (ReplaySpec(source="archive"), "no archived candles"),
    ],
)
def test_bad_spans_get_clear_errors(live: Settings, spec: ReplaySpec, message: str,
                                    tmp_path: Path) -> None:
    settings = live.model_copy(update={"archive_dir": tmp_path})
    with pytest.raises(ConfigError, match=message):
        asyncio.run(replay(settings, spec, "bad-span"))


def test_a_span_that_ends_before_it_starts_is_refused() -> None:
    with pytest.raises(ConfigError, match="must be before end"):
        ReplaySpec(source="kafka", start_ms=START_MS, end_ms=START_MS)


def test_unknown_model_is_refused_before_anything_runs(live: Settings) -> None:
    from makeusrich.backtest.run import resolve_model_dir
    from makeusrich.stream.control import registry_root

    with pytest.raises(RegistryError, match="unknown model 'lstm-nope'"):
        resolve_model_dir("lstm-nope", registry_root(live))
