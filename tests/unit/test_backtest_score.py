"""Backtest scoring: strategy invariants with known answers, forecast metrics next to the
trainer's baselines on the same targets, warm-up handling, determinism and clear errors."""

import math

import msgspec
import numpy as np
import pytest

from kit.builders import make_candles, make_predictions, random_closes
from makeusrich.backtest.score import (
    BacktestResult,
    Costs,
    backtest_rows,
    score_backtest,
)
from makeusrich.core.errors import ConfigError
from makeusrich.core.schemas import Candle, Prediction
from makeusrich.inference import NaiveForecaster, candles_to_array
from makeusrich.inference.conformal import DEFAULT_STEP
from makeusrich.trainer.data import CandleSeries
from makeusrich.trainer.evaluate import MODEL, evaluate, resolve_forecaster

FREE = Costs(fee_bp=0.0, slippage_bp=0.0)
# Candles up to and including the forecast candle that every baseline needs (window 30 + 1):
# the first scored forecast is made at candle index 30.
FIRST = 30


def _up(candles: list[Candle], model_version: str = "test-model") -> list[Prediction]:
    """Predictions always 1% above the last close: an always-long strategy."""
    predicted = [c.close * 1.01 for c in candles]
    return make_predictions(candles, predicted, model_version=model_version)


# --- strategy invariants ----------------------------------------------------------------


def test_always_long_without_costs_is_buy_and_hold() -> None:
    closes = random_closes(80, seed=3)
    candles = make_candles(closes)

    result = score_backtest(candles, {"up": _up(candles)}, FREE)

    series = result.models["up"].series[0]
    assert series.strategy == series.buy_and_hold
    # Buy-and-hold without costs: from the first forecast candle's close to the last target.
    assert series.buy_and_hold.total_return == pytest.approx(closes[-1] / closes[FIRST] - 1)
    assert series.strategy.exposure == 1.0
    assert series.strategy.position_changes == 1
    rows = backtest_rows(result, candles, {"up": _up(candles)})
    assert [r.equity for r in rows] == [r.buy_hold_equity for r in rows]
    assert rows[-1].equity == pytest.approx(closes[-1] / closes[FIRST])


def test_buy_and_hold_pays_the_entry_cost_once() -> None:
    closes = random_closes(60, seed=4)
    candles = make_candles(closes)

    result = score_backtest(candles, {"up": _up(candles)}, Costs(fee_bp=10.0, slippage_bp=2.0))

    series = result.models["up"].series[0]
    first_return = closes[FIRST + 1] / closes[FIRST] - 1 - 0.0012
    expected = (1 + first_return) * closes[-1] / closes[FIRST + 1] - 1
    assert series.buy_and_hold.total_return == pytest.approx(expected, rel=1e-12)
    # Always long pays exactly what buy-and-hold pays: one entry.
    assert series.strategy == series.buy_and_hold


def test_costs_on_a_constant_price_are_turnover_times_cost() -> None:
    candles = make_candles([100.0] * 40)
    # Calls of the scored forecasts (made at candles 30..38; candle 39 has no target).
    calls = [1, 1, -1, 0, 0, 1, -1, 1, 1]
    predicted = [100.0] * FIRST + [100.0 + c for c in calls] + [100.0]
    predictions = {"m": make_predictions(candles, predicted)}
    cost = (10.0 + 2.0) / 1e4

    result = score_backtest(candles, predictions, Costs(fee_bp=10.0, slippage_bp=2.0))

    series = result.models["m"].series[0]
    units = [1, 0, 2, 1, 0, 1, 2, 2, 0]  # |position change| per candle, from flat
    strategy = series.strategy
    assert strategy.turnover == sum(units) == 9
    assert strategy.position_changes == 6
    assert strategy.exposure == pytest.approx(7 / 9)
    rows = backtest_rows(result, candles, predictions)
    assert [r.position for r in rows] == [float(c) for c in calls]
    assert [r.strategy_return for r in rows] == pytest.approx([-u * cost for u in units])
    assert sum(r.strategy_return for r in rows) == pytest.approx(-strategy.turnover * cost)
    assert strategy.total_return == pytest.approx(math.prod(1 - u * cost for u in units) - 1)
    assert series.buy_and_hold.total_return == pytest.approx(-cost)
    assert series.buy_and_hold.max_drawdown == pytest.approx(cost)


def test_long_only_stays_flat_instead_of_short() -> None:
    candles = make_candles([100.0] * 40)
    calls = [1, 1, -1, 0, 0, 1, -1, 1, 1]
    predicted = [100.0] * FIRST + [100.0 + c for c in calls] + [100.0]
    predictions = {"m": make_predictions(candles, predicted)}

    result = score_backtest(candles, predictions, Costs(), long_only=True)

    assert result.long_only
    strategy = result.models["m"].series[0].strategy
    rows = backtest_rows(result, candles, predictions)
    assert [r.position for r in rows] == [1.0, 1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 1.0, 1.0]
    assert strategy.turnover == strategy.position_changes == 5
    assert strategy.exposure == pytest.approx(5 / 9)


def test_max_drawdown_is_zero_while_equity_only_rises() -> None:
    rng = np.random.default_rng(5)
    closes = list(100.0 * np.cumprod(1.0 + rng.uniform(0.0001, 0.002, 60)))
    candles = make_candles(closes)

    series = score_backtest(candles, {"up": _up(candles)}, FREE).models["up"].series[0]

    assert series.strategy.max_drawdown == 0.0
    assert series.strategy.total_return > 0
    assert series.strategy.sharpe is not None and series.strategy.sharpe > 0


def test_max_drawdown_is_the_largest_fall_from_a_peak() -> None:
    candles = make_candles([100.0] * (FIRST + 1) + [110.0, 120.0, 100.0, 90.0, 110.0])

    series = score_backtest(candles, {"up": _up(candles)}, FREE).models["up"].series[0]

    assert series.strategy.max_drawdown == pytest.approx(1 - 90 / 120)
    assert series.strategy.total_return == pytest.approx(0.1)


def test_sharpe_is_none_without_variation_and_annualised_by_interval() -> None:
    flat = make_candles([100.0] * 40)
    series = score_backtest(flat, {"m": make_predictions(flat, [100.0] * 40)}, Costs())
    strategy = series.models["m"].series[0].strategy
    assert strategy.sharpe is None  # never in the market: every return is 0
    assert strategy.exposure == 0.0 and strategy.total_return == 0.0

    closes = random_closes(70, seed=6)
    sharpe = {}
    for interval in ("1m", "1h"):
        candles = make_candles(closes, interval=interval)
        result = score_backtest(candles, {"up": _up(candles)}, Costs())
        rows = backtest_rows(result, candles, {"up": _up(candles)})
        returns = np.array([r.strategy_return for r in rows])
        value = result.models["up"].series[0].strategy.sharpe
        assert value is not None
        candles_per_year = 365 * 24 * (60 if interval == "1m" else 1)
        expected = returns.mean() / returns.std(ddof=1) * math.sqrt(candles_per_year)
        assert value == pytest.approx(expected)
        sharpe[interval] = value
    assert sharpe["1m"] / sharpe["1h"] == pytest.approx(math.sqrt(60))


# --- forecast metrics -------------------------------------------------------------------


def test_coverage_counts_closes_inside_the_band() -> None:
    closes = random_closes(50, seed=7)
    candles = make_candles(closes)
    # A perfect forecast of each next close, its band around it or wholly above it; the
    # bounds count as inside. The last candle has no target: its band is never scored.
    inside = [i % 3 != 0 for i in range(len(closes))]
    bands = [
        ((nxt, nxt + 1.0) if ok else (nxt + 1.0, nxt + 2.0))
        for nxt, ok in zip([*closes[1:], closes[-1]], inside, strict=True)
    ]
    perfect = [*closes[1:], closes[-1]]
    predictions = {"m": make_predictions(candles, perfect, band=bands)}

    result = score_backtest(candles, predictions, Costs())

    scored = range(FIRST, len(closes) - 1)
    metrics = result.models["m"].series[0].metrics[MODEL]
    assert metrics.coverage_80 == pytest.approx(sum(inside[i] for i in scored) / len(scored))
    assert metrics.mae == 0.0
    assert metrics.skill == 1.0
    assert metrics.directional_accuracy == 1.0
    width = np.mean([(bands[i][1] - bands[i][0]) / closes[i] * 1e4 for i in scored])
    assert metrics.interval_width_bp == pytest.approx(width)
    # Always on the right side of the move.
    rows = backtest_rows(result, candles, predictions)
    assert [r.position for r in rows] == [np.sign(r.actual_close - r.last_close) for r in rows]


def test_warmup_predictions_are_not_scored() -> None:
    closes = random_closes(90, seed=8)
    candles = make_candles(closes)
    # Wild warm-up forecasts: any of them scored would blow the model's MAE up.
    predicted = [c * 2.0 if i < 40 else c for i, c in enumerate(closes)]
    predictions = make_predictions(candles, predicted, warmup=40)

    result = score_backtest(candles, {"lstm": predictions}, Costs())

    model = result.models["lstm"]
    assert model.warmup == model.series[0].warmup == 40
    assert model.forecasts == 90 - 40 - 1
    assert model.unscored == 1  # the last prediction's target is past the span
    assert model.model_versions == ["test-model"]
    # Predicting the last close is persistence: same MAE, no skill.
    assert model.metrics[MODEL].mae == pytest.approx(model.metrics["persistence"].mae)
    assert model.metrics[MODEL].skill == pytest.approx(0.0)
    rows = backtest_rows(result, candles, {"lstm": predictions})
    assert rows[0].candle_open_time == candles[40].open_time
    assert {r.model_version for r in rows} == {"test-model"}

    # The naive model's own predictions are all "naive": none of them is warm-up.
    naive = score_backtest(candles, {"naive": predictions}, Costs()).models["naive"]
    assert naive.warmup == 0
    assert naive.forecasts == 90 - FIRST - 1
    assert naive.unscored == FIRST + 1


def test_baselines_are_scored_on_the_model_targets() -> None:
    closes = random_closes(70, seed=9)
    candles = make_candles(closes)
    predictions = {"m": _up(candles)}

    result = score_backtest(candles, predictions, Costs())

    series = result.models["m"].series[0]
    rows = backtest_rows(result, candles, predictions)
    # Forecasts made before 30 candles of history cannot be answered by the baselines.
    assert series.forecasts == len(rows) == 70 - FIRST - 1
    assert series.unscored == FIRST + 1
    assert series.first_target_open_time == candles[FIRST + 1].open_time
    assert series.last_target_open_time == candles[-1].open_time
    assert set(series.metrics) == {MODEL, "persistence", "ewma_vol", "drift", "ema", "garch"}
    persistence_mae = np.mean([abs(r.actual_close - r.last_close) for r in rows])
    assert series.metrics["persistence"].mae == pytest.approx(persistence_mae)
    assert series.metrics[MODEL].mae == pytest.approx(np.mean([abs(r.error) for r in rows]))


def _candle_series(candles: list[Candle]) -> CandleSeries:
    ohlcv = candles_to_array(candles)
    open_time = np.array([c.open_time for c in candles], dtype=np.int64)
    return CandleSeries(candles[0].symbol, candles[0].interval, open_time, ohlcv, filled=0)


def test_matches_the_trainers_evaluation_of_the_naive_model() -> None:
    candles = make_candles(random_closes(120, seed=10))
    naive = NaiveForecaster()
    forecasts = [naive.predict(candles[: i + 1][-31:]) for i in range(len(candles))]
    predictions = make_predictions(
        candles,
        [f.predicted_close for f in forecasts if f is not None],
        band=[(f.lower, f.upper) for f in forecasts if f is not None],
        model_version="naive",
    )

    # The backtest takes predictions as served; these are the naive forecaster's own, so
    # the model matches evaluate's only without adaptive conformal. Baselines match with it.
    for step in (0.0, DEFAULT_STEP):
        ours = score_backtest(candles, {"naive": predictions}, Costs(),
                              adaptive_step=step).models["naive"]
        theirs = evaluate(resolve_forecaster("naive"), _candle_series(candles),
                          adaptive_step=step).overall

        assert ours.forecasts == theirs.forecasts
        assert ours.first_target_open_time == theirs.first_target_open_time
        assert ours.last_target_open_time == theirs.last_target_open_time
        assert list(ours.metrics) == list(theirs.metrics)
        for name, metrics in theirs.metrics.items():
            if name == MODEL and step:
                continue
            ours_dict = msgspec.structs.asdict(ours.metrics[name])
            for field, value in msgspec.structs.asdict(metrics).items():
                assert ours_dict[field] == pytest.approx(value, rel=1e-9), (step, name, field)


def test_series_are_scored_apart_and_pooled() -> None:
    btc = make_candles(random_closes(60, seed=11), symbol="BTCUSDT")
    eth = make_candles(random_closes(50, seed=12, start=3000.0), symbol="ETHUSDT")
    predictions = {"m": _up(eth) + _up(btc)}

    model = score_backtest(btc + eth, predictions, Costs()).models["m"]

    assert [(s.symbol, s.forecasts) for s in model.series] == [
        ("BTCUSDT", 60 - FIRST - 1),
        ("ETHUSDT", 50 - FIRST - 1),
    ]
    assert model.forecasts == sum(s.forecasts for s in model.series)
    assert model.mean_total_return == pytest.approx(
        np.mean([s.strategy.total_return for s in model.series])
    )
    assert model.mean_buy_and_hold_return == pytest.approx(
        np.mean([s.buy_and_hold.total_return for s in model.series])
    )
    pooled_mae = sum(s.metrics[MODEL].mae * s.forecasts for s in model.series) / model.forecasts
    assert model.metrics[MODEL].mae == pytest.approx(pooled_mae)


def test_redelivered_candles_and_predictions_count_once() -> None:
    candles = make_candles(random_closes(60, seed=13))
    predictions = _up(candles)

    once = score_backtest(candles, {"m": predictions}, Costs())
    twice = score_backtest(candles + candles[::-1], {"m": predictions * 2}, Costs())

    assert msgspec.json.encode(twice) == msgspec.json.encode(once)


# --- result -----------------------------------------------------------------------------


def test_same_inputs_give_the_same_json() -> None:
    candles = make_candles(random_closes(80, seed=14))
    predictions = {
        "up": _up(candles, model_version="v-up"),
        "naive": make_predictions(candles, [c.close for c in candles], model_version="naive"),
    }

    first = msgspec.json.encode(score_backtest(candles, predictions, Costs()))
    second = msgspec.json.encode(score_backtest(candles, predictions, Costs()))

    assert first == second
    decoded = msgspec.json.decode(first, type=BacktestResult)
    assert decoded == score_backtest(candles, predictions, Costs())
    assert list(decoded.models) == ["up", "naive"]  # the order asked for
    assert decoded.first_target_open_time == candles[FIRST + 1].open_time
    assert decoded.last_target_open_time == candles[-1].open_time
    assert b"equity" not in first  # the per-candle table stays out of the metrics


def test_rows_hold_each_scored_forecast() -> None:
    candles = make_candles(random_closes(50, seed=15))
    predictions = {"m": _up(candles, model_version="v1")}
    result = score_backtest(candles, predictions, Costs())

    rows = backtest_rows(result, candles, predictions)

    assert len(rows) == result.models["m"].forecasts
    pairs = zip(candles[FIRST:-1], candles[FIRST + 1 :], strict=True)
    for row, (forecast_candle, target) in zip(rows, pairs, strict=True):
        assert (row.model, row.model_version, row.symbol, row.interval) == (
            "m",
            "v1",
            "BTCUSDT",
            "1m",
        )
        assert row.candle_open_time == forecast_candle.open_time
        assert row.target_open_time == target.open_time
        assert row.last_close == forecast_candle.close
        assert row.actual_close == target.close
        assert row.error == pytest.approx(row.predicted_close - row.actual_close)
        assert row.lower < row.predicted_close < row.upper
    assert rows[-1].equity == pytest.approx(1 + result.models["m"].series[0].strategy.total_return)


# --- errors -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("fee_bp", "slippage_bp", "name"),
    [(-1.0, 2.0, "fee_bp"), (10.0, math.nan, "slippage_bp"), (math.inf, 0.0, "fee_bp")],
)
def test_bad_costs_are_refused(fee_bp: float, slippage_bp: float, name: str) -> None:
    with pytest.raises(ConfigError, match=name):
        Costs(fee_bp=fee_bp, slippage_bp=slippage_bp)


def test_nothing_to_score_is_an_error() -> None:
    candles = make_candles(random_closes(60, seed=16))
    predictions = _up(candles)

    with pytest.raises(ConfigError, match="no candles"):
        score_backtest([], {"m": predictions}, Costs())
    with pytest.raises(ConfigError, match="no model"):
        score_backtest(candles, {}, Costs())
    with pytest.raises(ConfigError, match="nothing to score for model 'm': 0 predictions"):
        score_backtest(candles, {"m": []}, Costs())
    # Another symbol's candles.
    eth = make_candles(random_closes(60, seed=16), symbol="ETHUSDT")
    with pytest.raises(ConfigError, match="nothing to score for model 'm': 60 predictions"):
        score_backtest(eth, {"m": predictions}, Costs())
    # Only warm-up predictions.
    with pytest.raises(ConfigError, match="60 of them naive warm-up"):
        score_backtest(candles, {"m": make_predictions(candles, [1.0] * 60, warmup=60)}, Costs())
    # A span too short for the baselines' history.
    with pytest.raises(ConfigError, match="30 candles before it"):
        score_backtest(candles[:FIRST], {"m": predictions}, Costs())


def test_predictions_from_other_candles_are_refused() -> None:
    candles = make_candles(random_closes(60, seed=17))
    other = make_candles(random_closes(60, seed=18))

    with pytest.raises(ConfigError, match="not made from these candles"):
        score_backtest(candles, {"m": _up(other)}, Costs())


def test_rows_need_the_models_of_the_result() -> None:
    candles = make_candles(random_closes(60, seed=19))
    result = score_backtest(candles, {"m": _up(candles)}, Costs())

    with pytest.raises(ConfigError, match="backtest result for"):
        backtest_rows(result, candles, {"other": _up(candles)})
    with pytest.raises(ConfigError, match="not its inputs"):
        backtest_rows(result, candles, {"m": _up(candles)[:-5]})
