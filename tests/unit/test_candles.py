"""CandleBuilder against a straightforward reference over seeded random trades."""

import itertools
import json
import random
from collections import defaultdict

import numpy as np
import pytest

from makeusrich.core.schemas import Candle, Trade, TradeBatch
from makeusrich.stream.candles import CandleBuilder, TradeColumns, UpdateResult

MIN_MS = 60_000
# The builders here count a trade of 100 quote units or more as large: about half the random
# trades (price ~100, qty 0.001 .. 2), so both sides of the threshold are exercised.
LARGE = 100.0


def _trade(trade_id: int, ts: int, price: float, qty: float = 1.0, maker: bool = False) -> Trade:
    return Trade("BTCUSDT", trade_id, price, qty, price * qty, maker, ts, ts)


def _random_trades(seed: int, n: int, jitter_ms: int) -> list[Trade]:
    """Increasing ids; event times with gaps (whole empty minutes), ties and jitter."""
    rng = random.Random(seed)
    ts = 1_700_000_000_000 - 1_700_000_000_000 % MIN_MS + 5_000
    price = 100.0
    trades = []
    for trade_id in range(1, n + 1):
        step = rng.choice([0, 0, 1, 50, 700, 3_000, 20_000])
        if rng.random() < 0.02:
            step = rng.randint(2, 4) * MIN_MS  # gap of several empty minutes
        ts += step
        price = round(price * (1 + rng.gauss(0, 0.001)), 2)
        jitter = -rng.randint(0, jitter_ms) if jitter_ms else 0
        trades.append(_trade(trade_id, ts + jitter, price, round(rng.uniform(0.001, 2), 6),
                             rng.random() < 0.5))
    return trades


def _reference(trades: list[Trade], interval_ms: int, grace_ms: int) -> tuple[list[dict], int]:
    """Plain group-by over the trades that were not late; gaps carry the previous close."""
    watermark = -1
    accepted: dict[int, list[Trade]] = defaultdict(list)
    late = 0
    for t in trades:
        open_ms = t.ts_event - t.ts_event % interval_ms
        if open_ms + interval_ms + grace_ms <= watermark:  # its candle has closed
            late += 1
            continue
        accepted[open_ms].append(t)
        watermark = max(watermark, t.ts_event)
    out = []
    prev_close = None
    for open_ms in range(min(accepted), max(accepted) + interval_ms, interval_ms):
        group = sorted(accepted.get(open_ms, []), key=lambda t: t.trade_id)
        if not group:
            assert prev_close is not None
            out.append(dict(open_time=open_ms, open=prev_close, high=prev_close, low=prev_close,
                            close=prev_close, volume=0.0, trades=0, taker_buy_volume=0.0,
                            large_trade_quote_volume=0.0))
            continue
        volume = taker = large = 0.0
        for t in group:
            volume += t.qty
            if not t.is_buyer_maker:
                taker += t.qty
            if t.price * t.qty >= LARGE:
                large += t.quote_qty
        out.append(dict(
            open_time=open_ms, open=group[0].price, high=max(t.price for t in group),
            low=min(t.price for t in group), close=group[-1].price, volume=volume,
            trades=len(group), taker_buy_volume=taker, large_trade_quote_volume=large,
        ))
        prev_close = group[-1].price
    return out, late


def _build(trades: list[Trade], interval: str, grace_ms: int) -> tuple[list[Candle], CandleBuilder]:
    builder = CandleBuilder("BTCUSDT", interval, grace_ms, LARGE)
    candles: list[Candle] = []
    for t in trades:
        builder.update(t)
        candles += builder.closed()
    builder.flush()
    candles += builder.closed()
    return candles, builder


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize(("interval", "grace_ms", "jitter_ms"), [
    ("1m", 0, 0), ("1m", 2_000, 1_500), ("1m", 2_000, 30_000), ("5m", 10_000, 25_000),
    ("1s", 300, 800),
])
def test_matches_reference(seed: int, interval: str, grace_ms: int, jitter_ms: int) -> None:
    trades = _random_trades(seed, 3_000, jitter_ms)
    interval_ms = CandleBuilder("X", interval, 0).interval_ms
    expected, expected_late = _reference(trades, interval_ms, grace_ms)
    candles, builder = _build(trades, interval, grace_ms)
    got = [
        dict(open_time=c.open_time, open=c.open, high=c.high, low=c.low, close=c.close,
             volume=c.volume, trades=c.trades, taker_buy_volume=c.taker_buy_volume,
             large_trade_quote_volume=c.large_trade_quote_volume)
        for c in candles
    ]
    assert got == expected
    assert builder.late_trades == expected_late


@pytest.mark.parametrize("seed", range(4))
def test_invariants(seed: int) -> None:
    trades = _random_trades(seed, 2_000, 1_000)
    candles, builder = _build(trades, "1m", 2_000)
    assert builder.late_trades + sum(c.trades for c in candles) == len(trades)
    for prev, cur in itertools.pairwise(candles):
        assert cur.open_time == prev.open_time + MIN_MS  # contiguous, no gaps
        if cur.trades == 0:
            assert cur.open == cur.high == cur.low == cur.close == prev.close
            assert cur.large_trade_quote_volume == 0.0
    for c in candles:
        assert c.close_time == c.open_time + MIN_MS - 1
        assert c.open_time % MIN_MS == 0
        assert c.low <= min(c.open, c.close) <= max(c.open, c.close) <= c.high
        assert 0 <= c.taker_buy_volume <= c.volume + 1e-9
        assert c.quote_volume >= 0
        # Summed in the same order as quote_volume, a part of it: never above, not even by
        # a rounding.
        assert c.large_trade_quote_volume is not None
        assert 0 <= c.large_trade_quote_volume <= c.quote_volume
    assert any(0 < c.large_trade_quote_volume < c.quote_volume for c in candles
               if c.large_trade_quote_volume is not None)


def test_large_trades_are_those_of_the_threshold_notional_or_more() -> None:
    ts = 1_700_000_040_000
    builder = CandleBuilder("BTCUSDT", "1m", 0, large_trade_quote=1_000.0)
    for trade in (_trade(1, ts, 100.0, 9.99), _trade(2, ts, 100.0, 10.0),
                  _trade(3, ts, 200.0, 20.0, maker=True)):
        builder.update(trade)
    builder.flush()
    (c,) = builder.closed()
    assert c.quote_volume == pytest.approx(999.0 + 1_000.0 + 4_000.0)
    assert c.large_trade_quote_volume == 5_000.0  # the trade at exactly 1,000 counts
    assert CandleBuilder("BTCUSDT", "1m", 0).large_trade_quote == 100_000.0  # the default


def test_equal_timestamps_order_by_trade_id() -> None:
    ts = 1_700_000_040_000
    trades = [_trade(1, ts, 10.0), _trade(2, ts, 12.0), _trade(3, ts, 9.0), _trade(4, ts, 11.0)]
    candles, _ = _build(trades, "1m", 0)
    (c,) = candles
    assert (c.open, c.high, c.low, c.close, c.trades) == (10.0, 12.0, 9.0, 11.0, 4)


def test_out_of_order_within_grace_lands_in_its_candle() -> None:
    base = 1_700_000_040_000 - 1_700_000_040_000 % MIN_MS
    builder = CandleBuilder("BTCUSDT", "1m", 2_000)
    assert builder.update(_trade(1, base + 59_000, 10.0)) is UpdateResult.ACCEPTED
    assert builder.update(_trade(2, base + MIN_MS + 500, 11.0)) is UpdateResult.ACCEPTED
    assert builder.closed() == []  # end + grace not yet passed
    assert builder.update(_trade(3, base + 59_900, 12.0)) is UpdateResult.ACCEPTED
    assert builder.update(_trade(4, base + MIN_MS + 2_000, 11.5)) is UpdateResult.ACCEPTED
    (first,) = builder.closed()
    assert (first.open_time, first.close, first.high, first.trades) == (base, 12.0, 12.0, 2)


def test_late_beyond_grace_is_reported_not_folded() -> None:
    base = 1_700_000_040_000 - 1_700_000_040_000 % MIN_MS
    builder = CandleBuilder("BTCUSDT", "1m", 1_000)
    builder.update(_trade(1, base + 1_000, 10.0))
    builder.update(_trade(2, base + MIN_MS + 1_000, 11.0))
    (closed,) = builder.closed()
    assert builder.update(_trade(3, base + 30_000, 99.0)) is UpdateResult.LATE
    assert builder.late_trades == 1
    builder.flush()
    (second,) = builder.closed()
    assert closed.high == 10.0 and second.high == 11.0


def test_duplicate_trade_ids_are_ignored() -> None:
    builder = CandleBuilder("BTCUSDT", "1m", 0)
    t = _trade(7, 1_700_000_040_000, 10.0)
    assert builder.update(t) is UpdateResult.ACCEPTED
    assert builder.update(t) is UpdateResult.DUPLICATE
    builder.flush()
    (c,) = builder.closed()
    assert c.trades == 1 and builder.duplicate_trades == 1


def test_snapshot_restore_resumes_mid_candle() -> None:
    trades = _random_trades(11, 1_500, 1_000)
    whole, _ = _build(trades, "1m", 2_000)
    builder = CandleBuilder("BTCUSDT", "1m", 2_000, LARGE)
    candles: list[Candle] = []
    for i, t in enumerate(trades):
        if i % 400 == 0:  # simulate a worker restart from the table snapshot
            # Through JSON, as the worker's table stores it.
            state = json.loads(json.dumps(builder.snapshot()))
            builder = CandleBuilder.restore("BTCUSDT", "1m", 2_000, state, LARGE)
        builder.update(t)
        candles += builder.closed()
    builder.flush()
    candles += builder.closed()
    assert _fields(candles) == _fields(whole)


def test_a_snapshot_from_before_large_trades_restores_them_as_unknown() -> None:
    base = 1_700_000_040_000 - 1_700_000_040_000 % MIN_MS
    builder = CandleBuilder("BTCUSDT", "1m", 0, LARGE)
    builder.update(_trade(1, base + 1_000, 100.0, 2.0))
    state = builder.snapshot()
    # The format before: each open candle's values without the last one.
    state["open"] = {key: values[:-1] for key, values in state["open"].items()}
    restored = CandleBuilder.restore("BTCUSDT", "1m", 0, state, LARGE)
    restored.update(_trade(2, base + 2_000, 100.0, 3.0))
    restored.update(_trade(3, base + MIN_MS + 1_000, 100.0, 3.0))
    # Its large trades before the snapshot are not known: the candle says so.
    (first,) = restored.closed()
    assert (first.trades, first.quote_volume, first.large_trade_quote_volume) == (2, 500.0, None)
    assert restored.snapshot()["open"][str(base + MIN_MS)][-1] == 300.0  # the next one knows
    restored.flush()
    (second,) = restored.closed()
    assert second.large_trade_quote_volume == 300.0


# ---- the batch path: update_batch must equal update, trade by trade, bit for bit -------------


def _columns(trades: list[Trade]) -> TradeColumns:
    return TradeColumns.of(TradeBatch.of(trades))


def _with_duplicates(trades: list[Trade], seed: int) -> list[Trade]:
    """Redeliveries: some trades again, right after or a little later."""
    rng = random.Random(seed)
    out: list[Trade] = []
    for t in trades:
        out.append(t)
        if rng.random() < 0.03:
            out.append(rng.choice(out[-20:]))
    return out


def _batches(trades: list[Trade], seed: int) -> list[list[Trade]]:
    rng = random.Random(seed)
    batches, i = [], 0
    while i < len(trades):
        size = rng.choice([1, 2, 7, 50, 333, 1_000])
        batches.append(trades[i:i + size])
        i += size
    return batches


def _fields(candles: list[Candle]) -> list[tuple[object, ...]]:
    """Everything but ts_ingest (the wall clock when the candle closed)."""
    return [tuple(getattr(c, f) for f in Candle.__struct_fields__ if f != "ts_ingest")
            for c in candles]


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize(("interval", "grace_ms", "jitter_ms"), [
    ("1m", 0, 0), ("1m", 2_000, 30_000), ("1s", 300, 800), ("5m", 10_000, 25_000),
])
def test_batches_equal_trade_by_trade(seed: int, interval: str, grace_ms: int,
                                      jitter_ms: int) -> None:
    trades = _with_duplicates(_random_trades(seed, 3_000, jitter_ms), seed)
    one, many = (CandleBuilder("BTCUSDT", interval, grace_ms, LARGE) for _ in range(2))
    expected: list[Candle] = []
    results = []
    for t in trades:
        results.append(one.update(t))
        expected += one.closed()
    got: list[Candle] = []
    duplicate_masks, late_masks = [], []
    for batch in _batches(trades, seed):
        duplicate, late = many.update_batch(_columns(batch))
        duplicate_masks += duplicate.tolist()
        late_masks += late.tolist()
        got += many.closed()
    assert duplicate_masks == [r is UpdateResult.DUPLICATE for r in results]
    assert late_masks == [r is UpdateResult.LATE for r in results]
    assert any(duplicate_masks) and (any(late_masks) or jitter_ms == 0)
    assert _fields(got) == _fields(expected)
    assert any(0 < (c.large_trade_quote_volume or 0) < c.quote_volume for c in got)
    assert many.snapshot() == one.snapshot()  # open candles too, to the last bit
    for builder in (one, many):
        builder.flush()
    assert _fields(many.closed()) == _fields(one.closed())


def test_batches_mix_with_single_trades_and_snapshots() -> None:
    trades = _random_trades(5, 2_000, 1_500)
    whole, _ = _build(trades, "1m", 2_000)
    builder = CandleBuilder("BTCUSDT", "1m", 2_000, LARGE)
    candles: list[Candle] = []
    for i, batch in enumerate(_batches(trades, 5)):
        if i % 3 == 0:  # a restart from the snapshot between two messages
            builder = CandleBuilder.restore("BTCUSDT", "1m", 2_000, builder.snapshot(), LARGE)
        if i % 2:
            for t in batch:
                builder.update(t)
        else:
            builder.update_batch(_columns(batch))
        candles += builder.closed()
    builder.flush()
    candles += builder.closed()
    assert _fields(candles) == _fields(whole)


def test_empty_batch_changes_nothing() -> None:
    builder = CandleBuilder("BTCUSDT", "1m", 0)
    builder.update(_trade(1, 1_700_000_040_000, 10.0))
    before = builder.snapshot()
    duplicate, late = builder.update_batch(_columns([_trade(2, 1, 1.0)]).select(
        np.zeros(1, np.bool_)))
    assert (len(duplicate), len(late)) == (0, 0)
    assert builder.snapshot() == before
