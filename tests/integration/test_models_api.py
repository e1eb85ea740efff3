"""``/v1/models`` over real HTTP (uvicorn in a thread) against a real redis-server: the
registry on disk, the champion pointer and the version the worker says it serves."""

import contextlib
import json
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from kit.api import serve_in_thread, settings_factory
from kit.registry import add_version
from makeusrich.core.embedded import EmbeddedService
from makeusrich.core.settings import Settings
from makeusrich.core.store import RedisStore
from makeusrich.inference import (
    BASELINE_KINDS,
    MANIFEST_FILE,
    MODEL_FILE,
    Registry,
    bundled_models_dir,
    read_manifest,
)

pytestmark = pytest.mark.integration

OLD = "lstm-20250101-000000-aaaaaaaa"
NEW = "lstm-20250301-000000-bbbbbbbb"
MODEL_FIELDS = {
    "version", "kind", "created_at", "window", "symbols", "interval", "metrics", "sha256_ok",
    "is_champion", "champion_for", "serving", "problem", "baseline",
}


@pytest.fixture
def root(tmp_path: Path) -> Path:
    root = tmp_path / "registry"
    root.mkdir()
    add_version(root, OLD)
    add_version(root, NEW)
    return root


@pytest.fixture
def make_settings(redis_server: EmbeddedService) -> Callable[..., Settings]:
    return settings_factory(redis_server.url)


@pytest.fixture
async def store(make_settings: Callable[..., Settings]) -> AsyncIterator[RedisStore]:
    store = RedisStore.from_settings(make_settings())
    yield store
    await store.client.delete(store.keys.model)
    await store.aclose()


@pytest.fixture
def start_api(make_settings: Callable[..., Settings]) -> Iterator[Callable[..., str]]:
    with contextlib.ExitStack() as stack:

        def start(**overrides: Any) -> str:
            return stack.enter_context(serve_in_thread(make_settings(**overrides))).base_url

        yield start


@pytest.fixture
async def client(
    start_api: Callable[..., str], root: Path
) -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(base_url=start_api(model_dir=root), timeout=10) as client:
        yield client


async def test_list_models(client: httpx.AsyncClient, root: Path, store: RedisStore) -> None:
    response = await client.get("/v1/models")
    assert response.status_code == 200, response.text
    body = response.json()
    assert [row["version"] for row in body] == [OLD, NEW]
    assert set(body[0]) == MODEL_FIELDS
    source = read_manifest(root / OLD)
    assert body[0] | {"metrics": None} == {
        "version": OLD, "kind": source.architecture.kind, "created_at": source.created_at,
        "window": source.window, "symbols": list(source.training_data.symbols),
        "interval": source.training_data.interval, "metrics": None,
        "sha256_ok": True, "is_champion": False, "champion_for": [], "serving": False,
        "problem": None, "baseline": source.architecture.kind in BASELINE_KINDS,
    }
    assert body[0]["metrics"]["skill"] == source.metrics["skill"]

    # Promotion, the worker's model record and a corrupted file all show up at once.
    Registry(root).promote(OLD, "test")
    await store.set_model(NEW)
    (root / NEW / MODEL_FILE).write_bytes(b"swapped")
    body = (await client.get("/v1/models")).json()
    flags = [(r["is_champion"], r["serving"], r["sha256_ok"]) for r in body]
    assert flags == [(True, False, True), (False, True, False)]
    assert "sha256" in body[1]["problem"]

    # A per-symbol champion is listed with the symbols it serves.
    Registry(root).promote(OLD, "test", symbol="ETHUSDT")
    body = (await client.get("/v1/models")).json()
    assert [r["champion_for"] for r in body] == [["ETHUSDT"], []]


async def test_model_details(client: httpx.AsyncClient, root: Path, store: RedisStore) -> None:
    Registry(root).promote(NEW, "test")
    await store.set_model(NEW)

    response = await client.get(f"/v1/models/{NEW}")
    assert response.status_code == 200, response.text
    body = response.json()
    assert set(body) == MODEL_FIELDS | {"manifest"}
    assert (body["version"], body["is_champion"], body["serving"], body["sha256_ok"]) == (
        NEW, True, True, True
    )
    manifest = json.loads((root / NEW / MANIFEST_FILE).read_text())
    # Fields newer than the file (with defaults) are in the response too.
    assert {name: body["manifest"][name] for name in manifest} == manifest


async def test_unreadable_manifest_details(client: httpx.AsyncClient, root: Path) -> None:
    (root / OLD / MANIFEST_FILE).write_text("{")
    body = (await client.get(f"/v1/models/{OLD}")).json()
    assert (body["manifest"], body["sha256_ok"], body["kind"]) == (None, False, None)
    assert "not a valid model manifest" in body["problem"]


@pytest.mark.parametrize("version", ["nope", ".staging-x", "champion.json"])
async def test_unknown_version_is_404(client: httpx.AsyncClient, version: str) -> None:
    response = await client.get(f"/v1/models/{version}")
    assert response.status_code == 404
    assert response.json() == {"detail": f"unknown model version '{version}'; known: {OLD}, {NEW}"}


@pytest.mark.parametrize(
    ("raw", "detail"),
    [
        ("%2E%2E", f"unknown model version '..'; known: {OLD}, {NEW}"),
        ("..%2F..%2Fetc", "Not Found"),  # a decoded "/" no longer matches the route
    ],
)
async def test_path_traversal_is_404(client: httpx.AsyncClient, raw: str, detail: str) -> None:
    # Percent-encoded so that httpx does not normalise the dots away.
    response = await client.get(f"/v1/models/{raw}")
    assert (response.status_code, response.json()["detail"]) == (404, detail)


async def test_bundled_models_by_default(start_api: Callable[..., str]) -> None:
    async with httpx.AsyncClient(base_url=start_api(), timeout=10) as client:
        body = (await client.get("/v1/models")).json()
    bundled = sorted(p.name for p in bundled_models_dir().iterdir() if (p / MANIFEST_FILE).exists())
    assert sorted(row["version"] for row in body) == bundled
    assert all(row["sha256_ok"] for row in body)
    # The rule chose the champion; the listing says whether a baseline won.
    (champion,) = [row for row in body if row["is_champion"]]
    assert champion["version"] == Registry(bundled_models_dir()).champion()
    assert champion["baseline"] == (champion["kind"] in BASELINE_KINDS)


async def test_a_baseline_champion_says_so(start_api: Callable[..., str], tmp_path: Path) -> None:
    add_version(tmp_path, "lstm-20250101-000000-aaaaaaaa", kind="lstm")
    add_version(tmp_path, "garch-20250102-000000-bbbbbbbb", kind="garch")
    Registry(tmp_path).promote("garch-20250102-000000-bbbbbbbb", "no network passed the rule")
    async with httpx.AsyncClient(base_url=start_api(model_dir=tmp_path), timeout=10) as client:
        body = {row["version"]: row for row in (await client.get("/v1/models")).json()}
    garch, lstm = body["garch-20250102-000000-bbbbbbbb"], body["lstm-20250101-000000-aaaaaaaa"]
    assert (garch["is_champion"], garch["baseline"], garch["kind"]) == (True, True, "garch")
    assert (lstm["is_champion"], lstm["baseline"]) == (False, False)


async def test_broken_registry_is_500(start_api: Callable[..., str], tmp_path: Path) -> None:
    async with httpx.AsyncClient(base_url=start_api(model_dir=tmp_path / "nope")) as client:
        response = await client.get("/v1/models")
        assert response.status_code == 500
        assert "does not exist" in response.json()["detail"]
        assert (await client.get(f"/v1/models/{OLD}")).status_code == 500


async def test_openapi_documents_the_models(client: httpx.AsyncClient) -> None:
    spec = (await client.get("/openapi.json")).json()
    assert {"/v1/models", "/v1/models/{version}"} <= set(spec["paths"])
    assert set(spec["components"]["schemas"]["ModelOut"]["properties"]) == MODEL_FIELDS
