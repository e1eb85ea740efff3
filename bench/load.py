"""Load test of the API: ``python -m bench.load`` (``make load``, options via ``ARGS``).

Starts an embedded redis-server and one ``mur api`` process (``--api-workers`` sets
``MUR_API_WORKERS``; anonymous access, limits above the offered load), seeds history, and
while a publisher writes a candle and a prediction for each of ``--symbols`` symbols every
``--publish-interval`` s (through :class:`RedisStore`, stamping ``ts_ingest``) runs two
phases (``--only`` picks one):

- mixed: ``--sse-clients`` hold ``/v1/stream?events=candle,prediction`` open
  (:mod:`bench._sse`; delivery time = receipt - ``ts_ingest``) while polling clients send
  ``--rps`` requests a second for ``--seconds`` s, spread uniformly over four endpoints;
- capacity: no SSE clients; ``GET /v1/predictions/latest`` alone at each of
  ``--capacity-rates`` for ``--capacity-seconds`` s, up to the first rate whose p99
  exceeds 50 ms or that is not answered (95 % of it, no errors). The highest rate answered
  within that is the capacity: of one API process with ``--api-workers 1``.

Polling is open loop: request i is due at start + i / rate whether or not earlier ones
were answered, and its latency counts from then, so a stalled server is not hidden by
clients that wait for it. It runs in ``--poll-procs`` processes (aiohttp, its own session
each), the SSE clients in theirs. They share the machine with the API, so each process's
CPU is reported beside the figures it produced: a process near a full core means the load
generator, not the API, set the figure, and a warning says so.

Also reported: errors by kind, missed events, and the API's CPU and RSS (summed over its
worker processes) before and with the SSE clients, hence memory per connection. Results go
to stdout and ``bench/results/load.json``. A load test, not a test: it asserts nothing
about the figures.
"""

import argparse
import asyncio
import contextlib
import multiprocessing as mp
import random
import sys
import time
from collections import Counter
from collections.abc import Awaitable
from dataclasses import dataclass, field
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any, Final, TypeVar

import aiohttp

from bench._api import api_process, publisher, records, symbols
from bench._common import (
    BenchError,
    latency_summary,
    parse_stage,
    percentile,
    print_columns,
    raise_nofile,
    run_stage,
    stage_parser,
    tree_cpu_s,
    tree_rss_kb,
)
from bench._sse import Batch, Fleet, client_steps
from makeusrich.core.embedded import start_redis
from makeusrich.core.schemas import Candle, Prediction
from makeusrich.core.settings import Settings
from makeusrich.core.store import RedisStore

_PREFIX: Final = "load"
HISTORY: Final = 200  # candles and predictions per symbol written before the run
Endpoint = tuple[str, str, dict[str, str]]  # name, path template, query
# What the mixed phase polls, chosen uniformly; the capacity phase polls the first alone.
ENDPOINTS: Final[tuple[Endpoint, ...]] = (
    ("predictions_latest_all", "/v1/predictions/latest", {}),
    ("prediction_latest", "/v1/predictions/{symbol}/latest", {}),
    ("prediction_history", "/v1/predictions/{symbol}/history", {"limit": "100"}),
    ("candles", "/v1/candles/{symbol}", {"limit": "100"}),
)
LATEST_ALL: Final = ENDPOINTS[0]
PHASES: Final = ("mixed", "capacity")
CAPACITY_RATES: Final = [500, 1000, 1500, 2000, 2500, 3000, 4000, 5000, 6000]
P99_LIMIT_MS: Final = 50.0
MIN_ANSWERED: Final = 0.95  # share of the offered rate a capacity step must achieve
BUSY_PCT: Final = 90.0  # a load generator process above this much of a core limits a figure
_CANDLE_STEP_MS: Final = 60_000  # between one symbol's open times (bench._api)
_START_AHEAD_S: Final = 0.05  # for a polling plan to reach every process
_TIMEOUT_S: Final = 10.0  # per request, and for the backlog once a run's schedule ends
_WARMUP: Final = (100.0, 1.0)  # req/s and s: the API's code paths, the pollers' sessions
_SETTLE_S: Final = 1.0
_DRAIN_S: Final = 10.0  # for the SSE clients to receive the last events

T = TypeVar("T")


# ---- polling processes -----------------------------------------------------------------


@dataclass
class Plan:
    """One polling run, the same for every process: request i of int(rate x seconds) is
    due at ``start`` + i / rate, and process k of P sends those with i % P == k."""

    rate: float
    seconds: float
    start: float  # time.monotonic(): CLOCK_MONOTONIC, one clock for every process
    endpoints: tuple[Endpoint, ...]
    names: list[str]


@dataclass
class Polled:
    """What one polling process measured over a run."""

    ms: dict[str, list[float]] = field(default_factory=dict)  # latency of 200s, by endpoint
    errors: Counter[str] = field(default_factory=Counter)
    lag_ms_p99: float = 0.0  # how late the process sent its requests
    wall_s: float = 0.0  # from the start to its last answer
    cpu_s: float = 0.0

    @property
    def cpu_pct(self) -> float:
        return 100 * self.cpu_s / self.wall_s


async def _send(session: aiohttp.ClientSession,
                queue: "asyncio.Queue[tuple[float, str, str, dict[str, str]]]",
                polled: Polled) -> None:
    """Send queued requests one at a time; latency counts from when each was due."""
    while True:
        due, name, path, params = await queue.get()
        try:
            async with session.get(path, params=params) as response:
                await response.read()
            if response.status == 200:
                polled.ms.setdefault(name, []).append((time.monotonic() - due) * 1000)
            else:
                polled.errors[f"http_{response.status}"] += 1
        except (aiohttp.ClientError, TimeoutError) as exc:
            polled.errors[type(exc).__name__] += 1
        finally:
            queue.task_done()


async def _poll(session: aiohttp.ClientSession, plan: Plan, index: int, procs: int,
                connections: int) -> Polled:
    """Run this process's share of ``plan``: each request waits in a queue for one of
    ``connections`` workers, and that wait counts in its latency (no coordinated omission)."""
    polled, rng = Polled(), random.Random(index)
    queue: asyncio.Queue[tuple[float, str, str, dict[str, str]]] = asyncio.Queue()
    workers = [asyncio.create_task(_send(session, queue, polled)) for _ in range(connections)]
    requests = range(index, int(plan.rate * plan.seconds), procs)
    lags: list[float] = []
    await asyncio.sleep(plan.start - time.monotonic())
    cpu = time.process_time()
    for i in requests:
        due = plan.start + i / plan.rate
        await asyncio.sleep(due - time.monotonic())  # also when late: lets the workers run
        lags.append((time.monotonic() - due) * 1000)
        name, template, params = rng.choice(plan.endpoints)
        queue.put_nowait((due, name, template.format(symbol=rng.choice(plan.names)), params))
    with contextlib.suppress(TimeoutError):  # an overloaded API: the rest is unanswered
        await asyncio.wait_for(queue.join(), _TIMEOUT_S)
    polled.wall_s = time.monotonic() - plan.start
    polled.cpu_s = time.process_time() - cpu
    polled.lag_ms_p99 = percentile(lags, 99)
    for worker in workers:
        worker.cancel()
    await asyncio.gather(*workers, return_exceptions=True)
    answered = sum(map(len, polled.ms.values())) + polled.errors.total()
    if answered < len(requests):
        polled.errors["unanswered"] += len(requests) - answered
    return polled


async def _serve(pipe: Connection, base: str, index: int, procs: int, connections: int) -> None:
    async with aiohttp.ClientSession(
        base, connector=aiohttp.TCPConnector(limit=connections),
        timeout=aiohttp.ClientTimeout(total=_TIMEOUT_S),
    ) as session:
        pipe.send(None)  # ready
        while (plan := await asyncio.to_thread(pipe.recv)) is not None:
            pipe.send(await _poll(session, plan, index, procs, connections))


def _poller_process(pipe: Connection, base: str, index: int, procs: int,
                    connections: int) -> None:
    asyncio.run(_serve(pipe, base, index, procs, connections))


class Pollers:
    """``procs`` polling processes of ``base``, each with its own aiohttp session of up to
    ``connections`` connections, kept from one run to the next."""

    def __init__(self, base: str, procs: int, connections: int) -> None:
        ctx = mp.get_context("spawn")
        self._pipes: list[Connection] = []
        self._processes: list[mp.process.BaseProcess] = []
        for index in range(procs):
            ours, theirs = ctx.Pipe()
            process = ctx.Process(target=_poller_process, daemon=True,
                                  args=(theirs, base, index, procs, connections))
            process.start()
            theirs.close()  # so that our end reads EOF when the process dies
            self._pipes.append(ours)
            self._processes.append(process)
        for pipe in self._pipes:
            self._receive(pipe, 60, "start")

    def __enter__(self) -> "Pollers":
        return self

    def __exit__(self, *exc: object) -> None:
        for pipe, process in zip(self._pipes, self._processes, strict=True):
            with contextlib.suppress(OSError):
                pipe.send(None)
            process.join(5)
            if process.is_alive():
                process.kill()
                process.join()

    def run(self, rate: float, seconds: float, endpoints: tuple[Endpoint, ...],
            names: list[str]) -> list[Polled]:
        """Poll at ``rate`` requests/s, all processes together, for ``seconds``; blocks."""
        plan = Plan(rate, seconds, time.monotonic() + _START_AHEAD_S, endpoints, names)
        for pipe in self._pipes:
            pipe.send(plan)
        return [self._receive(pipe, seconds + 2 * _TIMEOUT_S + 30, "finish")
                for pipe in self._pipes]

    @staticmethod
    def _receive(pipe: Connection, timeout_s: float, what: str) -> Any:
        with contextlib.suppress(EOFError):
            if pipe.poll(timeout_s):
                return pipe.recv()
        raise BenchError(f"a polling process did not {what} within {timeout_s:.0f} s "
                         "(or died)")


def _latencies(polled: list[Polled]) -> dict[str, list[float]]:
    merged: dict[str, list[float]] = {}
    for part in polled:
        for name, values in part.ms.items():
            merged.setdefault(name, []).extend(values)
    return dict(sorted(merged.items()))


def _poll_summary(polled: list[Polled]) -> dict[str, Any]:
    every = [ms for values in _latencies(polled).values() for ms in values]
    return {**latency_summary(every),
            "achieved_rps": round(len(every) / max(part.wall_s for part in polled), 1)}


def _errors(polled: list[Polled]) -> dict[str, int]:
    return dict(sorted(sum((part.errors for part in polled), Counter()).items()))


def _pollers_cpu(polled: list[Polled]) -> dict[str, Any]:
    """The polling processes' own load: CPU, and how late they sent (p99)."""
    return {"poller_cpu_pct_of_core": [round(part.cpu_pct, 1) for part in polled],
            "poller_lag_ms_p99": [round(part.lag_ms_p99, 2) for part in polled]}


def _busy(what: str, cpu_pcts: list[float]) -> list[str]:
    """A warning when a load generator process was near a full core during ``what``."""
    if max(cpu_pcts) <= BUSY_PCT:
        return []
    return [f"{what}: a load generator process used {max(cpu_pcts):.0f} % of a core, so "
            "the figure may be the load generator's limit rather than the API's"]


# ---- the phases ------------------------------------------------------------------------


class Feed:
    """The publisher, run during each measurement: every ``interval_s`` it writes each
    symbol's next candle and prediction, going on where the last run stopped (the store
    refuses a candle it already holds)."""

    def __init__(self, store: RedisStore, names: list[str], interval_s: float) -> None:
        self.names = names
        self._store, self._interval_s = store, interval_s
        self._next = HISTORY

    def _batch(self, i: int) -> list[Candle | Prediction]:
        self._next = i + 1
        return records(self.names, i)

    async def during(self, work: Awaitable[T]) -> tuple[T, int]:
        """``work``'s result, and how many events were published while it ran."""
        stop = asyncio.Event()
        publishing = asyncio.create_task(
            publisher(self._store, self._batch, self._interval_s, stop, first=self._next))
        try:
            result = await work
        finally:
            stop.set()
            published = await publishing
        return result, published


async def mixed(args: argparse.Namespace, base: str, api_pid: int, feed: Feed,
                pollers: Pollers) -> dict[str, Any]:
    rss_before = tree_rss_kb(api_pid)
    print(f"mixed: connecting {args.sse_clients} SSE clients ...", flush=True)
    with Fleet(base, "events=candle,prediction", procs=args.sse_procs,
               step_ms=_CANDLE_STEP_MS) as fleet:
        await asyncio.to_thread(fleet.grow, args.sse_clients)
        await asyncio.sleep(_SETTLE_S)  # every stream has subscribed, the API is idle again
        rss_with = tree_rss_kb(api_pid)
        await asyncio.to_thread(fleet.collect)  # forget heartbeats; clients' CPU from here
        print(f"mixed: polling at {args.rps:g} req/s for {args.seconds:g} s ...", flush=True)
        started, api_cpu = time.monotonic(), tree_cpu_s(api_pid)
        polled, published = await feed.during(asyncio.to_thread(
            pollers.run, args.rps, args.seconds, ENDPOINTS, feed.names))
        elapsed, api_cpu = time.monotonic() - started, tree_cpu_s(api_pid) - api_cpu
        rss_end = tree_rss_kb(api_pid)
        drained = await asyncio.to_thread(fleet.drain, published, _DRAIN_S)
        streamed = await asyncio.to_thread(fleet.collect)
        sse_cpu_pct = 100 * streamed.cpu_s / (time.monotonic() - started)
    # The SSE clients' CPU is their processes' sum (Fleet reports no more).
    generator = {**_pollers_cpu(polled), "sse_cpu_pct_of_core": round(sse_cpu_pct, 1)}
    return {
        "config": {"sse_clients": args.sse_clients, "sse_procs": args.sse_procs,
                   "rps": args.rps, "seconds": args.seconds,
                   "endpoints": [name for name, _, _ in ENDPOINTS]},
        "poll": {**_poll_summary(polled), "by_endpoint": {
            name: latency_summary(values) for name, values in _latencies(polled).items()}},
        "events": _events(streamed, published, drained, elapsed),
        "errors": _errors(polled),
        "api": {
            "rss_mb_before_sse": round(rss_before / 1024, 1),
            "rss_mb_with_sse": round(rss_with / 1024, 1),
            "rss_mb_end": round(rss_end / 1024, 1),
            "kb_per_sse_connection": round((rss_with - rss_before) / args.sse_clients, 1),
            "cpu_pct_of_core": round(100 * api_cpu / elapsed, 1),
        },
        "load_generator": generator,
        "warnings": [*_busy("mixed, polling", generator["poller_cpu_pct_of_core"]),
                     *_busy("mixed, SSE clients", [sse_cpu_pct / args.sse_procs])],
    }


def _events(streamed: Batch, published: int, drained: bool, elapsed: float) -> dict[str, Any]:
    delivered = sum(streamed.counts)
    return {**latency_summary(streamed.latency_ms), "published": published,
            "delivered": delivered, "delivered_per_s": round(delivered / elapsed, 1),
            "missed": sum(max(0, published - count) for count in streamed.counts),
            "open_time_gaps": streamed.missed, "streams_ended_by_api": streamed.closed_by_server,
            "open_at_end": streamed.open, "drained": drained}


async def capacity(args: argparse.Namespace, api_pid: int, feed: Feed,
                   pollers: Pollers) -> dict[str, Any]:
    steps: list[dict[str, Any]] = []
    for rate in args.capacity_rates:
        print(f"capacity: {rate:,} req/s of {LATEST_ALL[1]} for {args.capacity_seconds:g} s "
              "...", flush=True)
        steps.append(await _capacity_step(rate, args.capacity_seconds, api_pid, feed, pollers))
        if not steps[-1]["passed"]:
            break
    best = max((step for step in steps if step["passed"]), key=lambda step: step["achieved_rps"],
               default=None)
    return {
        "config": {"endpoint": LATEST_ALL[1], "rates": args.capacity_rates,
                   "seconds": args.capacity_seconds, "p99_limit_ms": P99_LIMIT_MS,
                   "min_answered_share": MIN_ANSWERED},
        "steps": steps,
        "capacity_rps_at_p99_50ms": None if best is None else best["achieved_rps"],
        "api_cpu_pct_at_capacity": None if best is None else best["api_cpu_pct_of_core"],
        "per_api_process": args.api_workers == 1,
        "warnings": [warning for step in steps for warning in _busy(
            f"capacity, {step['offered_rps']:,} req/s",
            step["load_generator"]["poller_cpu_pct_of_core"])],
    }


async def _capacity_step(rate: int, seconds: float, api_pid: int, feed: Feed,
                         pollers: Pollers) -> dict[str, Any]:
    started, api_cpu = time.monotonic(), tree_cpu_s(api_pid)
    polled, _ = await feed.during(asyncio.to_thread(
        pollers.run, rate, seconds, (LATEST_ALL,), feed.names))
    api_cpu_pct = 100 * (tree_cpu_s(api_pid) - api_cpu) / (time.monotonic() - started)
    poll, errors = _poll_summary(polled), _errors(polled)
    return {
        "offered_rps": rate, **poll, "errors": errors,
        "api_cpu_pct_of_core": round(api_cpu_pct, 1),
        "load_generator": _pollers_cpu(polled),
        "passed": (poll["p99_ms"] <= P99_LIMIT_MS and not errors
                   and poll["achieved_rps"] >= MIN_ANSWERED * rate),
    }


async def measure(args: argparse.Namespace, tmp: Path) -> dict[str, Any]:
    raise_nofile(args.sse_clients + args.poll_procs * args.poll_connections + 1_000)
    names = symbols(args.symbols)
    with start_redis(log_dir=tmp / "logs") as redis_server:
        settings = Settings(_env_file=None, redis_url=redis_server.url, redis_prefix=_PREFIX)
        store = RedisStore.from_settings(settings)
        try:
            for i in range(HISTORY):
                await store.write_many(records(names, i))
            feed = Feed(store, names, args.publish_interval)
            with api_process(redis_server.url, _PREFIX, names, args.sse_clients, tmp,
                             args.api_workers) as (base, api), \
                    Pollers(base, args.poll_procs, args.poll_connections) as pollers:
                await asyncio.to_thread(pollers.run, *_WARMUP, ENDPOINTS, names)
                await asyncio.sleep(_SETTLE_S)
                result: dict[str, Any] = {"config": {
                    "phases": args.only, "api_workers": args.api_workers,
                    "symbols": args.symbols, "publish_interval_s": args.publish_interval,
                    "poll_procs": args.poll_procs, "poll_connections": args.poll_connections,
                }}
                if "mixed" in args.only:
                    result["mixed"] = await mixed(args, base, api.pid, feed, pollers)
                if "capacity" in args.only:
                    result["capacity"] = await capacity(args, api.pid, feed, pollers)
                return result
        finally:
            await store.aclose()


# ---- output ----------------------------------------------------------------------------


def _pcts(values: list[float]) -> str:
    return " + ".join(f"{value:.0f}" for value in values) + " %"


def _api_label(workers: int) -> str:
    return "one API process" if workers == 1 else f"{workers} API workers together"


def _print_mixed(mixed: dict[str, Any]) -> None:
    config, poll, events, api = mixed["config"], mixed["poll"], mixed["events"], mixed["api"]
    generator = mixed["load_generator"]
    print(f"mixed: {config['sse_clients']} SSE clients + {config['rps']:g} req/s over "
          f"{len(config['endpoints'])} endpoints for {config['seconds']:g} s")
    rows = [
        ("polling p50 / p99", f"{poll['p50_ms']:.1f} / {poll['p99_ms']:.1f} ms "
         f"({poll['achieved_rps']:g} req/s)",
         f"pollers {_pcts(generator['poller_cpu_pct_of_core'])} of a core"),
        *((f"  {name}", f"{figures['p50_ms']:.1f} / {figures['p99_ms']:.1f} ms", "")
          for name, figures in poll["by_endpoint"].items()),
        ("event delivery p50 / p99", f"{events['p50_ms']:.1f} / {events['p99_ms']:.1f} ms "
         f"({events['delivered_per_s']:,.0f} events/s)",
         f"SSE clients {_pcts([generator['sse_cpu_pct_of_core']])} of a core"),
        ("API RSS before / with SSE", f"{api['rss_mb_before_sse']:.1f} / "
         f"{api['rss_mb_with_sse']:.1f} MB, {api['kb_per_sse_connection']:.0f} KB a client",
         f"end {api['rss_mb_end']:.1f} MB"),
        ("API CPU", f"{api['cpu_pct_of_core']:.0f} % of a core", ""),
        ("errors", ", ".join(f"{k}={v}" for k, v in mixed["errors"].items()) or "none",
         f"missed events {events['missed']}, streams ended {events['streams_ended_by_api']}"),
    ]
    widths = [max(len(row[i]) for row in rows) for i in range(2)]
    for name, value, note in rows:
        print(f"  {name:<{widths[0]}}  {value:<{widths[1]}}  {note}".rstrip())
    for warning in mixed["warnings"]:
        print(f"  warning: {warning}")


def _print_capacity(capacity: dict[str, Any], workers: int) -> None:
    config = capacity["config"]
    print(f"capacity: GET {config['endpoint']}, {config['seconds']:g} s a rate, up to p99 > "
          f"{config['p99_limit_ms']:g} ms or < {100 * config['min_answered_share']:.0f} % "
          "answered")
    print_columns(
        ("offered/s", "achieved/s", "p50 ms", "p99 ms", "max ms", "errors", "API CPU",
         "pollers CPU"),
        [(f"{step['offered_rps']:,}", f"{step['achieved_rps']:,.0f}", f"{step['p50_ms']}",
          f"{step['p99_ms']}", f"{step['max_ms']}", f"{sum(step['errors'].values())}",
          f"{step['api_cpu_pct_of_core']:.0f} %",
          _pcts(step["load_generator"]["poller_cpu_pct_of_core"]))
         for step in capacity["steps"]])
    if capacity["capacity_rps_at_p99_50ms"] is None:
        print("  capacity: no rate passed (p99, share answered, errors)")
    else:
        print(f"  capacity at p99 <= {config['p99_limit_ms']:g} ms: "
              f"{capacity['capacity_rps_at_p99_50ms']:,.0f} req/s, {_api_label(workers)} "
              f"at {capacity['api_cpu_pct_at_capacity']:.0f} % of a core"
              + ("" if capacity["per_api_process"] else " (not a per-process figure)"))
    for warning in capacity["warnings"]:
        print(f"  warning: {warning}")


def print_summary(result: dict[str, Any], path: Path) -> None:
    machine, config = result["machine"], result["config"]
    print(f"\n{machine['cpu']} ({machine['cores']} cores), Python {machine['python']}; "
          f"{_api_label(config['api_workers'])}; {config['symbols']} symbols published every "
          f"{config['publish_interval_s']:g} s; load generator CPU in % of a core; bench "
          f"took {result['bench_wall_s']:.0f} s")
    if "mixed" in result:
        _print_mixed(result["mixed"])
    if "capacity" in result:
        _print_capacity(result["capacity"], config["api_workers"])
    print(f"written to {path}")


def _phases(text: str) -> list[str]:
    """The argparse type of ``--only``: phases such as mixed,capacity."""
    phases = [part.strip() for part in text.split(",") if part.strip()]
    if not phases or set(phases) - set(PHASES):
        raise argparse.ArgumentTypeError(f"{text!r}: choose from {','.join(PHASES)}")
    return [phase for phase in PHASES if phase in phases]


def parse(argv: list[str] | None) -> argparse.Namespace:
    parser = stage_parser("load", __doc__, "50 SSE clients for 5 s, capacity at 200,500,1000 "
                          "req/s for 3 s each")
    parser.add_argument("--only", type=_phases, default=list(PHASES),
                        help=f"comma-separated phases to run, of {','.join(PHASES)} (default all)")
    parser.add_argument("--api-workers", type=int, default=1,
                        help="MUR_API_WORKERS of the API (default 1: capacity per process)")
    parser.add_argument("--symbols", type=int, default=20, help="symbols published")
    parser.add_argument("--publish-interval", type=float, default=1.0,
                        help="seconds between two candle+prediction writes per symbol")
    parser.add_argument("--poll-procs", type=int, default=2,
                        help="processes the polling load is spread over (default 2)")
    parser.add_argument("--poll-connections", type=int, default=64,
                        help="connection pool size of each polling process (default 64)")
    mixed_options = parser.add_argument_group("mixed phase")
    mixed_options.add_argument("--sse-clients", type=int, help="SSE connections (default 200)")
    mixed_options.add_argument("--sse-procs", type=int, default=1,
                               help="processes the SSE clients are spread over (default 1)")
    mixed_options.add_argument("--rps", type=float, default=200.0,
                               help="polling requests per second (default 200)")
    mixed_options.add_argument("--seconds", type=float, help="length (default 30)")
    capacity_options = parser.add_argument_group("capacity phase")
    capacity_options.add_argument(
        "--capacity-rates", type=client_steps,
        help=f"increasing req/s (default {','.join(map(str, CAPACITY_RATES))})")
    capacity_options.add_argument("--capacity-seconds", type=float,
                                  help="length of each rate (default 10)")
    args = parse_stage(parser, argv, "load", sse_clients=(50, 200), seconds=(5.0, 30.0),
                       capacity_rates=([200, 500, 1000], CAPACITY_RATES),
                       capacity_seconds=(3.0, 10.0))
    if min(args.sse_clients, args.sse_procs, args.symbols, args.poll_procs,
           args.poll_connections, args.api_workers) < 1:
        parser.error("--sse-clients, --sse-procs, --symbols, --poll-procs, --poll-connections "
                     "and --api-workers must be >= 1")
    if min(args.rps, args.seconds, args.publish_interval, args.capacity_seconds) <= 0:
        parser.error("--rps, --seconds, --publish-interval and --capacity-seconds must be "
                     "positive")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    return run_stage(lambda tmp: asyncio.run(measure(args, tmp)), args.out, print_summary,
                     quick=args.quick)


if __name__ == "__main__":
    sys.exit(main())
