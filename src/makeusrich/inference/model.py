"""Forecasters of closes some candles ahead: the ONNX model and the naive persistence baseline.

A forecast's ``horizon`` is how many candles ahead its target close is; 1 is the next candle.

A model version is a directory holding ``model.onnx`` and ``manifest.json`` (see
:class:`Manifest`). Only numpy and onnxruntime are needed here, never torch.
"""

import hashlib
import importlib.resources
import logging
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
from makeusrich.inference.conformal import Calibration, apply_scales
from makeusrich.inference.features import (
    OHLCV_COLUMNS,
    FloatArray,
    Normalisation,
    candles_to_array,
    compute_features,
    feature_problems,
    log_returns,
    prepare_windows,
)

MODEL_FILE = "model.onnx"
MANIFEST_FILE = "manifest.json"
#: Quantiles of the log return a model outputs per horizon, in output column order.
QUANTILES = (0.1, 0.5, 0.9)
#: Standard normal 90% quantile: mean ± Z80·sigma is an 80% interval.
Z80 = 1.2815515655446004

#: Architectures that package a baseline as a model version (GARCH(1,1), see
#: :mod:`makeusrich.trainer.garch`): promoted when no network beats the baselines.
BASELINE_KINDS = ("garch",)

_CLOSE = OHLCV_COLUMNS.index("close")

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class Forecast:
    """The close ``horizon`` candles ahead: median and 10%/90% quantiles."""

    predicted_close: float
    lower: float
    upper: float
    horizon: int = 1


class Forecaster(Protocol):
    """Predicts closes ``horizon`` candles ahead from the trailing candles of one symbol and
    interval.

    ``predict`` uses at most the last ``window + 1`` candles (the first one only for its
    close) and returns None when it has too few. ``horizons`` are the ones it serves, 1
    first; asking a model for another raises ``ValueError``.
    """

    version: str
    window: int
    #: The candle interval the model was trained on; None = any interval.
    interval: str | None
    horizons: tuple[int, ...]

    def predict(self, candles: Sequence[Candle], horizon: int = 1) -> Forecast | None: ...

    def predict_batch(
        self, histories: Sequence[Sequence[Candle]], horizon: int = 1
    ) -> list[Forecast | None]: ...

    def predict_horizons(self, candles: Sequence[Candle]) -> list[Forecast] | None:
        """One forecast per served horizon, in ``horizons`` order, or None."""
        ...


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
    trainer's ONNX outputs ``(n, 3 x horizons)`` for them; see :func:`check_parity`."""

    input: list[list[list[float]]]
    output: list[list[float]]


class Manifest(msgspec.Struct, frozen=True):
    """``manifest.json`` of a model version directory. ``evaluation``: the trainer's report
    of the model and the baselines on its validation span (a
    :class:`makeusrich.trainer.evaluate.Report` as a dict). ``horizons``: the candles ahead
    the model forecasts; its output is ``(batch, 3 x len(horizons))``, the three quantiles
    of each horizon's log return in turn. ``calibration``: split-conformal scales every
    server applies to the model's band, one per horizon in ``horizons`` order (see
    :mod:`makeusrich.inference.conformal`); empty = uncalibrated. ``parity`` and
    ``evaluation`` are None, and the rest their defaults, in manifests written before
    they existed."""

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
    horizons: tuple[int, ...] = (1,)
    calibration: tuple[Calibration, ...] = ()


def sha256_of(path: Path) -> str:
    """Hex sha256 of a file's bytes."""
    return hashlib.sha256(path.read_bytes()).hexdigest()


def horizon_problems(horizons: Sequence[int]) -> list[str]:
    """What keeps ``horizons`` from being a model's (empty when nothing): they must be
    ascending, unique and start at 1."""
    if not horizons or horizons[0] != 1 or list(horizons) != sorted(set(horizons)):
        return [f"horizons {list(horizons)} must be ascending, unique and start at 1"]
    return []


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
    problems.extend(feature_problems(manifest.features))
    if manifest.quantiles != QUANTILES:
        problems.append(f"quantiles {list(manifest.quantiles)} != {list(QUANTILES)}")
    if manifest.window < 1:
        problems.append(f"window {manifest.window} < 1")
    stats = manifest.normalisation
    if not len(stats.mean) == len(stats.std) == len(manifest.features):
        problems.append("normalisation mean/std do not match the feature count")
    elif not all(s > 0 for s in stats.std):
        problems.append("normalisation std must be positive")
    problems.extend(horizon_problems(manifest.horizons))
    if manifest.calibration and [c.horizon for c in manifest.calibration] != list(
            manifest.horizons):
        problems.append("calibration must have one entry per horizon, in horizons order")
    if problems:
        raise ModelError(f"{path} is not usable: {'; '.join(problems)}")
    return manifest


def no_move_log_quantiles(sigma: FloatArray) -> FloatArray:
    """10%/50%/90% log returns around no move, ± Z80 ``sigma`` (a NaN sigma gives a NaN
    row)."""
    return np.stack([-Z80 * sigma, 0.0 * sigma, Z80 * sigma], axis=-1)


def naive_log_quantiles(returns: FloatArray, horizon: int = 1) -> FloatArray:
    """The naive forecaster's 10%/50%/90% log returns ``horizon`` candles ahead from recent
    one-candle log returns (along the last axis): no move, ± Z80 standard deviations
    times sqrt(horizon), as for a random walk."""
    return no_move_log_quantiles(np.std(returns, axis=-1) * math.sqrt(horizon))


def _forecast(last_close: float, quantiles: FloatArray, horizon: int = 1) -> Forecast:
    lower, mid, upper = (float(last_close * np.exp(q)) for q in quantiles)
    return Forecast(predicted_close=mid, lower=lower, upper=upper, horizon=horizon)


# sigma = ln(high/low) / (2 sqrt(ln 2)): Parkinson's range estimator for one candle.
_PARKINSON = 2.0 * math.sqrt(math.log(2.0))


class NaiveForecaster:
    """Persistence: the close ahead equals the last one, with an 80% normal interval from
    the standard deviation of the recent log returns (below three candles: from the last
    candle's high-low range) times sqrt(horizon), so even the first candle of a series gets
    a forecast. It forecasts any horizon; ``horizons`` are the ones
    :meth:`predict_horizons` answers (a model's, when standing in for it)."""

    version = "naive"
    interval: str | None = None  # serves every interval

    def __init__(self, window: int = 30, horizons: tuple[int, ...] = (1,)) -> None:
        self.window = window
        self.horizons = horizons

    def predict(self, candles: Sequence[Candle], horizon: int = 1) -> Forecast | None:
        if not candles:
            return None
        if len(candles) < 3:  # fewer than two returns say nothing about their spread
            last = candles[-1]
            sigma = math.log(last.high / last.low) / _PARKINSON if last.low > 0 else 0.0
            sigma *= math.sqrt(horizon)
            return _forecast(last.close, np.array([-Z80 * sigma, 0.0, Z80 * sigma]), horizon)
        closes = np.array([c.close for c in candles[-(self.window + 1) :]], dtype=np.float64)
        return _forecast(
            float(closes[-1]), naive_log_quantiles(log_returns(closes), horizon), horizon)

    def predict_batch(
        self, histories: Sequence[Sequence[Candle]], horizon: int = 1
    ) -> list[Forecast | None]:
        return [self.predict(candles, horizon) for candles in histories]

    def predict_horizons(self, candles: Sequence[Candle]) -> list[Forecast] | None:
        if not candles:
            return None
        return [f for f in (self.predict(candles, h) for h in self.horizons) if f is not None]


class OnnxForecaster:
    """A trained model version directory, run with onnxruntime on one thread."""

    def __init__(self, version_dir: Path) -> None:
        self.path = version_dir
        self.manifest = read_manifest(version_dir)
        self.version = self.manifest.version
        self.window = self.manifest.window
        self.interval: str | None = self.manifest.training_data.interval
        #: The model's input features (a subset of FEATURES, in their order).
        self.features = self.manifest.features
        self.horizons = self.manifest.horizons
        self._normalisation = Normalisation(
            mean=self.manifest.normalisation.mean,
            std=self.manifest.normalisation.std,
            features=self.features,
        )
        self._lacking_logged = False
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
        expected = [self.window, len(self.features)]
        if len(shape) != 3 or list(shape[1:]) != expected:
            raise ModelError(
                f"{model_path} input shape {shape} does not match (batch, {self.window}, "
                f"{len(self.features)}) from the manifest"
            )
        width = len(QUANTILES) * len(self.horizons)
        if list(outputs[io.output][1:]) != [width]:
            raise ModelError(
                f"{model_path} output shape {outputs[io.output]} does not match (batch, "
                f"{width}): 3 quantiles for each of the manifest's horizons "
                f"{list(self.horizons)}"
            )

    def run(self, inputs: NDArray[np.float32]) -> FloatArray:
        """Raw model output ``(batch, 3 x horizons)`` for prepared inputs (see
        :func:`prepare_windows`); used to check an export against its source model."""
        io = self.manifest.onnx
        result: list[Any] = self._session.run([io.output], {io.input: inputs})
        return np.asarray(result[0], dtype=np.float64)

    def log_quantiles(self, inputs: NDArray[np.float32]) -> FloatArray:
        """The served 10%/50%/90% log returns ``(batch, horizons, 3)`` for prepared inputs:
        the raw output sorted per horizon (quantile heads can cross) and calibrated by the
        manifest."""
        raw = self.run(inputs)
        quantiles = np.sort(raw.reshape(len(raw), len(self.horizons), len(QUANTILES)), axis=2)
        for k, calibration in enumerate(self.manifest.calibration):
            quantiles[:, k] = apply_scales(
                quantiles[:, k], calibration.lower_scale, calibration.upper_scale)
        return quantiles

    def predict(self, candles: Sequence[Candle], horizon: int = 1) -> Forecast | None:
        return self.predict_batch([candles], horizon)[0]

    def predict_batch(
        self, histories: Sequence[Sequence[Candle]], horizon: int = 1
    ) -> list[Forecast | None]:
        """Forecasts ``horizon`` candles ahead for many symbols in one onnxruntime call."""
        if horizon not in self.horizons:
            raise ValueError(
                f"model {self.version} serves horizons {list(self.horizons)}, not {horizon}")
        k = self.horizons.index(horizon)
        return [None if f is None else f[k] for f in self._predict_all(histories)]

    def predict_horizons(self, candles: Sequence[Candle]) -> list[Forecast] | None:
        return self._predict_all([candles])[0]

    def _predict_all(self, histories: Sequence[Sequence[Candle]]) -> list[list[Forecast] | None]:
        need = self.window + 1
        ready = [i for i, candles in enumerate(histories) if len(candles) >= need]
        results: list[list[Forecast] | None] = [None] * len(histories)
        if not ready:
            return results
        arrays = [candles_to_array(histories[i][-need:]) for i in ready]
        windows = np.stack([compute_features(array, self.features) for array in arrays])
        usable = self._usable(windows, [histories[i][-1] for i in ready])
        if not usable.all():  # no forecast, as with too few candles
            ready = [i for i, ok in zip(ready, usable.tolist(), strict=True) if ok]
            arrays, windows = [arrays[row] for row in np.flatnonzero(usable)], windows[usable]
            if not ready:
                return results
        quantiles = self.log_quantiles(prepare_windows(windows, self._normalisation))
        for row, (i, array) in enumerate(zip(ready, arrays, strict=True)):
            last_close = float(array[-1, _CLOSE])
            results[i] = [
                _forecast(last_close, quantiles[row, k], horizon)
                for k, horizon in enumerate(self.horizons)
            ]
        return results

    def _usable(self, windows: FloatArray, last: Sequence[Candle]) -> NDArray[np.bool_]:
        """Which feature windows the model can take: not those with a feature the candles
        lack (NaN: large_trade_share of candles made from klines). Logs the first such."""
        finite = np.isfinite(windows)
        usable = np.asarray(finite.all(axis=(1, 2)), dtype=np.bool_)
        if not usable.all() and not self._lacking_logged:
            self._lacking_logged = True
            row = int(np.flatnonzero(~usable)[0])
            lacking = [
                f for f, ok in zip(self.features, finite[row].all(axis=0), strict=True) if not ok
            ]
            log.warning(
                "model %s needs %s, which the %s %s candles up to %d lack (candles made from "
                "klines have no large_trade_quote_volume): it makes no forecast for such "
                "candles (the naive baseline answers instead); logged once",
                self.version,
                lacking,
                last[row].symbol,
                last[row].interval,
                last[row].open_time,
            )
        return usable


def check_parity(forecaster: OnnxForecaster, tolerance: float = 1e-4) -> float:
    """Run the manifest's parity sample through ``forecaster`` and return the largest
    absolute difference from the outputs recorded at export.

    Shows that this onnxruntime computes what the trainer's did, before a new model is
    put in service. Raises :class:`ModelError` when the difference exceeds ``tolerance``
    or the manifest has no usable parity sample.
    """
    parity = forecaster.manifest.parity
    outputs = len(QUANTILES) * len(forecaster.horizons)
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
        or inputs.shape[1:] != (forecaster.window, len(forecaster.features))
        or expected.shape != (len(inputs), outputs)
    ):
        raise ModelError(
            f"model {forecaster.version}: parity sample shapes {inputs.shape} -> "
            f"{expected.shape} do not fit (n, {forecaster.window}, "
            f"{len(forecaster.features)}) -> (n, {outputs})"
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
