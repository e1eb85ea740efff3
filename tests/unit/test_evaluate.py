"""Honest evaluation: leak-free splits, baseline formulas and metrics with known answers."""

import itertools
import json
import math
from collections.abc import Sequence
from pathlib import Path

import msgspec
import numpy as np
import pytest
from numpy.typing import NDArray

from kit.registry import tiny_version
from makeusrich.core.errors import ModelError, TrainingError
from makeusrich.core.schemas import Candle
from makeusrich.inference import (
    FEATURES,
    Z80,
    Forecast,
    NaiveForecaster,
    Normalisation,
    bundled_models_dir,
    compute_features,
    interval_score,
    load_forecaster,
    pinball,
    read_manifest,
)
from makeusrich.trainer.data import CandleSeries
from makeusrich.trainer.evaluate import (
    MODEL,
    DriftForecaster,
    EmaForecaster,
    EwmaVolatilityForecaster,
    GarchBaseline,
    Metrics,
    Report,
    Scores,
    baseline_forecasters,
    evaluate,
    evaluate_paths,
    feature_windows,
    fit_train_normalisation,
    forecast_metrics,
    judge,
    resolve_forecaster,
    walk_forward_splits,
)

DAY = Path(__file__).parent.parent / "data" / "BTCUSDT-1m-2025-11-20.csv"
T0 = 1_800_000_000_000  # an open time (ms) well after the bundled model's training data
MINUTE = 60_000


def _series(
    closes: Sequence[float], *, symbol: str = "TESTUSDT", interval: str = "1m", t0: int = T0
) -> CandleSeries:
    """Candles with the given closes; open = previous close, a 0.1% high-low range, 10 units
    in 7 trades at the close, no large trade."""
    close = np.asarray(closes, dtype=np.float64)
    ohlcv = np.column_stack(
        (
            np.concatenate(([close[0]], close[:-1])),
            close * 1.0005,
            close * 0.9995,
            close,
            np.full(len(close), 10.0),
            np.full(len(close), 5.0),
            close * 10.0,
            np.full(len(close), 7.0),
            np.zeros(len(close)),
        )
    )
    step = {"1m": MINUTE, "5m": 5 * MINUTE}[interval]
    open_time = t0 + np.arange(len(close), dtype=np.int64) * step
    return CandleSeries(symbol, interval, open_time, ohlcv, filled=0)


def _candles(closes: Sequence[float]) -> list[Candle]:
    return [
        Candle(
            symbol="TESTUSDT",
            interval="1m",
            open_time=T0 + i * MINUTE,
            close_time=T0 + (i + 1) * MINUTE - 1,
            open=c,
            high=c,
            low=c,
            close=c,
            volume=1.0,
            quote_volume=c,
            trades=1,
            taker_buy_volume=0.5,
            taker_buy_quote_volume=c / 2,
            source="sim",
            ts_event=T0 + (i + 1) * MINUTE - 1,
            ts_ingest=T0 + (i + 1) * MINUTE - 1,
        )
        for i, c in enumerate(closes)
    ]


class _Scripted:
    """A test forecaster: median = ``move(last close, next close)``, a fixed relative band.

    It is handed the true next closes by open time, which is how a perfect forecaster is
    built; the evaluation itself never shows a forecaster the future.
    """

    version = "scripted"
    interval: str | None = None
    horizons = (1,)

    def __init__(
        self,
        series: CandleSeries,
        move: str,
        *,
        band: float = 0.0,
        window: int = 2,
        skip: frozenset[int] = frozenset(),
    ) -> None:
        self.window = window
        self._next = dict(
            zip(series.open_time[:-1].tolist(), series.ohlcv[1:, 3].tolist(), strict=True)
        )
        self._move, self._band, self._skip = move, band, skip

    def _one(self, candles: Sequence[Candle]) -> Forecast | None:
        last = candles[-1]
        if len(candles) < self.window + 1 or last.open_time in self._skip:
            return None
        predicted = {
            "oracle": self._next[last.open_time],
            "half_up": last.close + 0.5,
            "down": last.close - 1.0,
            "up": last.close * 1.01,
        }[self._move]
        width = self._band * last.close
        return Forecast(predicted_close=predicted, lower=predicted - width, upper=predicted + width)

    def predict(self, candles: Sequence[Candle], horizon: int = 1) -> Forecast | None:
        return self._one(candles)

    def predict_batch(
        self, histories: Sequence[Sequence[Candle]], horizon: int = 1
    ) -> list[Forecast | None]:
        return [self._one(h) for h in histories]

    def predict_horizons(self, candles: Sequence[Candle]) -> list[Forecast] | None:
        forecast = self._one(candles)
        return None if forecast is None else [forecast]


# --- walk-forward splits ----------------------------------------------------------------


def test_walk_forward_splits_never_leak() -> None:
    checked = 0
    for n in range(1, 60, 3):
        for folds in range(1, 6):
            for test_size in range(1, 8):
                for min_train in (1, 2, 5, 13):
                    if n - folds * test_size < min_train:
                        with pytest.raises(TrainingError, match="too few"):
                            walk_forward_splits(
                                n, folds=folds, test_size=test_size, min_train=min_train
                            )
                        continue
                    splits = walk_forward_splits(
                        n, folds=folds, test_size=test_size, min_train=min_train
                    )
                    checked += 1
                    assert len(splits) == folds
                    assert splits[-1].test.stop == n  # the test spans end at the last sample
                    for split in splits:
                        assert len(split.test) == test_size
                        assert len(split.train) >= min_train
                        assert max(split.train) < min(split.test)
                        # Expanding window: everything before the test span, nothing else.
                        assert split.train == range(split.test.start)
                    for earlier, later in itertools.pairwise(splits):
                        assert earlier.test.stop == later.test.start  # consecutive, disjoint
                        assert not set(earlier.test) & set(later.test)
    assert checked > 500


def test_walk_forward_rejects_nonsense_arguments() -> None:
    with pytest.raises(ValueError, match="at least 1"):
        walk_forward_splits(100, folds=0, test_size=5, min_train=10)


def test_normalisation_is_fitted_on_the_training_span_only() -> None:
    rng = np.random.default_rng(3)
    closes = 100 * np.exp(np.cumsum(rng.normal(0, 1e-3, 400)))
    windows = feature_windows(_series(closes).ohlcv, 10)
    split = walk_forward_splits(len(windows), folds=1, test_size=100, min_train=50)[0]

    # The test span's regime shifts: ten times the volatility.
    shifted = closes.copy()
    test_candles = slice(split.test.start + 10, None)  # candles behind the test windows
    shifted[test_candles] = shifted[test_candles.start - 1] * np.exp(
        np.cumsum(rng.normal(0, 1e-2, len(shifted) - test_candles.start))
    )
    shifted_windows = feature_windows(_series(shifted).ohlcv, 10)

    train_only = fit_train_normalisation(windows, split)
    assert train_only == Normalisation.fit(windows[: split.test.start])
    assert fit_train_normalisation(shifted_windows, split) == train_only
    assert Normalisation.fit(shifted_windows) != Normalisation.fit(windows)
    assert Normalisation.fit(shifted_windows).std[0] > 2 * train_only.std[0]


def test_feature_windows_are_the_trainers_samples() -> None:
    series = _series(np.linspace(100, 110, 50))
    windows = feature_windows(series.ohlcv, 10)

    # 49 feature rows give 39 windows of 10 that have a next return to predict.
    features = compute_features(series.ohlcv)
    assert windows.shape == (39, 10, len(FEATURES))
    assert np.array_equal(windows[0], features[:10])
    assert np.array_equal(windows[-1], features[-11:-1])
    assert feature_windows(series.ohlcv[:5], 10).shape == (0, 10, len(FEATURES))


# --- baselines --------------------------------------------------------------------------


def test_drift_extrapolates_the_mean_log_return() -> None:
    forecast = DriftForecaster(window=3).predict(_candles([100.0, 110.0, 121.0]))
    assert forecast is not None
    assert forecast.predicted_close == pytest.approx(133.1, rel=1e-12)
    assert forecast.lower == pytest.approx(133.1) and forecast.upper == pytest.approx(133.1)

    closes = [50.0, 100.0, 102.0, 101.0, 104.0]  # the first close is outside the window
    returns = np.diff(np.log(closes[1:]))
    forecast = DriftForecaster(window=3).predict(_candles(closes))
    assert forecast is not None
    expected = 104.0 * math.exp(returns.mean())
    assert forecast.predicted_close == pytest.approx(expected, rel=1e-12)
    assert forecast.upper == pytest.approx(expected * math.exp(Z80 * returns.std()), rel=1e-12)
    assert forecast.lower == pytest.approx(expected * math.exp(-Z80 * returns.std()), rel=1e-12)


def test_ema_is_a_normalised_exponential_average_of_the_window() -> None:
    closes = [999.0, 100.0, 106.0, 103.0]
    alpha = 2 / 3  # window 2
    weights = np.array([(1 - alpha) ** 2, 1 - alpha, 1.0])
    expected = float(np.dot(weights, closes[1:]) / weights.sum())
    sigma = np.diff(np.log(closes[1:])).std()

    forecast = EmaForecaster(window=2).predict(_candles(closes))

    assert forecast is not None
    assert forecast.predicted_close == pytest.approx(expected, rel=1e-12)
    assert forecast.upper == pytest.approx(expected * math.exp(Z80 * sigma), rel=1e-12)


def test_ewma_volatility_band_weighs_recent_moves_more() -> None:
    closes = [999.0, 100.0, 101.0, 99.0, 99.5]
    returns = np.diff(np.log(closes[1:]))
    decay = 0.9
    weights = decay ** np.array([2.0, 1.0, 0.0])
    sigma = math.sqrt(float(np.dot(weights, returns**2) / weights.sum()))

    forecast = EwmaVolatilityForecaster(window=3, decay=decay).predict(_candles(closes))

    assert forecast is not None
    assert forecast.predicted_close == 99.5  # no move
    assert forecast.upper == pytest.approx(99.5 * math.exp(Z80 * sigma), rel=1e-12)
    assert forecast.lower == pytest.approx(99.5 * math.exp(-Z80 * sigma), rel=1e-12)
    # The same moves, the big one last: a wider band than with it first.
    calm_then_big = EwmaVolatilityForecaster(window=3).predict(_candles([100.0, 100.1, 100.0,
                                                                           102.0]))
    big_then_calm = EwmaVolatilityForecaster(window=3).predict(_candles([100.0, 102.0, 102.1,
                                                                           102.0]))
    assert calm_then_big is not None and big_then_calm is not None
    assert (calm_then_big.upper / calm_then_big.predicted_close
            > big_then_calm.upper / big_then_calm.predicted_close)


def _garch_closes(n: int, seed: int, calm_until: int | None = None) -> NDArray[np.float64]:
    """Closes whose log returns follow a GARCH(1,1) (omega 0.2, alpha 0.1, beta 0.85, in
    bp); from ``calm_until`` on, four times as volatile."""
    rng = np.random.default_rng(seed)
    returns, variance = np.empty(n), 4.0
    for i in range(n):
        returns[i] = rng.normal(0.0, np.sqrt(variance))
        variance = 0.2 + 0.1 * returns[i] ** 2 + 0.85 * variance
    if calm_until is not None:
        returns[calm_until:] *= 4
    return np.asarray(100.0 * np.exp(np.concatenate([[0.0], np.cumsum(returns / 1e4)])))


def test_garch_forecasts_from_the_past_only_and_refits_in_blocks() -> None:
    closes = _garch_closes(3_000, seed=1)
    at = np.arange(30, len(closes) - 1)
    garch = GarchBaseline(refit_every=1_000, fit_window=2_000, min_fit=500)

    quantiles = garch.log_quantiles(closes, at)

    # The first block (forecasts at candles 30..1029) has fewer than 500 returns behind it.
    assert np.isnan(quantiles[:1000]).all() and not np.isnan(quantiles[1000:]).any()
    assert (quantiles[1000:, 0] == -quantiles[1000:, 2]).all() and (quantiles[1000:, 1] == 0).all()
    # Changing what comes after a candle changes nothing forecast at or before it.
    changed = closes.copy()
    changed[1_800:] *= np.exp(np.linspace(0.0, 0.05, len(closes) - 1_800))
    again = garch.log_quantiles(changed, at)
    assert np.array_equal(again[: 1_800 - 30], quantiles[: 1_800 - 30], equal_nan=True)
    assert not np.array_equal(again[1_800 - 30 :], quantiles[1_800 - 30 :], equal_nan=True)


def test_garch_band_widens_when_volatility_jumps() -> None:
    closes = _garch_closes(4_000, seed=2, calm_until=3_000)
    at = np.arange(2_000, 3_300)
    upper = GarchBaseline(refit_every=2_000, fit_window=2_000).log_quantiles(closes, at)[:, 2]
    before, after = upper[:1000].mean(), upper[-100:].mean()  # the same fitted parameters
    assert after > 2.5 * before


def test_baselines_batch_mixed_lengths_like_single_predictions() -> None:
    closes = [100.0 + math.sin(i) for i in range(40)]
    histories = [_candles(closes[:n]) for n in (40, 0, 2, 3, 12, 31, 5)]
    for name, baseline in baseline_forecasters(window=10).items():
        batch = baseline.predict_batch(histories)
        assert batch == [baseline.predict(h) for h in histories], name
        assert batch[3] is not None
        if name != "persistence":  # the naive forecaster answers from one candle on
            assert batch[1] is None and batch[2] is None


def test_persistence_is_the_naive_forecaster() -> None:
    closes = [100.0 * math.exp(0.001 * math.cos(i)) for i in range(50)]
    histories = [_candles(closes[:n]) for n in (1, 2, 3, 20, 50)]
    persistence = baseline_forecasters()["persistence"]

    assert isinstance(persistence, NaiveForecaster)
    assert persistence.version == "naive"
    for got, want in zip(
        persistence.predict_batch(histories),
        NaiveForecaster().predict_batch(histories),
        strict=True,
    ):
        assert got is not None and want is not None
        assert got.predicted_close == want.predicted_close
        assert got.lower == pytest.approx(want.lower, rel=1e-14)
        assert got.upper == pytest.approx(want.upper, rel=1e-14)


# --- metrics ----------------------------------------------------------------------------


def test_perfect_forecaster_scores_zero_error_and_full_skill() -> None:
    rng = np.random.default_rng(1)
    series = _series(100 * np.exp(np.cumsum(rng.normal(0, 1e-3, 200))))

    report = evaluate(_Scripted(series, "oracle"), series, adaptive_step=0)

    m = report.overall.metrics[MODEL]
    assert (m.mae, m.rmse, m.skill) == (0.0, 0.0, 1.0)
    assert m.directional_accuracy == 1.0
    assert m.coverage_80 == 1.0  # a zero-width band around the exact close still holds it
    assert m.interval_width_bp == 0.0
    persistence = report.overall.metrics["persistence"]
    assert persistence.skill == 0.0
    assert persistence.directional_accuracy == 0.5  # "no move" counts half
    assert persistence.mae == pytest.approx(np.mean(np.abs(np.diff(series.ohlcv[30:, 3]))))


def test_metrics_on_a_steady_climb() -> None:
    series = _series(np.arange(100.0, 160.0))  # every close 1 above the last
    half = evaluate(_Scripted(series, "half_up"), series).overall
    down = evaluate(_Scripted(series, "down"), series).overall

    # Histories of 31 candles (the baselines' window) leave 60 - 31 targets.
    assert half.forecasts == down.forecasts == 29
    assert half.first_target_open_time == T0 + 31 * MINUTE
    assert half.last_target_open_time == T0 + 59 * MINUTE
    assert half.metrics["persistence"].mae == half.metrics["persistence"].rmse == 1.0
    assert half.metrics[MODEL].mae == pytest.approx(0.5)
    assert half.metrics[MODEL].skill == pytest.approx(0.5)
    assert half.metrics[MODEL].directional_accuracy == 1.0
    assert down.metrics[MODEL].mae == pytest.approx(2.0)
    assert down.metrics[MODEL].rmse == pytest.approx(2.0)
    assert down.metrics[MODEL].skill == pytest.approx(-1.0)
    assert down.metrics[MODEL].directional_accuracy == 0.0


def test_directional_accuracy_leaves_out_unmoved_closes() -> None:
    head = [100.0] * 31
    # Moves after the history: up, down, flat, up, flat, down, down, up.
    tail = [101.0, 100.0, 100.0, 102.0, 102.0, 101.0, 99.0, 103.0]
    series = _series(head + tail)

    m = evaluate(_Scripted(series, "up"), series).overall.metrics[MODEL]

    # Always calling "up": 3 hits among the 6 moved closes; the 2 flat ones do not count.
    assert m.directional_accuracy == pytest.approx(3 / 6)
    flat = evaluate(_Scripted(_series([100.0] * 40), "up"), _series([100.0] * 40)).overall
    assert flat.metrics[MODEL].directional_accuracy is None
    assert flat.metrics[MODEL].skill is None  # persistence is exact: skill is undefined


def test_forecast_metrics_pool_the_pinball_and_interval_scores() -> None:
    last = np.array([100.0, 100.0, 200.0])
    actual = np.array([101.0, 97.0, 200.0])
    band = np.array([[99.0, 100.0, 102.0], [98.0, 100.0, 102.0], [200.0, 200.0, 200.0]])
    first, second = pinball(band, last, actual)[:2]
    m = forecast_metrics(band, last, actual, mae_base=1.0, pinball_base_bp=2 * first)
    assert m.pinball_bp == pytest.approx((first + second) / 3)
    assert m.pinball_skill == pytest.approx(1 - (first + second) / 3 / (2 * first))
    assert m.interval_score_bp == pytest.approx(float(interval_score(band, last, actual).mean()))
    assert forecast_metrics(band, last, actual, 1.0, None).pinball_skill is None


def test_persistence_sets_the_pinball_skill_of_every_forecaster() -> None:
    rng = np.random.default_rng(5)
    series = _series(100 * np.exp(np.cumsum(rng.normal(0, 1e-3, 300))))

    metrics = evaluate(_Scripted(series, "oracle"), series, adaptive_step=0).overall.metrics

    assert metrics["persistence"].pinball_skill == 0.0
    assert metrics[MODEL].pinball_bp == 0.0 and metrics[MODEL].pinball_skill == 1.0
    assert metrics[MODEL].interval_score_bp == 0.0
    for name, m in metrics.items():
        assert m.pinball_bp >= 0 and m.interval_score_bp >= m.interval_width_bp, name


def test_huge_interval_covers_everything() -> None:
    rng = np.random.default_rng(2)
    series = _series(100 * np.exp(np.cumsum(rng.normal(0, 1e-2, 120))))

    m = evaluate(_Scripted(series, "up", band=0.5), series,
                 adaptive_step=0).overall.metrics[MODEL]

    assert m.coverage_80 == 1.0
    assert m.interval_width_bp == pytest.approx(1e4)  # 2 x 50% of the last close


def test_drift_is_exact_on_a_constant_growth_rate() -> None:
    series = _series(100 * np.exp(0.001 * np.arange(80)))

    metrics = evaluate(NaiveForecaster(), series).overall.metrics

    assert metrics["drift"].mae < 1e-9
    assert metrics["drift"].skill == pytest.approx(1.0)
    assert metrics["drift"].directional_accuracy == 1.0
    assert metrics["ema"].skill < 0  # an average of past closes lags a climb


def test_every_forecaster_is_scored_on_the_same_candles() -> None:
    series = _series(np.arange(100.0, 160.0))
    skipped = frozenset(series.open_time[[35, 40, 41]].tolist())

    report = evaluate(_Scripted(series, "half_up", skip=skipped), series)

    assert report.overall.forecasts == 29 - 3
    assert report.overall.metrics["persistence"].mae == 1.0


def test_span_selects_target_and_forecast_candles() -> None:
    series = _series(np.arange(100.0, 200.0))
    start, end = T0 + 10 * MINUTE, T0 + 70 * MINUTE

    report = evaluate(NaiveForecaster(), series, start_open_time=start, end_open_time=end)

    # Forecasts are made from candle 30 on (31 candles of history, partly before the span)
    # up to candle 69, whose target is candle 70, the span's last.
    assert report.overall.forecasts == 40
    assert report.overall.first_target_open_time == T0 + 31 * MINUTE
    assert report.overall.last_target_open_time == end
    assert (report.start_open_time, report.end_open_time) == (start, end)
    late = evaluate(NaiveForecaster(), series, start_open_time=T0 + 80 * MINUTE)
    assert late.overall.forecasts == 19  # candles 80..98 forecast 81..99
    with pytest.raises(TrainingError, match="nothing to score"):
        evaluate(NaiveForecaster(), series, start_open_time=T0 + 99 * MINUTE)


def test_symbols_are_scored_apart_and_pooled_overall() -> None:
    cheap = _series(np.arange(10.0, 70.0), symbol="AAAUSDT")
    dear = _series(np.arange(1000.0, 1120.0, 2.0), symbol="BBBUSDT")

    report = evaluate(NaiveForecaster(), [dear, cheap])

    assert [s.symbol for s in report.symbols] == ["AAAUSDT", "BBBUSDT"]
    assert [s.metrics["persistence"].mae for s in report.symbols] == [1.0, 2.0]
    assert report.overall.forecasts == 2 * 29
    assert report.overall.metrics["persistence"].mae == 1.5


def test_model_interval_must_match_the_candles() -> None:
    series = _series(np.arange(100.0, 160.0), interval="5m")
    scripted = _Scripted(series, "up")
    scripted.interval = "1m"

    with pytest.raises(ModelError, match="forecasts 1m candles"):
        evaluate(scripted, series)


def test_overlap_with_training_data_is_reported() -> None:
    # A stand-in with the bundled manifest: the overlap check reads only the manifest.
    manifest = read_manifest(next(p for p in bundled_models_dir().iterdir() if p.is_dir()))
    data = manifest.training_data
    closes = np.arange(100.0, 200.0)

    class WithManifest(_Scripted):
        pass

    WithManifest.manifest = manifest

    def report(t0: int, symbol: str = "BTCUSDT", **span: int) -> Report:
        series = _series(closes, symbol=symbol, t0=t0)
        return evaluate(WithManifest(series, "up"), series, **span)

    # Trained on targets up to the candle before its validation span, which was held out.
    last_trained = data.validation_first_target_open_time - MINUTE
    inside = report(last_trained - 50 * MINUTE)
    assert inside.overlaps_training
    assert inside.training_first_open_time == data.first_open_time
    assert inside.training_last_open_time == last_trained
    assert "WARNING" in inside.render()
    # Same candles, but the span starts at the last trained candle: its target is held out.
    assert not report(last_trained - 50 * MINUTE, start_open_time=last_trained).overlaps_training
    assert not report(last_trained + MINUTE).overlaps_training
    assert not report(data.last_open_time - 50 * MINUTE).overlaps_training  # validation
    assert not report(last_trained - 50 * MINUTE, symbol="ETHUSDT").overlaps_training
    naive = evaluate(NaiveForecaster(), _series(closes, t0=data.last_open_time - 50 * MINUTE))
    assert not naive.overlaps_training
    assert naive.training_last_open_time is None


# --- report and paths -------------------------------------------------------------------


def test_report_serialises_and_renders() -> None:
    series = _series([100.0] * 40)
    report = evaluate(_Scripted(series, "up"), series)

    as_dict = report.to_dict()
    assert as_dict == json.loads(report.to_json())
    assert msgspec.convert(as_dict, Report) == report
    assert as_dict["overall"]["metrics"][MODEL]["skill"] is None
    text = report.render()
    assert "model scripted: 9 forecasts" in text
    assert "n/a" in text
    for name in (MODEL, "persistence", "ewma_vol", "drift", "ema", "garch"):
        assert name in text
    assert "overall" not in text  # one symbol: its table is the overall one


def test_evaluate_paths_resolves_naive_and_champion(tmp_path: Path) -> None:
    naive = evaluate_paths("naive", [DAY], None)
    assert naive.model == "naive"
    assert naive.overall.forecasts == 1440 - 31
    assert naive.overall.metrics[MODEL].skill == 0.0
    assert not naive.overlaps_training

    empty = tmp_path / "registry"
    empty.mkdir()
    assert resolve_forecaster("champion", empty).version == "naive"
    with pytest.raises(ModelError, match="no model 'lstm-nope'"):
        resolve_forecaster("lstm-nope", empty)


# --- the serving rule -------------------------------------------------------------------


def _pinballs(**pinball_bp: float) -> Scores:
    """Scores in which only the pinball losses matter."""
    metrics = {
        name: Metrics(mae=1.0, rmse=1.0, skill=None, directional_accuracy=None,
                      coverage_80=0.8, interval_width_bp=10.0, pinball_bp=value,
                      pinball_skill=None, interval_score_bp=10.0)
        for name, value in pinball_bp.items()
    }
    return Scores(forecasts=10, first_target_open_time=0, last_target_open_time=1,
                  metrics=metrics)


def test_a_model_serves_only_1pc_better_than_the_best_baseline_at_1_and_better_beyond() -> None:
    verdict = judge({1: _pinballs(model=0.98, persistence=1.1, garch=1.0),
                     5: _pinballs(model=2.99, persistence=3.2, garch=3.0)})
    assert verdict.passes
    assert verdict.best_baseline == {1: "garch", 5: "garch"}
    assert verdict.margin[1] == pytest.approx(0.02)

    short_at_1 = judge({1: _pinballs(model=0.995, persistence=1.1, garch=1.0)})
    assert not short_at_1.passes  # 0.5% better: not enough
    assert "horizon 1: +0.50% vs garch" in short_at_1.reason

    worse_beyond = judge({1: _pinballs(model=0.9, garch=1.0),
                          15: _pinballs(model=5.0, ewma_vol=4.9, garch=5.1)})
    assert not worse_beyond.passes
    assert worse_beyond.best_baseline[15] == "ewma_vol"
    assert "horizon 15" in worse_beyond.reason and "horizon 1:" not in worse_beyond.reason
    assert not judge({1: _pinballs(model=0.9, garch=1.0),
                      5: _pinballs(model=3.0, garch=3.0)}).passes  # a tie is not better


def test_a_model_needing_a_feature_the_candles_lack_says_so(tmp_path: Path) -> None:
    model = load_forecaster(tiny_version(tmp_path / "tiny-v1", ["log_return",
                                                                 "large_trade_share"]))
    series = _series([100.0 + i % 3 for i in range(80)])
    series.ohlcv[:, -1] = np.nan  # as from klines: large-trade volume unknown
    with pytest.raises(ModelError, match=r"needs \['large_trade_share'\].*klines"):
        evaluate(model, series)
