"""Offline training of the forecaster: candles in, an ONNX model version directory out.

Importing this package does not import torch; :func:`train` does, and raises
TrainingError when it is missing.
"""

from makeusrich.trainer.data import CandleSeries, load_series
from makeusrich.trainer.schedule import RunSummary, parse_duration, run_schedule
from makeusrich.trainer.train import (
    ARCHITECTURES,
    BASELINE_ARCHITECTURES,
    EXPORT_TOLERANCE,
    train,
)

__all__ = [
    "ARCHITECTURES",
    "BASELINE_ARCHITECTURES",
    "EXPORT_TOLERANCE",
    "CandleSeries",
    "RunSummary",
    "load_series",
    "parse_duration",
    "run_schedule",
    "train",
]
