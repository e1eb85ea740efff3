"""Microbenchmark of the worker's hot path, decode -> candle update, per trade message and
per batch message (:class:`TradeBatch`) on the same trades."""

import time

from makeusrich.core.schemas import Trade, TradeBatch, encode, encode_batch, trade_decoder
from makeusrich.inference import NaiveForecaster
from makeusrich.stream.candles import TradeColumns
from makeusrich.stream.pipeline import TradePipeline


def _trades(n: int) -> list[Trade]:
    t0 = 1_700_000_000_000
    return [Trade("BTCUSDT", i, 60_000.0 + (i % 50), 0.01, 600.0 + 0.01 * (i % 50), i % 2 == 0,
                  t0 + i * 20, t0 + i * 20) for i in range(n)]


def measure(n: int = 300_000, intervals: tuple[str, ...] = ("1m",),
            batch_size: int = 1_000) -> dict[str, float]:
    trades = _trades(n)
    single = [encode(trade) for trade in trades]
    batched = [encode_batch(TradeBatch.of(trades[i:i + batch_size]))
               for i in range(0, n, batch_size)]

    pipeline = TradePipeline(intervals, 2_000, NaiveForecaster())
    start = time.perf_counter()
    for message in single:
        pipeline.process(trade_decoder.decode(message))
        if pipeline.has_output:
            pipeline.drain()
    single_s = time.perf_counter() - start

    pipeline = TradePipeline(intervals, 2_000, NaiveForecaster())
    start = time.perf_counter()
    for message in batched:
        pipeline.process_batch(TradeColumns.of(trade_decoder.decode(message)))
        if pipeline.has_output:
            pipeline.drain()
    batched_s = time.perf_counter() - start
    return {
        "us_per_trade": single_s / n * 1e6,
        "trades_per_s": n / single_s,
        "batched_us_per_trade": batched_s / n * 1e6,
        "batched_trades_per_s": n / batched_s,
        "batch_size": batch_size,
    }


if __name__ == "__main__":
    print(measure())
