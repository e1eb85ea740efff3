"""Forecasters of the next candle's close: the ONNX model and the naive persistence baseline.

A model version is a directory holding ``model.onnx`` and ``manifest.json`` (see
:class:`Manifest`). Only numpy and onnxruntime are needed here, never torch.
"""

import hashlib
import importlib.resources
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import msgspec
import numpy as np
import onnxruntime as ort
from numpy.typing import NDArray

from makeusrich.core.errors import ModelError, ModelIntegrityError
from makeusrich.core.schemas import Candle
from makeusrich.inference.features import (
    FEATURES,
    OHLCV_COLUMNS,
    FloatArray,
    Normalisation,
    candles_to_array,
    compute_features,
    log_returns,
    prepare_windows,
)

MODEL_FILE = "model.onnx"
MANIFEST_FILE = "manifest.json"
#: Quantiles of the next log return that a model outputs, in output column order.
QUANTILES = (0.1, 0.5, 0.9)
#: Standard normal 90% quantile: mean ± Z80·sigma is an 80% interval.
Z80 = 1.2815515655446004

_CLOSE = OHLCV_COLUMNS.index("close")


@dataclass(frozen=True, slots=True)
class Forecast:
    """The next candle's close: median and 10%/90% quantiles."""

    predicted_close: float
    lower: float
    upper: float


class Forecaster(Protocol):
    """Predicts the next close from the trailing candles of one symbol and interval.

    ``predict`` uses at most the last ``window + 1`` candles (the first one only for its
    close) and returns None when it has too few.
    """

    version: str
    window: int
    #: The candle interval the model was trained on; None = any interval.
    interval: str | None

    def predict(self, candles: Sequence[Candle]) -> Forecast | None: ...

    def predict_batch(self, histories: Sequence[Sequence[Candle]]) -> list[Forecast | None]: ...


class Architecture(msgspec.Struct, frozen=True):
    kind: str
    hidden: int
    layers: int
    parameters: int


class NormalisationStats(msgspec.Struct, frozen=True):
    mean: tuple[float, ...]
    std: tuple[float, ...]


class TrainingData(msgspec.Struct, frozen=True):
    """What the model was trained on; open times are UTC epoch milliseconds. Validation
    metrics cover the predictions of candles from ``validation_first_target_open_time``."""

    symbols: tuple[str, ...]
    interval: str
    first_open_time: int
    last_open_time: int
    candles: int
    filled_candles: int
    train_windows: int
    validation_windows: int
    validation_first_target_open_time: int


class OnnxIO(msgspec.Struct, frozen=True):
    input: str
    output: str
    opset: int


class Parity(msgspec.Struct, frozen=True):
    """A few prepared model inputs ``(n, window, features)`` (float32 values) and the
    trainer's ONNX outputs ``(n, 3)`` for them; see :func:`check_parity`."""

    input: list[list[list[float]]]
    output: list[list[float]]


class Manifest(msgspec.Struct, frozen=True):
    """``manifest.json`` of a model version directory. ``evaluation``: the trainer's report
    of the model and the baselines on its validation span (a
    :class:`makeusrich.trainer.evaluate.Report` as a dict). ``parity`` and ``evaluation``
    are None in manifests written before they existed."""

    version: str
    architecture: Architecture
    window: int
    features: tuple[str, ...]
    normalisation: NormalisationStats
    quantiles: tuple[float, ...]
    target: str
    training_data: TrainingData
    metrics: dict[str, float]
    training: dict[str, float | int | str]
    sha256: str
    created_at: str
    onnx: OnnxIO
    parity: Parity | None = None
    evaluation: dict[str, Any] | None = None


def sha256_of(path: Path) -> str:
    """Hex sha256 of a file's bytes."""
    return hashlib.sha256(path.read_bytes()).hexdigest()


def read_manifest(version_dir: Path) -> Manifest:
    """Read and check a version directory's manifest; :class:`ModelError` if unusable."""
    path = version_dir / MANIFEST_FILE
    try:
        manifest = msgspec.json.decode(path.read_bytes(), type=Manifest)
    except FileNotFoundError as exc:
        raise ModelError(f"{path} is missing: not a model version directory") from exc
    except (OSError, msgspec.DecodeError) as exc:
        raise ModelError(f"{path} is not a valid model manifest: {exc}") from exc
    problems = []
    if manifest.features != FEATURES:
        problems.append(f"features {list(manifest.features)} != supported {list(FEATURES)}")
    if manifest.quantiles != QUANTILES:
        problems.append(f"quantiles {list(manifest.quantiles)} != {list(QUANTILES)}")
    if manifest.window < 1:
        problems.append(f"window {manifest.window} < 1")
    stats = manifest.normalisation
    if not len(stats.mean) == len(stats.std) == len(FEATURES):
        problems.append("normalisation mean/std do not match the feature count")
    elif not all(s > 0 for s in stats.std):
        problems.append("normalisation std must be positive")
    if problems:
        raise ModelError(f"{path} is not usable: {'; '.join(problems)}")
    return manifest


def no_move_log_quantiles(sigma: FloatArray) -> FloatArray:
    """10%/50%/90% next log returns around no move, ± Z80 ``sigma`` (a NaN sigma gives a
    NaN row)."""
    return np.stack([-Z80 * sigma, 0.0 * sigma, Z80 * sigma], axis=-1)


def naive_log_quantiles(returns: FloatArray) -> FloatArray:
    """The naive forecaster's 10%/50%/90% next log returns from recent log returns (along
    the last axis): no move, ± Z80 standard deviations."""
    return no_move_log_quantiles(np.std(returns, axis=-1))


def _forecast(last_close: float, quantiles: FloatArray) -> Forecast:
    lower, mid, upper = (float(last_close * np.exp(q)) for q in quantiles)
    return Forecast(predicted_close=mid, lower=lower, upper=upper)


# sigma = ln(high/low) / (2 sqrt(ln 2)): Parkinson's range estimator for one candle.
_PARKINSON = 2.0 * math.sqrt(math.log(2.0))


class NaiveForecaster:
    """Persistence: the next close equals the last one, with an 80% normal interval from
    the standard deviation of the recent log returns (below three candles: from the last
    candle's high-low range), so even the first candle of a series gets a forecast."""

    version = "naive"
    interval: str | None = None  # serves every interval

    def __init__(self, window: int = 30) -> None:
        self.window = window

    def predict(self, candles: Sequence[Candle]) -> Forecast | None:
        if not candles:
            return None
        if len(candles) < 3:  # fewer than two returns say nothing about their spread
            last = candles[-1]
            sigma = math.log(last.high / last.low) / _PARKINSON if last.low > 0 else 0.0
            return _forecast(last.close, np.array([-Z80 * sigma, 0.0, Z80 * sigma]))
        closes = np.array([c.close for c in candles[-(self.window + 1) :]], dtype=np.float64)
        return _forecast(float(closes[-1]), naive_log_quantiles(log_returns(closes)))

    def predict_batch(self, histories: Sequence[Sequence[Candle]]) -> list[Forecast | None]:
        return [self.predict(candles) for candles in histories]


class OnnxForecaster:
    """A trained model version directory, run with onnxruntime on one thread."""

    def __init__(self, version_dir: Path) -> None:
        self.path = version_dir
        self.manifest = read_manifest(version_dir)
        self.version = self.manifest.version
        self.window = self.manifest.window
        self.interval: str | None = self.manifest.training_data.interval
        self._normalisation = Normalisation(
            mean=self.manifest.normalisation.mean, std=self.manifest.normalisation.std
        )
        self._session = self._open_session()

    def _open_session(self) -> ort.InferenceSession:
        model_path = self.path / MODEL_FILE
        try:
            data = model_path.read_bytes()
        except OSError as exc:
            raise ModelError(f"cannot read {model_path}: {exc}") from exc
        # Hash the very bytes handed to onnxruntime, so a file swapped after the check
        # cannot be loaded unverified.
        digest = hashlib.sha256(data).hexdigest()
        if digest != self.manifest.sha256:
            raise ModelIntegrityError(
                f"{model_path} has sha256 {digest}, manifest says {self.manifest.sha256}"
            )
        options = ort.SessionOptions()
        options.intra_op_num_threads = 1
        options.inter_op_num_threads = 1
        options.log_severity_level = 3
        try:
            session = ort.InferenceSession(
                data, sess_options=options, providers=["CPUExecutionProvider"]
            )
        except Exception as exc:  # onnxruntime raises several unrelated exception types
            raise ModelError(f"onnxruntime cannot load {model_path}: {exc}") from exc
        self._check_signature(session, model_path)
        return session

    def _check_signature(self, session: ort.InferenceSession, model_path: Path) -> None:
        inputs = {i.name: i.shape for i in session.get_inputs()}
        outputs = {o.name: o.shape for o in session.get_outputs()}
        io = self.manifest.onnx
        if io.input not in inputs or io.output not in outputs:
            raise ModelError(
                f"{model_path} has inputs {list(inputs)} and outputs {list(outputs)}; "
                f"the manifest expects {io.input!r} -> {io.output!r}"
            )
        shape = inputs[io.input]
        expected = [self.window, len(FEATURES)]
        if len(shape) != 3 or list(shape[1:]) != expected:
            raise ModelError(
                f"{model_path} input shape {shape} does not match (batch, {self.window}, "
                f"{len(FEATURES)}) from the manifest"
            )

    def run(self, inputs: NDArray[np.float32]) -> FloatArray:
        """Raw model output ``(batch, 3)`` for prepared inputs (see :func:`prepare_windows`);
        used to check an export against its source model."""
        io = self.manifest.onnx
        result: list[Any] = self._session.run([io.output], {io.input: inputs})
        return np.asarray(result[0], dtype=np.float64)

    def _quantiles(self, windows: FloatArray) -> FloatArray:
        # Quantile heads can cross; sorting restores lower <= mid <= upper.
        return np.sort(self.run(prepare_windows(windows, self._normalisation)), axis=1)

    def predict(self, candles: Sequence[Candle]) -> Forecast | None:
        return self.predict_batch([candles])[0]

    def predict_batch(self, histories: Sequence[Sequence[Candle]]) -> list[Forecast | None]:
        """Forecasts for many symbols in one onnxruntime call."""
        need = self.window + 1
        ready = [i for i, candles in enumerate(histories) if len(candles) >= need]
        results: list[Forecast | None] = [None] * len(histories)
        if not ready:
            return results
        arrays = [candles_to_array(histories[i][-need:]) for i in ready]
        windows = np.stack([compute_features(array) for array in arrays])
        quantiles = self._quantiles(windows)
        for row, (i, array) in enumerate(zip(ready, arrays, strict=True)):
            results[i] = _forecast(float(array[-1, _CLOSE]), quantiles[row])
        return results


def check_parity(forecaster: OnnxForecaster, tolerance: float = 1e-4) -> float:
    """Run the manifest's parity sample through ``forecaster`` and return the largest
    absolute difference from the outputs recorded at export.

    Shows that this onnxruntime computes what the trainer's did, before a new model is
    put in service. Raises :class:`ModelError` when the difference exceeds ``tolerance``
    or the manifest has no usable parity sample.
    """
    parity = forecaster.manifest.parity
    if parity is None:
        raise ModelError(f"model {forecaster.version} has no parity sample; retrain it")
    try:
        inputs = np.asarray(parity.input, dtype=np.float32)
        expected = np.asarray(parity.output, dtype=np.float64)
    except ValueError as exc:  # ragged nested lists
        raise ModelError(f"model {forecaster.version}: malformed parity sample: {exc}") from exc
    if (
        inputs.ndim != 3
        or not len(inputs)
        or inputs.shape[1:] != (forecaster.window, len(FEATURES))
        or expected.shape != (len(inputs), len(QUANTILES))
    ):
        raise ModelError(
            f"model {forecaster.version}: parity sample shapes {inputs.shape} -> "
            f"{expected.shape} do not fit (n, {forecaster.window}, {len(FEATURES)}) -> (n, 3)"
        )
    diff = float(np.max(np.abs(forecaster.run(inputs) - expected)))
    if not diff <= tolerance:  # also catches NaN
        raise ModelError(
            f"model {forecaster.version}: onnxruntime differs from the exported outputs by "
            f"{diff:.3g} (limit {tolerance:g}); do not serve it"
        )
    return diff


def bundled_models_dir() -> Path:
    """Where the model versions shipped inside the package live."""
    return Path(str(importlib.resources.files("makeusrich").joinpath("models")))


def _is_version_dir(path: Path) -> bool:
    return (path / MANIFEST_FILE).exists() or (path / MODEL_FILE).exists()


def load_forecaster(path: Path | None = None) -> Forecaster:
    """Load a forecaster.

    ``path`` may be a version directory or a registry, i.e. a directory of version
    directories: its champion (``champion.json``, see :mod:`makeusrich.inference.registry`)
    if one was promoted, else the newest version by name (names sort chronologically,
    hidden ones are in-progress writes). None means the bundled models. With no model at
    all, the naive baseline is returned. Errors propagate so that a caller can keep its
    previous model.
    """
    root = bundled_models_dir() if path is None else Path(path)
    if not root.exists():
        if path is None:
            return NaiveForecaster()
        raise ModelError(f"model path {root} does not exist")
    if not root.is_dir():
        raise ModelError(f"model path {root} must be a version directory or a directory of them")
    if _is_version_dir(root):
        return OnnxForecaster(root)
    # Imported here: the registry module builds on this one.
    from makeusrich.inference.registry import Registry

    version = Registry(root).selected()
    if version is None:
        return NaiveForecaster()
    return OnnxForecaster(root / version)
