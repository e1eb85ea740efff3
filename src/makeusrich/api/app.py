"""The FastAPI application: ``create_app(settings)``.

The lifespan opens the Redis store, starts the live-event broadcaster and the backtest job
manager; all are kept on ``app.state`` next to the Settings and reached through
:mod:`makeusrich.api.deps`. On shutdown running backtests are killed and marked failed.

Each app has its own Prometheus metric set (``app.state.metrics``, served at ``/metrics``):
request latency by route template, SSE clients and events, Redis errors, access refusals.

Who may call which route, and how often, is :mod:`makeusrich.api.access` (API keys,
anonymous clients, rate limits and quotas, ``/admin``).
"""

import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from redis.exceptions import RedisError

from makeusrich import __version__
from makeusrich.api import access
from makeusrich.api.broadcast import Broadcaster
from makeusrich.api.hardening import harden
from makeusrich.api.jobs import JobManager
from makeusrich.api.routes import (
    backtests,
    candles,
    dashboard,
    health,
    metrics,
    models,
    monitoring,
    predictions,
    stream,
)
from makeusrich.api.routes.metrics import RequestMetricsMiddleware, api_metrics
from makeusrich.core.errors import ConfigError
from makeusrich.core.metrics import ApiMetrics
from makeusrich.core.settings import Settings
from makeusrich.core.store import RedisStore

__all__ = ["create_app"]

log = logging.getLogger(__name__)


async def _storage_unavailable(request: Request, exc: Exception) -> JSONResponse:
    # %s: redis-py's repr of its errors drops the message (e.g. which address failed).
    log.warning("redis error serving %s: %s: %s", request.url.path, type(exc).__name__, exc)
    api_metrics(request).redis_errors.labels("request").inc()
    return JSONResponse({"detail": "storage unavailable: Redis is not answering; retry "
                                   "shortly"}, status_code=503)


def create_app(settings: Settings) -> FastAPI:
    """Build the app for ``settings`` (``redis_url`` must be set)."""
    if not settings.redis_url:
        raise ConfigError("the API needs redis_url; pass --redis-url or set MUR_REDIS_URL")
    app_metrics = ApiMetrics()
    for kind in stream.EVENT_TYPES:
        app_metrics.sse_events_sent.labels(kind)  # exported as 0 before the first event

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        store = RedisStore.from_settings(settings)
        broadcaster = Broadcaster(store, queue_max=settings.sse_client_queue_max,
                                  heartbeat_s=settings.sse_heartbeat_s, metrics=app_metrics)
        await broadcaster.start()
        jobs = JobManager(settings, store.client)
        await jobs.start()
        app.state.store = store
        app.state.broadcaster = broadcaster
        app.state.jobs = jobs
        try:
            yield
        finally:
            await jobs.stop()  # first: it marks the stopped jobs failed through the store
            await broadcaster.stop()
            await store.aclose()

    app = FastAPI(
        title="make-us-rich",
        version=__version__,
        description="Closed candles and next-candle forecasts, over REST and Server-Sent Events.",
        lifespan=lifespan,
    )
    app.state.settings = settings
    app.state.metrics = app_metrics
    # API keys and limits (and /admin when enabled); inside the request metrics, so that
    # their time and their 401/429 answers are measured too.
    access.install(app, settings, app_metrics)
    app.add_middleware(RequestMetricsMiddleware, metrics=app_metrics)
    app.add_exception_handler(RedisError, _storage_unavailable)
    app.include_router(health.router)
    app.include_router(metrics.router)
    for module in (candles, predictions, models, monitoring, stream, backtests):
        app.include_router(module.router, prefix="/v1")
    dashboard.install(app)  # GET / and /static
    harden(app, settings)  # it wraps every response
    stream.install(app)  # outermost: it hands the live stream the server's send
    return app
