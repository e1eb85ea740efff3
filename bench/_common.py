"""What every benchmark records beside its figures, and how results are written."""

import contextlib
import json
import os
import platform
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any


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
    """Write ``result`` as JSON with the machine, the run's wall time and a UTC timestamp."""
    result["machine"] = machine()
    result["bench_wall_s"] = round(time.monotonic() - started_monotonic, 1)
    result["measured_at"] = datetime.now(UTC).isoformat(timespec="seconds")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=2) + "\n")
