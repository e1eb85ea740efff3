"""One screen of the suite's ratios, read from the stages' JSON files:
``python -m bench.summary [--quick]`` (``make bench`` prints it at the end)."""

import argparse
import json
import sys
from collections.abc import Callable
from typing import Any

from bench._common import RESULTS_DIR, results_path

__all__ = ["STAGES", "print_summary"]

# The suite's stages in the order `make bench` runs them (each is `python -m bench.<name>`).
STAGES = ("pipeline", "sse_latency", "models", "fanout", "replay", "training")

Row = tuple[str, str, str]  # figure, measured, ratio


def _n(value: float) -> str:
    return f"{value:,.0f}" if abs(value) >= 100 else f"{value:,.3g}"


def _pipeline(r: dict[str, Any]) -> list[Row]:
    return [
        ("Faust worker (batches) vs raw aiokafka (one trade a message)",
         f"{_n(r['trades_per_s'])} trades/s vs {_n(r['raw_consume_per_s'])} msg/s",
         f"{r['ratio']:.3f}"),
        ("  worker, batches vs one trade a message",
         f"{_n(r['trades_per_s'])} vs {_n(r['single']['trades_per_s'])} trades/s",
         f"{r['batched_over_single_worker']:.1f}x"),
        ("hot path: decode + candle update, one a message / batches",
         f"{r['hot_path_us_per_trade']:.2f} / {r['hot_path_batched_us_per_trade']:.2f} us/trade",
         ""),
    ]


def _sse_latency(r: dict[str, Any]) -> list[Row]:
    first, last = r["steps"][0], r["steps"][-1]
    config = r["config"]
    rows = []
    for q in ("p50", "p99"):
        ratio = r["ratios"][f"{q}_{last['clients']}_over_{first['clients']}"]
        rows.append((
            f"close->SSE {q}, {last['clients']:,} clients vs {first['clients']}",
            f"{last['latency'][q + '_ms']:.1f} vs {first['latency'][q + '_ms']:.1f} ms",
            f"{ratio:.2f}x",
        ))
    rows.append((f"  {config['symbols']} symbols at {config['interval']}: delivered, "
                 "missed, ended",
                 f"{_n(last['delivered_per_s'])} candles/s, {last['candles_missed']}, "
                 f"{last['streams_ended_by_api']}",
                 f"API CPU {last['api_cpu_pct_of_core']:.0f} %"))
    return rows


def _models(r: dict[str, Any]) -> list[Row]:
    lstm = r["architectures"]["lstm"]
    return [("lstm inference, torch eager vs ONNX, batch 1",
             f"{lstm['torch_us_batch1']:.0f} vs {lstm['onnx_us_batch1']:.0f} us",
             f"{lstm['torch_over_onnx_batch1']:.1f}x"),
            ("  batch 100",
             f"{_n(lstm['torch_us_batch100'])} vs {_n(lstm['onnx_us_batch100'])} us",
             f"{lstm['torch_over_onnx_batch100']:.1f}x")]


def _fanout(r: dict[str, Any]) -> list[Row]:
    steps = r["steps"]
    top = steps[-1]
    rows = [(f"{top['clients']:,} SSE clients, {r['config']['rate_per_s']:g} events/s: "
             "delivered",
             f"{_n(top['delivered_per_s'])} events/s", f"{100 * top['delivered_share']:.1f} %")]
    for base in steps[:-1]:
        key = f"p99_{top['clients']}_over_{base['clients']}"
        if key in r["ratios"]:
            rows.append((f"  delivery p99, {top['clients']:,} vs {base['clients']:,} clients",
                         f"{top['latency']['p99_ms']:.1f} vs {base['latency']['p99_ms']:.1f} ms",
                         f"{r['ratios'][key]:.2f}x"))
    rows.append(("  API memory per connection; drops (ended, missed)",
                 f"{r['api_kb_per_connection']} KB",
                 f"{top['streams_ended_by_api']}, {top['events_missed']}"))
    return rows


def _replay(r: dict[str, Any]) -> list[Row]:
    sim = r["sim_day"]
    return [*((f"replay {r[source]['span_s'] / 3600:.1f} h of trades "
               f"{source.replace('_', ' ')}",
               f"{r[source]['wall_s']:.1f} s", f"{_n(r[source]['x_real_time'])}x real time")
              for source in ("from_file", "from_kafka")),
            (f"replay a simulated day of {_n(sim['trades'])} trades from a file",
             f"{_n(sim['trades_per_s'])} trades/s",
             f"peak RSS {_n(max(sim['peak_rss_mb'].values()))} MB")]


def _training(r: dict[str, Any]) -> list[Row]:
    s = r["settings"]
    return [(f"trainer run: {r['span_days']:g} days, {s['arch']} {s['epochs']} epochs, "
             f"{s['threads']} thread",
             f"{r['run_wall_s']:.1f} s", f"{_n(r['x_real_time'])}x real time"),
            (f"  share of the {r['schedule_every']} schedule period", "",
             f"{100 * r['share_of_period']:.2f} %")]


_ROWS: dict[str, Callable[[dict[str, Any]], list[Row]]] = {
    "pipeline": _pipeline, "sse_latency": _sse_latency, "models": _models,
    "fanout": _fanout, "replay": _replay, "training": _training,
}


def print_summary(quick: bool, failed: frozenset[str] = frozenset()) -> None:
    """Print every stage's ratios; a stage in ``failed`` is marked (its file, if any, is
    from an earlier run)."""
    table: list[tuple[str, str, str, str, str]] = []
    # Which stages ran on which machine, and under which note (e.g. a busy machine).
    machines: dict[str, list[str]] = {}
    notes: dict[str, list[str]] = {}
    for stage in STAGES:
        path = results_path(stage, quick)
        if not path.exists():
            table.append((stage, "(no results)", "", "", "FAILED" if stage in failed else ""))
            continue
        result = json.loads(path.read_text())
        machine = result["machine"]
        machines.setdefault(f"{machine['cpu']} ({machine['cores']} cores, Python "
                            f"{machine['python']})", []).append(stage)
        if result.get("note"):
            notes.setdefault(result["note"], []).append(stage)
        took = f"{result['bench_wall_s']:.0f} s"
        if stage in failed:
            took = f"FAILED; {result['measured_at']}"
        try:
            rows = _ROWS[stage](result)
        except (KeyError, IndexError, TypeError, ZeroDivisionError) as exc:
            rows = [(f"(unreadable: {exc!r}; re-run the stage)", "", "")]
        for i, (figure, measured, ratio) in enumerate(rows):
            table.append((stage if i == 0 else "", figure, measured, ratio,
                          took if i == 0 else ""))
    kind = "quick run, small sizes" if quick else "full run"
    where = RESULTS_DIR / "quick" if quick else RESULTS_DIR
    print(f"\nmake-us-rich benchmarks ({kind}; {where})")
    header = ("stage", "figure", "measured", "ratio", "took")
    widths = [max(len(row[i]) for row in [header, *table]) for i in range(5)]
    for row in [header, *table]:
        print("  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True))
              .rstrip())
    for label, groups in (("measured on", machines), ("note", notes)):
        for value, stages in groups.items():
            print(f"{label} {value}: {', '.join(stages)}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.summary",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true",
                        help="summarise the quick run (bench/results/quick)")
    print_summary(parser.parse_args(argv).quick)
    return 0


if __name__ == "__main__":
    sys.exit(main())
