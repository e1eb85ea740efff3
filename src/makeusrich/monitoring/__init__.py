"""Live model monitoring: rolling forecast quality and drift against the training data.

Pure code, no broker: the worker feeds it closed candles and the predictions they settle.
"""

from makeusrich.monitoring.drift import DriftEvent, DriftMonitor, DriftStatus
from makeusrich.monitoring.monitor import (
    Monitor,
    MonitorConfig,
    Observation,
    latest_per_series,
    store_observations,
)
from makeusrich.monitoring.quality import DayQuality, LiveQuality, QualitySnapshot
from makeusrich.monitoring.reference import (
    REFERENCE_FILE,
    FeatureReference,
    build_reference,
    feature_row,
    read_reference,
    reference_for_version,
    write_reference,
)

__all__ = [
    "REFERENCE_FILE",
    "DayQuality",
    "DriftEvent",
    "DriftMonitor",
    "DriftStatus",
    "FeatureReference",
    "LiveQuality",
    "Monitor",
    "MonitorConfig",
    "Observation",
    "QualitySnapshot",
    "build_reference",
    "feature_row",
    "latest_per_series",
    "read_reference",
    "reference_for_version",
    "store_observations",
    "write_reference",
]
