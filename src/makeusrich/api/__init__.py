"""HTTP API: REST for candles and predictions, SSE for live events."""

import uvicorn

from makeusrich.api.app import create_app
from makeusrich.core.settings import Settings

__all__ = ["create_app", "serve"]

# Open SSE streams would otherwise hold Ctrl-C for uvicorn's unbounded graceful wait.
# Streams end themselves within ~1.5 s (see routes/stream.py), so this rarely bites.
_GRACEFUL_SHUTDOWN_S = 3


def serve(settings: Settings) -> None:
    """Run the API with uvicorn (one worker) on ``settings.api_host:api_port``; blocks.

    On Ctrl-C/SIGTERM open SSE streams end within about a second and the server stops;
    uvicorn then re-raises the signal (``KeyboardInterrupt`` for Ctrl-C) for the caller.
    """
    config = uvicorn.Config(
        create_app(settings),
        host=settings.api_host,
        port=settings.api_port,
        log_level=settings.log_level.lower(),
        workers=1,
        timeout_graceful_shutdown=_GRACEFUL_SHUTDOWN_S,
        server_header=False,  # no software banner for clients
    )
    uvicorn.Server(config).run()
