"""HTTP API: REST for candles and predictions, SSE for live events."""

import gc
import socket

import uvicorn
from fastapi import FastAPI

from makeusrich.api._workers import ChildSetup, reuse_port_socket, supervise
from makeusrich.api.app import create_app
from makeusrich.core.settings import Settings

__all__ = ["create_app", "listen_socket", "serve"]

# Open SSE streams are ended at shutdown (see _Server); backtest progress streams end
# within ~1.5 s by themselves (see routes/backtests.py), so this bound rarely bites.
_GRACEFUL_SHUTDOWN_S = 3


class _Server(uvicorn.Server):
    """uvicorn's server, ending live SSE streams when it stops: they never end by
    themselves, and would hold the graceful shutdown until its timeout."""

    async def shutdown(self, sockets: list[socket.socket] | None = None) -> None:
        app = self.config.app
        broadcaster = getattr(app.state, "broadcaster", None) if isinstance(app, FastAPI) else None
        if broadcaster is not None:
            broadcaster.end_streams()
        await super().shutdown(sockets)


def serve(settings: Settings) -> None:
    """Run the API with uvicorn on ``settings.api_host:api_port``; blocks.

    ``settings.api_workers`` > 1 runs that many processes sharing the port (see
    :mod:`makeusrich.api._workers`); this process then only supervises them.

    On Ctrl-C/SIGTERM open SSE streams end at once and the server stops;
    uvicorn then re-raises the signal (``KeyboardInterrupt`` for Ctrl-C) for the caller.
    """
    if settings.api_workers == 1:
        _run(settings, reuse_port=False)
    else:
        supervise(settings, _serve_child)


def _serve_child(settings: Settings, setup: ChildSetup) -> None:
    """One of the ``api_workers`` processes, spawned by :func:`supervise`."""
    setup.apply()
    _run(settings, reuse_port=True)


def _run(settings: Settings, *, reuse_port: bool) -> None:
    """Serve in this process, on a socket of its own (``reuse_port``: shared with others)."""
    config = uvicorn.Config(
        create_app(settings),
        host=settings.api_host,
        port=settings.api_port,
        log_level=settings.log_level.lower(),
        workers=1,
        timeout_graceful_shutdown=_GRACEFUL_SHUTDOWN_S,
        server_header=False,  # no software banner for clients
        # The client address (rate limits per IP) comes from X-Forwarded-For only when the
        # connection is from one of these proxies; uvicorn's own env variable is not read.
        proxy_headers=True,
        forwarded_allow_ips=list(settings.forwarded_allow_ips),
    )
    sock = listen_socket(config, settings, reuse_port=reuse_port)
    # Everything loaded so far lives as long as the process: out of the collector's way.
    # Otherwise each full collection walks those ~400k objects, stalling every SSE client
    # for ~190 ms (measured at 1,000 clients).
    gc.collect()
    gc.freeze()
    # Each burst allocates a few objects per client: collect young ones less often (at
    # 5,000 clients, p99 518 -> 198 ms with the default thresholds of 700, 10, 10).
    gc.set_threshold(10_000, 20, 20)
    _Server(config).run(sockets=[sock])


def listen_socket(
    config: uvicorn.Config, settings: Settings, *, reuse_port: bool = False
) -> socket.socket:
    """``config``'s listening socket, for ``uvicorn.Server.run(sockets=[...])``; with
    ``reuse_port``, one of several processes' on the same port (SO_REUSEPORT).

    A client that stops reading (or vanishes) fills the kernel's send buffer, then the
    transport's, and the response's next send waits for room that never comes: its stream
    would hold its task, queue and socket for ever, as uvicorn's close of a connection
    waits for unsent bytes to go out. So every connection carries TCP_USER_TIMEOUT (Linux;
    accepted sockets inherit it): once it has accepted nothing for
    ``settings.api_send_timeout_s`` the kernel drops it, the pending send returns, the
    stream ends and everything it held is released. Elsewhere the SSE send timeout (the
    same setting) still ends the stream.
    """
    sock = reuse_port_socket(config.host, config.port) if reuse_port else config.bind_socket()
    if hasattr(socket, "TCP_USER_TIMEOUT"):
        timeout_ms = int(settings.api_send_timeout_s * 1000)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_USER_TIMEOUT, timeout_ms)
    return sock
