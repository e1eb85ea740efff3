"""Request dependencies: the app's Settings/store/broadcaster/backtest jobs and validated
path and query values.

Everything comes from ``app.state`` (filled by :func:`makeusrich.api.app.create_app`), so
handlers never read the environment.
"""

from dataclasses import dataclass
from typing import Annotated, Any, Final, cast

from fastapi import Depends, Header, HTTPException, Path, Query, Request
from fastapi.exceptions import RequestValidationError

from makeusrich.api.broadcast import Broadcaster
from makeusrich.api.jobs import JobManager, is_job_id
from makeusrich.api.latest import LatestPredictions
from makeusrich.api.models import ErrorOut, ValidationErrorOut
from makeusrich.core.intervals import SUPPORTED_INTERVALS
from makeusrich.core.settings import Settings
from makeusrich.core.store import RedisStore, parse_stream_id

__all__ = [
    "DEFAULT_LIMIT",
    "MAX_HORIZON",
    "BroadcasterDep",
    "HorizonDep",
    "IntervalDep",
    "JobIdDep",
    "JobsDep",
    "LatestDep",
    "LimitDep",
    "OptionalIntervalDep",
    "SettingsDep",
    "StoreDep",
    "SymbolDep",
    "SymbolsDep",
    "TimeRange",
    "TimeRangeDep",
    "all_symbols",
    "check_interval",
    "check_symbol",
    "unprocessable",
]

DEFAULT_LIMIT: Final = 500
#: The largest prediction horizon a request may name, in candles (a day of 1m candles).
MAX_HORIZON: Final = 1_440

# Every dependency is ``async def``, even when it awaits nothing: FastAPI runs a plain
# function in its thread pool, a thread hand-off per dependency and request.


async def _settings(request: Request) -> Settings:
    return cast(Settings, request.app.state.settings)


async def _store(request: Request) -> RedisStore:
    return cast(RedisStore, request.app.state.store)


async def _broadcaster(request: Request) -> Broadcaster:
    return cast(Broadcaster, request.app.state.broadcaster)


async def _jobs(request: Request) -> JobManager:
    return cast(JobManager, request.app.state.jobs)


async def _latest(request: Request) -> LatestPredictions:
    return cast(Broadcaster, request.app.state.broadcaster).latest


SettingsDep = Annotated[Settings, Depends(_settings)]
StoreDep = Annotated[RedisStore, Depends(_store)]
BroadcasterDep = Annotated[Broadcaster, Depends(_broadcaster)]
JobsDep = Annotated[JobManager, Depends(_jobs)]
LatestDep = Annotated[LatestPredictions, Depends(_latest)]


async def all_symbols(settings: Settings, latest: LatestPredictions) -> list[str]:
    """Configured symbols first, then any other symbol the worker has written."""
    configured = list(settings.symbols)
    extra = [symbol for symbol in await latest.known_symbols() if symbol not in configured]
    return configured + extra


async def check_symbol(raw: str, settings: Settings, latest: LatestPredictions) -> str:
    """Upper-cased symbol, or 404 naming the known ones."""
    symbol = raw.strip().upper()
    if symbol in settings.symbols:
        return symbol  # no Redis round trip for the common case
    known = await all_symbols(settings, latest)
    if symbol not in known:
        raise HTTPException(404, f"unknown symbol '{symbol}'; known: {', '.join(known)}")
    return symbol


def unprocessable(refused: str) -> dict[int | str, dict[str, Any]]:
    """The ``responses`` entry for the 422 of a route that, beyond FastAPI's validation
    (a list of problems), refuses ``refused`` with a one-message ``detail`` (e.g.
    :func:`check_interval`): both shapes, so the schema documents what clients get."""
    return {
        422: {
            "model": ValidationErrorOut | ErrorOut,
            "description": f"invalid request (a list of problems), or {refused} (a message)",
        }
    }


def check_interval(interval: str, settings: Settings) -> str:
    """422 for an interval Binance/this code does not support, 404 for one not built here."""
    if interval not in SUPPORTED_INTERVALS:
        raise HTTPException(
            422,
            f"unsupported interval '{interval}'; use one of {', '.join(SUPPORTED_INTERVALS)}",
        )
    if interval not in settings.intervals:
        raise HTTPException(
            404,
            f"interval '{interval}' is not built by this service; "
            f"it builds: {', '.join(settings.intervals)}",
        )
    return interval


async def _symbol_path(
    symbol: Annotated[
        str, Path(description="trading pair, case-insensitive", examples=["BTCUSDT"])
    ],
    settings: SettingsDep,
    latest: LatestDep,
) -> str:
    return await check_symbol(symbol, settings, latest)


async def _symbols_query(
    settings: SettingsDep,
    latest: LatestDep,
    symbols: Annotated[
        str | None,
        Query(description="comma-separated symbols, case-insensitive; default: all known",
              examples=["BTCUSDT,ETHUSDT"]),
    ] = None,
) -> tuple[str, ...] | None:
    if symbols is None or not symbols.strip():
        return None
    wanted = dict.fromkeys(part.strip() for part in symbols.split(",") if part.strip())
    return tuple([await check_symbol(part, settings, latest) for part in wanted])


async def _interval_query(
    settings: SettingsDep,
    interval: Annotated[
        str | None,
        Query(description="candle interval; default: the first configured one",
              examples=["1m"]),
    ] = None,
) -> str:
    return settings.intervals[0] if interval is None else check_interval(interval, settings)


async def _optional_interval_query(
    settings: SettingsDep,
    interval: Annotated[
        str | None, Query(description="only events of this interval; default: all")
    ] = None,
) -> str | None:
    return None if interval is None else check_interval(interval, settings)


async def _limit_query(
    request: Request,
    settings: SettingsDep,
    limit: Annotated[
        int, Query(ge=1, description="maximum number of records (at most max_limit, 5000)")
    ] = DEFAULT_LIMIT,
) -> int:
    if "limit" not in request.query_params:
        return min(limit, settings.max_limit)
    if limit > settings.max_limit:
        # The bound comes from Settings at run time, so Query(le=...) cannot express it;
        # answer exactly like FastAPI's own validation would.
        raise RequestValidationError(
            [
                {
                    "type": "less_than_equal",
                    "loc": ("query", "limit"),
                    "msg": f"Input should be less than or equal to {settings.max_limit}",
                    "input": request.query_params["limit"],
                    "ctx": {"le": settings.max_limit},
                }
            ]
        )
    return limit


async def _horizon_query(
    horizon: Annotated[
        int,
        Query(ge=1, le=MAX_HORIZON,
              description="forecast horizon, in candles ahead (1: the next candle); "
              f"1 to {MAX_HORIZON}. Which horizons have predictions depends on the model "
              "served (e.g. 1, 5, 15 and 60)", examples=[1]),
    ] = 1,
) -> int:
    return horizon


@dataclass(frozen=True, slots=True)
class TimeRange:
    """Inclusive bounds on open_time (epoch ms); None = unbounded."""

    start_ms: int | None
    end_ms: int | None


async def _time_range_query(
    start: Annotated[
        int | None, Query(ge=0, description="first open_time to include, epoch ms")
    ] = None,
    end: Annotated[
        int | None, Query(ge=0, description="last open_time to include, epoch ms")
    ] = None,
) -> TimeRange:
    if start is not None and end is not None and start > end:
        raise HTTPException(400, f"start ({start}) is after end ({end})")
    return TimeRange(start, end)


async def _job_id_path(
    job_id: Annotated[str, Path(description="backtest id, as returned by POST /v1/backtests")],
) -> str:
    # Ids become Redis keys and a directory name: anything but uuid4 hex is simply unknown.
    if not is_job_id(job_id):
        raise HTTPException(404, f"unknown backtest '{job_id}'")
    return job_id


SymbolDep = Annotated[str, Depends(_symbol_path)]
SymbolsDep = Annotated[tuple[str, ...] | None, Depends(_symbols_query)]
IntervalDep = Annotated[str, Depends(_interval_query)]
OptionalIntervalDep = Annotated[str | None, Depends(_optional_interval_query)]
LimitDep = Annotated[int, Depends(_limit_query)]
HorizonDep = Annotated[int, Depends(_horizon_query)]
TimeRangeDep = Annotated[TimeRange, Depends(_time_range_query)]
JobIdDep = Annotated[str, Depends(_job_id_path)]


async def _last_event_id(
    header: Annotated[
        str | None, Header(alias="Last-Event-ID", description="resume after this event id")
    ] = None,
    last_event_id: Annotated[
        str | None,
        Query(description="same as the Last-Event-ID header, for clients that cannot set it"),
    ] = None,
) -> str | None:
    # The header wins: a browser reconnecting a `?last_event_id=` URL sends a newer one.
    resume_from = header or last_event_id
    if resume_from is None:
        return None
    try:
        parse_stream_id(resume_from)
    except ValueError as exc:
        raise HTTPException(400, f"invalid Last-Event-ID: {exc}") from exc
    return resume_from.strip()


#: The SSE event id to resume after (``Last-Event-ID`` header or query), validated.
LastEventIdDep = Annotated[str | None, Depends(_last_event_id)]
