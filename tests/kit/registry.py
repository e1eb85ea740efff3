"""Model registries for tests, built from copies of the bundled model."""

import json
import shutil
from pathlib import Path

from makeusrich.inference import MANIFEST_FILE, MODEL_FILE, Registry, bundled_models_dir


def add_version(registry: Path, name: str) -> Path:
    """The bundled model the worker would serve, as version ``name`` (sha256 covers
    model.onnx only, so the edited manifest stays valid)."""
    bundled = Registry(bundled_models_dir())
    target = registry / name
    shutil.copytree(bundled.root / str(bundled.selected()), target)
    manifest = json.loads((target / MANIFEST_FILE).read_text())
    manifest["version"] = name
    (target / MANIFEST_FILE).write_text(json.dumps(manifest))
    return target


def corrupt_model(version_dir: Path) -> None:
    """Flip one byte of model.onnx, so it no longer matches its manifest's sha256."""
    model = version_dir / MODEL_FILE
    data = bytearray(model.read_bytes())
    data[len(data) // 2] ^= 0xFF
    model.write_bytes(bytes(data))
