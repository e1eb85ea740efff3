"""Replay readers, the simulator and the pacing drivers (no broker)."""

import asyncio
import gzip
import itertools
import json
import time
import zipfile
from collections import Counter, defaultdict
from collections.abc import Iterator
from pathlib import Path

import pytest

from kit.builders import T0_MS, FakePublisher, make_trade, random_trades
from makeusrich.cli import BUNDLED_SAMPLE
from makeusrich.core.errors import ConfigError, IngestError, SourceFormatError
from makeusrich.core.schemas import EndOfStream, Trade, TradeBatch, encode, encode_batch
from makeusrich.core.settings import Settings
from makeusrich.stream.sources import (
    read_batches,
    read_binance_csv,
    read_jsonl,
    read_trades,
    replay_symbols,
    run_replay,
    run_sim,
    simulate_trades,
)

TRADES_ROWS = [
    "109344068,4102.44000000,0.02220800,91.10698752,1554076801991,True,True",
    "109344069,4102.44000000,0.40852400,1675.94519856,1554076802886,True,True",
    "109344070,4102.45000000,0.13788900,565.68134916,1554076802989,False,True",
]
TRADES_HEADER = "id,price,qty,quote_qty,time,is_buyer_maker,is_best_match"
AGG_ROWS = [
    "26129,0.01633102,4.70443515,27781,27781,1498793709153,True,True",
    "26130,0.01633200,0.50000000,27782,27783,1498793712000,False,True",
]
AGG_HEADER = (
    "agg_trade_id,price,quantity,first_trade_id,last_trade_id,transact_time,"
    "is_buyer_maker,is_best_match"
)
# The first lines of ../shared/data/binance/ws/btcusdt-trades-2026-04-11.normalized.jsonl,
# plus one of its derived-feature rows (no "type"; contains Infinity, which is not JSON).
NORMALIZED_LINES = [
    '{"source":"binance","type":"trade","timestamp":1775904659367,"price":72821.66,'
    '"quantity":0.01085,"side":"sell"}',
    '{"source":"binance","type":"trade","timestamp":1775904659443,"price":72821.66,'
    '"quantity":0.00479,"side":"sell"}',
    '{"timestamp":1775920258110,"price":72689.02,"delta":0.00015,"cum_delta":0.00015,'
    '"buy_volume":0.00015,"sell_volume":0.0,"imbalance":Infinity,"trade_intensity":0.0,'
    '"volume_per_sec":0.0,"price_range":0.0,"absorption":false}',
    '{"source":"binance","type":"trade","timestamp":1775904660938,"price":72821.67,'
    '"quantity":0.00082,"side":"buy"}',
]

SLICE_TRADES = "BTCUSDT-trades-2019-04-01-0000-0029.csv"
SLICE_KLINES = "BTCUSDT-1m-2019-04-01-0000-0059.csv"  # the trades slice covers its first 30


def _write(path: Path, lines: list[str]) -> Path:
    path.write_text("\n".join(lines) + "\n")
    return path


def _ws_trade(symbol: str, trade_id: int, price: str, ts_ms: int, maker: bool) -> dict[str, object]:
    return {
        "e": "trade",
        "E": ts_ms + 1,
        "s": symbol,
        "t": trade_id,
        "p": price,
        "q": "0.50000000",
        "T": ts_ms,
        "m": maker,
        "M": True,
    }


# --------------------------------------------------------------------------- CSV


def test_trades_csv_without_header(tmp_path: Path) -> None:
    path = _write(tmp_path / "BTCUSDT-trades-2019-04-01.csv", TRADES_ROWS)
    trades = list(read_trades(path))
    assert [t.trade_id for t in trades] == [109344068, 109344069, 109344070]
    first = trades[0]
    assert first == Trade(
        symbol="BTCUSDT",
        trade_id=109344068,
        price=4102.44,
        qty=0.022208,
        quote_qty=91.10698752,
        is_buyer_maker=True,
        ts_event=1554076801991,
        ts_ingest=0,
        source="replay",
    )
    assert trades[2].is_buyer_maker is False


def test_trades_csv_with_header_and_crlf(tmp_path: Path) -> None:
    path = tmp_path / "BTCUSDT-trades-2019-04-01.csv"
    path.write_bytes(("\r\n".join([TRADES_HEADER, *TRADES_ROWS]) + "\r\n").encode())
    trades = list(read_trades(path))
    assert [t.trade_id for t in trades] == [109344068, 109344069, 109344070]
    assert trades[-1].price == 4102.45


def test_trades_csv_in_zip(tmp_path: Path) -> None:
    path = tmp_path / "BTCUSDT-trades-2019-04.zip"
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_DEFLATED) as archive:
        archive.writestr("BTCUSDT-trades-2019-04.csv", "\n".join(TRADES_ROWS) + "\n")
    trades = list(read_trades(path))
    assert len(trades) == 3
    assert {t.symbol for t in trades} == {"BTCUSDT"}
    assert replay_symbols(path) == ("BTCUSDT",)


def test_zip_with_two_csvs_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "BTCUSDT-trades-2019-04.zip"
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr("a.csv", TRADES_ROWS[0])
        archive.writestr("b.csv", TRADES_ROWS[1])
    with pytest.raises(SourceFormatError, match="exactly one"):
        list(read_trades(path))


def test_trades_csv_gz(tmp_path: Path) -> None:
    path = tmp_path / "ETHUSDT-trades-2019-04-01.csv.gz"
    path.write_bytes(gzip.compress(("\n".join(TRADES_ROWS) + "\n").encode()))
    assert [t.symbol for t in read_trades(path)] == ["ETHUSDT"] * 3


def test_microsecond_times_become_ms(tmp_path: Path) -> None:
    rows = [
        "5000000001,95000.01000000,0.00100000,95.00001000,1735689600123456,False,True",
        "5000000002,95000.02000000,0.00200000,190.00004000,1735689600999999,True,True",
    ]
    trades = list(read_trades(_write(tmp_path / "BTCUSDT-trades-2025-01-01.csv", rows)))
    assert [t.ts_event for t in trades] == [1735689600123, 1735689600999]


def test_agg_trades_csv(tmp_path: Path) -> None:
    path = _write(tmp_path / "ETHBTC-aggTrades-2017-06-30.csv", AGG_ROWS)
    trades = list(read_trades(path))
    assert [t.trade_id for t in trades] == [26129, 26130]
    assert trades[0].symbol == "ETHBTC"
    assert trades[0].ts_event == 1498793709153
    assert trades[0].quote_qty == pytest.approx(0.01633102 * 4.70443515)
    assert [t.is_buyer_maker for t in trades] == [True, False]


def test_agg_trades_detected_by_header_or_column_count(tmp_path: Path) -> None:
    with_header = _write(tmp_path / "with-header.csv", [AGG_HEADER, *AGG_ROWS])
    by_count = _write(tmp_path / "by-count.csv", AGG_ROWS)
    for path in (with_header, by_count):
        trades = list(read_trades(path, symbol="ethbtc"))
        assert [(t.symbol, t.trade_id, t.ts_event) for t in trades] == [
            ("ETHBTC", 26129, 1498793709153),
            ("ETHBTC", 26130, 1498793712000),
        ]


def test_symbol_override_and_missing_symbol(tmp_path: Path) -> None:
    named = _write(tmp_path / "BTCUSDT-trades-2019-04-01.csv", TRADES_ROWS)
    assert {t.symbol for t in read_trades(named, symbol="xbtusd")} == {"XBTUSD"}
    unnamed = _write(tmp_path / "trades.csv", TRADES_ROWS)
    with pytest.raises(SourceFormatError, match="symbol"):
        read_trades(unnamed)
    with pytest.raises(SourceFormatError, match="symbol"):
        replay_symbols(unnamed)


@pytest.mark.parametrize(
    ("bad_row", "reason"),
    [
        ("109344071,4102.45000000,0.1,410.245,1554076803000,True", "columns"),
        ("109344071,not-a-price,0.1,410.245,1554076803000,True,True", "bad value"),
        ("109344071,4102.45000000,0.1,410.245,1554076803000,Maybe,True", "bad value"),
        ("109344071,0,0.1,0,1554076803000,True,True", "price"),
    ],
)
def test_malformed_csv_line_names_file_and_line(tmp_path: Path, bad_row: str, reason: str) -> None:
    path = _write(tmp_path / "BTCUSDT-trades-2019-04-01.csv", [*TRADES_ROWS[:2], bad_row])
    reader = read_trades(path)
    assert next(reader).trade_id == 109344068  # good lines before the bad one still come out
    with pytest.raises(SourceFormatError, match=rf"BTCUSDT-trades-2019-04-01\.csv:3: .*{reason}"):
        list(reader)


def test_empty_or_missing_file(tmp_path: Path) -> None:
    with pytest.raises(IngestError, match="not found"):
        read_trades(tmp_path / "BTCUSDT-trades-nope.csv")
    empty = _write(tmp_path / "BTCUSDT-trades-2019-04-01.csv", [TRADES_HEADER])
    with pytest.raises(SourceFormatError, match="no trades"):
        list(read_binance_csv(empty))


# --------------------------------------------------------------------------- JSONL


def test_jsonl_combined_stream_and_bare_messages(tmp_path: Path) -> None:
    lines = [
        json.dumps({"result": None, "id": 1}),  # subscription reply: skipped
        json.dumps(
            {"stream": "btcusdt@trade", "data": _ws_trade("BTCUSDT", 10, "60000.10", T0_MS, True)}
        ),
        json.dumps(
            {"stream": "ethusdt@trade", "data": _ws_trade("ETHUSDT", 7, "3000.5", T0_MS + 5, False)}
        ),
        json.dumps({"stream": "btcusdt@kline_1m", "data": {"e": "kline", "s": "BTCUSDT"}}),
        json.dumps(_ws_trade("BTCUSDT", 11, "60000.20", T0_MS + 9, False)),  # bare data object
        json.dumps(
            {
                "e": "aggTrade",
                "s": "BTCUSDT",
                "a": 500,
                "p": "60000.30",
                "q": "2",
                "f": 12,
                "l": 13,
                "T": T0_MS + 20,
                "m": True,
            }
        ),
    ]
    path = _write(tmp_path / "recording.jsonl", lines)
    trades = list(read_trades(path))
    assert [(t.symbol, t.trade_id, t.ts_event) for t in trades] == [
        ("BTCUSDT", 10, T0_MS),
        ("ETHUSDT", 7, T0_MS + 5),
        ("BTCUSDT", 11, T0_MS + 9),
        ("BTCUSDT", 500, T0_MS + 20),
    ]
    assert trades[0].price == 60000.10
    assert trades[0].qty == 0.5
    assert trades[0].quote_qty == pytest.approx(30000.05)
    assert [t.is_buyer_maker for t in trades] == [True, False, False, True]
    assert {t.source for t in trades} == {"replay"}
    # Records that name their symbol are filtered by the symbol argument.
    assert [t.trade_id for t in read_jsonl(path, symbol="ethusdt")] == [7]
    assert replay_symbols(path) == ("BTCUSDT", "ETHUSDT")
    assert replay_symbols(path, symbol="ETHUSDT") == ("ETHUSDT",)


def test_jsonl_of_trades_topic_records(tmp_path: Path) -> None:
    trades = random_trades(2_500, seed=4, symbols=("BTCUSDT", "ETHUSDT"), source="sim")
    btc = [t for t in trades if t.symbol == "BTCUSDT"]
    eth = [t for t in trades if t.symbol == "ETHUSDT"]
    lines = [encode(TradeBatch.of(btc[:1_000])), encode(eth[0]),
             encode_batch(TradeBatch.of(eth[1:])),
             encode(EndOfStream("ETHUSDT", eth[-1].ts_event, 0)),
             encode_batch(TradeBatch.of(btc[1_000:]))]
    path = tmp_path / "topic.jsonl"
    path.write_bytes(b"\n".join(lines) + b"\n")
    replayed = list(read_trades(path))
    assert [(t.symbol, t.trade_id, t.price, t.qty, t.ts_event) for t in replayed] == [
        (t.symbol, t.trade_id, t.price, t.qty, t.ts_event) for t in btc[:1_000] + eth + btc[1_000:]]
    assert {t.source for t in replayed} == {"replay"}  # replayed data never passes as live
    assert [t.trade_id for t in read_trades(path, "ETHUSDT")] == [t.trade_id for t in eth]
    assert replay_symbols(path) == ("BTCUSDT", "ETHUSDT")
    # Read as batches, a recorded batch passes whole; a single trade becomes one.
    batches = list(read_batches(path))
    assert [(b.symbol, len(b)) for b in batches] == [
        ("BTCUSDT", 1_000), ("ETHUSDT", 1), ("ETHUSDT", len(eth) - 1),
        ("BTCUSDT", len(btc) - 1_000)]
    assert [t for b in batches for t in b.trades()] == replayed
    path.write_bytes(lines[0] + b"\n" + lines[2][:-30] + b"\n")
    with pytest.raises(SourceFormatError, match=r"topic.jsonl:2: bad trades record"):
        list(read_trades(path))


def test_jsonl_sniffed_without_extension_and_gz(tmp_path: Path) -> None:
    line = json.dumps(_ws_trade("SOLUSDT", 1, "150.0", T0_MS, False))
    plain = _write(tmp_path / "capture.log", [line])
    assert [t.symbol for t in read_trades(plain)] == ["SOLUSDT"]
    packed = tmp_path / "capture.jsonl.gz"
    packed.write_bytes(gzip.compress((line + "\n").encode()))
    assert [t.symbol for t in read_trades(packed)] == ["SOLUSDT"]
    assert replay_symbols(packed) == ("SOLUSDT",)


def test_normalized_capture(tmp_path: Path) -> None:
    path = _write(tmp_path / "btcusdt-trades-2026-04-11.normalized.jsonl", NORMALIZED_LINES)
    trades = list(read_trades(path))
    assert [(t.trade_id, t.ts_event, t.price, t.qty) for t in trades] == [
        (1, 1775904659367, 72821.66, 0.01085),
        (2, 1775904659443, 72821.66, 0.00479),
        (3, 1775904660938, 72821.67, 0.00082),
    ]
    assert {t.symbol for t in trades} == {"BTCUSDT"}
    # "sell" = the taker sold, so the buyer was the maker.
    assert [t.is_buyer_maker for t in trades] == [True, True, False]
    assert replay_symbols(path) == ("BTCUSDT",)
    unnamed = _write(tmp_path / "capture.jsonl", NORMALIZED_LINES)
    with pytest.raises(SourceFormatError, match="symbol"):
        list(read_trades(unnamed))
    assert {t.symbol for t in read_trades(unnamed, symbol="BTCUSDT")} == {"BTCUSDT"}


@pytest.mark.parametrize(
    ("bad_line", "reason"),
    [
        ('{"stream": "btcusdt@trade", "data": {"e": "trade", "s": "BTC', "not JSON"),
        ('{"e": "trade", "s": "BTCUSDT", "t": 3, "p": "1", "q": "1", "m": false}', "'T'"),
        ('{"e": "trade", "s": "BTCUSDT", "t": 3, "p": "x", "q": "1", "T": 1, "m": false}', "bad"),
        ("[1, 2, 3]", "JSON object"),
    ],
)
def test_malformed_jsonl_line_names_file_and_line(
    tmp_path: Path, bad_line: str, reason: str
) -> None:
    good = [json.dumps(_ws_trade("BTCUSDT", i, "1.0", T0_MS + i, False)) for i in (1, 2)]
    path = _write(tmp_path / "recording.jsonl", [*good, "", bad_line])
    with pytest.raises(SourceFormatError, match=rf"recording\.jsonl:4: .*{reason}"):
        list(read_trades(path))


def test_jsonl_without_trades_is_an_error(tmp_path: Path) -> None:
    path = _write(tmp_path / "recording.jsonl", [json.dumps({"result": None, "id": 1})])
    with pytest.raises(SourceFormatError, match="no trades"):
        list(read_trades(path))


# --------------------------------------------------------------------------- test data slice


def _minute_counts(trades: list[Trade]) -> dict[int, tuple[int, float]]:
    by_minute: dict[int, list[Trade]] = defaultdict(list)
    for trade in trades:
        by_minute[trade.ts_event // 60_000 * 60_000].append(trade)
    return {m: (len(ts), sum(t.qty for t in ts)) for m, ts in by_minute.items()}


def test_data_slice_matches_binance_klines(data_dir: Path) -> None:
    trades = list(read_trades(data_dir / SLICE_TRADES))
    assert len(trades) == 6475
    ids = [t.trade_id for t in trades]
    assert ids == list(range(109344068, 109350543))
    assert trades[0].ts_event >= T0_MS and trades[-1].ts_event < T0_MS + 30 * 60_000
    klines = [line.split(",") for line in (data_dir / SLICE_KLINES).read_text().splitlines()]
    klines = klines[:30]
    assert [int(k[0]) for k in klines] == [T0_MS + i * 60_000 for i in range(30)]
    counts = _minute_counts(trades)
    for kline in klines:
        count, volume = counts[int(kline[0])]
        assert count == int(kline[8])
        assert volume == pytest.approx(float(kline[5]), rel=1e-9)


def test_bundled_sample_extends_the_test_slice(data_dir: Path) -> None:
    """`--source auto` replays the package's hour of trades when Binance is unreachable;
    its first half is the test slice and its trade counts match Binance's klines."""
    bundled = list(read_trades(BUNDLED_SAMPLE))
    head = list(read_trades(data_dir / SLICE_TRADES))
    assert bundled[: len(head)] == head
    klines = [line.split(",") for line in (data_dir / SLICE_KLINES).read_text().splitlines()]
    counts = _minute_counts(bundled)
    assert [counts[int(k[0])][0] for k in klines] == [int(k[8]) for k in klines]


# --------------------------------------------------------------------------- simulator


def test_sim_is_deterministic_and_plausible() -> None:
    symbols = ("BTCUSDT", "ETHUSDT", "DOGEUSDT", "FOOBAR")
    first = list(simulate_trades(symbols, seed=42, trades_per_s=20.0, start_ms=T0_MS, n=4000))
    again = list(simulate_trades(symbols, seed=42, trades_per_s=20.0, start_ms=T0_MS, n=4000))
    other = list(simulate_trades(symbols, seed=43, trades_per_s=20.0, start_ms=T0_MS, n=4000))
    assert first == again
    assert first != other
    assert len(first) == 4000
    assert {t.symbol for t in first} == set(symbols)
    assert {t.source for t in first} == {"sim"}
    times = [t.ts_event for t in first]
    assert times == sorted(times) and times[0] >= T0_MS
    ids: dict[str, list[int]] = defaultdict(list)
    for trade in first:
        ids[trade.symbol].append(trade.trade_id)
        assert trade.price > 0 and trade.qty > 0
        assert trade.quote_qty == pytest.approx(trade.price * trade.qty)
    for symbol_ids in ids.values():
        assert symbol_ids == list(range(1, len(symbol_ids) + 1))
    btc = [t.price for t in first if t.symbol == "BTCUSDT"]
    assert min(btc) > 40_000 and max(btc) < 90_000
    assert all(1 <= t.price < 110 for t in first if t.symbol == "FOOBAR")
    # Roughly trades_per_s per symbol (bursts add some).
    span_s = (times[-1] - times[0]) / 1000
    assert 20 * 4 * 0.7 < len(first) / span_s < 20 * 4 * 3
    assert 0.3 < sum(t.is_buyer_maker for t in first) / len(first) < 0.7


def test_sim_rejects_bad_arguments() -> None:
    with pytest.raises(ConfigError):
        simulate_trades((), seed=1, trades_per_s=1.0, start_ms=T0_MS)
    with pytest.raises(ConfigError):
        simulate_trades(("BTCUSDT",), seed=1, trades_per_s=0.0, start_ms=T0_MS)


# --------------------------------------------------------------------------- drivers


async def test_run_replay_as_fast_as_possible() -> None:
    trades = random_trades(5000, seed=3, symbols=("BTCUSDT", "ETHUSDT"), mean_gap_ms=1000.0)
    publisher = FakePublisher()
    before_ms = time.time_ns() // 1_000_000
    started = time.monotonic()
    count = await run_replay(trades, publisher, asyncio.Event(), speed=None)
    assert time.monotonic() - started < 5  # 5000 trades spanning ~80 min of event time
    assert count == 5000
    assert publisher.flushes >= 1
    sent_trades = publisher.trades
    assert [t.trade_id for t in sent_trades] == [t.trade_id for t in trades]
    assert all(t.ts_ingest >= before_ms for t in sent_trades)
    assert [t.ts_event for t in sent_trades] == [t.ts_event for t in trades]
    eos = publisher.end_of_streams
    assert {e.symbol for e in eos} == {"BTCUSDT", "ETHUSDT"}
    for end in eos:
        last_index = max(
            i
            for i, m in enumerate(publisher.sent)
            if isinstance(m, Trade) and m.symbol == end.symbol
        )
        assert publisher.sent.index(end) > last_index
        assert end.ts_event == max(t.ts_event for t in trades if t.symbol == end.symbol)
        assert end.source == "replay"
    assert Counter(type(m) for m in publisher.sent) == {Trade: 5000, EndOfStream: 2}


def test_csv_trades_are_read_as_batches_of_one_symbol(tmp_path: Path) -> None:
    rows = [f"{i},4100.5,0.01,41.005,{T0_MS + i},True,True" for i in range(2_500)]
    path = _write(tmp_path / "BTCUSDT-trades-2019-04-01.csv", rows)
    batches = list(read_batches(path, batch_size=1_000))
    assert [len(b) for b in batches] == [1_000, 1_000, 500]
    assert [t for b in batches for t in b.trades()] == list(read_trades(path))


async def test_run_replay_hands_batches_on_whole_unless_paced() -> None:
    trades = random_trades(3_000, seed=5, symbols=("BTCUSDT", "ETHUSDT"), mean_gap_ms=1.0)
    of_symbol = {s: [t for t in trades if t.symbol == s] for s in ("BTCUSDT", "ETHUSDT")}
    batches = [TradeBatch.of(of_symbol[s][i:i + 500])
               for i in range(0, 3_000, 500) for s in of_symbol if of_symbol[s][i:i + 500]]
    fast = FakePublisher()
    assert await run_replay(batches, fast, asyncio.Event(), speed=None) == 3_000
    assert fast.batches == len(batches)
    paced_out = FakePublisher()
    assert await run_replay(batches, paced_out, asyncio.Event(), speed=1_000.0) == 3_000
    assert paced_out.batches == 0  # a batch can span minutes: paced goes trade by trade
    for publisher in (fast, paced_out):
        sent = [(t.symbol, t.trade_id, t.ts_event) for t in publisher.trades]
        assert sent == [(t.symbol, t.trade_id, t.ts_event) for b in batches for t in b.trades()]
        assert {e.symbol: e.ts_event for e in publisher.end_of_streams} == {
            s: [t for t in trades if t.symbol == s][-1].ts_event for s in ("BTCUSDT", "ETHUSDT")}


async def test_run_replay_without_eos_flag() -> None:
    publisher = FakePublisher()
    count = await run_replay(
        random_trades(10), publisher, asyncio.Event(), speed=None, symbols_done_eos=False
    )
    assert count == 10
    assert publisher.end_of_streams == []


async def test_run_replay_stops_on_event_without_eos() -> None:
    stop = asyncio.Event()
    source = random_trades(100)

    def trades() -> Iterator[Trade]:
        for index, trade in enumerate(source):
            if index == 40:
                stop.set()
            yield trade

    publisher = FakePublisher()
    count = await run_replay(trades(), publisher, stop, speed=None)
    assert count == 40
    assert publisher.end_of_streams == []  # interrupted, not finished: candles stay open
    assert publisher.flushes == 1


async def test_run_replay_paces_by_event_time() -> None:
    trades = [make_trade(trade_id=i, ts_event=T0_MS + 100 * i) for i in range(3)]
    publisher = FakePublisher()
    started = time.monotonic()
    assert await run_replay(trades, publisher, asyncio.Event(), speed=1.0) == 3
    assert time.monotonic() - started >= 0.18
    times_s = publisher.sent_at_s[:3]  # the three trades; the EndOfStream follows
    gaps = [b - a for a, b in itertools.pairwise(times_s)]
    assert all(gap >= 0.08 for gap in gaps)

    fast = FakePublisher()
    trades = [make_trade(trade_id=i, ts_event=T0_MS + 1000 * i) for i in range(3)]
    started = time.monotonic()
    await run_replay(trades, fast, asyncio.Event(), speed=10.0)
    assert 0.18 <= time.monotonic() - started < 1.5


async def test_run_replay_stop_interrupts_a_long_wait() -> None:
    trades = [make_trade(trade_id=1), make_trade(trade_id=2, ts_event=T0_MS + 3_600_000)]
    stop = asyncio.Event()
    publisher = FakePublisher()
    asyncio.get_running_loop().call_later(0.1, stop.set)
    started = time.monotonic()
    assert await run_replay(trades, publisher, stop, speed=1.0) == 1
    assert time.monotonic() - started < 2


async def test_run_replay_rejects_bad_speed() -> None:
    with pytest.raises(ConfigError):
        await run_replay([], FakePublisher(), asyncio.Event(), speed=0.0)


async def test_run_sim_with_limit_sends_eos_and_wall_clock_times() -> None:
    settings = Settings(symbols=("BTCUSDT", "ETHUSDT"), sim_trades_per_s=400.0, sim_seed=5)
    publisher = FakePublisher()
    before_ms = time.time_ns() // 1_000_000
    count = await run_sim(settings, publisher, asyncio.Event(), n=60)
    after_ms = time.time_ns() // 1_000_000
    assert count == 60
    trades = publisher.trades
    assert all(before_ms <= t.ts_event <= after_ms and t.source == "sim" for t in trades)
    assert {e.symbol for e in publisher.end_of_streams} == {"BTCUSDT", "ETHUSDT"}
    assert publisher.sent[-2:] == publisher.end_of_streams
    for symbol in ("BTCUSDT", "ETHUSDT"):
        times = [t.ts_event for t in trades if t.symbol == symbol]
        assert times == sorted(times)


async def test_run_sim_until_stopped_sends_no_eos() -> None:
    settings = Settings(symbols=("BTCUSDT",), sim_trades_per_s=200.0)
    stop = asyncio.Event()
    asyncio.get_running_loop().call_later(0.2, stop.set)
    publisher = FakePublisher()
    count = await run_sim(settings, publisher, stop)
    assert count > 5
    assert publisher.end_of_streams == []
