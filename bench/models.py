"""Model architecture benchmark: ``python -m bench.models``.

Measures, in one run, on this machine, for each architecture the trainer can build:

1. Training time per epoch on a fixed real slice: the last 7 days of BTCUSDT 1m klines in
   ``../shared/data`` (else the one day in ``tests/data``), through :func:`train` itself
   (one torch thread, the defaults otherwise), as the manifest's ``seconds_per_epoch``.
   Each architecture is first trained briefly on the one test day, so that torch's
   one-off initialisation in a process's first epochs is not counted.
2. Inference latency of one call at batch 1 (one symbol) and batch 100 ("100 symbols"):
   onnxruntime on the exported model (as the server runs it: one thread) against torch
   eager on the same architecture (one thread, inference mode). Weights do not change the
   cost, so the torch model is a fresh one of the trained model's shape.

Results go to stdout and ``bench/results/models.json``. A benchmark, not a test: it asserts
nothing about the figures.
"""

import argparse
import os
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from bench._common import (
    SHARED_SPOT,
    TEST_DATA,
    parse_stage,
    print_columns,
    run_stage,
    stage_parser,
)
from makeusrich.inference import OnnxForecaster, read_manifest
from makeusrich.trainer import ARCHITECTURES, train
from makeusrich.trainer.model import build_model

_KLINES = SHARED_SPOT / "klines" / "1m"
_FALLBACK = TEST_DATA / "BTCUSDT-1m-2025-11-20.csv"
_DAYS = 7
_BATCHES = (1, 100)


def _data_files(quick: bool) -> list[Path]:
    days = [] if quick else sorted(_KLINES.glob("BTCUSDT-1m-2025-*.csv"))[-_DAYS:]
    return days or [_FALLBACK]


def _median_us(call: Callable[[], object], calls: int) -> float:
    for _ in range(max(calls // 10, 3)):  # warm-up: allocations, lazy initialisation
        call()
    times = []
    for _ in range(calls):
        started = time.perf_counter()
        call()
        times.append(time.perf_counter() - started)
    return statistics.median(times) * 1e6


def _latency(version_dir: Path, calls: int) -> dict[str, float]:
    manifest = read_manifest(version_dir)
    assert manifest.parity is not None  # the trainer always writes one
    forecaster = OnnxForecaster(version_dir)
    model = build_model(
        manifest.architecture.kind,
        n_features=len(manifest.features),
        window=manifest.window,
        hidden=manifest.architecture.hidden,
        layers=manifest.architecture.layers,
        target_scales=[1.0] * len(manifest.horizons),
        initial_quantiles=[0.0] * 3 * len(manifest.horizons),
    ).eval()
    sample = np.asarray(manifest.parity.input, dtype=np.float32)
    result: dict[str, float] = {}
    for batch in _BATCHES:
        # Real prepared windows, repeated up to the batch size.
        inputs = np.ascontiguousarray(np.resize(sample, (batch, *sample.shape[1:])))
        tensor = torch.from_numpy(inputs)

        def eager(tensor: torch.Tensor = tensor) -> object:
            with torch.inference_mode():
                return model(tensor)

        def onnx(inputs: np.ndarray = inputs) -> object:
            return forecaster.run(inputs)

        n = calls if batch == 1 else max(calls // 5, 20)
        onnx_us = _median_us(onnx, n)
        torch_us = _median_us(eager, n)
        result[f"onnx_us_batch{batch}"] = round(onnx_us, 1)
        result[f"torch_us_batch{batch}"] = round(torch_us, 1)
        result[f"torch_over_onnx_batch{batch}"] = round(torch_us / onnx_us, 2)
    return result


def measure(files: list[Path], epochs: int, calls: int, work: Path) -> dict[str, Any]:
    torch.set_num_threads(1)  # torch eager as the server would run it: beside other work
    for arch in ARCHITECTURES:
        print(f"{arch}: warm-up ...", flush=True)
        train(_FALLBACK, work / "warm-up", arch=arch, epochs=1, stride=8, threads=1)
    rows: dict[str, Any] = {}
    for arch in ARCHITECTURES:
        print(f"{arch}: training {epochs} epoch(s) ...", flush=True)
        version_dir = train(files, work / arch, arch=arch, epochs=epochs, threads=1)
        manifest = read_manifest(version_dir)
        rows[arch] = {
            "parameters": manifest.architecture.parameters,
            "layers": manifest.architecture.layers,
            "hidden": manifest.architecture.hidden,
            "seconds_per_epoch": manifest.training["seconds_per_epoch"],
            "train_wall_s": manifest.training["wall_time_s"],
            "pinball_vs_naive": round(
                manifest.metrics["pinball"] / manifest.metrics["pinball_naive"], 4
            ),
            **_latency(version_dir, calls),
        }
    data = manifest.training_data  # the same for every architecture
    return {
        "architectures": rows,
        "data": {
            "files": [f.name for f in files],
            "candles": data.candles,
            "train_windows": data.train_windows,
            "validation_windows": data.validation_windows,
        },
        "epochs": epochs,
        "torch": torch.__version__,
        "load_average_1m": round(os.getloadavg()[0], 2),  # other work on the machine
    }


def _print_summary(result: dict[str, Any], path: Path) -> None:
    machine = result["machine"]
    data = result["data"]
    print(f"\n{machine['cpu']} ({machine['cores']} cores), Python {machine['python']}, "
          f"torch {result['torch']}; bench took {result['bench_wall_s']:.0f} s")
    print(f"{data['files'][0]} .. {data['files'][-1]}: {data['train_windows']:,} training "
          f"windows, {result['epochs']} epoch(s), one thread; latency = median of one call")
    header = ("arch", "params", "s/epoch", "onnx b1", "torch b1", "ratio", "onnx b100",
              "torch b100", "ratio", "pinball/naive")
    print_columns(header, [
        (
            arch,
            f"{row['parameters']:,}",
            f"{row['seconds_per_epoch']:.2f}",
            f"{row['onnx_us_batch1']:.0f} us",
            f"{row['torch_us_batch1']:.0f} us",
            f"{row['torch_over_onnx_batch1']:.1f}x",
            f"{row['onnx_us_batch100']:.0f} us",
            f"{row['torch_us_batch100']:.0f} us",
            f"{row['torch_over_onnx_batch100']:.1f}x",
            f"{row['pinball_vs_naive']:.3f}",
        )
        for arch, row in result["architectures"].items()
    ])
    print("ratio = torch eager / onnxruntime time; pinball/naive < 1 beats the naive baseline")
    print(f"written to {path}")


def _parse(argv: list[str] | None) -> argparse.Namespace:
    parser = stage_parser("models", __doc__, "one day of candles (tests/data), one epoch, "
                          "50 calls")
    parser.add_argument("--epochs", type=int, help="training epochs per model (default 3)")
    parser.add_argument("--calls", type=int,
                        help="timed inference calls at batch 1 (a fifth of them at batch 100; "
                        "default 300)")
    return parse_stage(parser, argv, "models", epochs=(1, 3), calls=(50, 300))


def main(argv: list[str] | None = None) -> int:
    args = _parse(argv)
    return run_stage(lambda work: measure(_data_files(args.quick), args.epochs, args.calls, work),
                     args.out, _print_summary, quick=args.quick)


if __name__ == "__main__":
    sys.exit(main())
