"""Candle close -> SSE latency, 1 client vs 1,000: ``python -m bench.sse_latency``
(part of ``make bench``).

Runs the real pipeline, ``mur up --source sim`` (20 symbols, 1s candles, grace 200 ms, the
simulator's 20 trades/s per symbol; embedded broker and redis-server), and SSE clients
subscribed to candles (:mod:`bench._sse`: raw sockets in a process of their own, so that
the API's CPU is measured apart from theirs). The latency of a delivered candle is the
kernel's receive stamp on the client's socket minus its ``ts_ingest``, stamped by the worker
when it closed the candle (one machine, one clock); ``read_latency`` uses the time the
client process read it instead. In one run the clients grow in steps (default 1, then
1,000): at each step they connect, ``--warmup`` s pass, then every candle received in the next
``--seconds`` counts. Each step reports p50/p99/max, delivered candles/s, candles missed
(gaps in a symbol's open times) and streams the API ended, and the CPU of the API, the
worker and the clients. Ratios: p50 and p99 at the last step over the first.

Results go to stdout and ``bench/results/sse_latency.json``. A benchmark, not a test: it
asserts nothing about the figures, but exits non-zero when a stage fails.
"""

import argparse
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from bench._api import symbols
from bench._common import (
    BenchError,
    check_alive,
    child_pid,
    clean_env,
    latency_summary,
    open_access_env,
    parse_stage,
    print_columns,
    raise_nofile,
    run_stage,
    spawn_mur,
    stage_parser,
    stop_process,
    tree_cpu_s,
    wait_healthy,
)
from bench._sse import Fleet, client_steps
from makeusrich.core.embedded import free_port
from makeusrich.core.intervals import interval_ms

_FIRST_CANDLE_POLL_S = 0.5


def _wait_for_candles(fleet: Fleet, process: subprocess.Popen[bytes], log: Path,
                      timeout_s: float) -> None:
    """Until a candle arrives: the worker joins its group and fills a candle first."""
    deadline = time.monotonic() + timeout_s
    while not fleet.collect().latency_ms:
        check_alive(process, "mur up", log)
        if time.monotonic() > deadline:
            raise BenchError(f"no candle reached the SSE clients within {timeout_s:.0f} s")
        time.sleep(_FIRST_CANDLE_POLL_S)


def _step(fleet: Fleet, pids: dict[str, int], clients: int,
          args: argparse.Namespace) -> dict[str, Any]:
    print(f"{clients:,} SSE client(s): connecting, then {args.warmup:g} s warm-up and "
          f"{args.seconds:g} s measured ...", flush=True)
    connect_started = time.perf_counter()
    fleet.grow(clients)
    connect_s = time.perf_counter() - connect_started
    time.sleep(args.warmup)
    fleet.collect()  # the warm-up's candles
    cpu = {name: tree_cpu_s(pid) for name, pid in pids.items()}
    started = time.perf_counter()
    time.sleep(args.seconds)
    batch = fleet.collect()
    elapsed = time.perf_counter() - started
    if not batch.latency_ms:
        raise BenchError(f"no candle reached the {clients} client(s) in {elapsed:.0f} s")
    return {
        "clients": clients,
        "latency": latency_summary(batch.latency_ms),
        "read_latency": latency_summary(batch.read_latency_ms),
        "delivered_per_s": round(len(batch.latency_ms) / elapsed, 1),
        "candles_missed": batch.missed,
        "streams_ended_by_api": batch.closed_by_server,
        **{f"{name}_cpu_pct_of_core": round(100 * (tree_cpu_s(pid) - cpu[name]) / elapsed, 1)
           for name, pid in pids.items()},
        "clients_cpu_pct_of_core": round(100 * batch.cpu_s / elapsed, 1),
        "connect_s": round(connect_s, 2),
        "measured_s": round(elapsed, 2),
    }


def _measure(args: argparse.Namespace, tmp: Path) -> list[dict[str, Any]]:
    raise_nofile(max(args.clients) + 1_000)  # a descriptor per connection, in the API too
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    log = tmp / "mur-up.log"
    env = clean_env({
        "MUR_STATE_DIR": str(tmp / "up-state"), "MUR_GRACE_MS": str(args.grace_ms),
        "MUR_LOG_LEVEL": "WARNING", "MUR_API_WORKERS": str(args.api_workers),
        **open_access_env(max(args.clients)),
    })
    argv = ["up", "--source", "sim", "--symbols", ",".join(symbols(args.symbols)),
            "--intervals", args.interval, "--api-port", str(port)]
    process = spawn_mur(argv, env, log)
    try:
        wait_healthy(base, process, "mur up", log, args.timeout)
        pids = {name: child_pid(process.pid, name) for name in ("api", "worker")}
        with Fleet(base, "events=candle", procs=args.client_procs,
                   step_ms=interval_ms(args.interval)) as fleet:
            fleet.grow(1)
            _wait_for_candles(fleet, process, log, args.timeout)
            steps = [_step(fleet, pids, clients, args) for clients in args.clients]
        check_alive(process, "mur up", log)
    finally:
        code = stop_process(process)
    if code not in (0, None):
        print(f"warning: mur up exited with code {code} on SIGTERM", file=sys.stderr)
    return steps


def _report(args: argparse.Namespace, steps: list[dict[str, Any]]) -> dict[str, Any]:
    first, last = steps[0]["latency"], steps[-1]["latency"]
    n0, n1 = steps[0]["clients"], steps[-1]["clients"]
    return {
        "config": {"steps": args.clients, "symbols": args.symbols, "interval": args.interval,
                   "grace_ms": args.grace_ms, "warmup_s": args.warmup, "seconds": args.seconds,
                   "client_procs": args.client_procs, "api_workers": args.api_workers,
                   "source": "sim"},
        "steps": steps,
        "ratios": {
            f"p99_{n1}_over_{n0}": round(last["p99_ms"] / first["p99_ms"], 2),
            f"p50_{n1}_over_{n0}": round(last["p50_ms"] / first["p50_ms"], 2),
        },
    }


def _print_summary(result: dict[str, Any], path: Path) -> None:
    machine, config = result["machine"], result["config"]
    print(f"\n{machine['cpu']} ({machine['cores']} cores), Python {machine['python']}; "
          f"mur up --source sim, {config['symbols']} symbols at {config['interval']}; "
          f"bench took {result['bench_wall_s']:.0f} s")
    header = ("clients", "candles/s", "p50 ms", "p99 ms", "max ms", "missed", "ended",
              "API CPU", "worker CPU", "clients CPU")
    print_columns(header, [
        (f"{step['clients']:,}", f"{step['delivered_per_s']:,.0f}",
         f"{step['latency']['p50_ms']}", f"{step['latency']['p99_ms']}",
         f"{step['latency']['max_ms']}", f"{step['candles_missed']}",
         f"{step['streams_ended_by_api']}", f"{step['api_cpu_pct_of_core']:.0f} %",
         f"{step['worker_cpu_pct_of_core']:.0f} %", f"{step['clients_cpu_pct_of_core']:.0f} %")
        for step in result["steps"]
    ])
    print("ratios: " + ", ".join(f"{k} = {v}" for k, v in result["ratios"].items()))
    print(f"written to {path}")


def _parse(argv: list[str] | None) -> argparse.Namespace:
    parser = stage_parser("sse_latency", __doc__, "1,50 clients, 2 s warm-up, 5 s measured")
    parser.add_argument("--clients", type=client_steps,
                        help="SSE connections at each step, increasing (default 1,1000)")
    parser.add_argument("--symbols", type=int, default=20)
    parser.add_argument("--interval", default="1s", help="candle interval (default 1s)")
    parser.add_argument("--grace-ms", type=int, default=200)
    parser.add_argument("--warmup", type=float, help="seconds before measuring (default 5)")
    parser.add_argument("--seconds", type=float, help="seconds measured per step (default 20)")
    parser.add_argument("--client-procs", type=int, default=1,
                        help="processes the SSE clients are spread over")
    parser.add_argument("--api-workers", type=int, default=1,
                        help="MUR_API_WORKERS (default 1)")
    parser.add_argument("--timeout", type=float, default=90.0,
                        help="limit for each waiting step, in seconds")
    args = parse_stage(parser, argv, "sse_latency", clients=([1, 50], [1, 1000]),
                       warmup=(2.0, 5.0), seconds=(5.0, 20.0))
    if min(args.symbols, args.client_procs) < 1 or args.seconds <= 0:
        parser.error("--symbols and --client-procs must be >= 1, --seconds positive")
    return args


def main(argv: list[str] | None = None) -> int:
    args = _parse(argv)
    return run_stage(lambda tmp: _report(args, _measure(args, tmp)), args.out, _print_summary,
                     quick=args.quick)


if __name__ == "__main__":
    sys.exit(main())
