"""SSE fan-out of ONE ``mur api`` process: ``python -m bench.fanout`` (part of ``make bench``).

An embedded redis-server, one ``mur api`` process, a publisher writing ``--rate`` candles a
second (round robin over 20 symbols, through :class:`RedisStore` as the worker writes
them, ``ts_ingest`` stamped just before the write) and SSE clients subscribed to candles
(:mod:`bench._sse`: raw sockets, in processes of their own, so that the API's CPU is
measured apart from theirs). In one run the clients grow in steps (default 1, 100, 5,000
connections); at each step the publisher writes for ``--seconds``, the clients get up to
``--drain`` s more for the last events, and the step reports:

- delivered events/s, and the share of the offered events (published x clients) delivered;
- delivery latency p50/p99/max: receipt time - ``ts_ingest`` (one machine, one clock);
- drops: streams the API ended (it disconnects a client whose queue overflows) and events
  a connection never received;
- the API's RSS (``VmRSS``) once the step's clients are connected, hence memory per
  connection, and the CPU of the API and of the client processes over the step.

Ratios compare the largest step with the first two. Results go to stdout and
``bench/results/fanout.json``. A benchmark, not a test: it asserts nothing about the
figures, but exits non-zero when a stage fails.
"""

import argparse
import asyncio
import sys
import time
from pathlib import Path
from typing import Any

from bench._api import api_process, candle, publisher, symbols
from bench._common import (
    BenchError,
    latency_summary,
    parse_stage,
    print_columns,
    raise_nofile,
    run_stage,
    stage_parser,
    tree_cpu_s,
    tree_rss_kb,
)
from bench._sse import Fleet, client_steps
from makeusrich.core.embedded import start_redis
from makeusrich.core.schemas import now_ms
from makeusrich.core.settings import Settings
from makeusrich.core.store import RedisStore

_PREFIX = "fanout"
_SETTLE_S = 1.0  # after connecting: every stream has subscribed, the API is idle again


async def _publish(store: RedisStore, names: list[str], rate: float, seconds: float,
                   first: int) -> int:
    """Write ``rate`` candles a second for ``seconds``, the i-th for names[i % n], i from
    ``first`` on (the store refuses a candle it already holds); returns how many."""
    stop = asyncio.Event()
    asyncio.get_running_loop().call_later(seconds, stop.set)
    n = len(names)
    return await publisher(store, lambda i: [candle(names[i % n], i // n, now_ms())],
                           1.0 / rate, stop, first)


async def _step(fleet: Fleet, store: RedisStore, api_pid: int, names: list[str],
                clients: int, args: argparse.Namespace, first: int) -> dict[str, Any]:
    print(f"{clients:,} SSE client(s): connecting ...", flush=True)
    connect_started = time.perf_counter()
    await asyncio.to_thread(fleet.grow, clients)
    connect_s = time.perf_counter() - connect_started
    await asyncio.sleep(_SETTLE_S)
    rss = tree_rss_kb(api_pid)
    await asyncio.to_thread(fleet.collect)  # forget heartbeats
    print(f"{clients:,} SSE client(s): publishing {args.rate:g} candles/s for "
          f"{args.seconds:g} s ...", flush=True)
    api_cpu, started = tree_cpu_s(api_pid), time.perf_counter()
    published = await _publish(store, names, args.rate, args.seconds, first)
    drained = await asyncio.to_thread(fleet.drain, published, args.drain)
    elapsed = time.perf_counter() - started
    api_cpu = tree_cpu_s(api_pid) - api_cpu
    batch = await asyncio.to_thread(fleet.collect)
    if not batch.latency_ms:
        raise BenchError(f"none of the {published} events reached the {clients} client(s)")
    delivered = sum(batch.counts)
    return {
        "clients": clients,
        "published": published,
        "delivered": delivered,
        "delivered_per_s": round(delivered / elapsed, 1),
        "delivered_share": round(delivered / max(published * clients, 1), 4),
        "latency": latency_summary(batch.latency_ms),
        "streams_ended_by_api": batch.closed_by_server,
        "events_missed": sum(max(0, published - count) for count in batch.counts),
        "drained": drained,
        "api_rss_kb": rss,
        "api_cpu_pct_of_core": round(100 * api_cpu / elapsed, 1),
        "clients_cpu_pct_of_core": round(100 * batch.cpu_s / elapsed, 1),
        "connect_s": round(connect_s, 2),
        "step_s": round(elapsed, 2),
    }


async def _measure(args: argparse.Namespace, tmp: Path) -> dict[str, Any]:
    raise_nofile(max(args.clients) + 1_000)  # a descriptor per connection, in the API too
    names = symbols(args.symbols)
    top = max(args.clients)
    with start_redis(log_dir=tmp / "logs") as redis_server:
        settings = Settings(_env_file=None, redis_url=redis_server.url, redis_prefix=_PREFIX)
        store = RedisStore.from_settings(settings)
        try:
            with api_process(redis_server.url, _PREFIX, names, top, tmp,
                             args.api_workers) as (base, api), \
                    Fleet(base, "events=candle", procs=args.client_procs) as fleet:
                steps: list[dict[str, Any]] = []
                for clients in args.clients:
                    first = sum(step["published"] for step in steps)
                    steps.append(await _step(fleet, store, api.pid, names, clients, args,
                                             first))
        finally:
            await store.aclose()
    return _report(args, steps)


def _report(args: argparse.Namespace, steps: list[dict[str, Any]]) -> dict[str, Any]:
    first, last = steps[0], steps[-1]
    ratios: dict[str, Any] = {
        "delivered_share_at_top": last["delivered_share"],
        f"p99_{last['clients']}_over_{first['clients']}":
            round(last["latency"]["p99_ms"] / first["latency"]["p99_ms"], 2),
        f"p50_{last['clients']}_over_{first['clients']}":
            round(last["latency"]["p50_ms"] / first["latency"]["p50_ms"], 2),
    }
    if len(steps) > 2:
        middle = steps[-2]
        ratios[f"p99_{last['clients']}_over_{middle['clients']}"] = round(
            last["latency"]["p99_ms"] / middle["latency"]["p99_ms"], 2)
    added = last["clients"] - first["clients"]
    kb_per_connection = (round((last["api_rss_kb"] - first["api_rss_kb"]) / added, 1)
                         if added > 0 else None)
    return {
        "config": {"steps": args.clients, "rate_per_s": args.rate, "seconds": args.seconds,
                   "drain_s": args.drain, "symbols": args.symbols,
                   "client_procs": args.client_procs, "api_workers": args.api_workers},
        "steps": steps,
        "ratios": ratios,
        "api_kb_per_connection": kb_per_connection,
    }


def _print_summary(result: dict[str, Any], path: Path) -> None:
    machine, config = result["machine"], result["config"]
    print(f"\n{machine['cpu']} ({machine['cores']} cores), Python {machine['python']}; "
          f"API processes: {config['api_workers']}, {config['rate_per_s']:g} candles/s for "
          f"{config['seconds']:g} s per step; bench took {result['bench_wall_s']:.0f} s")
    header = ("clients", "events/s", "delivered", "p50 ms", "p99 ms", "max ms", "ended",
              "missed", "API RSS MB", "API CPU", "clients CPU")
    print_columns(header, [
        (f"{step['clients']:,}", f"{step['delivered_per_s']:,.0f}",
         f"{100 * step['delivered_share']:.1f} %", f"{step['latency']['p50_ms']}",
         f"{step['latency']['p99_ms']}", f"{step['latency']['max_ms']}",
         f"{step['streams_ended_by_api']}", f"{step['events_missed']}",
         f"{step['api_rss_kb'] / 1024:.1f}", f"{step['api_cpu_pct_of_core']:.0f} %",
         f"{step['clients_cpu_pct_of_core']:.0f} %")
        for step in result["steps"]
    ])
    print(f"API memory per SSE connection: {result['api_kb_per_connection']} KB; ratios: "
          + ", ".join(f"{k} = {v}" for k, v in result["ratios"].items()))
    print(f"written to {path}")


def _parse(argv: list[str] | None) -> argparse.Namespace:
    parser = stage_parser("fanout", __doc__, "1,20,200 clients, 3 s per step")
    parser.add_argument("--clients", type=client_steps,
                        help="SSE connections at each step, increasing (default 1,100,5000)")
    parser.add_argument("--rate", type=float, default=2.0,
                        help="candles published per second (default 2)")
    parser.add_argument("--seconds", type=float, help="publishing time per step (default 10)")
    parser.add_argument("--drain", type=float, default=10.0,
                        help="seconds the clients get after publishing to receive the rest")
    parser.add_argument("--symbols", type=int, default=20)
    parser.add_argument("--client-procs", type=int, default=1,
                        help="processes the SSE clients are spread over")
    parser.add_argument("--api-workers", type=int, default=1,
                        help="MUR_API_WORKERS of the API (default 1)")
    args = parse_stage(parser, argv, "fanout", clients=([1, 20, 200], [1, 100, 5000]),
                       seconds=(3.0, 10.0))
    if args.rate <= 0 or args.seconds <= 0 or min(args.symbols, args.client_procs,
                                                   args.api_workers) < 1:
        parser.error("--rate and --seconds must be positive; --symbols, --client-procs and "
                     "--api-workers at least 1")
    return args


def main(argv: list[str] | None = None) -> int:
    args = _parse(argv)
    return run_stage(lambda tmp: asyncio.run(_measure(args, tmp)), args.out, _print_summary,
                     quick=args.quick)


if __name__ == "__main__":
    sys.exit(main())
