"""``GET /v1/monitoring/{symbol}``: live forecast quality and drift of one series, as the
worker last wrote them (:mod:`makeusrich.monitoring`)."""

from typing import Any, Final

import msgspec
from fastapi import APIRouter, HTTPException

from makeusrich.api.deps import IntervalDep, StoreDep, SymbolDep, unprocessable
from makeusrich.api.models import DriftOut, ErrorOut, MonitoringOut, QualityOut

__all__ = ["router"]

router = APIRouter(prefix="/monitoring", tags=["monitoring"])

_ERRORS: Final[dict[int | str, dict[str, Any]]] = {
    404: {"model": ErrorOut, "description": "unknown symbol, interval not built here, or no "
          "candle of the series has closed yet"},
    **unprocessable("an unsupported interval"),
}


@router.get("/{symbol}", response_model=MonitoringOut, responses=_ERRORS)
async def get_monitoring(symbol: SymbolDep, interval: IntervalDep,
                         store: StoreDep) -> MonitoringOut:
    """Rolling live quality per model version and the drift status of the serving model."""
    quality_json, drift_json = await store.monitoring(symbol, interval)
    if quality_json is None and drift_json is None:
        raise HTTPException(404, f"no monitoring data for {symbol} {interval} yet: it appears "
                                 "when the series' first candle closes")
    quality = [QualityOut.model_validate(q) for q in msgspec.json.decode(quality_json or b"[]")]
    drift = None if drift_json is None else DriftOut.model_validate(msgspec.json.decode(drift_json))
    return MonitoringOut(
        symbol=symbol, interval=interval, quality=quality, drift=drift,
        model_version=None if drift is None else drift.model_version,
    )
