"""``/v1/predictions``: the newest forecast per symbol and the forecast history."""

from typing import Any, Final

from fastapi import APIRouter, HTTPException

from makeusrich.api.deps import (
    IntervalDep,
    LimitDep,
    SettingsDep,
    StoreDep,
    SymbolDep,
    SymbolsDep,
    TimeRangeDep,
    all_symbols,
    unprocessable,
)
from makeusrich.api.models import ErrorOut, PredictionOut

__all__ = ["router"]

router = APIRouter(prefix="/predictions", tags=["predictions"])

_ERRORS: Final[dict[int | str, dict[str, Any]]] = {
    404: {"model": ErrorOut, "description": "unknown symbol, or interval not built here"},
    **unprocessable("an unsupported interval"),
}


@router.get("/latest", response_model=list[PredictionOut], responses=_ERRORS)
async def latest_predictions(
    symbols: SymbolsDep,
    interval: IntervalDep,
    settings: SettingsDep,
    store: StoreDep,
) -> list[PredictionOut]:
    """The newest prediction of each symbol (all known symbols by default).

    Symbols without a prediction yet are left out.
    """
    wanted = list(symbols) if symbols is not None else await all_symbols(settings, store)
    latest = await store.latest_predictions(wanted, interval)
    return [PredictionOut.from_record(latest[symbol]) for symbol in wanted if symbol in latest]


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
    symbol: SymbolDep, interval: IntervalDep, store: StoreDep
) -> PredictionOut:
    """The newest prediction for one symbol."""
    prediction = await store.latest_prediction(symbol, interval)
    if prediction is None:
        raise HTTPException(404, f"no prediction yet for {symbol} {interval}")
    return PredictionOut.from_record(prediction)


@router.get(
    "/{symbol}/history",
    response_model=list[PredictionOut],
    responses={**_ERRORS, 400: {"model": ErrorOut, "description": "start is after end"}},
)
async def prediction_history(
    symbol: SymbolDep,
    interval: IntervalDep,
    limit: LimitDep,
    window: TimeRangeDep,
    store: StoreDep,
) -> list[PredictionOut]:
    """Past predictions, oldest first; ``start``/``end`` are inclusive on
    ``candle_open_time``. Same ``limit`` rules as the candles endpoint."""
    predictions = await store.predictions(
        symbol, interval, window.start_ms, window.end_ms, limit
    )
    return PredictionOut.from_records(predictions)
