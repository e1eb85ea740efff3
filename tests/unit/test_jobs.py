"""Backtest jobs without services: the request body, the command line it becomes, and the
parsing of `mur backtest --progress jsonl` lines."""

import re
from pathlib import Path
from typing import Any

import pytest
from pydantic import ValidationError

from makeusrich.api.jobs import backtest_args, is_job_id, parse_progress_line
from makeusrich.api.models import BacktestIn

APRIL_1_MS = 1_554_076_800_000  # 2019-04-01T00:00Z


def body(**fields: Any) -> BacktestIn:
    return BacktestIn.model_validate({"models": ["champion"], "source": "kafka", **fields})


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("2019-04-01", APRIL_1_MS),
        ("2019-04-01T00:30", APRIL_1_MS + 30 * 60_000),
        ("2019-04-01T00:30:00Z", APRIL_1_MS + 30 * 60_000),
        ("2019-04-01T02:30+02:00", APRIL_1_MS + 30 * 60_000),
        (str(APRIL_1_MS), APRIL_1_MS),
        (APRIL_1_MS, APRIL_1_MS),
    ],
)
def test_times_become_epoch_ms(text: str | int, expected: int) -> None:
    assert body(start=text).start == expected


def test_defaults_and_normalisation() -> None:
    request = body(models=["champion", "champion"], symbols=["btcusdt", "BTCUSDT", "ethusdt"])
    assert request.models == ["champion"]
    assert request.symbols == ["BTCUSDT", "ETHUSDT"]
    assert (request.fee_bp, request.slippage_bp) == (10.0, 2.0)
    assert (request.start, request.end, request.interval) == (None, None, None)
    # Stored and echoed as plain JSON, read back unchanged (strict mode included).
    assert BacktestIn.model_validate(request.model_dump(mode="json")) == request


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"models": ["../champion"]}, "no path separators"),
        ({"models": ["a\\b"]}, "no path separators"),
        ({"models": ["-rf"]}, "invalid model name"),
        ({"symbols": ["BTC/USDT"]}, "invalid symbol"),
        ({"interval": "7m"}, "unsupported interval '7m'"),
        ({"start": "April"}, "invalid time 'April'"),
        ({"start": -1}, "epoch milliseconds must be >= 0"),
        ({"start": "2019-04-02", "end": "2019-04-01"}, "must be before end"),
        ({"fee_bp": float("nan")}, "finite number"),
        ({"fee_bp": "10"}, "valid number"),
        ({"source": "/tmp/trades.csv"}, "'kafka' or 'archive'"),
        ({"file": "x"}, "Extra inputs are not permitted"),
    ],
)
def test_invalid_bodies(fields: dict[str, Any], message: str) -> None:
    with pytest.raises(ValidationError, match=re.escape(message)):
        body(**fields)


def test_command_line(tmp_path: Path) -> None:
    request = body(
        models=["champion", "lstm-x"], source="archive", symbols=["ethusdt"], interval="5m",
        start="2019-04-01", end=APRIL_1_MS + 60_000, fee_bp=0, slippage_bp=1.5,
    )
    assert backtest_args(request, tmp_path) == [
        "--model", "champion", "--model", "lstm-x", "--from", "archive",
        "--symbols", "ETHUSDT", "--intervals", "5m",
        "--start", str(APRIL_1_MS), "--end", str(APRIL_1_MS + 60_000),
        "--fee-bp", "0.0", "--slippage-bp", "1.5",
        "--out", str(tmp_path), "--progress", "jsonl",
    ]
    assert backtest_args(body(), tmp_path) == [
        "--model", "champion", "--from", "kafka", "--fee-bp", "10.0", "--slippage-bp", "2.0",
        "--out", str(tmp_path), "--progress", "jsonl",
    ]


def test_progress_lines() -> None:
    line = parse_progress_line('{"stage": "score", "progress": 0.5, "message": "scoring"}')
    assert line is not None
    assert (line.stage, line.progress, line.message) == ("score", 0.5, "scoring")
    clamped = parse_progress_line('{"stage": "replay", "progress": 7}')
    assert clamped is not None and clamped.progress == 1.0 and clamped.message == ""
    no_number = parse_progress_line('{"stage": "replay", "progress": "half"}')
    assert no_number is not None and no_number.progress is None
    done = parse_progress_line('{"stage": "done", "progress": 1.0, "metrics": {"a": 1}}')
    assert done is not None and done.payload["metrics"] == {"a": 1}
    for bad in ("", "replaying 10%", "[1, 2]", '{"progress": 0.5}', '{"stage": 3}',
                '{"stage": ""}', '{"stage": "' + "x" * 100 + '"}', "{"):
        assert parse_progress_line(bad) is None, bad


def test_job_ids() -> None:
    assert is_job_id("0123456789abcdef0123456789abcdef")
    for bad in ("", "0123456789ABCDEF0123456789ABCDEF", "../" + "a" * 29, "a" * 33):
        assert not is_job_id(bad)
