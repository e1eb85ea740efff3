"""Model registries for tests, built from copies of the bundled model."""

import json
import shutil
from pathlib import Path

from makeusrich.inference import MANIFEST_FILE, MODEL_FILE, Registry, bundled_models_dir


def bundled_version_dir() -> Path:
    """The bundled version the service serves by default."""
    bundled = Registry(bundled_models_dir())
    return bundled.root / str(bundled.selected())


def add_version(registry: Path, name: str, *, shift_return_mean: float = 0.0) -> Path:
    """The bundled model as version ``name`` (sha256 covers model.onnx only, so the edited
    manifest stays valid); a shifted return mean makes it a worse forecaster."""
    target = Path(shutil.copytree(bundled_version_dir(), registry / name))
    manifest = json.loads((target / MANIFEST_FILE).read_text())
    manifest["version"] = name
    manifest["normalisation"]["mean"][0] += shift_return_mean
    (target / MANIFEST_FILE).write_text(json.dumps(manifest))
    return target


def corrupt_model(version_dir: Path) -> None:
    """Flip one byte of model.onnx, so it no longer matches its manifest's sha256."""
    model = version_dir / MODEL_FILE
    data = bytearray(model.read_bytes())
    data[len(data) // 2] ^= 0xFF
    model.write_bytes(bytes(data))
