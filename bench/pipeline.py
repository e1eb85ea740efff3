"""Pipeline throughput: ``python -m bench.pipeline`` (part of ``make bench``).

Measures, in one run, on this machine:

1. Throughput. N simulated trades are published to an embedded broker first; then
   (a) a raw aiokafka consumer reads them back (the broker/client ceiling), and
   (b) the Faust worker (``python -m makeusrich worker``) consumes the same topic; its rate
   comes from the counters hash it refreshes in Redis every second, counted only while it
   is busy (group join and the idle tail are excluded).
2. The decode -> candle-update hot path in-process (:func:`bench.hotpath.measure`).

Candle close -> SSE latency is :mod:`bench.sse_latency`.

Results go to stdout and ``bench/results/pipeline.json``. This is a benchmark, not a test:
it asserts nothing about the figures, but exits non-zero if a stage fails.
"""

import argparse
import asyncio
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import redis
from aiokafka import AIOKafkaConsumer, TopicPartition

from bench._common import (
    BenchError,
    check_alive,
    clean_env,
    cpu_s,
    parse_stage,
    run_stage,
    spawn_mur,
    stage_parser,
    stop_process,
    tail,
)
from bench.hotpath import measure as measure_hot_path
from makeusrich.core.embedded import start_kafka, start_redis
from makeusrich.core.settings import Settings
from makeusrich.stream.publisher import TradePublisher, ensure_topics
from makeusrich.stream.sources import run_replay, simulate_trades

SYMBOLS = ("BTCUSDT", "ETHUSDT", "SOLUSDT", "BNBUSDT")

_POLL_S = 0.02  # worker-counter poll period: bounds the error on each observation time


@dataclass
class Throughput:
    n_trades: int
    messages: int  # trades + one EndOfStream per symbol
    publish_s: float
    raw_consume_per_s: float
    raw_consume_s: float
    trades_per_s: float
    worker_measured_trades: int
    worker_measured_s: float
    worker_startup_s: float
    worker_cpu_pct: float  # of one core, over the measured window


# ---- 1. throughput ---------------------------------------------------------------------


def _publish(settings: Settings, n_trades: int) -> tuple[int, float]:
    """Publish ``n_trades`` sim trades plus EndOfStream per symbol; returns (messages, s)."""
    trades = list(simulate_trades(SYMBOLS, 7, 50.0, 1_700_000_000_000, n_trades))
    publisher = TradePublisher(settings)
    started = time.perf_counter()
    try:
        sent = asyncio.run(run_replay(trades, publisher, asyncio.Event(), None))
    finally:
        publisher.close()
    elapsed = time.perf_counter() - started
    if sent != n_trades:
        raise BenchError(f"published {sent} of {n_trades} trades")
    return publisher.sent, elapsed


async def _raw_consume(settings: Settings, expected: int, timeout_s: float) -> tuple[int, float]:
    """Read the trades topic from the start with a group-less consumer until ``expected``
    messages arrived; returns (messages after the first batch, seconds from the first batch
    to the last)."""
    assert settings.kafka_bootstrap
    consumer = AIOKafkaConsumer(
        bootstrap_servers=settings.kafka_bootstrap, group_id=None,
        auto_offset_reset="earliest", enable_auto_commit=False,
    )
    topic = settings.topics.trades
    # Tansu's end_offsets() can be wrong, so count messages rather than compare offsets.
    consumer.assign([TopicPartition(topic, p) for p in range(settings.trades_partitions)])
    await consumer.start()
    try:
        count = first_batch = 0
        first = last = 0.0
        deadline = time.monotonic() + timeout_s
        while count < expected:
            if time.monotonic() > deadline:
                raise BenchError(f"raw consumer read {count} of {expected} messages "
                                 f"in {timeout_s:.0f} s")
            batches = await consumer.getmany(timeout_ms=500, max_records=10_000)
            got = sum(len(records) for records in batches.values())
            if got:
                last = time.perf_counter()
                if count == 0:
                    first, first_batch = last, got
                count += got
        # The first batch arrived at `first`: only what came after it took the measured time.
        return count - first_batch, last - first
    finally:
        await consumer.stop()


@dataclass
class _WorkerRun:
    trades: int
    seconds: float
    startup_s: float
    cpu_pct: float


def _measure_worker(
    settings: Settings, expected: int, tmp: Path, timeout_s: float
) -> _WorkerRun:
    """Run the Faust worker over the published topic and measure its busy rate.

    The worker refreshes ``trades`` in its Redis hash every second. Each change is observed
    within ``_POLL_S``. The rate is taken from the first nonzero value (subtracted, so
    group join does not count) to the last value seen *before* completion: between those
    the worker was busy the whole time, whereas the final refresh may trail the last trade
    by up to a second. With fewer than two busy refreshes the completion point is used.
    """
    assert settings.redis_url
    log_path = tmp / "worker.log"
    env = clean_env({**settings.as_env(), "MUR_LOG_LEVEL": "WARNING"})
    client = redis.Redis.from_url(settings.redis_url)
    key = settings.redis_keys.worker_stats(settings.worker_id)
    launched = time.perf_counter()
    worker = spawn_mur(["worker"], env, log_path)
    try:
        # (observed at, trades, worker CPU seconds) each time the counter changed
        changes: list[tuple[float, int, float]] = []
        deadline = time.monotonic() + timeout_s
        while not changes or changes[-1][1] < expected:
            check_alive(worker, "the Faust worker", log_path)
            if time.monotonic() > deadline:
                seen = changes[-1][1] if changes else 0
                raise BenchError(f"the worker processed {seen} of {expected} messages in "
                                 f"{timeout_s:.0f} s; log tail:\n{tail(log_path)}")
            raw = client.hget(key, "trades")
            now = time.perf_counter()
            trades = int(raw) if raw else 0
            if trades and (not changes or trades != changes[-1][1]):
                changes.append((now, trades, cpu_s(worker.pid)))
            time.sleep(_POLL_S)
    finally:
        stop_process(worker)
        client.close()
    t0, c0, cpu0 = changes[0]
    busy = changes[:-1] if len(changes) >= 3 else changes
    t1, c1, cpu1 = busy[-1]
    if t1 <= t0:
        raise BenchError("the worker finished within one counter refresh; raise --trades")
    return _WorkerRun(c1 - c0, t1 - t0, t0 - launched, 100.0 * (cpu1 - cpu0) / (t1 - t0))


def measure_throughput(n_trades: int, tmp: Path, timeout_s: float) -> Throughput:
    tag = f"bench{os.getpid()}x{int(time.time())}"
    kafka = start_kafka(log_dir=tmp / "logs")
    try:
        redis_server = start_redis(log_dir=tmp / "logs")
        try:
            settings = Settings(
                kafka_bootstrap=kafka.url, redis_url=redis_server.url, symbols=SYMBOLS,
                intervals=("1m",), topic_prefix=f"{tag}-", redis_prefix=tag, worker_id=tag,
                state_dir=tmp / "worker-state", source="sim",
            )
            ensure_topics(settings)
            print(f"publishing {n_trades:,} trades ...", flush=True)
            messages, publish_s = _publish(settings, n_trades)
            print("raw aiokafka consumer ...", flush=True)
            raw_count, raw_s = asyncio.run(_raw_consume(settings, messages, timeout_s))
            print("Faust worker ...", flush=True)
            worker = _measure_worker(settings, messages, tmp, timeout_s)
        finally:
            redis_server.stop()
    finally:
        kafka.stop()
    raw_rate = raw_count / raw_s if raw_s > 0 else float("inf")
    return Throughput(
        n_trades=n_trades, messages=messages, publish_s=publish_s,
        raw_consume_per_s=raw_rate, raw_consume_s=raw_s,
        trades_per_s=worker.trades / worker.seconds, worker_measured_trades=worker.trades,
        worker_measured_s=worker.seconds, worker_startup_s=worker.startup_s,
        worker_cpu_pct=worker.cpu_pct,
    )


# ---- report ----------------------------------------------------------------------------


def _report(throughput: Throughput, hot_us: float) -> dict[str, Any]:
    return {
        "trades_per_s": round(throughput.trades_per_s, 1),
        "raw_consume_per_s": round(throughput.raw_consume_per_s, 1),
        "ratio": round(throughput.trades_per_s / throughput.raw_consume_per_s, 4),
        "hot_path_us_per_trade": round(hot_us, 3),
        "n_trades": throughput.n_trades,
        "n_messages": throughput.messages,
        "publish_s": round(throughput.publish_s, 3),
        "raw_consume_s": round(throughput.raw_consume_s, 3),
        "worker_measured_trades": throughput.worker_measured_trades,
        "worker_measured_s": round(throughput.worker_measured_s, 3),
        "worker_startup_s": round(throughput.worker_startup_s, 2),
        "worker_cpu_pct": round(throughput.worker_cpu_pct, 1),
    }


def _print_summary(result: dict[str, Any], path: Path) -> None:
    rows = [
        ("Faust worker", f"{result['trades_per_s']:,.0f} trades/s"),
        ("  its CPU while busy", f"{result['worker_cpu_pct']:.0f} % of a core"),
        ("raw aiokafka consumer", f"{result['raw_consume_per_s']:,.0f} msgs/s"),
        ("worker / raw", f"{result['ratio']:.3f}"),
        ("hot path (decode+update)", f"{result['hot_path_us_per_trade']:.2f} us/trade"),
    ]
    width = max(len(name) for name, _ in rows)
    machine = result["machine"]
    print(f"\n{machine['cpu']} ({machine['cores']} cores), Python {machine['python']}")
    print(f"{result['n_trades']:,} trades; bench took {result['bench_wall_s']:.0f} s")
    for name, value in rows:
        print(f"  {name:<{width}}  {value:>18}")
    print(f"written to {path}")


def _parse(argv: list[str] | None) -> argparse.Namespace:
    parser = stage_parser("pipeline", __doc__, "30,000 trades")
    parser.add_argument("--trades", type=int, help="trades to publish (default 200,000)")
    parser.add_argument("--timeout", type=float, default=90.0,
                        help="limit for each waiting step, in seconds")
    return parse_stage(parser, argv, "pipeline", trades=(30_000, 200_000))


def _measure(args: argparse.Namespace, tmp: Path) -> dict[str, Any]:
    print("hot path microbenchmark ...", flush=True)
    hot_us = measure_hot_path()["us_per_trade"]
    return _report(measure_throughput(args.trades, tmp, args.timeout), hot_us)


def main(argv: list[str] | None = None) -> int:
    args = _parse(argv)
    return run_stage(lambda tmp: _measure(args, tmp), args.out, _print_summary,
                     quick=args.quick)


if __name__ == "__main__":
    sys.exit(main())
