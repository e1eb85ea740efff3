"""``/admin``: API keys and their usage, for keys created with ``mur keys create --admin``.

Mounted only when ``Settings.admin_api`` is true (otherwise every ``/admin`` path is 404)
and left out of the public OpenAPI schema. Anonymous clients get 401, keys without the
admin flag 403. The same operations exist offline as ``mur keys``.
"""

import re
from typing import Annotated, Final, cast

from fastapi import APIRouter, Depends, HTTPException, Path, Request
from pydantic import BaseModel, ConfigDict, Field

from makeusrich.access import ApiKey, KeyStore, Limiter, Subject, Usage, plan_limits
from makeusrich.api.access import Identity, request_identity
from makeusrich.api.routes.metrics import ApiMetricsDep
from makeusrich.core.errors import AccessError
from makeusrich.core.store import RedisStore

__all__ = ["router"]

_ID_RE: Final = re.compile(r"^[A-Za-z0-9_-]{8}$")


async def _admin(request: Request, metrics: ApiMetricsDep) -> Identity:
    identity = request_identity(request)
    if identity is None or identity.anonymous:
        metrics.access_refused.labels("401", "missing").inc()
        raise HTTPException(
            401, "an admin API key is required: send it as 'Authorization: Bearer <key>' "
            "or 'X-API-Key: <key>'", headers={"WWW-Authenticate": 'Bearer realm="make-us-rich"'})
    if not identity.admin:
        metrics.access_refused.labels("403", "not_admin").inc()
        raise HTTPException(403, f"API key {identity.key_id} is not an admin key; admin keys "
                            "are made with `mur keys create --admin`")
    return identity


router = APIRouter(prefix="/admin", tags=["admin"], dependencies=[Depends(_admin)])


class KeyOut(BaseModel):
    """A key's record; never the key itself."""

    model_config = ConfigDict(frozen=True, from_attributes=True)

    id: str
    name: str
    plan: str
    rpm: int
    daily: int
    sse: int
    admin: bool
    created_ms: int
    revoked_ms: int | None


class KeysOut(BaseModel):
    keys: list[KeyOut]


class KeyIn(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str = Field(min_length=1, max_length=100)
    plan: str = Field(description="free, pro or custom")
    rpm: int | None = Field(default=None, description="custom only")
    daily: int | None = Field(default=None, description="custom only")
    sse: int | None = Field(default=None, description="custom only")
    admin: bool = False


class CreatedOut(BaseModel):
    key: str = Field(description="the API key: shown this once, only its sha256 is stored")
    record: KeyOut


class ClassUsageOut(BaseModel):
    route_class: str
    today: int
    capacity: int
    remaining: int


class UsageOut(BaseModel):
    model_config = ConfigDict(from_attributes=True)

    id: str
    subject: str
    today: int
    daily_limit: int
    daily_remaining: int
    daily_reset_s: int
    streams_open: int
    streams_limit: int
    last_ms: int | None
    classes: list[ClassUsageOut]


async def _store(request: Request) -> KeyStore:
    store = cast(RedisStore, request.app.state.store)
    return KeyStore(store.client, store.keys)


async def _limiter(request: Request) -> Limiter:
    store = cast(RedisStore, request.app.state.store)
    return Limiter(store.client, store.keys)


KeyStoreDep = Annotated[KeyStore, Depends(_store)]
LimiterDep = Annotated[Limiter, Depends(_limiter)]


async def _key_id(key_id: Annotated[str, Path(description="the key's public id")]) -> str:
    if _ID_RE.match(key_id) is None:
        raise HTTPException(404, f"unknown key id '{key_id[:40]}'")
    return key_id


KeyIdDep = Annotated[str, Depends(_key_id)]


async def _get(keys: KeyStore, key_id: str) -> ApiKey:
    try:
        return await keys.get(key_id)
    except AccessError as exc:
        raise HTTPException(404, str(exc)) from exc


async def _usage(limiter: Limiter, record: ApiKey) -> UsageOut:
    usage: Usage = await limiter.usage(Subject.for_key_id(record.id), record.limits)
    return UsageOut(id=record.id, **usage.to_dict())


@router.get("/keys", response_model=KeysOut)
async def list_keys(keys: KeyStoreDep) -> KeysOut:
    """Every key, oldest first (revoked ones too)."""
    return KeysOut(keys=[KeyOut.model_validate(record) for record in await keys.list()])


@router.post("/keys", response_model=CreatedOut, status_code=201)
async def create_key(body: KeyIn, keys: KeyStoreDep) -> CreatedOut:
    """A new key; the response is the only place it is ever shown."""
    try:
        limits = plan_limits(body.plan, body.rpm, body.daily, body.sse)
        key, record = await keys.create(body.name, body.plan, limits, admin=body.admin)
    except AccessError as exc:
        raise HTTPException(422, str(exc)) from exc
    return CreatedOut(key=key, record=KeyOut.model_validate(record))


@router.get("/keys/{key_id}", response_model=KeyOut)
async def get_key(key_id: KeyIdDep, keys: KeyStoreDep) -> KeyOut:
    return KeyOut.model_validate(await _get(keys, key_id))


@router.post("/keys/{key_id}/revoke", response_model=KeyOut)
async def revoke_key(key_id: KeyIdDep, keys: KeyStoreDep) -> KeyOut:
    """Revoke a key for every API replica at once (idempotent)."""
    await _get(keys, key_id)
    try:
        return KeyOut.model_validate(await keys.revoke(key_id))
    except AccessError as exc:
        raise HTTPException(404, str(exc)) from exc


@router.get("/keys/{key_id}/usage", response_model=UsageOut)
async def key_usage(key_id: KeyIdDep, keys: KeyStoreDep, limiter: LimiterDep) -> UsageOut:
    """Today's requests (UTC) per route class, what is left, the open streams."""
    return await _usage(limiter, await _get(keys, key_id))


@router.get("/usage", response_model=list[UsageOut])
async def usage(keys: KeyStoreDep, limiter: LimiterDep) -> list[UsageOut]:
    """Today's usage of every active key."""
    return [await _usage(limiter, record) for record in await keys.list()
            if not record.revoked]
