"""A simulated trading day at exchange volumes, for benchmarks and replays without files.

``simulate_day`` spreads exactly ``n_trades`` over ``[start_ms, start_ms + span_ms)`` and
yields them as :class:`TradeBatch` messages: the span is cut into 1 s slices
(:data:`SLICE_MS`) and each slice's trades go out symbol after symbol, so batches come in
global event-time order to within one slice and symbols interleave as on a live stream.
Trades are generated with numpy a chunk of slices at a time (~65k trades): memory holds
a count plan of a few bytes per symbol and second, and one chunk, never the whole day.

The model, per symbol (parameters calibrated on Binance BTCUSDT 1m klines of Aug-Nov 2025):

- Arrivals are a Cox process conditioned on the total: a per-slice intensity, then exactly
  ``n_trades`` spread over (symbol, slice) cells multinomially. The intensity is a symbol
  share (BTC largest) times the UTC diurnal profile, times the exponential of three
  Ornstein-Uhlenbeck regimes (time scales of 2 h, 8 min and 15 s, half of each shared
  by all symbols), times 1 + shot noise: bursts whose Pareto-sized jump decays
  exponentially over seconds (the cluster form of a Hawkes process), some hitting every
  symbol at once. Per-minute counts then spread like the real ones (quantiles, busiest
  minute of a day ~10x the mean where BTCUSDT's is ~8x, autocorrelation) and the busiest
  second holds tens of times the mean.
- Within a slice, taker orders arrive at clustered times (squared-exponential gaps); each
  order fills one or more trades at the same millisecond, walking up (taker buy) or down
  (taker sell) the book a tick at a time now and then. The taker side persists from order
  to order, so ``is_buyer_maker`` is ~50% in runs.
- The mid price is a random walk per order whose volatility grows with the slice's
  activity (volatility clusters where trading does), nudged by the taker side (impact),
  scaled to a daily volatility per symbol. Trades print at the bid (taker sells) or the
  ask, a tick above; prices are whole ticks (~6 significant digits: 0.01 for BTC).
- Quantities are lognormal in notional (median ~$80, mean ~$600 like BTCUSDT's), rounded
  to whole lots (1e-5 BTC) and at least one lot; ``quote_qty`` is ``price * qty``.

Trade ids count 1, 2, 3, ... per symbol; ``ts_event`` never decreases per symbol and
several trades share a millisecond. ``source`` is ``"sim"``, ``ts_ingest`` the batch's
last ``ts_event`` (publishers restamp it). The worker accepts ``ts_event`` only up to a
day ahead of its clock, so pass a ``start_ms`` no later than now. The same arguments give
the same batches; ``batch_size`` only changes how they are cut.

``python -m makeusrich.stream.simday [N_TRADES]`` prints the generation rate.
"""

import math
import sys
import time
import zlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from makeusrich.core.errors import ConfigError
from makeusrich.core.schemas import TradeBatch
from makeusrich.stream.sources import sim_start_price

__all__ = ["SLICE_MS", "measure_rate", "simulate_day"]

Floats = npt.NDArray[np.float64]
Ints = npt.NDArray[np.int64]

SLICE_MS = 1_000
"""Event time per slice: a batch never starts more than this before an earlier batch's
last trade."""

_DAY_MS = 86_400_000
_HOUR_MS = 3_600_000
_YEAR_S = 365 * 86_400

# Mean BTCUSDT trades per UTC hour over the daily mean (Aug-Nov 2025): Asia's morning,
# then the US session (data releases 12:30/13:30 UTC, equities' open) at ~1.8x.
_HOURLY_ACTIVITY = np.array([
    1.11, 1.04, 0.97, 0.88, 0.84, 0.78, 0.80, 0.83, 0.87, 0.83, 0.78, 0.77,
    1.04, 1.52, 1.78, 1.49, 1.34, 1.16, 1.02, 0.99, 0.88, 0.76, 0.78, 0.74,
])

# Regimes of log intensity as (sd, time scale s). Within a day, BTCUSDT's log trades per
# minute (less the hourly profile) have sd 0.77 and autocorrelation 0.51 / 0.37 / 0.19 /
# 0.03 at 1 / 5 / 60 / 240 min: a third of the variance lives for hours, a tenth for
# minutes, the rest under a minute (the fast regime plus the bursts). These values, with
# the bursts', give simulated days 0.73 and 0.55 / 0.41 / 0.22 / -0.02 (median of 20).
_REGIMES = ((0.5, 7_200.0), (0.25, 480.0), (0.8, 15.0))
_REGIME_GRID_MS = 10_000  # regimes move slowly: simulated on this grid, interpolated
_REGIME_SHARED = 0.5  # fraction of each regime's variance common to all symbols

# Bursts (liquidation cascades, news): jumps of the intensity multiplier by a Pareto size,
# decaying exponentially; some are market-wide.
_BURSTS_PER_S = 1 / 400  # per symbol, plus as many market-wide ones
_BURST_PARETO_ALPHA = 1.5
_BURST_MIN_X = 1.0
_BURST_MAX_X = 60.0
_BURST_DECAY_MEDIAN_S = 4.0  # lognormal decay times
_BURST_DECAY_LOG_SD = 0.6
_BURST_DECAY_MAX_S = 60.0

# Trades per day relative to BTCUSDT, by base asset (rough Binance spot 2025: only the
# unevenness matters), and annualised volatility (BTCUSDT's 1m returns: 0.42).
_ASSETS = {
    "BTC": (1.0, 0.45),
    "ETH": (0.7, 0.65),
    "SOL": (0.3, 0.8),
    "XRP": (0.2, 0.8),
    "DOGE": (0.15, 0.9),
    "BNB": (0.12, 0.5),
    "ADA": (0.06, 0.8),
    "LINK": (0.05, 0.8),
    "AVAX": (0.04, 0.8),
    "LTC": (0.04, 0.7),
    "DOT": (0.03, 0.8),
}
_QUOTES = ("USDT", "USDC", "FDUSD", "BUSD", "TUSD", "USD")
_UNKNOWN_SHARE = (0.02, 0.2)  # log-uniform range, fixed per symbol by its crc32
_UNKNOWN_VOL = 0.8

_P_NEW_ORDER = 0.5  # per trade: the next taker order (else another fill of the same one)
_P_LEVEL_STEP = 0.15  # per fill: the order has exhausted a price level
_P_SIDE_FLIP = 0.35  # per order: the taker side changes
_IMPACT = 0.3  # mean move of the mid per order in the taker's direction, in sds
_VOL_ACTIVITY_EXP = 0.25  # per-order volatility ~ (slice activity / mean) ** this
_MEDIAN_NOTIONAL_USD = 80.0
_NOTIONAL_LOG_SD = 2.0  # mean/median = e**2 ~ 7.4: BTCUSDT averages ~$600 a trade

_CHUNK_TRADES = 1 << 16  # trades generated per numpy pass (a busier slice is one pass)
_BENCH_START_MS = 1_754_006_400_000  # 2025-08-01 00:00 UTC
_BENCH_SYMBOLS = ("BTCUSDT", "ETHUSDT", "SOLUSDT", "XRPUSDT", "DOGEUSDT")


@dataclass(slots=True)
class _Book:
    """One symbol's state carried from chunk to chunk."""

    symbol: str
    price_scale: float  # ticks per unit of price
    lot_scale: float  # lots per unit of quantity
    log_median_lots: float
    log_mid: float
    sigma_per_order: float  # log-return sd of one order at mean activity
    mean_count: float  # trades per slice over the span
    taker_sold: int  # side of the last order: 1 when the taker sold (buyer is maker)
    next_id: int


def simulate_day(
    symbols: Sequence[str],
    seed: int,
    start_ms: int,
    n_trades: int,
    *,
    batch_size: int = 1_000,
    span_ms: int = _DAY_MS,
) -> Iterator[TradeBatch]:
    """Exactly ``n_trades`` simulated trades of ``symbols`` over ``[start_ms, start_ms +
    span_ms)``, as batches of one symbol's consecutive trades (at most ``batch_size``) in
    1 s slices: see the module docstring for the model and the guarantees."""
    names = list(dict.fromkeys(s.upper() for s in symbols))
    if not names:
        raise ConfigError("the day simulator needs at least one symbol")
    if n_trades < 0:
        raise ConfigError(f"sim trade count must be >= 0, got {n_trades}")
    if span_ms <= 0:
        raise ConfigError(f"sim span must be > 0 ms, got {span_ms}")
    if batch_size <= 0:
        raise ConfigError(f"sim batch size must be > 0, got {batch_size}")
    return _stream(names, np.random.default_rng(seed), start_ms, n_trades, batch_size, span_ms)


def _stream(
    names: list[str], rng: np.random.Generator, start_ms: int, n_trades: int,
    batch_size: int, span_ms: int,
) -> Iterator[TradeBatch]:
    n_slices = -(-span_ms // SLICE_MS)
    slice_start_ms = start_ms + SLICE_MS * np.arange(n_slices, dtype=np.int64)
    slice_width_ms = np.minimum(SLICE_MS, start_ms + span_ms - slice_start_ms)
    counts = _plan(names, rng, slice_start_ms, slice_width_ms, n_trades)
    books = [_book(name, rng, counts[i], span_ms) for i, name in enumerate(names)]
    done = np.cumsum(counts.sum(axis=0))
    first = 0
    while first < n_slices:
        # As many slices as fit in one chunk's trades, and at least one.
        before = done[first - 1] if first else 0
        end = max(first + 1, int(np.searchsorted(done, before + _CHUNK_TRADES, "right")))
        chunk = counts[:, first:end]
        columns = [
            _fills(book, rng, chunk[i], slice_start_ms[first:end], slice_width_ms[first:end])
            for i, book in enumerate(books)
        ]
        for i, lo, hi in _pieces(chunk, batch_size):
            whole = columns[i]
            ts = whole.ts_event[lo:hi]
            yield TradeBatch(whole.symbol, ts[-1], whole.trade_id[lo:hi], whole.price[lo:hi],
                             whole.qty[lo:hi], whole.quote_qty[lo:hi],
                             whole.is_buyer_maker[lo:hi], ts, "sim")
        first = end


def _pieces(chunk: Ints, batch_size: int) -> Iterator[tuple[int, int, int]]:
    """(symbol, first, end) of each batch of a chunk of (symbol, slice) counts, slice by
    slice and within a slice symbol by symbol; first and end index the symbol's trades in
    the chunk. Computed with numpy so the per-batch Python work is only the slicing."""
    slices, which = np.nonzero(chunk.T)
    lo = (np.cumsum(chunk, axis=1) - chunk)[which, slices]
    n = chunk[which, slices]
    parts = -(-n // batch_size)
    part = np.arange(parts.sum()) - np.repeat(np.cumsum(parts) - parts, parts)
    first = np.repeat(lo, parts) + part * batch_size
    end = np.minimum(first + batch_size, np.repeat(lo + n, parts))
    return zip(np.repeat(which, parts).tolist(), first.tolist(), end.tolist(), strict=True)


def _plan(
    names: list[str], rng: np.random.Generator, slice_start_ms: Ints, slice_width_ms: Ints,
    n_trades: int,
) -> Ints:
    """Trades per (symbol, slice): exactly ``n_trades``, multinomial over the intensity."""
    mid_ms = slice_start_ms + slice_width_ms / 2
    hour = (mid_ms % _DAY_MS) / _HOUR_MS
    diurnal = np.interp(hour, np.arange(24) + 0.5, _HOURLY_ACTIVITY, period=24)
    log_regime = _regimes(len(names), rng, mid_ms)
    bursts = _bursts(len(names), rng, len(slice_start_ms))
    intensity = np.exp(log_regime) * (1.0 + bursts) * (diurnal * slice_width_ms)
    shares = np.array([_asset(name)[0] for name in names])
    intensity *= (shares / shares.sum() / intensity.sum(axis=1))[:, None]
    p = intensity.ravel()
    counts: Ints = rng.multinomial(n_trades, p / p.sum()).reshape(intensity.shape)
    return counts


def _regimes(n_symbols: int, rng: np.random.Generator, mid_ms: Floats) -> Floats:
    """Log intensity per (symbol, slice): a sum of OU processes, partly common to all."""
    grid_ms = np.arange(mid_ms[0], mid_ms[-1] + _REGIME_GRID_MS, _REGIME_GRID_MS)
    sd = np.array([[s] for s, _ in _REGIMES])
    decay = np.array([[math.exp(-_REGIME_GRID_MS / 1_000 / tau_s)] for _, tau_s in _REGIMES])
    innovation_sd = sd * np.sqrt(1.0 - decay**2)
    # Column 0 is the market's, the others each symbol's own; start from stationarity.
    noise = rng.standard_normal((len(grid_ms), len(_REGIMES), n_symbols + 1))
    state = sd * noise[0]
    paths = np.empty((len(grid_ms), n_symbols + 1))
    paths[0] = state.sum(axis=0)
    for g in range(1, len(grid_ms)):  # a recursion: per grid step, vectorised over all
        state = decay * state + innovation_sd * noise[g]
        paths[g] = state.sum(axis=0)
    mixed = (math.sqrt(_REGIME_SHARED) * paths[:, :1]
             + math.sqrt(1.0 - _REGIME_SHARED) * paths[:, 1:])
    return np.stack([np.interp(mid_ms, grid_ms, mixed[:, i]) for i in range(n_symbols)])


def _bursts(n_symbols: int, rng: np.random.Generator, n_slices: int) -> Floats:
    """Shot noise per (symbol, slice): the extra intensity of decaying bursts, in units of
    the base intensity."""
    span_s = n_slices * SLICE_MS / 1_000
    own = rng.poisson(_BURSTS_PER_S * span_s, n_symbols)
    market = int(rng.poisson(_BURSTS_PER_S * span_s))
    # Each market-wide burst hits every symbol (each with its own size and decay).
    symbol = np.concatenate([np.repeat(np.arange(n_symbols), own),
                             np.tile(np.arange(n_symbols), market)])
    start = np.concatenate([rng.integers(0, n_slices, own.sum()),
                            np.repeat(rng.integers(0, n_slices, market), n_symbols)])
    size = np.minimum(_BURST_MIN_X * (1.0 - rng.random(len(symbol))) ** (-1 / _BURST_PARETO_ALPHA),
                      _BURST_MAX_X)
    decay_s = np.minimum(
        _BURST_DECAY_MEDIAN_S * np.exp(_BURST_DECAY_LOG_SD * rng.standard_normal(len(symbol))),
        _BURST_DECAY_MAX_S)
    # Each burst's kernel runs over 5 decay times (its tail beyond is < 1%).
    length = np.ceil(5 * decay_s * 1_000 / SLICE_MS).astype(np.int64)
    burst = np.repeat(np.arange(len(symbol)), length)
    lag = np.arange(len(burst)) - np.repeat(np.cumsum(length) - length, length)
    at = start[burst] + lag
    inside = at < n_slices
    kernel = size[burst] * np.exp(-lag * (SLICE_MS / 1_000) / decay_s[burst])
    cell = symbol[burst] * n_slices + at
    # bincount sums the weights as floats (its stubs say ints).
    excess = np.bincount(cell[inside], kernel[inside], n_symbols * n_slices)
    return np.asarray(excess, dtype=np.float64).reshape(n_symbols, n_slices)


def _asset(symbol: str) -> tuple[float, float]:
    """(share of trades, annualised volatility) of ``symbol``: a stable made-up share for
    an unknown one, so it does not depend on the other symbols."""
    for quote in _QUOTES:
        if symbol.endswith(quote) and symbol[: -len(quote)] in _ASSETS:
            return _ASSETS[symbol[: -len(quote)]]
    low, high = _UNKNOWN_SHARE
    fraction = zlib.crc32(symbol.encode()) / 2**32
    return low * (high / low) ** fraction, _UNKNOWN_VOL


def _book(symbol: str, rng: np.random.Generator, counts: Ints, span_ms: int) -> _Book:
    price = sim_start_price(symbol)
    median_qty = _MEDIAN_NOTIONAL_USD / price
    # ~6 significant digits of price and ~3 of a typical quantity, like Binance filters
    # (and the stream simulator in sources).
    price_decimals = max(0, 6 - math.floor(math.log10(price)))
    lot_decimals = max(0, 2 - math.floor(math.log10(median_qty)))
    mean_count = float(counts.mean())
    # Scale the per-order sd so the span's variance matches the asset's volatility: sum of
    # expected orders times their activity weight, and the impact of persistent sides
    # (a Markov sign's long-run variance is (1 - p) / p per order).
    sigma_per_order = 0.0  # no trades, no moves
    busy = counts[counts > 0]
    if busy.size:
        orders = 1 + (busy - 1) * _P_NEW_ORDER
        weight = float(np.sum(orders * (busy / mean_count) ** (2 * _VOL_ACTIVITY_EXP)))
        impact = 1.0 + _IMPACT**2 * (1 - _P_SIDE_FLIP) / _P_SIDE_FLIP
        span_var = _asset(symbol)[1] ** 2 * span_ms / 1_000 / _YEAR_S
        sigma_per_order = math.sqrt(span_var / weight / impact)
    return _Book(
        symbol=symbol,
        price_scale=10.0**price_decimals,
        lot_scale=10.0**lot_decimals,
        log_median_lots=math.log(median_qty * 10.0**lot_decimals),
        log_mid=math.log(price),
        sigma_per_order=sigma_per_order,
        mean_count=mean_count,
        taker_sold=int(rng.integers(2)),
        next_id=1,
    )


def _fills(
    book: _Book, rng: np.random.Generator, counts: Ints, slice_start_ms: Ints,
    slice_width_ms: Ints,
) -> TradeBatch:
    """``book``'s trades for a chunk of slices, ``counts[k]`` of them in slice ``k``: one
    batch for the whole chunk (``_stream`` cuts it), ``ts_ingest`` unset."""
    n = int(counts.sum())
    if n == 0:
        return TradeBatch(book.symbol, 0, [], [], [], [], [], [], "sim")
    busy = np.flatnonzero(counts)
    per_slice = counts[busy]
    slice_of_trade = np.repeat(np.arange(len(busy)), per_slice)

    # Orders: a run of fills; one never spans slices, so its fills share a millisecond.
    u = rng.random(n)
    new_order = u < _P_NEW_ORDER
    new_order[np.cumsum(per_slice) - per_slice] = True
    level_step = u >= 1.0 - _P_LEVEL_STEP
    order_of_trade = np.cumsum(new_order) - 1
    order_first = np.flatnonzero(new_order)
    n_orders = len(order_first)
    slice_of_order = slice_of_trade[order_first]

    flips = rng.random(n_orders) < _P_SIDE_FLIP
    taker_sold = (np.cumsum(flips) + book.taker_sold) & 1
    book.taker_sold = int(taker_sold[-1])
    direction = 1 - 2 * taker_sold

    sigma = book.sigma_per_order * (per_slice / book.mean_count) ** _VOL_ACTIVITY_EXP
    moves = sigma[slice_of_order] * (rng.standard_normal(n_orders) + _IMPACT * direction)
    log_mid = book.log_mid + np.cumsum(moves)
    book.log_mid = float(log_mid[-1])
    bid_ticks = np.floor(np.exp(log_mid) * book.price_scale)

    # A taker buy fills at the ask (a tick above the bid) and walks up; a sell walks down.
    levels = np.cumsum(level_step)
    level = levels - levels[order_first][order_of_trade]
    sold = taker_sold[order_of_trade]
    ticks = bid_ticks[order_of_trade] + (1 - sold) + (1 - 2 * sold) * level
    price = np.maximum(ticks, 1.0) / book.price_scale
    lots = np.rint(np.exp(book.log_median_lots + _NOTIONAL_LOG_SD * rng.standard_normal(n)))
    qty = np.maximum(lots, 1.0) / book.lot_scale

    # Orders within a slice at clustered times: cumulative squared-exponential gaps,
    # scaled so the slice's last gap (after its last order) ends at the slice's end.
    gaps = rng.standard_exponential(n_orders) ** 2
    tail_gaps = rng.standard_exponential(len(busy)) ** 2
    elapsed = np.cumsum(gaps)
    last = np.cumsum(np.bincount(slice_of_order, minlength=len(busy))) - 1
    first = np.concatenate(([0], last[:-1] + 1))
    origin = elapsed[first] - gaps[first]
    total = elapsed[last] - origin + tail_gaps
    width = slice_width_ms[busy][slice_of_order]
    offset = np.floor((elapsed - origin[slice_of_order]) / total[slice_of_order] * width)
    order_ms = slice_start_ms[busy][slice_of_order] + np.minimum(offset, width - 1).astype(
        np.int64)

    first_id = book.next_id
    book.next_id += n
    return TradeBatch(
        symbol=book.symbol,
        ts_ingest=0,
        source="sim",
        trade_id=list(range(first_id, first_id + n)),
        price=price.tolist(),
        qty=qty.tolist(),
        quote_qty=(price * qty).tolist(),
        is_buyer_maker=sold.astype(np.bool_).tolist(),
        ts_event=order_ms[order_of_trade].tolist(),
    )


def measure_rate(n_trades: int = 2_000_000, span_ms: int | None = None) -> float:
    """Trades per second that ``simulate_day`` generates (batches built, not encoded) over
    five symbols; by default at the density of a 10-million-trade day."""
    if span_ms is None:
        span_ms = max(SLICE_MS, _DAY_MS * n_trades // 10_000_000)
    began_s = time.perf_counter()
    produced = sum(len(batch) for batch in simulate_day(
        _BENCH_SYMBOLS, seed=1, start_ms=_BENCH_START_MS, n_trades=n_trades, span_ms=span_ms))
    return produced / (time.perf_counter() - began_s)


if __name__ == "__main__":
    count = int(sys.argv[1]) if len(sys.argv) > 1 else 2_000_000
    print(f"{measure_rate(count):,.0f} trades/s ({count:,} trades)")
