"""API keys, quotas and rate limits, end to end: the real `mur keys` CLI, real uvicorn servers
(in a thread, and as two `mur api` processes sharing one Redis), real HTTP and SSE, and the
real redis-server holding the keys and the limits.

Keys are made with the CLI where the CLI is what is tested (and for the two processes);
elsewhere with :class:`KeyStore` directly, which is what the CLI calls, to keep tests fast.
"""

import asyncio
import contextlib
import json
import os
import subprocess
import sys
import time
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import redis
import redis.asyncio as aioredis
from httpx_sse import aconnect_sse

from kit.api import RunningApi, serve_in_thread, settings_factory
from makeusrich.access import KeyStore, Limiter, Limits, Subject
from makeusrich.access.keys import hash_key
from makeusrich.core.embedded import EmbeddedService, free_port, kill_with_parent
from makeusrich.core.settings import Settings

pytestmark = [pytest.mark.integration, pytest.mark.slow]

LIMIT_HEADERS = ("ratelimit-limit", "ratelimit-remaining", "ratelimit-reset",
                 "ratelimit-policy", "x-quota-limit", "x-quota-remaining", "x-quota-reset")
DAY_S = 86_400


@pytest.fixture
def prefix() -> str:
    return f"acc-{uuid.uuid4().hex[:10]}"


@pytest.fixture
def make_settings(redis_server: EmbeddedService, prefix: str,
                  tmp_path: Path) -> Callable[..., Settings]:
    """Production settings (no anonymous access) unless a test says otherwise."""
    return settings_factory(
        redis_server.url, redis_prefix=prefix, symbols=("BTCUSDT",), intervals=("1m",),
        state_dir=tmp_path, environment="prod", anonymous_access=None, anonymous_rpm=60,
        anonymous_daily=5_000, anonymous_sse=2, admin_api=False,
    )


@pytest.fixture
def sync_redis(redis_server: EmbeddedService, prefix: str) -> Iterator[redis.Redis]:
    client = redis.Redis.from_url(redis_server.url)
    yield client
    keys = list(client.scan_iter(match=f"{prefix}:*"))
    if keys:
        client.delete(*keys)
    client.close()


@pytest.fixture
def new_key(make_settings: Callable[..., Settings]) -> Callable[..., Any]:
    """``await new_key(rpm=, daily=, sse=, admin=)``: a custom key -> (key, record)."""

    async def create(rpm: int = 600, daily: int = 100_000, sse: int = 2,
                     admin: bool = False, name: str = "test") -> tuple[str, Any]:
        settings = make_settings()
        client = aioredis.Redis.from_url(str(settings.redis_url))
        try:
            return await KeyStore(client, settings.redis_keys).create(
                name, "custom", Limits(rpm, daily, sse), admin=admin)
        finally:
            await client.aclose()

    return create


def bearer(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


@pytest.fixture
def mur_keys(redis_server: EmbeddedService,
             prefix: str) -> Callable[..., "subprocess.CompletedProcess[str]"]:
    """Runs the real CLI: ``python -m makeusrich keys ARGS`` against the test's prefix."""

    def run(*args: str, redis_url: str | None = redis_server.url
            ) -> "subprocess.CompletedProcess[str]":
        env = {name: value for name, value in os.environ.items()
               if not name.startswith("MUR_")}
        env["MUR_REDIS_PREFIX"] = prefix
        if redis_url is not None:
            env["MUR_REDIS_URL"] = redis_url
        return subprocess.run([sys.executable, "-m", "makeusrich", "keys", *args], env=env,
                              capture_output=True, text=True, timeout=60, check=False)

    return run


def created_key(result: "subprocess.CompletedProcess[str]") -> str:
    assert result.returncode == 0, result.stderr
    key = result.stdout.strip()
    assert len(key) == 36 and key.startswith("mur_") and "\n" not in key, result.stdout
    return key


def dump_prefix(client: redis.Redis, prefix: str) -> list[bytes]:
    """Every key name and every value stored under ``prefix``, as bytes."""
    out: list[bytes] = []
    for name in client.scan_iter(match=f"{prefix}:*"):
        out.append(name)
        kind = client.type(name)
        if kind == b"hash":
            for field, value in client.hgetall(name).items():
                out += [field, value]
        elif kind == b"zset":
            out += [member for member, _ in client.zrange(name, 0, -1, withscores=True)]
        elif kind == b"string":
            out.append(client.get(name) or b"")
        else:
            out.append(repr(client.dump(name)).encode())
    return out


def assert_limit_headers(response: httpx.Response) -> None:
    missing = [name for name in LIMIT_HEADERS if name not in response.headers]
    assert not missing, (response.status_code, response.url, missing)
    for name in LIMIT_HEADERS:
        if name != "ratelimit-policy":
            assert int(response.headers[name]) >= 0


def seconds_to_utc_midnight() -> float:
    now = time.time()
    return (now // DAY_S + 1) * DAY_S - now


@contextlib.asynccontextmanager
async def opened(client: httpx.AsyncClient, path: str,
                 headers: dict[str, str] | None = None) -> AsyncIterator[httpx.Response]:
    """A request whose body is left unread (an SSE stream stays open until exit)."""
    async with client.stream("GET", path, headers=headers) as response:
        if response.status_code != 200:
            await response.aread()
        yield response


async def until(check: Callable[[], bool], timeout_s: float = 10.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not check():
        assert time.monotonic() < deadline, "condition not met in time"
        await asyncio.sleep(0.05)


# --------------------------------------------------------------------- the CLI


async def test_keys_cli_create_list_usage_revoke(
    mur_keys: Callable[..., "subprocess.CompletedProcess[str]"],
    start_api: Callable[..., RunningApi], sync_redis: redis.Redis, prefix: str,
) -> None:
    created = mur_keys("create", "--name", "alice's bot", "--plan", "free")
    key = created_key(created)
    assert "shown only now" in created.stderr and "sha256" in created.stderr
    custom = created_key(mur_keys("create", "--name", "ops", "--plan", "custom", "--rpm", "90",
                                  "--daily", "500", "--sse", "3", "--admin"))
    kid, custom_id = key[4:12], custom[4:12]

    missing = mur_keys("create", "--name", "x", "--plan", "custom", "--rpm", "5")
    assert missing.returncode == 2 and "missing: --daily --sse" in missing.stderr
    fixed = mur_keys("create", "--name", "x", "--plan", "pro", "--rpm", "5")
    assert fixed.returncode == 2 and "use --plan custom" in fixed.stderr
    unset = mur_keys("list", redis_url=None)
    assert unset.returncode == 2 and "needs MUR_REDIS_URL" in unset.stderr

    listed = mur_keys("list", "--json")
    assert listed.returncode == 0, listed.stderr
    records = {record["id"]: record for record in json.loads(listed.stdout)}
    assert records[kid] | {"created_ms": 0} == {
        "id": kid, "name": "alice's bot", "plan": "free", "rpm": 60, "daily": 10_000,
        "sse": 2, "admin": False, "created_ms": 0, "revoked_ms": None}
    assert records[custom_id]["plan"] == "custom" and records[custom_id]["admin"] is True
    assert (records[custom_id]["rpm"], records[custom_id]["daily"],
            records[custom_id]["sse"]) == (90, 500, 3)
    table = mur_keys("list")
    assert kid in table.stdout and "alice's bot" in table.stdout
    assert key not in listed.stdout + table.stdout and custom not in table.stdout

    # Redis holds the sha256 of each key, never the key (nor its secret part).
    stored = b"\n".join(dump_prefix(sync_redis, prefix))
    for secret in (key, custom):
        assert secret.encode() not in stored and secret[12:].encode() not in stored
        assert hash_key(secret).encode() in stored

    api = start_api()
    async with httpx.AsyncClient(base_url=api.base_url, timeout=10) as client:
        for _ in range(3):
            assert (await client.get("/v1/candles/BTCUSDT", headers=bearer(key))).status_code \
                == 200
        async with opened(client, "/v1/stream", bearer(key)) as stream:
            assert stream.status_code == 200
            usage = mur_keys("usage", kid, "--json")
            assert usage.returncode == 0, usage.stderr
            [row] = json.loads(usage.stdout)
            text = mur_keys("usage", kid).stdout
        assert row["today"] == 4 and row["daily_limit"] == 10_000
        assert row["daily_remaining"] == 9_996 and row["streams_open"] == 1
        classes = {c["route_class"]: c for c in row["classes"]}
        assert classes["read"]["today"] == 3 and classes["read"]["capacity"] == 60
        assert 57 <= classes["read"]["remaining"] <= 60
        assert classes["stream"] == {"route_class": "stream", "today": 1, "capacity": 6,
                                     "remaining": 5}
        assert classes["backtest"]["today"] == 0
        assert "4 of 10000 requests" in text and "1 of 2 streams open" in text

        revoked = mur_keys("revoke", kid)
        assert revoked.returncode == 0 and "revoked API key " + kid in revoked.stdout
        response = await client.get("/v1/candles/BTCUSDT", headers=bearer(key))
        assert response.status_code == 401
        assert response.json()["detail"].startswith(f"API key {kid} was revoked on ")
        assert (await client.get("/v1/candles/BTCUSDT", headers=bearer(custom))).status_code \
            == 200
    again = json.loads(mur_keys("list", "--json").stdout)
    assert next(r for r in again if r["id"] == kid)["revoked_ms"] is not None
    unknown = mur_keys("revoke", "nope1234")
    assert unknown.returncode == 2 and "unknown key id 'nope1234'" in unknown.stderr
    everyone = json.loads(mur_keys("usage", "--json").stdout)
    assert {row["id"] for row in everyone} == {kid, custom_id}


# ----------------------------------------------------------------------- 401s


async def test_unauthorized_answers(start_api: Callable[..., RunningApi],
                                    new_key: Callable[..., Any],
                                    make_settings: Callable[..., Settings]) -> None:
    api = start_api()  # prod: no anonymous access
    key, _ = await new_key()
    revoked_key, revoked = await new_key()
    settings = make_settings()
    client_ = aioredis.Redis.from_url(str(settings.redis_url))
    await KeyStore(client_, settings.redis_keys).revoke(revoked.id)
    await client_.aclose()
    forged = key[:12] + ("A" if key[12] != "A" else "B") + key[13:]  # same id, other secret

    async with httpx.AsyncClient(base_url=api.base_url, timeout=10) as client:
        cases = [
            ({}, "an API key is required: send it as 'Authorization: Bearer <key>' or "
                 "'X-API-Key: <key>'", False),
            (bearer("mur_" + "x" * 32), "unknown API key: no such key", True),
            (bearer(forged), "unknown API key: no such key", True),
            ({"X-API-Key": "letmein"}, "unknown API key: it is not a make-us-rich key", True),
            ({"Authorization": f"Basic {key}"}, "unsupported Authorization scheme 'Basic'",
             True),
            (bearer(revoked_key), f"API key {revoked.id} was revoked on ", True),
        ]
        for headers, message, invalid in cases:
            for path in ("/v1/candles/BTCUSDT", "/v1/stream", "/v1/nowhere"):
                response = await client.get(path, headers=headers)
                assert response.status_code == 401, (headers, path)
                assert response.headers["content-type"] == "application/json"
                detail = response.json()["detail"]
                assert detail.startswith(message), detail
                challenge = response.headers["www-authenticate"]
                assert challenge.startswith("Bearer realm=")
                assert ('error="invalid_token"' in challenge) is invalid
                for secret in (key, forged, revoked_key):
                    assert secret not in response.text and secret[12:] not in response.text
                assert "ratelimit-limit" not in response.headers
        post = await client.post("/v1/backtests", json={})
        assert post.status_code == 401

        # Both places a key may go; public paths need none and carry no limit headers.
        for headers in (bearer(key), {"X-API-Key": key}, {"authorization": f"bearer {key}"}):
            response = await client.get("/v1/candles/BTCUSDT", headers=headers)
            assert response.status_code == 200, response.text
        for path in ("/healthz", "/readyz", "/metrics", "/", "/static/app.js", "/docs",
                     "/redoc", "/openapi.json"):
            response = await client.get(path)
            assert response.status_code in (200, 503), path  # readyz: no model record
            assert "ratelimit-limit" not in response.headers, path
        samples = (await client.get("/metrics")).text
    for reason, count in (("missing", 4), ("unknown", 6), ("malformed", 6), ("revoked", 3)):
        assert f'mur_access_refused_total{{reason="{reason}",status="401"}} {count}.0' \
            in samples, reason


def test_anonymous_access_follows_the_settings(
    start_api: Callable[..., RunningApi],
) -> None:
    for overrides, allowed in (
        ({"environment": "prod"}, False),
        ({"environment": "dev"}, True),
        ({"environment": "dev", "anonymous_access": False}, False),
        ({"environment": "prod", "anonymous_access": True}, True),
    ):
        api = start_api(**overrides)
        response = httpx.get(api.base_url + "/v1/candles/BTCUSDT")
        assert response.status_code == (200 if allowed else 401), overrides
        if allowed:
            assert_limit_headers(response)
            assert response.headers["ratelimit-limit"] == "60"
            assert response.headers["x-quota-limit"] == "5000"


# --------------------------------------------------------------- rates and quotas


async def test_rate_limit_exhaustion_and_refill(start_api: Callable[..., RunningApi],
                                                new_key: Callable[..., Any]) -> None:
    api = start_api()
    key, _ = await new_key(rpm=30, daily=10_000)
    async with httpx.AsyncClient(base_url=api.base_url, timeout=10,
                                 headers=bearer(key)) as client:
        remaining = []
        for _ in range(30):
            response = await client.get("/v1/candles/BTCUSDT")
            assert response.status_code == 200, response.text
            assert response.headers["ratelimit-limit"] == "30"
            remaining.append(int(response.headers["ratelimit-remaining"]))
        # 30 requests take far less than the 2 s one token takes to come back.
        assert remaining == list(range(29, -1, -1))
        assert response.headers["x-quota-remaining"] == "9970"
        assert response.headers["ratelimit-policy"] == (
            '30;w=60;comment="read", 10000;w=86400;comment="daily, UTC"')

        refused = await client.get("/v1/candles/BTCUSDT")
        assert refused.status_code == 429
        retry_after = int(refused.headers["retry-after"])
        assert refused.json() == {"detail": "rate limit exceeded for read requests: 30 a "
                                  f"minute per API key; retry in {retry_after} s"}
        assert 1 <= retry_after <= 2
        assert_limit_headers(refused)
        assert refused.headers["ratelimit-remaining"] == "0"
        assert 1 <= int(refused.headers["ratelimit-reset"]) <= 60
        assert refused.headers["x-quota-remaining"] == "9970"  # refusals are not counted

        # Other route classes have buckets of their own: backtests get rpm // 60 = 1.
        first = await client.post("/v1/backtests", json={})
        assert first.status_code == 422 and first.headers["ratelimit-limit"] == "1"
        second = await client.post("/v1/backtests", json={})
        assert second.status_code == 429
        assert second.json()["detail"].startswith(
            "rate limit exceeded for backtest requests: 1 a minute per API key")
        assert 30 <= int(second.headers["retry-after"]) <= 60

        await asyncio.sleep(retry_after)
        again = await client.get("/v1/candles/BTCUSDT")
        assert again.status_code == 200
        assert again.headers["ratelimit-remaining"] == "0"
        assert (await client.get("/v1/candles/BTCUSDT")).status_code == 429
        samples = (await client.get("/metrics")).text
    assert 'mur_access_refused_total{reason="rate",status="429"} 3.0' in samples


async def test_daily_quota_exhaustion(start_api: Callable[..., RunningApi],
                                      new_key: Callable[..., Any]) -> None:
    api = start_api()
    key, record = await new_key(rpm=600, daily=5)
    async with httpx.AsyncClient(base_url=api.base_url, timeout=10,
                                 headers=bearer(key)) as client:
        paths = ["/v1/candles/BTCUSDT", "/v1/predictions/latest", "/v1/nowhere",
                 "/v1/candles/BTCUSDT?limit=0", "/v1/candles/BTCUSDT"]
        left = []
        for path in paths:  # 200s, a 404 and a 422 all count
            response = await client.get(path)
            assert response.status_code in (200, 404, 422), response.text
            left.append(int(response.headers["x-quota-remaining"]))
        assert left == [4, 3, 2, 1, 0]
        refused = await client.get("/v1/candles/BTCUSDT")
        assert refused.status_code == 429
        detail = refused.json()["detail"]
        assert detail.startswith("daily quota exceeded: 5 requests a day per API key; it "
                                 "resets at 00:00 UTC")
        # Redis's clock and ours agree here (same machine).
        assert abs(int(refused.headers["retry-after"]) - seconds_to_utc_midnight()) < 5
        assert abs(int(refused.headers["x-quota-reset"]) - seconds_to_utc_midnight()) < 5
        assert refused.headers["x-quota-remaining"] == "0"
        assert (await client.get("/v1/stream")).status_code == 429  # every class
    client = aioredis.Redis.from_url(str(api.settings.redis_url))
    try:
        usage = await Limiter(client, api.settings.redis_keys).usage(
            Subject.for_key_id(record.id), record.limits)
    finally:
        await client.aclose()
    assert usage.today == 5 and usage.daily_remaining == 0
    assert {c.route_class: c.today for c in usage.classes} == {
        "read": 5, "stream": 0, "backtest": 0}


async def test_every_limited_response_carries_the_headers(
    start_api: Callable[..., RunningApi], new_key: Callable[..., Any],
) -> None:
    api = start_api()
    key, _ = await new_key(rpm=600, daily=1_000)
    async with httpx.AsyncClient(base_url=api.base_url, timeout=10,
                                 headers=bearer(key)) as client:
        for path, status in [
            ("/v1/predictions/latest", 200),
            ("/v1/candles/NOPEUSDT", 404),
            ("/v1/candles/BTCUSDT?limit=0", 422),
            ("/v1/no/such/thing", 404),
            ("/v1/models", 200),
            (f"/v1/backtests/{uuid.uuid4().hex}", 404),
        ]:
            response = await client.get(path)
            assert response.status_code == status, (path, response.text)
            assert_limit_headers(response)
            assert response.headers["ratelimit-limit"] == "600"
        bad_resume = await client.get("/v1/stream", headers={"Last-Event-ID": "nope"})
        assert bad_resume.status_code == 400
        assert_limit_headers(bad_resume)
        assert bad_resume.headers["ratelimit-limit"] == "60"  # the stream class: rpm // 10
        async with aconnect_sse(client, "GET", "/v1/stream") as source:
            assert source.response.status_code == 200
            assert_limit_headers(source.response)
            assert source.response.headers["ratelimit-limit"] == "60"
            assert source.response.headers["x-quota-remaining"] == "992"
        job_events = await client.get(f"/v1/backtests/{uuid.uuid4().hex}/events")
        assert job_events.status_code == 404
        assert job_events.headers["ratelimit-limit"] == "60"


# ------------------------------------------------------------------ SSE streams


async def test_concurrent_streams_are_capped(start_api: Callable[..., RunningApi],
                                             new_key: Callable[..., Any],
                                             sync_redis: redis.Redis) -> None:
    api = start_api()
    key, record = await new_key(rpm=600, sse=2)
    leases = api.settings.redis_keys.stream_leases(f"key:{record.id}")
    async with (
        httpx.AsyncClient(base_url=api.base_url, timeout=10, headers=bearer(key)) as client,
        contextlib.AsyncExitStack() as streams,
    ):
        first = await streams.enter_async_context(opened(client, "/v1/stream"))
        second = await streams.enter_async_context(opened(client, "/v1/stream"))
        assert first.status_code == second.status_code == 200
        assert sync_redis.zcard(leases) == 2
        for path in ("/v1/stream", f"/v1/backtests/{uuid.uuid4().hex}/events"):
            async with opened(client, path) as third:
                assert third.status_code == 429, path
                assert third.json()["detail"] == (
                    "too many concurrent streams: at most 2 open SSE streams per API key; "
                    "close one first")
                assert 1 <= int(third.headers["retry-after"]) <= 30
                assert_limit_headers(third)
        # REST requests are not streams.
        assert (await client.get("/v1/candles/BTCUSDT")).status_code == 200

        await first.aclose()  # the client goes away: the server ends the stream, frees a slot

        await until(lambda: sync_redis.zcard(leases) == 1)
        async with opened(client, "/v1/stream") as replacement:
            assert replacement.status_code == 200
            assert sync_redis.zcard(leases) == 2
    await until(lambda: sync_redis.zcard(leases) == 0)


async def test_stale_leases_expire_and_live_ones_are_shared(
    start_api: Callable[..., RunningApi], new_key: Callable[..., Any],
    sync_redis: redis.Redis,
) -> None:
    """A lease of a killed API process (never refreshed) lapses; a live lease of another
    replica counts."""
    api = start_api()
    key, record = await new_key(rpm=600, sse=1)
    leases = api.settings.redis_keys.stream_leases(f"key:{record.id}")
    seconds, micros = sync_redis.time()
    now_ms = seconds * 1000 + micros // 1000
    sync_redis.zadd(leases, {"killed-process": now_ms - 1})
    async with httpx.AsyncClient(base_url=api.base_url, timeout=10,
                                 headers=bearer(key)) as client:
        async with opened(client, "/v1/stream") as stream:
            assert stream.status_code == 200
            assert sync_redis.zscore(leases, "killed-process") is None
            assert sync_redis.zcard(leases) == 1
        await until(lambda: sync_redis.zcard(leases) == 0)
        sync_redis.zadd(leases, {"other-replica": now_ms + 60_000})
        async with opened(client, "/v1/stream") as refused:
            assert refused.status_code == 429


async def test_open_stream_keeps_its_lease_alive(
    make_settings: Callable[..., Settings], new_key: Callable[..., Any],
    sync_redis: redis.Redis, monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Refreshed while open: a stream outliving the lease TTL still holds its slot."""
    from makeusrich.access import limits

    monkeypatch.setattr(limits, "LEASE_TTL_MS", 600)  # refreshed every 200 ms
    key, record = await new_key(rpm=600, sse=1)
    with serve_in_thread(make_settings()) as api:
        leases = api.settings.redis_keys.stream_leases(f"key:{record.id}")
        async with (
            httpx.AsyncClient(base_url=api.base_url, timeout=10, headers=bearer(key)) as client,
            opened(client, "/v1/stream") as stream,
        ):
            assert stream.status_code == 200
            await asyncio.sleep(1.5)  # over twice the TTL
            seconds, micros = sync_redis.time()
            [(_, expiry)] = sync_redis.zrange(leases, 0, -1, withscores=True)
            assert expiry > seconds * 1000 + micros // 1000
            async with opened(client, "/v1/stream") as refused:
                assert refused.status_code == 429


# ------------------------------------------------------------------ anonymous


async def test_anonymous_limits_per_ip_in_dev(start_api: Callable[..., RunningApi]) -> None:
    # rpm 20: 20 reads a minute, 2 stream opens; at most 1 open stream.
    api = start_api(environment="dev", anonymous_rpm=20, anonymous_daily=1_000,
                    anonymous_sse=1)
    async with httpx.AsyncClient(base_url=api.base_url, timeout=10) as here:
        for left in range(19, -1, -1):
            response = await here.get("/v1/candles/BTCUSDT")
            assert response.status_code == 200
            assert response.headers["ratelimit-remaining"] == str(left)
        refused = await here.get("/v1/candles/BTCUSDT")
        assert refused.status_code == 429
        assert refused.json()["detail"].startswith(
            "rate limit exceeded for read requests: 20 a minute per client IP (anonymous)")
        assert int(refused.headers["retry-after"]) >= 1
        # Another client address has its own limits.
        transport = httpx.AsyncHTTPTransport(local_address="127.0.0.2")
        async with httpx.AsyncClient(base_url=api.base_url, timeout=10,
                                     transport=transport) as there:
            response = await there.get("/v1/candles/BTCUSDT")
            assert response.status_code == 200
            assert response.headers["ratelimit-remaining"] == "19"
            assert response.headers["x-quota-remaining"] == "999"
            async with opened(there, "/v1/stream") as stream:
                assert stream.status_code == 200
                async with opened(there, "/v1/stream") as second:
                    assert second.status_code == 429
                    assert second.json()["detail"].startswith(
                        "too many concurrent streams: at most 1 open SSE streams per client IP")
                # The other address's stream slot is its own.
                async with opened(here, "/v1/stream") as mine:
                    assert mine.status_code == 200


# ------------------------------------------------------- two API processes, one quota


def _start_mur_api(redis_url: str, prefix: str, state_dir: Path) -> tuple[
        "subprocess.Popen[bytes]", str]:
    port = free_port()
    env = {name: value for name, value in os.environ.items() if not name.startswith("MUR_")}
    env.update(MUR_REDIS_URL=redis_url, MUR_REDIS_PREFIX=prefix, MUR_API_PORT=str(port),
               MUR_ENVIRONMENT="prod", MUR_STATE_DIR=str(state_dir), MUR_LOG_LEVEL="WARNING",
               MUR_SYMBOLS="BTCUSDT")
    process = subprocess.Popen([sys.executable, "-m", "makeusrich", "api"], env=env,
                               stdin=subprocess.DEVNULL, preexec_fn=kill_with_parent)
    return process, f"http://127.0.0.1:{port}"


def _wait_up(base_url: str, process: "subprocess.Popen[bytes]") -> None:
    deadline = time.monotonic() + 30
    while True:
        assert process.poll() is None, "mur api exited"
        with contextlib.suppress(httpx.TransportError):
            if httpx.get(base_url + "/healthz").status_code == 200:
                return
        assert time.monotonic() < deadline, "mur api did not start"
        time.sleep(0.1)


async def test_two_api_processes_share_one_quota(
    redis_server: EmbeddedService, prefix: str, tmp_path: Path,
    mur_keys: Callable[..., "subprocess.CompletedProcess[str]"], sync_redis: redis.Redis,
) -> None:
    reads = created_key(mur_keys("create", "--name", "reads", "--plan", "custom",
                                 "--rpm", "10", "--daily", "1000", "--sse", "1"))
    streams = created_key(mur_keys("create", "--name", "streams", "--plan", "custom",
                                   "--rpm", "600", "--daily", "1000", "--sse", "1"))
    processes = [_start_mur_api(redis_server.url, prefix, tmp_path) for _ in range(2)]
    try:
        for process, base_url in processes:
            _wait_up(base_url, process)
        (_, a), (_, b) = processes
        async with httpx.AsyncClient(timeout=10) as client:
            left = []
            for i in range(10):
                response = await client.get((a, b)[i % 2] + "/v1/candles/BTCUSDT",
                                            headers=bearer(reads))
                assert response.status_code == 200, response.text
                left.append(int(response.headers["ratelimit-remaining"]))
            assert left == list(range(9, -1, -1))  # one bucket for both processes
            for base_url in (a, b):
                refused = await client.get(base_url + "/v1/candles/BTCUSDT",
                                           headers=bearer(reads))
                assert refused.status_code == 429
                assert refused.json()["detail"].startswith("rate limit exceeded")
                assert refused.headers["x-quota-remaining"] == "990"

            # One stream slot, whichever process serves it.
            async with opened(client, a + "/v1/stream", bearer(streams)) as on_a:
                assert on_a.status_code == 200
                async with opened(client, b + "/v1/stream", bearer(streams)) as on_b:
                    assert on_b.status_code == 429
                    assert on_b.json()["detail"].startswith("too many concurrent streams")
            leases = f"{prefix}:access:streams:key:{streams[4:12]}"
            await until(lambda: sync_redis.zcard(leases) == 0)
            async with opened(client, b + "/v1/stream", bearer(streams)) as on_b:
                assert on_b.status_code == 200
    finally:
        for process, _ in processes:
            process.terminate()
        for process, _ in processes:
            try:
                process.wait(15)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()


# ------------------------------------------------------------------------ admin


async def test_admin_routes(start_api: Callable[..., RunningApi],
                            new_key: Callable[..., Any]) -> None:
    admin_key, admin_record = await new_key(admin=True, name="root")
    user_key, user_record = await new_key(name="user")

    off = start_api()
    async with httpx.AsyncClient(base_url=off.base_url, timeout=10) as client:
        for path in ("/admin/keys", f"/admin/keys/{user_record.id}/usage", "/admin/usage"):
            response = await client.get(path, headers=bearer(admin_key))
            assert response.status_code == 404, path

    on = start_api(admin_api=True)
    async with httpx.AsyncClient(base_url=on.base_url, timeout=10) as client:
        assert (await client.get("/admin/keys")).status_code == 401  # prod: no anonymous
        forbidden = await client.get("/admin/keys", headers=bearer(user_key))
        assert forbidden.status_code == 403
        assert forbidden.json()["detail"] == (
            f"API key {user_record.id} is not an admin key; admin keys are made with "
            "`mur keys create --admin`")
        assert_limit_headers(forbidden)

        listed = await client.get("/admin/keys", headers=bearer(admin_key))
        assert listed.status_code == 200
        assert {k["id"]: k["admin"] for k in listed.json()["keys"]} == {
            admin_record.id: True, user_record.id: False}
        for secret in (admin_key, user_key):
            assert secret[12:] not in listed.text and hash_key(secret) not in listed.text

        assert (await client.get("/v1/candles/BTCUSDT", headers=bearer(user_key))
                ).status_code == 200
        usage = await client.get(f"/admin/keys/{user_record.id}/usage",
                                 headers=bearer(admin_key))
        assert usage.status_code == 200
        assert usage.json()["today"] == 2  # the 403 above and the read
        assert (await client.get("/admin/keys/nope", headers=bearer(admin_key))
                ).status_code == 404

        made = await client.post("/admin/keys", headers=bearer(admin_key),
                                 json={"name": "via api", "plan": "free"})
        assert made.status_code == 201
        fresh = made.json()["key"]
        assert (await client.get("/v1/candles/BTCUSDT", headers=bearer(fresh))
                ).headers["ratelimit-limit"] == "60"
        bad = await client.post("/admin/keys", headers=bearer(admin_key),
                                json={"name": "x", "plan": "custom", "rpm": 5})
        assert bad.status_code == 422 and "missing" in bad.json()["detail"]

        revoked = await client.post(f"/admin/keys/{user_record.id}/revoke",
                                    headers=bearer(admin_key))
        assert revoked.status_code == 200 and revoked.json()["revoked_ms"] is not None
        assert (await client.get("/v1/candles/BTCUSDT", headers=bearer(user_key))
                ).status_code == 401

        spec = (await client.get("/openapi.json")).json()
        assert not [path for path in spec["paths"] if path.startswith("/admin")]
        samples = (await client.get("/metrics")).text
    assert 'mur_access_refused_total{reason="not_admin",status="403"} 1.0' in samples

    dev = start_api(environment="dev", admin_api=True)
    async with httpx.AsyncClient(base_url=dev.base_url, timeout=10) as client:
        anonymous = await client.get("/admin/keys")
    assert anonymous.status_code == 401
    assert anonymous.json()["detail"].startswith("an admin API key is required")


# ----------------------------------------------------------------- odds and ends


def test_openapi_documents_keys_and_limits(start_api: Callable[..., RunningApi]) -> None:
    for environment, optional in (("prod", False), ("dev", True)):
        api = start_api(environment=environment)
        spec = httpx.get(api.base_url + "/openapi.json").json()
        assert set(spec["components"]["securitySchemes"]) == {"bearer", "apiKey"}
        candles = spec["paths"]["/v1/candles/{symbol}"]["get"]
        assert ({} in candles["security"]) is optional
        assert {"401", "429"} <= set(candles["responses"])
        rate_limited = spec["components"]["responses"]["RateLimited"]
        assert {"Retry-After", "RateLimit-Limit", "X-Quota-Remaining"} <= set(
            rate_limited["headers"])
        assert "security" not in spec["paths"]["/healthz"]["get"]
        assert "429" in spec["paths"]["/v1/backtests"]["post"]["responses"]


async def test_redis_down(make_settings: Callable[..., Settings]) -> None:
    """Keys cannot be checked: 503. Anonymous clients pass to the routes (which answer 503
    themselves when they need Redis)."""
    down = f"redis://127.0.0.1:{free_port()}/0"
    with serve_in_thread(make_settings(redis_url=down, environment="dev")) as api:
        async with httpx.AsyncClient(base_url=api.base_url, timeout=10) as client:
            keyed = await client.get("/v1/candles/BTCUSDT", headers=bearer("mur_" + "k" * 32))
            assert keyed.status_code == 503
            assert keyed.json()["detail"] == ("storage unavailable: the API key cannot be "
                                              "checked; retry shortly")
            anonymous = await client.get("/v1/candles/BTCUSDT")
            assert anonymous.status_code == 503
            assert anonymous.json()["detail"].startswith("storage unavailable")
            samples = (await client.get("/metrics")).text
    assert 'mur_redis_errors_total{operation="access"} 2.0' in samples
