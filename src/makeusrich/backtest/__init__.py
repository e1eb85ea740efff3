"""Backtests: replay a recorded span through the pipeline, score its forecasts and
strategy against baselines and buy-and-hold, and write a report directory."""

from makeusrich.backtest.report import write_report
from makeusrich.backtest.score import (
    BacktestResult,
    BacktestRow,
    Costs,
    backtest_rows,
    score_backtest,
)

__all__ = [
    "BacktestResult",
    "BacktestRow",
    "Costs",
    "backtest_rows",
    "score_backtest",
    "write_report",
]
