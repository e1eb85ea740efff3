"""Conformal calibration of the served 10%/50%/90% quantiles, so the 80% band covers 80%.

Both steps rescale each side of a band around its median, in log-return space, so the band
keeps the model's sense of when moves are large and only its overall width per side moves:

- **Split conformal, at training** (:func:`fit_calibration`): on held-out calibration
  windows, each side's scale is the conformal quantile of how far past that side's
  half-width the next return landed (Romano et al., 2019, with normalised scores). The
  manifest keeps the two scales and every server applies them.
- **Adaptive conformal, live** (:class:`AdaptiveConformal`, Gibbs & Candès, 2021, as
  quantile tracking): after each target closes, each side's log multiplier steps up by
  ``step x 0.9`` on a miss and down by ``step x 0.1`` otherwise, so each side misses
  10% of the time in the long run, whatever drift the market or model goes through.
  :func:`adaptive_log_quantiles` runs the same recursion over a recorded span, so offline
  scores are the served ones.

Pure numpy; the worker persists the tracker's state.
"""

import math
from collections.abc import Mapping, Sequence
from typing import Any

import msgspec
import numpy as np

from makeusrich.inference.features import FloatArray

__all__ = [
    "DEFAULT_STEP",
    "SIDE_MISS",
    "AdaptiveConformal",
    "Calibration",
    "adaptive_log_quantiles",
    "apply_scales",
    "fit_calibration",
]

#: Target share of next returns below the 10% quantile, and above the 90% one.
SIDE_MISS = 0.1
#: Adaptive step per scored forecast. On the bundled LSTM's validation span (BTCUSDT 1m,
#: 2025-11-07..23) 0.005 held every week's coverage within 80 ± 0.3 points and every day's
#: within 77..82, at a pinball loss 0.1% better than no adaptation; 0.05 holds days tighter
#: but costs 0.3% of pinball, as the band chases noise.
DEFAULT_STEP = 0.005
#: Log multipliers stay within ±this (scales 1/20 .. 20): a band of zero width cannot be
#: widened by scaling, and its misses must not wind the multiplier up without end.
_LIMIT = 3.0


class Calibration(msgspec.Struct, frozen=True):
    """Split-conformal scales of a model's band at one ``horizon``: lower' = median -
    ``lower_scale`` x (median - lower), and likewise above, in log returns. ``windows``:
    calibration windows they were fitted on (held out from training and from validation);
    ``coverage_80`` before and after, on those windows."""

    horizon: int
    lower_scale: float
    upper_scale: float
    windows: int
    coverage_80_raw: float
    coverage_80: float


def apply_scales(log_quantiles: FloatArray, lower_scale: float, upper_scale: float) -> FloatArray:
    """Rows (lower, median, upper) of log returns with each side's distance from the
    median multiplied by its scale."""
    median = log_quantiles[..., 1]
    return np.stack(
        [
            median - lower_scale * (median - log_quantiles[..., 0]),
            median,
            median + upper_scale * (log_quantiles[..., 2] - median),
        ],
        axis=-1,
    )


def _conformal_scale(excess: FloatArray) -> float:
    # The ceil((n + 1)(1 - alpha)) / n empirical quantile: finite-sample valid.
    n = len(excess)
    level = min(1.0, np.ceil((n + 1) * (1.0 - SIDE_MISS)) / n)
    return float(np.quantile(excess, level, method="higher"))


def fit_calibration(log_quantiles: FloatArray, target: FloatArray,
                    horizon: int = 1) -> Calibration:
    """Split-conformal scales from sorted bands ``(n, 3)`` of log returns ``horizon``
    candles ahead and the realised returns ``(n,)``. Rows whose side has no width say
    nothing about its scale and are left out of that side's fit. ``ValueError`` when a
    side has no usable row."""
    median = log_quantiles[:, 1]
    below = median - log_quantiles[:, 0]
    above = log_quantiles[:, 2] - median
    lower_ok, upper_ok = below > 0, above > 0
    if not lower_ok.any() or not upper_ok.any():
        raise ValueError("no calibration window has a band of positive width")
    lower_scale = _conformal_scale((median - target)[lower_ok] / below[lower_ok])
    upper_scale = _conformal_scale((target - median)[upper_ok] / above[upper_ok])
    calibrated = apply_scales(log_quantiles, lower_scale, upper_scale)
    return Calibration(
        horizon=horizon,
        lower_scale=lower_scale,
        upper_scale=upper_scale,
        windows=len(target),
        coverage_80_raw=_coverage(log_quantiles, target),
        coverage_80=_coverage(calibrated, target),
    )


def _coverage(log_quantiles: FloatArray, target: FloatArray) -> float:
    inside = (target >= log_quantiles[:, 0]) & (target <= log_quantiles[:, 2])
    return float(inside.mean())


def _scaled(band: Sequence[float], theta: tuple[float, float]) -> list[float]:
    lower, median, upper = band
    return [median - math.exp(theta[0]) * (median - lower), median,
            median + math.exp(theta[1]) * (upper - median)]


def _step(theta: tuple[float, float], served: Sequence[float], target: float,
          step: float) -> tuple[float, float]:
    """The next (lower, upper) log multipliers after a band, as served, met ``target``."""
    lower_miss = SIDE_MISS if target >= served[0] else SIDE_MISS - 1.0
    upper_miss = SIDE_MISS if target <= served[2] else SIDE_MISS - 1.0
    return (min(_LIMIT, max(-_LIMIT, theta[0] - step * lower_miss)),
            min(_LIMIT, max(-_LIMIT, theta[1] - step * upper_miss)))


def adaptive_log_quantiles(log_quantiles: FloatArray, target: FloatArray, step: float,
                           horizon: int = 1) -> FloatArray:
    """The bands :class:`AdaptiveConformal` would serve for consecutive forecasts
    ``(n, 3)``, ``horizon`` candles ahead, of one series whose realised returns are
    ``target`` ``(n,)``: forecast i is scaled by what forecasts 0 .. i - horizon met, whose
    targets had closed when it was made, never by its own."""
    served: list[list[float]] = []
    theta = (0.0, 0.0)
    realised = target.tolist()
    # Plain floats: a span has tens of thousands of rows, and numpy per row is slow.
    for i, band in enumerate(log_quantiles.tolist()):
        if i >= horizon:
            theta = _step(theta, served[i - horizon], realised[i - horizon], step)
        served.append(_scaled(band, theta))
    return np.asarray(served, dtype=np.float64).reshape(log_quantiles.shape)


class _Pending(msgspec.Struct):
    """A served band waiting for its target candle."""

    version: str
    horizon: int
    target_open_time: int
    last_close: float
    log_quantiles: list[float]  # as served


class AdaptiveConformal:
    """Live adaptive conformal: per (symbol, interval, model version, horizon), two log
    multipliers that rescale the served band's sides. ``adjust`` scales a new forecast and
    remembers it; ``observe`` scores the remembered ones whose target candle just closed.
    ``step`` 0 leaves bands unchanged."""

    def __init__(self, step: float) -> None:
        if step < 0:
            raise ValueError("the adaptive conformal step must be >= 0")
        self.step = step
        self._theta: dict[tuple[str, str, str, int], tuple[float, float]] = {}
        self._pending: dict[tuple[str, str], list[_Pending]] = {}

    def observe(self, symbol: str, interval: str, open_time: int, close: float) -> None:
        """A candle closed: score the bands forecast for it. Bands whose target was skipped
        (a candle never closed) are dropped unscored."""
        pending = self._pending.get((symbol, interval))
        if not pending:
            return
        waiting = []
        for band in pending:
            if band.target_open_time > open_time:
                waiting.append(band)
            elif band.target_open_time == open_time:
                key = (symbol, interval, band.version, band.horizon)
                target = math.log(close / band.last_close) if close > 0 < band.last_close else 0.0
                self._theta[key] = _step(self._theta.get(key, (0.0, 0.0)), band.log_quantiles,
                                         target, self.step)
        self._pending[(symbol, interval)] = waiting

    def adjust(self, symbol: str, interval: str, version: str, horizon: int,
               target_open_time: int, last_close: float,
               log_quantiles: Sequence[float]) -> list[float]:
        """The band to serve for a forecast (lower, median, upper log returns)."""
        theta = self._theta.get((symbol, interval, version, horizon), (0.0, 0.0))
        served = _scaled(log_quantiles, theta)
        self._pending.setdefault((symbol, interval), []).append(
            _Pending(version, horizon, target_open_time, last_close, served))
        return served

    def forget(self, symbol: str) -> None:
        for key in [k for k in self._theta if k[0] == symbol]:
            del self._theta[key]
        for pending in [k for k in self._pending if k[0] == symbol]:
            del self._pending[pending]

    def snapshot(self, symbol: str) -> dict[str, Any]:
        return {
            "theta": [[interval, version, horizon, *theta]
                      for (s, interval, version, horizon), theta in self._theta.items()
                      if s == symbol],
            "pending": {interval: msgspec.to_builtins(bands)
                        for (s, interval), bands in self._pending.items() if s == symbol},
        }

    def restore(self, symbol: str, state: Mapping[str, Any]) -> None:
        """Resume ``symbol`` from :meth:`snapshot`, replacing what it holds now: a worker
        restores over a symbol it kept folding (the same partition assigned again), and
        multipliers that moved since the snapshot would step twice on the replay."""
        self.forget(symbol)
        for interval, version, horizon, lower, upper in state.get("theta", []):
            self._theta[(symbol, interval, version, horizon)] = (float(lower), float(upper))
        for interval, bands in state.get("pending", {}).items():
            self._pending[(symbol, interval)] = msgspec.convert(bands, list[_Pending])
