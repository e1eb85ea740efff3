"""``MUR_API_WORKERS`` > 1: `mur api` as several processes sharing one port (SO_REUSEPORT),
run as a real child process against a real redis-server. Which process holds a connection
is read from the kernel (psutil)."""

import contextlib
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import psutil
import pytest
from pydantic import ValidationError

from kit.api import ApiProcess, api_process, settings_factory
from makeusrich.api._workers import supervise
from makeusrich.core.embedded import EmbeddedService, free_port
from makeusrich.core.errors import ConfigError
from makeusrich.core.settings import Settings

# Two interpreters importing the API at once on a small machine take a while to listen.
_START_TIMEOUT_S = 60.0


@dataclass
class _Api:
    run: ApiProcess
    port: int
    parent: psutil.Process
    children: list[psutil.Process]


def _listening(process: psutil.Process, port: int) -> bool:
    with contextlib.suppress(psutil.NoSuchProcess):
        return any(c.status == psutil.CONN_LISTEN and c.laddr.port == port
                   for c in process.net_connections("tcp"))
    return False


def _established(process: psutil.Process, port: int) -> int:
    return sum(c.status == psutil.CONN_ESTABLISHED and c.laddr.port == port
               for c in process.net_connections("tcp"))


def _api_children(parent: psutil.Process, port: int, count: int,
                  without: frozenset[int] = frozenset()) -> list[psutil.Process]:
    """Wait until ``count`` children of ``parent`` (none of ``without``) listen on ``port``:
    the API processes, not multiprocessing's resource tracker."""
    deadline = time.monotonic() + _START_TIMEOUT_S
    while True:
        assert parent.is_running(), "the parent exited"
        children = [child for child in parent.children()
                    if child.pid not in without and _listening(child, port)]
        if len(children) == count:
            return children
        assert time.monotonic() < deadline, f"{len(children)} of {count} processes listen"
        time.sleep(0.2)


def _healthy_on_fresh_connections(base_url: str, requests: int) -> None:
    for _ in range(requests):
        assert httpx.get(f"{base_url}/healthz", timeout=10).status_code == 200


@pytest.fixture
def api(redis_server: EmbeddedService, tmp_path: Path) -> Iterator[_Api]:
    port = free_port()
    settings = settings_factory(redis_server.url)(api_port=port, api_workers=2,
                                                  state_dir=tmp_path / "state")
    with api_process(settings, tmp_path / "api.log") as run:
        parent = psutil.Process(run.process.pid)
        children = _api_children(parent, port, 2)
        spawned = {child.pid: child for child in parent.children()}
        try:
            yield _Api(run, port, parent, children)
        finally:
            with contextlib.suppress(psutil.NoSuchProcess):  # a test may have stopped it
                spawned |= {child.pid: child for child in parent.children()}
    # Whatever the test did, nothing of this API may outlive it.
    _, alive = psutil.wait_procs(spawned.values(), timeout=10)
    for process in alive:
        process.kill()
    assert not alive, f"left behind: {alive}\n{run.log()}"


@pytest.mark.parametrize("workers", [1, 64])
def test_api_workers_in_range(workers: int) -> None:
    assert Settings(_env_file=None, api_workers=workers).api_workers == workers


@pytest.mark.parametrize("workers", [0, 65])
def test_api_workers_out_of_range(workers: int) -> None:
    with pytest.raises(ValidationError, match="api_workers"):
        Settings(_env_file=None, api_workers=workers)


def test_workers_need_linux(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(sys, "platform", "darwin")
    settings = Settings(_env_file=None, api_workers=2, api_port=free_port())
    with pytest.raises(ConfigError, match="MUR_API_WORKERS=2 needs Linux"):
        supervise(settings, lambda _settings, _setup: None)


@pytest.mark.integration
def test_zero_workers_is_refused() -> None:
    env = {**os.environ, "MUR_API_WORKERS": "0", "MUR_REDIS_URL": "redis://127.0.0.1:1"}
    result = subprocess.run([sys.executable, "-m", "makeusrich", "api"], env=env,
                            capture_output=True, text=True, timeout=60, check=False)
    assert result.returncode == 2, result.stderr
    assert "invalid settings: MUR_API_WORKERS: Input should be greater than or equal to 1" \
        in result.stderr
    assert "Traceback" not in result.stderr


@pytest.mark.integration
@pytest.mark.slow
def test_connections_spread_over_the_processes(api: _Api) -> None:
    log = api.run.log()
    assert f"API: 2 processes on 127.0.0.1:{api.port}" in log
    for child in api.children:  # spawned afresh, they log as the parent does
        assert re.search(rf" INFO makeusrich\.api\._workers: API process [01] is pid "
                         rf"{child.pid}$", log, re.MULTILINE), log
    with contextlib.ExitStack() as stack:
        for _ in range(16):  # each its own connection: the kernel picks a process for each
            client = stack.enter_context(httpx.Client(base_url=api.run.base_url, timeout=10))
            response = stack.enter_context(client.stream("GET", "/v1/stream"))
            assert response.status_code == 200
        streams = {child.pid: _established(child, api.port) for child in api.children}
    assert sum(streams.values()) == 16, streams
    assert all(streams.values()), f"one process holds every stream: {streams}"


@pytest.mark.integration
@pytest.mark.slow
def test_a_killed_process_is_restarted(api: _Api) -> None:
    victim, survivor = api.children
    victim.kill()
    _, alive = psutil.wait_procs([victim], timeout=10)  # reaped by the parent
    assert not alive
    _healthy_on_fresh_connections(api.run.base_url, 20)  # the survivor takes them all
    children = _api_children(api.parent, api.port, 2, without=frozenset({victim.pid}))
    assert survivor.pid in {child.pid for child in children}
    assert f"(pid {victim.pid}) was killed by signal {signal.SIGKILL}" in api.run.log()
    _healthy_on_fresh_connections(api.run.base_url, 20)


@pytest.mark.integration
@pytest.mark.slow
def test_sigterm_stops_every_process(api: _Api) -> None:
    children = api.parent.children()  # the API processes and the resource tracker
    with (
        httpx.Client(base_url=api.run.base_url, timeout=10) as client,
        client.stream("GET", "/v1/stream") as response,  # ended by the shutdown
    ):
        assert response.status_code == 200
        started_s = time.monotonic()
        api.run.process.send_signal(signal.SIGTERM)
        code = api.run.process.wait(timeout=15)
        _, alive = psutil.wait_procs(children, timeout=5)
        elapsed_s = time.monotonic() - started_s
    assert not alive
    assert elapsed_s < 6, elapsed_s
    # As in one process: a graceful stop, then the signal re-raised.
    assert code == -signal.SIGTERM, api.run.log()
    assert "ERROR" not in api.run.log() and "Traceback" not in api.run.log(), api.run.log()


@pytest.mark.integration
@pytest.mark.slow
def test_children_die_with_a_killed_parent(api: _Api) -> None:
    children = api.parent.children()
    api.run.process.kill()
    api.run.process.wait(timeout=5)
    _, alive = psutil.wait_procs(children, timeout=10)
    assert not alive
