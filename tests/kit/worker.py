"""Watching a running `mur worker` through what it writes to Redis."""

import asyncio
import contextlib
import os
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import msgspec
import redis

from makeusrich.core.embedded import kill_with_parent, terminate
from makeusrich.core.settings import Settings
from makeusrich.stream.publisher import TradePublisher, ensure_topics
from makeusrich.stream.sources import read_trades, run_replay


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


def start_worker(settings: Settings) -> "subprocess.Popen[bytes]":
    """`mur worker` on ``settings``, as a child that dies with the test process."""
    return subprocess.Popen([sys.executable, "-m", "makeusrich", "worker"],
                            env={**os.environ, **settings.as_env()},
                            preexec_fn=kill_with_parent)


@contextlib.contextmanager
def worker_over(settings: Settings, trades_file: Path) -> Iterator[None]:
    """Publish ``trades_file`` (with its end-of-stream markers) to the settings' trades topic
    and run `mur worker` until it has folded all of it in; it is stopped when the block
    ends."""
    ensure_topics(settings)
    publisher = TradePublisher(settings)
    asyncio.run(run_replay(read_trades(trades_file), publisher, asyncio.Event(), None))
    publisher.close()
    worker = start_worker(settings)
    client = redis.Redis.from_url(settings.redis_url or "")
    stats = settings.redis_keys.worker_stats(settings.worker_id)
    try:
        wait_until(lambda: int(client.hget(stats, "end_of_streams") or 0) >= 1,
                   f"the worker to fold in {trades_file.name}")
        yield
    finally:
        terminate(worker, 30)
        client.close()
