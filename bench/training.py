"""Training time of the production model: ``python -m bench.training`` (part of ``make bench``).

One run of the scheduled trainer as ``mur trainer --every 6h`` makes it
(:func:`makeusrich.trainer.run_schedule`, one run, its defaults: LSTM, 10 epochs, window 30,
stride 1, batch 256, one torch thread) on all BTCUSDT 1m klines of 2025 in
``../shared/data`` (115 days, 165,600 candles; else the day in ``tests/data``), into a
registry whose champion is the bundled model. The run loads the candles, trains, exports
and checks the ONNX model, evaluates it, and compares it with the champion on the hold-out,
as every scheduled run does.

Ratios: the span of candle history trained on over the run's wall time (how many times
faster than real time the trainer learns history), and the run's wall time as a share of
the schedule period (the part of each period one core spends retraining).

Results go to stdout and ``bench/results/training.json``. A benchmark, not a test: it
asserts nothing about the figures, but exits non-zero when the run fails.
"""

import argparse
import logging
import os
import sys
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
from makeusrich.core.intervals import interval_ms
from makeusrich.core.settings import Settings
from makeusrich.inference import Registry, bundled_models_dir, read_manifest
from makeusrich.trainer import parse_duration, run_schedule

_EVERY = "6h"  # `mur trainer`'s default schedule
_FULL_DATA = SHARED_SPOT / "klines" / "1m"
_FULL_GLOB = "BTCUSDT-1m-2025-*.csv"
_QUICK_DATA = TEST_DATA / "BTCUSDT-1m-2025-11-20.csv"


def _data(quick: bool) -> list[Path]:
    files = [] if quick else sorted(_FULL_DATA.glob(_FULL_GLOB))
    return files or [_QUICK_DATA]


def _measure(files: list[Path], epochs: int, registry_dir: Path) -> dict[str, Any]:
    registry = Registry(registry_dir)
    bundled = Registry(bundled_models_dir()).selected()
    if bundled is None:
        raise BenchError(f"no bundled model in {bundled_models_dir()}")
    registry.promote(registry.add(bundled_models_dir() / bundled), "bench: the champion")
    # No broker or Redis: nothing is announced, no drift watch.
    settings = Settings(_env_file=None, kafka_bootstrap=None, redis_url=None,
                        drift_retrain=False)
    every_s = parse_duration(_EVERY)
    print(f"one trainer run on {len(files)} file(s), {epochs} epoch(s) ...", flush=True)
    [run] = run_schedule(settings, files, registry_dir, every_s=every_s, epochs=epochs, runs=1)
    if not run.ok or run.version is None:
        raise BenchError(f"the trainer run failed: {run.error}")
    assert run.first_open_time is not None and run.last_open_time is not None
    assert run.interval is not None
    manifest = read_manifest(registry_dir / run.version)
    span_s = (run.last_open_time + interval_ms(run.interval) - run.first_open_time) / 1000
    training, data = manifest.training, manifest.training_data
    return {
        "run_wall_s": run.duration_s,
        "train_wall_s": training["wall_time_s"],  # load, fit, export, evaluate
        "fit_s": round(float(training["seconds_per_epoch"]) * int(training["epochs"]), 1),
        "seconds_per_epoch": training["seconds_per_epoch"],
        "span_days": round(span_s / 86_400, 2),
        "x_real_time": round(span_s / run.duration_s),
        "share_of_period": round(run.duration_s / every_s, 5),
        "schedule_every": _EVERY,
        "settings": {
            "arch": manifest.architecture.kind, "parameters": manifest.architecture.parameters,
            "hidden": manifest.architecture.hidden, "layers": manifest.architecture.layers,
            "window": manifest.window, "epochs": training["epochs"],
            "batch_size": training["batch_size"], "stride": training["stride"],
            "threads": training["threads"], "torch": training["torch"],
        },
        "data": {
            "files": len(files), "first": files[0].name, "last": files[-1].name,
            "candles": data.candles, "train_windows": data.train_windows,
            "validation_windows": data.validation_windows,
        },
        "validation": {"mae": manifest.metrics["mae"],
                       "mae_persistence": manifest.metrics["mae_persistence"],
                       "skill": manifest.metrics["skill"]},
        "promotion": {"champion": run.champion, "mae": run.mae,
                      "champion_mae": run.champion_mae, "promoted": run.promoted,
                      "decision": run.decision},
        "load_average_1m_at_end": round(os.getloadavg()[0], 2),  # other work on the machine
    }


def _print_summary(result: dict[str, Any], path: Path) -> None:
    machine, settings, data = result["machine"], result["settings"], result["data"]
    print(f"\n{machine['cpu']} ({machine['cores']} cores), Python {machine['python']}, "
          f"torch {settings['torch']}")
    print(f"{settings['arch']} ({settings['parameters']:,} parameters), {settings['epochs']} "
          f"epochs, window {settings['window']}, {settings['threads']} thread(s); "
          f"{data['first']} .. {data['last']}: {data['candles']:,} candles, "
          f"{data['train_windows']:,} training windows")
    print(f"  trainer run        {result['run_wall_s']:.1f} s (fit {result['fit_s']:.1f} s, "
          f"{result['seconds_per_epoch']:.2f} s/epoch)")
    print(f"  history trained on {result['span_days']:g} days = {result['x_real_time']:,}x "
          "real time")
    print(f"  share of the {result['schedule_every']} schedule period  "
          f"{100 * result['share_of_period']:.2f} %")
    print(f"written to {path}")


def _parse(argv: list[str] | None) -> argparse.Namespace:
    parser = stage_parser("training", __doc__, "one day of candles (tests/data), one epoch")
    parser.add_argument("--epochs", type=int, help="default 10 (the trainer's)")
    return parse_stage(parser, argv, "training", epochs=(1, 10))


def main(argv: list[str] | None = None) -> int:
    args = _parse(argv)
    logging.basicConfig(level="WARNING")
    files = _data(args.quick)
    return run_stage(lambda tmp: _measure(files, args.epochs, tmp / "registry"), args.out,
                     _print_summary, quick=args.quick)


if __name__ == "__main__":
    sys.exit(main())
