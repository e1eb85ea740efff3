"""The candle archiver against the real broker, and the archive's Parquet parts."""

import asyncio
import time
from collections.abc import Iterable
from pathlib import Path

import numpy as np
import pytest
from kafka import KafkaProducer

from kit.broker import Broker, on_both_brokers, topic_safe
from makeusrich.core.errors import TrainingError
from makeusrich.core.schemas import Candle, encode
from makeusrich.core.settings import Settings
from makeusrich.inference.features import candles_to_array
from makeusrich.stream.publisher import ensure_topics
from makeusrich.trainer.archive import read_part, run_archiver, write_candles
from makeusrich.trainer.data import load_series

pytestmark = [pytest.mark.integration, pytest.mark.slow, on_both_brokers]

MINUTE = 60_000
NOV_20_2350 = 1_763_682_600_000  # 2025-11-20 23:50 UTC: ten minutes before a date boundary


def _candle(symbol: str, open_time: int, close: float) -> Candle:
    return Candle(
        symbol=symbol, interval="1m", open_time=open_time, close_time=open_time + MINUTE - 1,
        open=close - 1, high=close + 2, low=close - 3, close=close, volume=1.5,
        quote_volume=1.5 * close, trades=7, taker_buy_volume=0.5,
        taker_buy_quote_volume=0.5 * close, source="sim", ts_event=open_time + MINUTE - 1,
        ts_ingest=open_time + MINUTE,
    )


def _minutes(symbol: str, first: int, count: int) -> list[Candle]:
    return [_candle(symbol, NOV_20_2350 + (first + i) * MINUTE, 100.0 + first + i)
            for i in range(count)]


@pytest.fixture
def settings(kafka: Broker, tmp_path: Path, request: pytest.FixtureRequest) -> Settings:
    name = topic_safe(request.node.name)
    # Short group timeouts: Tansu delays a group's join by the rebalance timeout, and (its
    # first generation being 0, which aiokafka takes for "never joined") a stopped archiver
    # never leaves its group, so a restarted one waits for the old member's session to end.
    settings = Settings(
        **kafka.settings, topic_prefix=f"{name}-", worker_id=name,
        state_dir=tmp_path, archive_dir=tmp_path / "archive", broker_session_timeout_s=2.0,
        broker_rebalance_timeout_s=1.0,
    )
    ensure_topics(settings)
    return settings


def _publish(settings: Settings, records: Iterable[bytes]) -> None:
    producer = KafkaProducer(bootstrap_servers=settings.kafka_bootstrap, acks="all")
    for record in records:
        producer.send(settings.topics.candles, record)
    producer.flush()
    producer.close()


def _parts(root: Path) -> set[Path]:
    return set(root.rglob("*.parquet"))


def _archived(root: Path) -> list[tuple[str, int]]:
    """(symbol, open_time) of every row on disk, duplicates included."""
    rows = []
    for part in _parts(root):
        table = read_part(part)
        rows += zip(table["symbol"].to_pylist(), table["open_time"].to_pylist(), strict=True)
    return rows


async def _archive_until(settings: Settings, wanted: set[tuple[str, int]]) -> None:
    """Run the archiver until every wanted candle is on disk, then stop it."""
    stop = asyncio.Event()
    task = asyncio.create_task(run_archiver(settings, stop, flush_every_s=0.2))
    deadline = time.monotonic() + 60
    while not wanted <= set(_archived(settings.archive_dir)):
        assert not task.done(), task.exception()
        assert time.monotonic() < deadline, "timed out waiting for the archive"
        await asyncio.sleep(0.1)
    stop.set()
    await asyncio.wait_for(task, 30)


def _assert_series_equal(root: Path, candles: list[Candle]) -> None:
    """load_series(root) gives back exactly ``candles`` (one gap-free series per symbol)."""
    by_symbol = {s.symbol: s for s in load_series(root)}
    assert sorted(by_symbol) == sorted({c.symbol for c in candles})
    for symbol, series in by_symbol.items():
        mine = sorted((c for c in candles if c.symbol == symbol), key=lambda c: c.open_time)
        assert series.filled == 0
        assert series.open_time.tolist() == [c.open_time for c in mine]
        np.testing.assert_array_equal(series.ohlcv, candles_to_array(mine))


async def test_archiver_writes_partitions_once_and_resumes_after_its_commits(
    settings: Settings,
) -> None:
    btc, eth = _minutes("BTCUSDT", 0, 20), _minutes("ETHUSDT", 0, 5)
    first = [*btc, *eth]
    # At-least-once input: some candles arrive twice; a bad record is skipped.
    _publish(settings, [*map(encode, first), *map(encode, btc[8:12]), b"not a candle"])
    await _archive_until(settings, {(c.symbol, c.open_time) for c in first})

    root = settings.archive_dir
    partitions = {p.parent.relative_to(root).as_posix() for p in _parts(root)}
    assert partitions == {
        "symbol=BTCUSDT/interval=1m/date=2025-11-20",
        "symbol=BTCUSDT/interval=1m/date=2025-11-21",
        "symbol=ETHUSDT/interval=1m/date=2025-11-20",
    }
    for part in _parts(root):
        open_time = read_part(part)["open_time"].to_pylist()
        assert open_time == sorted(set(open_time))
        assert part.name == f"part-{open_time[0]}-{open_time[-1]}.parquet"
    assert not [p for p in root.rglob("*") if p.is_file() and p.suffix != ".parquet"]
    _assert_series_equal(root, first)
    written_first = _parts(root)

    # A restarted archiver resumes after the committed offsets: only the new candles (and
    # a re-sent one) are read again.
    more = _minutes("BTCUSDT", 20, 10)
    _publish(settings, map(encode, [btc[-1], *more]))
    await _archive_until(settings, {(c.symbol, c.open_time) for c in more})

    new_rows = [
        t for part in _parts(root) - written_first for t in read_part(part)["open_time"].to_pylist()
    ]
    assert sorted(new_rows) == sorted({c.open_time for c in [btc[-1], *more]})
    _assert_series_equal(root, [*first, *more])


def test_a_part_written_twice_keeps_every_row(tmp_path: Path) -> None:
    candles = _minutes("BTCUSDT", 0, 5)
    (part,) = write_candles(tmp_path, [candles[0], candles[2], candles[4]])
    # Same first and last open time as the part on disk (e.g. re-delivered after a crash),
    # with a corrected close: merged into the same file, the newer row winning.
    revised = _candle("BTCUSDT", candles[2].open_time, 555.0)
    assert write_candles(tmp_path, [candles[0], candles[1], revised, candles[4]]) == [part]
    table = read_part(part)
    assert table["open_time"].to_pylist() == [c.open_time for c in candles if c != candles[3]]
    assert table["close"].to_pylist()[2] == 555.0
    assert not [p for p in tmp_path.rglob("*") if p.is_file() and p != part]


def test_skip_archived_writes_only_new_candles(tmp_path: Path) -> None:
    candles = _minutes("BTCUSDT", 0, 6)
    write_candles(tmp_path, candles[:4])
    (part,) = write_candles(tmp_path, candles[2:], skip_archived=True)
    assert read_part(part)["open_time"].to_pylist() == [c.open_time for c in candles[4:]]
    assert write_candles(tmp_path, candles, skip_archived=True) == []


def test_load_series_rejects_a_parquet_file_that_is_not_a_part(tmp_path: Path) -> None:
    bad = tmp_path / "x.parquet"
    bad.write_bytes(b"garbage")
    with pytest.raises(TrainingError, match="not a candle archive part"):
        load_series(bad)
