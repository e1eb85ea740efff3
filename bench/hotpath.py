"""Microbenchmark of the worker's hot path: decode one trade message -> candle update."""

import time

from makeusrich.core.schemas import Trade, encode, trade_decoder
from makeusrich.inference import NaiveForecaster
from makeusrich.stream.pipeline import TradePipeline


def measure(n: int = 300_000, intervals: tuple[str, ...] = ("1m",)) -> dict[str, float]:
    t0 = 1_700_000_000_000
    raw = [encode(Trade("BTCUSDT", i, 60_000.0 + (i % 50), 0.01, 600.0, i % 2 == 0,
                        t0 + i * 20, t0 + i * 20)) for i in range(n)]
    pipeline = TradePipeline(intervals, 2_000, NaiveForecaster())
    start = time.perf_counter()
    for message in raw:
        pipeline.process(trade_decoder.decode(message))
        if pipeline.has_output:
            pipeline.drain()
    elapsed = time.perf_counter() - start
    return {"us_per_trade": elapsed / n * 1e6, "trades_per_s": n / elapsed}


if __name__ == "__main__":
    print(measure())
