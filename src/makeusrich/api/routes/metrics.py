"""``GET /metrics`` (Prometheus exposition of :class:`ApiMetrics`) and the middleware that
times every request by route template.

Requests are labelled with the template of the route that served them
(``/v1/candles/{symbol}``), never the raw path: one series per endpoint, however many
symbols or made-up paths clients send. Paths no route matches share ``route="unmatched"``.
"""

import re
import time
from typing import Annotated, cast

from fastapi import APIRouter, Depends, Request, Response
from starlette.routing import BaseRoute, Match
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from makeusrich.core.metrics import ApiMetrics, expose

__all__ = ["ApiMetricsDep", "RequestMetricsMiddleware", "api_metrics", "route_template",
           "router"]

router = APIRouter()


def api_metrics(request: Request) -> ApiMetrics:
    """The app's metric set (created by :func:`makeusrich.api.create_app`)."""
    return cast(ApiMetrics, request.app.state.metrics)


async def _api_metrics(request: Request) -> ApiMetrics:
    return api_metrics(request)  # async: a plain function would run in the thread pool


ApiMetricsDep = Annotated[ApiMetrics, Depends(_api_metrics)]


@router.get("/metrics", include_in_schema=False)
async def metrics(request: Request, metric_set: ApiMetricsDep) -> Response:
    """Prometheus text format (OpenMetrics when the scraper asks for it)."""
    body, content_type = expose(metric_set.registry, request.headers.get("accept"))
    return Response(body, headers={"Content-Type": content_type})


def route_template(scope: Scope) -> str | None:
    """The full template of the route that served a request, e.g. ``/v1/candles/{symbol}``
    or ``/static/{path}``; None when no route matched (404, or a redirect to the path
    with/without a trailing slash). Call it once the app has routed the request."""
    route = scope.get("route")
    if route is not None:
        return _included_route_template(scope, route)
    return _mount_template(scope) or _plain_route_template(scope)


def _included_route_template(scope: Scope, route: object) -> str | None:
    """FastAPI leaves its APIRoute in ``scope["route"]``, but FastAPI >= 0.16x keeps
    included routers un-flattened, so its ``path_format`` lacks the include prefixes
    (``/candles/{symbol}``). Its regex, anchored at the end of the request path, finds where
    the route's own part starts: the literal text before it is the prefix."""
    path_format = getattr(route, "path_format", None)
    path_regex = getattr(route, "path_regex", None)
    if not isinstance(path_format, str) or not isinstance(path_regex, re.Pattern):
        return None
    path = str(scope.get("path", ""))
    # A Mount moves root_path to below itself and keeps the app's own in app_root_path.
    root_path = str(scope.get("app_root_path") or scope.get("root_path") or "")
    if root_path and path.startswith(root_path):
        path = path[len(root_path):]
    # re caches compiled patterns, and an app has a few dozen routes.
    match = re.search(path_regex.pattern.removeprefix("^"), path)
    if match is None:
        return path_format
    return path[: match.start()] + path_format


def _mount_template(scope: Scope) -> str | None:
    """``/static/{path}`` for a request a mounted app served, else None. FastAPI does not
    record a Mount as the route; the Mount leaves the app's root in ``app_root_path`` and
    moves ``root_path`` below its own path."""
    app_root = scope.get("app_root_path")
    root = str(scope.get("root_path") or "")
    if not isinstance(app_root, str) or root == app_root or not root.startswith(app_root):
        return None
    return root[len(app_root):] + "/{path}"


def _plain_route_template(scope: Scope) -> str | None:
    """The app's own Starlette routes (``/docs``, ``/openapi.json``) are not recorded in
    the scope either: match them again (only these requests and 404s pay for it)."""
    for candidate in getattr(scope.get("app"), "routes", ()):
        path_format = getattr(candidate, "path_format", None)
        if (isinstance(candidate, BaseRoute) and isinstance(path_format, str)
                and candidate.matches(scope)[0] is not Match.NONE):
            return path_format
    return None


class RequestMetricsMiddleware:
    """Pure ASGI middleware (BaseHTTPMiddleware would buffer around the SSE stream): times
    each HTTP request up to its response headers, so the SSE stream counts the time to open
    it, not the hours it stays open."""

    def __init__(self, app: ASGIApp, metrics: ApiMetrics) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started_s = time.perf_counter()
        observed = False

        def observe(status: int) -> None:
            nonlocal observed
            observed = True
            self.metrics.observe_request(scope["method"], route_template(scope), status,
                                         time.perf_counter() - started_s)

        async def timed_send(message: Message) -> None:
            if message["type"] == "http.response.start" and not observed:
                observe(int(message["status"]))
            await send(message)

        try:
            await self.app(scope, receive, timed_send)
        except Exception:
            # An unhandled error: ServerErrorMiddleware (outside us) answers 500.
            if not observed:
                observe(500)
            raise
