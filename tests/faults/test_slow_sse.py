"""A client that stops reading its SSE stream, next to clients that keep up, on a real
`mur api`: the stuck one is dropped and its connection released, the others get every
event once and in order, and the API keeps answering."""

import asyncio
import contextlib
import socket
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import httpx
import pytest

from kit.api import ApiProcess, api_process, scratch_store, sse_stream, until_metric
from kit.builders import make_candles, random_closes
from kit.metrics import total
from makeusrich.core.embedded import EmbeddedService, free_port
from makeusrich.core.settings import Settings
from makeusrich.core.store import RedisStore

pytestmark = [pytest.mark.slow, pytest.mark.integration, pytest.mark.faults]

NORMAL_CLIENTS = 3
QUEUE_MAX = 50
# Events written per round, each round read by every normal client before the next: well
# under QUEUE_MAX, so only a client that stopped reading can fall behind.
BATCH = 25
# The stuck client's connection has accepted nothing since its first events: the kernel
# drops it this long after. Long enough for the buffers in between (the kernel's send
# buffer grows to MBs) to fill first, so that the queue overflows first.
SEND_TIMEOUT_S = 12.0
# Bound on the events written before the stuck client's queue must have overflowed: the
# kernel buffers ~4 MB (~10,000 events) at most before the API's send blocks.
MAX_EVENTS = 30_000


@pytest.fixture
def settings(redis_server: EmbeddedService) -> Settings:
    return Settings(
        _env_file=None, redis_url=redis_server.url, redis_prefix=f"t-slow-{uuid.uuid4().hex[:8]}",
        kafka_bootstrap=None, symbols=("BTCUSDT",), intervals=("1s",), api_port=free_port(),
        sse_client_queue_max=QUEUE_MAX, api_send_timeout_s=SEND_TIMEOUT_S,
        sse_heartbeat_s=1.0,  # keeps the normal clients' reads alive while nothing is written
        environment="dev", log_level="WARNING",
    )


@pytest.fixture
def api(settings: Settings, tmp_path: Path) -> Iterator[ApiProcess]:
    with api_process(settings, tmp_path / "api.log") as running:
        yield running


@pytest.fixture
async def store(settings: Settings) -> AsyncIterator[RedisStore]:
    async with scratch_store(settings) as store:
        yield store


async def _metric(api: ApiProcess, name: str) -> float:
    return await asyncio.to_thread(total, api.base_url, name)


def _stuck_client(api: ApiProcess) -> socket.socket:
    """Opens /v1/stream with a tiny receive window and never reads."""
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1024)  # before connect: the window
    sock.connect(("127.0.0.1", int(api.base_url.rsplit(":", 1)[1])))
    sock.sendall(b"GET /v1/stream HTTP/1.1\r\nHost: 127.0.0.1\r\n"
                 b"Accept: text/event-stream\r\n\r\n")
    return sock


def _read_to_the_end(sock: socket.socket) -> tuple[int, BaseException | None]:
    """Read until the server closes (None) or resets (the error): (bytes read, error)."""
    sock.settimeout(10)
    received = 0
    try:
        while chunk := sock.recv(65_536):
            received += len(chunk)
    except OSError as exc:
        return received, exc
    return received, None


async def test_stuck_client_is_dropped_and_released_others_get_everything(
    api: ApiProcess, store: RedisStore
) -> None:
    candles = make_candles(random_closes(MAX_EVENTS + 4 * BATCH), interval="1s")
    async with contextlib.AsyncExitStack() as stack:
        client = await stack.enter_async_context(
            httpx.AsyncClient(base_url=api.base_url, timeout=10))
        readers = [await stack.enter_async_context(sse_stream(client, api.base_url))
                   for _ in range(NORMAL_CLIENTS)]
        stuck = stack.enter_context(_stuck_client(api))
        await until_metric(api.base_url, "mur_sse_clients", NORMAL_CLIENTS + 1, timeout_s=10)

        written: list[str] = []
        received: list[list[str]] = [[] for _ in readers]

        async def round_trip(start: int) -> None:
            ids = await store.write_many(candles[start:start + BATCH])
            assert None not in ids
            written.extend(str(i) for i in ids)
            for reader, got in zip(readers, received, strict=True):
                got.extend(event.id for event in await reader.next(BATCH, timeout_s=20))

        while await _metric(api, "mur_sse_clients_dropped_total") == 0:
            assert len(written) < MAX_EVENTS, "the stuck client was never dropped"
            for _ in range(10):
                await round_trip(len(written))

        # The API keeps answering while the stuck client holds its connection.
        latest = await client.get("/v1/candles/BTCUSDT", params={"interval": "1s", "limit": 2})
        assert latest.status_code == 200
        assert [c["open_time"] for c in latest.json()] == [
            c.open_time for c in candles[len(written) - 2:len(written)]]
        for _ in range(2):  # and the others keep receiving
            await round_trip(len(written))

        # The kernel drops the connection that accepts nothing: the stream ends, and the
        # server forgets the socket with the MBs it had buffered for it.
        await until_metric(api.base_url, "mur_sse_clients", NORMAL_CLIENTS,
                           timeout_s=SEND_TIMEOUT_S + 30)
        read, error = await asyncio.to_thread(_read_to_the_end, stuck)
        assert isinstance(error, ConnectionResetError), (read, error)
        assert read < 64 * 1024  # only what was already in its own receive buffer
        await round_trip(len(written))

        assert await _metric(api, "mur_sse_clients_dropped_total") == 1
        for got in received:
            assert got == written  # every event, in order, once
        for reader in readers:
            await reader.assert_quiet()
    log = api.log()
    assert "Traceback" not in log and "ERROR" not in log, log
