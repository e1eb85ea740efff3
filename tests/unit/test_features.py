"""Model features: finite on degenerate candles, known values, normalisation."""

import math

import numpy as np
import pytest

from makeusrich.core.schemas import Candle
from makeusrich.inference import (
    FEATURES,
    Normalisation,
    available_features,
    candles_to_array,
    compute_features,
    feature_problems,
    prepare_windows,
)

#: The four features of the bundled model, the first supported ones.
BASE = ("log_return", "log_range", "log_volume_rel", "taker_buy_ratio")


def _candle(
    close: float,
    *,
    high: float | None = None,
    low: float | None = None,
    volume: float = 1.0,
    taker_buy: float = 0.5,
    quote_volume: float | None = None,
    trades: int | None = None,
    large: float | None = 0.0,
) -> Candle:
    """A candle; quote volume defaults to volume x close, trades to 1 (0 without volume),
    the large-trade quote volume to 0 (None: unknown, as from klines)."""
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
        quote_volume=volume * close if quote_volume is None else quote_volume,
        trades=(1 if volume else 0) if trades is None else trades,
        taker_buy_volume=taker_buy,
        taker_buy_quote_volume=taker_buy * close,
        source="sim",
        ts_event=59_999,
        ts_ingest=60_000,
        large_trade_quote_volume=large,
    )


def test_known_values_on_a_hand_made_series() -> None:
    candles = [
        _candle(100.0),
        _candle(110.0, high=112.0, low=99.0, volume=4.0, taker_buy=3.0),
        _candle(99.0, high=111.0, low=98.0, volume=0.0, taker_buy=0.0),
    ]

    features = compute_features(candles, BASE)

    assert features.shape == (2, len(BASE))
    expected = [
        [math.log(110 / 100), math.log(112 / 99), math.log1p(4.0), 0.75],
        [math.log(99 / 110), math.log(111 / 98), 0.0, 0.5],
    ]
    np.testing.assert_allclose(features, expected, rtol=1e-12)
    # A subset is those columns of every feature, in the supported order.
    np.testing.assert_array_equal(compute_features(candles)[:, : len(BASE)], features)
    assert FEATURES[: len(BASE)] == BASE


def test_trade_stream_features_on_hand_made_candles() -> None:
    candles = [
        _candle(100.0),
        # vwap 101 (404 / 4) above the close of 100; 9 trades; 101 of 404 in large trades.
        _candle(100.0, volume=4.0, quote_volume=404.0, trades=9, large=101.0),
        _candle(50.0, volume=2.0, quote_volume=98.0, trades=0, large=98.0),
        _candle(50.0, volume=0.0, taker_buy=0.0, trades=0, large=0.0),  # gap-filled
    ]

    features = compute_features(candles, ("vwap_close", "log_trades_rel", "large_trade_share"))

    expected = [
        [math.log(101 / 100), math.log1p(9), 0.25],
        [math.log(49 / 50), 0.0, 1.0],
        [0.0, 0.0, 0.0],  # empty: no vwap, no trades, no large ones
    ]
    np.testing.assert_allclose(features, expected, rtol=1e-12)


def test_large_trade_share_is_unknown_without_its_volume_and_stays_in_0_1() -> None:
    candles = [
        _candle(100.0, large=None),
        _candle(100.0, large=None),  # from klines: unknown
        _candle(100.0, volume=1.0, quote_volume=100.0, large=150.0),  # broken: capped at 1
        _candle(100.0, volume=1.0, quote_volume=100.0, large=-5.0),  # broken: floored at 0
    ]

    share = compute_features(candles, ("large_trade_share",))[:, 0]

    assert math.isnan(share[0])
    assert share[1:].tolist() == [1.0, 0.0]
    assert available_features(candles) == tuple(f for f in FEATURES if f != "large_trade_share")
    assert available_features(candles[2:]) == FEATURES


def test_feature_lists_must_be_supported_unique_and_in_order() -> None:
    assert feature_problems(FEATURES) == []
    assert feature_problems(("log_return", "vwap_close")) == []
    assert "unknown features ['rsi']" in feature_problems(("log_return", "rsi"))[0]
    assert "repeat" in feature_problems(("log_return", "log_return"))[0]
    assert "order" in feature_problems(("vwap_close", "log_return"))[0]
    assert feature_problems(()) == ["no features"]
    with pytest.raises(ValueError, match="unknown features"):
        compute_features([_candle(1.0), _candle(2.0)], ("log_return", "rsi"))


def test_array_form_gives_the_same_features_as_candles() -> None:
    candles = [_candle(100.0 + i, high=101.0 + i, low=99.0 + i, volume=i) for i in range(5)]

    np.testing.assert_array_equal(
        compute_features(candles_to_array(candles)), compute_features(candles)
    )


def test_empty_and_broken_candles_stay_finite() -> None:
    flat = [_candle(100.0, volume=0.0, taker_buy=0.0) for _ in range(5)]  # as gap-filled
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
    np.testing.assert_array_equal(flat_features[:, 4:], 0.0)  # no vwap, trades, large ones


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

    normalisation = Normalisation.fit(windows, BASE)
    prepared = prepare_windows(windows, normalisation)

    assert prepared.dtype == np.float32
    assert prepared.shape == windows.shape
    flat = prepared.reshape(-1, 4)
    np.testing.assert_allclose(flat.mean(axis=0), 0.0, atol=1e-6)
    np.testing.assert_allclose(flat.std(axis=0), 1.0, atol=1e-5)


def test_normalisation_applies_stored_stats() -> None:
    normalisation = Normalisation(
        mean=(1.0, 2.0, 0.0, 0.5), std=(2.0, 4.0, 1.0, 0.25), features=BASE
    )
    window = np.array([[[3.0, 6.0, 5.0, 0.75], [1.0, 2.0, 7.0, 0.5]]])

    prepared = prepare_windows(window, normalisation)

    # Volume is taken relative to its window mean (6.0) before scaling.
    np.testing.assert_allclose(prepared[0], [[1.0, 1.0, -1.0, 1.0], [0.0, 0.0, 1.0, 0.0]])


def test_trade_count_is_relative_to_its_window_like_volume() -> None:
    features = ("log_return", "log_trades_rel", "large_trade_share")
    normalisation = Normalisation(mean=(0.0,) * 3, std=(1.0,) * 3, features=features)
    window = np.array([[[0.1, 2.0, 0.5], [0.2, 4.0, 0.25]]])

    prepared = prepare_windows(window, normalisation)

    np.testing.assert_allclose(prepared[0], [[0.1, -1.0, 0.5], [0.2, 1.0, 0.25]], rtol=1e-6)
    with pytest.raises(ValueError, match="2 means and 2 stds for 3 features"):
        Normalisation(mean=(0.0, 0.0), std=(1.0, 1.0), features=features)


def test_volume_feature_ignores_the_symbols_volume_scale() -> None:
    rng = np.random.default_rng(1)
    windows = rng.normal(size=(10, 30, 4))
    shifted = windows.copy()
    shifted[..., 2] += 5.0  # log1p(volume) of a symbol trading ~150x more units
    normalisation = Normalisation.fit(windows, BASE)

    np.testing.assert_allclose(
        prepare_windows(shifted, normalisation), prepare_windows(windows, normalisation), atol=1e-5
    )


def test_constant_feature_is_not_divided_by_zero() -> None:
    windows = np.ones((4, 3, 4))

    normalisation = Normalisation.fit(windows, BASE)

    assert all(s > 0 for s in normalisation.std)
    assert np.isfinite(prepare_windows(windows, normalisation)).all()
