"""Replay speed: ``python -m bench.replay`` (part of ``make bench``).

Replays one day of real BTCUSDT trades (``../shared/data/.../BTCUSDT-trades-2019-04-01.csv``
beside the checkout, 183,355 trades; ``--data`` takes another file) through the live path
(:func:`makeusrich.stream.replay.replay`: publish to the run's topic, a ``mur worker``
child builds candles and predictions) on embedded services, as fast as possible, and
reports the span's event time divided by the wall time: the replay's multiple of real time.
The same span is then replayed again from the Kafka topic (selection by ``ts_event``).

Then a simulated 2025-volume day (:func:`makeusrich.stream.simday.simulate_day`: 10 million
trades of five symbols, ``--sim-trades``) is written to a JSONL file of trade batches and
replayed from it the same way: file -> Kafka -> worker -> Redis, as fast as possible, with
the peak RSS of every process on the way (this one, which reads and publishes; the worker;
the broker; redis-server).

Results go to stdout and ``bench/results/replay.json``. A benchmark, not a test.
"""

import asyncio
import contextlib
import logging
import os
import resource
import sys
import threading
import time
from pathlib import Path
from typing import Any

from bench._common import (
    SHARED_SPOT,
    TEST_DATA,
    BenchError,
    parse_stage,
    run_stage,
    stage_parser,
)
from makeusrich.core.embedded import start_kafka, start_redis
from makeusrich.core.schemas import encode_batch
from makeusrich.core.settings import Settings
from makeusrich.stream.replay import ReplayResult, ReplaySpec, drop_namespace, replay
from makeusrich.stream.simday import simulate_day

_DAY = SHARED_SPOT / "trades" / "BTCUSDT-trades-2019-04-01.csv"
_QUICK_DATA = TEST_DATA / "BTCUSDT-trades-2019-04-01-0000-0029.csv"  # its first 30 minutes


def _figures(result: ReplayResult) -> dict[str, Any]:
    span_s = (result.last_ts_event - result.first_ts_event) / 1000
    return {
        "trades": result.messages,
        "span_s": round(span_s, 1),
        "wall_s": round(result.elapsed_s, 2),
        "trades_per_s": round(result.messages / result.elapsed_s),
        "x_real_time": round(span_s / result.elapsed_s, 1),
        "candles": result.candles,
        "predictions": result.predictions,
    }


_SIM_SYMBOLS = ("BTCUSDT", "ETHUSDT", "SOLUSDT", "XRPUSDT", "BNBUSDT")
_DAY_MS = 86_400_000


def _write_sim_day(path: Path, n_trades: int) -> int:
    """The simulated day before yesterday (the worker refuses times far ahead of now), as
    JSONL trade batches; returns the file's size in bytes."""
    start_ms = (int(time.time() * 1000) // _DAY_MS - 2) * _DAY_MS
    with path.open("wb") as out:
        for batch in simulate_day(_SIM_SYMBOLS, 7, start_ms, n_trades):
            out.write(encode_batch(batch))
            out.write(b"\n")
    return path.stat().st_size


class _PeakRss:
    """Samples the peak RSS (VmHWM) of processes while they live: the kernel keeps each
    one's peak, so a sample every ``period_s`` misses only what a process does in its last
    moments. Children of this process are found as they start (the replay's worker)."""

    def __init__(self, named: dict[str, int], period_s: float = 0.5) -> None:
        self._named = dict(named)
        self.peak_kb: dict[str, int] = {}
        self._period_s = period_s
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> "_PeakRss":
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self._sample()
        self.peak_kb["this process (reads, publishes)"] = resource.getrusage(
            resource.RUSAGE_SELF).ru_maxrss

    def _run(self) -> None:
        while not self._stop.wait(self._period_s):
            self._sample()

    def _sample(self) -> None:
        for name, pid in [*self._named.items(), *self._children()]:
            with contextlib.suppress(OSError, ValueError):
                for line in Path(f"/proc/{pid}/status").read_text().splitlines():
                    if line.startswith("VmHWM:"):
                        self.peak_kb[name] = max(self.peak_kb.get(name, 0),
                                                 int(line.split()[1]))

    @staticmethod
    def _children() -> list[tuple[str, int]]:
        found = []
        for entry in Path("/proc").iterdir():
            if entry.name.isdigit():
                with contextlib.suppress(OSError, IndexError, ValueError):
                    ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
                    argv = (entry / "cmdline").read_bytes().split(b"\0")
                    if ppid == os.getpid() and b"worker" in argv:
                        found.append(("worker", int(entry.name)))
        return found


async def _measure_sim_day(n_trades: int, tmp: Path) -> dict[str, Any]:
    path = tmp / "sim-day.jsonl"
    print(f"writing a simulated day of {n_trades:,} trades ...", flush=True)
    started_s = time.monotonic()
    size = _write_sim_day(path, n_trades)
    write_s = time.monotonic() - started_s
    with start_kafka(log_dir=tmp / "logs") as kafka, start_redis(log_dir=tmp / "logs") as rds:
        settings = Settings(kafka_bootstrap=kafka.url, redis_url=rds.url, state_dir=tmp,
                            intervals=("1m",), log_level="WARNING")
        print("replaying it from the file ...", flush=True)
        with _PeakRss({"broker (Tansu, memory storage)": kafka.process.pid,
                       "redis-server": rds.process.pid}) as rss:
            result = await replay(settings, ReplaySpec(source=str(path)), "bench-simday")
        drop_namespace(result.settings)
    if result.messages != n_trades:
        raise BenchError(f"the sim day replayed {result.messages} of {n_trades} trades")
    return {**_figures(result), "file_mb": round(size / 1e6, 1), "write_s": round(write_s, 1),
            "symbols": list(_SIM_SYMBOLS),
            "peak_rss_mb": {name: round(kb / 1024, 1) for name, kb in rss.peak_kb.items()}}


async def _measure(data: Path, sim_trades: int, tmp: Path) -> dict[str, Any]:
    with start_kafka(log_dir=tmp / "logs") as kafka, start_redis(log_dir=tmp / "logs") as rds:
        settings = Settings(kafka_bootstrap=kafka.url, redis_url=rds.url, state_dir=tmp,
                            intervals=("1m",), log_level="WARNING")
        print(f"replaying {data.name} from the file ...", flush=True)
        from_file = await replay(settings, ReplaySpec(source=str(data)), "bench-file")
        # The file replay's own trades topic is now a "live" topic to replay from.
        print("replaying the same span from Kafka ...", flush=True)
        from_kafka = await replay(from_file.settings, ReplaySpec(source="kafka"), "bench-kafka")
        drop_namespace(from_kafka.settings)
        drop_namespace(from_file.settings)
    # Its own broker: Tansu keeps every topic in memory.
    sim_day = await _measure_sim_day(sim_trades, tmp)
    return {"data": str(data), "from_file": _figures(from_file),
            "from_kafka": _figures(from_kafka), "sim_day": sim_day}


def _print_summary(result: dict[str, Any], path: Path) -> None:
    for source in ("from_file", "from_kafka"):
        f = result[source]
        print(f"replay {source.replace('_', ' ')}: {f['trades']:,} trades spanning "
              f"{f['span_s'] / 3600:.1f} h in {f['wall_s']:.1f} s = {f['x_real_time']:,.0f}x "
              f"real time ({f['trades_per_s']:,} trades/s; {f['candles']} candles, "
              f"{f['predictions']} predictions)")
    sim = result["sim_day"]
    print(f"simulated day ({len(sim['symbols'])} symbols, {sim['file_mb']:,} MB file): "
          f"{sim['trades']:,} trades in {sim['wall_s']:.1f} s = {sim['trades_per_s']:,} "
          f"trades/s, {sim['x_real_time']:,.0f}x real time")
    for name, mb in sim["peak_rss_mb"].items():
        print(f"  peak RSS {name}: {mb:,.0f} MB")
    print(f"results: {path}")


def main(argv: list[str] | None = None) -> int:
    parser = stage_parser("replay", __doc__, "the first 30 minutes of that day (tests/data); "
                          "a simulated day of 200,000 trades")
    parser.add_argument("--data", type=Path, help="a trades file (default: the day in ../shared)")
    parser.add_argument("--sim-trades", type=int,
                        help="trades in the simulated day (default 10,000,000)")
    args = parse_stage(parser, argv, "replay", data=(_QUICK_DATA, _DAY),
                       sim_trades=(200_000, 10_000_000))
    if not args.data.is_file():
        print(f"bench.replay needs a day of trades: {args.data} is missing (pass --data)",
              file=sys.stderr)
        return 1
    logging.basicConfig(level="WARNING")
    return run_stage(lambda tmp: asyncio.run(_measure(args.data, args.sim_trades, tmp)),
                     args.out, _print_summary, quick=args.quick)


if __name__ == "__main__":
    sys.exit(main())
