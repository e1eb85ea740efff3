"""The real API: served by uvicorn in a background thread, or as a `mur api` child process;
reading its SSE streams and its Prometheus metrics."""

import asyncio
import contextlib
import os
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import uvicorn
from fastapi import FastAPI
from httpx_sse import EventSource, ServerSentEvent, aconnect_sse

from kit.metrics import total
from makeusrich.api import create_app, listen_socket
from makeusrich.api.broadcast import Broadcaster
from makeusrich.core.embedded import kill_with_parent, terminate
from makeusrich.core.settings import Settings
from makeusrich.core.store import RedisStore


def settings_factory(redis_url: str, **defaults: Any) -> Callable[..., Settings]:
    """``build(**overrides)``: Settings for an API on ``redis_url`` without Kafka, in a key
    namespace of the factory's own; ``overrides`` beat ``defaults``."""
    values: dict[str, Any] = {"redis_url": redis_url, "redis_prefix": f"t-{uuid.uuid4().hex[:10]}",
                              "kafka_bootstrap": None, **defaults}

    def build(**overrides: Any) -> Settings:
        return Settings(_env_file=None, **{**values, **overrides})

    return build


@dataclass
class RunningApi:
    base_url: str
    app: FastAPI
    settings: Settings

    @property
    def broadcaster(self) -> Broadcaster:
        broadcaster: Broadcaster = self.app.state.broadcaster
        return broadcaster


@contextlib.contextmanager
def serve_in_thread(settings: Settings, app: FastAPI | None = None) -> Iterator[RunningApi]:
    """``app`` (default: ``create_app(settings)``) served on a free port."""
    app = create_app(settings) if app is None else app
    config = uvicorn.Config(
        app, host="127.0.0.1", port=0, log_level="warning", timeout_graceful_shutdown=1
    )
    sock = listen_socket(config, settings)  # as `mur api` listens
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]},
                              name="uvicorn-test", daemon=True)
    thread.start()
    deadline = time.monotonic() + 15
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            raise RuntimeError("uvicorn did not start")
        time.sleep(0.02)
    port = sock.getsockname()[1]
    try:
        yield RunningApi(f"http://127.0.0.1:{port}", app, settings)
    finally:
        server.should_exit = True
        thread.join(15)
        assert not thread.is_alive(), "uvicorn did not stop"


@contextlib.asynccontextmanager
async def scratch_store(settings: Settings) -> AsyncIterator[RedisStore]:
    """A store on ``settings``; every key under its prefix is deleted afterwards."""
    store = RedisStore.from_settings(settings)
    try:
        yield store
        keys = [key async for key in store.client.scan_iter(match=f"{settings.redis_prefix}:*")]
        if keys:
            await store.client.delete(*keys)
    finally:
        await store.aclose()


@dataclass
class ApiProcess:
    """A running `mur api` child; ``log_path`` holds everything it printed."""

    base_url: str
    process: "subprocess.Popen[bytes]"
    log_path: Path

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")


@contextlib.contextmanager
def api_process(settings: Settings, log_path: Path) -> Iterator[ApiProcess]:
    """`mur api` on ``settings`` (listening on its ``api_port``), as a child that dies with
    the test process; stopped with SIGTERM when the block ends."""
    with log_path.open("wb") as log:
        process = subprocess.Popen(
            [sys.executable, "-m", "makeusrich", "api"],
            env={**os.environ, **settings.as_env()}, stdout=log, stderr=subprocess.STDOUT,
            preexec_fn=kill_with_parent,
        )
    base_url = f"http://127.0.0.1:{settings.api_port}"
    try:
        wait_http(f"{base_url}/healthz", process, timeout_s=30)
        yield ApiProcess(base_url, process, log_path)
    finally:
        terminate(process, 10)


def wait_http(url: str, process: "subprocess.Popen[bytes]", timeout_s: float) -> None:
    """Wait until ``url`` answers 200 while ``process`` (e.g. `mur up`) keeps running."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        assert process.poll() is None, "the process serving it exited early"
        try:
            if httpx.get(url, timeout=1).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    raise AssertionError(f"{url} did not answer within {timeout_s} s")


async def until_metric(base_url: str, name: str, value: float, timeout_s: float) -> None:
    """Wait until the API at ``base_url`` exports ``name`` = ``value``."""
    async with asyncio.timeout(timeout_s):
        while True:
            if await asyncio.to_thread(total, base_url, name) == value:
                return
            await asyncio.sleep(0.05)


async def wait_for(predicate: Callable[[], bool], timeout_s: float = 5.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError("condition not met in time")
        await asyncio.sleep(0.01)


class EventReader:
    """Reads an SSE connection in a background task, so waiting for "no more events" with a
    timeout does not cancel (and so end) httpx-sse's iterator."""

    def __init__(self, source: EventSource) -> None:
        self._queue: asyncio.Queue[ServerSentEvent | None] = asyncio.Queue()
        self._task = asyncio.create_task(self._pump(source))

    async def _pump(self, source: EventSource) -> None:
        try:
            async for event in source.aiter_sse():
                # httpx-sse turns each heartbeat comment into an event without data (and
                # with the last id); a browser dispatches nothing for it (WHATWG SSE).
                if event.data:
                    self._queue.put_nowait(event)
        except httpx.HTTPError:
            pass  # our side closed the connection
        finally:
            self._queue.put_nowait(None)

    async def next(self, n: int, timeout_s: float = 5.0) -> list[ServerSentEvent]:
        out = []
        async with asyncio.timeout(timeout_s):
            while len(out) < n:
                event = await self._queue.get()
                assert event is not None, f"stream ended after {len(out)} of {n} events"
                out.append(event)
        return out

    async def assert_quiet(self, wait_s: float = 0.3) -> None:
        await asyncio.sleep(wait_s)
        assert self._queue.empty(), f"unexpected event {self._queue.get_nowait()}"

    async def ended(self, timeout_s: float = 5.0) -> bool:
        async with asyncio.timeout(timeout_s):
            return await self._queue.get() is None

    async def close(self) -> None:
        self._task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._task


@contextlib.asynccontextmanager
async def sse_stream(client: httpx.AsyncClient, base_url: str,
                     headers: dict[str, str] | None = None) -> AsyncIterator[EventReader]:
    """``GET /v1/stream`` on ``client``, returned once the API at ``base_url`` counts one
    more SSE client (``mur_sse_clients``): from then on it is sent every new event."""
    before = await asyncio.to_thread(total, base_url, "mur_sse_clients")
    async with aconnect_sse(client, "GET", "/v1/stream", headers=dict(headers or {})) as source:
        assert source.response.status_code == 200, await source.response.aread()
        reader = EventReader(source)
        try:
            await until_metric(base_url, "mur_sse_clients", before + 1, timeout_s=10)
            yield reader
        finally:
            await reader.close()
