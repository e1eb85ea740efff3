"""The Faust worker against the real broker and redis-server: restarts and bad input."""

import signal
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path

import msgspec
import pytest
import redis
from kafka import KafkaConsumer, KafkaProducer

from kit.broker import Broker, on_both_brokers, topic_safe
from kit.klines import TRADES_SLICE, assert_same_as_binance, binance_klines
from kit.worker import history, wait_until, worker_processes, worker_stats
from makeusrich.core.embedded import EmbeddedService
from makeusrich.core.schemas import EndOfStream, encode
from makeusrich.core.settings import Settings
from makeusrich.stream.publisher import TradePublisher, ensure_topics
from makeusrich.stream.sources import read_trades

pytestmark = [pytest.mark.integration, pytest.mark.slow, on_both_brokers]


@pytest.fixture
def settings(kafka: Broker, redis_server: EmbeddedService, tmp_path: Path,
             request: pytest.FixtureRequest) -> Settings:
    name = topic_safe(request.node.name)
    settings = Settings(
        **kafka.settings, redis_url=redis_server.url, topic_prefix=f"{name}-",
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


def _raw_batch(trades: list[tuple[int, int, float]], **fields: object) -> bytes:
    """A TradeBatch message of (trade_id, ts_event, price) with qty 1, as raw JSON."""
    record = {"kind": "trades", "v": 1, "symbol": "BTCUSDT", "source": "sim",
              "ts_ingest": trades[-1][1], "trade_id": [t[0] for t in trades],
              "price": [t[2] for t in trades], "qty": [1.0] * len(trades),
              "quote_qty": [t[2] for t in trades], "is_buyer_maker": [False] * len(trades),
              "ts_event": [t[1] for t in trades], **fields}
    return msgspec.json.encode(record)


def test_bad_trades_inside_a_batch_are_dead_lettered_one_by_one(
    settings: Settings, worker: Callable[[], subprocess.Popen[bytes]],
    redis_client: redis.Redis,
) -> None:
    t0 = 1_700_000_040_000 - 1_700_000_040_000 % 60_000
    first = _raw_batch([(10, t0 + 1_000, 100.0), (11, t0 + 2_000, -5.0),  # bad price
                        (12, t0 + 3_000, 103.0), (11, t0 + 3_500, 1.0),   # a repeat
                        (13, 1, 104.0)])                                   # year 1970
    # One id beyond int64 sends the batch down the per-trade path: same verdicts.
    second = _raw_batch([(20, t0 + 61_000, 101.0), (2**64, t0 + 61_500, 1.0),
                         (21, t0 + 62_000, 102.0), (22, t0 + 30_000, 999.0)])  # late
    whole = [
        _raw_batch([(30, t0 + 63_000, 1.0)], v=3),  # a version this worker does not know
        _raw_batch([(31, t0 + 63_000, 1.0)], price=[1.0, 2.0]),  # columns differ in length
        _raw_batch([(32, t0 + 63_000, 1.0)], symbol="DOGEUSDT"),  # not in MUR_SYMBOLS
    ]
    producer = KafkaProducer(bootstrap_servers=settings.kafka_bootstrap)
    for message in [first, second, *whole]:
        producer.send(settings.topics.trades, message, key=b"BTCUSDT")
    producer.send(settings.topics.trades, encode(EndOfStream("BTCUSDT", t0 + 65_000, 0)),
                  key=b"BTCUSDT")
    producer.flush()
    producer.close()
    proc = worker()

    wait_until(lambda: worker_stats(redis_client, settings).get("end_of_streams", 0) == 1,
               "the end of the stream")
    candles = history(redis_client, settings, "candle")
    assert [(c["open"], c["high"], c["low"], c["close"], c["trades"]) for c in candles] == [
        (100.0, 103.0, 100.0, 103.0, 2), (101.0, 102.0, 101.0, 102.0, 2)]
    stats = worker_stats(redis_client, settings)
    assert (stats["late"], stats["duplicates"]) == (1, 1)

    consumer = KafkaConsumer(settings.topics.dead_letter,
                             bootstrap_servers=settings.kafka_bootstrap,
                             auto_offset_reset="earliest", consumer_timeout_ms=5_000)
    letters = [msgspec.json.decode(m.value) for m in consumer]
    consumer.close()
    reasons = [letter["reason"] for letter in letters]
    for expected in ("invalid: price must be positive", "invalid: ts_event 1 is not",
                     f"invalid: trade_id {2**64} is out of range", "late: its candle",
                     "undecodable: Invalid enum value 3", "undecodable: the batch's columns",
                     "invalid: unknown symbol 'DOGEUSDT'"):
        assert sum(reason.startswith(expected) for reason in reasons) == 1, (expected, reasons)
    # A trade dead-lettered out of a batch is kept as a single trade message.
    singles = [msgspec.json.decode(letter["payload"]) for letter in letters
               if letter["reason"].startswith(("invalid: price", "late"))]
    assert sorted((t["kind"], t["trade_id"]) for t in singles) == [("trade", 11), ("trade", 22)]
    assert stats["dead_letters"] == len(letters) == 7
    assert proc.poll() is None
