"""The simulated trading day: exact counts, per-symbol order, worker-valid trades, bursts,
determinism, global time order and bounded memory (no broker)."""

import itertools
import tracemalloc
from collections import defaultdict

import numpy as np
import pytest

from makeusrich.core.errors import ConfigError
from makeusrich.core.schemas import TradeBatch
from makeusrich.stream.app import _invalid_reason
from makeusrich.stream.simday import SLICE_MS, simulate_day

SYMBOLS = ("BTCUSDT", "ETHUSDT", "SOLUSDT", "ABCUSDT")  # the last has no built-in share
START_MS = 1_754_053_200_123  # 2025-08-01 13:00 UTC, off the second on purpose
SPAN_MS = 3_600_500  # an hour and a partial last slice
N_TRADES = 200_000
BATCH_SIZE = 100


def _day(seed: int = 7, batch_size: int = BATCH_SIZE, n_trades: int = N_TRADES
         ) -> list[TradeBatch]:
    return list(simulate_day(SYMBOLS, seed, START_MS, n_trades, batch_size=batch_size,
                             span_ms=SPAN_MS))


@pytest.fixture(scope="module")
def batches() -> list[TradeBatch]:
    return _day()


def _columns(batches: list[TradeBatch]) -> dict[str, dict[str, np.ndarray]]:
    """Each symbol's trades concatenated, column by column."""
    parts: dict[str, list[TradeBatch]] = defaultdict(list)
    for batch in batches:
        parts[batch.symbol].append(batch)
    return {
        symbol: {
            name: np.array(list(itertools.chain.from_iterable(getattr(b, name) for b in bs)))
            for name in ("trade_id", "price", "qty", "quote_qty", "is_buyer_maker", "ts_event")
        }
        for symbol, bs in parts.items()
    }


def test_exact_count_batch_shape_and_uneven_shares(batches: list[TradeBatch]) -> None:
    assert sum(len(b) for b in batches) == N_TRADES
    for batch in batches:
        assert 1 <= len(batch) <= BATCH_SIZE
        assert batch.symbol in SYMBOLS and batch.source == "sim"
        assert batch.ts_ingest == batch.ts_event[-1]
    counts = {symbol: len(c["trade_id"]) for symbol, c in _columns(batches).items()}
    assert set(counts) == set(SYMBOLS)
    assert counts["BTCUSDT"] > counts["ETHUSDT"] > counts["SOLUSDT"] > counts["ABCUSDT"]
    assert counts["BTCUSDT"] > 0.3 * N_TRADES


def test_per_symbol_ids_and_times(batches: list[TradeBatch]) -> None:
    for c in _columns(batches).values():
        ids, ts = c["trade_id"], c["ts_event"]
        assert ids.dtype == np.int64 and ts.dtype == np.int64
        assert np.array_equal(ids, np.arange(1, len(ids) + 1))
        assert np.all(np.diff(ts) >= 0)
        assert ts[0] >= START_MS and ts[-1] < START_MS + SPAN_MS
        assert np.any(np.diff(ts) == 0)  # fills of one order share a millisecond


def test_every_trade_passes_the_workers_checks(batches: list[TradeBatch]) -> None:
    symbols = frozenset(SYMBOLS)
    reasons = {_invalid_reason(t, symbols) for b in batches for t in b.trades()}
    assert reasons == {None}


def test_prices_on_ticks_quantities_on_lots_and_sides(batches: list[TradeBatch]) -> None:
    btc = _columns(batches)["BTCUSDT"]
    price, qty, maker = btc["price"], btc["qty"], btc["is_buyer_maker"]
    assert np.array_equal(np.round(price * 100) / 100, price)  # 0.01 tick
    assert np.array_equal(np.round(qty * 1e5) / 1e5, qty) and qty.min() >= 1e-5  # 1e-5 lot
    assert np.array_equal(btc["quote_qty"], price * qty)
    assert price.min() > 40_000 and price.max() < 80_000  # from 60k (sim_start_price), 1 h on
    assert 0.4 < maker.mean() < 0.6
    assert np.mean(maker[1:] == maker[:-1]) > 0.6  # the taker side persists
    notional = price * qty
    assert np.median(notional) < np.mean(notional) / 3  # heavy right tail


def test_busiest_second_holds_many_times_the_mean(batches: list[TradeBatch]) -> None:
    ts = np.concatenate([np.array(b.ts_event) for b in batches])
    per_second = np.bincount((ts - START_MS) // 1_000)
    assert per_second.max() >= 5 * per_second.mean()


def test_batches_come_in_global_time_order_within_a_slice(batches: list[TradeBatch]) -> None:
    latest_ms = -1
    for batch in batches:
        assert batch.ts_event[0] > latest_ms - SLICE_MS
        latest_ms = max(latest_ms, batch.ts_event[-1])
    # and symbols interleave: the first few seconds already hold every symbol
    assert {b.symbol for b in batches[:50]} == set(SYMBOLS)


def test_deterministic_per_seed(batches: list[TradeBatch]) -> None:
    assert _day() == batches
    assert _day(seed=8) != batches


def test_batch_size_only_changes_the_cuts(batches: list[TradeBatch]) -> None:
    coarse = _day(batch_size=100_000)
    assert all(len(b) <= 100_000 for b in coarse) and len(coarse) < len(batches)
    one, other = _columns(batches), _columns(coarse)
    for symbol in SYMBOLS:
        for name, column in one[symbol].items():
            assert np.array_equal(column, other[symbol][name]), (symbol, name)


def test_a_big_day_streams_in_bounded_memory() -> None:
    tracemalloc.start()
    try:
        day = simulate_day(SYMBOLS, 1, START_MS, 50_000_000)
        first = next(day)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert first.ts_event[0] < START_MS + SLICE_MS
    # 50 million trades held at once would take gigabytes.
    assert peak < 100 * 2**20


def test_no_trades_and_bad_arguments() -> None:
    assert list(simulate_day(SYMBOLS, 1, START_MS, 0, span_ms=SPAN_MS)) == []
    with pytest.raises(ConfigError, match="symbol"):
        simulate_day([], 1, START_MS, 10)
    with pytest.raises(ConfigError, match="count"):
        simulate_day(SYMBOLS, 1, START_MS, -1)
    with pytest.raises(ConfigError, match="span"):
        simulate_day(SYMBOLS, 1, START_MS, 10, span_ms=0)
    with pytest.raises(ConfigError, match="batch size"):
        simulate_day(SYMBOLS, 1, START_MS, 10, batch_size=0)
