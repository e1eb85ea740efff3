"""The live ingestor against a local fake Binance, publishing to the real test broker."""

import asyncio
import socket
import time
import uuid
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytest
from kafka import KafkaConsumer, TopicPartition

from kit.broker import Broker, on_both_brokers
from kit.builders import topic_trades
from kit.fake_binance import (
    BTCUSDT_TRADES_CSV,
    Drop,
    FakeBinance,
    FakeTrade,
    Script,
    generate_trades,
    load_trades_csv,
)
from makeusrich.core.embedded import free_port
from makeusrich.core.errors import IngestError
from makeusrich.core.schemas import Trade, TradeBatch
from makeusrich.core.settings import Settings
from makeusrich.stream.ingest import BinanceIngestor, probe_binance, run_live
from makeusrich.stream.publisher import TradePublisher, TradeSink, ensure_topics
from makeusrich.stream.record import record

pytestmark = [pytest.mark.integration, pytest.mark.slow, on_both_brokers]

SYMBOLS = ("BTCUSDT", "ETHUSDT")


class _CountingSink:
    """Keeps every trade (and forwards it, if given a publisher); ``done`` is set once
    ``expected`` trades arrived, so tests wait on an event instead of sleeping."""

    def __init__(self, expected: int, forward_to: TradeSink | None = None) -> None:
        self.trades: list[Trade] = []
        self.dead_letters: list[str] = []
        self.done = asyncio.Event()
        self._expected = expected
        self._forward_to = forward_to

    def send(self, trade: Trade) -> None:
        if self._forward_to is not None:
            self._forward_to.send(trade)
        self.trades.append(trade)
        if len(self.trades) >= self._expected:
            self.done.set()

    def send_batch(self, batch: TradeBatch) -> None:
        for trade in batch.trades():
            self.send(trade)

    def dead_letter(self, reason: str, payload: str | bytes, stage: str = "ingest") -> None:
        if self._forward_to is not None:
            self._forward_to.dead_letter(reason, payload, stage)
        self.dead_letters.append(reason)

    def flush(self, timeout_s: float = 30.0) -> None:
        if self._forward_to is not None:
            self._forward_to.flush(timeout_s)


def _settings(fake: FakeBinance, **overrides: Any) -> Settings:
    fields: dict[str, Any] = {
        "binance_ws_url": fake.ws_url,
        "binance_rest_url": fake.rest_url,
        "symbols": SYMBOLS,
        "binance_connect_timeout_s": 5.0,
        "reconnect_max_backoff_s": 1.0,
    }
    return Settings(**{**fields, **overrides})


def _market() -> dict[str, list[FakeTrade]]:
    """Real BTCUSDT trades and generated ETHUSDT trades interleaved over the same minutes."""
    btc = load_trades_csv(BTCUSDT_TRADES_CSV, "BTCUSDT", 1500)
    eth_count = 1200
    eth = generate_trades(
        "ETHUSDT", eth_count, first_id=5_000_000, start_ms=btc[0].time_ms,
        step_ms=(btc[-1].time_ms - btc[0].time_ms) // eth_count, price=141.0,
    )
    return {"BTCUSDT": btc, "ETHUSDT": eth}


async def _ingest_until_done(
    ingestor: BinanceIngestor, sink: _CountingSink, timeout_s: float = 30.0
) -> None:
    """Run the ingestor until the sink has every expected trade, then stop it."""
    stop = asyncio.Event()
    task = asyncio.create_task(ingestor.run(stop))
    waiter = asyncio.create_task(sink.done.wait())
    done, _ = await asyncio.wait(
        {task, waiter}, timeout=timeout_s, return_when=asyncio.FIRST_COMPLETED
    )
    stop.set()
    waiter.cancel()
    await asyncio.wait_for(task, 15)  # re-raises if the ingestor crashed
    assert waiter in done, f"only {len(sink.trades)} trades published in {timeout_s} s"


def _assert_exactly_once_in_order(
    trades: Sequence[Trade], market: dict[str, list[FakeTrade]]
) -> None:
    for symbol, expected in market.items():
        got = [trade for trade in trades if trade.symbol == symbol]
        assert [t.trade_id for t in got] == [t.id for t in expected], symbol
        for trade, source in zip(got, expected, strict=True):
            assert trade.price == float(source.price)
            assert trade.qty == float(source.qty)
            assert trade.quote_qty == pytest.approx(float(source.price) * float(source.qty))
            assert trade.ts_event == source.time_ms
            assert trade.is_buyer_maker == source.is_buyer_maker
            assert trade.source == "live"
            assert trade.ts_ingest >= trade.ts_event


def _consume_trades(
    bootstrap: str, topic: str, expected: int, timeout_s: float = 30.0
) -> list[Trade]:
    """Every record of ``topic``, partition by partition (so per-symbol order is kept).

    Reads until ``expected`` records arrived, then one more poll so extra (duplicate)
    records would show. Not bounded by end_offsets: Tansu's can lag the acked offsets.
    """
    consumer = KafkaConsumer(
        bootstrap_servers=bootstrap, group_id=None, enable_auto_commit=False,
        auto_offset_reset="earliest",
    )
    try:
        partitions = [
            TopicPartition(topic, p) for p in sorted(consumer.partitions_for_topic(topic) or ())
        ]
        assert partitions, f"topic {topic} has no partitions"
        consumer.assign(partitions)
        consumer.seek_to_beginning(*partitions)
        by_partition: dict[TopicPartition, list[Trade]] = {tp: [] for tp in partitions}
        deadline = time.monotonic() + timeout_s
        while sum(map(len, by_partition.values())) < expected:
            assert time.monotonic() < deadline, "timed out reading the trades topic"
            _poll_into(consumer, by_partition, timeout_ms=500)
        _poll_into(consumer, by_partition, timeout_ms=1_000)
    finally:
        consumer.close()
    return [trade for tp in partitions for trade in by_partition[tp]]


def _poll_into(
    consumer: KafkaConsumer, by_partition: dict[TopicPartition, list[Trade]], timeout_ms: int
) -> None:
    for tp, records in consumer.poll(timeout_ms=timeout_ms).items():
        for message in topic_trades(rec.value for rec in records):
            assert isinstance(message, Trade)
            by_partition[tp].append(message)


async def test_every_trade_reaches_kafka_once_through_drops_gaps_and_duplicates(
    kafka: Broker,
) -> None:
    market = _market()
    btc, eth = market["BTCUSDT"], market["ETHUSDT"]
    script = Script(
        drops=(Drop(300), Drop(900, abrupt=True), Drop(1500), Drop(2100)),
        skip_ids={"BTCUSDT": {btc[40].id, btc[41].id, btc[600].id}, "ETHUSDT": {eth[30].id}},
        missed_on_reconnect=7,
        replayed_on_reconnect=5,
    )
    total = len(btc) + len(eth)
    async with FakeBinance(market, script) as fake:
        settings = _settings(
            fake, **kafka.settings, topic_prefix=f"t-ingest-{uuid.uuid4().hex[:8]}-"
        )
        ensure_topics(settings)
        publisher = TradePublisher(settings)
        try:
            sink = _CountingSink(total, forward_to=publisher)
            ingestor = BinanceIngestor(settings, sink)
            await _ingest_until_done(ingestor, sink)
        finally:
            publisher.close()

    withheld = sum(len(ids) for ids in fake.withheld.values())
    assert withheld >= 4 * 7 + 4  # sanity: the script really left gaps
    assert ingestor.published == total
    assert ingestor.reconnects == 4
    # A TCP abort may discard frames already sent, so the abrupt drop can turn replays into
    # fresh trades and add backfill; the three clean drops are exact.
    assert ingestor.duplicates_skipped >= 3 * 5
    assert ingestor.backfilled >= withheld
    assert ingestor.bad_messages == 0
    assert any("/historicalTrades?" in path for path in fake.rest_requests)

    trades = _consume_trades(kafka.url, settings.topics.trades, expected=total)
    _assert_exactly_once_in_order(trades, market)


async def test_bad_messages_are_counted_and_large_gaps_backfill_in_pages() -> None:
    btc = generate_trades("BTCUSDT", 3000, first_id=1_000, price=50_000.0, seed=1)
    eth = generate_trades("ETHUSDT", 300, first_id=7, step_ms=500, price=3_000.0, seed=2)
    market = {"BTCUSDT": btc, "ETHUSDT": eth}
    garbage = [
        "not json at all",
        '{"stream":"btcusdt@trade","data":{"e":"trade","s":"BTCUSDT"}}',  # fields missing
        '{"result":null,"id":1}',  # not a stream message
        generate_trades("DOGEUSDT", 1, first_id=1)[0].ws_message(),  # never subscribed
    ]
    skipped = {trade.id for trade in btc[100:2200]}  # 2100 ids: three REST pages
    script = Script(skip_ids={"BTCUSDT": skipped}, inject={50: garbage})
    async with FakeBinance(market, script) as fake:
        sink = _CountingSink(len(btc) + len(eth))
        ingestor = BinanceIngestor(_settings(fake), sink)
        await _ingest_until_done(ingestor, sink)

    assert ingestor.bad_messages == len(garbage) == len(sink.dead_letters)
    assert ingestor.backfilled == len(skipped)
    assert ingestor.duplicates_skipped == 0
    _assert_exactly_once_in_order(sink.trades, market)
    pages = [path for path in fake.rest_requests if "/historicalTrades?" in path]
    assert len(pages) == 3


async def test_refused_handshakes_and_failing_backfill_are_retried() -> None:
    market = _market()
    script = Script(
        drops=(Drop(100),), missed_on_reconnect=5, rejected_handshakes=2,
        failed_history_requests=2,
    )
    async with FakeBinance(market, script) as fake:
        sink = _CountingSink(sum(len(trades) for trades in market.values()))
        ingestor = BinanceIngestor(_settings(fake), sink)
        await _ingest_until_done(ingestor, sink)

    assert fake.connections == 2  # the refused handshakes never became connections
    assert ingestor.reconnects == 1
    assert ingestor.backfilled == 5
    history = [path for path in fake.rest_requests if "/historicalTrades?" in path]
    assert len(history) >= 3  # two 503s, then the pages that filled the gap
    _assert_exactly_once_in_order(sink.trades, market)


async def test_unknown_symbol_fails_before_streaming() -> None:
    async with FakeBinance(_market()) as fake:
        sink = _CountingSink(expected=1)
        settings = _settings(fake, symbols=("BTCUSDT", "NOPEUSDT"))
        with pytest.raises(IngestError, match="NOPEUSDT"):
            await asyncio.wait_for(run_live(settings, sink, asyncio.Event()), 15)
    assert fake.connections == 0
    assert sink.trades == []


async def test_unreachable_rest_is_an_ingest_error() -> None:
    async with FakeBinance(_market()) as fake:
        settings = _settings(fake, binance_rest_url=f"http://127.0.0.1:{free_port()}/api")
        with pytest.raises(IngestError, match="cannot reach Binance REST"):
            await asyncio.wait_for(run_live(settings, _CountingSink(1), asyncio.Event()), 15)


async def test_probe_binance() -> None:
    async with FakeBinance(_market()) as fake:
        assert await probe_binance(_settings(fake)) is True

    dead = Settings(binance_ws_url=f"ws://127.0.0.1:{free_port()}", binance_connect_timeout_s=2)
    started = time.monotonic()
    assert await probe_binance(dead) is False
    assert time.monotonic() - started < 1.0  # refused, not timed out

    # Accepts TCP but never answers the handshake: only the connect timeout ends the probe.
    with socket.create_server(("127.0.0.1", 0)) as silent:
        port = silent.getsockname()[1]
        stuck = Settings(binance_ws_url=f"ws://127.0.0.1:{port}", binance_connect_timeout_s=0.5)
        started = time.monotonic()
        assert await probe_binance(stuck) is False
        assert 0.4 < time.monotonic() - started < 3.0


async def test_record_writes_raw_messages_across_a_reconnect(tmp_path: Path) -> None:
    out_path = tmp_path / "rec" / "trades.jsonl"
    async with FakeBinance(_market(), Script(drops=(Drop(20),))) as fake:
        written = await asyncio.wait_for(
            record(_settings(fake), out_path, asyncio.Event(), max_messages=50), 30
        )
        sent = [trade.ws_message() for trade in fake.sent[:50]]
    assert written == 50
    assert fake.connections == 2
    assert out_path.read_text(encoding="utf-8").splitlines() == sent
