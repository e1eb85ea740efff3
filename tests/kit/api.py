"""The real API served by uvicorn in a background thread on a free port."""

import contextlib
import subprocess
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass

import httpx
import uvicorn
from fastapi import FastAPI

from makeusrich.api import create_app
from makeusrich.api.broadcast import Broadcaster
from makeusrich.core.settings import Settings


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
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, name="uvicorn-test", daemon=True)
    thread.start()
    deadline = time.monotonic() + 15
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            raise RuntimeError("uvicorn did not start")
        time.sleep(0.02)
    port = server.servers[0].sockets[0].getsockname()[1]
    try:
        yield RunningApi(f"http://127.0.0.1:{port}", app, settings)
    finally:
        server.should_exit = True
        thread.join(15)
        assert not thread.is_alive(), "uvicorn did not stop"


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
