"""One router per resource; :func:`makeusrich.api.app.create_app` mounts them."""

from makeusrich.api.routes import backtests, candles, health, models, predictions, stream

__all__ = ["backtests", "candles", "health", "models", "predictions", "stream"]
