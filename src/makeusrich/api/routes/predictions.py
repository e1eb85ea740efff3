"""``/v1/predictions``: the newest forecast per symbol and the forecast history, of one
horizon (``?horizon=``, 1 by default: the next candle)."""

from typing import Any, Final

from fastapi import APIRouter, HTTPException, Response

from makeusrich.api.deps import (
    HorizonDep,
    IntervalDep,
    LatestDep,
    LimitDep,
    SettingsDep,
    StoreDep,
    SymbolDep,
    SymbolsDep,
    TimeRangeDep,
    all_symbols,
    unprocessable,
)
from makeusrich.api.latest import json_array
from makeusrich.api.models import ErrorOut, PredictionOut

__all__ = ["router"]

router = APIRouter(prefix="/predictions", tags=["predictions"])

_ERRORS: Final[dict[int | str, dict[str, Any]]] = {
    404: {"model": ErrorOut, "description": "unknown symbol, or interval not built here"},
    **unprocessable("an unsupported interval"),
}


def _series(symbol: str, interval: str, horizon: int) -> str:
    return f"{symbol} {interval}" if horizon == 1 else f"{symbol} {interval} horizon {horizon}"


@router.get("/latest", response_model=list[PredictionOut], responses=_ERRORS)
async def latest_predictions(
    symbols: SymbolsDep,
    interval: IntervalDep,
    horizon: HorizonDep,
    settings: SettingsDep,
    latest: LatestDep,
) -> Response:
    """The newest prediction of each symbol (all known symbols by default) for ``horizon``.

    Symbols without a prediction yet are left out.
    """
    wanted = list(symbols) if symbols is not None else await all_symbols(settings, latest)
    # Already-encoded JSON (see api/latest.py): returning a Response skips re-validation.
    return Response(json_array(await latest.get(wanted, interval, horizon)),
                    media_type="application/json")


@router.get(
    "/{symbol}/latest",
    response_model=PredictionOut,
    responses={
        **_ERRORS,
        404: {"model": ErrorOut, "description": "unknown symbol, interval not built here, "
              "or no prediction yet"},
    },
)
async def latest_prediction(
    symbol: SymbolDep, interval: IntervalDep, horizon: HorizonDep, latest: LatestDep
) -> Response:
    """The newest prediction for one symbol and ``horizon``."""
    found = await latest.get([symbol], interval, horizon)
    if not found:
        raise HTTPException(404, f"no prediction yet for {_series(symbol, interval, horizon)}")
    return Response(found[0], media_type="application/json")


@router.get(
    "/{symbol}/history",
    response_model=list[PredictionOut],
    responses={**_ERRORS, 400: {"model": ErrorOut, "description": "start is after end"}},
)
async def prediction_history(
    symbol: SymbolDep,
    interval: IntervalDep,
    horizon: HorizonDep,
    limit: LimitDep,
    window: TimeRangeDep,
    store: StoreDep,
) -> list[PredictionOut]:
    """Past predictions of ``horizon``, oldest first; ``start``/``end`` are inclusive on
    ``candle_open_time``. Same ``limit`` rules as the candles endpoint."""
    predictions = await store.predictions(
        symbol, interval, window.start_ms, window.end_ms, limit, horizon=horizon
    )
    return PredictionOut.from_records(predictions)
