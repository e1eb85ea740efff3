"""What every benchmark shares: the machine record, result files, statistics and the
processes a benchmark starts and watches (through ``/proc``: CPU, memory, children)."""

import argparse
import contextlib
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterable, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Final

import httpx

from makeusrich.core.embedded import terminate
from makeusrich.core.errors import MakeUsRichError

__all__ = [
    "RESULTS_DIR",
    "SHARED_SPOT",
    "TEST_DATA",
    "BenchError",
    "check_alive",
    "child_pid",
    "clean_env",
    "cpu_s",
    "latency_summary",
    "machine",
    "open_access_env",
    "parse_stage",
    "percentile",
    "print_columns",
    "process_tree",
    "raise_nofile",
    "results_path",
    "rss_kb",
    "run_stage",
    "spawn_mur",
    "stage_parser",
    "stop_process",
    "tail",
    "tree_cpu_s",
    "tree_rss_kb",
    "wait_healthy",
    "write_results",
]

RESULTS_DIR: Final = Path(__file__).parent / "results"
_REPO: Final = Path(__file__).resolve().parent.parent
# Real Binance data beside the checkout (see ../shared/README.md), and the small slices the
# repository keeps for tests: what quick runs use, and the fallback when ../shared is absent.
SHARED_SPOT: Final = _REPO.parent / "shared" / "data" / "binance" / "spot"
TEST_DATA: Final = _REPO / "tests" / "data"
_STOP_TIMEOUT_S: Final = 20.0


class BenchError(Exception):
    """A stage of a benchmark could not complete; the message says which and why."""


# ---- results ---------------------------------------------------------------------------


def results_path(name: str, quick: bool) -> Path:
    """Where a stage writes its JSON; quick runs go beside, never over, the full figures."""
    return (RESULTS_DIR / "quick" if quick else RESULTS_DIR) / f"{name}.json"


def machine() -> dict[str, Any]:
    model = platform.processor() or "unknown"
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    return {
        "cpu": model,
        "cores": os.cpu_count(),
        "python": platform.python_version(),
        "platform": platform.platform(),
    }


def write_results(path: Path, result: dict[str, Any], started_monotonic: float) -> None:
    """Write ``result`` as JSON with the machine, the run's wall time and a UTC timestamp,
    and the suite's ``BENCH_NOTE`` (e.g. that the machine was busy) when it is set."""
    result["machine"] = machine()
    result["bench_wall_s"] = round(time.monotonic() - started_monotonic, 1)
    result["measured_at"] = datetime.now(UTC).isoformat(timespec="seconds")
    if os.environ.get("BENCH_NOTE"):
        result["note"] = os.environ["BENCH_NOTE"]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=2) + "\n")


def stage_parser(stage: str, doc: str | None, quick_help: str) -> argparse.ArgumentParser:
    """The parser of ``python -m bench.<stage>`` (described by the first paragraph of
    ``doc``), with ``--quick`` (``quick_help`` says what it shrinks) and ``--out``."""
    parser = argparse.ArgumentParser(prog=f"python -m bench.{stage}",
                                     description=(doc or "").split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help=f"small sizes: {quick_help}")
    parser.add_argument("--out", type=Path,
                        help=f"result file (default: {results_path(stage, quick=False)}, "
                        "or beside it in quick/ with --quick)")
    return parser


def parse_stage(parser: argparse.ArgumentParser, argv: list[str] | None, stage: str,
                **sizes: tuple[Any, Any]) -> argparse.Namespace:
    """Parse ``argv``; each option named in ``sizes`` that was not given gets its
    (quick, full) default, and ``--out`` the stage's result file."""
    args = parser.parse_args(argv)
    for name, (quick_value, full_value) in sizes.items():
        if getattr(args, name) is None:
            setattr(args, name, quick_value if args.quick else full_value)
    if args.out is None:
        args.out = results_path(stage, args.quick)
    return args


def run_stage(measure: Callable[[Path], dict[str, Any]], out: Path,
              print_summary: Callable[[dict[str, Any], Path], None], *,
              quick: bool = False) -> int:
    """Run ``measure`` (given a scratch directory, removed after), write its result to
    ``out`` (see :func:`write_results`) and print its summary. Returns the exit code: 1 when
    the stage failed (the message says why), 130 on Ctrl-C."""
    started = time.monotonic()
    try:
        with tempfile.TemporaryDirectory(prefix="mur-bench-") as tmp:
            result = measure(Path(tmp))
    except (BenchError, MakeUsRichError) as exc:
        print(f"bench failed: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("bench interrupted", file=sys.stderr)
        return 130
    result["quick"] = quick
    write_results(out, result, started)
    print_summary(result, out)
    return 0


def print_columns(header: Sequence[str], rows: Iterable[Sequence[str]]) -> None:
    """A table of right-aligned cells, as each stage prints its figures."""
    for row in (header, *rows):
        print("  ".join(f"{cell:>11}" for cell in row))


# ---- statistics ------------------------------------------------------------------------


def percentile(values: Iterable[float], q: float) -> float:
    """Linear-interpolated percentile, ``q`` in [0, 100]; NaN for no values."""
    ordered = sorted(values)
    if not ordered:
        return float("nan")
    pos = (len(ordered) - 1) * q / 100.0
    low = int(pos)
    high = min(low + 1, len(ordered) - 1)
    return float(ordered[low] + (ordered[high] - ordered[low]) * (pos - low))


def latency_summary(values: Iterable[float]) -> dict[str, Any]:
    ordered = sorted(values)
    return {"n": len(ordered), "p50_ms": round(percentile(ordered, 50), 2),
            "p99_ms": round(percentile(ordered, 99), 2),
            "max_ms": round(ordered[-1], 2) if ordered else None}


# ---- processes -------------------------------------------------------------------------


def _stat_fields(pid: int | str) -> list[str]:
    """The fields of ``/proc/PID/stat`` after the command name (which may hold spaces):
    [0] state, [1] ppid, ... [11] utime, [12] stime."""
    return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()


def cpu_s(pid: int) -> float:
    """CPU seconds (user + system, all threads) a live process has used so far."""
    try:
        fields = _stat_fields(pid)
    except OSError as exc:
        raise BenchError(f"process {pid} is gone: {exc}") from exc
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def rss_kb(pid: int) -> int:
    with contextlib.suppress(OSError):
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise BenchError(f"no VmRSS for process {pid}")


def child_pid(parent: int, subcommand: str) -> int:
    """The pid of ``parent``'s child ``python -m makeusrich <subcommand>`` (``mur up``'s)."""
    wanted = [b"-m", b"makeusrich", subcommand.encode()]
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        with contextlib.suppress(OSError):  # processes come and go while we look
            ppid = int(_stat_fields(entry.name)[1])
            if ppid == parent and (entry / "cmdline").read_bytes().split(b"\0")[1:4] == wanted:
                return int(entry.name)
    raise BenchError(f"no `{subcommand}` child of process {parent}")


def process_tree(pid: int) -> list[int]:
    """``pid`` and its descendants (children, their children, ...), found through /proc."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            with contextlib.suppress(OSError):  # processes come and go while we look
                children.setdefault(int(_stat_fields(entry.name)[1]), []).append(int(entry.name))
    tree, todo = [], [pid]
    while todo:
        tree.append(todo.pop())
        todo.extend(children.get(tree[-1], ()))
    return tree


def _sum_over_tree(pid: int, read: Callable[[int], float]) -> float:
    total = read(pid)  # BenchError when pid itself is gone
    for descendant in process_tree(pid)[1:]:
        with contextlib.suppress(BenchError):  # it exited since the listing
            total += read(descendant)
    return total


def tree_cpu_s(pid: int) -> float:
    """:func:`cpu_s` of ``pid`` plus its live descendants' (e.g. a server's workers)."""
    return _sum_over_tree(pid, cpu_s)


def tree_rss_kb(pid: int) -> int:
    """:func:`rss_kb` of ``pid`` plus its live descendants' (pages they share count once
    per process)."""
    return int(_sum_over_tree(pid, rss_kb))


def raise_nofile(needed: int) -> int:
    """Raise this process's open-file limit to its hard limit (children inherit it);
    BenchError when even that is below ``needed``. Returns the new limit."""
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and hard < needed:
        raise BenchError(f"needs {needed} open files but the hard limit is {hard}: "
                         "raise it (ulimit -Hn) or use fewer clients")
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return hard


def clean_env(extra: dict[str, str]) -> dict[str, str]:
    """os.environ without any MUR_* left over from the caller, plus ``extra``."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("MUR_")}
    env.update(extra)
    return env


def open_access_env(sse_clients: int) -> dict[str, str]:
    """MUR_* settings that let every benchmark client in: they all come from 127.0.0.1, one
    anonymous subject, so its limits must sit above the offered load."""
    return {
        "MUR_ENVIRONMENT": "dev", "MUR_ANONYMOUS_RPM": "100000000",
        "MUR_ANONYMOUS_DAILY": "1000000000", "MUR_ANONYMOUS_SSE": str(sse_clients + 10),
    }


def spawn_mur(argv: list[str], env: dict[str, str], log_path: Path) -> subprocess.Popen[bytes]:
    """``python -m makeusrich ARGV`` with its output appended to ``log_path``."""
    with log_path.open("ab") as log:  # the child keeps its own copy of the descriptor
        return subprocess.Popen(
            [sys.executable, "-m", "makeusrich", *argv], env=env,
            stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
        )


def stop_process(process: subprocess.Popen[bytes] | None) -> int | None:
    return None if process is None else terminate(process, _STOP_TIMEOUT_S)


def tail(path: Path, lines: int = 30) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


def check_alive(process: subprocess.Popen[bytes], what: str, log_path: Path) -> None:
    if process.poll() is not None:
        raise BenchError(
            f"{what} exited early with code {process.returncode}; log tail:\n{tail(log_path)}"
        )


def wait_healthy(base: str, process: subprocess.Popen[bytes], what: str, log_path: Path,
                 timeout_s: float) -> None:
    """Wait until ``base``/healthz answers 200; BenchError if ``process`` dies first."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        check_alive(process, what, log_path)
        with contextlib.suppress(httpx.HTTPError):
            if httpx.get(f"{base}/healthz", timeout=1).status_code == 200:
                return
        time.sleep(0.2)
    raise BenchError(f"{what} did not answer {base}/healthz within {timeout_s:.0f} s")
