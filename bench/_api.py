"""One ``mur api`` process over a redis-server, fed by a synthetic publisher: what the API
benchmarks (``bench.load``, ``bench.fanout``) measure, without a broker or a worker.

The publisher writes through :class:`RedisStore` as the worker does, stamping ``ts_ingest``
just before each write, so an SSE client's receipt time minus ``ts_ingest`` is the API's
delivery time.
"""

import asyncio
import contextlib
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Final

from bench._common import clean_env, open_access_env, spawn_mur, stop_process, wait_healthy
from makeusrich.core.embedded import free_port
from makeusrich.core.schemas import Candle, Prediction, now_ms
from makeusrich.core.store import RedisStore

__all__ = ["INTERVAL", "api_process", "candle", "prediction", "publisher", "records", "symbols"]

_SYMBOLS: Final = (
    "BTCUSDT", "ETHUSDT", "BNBUSDT", "SOLUSDT", "XRPUSDT", "ADAUSDT", "DOGEUSDT", "AVAXUSDT",
    "DOTUSDT", "LINKUSDT", "LTCUSDT", "TRXUSDT", "ATOMUSDT", "UNIUSDT", "XLMUSDT", "ETCUSDT",
    "FILUSDT", "APTUSDT", "NEARUSDT", "ARBUSDT",
)
INTERVAL: Final = "1m"
_MINUTE_MS: Final = 60_000
_T0_MS: Final = 1_700_000_040_000


def symbols(n: int) -> list[str]:
    """``n`` symbol names: real ones first, then made-up ``SYMnnnUSDT``."""
    return [*_SYMBOLS, *(f"SYM{i:03d}USDT" for i in range(len(_SYMBOLS), n))][:n]


def candle(symbol: str, i: int, ts_ingest: int) -> Candle:
    """The ``i``-th 1m candle of ``symbol`` (open times one minute apart)."""
    open_time = _T0_MS + i * _MINUTE_MS
    price = 100.0 + (i % 500) * 0.1
    return Candle(
        symbol=symbol, interval=INTERVAL, open_time=open_time,
        close_time=open_time + _MINUTE_MS - 1, open=price, high=price + 0.5, low=price - 0.5,
        close=price + 0.1, volume=3.5, quote_volume=350.0, trades=7, taker_buy_volume=1.5,
        taker_buy_quote_volume=150.0, source="sim", ts_event=open_time + _MINUTE_MS - 1,
        ts_ingest=ts_ingest,
    )


def prediction(symbol: str, i: int, ts_ingest: int) -> Prediction:
    open_time = _T0_MS + i * _MINUTE_MS
    price = 100.1 + (i % 500) * 0.1
    return Prediction(
        symbol=symbol, interval=INTERVAL, candle_open_time=open_time,
        target_open_time=open_time + _MINUTE_MS, last_close=price, predicted_close=price + 0.01,
        lower=price - 0.2, upper=price + 0.2, model_version="naive", made_at=ts_ingest,
        source="sim", ts_event=open_time + _MINUTE_MS - 1, ts_ingest=ts_ingest,
    )


def records(names: list[str], i: int) -> list[Candle | Prediction]:
    """The ``i``-th candle and prediction of every symbol, stamped now."""
    ts = now_ms()
    return [record for symbol in names
            for record in (candle(symbol, i, ts), prediction(symbol, i, ts))]


async def publisher(store: RedisStore, batch: Callable[[int], list[Candle | Prediction]],
                    interval_s: float, stop: asyncio.Event, first: int = 0) -> int:
    """Write ``batch(i)`` for i = first, first + 1, ... every ``interval_s`` (on a fixed
    schedule, in one round trip each) until ``stop``; returns how many events were written."""
    published, i = 0, first
    next_at = time.perf_counter()
    while not stop.is_set():
        written = await store.write_many(batch(i))
        published += sum(event_id is not None for event_id in written)
        i += 1
        next_at += interval_s
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), max(0.0, next_at - time.perf_counter()))
    return published


@contextlib.contextmanager
def api_process(redis_url: str, redis_prefix: str, names: list[str], sse_clients: int,
                tmp: Path, workers: int = 1) -> Iterator[tuple[str, subprocess.Popen[bytes]]]:
    """A ``mur api`` child on a free port (``MUR_API_WORKERS=workers``), open to
    ``sse_clients`` anonymous streams and more requests than offered; yields (base URL,
    process)."""
    port = free_port()
    env = clean_env({
        "MUR_REDIS_URL": redis_url, "MUR_REDIS_PREFIX": redis_prefix,
        "MUR_API_HOST": "127.0.0.1", "MUR_API_PORT": str(port), "MUR_SYMBOLS": ",".join(names),
        "MUR_INTERVALS": INTERVAL, "MUR_STATE_DIR": str(tmp / "state"),
        "MUR_API_WORKERS": str(workers),
        "MUR_LOG_LEVEL": "WARNING", **open_access_env(sse_clients),
    })
    log_path = tmp / "api.log"
    process = spawn_mur(["api"], env, log_path)
    base = f"http://127.0.0.1:{port}"
    try:
        wait_healthy(base, process, "mur api", log_path, 30)
        yield base, process
    finally:
        code = stop_process(process)
        # uvicorn shuts down gracefully, then re-raises the signal: -SIGTERM is a clean exit.
        if code not in (0, -signal.SIGTERM):
            print(f"warning: mur api exited with {code} on SIGTERM; log: {log_path}",
                  file=sys.stderr)
