"""TradePublisher against the real broker: what lands on the ``trades`` topic."""

import asyncio
from pathlib import Path

import pytest

from kit.broker import Broker, topic_safe
from kit.builders import random_trades, topic_trades
from kit.worker import topic_records
from makeusrich.core.schemas import EndOfStream, Trade, TradeBatch, trade_decoder
from makeusrich.core.settings import Settings
from makeusrich.stream.publisher import TradePublisher, ensure_topics

pytestmark = pytest.mark.integration


@pytest.fixture
def settings(kafka: Broker, tmp_path: Path, request: pytest.FixtureRequest) -> Settings:
    name = topic_safe(request.node.name)
    settings = Settings(kafka_bootstrap=kafka.url, topic_prefix=f"{name}-", state_dir=tmp_path,
                        symbols=("BTCUSDT", "ETHUSDT"), trades_batch_max=100,
                        trades_linger_ms=20)
    ensure_topics(settings)
    return settings


def test_trades_and_batches_go_out_in_version_2_batches_of_at_most_the_maximum(
    settings: Settings,
) -> None:
    trades = random_trades(600, seed=8, symbols=("BTCUSDT", "ETHUSDT"))
    btc = [t for t in trades if t.symbol == "BTCUSDT"]
    eth = [t for t in trades if t.symbol == "ETHUSDT"]
    publisher = TradePublisher(settings)
    for trade in btc[:250]:  # one by one, as live ingest sends
        publisher.send(trade)
    publisher.send_batch(TradeBatch.of(btc[250:]))  # whole, as a replay sends
    publisher.send(EndOfStream("BTCUSDT", btc[-1].ts_event, 0))
    for start in range(0, len(eth), 70):
        publisher.send_batch(TradeBatch.of(eth[start:start + 70]))
    publisher.close()

    records = topic_records(settings, settings.topics.trades)
    messages = [trade_decoder.decode(record.value) for record in records]
    batches = [m for m in messages if isinstance(m, TradeBatch)]
    assert all(b'"v":2' in r.value for r, m in zip(records, messages, strict=True)
               if isinstance(m, TradeBatch))
    assert max(map(len, batches)) == 100
    assert sum(map(len, batches)) == len(trades)  # re-cut, nothing lost or repeated
    out = topic_trades(record.value for record in records)
    for symbol, sent in (("BTCUSDT", btc), ("ETHUSDT", eth)):
        # A batch carries one ts_ingest (when its last trade was queued): compare the rest.
        assert [_fields(t) for t in out if isinstance(t, Trade) and t.symbol == symbol] == [
            _fields(t) for t in sent]
    btc_out = [m for m in out if m.symbol == "BTCUSDT"]
    assert isinstance(btc_out[-1], EndOfStream)  # the marker stays after the symbol's trades
    assert publisher.sent == len(trades) + 1


def _fields(trade: Trade) -> tuple[object, ...]:
    return (trade.trade_id, trade.price, trade.qty, trade.quote_qty, trade.is_buyer_maker,
            trade.ts_event, trade.source)


async def test_a_lone_trade_goes_out_after_the_linger(settings: Settings) -> None:
    publisher = TradePublisher(settings)
    try:
        trade = random_trades(1, seed=9, symbols=("BTCUSDT",))[0]
        publisher.send(trade)
        assert publisher.messages == 0
        await asyncio.sleep(0.2)  # the linger is 20 ms
        assert publisher.messages == 1
    finally:
        publisher.close()
    assert topic_trades(r.value for r in topic_records(settings, settings.topics.trades)) == [
        trade]
