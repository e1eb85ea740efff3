"""Load test of ONE API worker: ``python -m bench.load`` (``make load``, options via ``ARGS``).

Starts an embedded redis-server and one ``mur api`` process (anonymous access, with limits
high enough to stay out of the way), seeds history, then for ``--seconds``:

- a publisher writes a candle and a prediction for each of ``--symbols`` symbols every
  ``--publish-interval`` s, through :class:`RedisStore` as the worker does, stamping
  ``ts_ingest`` just before the write;
- ``--sse-clients`` clients (httpx + httpx-sse) hold ``/v1/stream`` open; an event's
  delivery time is its receipt time minus the record's ``ts_ingest``;
- polling clients send ``--rps`` requests a second, open loop: request i is due at
  start + i / rps whether or not earlier ones were answered, and its latency counts from
  then (so a stalled server is not hidden by clients that wait for it). They are spread
  over the latest-prediction, prediction-history and candles endpoints.

The SSE clients and the polling clients run in their own processes (``--sse-procs`` for
the former), and polling uses aiohttp (a dependency already), which costs about a fifth of
httpx's CPU per request: with httpx and everything in one process, the load generator,
not the API, was the bottleneck on a 2-core machine.

Reports p50/p99 of polling latency and of event delivery, errors by kind, the API's RSS
(``/proc/PID/status`` VmRSS) before and after the SSE clients connected, hence memory per
connection, and the CPU of the API and of each client process: they share the machine, and
a saturated client inflates every latency. Results go to stdout and
``bench/results/load.json``. A load test, not a test: it asserts nothing about the figures.
"""

import argparse
import asyncio
import multiprocessing as mp
import random
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from multiprocessing.queues import Queue
from multiprocessing.sharedctypes import Synchronized
from multiprocessing.synchronize import Event as EventT
from pathlib import Path
from queue import Empty
from typing import Any, Final, TypeVar

import aiohttp
import httpx
import msgspec
from httpx_sse import aconnect_sse

from bench._api import api_process, publisher, records, symbols
from bench._common import (
    BenchError,
    cpu_s,
    latency_summary,
    percentile,
    results_path,
    rss_kb,
    run_stage,
)
from makeusrich.core.embedded import start_redis
from makeusrich.core.settings import Settings
from makeusrich.core.store import RedisStore

_PREFIX: Final = "load"
HISTORY: Final = 200  # candles and predictions per symbol written before the run
# What the polling clients ask for (name, path template, query), chosen uniformly.
ENDPOINTS: Final[tuple[tuple[str, str, dict[str, str]], ...]] = (
    ("predictions_latest_all", "/v1/predictions/latest", {}),
    ("prediction_latest", "/v1/predictions/{symbol}/latest", {}),
    ("prediction_history", "/v1/predictions/{symbol}/history", {"limit": "100"}),
    ("candles", "/v1/candles/{symbol}", {"limit": "100"}),
)

T = TypeVar("T")


class _Stamp(msgspec.Struct):
    ts_ingest: int


_stamp_decoder: Final = msgspec.json.Decoder(_Stamp)


@dataclass
class Stats:
    """What one client process measured (sent back to the main process)."""

    poll_ms: dict[str, list[float]] = field(default_factory=dict)  # by endpoint
    event_ms: list[float] = field(default_factory=list)
    received: dict[int, int] = field(default_factory=dict)  # events per connected client
    sse_failed: int = 0
    schedule_lag_ms: list[float] = field(default_factory=list)
    errors: Counter[str] = field(default_factory=Counter)
    wall_s: float = 0.0  # of the measured part
    cpu_s: float = 0.0


# ---- helpers ---------------------------------------------------------------------------


# ---- clients (each kind in its own process) --------------------------------------------


@dataclass
class Control:
    """How the main process steers the client processes (multiprocessing primitives)."""

    ready: "Queue[tuple[int, int]]"  # (connected, failed) from each client process
    results: "Queue[Stats]"
    go: EventT  # measurement starts: pollers send, CPU is counted
    stop: EventT  # publishing ended: SSE clients drain up to ``published``, then report
    published: "Synchronized[int]"


async def sse_client(client: httpx.AsyncClient, index: int, stats: Stats,
                     stop: asyncio.Event) -> None:
    """Hold /v1/stream open; record each event's delivery time."""
    try:
        async with aconnect_sse(client, "GET", "/v1/stream",
                                params={"events": "candle,prediction"}) as source:
            if source.response.status_code != 200:
                stats.errors[f"sse_http_{source.response.status_code}"] += 1
                stats.sse_failed += 1
                return
            stats.received[index] = 0
            async for event in source.aiter_sse():
                received_ms = time.time_ns() / 1e6
                if not event.data:
                    continue  # a heartbeat: httpx-sse yields comments after an id as events
                stats.event_ms.append(received_ms - _stamp_decoder.decode(event.data).ts_ingest)
                stats.received[index] += 1
        if not stop.is_set():
            stats.errors["sse_stream_ended"] += 1
    except (httpx.HTTPError, msgspec.DecodeError) as exc:
        if not stop.is_set():
            stats.errors[f"sse_{type(exc).__name__}"] += 1
        if index not in stats.received:
            stats.sse_failed += 1


async def sse_clients(base: str, first: int, count: int, control: Control) -> Stats:
    stats = Stats()
    stop = asyncio.Event()
    limits = httpx.Limits(max_connections=count + 10)
    async with httpx.AsyncClient(base_url=base, limits=limits,
                                 timeout=httpx.Timeout(10, read=None)) as client:
        tasks = [asyncio.create_task(sse_client(client, i, stats, stop))
                 for i in range(first, first + count)]
        await wait_until(lambda: len(stats.received) + stats.sse_failed >= count, 60)
        control.ready.put((len(stats.received), stats.sse_failed))
        await asyncio.to_thread(control.go.wait)
        started = time.perf_counter(), time.process_time()
        await asyncio.to_thread(control.stop.wait)
        # Let the last events arrive, then hang up.
        await wait_until(lambda: min(stats.received.values(), default=0)
                         >= control.published.value, 5)
        stats.wall_s = time.perf_counter() - started[0]
        stats.cpu_s = time.process_time() - started[1]
        stop.set()
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
    return stats


async def poll_worker(session: aiohttp.ClientSession,
                      queue: "asyncio.Queue[tuple[float, str, str, dict[str, str]]]",
                      stats: Stats) -> None:
    """Send queued requests one at a time; latency counts from when each was due."""
    while True:
        due, name, path, params = await queue.get()
        try:
            async with session.get(path, params=params) as response:
                await response.read()
            if response.status == 200:
                stats.poll_ms.setdefault(name, []).append((time.perf_counter() - due) * 1000)
            else:
                stats.errors[f"poll_http_{response.status}"] += 1
        except (aiohttp.ClientError, TimeoutError) as exc:
            stats.errors[f"poll_{type(exc).__name__}"] += 1
        finally:
            queue.task_done()


async def pollers(base: str, rps: float, seconds: float, connections: int, names: list[str],
                  control: Control) -> Stats:
    """Open loop: request i is due at start + i / rps, answered or not the ones before; it
    waits in a queue for one of ``connections`` workers, and that wait counts in its
    latency (no coordinated omission)."""
    stats = Stats()
    rng = random.Random(7)
    queue: asyncio.Queue[tuple[float, str, str, dict[str, str]]] = asyncio.Queue()
    async with aiohttp.ClientSession(
        base, connector=aiohttp.TCPConnector(limit=connections),
        timeout=aiohttp.ClientTimeout(total=10),
    ) as session:
        workers = [asyncio.create_task(poll_worker(session, queue, stats))
                   for _ in range(connections)]
        control.ready.put((0, 0))
        await asyncio.to_thread(control.go.wait)
        start, cpu = time.perf_counter(), time.process_time()
        for i in range(int(rps * seconds)):
            due = start + i / rps
            delay = due - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            stats.schedule_lag_ms.append(max(0.0, -delay) * 1000)
            name, template, params = rng.choice(ENDPOINTS)
            queue.put_nowait((due, name, template.format(symbol=rng.choice(names)), params))
        await queue.join()
        stats.wall_s = time.perf_counter() - start
        stats.cpu_s = time.process_time() - cpu
        for worker in workers:
            worker.cancel()
        await asyncio.gather(*workers, return_exceptions=True)
    return stats


def sse_process(base: str, first: int, count: int, control: Control) -> None:
    control.results.put(asyncio.run(sse_clients(base, first, count, control)))


def poll_process(base: str, args: argparse.Namespace, names: list[str],
                 control: Control) -> None:
    control.results.put(asyncio.run(
        pollers(base, args.rps, args.seconds, args.poll_connections, names, control)))


async def wait_until(predicate: Callable[[], bool], timeout_s: float) -> bool:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        if time.monotonic() > deadline:
            return False
        await asyncio.sleep(0.05)
    return True


# ---- the run ---------------------------------------------------------------------------


async def receive(queue: "Queue[T]", timeout_s: float, what: str) -> T:
    try:
        return await asyncio.to_thread(queue.get, timeout=timeout_s)
    except Empty:
        raise BenchError(f"waited {timeout_s:.0f} s for {what}") from None


def split(total: int, parts: int) -> list[tuple[int, int]]:
    """(first index, count) of each of ``parts`` near-equal shares of ``total``."""
    shares = [total // parts + (i < total % parts) for i in range(parts)]
    return [(sum(shares[:i]), share) for i, share in enumerate(shares) if share]


async def run(args: argparse.Namespace, base: str, api: subprocess.Popen[bytes],
              store: RedisStore, names: list[str]) -> dict[str, Any]:
    ctx = mp.get_context("spawn")
    control = Control(ready=ctx.Queue(), results=ctx.Queue(), go=ctx.Event(),
                      stop=ctx.Event(), published=ctx.Value("q", 0))
    # Warm the API's code paths first, so the RSS difference is the connections'.
    async with httpx.AsyncClient(base_url=base, timeout=10) as client:
        for _, path, params in ENDPOINTS * 5:
            await client.get(path.format(symbol=names[0]), params=params)
    await asyncio.sleep(0.5)
    rss_before = rss_kb(api.pid)

    print(f"connecting {args.sse_clients} SSE clients from {args.sse_procs} process(es) ...",
          flush=True)
    processes = [ctx.Process(target=sse_process, args=(base, first, count, control))
                 for first, count in split(args.sse_clients, args.sse_procs)]
    processes.append(ctx.Process(target=poll_process, args=(base, args, names, control)))
    for process in processes:
        process.start()
    try:
        connected = 0
        for _ in processes:
            connected += (await receive(control.ready, 90, "a client process to start"))[0]
        await asyncio.sleep(1.0)  # every connected stream has subscribed by now
        rss_connected = rss_kb(api.pid)

        print(f"publishing {len(names)} symbols every {args.publish_interval:g} s and polling "
              f"at {args.rps:g} req/s for {args.seconds:g} s ...", flush=True)
        cpu_api, wall = cpu_s(api.pid), time.perf_counter()
        stop = asyncio.Event()
        publishing = asyncio.create_task(publisher(
            store, lambda i: records(names, i), args.publish_interval, stop, first=HISTORY))
        control.go.set()
        polled = await receive(control.results, args.seconds + 120, "the polling to end")
        stop.set()
        control.published.value = await publishing
        elapsed, cpu_api = time.perf_counter() - wall, cpu_s(api.pid) - cpu_api
        rss_end = rss_kb(api.pid)
        control.stop.set()
        streamed = [await receive(control.results, 60, "the SSE clients to report")
                    for _ in processes[:-1]]
    finally:
        control.go.set()
        control.stop.set()
        for process in processes:
            process.join(10)
            if process.is_alive():
                process.kill()
    return report(args, names, polled, streamed, control.published.value, connected,
                  elapsed, cpu_api, (rss_before, rss_connected, rss_end))


def report(args: argparse.Namespace, names: list[str], polled: Stats, streamed: list[Stats],
           published: int, connected: int, elapsed: float, cpu_api: float,
           rss: tuple[int, int, int]) -> dict[str, Any]:
    errors = polled.errors + sum((stats.errors for stats in streamed), Counter())
    received = [n for stats in streamed for n in stats.received.values()]
    missed = sum(max(0, published - n) for n in received)
    if missed:
        errors["sse_events_missed"] += missed
    event_ms = [ms for stats in streamed for ms in stats.event_ms]
    all_polls = [ms for values in polled.poll_ms.values() for ms in values]
    rss_before, rss_connected, rss_end = rss
    return {
        "config": {
            "symbols": len(names), "publish_interval_s": args.publish_interval,
            "sse_clients": args.sse_clients, "sse_connected": connected, "rps": args.rps,
            "seconds": args.seconds, "poll_connections": args.poll_connections,
            "sse_procs": args.sse_procs, "api_workers": 1,
        },
        "poll": {**latency_summary(all_polls),
                 "achieved_rps": round(len(all_polls) / polled.wall_s, 1),
                 "by_endpoint": {name: latency_summary(values)
                                 for name, values in sorted(polled.poll_ms.items())}},
        "events": {**latency_summary(event_ms), "published": published, "delivered": sum(received),
                   "delivered_per_s": round(sum(received) / elapsed, 1)},
        "errors": dict(sorted(errors.items())),
        "api": {
            "rss_mb_before_sse": round(rss_before / 1024, 1),
            "rss_mb_with_sse": round(rss_connected / 1024, 1),
            "rss_mb_end": round(rss_end / 1024, 1),
            "kb_per_sse_connection": round((rss_connected - rss_before) / max(connected, 1), 1),
            "cpu_pct_of_core": round(100 * cpu_api / elapsed, 1),
        },
        "load_generator": {
            "poller_cpu_pct_of_core": round(100 * polled.cpu_s / polled.wall_s, 1),
            "sse_cpu_pct_of_core": [round(100 * stats.cpu_s / stats.wall_s, 1)
                                    for stats in streamed],
            "schedule_lag_ms_p99": round(percentile(polled.schedule_lag_ms, 99), 2),
        },
    }


async def measure(args: argparse.Namespace, tmp: Path) -> dict[str, Any]:
    names = symbols(args.symbols)
    with start_redis(log_dir=tmp / "logs") as redis_server:
        settings = Settings(_env_file=None, redis_url=redis_server.url, redis_prefix=_PREFIX)
        store = RedisStore.from_settings(settings)
        try:
            for i in range(HISTORY):
                await store.write_many(records(names, i))
            with api_process(redis_server.url, _PREFIX, names, args.sse_clients,
                             tmp) as (base, api):
                return await run(args, base, api, store, names)
        finally:
            await store.aclose()


def print_summary(result: dict[str, Any], path: Path) -> None:
    poll, events, api = result["poll"], result["events"], result["api"]
    config, machine, generator = result["config"], result["machine"], result["load_generator"]
    print(f"\n{machine['cpu']} ({machine['cores']} cores), Python {machine['python']}")
    print(f"1 API worker; {config['symbols']} symbols every {config['publish_interval_s']:g} s; "
          f"{config['sse_clients']} SSE clients; {config['rps']:g} req/s for "
          f"{config['seconds']:g} s")
    rows = [
        ("polling latency p50 / p99",
         f"{poll['p50_ms']:.1f} / {poll['p99_ms']:.1f} ms ({poll['achieved_rps']:g} req/s)"),
        ("event delivery p50 / p99",
         f"{events['p50_ms']:.1f} / {events['p99_ms']:.1f} ms "
         f"({events['delivered_per_s']:,.0f} events/s)"),
        ("API RSS before / with SSE",
         f"{api['rss_mb_before_sse']:.1f} / {api['rss_mb_with_sse']:.1f} MB "
         f"(end {api['rss_mb_end']:.1f} MB)"),
        ("memory per SSE connection", f"{api['kb_per_sse_connection']:.0f} KB"),
        ("API CPU", f"{api['cpu_pct_of_core']:.0f} % of a core"),
        ("load generator CPU", f"polling {generator['poller_cpu_pct_of_core']:.0f} %, SSE "
         + " + ".join(f"{pct:.0f} %" for pct in generator["sse_cpu_pct_of_core"])
         + " of a core"),
        ("errors", ", ".join(f"{k}={v}" for k, v in result["errors"].items()) or "none"),
    ]
    width = max(len(name) for name, _ in rows)
    for name, value in rows:
        print(f"  {name:<{width}}  {value}")
    for name, figures in poll["by_endpoint"].items():
        print(f"    {name:<24} p50 {figures['p50_ms']:6.1f} ms  p99 {figures['p99_ms']:6.1f} ms")
    print(f"written to {path}")


def parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench.load",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("--sse-clients", type=int, default=200, help="SSE connections")
    parser.add_argument("--rps", type=float, default=200.0, help="polling requests per second")
    parser.add_argument("--seconds", type=float, default=30.0, help="length of the run")
    parser.add_argument("--symbols", type=int, default=20, help="symbols published")
    parser.add_argument("--publish-interval", type=float, default=1.0,
                        help="seconds between two candle+prediction writes per symbol")
    parser.add_argument("--poll-connections", type=int, default=64,
                        help="connection pool size of the polling clients")
    parser.add_argument("--sse-procs", type=int, default=1,
                        help="processes the SSE clients are spread over (polling has its own)")
    parser.add_argument("--out", type=Path, default=results_path("load", quick=False))
    args = parser.parse_args(argv)
    if min(args.sse_clients, args.sse_procs, args.symbols, args.poll_connections) < 1:
        parser.error("--sse-clients, --sse-procs, --symbols and --poll-connections must be >= 1")
    if args.rps <= 0 or args.seconds <= 0 or args.publish_interval <= 0:
        parser.error("--rps, --seconds and --publish-interval must be positive")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    return run_stage(lambda tmp: asyncio.run(measure(args, tmp)), args.out, print_summary)


if __name__ == "__main__":
    sys.exit(main())
