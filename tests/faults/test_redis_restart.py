"""A real `mur api` while its redis-server is killed and restarted (append-only file, same
port): it answers clearly while Redis is away, recovers by itself, and its live and resumed
SSE streams have no gap and no duplicate; nothing is stored twice."""

import asyncio
import uuid
from collections.abc import AsyncIterator, Iterator, Sequence
from pathlib import Path

import httpx
import pytest
from redis.exceptions import RedisError

from kit.api import api_process, scratch_store, sse_stream
from kit.builders import make_candles, make_predictions, random_closes
from kit.metrics import total
from makeusrich.core.embedded import EmbeddedService, free_port, start_redis
from makeusrich.core.schemas import Candle, Prediction
from makeusrich.core.settings import Settings
from makeusrich.core.store import RedisStore

pytestmark = [pytest.mark.slow, pytest.mark.integration, pytest.mark.faults]

Record = Candle | Prediction


class _Redis:
    """The test's own redis-server, persisted in ``data_dir``, killed and restarted on its
    port."""

    def __init__(self, data_dir: Path, log_dir: Path) -> None:
        data_dir.mkdir()
        self._data_dir = data_dir
        self._log_dir = log_dir
        self.service: EmbeddedService = start_redis(log_dir=log_dir, data_dir=data_dir)

    def kill(self) -> None:
        self.service.process.kill()  # a crash: only the append-only file survives
        self.service.stop()

    def restart(self) -> None:
        self.service = start_redis(self.service.port, self._log_dir, self._data_dir)


@pytest.fixture
def redis_restartable(tmp_path: Path) -> Iterator[_Redis]:
    server = _Redis(tmp_path / "redis", tmp_path / "logs")
    yield server
    server.service.stop()


@pytest.fixture
def settings(redis_restartable: _Redis) -> Settings:
    return Settings(
        _env_file=None, redis_url=redis_restartable.service.url,
        redis_prefix=f"t-restart-{uuid.uuid4().hex[:8]}", kafka_bootstrap=None,
        symbols=("BTCUSDT",), intervals=("1m",), api_port=free_port(),
        sse_heartbeat_s=1.0,  # keeps the SSE clients' reads alive while Redis is away
        environment="dev",
    )


@pytest.fixture
async def store(settings: Settings) -> AsyncIterator[RedisStore]:
    async with scratch_store(settings) as store:
        yield store


async def _store_retrying(store: RedisStore, records: Sequence[Record]) -> list[str | None]:
    """Write as the worker does: a failed write is retried until Redis is back (the writes
    are idempotent, so a retry of one that did land stores nothing)."""
    while True:
        try:
            return await store.write_many(records)
        except (RedisError, OSError):
            await asyncio.sleep(0.05)


def _interleaved(candles: Sequence[Candle], predictions: Sequence[Prediction]) -> list[Record]:
    """Each candle followed by the prediction made at its close, as the worker writes."""
    return [record for pair in zip(candles, predictions, strict=True) for record in pair]


async def _until_status(client: httpx.AsyncClient, path: str, status: int) -> httpx.Response:
    """``path``'s first answer with ``status`` (the API notices Redis's state by itself)."""
    async with asyncio.timeout(30):
        while True:
            response = await client.get(path)
            if response.status_code == status:
                return response
            await asyncio.sleep(0.1)


async def test_api_rides_out_a_redis_restart(
    redis_restartable: _Redis, settings: Settings, store: RedisStore, tmp_path: Path
) -> None:
    candles = make_candles(random_closes(12), interval="1m")
    records = _interleaved(candles, make_predictions(candles, [c.close for c in candles]))
    await store.set_model("v-restart")
    first = await store.write_many(records[:8])  # candles 0-3
    with api_process(settings, tmp_path / "api.log") as api:
        async with httpx.AsyncClient(base_url=api.base_url, timeout=10) as client:
            assert (await client.get("/readyz")).status_code == 200
            async with sse_stream(client, api.base_url) as live:
                before_kill = await store.write_many(records[8:12])  # candles 4-5
                assert [e.id for e in await live.next(4)] == before_kill

                redis_restartable.kill()
                # Clear answers, at once (httpx's timeout is the bound), no stack trace.
                assert (await client.get("/healthz")).status_code == 200
                ready = await client.get("/readyz")
                assert ready.status_code == 503
                assert ready.json()["failed"] == ["redis", "model"]
                detail = ready.json()["checks"]["redis"]["detail"]
                assert detail.startswith("redis unreachable: ConnectionError: "), detail
                assert f"127.0.0.1:{redis_restartable.service.port}" in detail
                for path in ("/v1/candles/BTCUSDT", "/v1/predictions/latest",
                             "/v1/predictions/BTCUSDT/history"):
                    down = await client.get(path)
                    assert down.status_code == 503, path
                    assert down.json() == {
                        "detail": "storage unavailable: Redis is not answering; retry shortly"}
                refused = await _until_status(client, "/v1/stream", 503)
                assert refused.json() == {
                    "detail": "live events unavailable: the Redis subscription is down"}

                # The worker keeps trying to write candles 6-9; Redis comes back on its port.
                writer = asyncio.create_task(_store_retrying(store, records[12:20]))
                await asyncio.sleep(0.5)
                assert not writer.done()
                redis_restartable.restart()
                during = await writer
                assert None not in during
                # Redelivered records (at-least-once upstream) are refused, not stored twice.
                assert await _store_retrying(store, records[8:20]) == [None] * 12
                after = await store.write_many(records[20:24])  # candles 10-11

                # The stream that stayed open missed nothing and got nothing twice.
                got = [e.id for e in await live.next(12, timeout_s=30)]
                assert got == during + after
                await live.assert_quiet()

            # Everything answers again, without restarting the API.
            await _until_status(client, "/readyz", 200)
            history = (await client.get("/v1/candles/BTCUSDT")).json()
            assert [c["open_time"] for c in history] == [c.open_time for c in candles]
            # A client resuming from before the restart gets exactly what it missed.
            resume_from = {"Last-Event-ID": str(before_kill[1])}
            async with sse_stream(client, api.base_url, resume_from) as resumed:
                expected = [*before_kill[2:], *during, *after]
                got = [e.id for e in await resumed.next(len(expected))]
                assert got == expected
                await resumed.assert_quiet()
        assert api.process.poll() is None
        errors = await asyncio.to_thread(total, api.base_url, "mur_redis_errors_total")
        assert errors > 0  # the outage was counted

    # Stored once each: every history and the events stream.
    for kind in ("candle", "prediction"):
        history_key = settings.redis_keys.history(kind, "BTCUSDT", "1m")
        assert await store.client.xlen(history_key) == len(candles)
    events = await store.events_after("0-0", 1_000)
    assert [e.id for e in events] == [*first, *before_kill, *during, *after]
    assert len({(e.type, e.data) for e in events}) == len(records)
    log = api.log()
    assert "Traceback" not in log and "ERROR" not in log, log
