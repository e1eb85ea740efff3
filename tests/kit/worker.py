"""Watching a running `mur worker` through what it writes to Redis."""

import time
from collections.abc import Callable
from typing import Any

import msgspec
import redis

from makeusrich.core.settings import Settings


def wait_until(predicate: Callable[[], bool], what: str, timeout_s: float = 90) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.1)
    raise AssertionError(f"timed out waiting for {what}")


def history(client: redis.Redis, settings: Settings, kind: str, symbol: str = "BTCUSDT",
            interval: str = "1m") -> list[dict[str, Any]]:
    """Every candle or prediction record stored for one series, oldest first."""
    key = settings.redis_keys.history(kind, symbol, interval)
    return [msgspec.json.decode(fields[b"d"]) for _, fields in client.xrange(key)]


def worker_stats(client: redis.Redis, settings: Settings) -> dict[str, int]:
    raw = client.hgetall(settings.redis_keys.worker_stats(settings.worker_id))
    return {k.decode(): int(v) for k, v in raw.items()}
