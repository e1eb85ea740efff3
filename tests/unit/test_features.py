"""Model features: finite on degenerate candles, known values, normalisation."""

import math

import numpy as np
import pytest

from makeusrich.core.schemas import Candle
from makeusrich.inference import (
    FEATURES,
    Normalisation,
    candles_to_array,
    compute_features,
    prepare_windows,
)


def _candle(
    close: float,
    *,
    high: float | None = None,
    low: float | None = None,
    volume: float = 1.0,
    taker_buy: float = 0.5,
) -> Candle:
    return Candle(
        symbol="BTCUSDT",
        interval="1m",
        open_time=0,
        close_time=59_999,
        open=close,
        high=close if high is None else high,
        low=close if low is None else low,
        close=close,
        volume=volume,
        quote_volume=volume * close,
        trades=1 if volume else 0,
        taker_buy_volume=taker_buy,
        taker_buy_quote_volume=taker_buy * close,
        source="sim",
        ts_event=59_999,
        ts_ingest=60_000,
    )


def test_known_values_on_a_hand_made_series() -> None:
    candles = [
        _candle(100.0),
        _candle(110.0, high=112.0, low=99.0, volume=4.0, taker_buy=3.0),
        _candle(99.0, high=111.0, low=98.0, volume=0.0, taker_buy=0.0),
    ]

    features = compute_features(candles)

    assert features.shape == (2, len(FEATURES))
    expected = [
        [math.log(110 / 100), math.log(112 / 99), math.log1p(4.0), 0.75],
        [math.log(99 / 110), math.log(111 / 98), 0.0, 0.5],
    ]
    np.testing.assert_allclose(features, expected, rtol=1e-12)


def test_array_form_gives_the_same_features_as_candles() -> None:
    candles = [_candle(100.0 + i, high=101.0 + i, low=99.0 + i, volume=i) for i in range(5)]

    np.testing.assert_array_equal(
        compute_features(candles_to_array(candles)), compute_features(candles)
    )


def test_empty_and_broken_candles_stay_finite() -> None:
    flat = [_candle(100.0, volume=0.0, taker_buy=0.0) for _ in range(5)]
    broken = [
        _candle(0.0, volume=0.0, taker_buy=0.0),
        _candle(100.0, high=100.0, low=0.0),
        _candle(float("nan"), volume=float("nan"), taker_buy=float("nan")),
        _candle(100.0, volume=-1.0, taker_buy=5.0),
    ]

    for candles in (flat, broken):
        features = compute_features(candles)
        assert np.isfinite(features).all()

    flat_features = compute_features(flat)
    np.testing.assert_array_equal(flat_features[:, :3], 0.0)
    np.testing.assert_array_equal(flat_features[:, 3], 0.5)  # no volume: neither side


def test_one_candle_gives_no_feature_rows() -> None:
    assert compute_features([_candle(100.0)]).shape == (0, len(FEATURES))


def test_wrong_array_shape_is_rejected() -> None:
    with pytest.raises(ValueError, match="candle array"):
        compute_features(np.zeros((3, 4)))


def test_normalisation_standardises_training_windows() -> None:
    rng = np.random.default_rng(0)
    windows = rng.normal(
        loc=[0.001, 0.002, 3.0, 0.5], scale=[0.01, 0.001, 1.0, 0.1], size=(500, 30, 4)
    )

    normalisation = Normalisation.fit(windows)
    prepared = prepare_windows(windows, normalisation)

    assert prepared.dtype == np.float32
    assert prepared.shape == windows.shape
    flat = prepared.reshape(-1, 4)
    np.testing.assert_allclose(flat.mean(axis=0), 0.0, atol=1e-6)
    np.testing.assert_allclose(flat.std(axis=0), 1.0, atol=1e-5)


def test_normalisation_applies_stored_stats() -> None:
    normalisation = Normalisation(mean=(1.0, 2.0, 0.0, 0.5), std=(2.0, 4.0, 1.0, 0.25))
    window = np.array([[[3.0, 6.0, 5.0, 0.75], [1.0, 2.0, 7.0, 0.5]]])

    prepared = prepare_windows(window, normalisation)

    # Volume is taken relative to its window mean (6.0) before scaling.
    np.testing.assert_allclose(prepared[0], [[1.0, 1.0, -1.0, 1.0], [0.0, 0.0, 1.0, 0.0]])


def test_volume_feature_ignores_the_symbols_volume_scale() -> None:
    rng = np.random.default_rng(1)
    windows = rng.normal(size=(10, 30, 4))
    shifted = windows.copy()
    shifted[..., 2] += 5.0  # log1p(volume) of a symbol trading ~150x more units
    normalisation = Normalisation.fit(windows)

    np.testing.assert_allclose(
        prepare_windows(shifted, normalisation), prepare_windows(windows, normalisation), atol=1e-5
    )


def test_constant_feature_is_not_divided_by_zero() -> None:
    windows = np.ones((4, 3, 4))

    normalisation = Normalisation.fit(windows)

    assert all(s > 0 for s in normalisation.std)
    assert np.isfinite(prepare_windows(windows, normalisation)).all()
