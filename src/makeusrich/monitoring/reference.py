"""A model's training feature distribution, the yardstick live features are compared with.

``reference.json`` sits beside a version's ``manifest.json``. For every feature it holds the
deciles of the training rows (9 inner bin edges) and the share of training rows in each of
the 10 bins they make (the outer two are open-ended). A value ``x`` falls in bin ``i`` =
the number of edges ``<= x``, on both sides, so a tie on an edge always lands in the same bin.

A row is what the live side can compute on every closed candle ``t``: the last row of
:func:`makeusrich.inference.compute_features` (the model's features) over candles
``t - window .. t``, with ``log_volume_rel`` and ``log_trades_rel`` made relative to their
mean over those ``window`` feature rows exactly as :func:`makeusrich.inference.prepare_windows`
does for the model's input (before the normalisation). Raw ``log1p(volume)`` would compare
one symbol's volume scale with another's.
"""

import dataclasses
import itertools
import math
import os
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import msgspec
import numpy as np
from numpy.lib.stride_tricks import sliding_window_view
from numpy.typing import NDArray

from makeusrich.core.errors import ModelError
from makeusrich.core.intervals import interval_ms
from makeusrich.core.schemas import Candle
from makeusrich.inference.features import (
    FloatArray,
    candles_to_array,
    common_features,
    compute_features,
    feature_problems,
    relative_columns,
)
from makeusrich.inference.model import Manifest, read_manifest

# The trainer package imports this module (to write references), and the worker should not
# load the trainer to monitor: only reference_for_version reads candle files.
if TYPE_CHECKING:
    from makeusrich.trainer.data import CandleSeries

__all__ = [
    "BINS",
    "DEFAULT_PSI_WINDOW",
    "REFERENCE_FILE",
    "FeatureBins",
    "FeatureReference",
    "bin_indices",
    "build_reference",
    "feature_row",
    "feature_rows",
    "manifest_error_ratio",
    "read_reference",
    "reference_for_version",
    "reference_from_manifest",
    "write_reference",
]

REFERENCE_FILE = "reference.json"
#: Bins per feature: the deciles of the training rows.
BINS = 10
_VOLUME_COLUMN = 4  # in OHLCV_COLUMNS
_SUM_TOLERANCE = 1e-6


class FeatureBins(msgspec.Struct, frozen=True):
    """One feature's ``BINS - 1`` ascending inner edges and the training share per bin."""

    edges: tuple[float, ...]
    proportions: tuple[float, ...]
    # The 99th percentile of this feature's PSI over every window of ``psi_window`` rows
    # of the training data itself: live PSI below it is ordinary for this market.
    psi_limit: float | None = None


class FeatureReference(msgspec.Struct, frozen=True, kw_only=True):
    """``reference.json`` of a model version (see the module docstring).

    ``samples``: training rows counted. ``error_ratio``: the model's validation MAE over the
    persistence MAE on the same candles (None when the manifest has no such scores).
    ``symbols``, ``interval``, ``first_open_time`` .. ``last_open_time`` (UTC epoch ms): the
    candles the rows describe.
    """

    version: str
    features: tuple[str, ...]
    window: int
    symbols: tuple[str, ...]
    interval: str
    first_open_time: int
    last_open_time: int
    samples: int
    error_ratio: float | None
    bins: dict[str, FeatureBins]
    psi_window: int | None = None  # the window the bins' psi_limit values are for

    def psi_limit(self, feature: str, window: int) -> float | None:
        """``feature``'s calibrated PSI limit for windows of ``window`` rows (None when
        the reference was calibrated on another window, or not at all)."""
        if window != self.psi_window:
            return None
        return self.bins[feature].psi_limit

    def edges_array(self) -> FloatArray:
        """Edges as a ``(features, BINS - 1)`` array, rows in :attr:`features` order."""
        return np.array([self.bins[name].edges for name in self.features], dtype=np.float64)

    def proportions_array(self) -> FloatArray:
        """Training shares as a ``(features, BINS)`` array, rows in :attr:`features` order."""
        return np.array([self.bins[name].proportions for name in self.features], dtype=np.float64)


#: Window the PSI limits are calibrated on: ``Settings.drift_window``'s default. A monitor
#: with another window falls back to the configured threshold alone.
DEFAULT_PSI_WINDOW = 240


def bin_indices(edges: FloatArray, rows: FloatArray) -> NDArray[np.int64]:
    """Bin of each value of ``rows`` ``(n, features)`` given ``edges`` ``(features, BINS-1)``:
    the number of edges ``<= value`` (0 .. BINS - 1)."""
    counts: NDArray[np.int64] = (rows[..., :, None] >= edges).sum(axis=-1, dtype=np.int64)
    return counts


def feature_row(
    history: Sequence[Candle], window: int, features: Sequence[str]
) -> FloatArray | None:
    """The row of ``features`` of the last candle of ``history``, from its last
    ``window + 1`` candles; None when there are fewer, or when they lack a feature (NaN:
    ``large_trade_share`` of candles made from klines). ``history``: consecutive candles of
    one series, oldest first (a list or the pipeline's deque)."""
    if window < 1 or len(history) < window + 1:
        return None
    # islice, not a slice: the pipeline keeps its history in a deque.
    recent = list(itertools.islice(history, len(history) - window - 1, None))
    rows = compute_features(candles_to_array(recent), features)
    row: FloatArray = rows[-1].copy()
    for i in relative_columns(features):  # column by column: the floats of feature_rows
        row[i] -= rows[:, i].mean()
    return row if np.isfinite(row).all() else None


def feature_rows(ohlcv: FloatArray, window: int, features: Sequence[str]) -> FloatArray:
    """:func:`feature_row` of every candle ``t >= window`` of consecutive candles ``ohlcv``
    (see :data:`makeusrich.inference.OHLCV_COLUMNS`), vectorised:
    ``(max(n - window, 0), len(features))``; NaN where candles lack a feature."""
    if window < 1:
        raise ValueError(f"window must be at least 1, got {window}")
    if len(ohlcv) < window + 1:
        return np.empty((0, len(features)))
    all_rows = compute_features(ohlcv, features)  # row j describes candle j + 1
    rows = all_rows[window - 1 :].copy()
    # Mean over each candle's own window of feature rows (j - window + 1 .. j), taken per
    # window rather than from a running sum so the floats match feature_row's.
    for i in relative_columns(features):
        rows[:, i] -= sliding_window_view(all_rows[:, i], window).mean(axis=-1)
    return rows


def build_reference(
    series: Sequence["CandleSeries"], window: int, version: str, error_ratio: float | None,
    psi_window: int = DEFAULT_PSI_WINDOW, features: Sequence[str] | None = None,
) -> FeatureReference:
    """The reference of ``version`` from the feature rows of every candle with a full
    window in ``series`` (one interval; each segment on its own, never across a gap).
    ``features``: the model's (None: every supported one that all of ``series`` have)."""
    intervals = {s.interval for s in series}
    if len(intervals) != 1:
        raise ModelError(f"a reference needs candles of one interval, got {sorted(intervals)}")
    used = [s for s in series if len(s) > window]
    if not used:
        raise ModelError(f"no series has the {window + 1} consecutive candles a row needs")
    if features is None:
        features = common_features(s.ohlcv for s in used)
    per_series = [feature_rows(s.ohlcv, window, features) for s in used]
    rows = np.concatenate(per_series)
    lacking = [name for i, name in enumerate(features) if not np.isfinite(rows[:, i]).all()]
    if lacking:
        raise ModelError(
            f"the candles lack {lacking} (candles made from klines have no "
            "large_trade_quote_volume): pass candles the pipeline built from trades"
        )
    deciles = np.arange(1, BINS) / BINS
    edges = np.quantile(rows, deciles, axis=0).T  # (features, BINS - 1)
    counts = np.stack(
        [np.bincount(column, minlength=BINS) for column in bin_indices(edges, rows).T]
    )
    proportions = counts / len(rows)
    limits = _psi_limits(per_series, edges, proportions, psi_window)
    return FeatureReference(
        version=version,
        features=tuple(features),
        window=window,
        symbols=tuple(sorted({s.symbol for s in used})),
        interval=intervals.pop(),
        first_open_time=min(int(s.open_time[0]) for s in used),
        last_open_time=max(int(s.open_time[-1]) for s in used),
        samples=len(rows),
        error_ratio=error_ratio,
        bins={
            name: FeatureBins(
                edges=tuple(edges[i].tolist()), proportions=tuple(proportions[i].tolist()),
                psi_limit=None if limits is None else float(limits[i]),
            )
            for i, name in enumerate(features)
        },
        psi_window=None if limits is None else psi_window,
    )


def _psi_limits(
    per_series: Sequence[FloatArray], edges: FloatArray, proportions: FloatArray,
    psi_window: int, quantile: float = 0.99,
) -> FloatArray | None:
    """Per feature, the ``quantile`` of PSI over every window of ``psi_window`` consecutive
    rows of one series (None when no series is that long)."""
    from makeusrich.monitoring.drift import psi  # drift builds on this module

    values = []
    for rows in per_series:
        if len(rows) < psi_window:
            continue
        # Bin counts of every window at once, from cumulative one-hot counts.
        onehot = np.eye(BINS)[bin_indices(edges, rows)]  # (n, features, BINS)
        cumulative = np.concatenate([np.zeros((1, *onehot.shape[1:])), onehot.cumsum(axis=0)])
        window_counts = cumulative[psi_window:] - cumulative[:-psi_window]
        values.append(psi(window_counts / psi_window, proportions))  # (windows, features)
    if not values:
        return None
    limits: FloatArray = np.quantile(np.concatenate(values), quantile, axis=0)
    return limits


def manifest_error_ratio(manifest: Manifest) -> float | None:
    """Validation MAE of the model over that of persistence: from the manifest's
    ``evaluation`` (``overall.metrics.{model,persistence}.mae``), else from its headline
    ``metrics`` (``mae``/``mae_persistence``, the same numbers; manifests written before
    ``evaluation`` existed, like the bundled one, have only those). None when neither is
    there or persistence was exact."""
    model_mae: Any = None
    persistence_mae: Any = None
    if manifest.evaluation is not None:
        try:
            scores = manifest.evaluation["overall"]["metrics"]
            model_mae, persistence_mae = scores["model"]["mae"], scores["persistence"]["mae"]
        except (KeyError, TypeError):
            pass
    if model_mae is None or persistence_mae is None:
        model_mae = manifest.metrics.get("mae")
        persistence_mae = manifest.metrics.get("mae_persistence")
    if not isinstance(model_mae, int | float) or not isinstance(persistence_mae, int | float):
        return None
    ratio = float(model_mae) / float(persistence_mae) if persistence_mae > 0 else math.nan
    return ratio if math.isfinite(ratio) else None


def _training_slice(
    series: "CandleSeries", first_open_time: int, end_open_time: int
) -> "CandleSeries":
    keep = (series.open_time >= first_open_time) & (series.open_time < end_open_time)
    ohlcv = series.ohlcv[keep]
    # Gap fills are flat zero-volume candles; count them the way they look.
    return dataclasses.replace(
        series,
        open_time=series.open_time[keep],
        ohlcv=ohlcv,
        filled=int(np.count_nonzero(ohlcv[:, _VOLUME_COLUMN] == 0)),
    )


def reference_from_manifest(
    manifest: Manifest, series: Sequence["CandleSeries"]
) -> FeatureReference:
    """The reference of the model ``manifest`` describes, from the candles of ``series``
    that it trained on: its symbols and interval, open times from
    ``training_data.first_open_time`` up to (without) the validation span's first target."""
    data = manifest.training_data
    # The candles up to the validation span's first target feed training windows only.
    end = data.validation_first_target_open_time
    interval_ms(data.interval)  # a ConfigError for an interval this code does not know
    chosen = [
        _training_slice(s, data.first_open_time, end)
        for s in series
        if s.symbol in data.symbols and s.interval == data.interval
    ]
    if not any(len(s) > manifest.window for s in chosen):
        raise ModelError(
            f"no candles of {list(data.symbols)} {data.interval} in the training span of "
            f"{manifest.version}; pass the data it was trained on"
        )
    return build_reference(
        chosen, manifest.window, manifest.version, manifest_error_ratio(manifest),
        features=manifest.features,
    )


def reference_for_version(
    version_dir: Path, data_paths: Path | str | Sequence[Path | str]
) -> FeatureReference:
    """Rebuild a version's reference from its manifest and candle files (any
    :func:`makeusrich.trainer.data.load_series` accepts) holding its training data."""
    from makeusrich.trainer.data import load_series

    return reference_from_manifest(read_manifest(Path(version_dir)), load_series(data_paths))


def write_reference(version_dir: Path, reference: FeatureReference) -> Path:
    """Write ``reference.json`` into ``version_dir`` (atomically) and return its path."""
    path = Path(version_dir) / REFERENCE_FILE
    data = msgspec.json.format(msgspec.json.encode(reference)) + b"\n"
    fd, temporary = tempfile.mkstemp(prefix=f".{REFERENCE_FILE}.", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
        os.chmod(temporary, 0o644)  # mkstemp's 0600 would hide it from a service user
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise
    return path


def read_reference(version_dir: Path) -> FeatureReference | None:
    """A version's reference; None when it has none (older versions, the naive model).
    :class:`ModelError` when the file exists but cannot be used."""
    path = Path(version_dir) / REFERENCE_FILE
    try:
        reference = msgspec.json.decode(path.read_bytes(), type=FeatureReference)
    except FileNotFoundError:
        return None
    except (OSError, msgspec.DecodeError) as exc:
        raise ModelError(f"{path} is not a valid feature reference: {exc}") from exc
    problems = _problems(reference)
    if problems:
        raise ModelError(f"{path} is not usable: {'; '.join(problems)}")
    return reference


def _problems(reference: FeatureReference) -> list[str]:
    problems = feature_problems(reference.features)
    if set(reference.bins) != set(reference.features):
        problems.append(f"bins for {sorted(reference.bins)}, features {list(reference.features)}")
    if reference.window < 1:
        problems.append(f"window {reference.window} < 1")
    for name, bins in reference.bins.items():
        edges, shares = bins.edges, bins.proportions
        if len(edges) != BINS - 1 or len(shares) != BINS:
            problems.append(f"{name}: need {BINS - 1} edges and {BINS} proportions")
        elif not all(math.isfinite(e) for e in edges) or list(edges) != sorted(edges):
            problems.append(f"{name}: edges must be finite and ascending")
        elif min(shares) < 0 or abs(math.fsum(shares) - 1.0) > _SUM_TOLERANCE:
            problems.append(f"{name}: proportions must be >= 0 and sum to 1")
    return problems
