"""What every response of a public API needs, whatever the route: security headers, CORS
from settings, a request-size limit, and errors that never show a stack trace.

The middlewares are plain ASGI (no ``BaseHTTPMiddleware``), so SSE responses stream through
them unbuffered.
"""

import logging
from typing import Final

from fastapi import FastAPI, Request
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import JSONResponse
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from makeusrich.core.settings import Settings

__all__ = ["harden"]

log = logging.getLogger(__name__)

_SECURITY_HEADERS: Final = [
    (b"x-content-type-options", b"nosniff"),
    (b"x-frame-options", b"DENY"),
    (b"referrer-policy", b"no-referrer"),
    (b"cross-origin-opener-policy", b"same-origin"),
    (b"cross-origin-resource-policy", b"same-origin"),
]
# The dashboard loads only its own files; /docs and /redoc load FastAPI's UI from a CDN, so
# they keep no CSP rather than a broken page.
_CSP: Final = (b"content-security-policy",
               b"default-src 'self'; img-src 'self' data:; object-src 'none'; "
               b"base-uri 'none'; frame-ancestors 'none'")
_NO_CSP_PATHS: Final = ("/docs", "/redoc")


class _SecurityHeaders:
    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        extra = list(_SECURITY_HEADERS)
        if not str(scope["path"]).startswith(_NO_CSP_PATHS):
            extra.append(_CSP)

        async def send_with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                present = {name.lower() for name, _ in message.get("headers", [])}
                message["headers"] = [*message.get("headers", []),
                                      *(h for h in extra if h[0] not in present)]
            await send(message)

        await self.app(scope, receive, send_with_headers)


class _BodyLimit:
    """413 for a request body over ``max_bytes``: at once from Content-Length, or as soon as
    a chunked body passes the limit."""

    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = dict(scope["headers"]).get(b"content-length")
        if declared is not None and (not declared.isdigit() or int(declared) > self.max_bytes):
            await self._refuse(scope, receive, send)
            return
        received = 0
        too_large = refused = False

        async def counting_receive() -> Message:
            nonlocal received, too_large
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_bytes:
                    too_large = True
                    raise _TooLarge
            return message

        async def guarded_send(message: Message) -> None:
            nonlocal refused
            # The app may turn the read error into its own answer (FastAPI: 400): ours wins.
            if not too_large:
                await send(message)
            elif message["type"] == "http.response.start" and not refused:
                refused = True
                await self._refuse(scope, receive, send)

        try:
            await self.app(scope, counting_receive, guarded_send)
        except _TooLarge:
            if not refused:
                await self._refuse(scope, receive, send)

    async def _refuse(self, scope: Scope, receive: Receive, send: Send) -> None:
        response = JSONResponse(
            {"detail": f"request body too large: at most {self.max_bytes} bytes"},
            status_code=413,
        )
        await response(scope, receive, send)


class _TooLarge(Exception):
    pass


async def _internal_error(request: Request, exc: Exception) -> JSONResponse:
    # Logged in full here; the client learns only that it was our fault.
    log.exception("unhandled error serving %s %s", request.method, request.url.path,
                  exc_info=exc)
    return JSONResponse({"detail": "internal server error"}, status_code=500)


def harden(app: FastAPI, settings: Settings) -> None:
    """Install the middlewares and the catch-all error handler on ``app``."""
    app.add_exception_handler(Exception, _internal_error)
    if settings.cors_origins:
        app.add_middleware(
            CORSMiddleware,
            allow_origins=list(settings.cors_origins),
            allow_methods=["GET", "POST"],
            allow_headers=["Authorization", "X-API-Key", "Last-Event-ID", "Content-Type"],
            expose_headers=["RateLimit-Limit", "RateLimit-Remaining", "RateLimit-Reset",
                            "RateLimit-Policy", "Retry-After", "X-Quota-Limit",
                            "X-Quota-Remaining", "X-Quota-Reset"],
            max_age=600,
        )
    app.add_middleware(_BodyLimit, max_bytes=settings.max_body_bytes)
    app.add_middleware(_SecurityHeaders)
