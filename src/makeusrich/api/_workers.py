"""Several API processes on one port (``Settings.api_workers`` > 1; Linux, SO_REUSEPORT).

The parent binds the port with SO_REUSEPORT and never listens on it: a socket that does
not listen takes no connections, it only holds the port (resolving port 0) while children
come and go. Each child binds its own listening socket to the same port, and the kernel
spreads new connections over them. Not uvicorn's ``workers=``: it needs the app as an
import string (settings read from the environment deep inside), and its processes share
one accept queue, where whichever is awake first takes the connection, so long-lived SSE
streams pile up on a few processes.

The parent restarts a child that dies (at most once a second per slot); SIGTERM or SIGINT
stop every child. A child dies with its parent (PR_SET_PDEATHSIG), so a killed parent
leaves none behind.
"""

import logging
import multiprocessing
import os
import signal
import socket
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from multiprocessing.connection import wait
from multiprocessing.process import BaseProcess
from types import FrameType

from makeusrich.core.embedded import kill_with_parent
from makeusrich.core.errors import ConfigError
from makeusrich.core.settings import Settings

__all__ = ["ChildSetup", "reuse_port_socket", "supervise"]

log = logging.getLogger(__name__)

_RESTART_INTERVAL_S = 1.0
# A child's graceful stop: uvicorn's (3 s), then its lifespan's (backtests get 3 s).
_STOP_TIMEOUT_S = 8.0
# The parent wakes at a child's exit, else this often: for restarts due after their
# backoff, and for a signal (its handler runs at once, but the wait goes on).
_POLL_S = 0.5


@dataclass(frozen=True, slots=True)
class ChildSetup:
    """What a child takes from its parent: a spawned process is a fresh interpreter,
    without the logging configuration of the entry point."""

    index: int
    parent_pid: int
    log_level: int
    log_formatter: logging.Formatter | None
    logger_levels: dict[str, int]

    @classmethod
    def of_parent(cls, index: int) -> "ChildSetup":
        root = logging.getLogger()
        formatter = root.handlers[0].formatter if root.handlers else None
        levels = {name: logger.level for name, logger in logging.Logger.manager.loggerDict.items()
                  if isinstance(logger, logging.Logger) and logger.level != logging.NOTSET}
        return cls(index, os.getpid(), root.level, formatter, levels)

    def apply(self) -> None:
        """First thing in the child: die with the parent, log as it does."""
        kill_with_parent()
        if os.getppid() != self.parent_pid:  # it died before the line above
            sys.exit(0)
        # Ctrl-C reaches the whole process group: the parent stops the children (SIGTERM).
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        logging.basicConfig(level=self.log_level)
        if self.log_formatter is not None:
            logging.getLogger().handlers[0].setFormatter(self.log_formatter)
        for name, level in self.logger_levels.items():
            logging.getLogger(name).setLevel(level)
        log.info("API process %d is pid %d", self.index, os.getpid())


def reuse_port_socket(host: str, port: int) -> socket.socket:
    """A TCP socket bound to ``host:port`` with SO_REUSEPORT, not listening."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn binds
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        sock.bind((host, port))
    except OSError as exc:
        sock.close()
        raise ConfigError(f"cannot bind the API to {host}:{port}: {exc}") from exc
    return sock


def supervise(settings: Settings, target: Callable[[Settings, ChildSetup], None]) -> None:
    """Run ``target(settings, setup)`` in ``settings.api_workers`` spawned processes
    sharing ``api_host:api_port``; blocks until SIGTERM or SIGINT, stops them, then
    re-raises that signal (as uvicorn does in a single process).

    ``target`` must be importable (a module-level function): spawn pickles it by name.
    """
    if not sys.platform.startswith("linux") or not hasattr(socket, "SO_REUSEPORT"):
        raise ConfigError(
            f"MUR_API_WORKERS={settings.api_workers} needs Linux (SO_REUSEPORT, which "
            "spreads connections over the processes); set MUR_API_WORKERS=1, or run "
            "several `mur api` behind a reverse proxy"
        )
    with reuse_port_socket(settings.api_host, settings.api_port) as reserved:
        port = reserved.getsockname()[1]
        settings = settings.model_copy(update={"api_port": port})
        log.info("API: %d processes on %s:%d", settings.api_workers, settings.api_host, port)
        signum = _Supervisor(settings, target).run()
    signal.raise_signal(signum)


def _exit_text(code: int | None) -> str:
    if code is not None and code < 0:
        return f"was killed by signal {-code} ({signal.strsignal(-code)})"
    return f"exited with code {code}"


class _Supervisor:
    """Keeps one child per slot running until a signal, then stops them all."""

    def __init__(self, settings: Settings,
                 target: Callable[[Settings, ChildSetup], None]) -> None:
        self._settings = settings
        self._target = target
        self._context = multiprocessing.get_context("spawn")
        self._children: list[BaseProcess | None] = [None] * settings.api_workers
        self._started_s = [-_RESTART_INTERVAL_S] * settings.api_workers
        self._signals: list[int] = []

    def run(self) -> int:
        """Supervise until SIGTERM or SIGINT; returns the first one received."""
        handlers = {sig: signal.signal(sig, self._on_signal)
                    for sig in (signal.SIGTERM, signal.SIGINT)}
        try:
            while not self._signals:
                self._start_missing()
                wait([child.sentinel for child in self._children if child is not None],
                     timeout=_POLL_S)
        finally:
            self._stop_all()
            for sig, handler in handlers.items():
                signal.signal(sig, handler)
        return self._signals[0]

    def _on_signal(self, signum: int, _frame: FrameType | None) -> None:
        self._signals.append(signum)

    def _start_missing(self) -> None:
        for index, child in enumerate(self._children):
            if child is not None:
                if child.is_alive():
                    continue
                log.error("API process %d (pid %s) %s; restarting it", index, child.pid,
                          _exit_text(child.exitcode))
                child.close()
                self._children[index] = None
            if time.monotonic() - self._started_s[index] < _RESTART_INTERVAL_S:
                continue  # a child dying at once must not turn into a busy loop
            child = self._context.Process(
                target=self._target, args=(self._settings, ChildSetup.of_parent(index)),
                name=f"mur-api-{index}",
            )
            child.start()
            self._children[index] = child
            self._started_s[index] = time.monotonic()

    def _stop_all(self) -> None:
        """SIGTERM every child (a graceful uvicorn shutdown), SIGKILL the ones still
        running after :data:`_STOP_TIMEOUT_S`."""
        children = [child for child in self._children if child is not None]
        for child in children:
            child.terminate()
        deadline = time.monotonic() + _STOP_TIMEOUT_S
        for child in children:
            child.join(max(0.0, deadline - time.monotonic()))
            if child.exitcode is None:
                log.warning("API process pid %s did not stop within %.0f s; killing it",
                            child.pid, _STOP_TIMEOUT_S)
                child.kill()
                child.join()
