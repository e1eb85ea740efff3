"""The report directory of a backtest.

``metrics.json`` (the :class:`BacktestResult`), ``predictions.parquet`` (one row per scored
forecast, see :class:`BacktestRow`), three PNG figures and ``report.html``, one page that
embeds them, so it opens offline and as a single download. Each file is written under a
temporary name and renamed into place: a reader (the API serving a running job) sees a
file whole or not at all. ``report.html`` comes last.

Figures use matplotlib's object API with the Agg canvas, never pyplot: no display, and no
global figure state shared with other threads.
"""

import base64
import html
import io
import os
import uuid
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path

import msgspec
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from matplotlib.axes import Axes
from matplotlib.dates import AutoDateLocator, ConciseDateFormatter
from matplotlib.figure import Figure
from numpy.typing import NDArray

from makeusrich.backtest.score import (
    BacktestResult,
    BacktestRow,
    ModelBacktest,
    StrategyMetrics,
    backtest_rows,
)
from makeusrich.core.schemas import Candle, Prediction
from makeusrich.trainer.evaluate import MODEL, Metrics

__all__ = ["FIGURES", "write_report"]

#: Figure name -> title; each is written to ``<name>.png``.
FIGURES = {
    "price_forecast": "Close price and each model's forecast with its 10%-90% band",
    "equity": "Equity of each model's directional strategy and of buy-and-hold",
    "error": "Absolute forecast error, with its rolling mean",
}
_MAX_SERIES_PLOTTED = 6  # beyond this the figures get too tall to read
_ROLLING_CANDLES = 30
_DPI = 100

_Key = tuple[str, str]  # (symbol, interval)


def write_report(
    out_dir: Path,
    result: BacktestResult,
    candles: Sequence[Candle],
    predictions: Mapping[str, Sequence[Prediction]],
) -> dict[str, Path]:
    """Write the report of ``result``, scored on ``candles`` and ``predictions``, into
    ``out_dir`` (created if needed); returns each file by name (``metrics``,
    ``predictions``, the :data:`FIGURES` names, ``report``)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    rows = backtest_rows(result, candles, predictions)
    files = {
        "metrics": out_dir / "metrics.json",
        "predictions": out_dir / "predictions.parquet",
        **{name: out_dir / f"{name}.png" for name in FIGURES},
        "report": out_dir / "report.html",
    }
    _write_bytes(files["metrics"], result.to_json().encode())
    with _replacing(files["predictions"]) as tmp:
        pq.write_table(_table(rows), tmp)
    keys = sorted({(r.symbol, r.interval) for r in rows})
    plotted = keys[:_MAX_SERIES_PLOTTED]
    closes = _closes(candles, plotted)
    # One colour per model across every figure and subplot.
    colours = {label: f"C{i}" for i, label in enumerate(result.models)}
    images = {
        name: _figure(FIGURES[name], rows, plotted, closes, colours, _PAINTERS[name])
        for name in FIGURES
    }
    for name, png in images.items():
        _write_bytes(files[name], png)
    page = _html(result, images, shown=len(plotted), total=len(keys))
    _write_bytes(files["report"], page.encode())
    return files


# --- files --------------------------------------------------------------------------------


@contextmanager
def _replacing(path: Path) -> Iterator[Path]:
    """A temporary path beside ``path`` to write; renamed over ``path`` on success."""
    # A fresh name rather than mkstemp, whose 0600 files the API's user might not read.
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def _write_bytes(path: Path, data: bytes) -> None:
    with _replacing(path) as tmp:
        tmp.write_bytes(data)


_ARROW_TYPES = {str: pa.string(), int: pa.int64(), float: pa.float64()}


def _table(rows: Sequence[BacktestRow]) -> pa.Table:
    fields = msgspec.structs.fields(BacktestRow)
    schema = pa.schema([(f.name, _ARROW_TYPES[f.type]) for f in fields])
    columns = {f.name: [getattr(r, f.name) for r in rows] for f in fields}
    return pa.Table.from_pydict(columns, schema=schema)


# --- figures ------------------------------------------------------------------------------


def _utc(ms: int) -> datetime:
    return datetime.fromtimestamp(ms / 1000, UTC)


def _times(ms: Sequence[int]) -> NDArray[np.datetime64]:
    # matplotlib reads datetime64 as UTC (its default timezone).
    return np.array(ms, dtype="datetime64[ms]")


def _closes(candles: Sequence[Candle], keys: Sequence[_Key]) -> dict[_Key, dict[int, float]]:
    wanted = set(keys)
    closes: dict[_Key, dict[int, float]] = {key: {} for key in keys}
    for c in candles:
        key = (c.symbol, c.interval)
        if key in wanted:
            closes[key].setdefault(c.open_time, c.close)
    return closes


_Closes = Mapping[int, float]  # open time -> close
_Colours = Mapping[str, str]  # model label -> matplotlib colour
_Painter = Callable[[Axes, Sequence[BacktestRow], _Closes, _Colours], None]


def _figure(
    title: str,
    rows: Sequence[BacktestRow],
    keys: Sequence[_Key],
    closes: Mapping[_Key, _Closes],
    colours: _Colours,
    paint: _Painter,
) -> bytes:
    """One subplot per series, ``paint`` drawing every model's rows on it; PNG bytes."""
    height_in = 0.9 + 3.4 * len(keys)
    figure = Figure(figsize=(11, height_in), dpi=_DPI)
    figure.suptitle(title, y=1 - 0.2 / height_in, va="top")
    # Fixed margins in inches: a layout engine would double the drawing time.
    figure.subplots_adjust(
        left=0.08, right=0.98, top=1 - 0.7 / height_in, bottom=0.5 / height_in, hspace=0.35
    )
    axes = figure.subplots(len(keys), 1, squeeze=False)[:, 0]
    for ax, key in zip(axes, keys, strict=True):
        paint(ax, [r for r in rows if (r.symbol, r.interval) == key], closes[key], colours)
        ax.set_title(f"{key[0]} {key[1]}", fontsize="medium")
        locator = AutoDateLocator()
        ax.xaxis.set_major_locator(locator)
        ax.xaxis.set_major_formatter(ConciseDateFormatter(locator))
        ax.set_xlabel("UTC")
        ax.grid(alpha=0.3)
        ax.legend(fontsize="small", loc="upper left")  # "best" scans every point: slow
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png")
    return buffer.getvalue()


def _by_model(rows: Sequence[BacktestRow]) -> dict[str, list[BacktestRow]]:
    models: dict[str, list[BacktestRow]] = {}
    for r in rows:
        models.setdefault(r.model, []).append(r)
    return models


def _paint_price(ax: Axes, rows: Sequence[BacktestRow], closes: _Closes, colours: _Colours) -> None:
    first = min(r.candle_open_time for r in rows)
    last = max(r.target_open_time for r in rows)
    span = sorted(t for t in closes if first <= t <= last)
    ax.plot(_times(span), [closes[t] for t in span], color="black", lw=1.2, label="close")
    for label, model_rows in _by_model(rows).items():
        colour = colours[label]
        times = _times([r.target_open_time for r in model_rows])
        ax.plot(times, [r.predicted_close for r in model_rows], color=colour, lw=1, label=label)
        ax.fill_between(
            times,
            [r.lower for r in model_rows],
            [r.upper for r in model_rows],
            color=colour,
            alpha=0.18,
            lw=0,
            label=f"{label} 80% band",
        )
    ax.set_ylabel("price")


def _paint_equity(
    ax: Axes, rows: Sequence[BacktestRow], closes: _Closes, colours: _Colours
) -> None:
    # Models scored on the same candles share one buy-and-hold curve.
    holds: dict[tuple[tuple[int, float], ...], str] = {}
    for label, model_rows in _by_model(rows).items():
        # Equity is 1 when the first position is taken, at the close of the first candle.
        start = model_rows[0].candle_open_time
        times = _times([start] + [r.target_open_time for r in model_rows])
        equity = [1.0] + [r.equity for r in model_rows]
        ax.plot(times, equity, color=colours[label], lw=1.2, label=label)
        curve = ((start, 1.0), *((r.target_open_time, r.buy_hold_equity) for r in model_rows))
        holds.setdefault(curve, label)
    for curve, label in holds.items():
        name = "buy & hold" if len(holds) == 1 else f"buy & hold ({label})"
        times, equity = _times([t for t, _ in curve]), [e for _, e in curve]
        ax.plot(times, equity, color="black", ls="--", lw=1, label=name)
    ax.axhline(1.0, color="grey", lw=0.6)
    ax.set_ylabel("equity (start = 1)")


def _rolling_mean(values: Sequence[float], window: int) -> list[float]:
    """Trailing mean over up to ``window`` values (fewer at the start)."""
    sums = np.concatenate(([0.0], np.cumsum(values)))
    end = np.arange(1, len(values) + 1)
    start = np.maximum(end - window, 0)
    means: list[float] = ((sums[end] - sums[start]) / (end - start)).tolist()
    return means


def _paint_error(ax: Axes, rows: Sequence[BacktestRow], closes: _Closes, colours: _Colours) -> None:
    for label, model_rows in _by_model(rows).items():
        colour = colours[label]
        times = _times([r.target_open_time for r in model_rows])
        error = [abs(r.error) for r in model_rows]
        ax.plot(times, error, color=colour, lw=0.6, alpha=0.35, label=f"{label} |error|")
        ax.plot(
            times,
            _rolling_mean(error, _ROLLING_CANDLES),
            color=colour,
            lw=1.5,
            label=f"{label} rolling mean ({_ROLLING_CANDLES} candles)",
        )
    ax.set_ylabel("|predicted - actual close|")


_PAINTERS: dict[str, _Painter] = {
    "price_forecast": _paint_price,
    "equity": _paint_equity,
    "error": _paint_error,
}


# --- html ---------------------------------------------------------------------------------

_STYLE = """
body { font-family: system-ui, sans-serif; margin: 2em auto; max-width: 1150px; color: #222; }
table { border-collapse: collapse; margin: 0.5em 0 1.5em; font-size: 0.9em; }
th, td { padding: 0.25em 0.7em; border-bottom: 1px solid #ddd; text-align: right; }
th:first-child, td:first-child { text-align: left; }
img { max-width: 100%; }
.note { color: #a40; }
"""


def _e(value: object) -> str:
    return html.escape(str(value))


def _when(ms: int) -> str:
    return _utc(ms).strftime("%Y-%m-%d %H:%M:%S UTC")


def _num(value: float | None, spec: str) -> str:
    return "n/a" if value is None else format(value, spec)


def _table_html(header: Sequence[str], body: Sequence[Sequence[str]]) -> str:
    head = "".join(f"<th>{_e(h)}</th>" for h in header)
    lines = ["".join(f"<td>{_e(cell)}</td>" for cell in row) for row in body]
    rows = "".join(f"<tr>{line}</tr>" for line in lines)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{rows}</tbody></table>"


def _forecast_rows(label: str, metrics: Mapping[str, Metrics]) -> list[list[str]]:
    return [
        [
            label if name == MODEL else name,
            _num(m.pinball_bp, ".4f"),
            _num(m.pinball_skill, "+.4f"),
            _num(m.interval_score_bp, ".2f"),
            _num(m.mae, ".6g"),
            _num(m.rmse, ".6g"),
            _num(m.skill, "+.4f"),
            _num(m.directional_accuracy, ".1%"),
            _num(m.coverage_80, ".1%"),
            _num(m.interval_width_bp, ".2f"),
        ]
        for name, m in metrics.items()
    ]


_FORECAST_HEADER = ["forecaster", "pinball bp", "pinball skill", "interval score bp", "MAE",
                    "RMSE", "skill", "direction", "coverage 80%", "width bp"]
_STRATEGY_HEADER = [
    "series",
    "strategy",
    "candles",
    "total return",
    "Sharpe (annual)",
    "max drawdown",
    "position changes",
    "exposure",
]


def _strategy_row(series: str, name: str, s: StrategyMetrics) -> list[str]:
    return [
        series,
        name,
        str(s.candles),
        _num(s.total_return, "+.2%"),
        _num(s.sharpe, ".2f"),
        _num(s.max_drawdown, ".2%"),
        str(s.position_changes),
        _num(s.exposure, ".1%"),
    ]


def _model_html(label: str, model: ModelBacktest) -> str:
    parts = [
        f"<h2>Model {_e(label)}</h2>",
        f"<p>versions: {_e(', '.join(model.model_versions))}; {model.forecasts} forecasts "
        f"scored, {model.warmup} naive warm-up predictions skipped, {model.unscored} "
        "without a target candle or enough history for the baselines. Mean total return "
        f"over series: strategy {_num(model.mean_total_return, '+.2%')}, buy &amp; hold "
        f"{_num(model.mean_buy_and_hold_return, '+.2%')}.</p>",
        "<h3>Strategy vs buy &amp; hold</h3>",
        _table_html(
            _STRATEGY_HEADER,
            [
                row
                for s in model.series
                for row in (
                    _strategy_row(f"{s.symbol} {s.interval}", "directional", s.strategy),
                    _strategy_row(f"{s.symbol} {s.interval}", "buy & hold", s.buy_and_hold),
                )
            ],
        ),
    ]
    sections = [
        (
            f"{s.symbol} {s.interval}: {s.forecasts} forecasts, targets "
            f"{_when(s.first_target_open_time)} .. {_when(s.last_target_open_time)}",
            s.metrics,
        )
        for s in model.series
    ]
    if len(model.series) > 1:
        sections.append((f"all series pooled: {model.forecasts} forecasts", model.metrics))
    for title, metrics in sections:
        parts.append(f"<h3>Forecasts, {_e(title)}</h3>")
        parts.append(_table_html(_FORECAST_HEADER, _forecast_rows(label, metrics)))
    return "\n".join(parts)


def _html(result: BacktestResult, images: Mapping[str, bytes], *, shown: int, total: int) -> str:
    labels = list(result.models)
    costs = result.costs
    figures = []
    for name, png in images.items():
        data = base64.b64encode(png).decode("ascii")
        figures.append(
            f'<h3>{_e(FIGURES[name])}</h3>\n<img alt="{_e(name)}" '
            f'src="data:image/png;base64,{data}">'
        )
    note = (
        f'<p class="note">The figures show the first {shown} of {total} series; the tables '
        "cover all of them.</p>"
        if shown < total
        else ""
    )
    return f"""<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<title>Backtest: {_e(" vs ".join(labels))}</title>
<style>{_STYLE}</style>
</head>
<body>
<h1>Backtest: {_e(" vs ".join(labels))}</h1>
<p>Scored target candles {_when(result.first_target_open_time)} ..
{_when(result.last_target_open_time)}. Costs per unit of position change: fee
{_num(costs.fee_bp, "g")} bp + slippage {_num(costs.slippage_bp, "g")} bp
({_num(costs.per_change, ".4%")} of price).
Strategy: at each close, long if the forecast is above the last close,
{"flat" if result.long_only else "short"} if below, flat if equal. Every forecaster of a
model is scored on the same target candles; skill is 1 - MAE / MAE of persistence;
coverage counts closes inside the 10%-90% band.</p>
{"".join(_model_html(label, model) for label, model in result.models.items())}
<h2>Figures</h2>
{note}
{chr(10).join(figures)}
</body>
</html>
"""
