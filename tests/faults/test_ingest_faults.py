"""The live path end to end through the real programs while the websocket misbehaves: a
fake Binance serving real trades drops the connection again and again, never sends some
trade ids, lets trades pass while the client is away and repeats others after reconnects;
`mur ingest` -> Kafka -> `mur worker` -> Redis must still hold exactly the candles and
predictions built in-process from the complete trade list, and the trades topic each trade
once."""

import asyncio
from collections import Counter
from pathlib import Path

import pytest
import redis

from kit.api import wait_for
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
from kit.worker import (
    namespaced_settings,
    reference_outputs,
    start_ingest,
    stored_outputs,
    topic_records,
    worker_processes,
)
from makeusrich.core.embedded import EmbeddedService, terminate
from makeusrich.core.schemas import Trade

pytestmark = [pytest.mark.slow, pytest.mark.integration, pytest.mark.faults, on_both_brokers]


def _market() -> dict[str, list[FakeTrade]]:
    """The 30 minutes of real BTCUSDT trades in tests/data, and seeded ETHUSDT trades over
    the same minutes (two symbols share the combined stream and the gaps)."""
    btc = load_trades_csv(BTCUSDT_TRADES_CSV, "BTCUSDT", limit=10_000)
    eth = generate_trades("ETHUSDT", 1_500, first_id=7_000_000, start_ms=btc[0].time_ms,
                          step_ms=(btc[-1].time_ms - btc[0].time_ms) // 1_500, price=141.0)
    return {"BTCUSDT": btc, "ETHUSDT": eth}


def _script(market: dict[str, list[FakeTrade]]) -> Script:
    btc, eth = market["BTCUSDT"], market["ETHUSDT"]
    return Script(
        # Clean closes and TCP aborts (which may also lose frames already sent), early,
        # mid-candle and late.
        drops=(Drop(37), Drop(900, abrupt=True), Drop(2_411), Drop(2_412),
               Drop(4_800, abrupt=True), Drop(7_100)),
        # Single ids and a run of ids. Not the first or last trade of a symbol: a gap
        # shows only when a later id arrives (live, the next trade fills the last one).
        skip_ids={"BTCUSDT": {btc[1].id, *(t.id for t in btc[1_200:1_230]), btc[3_333].id,
                              btc[-2].id},
                  "ETHUSDT": {eth[10].id, eth[700].id}},
        missed_on_reconnect=11,  # trades made while the client reconnects
        replayed_on_reconnect=8,  # the last trades sent, sent again after a reconnect
    )


async def test_drops_gaps_and_repeats_change_nothing_downstream(
    kafka: Broker, redis_server: EmbeddedService, tmp_path: Path
) -> None:
    market = _market()
    async with FakeBinance(market, _script(market)) as fake:
        settings = namespaced_settings(
            kafka, redis_server.url, tmp_path, symbols=tuple(market), source="binance",
            binance_ws_url=fake.ws_url, binance_rest_url=fake.rest_url,
            reconnect_max_backoff_s=1.0,
        )
        # What the worker must store: the complete trade list, each symbol in id order
        # (its partition's order), through the worker's pipeline and model in-process.
        # No end-of-stream marker comes from a live feed: the last minute stays open.
        reference = reference_outputs(
            settings, [trade.as_trade() for trades in market.values() for trade in trades])
        client = redis.Redis.from_url(redis_server.url)
        with worker_processes() as start:
            start(settings)
            ingest = start_ingest(settings)
            try:
                await wait_for(lambda: stored_outputs(client, settings) == reference,
                               timeout_s=120)
            finally:
                # SIGTERM: a clean stop, nothing raised. Waited for in a thread: the fake's
                # websocket lives on this event loop and answers the ingestor's close.
                assert await asyncio.to_thread(terminate, ingest, 15) == 0
        client.close()

    assert fake.connections == 1 + len(_script(market).drops)
    withheld = {symbol: len(ids) for symbol, ids in fake.withheld.items()}
    assert withheld["BTCUSDT"] > 33 and withheld["ETHUSDT"] > 2  # the gaps really happened
    # The trades topic: every trade exactly once (the ingestor skips repeats by id and
    # backfills gaps before publishing on; nothing disturbed the broker here).
    published = topic_trades(record.value for record in
                             await asyncio.to_thread(topic_records, settings,
                                                     settings.topics.trades))
    assert all(isinstance(message, Trade) for message in published)
    counts = Counter((m.symbol, m.trade_id) for m in published if isinstance(m, Trade))
    assert counts == Counter((t.symbol, t.id) for trades in market.values() for t in trades)
    assert all(t.source == "live" for t in published if isinstance(t, Trade))
