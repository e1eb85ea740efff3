"""Proper scores of quantile forecasts, shared by offline evaluation and live monitoring.

A forecast is a band: the 10%, 50% and 90% quantiles (:data:`QUANTILES`) of the next close,
as (lower, predicted, upper). Scores are in basis points of the last close, so series with
different prices pool fairly.
"""

import numpy as np

from makeusrich.inference.features import FloatArray
from makeusrich.inference.model import QUANTILES

__all__ = ["interval_score", "pinball"]

_BP = 1e4
_LEVELS = np.asarray(QUANTILES)
#: The band's (lower, upper) is the central 1 - _ALPHA interval.
_ALPHA = 1.0 - (QUANTILES[-1] - QUANTILES[0])


def pinball(band: FloatArray, last: FloatArray, actual: FloatArray) -> FloatArray:
    """Per forecast: the mean pinball loss of ``band``'s three quantiles (lower, predicted,
    upper per row) of closes ``actual``, in basis points of the last closes ``last``. It is
    proper: only the true quantiles minimise its expectation."""
    error = (actual[:, None] - band) / last[:, None] * _BP
    loss: FloatArray = np.maximum(_LEVELS * error, (_LEVELS - 1.0) * error).mean(axis=1)
    return loss


def interval_score(band: FloatArray, last: FloatArray, actual: FloatArray) -> FloatArray:
    """Per forecast: the interval score of the central interval [lower, upper] of ``band``
    (Gneiting & Raftery: width + 2/alpha x the miss), in basis points of ``last``."""
    lower, upper = band[:, 0], band[:, 2]
    miss = np.maximum(lower - actual, 0.0) + np.maximum(actual - upper, 0.0)
    score: FloatArray = (upper - lower + 2.0 / _ALPHA * miss) / last * _BP
    return score
