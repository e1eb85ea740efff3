"""Proper scores of quantile forecasts (pinball loss, interval score)."""

import numpy as np
import pytest

from makeusrich.inference import Z80, interval_score, pinball


def test_pinball_and_interval_score_by_hand() -> None:
    last = np.array([100.0, 100.0, 200.0])
    actual = np.array([101.0, 97.0, 200.0])
    band = np.array([[99.0, 100.0, 102.0],   # inside: 1 above the median
                     [98.0, 100.0, 102.0],   # 1 below the lower quantile
                     [200.0, 200.0, 200.0]])  # a zero-width band on the close
    # Pinball per quantile q: q x (y - f) above, (1 - q) x (f - y) below; in bp of last.
    first = (0.1 * 2 + 0.5 * 1 + 0.1 * 1) / 3 * 100
    second = (0.9 * 1 + 0.5 * 3 + 0.1 * 5) / 3 * 100
    assert pinball(band, last, actual) == pytest.approx([first, second, 0.0])
    # Interval score of the 80% interval: width + 2 / 0.2 x the miss.
    assert interval_score(band, last, actual) == pytest.approx([300.0, 400.0 + 1000.0, 0.0])


def test_pinball_prefers_the_true_quantiles() -> None:
    # Proper: on normal moves, the normal quantiles beat a band too wide or too narrow.
    rng = np.random.default_rng(4)
    last = np.full(200_000, 100.0)
    actual = last * np.exp(rng.normal(0.0, 1e-3, len(last)))

    def loss(scale: float) -> float:
        z = Z80 * 1e-3 * scale
        band = last[:, None] * np.exp(np.array([-z, 0.0, z]))
        return float(pinball(band, last, actual).mean())

    assert loss(1.0) < loss(0.7) and loss(1.0) < loss(1.4)
