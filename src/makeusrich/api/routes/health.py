"""``/healthz`` (process is up) and ``/readyz`` (Redis, model record and Kafka answer)."""

import asyncio
from typing import Final

from aiokafka.client import AIOKafkaClient
from fastapi import APIRouter
from fastapi.responses import JSONResponse

from makeusrich.api.deps import SettingsDep, StoreDep
from makeusrich.api.models import CheckOut, HealthOut, ReadyOut
from makeusrich.core.store import RedisStore

__all__ = ["router"]

router = APIRouter(tags=["health"])

_REDIS_TIMEOUT_S: Final = 2.0
_KAFKA_TIMEOUT_S: Final = 3.0


@router.get("/healthz", response_model=HealthOut)
async def healthz() -> HealthOut:
    """The process is up (says nothing about its dependencies)."""
    return HealthOut()


def _describe(exc: BaseException) -> str:
    """``ConnectionError: Error 111 connecting to ...``: redis-py's repr keeps only the
    error's class, and a bare TimeoutError has no message."""
    return f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__


async def _check_redis(store: RedisStore) -> CheckOut:
    try:
        async with asyncio.timeout(_REDIS_TIMEOUT_S):
            await store.ping()
    except Exception as exc:  # any failure means "not ready"; the message says which
        return CheckOut(ok=False, detail=f"redis unreachable: {_describe(exc)}")
    return CheckOut(ok=True, detail="redis answers")


async def _check_model(store: RedisStore) -> tuple[CheckOut, str | None]:
    try:
        async with asyncio.timeout(_REDIS_TIMEOUT_S):
            info = await store.model_info()
    except Exception as exc:
        return CheckOut(ok=False, detail=f"cannot read the model record: {_describe(exc)}"), None
    version = info.get("version")
    if not version:
        detail = f"no model record in '{store.keys.model}' yet; is the worker running?"
        return CheckOut(ok=False, detail=detail), None
    return CheckOut(ok=True, detail=f"worker serves model {version}"), version


async def _check_kafka(bootstrap: str) -> CheckOut:
    client = AIOKafkaClient(
        bootstrap_servers=bootstrap,
        client_id="mur-api-readyz",
        request_timeout_ms=int(_KAFKA_TIMEOUT_S * 1000),
    )
    try:
        async with asyncio.timeout(_KAFKA_TIMEOUT_S):
            await client.bootstrap()  # connects and fetches cluster metadata
        brokers = len(client.cluster.brokers())
    except Exception as exc:
        return CheckOut(ok=False, detail=f"kafka unreachable at {bootstrap}: {_describe(exc)}")
    finally:
        await client.close()
    return CheckOut(ok=True, detail=f"kafka metadata from {brokers} broker(s) at {bootstrap}")


@router.get("/readyz", response_model=ReadyOut, responses={503: {"model": ReadyOut}})
async def readyz(settings: SettingsDep, store: StoreDep) -> JSONResponse:
    """200 when Redis answers, the worker has published its model record and Kafka
    answers a metadata request (when configured); else 503 naming the failed checks."""
    checks: dict[str, CheckOut] = {}
    version: str | None = None
    checks["redis"] = await _check_redis(store)
    if checks["redis"].ok:
        checks["model"], version = await _check_model(store)
    else:
        checks["model"] = CheckOut(ok=False, detail="not checked: redis unreachable")
    if settings.kafka_bootstrap:
        checks["kafka"] = await _check_kafka(settings.kafka_bootstrap)
    else:
        checks["kafka"] = CheckOut(ok=True, detail="not configured; not checked")
    failed = [name for name, check in checks.items() if not check.ok]
    body = ReadyOut(
        status="unavailable" if failed else "ok",
        failed=failed,
        checks=checks,
        model_version=version,
    )
    return JSONResponse(body.model_dump(), status_code=503 if failed else 200)
