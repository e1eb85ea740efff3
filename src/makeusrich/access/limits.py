"""The shared rate limiter: one atomic Lua script per request, in Redis.

Limits apply to a *subject*: an API key (``key:{id}``) or, for anonymous clients, their IP
address (``ip:{address}``). Each request falls in one *route class*:

- ``read``: every limited request but the two below (REST GETs);
- ``stream``: opening an SSE stream (``/v1/stream``, ``/v1/backtests/{id}/events``);
- ``backtest``: queueing a backtest (``POST /v1/backtests``).

Each subject has a token bucket per route class: capacity ``rpm`` for ``read``,
``max(1, rpm // 10)`` for ``stream`` and ``max(1, rpm // 60)`` for ``backtest``, each
refilled at its capacity per minute (``read``: rpm/60 tokens a second). On top, a daily
quota (UTC day) counts every allowed request of all classes, and at most ``sse`` SSE
streams may be open at once: each open stream holds a *lease* in a sorted set, scored by
its expiry, that the API process serving it refreshes every few seconds and removes when
the stream ends; the lease of a stream whose API process died lapses after
:data:`LEASE_TTL_MS`.

:meth:`Limiter.check` runs ONE script (EVALSHA) per request: it reads the key's record
(unknown or revoked keys are refused there, so an API key costs no extra round trip),
refills the bucket, checks the quota and, for streams, the open leases, then takes a token,
counts the request and takes the lease, or changes nothing. Time is Redis ``TIME``, so
every API replica shares one clock and one set of limits. The script needs Redis >= 5
(effects replication); nothing in it is newer than Redis 6.2. Key names are documented in
:mod:`makeusrich.core.keys`.
"""

import math
from collections.abc import Iterable
from dataclasses import asdict, dataclass
from typing import Any, Final, Literal

import redis.asyncio as aioredis

from makeusrich.access.keys import Limits, hash_key, key_id
from makeusrich.core.keys import RedisKeys

__all__ = [
    "LEASE_TTL_MS",
    "ROUTE_CLASSES",
    "ClassUsage",
    "Decision",
    "Limiter",
    "Outcome",
    "RouteClass",
    "Subject",
    "Usage",
    "capacity",
]

RouteClass = Literal["read", "stream", "backtest"]
ROUTE_CLASSES: Final[tuple[RouteClass, ...]] = ("read", "stream", "backtest")
#: ok; 401: unknown, revoked; 429: rate (the class's bucket), daily, streams.
Outcome = Literal["ok", "unknown", "revoked", "rate", "daily", "streams"]

#: How long a stream's lease lives without a refresh; refreshed every third of it.
LEASE_TTL_MS: Final = 30_000

# Buckets count in 1/60000ths of a token, so that a bucket of capacity C refills exactly C
# units a millisecond (C tokens a minute): integers only, exact in Lua's doubles.
_CHECK_LUA: Final = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local rpm, daily, sse = tonumber(ARGV[2]), tonumber(ARGV[3]), tonumber(ARGV[4])
local id, plan, admin = '', 'anonymous', 0
if #KEYS > 3 then
  local r = redis.call('HMGET', KEYS[4], 'id', 'plan', 'rpm', 'daily', 'sse', 'admin',
                       'revoked_ms')
  if not r[1] then return {'unknown'} end
  if r[7] then return {'revoked', r[1], r[7]} end
  id, plan = r[1], r[2]
  rpm, daily, sse = tonumber(r[3]), tonumber(r[4]), tonumber(r[5])
  if r[6] == '1' then admin = 1 end
end
local class = ARGV[1]
local cap = rpm
if class == 'stream' then cap = math.max(1, math.floor(rpm / 10))
elseif class == 'backtest' then cap = math.max(1, math.floor(rpm / 60)) end
local unit = 60000
local full = cap * unit
local b = redis.call('HMGET', KEYS[1], 'u', 't')
local units, last = tonumber(b[1]), tonumber(b[2])
if units == nil or last == nil then units, last = full, now end
if now > last then units = math.min(full, units + (now - last) * cap) end
local day = math.floor(now / 86400000)
local midnight = (day + 1) * 86400000
local q = redis.call('HMGET', KEYS[2], 'day', 'total')
local used = 0
if tonumber(q[1]) == day then used = tonumber(q[2]) or 0 end
local outcome, retry = 'ok', 0
if used >= daily then
  outcome, retry = 'daily', midnight - now
elseif units < unit then
  outcome, retry = 'rate', math.ceil((unit - units) / cap)
elseif class == 'stream' then
  redis.call('ZREMRANGEBYSCORE', KEYS[3], '-inf', now)
  if redis.call('ZCARD', KEYS[3]) >= sse then
    outcome, retry = 'streams', 1000
    local first = redis.call('ZRANGE', KEYS[3], 0, 0, 'WITHSCORES')
    if first[2] then retry = math.max(1000, tonumber(first[2]) - now) end
  end
end
if outcome == 'ok' then
  units = units - unit
  used = used + 1
  redis.call('HSET', KEYS[1], 'u', string.format('%d', units), 't', string.format('%d', now))
  redis.call('PEXPIRE', KEYS[1], string.format('%d', math.ceil((full - units) / cap) + 1000))
  if tonumber(q[1]) ~= day then redis.call('DEL', KEYS[2]) end
  redis.call('HSET', KEYS[2], 'day', string.format('%d', day),
             'last_ms', string.format('%d', now))
  redis.call('HINCRBY', KEYS[2], 'total', 1)
  redis.call('HINCRBY', KEYS[2], class, 1)
  redis.call('PEXPIREAT', KEYS[2], string.format('%d', midnight))
  if class == 'stream' and ARGV[5] ~= '' then
    local ttl = tonumber(ARGV[6])
    redis.call('ZADD', KEYS[3], string.format('%d', now + ttl), ARGV[5])
    redis.call('PEXPIRE', KEYS[3], string.format('%d', ttl + 1000))
  end
end
return {outcome, id, plan, admin, cap, math.floor(units / unit),
        math.ceil((full - units) / cap), daily, math.max(0, daily - used), midnight - now,
        retry, sse}
"""

# KEYS: leases. ARGV: lease id, ttl ms. (Re-)adds the lease, expiring ttl from now.
_REFRESH_LUA: Final = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local ttl = tonumber(ARGV[2])
redis.call('ZADD', KEYS[1], string.format('%d', now + ttl), ARGV[1])
redis.call('PEXPIRE', KEYS[1], string.format('%d', ttl + 1000))
return 1
"""

# KEYS: quota, leases, then the read, stream and backtest buckets. ARGV: rpm.
# Read-only: the day's counts, the live leases and each bucket's tokens as of now.
_USAGE_LUA: Final = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local q = redis.call('HMGET', KEYS[1], 'day', 'total', 'read', 'stream', 'backtest',
                     'last_ms')
if tonumber(q[1]) ~= math.floor(now / 86400000) then q = {} end
local out = {now, tonumber(q[2]) or 0, tonumber(q[3]) or 0, tonumber(q[4]) or 0,
             tonumber(q[5]) or 0, tonumber(q[6]) or 0,
             redis.call('ZCOUNT', KEYS[2], '(' .. now, '+inf')}
local rpm = tonumber(ARGV[1])
local caps = {rpm, math.max(1, math.floor(rpm / 10)), math.max(1, math.floor(rpm / 60))}
for i, cap in ipairs(caps) do
  local b = redis.call('HMGET', KEYS[2 + i], 'u', 't')
  local units, last = tonumber(b[1]), tonumber(b[2])
  if units == nil or last == nil then units, last = cap * 60000, now end
  if now > last then units = math.min(cap * 60000, units + (now - last) * cap) end
  out[#out + 1] = math.floor(units / 60000)
end
return out
"""


def capacity(rpm: int, route_class: RouteClass) -> int:
    """The bucket size (and tokens refilled a minute) of ``route_class`` for ``rpm``."""
    if route_class == "stream":
        return max(1, rpm // 10)
    if route_class == "backtest":
        return max(1, rpm // 60)
    return rpm


def _seconds(ms: int) -> int:
    return max(0, math.ceil(ms / 1000))


@dataclass(frozen=True, slots=True)
class Subject:
    """Who limits apply to: ``key:{id}`` (with the key's sha256) or ``ip:{address}``."""

    name: str
    key_hash: str | None = None

    @classmethod
    def for_key(cls, key: str) -> "Subject | None":
        """The subject of a presented key; None when it is not a well-formed key."""
        kid = key_id(key)
        return None if kid is None else cls(f"key:{kid}", hash_key(key))

    @classmethod
    def for_key_id(cls, kid: str) -> "Subject":
        """The subject of a stored key, by id (for usage reports)."""
        return cls(f"key:{kid}")

    @classmethod
    def anonymous(cls, address: str) -> "Subject":
        return cls(f"ip:{address}")


@dataclass(frozen=True, slots=True)
class Decision:
    """What :meth:`Limiter.check` decided, with the figures for the response headers."""

    outcome: Outcome
    route_class: RouteClass
    key_id: str | None = None  # None: anonymous (or an unknown key)
    plan: str = "anonymous"
    admin: bool = False
    limit: int = 0  # the route class's bucket: capacity, tokens left, s until full
    remaining: int = 0
    reset_s: int = 0
    daily_limit: int = 0
    daily_remaining: int = 0
    daily_reset_s: int = 0  # s until the next UTC midnight
    retry_after_s: int = 0  # refused: s until trying again can succeed
    sse: int = 0
    revoked_ms: int | None = None

    @property
    def allowed(self) -> bool:
        return self.outcome == "ok"


@dataclass(frozen=True, slots=True)
class ClassUsage:
    route_class: str
    today: int  # requests allowed today
    capacity: int
    remaining: int  # tokens in the bucket now


@dataclass(frozen=True, slots=True)
class Usage:
    """A subject's use of the current UTC day and the state of its limits."""

    subject: str
    today: int
    daily_limit: int
    daily_remaining: int
    daily_reset_s: int
    streams_open: int
    streams_limit: int
    last_ms: int | None
    classes: tuple[ClassUsage, ...]

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _text(value: object) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


class Limiter:
    """The limits of every subject, in Redis; shared by every API replica."""

    def __init__(self, client: "aioredis.Redis", keys: RedisKeys, *,
                 lease_ttl_ms: int | None = None) -> None:
        self._client = client
        self._keys = keys
        self.lease_ttl_ms = LEASE_TTL_MS if lease_ttl_ms is None else lease_ttl_ms
        # Registered once; redis-py sends EVALSHA and reloads a script after NOSCRIPT.
        self._check = client.register_script(_CHECK_LUA)
        self._refresh = client.register_script(_REFRESH_LUA)
        self._usage = client.register_script(_USAGE_LUA)

    @property
    def client(self) -> "aioredis.Redis":
        return self._client

    async def check(self, subject: Subject, route_class: RouteClass,
                    anonymous: Limits | None = None, lease: str | None = None) -> Decision:
        """Count one request of ``subject`` in ``route_class``, or refuse it.

        A key subject's limits come from its record; an anonymous one's are ``anonymous``.
        For the ``stream`` class, ``lease`` is the id of the lease taken for the stream when
        it is allowed (refresh it with :meth:`refresh`, end it with :meth:`release`).
        """
        keys = [self._keys.rate_bucket(subject.name, route_class),
                self._keys.daily_quota(subject.name),
                self._keys.stream_leases(subject.name)]
        if subject.key_hash is not None:
            keys.append(self._keys.api_key(subject.key_hash))
            limits = Limits(0, 0, 0)
        elif anonymous is None:
            raise ValueError("an anonymous subject needs its limits")
        else:
            limits = anonymous
        reply = await self._check(keys=keys, args=[
            route_class, limits.rpm, limits.daily, limits.sse,
            lease if route_class == "stream" and lease else "", self.lease_ttl_ms,
        ])
        outcome = _text(reply[0])
        if outcome == "unknown":
            return Decision("unknown", route_class)
        if outcome == "revoked":
            return Decision("revoked", route_class, key_id=_text(reply[1]),
                            revoked_ms=int(_text(reply[2])))
        kid = _text(reply[1])
        return Decision(
            outcome,  # type: ignore[arg-type]  # the script's own vocabulary
            route_class,
            key_id=kid or None,
            plan=_text(reply[2]),
            admin=int(reply[3]) == 1,
            limit=int(reply[4]),
            remaining=int(reply[5]),
            reset_s=_seconds(int(reply[6])),
            daily_limit=int(reply[7]),
            daily_remaining=int(reply[8]),
            daily_reset_s=_seconds(int(reply[9])),
            retry_after_s=max(1, _seconds(int(reply[10]))) if outcome != "ok" else 0,
            sse=int(reply[11]),
        )

    async def refresh(self, leases: Iterable[tuple[Subject, str]]) -> None:
        """Keep open streams' leases alive for another :attr:`lease_ttl_ms`, in one round
        trip: ``leases`` are (subject, lease id) pairs."""
        async with self._client.pipeline(transaction=False) as pipe:
            for subject, lease in leases:
                await self._refresh(keys=[self._keys.stream_leases(subject.name)],
                                    args=[lease, self.lease_ttl_ms], client=pipe)
            await pipe.execute()

    async def release(self, subject: Subject, lease: str) -> None:
        """The stream ended: free its slot."""
        await self._client.zrem(self._keys.stream_leases(subject.name), lease)

    async def usage(self, subject: Subject, limits: Limits) -> Usage:
        """``subject``'s counts for today and its buckets as of now (changes nothing)."""
        name = subject.name
        reply = await self._usage(
            keys=[self._keys.daily_quota(name), self._keys.stream_leases(name),
                  *(self._keys.rate_bucket(name, c) for c in ROUTE_CLASSES)],
            args=[limits.rpm],
        )
        now, total, *per_class = (int(value) for value in reply[:5])
        last_ms, streams = int(reply[5]), int(reply[6])
        tokens = [int(value) for value in reply[7:10]]
        day_ms = 86_400_000
        return Usage(
            subject=name,
            today=total,
            daily_limit=limits.daily,
            daily_remaining=max(0, limits.daily - total),
            daily_reset_s=_seconds((now // day_ms + 1) * day_ms - now),
            streams_open=streams,
            streams_limit=limits.sse,
            last_ms=last_ms or None,
            classes=tuple(
                ClassUsage(route_class, count, capacity(limits.rpm, route_class), left)
                for route_class, count, left in zip(ROUTE_CLASSES, per_class, tokens,
                                                    strict=True)
            ),
        )
