"""``/healthz`` (process is up) and ``/readyz`` (Redis, model record and Kafka answer)."""

import asyncio
from typing import Any, Final

from fastapi import APIRouter
from fastapi.responses import JSONResponse
from kafka import KafkaAdminClient

from makeusrich.api.deps import SettingsDep, StoreDep
from makeusrich.api.models import CheckOut, HealthOut, ReadyOut
from makeusrich.core.store import RedisStore

__all__ = ["router"]

router = APIRouter(tags=["health"])

_REDIS_TIMEOUT_S: Final = 2.0
_KAFKA_TIMEOUT_S: Final = 3.0
# Writes need this many in-sync replicas (infra/kafka/server.properties' min.insync.replicas,
# capped by a topic's replicas): fewer, and producing with acks=all fails.
_MIN_IN_SYNC: Final = 2


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


def _describe_topics(bootstrap: str, topics: tuple[str, ...]) -> tuple[list[int], list[Any]]:
    """(ids of the live brokers, the topics' metadata); blocking."""
    timeout_ms = int(_KAFKA_TIMEOUT_S * 1000)
    admin = KafkaAdminClient(bootstrap_servers=bootstrap, client_id="mur-api-readyz",
                             request_timeout_ms=timeout_ms, bootstrap_timeout_ms=timeout_ms)
    try:
        brokers = sorted(int(b["broker_id"]) for b in admin.describe_cluster()["brokers"]
                         if not b.get("is_fenced"))  # a fenced broker is registered, not live
        return brokers, admin.describe_topics(list(topics))
    finally:
        admin.close()


def _partitions_check(brokers: list[int], described: list[Any]) -> CheckOut:
    offline: list[str] = []  # no leader, or too few in-sync replicas to accept writes
    under: list[str] = []  # writable, with fewer replicas in sync than configured
    for topic in described:
        if topic["error_code"] != 0:
            continue  # not created yet (the worker and ingestor create them)
        for part in topic["partitions"]:
            name = f"{topic['name']}[{part['partition_index']}]"
            replicas, isr = part["replica_nodes"], part["isr_nodes"]
            if part["leader_id"] < 0 or len(isr) < min(_MIN_IN_SYNC, len(replicas)):
                offline.append(f"{name} (in sync: {isr or 'none'} of {replicas})")
            elif len(isr) < len(replicas):
                under.append(f"{name} (in sync: {isr} of {replicas})")
    where = f"{len(brokers)} broker(s) {brokers}"
    if offline:
        return CheckOut(ok=False, detail=f"kafka partitions cannot take writes: "
                        f"{', '.join(offline)}; {where}")
    if under:
        return CheckOut(ok=True, degraded=True, detail=f"kafka under-replicated (a broker is "
                        f"down or catching up): {', '.join(under)}; {where}")
    return CheckOut(ok=True, detail=f"kafka metadata from {where}; this app's partitions in sync")


async def _check_kafka(bootstrap: str, topics: tuple[str, ...]) -> CheckOut:
    try:
        async with asyncio.timeout(_KAFKA_TIMEOUT_S * 2):
            brokers, described = await asyncio.to_thread(_describe_topics, bootstrap, topics)
    except Exception as exc:
        return CheckOut(ok=False, detail=f"kafka unreachable at {bootstrap}: {_describe(exc)}")
    return _partitions_check(brokers, described)


@router.get("/readyz", response_model=ReadyOut, responses={503: {"model": ReadyOut}})
async def readyz(settings: SettingsDep, store: StoreDep) -> JSONResponse:
    """200 when Redis answers, the worker has published its model record and every
    partition of this app's Kafka topics has a leader and enough in-sync replicas to take
    writes (when Kafka is configured); else 503 naming the failed checks. 200 with status
    "degraded" when a partition has fewer replicas in sync than configured."""
    checks: dict[str, CheckOut] = {}
    version: str | None = None
    checks["redis"] = await _check_redis(store)
    if checks["redis"].ok:
        checks["model"], version = await _check_model(store)
    else:
        checks["model"] = CheckOut(ok=False, detail="not checked: redis unreachable")
    if settings.kafka_bootstrap:
        checks["kafka"] = await _check_kafka(settings.kafka_bootstrap, settings.topics.all)
    else:
        checks["kafka"] = CheckOut(ok=True, detail="not configured; not checked")
    failed = [name for name, check in checks.items() if not check.ok]
    degraded = [name for name, check in checks.items() if check.degraded]
    body = ReadyOut(
        status="unavailable" if failed else "degraded" if degraded else "ok",
        failed=failed,
        degraded=degraded,
        checks=checks,
        model_version=version,
    )
    return JSONResponse(body.model_dump(), status_code=503 if failed else 200)
