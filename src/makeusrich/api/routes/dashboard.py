"""The live dashboard: ``GET /`` is one page (``static/index.html``), its script, style and
vendored charting library are under ``/static``.

No endpoint lists the configured symbols and intervals, so the page is served with them in
a ``data-config`` attribute of its ``<body>``; everything else it reads from the public API
(REST for history, ``/v1/stream`` for live updates).
"""

import html
import json
from pathlib import Path
from typing import Final

from fastapi import APIRouter, FastAPI
from fastapi.responses import HTMLResponse
from fastapi.staticfiles import StaticFiles

from makeusrich.api.deps import SettingsDep

__all__ = ["STATIC_DIR", "install", "router"]

STATIC_DIR: Final = Path(__file__).resolve().parent.parent / "static"
_CONFIG_SLOT: Final = 'data-config="{}"'

router = APIRouter(tags=["dashboard"])


@router.get("/", response_class=HTMLResponse, include_in_schema=False)
async def dashboard(settings: SettingsDep) -> HTMLResponse:
    """The dashboard page, told which symbols and intervals this service builds."""
    page = (STATIC_DIR / "index.html").read_text(encoding="utf-8")
    config = json.dumps({"symbols": list(settings.symbols), "intervals": list(settings.intervals)})
    page = page.replace(_CONFIG_SLOT, f'data-config="{html.escape(config, quote=True)}"', 1)
    return HTMLResponse(page, headers={"Cache-Control": "no-cache"})


def install(app: FastAPI) -> None:
    """Serve the page at ``/`` and its files at ``/static``."""
    app.include_router(router)
    app.mount("/static", StaticFiles(directory=STATIC_DIR), name="static")
