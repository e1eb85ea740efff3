"""The dashboard's vendored charting library is the pinned npm release, unmodified, and the
page references nothing outside the API (it works offline, with no CDN)."""

import hashlib
import json
import re
from pathlib import Path

import pytest

from makeusrich.api.routes.dashboard import STATIC_DIR

VENDOR = STATIC_DIR / "vendor"
# Any absolute or protocol-relative URL: http(s)://, ws(s)://, //host/...
EXTERNAL_URL = re.compile(r"\b(?:https?|wss?):|(?:src|href)\s*=\s*[\"']//|url\(\s*[\"']?//", re.I)


@pytest.fixture(scope="module")
def manifest() -> dict[str, str]:
    return json.loads((VENDOR / "vendor.json").read_text())  # type: ignore[no-any-return]


def test_vendored_file_matches_its_manifest(manifest: dict[str, str]) -> None:
    assert manifest["name"] == "lightweight-charts"
    assert manifest["version"] == "5.2.1"
    assert manifest["file"] == "lightweight-charts.standalone.production.js"
    assert manifest["integrity"].startswith("sha512-")
    body = (VENDOR / manifest["file"]).read_bytes()
    assert hashlib.sha256(body).hexdigest() == manifest["sha256"]
    assert b"TradingView Lightweight Charts\xe2\x84\xa2 v5.2.1" in body[:300]
    assert "Apache License" in (VENDOR / manifest["license"]).read_text()


def test_page_loads_the_vendored_file(manifest: dict[str, str]) -> None:
    page = (STATIC_DIR / "index.html").read_text()
    assert f'src="static/vendor/{manifest["file"]}"' in page


@pytest.mark.parametrize("name", ["index.html", "app.js", "style.css"])
def test_no_external_url(name: str) -> None:
    text = (STATIC_DIR / name).read_text()
    assert EXTERNAL_URL.findall(text) == []


def test_every_static_file_is_package_data() -> None:
    """Wheels ship what ``[tool.setuptools.package-data]`` lists: the page's files too."""
    import tomllib

    root = Path(__file__).resolve().parents[2]
    patterns = tomllib.loads((root / "pyproject.toml").read_text())["tool"]["setuptools"][
        "package-data"
    ]["makeusrich"]
    package = STATIC_DIR.parent.parent
    shipped = {p for pattern in patterns for p in package.glob(pattern) if p.is_file()}
    static = {p for p in STATIC_DIR.rglob("*") if p.is_file()}
    assert static and static <= shipped, sorted(str(p) for p in static - shipped)
