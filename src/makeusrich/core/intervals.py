"""Binance kline intervals and their lengths in milliseconds."""

from makeusrich.core.errors import ConfigError

_UNIT_MS = {"s": 1_000, "m": 60_000, "h": 3_600_000, "d": 86_400_000}

#: The intervals this service builds candles for (a subset of Binance's kline intervals).
SUPPORTED_INTERVALS = ("1s", "1m", "3m", "5m", "15m", "30m", "1h", "2h", "4h", "1d")


def interval_ms(interval: str) -> int:
    """Length of a Binance interval such as ``"1m"`` in milliseconds."""
    if interval not in SUPPORTED_INTERVALS:
        raise ConfigError(
            f"unsupported interval {interval!r}; use one of {', '.join(SUPPORTED_INTERVALS)}"
        )
    return int(interval[:-1]) * _UNIT_MS[interval[-1]]


def parse_intervals(text: str) -> tuple[str, ...]:
    """Parse a comma-separated interval list, validating each one."""
    items = tuple(dict.fromkeys(part.strip() for part in text.split(",") if part.strip()))
    if not items:
        raise ConfigError("no interval given; pass e.g. --intervals 1m,5m")
    for item in items:
        interval_ms(item)
    return items
