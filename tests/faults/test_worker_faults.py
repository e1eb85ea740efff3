"""`mur worker` under faults: killed mid-candle again and again, Redis restarted under it,
10,000 hostile messages. Each ends with what an undisturbed run stores, exactly."""

import random
import signal
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import msgspec
import pytest
import redis
from kafka import KafkaProducer

from kit.broker import Broker, on_both_brokers
from kit.builders import T0_MS, random_trades
from kit.klines import TRADES_SLICE, assert_same_as_binance, binance_klines
from kit.worker import (
    Outputs,
    event_counts,
    expected_events,
    namespaced_settings,
    publish,
    reference_outputs,
    stored_outputs,
    topic_counts,
    topic_records,
    wait_until,
    worker_metric,
    worker_over,
    worker_processes,
    worker_stats,
)
from makeusrich.core.embedded import EmbeddedService, free_port, start_redis
from makeusrich.core.schemas import EndOfStream, Trade, encode
from makeusrich.core.settings import Settings
from makeusrich.stream.sources import read_trades

pytestmark = [pytest.mark.slow, pytest.mark.integration, pytest.mark.faults, on_both_brokers]

LOG_DIR = Path(__file__).parent.parent.parent / ".mur" / "test-logs"
TRADES = list(read_trades(TRADES_SLICE))  # 00:00-00:29 of 2019-04-01, 6,475 trades
END = EndOfStream("BTCUSDT", TRADES[-1].ts_event, 0, "replay")
MINUTE_MS = 60_000

StartWorker = Callable[[Settings], Any]


@pytest.fixture(scope="module")
def make_settings(kafka: Broker, redis_server: EmbeddedService,
                  tmp_path_factory: pytest.TempPathFactory) -> Callable[..., Settings]:
    def build(**overrides: Any) -> Settings:
        return namespaced_settings(kafka, redis_server.url, tmp_path_factory.mktemp("w"),
                                   **{"intervals": ("1m", "5m"), **overrides})

    return build


@pytest.fixture
def start() -> Iterator[StartWorker]:
    with worker_processes() as start_worker:
        yield start_worker


@pytest.fixture(scope="module")
def uninterrupted(make_settings: Callable[..., Settings]) -> Outputs:
    """What one undisturbed worker stores for the trades slice (1m and 5m)."""
    settings = make_settings()
    client = redis.Redis.from_url(settings.redis_url or "")
    with worker_over(settings, TRADES_SLICE):
        stored = stored_outputs(client, settings)
    client.close()
    assert_same_as_binance(stored["candle", "BTCUSDT", "1m"], binance_klines(minutes=30))
    # The in-process pipeline agrees, so the tests below that need no worker for their
    # reference (and tests/faults/test_scale_out.py) may use it instead.
    assert stored == reference_outputs(settings, [*TRADES, END])
    return stored


def _index_at(minute: int, second: float) -> int:
    """Index of the first trade at or after ``minute:second`` into the slice."""
    at = TRADES[0].ts_event - TRADES[0].ts_event % MINUTE_MS + minute * MINUTE_MS
    return next(i for i, t in enumerate(TRADES) if t.ts_event >= at + second * 1000)


def _assert_same_as(client: redis.Redis, settings: Settings, reference: Outputs) -> None:
    """Histories equal to the reference's (no gap, no duplicate, every field but wall-clock
    stamps), and each candle and prediction on the events stream exactly once."""
    assert stored_outputs(client, settings) == reference
    assert event_counts(client, settings) == expected_events(reference)


def test_killed_mid_candle_again_and_again(
    make_settings: Callable[..., Settings], start: StartWorker, uninterrupted: Outputs,
    redis_client: redis.Redis, kafka: Broker,
) -> None:
    # On Apache Kafka, with transactions: the topics must hold each output exactly once.
    settings = make_settings(**({"processing_guarantee": "exactly_once"}
                                if kafka.engine == "apache" else {}))
    # Each span's end is mid-candle, at a different second of its minute.
    cuts = [_index_at(minute, second) for minute, second in ((3, 41.5), (9, 7), (15, 52.2),
                                                             (21, 29))]
    begin = 0
    for kill, cut in enumerate(cuts, 1):
        middle = (begin + cut) // 2
        publish(settings, TRADES[begin:middle])
        redis_client.delete(settings.redis_keys.worker_stats(settings.worker_id))
        proc = start(settings)
        wait_until(lambda: worker_stats(redis_client, settings).get("trades", 0) > 0,
                   f"worker {kill} to consume")
        # kill -9 while it consumes the rest of the span: unacked trades, open candles.
        publish(settings, TRADES[middle:cut])
        proc.send_signal(signal.SIGKILL)
        proc.wait(30)
        begin = cut
    publish(settings, [*TRADES[begin:], END])
    proc = start(settings)
    wait_until(lambda: worker_stats(redis_client, settings).get("end_of_streams", 0) >= 1,
               "the last worker to fold in the end of the slice")
    _assert_same_as(redis_client, settings, uninterrupted)
    assert proc.poll() is None
    # The candles and predictions topics: on Apache Kafka each record exactly once for a
    # read_committed consumer (the worker's transactions); on Tansu (no transactions, so
    # at-least-once) each at least once.
    on_topics, expected = topic_counts(settings), expected_events(uninterrupted)
    if kafka.engine == "apache":
        assert on_topics == expected
    else:
        assert set(on_topics) == set(expected)


def test_redis_restarted_under_the_worker(
    make_settings: Callable[..., Settings], start: StartWorker, uninterrupted: Outputs,
    tmp_path: Path,
) -> None:
    port = free_port()
    service = start_redis(port, LOG_DIR, data_dir=tmp_path)
    settings = make_settings(redis_url=service.url, worker_metrics_port=free_port())
    client = redis.Redis.from_url(service.url)
    errors = "mur_redis_errors_total"
    try:
        first, second = _index_at(10, 20), _index_at(20, 40)
        publish(settings, TRADES[:first])
        proc = start(settings)
        wait_until(lambda: len(client.xrange(settings.redis_keys.history(
            "candle", "BTCUSDT", "1m"))) >= 10, "the first candles")
        service.stop()  # SIGTERM; every write was fsync'd to the append-only file
        publish(settings, TRADES[first:second])  # closes candles: their writes fail
        # Down long enough for several retries of a write and a missed stats beat.
        wait_until(lambda: worker_metric(settings, errors, operation="write") >= 5
                   and worker_metric(settings, errors, operation="stats") >= 1,
                   "the worker to wait out the outage")
        service = start_redis(port, LOG_DIR, data_dir=tmp_path)  # same port, same data
        publish(settings, [*TRADES[second:], END])
        wait_until(lambda: worker_stats(client, settings).get("end_of_streams", 0) >= 1,
                   "the worker to fold in the end of the slice")
        _assert_same_as(client, settings, uninterrupted)
        assert proc.poll() is None  # the same process rode it out

        # A worker stopped while it waits for Redis still stops.
        failed = worker_metric(settings, errors)
        service.stop()
        later = [msgspec.structs.replace(TRADES[-1], trade_id=TRADES[-1].trade_id + n,
                                         ts_event=TRADES[-1].ts_event + n * 70_000)
                 for n in (1, 2)]
        publish(settings, later)  # the second closes the first one's candle
        wait_until(lambda: worker_metric(settings, errors, operation="write") > failed,
                   "the worker to wait for Redis again")
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) == 0
    finally:
        client.close()
        service.stop()


# ---------------------------------------------------------------------- hostile input

HOSTILE = 10_000
SYMBOLS = ("BTCUSDT", "ETHUSDT")


def _record(trade: Trade, **fields: Any) -> bytes:
    """``trade``'s JSON with ``fields`` replaced (any JSON value, valid or not)."""
    return msgspec.json.encode({**msgspec.to_builtins(trade), "kind": "trade", **fields})


def _raw(trade: Trade, field: str, literal: str) -> bytes:
    """``trade``'s JSON with ``field`` set to a raw JSON text (possibly not JSON at all)."""
    return _record(trade, **{field: 0}).replace(f'"{field}":0'.encode(),
                                                f'"{field}":{literal}'.encode())


# What a worker must say about each kind of hostile message: (name, reason contains).
# A late trade is valid in every other way: its candle had closed.
_KINDS = {
    "undecodable": "undecodable:", "unknown symbol": "invalid: unknown symbol",
    "not positive": "must be positive", "absurd": "is absurdly large",
    "inconsistent quote": "is not price * qty", "out of int64": "is out of range",
    "implausible time": "is not a time between", "late": "late:",
}


def _kind(reason: str) -> str:
    found = [name for name, marker in _KINDS.items() if marker in reason]
    assert len(found) == 1, reason
    return found[0]


def _hostile(rng: random.Random, trade: Trade) -> tuple[bytes | None, bytes | None, str]:
    """(key, value, kind) of one hostile message modelled on a valid ``trade``."""
    t = trade
    choices: list[tuple[bytes | None, str]] = [
        (rng.randbytes(rng.randint(0, 64)), "undecodable"),
        (_record(t)[:rng.randint(1, 60)], "undecodable"),
        (_raw(t, "price", "NaN"), "undecodable"),
        (_raw(t, "qty", "Infinity"), "undecodable"),
        (_raw(t, "quote_qty", "-Infinity"), "undecodable"),
        (_raw(t, "price", "1e400"), "undecodable"),
        (_record(t, price="100.5"), "undecodable"),
        (_record(t, ts_event=t.ts_event + 0.5), "undecodable"),
        (msgspec.json.encode({"kind": "trade", "symbol": t.symbol}), "undecodable"),
        (_record(t, kind="order"), "undecodable"),
        (b"[" * 5_000 + b"]" * 5_000, "undecodable"),
        (b"null", "undecodable"),
        (b"", "undecodable"),
        (None, "undecodable"),  # a record without a value
        (_record(t, symbol=rng.choice(["DOGEUSDT", t.symbol.lower(), "", "BTC:USDT\n",
                                       "ビットコイン", "X" * 20_000])), "unknown symbol"),
        (encode(EndOfStream("SHIBUSDT", t.ts_event, 0)), "unknown symbol"),
        (_record(t, qty=-rng.random(), quote_qty=-t.price), "not positive"),
        (_record(t, price=0.0, quote_qty=0.0), "not positive"),
        (_record(t, quote_qty=-1.0), "inconsistent quote"),
        (_record(t, price=1e200, quote_qty=1e200 * t.qty), "absurd"),
        (_record(t, qty=1e13, quote_qty=1e13 * t.price), "absurd"),
        (_record(t, quote_qty=t.quote_qty * rng.uniform(1.5, 1e6)), "inconsistent quote"),
        (_record(t, trade_id=rng.choice([-1, 2**63, 10**25])), "out of int64"),
        (_record(t, ts_ingest=rng.choice([-1, 2**64])), "out of int64"),
        (_record(t, ts_event=rng.choice([0, 1, 10**30, 2**62])), "implausible time"),
        (encode(EndOfStream(t.symbol, 4_102_444_800_000, 0)), "implausible time"),  # 2100
    ]
    value, kind = rng.choice(choices)
    keys = [t.symbol.encode(), rng.randbytes(8)] + ([] if value is None else [None])
    return rng.choice(keys), value, kind


def _interleaved(rng: random.Random) -> tuple[list[tuple[bytes | None, bytes | None]],
                                              list[Trade | EndOfStream], list[str]]:
    """(messages to publish, the valid ones in order, the kind of each hostile one):
    30 minutes of two symbols' trades with trades inside the grace period out of order,
    late trades and 10,000 hostile messages in all scattered among them."""
    trades = [msgspec.structs.replace(t, trade_id=10 * t.trade_id)  # room for inserted ids
              for t in random_trades(2_400, seed=3, symbols=SYMBOLS, mean_gap_ms=750)]
    watermark = dict.fromkeys(SYMBOLS, 0)
    sent: list[tuple[bytes | None, bytes | None]] = []
    valid: list[Trade | EndOfStream] = []
    kinds: list[str] = []
    late = 0
    for index, trade in enumerate(trades):
        symbol = trade.symbol
        sent.append((symbol.encode(), encode(trade)))
        valid.append(trade)
        watermark[symbol] = max(watermark[symbol], trade.ts_event)
        if trade.ts_event - T0_MS < 3 * MINUTE_MS:
            continue
        between = trade.trade_id + 5  # an id between this trade's and the symbol's next
        if index % 17 == 0:  # out of order, within the grace period: folded in
            ooo = msgspec.structs.replace(trade, trade_id=between,
                                          ts_event=watermark[symbol] - 1_500)
            sent.append((symbol.encode(), encode(ooo)))
            valid.append(ooo)
        elif index % 4 == 0 and late < 500:  # behind its closed candle: late
            gone = msgspec.structs.replace(
                trade, trade_id=between,
                ts_event=watermark[symbol] - rng.randint(63_000, 150_000))
            sent.append((symbol.encode(), encode(gone)))
            kinds.append("late")
            late += 1
    # The hostile messages, each at a random place (order only matters for valid ones).
    for _ in range(HOSTILE - late):
        key, value, kind = _hostile(rng, rng.choice(trades))
        sent.insert(rng.randrange(len(sent) + 1), (key, value))
        kinds.append(kind)
    for symbol in SYMBOLS:
        end = EndOfStream(symbol, watermark[symbol], 0, "replay")
        sent.append((symbol.encode(), encode(end)))
        valid.append(end)
    return sent, valid, kinds


def test_hostile_messages_are_dead_lettered_and_crash_nothing(
    make_settings: Callable[..., Settings], start: StartWorker, redis_client: redis.Redis,
) -> None:
    settings = make_settings(symbols=SYMBOLS, intervals=("1m",),
                             worker_metrics_port=free_port())
    sent, valid, kinds = _interleaved(random.Random(7))
    assert len(kinds) == HOSTILE
    expected_kinds = Counter(kinds)
    producer = KafkaProducer(bootstrap_servers=settings.kafka_bootstrap, linger_ms=20)
    for key, value in sent:
        producer.send(settings.topics.trades, value=value, key=key)
    producer.flush()
    producer.close()
    proc = start(settings)

    def stats() -> dict[str, int]:
        return worker_stats(redis_client, settings)

    wait_until(lambda: stats().get("end_of_streams", 0) == 2
               and stats().get("dead_letters", 0) >= HOSTILE, "every message to be handled")
    assert proc.poll() is None  # never crashed, never restarted
    counters = stats()
    assert counters["dead_letters"] == HOSTILE
    assert counters["late"] == expected_kinds["late"]
    valid_trades = sum(isinstance(m, Trade) for m in valid)
    assert counters["trades"] == valid_trades + expected_kinds["late"] + len(SYMBOLS)
    assert counters["duplicates"] == 0

    letters = [msgspec.json.decode(record.value) for record in
               topic_records(settings, settings.topics.dead_letter)]
    assert len(letters) == HOSTILE
    assert Counter(_kind(letter["reason"]) for letter in letters) == expected_kinds
    assert {letter["stage"] for letter in letters} == {"worker"}
    by_class = {"undecodable": expected_kinds["undecodable"], "late": expected_kinds["late"]}
    by_class["invalid"] = HOSTILE - sum(by_class.values())
    for reason, count in by_class.items():
        assert worker_metric(settings, "mur_dead_letters_total", reason=reason) == count

    reference = reference_outputs(settings, valid)
    assert stored_outputs(redis_client, settings) == reference
    assert event_counts(redis_client, settings) == expected_events(reference)
    assert sum(len(v) for k, v in reference.items() if k[0] == "candle") >= 2 * 29
    assert proc.poll() is None
