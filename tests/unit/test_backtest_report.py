"""The backtest report directory: every file written whole, the JSON and Parquet holding
the scored result, and one self-contained HTML page comparing two models."""

import base64
from dataclasses import dataclass
from pathlib import Path

import msgspec
import pyarrow.parquet as pq
import pytest

from kit.builders import make_candles, make_predictions, random_closes
from makeusrich.backtest import (
    BacktestResult,
    BacktestRow,
    Costs,
    backtest_rows,
    score_backtest,
    write_report,
)
from makeusrich.backtest.report import FIGURES
from makeusrich.core.schemas import Candle, Prediction
from makeusrich.trainer.evaluate import MODEL

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _inputs(symbols: int = 2) -> tuple[list[Candle], dict[str, list[Prediction]]]:
    """Candles of ``symbols`` series and two models: one always calling up (after a naive
    warm-up), and the naive one."""
    candles: list[Candle] = []
    lstm: list[Prediction] = []
    naive: list[Prediction] = []
    for i in range(symbols):
        series = make_candles(
            random_closes(70 - 5 * i, seed=20 + i, start=100.0 * (i + 1)), symbol=f"SYM{i}USDT"
        )
        candles += series
        up = [c.close * 1.002 for c in series]
        lstm += make_predictions(series, up, model_version="lstm-v1", warmup=30)
        same = [c.close for c in series]
        naive += make_predictions(series, same, model_version="naive")
    return candles, {"lstm": lstm, "naive": naive}


@dataclass(frozen=True)
class _Written:
    result: BacktestResult
    files: dict[str, Path]
    candles: list[Candle]
    predictions: dict[str, list[Prediction]]


@pytest.fixture(scope="module")
def report(tmp_path_factory: pytest.TempPathFactory) -> _Written:
    """A report of two models on two series (drawn once: figures take a while)."""
    candles, predictions = _inputs()
    result = score_backtest(candles, predictions, Costs(fee_bp=7.5, slippage_bp=1.0))
    files = write_report(tmp_path_factory.mktemp("report"), result, candles, predictions)
    return _Written(result, files, candles, predictions)


def test_every_file_is_written_whole(report: _Written) -> None:
    files = report.files
    assert set(files) == {"metrics", "predictions", "report", *FIGURES}
    assert files["metrics"].name == "metrics.json"
    assert files["predictions"].name == "predictions.parquet"
    assert files["report"].name == "report.html"
    out_dir = files["report"].parent
    assert sorted(p.name for p in out_dir.iterdir()) == sorted(p.name for p in files.values())
    for name in FIGURES:
        assert files[name].name == f"{name}.png"
        assert files[name].read_bytes().startswith(PNG_MAGIC)


def test_metrics_json_decodes_to_the_result(report: _Written) -> None:
    result, files = report.result, report.files
    text = files["metrics"].read_text()
    assert msgspec.json.decode(text, type=BacktestResult) == result
    assert text.startswith("{\n  ")  # indented for people
    assert "strategy_return" not in text  # the per-candle table lives in the Parquet file


def test_predictions_parquet_holds_the_per_candle_table(report: _Written) -> None:
    result, files = report.result, report.files
    table = pq.read_table(files["predictions"])

    columns = [f.name for f in msgspec.structs.fields(BacktestRow)]
    assert table.column_names == columns
    assert {"candle_open_time", "actual_close", "equity", "buy_hold_equity"} <= set(columns)
    assert str(table.schema.field("target_open_time").type) == "int64"
    assert str(table.schema.field("predicted_close").type) == "double"
    assert table.num_rows == sum(m.forecasts for m in result.models.values())
    rows = backtest_rows(result, report.candles, report.predictions)
    assert table.to_pylist() == [msgspec.structs.asdict(r) for r in rows]
    assert set(table.column("model").to_pylist()) == {"lstm", "naive"}


def test_html_embeds_the_figures_and_the_metrics(report: _Written) -> None:
    result, files = report.result, report.files
    page = files["report"].read_text()

    assert page.count('src="data:image/png;base64,') == len(FIGURES)
    for name in FIGURES:
        assert base64.b64encode(files[name].read_bytes()).decode() in page
    assert "http://" not in page and "https://" not in page  # opens offline
    assert "fee\n7.5 bp + slippage 1 bp" in page
    assert "2019-04-01 00:31:00 UTC" in page  # the first scored target
    for label, model in result.models.items():
        assert f"Model {label}</h2>" in page
        for series in model.series:
            title = f"{series.symbol} {series.interval}"
            assert f"Forecasts, {title}:" in page
            for name, metrics in series.metrics.items():
                shown = label if name == MODEL else name
                assert (f"<td>{shown}</td><td>{metrics.pinball_bp:.4f}</td>"
                        f"<td>{metrics.pinball_skill:+.4f}</td>"
                        f"<td>{metrics.interval_score_bp:.2f}</td><td>{metrics.mae:.6g}</td>"
                        f"<td>{metrics.rmse:.6g}") in page
                assert f"<td>{metrics.coverage_80:.1%}</td>" in page
            shown_strategies = (
                ("directional", series.strategy),
                ("buy &amp; hold", series.buy_and_hold),
            )
            for kind, strategy in shown_strategies:
                assert (
                    f"<td>{title}</td><td>{kind}</td><td>{strategy.candles}</td>"
                    f"<td>{strategy.total_return:+.2%}</td>"
                ) in page
                sharpe = "n/a" if strategy.sharpe is None else f"{strategy.sharpe:.2f}"
                assert f"<td>{sharpe}</td><td>{strategy.max_drawdown:.2%}</td>" in page
    # Two series: the pooled scores are shown too.
    assert "Forecasts, all series pooled:" in page


def test_two_models_share_one_report(report: _Written) -> None:
    result, files = report.result, report.files
    page = files["report"].read_text()
    assert list(result.models) == ["lstm", "naive"]
    assert "<title>Backtest: lstm vs naive</title>" in page
    assert page.index("Model lstm</h2>") < page.index("Model naive</h2>")
    # The naive model never calls a move, so it never trades; the other always does.
    assert "<td>directional</td><td>39</td><td>+0.00%</td><td>n/a</td><td>0.00%" in page


def test_text_is_escaped(tmp_path: Path) -> None:
    candles, predictions = _inputs(symbols=1)
    evil = {"<b>x</b>": predictions["lstm"]}
    result = score_backtest(candles, evil, Costs())

    page = write_report(tmp_path, result, candles, evil)["report"].read_text()

    assert "&lt;b&gt;x&lt;/b&gt;" in page
    assert "<b>x</b>" not in page
    assert "Forecasts, all series pooled" not in page  # one series: nothing to pool


def test_rewriting_replaces_the_report(tmp_path: Path) -> None:
    candles, predictions = _inputs(symbols=1)
    first = score_backtest(candles, predictions, Costs())
    write_report(tmp_path, first, candles, predictions)
    second = score_backtest(candles, predictions, Costs(fee_bp=0.0, slippage_bp=0.0))

    files = write_report(tmp_path, second, candles, predictions)

    assert msgspec.json.decode(files["metrics"].read_bytes(), type=BacktestResult) == second
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary files


def test_many_series_are_plotted_up_to_a_limit(tmp_path: Path) -> None:
    candles, predictions = _inputs(symbols=7)
    result = score_backtest(candles, predictions, Costs())

    page = write_report(tmp_path, result, candles, predictions)["report"].read_text()

    assert "The figures show the first 6 of 7 series" in page
    assert page.count("<td>SYM6USDT 1m</td><td>directional</td>") == 2  # tables show all
