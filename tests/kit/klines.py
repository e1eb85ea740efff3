"""Binance's own klines from the test data, and the comparison our candles must pass."""

import csv
from pathlib import Path
from typing import Any

import pytest

DATA = Path(__file__).parent.parent / "data"
TRADES_SLICE = DATA / "BTCUSDT-trades-2019-04-01-0000-0029.csv"
KLINES_1M_SLICE = DATA / "BTCUSDT-1m-2019-04-01-0000-0059.csv"  # 60 rows
KLINE_FIELDS = ["open_time", "open", "high", "low", "close", "volume", "close_time",
                "quote_volume", "trades", "taker_buy_volume", "taker_buy_quote_volume"]
_INTS = ("open_time", "close_time", "trades")


def binance_klines(minutes: int = 60) -> list[dict[str, Any]]:
    """Binance's own 1m klines for the first ``minutes`` of 2019-04-01 (at most 60)."""
    with KLINES_1M_SLICE.open() as fh:
        rows = [dict(zip(KLINE_FIELDS, row, strict=False)) for row in csv.reader(fh)][:minutes]
    return [{k: (int(v) if k in _INTS else float(v)) for k, v in row.items()} for row in rows]


def aggregate(klines: list[dict[str, Any]], n: int) -> list[dict[str, Any]]:
    """Binance's 1m klines rolled up into n-minute klines (exact for OHLCV sums)."""
    out = []
    for i in range(0, len(klines), n):
        group = klines[i:i + n]
        sums = ("volume", "quote_volume", "trades", "taker_buy_volume", "taker_buy_quote_volume")
        out.append({
            "open_time": group[0]["open_time"], "close_time": group[-1]["close_time"],
            "open": group[0]["open"], "close": group[-1]["close"],
            "high": max(k["high"] for k in group), "low": min(k["low"] for k in group),
            **{f: sum(k[f] for k in group) for f in sums},
        })
    return out


def assert_same_as_binance(ours: list[dict[str, Any]], binance: list[dict[str, Any]]) -> None:
    """Every kline field equal (sums of float quantities to 1e-9 relative)."""
    assert [c["open_time"] for c in ours] == [k["open_time"] for k in binance]
    for mine, theirs in zip(ours, binance, strict=True):
        for field in KLINE_FIELDS:
            assert mine[field] == pytest.approx(theirs[field], rel=1e-9, abs=1e-8), (
                f"{field} of the candle at {mine['open_time']}: ours {mine[field]}, "
                f"Binance's {theirs[field]} (trades: {mine['trades']} vs {theirs['trades']})")
