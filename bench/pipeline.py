"""Pipeline throughput: ``python -m bench.pipeline`` (part of ``make bench``).

Measures, in one run, on this machine, the same simulated trades published twice to one
embedded broker: one trade per message (the old format, ``MUR_TRADES_BATCH_MAX=1``) and in
batches (:class:`TradeBatch`, the default ``trades_batch_max``). For each topic:

(a) a raw aiokafka consumer reads it back (the broker/client ceiling, in messages/s), and
(b) the Faust worker (``python -m makeusrich worker``) consumes it; its rate comes from the
    counters hash it refreshes in Redis every second, counted only while it is busy (group
    join and the idle tail are excluded). The batched topic's worker runs three times (a
    fresh consumer group and Redis namespace each): the median is reported.

Then the decode -> candle-update hot path in-process, per message kind
(:func:`bench.hotpath.measure`). The issue's ratio is the batched worker's trades/s over the
raw consumer's messages/s of one-trade messages: what a per-message consumer could reach.

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
    """One topic's figures: what was published and how fast it was consumed."""

    n_trades: int
    messages: int  # trade or batch messages + one EndOfStream per symbol
    publish_s: float
    raw_consume_per_s: float  # messages/s
    raw_consume_s: float
    trades_per_s: float  # the worker's (the median run's)
    worker_runs_trades_per_s: list[float]
    worker_measured_trades: int
    worker_measured_s: float
    worker_startup_s: float
    worker_cpu_pct: float  # of one core, over the measured window


# ---- 1. throughput ---------------------------------------------------------------------


def _publish(settings: Settings, n_trades: int) -> tuple[int, float]:
    """Publish ``n_trades`` sim trades plus EndOfStream per symbol, batched as ``settings``
    say; returns (messages, s)."""
    trades = simulate_trades(SYMBOLS, 7, 50.0, 1_700_000_000_000, n_trades)
    publisher = TradePublisher(settings)
    started = time.perf_counter()
    try:
        sent = asyncio.run(run_replay(trades, publisher, asyncio.Event(), None))
    finally:
        publisher.close()
    elapsed = time.perf_counter() - started
    if sent != n_trades:
        raise BenchError(f"published {sent} of {n_trades} trades")
    return publisher.messages, elapsed


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


def _measure_topic(settings: Settings, n_trades: int, worker_runs: int, tmp: Path,
                   timeout_s: float) -> Throughput:
    ensure_topics(settings)
    kind = "one trade per message" if settings.trades_batch_max == 1 else "batches"
    print(f"publishing {n_trades:,} trades, {kind} ...", flush=True)
    messages, publish_s = _publish(settings, n_trades)
    print("raw aiokafka consumer ...", flush=True)
    raw_count, raw_s = asyncio.run(_raw_consume(settings, messages, timeout_s))
    runs = []
    for run in range(worker_runs):
        print(f"Faust worker, run {run + 1} of {worker_runs} ...", flush=True)
        name = f"{settings.worker_id}-{run}"
        (tmp / name).mkdir()
        runs.append(_measure_worker(
            settings.model_copy(update={"worker_id": name, "redis_prefix": name}),
            n_trades + len(SYMBOLS), tmp / name, timeout_s))
    median = sorted(runs, key=lambda r: r.trades / r.seconds)[len(runs) // 2]
    return Throughput(
        n_trades=n_trades, messages=messages, publish_s=publish_s,
        raw_consume_per_s=raw_count / raw_s if raw_s > 0 else float("inf"),
        raw_consume_s=raw_s, trades_per_s=median.trades / median.seconds,
        worker_runs_trades_per_s=[round(r.trades / r.seconds, 1) for r in runs],
        worker_measured_trades=median.trades, worker_measured_s=median.seconds,
        worker_startup_s=median.startup_s, worker_cpu_pct=median.cpu_pct,
    )


def measure_throughput(n_single: int, n_batched: int, tmp: Path,
                       timeout_s: float) -> dict[str, Throughput]:
    """Both topics on one broker and one redis-server, one after the other."""
    tag = f"bench{os.getpid()}x{int(time.time())}"
    kafka = start_kafka(log_dir=tmp / "logs")
    try:
        redis_server = start_redis(log_dir=tmp / "logs")
        try:
            base = Settings(
                kafka_bootstrap=kafka.url, redis_url=redis_server.url, symbols=SYMBOLS,
                intervals=("1m",), source="sim",
            )
            return {
                kind: _measure_topic(base.model_copy(update={
                    "topic_prefix": f"{tag}-{kind}-", "redis_prefix": f"{tag}-{kind}",
                    "worker_id": f"{tag}-{kind}", "state_dir": tmp / kind,
                    "trades_batch_max": batch_max,
                }), n, runs, tmp, timeout_s)
                for kind, batch_max, n, runs in (("single", 1, n_single, 1),
                                                 ("batched", base.trades_batch_max,
                                                  n_batched, 3))
            }
        finally:
            redis_server.stop()
    finally:
        kafka.stop()


# ---- report ----------------------------------------------------------------------------


def _topic_report(t: Throughput) -> dict[str, Any]:
    return {
        "trades_per_s": round(t.trades_per_s, 1),
        "worker_runs_trades_per_s": t.worker_runs_trades_per_s,
        "raw_consume_msgs_per_s": round(t.raw_consume_per_s, 1),
        "raw_consume_trades_per_s": round(t.raw_consume_per_s * t.n_trades / t.messages, 1),
        "n_trades": t.n_trades,
        "n_messages": t.messages,
        "publish_s": round(t.publish_s, 3),
        "raw_consume_s": round(t.raw_consume_s, 3),
        "worker_measured_trades": t.worker_measured_trades,
        "worker_measured_s": round(t.worker_measured_s, 3),
        "worker_startup_s": round(t.worker_startup_s, 2),
        "worker_cpu_pct": round(t.worker_cpu_pct, 1),
    }


def _report(topics: dict[str, Throughput], hot: dict[str, float]) -> dict[str, Any]:
    single, batched = topics["single"], topics["batched"]
    return {
        "trades_per_s": round(batched.trades_per_s, 1),
        "raw_consume_per_s": round(single.raw_consume_per_s, 1),
        "ratio": round(batched.trades_per_s / single.raw_consume_per_s, 4),
        "batched_over_single_worker": round(batched.trades_per_s / single.trades_per_s, 2),
        "hot_path_us_per_trade": round(hot["us_per_trade"], 3),
        "hot_path_batched_us_per_trade": round(hot["batched_us_per_trade"], 3),
        "single": _topic_report(single),
        "batched": _topic_report(batched),
    }


def _print_summary(result: dict[str, Any], path: Path) -> None:
    single, batched = result["single"], result["batched"]
    rows = [
        ("Faust worker, batches (median of 3)", f"{result['trades_per_s']:,.0f} trades/s"),
        ("  its CPU while busy", f"{batched['worker_cpu_pct']:.0f} % of a core"),
        ("Faust worker, one trade a message", f"{single['trades_per_s']:,.0f} trades/s"),
        ("raw aiokafka, one trade a message", f"{result['raw_consume_per_s']:,.0f} msgs/s"),
        ("raw aiokafka, batches", f"{batched['raw_consume_trades_per_s']:,.0f} trades/s"),
        ("worker (batches) / raw (one a message)", f"{result['ratio']:.3f}"),
        ("worker: batches / one a message", f"{result['batched_over_single_worker']:.1f}x"),
        ("hot path, one a message", f"{result['hot_path_us_per_trade']:.2f} us/trade"),
        ("hot path, batches", f"{result['hot_path_batched_us_per_trade']:.2f} us/trade"),
    ]
    width = max(len(name) for name, _ in rows)
    machine = result["machine"]
    print(f"\n{machine['cpu']} ({machine['cores']} cores), Python {machine['python']}")
    print(f"{single['n_trades']:,} trades one a message, {batched['n_trades']:,} in batches; "
          f"bench took {result['bench_wall_s']:.0f} s")
    for name, value in rows:
        print(f"  {name:<{width}}  {value:>18}")
    print(f"written to {path}")


def _parse(argv: list[str] | None) -> argparse.Namespace:
    parser = stage_parser("pipeline", __doc__, "30,000 / 1,000,000 trades")
    parser.add_argument("--trades", type=int,
                        help="trades published one a message (default 200,000)")
    parser.add_argument("--batched-trades", type=int,
                        help="trades published in batches (default 3,000,000)")
    parser.add_argument("--timeout", type=float, default=120.0,
                        help="limit for each waiting step, in seconds")
    return parse_stage(parser, argv, "pipeline", trades=(30_000, 200_000),
                       batched_trades=(1_000_000, 3_000_000))


def _measure(args: argparse.Namespace, tmp: Path) -> dict[str, Any]:
    print("hot path microbenchmark ...", flush=True)
    hot = measure_hot_path()
    return _report(measure_throughput(args.trades, args.batched_trades, tmp, args.timeout), hot)


def main(argv: list[str] | None = None) -> int:
    args = _parse(argv)
    return run_stage(lambda tmp: _measure(args, tmp), args.out, _print_summary,
                     quick=args.quick)


if __name__ == "__main__":
    sys.exit(main())
