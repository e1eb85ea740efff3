"""Scoring of a backtest: forecasts next to the trainer's baselines, and a directional
strategy next to buy-and-hold, per model and series.

Pure code: candles and predictions in, a :class:`BacktestResult` out, no broker and no
clock, so the same inputs always give the same result. :func:`backtest_rows` gives the
per-candle table behind it (kept out of the result, which goes to ``metrics.json``).

A model's forecasts are scored only where every baseline can answer too (its full window
of history up to the forecast candle), so all forecasters are compared on the same target
candles, as :func:`makeusrich.trainer.evaluate.evaluate` does. The strategy trades those
same candles: at the close of candle t it holds +1 (forecast above the last close), -1
(below; 0 with ``long_only``) or 0 (equal) over candle t + 1, paying
:attr:`Costs.per_change` per unit of position change. Buy-and-hold holds +1 over the same
candles and pays the entry once. Where predictions are missing inside the span, both skip
the same candles.
"""

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import msgspec
import numpy as np
from numpy.typing import NDArray

from makeusrich.core.errors import ConfigError
from makeusrich.core.intervals import interval_ms
from makeusrich.core.schemas import Candle, Prediction
from makeusrich.inference.conformal import DEFAULT_STEP
from makeusrich.inference.features import FloatArray
from makeusrich.trainer.evaluate import (
    MODEL,
    GarchBaseline,
    Metrics,
    baseline_forecasters,
    garch_bands,
    score_forecasters,
    served_bands,
)

__all__ = [
    "NAIVE",
    "BacktestResult",
    "BacktestRow",
    "Costs",
    "ModelBacktest",
    "SeriesBacktest",
    "StrategyMetrics",
    "backtest_rows",
    "score_backtest",
]

#: ``model_version`` of the pipeline's warm-up predictions (persistence baseline).
NAIVE = "naive"

_BP = 1e4
_MS_PER_YEAR = 365 * 86_400_000  # crypto trades every day of the year
_CHUNK = 4096  # histories per predict_batch call; bounds memory on long spans
# A prediction's last_close is the close of the candle it was made at, copied: anything
# beyond rounding noise means candles and predictions come from different runs.
_CLOSE_RTOL = 1e-9
# Per-candle returns this steady (in fractions) have no meaningful Sharpe ratio.
_FLAT_STD = 1e-12


class Costs(msgspec.Struct, frozen=True):
    """Trading costs per unit of position change, in basis points of price."""

    fee_bp: float = 10.0
    slippage_bp: float = 2.0

    def __post_init__(self) -> None:
        for name, value in (("fee_bp", self.fee_bp), ("slippage_bp", self.slippage_bp)):
            if not isinstance(value, int | float) or not math.isfinite(value) or value < 0:
                raise ConfigError(
                    f"backtest cost {name} must be a finite number of basis points >= 0, "
                    f"got {value!r}"
                )

    @property
    def per_change(self) -> float:
        """Cost of one unit of position change, as a fraction of price."""
        return (self.fee_bp + self.slippage_bp) / _BP


class StrategyMetrics(msgspec.Struct, frozen=True, kw_only=True):
    """A strategy over ``candles`` target candles. Returns are fractions after costs.
    ``sharpe``: mean / sample std of the per-candle returns x sqrt(candles per 365-day
    year), None when they do not vary. ``max_drawdown``: the largest fall of equity from
    its running peak (a positive fraction, 0 if it never fell). ``position_changes``:
    candles whose position differs from the one before (the first from flat);
    ``turnover``: units traded (a flip is 2), so costs total ``turnover`` x
    :attr:`Costs.per_change`. ``exposure``: share of candles with a position."""

    candles: int
    total_return: float
    sharpe: float | None
    max_drawdown: float
    position_changes: int
    turnover: float
    exposure: float


class _ForecastScores(msgspec.Struct, frozen=True, kw_only=True):
    """``forecasts`` were scored; ``warmup`` predictions were the pipeline's naive warm-up
    (skipped); ``unscored`` own predictions had no target candle, or too little history for
    the baselines. ``metrics``: the model under :data:`makeusrich.trainer.evaluate.MODEL`
    and each baseline by name, all on the same target candles (open times in UTC epoch ms)."""

    forecasts: int
    warmup: int
    unscored: int
    first_target_open_time: int
    last_target_open_time: int
    metrics: dict[str, Metrics]


class SeriesBacktest(_ForecastScores, frozen=True, kw_only=True):
    """One model on one symbol and interval."""

    symbol: str
    interval: str
    strategy: StrategyMetrics
    buy_and_hold: StrategyMetrics


class ModelBacktest(_ForecastScores, frozen=True, kw_only=True):
    """One model over every series. Counts cover every series; ``metrics`` pools the
    scored forecasts of all series (so higher-priced symbols weigh more in MAE and RMSE);
    ``series`` lists those with at least one scored forecast; ``mean_total_return`` and
    ``mean_buy_and_hold_return`` are plain means over them of each series' total return.
    ``model_versions``: the versions that made the scored forecasts."""

    model_versions: list[str]
    mean_total_return: float
    mean_buy_and_hold_return: float
    series: list[SeriesBacktest]


class BacktestResult(msgspec.Struct, frozen=True, kw_only=True):
    """Every model's backtest, keyed by the label it was asked for (in the order given).
    The span is the first and last scored target candle's open time (UTC epoch ms).
    ``adaptive_step``: the adaptive conformal step the baselines' bands were served with."""

    first_target_open_time: int
    last_target_open_time: int
    costs: Costs
    long_only: bool
    models: dict[str, ModelBacktest]
    adaptive_step: float = DEFAULT_STEP

    def to_json(self) -> str:
        """Indented JSON, as written to ``metrics.json``."""
        return msgspec.json.format(msgspec.json.encode(self).decode(), indent=2)


class BacktestRow(msgspec.Struct, frozen=True, kw_only=True):
    """One scored forecast and the strategy's candle after it. ``error`` = predicted -
    actual close; ``position`` is held over the target candle, ``strategy_return`` is that
    candle's return after costs; equities start at 1 before the first row."""

    model: str
    model_version: str
    symbol: str
    interval: str
    candle_open_time: int
    target_open_time: int
    last_close: float
    predicted_close: float
    lower: float
    upper: float
    actual_close: float
    error: float
    position: float
    strategy_return: float
    equity: float
    buy_hold_equity: float


def score_backtest(
    candles: Sequence[Candle],
    predictions: Mapping[str, Sequence[Prediction]],
    costs: Costs,
    *,
    long_only: bool = False,
    adaptive_step: float = DEFAULT_STEP,
) -> BacktestResult:
    """Score each model's ``predictions`` (by label) against ``candles``; see the module
    docstring. The baselines' bands are scored as the worker would serve them, after
    adaptive conformal with ``adaptive_step`` (the models' predictions already were).
    :class:`ConfigError` when there is nothing to score for a model or the predictions do
    not belong to these candles."""
    scored = _score_all(candles, predictions, costs, long_only, adaptive_step)
    models = {label: _model_backtest(model) for label, model in scored.items()}
    return BacktestResult(
        first_target_open_time=min(m.first_target_open_time for m in models.values()),
        last_target_open_time=max(m.last_target_open_time for m in models.values()),
        costs=costs,
        long_only=long_only,
        models=models,
        adaptive_step=adaptive_step,
    )


def backtest_rows(
    result: BacktestResult,
    candles: Sequence[Candle],
    predictions: Mapping[str, Sequence[Prediction]],
) -> list[BacktestRow]:
    """The per-candle table of ``result`` from the inputs it was scored on: one row per
    scored forecast, by model (in the result's order), symbol, interval and time."""
    if list(predictions) != list(result.models):
        raise ConfigError(
            f"predictions are for models {list(predictions)}, "
            f"the backtest result for {list(result.models)}"
        )
    scored = _score_all(candles, predictions, result.costs, result.long_only,
                        result.adaptive_step)
    for label, model in scored.items():
        count = sum(len(s.target_time) for s in model.series)
        if count != result.models[label].forecasts:
            raise ConfigError(
                f"model {label!r} has {count} scored forecasts in these inputs, "
                f"{result.models[label].forecasts} in the backtest result: not its inputs"
            )
    rows: list[BacktestRow] = []
    for label, model in scored.items():
        for s in model.series:
            candle_time, target_time = s.candle_time.tolist(), s.target_time.tolist()
            last, actual, band = s.last.tolist(), s.actual.tolist(), s.bands[MODEL].tolist()
            position, returns = s.strategy.position.tolist(), s.strategy.returns.tolist()
            equity, hold = s.strategy.equity.tolist(), s.buy_and_hold.equity.tolist()
            for i, version in enumerate(s.versions):
                lower, predicted, upper = band[i]
                rows.append(
                    BacktestRow(
                        model=label,
                        model_version=version,
                        symbol=s.symbol,
                        interval=s.interval,
                        candle_open_time=candle_time[i],
                        target_open_time=target_time[i],
                        last_close=last[i],
                        predicted_close=predicted,
                        lower=lower,
                        upper=upper,
                        actual_close=actual[i],
                        error=predicted - actual[i],
                        position=position[i],
                        strategy_return=returns[i],
                        equity=equity[i],
                        buy_hold_equity=hold[i],
                    )
                )
    return rows


# --- scoring ------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Trades:
    """A strategy's per-candle positions, returns after costs and equity."""

    position: FloatArray
    returns: FloatArray
    equity: FloatArray


@dataclass(frozen=True)
class _Series:
    """One model's scored forecasts on one series, with its strategy and buy-and-hold."""

    symbol: str
    interval: str
    warmup: int
    unscored: int
    versions: list[str]
    candle_time: NDArray[np.int64]
    target_time: NDArray[np.int64]
    last: FloatArray
    actual: FloatArray
    bands: dict[str, FloatArray]  # (forecasts, 3): lower, predicted, upper
    strategy: _Trades
    buy_and_hold: _Trades


@dataclass(frozen=True)
class _Model:
    warmup: int
    unscored: int
    series: list[_Series]  # those with a scored forecast


def _score_all(
    candles: Sequence[Candle],
    predictions: Mapping[str, Sequence[Prediction]],
    costs: Costs,
    long_only: bool,
    adaptive_step: float,
) -> dict[str, _Model]:
    if not candles:
        raise ConfigError("nothing to score: no candles given")
    if not predictions:
        raise ConfigError("nothing to score: no model's predictions given")
    series = _index_candles(candles)
    forecasters = baseline_forecasters()
    # The history every baseline needs at the forecast candle, like evaluate's.
    need = max(f.window for f in forecasters.values()) + 1
    result: dict[str, _Model] = {}
    for label, model_predictions in predictions.items():
        by_key: dict[tuple[str, str], list[Prediction]] = {}
        for p in model_predictions:
            by_key.setdefault((p.symbol, p.interval), []).append(p)
        warmup = unscored = 0
        scored: list[_Series] = []
        for key in sorted(by_key):
            own, skipped = _own_predictions(by_key[key], label)
            part = _score_series(key, own, skipped, series.get(key, []), need, costs, long_only,
                                 adaptive_step)
            warmup += skipped
            if part is None:
                unscored += len(own)
            else:
                unscored += part.unscored
                scored.append(part)
        if not scored:
            total = len(model_predictions)
            raise ConfigError(
                f"nothing to score for model {label!r}: {total} predictions ({warmup} of "
                f"them naive warm-up), none whose candle with {need - 1} candles before it "
                "and whose target candle are all in the candles given"
            )
        result[label] = _Model(warmup=warmup, unscored=unscored, series=scored)
    return result


def _index_candles(candles: Sequence[Candle]) -> dict[tuple[str, str], list[Candle]]:
    """Candles per (symbol, interval) in time order; a redelivered candle (same open
    time, as at-least-once delivery allows) is kept once, the first time seen."""
    by_key: dict[tuple[str, str], dict[int, Candle]] = {}
    for c in candles:
        by_key.setdefault((c.symbol, c.interval), {}).setdefault(c.open_time, c)
    return {key: [seen[t] for t in sorted(seen)] for key, seen in by_key.items()}


def _own_predictions(predictions: Sequence[Prediction], label: str) -> tuple[list[Prediction], int]:
    """The model's own predictions in time order, one per candle (the first one seen),
    and how many were naive warm-up ones (unless the model under test is naive)."""
    unique: dict[int, Prediction] = {}
    for p in predictions:
        unique.setdefault(p.candle_open_time, p)
    own = [p for t, p in sorted(unique.items()) if label == NAIVE or p.model_version != NAIVE]
    return own, len(unique) - len(own)


def _score_series(
    key: tuple[str, str],
    own: Sequence[Prediction],
    warmup: int,
    candles: Sequence[Candle],
    need: int,
    costs: Costs,
    long_only: bool,
    adaptive_step: float,
) -> _Series | None:
    index = {c.open_time: i for i, c in enumerate(candles)}
    usable: list[tuple[Prediction, int, int]] = []
    for p in own:
        at, target = index.get(p.candle_open_time), index.get(p.target_open_time)
        if at is None or target is None or at < need - 1:
            continue
        close = candles[at].close
        if not math.isclose(p.last_close, close, rel_tol=_CLOSE_RTOL):
            raise ConfigError(
                f"the {key[0]} {key[1]} prediction made at candle {p.candle_open_time} has "
                f"last close {p.last_close}, but that candle closed at {close}: the "
                "predictions were not made from these candles"
            )
        usable.append((p, at, target))
    if not usable:
        return None
    bands = {MODEL: np.array([(p.lower, p.predicted_close, p.upper) for p, _, _ in usable])}
    histories = [candles[at - need + 1 : at + 1] for _, at, _ in usable]
    for name, forecaster in baseline_forecasters().items():
        forecasts = [
            forecast
            for chunk in range(0, len(histories), _CHUNK)
            for forecast in forecaster.predict_batch(histories[chunk : chunk + _CHUNK])
        ]
        bands[name] = np.array(
            [
                (np.nan,) * 3 if f is None else (f.lower, f.predicted_close, f.upper)
                for f in forecasts
            ],
            dtype=np.float64,
        ).reshape(len(forecasts), 3)
    bands[GarchBaseline.version] = garch_bands(
        np.array([c.close for c in candles]), np.array([at for _, at, _ in usable]),
        bands["persistence"])
    # Every forecaster is scored on the same candles: drop any one of them could not answer.
    answered = np.all([np.isfinite(b).all(axis=1) for b in bands.values()], axis=0)
    if not answered.any():
        return None
    kept = [u for u, ok in zip(usable, answered.tolist(), strict=True) if ok]
    last = np.array([candles[at].close for _, at, _ in kept], dtype=np.float64)
    actual = np.array([candles[target].close for _, _, target in kept], dtype=np.float64)
    model_band = bands.pop(MODEL)[answered]
    bands = {MODEL: model_band, **served_bands(
        {name: b[answered] for name, b in bands.items()}, last, actual, adaptive_step)}
    called = np.sign(bands[MODEL][:, 1] - last)
    position = np.maximum(called, 0.0) if long_only else called
    return _Series(
        symbol=key[0],
        interval=key[1],
        warmup=warmup,
        unscored=len(own) - len(kept),
        versions=[p.model_version for p, _, _ in kept],
        candle_time=np.array([p.candle_open_time for p, _, _ in kept], dtype=np.int64),
        target_time=np.array([p.target_open_time for p, _, _ in kept], dtype=np.int64),
        last=last,
        actual=actual,
        bands=bands,
        strategy=_trade(position, last, actual, costs.per_change),
        buy_and_hold=_trade(np.ones_like(last), last, actual, costs.per_change),
    )


def _trade(position: FloatArray, last: FloatArray, actual: FloatArray, cost: float) -> _Trades:
    """Hold ``position`` over each target candle, starting flat, paying ``cost`` (a
    fraction of price) per unit of position change."""
    previous = np.concatenate(([0.0], position[:-1]))
    returns = position * (actual / last - 1.0) - np.abs(position - previous) * cost
    equity = np.asarray(np.cumprod(1.0 + returns), dtype=np.float64)
    return _Trades(position=position, returns=returns, equity=equity)


def _strategy_metrics(trades: _Trades, interval: str) -> StrategyMetrics:
    returns, position = trades.returns, trades.position
    equity = np.concatenate(([1.0], trades.equity))
    drawdown = 1.0 - equity / np.maximum.accumulate(equity)
    std = float(np.std(returns, ddof=1)) if len(returns) > 1 else 0.0
    candles_per_year = _MS_PER_YEAR / interval_ms(interval)
    previous = np.concatenate(([0.0], position[:-1]))
    return StrategyMetrics(
        candles=len(returns),
        total_return=float(equity[-1] - 1.0),
        sharpe=(
            float(np.mean(returns) / std * math.sqrt(candles_per_year)) if std > _FLAT_STD else None
        ),
        max_drawdown=float(drawdown.max()),
        position_changes=int(np.count_nonzero(position != previous)),
        turnover=float(np.abs(position - previous).sum()),
        exposure=float(np.mean(position != 0)),
    )


def _series_backtest(s: _Series) -> SeriesBacktest:
    return SeriesBacktest(
        symbol=s.symbol,
        interval=s.interval,
        forecasts=len(s.target_time),
        warmup=s.warmup,
        unscored=s.unscored,
        first_target_open_time=int(s.target_time[0]),
        last_target_open_time=int(s.target_time[-1]),
        metrics=score_forecasters(s.bands, s.last, s.actual),
        strategy=_strategy_metrics(s.strategy, s.interval),
        buy_and_hold=_strategy_metrics(s.buy_and_hold, s.interval),
    )


def _model_backtest(model: _Model) -> ModelBacktest:
    parts = model.series
    series = [_series_backtest(s) for s in parts]
    pooled = {name: np.concatenate([s.bands[name] for s in parts]) for name in parts[0].bands}
    return ModelBacktest(
        model_versions=sorted({v for s in parts for v in s.versions}),
        forecasts=sum(s.forecasts for s in series),
        warmup=model.warmup,
        unscored=model.unscored,
        first_target_open_time=min(s.first_target_open_time for s in series),
        last_target_open_time=max(s.last_target_open_time for s in series),
        metrics=score_forecasters(
            pooled,
            np.concatenate([s.last for s in parts]),
            np.concatenate([s.actual for s in parts]),
        ),
        mean_total_return=float(np.mean([s.strategy.total_return for s in series])),
        mean_buy_and_hold_return=float(np.mean([s.buy_and_hold.total_return for s in series])),
        series=series,
    )
