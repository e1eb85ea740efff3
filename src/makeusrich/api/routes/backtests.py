"""``/v1/backtests``: run ``mur backtest`` in the background and follow it.

``POST`` queues a job (202, or 429 when this API process has no room left); ``GET`` answers
from Redis, so any replica can follow any job; ``/events`` streams its progress as SSE
(``progress`` ... then ``done`` or ``failed``, ids from the job's Redis stream, so
``Last-Event-ID`` resumes exactly); ``/files/{name}`` serves the report once it is done,
from ``STATE_DIR/backtests/{id}`` (replicas serving files must share ``MUR_STATE_DIR``).
Jobs are described in :mod:`makeusrich.api.jobs`.
"""

import asyncio
import logging
from collections.abc import AsyncIterator
from typing import Annotated, Any, Final

import anyio
from fastapi import APIRouter, HTTPException, Path, Response
from fastapi.responses import FileResponse
from redis.exceptions import RedisError
from sse_starlette import EventSourceResponse, ServerSentEvent

from makeusrich.api.deps import JobIdDep, JobsDep, LastEventIdDep, SettingsDep, unprocessable
from makeusrich.api.jobs import (
    FINAL_EVENTS,
    REPORT_FILES,
    JobQueueFull,
    JobState,
    JobStore,
    job_links,
    report_url,
)
from makeusrich.api.models import (
    BacktestAcceptedOut,
    BacktestIn,
    BacktestLinksOut,
    BacktestOut,
    ErrorOut,
)
from makeusrich.core.errors import RegistryError
from makeusrich.inference import Registry
from makeusrich.stream.control import registry_root

__all__ = ["router"]

log = logging.getLogger(__name__)

router = APIRouter(prefix="/backtests", tags=["backtests"])

#: Model names `mur backtest` resolves itself (``naive`` is not one: the baselines are
#: always scored).
MODEL_ALIASES: Final = ("champion",)
_UNKNOWN: Final[dict[int | str, dict[str, Any]]] = {
    404: {"model": ErrorOut, "description": "unknown (or expired) backtest"},
}
_EVENTS_PAGE: Final = 200
# Between waits the stream checks for shutdown and for a lost owner: keep it short.
_WAIT_MS: Final = 500
_SEND_TIMEOUT_S: Final = 30.0
# At shutdown streams end by themselves, or are cancelled after this long: it must stay
# below serve()'s graceful-shutdown timeout.
_SHUTDOWN_GRACE_S: Final = 1.0


async def _check_models(models: list[str], registry: Registry) -> None:
    try:
        known = await asyncio.to_thread(registry.versions)
    except RegistryError as exc:
        raise HTTPException(500, str(exc)) from exc
    for model in models:
        if model not in MODEL_ALIASES and model not in known:
            listed = ", ".join([*MODEL_ALIASES, *known])
            raise HTTPException(422, f"unknown model '{model}'; known: {listed}")


def _links(job_id: str) -> BacktestLinksOut:
    return BacktestLinksOut(**job_links(job_id))


async def _job(jobs: JobStore, job_id: str) -> JobState:
    state = await jobs.get(job_id)
    if state is None:
        raise HTTPException(404, f"unknown backtest '{job_id}'")
    return state


@router.post(
    "",
    status_code=202,
    response_model=BacktestAcceptedOut,
    responses={
        400: {"model": ErrorOut, "description": "the body cannot be read as text (not UTF-8)"},
        **unprocessable("a model that is not in the registry, or source 'kafka' without "
                        "Kafka"),
        429: {"model": ErrorOut, "description": "too many backtests; see Retry-After"},
    },
)
async def create_backtest(
    body: BacktestIn, settings: SettingsDep, jobs: JobsDep, response: Response
) -> BacktestAcceptedOut:
    """Queue a backtest of 1 to 4 models over trades replayed from Kafka or the archive.

    Follow it with ``links.events`` (SSE) or by polling ``links.self``.
    """
    if body.source == "kafka" and not settings.kafka_bootstrap:
        # The child would otherwise start an empty embedded broker and find no trades.
        raise HTTPException(
            422, "source 'kafka' replays the live trades topic, but this API has no Kafka; "
            "set MUR_KAFKA_BOOTSTRAP"
        )
    await _check_models(body.models, Registry(registry_root(settings)))
    try:
        job_id = await jobs.submit(body)
    except JobQueueFull as exc:
        raise HTTPException(
            429, str(exc), headers={"Retry-After": str(exc.retry_after_s)}
        ) from exc
    links = _links(job_id)
    response.headers["Location"] = links.self
    return BacktestAcceptedOut(id=job_id, status="queued", links=links)


@router.get("/{job_id}", response_model=BacktestOut, responses=_UNKNOWN)
async def get_backtest(job_id: JobIdDep, jobs: JobsDep) -> BacktestOut:
    """A job's status and progress; its metrics and report files once done."""
    state = await _job(jobs.store, job_id)
    return BacktestOut(
        id=state.id,
        status=state.status,
        stage=state.stage,
        progress=state.progress,
        message=state.message,
        created_ms=state.created_ms,
        updated_ms=state.updated_ms,
        request=BacktestIn.model_validate(state.request),
        metrics=state.metrics,
        files={name: report_url(job_id, name) for name in state.files},
        links=_links(job_id),
    )


@router.get(
    "/{job_id}/files/{name}",
    response_class=FileResponse,
    responses={
        200: {
            "content": {media_type.split(";")[0]: {} for media_type in REPORT_FILES.values()},
            "description": "the file",
        },
        404: {"model": ErrorOut, "description": "unknown backtest, or no such report file"},
    },
)
async def get_backtest_file(
    job_id: JobIdDep,
    name: Annotated[str, Path(description=f"one of {', '.join(REPORT_FILES)}")],
    jobs: JobsDep,
) -> FileResponse:
    """One report file of a finished backtest."""
    # Only the fixed names are ever joined to a path: nothing in the URL walks the disk.
    if name not in REPORT_FILES:
        raise HTTPException(
            404, f"unknown report file '{name}'; use one of {', '.join(REPORT_FILES)}"
        )
    state = await _job(jobs.store, job_id)
    path = jobs.report_dir(job_id) / name
    if name not in state.files or not await asyncio.to_thread(path.is_file):
        raise HTTPException(
            404, f"backtest '{job_id}' has no {name}" + ("" if state.finished else " yet")
        )
    # nosniff: browsers must not second-guess the type of a file served from the API origin.
    return FileResponse(
        path, media_type=REPORT_FILES[name], headers={"X-Content-Type-Options": "nosniff"}
    )


def _sse(event_id: str, event_type: str, data: bytes) -> ServerSentEvent:
    return ServerSentEvent(data=data.decode(), id=event_id, event=event_type)


async def _job_events(
    jobs: JobStore, job_id: str, resume_from: str | None, shutdown: anyio.Event
) -> AsyncIterator[ServerSentEvent]:
    """The job's events after ``resume_from``, then new ones until done/failed."""
    cursor = resume_from
    try:
        while not shutdown.is_set():
            page = await jobs.events_after(job_id, cursor, _EVENTS_PAGE)
            if not page:
                # Reading the state also marks a lost job failed, which appends its event.
                state = await jobs.get(job_id)
                if state is None:
                    return  # expired meanwhile
                if state.finished:
                    # The final event is written with the final state: it is in the stream
                    # now, unless the client already had it.
                    page = await jobs.events_after(job_id, cursor, _EVENTS_PAGE)
                    if not page:
                        return
                else:
                    page = await jobs.wait_events(job_id, cursor, _EVENTS_PAGE, _WAIT_MS)
            for event in page:
                cursor = event.id
                yield _sse(event.id, event.type, event.data)
                if event.type in FINAL_EVENTS:
                    return
    except RedisError as exc:
        # Headers are already sent: end the stream; the client resumes with Last-Event-ID.
        log.warning("cannot read the events of backtest %s: %r", job_id, exc)


@router.get(
    "/{job_id}/events",
    response_class=EventSourceResponse,
    responses={
        200: {
            "content": {"text/event-stream": {}},
            "description": "SSE: `event` = progress|done|failed, `id` = the job's event id, "
            "`data` = {status, stage, progress, message} (+ metrics and files when done); "
            "the stream ends after done or failed",
        },
        400: {"description": "malformed Last-Event-ID"},
        **_UNKNOWN,
    },
)
async def backtest_events(
    job_id: JobIdDep,
    settings: SettingsDep,
    jobs: JobsDep,
    resume_from: LastEventIdDep,
) -> EventSourceResponse:
    """The job's progress from its first event (or after ``Last-Event-ID``) to its end."""
    await _job(jobs.store, job_id)
    shutdown = anyio.Event()
    return EventSourceResponse(
        _job_events(jobs.store, job_id, resume_from, shutdown),
        ping=settings.sse_heartbeat_s,
        send_timeout=_SEND_TIMEOUT_S,
        shutdown_event=shutdown,
        shutdown_grace_period=_SHUTDOWN_GRACE_S,
    )
