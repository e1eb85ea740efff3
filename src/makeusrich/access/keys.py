"""API keys: plans, key generation and the Redis key store.

A key is ``mur_`` + 32 random url-safe characters (:func:`secrets.token_urlsafe`, 192 bits);
the first 8 characters after ``mur_`` are its public *id*, shown by ``mur keys list`` and
used to revoke it. Redis keeps only the key's sha256 (the record's name), never the key:
whoever reads Redis cannot call the API, and the key is shown once, when it is created.
Key names are documented in :mod:`makeusrich.core.keys`.

Limits per key: ``rpm`` (requests a minute, the ``read`` route class; ``stream`` and
``backtest`` get a tenth and a sixtieth of it, see :mod:`makeusrich.access.limits`),
``daily`` (requests per UTC day, all classes) and ``sse`` (concurrent SSE streams).
"""

import hashlib
import re
import secrets
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from typing import Any, Final, Literal

import redis.asyncio as aioredis

from makeusrich.core.errors import AccessError
from makeusrich.core.keys import RedisKeys
from makeusrich.core.schemas import now_ms

__all__ = [
    "KEY_PREFIX",
    "PLANS",
    "ApiKey",
    "KeyStore",
    "Limits",
    "PlanName",
    "generate_key",
    "hash_key",
    "key_id",
    "plan_limits",
]

KEY_PREFIX: Final = "mur_"
ID_LENGTH: Final = 8
_SECRET_BYTES: Final = 24  # 32 url-safe characters
_KEY_RE: Final = re.compile(r"^mur_[A-Za-z0-9_-]{32}$")
_MAX_NAME: Final = 100
_MAX_LIMIT: Final = 10**9  # keeps the limiter's integer arithmetic exact in Lua doubles

PlanName = Literal["free", "pro", "custom"]


@dataclass(frozen=True, slots=True)
class Limits:
    """Requests a minute (``read`` class), requests a UTC day, concurrent SSE streams."""

    rpm: int
    daily: int
    sse: int


#: The plans and their limits; ``custom`` takes all three limits from its creator.
PLANS: Final[dict[PlanName, Limits | None]] = {
    "free": Limits(rpm=60, daily=10_000, sse=2),
    "pro": Limits(rpm=1_200, daily=1_000_000, sse=20),
    "custom": None,
}


def plan_limits(
    plan: str, rpm: int | None = None, daily: int | None = None, sse: int | None = None
) -> Limits:
    """The limits of ``plan``: a fixed plan's own (it takes no values), or the ``custom``
    values, all three required. Raises :class:`AccessError` naming what is wrong."""
    given = {"rpm": rpm, "daily": daily, "sse": sse}
    if plan not in PLANS:
        raise AccessError(f"unknown plan '{plan}'; use one of {', '.join(PLANS)}")
    fixed = PLANS[plan]
    if fixed is not None:
        extra = [name for name, value in given.items() if value is not None]
        if extra:
            raise AccessError(
                f"plan '{plan}' has fixed limits ({_describe(fixed)}); "
                f"use --plan custom to set --{' --'.join(extra)}"
            )
        return fixed
    missing = [name for name, value in given.items() if value is None]
    if missing:
        raise AccessError(f"plan 'custom' needs --rpm, --daily and --sse; missing: "
                          f"--{' --'.join(missing)}")
    limits = Limits(rpm=int(rpm or 0), daily=int(daily or 0), sse=int(sse or 0))
    for name, value, low in (("rpm", limits.rpm, 1), ("daily", limits.daily, 1),
                             ("sse", limits.sse, 0)):
        if not low <= value <= _MAX_LIMIT:
            raise AccessError(f"--{name} must be between {low} and {_MAX_LIMIT}, not {value}")
    return limits


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


def _describe(limits: Limits) -> str:
    return f"{limits.rpm} rpm, {limits.daily}/day, {limits.sse} streams"


def generate_key() -> str:
    """A new random key: ``mur_`` + 32 url-safe characters."""
    return KEY_PREFIX + secrets.token_urlsafe(_SECRET_BYTES)


def key_id(key: str) -> str | None:
    """The public id of a well-formed key (its 8 characters after ``mur_``), else None."""
    if _KEY_RE.match(key) is None:
        return None
    return key[len(KEY_PREFIX):len(KEY_PREFIX) + ID_LENGTH]


def hash_key(key: str) -> str:
    """The sha256 (hex) under which a key's record is stored."""
    return hashlib.sha256(key.encode()).hexdigest()


@dataclass(frozen=True, slots=True)
class ApiKey:
    """A key's record: everything but the key itself."""

    id: str
    name: str
    plan: str
    rpm: int
    daily: int
    sse: int
    admin: bool
    created_ms: int
    revoked_ms: int | None = None

    @property
    def limits(self) -> Limits:
        return Limits(self.rpm, self.daily, self.sse)

    @property
    def revoked(self) -> bool:
        return self.revoked_ms is not None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def _fields(self) -> dict[str, str | int]:
        return {"id": self.id, "name": self.name, "plan": self.plan, "rpm": self.rpm,
                "daily": self.daily, "sse": self.sse, "admin": int(self.admin),
                "created_ms": self.created_ms}

    @classmethod
    def _from_fields(cls, raw: Mapping[bytes | str, bytes | str]) -> "ApiKey":
        fields = {_text(name): _text(value) for name, value in raw.items()}
        revoked = fields.get("revoked_ms")
        return cls(
            id=fields["id"], name=fields["name"], plan=fields["plan"],
            rpm=int(fields["rpm"]), daily=int(fields["daily"]), sse=int(fields["sse"]),
            admin=fields.get("admin") == "1", created_ms=int(fields["created_ms"]),
            revoked_ms=int(revoked) if revoked else None,
        )


# KEYS: the id index, the new record. ARGV: id, sha256, then field/value pairs.
# The id is claimed and the record written together, or neither (an id already taken).
_CREATE_LUA: Final = """
if redis.call('HSETNX', KEYS[1], ARGV[1], ARGV[2]) == 0 then return 0 end
redis.call('HSET', KEYS[2], unpack(ARGV, 3))
return 1
"""

# KEYS: a record. ARGV: the revocation time. 0 when there is no such record.
_REVOKE_LUA: Final = """
if redis.call('EXISTS', KEYS[1]) == 0 then return 0 end
redis.call('HSETNX', KEYS[1], 'revoked_ms', ARGV[1])
return 1
"""


class KeyStore:
    """Create, find, list and revoke API keys in Redis (redis.asyncio, bytes responses)."""

    def __init__(self, client: "aioredis.Redis", keys: RedisKeys) -> None:
        self._client = client
        self._keys = keys
        self._create_script = client.register_script(_CREATE_LUA)
        self._revoke_script = client.register_script(_REVOKE_LUA)

    async def create(self, name: str, plan: str, limits: Limits, *,
                     admin: bool = False) -> tuple[str, ApiKey]:
        """A new key and its record. The key is returned once and never stored."""
        name = name.strip()
        if not name or len(name) > _MAX_NAME or not name.isprintable():
            raise AccessError(f"a key name is 1 to {_MAX_NAME} printable characters")
        for _ in range(10):  # ids are 48 random bits: a clash is all but impossible
            key = generate_key()
            kid = key_id(key)
            assert kid is not None
            record = ApiKey(id=kid, name=name, plan=plan, rpm=limits.rpm, daily=limits.daily,
                            sse=limits.sse, admin=admin, created_ms=now_ms())
            pairs: list[str | int] = []
            for field, value in record._fields().items():
                pairs += [field, value]
            digest = hash_key(key)
            created = await self._create_script(
                keys=[self._keys.api_key_ids, self._keys.api_key(digest)],
                args=[kid, digest, *pairs],
            )
            if created:
                return key, record
        raise AccessError("could not find a free key id; try again")

    async def _digest(self, kid: str) -> str:
        digest = await self._client.hget(self._keys.api_key_ids, kid)
        if digest is None:
            raise AccessError(f"unknown key id '{kid}'; see `mur keys list`")
        return _text(digest)

    async def get(self, kid: str) -> ApiKey:
        """The record of key ``kid``; :class:`AccessError` when there is none."""
        raw = await self._client.hgetall(self._keys.api_key(await self._digest(kid)))
        if not raw:
            raise AccessError(f"key id '{kid}' has no record (deleted by hand?)")
        return ApiKey._from_fields(raw)

    async def list(self) -> list[ApiKey]:
        """Every key's record, oldest first."""
        index = await self._client.hgetall(self._keys.api_key_ids)
        if not index:
            return []
        async with self._client.pipeline(transaction=False) as pipe:
            for digest in index.values():
                pipe.hgetall(self._keys.api_key(_text(digest)))
            rows = await pipe.execute()
        records = [ApiKey._from_fields(row) for row in rows if row]
        return sorted(records, key=lambda record: (record.created_ms, record.id))

    async def revoke(self, kid: str) -> ApiKey:
        """Revoke key ``kid`` at once for every API process (the next request with it gets
        401). Revoking twice keeps the first time. Returns the record."""
        record_key = self._keys.api_key(await self._digest(kid))
        if not await self._revoke_script(keys=[record_key], args=[now_ms()]):
            raise AccessError(f"key id '{kid}' has no record (deleted by hand?)")
        return await self.get(kid)
