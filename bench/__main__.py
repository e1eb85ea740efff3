"""The benchmark suite: ``python -m bench`` (``make bench``; ``make bench ARGS=--quick``).

Runs every stage in order, each as its own process (``python -m bench.<stage>``), so that
one stage's servers and memory never weigh on the next: pipeline throughput, candle close
-> SSE latency, ONNX vs torch, SSE fan-out, replay speed, training time. Each writes
``bench/results/<stage>.json`` (``bench/results/quick/`` with ``--quick``, or
``BENCH_QUICK=1``, which runs every stage at small sizes); then a one-screen summary of
the ratios is printed. A stage that fails does not stop the others, but the suite then
exits non-zero.
"""

import argparse
import os
import subprocess
import sys
import time

from bench.summary import STAGES, print_summary


def _parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true",
                        default=os.environ.get("BENCH_QUICK", "") not in ("", "0"),
                        help="every stage at small sizes (also BENCH_QUICK=1)")
    parser.add_argument("--only", type=lambda text: text.split(","), default=list(STAGES),
                        help=f"comma-separated stages to run, of {','.join(STAGES)}")
    parser.add_argument("--note", default=os.environ.get("BENCH_NOTE", ""),
                        help="recorded in every result file, e.g. 'machine busy with tests'")
    args = parser.parse_args(argv)
    unknown = sorted(set(args.only) - set(STAGES))
    if unknown:
        parser.error(f"unknown stage(s) {', '.join(unknown)}; choose from {', '.join(STAGES)}")
    return args


def main(argv: list[str] | None = None) -> int:
    args = _parse(argv)
    env = {**os.environ, "BENCH_NOTE": args.note}
    failed: set[str] = set()
    took: dict[str, float] = {}
    for stage in (s for s in STAGES if s in args.only):
        print(f"\n==== bench.{stage}{' --quick' if args.quick else ''}", flush=True)
        started = time.monotonic()
        code = subprocess.call(
            [sys.executable, "-m", f"bench.{stage}", *(["--quick"] if args.quick else [])],
            env=env,
        )
        took[stage] = time.monotonic() - started
        if code != 0:
            failed.add(stage)
            print(f"==== bench.{stage} FAILED (exit code {code})", file=sys.stderr, flush=True)
    print_summary(args.quick, frozenset(failed))
    print("stages took " + ", ".join(f"{stage} {s:.0f} s" for stage, s in took.items())
          + f"; {sum(took.values()):.0f} s in all")
    if failed:
        print(f"FAILED: {', '.join(sorted(failed))}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
