"""Model registries for tests, built from copies of the bundled model."""

import hashlib
import json
import shutil
from collections.abc import Sequence
from pathlib import Path

from makeusrich.inference import MANIFEST_FILE, MODEL_FILE, Registry, bundled_models_dir


def bundled_version_dir() -> Path:
    """The bundled version the service serves by default."""
    bundled = Registry(bundled_models_dir())
    return bundled.root / str(bundled.selected())


def add_version(registry: Path, name: str, *, shift_return_mean: float = 0.0,
                kind: str | None = None) -> Path:
    """The bundled model as version ``name`` (sha256 covers model.onnx only, so the edited
    manifest stays valid); a shifted return mean makes it a worse forecaster; ``kind``
    relabels its architecture (e.g. as a network, or as the garch baseline)."""
    target = Path(shutil.copytree(bundled_version_dir(), registry / name))
    manifest = json.loads((target / MANIFEST_FILE).read_text())
    manifest["version"] = name
    manifest["normalisation"]["mean"][0] += shift_return_mean
    if kind is not None:
        manifest["architecture"]["kind"] = kind
    (target / MANIFEST_FILE).write_text(json.dumps(manifest))
    return target


def corrupt_model(version_dir: Path) -> None:
    """Flip one byte of model.onnx, so it no longer matches its manifest's sha256."""
    model = version_dir / MODEL_FILE
    data = bytearray(model.read_bytes())
    data[len(data) // 2] ^= 0xFF
    model.write_bytes(bytes(data))


def tiny_version(directory: Path, features: Sequence[str]) -> Path:
    """A version directory at ``directory`` whose model takes ``features`` (the bundled
    manifest otherwise): a hand-made ONNX graph, its window's feature means times small
    weights plus fixed quantile offsets, so it answers for any feature list."""
    import numpy as np
    from onnx import TensorProto, helper, numpy_helper, save_model

    source = bundled_version_dir()
    manifest = json.loads((source / MANIFEST_FILE).read_text())
    window, count = manifest["window"], len(features)
    weights = np.full((count, 3), 1e-4, dtype=np.float32)
    offsets = np.array([-1e-3, 0.0, 1e-3], dtype=np.float32)
    graph = helper.make_graph(
        [
            helper.make_node("ReduceMean", ["features"], ["mean"], axes=[1], keepdims=0),
            helper.make_node("MatMul", ["mean", "weights"], ["moved"]),
            helper.make_node("Add", ["moved", "offsets"], ["quantiles"]),
        ],
        "tiny",
        [helper.make_tensor_value_info("features", TensorProto.FLOAT, ["batch", window, count])],
        [helper.make_tensor_value_info("quantiles", TensorProto.FLOAT, ["batch", 3])],
        [numpy_helper.from_array(weights, "weights"), numpy_helper.from_array(offsets, "offsets")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    directory.mkdir(parents=True)
    save_model(model, str(directory / MODEL_FILE))
    manifest.update(
        version=directory.name,
        features=list(features),
        normalisation={"mean": [0.0] * count, "std": [1.0] * count},
        sha256=hashlib.sha256((directory / MODEL_FILE).read_bytes()).hexdigest(),
        parity=None,
        horizons=[1],  # its graph has one quantile head
        calibration=[],
    )
    (directory / MANIFEST_FILE).write_text(json.dumps(manifest))
    return directory
