"""Model input features, shared by the trainer and the server so both see identical numbers.

Pure numpy. Candles become an ``(n, 6)`` float array (:data:`OHLCV_COLUMNS`), which gives
``n - 1`` feature rows (:data:`FEATURES`): row ``i`` describes candle ``i + 1`` because the
log return needs the previous close. A model input is a window of consecutive feature rows,
made relative and normalised by :func:`prepare_windows`. The target is the next candle's
log return, i.e. column 0 of the following feature row.
"""

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from numpy.typing import NDArray

from makeusrich.core.schemas import Candle

#: Columns of the array form of candles, in order.
OHLCV_COLUMNS = ("open", "high", "low", "close", "volume", "taker_buy_volume")
#: Feature columns, in order. ``log_volume_rel`` is log1p(volume) minus its mean over the
#: window, so a model trained on one symbol's volume scale transfers to another's.
FEATURES = ("log_return", "log_range", "log_volume_rel", "taker_buy_ratio")

_HIGH, _LOW, _CLOSE, _VOLUME, _TAKER_BUY = 1, 2, 3, 4, 5
_VOLUME_FEATURE = FEATURES.index("log_volume_rel")

FloatArray = NDArray[np.float64]


def candles_to_array(candles: Sequence[Candle]) -> FloatArray:
    """The ``(n, 6)`` array form of candles, columns as in :data:`OHLCV_COLUMNS`."""
    return np.array(
        [(c.open, c.high, c.low, c.close, c.volume, c.taker_buy_volume) for c in candles],
        dtype=np.float64,
    ).reshape(len(candles), len(OHLCV_COLUMNS))


def _safe_log_ratio(numerator: FloatArray, denominator: FloatArray) -> FloatArray:
    # Zero, negative or non-finite prices would give inf/NaN; count them as "no move".
    ok = np.isfinite(numerator) & np.isfinite(denominator) & (numerator > 0) & (denominator > 0)
    ratio = np.divide(numerator, denominator, out=np.ones_like(numerator), where=ok)
    return np.log(ratio)


def log_returns(close: FloatArray) -> FloatArray:
    """Log returns of consecutive closes (length ``n - 1``); 0 where a price is unusable."""
    return _safe_log_ratio(close[1:], close[:-1])


def compute_features(candles: Sequence[Candle] | FloatArray) -> FloatArray:
    """Per-candle features ``(n - 1, len(FEATURES))`` for candles 1..n-1.

    Always finite, also for gap-filled candles (zero volume, open=high=low=close).
    The volume column holds plain log1p(volume) here; :func:`prepare_windows` makes it
    relative to its window.
    """
    data = candles if isinstance(candles, np.ndarray) else candles_to_array(candles)
    data = np.asarray(data, dtype=np.float64)
    if data.ndim != 2 or data.shape[1] != len(OHLCV_COLUMNS):
        raise ValueError(f"expected an (n, {len(OHLCV_COLUMNS)}) candle array, got {data.shape}")
    rows = data[1:]
    volume = rows[:, _VOLUME]
    has_volume = np.isfinite(volume) & (volume > 0)
    safe_volume = np.where(has_volume, volume, 0.0)
    # 0.5 = "no side dominated" for an empty candle.
    taker_ratio = np.divide(
        rows[:, _TAKER_BUY], safe_volume, out=np.full_like(volume, 0.5), where=has_volume
    )
    taker_ratio = np.clip(np.nan_to_num(taker_ratio, nan=0.5), 0.0, 1.0)
    return np.column_stack(
        (
            log_returns(data[:, _CLOSE]),
            _safe_log_ratio(rows[:, _HIGH], rows[:, _LOW]),
            np.log1p(safe_volume),
            taker_ratio,
        )
    )


def _relative(windows: FloatArray) -> FloatArray:
    relative = np.array(windows, dtype=np.float64, copy=True)
    volume = relative[..., _VOLUME_FEATURE]
    volume -= volume.mean(axis=-1, keepdims=True)
    return relative


@dataclass(frozen=True)
class Normalisation:
    """Per-feature mean and std, fitted on training windows and stored in the manifest."""

    mean: tuple[float, ...]
    std: tuple[float, ...]

    @classmethod
    def fit(cls, windows: FloatArray) -> "Normalisation":
        """Fit on raw feature windows ``(batch, window, features)``."""
        flat = _relative(windows).reshape(-1, windows.shape[-1])
        std = flat.std(axis=0)
        # A constant feature would divide by zero; leave it unscaled instead.
        std = np.where(std > 1e-12, std, 1.0)
        return cls(
            mean=tuple(float(v) for v in flat.mean(axis=0)), std=tuple(float(v) for v in std)
        )


def prepare_windows(windows: FloatArray, normalisation: Normalisation) -> NDArray[np.float32]:
    """Model input from raw feature windows ``(batch, window, features)``: volume made
    relative to its window, then every feature standardised. Returns float32."""
    relative = _relative(windows)
    mean = np.asarray(normalisation.mean, dtype=np.float64)
    std = np.asarray(normalisation.std, dtype=np.float64)
    return ((relative - mean) / std).astype(np.float32)
