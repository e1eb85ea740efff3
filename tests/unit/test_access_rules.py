"""The broker-free parts of access control (named apart from tests/integration/test_access.py,
which pytest could not tell from it): keys and plans, route classes, where keys are
read from, the answers and headers. The limiter itself runs in Redis: see
tests/integration/test_access.py."""

import json
import re
from typing import Any

import pytest
from starlette.datastructures import State
from starlette.types import Message, Receive, Scope, Send

from makeusrich.access import PLANS, Limits, plan_limits
from makeusrich.access.keys import generate_key, hash_key, key_id
from makeusrich.access.limits import Decision, Subject, capacity
from makeusrich.api.access import (
    AccessMiddleware,
    Refusal,
    _refusal,
    limit_headers,
    presented_key,
    route_class,
)
from makeusrich.core.errors import AccessError
from makeusrich.core.metrics import ApiMetrics
from makeusrich.core.settings import Settings


def test_keys_are_random_and_only_their_id_is_public() -> None:
    keys = {generate_key() for _ in range(1_000)}
    assert len(keys) == 1_000
    for key in keys:
        assert re.fullmatch(r"mur_[A-Za-z0-9_-]{32}", key)
        assert key_id(key) == key[4:12]
        assert re.fullmatch(r"[0-9a-f]{64}", hash_key(key))
    assert hash_key("mur_" + "a" * 32) == hash_key("mur_" + "a" * 32)
    for malformed in ("", "mur_", "mur_short", "MUR_" + "a" * 32, "mur_" + "a" * 33,
                      "mur_" + "a" * 31 + "!", "Bearer mur_" + "a" * 32):
        assert key_id(malformed) is None
        assert Subject.for_key(malformed) is None
    key = generate_key()
    assert Subject.for_key(key) == Subject(f"key:{key[4:12]}", hash_key(key))
    assert Subject.anonymous("::1").name == "ip:::1"


def test_plans() -> None:
    assert plan_limits("free") == Limits(60, 10_000, 2) == PLANS["free"]
    assert plan_limits("pro") == Limits(1_200, 1_000_000, 20)
    assert plan_limits("custom", 5, 100, 0) == Limits(5, 100, 0)
    with pytest.raises(AccessError, match="missing: --daily --sse"):
        plan_limits("custom", rpm=5)
    with pytest.raises(AccessError, match="use --plan custom to set --rpm --sse"):
        plan_limits("free", rpm=5, sse=1)
    with pytest.raises(AccessError, match="unknown plan 'gold'"):
        plan_limits("gold")
    with pytest.raises(AccessError, match="--rpm must be between 1"):
        plan_limits("custom", 0, 10, 1)
    with pytest.raises(AccessError, match="--sse must be between 0"):
        plan_limits("custom", 1, 10, -1)


def test_bucket_capacities() -> None:
    assert [capacity(60, c) for c in ("read", "stream", "backtest")] == [60, 6, 1]
    assert [capacity(1_200, c) for c in ("read", "stream", "backtest")] == [1_200, 120, 20]
    assert [capacity(5, c) for c in ("read", "stream", "backtest")] == [5, 1, 1]


@pytest.mark.parametrize(("method", "path", "expected"), [
    ("GET", "/healthz", None), ("GET", "/readyz", None), ("GET", "/metrics", None),
    ("GET", "/", None), ("GET", "/static/app.js", None), ("GET", "/static", None),
    ("GET", "/docs", None), ("GET", "/redoc", None), ("GET", "/openapi.json", None),
    ("OPTIONS", "/v1/candles/BTCUSDT", None),
    ("GET", "/v1/candles/BTCUSDT", "read"), ("GET", "/v1/predictions/latest", "read"),
    ("GET", "/v1/nowhere", "read"), ("GET", "/healthz/", "read"), ("GET", "/staticx", "read"),
    ("GET", "/admin/keys", "read"), ("POST", "/admin/keys/abc/revoke", "read"),
    ("GET", "/v1/stream", "stream"), ("HEAD", "/v1/stream", "stream"),
    ("GET", "/v1/backtests/0123abcd/events", "stream"),
    ("GET", "/v1/backtests/0123abcd", "read"),
    ("GET", "/v1/backtests/0123abcd/files/report.html", "read"),
    ("POST", "/v1/backtests", "backtest"), ("GET", "/v1/backtests", "read"),
    ("POST", "/v1/stream", "read"),
])
def test_route_classes(method: str, path: str, expected: str | None) -> None:
    assert route_class(method, path) == expected


def test_where_keys_are_read_from() -> None:
    key = "mur_" + "k" * 32
    assert presented_key([]) is None
    assert presented_key([(b"authorization", f"Bearer {key}".encode())]) == key
    assert presented_key([(b"authorization", f"bearer   {key} ".encode())]) == key
    assert presented_key([(b"x-api-key", key.encode())]) == key
    assert presented_key([(b"authorization", b"Bearer "), (b"x-api-key", key.encode())]) == key
    assert presented_key([(b"x-api-key", b"other"),
                          (b"authorization", f"Bearer {key}".encode())]) == key
    assert presented_key([(b"x-api-key", b"  ")]) is None
    with pytest.raises(Refusal, match="unsupported Authorization scheme 'Basic'") as refused:
        presented_key([(b"authorization", b"Basic dXNlcjpwYXNz")])
    assert refused.value.status == 401 and refused.value.reason == "malformed"


def _decision(**fields: Any) -> Decision:
    values: dict[str, Any] = {
        "outcome": "ok", "route_class": "read", "key_id": "abcdefgh", "plan": "free",
        "limit": 60, "remaining": 59, "reset_s": 1, "daily_limit": 10_000,
        "daily_remaining": 9_999, "daily_reset_s": 3_600, "sse": 2,
    }
    values.update(fields)
    return Decision(**values)


def test_limit_headers() -> None:
    headers = dict(limit_headers(_decision()))
    assert headers == {
        b"ratelimit-limit": b"60", b"ratelimit-remaining": b"59", b"ratelimit-reset": b"1",
        b"ratelimit-policy": b'60;w=60;comment="read", 10000;w=86400;comment="daily, UTC"',
        b"x-quota-limit": b"10000", b"x-quota-remaining": b"9999", b"x-quota-reset": b"3600",
    }


def test_refusals_say_which_limit() -> None:
    assert _refusal(_decision()) is None
    rate = _refusal(_decision(outcome="rate", retry_after_s=2, remaining=0))
    assert rate is not None and rate.status == 429
    assert rate.message == ("rate limit exceeded for read requests: 60 a minute per API "
                            "key; retry in 2 s")
    assert rate.headers == [("Retry-After", "2")]
    daily = _refusal(_decision(outcome="daily", key_id=None, retry_after_s=3_600))
    assert daily is not None and daily.message == (
        "daily quota exceeded: 10000 requests a day per client IP (anonymous); it resets at "
        "00:00 UTC, in 3600 s")
    streams = _refusal(_decision(outcome="streams", route_class="stream", retry_after_s=30))
    assert streams is not None and streams.message.startswith(
        "too many concurrent streams: at most 2 open SSE streams per API key")
    unknown = _refusal(Decision("unknown", "read"))
    assert unknown is not None and unknown.status == 401
    assert unknown.headers == [("WWW-Authenticate",
                                'Bearer realm="make-us-rich", error="invalid_token"')]
    revoked = _refusal(Decision("revoked", "read", key_id="abcdefgh", revoked_ms=0))
    assert revoked is not None and revoked.message == (
        "API key abcdefgh was revoked on 1970-01-01T00:00:00+00:00; ask for a new one")


def test_refusal_metrics_exist_before_the_first() -> None:
    metrics = ApiMetrics()
    value = metrics.registry.get_sample_value(
        "mur_access_refused_total", {"status": "429", "reason": "streams"})
    assert value == 0.0


async def _call(middleware: AccessMiddleware, method: str, path: str,
                headers: list[tuple[bytes, bytes]] | None = None) -> tuple[int, dict[str, Any],
                                                                           dict[bytes, bytes]]:
    scope: Scope = {"type": "http", "method": method, "path": path,
                    "headers": headers or [], "client": ("10.0.0.1", 5000)}
    sent: list[Message] = []

    async def receive() -> Message:
        return {"type": "http.request", "body": b""}

    async def send(message: Message) -> None:
        sent.append(message)

    await middleware(scope, receive, send)
    start, body = sent
    return (start["status"], json.loads(body["body"] or b"{}"),
            dict(start["headers"]))


async def _app(scope: Scope, receive: Receive, send: Send) -> None:
    await send({"type": "http.response.start", "status": 200, "headers": []})
    await send({"type": "http.response.body", "body": b"{}"})


async def test_refused_without_redis_when_no_key_in_prod() -> None:
    """No key in prod and malformed keys cost no Redis round trip (no store at all here)."""
    settings = Settings(_env_file=None, environment="prod")
    middleware = AccessMiddleware(_app, settings, ApiMetrics(), State())
    status, body, headers = await _call(middleware, "GET", "/v1/candles/BTCUSDT")
    assert status == 401 and body["detail"].startswith("an API key is required")
    assert headers[b"www-authenticate"] == b'Bearer realm="make-us-rich"'
    status, body, _ = await _call(middleware, "GET", "/v1/stream",
                                  [(b"x-api-key", b"guess")])
    assert status == 401 and body["detail"].startswith("unknown API key")
    assert "guess" not in json.dumps(body)
    for path in ("/healthz", "/static/app.js"):
        status, _, headers = await _call(middleware, "GET", path)
        assert status == 200 and b"ratelimit-limit" not in headers
    assert middleware.metrics.registry.get_sample_value(
        "mur_access_refused_total", {"status": "401", "reason": "missing"}) == 1.0
