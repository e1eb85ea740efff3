"""Honest evaluation of forecasters: time-ordered splits, baselines and scored forecasts.

:func:`evaluate` replays candle series through a forecaster and the baselines (persistence,
EWMA volatility, drift, EMA, GARCH(1,1)), forecasting every next close only from the candles
up to it, and scores them on identical candles. The main score is proper: the mean pinball loss over
the three served quantiles (10%, 50%, 90%), next to the 80% interval's score, coverage and
width, and MAE. A span can be selected so that models are compared on candles none of
them trained on; the report says when the span overlaps a model's training data.
:func:`walk_forward_splits` gives leak-free train/test index splits of time-ordered samples.

Only numpy, onnxruntime and (for GARCH) arch are needed, never torch.
"""

import logging
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import msgspec
import numpy as np
from numpy.lib.stride_tricks import sliding_window_view
from numpy.typing import NDArray

from makeusrich.core.errors import ModelError, TrainingError
from makeusrich.core.intervals import interval_ms
from makeusrich.core.schemas import Candle
from makeusrich.inference.conformal import DEFAULT_STEP, adaptive_log_quantiles
from makeusrich.inference.features import (
    OHLCV_COLUMNS,
    TRADE_ONLY_FEATURES,
    FloatArray,
    Normalisation,
    compute_features,
    log_returns,
)
from makeusrich.inference.model import (
    Forecast,
    Forecaster,
    Manifest,
    NaiveForecaster,
    TrainingData,
    bundled_models_dir,
    load_forecaster,
    naive_log_quantiles,
    no_move_log_quantiles,
)
from makeusrich.inference.scoring import interval_score, pinball
from makeusrich.trainer.data import CandleSeries, load_series

__all__ = [
    "MIN_MARGIN",
    "MODEL",
    "DriftForecaster",
    "EmaForecaster",
    "EwmaVolatilityForecaster",
    "GarchBaseline",
    "Metrics",
    "Report",
    "Scores",
    "Split",
    "SymbolScores",
    "Verdict",
    "WeekScores",
    "baseline_forecasters",
    "evaluate",
    "evaluate_paths",
    "feature_windows",
    "fit_train_normalisation",
    "forecast_metrics",
    "garch_bands",
    "holdout_start",
    "judge",
    "resolve_forecaster",
    "score_forecasters",
    "served_bands",
    "walk_forward_splits",
]

log = logging.getLogger(__name__)

#: Key of the evaluated forecaster in :attr:`Scores.metrics` (baselines use their names).
MODEL = "model"
_CLOSE = OHLCV_COLUMNS.index("close")
_CHUNK = 4096  # histories per predict_batch call; bounds memory on long spans
_BP = 1e4
_WEEK_MS = 7 * 86_400_000
_MONDAY_SHIFT_MS = 3 * 86_400_000
# Two returns are the fewest that say anything about their spread.
_MIN_CANDLES = 3


# --- walk-forward splits ----------------------------------------------------------------


@dataclass(frozen=True)
class Split:
    """Indices of time-ordered samples: ``train`` all precede ``test``."""

    train: range
    test: range


def walk_forward_splits(n: int, *, folds: int, test_size: int, min_train: int) -> list[Split]:
    """Expanding-window splits of ``n`` time-ordered samples.

    The ``folds`` test spans of ``test_size`` samples are consecutive, do not overlap and
    end at the last sample; each fold trains on every sample before its test span (at
    least ``min_train`` of them). Nothing is shuffled. :class:`TrainingError` when ``n``
    is too small for that.
    """
    if folds < 1 or test_size < 1 or min_train < 1:
        raise ValueError("folds, test_size and min_train must be at least 1")
    first_test = n - folds * test_size
    if first_test < min_train:
        raise TrainingError(
            f"{n} samples are too few for {folds} folds of {test_size} test samples after "
            f"at least {min_train} training samples"
        )
    starts = range(first_test, n, test_size)
    return [Split(train=range(start), test=range(start, start + test_size)) for start in starts]


def feature_windows(ohlcv: FloatArray, window: int) -> FloatArray:
    """Raw feature windows ``(samples, window, features)`` in time order, as the trainer
    builds them: sample ``i`` holds feature rows ``i .. i + window - 1`` and its target is
    the following row's log return, so the last window, which has none, is left out."""
    features = compute_features(ohlcv)
    count = len(features) - window
    if count < 1:
        return np.empty((0, window, features.shape[1]))
    view = sliding_window_view(features, window, axis=0)  # (rows, features, window)
    return np.ascontiguousarray(view[:count].transpose(0, 2, 1))


def fit_train_normalisation(windows: FloatArray, split: Split) -> Normalisation:
    """Normalisation fitted on the split's training samples only, so no statistic of the
    test span leaks into the inputs the model is scored on."""
    return Normalisation.fit(windows[split.train.start : split.train.stop])


# --- baselines --------------------------------------------------------------------------


def _returns(closes: FloatArray) -> FloatArray:
    return log_returns(closes.T).T  # log_returns works along the first axis


def _forecast_batch(
    histories: Sequence[Sequence[Candle]],
    window: int,
    log_quantiles: Callable[[FloatArray, int], FloatArray],
    horizon: int,
) -> list[Forecast | None]:
    """Forecasts ``horizon`` candles ahead from the last ``window + 1`` closes of each
    history (fewer when it is shorter, None below three), ``log_quantiles`` mapping closes
    ``(batch, k)`` and the horizon to the 10%/50%/90% log returns ``(batch, 3)``."""
    results: list[Forecast | None] = [None] * len(histories)
    by_length: dict[int, list[int]] = {}
    for i, candles in enumerate(histories):
        length = min(len(candles), window + 1)
        if length >= _MIN_CANDLES:
            by_length.setdefault(length, []).append(i)
    # Equal-length histories stack into one array: one vectorised pass per length.
    for length, rows in by_length.items():
        closes = np.array([[c.close for c in histories[i][-length:]] for i in rows])
        bands = closes[:, -1:] * np.exp(log_quantiles(closes, horizon))
        for i, (lower, mid, upper) in zip(rows, bands.tolist(), strict=True):
            results[i] = Forecast(predicted_close=mid, lower=lower, upper=upper, horizon=horizon)
    return results


def _naive_log_quantiles(closes: FloatArray, horizon: int) -> FloatArray:
    return naive_log_quantiles(_returns(closes), horizon)


class _Persistence(NaiveForecaster):
    """The naive forecaster with a vectorised ``predict_batch``: an evaluation calls it on
    every candle of a span."""

    def predict_batch(self, histories: Sequence[Sequence[Candle]],
                      horizon: int = 1) -> list[Forecast | None]:
        results = _forecast_batch(histories, self.window, _naive_log_quantiles, horizon)
        # Below three candles the naive forecaster bands by the last candle's range instead.
        return [
            self.predict(candles, horizon) if forecast is None else forecast
            for forecast, candles in zip(results, histories, strict=True)
        ]


class _CloseBaseline:
    """A forecaster from the last ``window + 1`` closes (None below three): a centre log
    return per subclass, with the naive forecaster's 80% band from the standard deviation
    of the recent log returns around it (scaled by the square root of the horizon, as for
    a random walk). It forecasts any horizon."""

    version: str
    interval: str | None = None  # serves every interval
    horizons: tuple[int, ...] = (1,)

    def __init__(self, window: int = 30) -> None:
        self.window = window

    def _centre(self, closes: FloatArray, returns: FloatArray, horizon: int) -> FloatArray:
        """Median log return ``horizon`` candles ahead per row of ``closes`` ``(batch, k)``."""
        raise NotImplementedError

    def log_quantiles(self, closes: FloatArray, horizon: int = 1) -> FloatArray:
        """10%/50%/90% log returns ``(batch, 3)`` ``horizon`` candles ahead from closes
        ``(batch, k)``."""
        returns = _returns(closes)
        return naive_log_quantiles(returns, horizon) + self._centre(
            closes, returns, horizon)[:, None]

    def predict(self, candles: Sequence[Candle], horizon: int = 1) -> Forecast | None:
        return self.predict_batch([candles], horizon)[0]

    def predict_batch(self, histories: Sequence[Sequence[Candle]],
                      horizon: int = 1) -> list[Forecast | None]:
        return _forecast_batch(histories, self.window, self.log_quantiles, horizon)

    def predict_horizons(self, candles: Sequence[Candle]) -> list[Forecast] | None:
        forecasts = [self.predict(candles, h) for h in self.horizons]
        return None if None in forecasts else [f for f in forecasts if f is not None]


class DriftForecaster(_CloseBaseline):
    """Drift: close ``horizon`` candles ahead = last close x exp(horizon x mean log return
    over the window)."""

    version = "drift"

    def _centre(self, closes: FloatArray, returns: FloatArray, horizon: int) -> FloatArray:
        centre: FloatArray = horizon * returns.mean(axis=1)
        return centre


class EwmaVolatilityForecaster(_CloseBaseline):
    """Persistence with an EWMA volatility band (RiskMetrics): no move, ± Z80 sigma x
    sqrt(horizon), where sigma² is the exponentially weighted mean (``decay`` per candle,
    weights normalised over the window) of the squared log returns, so recent moves widen
    the band sooner."""

    version = "ewma_vol"

    def __init__(self, window: int = 30, decay: float = 0.94) -> None:
        super().__init__(window)
        self.decay = decay

    def log_quantiles(self, closes: FloatArray, horizon: int = 1) -> FloatArray:
        returns = _returns(closes)
        weights = self.decay ** np.arange(returns.shape[1] - 1, -1, -1, dtype=np.float64)
        variance = returns**2 @ (weights / weights.sum())
        return no_move_log_quantiles(np.sqrt(horizon * variance))


class EmaForecaster(_CloseBaseline):
    """EMA: every later close = exponential moving average of the window's closes, with
    smoothing 2 / (window + 1) and weights normalised over the window (no seed value)."""

    version = "ema"

    def _centre(self, closes: FloatArray, returns: FloatArray, horizon: int) -> FloatArray:
        alpha = 2.0 / (self.window + 1)
        weights = (1.0 - alpha) ** np.arange(closes.shape[1] - 1, -1, -1, dtype=np.float64)
        ema = closes @ (weights / weights.sum())
        centre: FloatArray = np.log(ema / closes[:, -1])
        return centre


class GarchBaseline:
    """GARCH(1,1) volatility around no move: the 10%/90% quantiles of the log return
    ``horizon`` candles ahead are ± Z80 sigma, sigma² the sum of the next ``horizon``
    variances forecast by a zero-mean, normal GARCH(1,1) (``arch``).

    It needs more history than a window, so it forecasts a whole series at once
    (:meth:`log_quantiles`). Its parameters are refitted every ``refit_every`` forecasts on
    up to ``fit_window`` returns before the first of them (never on what they forecast) and
    held fixed in between; with fewer than ``min_fit`` returns, or a fit that does not
    converge, those forecasts are NaN (:func:`evaluate` gives them persistence's band).
    """

    version = "garch"

    def __init__(self, refit_every: int = 1440, fit_window: int = 10_080,
                 min_fit: int = 500) -> None:
        self.refit_every, self.fit_window, self.min_fit = refit_every, fit_window, min_fit

    def log_quantiles(self, closes: FloatArray, at: NDArray[np.int64],
                      horizon: int = 1) -> FloatArray:
        """10%/50%/90% log returns ``(len(at), 3)`` of closes[t + horizon] over closes[t]
        for each (ascending) candle index t in ``at``, from the closes up to t only."""
        from arch import arch_model  # imported here: scipy and pandas, for GARCH only

        returns = np.diff(np.log(closes)) * _BP  # returns[i]: from close i to close i + 1
        sigma = np.full(len(at), np.nan)
        for first_row in range(0, len(at), self.refit_every):
            rows = at[first_row : first_row + self.refit_every]
            first, last = int(rows[0]), int(rows[-1])
            lo = max(0, first - self.fit_window)
            if first - lo < self.min_fit:
                continue
            fitted = arch_model(returns[lo:first], mean="Zero", vol="GARCH", p=1, q=1,
                                rescale=False).fit(disp="off", show_warning=False)
            if fitted.convergence_flag != 0:
                continue
            # Forecast made at candle t: the variances of returns[t .. t + horizon - 1],
            # from returns[:t].
            model = arch_model(returns[lo:last], mean="Zero", vol="GARCH", p=1, q=1,
                               rescale=False)
            variance = model.fix(fitted.params).forecast(
                horizon=horizon, start=first - 1 - lo, reindex=False).variance.to_numpy()
            sigma[first_row : first_row + len(rows)] = (
                np.sqrt(variance[rows - first].sum(axis=1)) / _BP)
        return no_move_log_quantiles(sigma)


def garch_bands(closes: FloatArray, at: NDArray[np.int64], persistence: FloatArray,
                horizon: int = 1) -> FloatArray:
    """:class:`GarchBaseline`'s bands (lower, predicted, upper) of closes[t + horizon] for
    the ascending candle indices ``at``; ``persistence``'s band (same rows) where it has
    none."""
    band = closes[at, None] * np.exp(GarchBaseline().log_quantiles(closes, at, horizon))
    return np.where(np.isnan(band), persistence, band)


def baseline_forecasters(window: int = 30) -> dict[str, Forecaster]:
    """The baselines every evaluation reports, by name; ``persistence`` is the naive
    forecaster that skill is measured against."""
    return {
        "persistence": _Persistence(window),
        "ewma_vol": EwmaVolatilityForecaster(window),
        "drift": DriftForecaster(window),
        "ema": EmaForecaster(window),
    }


# --- report -----------------------------------------------------------------------------


class Metrics(msgspec.Struct, frozen=True):
    """Scores of one forecaster's next-close forecasts.

    ``pinball_bp``, the main score (proper: only the true quantiles minimise it): the mean
    pinball loss over the 10%, 50% and 90% quantiles (lower, predicted, upper), in basis
    points of the last close; ``pinball_skill`` = 1 - pinball_bp / persistence's (None
    without persistence, or when it is exact). ``interval_score_bp``: the 80% interval's
    score (its width, plus 2/0.2 times how far a close falls outside it), in basis points.
    ``mae``/``rmse`` are in quote currency. ``skill`` = 1 - mae / mae of persistence (None
    when persistence is exact). ``directional_accuracy``: share of candles whose close moved
    where the forecast's move (predicted - last close) has the realised move's sign; a
    forecast of no move counts half (a coin flip), candles whose close did not move are
    left out (None when all are). ``coverage_80``: share of closes inside [lower, upper];
    ``interval_width_bp``: mean (upper - lower) in basis points of the last close.
    """

    mae: float
    rmse: float
    skill: float | None
    directional_accuracy: float | None
    coverage_80: float
    interval_width_bp: float
    pinball_bp: float
    pinball_skill: float | None
    interval_score_bp: float


class WeekScores(msgspec.Struct, frozen=True, kw_only=True):
    """One UTC week's targets (``week``: its Monday, YYYY-MM-DD): per forecaster, the share
    of closes inside the 80% interval and the mean pinball loss in basis points."""

    week: str
    forecasts: int
    coverage_80: dict[str, float]
    pinball_bp: dict[str, float]


class Scores(msgspec.Struct, frozen=True, kw_only=True):
    """Metrics of every forecaster on the same ``forecasts`` target candles (open times in
    UTC epoch ms); :data:`MODEL` is the evaluated forecaster, the rest are baselines.
    ``weeks``: coverage and pinball per UTC week of the targets, oldest first."""

    forecasts: int
    first_target_open_time: int
    last_target_open_time: int
    metrics: dict[str, Metrics]
    weeks: list[WeekScores] = []


class SymbolScores(Scores, frozen=True, kw_only=True):
    symbol: str
    interval: str


#: The serving rule: a model must score a pinball loss at least this much (relative) below
#: the best baseline's at horizon 1, and below it at every other horizon, or a baseline
#: serves instead.
MIN_MARGIN = 0.01


class Verdict(msgspec.Struct, frozen=True, kw_only=True):
    """The serving rule applied to a report. Per horizon: the baseline with the lowest
    pinball loss and the model's ``margin`` = 1 - model / that baseline's pinball
    (positive: the model is better). ``passes``: margin >= :data:`MIN_MARGIN` at horizon 1
    and > 0 at every other; else ``reason`` says where it fell short."""

    passes: bool
    best_baseline: dict[int, str]
    margin: dict[int, float]
    reason: str


def judge(by_horizon: dict[int, Scores]) -> Verdict:
    """:class:`Verdict` of :data:`MODEL` against the baselines in ``by_horizon`` (horizon
    -> scores; it must hold horizon 1)."""
    best, margin, short = {}, {}, []
    for horizon, scores in sorted(by_horizon.items()):
        baselines = {n: m.pinball_bp for n, m in scores.metrics.items() if n != MODEL}
        best[horizon] = min(baselines, key=baselines.__getitem__)
        ours, theirs = scores.metrics[MODEL].pinball_bp, baselines[best[horizon]]
        margin[horizon] = 1.0 - ours / theirs if theirs > 0 else 0.0
        ok = margin[horizon] >= MIN_MARGIN if horizon == 1 else margin[horizon] > 0
        if not ok:
            needs = f">= {MIN_MARGIN:+.0%}" if horizon == 1 else "> 0"
            short.append(f"horizon {horizon}: {margin[horizon]:+.2%} vs {best[horizon]} "
                         f"(needs {needs})")
    reason = ("beats the best baseline by the rule" if not short
              else "a baseline serves: " + "; ".join(short))
    return Verdict(passes=not short, best_baseline=best, margin=margin, reason=reason)


class Report(msgspec.Struct, frozen=True, kw_only=True):
    """Evaluation of one model. ``overall`` pools every forecast, so in MAE, RMSE and skill
    symbols with higher prices weigh more. ``training_first_open_time`` ..
    ``training_last_open_time``: the candles the model was trained to forecast, i.e. its
    training data up to its validation span, which training held out. ``overlaps_training``:
    a target candle lies there (same symbol and interval), so its scores are optimistic.
    All of that is for forecasts of the next close (horizon 1); ``ahead`` pools every
    symbol's forecasts of each further horizon the model serves (candles ahead -> scores)."""

    model: str
    start_open_time: int | None
    end_open_time: int | None
    overlaps_training: bool
    training_first_open_time: int | None
    training_last_open_time: int | None
    symbols: list[SymbolScores]
    overall: Scores
    ahead: dict[int, Scores] = {}

    @property
    def verdict(self) -> Verdict:
        """The serving rule over horizon 1 and every horizon ahead."""
        return judge({1: self.overall, **self.ahead})

    def to_dict(self) -> dict[str, Any]:
        # String keys (horizons), as in JSON.
        result: dict[str, Any] = msgspec.to_builtins(self, str_keys=True)
        if MODEL in self.overall.metrics:
            result["verdict"] = msgspec.to_builtins(self.verdict, str_keys=True)
        return result

    def to_json(self) -> str:
        return msgspec.json.format(msgspec.json.encode(self.to_dict()).decode(), indent=2)

    def render(self) -> str:
        """A compact text table per symbol, and overall when there are several."""
        lines = [f"model {self.model}: {self.overall.forecasts} forecasts of the next close"]
        if self.overlaps_training:
            lines.append(
                "WARNING: the span overlaps the model's training data "
                f"({_utc(self.training_first_open_time)} .. "
                f"{_utc(self.training_last_open_time)} UTC); its scores are optimistic"
            )
        sections: list[tuple[str, Scores]] = [(f"{s.symbol} {s.interval}", s) for s in self.symbols]
        if len(self.symbols) > 1:
            sections.append(("overall", self.overall))
        sections += [(f"{horizon} candles ahead", scores)
                     for horizon, scores in self.ahead.items()]
        for title, scores in sections:
            lines.append("")
            lines.extend(_render_scores(title, scores))
        if MODEL in self.overall.metrics:
            lines += ["", f"verdict: {self.verdict.reason}"]
        return "\n".join(lines)


def _utc(ms: int | None) -> str:
    if ms is None:
        return "?"
    return datetime.fromtimestamp(ms / 1000, UTC).strftime("%Y-%m-%d %H:%M")


def _percent(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.1%}"


def _signed(value: float | None) -> str:
    return "n/a" if value is None else f"{value:+.4f}"


def _render_scores(title: str, scores: Scores) -> list[str]:
    lines = [
        f"{title}: {scores.forecasts} forecasts, targets {_utc(scores.first_target_open_time)}"
        f" .. {_utc(scores.last_target_open_time)} UTC",
        f"  {'forecaster':<12}{'pinball bp':>11}{'pb skill':>9}{'IS80 bp':>9}{'cover80':>9}"
        f"{'width bp':>10}{'MAE':>12}{'skill':>9}{'direction':>11}",
    ]
    for name, m in scores.metrics.items():
        lines.append(
            f"  {name:<12}{m.pinball_bp:>11.4f}{_signed(m.pinball_skill):>9}"
            f"{m.interval_score_bp:>9.2f}{_percent(m.coverage_80):>9}"
            f"{m.interval_width_bp:>10.2f}{m.mae:>12.6g}{_signed(m.skill):>9}"
            f"{_percent(m.directional_accuracy):>11}"
        )
    if len(scores.weeks) > 1:
        lines.append(f"  {MODEL} 80% coverage per week: " + ", ".join(
            f"{w.week} {_percent(w.coverage_80[MODEL])}" for w in scores.weeks))
    return lines


# --- evaluation -------------------------------------------------------------------------


@dataclass
class _Scored:
    """Forecasts of one series segment that every forecaster answered."""

    target_time: NDArray[np.int64]
    last: FloatArray
    actual: FloatArray
    bands: dict[str, FloatArray]  # (forecasts, 3): lower, predicted, upper


def _candles(series: CandleSeries, first: int, last: int) -> list[Candle]:
    step = interval_ms(series.interval)
    return [
        Candle(
            symbol=series.symbol,
            interval=series.interval,
            open_time=open_time,
            close_time=open_time + step - 1,
            open=o,
            high=h,
            low=low,
            close=c,
            volume=v,
            quote_volume=quote,
            trades=int(trades),
            taker_buy_volume=taker_buy,
            # load_series keeps no taker-buy quote volume; no forecaster reads it.
            taker_buy_quote_volume=0.0,
            source="replay",
            ts_event=open_time + step - 1,
            ts_ingest=open_time + step - 1,
            large_trade_quote_volume=None if math.isnan(large) else large,
        )
        for open_time, (o, h, low, c, v, taker_buy, quote, trades, large) in zip(
            series.open_time[first : last + 1].tolist(),
            series.ohlcv[first : last + 1].tolist(),
            strict=True,
        )
    ]


def _bands(forecasts: list[Forecast | None]) -> FloatArray:
    nan = (np.nan, np.nan, np.nan)
    return np.array(
        [nan if f is None else (f.lower, f.predicted_close, f.upper) for f in forecasts],
        dtype=np.float64,
    ).reshape(len(forecasts), 3)


def served_bands(bands: Mapping[str, FloatArray], last: FloatArray, actual: FloatArray,
                 step: float, horizon: int = 1) -> dict[str, FloatArray]:
    """Each forecaster's consecutive bands of one series (rows: lower, predicted, upper of
    ``actual`` closes ``horizon`` candles ahead, made at ``last`` closes) as the worker
    serves them, through live adaptive conformal
    (:class:`makeusrich.inference.conformal.AdaptiveConformal`, ``step``), so offline
    scores are the served ones."""
    if step == 0:
        return dict(bands)
    target = np.log(actual / last)
    return {
        name: last[:, None] * np.exp(adaptive_log_quantiles(
            np.log(band / last[:, None]), target, step, horizon))
        for name, band in bands.items()
    }


def _score_series(
    series: CandleSeries, forecasters: dict[str, Forecaster], start: int, end: int,
    adaptive_step: float, horizon: int,
) -> _Scored | None:
    need = max(f.window for f in forecasters.values()) + 1
    times = series.open_time
    # A forecast made at candle t targets t + horizon; both must lie in the span, while the
    # history before t may reach back before it (that is the past, not a leak).
    t = np.arange(need - 1, len(series) - horizon)
    t = t[(times[t] >= start) & (times[t + horizon] <= end)]
    if not len(t):
        return None
    offset = int(t[0]) - need + 1
    candles = _candles(series, offset, int(t[-1]))
    raw: dict[str, list[Forecast | None]] = {name: [] for name in forecasters}
    for chunk in range(0, len(t), _CHUNK):
        ends = (t[chunk : chunk + _CHUNK] - offset).tolist()
        histories = [candles[e - need + 1 : e + 1] for e in ends]
        for name, forecaster in forecasters.items():
            raw[name].extend(forecaster.predict_batch(histories, horizon))
    bands = {name: _bands(forecasts) for name, forecasts in raw.items()}
    bands[GarchBaseline.version] = garch_bands(
        series.ohlcv[:, _CLOSE], t, bands["persistence"], horizon)
    # Every forecaster is scored on the same candles: drop any one of them could not answer.
    answered = np.all([np.isfinite(b).all(axis=1) for b in bands.values()], axis=0)
    t = t[answered]
    last, actual = series.ohlcv[t, _CLOSE], series.ohlcv[t + horizon, _CLOSE]
    return _Scored(
        target_time=times[t + horizon],
        last=last,
        actual=actual,
        bands=served_bands({name: b[answered] for name, b in bands.items()}, last, actual,
                           adaptive_step, horizon),
    )


def forecast_metrics(
    band: FloatArray, last: FloatArray, actual: FloatArray, mae_base: float,
    pinball_base_bp: float | None,
) -> Metrics:
    """:class:`Metrics` of forecasts ``band`` (lower, predicted, upper per row) of closes
    ``actual`` made at closes ``last``; skills are measured against ``mae_base`` and
    ``pinball_base_bp`` (None: no pinball skill)."""
    lower, predicted, upper = band[:, 0], band[:, 1], band[:, 2]
    error = predicted - actual
    mae = float(np.mean(np.abs(error)))
    realised = np.sign(actual - last)
    called = np.sign(predicted - last)
    moved = realised != 0
    hits = np.where(called == 0, 0.5, (called == realised).astype(np.float64))[moved]
    loss = float(np.mean(pinball(band, last, actual)))
    return Metrics(
        mae=mae,
        rmse=float(np.sqrt(np.mean(error**2))),
        skill=1.0 - mae / mae_base if mae_base > 0 else None,
        directional_accuracy=float(hits.mean()) if len(hits) else None,
        coverage_80=float(np.mean(_inside(band, actual))),
        interval_width_bp=float(np.mean((upper - lower) / last) * _BP),
        pinball_bp=loss,
        pinball_skill=(1.0 - loss / pinball_base_bp
                       if pinball_base_bp is not None and pinball_base_bp > 0 else None),
        interval_score_bp=float(np.mean(interval_score(band, last, actual))),
    )


def score_forecasters(
    bands: Mapping[str, FloatArray], last: FloatArray, actual: FloatArray
) -> dict[str, Metrics]:
    """:func:`forecast_metrics` of each forecaster's ``bands``, skills measured against
    persistence (its pinball from ``bands["persistence"]``, when there)."""
    mae_base = float(np.mean(np.abs(last - actual)))
    naive = bands.get("persistence")
    pinball_base = None if naive is None else float(np.mean(pinball(naive, last, actual)))
    return {name: forecast_metrics(b, last, actual, mae_base, pinball_base)
            for name, b in bands.items()}


def _inside(band: FloatArray, actual: FloatArray) -> NDArray[np.bool_]:
    """Which closes ``actual`` lie inside their band's 80% interval [lower, upper]."""
    inside: NDArray[np.bool_] = (actual >= band[:, 0]) & (actual <= band[:, 2])
    return inside


def _weeks(target_time: NDArray[np.int64], bands: Mapping[str, FloatArray], last: FloatArray,
           actual: FloatArray) -> list[WeekScores]:
    # The epoch began on a Thursday: shifted by three days, weeks start on Mondays.
    monday = (target_time + _MONDAY_SHIFT_MS) // _WEEK_MS * _WEEK_MS - _MONDAY_SHIFT_MS
    weeks = []
    for start in np.unique(monday).tolist():
        rows = monday == start
        inside = {name: _inside(b[rows], actual[rows]) for name, b in bands.items()}
        weeks.append(WeekScores(
            week=datetime.fromtimestamp(start / 1000, UTC).strftime("%Y-%m-%d"),
            forecasts=int(rows.sum()),
            coverage_80={name: float(i.mean()) for name, i in inside.items()},
            pinball_bp={name: float(np.mean(pinball(b[rows], last[rows], actual[rows])))
                        for name, b in bands.items()},
        ))
    return weeks


def _scores(parts: Sequence[_Scored]) -> dict[str, Any]:
    target_time = np.concatenate([p.target_time for p in parts])
    last = np.concatenate([p.last for p in parts])
    actual = np.concatenate([p.actual for p in parts])
    bands = {name: np.concatenate([p.bands[name] for p in parts]) for name in parts[0].bands}
    return {
        "forecasts": len(target_time),
        "first_target_open_time": int(target_time.min()),
        "last_target_open_time": int(target_time.max()),
        "metrics": score_forecasters(bands, last, actual),
        "weeks": _weeks(target_time, bands, last, actual),
    }


def _trained_span(data: TrainingData) -> tuple[int, int]:
    """First and last open time of the candles a model was trained to forecast: every
    target before its validation span (held out in training, so scoring there is fair)."""
    step = interval_ms(data.interval)
    return data.first_open_time, data.validation_first_target_open_time - step


def _overlaps(
    manifest: Manifest | None, key: tuple[str, str], target_time: NDArray[np.int64]
) -> bool:
    if manifest is None:
        return False
    data = manifest.training_data
    if key[0] not in data.symbols or key[1] != data.interval:
        return False
    first, last = _trained_span(data)
    return bool(((target_time >= first) & (target_time <= last)).any())


def _groups(all_series: Sequence[CandleSeries], forecasters: dict[str, Forecaster], start: int,
            end: int, adaptive_step: float, horizon: int) -> dict[tuple[str, str], list[_Scored]]:
    groups: dict[tuple[str, str], list[_Scored]] = {}
    for s in all_series:
        scored = _score_series(s, forecasters, start, end, adaptive_step, horizon)
        if scored is not None and len(scored.target_time):
            groups.setdefault((s.symbol, s.interval), []).append(scored)
    return groups


def evaluate(
    forecaster: Forecaster,
    series: CandleSeries | Sequence[CandleSeries],
    *,
    start_open_time: int | None = None,
    end_open_time: int | None = None,
    adaptive_step: float = DEFAULT_STEP,
) -> Report:
    """Score ``forecaster`` and the baselines on every close of ``series`` they forecast.

    For each candle t with enough history for all of them (the largest window + 1
    candles), each forecasts close[t + 1] from candles up to t only, and likewise
    close[t + h] for every other horizon h the model serves (:attr:`Report.ahead`). With a
    span (UTC epoch ms, inclusive), only forecasts whose candle t and target both lie in it
    are scored. Every forecaster's bands are scored as served, after live adaptive
    conformal with ``adaptive_step`` (0: as the forecasters give them).
    :class:`ModelError` when the model was trained on another interval or needs a feature
    the candles lack, :class:`TrainingError` when nothing can be scored.
    """
    all_series = [series] if isinstance(series, CandleSeries) else list(series)
    needs = getattr(forecaster, "features", ())
    for s in all_series:
        if forecaster.interval is not None and s.interval != forecaster.interval:
            raise ModelError(
                f"model {forecaster.version} forecasts {forecaster.interval} candles; "
                f"{s.symbol} has {s.interval} candles"
            )
        lacking = [f for f in needs if f in TRADE_ONLY_FEATURES and np.isnan(
            s.ohlcv[:, OHLCV_COLUMNS.index(TRADE_ONLY_FEATURES[f])]).all()]
        if lacking:  # it would answer nothing: say why rather than "nothing to score"
            raise ModelError(
                f"model {forecaster.version} needs {lacking}, which the {s.symbol} "
                f"{s.interval} candles lack (candles made from klines have no "
                "large_trade_quote_volume); evaluate it on the pipeline's own candles"
            )
    forecasters = {MODEL: forecaster, **baseline_forecasters()}
    start = -(2**63) if start_open_time is None else start_open_time
    end = 2**63 - 1 if end_open_time is None else end_open_time
    groups = _groups(all_series, forecasters, start, end, adaptive_step, 1)
    if not groups:
        need = max(f.window for f in forecasters.values()) + 2
        raise TrainingError(
            f"nothing to score: no {need} consecutive candles in the span "
            "(a history for every forecaster and the next candle)"
        )
    ahead = {}
    for horizon in forecaster.horizons[1:]:
        later = _groups(all_series, forecasters, start, end, adaptive_step, horizon)
        if later:
            ahead[horizon] = Scores(**_scores([p for parts in later.values() for p in parts]))
    manifest = getattr(forecaster, "manifest", None)
    manifest = manifest if isinstance(manifest, Manifest) else None
    overlaps = any(
        _overlaps(manifest, key, part.target_time)
        for key, parts in groups.items()
        for part in parts
    )
    if overlaps:
        log.warning(
            "the evaluated span overlaps the training data of %s: its scores are optimistic",
            forecaster.version,
        )
    trained = (None, None) if manifest is None else _trained_span(manifest.training_data)
    return Report(
        model=forecaster.version,
        start_open_time=start_open_time,
        end_open_time=end_open_time,
        overlaps_training=overlaps,
        training_first_open_time=trained[0],
        training_last_open_time=trained[1],
        symbols=[
            SymbolScores(symbol=symbol, interval=interval, **_scores(parts))
            for (symbol, interval), parts in sorted(groups.items())
        ],
        overall=Scores(**_scores([p for parts in groups.values() for p in parts])),
        ahead=ahead,
    )


def resolve_forecaster(model: str, registry_dir: Path | None = None) -> Forecaster:
    """``naive``, ``champion`` (the newest version in ``registry_dir``), a path to a version
    directory, or a version name inside ``registry_dir``; None = the bundled models."""
    registry = bundled_models_dir() if registry_dir is None else registry_dir
    if model == "naive":
        return _Persistence()
    if model == "champion":
        return load_forecaster(registry_dir)
    path = Path(model)
    if path.is_dir():
        return load_forecaster(path)
    candidate = registry / model
    if not candidate.is_dir():
        raise ModelError(
            f"no model {model!r}: not naive, champion, a directory, or a version in {registry}"
        )
    return load_forecaster(candidate)


def holdout_start(series: Sequence[CandleSeries], fraction: float) -> int:
    """The open time from which the last ``fraction`` of the span of ``series`` lies."""
    last_open = max(int(s.open_time[-1]) for s in series)
    first_open = min(int(s.open_time[0]) for s in series)
    return int(np.floor(last_open - (last_open - first_open) * fraction))


def evaluate_paths(
    model: str,
    data: Sequence[Path | str],
    registry_dir: Path | None = None,
    *,
    start_open_time: int | None = None,
    end_open_time: int | None = None,
    holdout: float | None = None,
    adaptive_step: float = DEFAULT_STEP,
) -> Report:
    """:func:`evaluate` the model named as in :func:`resolve_forecaster` on candle files,
    directories or globs (see :func:`load_series`); ``holdout``: only on the last such
    fraction of their span (from :func:`holdout_start`, or ``start_open_time`` if later)."""
    forecaster = resolve_forecaster(model, registry_dir)
    all_series = load_series(data)
    if holdout is not None:
        start = holdout_start(all_series, holdout)
        start_open_time = start if start_open_time is None else max(start, start_open_time)
    return evaluate(
        forecaster,
        all_series,
        start_open_time=start_open_time,
        end_open_time=end_open_time,
        adaptive_step=adaptive_step,
    )
