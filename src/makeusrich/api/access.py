"""Who may call the API, and how much: API keys, anonymous clients and their limits.

:class:`AccessMiddleware` is plain ASGI (no ``BaseHTTPMiddleware``): SSE responses stream
through it unbuffered, and it only adds headers to the response start. For every request
that is not public it

1. reads the key from ``Authorization: Bearer <key>`` or ``X-API-Key: <key>``; without one
   the client is anonymous when ``Settings.anonymous_allowed`` (limited by its IP address,
   as uvicorn reports it: behind a reverse proxy set ``MUR_FORWARDED_ALLOW_IPS``), else 401;
2. runs :meth:`makeusrich.access.Limiter.check`: one Redis round trip that also refuses
   unknown and revoked keys (401 with ``WWW-Authenticate: Bearer``) and counts the request
   against the limits of its route class, or refuses it (429 with ``Retry-After``);
3. adds the limits left to the response, whatever its status: ``RateLimit-Limit``,
   ``RateLimit-Remaining``, ``RateLimit-Reset`` (the route class's token bucket: its size,
   the tokens left, seconds until it is full again; IETF draft
   ``draft-ietf-httpapi-ratelimit-headers``), ``RateLimit-Policy`` (``{size};w=60`` and
   ``{daily};w=86400``), and ``X-Quota-Limit``, ``X-Quota-Remaining``, ``X-Quota-Reset``
   (the daily quota; resets at 00:00 UTC);
4. for an SSE stream, holds a lease on one of the subject's stream slots while the response
   runs (refreshed every :data:`~makeusrich.access.limits.LEASE_TTL_MS` / 3, with every
   other open stream of the process in one Redis round trip; released when
   the stream ends, including when the client goes away).

Public paths (:data:`PUBLIC_PATHS`, ``/static/*``) and ``OPTIONS`` (CORS preflights carry
no credentials) are never limited. If Redis cannot be reached, requests with a key get 503
(their key cannot be checked) and anonymous ones pass unlimited: the routes that need Redis
answer 503 themselves, and a Redis outage must not lock developers out of the rest.

The identity of an allowed request is in ``request.state.access`` (:class:`Identity`);
:func:`install` also mounts ``/admin`` (when ``Settings.admin_api``) and documents the
security schemes and the 401/429 answers in the OpenAPI schema.
"""

import asyncio
import contextlib
import json
import logging
import re
import time
import uuid
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Final

from fastapi import FastAPI, Request
from redis.exceptions import RedisError
from starlette.datastructures import State
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from makeusrich.access.keys import Limits
from makeusrich.access.limits import Decision, Limiter, RouteClass, Subject
from makeusrich.core.metrics import ApiMetrics
from makeusrich.core.settings import Settings
from makeusrich.core.store import RedisStore

__all__ = [
    "PUBLIC_PATHS",
    "AccessMiddleware",
    "Identity",
    "install",
    "presented_key",
    "request_identity",
    "route_class",
]

log = logging.getLogger(__name__)

#: Never authenticated nor limited (with everything under ``/static/``).
PUBLIC_PATHS: Final = frozenset({
    "/", "/healthz", "/readyz", "/metrics", "/docs", "/docs/oauth2-redirect", "/redoc",
    "/openapi.json",
})
_STATIC: Final = "/static"
_JOB_EVENTS_RE: Final = re.compile(r"^/v1/backtests/[^/]+/events$")
_REALM: Final = 'Bearer realm="make-us-rich"'
_HOW: Final = "send it as 'Authorization: Bearer <key>' or 'X-API-Key: <key>'"
# A Redis outage is logged once per this many seconds, not once per request.
_OUTAGE_LOG_EVERY_S: Final = 10.0


def route_class(method: str, path: str) -> RouteClass | None:
    """The route class of a request, or None for a public one (never limited)."""
    if method == "OPTIONS" or path in PUBLIC_PATHS or path == _STATIC or path.startswith(
        _STATIC + "/"
    ):
        return None
    if method in ("GET", "HEAD") and (path == "/v1/stream" or _JOB_EVENTS_RE.match(path)):
        return "stream"
    if method == "POST" and path == "/v1/backtests":
        return "backtest"
    return "read"


class Refusal(Exception):
    """A request refused before it reaches a route: status, reason (metrics), message."""

    def __init__(self, status: int, reason: str, message: str,
                 headers: Iterable[tuple[str, str]] = ()) -> None:
        super().__init__(message)
        self.status = status
        self.reason = reason
        self.message = message
        self.headers = list(headers)


def _unauthorized(reason: str, message: str, *, invalid: bool) -> Refusal:
    challenge = f'{_REALM}, error="invalid_token"' if invalid else _REALM
    return Refusal(401, reason, message, [("WWW-Authenticate", challenge)])


def presented_key(headers: Iterable[tuple[bytes, bytes]]) -> str | None:
    """The key a request presents (``Authorization: Bearer`` first, then ``X-API-Key``),
    None when it presents none; :class:`Refusal` for another Authorization scheme."""
    authorization = api_key = None
    for name, value in headers:
        if name == b"authorization":
            authorization = value.decode("latin-1").strip()
        elif name == b"x-api-key":
            api_key = value.decode("latin-1").strip()
    if authorization:
        scheme, _, credentials = authorization.partition(" ")
        if scheme.lower() != "bearer":
            raise _unauthorized("malformed", f"unsupported Authorization scheme "
                                f"'{scheme[:20]}': {_HOW}", invalid=True)
        if credentials.strip():
            return credentials.strip()
    return api_key or None


@dataclass(frozen=True, slots=True)
class Identity:
    """Who made an allowed request: a key (its id, plan, admin flag) or an anonymous IP."""

    key_id: str | None
    plan: str
    admin: bool
    client: str

    @property
    def anonymous(self) -> bool:
        return self.key_id is None


def request_identity(request: Request) -> Identity | None:
    """The identity :class:`AccessMiddleware` gave the request (None: public, or Redis was
    unreachable for an anonymous client)."""
    identity = getattr(request.state, "access", None)
    return identity if isinstance(identity, Identity) else None


def _client_ip(scope: Scope) -> str:
    client = scope.get("client")
    return str(client[0]) if client else "unknown"


def _who(decision: Decision) -> str:
    return "per client IP (anonymous)" if decision.key_id is None else "per API key"


def _refusal(decision: Decision) -> Refusal | None:
    """The 401/429 for a refused decision; None when it is allowed."""
    match decision.outcome:
        case "ok":
            return None
        case "unknown":
            return _unauthorized("unknown", "unknown API key: no such key; check that it was "
                                 "copied in full, or ask for a new one", invalid=True)
        case "revoked":
            when = datetime.fromtimestamp((decision.revoked_ms or 0) / 1000, UTC)
            return _unauthorized(
                "revoked", f"API key {decision.key_id} was revoked on "
                f"{when.isoformat(timespec='seconds')}; ask for a new one", invalid=True)
        case "rate":
            message = (f"rate limit exceeded for {decision.route_class} requests: "
                       f"{decision.limit} a minute {_who(decision)}; "
                       f"retry in {decision.retry_after_s} s")
        case "daily":
            message = (f"daily quota exceeded: {decision.daily_limit} requests a day "
                       f"{_who(decision)}; it resets at 00:00 UTC, in "
                       f"{decision.retry_after_s} s")
        case "streams":
            message = (f"too many concurrent streams: at most {decision.sse} open SSE "
                       f"streams {_who(decision)}; close one first")
    return Refusal(429, decision.outcome, message,
                   [("Retry-After", str(decision.retry_after_s))])


def limit_headers(decision: Decision) -> list[tuple[bytes, bytes]]:
    """The remaining-quota headers of an allowed or rate-limited request."""
    policy = (f'{decision.limit};w=60;comment="{decision.route_class}", '
              f'{decision.daily_limit};w=86400;comment="daily, UTC"')
    pairs = [
        ("ratelimit-limit", decision.limit),
        ("ratelimit-remaining", decision.remaining),
        ("ratelimit-reset", decision.reset_s),
        ("ratelimit-policy", policy),
        ("x-quota-limit", decision.daily_limit),
        ("x-quota-remaining", decision.daily_remaining),
        ("x-quota-reset", decision.daily_reset_s),
    ]
    return [(name.encode(), str(value).encode()) for name, value in pairs]


async def _answer(refusal: Refusal, send: Send,
                  extra: Iterable[tuple[bytes, bytes]] = ()) -> None:
    body = json.dumps({"detail": refusal.message}).encode()
    headers = [
        (b"content-type", b"application/json"),
        (b"content-length", str(len(body)).encode()),
        *((name.lower().encode(), value.encode()) for name, value in refusal.headers),
        *extra,
    ]
    await send({"type": "http.response.start", "status": refusal.status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


class AccessMiddleware:
    """Authenticates and limits every non-public request (see the module docstring)."""

    def __init__(self, app: ASGIApp, settings: Settings, metrics: ApiMetrics,
                 state: State) -> None:
        self.app = app
        self.settings = settings
        self.metrics = metrics
        self.state = state  # the app's: its RedisStore appears there when the app starts
        self.anonymous = Limits(settings.anonymous_rpm, settings.anonymous_daily,
                                settings.anonymous_sse)
        self._limiter: tuple[RedisStore, Limiter] | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        # The open streams' leases (id -> subject), all refreshed by one task.
        self._leases: dict[str, Subject] = {}
        self._keeper: asyncio.Task[None] | None = None
        self._outage_logged_s = 0.0

    def limiter(self) -> Limiter:
        store: RedisStore = self.state.store
        if self._limiter is None or self._limiter[0] is not store:
            self._limiter = (store, Limiter(store.client, store.keys))
        return self._limiter[1]

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        kind = route_class(scope["method"], scope["path"])
        if kind is None:
            await self.app(scope, receive, send)
            return
        client = _client_ip(scope)
        try:
            key = presented_key(scope["headers"])
            if key is None:
                if not self.settings.anonymous_allowed:
                    raise _unauthorized("missing", f"an API key is required: {_HOW}",
                                        invalid=False)
                subject = Subject.anonymous(client)
            else:
                found = Subject.for_key(key)
                if found is None:
                    raise _unauthorized(
                        "malformed", "unknown API key: it is not a make-us-rich key "
                        "(mur_ followed by 32 characters)", invalid=True)
                subject = found
        except Refusal as refused:
            await self._refuse(refused, send)
            return
        limiter = self.limiter()
        lease = uuid.uuid4().hex if kind == "stream" else None
        try:
            decision = await limiter.check(subject, kind, self.anonymous, lease)
        except (RedisError, OSError) as exc:
            self.metrics.redis_errors.labels("access").inc()
            self._log_outage(exc)
            if key is None:  # anonymous: nothing to verify; let the route answer
                await self.app(scope, receive, send)
            else:
                await self._refuse(Refusal(503, "", "storage unavailable: the API key "
                                           "cannot be checked; retry shortly"), send)
            return
        extra = limit_headers(decision) if decision.outcome not in ("unknown", "revoked") else []
        refusal = _refusal(decision)
        if refusal is not None:
            await self._refuse(refusal, send, extra)
            return
        scope.setdefault("state", {})["access"] = Identity(
            decision.key_id, decision.plan, decision.admin, client)

        async def send_with_limits(message: Message) -> None:
            if message["type"] == "http.response.start":
                message["headers"] = [*message.get("headers", []), *extra]
            await send(message)

        if lease is None:
            await self.app(scope, receive, send_with_limits)
            return
        self._leases[lease] = subject
        self._start_keeper()
        try:
            await self.app(scope, receive, send_with_limits)
        finally:
            del self._leases[lease]
            await self._release(limiter, subject, lease)

    async def _refuse(self, refusal: Refusal, send: Send,
                      extra: Iterable[tuple[bytes, bytes]] = ()) -> None:
        if refusal.reason:
            self.metrics.access_refused.labels(str(refusal.status), refusal.reason).inc()
        await _answer(refusal, send, extra)

    def _start_keeper(self) -> None:
        keeper = self._keeper
        if keeper is None or keeper.done() or keeper.get_loop() is not asyncio.get_running_loop():
            self._keeper = asyncio.create_task(self._keep(), name="mur-lease-keeper")

    async def _keep(self) -> None:
        """Refresh the leases of every open stream of this process, in one round trip:
        one task and one Redis call per period, whatever the number of streams."""
        while True:
            limiter = self.limiter()
            await asyncio.sleep(limiter.lease_ttl_ms / 3000)
            if not self._leases:
                continue
            try:
                await limiter.refresh([(subject, lease)
                                       for lease, subject in self._leases.items()])
            except (RedisError, OSError) as exc:
                self._log_outage(exc)

    async def _release(self, limiter: Limiter, subject: Subject, lease: str) -> None:
        # A task of its own: even when this request is being cancelled (shutdown), the
        # release still runs; an unreleased lease lapses by itself after its TTL.
        task = asyncio.create_task(limiter.release(subject, lease))
        self._tasks.add(task)
        task.add_done_callback(self._released)
        with contextlib.suppress(RedisError, OSError):
            await asyncio.shield(task)

    def _released(self, task: "asyncio.Task[None]") -> None:
        self._tasks.discard(task)
        if not task.cancelled() and (exc := task.exception()) is not None:
            log.warning("could not release an SSE stream lease (it lapses by itself): %r",
                        exc)

    def _log_outage(self, exc: BaseException) -> None:
        now_s = time.monotonic()
        if now_s - self._outage_logged_s >= _OUTAGE_LOG_EVERY_S:
            self._outage_logged_s = now_s
            log.warning("access checks cannot reach Redis (keyed requests get 503, "
                        "anonymous ones pass unlimited): %r", exc)


# ---- OpenAPI -------------------------------------------------------------------------

_ERROR_SCHEMA: Final = {
    "type": "object", "properties": {"detail": {"type": "string"}}, "required": ["detail"],
}
_INT_HEADER: Final = {"schema": {"type": "integer"}}
_LIMIT_HEADERS: Final = {
    "RateLimit-Limit": {**_INT_HEADER, "description": "size of the route class's bucket"},
    "RateLimit-Remaining": {**_INT_HEADER, "description": "requests left in it"},
    "RateLimit-Reset": {**_INT_HEADER, "description": "seconds until it is full again"},
    "RateLimit-Policy": {"schema": {"type": "string"}, "description": "the limits, e.g. "
                         '`60;w=60;comment="read", 10000;w=86400;comment="daily, UTC"`'},
    "X-Quota-Limit": {**_INT_HEADER, "description": "requests a UTC day"},
    "X-Quota-Remaining": {**_INT_HEADER, "description": "requests left today"},
    "X-Quota-Reset": {**_INT_HEADER, "description": "seconds until 00:00 UTC"},
}
_RESPONSES: Final = {
    "Unauthorized": {
        "description": "no API key where one is required, or an unknown or revoked key",
        "headers": {"WWW-Authenticate": {"schema": {"type": "string"}}},
        "content": {"application/json": {"schema": _ERROR_SCHEMA}},
    },
    "RateLimited": {
        "description": "a limit is exhausted: the route class's rate, the daily quota, or "
        "the concurrent SSE streams; `detail` says which",
        "headers": {"Retry-After": {**_INT_HEADER, "description": "seconds"},
                    **_LIMIT_HEADERS},
        "content": {"application/json": {"schema": _ERROR_SCHEMA}},
    },
}
_SCHEMES: Final = {
    "bearer": {"type": "http", "scheme": "bearer", "description": "an API key "
               "(`mur_...`, from `mur keys create`) as `Authorization: Bearer <key>`"},
    "apiKey": {"type": "apiKey", "in": "header", "name": "X-API-Key",
               "description": "the same API key in `X-API-Key`"},
}
_METHODS: Final = ("get", "put", "post", "delete", "patch", "head")
_ACCESS_DOC: Final = """

**Access.** Send an API key as `Authorization: Bearer <key>` or `X-API-Key: <key>`{anon}.
Each response carries the limits left: `RateLimit-Limit`, `RateLimit-Remaining`,
`RateLimit-Reset` (the token bucket of its route class: `read` = REST, `stream` = opening
an SSE stream, `backtest` = queueing one) and `X-Quota-Limit`, `X-Quota-Remaining`,
`X-Quota-Reset` (the daily quota, UTC). Beyond a limit: 429 with `Retry-After`."""


def _document(app: FastAPI, settings: Settings) -> None:
    """Add the security schemes and the 401/429 answers to the OpenAPI schema."""
    build = app.openapi
    anon = (" (optional here: without one, limits apply per client IP)"
            if settings.anonymous_allowed else "")

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is not None:
            return app.openapi_schema
        schema = build()
        schema.setdefault("info", {})["description"] = (
            schema.get("info", {}).get("description", "") + _ACCESS_DOC.format(anon=anon))
        components = schema.setdefault("components", {})
        components.setdefault("securitySchemes", {}).update(_SCHEMES)
        components.setdefault("responses", {}).update(_RESPONSES)
        security: list[dict[str, list[str]]] = [{"bearer": []}, {"apiKey": []}]
        if settings.anonymous_allowed:
            security.append({})  # OpenAPI's "no credentials is fine too"
        for path, item in schema.get("paths", {}).items():
            for method, operation in item.items():
                if method not in _METHODS or route_class(method.upper(), path) is None:
                    continue
                operation["security"] = security
                responses = operation.setdefault("responses", {})
                responses.setdefault("401", {"$ref": "#/components/responses/Unauthorized"})
                responses.setdefault("429", {"$ref": "#/components/responses/RateLimited"})
        app.openapi_schema = schema
        return schema

    app.openapi = openapi  # type: ignore[method-assign]


def install(app: FastAPI, settings: Settings, metrics: ApiMetrics) -> None:
    """Enforce access on ``app``, mount ``/admin`` when enabled, document both.

    Call it before the middlewares that must see its answers (request metrics, security
    headers, CORS): the middleware added last runs first.
    """
    from makeusrich.api.routes import admin  # here: it imports this module

    app.add_middleware(AccessMiddleware, settings=settings, metrics=metrics, state=app.state)
    if settings.admin_api:
        app.include_router(admin.router, include_in_schema=False)
    _document(app, settings)
