"""``GET /v1/candles/{symbol}``: closed candles, oldest first."""

from typing import Any, Final

from fastapi import APIRouter

from makeusrich.api.deps import (
    IntervalDep,
    LimitDep,
    StoreDep,
    SymbolDep,
    TimeRangeDep,
    unprocessable,
)
from makeusrich.api.models import CandleOut, ErrorOut

__all__ = ["router"]

router = APIRouter(prefix="/candles", tags=["candles"])

_ERRORS: Final[dict[int | str, dict[str, Any]]] = {
    400: {"model": ErrorOut, "description": "start is after end"},
    404: {"model": ErrorOut, "description": "unknown symbol, or interval not built here"},
    **unprocessable("an unsupported interval"),
}


@router.get("/{symbol}", response_model=list[CandleOut], responses=_ERRORS)
async def get_candles(
    symbol: SymbolDep,
    interval: IntervalDep,
    limit: LimitDep,
    window: TimeRangeDep,
    store: StoreDep,
) -> list[CandleOut]:
    """Closed candles, oldest first.

    ``start``/``end`` are inclusive on ``open_time``. With ``start``: the first ``limit``
    candles from it. Without: the newest ``limit`` candles (up to ``end`` if given).
    """
    candles = await store.candles(symbol, interval, window.start_ms, window.end_ms, limit)
    return CandleOut.from_records(candles)
