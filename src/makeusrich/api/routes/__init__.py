"""One router per resource; :func:`makeusrich.api.app.create_app` mounts them."""

from makeusrich.api.routes import candles, health, models, predictions, stream

__all__ = ["candles", "health", "models", "predictions", "stream"]
