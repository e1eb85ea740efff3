"""Backtests as background jobs: each one is a ``mur backtest`` child process.

The API process that accepts a job runs it: at most ``backtest_max_concurrent`` children at
once (a semaphore) and at most ``backtest_max_queued`` more waiting for a slot; beyond that
:meth:`JobManager.submit` raises :class:`JobQueueFull` (HTTP 429).

Everything a client can ask about a job lives in Redis (keys in :mod:`makeusrich.core.keys`),
so any API replica answers: a hash with the job's state and a capped stream of its progress
events, both expiring :data:`JOB_TTL_S` after the last write. Every write after creation
goes through one Lua script that refuses to touch a job already done or failed, so the first
final state wins whoever writes it, and the hash and its event always change together.

The owner refreshes ``updated_ms`` of its unfinished jobs every :data:`HEARTBEAT_S`. A job
still queued or running whose ``updated_ms`` is older than :data:`STALE_AFTER_MS` has lost
its owner (the API was killed): the next reader, on any replica, marks it failed.

The child writes one JSON object per line on stdout (``--progress jsonl``); malformed lines
are logged and skipped. Its stderr goes to the log at DEBUG, and its tail becomes the message
of a child that exits non-zero without a ``failed`` line.
"""

import asyncio
import contextlib
import json
import logging
import math
import os
import re
import shutil
import signal
import socket
import sys
import time
import uuid
from collections import deque
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final, cast

import redis.asyncio as aioredis
from redis.exceptions import RedisError
from redis.typing import EncodableT, FieldT

from makeusrich.api.models import BacktestIn, BacktestStatus
from makeusrich.core.errors import ApiError
from makeusrich.core.keys import RedisKeys
from makeusrich.core.schemas import now_ms
from makeusrich.core.settings import Settings
from makeusrich.core.store import format_stream_id, parse_stream_id

__all__ = [
    "JOB_TTL_S",
    "REPORT_FILES",
    "STALE_AFTER_MS",
    "JobEvent",
    "JobManager",
    "JobQueueFull",
    "JobState",
    "JobStore",
    "ProgressLine",
    "backtest_args",
    "is_job_id",
    "job_links",
    "parse_progress_line",
    "report_url",
]

log = logging.getLogger(__name__)

JOB_TTL_S: Final = 7 * 24 * 3600
HEARTBEAT_S: Final = 5.0
STALE_AFTER_MS: Final = 60_000
#: The report files `mur backtest` writes, and the media types they are served with. Only
#: these names are ever served: a URL cannot name any other file.
REPORT_FILES: Final[Mapping[str, str]] = {
    "metrics.json": "application/json",
    "predictions.parquet": "application/vnd.apache.parquet",
    "price_forecast.png": "image/png",
    "equity.png": "image/png",
    "error.png": "image/png",
    "report.html": "text/html; charset=utf-8",
}
FINAL_EVENTS: Final = ("done", "failed")

_EVENTS_MAXLEN: Final = 10_000
_RETRY_AFTER_S: Final = 30
# The "done" line carries the metrics; asyncio's default 64 KiB line limit is too tight.
_LINE_LIMIT: Final = 8 * 1024 * 1024
_STDERR_TAIL_LINES: Final = 12
_STDERR_TAIL_CHARS: Final = 2_000
_KILL_GRACE_S: Final = 3.0
_MAX_STAGE_LEN: Final = 32
# A child may report per record (thousands of lines): within a stage, a line becomes a Redis
# write and an SSE event only once progress moved this much or this long after the last.
_MIN_PROGRESS_STEP: Final = 0.01
_MIN_PROGRESS_INTERVAL_S: Final = 1.0
_JOB_ID: Final = re.compile(r"[0-9a-f]{32}")
_LOST: Final = (
    f"lost: the API process running this backtest stopped (no heartbeat for "
    f"{STALE_AFTER_MS // 1000} s)"
)
_STOPPED: Final = "the API stopped before the backtest finished"

# KEYS: job hash, events stream.
# ARGV: ttl s, events maxlen, stale-before ms ('' = any), event type ('' = none), event JSON,
#       then field, value, field, value, ...
# Returns the event id ('' without an event), or nil when refused: unknown or expired job,
# job already done/failed, or (with a stale-before bound) a job updated since.
_UPDATE_LUA: Final = """
local status = redis.call('HGET', KEYS[1], 'status')
if not status or status == 'done' or status == 'failed' then
  return false
end
if ARGV[3] ~= '' then
  local updated = tonumber(redis.call('HGET', KEYS[1], 'updated_ms')) or 0
  if updated >= tonumber(ARGV[3]) then return false end
end
if #ARGV > 5 then
  redis.call('HSET', KEYS[1], unpack(ARGV, 6))
end
local event_id = ''
if ARGV[4] ~= '' then
  event_id = redis.call('XADD', KEYS[2], 'MAXLEN', '~', ARGV[2], '*',
    'type', ARGV[4], 'd', ARGV[5])
end
redis.call('EXPIRE', KEYS[1], ARGV[1])
redis.call('EXPIRE', KEYS[2], ARGV[1])
return event_id
"""


def is_job_id(text: str) -> bool:
    """Job ids are uuid4 hex: checked before an id becomes a key or a path component."""
    return _JOB_ID.fullmatch(text) is not None


def report_url(job_id: str, name: str) -> str:
    """Where the API serves one report file (routes/backtests.py)."""
    return f"/v1/backtests/{job_id}/files/{name}"


def job_links(job_id: str) -> dict[str, str]:
    base = f"/v1/backtests/{job_id}"
    return {"self": base, "events": f"{base}/events", "report": report_url(job_id, "report.html")}


def backtest_args(request: BacktestIn, out_dir: Path) -> list[str]:
    """The ``mur backtest`` arguments for ``request`` (times as epoch ms: unambiguous).

    Names were validated (no leading '-', no separators) and no shell is involved, so no
    value can turn into another option.
    """
    args: list[str] = []
    for model in request.models:
        args += ["--model", model]
    args += ["--from", request.source]
    if request.symbols:
        args += ["--symbols", ",".join(request.symbols)]
    if request.interval is not None:
        args += ["--intervals", request.interval]
    if request.start is not None:
        args += ["--start", str(request.start)]
    if request.end is not None:
        args += ["--end", str(request.end)]
    args += ["--fee-bp", str(request.fee_bp), "--slippage-bp", str(request.slippage_bp)]
    args += ["--out", str(out_dir), "--progress", "jsonl"]
    return args


@dataclass(frozen=True, slots=True)
class ProgressLine:
    """One parsed line of ``--progress jsonl``."""

    stage: str
    progress: float | None
    message: str
    payload: dict[str, Any]


def parse_progress_line(line: str) -> ProgressLine | None:
    """The line as a progress record, or None when it is not one (logged and skipped).

    Any short ``stage`` is accepted, so a new stage in the command still shows as progress;
    ``progress`` is clamped to 0..1 and dropped when it is not a finite number.
    """
    try:
        obj = json.loads(line)
    except ValueError:
        return None
    if not isinstance(obj, dict):
        return None
    stage = obj.get("stage")
    if not isinstance(stage, str) or not stage or len(stage) > _MAX_STAGE_LEN:
        return None
    raw = obj.get("progress")
    progress: float | None = None
    if isinstance(raw, int | float) and not isinstance(raw, bool) and math.isfinite(raw):
        progress = min(1.0, max(0.0, float(raw)))
    message = obj.get("message")
    return ProgressLine(stage, progress, message if isinstance(message, str) else "", obj)


@dataclass(frozen=True, slots=True)
class JobState:
    """A job as stored in Redis."""

    id: str
    status: BacktestStatus
    stage: str
    progress: float
    message: str
    created_ms: int
    updated_ms: int
    request: dict[str, Any]
    metrics: dict[str, Any] | None
    files: tuple[str, ...]
    report_dir: str

    @property
    def finished(self) -> bool:
        return self.status in FINAL_EVENTS


@dataclass(frozen=True, slots=True)
class JobEvent:
    """One entry of a job's events stream: ``type`` progress|done|failed, ``data`` JSON."""

    id: str
    type: str
    data: bytes


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


def _json(value: object) -> str:
    return json.dumps(value, separators=(",", ":"), allow_nan=False)


def _loads(raw: str, default: Any) -> Any:
    try:
        return json.loads(raw) if raw else default
    except ValueError:
        return default


def _state(job_id: str, raw: Mapping[bytes | str, bytes | str]) -> JobState:
    fields = {_text(name): _text(value) for name, value in raw.items()}
    status = fields.get("status", "failed")
    if status not in ("queued", "running", "done", "failed"):
        status = "failed"
    metrics = _loads(fields.get("metrics", ""), None)
    files = _loads(fields.get("files", ""), [])
    return JobState(
        id=job_id,
        status=cast(BacktestStatus, status),
        stage=fields.get("stage", ""),
        progress=float(fields.get("progress") or 0.0),
        message=fields.get("message", ""),
        created_ms=int(fields.get("created_ms") or 0),
        updated_ms=int(fields.get("updated_ms") or 0),
        request=_loads(fields.get("request", ""), {}),
        metrics=metrics if isinstance(metrics, dict) else None,
        files=tuple(name for name in files if name in REPORT_FILES),
        report_dir=fields.get("report_dir", ""),
    )


def _event_data(status: str, stage: str, progress: float, message: str,
                **extra: Any) -> dict[str, Any]:
    return {"status": status, "stage": stage, "progress": progress, "message": message, **extra}


class JobStore:
    """The Redis side of backtest jobs; any API replica can read (and reap) any job."""

    def __init__(
        self, client: "aioredis.Redis", keys: RedisKeys, *, ttl_s: int = JOB_TTL_S,
        events_maxlen: int = _EVENTS_MAXLEN,
    ) -> None:
        self._client = client
        self._keys = keys
        self._ttl_s = ttl_s
        self._events_maxlen = events_maxlen
        self._update_script = client.register_script(_UPDATE_LUA)

    async def create(
        self, job_id: str, request: BacktestIn, report_dir: Path, owner: str
    ) -> None:
        """Store a new queued job with its first event."""
        ts = str(now_ms())
        fields: dict[FieldT, EncodableT] = {
            "status": "queued", "stage": "queued", "progress": "0",
            "message": "waiting for a free backtest slot", "created_ms": ts, "updated_ms": ts,
            "request": _json(request.model_dump(mode="json")), "report_dir": str(report_dir),
            "owner": owner,
        }
        data = _json(_event_data("queued", "queued", 0.0, "waiting for a free backtest slot"))
        hash_key, events_key = self._keys.backtest(job_id), self._keys.backtest_events(job_id)
        async with self._client.pipeline(transaction=True) as pipe:
            pipe.hset(hash_key, mapping=fields)
            pipe.xadd(events_key, {"type": "progress", "d": data},
                      maxlen=self._events_maxlen, approximate=True)
            pipe.expire(hash_key, self._ttl_s)
            pipe.expire(events_key, self._ttl_s)
            await pipe.execute()

    async def update(
        self,
        job_id: str,
        fields: Mapping[str, str],
        event: tuple[str, dict[str, Any]] | None = None,
        *,
        stale_before_ms: int | None = None,
    ) -> str | None:
        """Set ``fields`` (and ``updated_ms``) and append ``event`` (type, data) atomically.

        Returns the event id ('' without an event), or None when refused: the job is
        unknown, expired or already finished, or was updated at/after ``stale_before_ms``.
        """
        args: list[str | int] = [
            self._ttl_s, self._events_maxlen,
            "" if stale_before_ms is None else stale_before_ms,
            "" if event is None else event[0],
            "" if event is None else _json(event[1]),
        ]
        for name, value in {**fields, "updated_ms": str(now_ms())}.items():
            args += [name, value]
        keys = [self._keys.backtest(job_id), self._keys.backtest_events(job_id)]
        result = await self._update_script(keys=keys, args=args)
        return None if result is None else _text(result)

    async def heartbeat(self, job_ids: Sequence[str]) -> list[str]:
        """Refresh ``updated_ms`` of unfinished jobs; returns the ids that were refused."""
        if not job_ids:
            return []
        async with self._client.pipeline(transaction=False) as pipe:
            for job_id in job_ids:
                keys = [self._keys.backtest(job_id), self._keys.backtest_events(job_id)]
                args: list[str | int] = [
                    self._ttl_s, self._events_maxlen, "", "", "", "updated_ms", now_ms()
                ]
                await self._update_script(keys=keys, args=args, client=pipe)
            results = await pipe.execute()
        return [job_id for job_id, result in zip(job_ids, results, strict=True)
                if result is None]

    async def get(self, job_id: str) -> JobState | None:
        """The job, or None if unknown or expired. A queued/running job whose owner stopped
        heartbeating is marked failed ("lost") first, so every replica agrees."""
        raw = await self._client.hgetall(self._keys.backtest(job_id))
        if not raw:
            return None
        state = _state(job_id, raw)
        stale_before = now_ms() - STALE_AFTER_MS
        if not state.finished and state.updated_ms < stale_before:
            data = _event_data("failed", "failed", state.progress, _LOST)
            fields = {"status": "failed", "stage": "failed", "message": _LOST}
            if await self.update(job_id, fields, ("failed", data),
                                 stale_before_ms=stale_before) is not None:
                log.warning("backtest %s: %s", job_id, _LOST)
            raw = await self._client.hgetall(self._keys.backtest(job_id))
            if not raw:
                return None
            state = _state(job_id, raw)
        return state

    async def events_after(self, job_id: str, after: str | None, count: int) -> list[JobEvent]:
        """Up to ``count`` events strictly after ``after`` (from the first when None)."""
        start = "-" if after is None else "(" + format_stream_id(parse_stream_id(after))
        raw = await self._client.xrange(
            self._keys.backtest_events(job_id), min=start, max="+", count=count
        )
        return _events(raw)

    async def wait_events(
        self, job_id: str, after: str | None, count: int, block_ms: int
    ) -> list[JobEvent]:
        """Like :meth:`events_after`, but waits up to ``block_ms`` for the first one."""
        key = self._keys.backtest_events(job_id)
        reply = await self._client.xread({key: after or "0-0"}, count=count, block=block_ms)
        # RESP2 (the store's protocol): [[stream, [(id, fields), ...]]]; empty on timeout.
        return _events(cast(list[Any], reply)[0][1]) if reply else []


def _events(raw: Sequence[Any] | None) -> list[JobEvent]:
    events = []
    for entry_id, entry in raw or []:
        if entry_id is None or not entry:
            continue
        events.append(JobEvent(_text(entry_id), entry.get(b"type", b"").decode(),
                               entry.get(b"d", b"{}")))
    return events


class JobQueueFull(ApiError):
    """This API process already runs and queues as many backtests as it may (HTTP 429)."""

    def __init__(self, message: str, retry_after_s: int = _RETRY_AFTER_S) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s


@dataclass(eq=False)
class _Job:
    id: str
    request: BacktestIn
    out_dir: Path
    task: "asyncio.Task[None] | None" = None
    running: bool = False
    stage: str = "queued"
    progress: float = 0.0
    reported_at: float = 0.0  # time.monotonic() of the last progress write
    # What the child said it ended with: the "done" payload or the "failed" message.
    done: dict[str, Any] | None = None
    failed: str | None = None
    stderr_tail: deque[str] = field(default_factory=lambda: deque(maxlen=_STDERR_TAIL_LINES))


class JobManager:
    """Runs this process's backtest jobs and keeps their state in Redis.

    :meth:`start` and :meth:`stop` belong to the app's lifespan; :meth:`stop` kills running
    children and marks every unfinished job of this process failed.
    """

    def __init__(
        self,
        settings: Settings,
        client: "aioredis.Redis",
        *,
        command: Sequence[str] | None = None,
    ) -> None:
        self.settings = settings
        self.store = JobStore(client, settings.redis_keys)
        #: The argv prefix before ``backtest ...``: this interpreter's ``mur``. Tests point
        #: it at stand-ins for failures the real command cannot produce on demand.
        self.command: list[str] = (
            list(command) if command is not None else [sys.executable, "-m", "makeusrich"]
        )
        self._slots = asyncio.Semaphore(settings.backtest_max_concurrent)
        self._jobs: dict[str, _Job] = {}
        self._owner = f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"
        self._heartbeat: asyncio.Task[None] | None = None
        self._stopping = False

    @property
    def reports_root(self) -> Path:
        return self.settings.state_dir / "backtests"

    def report_dir(self, job_id: str) -> Path:
        assert is_job_id(job_id), job_id
        return self.reports_root / job_id

    @property
    def running(self) -> int:
        return sum(job.running for job in self._jobs.values())

    @property
    def queued(self) -> int:
        return len(self._jobs) - self.running

    async def start(self) -> None:
        if self._heartbeat is None:
            self._heartbeat = asyncio.create_task(self._beat(), name="mur-backtest-heartbeat")
        await asyncio.to_thread(self._prune_reports)

    async def stop(self) -> None:
        """Kill running children, fail unfinished jobs ("the API stopped"), stop beating."""
        self._stopping = True
        tasks = [job.task for job in self._jobs.values() if job.task is not None]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        heartbeat, self._heartbeat = self._heartbeat, None
        if heartbeat is not None:
            heartbeat.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await heartbeat

    async def submit(self, request: BacktestIn) -> str:
        """Queue a backtest; returns its id. :class:`JobQueueFull` when no room is left."""
        limit = self.settings.backtest_max_concurrent + self.settings.backtest_max_queued
        if self._stopping:
            raise JobQueueFull("the API is stopping; submit the backtest again later")
        if len(self._jobs) >= limit:
            raise JobQueueFull(
                f"too many backtests on this API process: {self.running} running, "
                f"{self.queued} waiting (backtest_max_concurrent="
                f"{self.settings.backtest_max_concurrent}, backtest_max_queued="
                f"{self.settings.backtest_max_queued}); retry in {_RETRY_AFTER_S} s"
            )
        job_id = uuid.uuid4().hex
        job = _Job(job_id, request, self.report_dir(job_id))
        # Reserved before the first await, so concurrent submits cannot overshoot the limit.
        self._jobs[job_id] = job
        try:
            await self.store.create(job_id, request, job.out_dir, self._owner)
        except BaseException:
            del self._jobs[job_id]
            raise
        job.task = asyncio.create_task(self._run(job), name=f"mur-backtest-{job_id}")
        return job_id

    # ------------------------------------------------------------------ running

    async def _run(self, job: _Job) -> None:
        try:
            async with self._slots:
                job.running = True
                await self._execute(job)
        except asyncio.CancelledError:
            await self._finish_failed(job, _STOPPED)
            raise
        except Exception as exc:
            log.exception("backtest %s failed in the API", job.id)
            await self._finish_failed(job, f"internal error running the backtest: {exc!r}")
        finally:
            self._jobs.pop(job.id, None)

    async def _execute(self, job: _Job) -> None:
        await asyncio.to_thread(job.out_dir.mkdir, parents=True, exist_ok=True)
        argv = [*self.command, "backtest", *backtest_args(job.request, job.out_dir)]
        await self._progress(job, "starting", 0.0, "starting mur backtest", status="running")
        log.info("backtest %s: %s", job.id, " ".join(argv))
        try:
            process = await asyncio.create_subprocess_exec(
                *argv,
                stdin=asyncio.subprocess.DEVNULL,
                stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.PIPE,
                env={**os.environ, **self.settings.as_env()},
                # Own process group: a terminal's Ctrl-C reaches the API, which then stops
                # the children itself (and can kill whatever they started).
                start_new_session=True,
                limit=_LINE_LIMIT,
            )
        except OSError as exc:
            await self._finish_failed(job, f"cannot start mur backtest: {exc}")
            return
        stderr_task = asyncio.create_task(self._drain_stderr(job, process))
        try:
            await self._follow_stdout(job, process)
            returncode = await process.wait()
            await stderr_task
        finally:
            if process.returncode is None:
                await _terminate(process)
            stderr_task.cancel()
        await self._settle(job, returncode)

    async def _follow_stdout(self, job: _Job, process: asyncio.subprocess.Process) -> None:
        assert process.stdout is not None
        while True:
            try:
                raw = await process.stdout.readline()
            except ValueError:  # over the limit: asyncio dropped it
                log.warning("backtest %s: ignoring a progress line over %d bytes",
                            job.id, _LINE_LIMIT)
                continue
            if not raw:
                return
            line = raw.decode("utf-8", "replace").strip()
            if not line:
                continue
            parsed = parse_progress_line(line)
            if parsed is None:
                log.warning("backtest %s: ignoring malformed progress line %r",
                            job.id, line[:200])
            elif parsed.stage == "done":
                job.done = parsed.payload
            elif parsed.stage == "failed":
                job.failed = parsed.message or "mur backtest failed without a message"
            else:
                progress = job.progress if parsed.progress is None else parsed.progress
                if (
                    parsed.stage != job.stage
                    or abs(progress - job.progress) >= _MIN_PROGRESS_STEP
                    or time.monotonic() - job.reported_at >= _MIN_PROGRESS_INTERVAL_S
                ):
                    await self._progress(job, parsed.stage, progress, parsed.message)

    async def _drain_stderr(self, job: _Job, process: asyncio.subprocess.Process) -> None:
        assert process.stderr is not None
        while True:
            try:
                raw = await process.stderr.readline()
            except ValueError:
                continue
            if not raw:
                return
            line = raw.decode("utf-8", "replace").rstrip()
            if line:
                job.stderr_tail.append(line)
                log.debug("backtest %s: %s", job.id, line)

    def _stderr_tail(self, job: _Job) -> str:
        return "\n".join(job.stderr_tail)[-_STDERR_TAIL_CHARS:]

    async def _settle(self, job: _Job, returncode: int) -> None:
        """The final state, from the exit code and what the child said last."""
        if job.failed is not None:
            await self._finish_failed(job, job.failed)
        elif returncode == 0 and job.done is not None:
            await self._finish_done(job, job.done)
        else:
            if returncode < 0:
                reason = f"mur backtest was killed by signal {-returncode}"
            elif returncode == 0:
                reason = "mur backtest exited without reporting a result"
            else:
                reason = f"mur backtest exited with code {returncode}"
            tail = self._stderr_tail(job)
            await self._finish_failed(job, f"{reason}: {tail}" if tail else reason)

    async def _finish_done(self, job: _Job, payload: dict[str, Any]) -> None:
        def present() -> list[str]:
            return [name for name in REPORT_FILES if (job.out_dir / name).is_file()]

        files = await asyncio.to_thread(present)
        metrics = payload.get("metrics")
        if not isinstance(metrics, dict):
            metrics = None
        message = payload.get("message")
        message = message if isinstance(message, str) and message else "backtest complete"
        fields = {
            "status": "done", "stage": "done", "progress": "1", "message": message,
            "metrics": _json(metrics), "files": _json(files), "report_dir": str(job.out_dir),
        }
        data = _event_data("done", "done", 1.0, message, metrics=metrics,
                           files={name: report_url(job.id, name) for name in files})
        if await self.store.update(job.id, fields, ("done", data)) is None:
            log.warning("backtest %s finished but was already marked failed", job.id)
        else:
            log.info("backtest %s done: %s", job.id, job.out_dir)

    async def _finish_failed(self, job: _Job, message: str) -> None:
        fields = {"status": "failed", "stage": "failed", "message": message}
        data = _event_data("failed", "failed", job.progress, message)
        try:
            await self.store.update(job.id, fields, ("failed", data))
        except RedisError as exc:
            log.error("backtest %s failed (%s) and cannot be marked so: %r", job.id, message, exc)
            return
        log.warning("backtest %s failed: %s", job.id, message)

    async def _progress(
        self, job: _Job, stage: str, progress: float, message: str, *, status: str = "running"
    ) -> None:
        job.stage, job.progress, job.reported_at = stage, progress, time.monotonic()
        fields = {"status": status, "stage": stage, "progress": str(progress),
                  "message": message}
        try:
            await self.store.update(
                job.id, fields, ("progress", _event_data(status, stage, progress, message))
            )
        except RedisError as exc:
            # Progress is best effort: the backtest goes on, its final state is written
            # (or, if Redis stays down, the job reads as lost once it is back).
            log.warning("backtest %s: cannot store progress: %r", job.id, exc)

    # ------------------------------------------------------------- housekeeping

    async def _beat(self) -> None:
        while True:
            await asyncio.sleep(HEARTBEAT_S)
            try:
                refused = await self.store.heartbeat(list(self._jobs))
            except RedisError as exc:
                log.warning("backtest heartbeat failed: %r", exc)
                continue
            for job_id in refused:
                if job_id in self._jobs:
                    log.warning("backtest %s was finished by another process", job_id)

    def _prune_reports(self) -> None:
        """Remove report directories older than the jobs' TTL: their jobs are gone."""
        cutoff = time.time() - JOB_TTL_S
        try:
            children = list(self.reports_root.iterdir())
        except FileNotFoundError:
            return
        except OSError as exc:
            log.warning("cannot list %s: %s", self.reports_root, exc)
            return
        for child in children:
            with contextlib.suppress(OSError):
                if is_job_id(child.name) and child.is_dir() and child.stat().st_mtime < cutoff:
                    shutil.rmtree(child)


async def _terminate(process: asyncio.subprocess.Process) -> None:
    """SIGTERM the child's process group, SIGKILL it if still there after a grace."""
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(process.pid, signal.SIGTERM)
    try:
        await asyncio.wait_for(process.wait(), _KILL_GRACE_S)
    except TimeoutError:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(process.pid, signal.SIGKILL)
        await process.wait()
