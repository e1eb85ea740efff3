"""Model input features, shared by the trainer and the server so both see identical numbers.

Pure numpy. Candles become an ``(n, 9)`` float array (:data:`OHLCV_COLUMNS`), which gives
``n - 1`` feature rows (:data:`FEATURES`, or the subset a model uses): row ``i`` describes
candle ``i + 1`` because the log return needs the previous close. A model input is a window
of consecutive feature rows, made relative and normalised by :func:`prepare_windows`. The
target is the next candle's log return, i.e. the ``log_return`` of the following row.

Features from the trade stream: ``taker_buy_ratio`` (the order-flow imbalance: taker buys'
share of the volume), ``vwap_close`` (where the candle's trades traded on average, against
its close), ``log_trades_rel`` (trade count intensity) and ``large_trade_share`` (the share of
the quote volume in large trades). Klines carry what the first three need; only candles the
pipeline built from trades know their large trades (:data:`TRADE_ONLY_FEATURES`).
"""

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import numpy as np
from numpy.typing import NDArray

from makeusrich.core.schemas import Candle

#: Columns of the array form of candles, in order: :class:`Candle` fields. An unknown
#: ``large_trade_quote_volume`` (None) is NaN.
OHLCV_COLUMNS = (
    "open",
    "high",
    "low",
    "close",
    "volume",
    "taker_buy_volume",
    "quote_volume",
    "trades",
    "large_trade_quote_volume",
)
#: Every supported feature, in order; a model uses a subset of them, in this order (its
#: manifest's ``features``). ``log_volume_rel`` and ``log_trades_rel`` are log1p(volume) and
#: log1p(trades) minus their mean over the window (:data:`RELATIVE_FEATURES`), so a model
#: trained on one symbol's scale transfers to another's. ``vwap_close``: log(vwap / close),
#: vwap = quote volume / volume (0 for an empty candle). ``large_trade_share``: large-trade
#: quote volume / quote volume, in [0, 1] (0 for an empty candle; NaN when unknown).
FEATURES = (
    "log_return",
    "log_range",
    "log_volume_rel",
    "taker_buy_ratio",
    "vwap_close",
    "log_trades_rel",
    "large_trade_share",
)
#: Features made relative to their window's mean by :func:`prepare_windows`.
RELATIVE_FEATURES = ("log_volume_rel", "log_trades_rel")
#: Features that only candles built from trades have, each with the :class:`Candle` field it
#: needs; where that is unknown (klines: None, NaN in the array) the feature is NaN.
TRADE_ONLY_FEATURES = {"large_trade_share": "large_trade_quote_volume"}

_HIGH, _LOW, _CLOSE, _VOLUME, _TAKER_BUY, _QUOTE, _TRADES, _LARGE = range(1, 9)

FloatArray = NDArray[np.float64]


def candle_values(candle: Candle) -> tuple[float, ...]:
    """One candle's row of the array form (:data:`OHLCV_COLUMNS`)."""
    c, large = candle, candle.large_trade_quote_volume
    return (
        c.open,
        c.high,
        c.low,
        c.close,
        c.volume,
        c.taker_buy_volume,
        c.quote_volume,
        c.trades,
        math.nan if large is None else large,
    )


def candles_to_array(candles: Sequence[Candle]) -> FloatArray:
    """The ``(n, 9)`` array form of candles, columns as in :data:`OHLCV_COLUMNS`."""
    return np.array([candle_values(c) for c in candles], dtype=np.float64).reshape(
        len(candles), len(OHLCV_COLUMNS)
    )


def feature_problems(features: Sequence[str]) -> list[str]:
    """What keeps ``features`` from being a model's feature list (empty when nothing): it
    must be a non-empty subset of :data:`FEATURES`, without duplicates, in their order."""
    names = list(features)
    unknown = [name for name in names if name not in FEATURES]
    if unknown:
        return [f"unknown features {unknown}; supported: {list(FEATURES)}"]
    if not names:
        return ["no features"]
    if len(set(names)) != len(names):
        return [f"features {names} repeat one"]
    if names != sorted(names, key=FEATURES.index):
        return [f"features {names} are not in the supported order {list(FEATURES)}"]
    return []


def available_features(candles: Sequence[Candle] | FloatArray) -> tuple[str, ...]:
    """The features every candle of ``candles`` has the data for: all but those of
    :data:`TRADE_ONLY_FEATURES` whose field some candle lacks (e.g. candles from klines)."""
    data = _as_array(candles)
    lacking = {
        feature
        for feature, field in TRADE_ONLY_FEATURES.items()
        if np.isnan(data[:, OHLCV_COLUMNS.index(field)]).any()
    }
    return tuple(name for name in FEATURES if name not in lacking)


def common_features(arrays: Iterable[FloatArray]) -> tuple[str, ...]:
    """The features that every one of the candle arrays ``arrays`` has the data for (see
    :func:`available_features`), in :data:`FEATURES` order."""
    have = [available_features(array) for array in arrays]
    return tuple(name for name in FEATURES if all(name in names for names in have))


def _as_array(candles: Sequence[Candle] | FloatArray) -> FloatArray:
    data = candles if isinstance(candles, np.ndarray) else candles_to_array(candles)
    data = np.asarray(data, dtype=np.float64)
    if data.ndim != 2 or data.shape[1] != len(OHLCV_COLUMNS):
        raise ValueError(f"expected an (n, {len(OHLCV_COLUMNS)}) candle array, got {data.shape}")
    return data


def _safe_log_ratio(numerator: FloatArray, denominator: FloatArray) -> FloatArray:
    # Zero, negative or non-finite prices would give inf/NaN; count them as "no move".
    ok = np.isfinite(numerator) & np.isfinite(denominator) & (numerator > 0) & (denominator > 0)
    ratio = np.divide(numerator, denominator, out=np.ones_like(numerator), where=ok)
    return np.log(ratio)


def log_returns(close: FloatArray) -> FloatArray:
    """Log returns of consecutive closes (length ``n - 1``); 0 where a price is unusable."""
    return _safe_log_ratio(close[1:], close[:-1])


def _nonnegative(values: FloatArray) -> tuple[FloatArray, NDArray[np.bool_]]:
    """``values`` with non-finite and non-positive ones as 0, and where they were > 0."""
    positive = np.isfinite(values) & (values > 0)
    return np.where(positive, values, 0.0), positive


def compute_features(
    candles: Sequence[Candle] | FloatArray, features: Sequence[str] = FEATURES
) -> FloatArray:
    """Per-candle ``features`` (any list :func:`feature_problems` accepts) of candles
    1..n-1: ``(n - 1, len(features))``.

    Finite, also for gap-filled candles (zero volume, open=high=low=close), except
    ``large_trade_share`` of a candle whose large-trade volume is unknown (NaN). The
    columns of :data:`RELATIVE_FEATURES` hold plain log1p values here;
    :func:`prepare_windows` makes them relative to their window.
    """
    problems = feature_problems(features)
    if problems:
        raise ValueError("; ".join(problems))
    data = _as_array(candles)
    rows = data[1:]
    volume, has_volume = _nonnegative(rows[:, _VOLUME])
    quote, has_quote = _nonnegative(rows[:, _QUOTE])
    # 0.5 = "no side dominated" for an empty candle.
    taker_ratio = np.divide(
        rows[:, _TAKER_BUY], volume, out=np.full_like(volume, 0.5), where=has_volume
    )
    large = rows[:, _LARGE]
    large_share = np.divide(large, quote, out=np.zeros_like(quote), where=has_quote)
    # vwap 0 (an empty candle) is unusable: log ratio 0.
    vwap = np.divide(quote, volume, out=np.zeros_like(volume), where=has_volume)
    columns = {
        "log_return": log_returns(data[:, _CLOSE]),
        "log_range": _safe_log_ratio(rows[:, _HIGH], rows[:, _LOW]),
        "log_volume_rel": np.log1p(volume),
        "taker_buy_ratio": np.clip(np.nan_to_num(taker_ratio, nan=0.5), 0.0, 1.0),
        "vwap_close": _safe_log_ratio(vwap, rows[:, _CLOSE]),
        "log_trades_rel": np.log1p(_nonnegative(rows[:, _TRADES])[0]),
        "large_trade_share": np.where(
            np.isnan(large), np.nan, np.clip(np.nan_to_num(large_share), 0.0, 1.0)
        ),
    }
    return np.column_stack([columns[name] for name in features]).reshape(len(rows), len(features))


def relative_columns(features: Sequence[str]) -> list[int]:
    """Positions in ``features`` of those made relative to their window
    (:data:`RELATIVE_FEATURES`)."""
    return [i for i, name in enumerate(features) if name in RELATIVE_FEATURES]


def _relative(windows: FloatArray, features: Sequence[str]) -> FloatArray:
    relative = np.array(windows, dtype=np.float64, copy=True)
    for i in relative_columns(features):
        column = relative[..., i]
        column -= column.mean(axis=-1, keepdims=True)
    return relative


@dataclass(frozen=True)
class Normalisation:
    """Per-feature mean and std of a model's ``features``, fitted on training windows and
    stored in the manifest."""

    mean: tuple[float, ...]
    std: tuple[float, ...]
    features: tuple[str, ...]

    def __post_init__(self) -> None:
        if not len(self.mean) == len(self.std) == len(self.features):
            raise ValueError(
                f"{len(self.mean)} means and {len(self.std)} stds for {len(self.features)} features"
            )

    @classmethod
    def fit(cls, windows: FloatArray, features: Sequence[str] = FEATURES) -> "Normalisation":
        """Fit on raw feature windows ``(batch, window, len(features))``."""
        flat = _relative(windows, features).reshape(-1, windows.shape[-1])
        std = flat.std(axis=0)
        # A constant feature would divide by zero; leave it unscaled instead.
        std = np.where(std > 1e-12, std, 1.0)
        return cls(
            mean=tuple(float(v) for v in flat.mean(axis=0)),
            std=tuple(float(v) for v in std),
            features=tuple(features),
        )


def prepare_windows(windows: FloatArray, normalisation: Normalisation) -> NDArray[np.float32]:
    """Model input from raw feature windows ``(batch, window, features)`` of
    ``normalisation.features``: volume and trade count made relative to their window, then
    every feature standardised. Returns float32."""
    relative = _relative(windows, normalisation.features)
    mean = np.asarray(normalisation.mean, dtype=np.float64)
    std = np.asarray(normalisation.std, dtype=np.float64)
    return ((relative - mean) / std).astype(np.float32)
