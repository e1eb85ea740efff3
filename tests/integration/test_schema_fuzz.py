"""Schemathesis over the API's own OpenAPI schema: every documented operation is called with
generated inputs (valid and invalid, plus the schema's examples) on a real uvicorn against a
real redis-server seeded with candles, predictions, monitoring data and a finished backtest.
Every answer must be documented: no 5xx, a declared status code and content type, a body
that matches the declared schema.

Left out of the generated calls: the two SSE endpoints (``/v1/stream``,
``/v1/backtests/{job_id}/events``), whose 200 answer never ends; the finished backtest's
event stream, which does end, is checked on its own. ``POST /v1/backtests`` is kept: its
validation is most of the surface, and an accepted job runs a stand-in child (``true``)
instead of ``mur backtest``, so no real backtest starts.

The schema is built from ``create_app(SETTINGS)`` at import (the pytest plugin needs it
before any fixture runs) and checked equal to what the live app serves at /openapi.json.
Deterministic: a fixed seed, derandomized generation, no example database.
"""

import asyncio
import json
import shutil
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Final

import httpx
import pytest
import redis
import schemathesis
from schemathesis import Case, checks
from schemathesis.config import SchemathesisConfig

from kit.api import RunningApi, serve_in_thread
from makeusrich.api import create_app
from makeusrich.api.jobs import JobManager, JobStore
from makeusrich.api.models import BacktestIn
from makeusrich.core.embedded import EmbeddedService
from makeusrich.core.schemas import Candle, Prediction
from makeusrich.core.settings import Settings
from makeusrich.core.store import RedisStore
from makeusrich.inference import Registry, bundled_models_dir

pytestmark = [pytest.mark.integration, pytest.mark.slow]

SYMBOLS: Final = ("BTCUSDT", "ETHUSDT")
MINUTE_MS: Final = 60_000
T0_MS: Final = 1_700_000_040_000
CANDLES: Final = 30
CHECKS: Final = [
    checks.not_a_server_error,
    checks.status_code_conformance,
    checks.content_type_conformance,
    checks.response_schema_conformance,
]
SSE_PATHS: Final = r"^/v1/stream$|^/v1/backtests/\{job_id\}/events$"
CONFIG: Final = SchemathesisConfig.from_dict({
    "seed": 20_261_126,
    "generation": {"max-examples": 25, "deterministic": True, "database": "none"},
    "phases": {"stateful": {"enabled": False}},
})
TIMEOUT_S: Final = 10

# The live app's settings but for where Redis and the state directory are.
SETTINGS: Final = Settings(
    _env_file=None, redis_url="redis://127.0.0.1:1/0", kafka_bootstrap=None, symbols=SYMBOLS,
    intervals=("1m",), log_level="WARNING", environment="dev",
    anonymous_rpm=1_000_000, anonymous_daily=10_000_000,
)
OPENAPI: Final = create_app(SETTINGS).openapi()
schema = schemathesis.openapi.from_dict(OPENAPI, config=CONFIG).exclude(path_regex=SSE_PATHS)


def candle(symbol: str, i: int) -> Candle:
    open_time = T0_MS + i * MINUTE_MS
    price = 100.0 + i
    return Candle(
        symbol=symbol, interval="1m", open_time=open_time, close_time=open_time + MINUTE_MS - 1,
        open=price, high=price + 1.5, low=price - 1.0, close=price + 0.25, volume=3.5,
        quote_volume=350.0, trades=7, taker_buy_volume=1.5, taker_buy_quote_volume=150.0,
        source="sim", ts_event=open_time + MINUTE_MS - 1, ts_ingest=open_time + MINUTE_MS + 5,
    )


def prediction(symbol: str, i: int) -> Prediction:
    open_time = T0_MS + i * MINUTE_MS
    price = 100.25 + i
    return Prediction(
        symbol=symbol, interval="1m", candle_open_time=open_time,
        target_open_time=open_time + MINUTE_MS, last_close=price, predicted_close=price + 0.1,
        lower=price - 1.0, upper=price + 1.0, model_version="naive",
        made_at=open_time + MINUTE_MS + 6, source="sim", ts_event=open_time + MINUTE_MS - 1,
        ts_ingest=open_time + MINUTE_MS + 6,
    )


QUALITY: Final = [{
    "model_version": "naive", "window": 20, "scored": 20, "mae": 0.5, "mae_persistence": 0.5,
    "skill": 0.0, "hit_rate": 0.5, "coverage_80": 0.8, "error_ratio": 1.0,
    "updated_at": T0_MS + CANDLES * MINUTE_MS,
}]
DRIFT: Final = {
    "model_version": "naive", "state": "ok", "psi": {"log_return": 0.01}, "psi_max": 0.01,
    "error_ratio_drift": 0.02, "psi_threshold": 0.25, "error_ratio_threshold": 0.3,
    "since": T0_MS, "updated_at": T0_MS + CANDLES * MINUTE_MS, "reason": "",
}
METRICS: Final = {"mae": 1.5, "skill": 0.01}


async def seed_market(settings: Settings) -> None:
    """What a running worker would have written: 1m candles and predictions of every
    configured symbol, its model record, BTCUSDT's monitoring status."""
    store = RedisStore.from_settings(settings)
    try:
        records: list[Candle | Prediction] = []
        for symbol in SYMBOLS:
            for i in range(CANDLES):
                records += [candle(symbol, i), prediction(symbol, i)]
        await store.write_many(records)
        await store.set_model("naive")
        await store.set_monitoring("BTCUSDT", "1m", quality=json.dumps(QUALITY).encode(),
                                   drift=json.dumps(DRIFT).encode())
    finally:
        await store.aclose()


async def seed_backtest(settings: Settings, manager: JobManager) -> str:
    """A finished backtest with two report files, as JobManager leaves one."""
    job_id = uuid.uuid4().hex
    report_dir = manager.report_dir(job_id)
    report_dir.mkdir(parents=True)
    (report_dir / "metrics.json").write_text(json.dumps(METRICS))
    (report_dir / "report.html").write_text("<html><body>report</body></html>")
    files = ["metrics.json", "report.html"]
    store = RedisStore.from_settings(settings)
    try:
        jobs = JobStore(store.client, settings.redis_keys)
        request = BacktestIn.model_validate({"models": ["champion"], "source": "archive"})
        await jobs.create(job_id, request, report_dir, "test")
        done = {"status": "done", "stage": "done", "progress": 1.0, "message": "complete",
                "metrics": METRICS, "files": files}
        fields = {"status": "done", "stage": "done", "progress": "1", "message": "complete",
                  "metrics": json.dumps(METRICS), "files": json.dumps(files)}
        assert await jobs.update(job_id, fields, ("done", done)) is not None
    finally:
        await store.aclose()
    return job_id


@dataclass
class FuzzedApi:
    api: RunningApi
    backtest_id: str


@pytest.fixture(scope="module")
def fuzz_api(
    redis_server: EmbeddedService, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[FuzzedApi]:
    prefix = f"fuzz-{uuid.uuid4().hex[:10]}"
    state_dir = tmp_path_factory.mktemp("fuzz-state")
    settings = SETTINGS.model_copy(
        update={"redis_url": redis_server.url, "redis_prefix": prefix, "state_dir": state_dir}
    )
    asyncio.run(seed_market(settings))
    try:
        with serve_in_thread(settings) as api:
            jobs: JobManager = api.app.state.jobs
            jobs.command = [shutil.which("true") or "/bin/true"]  # accepted jobs end at once
            job_id = asyncio.run(seed_backtest(settings, jobs))
            yield FuzzedApi(api, job_id)
    finally:
        client = redis.Redis.from_url(redis_server.url)
        keys = list(client.scan_iter(match=f"{prefix}:*"))
        if keys:
            client.delete(*keys)
        client.close()


def test_the_fuzzed_schema_is_the_live_one(fuzz_api: FuzzedApi) -> None:
    response = httpx.get(f"{fuzz_api.api.base_url}/openapi.json", timeout=TIMEOUT_S)
    assert response.status_code == 200
    assert response.json() == OPENAPI


@schema.parametrize()
def test_every_answer_is_documented(case: Case, fuzz_api: FuzzedApi) -> None:
    case.call_and_validate(base_url=fuzz_api.api.base_url, checks=CHECKS, timeout=TIMEOUT_S)


def call(fuzz_api: FuzzedApi, path: str, **path_parameters: str) -> int:
    """GET ``path`` with the given parameters, validated like the generated calls."""
    case = schema[path]["GET"].Case(path_parameters=path_parameters)
    response = case.call_and_validate(
        base_url=fuzz_api.api.base_url, checks=CHECKS, timeout=TIMEOUT_S
    )
    return response.status_code


def test_what_generation_cannot_name(fuzz_api: FuzzedApi) -> None:
    """Resources whose names no generator guesses: the bundled model version, the finished
    backtest, its files and its (ending) event stream."""
    version = Registry(bundled_models_dir()).selected()
    assert call(fuzz_api, "/v1/models/{version}", version=version) == 200
    job_id = fuzz_api.backtest_id
    assert call(fuzz_api, "/v1/backtests/{job_id}", job_id=job_id) == 200
    for name in ("metrics.json", "report.html"):
        assert call(fuzz_api, "/v1/backtests/{job_id}/files/{name}", job_id=job_id,
                    name=name) == 200
    assert call(fuzz_api, "/v1/backtests/{job_id}/files/{name}", job_id=job_id,
                name="equity.png") == 404
    events = schemathesis.openapi.from_dict(OPENAPI, config=CONFIG)
    case = events["/v1/backtests/{job_id}/events"]["GET"].Case(path_parameters={"job_id": job_id})
    response = case.call_and_validate(
        base_url=fuzz_api.api.base_url, checks=CHECKS, timeout=TIMEOUT_S
    )
    assert response.status_code == 200
    assert "event: done" in response.text

