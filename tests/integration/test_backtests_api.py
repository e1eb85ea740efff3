"""``/v1/backtests`` over real HTTP (uvicorn in a thread) against a real redis-server, with
SSE read by httpx-sse.

The full runs start the real ``mur backtest`` against the session's broker. Failure modes
the real command cannot produce on demand (garbage on stdout, a crash without a ``failed``
line, a child still running when the API stops) use a small stand-in script as the child:
a real process speaking the same stdout contract.
"""

import asyncio
import json
import os
import sys
import time
import uuid
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import httpx
import pytest
import redis
from httpx_sse import ServerSentEvent, aconnect_sse

import makeusrich
from kit.api import RunningApi, serve_in_thread, settings_factory
from kit.broker import Broker
from makeusrich.api.jobs import JOB_TTL_S, REPORT_FILES, STALE_AFTER_MS, JobManager
from makeusrich.core.embedded import EmbeddedService
from makeusrich.core.schemas import now_ms
from makeusrich.core.settings import Settings
from makeusrich.inference import Registry, bundled_models_dir
from makeusrich.stream.publisher import TradePublisher, ensure_topics
from makeusrich.stream.sources import read_trades

pytestmark = pytest.mark.integration

BUNDLED = Registry(bundled_models_dir()).selected()
KNOWN = ", ".join(Registry(bundled_models_dir()).versions())
# The demo hour shipped in the package (15,318 trades, 00:00-00:59 UTC).
BUNDLED_SAMPLE = (
    Path(makeusrich.__file__).parent / "data" / "BTCUSDT-trades-2019-04-01-0000-0059.zip"
)
APRIL_1_MS = 1_554_076_800_000  # 2019-04-01T00:00Z: the fixture trades span 00:00-00:29

STAND_IN = r'''
import json, os, pathlib, sys, time

mode, args = sys.argv[1], sys.argv[2:]
assert args[0] == "backtest", args
out = pathlib.Path(args[args.index("--out") + 1])


def emit(line):
    print(line if isinstance(line, str) else json.dumps(line), flush=True)


(out / "argv.json").write_text(json.dumps(args))
if mode == "ok":
    emit("this is not json")
    emit("[1, 2, 3]")
    emit({"progress": 0.5})
    emit({"stage": "replay", "progress": 0.25, "message": "champion: replaying"})
    for i in range(500):  # a chatty child: these must not all become events
        emit({"stage": "replay", "progress": 0.25 + i * 1e-6, "message": f"{i} trades"})
    emit({"stage": "score", "progress": 0.9, "message": "scoring"})
    emit({"stage": "report", "progress": 0.95, "message": "writing the report"})
    (out / "report.html").write_text("<html><body>stand-in report</body></html>")
    (out / "metrics.json").write_text(json.dumps({"mae": 1.5}))
    (out / "notes.txt").write_text("not a report file")
    emit({"stage": "done", "progress": 1.0, "report_dir": str(out),
          "files": {"report.html": str(out / "report.html"),
                    "metrics.json": str(out / "metrics.json")},
          "metrics": {"mae": 1.5}})
elif mode == "crash":
    emit({"stage": "replay", "progress": 0.1, "message": "replaying"})
    print("Traceback (most recent call last):", file=sys.stderr)
    print("RuntimeError: the disk caught fire", file=sys.stderr)
    sys.exit(3)
elif mode == "slow":
    (out / "pid").write_text(str(os.getpid()))
    emit({"stage": "replay", "progress": 0.1, "message": "replaying"})
    time.sleep(120)
'''


@pytest.fixture
def make_settings(redis_server: EmbeddedService, tmp_path: Path) -> Callable[..., Settings]:
    return settings_factory(redis_server.url, state_dir=tmp_path / "state", log_level="WARNING")


@pytest.fixture
def stand_in(tmp_path: Path) -> Callable[[RunningApi, str], None]:
    script = tmp_path / "stand_in.py"
    script.write_text(STAND_IN)

    def use(api: RunningApi, mode: str) -> None:
        jobs: JobManager = api.app.state.jobs
        jobs.command = [sys.executable, str(script), mode]

    return use


@pytest.fixture
async def client(start_api: Callable[..., RunningApi]) -> AsyncIterator[httpx.AsyncClient]:
    api = start_api()
    async with httpx.AsyncClient(base_url=api.base_url, timeout=10) as client:
        yield client


def hex_id() -> str:
    return uuid.uuid4().hex


async def wait_final(
    client: httpx.AsyncClient, job_id: str, timeout_s: float = 30.0
) -> dict[str, Any]:
    """Poll GET until the job is done or failed."""
    deadline = time.monotonic() + timeout_s
    while True:
        response = await client.get(f"/v1/backtests/{job_id}")
        assert response.status_code == 200, response.text
        body: dict[str, Any] = response.json()
        if body["status"] in ("done", "failed"):
            return body
        assert time.monotonic() < deadline, f"still {body['status']} after {timeout_s} s: {body}"
        await asyncio.sleep(0.1)


async def all_events(
    client: httpx.AsyncClient, job_id: str, headers: dict[str, str] | None = None,
    timeout_s: float = 30.0,
) -> list[ServerSentEvent]:
    """Every SSE event until the server ends the stream (it must end by itself)."""
    events = []
    async with (
        asyncio.timeout(timeout_s),
        aconnect_sse(client, "GET", f"/v1/backtests/{job_id}/events",
                     headers=headers or {}) as source,
    ):
        assert source.response.status_code == 200, await source.response.aread()
        async for event in source.aiter_sse():
            # httpx-sse turns a heartbeat comment after an event into an empty "message"
            # event repeating the last id; those are keep-alives, not job events.
            if event.event == "message" and not event.data:
                continue
            events.append(event)
    return events


async def submit(client: httpx.AsyncClient, **fields: Any) -> str:
    body = {"models": ["champion"], "source": "archive", **fields}
    response = await client.post("/v1/backtests", json=body)
    assert response.status_code == 202, response.text
    accepted = response.json()
    job_id: str = accepted["id"]
    assert accepted == {
        "id": job_id, "status": "queued",
        "links": {
            "self": f"/v1/backtests/{job_id}", "events": f"/v1/backtests/{job_id}/events",
            "report": f"/v1/backtests/{job_id}/files/report.html",
        },
    }
    assert response.headers["location"] == f"/v1/backtests/{job_id}"
    return job_id


# ------------------------------------------------------------------------ validation


VALID: dict[str, Any] = {"models": ["champion"], "source": "archive"}


@pytest.mark.parametrize(
    ("change", "loc", "message"),
    [
        ({"models": None}, ["body", "models"], "Field required"),
        ({"models": []}, ["body", "models"], "List should have at least 1 item"),
        ({"models": ["champion", "a", "b", "c", "d"]}, ["body", "models"],
         "List should have at most 4 items"),
        ({"models": [""]}, ["body", "models"], "invalid model name ''"),
        ({"models": ["../../etc/passwd"]}, ["body", "models"], "no path separators"),
        ({"models": [7]}, ["body", "models", 0], "Input should be a valid string"),
        ({"models": "champion"}, ["body", "models"], "Input should be a valid list"),
        ({"source": None}, ["body", "source"], "Field required"),
        ({"source": "/data/trades.csv"}, ["body", "source"],
         "Input should be 'kafka' or 'archive'"),
        ({"symbols": ["BTC-USDT"]}, ["body", "symbols"], "invalid symbol 'BTC-USDT'"),
        ({"symbols": ["B"]}, ["body", "symbols"], "invalid symbol 'B'"),
        ({"symbols": []}, ["body", "symbols"], "List should have at least 1 item"),
        ({"symbols": "BTCUSDT"}, ["body", "symbols"], "Input should be a valid list"),
        ({"interval": "7m"}, ["body", "interval"], "unsupported interval '7m'; use one of"),
        ({"start": "last tuesday"}, ["body", "start"], "invalid time 'last tuesday'"),
        ({"end": 1.5}, ["body", "end"], "Input should be a valid integer"),
        ({"start": "2019-04-01T00:30", "end": "2019-04-01T00:30"}, ["body"],
         "start (1554078600000) must be before end (1554078600000), epoch ms"),
        ({"fee_bp": -1}, ["body", "fee_bp"], "Input should be greater than or equal to 0"),
        ({"fee_bp": 1e6}, ["body", "fee_bp"], "Input should be less than or equal to 1000"),
        ({"fee_bp": "10"}, ["body", "fee_bp"], "Input should be a valid number"),
        ({"slippage_bp": -0.5}, ["body", "slippage_bp"],
         "Input should be greater than or equal to 0"),
        ({"path": "/etc"}, ["body", "path"], "Extra inputs are not permitted"),
    ],
)
async def test_invalid_bodies_are_422(
    client: httpx.AsyncClient, change: dict[str, Any], loc: list[Any], message: str
) -> None:
    body = {**VALID, **change}
    body = {name: value for name, value in body.items() if value is not None}
    response = await client.post("/v1/backtests", json=body)
    assert response.status_code == 422, response.text
    (error,) = response.json()["detail"]
    assert error["loc"] == loc
    assert message in error["msg"]


async def test_unknown_model_is_422_naming_the_known_ones(client: httpx.AsyncClient) -> None:
    response = await client.post(
        "/v1/backtests", json={**VALID, "models": ["champion", "lstm-nope"]}
    )
    assert response.status_code == 422
    assert response.json() == {
        "detail": f"unknown model 'lstm-nope'; known: champion, {KNOWN}"
    }
    # `naive` is not a model to backtest: the baselines are always scored.
    response = await client.post("/v1/backtests", json={**VALID, "models": ["naive"]})
    assert response.status_code == 422
    assert "unknown model 'naive'" in response.json()["detail"]


async def test_kafka_source_needs_kafka(client: httpx.AsyncClient) -> None:
    response = await client.post("/v1/backtests", json={**VALID, "source": "kafka"})
    assert response.status_code == 422
    assert "set MUR_KAFKA_BOOTSTRAP" in response.json()["detail"]


async def test_not_a_json_body(client: httpx.AsyncClient) -> None:
    response = await client.post(
        "/v1/backtests", content=b"models=champion", headers={"content-type": "text/plain"}
    )
    assert response.status_code == 422


# ---------------------------------------------------------------------------- 404s


async def test_unknown_ids_and_files_are_404(client: httpx.AsyncClient) -> None:
    unknown = hex_id()
    for path in (f"/v1/backtests/{unknown}", f"/v1/backtests/{unknown}/events",
                 f"/v1/backtests/{unknown}/files/report.html",
                 "/v1/backtests/not-an-id", "/v1/backtests/..%2F..%2Fetc/files/report.html"):
        response = await client.get(path)
        assert response.status_code == 404, (path, response.text)
    assert (await client.get(f"/v1/backtests/{unknown}")).json() == {
        "detail": f"unknown backtest '{unknown}'"
    }
    assert (await client.get("/v1/backtests/NOT-AN-ID")).json() == {
        "detail": "unknown backtest 'NOT-AN-ID'"
    }


async def test_malformed_last_event_id_is_400(
    start_api: Callable[..., RunningApi], stand_in: Callable[[RunningApi, str], None]
) -> None:
    api = start_api()
    stand_in(api, "ok")
    async with httpx.AsyncClient(base_url=api.base_url, timeout=10) as client:
        job_id = await submit(client)
        response = await client.get(
            f"/v1/backtests/{job_id}/events", headers={"Last-Event-ID": "yesterday"}
        )
        assert response.status_code == 400
        assert response.json()["detail"].startswith("invalid Last-Event-ID")
        await wait_final(client, job_id)


# ------------------------------------------------------- stand-in children (contract)


async def test_progress_report_files_and_resume(
    start_api: Callable[..., RunningApi], stand_in: Callable[[RunningApi, str], None],
    redis_client: redis.Redis,
) -> None:
    api = start_api()
    stand_in(api, "ok")
    async with httpx.AsyncClient(base_url=api.base_url, timeout=10) as client:
        job_id = await submit(
            client, symbols=["btcusdt"], interval="1m", start="2019-04-01T00:00",
            end=APRIL_1_MS + 30 * 60_000, fee_bp=5, slippage_bp=0.5,
        )
        body = await wait_final(client, job_id)
        assert body["status"] == "done", body
        assert (body["stage"], body["progress"], body["message"]) == (
            "done", 1.0, "backtest complete"
        )
        assert body["metrics"] == {"mae": 1.5}
        assert body["request"] == {
            "models": ["champion"], "source": "archive", "symbols": ["BTCUSDT"],
            "interval": "1m", "start": APRIL_1_MS, "end": APRIL_1_MS + 30 * 60_000,
            "fee_bp": 5.0, "slippage_bp": 0.5,
        }
        assert body["created_ms"] <= body["updated_ms"]
        # Only known report names that exist are linked (notes.txt is not one).
        assert body["files"] == {
            "metrics.json": f"/v1/backtests/{job_id}/files/metrics.json",
            "report.html": f"/v1/backtests/{job_id}/files/report.html",
        }
        report_dir = api.settings.state_dir / "backtests" / job_id
        argv = json.loads((report_dir / "argv.json").read_text())
        assert argv == [
            "backtest", "--model", "champion", "--from", "archive", "--symbols", "BTCUSDT",
            "--intervals", "1m", "--start", str(APRIL_1_MS),
            "--end", str(APRIL_1_MS + 30 * 60_000), "--fee-bp", "5.0", "--slippage-bp", "0.5",
            "--out", str(report_dir), "--progress", "jsonl",
        ]

        html = await client.get(body["files"]["report.html"])
        assert html.status_code == 200
        assert html.headers["content-type"] == "text/html; charset=utf-8"
        assert "stand-in report" in html.text
        metrics = await client.get(body["files"]["metrics.json"])
        assert metrics.headers["content-type"] == "application/json"
        assert metrics.json() == {"mae": 1.5}
        for name in ("equity.png", "notes.txt", "argv.json", "..%2Fargv.json"):
            response = await client.get(f"/v1/backtests/{job_id}/files/{name}")
            assert response.status_code == 404, name

        # The whole story over SSE: garbage lines were skipped, the 500 chatty lines
        # coalesced (at most one per second within a stage), the stream ends by itself.
        events = await all_events(client, job_id)
        assert len(events) < 20
        assert [e.event for e in events] == ["progress"] * (len(events) - 1) + ["done"]
        stages = [json.loads(e.data)["stage"] for e in events]
        assert list(dict.fromkeys(stages)) == [
            "queued", "starting", "replay", "score", "report", "done"
        ]
        assert json.loads(events[2].data) == {
            "status": "running", "stage": "replay", "progress": 0.25,
            "message": "champion: replaying",
        }
        done = json.loads(events[-1].data)
        assert done["metrics"] == {"mae": 1.5} and done["files"] == body["files"]
        ids = [e.id for e in events]
        assert len(set(ids)) == len(ids)

        # Resuming delivers exactly what came after the given id...
        resumed = await all_events(client, job_id, headers={"Last-Event-ID": ids[2]})
        assert [e.id for e in resumed] == ids[3:]
        assert [e.data for e in resumed] == [e.data for e in events[3:]]
        # ...and after the final event, nothing: the stream ends at once.
        assert await all_events(client, job_id, headers={"Last-Event-ID": ids[-1]}) == []

        # Both keys expire (a week after the last write).
        prefix = api.settings.redis_prefix
        for key in (f"{prefix}:backtest:{job_id}", f"{prefix}:backtest:{job_id}:events"):
            assert JOB_TTL_S - 60 < redis_client.ttl(key) <= JOB_TTL_S


async def test_a_crash_fails_with_the_tail_of_stderr(
    start_api: Callable[..., RunningApi], stand_in: Callable[[RunningApi, str], None]
) -> None:
    api = start_api()
    stand_in(api, "crash")
    async with httpx.AsyncClient(base_url=api.base_url, timeout=10) as client:
        job_id = await submit(client)
        body = await wait_final(client, job_id)
        assert body["status"] == "failed"
        assert body["stage"] == "failed"
        assert body["progress"] == 0.1
        assert body["message"] == (
            "mur backtest exited with code 3: Traceback (most recent call last):\n"
            "RuntimeError: the disk caught fire"
        )
        assert body["metrics"] is None and body["files"] == {}
        events = await all_events(client, job_id)
        assert [e.event for e in events][-1] == "failed"
        assert json.loads(events[-1].data)["message"] == body["message"]
        response = await client.get(f"/v1/backtests/{job_id}/files/report.html")
        assert response.status_code == 404
        assert response.json() == {"detail": f"backtest '{job_id}' has no report.html"}


async def test_queue_full_is_429_and_stopping_the_api_kills_the_child(
    make_settings: Callable[..., Settings], stand_in: Callable[[RunningApi, str], None],
    redis_client: redis.Redis,
) -> None:
    settings = make_settings(backtest_max_concurrent=1, backtest_max_queued=0)
    with serve_in_thread(settings) as api:
        stand_in(api, "slow")
        async with httpx.AsyncClient(base_url=api.base_url, timeout=10) as client:
            job_id = await submit(client)
            response = await client.post("/v1/backtests", json=VALID)
            assert response.status_code == 429
            assert response.headers["retry-after"] == "30"
            assert response.json()["detail"] == (
                "too many backtests on this API process: 1 running, 0 waiting "
                "(backtest_max_concurrent=1, backtest_max_queued=0); retry in 30 s"
            )
            # Running: the child said so, and its progress is visible.
            pid_file = settings.state_dir / "backtests" / job_id / "pid"
            deadline = time.monotonic() + 20
            while True:
                body = (await client.get(f"/v1/backtests/{job_id}")).json()
                if body["stage"] == "replay" and pid_file.exists():
                    break
                assert time.monotonic() < deadline, body
                await asyncio.sleep(0.05)
            assert (body["status"], body["progress"]) == ("running", 0.1)
            pid = int(pid_file.read_text())
    # The API stopped: the child is gone and the job says why.
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)
    stored = redis_client.hgetall(f"{settings.redis_prefix}:backtest:{job_id}")
    assert stored[b"status"] == b"failed"
    assert stored[b"message"] == b"the API stopped before the backtest finished"

    # Another API process (a replica, or this one restarted) reads the same state.
    with serve_in_thread(settings) as api:
        async with httpx.AsyncClient(base_url=api.base_url, timeout=10) as client:
            body = (await client.get(f"/v1/backtests/{job_id}")).json()
            assert (body["status"], body["message"]) == (
                "failed", "the API stopped before the backtest finished"
            )
            events = await all_events(client, job_id)
            assert [e.event for e in events][-1] == "failed"


async def test_queued_jobs_wait_for_a_slot(
    make_settings: Callable[..., Settings], stand_in: Callable[[RunningApi, str], None],
) -> None:
    settings = make_settings(backtest_max_concurrent=1, backtest_max_queued=1)
    with serve_in_thread(settings) as api:
        stand_in(api, "slow")
        async with httpx.AsyncClient(base_url=api.base_url, timeout=10) as client:
            first = await submit(client)
            second = await submit(client)
            assert (await client.post("/v1/backtests", json=VALID)).status_code == 429
            await asyncio.sleep(0.5)
            assert (await client.get(f"/v1/backtests/{first}")).json()["status"] == "running"
            waiting = (await client.get(f"/v1/backtests/{second}")).json()
            assert (waiting["status"], waiting["message"]) == (
                "queued", "waiting for a free backtest slot"
            )
    # Stopping the API fails the queued job too; it never started a child.
    with serve_in_thread(settings) as api:
        async with httpx.AsyncClient(base_url=api.base_url, timeout=10) as client:
            for job_id in (first, second):
                body = (await client.get(f"/v1/backtests/{job_id}")).json()
                assert body["status"] == "failed"
    assert not (settings.state_dir / "backtests" / second / "pid").exists()


async def test_a_job_whose_owner_died_reads_as_lost(
    start_api: Callable[..., RunningApi], redis_client: redis.Redis
) -> None:
    api = start_api()
    prefix = api.settings.redis_prefix
    job_id = hex_id()
    stale = now_ms() - STALE_AFTER_MS - 1_000
    # What a killed API leaves behind: a running job nobody heartbeats.
    redis_client.hset(f"{prefix}:backtest:{job_id}", mapping={
        "status": "running", "stage": "replay", "progress": "0.4", "message": "replaying",
        "created_ms": stale, "updated_ms": stale,
        "request": json.dumps({**VALID, "fee_bp": 10.0, "slippage_bp": 2.0}),
        "report_dir": "", "owner": "elsewhere",
    })
    progress_id = redis_client.xadd(f"{prefix}:backtest:{job_id}:events",
                                    {"type": "progress", "d": "{}"})
    async with httpx.AsyncClient(base_url=api.base_url, timeout=10) as client:
        events = await all_events(client, job_id)
        assert [e.event for e in events] == ["progress", "failed"]
        assert events[0].id == progress_id.decode()
        failed = json.loads(events[1].data)
        assert failed["status"] == "failed" and failed["progress"] == 0.4
        assert failed["message"].startswith("lost: the API process running this backtest")
        body = (await client.get(f"/v1/backtests/{job_id}")).json()
        assert (body["status"], body["message"]) == ("failed", failed["message"])

    # A fresh heartbeat keeps a running job alive.
    fresh = hex_id()
    redis_client.hset(f"{prefix}:backtest:{fresh}", mapping={
        "status": "running", "stage": "score", "progress": "0.9", "message": "",
        "created_ms": stale, "updated_ms": now_ms(),
        "request": json.dumps(VALID),
    })
    async with httpx.AsyncClient(base_url=api.base_url, timeout=10) as client:
        assert (await client.get(f"/v1/backtests/{fresh}")).json()["status"] == "running"


async def test_openapi_documents_backtests(client: httpx.AsyncClient) -> None:
    spec = (await client.get("/openapi.json")).json()
    assert {
        "/v1/backtests", "/v1/backtests/{job_id}", "/v1/backtests/{job_id}/events",
        "/v1/backtests/{job_id}/files/{name}",
    } <= set(spec["paths"])
    assert set(spec["components"]["schemas"]["BacktestIn"]["properties"]) == {
        "models", "source", "symbols", "interval", "start", "end", "fee_bp", "slippage_bp",
    }
    assert set(REPORT_FILES) == {
        "metrics.json", "predictions.parquet", "price_forecast.png", "equity.png",
        "error.png", "report.html",
    }


# ------------------------------------------------------------- the real mur backtest


@pytest.fixture
def kafka_settings(
    make_settings: Callable[..., Settings], kafka: Broker
) -> Callable[..., Settings]:
    topic_prefix = f"bt-{uuid.uuid4().hex[:8]}-"

    def build(**overrides: Any) -> Settings:
        return make_settings(kafka_bootstrap=kafka.url, topic_prefix=topic_prefix,
                             symbols=("BTCUSDT",), **overrides)

    return build


def publish_trades(settings: Settings, path: Path) -> int:
    """Publish a trades file to the live trades topic, as the ingestor would."""
    ensure_topics(settings)
    publisher = TradePublisher(settings)
    try:
        for trade in read_trades(path):
            publisher.send(trade)
    finally:
        publisher.close()
    return publisher.sent


@pytest.mark.slow
async def test_a_real_backtest_over_published_trades(
    kafka_settings: Callable[..., Settings],
) -> None:
    # The bundled hour, not the 30-minute test fixture: the model needs 30 candles of
    # window before its first forecast, so half an hour of 1m candles scores nothing (the
    # next test shows the command refusing exactly that).
    settings = kafka_settings()
    assert publish_trades(settings, BUNDLED_SAMPLE) == 15_318
    with serve_in_thread(settings) as api:
        async with httpx.AsyncClient(base_url=api.base_url, timeout=30) as client:
            response = await client.post("/v1/backtests", json={
                "models": ["champion"], "source": "kafka", "symbols": ["BTCUSDT"],
                "interval": "1m", "start": "2019-04-01T00:00", "end": "2019-04-01T01:00",
            })
            assert response.status_code == 202, response.text
            job_id = response.json()["id"]
            # Follow it live over SSE while it runs; the stream ends with `done`.
            events = await all_events(client, job_id, timeout_s=280)
            body = await wait_final(client, job_id, timeout_s=10)
            assert body["status"] == "done", body["message"]
            assert [e.event for e in events][-1] == "done"
            assert {e.event for e in events[:-1]} == {"progress"}
            progress = [json.loads(e.data)["progress"] for e in events]
            assert progress[-1] == 1.0 and all(0 <= p <= 1 for p in progress)
            assert {"replay"} <= {json.loads(e.data)["stage"] for e in events}

            assert isinstance(body["metrics"], dict) and body["metrics"], body
            assert set(body["files"]) == set(REPORT_FILES)  # every report file was written
            html = await client.get(body["files"]["report.html"])
            assert html.status_code == 200 and "<html" in html.text.lower()
            metrics = await client.get(body["files"]["metrics.json"])
            assert metrics.status_code == 200
            assert metrics.headers["content-type"] == "application/json"
            assert metrics.json()
            for name, url in body["files"].items():
                response = await client.get(url)
                assert response.status_code == 200, name
                assert response.headers["content-type"].startswith(
                    REPORT_FILES[name].split(";")[0]
                )


@pytest.mark.slow
@pytest.mark.parametrize(
    ("span", "reason"),
    [
        # No trade at all in the span.
        ({"start": "2020-01-01", "end": "2020-01-02"}, "no trades"),
        # The 30 minutes of the fixture: every forecast is still in the model's warm-up.
        ({"start": "2019-04-01T00:00", "end": "2019-04-01T00:30"}, "nothing to score"),
    ],
)
async def test_a_real_backtest_that_cannot_score_fails_with_a_reason(
    kafka_settings: Callable[..., Settings], data_dir: Path, span: dict[str, str], reason: str
) -> None:
    settings = kafka_settings()
    assert publish_trades(settings, data_dir / "BTCUSDT-trades-2019-04-01-0000-0029.csv") == 6_475
    with serve_in_thread(settings) as api:
        async with httpx.AsyncClient(base_url=api.base_url, timeout=30) as client:
            response = await client.post("/v1/backtests", json={
                "models": ["champion"], "source": "kafka", "symbols": ["BTCUSDT"], **span,
            })
            assert response.status_code == 202, response.text
            job_id = response.json()["id"]
            events = await all_events(client, job_id, timeout_s=200)
            body = await wait_final(client, job_id, timeout_s=10)
    assert body["status"] == "failed"
    assert [e.event for e in events][-1] == "failed"
    message = body["message"]
    assert reason in message, message
    assert "usage:" not in message  # the command's reason, not an argparse error
    assert json.loads(events[-1].data)["message"] == message
