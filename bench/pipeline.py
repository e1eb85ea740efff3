"""End-to-end pipeline benchmark: ``python -m bench.pipeline`` (or ``make bench``).

Measures, in one run, on this machine:

1. Throughput. N simulated trades are published to an embedded broker first; then
   (a) a raw aiokafka consumer reads them back (the broker/client ceiling), and
   (b) the Faust worker (``python -m makeusrich worker``) consumes the same topic; its rate
   comes from the counters hash it refreshes in Redis every second, counted only while it
   is busy (group join and the idle tail are excluded).
2. Latency from candle close (the candle's ``ts_ingest``, stamped by the worker) to the
   event reaching an SSE client of ``mur up`` running the simulator with 1s candles.
3. The decode -> candle-update hot path in-process (:func:`bench.hotpath.measure`).

Results go to stdout and ``bench/results/pipeline.json``. This is a benchmark, not a test:
it asserts nothing about the figures, but exits non-zero if a stage fails.
"""

import argparse
import asyncio
import contextlib
import json
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import redis
from aiokafka import AIOKafkaConsumer, TopicPartition
from httpx_sse import connect_sse

from bench._common import write_results
from bench.hotpath import measure as measure_hot_path
from makeusrich.core.embedded import free_port, start_kafka, start_redis, terminate
from makeusrich.core.errors import MakeUsRichError
from makeusrich.core.settings import Settings
from makeusrich.stream.publisher import TradePublisher, ensure_topics
from makeusrich.stream.sources import run_replay, simulate_trades

RESULTS = Path(__file__).parent / "results" / "pipeline.json"
SYMBOLS = ("BTCUSDT", "ETHUSDT", "SOLUSDT", "BNBUSDT")

_POLL_S = 0.02  # worker-counter poll period: bounds the error on each observation time
_STOP_TIMEOUT_S = 20.0


class BenchError(Exception):
    """A stage of the benchmark could not complete; the message says which and why."""


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


@dataclass
class Latency:
    p50_ms: float
    p99_ms: float
    max_ms: float
    samples: int
    seconds: float
    warmup_s: float


# ---- helpers ---------------------------------------------------------------------------


def _clean_env(extra: dict[str, str]) -> dict[str, str]:
    """os.environ without any MUR_* left over from the caller, plus ``extra``."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("MUR_")}
    env.update(extra)
    return env


def _spawn(argv: list[str], env: dict[str, str], log_path: Path) -> subprocess.Popen[bytes]:
    with log_path.open("ab") as log:  # the child keeps its own copy of the descriptor
        return subprocess.Popen(
            [sys.executable, "-m", "makeusrich", *argv], env=env,
            stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
        )


def _stop(process: subprocess.Popen[bytes] | None) -> int | None:
    return None if process is None else terminate(process, _STOP_TIMEOUT_S)


def _tail(path: Path, lines: int = 30) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


def _check_alive(process: subprocess.Popen[bytes], what: str, log_path: Path) -> None:
    if process.poll() is not None:
        raise BenchError(
            f"{what} exited early with code {process.returncode}; log tail:\n{_tail(log_path)}"
        )


def _cpu_s(pid: int) -> float:
    """CPU seconds (user + system, all threads) a live process has used so far."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError as exc:
        raise BenchError(f"process {pid} is gone: {exc}") from exc
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _percentile(values: list[float], q: float) -> float:
    """Linear-interpolated percentile, ``q`` in [0, 100]."""
    ordered = sorted(values)
    pos = (len(ordered) - 1) * q / 100.0
    low = int(pos)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (pos - low)


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
    env = _clean_env({**settings.as_env(), "MUR_LOG_LEVEL": "WARNING"})
    client = redis.Redis.from_url(settings.redis_url)
    key = settings.redis_keys.worker_stats(settings.worker_id)
    launched = time.perf_counter()
    worker = _spawn(["worker"], env, log_path)
    try:
        # (observed at, trades, worker CPU seconds) each time the counter changed
        changes: list[tuple[float, int, float]] = []
        deadline = time.monotonic() + timeout_s
        while not changes or changes[-1][1] < expected:
            _check_alive(worker, "the Faust worker", log_path)
            if time.monotonic() > deadline:
                seen = changes[-1][1] if changes else 0
                raise BenchError(f"the worker processed {seen} of {expected} messages in "
                                 f"{timeout_s:.0f} s; log tail:\n{_tail(log_path)}")
            raw = client.hget(key, "trades")
            now = time.perf_counter()
            trades = int(raw) if raw else 0
            if trades and (not changes or trades != changes[-1][1]):
                changes.append((now, trades, _cpu_s(worker.pid)))
            time.sleep(_POLL_S)
    finally:
        _stop(worker)
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


# ---- 2. candle close -> SSE latency ----------------------------------------------------


def _wait_healthy(base: str, process: subprocess.Popen[bytes], log: Path, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        _check_alive(process, "mur up", log)
        with contextlib.suppress(httpx.HTTPError):
            if httpx.get(f"{base}/healthz", timeout=1).status_code == 200:
                return
        time.sleep(0.2)
    raise BenchError(f"mur up did not answer {base}/healthz within {timeout_s:.0f} s")


@contextlib.contextmanager
def _candle_events(base: str, timeout_s: float) -> Iterator[Iterator[dict[str, Any]]]:
    """An open SSE stream of candle records; retries while the API is not ready (503)."""
    deadline = time.monotonic() + timeout_s
    with httpx.Client(timeout=httpx.Timeout(10, read=30)) as client:
        while True:
            with connect_sse(client, "GET", f"{base}/v1/stream",
                             params={"events": "candle"}) as source:
                if source.response.status_code == 200:
                    yield (json.loads(sse.data) for sse in source.iter_sse()
                           if sse.event == "candle")
                    return
                status = source.response.status_code
            if time.monotonic() > deadline:
                raise BenchError(f"{base}/v1/stream kept answering {status}")
            time.sleep(0.5)


def measure_latency(seconds: float, warmup_s: float, tmp: Path, timeout_s: float) -> Latency:
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    log_path = tmp / "mur-up.log"
    env = _clean_env({
        "MUR_STATE_DIR": str(tmp / "up-state"), "MUR_GRACE_MS": "200",
        "MUR_SIM_TRADES_PER_S": "50", "MUR_LOG_LEVEL": "WARNING",
    })
    argv = ["up", "--source", "sim", "--symbols", ",".join(SYMBOLS), "--intervals", "1s",
            "--api-port", str(port)]
    process = _spawn(argv, env, log_path)
    try:
        _wait_healthy(base, process, log_path, timeout_s)
        print(f"mur up is healthy; reading SSE candles for {seconds:.0f} s ...", flush=True)
        samples: list[float] = []
        first: float | None = None
        with _candle_events(base, timeout_s) as candles:
            for candle in candles:
                received_ms = time.time_ns() / 1e6
                now = time.monotonic()
                first = now if first is None else first
                if now - first >= warmup_s:
                    samples.append(received_ms - candle["ts_ingest"])
                if now - first >= seconds:
                    break
        if first is None or not samples:
            raise BenchError("no candle events arrived over SSE")
        _check_alive(process, "mur up", log_path)
    finally:
        code = _stop(process)
    if code not in (0, None):
        print(f"warning: mur up exited with code {code} on SIGTERM", file=sys.stderr)
    return Latency(
        p50_ms=_percentile(samples, 50), p99_ms=_percentile(samples, 99),
        max_ms=max(samples), samples=len(samples), seconds=seconds, warmup_s=warmup_s,
    )


# ---- report ----------------------------------------------------------------------------


def _report(throughput: Throughput, latency: Latency, hot_us: float) -> dict[str, Any]:
    return {
        "trades_per_s": round(throughput.trades_per_s, 1),
        "raw_consume_per_s": round(throughput.raw_consume_per_s, 1),
        "ratio": round(throughput.trades_per_s / throughput.raw_consume_per_s, 4),
        "close_to_sse_ms_p50": round(latency.p50_ms, 2),
        "close_to_sse_ms_p99": round(latency.p99_ms, 2),
        "hot_path_us_per_trade": round(hot_us, 3),
        "n_trades": throughput.n_trades,
        "n_messages": throughput.messages,
        "publish_s": round(throughput.publish_s, 3),
        "raw_consume_s": round(throughput.raw_consume_s, 3),
        "worker_measured_trades": throughput.worker_measured_trades,
        "worker_measured_s": round(throughput.worker_measured_s, 3),
        "worker_startup_s": round(throughput.worker_startup_s, 2),
        "worker_cpu_pct": round(throughput.worker_cpu_pct, 1),
        "samples": latency.samples,
        "close_to_sse_ms_max": round(latency.max_ms, 2),
        "sse_seconds": latency.seconds,
        "sse_warmup_s": latency.warmup_s,
    }


def _print_summary(result: dict[str, Any], path: Path) -> None:
    rows = [
        ("Faust worker", f"{result['trades_per_s']:,.0f} trades/s"),
        ("  its CPU while busy", f"{result['worker_cpu_pct']:.0f} % of a core"),
        ("raw aiokafka consumer", f"{result['raw_consume_per_s']:,.0f} msgs/s"),
        ("worker / raw", f"{result['ratio']:.3f}"),
        ("candle close -> SSE p50", f"{result['close_to_sse_ms_p50']:.1f} ms"),
        ("candle close -> SSE p99", f"{result['close_to_sse_ms_p99']:.1f} ms"),
        ("hot path (decode+update)", f"{result['hot_path_us_per_trade']:.2f} us/trade"),
    ]
    width = max(len(name) for name, _ in rows)
    machine = result["machine"]
    print(f"\n{machine['cpu']} ({machine['cores']} cores), Python {machine['python']}")
    print(f"{result['n_trades']:,} trades; {result['samples']} SSE samples; "
          f"bench took {result['bench_wall_s']:.0f} s")
    for name, value in rows:
        print(f"  {name:<{width}}  {value:>18}")
    print(f"written to {path}")


def _parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench.pipeline", description=__doc__)
    parser.add_argument("--trades", type=int, default=200_000, help="trades to publish")
    parser.add_argument("--sse-seconds", type=float, default=35.0,
                        help="how long to read SSE candles (warm-up included)")
    parser.add_argument("--warmup", type=float, default=5.0,
                        help="seconds of SSE events to skip first")
    parser.add_argument("--timeout", type=float, default=90.0,
                        help="limit for each waiting step, in seconds")
    parser.add_argument("--out", type=Path, default=RESULTS)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = _parse(argv)
    started = time.monotonic()
    try:
        with tempfile.TemporaryDirectory(prefix="mur-bench-") as tmp_name:
            tmp = Path(tmp_name)
            print("hot path microbenchmark ...", flush=True)
            hot_us = measure_hot_path()["us_per_trade"]
            throughput = measure_throughput(args.trades, tmp, args.timeout)
            latency = measure_latency(args.sse_seconds, args.warmup, tmp, args.timeout)
    except (BenchError, MakeUsRichError) as exc:
        print(f"bench failed: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("bench interrupted", file=sys.stderr)
        return 130
    result = _report(throughput, latency, hot_us)
    write_results(args.out, result, started)
    _print_summary(result, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
