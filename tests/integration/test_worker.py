"""The Faust worker against the real broker and redis-server: restarts and bad input."""

import signal
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path

import msgspec
import pytest
import redis
from kafka import KafkaConsumer, KafkaProducer

from kit.klines import TRADES_SLICE, assert_same_as_binance, binance_klines
from kit.worker import history, wait_until, worker_processes, worker_stats
from makeusrich.core.embedded import EmbeddedService
from makeusrich.core.schemas import EndOfStream, encode
from makeusrich.core.settings import Settings
from makeusrich.stream.publisher import TradePublisher, ensure_topics
from makeusrich.stream.sources import read_trades

pytestmark = [pytest.mark.integration, pytest.mark.slow]


@pytest.fixture
def settings(kafka: EmbeddedService, redis_server: EmbeddedService, tmp_path: Path,
             request: pytest.FixtureRequest) -> Settings:
    name = request.node.name.replace("[", "-").replace("]", "")
    settings = Settings(
        kafka_bootstrap=kafka.url, redis_url=redis_server.url, topic_prefix=f"{name}-",
        redis_prefix=name, worker_id=name, state_dir=tmp_path, symbols=("BTCUSDT",),
        intervals=("1m",), log_level="INFO",
    )
    ensure_topics(settings)
    return settings


@pytest.fixture
def worker(settings: Settings) -> Iterator[Callable[[], subprocess.Popen[bytes]]]:
    """Starts `mur worker` processes; all are killed at the end."""
    with worker_processes() as start:
        yield lambda: start(settings)


def test_restarted_worker_resumes_with_identical_candles(
    settings: Settings, worker: Callable[[], subprocess.Popen[bytes]],
    redis_client: redis.Redis,
) -> None:
    trades = list(read_trades(TRADES_SLICE))
    chunks = [trades[:2500], trades[2500:4500], trades[4500:]]
    publisher = TradePublisher(settings)
    stats_key = settings.redis_keys.worker_stats(settings.worker_id)
    for chunk, stop_signal in zip(chunks[:2], (signal.SIGTERM, signal.SIGKILL), strict=True):
        for trade in chunk:
            publisher.send(trade)
        publisher.flush()
        redis_client.delete(stats_key)
        proc = worker()
        # Stop it as soon as it has folded trades in: mid-candle, with unacked trades; first
        # gracefully, then with kill -9.
        wait_until(lambda: worker_stats(redis_client, settings).get("trades", 0) > 0,
                   "worker to start")
        proc.send_signal(stop_signal)
        proc.wait(30)
    for trade in chunks[2]:
        publisher.send(trade)
    publisher.send(EndOfStream("BTCUSDT", trades[-1].ts_event, 0, "replay"))
    publisher.close()
    proc = worker()

    expected = binance_klines(minutes=30)  # the trades slice covers 00:00-00:29
    wait_until(lambda: len(history(redis_client, settings, "candle")) >= len(expected),
          "all candles after restarts")
    assert_same_as_binance(history(redis_client, settings, "candle"), expected)
    predictions = history(redis_client, settings, "prediction")
    assert [p["candle_open_time"] for p in predictions] == [k["open_time"] for k in expected]
    assert proc.poll() is None


def _raw_trade(trade_id: int, ts: int, **fields: object) -> bytes:
    record = {"kind": "trade", "symbol": "BTCUSDT", "trade_id": trade_id, "price": 100.0,
              "qty": 1.0, "quote_qty": 100.0, "is_buyer_maker": False, "ts_event": ts,
              "ts_ingest": ts, "source": "sim", **fields}
    return msgspec.json.encode(record)


def test_malformed_and_late_messages_are_dead_lettered(
    settings: Settings, worker: Callable[[], subprocess.Popen[bytes]],
    redis_client: redis.Redis,
) -> None:
    t0 = 1_700_000_040_000 - 1_700_000_040_000 % 60_000
    bad = [
        b"not json",
        b'{"kind":"trade","symbol":"BTCUSDT"}',
        b'{"kind":"order","symbol":"BTCUSDT"}',
        _raw_trade(5, t0 + 10, price=-1.0),
        _raw_trade(6, t0 + 10, qty=0.0),
        b'{"kind":"trade","symbol":"BTCUSDT","trade_id":7,"price":1e400,"qty":1.0,'
        b'"quote_qty":1.0,"is_buyer_maker":false,"ts_event":1,"ts_ingest":1}',
        _raw_trade(8, t0 + 10, price="abc"),
    ]
    good = [_raw_trade(10, t0 + 1_000),
            _raw_trade(11, t0 + 61_000, price=101.0, quote_qty=101.0),
            _raw_trade(12, t0 + 65_000, price=102.0, quote_qty=102.0)]
    late = _raw_trade(13, t0 + 30_000, price=999.0, quote_qty=999.0)  # closed at t0+62s
    producer = KafkaProducer(bootstrap_servers=settings.kafka_bootstrap)
    for message in [*bad, *good, late]:
        producer.send(settings.topics.trades, message, key=b"BTCUSDT")
    producer.send(settings.topics.trades, encode(EndOfStream("BTCUSDT", t0 + 65_000, 0)),
                  key=b"BTCUSDT")
    producer.flush()
    producer.close()
    proc = worker()

    wait_until(lambda: len(history(redis_client, settings, "candle")) >= 2, "candles")
    wait_until(lambda: worker_stats(redis_client, settings).get("dead_letters", 0) >= len(bad) + 1,
          "dead-letter counter")
    stats = worker_stats(redis_client, settings)
    assert stats["dead_letters"] == len(bad) + 1 and stats["late"] == 1
    candles = history(redis_client, settings, "candle")
    assert [(c["open"], c["high"], c["trades"]) for c in candles] == [
        (100.0, 100.0, 1), (101.0, 102.0, 2)]

    consumer = KafkaConsumer(settings.topics.dead_letter,
                             bootstrap_servers=settings.kafka_bootstrap,
                             auto_offset_reset="earliest", consumer_timeout_ms=5_000)
    letters = [msgspec.json.decode(m.value) for m in consumer]
    consumer.close()
    assert len(letters) == len(bad) + 1
    assert sum(letter["reason"].startswith("late") for letter in letters) == 1
    assert {letter["stage"] for letter in letters} == {"worker"}
    assert proc.poll() is None  # nothing crashed it
