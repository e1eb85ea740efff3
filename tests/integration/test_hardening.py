"""What every response carries whatever the route: security headers, CORS only for the
configured origins, a request-size limit, and errors without stack traces."""

from collections.abc import Iterator

import httpx
import pytest

from kit.api import RunningApi, serve_in_thread
from makeusrich.api import create_app
from makeusrich.core.embedded import EmbeddedService
from makeusrich.core.settings import Settings

pytestmark = [pytest.mark.integration]

ORIGIN = "https://dashboard.example"


@pytest.fixture(scope="module")
def api(redis_server: EmbeddedService, tmp_path_factory: pytest.TempPathFactory
        ) -> Iterator[RunningApi]:
    settings = Settings(redis_url=redis_server.url, redis_prefix="hardening",
                        state_dir=tmp_path_factory.mktemp("hardening"), environment="dev",
                        cors_origins=(ORIGIN,), max_body_bytes=2_048)
    app = create_app(settings)

    @app.get("/boom", include_in_schema=False)
    async def boom() -> None:
        raise RuntimeError("secret internals /etc/passwd")

    with serve_in_thread(settings, app) as running:
        yield running


@pytest.mark.parametrize("path", ["/v1/predictions/latest", "/", "/healthz", "/nowhere"])
def test_security_headers_on_every_response(api: RunningApi, path: str) -> None:
    response = httpx.get(api.base_url + path)
    assert response.headers["x-content-type-options"] == "nosniff"
    assert response.headers["x-frame-options"] == "DENY"
    assert response.headers["referrer-policy"] == "no-referrer"
    assert "default-src 'self'" in response.headers["content-security-policy"]


def test_the_docs_keep_working_without_a_csp(api: RunningApi) -> None:
    response = httpx.get(api.base_url + "/docs")
    assert response.status_code == 200
    assert "content-security-policy" not in response.headers


def test_cors_answers_only_the_configured_origins(api: RunningApi) -> None:
    def preflight(origin: str) -> httpx.Response:
        return httpx.options(api.base_url + "/v1/predictions/latest", headers={
            "Origin": origin, "Access-Control-Request-Method": "GET",
            "Access-Control-Request-Headers": "X-API-Key"})

    allowed = preflight(ORIGIN)
    assert allowed.status_code == 200
    assert allowed.headers["access-control-allow-origin"] == ORIGIN
    assert "access-control-allow-origin" not in preflight("https://evil.example").headers
    simple = httpx.get(api.base_url + "/v1/predictions/latest", headers={"Origin": ORIGIN})
    assert simple.headers["access-control-allow-origin"] == ORIGIN
    assert "ratelimit-remaining" in simple.headers["access-control-expose-headers"].lower()


def test_large_bodies_are_refused_declared_or_streamed(api: RunningApi) -> None:
    url = api.base_url + "/v1/backtests"
    declared = httpx.post(url, content=b"{" + b" " * 4_096 + b"}",
                          headers={"content-type": "application/json"})
    assert declared.status_code == 413
    assert declared.json() == {"detail": "request body too large: at most 2048 bytes"}

    def chunks() -> Iterator[bytes]:  # no Content-Length: chunked transfer
        for _ in range(10):
            yield b" " * 1_000

    streamed = httpx.post(url, content=chunks(), headers={"content-type": "application/json"})
    assert streamed.status_code == 413


def test_an_unhandled_error_shows_no_internals(api: RunningApi) -> None:
    response = httpx.get(api.base_url + "/boom")
    assert response.status_code == 500
    assert response.json() == {"detail": "internal server error"}
    assert "passwd" not in response.text and "Traceback" not in response.text


def test_cors_origins_are_a_comma_separated_list() -> None:
    settings = Settings(cors_origins="https://a.example, https://b.example")  # type: ignore[arg-type]
    assert settings.cors_origins == ("https://a.example", "https://b.example")
