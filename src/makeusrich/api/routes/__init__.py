"""One router per resource; :func:`makeusrich.api.app.create_app` mounts them."""

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

__all__ = [
    "backtests",
    "candles",
    "dashboard",
    "health",
    "metrics",
    "models",
    "monitoring",
    "predictions",
    "stream",
]
