"""The dashboard at ``/`` in a real headless chromium, against `mur up` replaying real trades.

The browser reaches the API through a small TCP proxy owned by the test, so that a network
drop can be made real: the proxy cuts every connection and holds new ones until the API has
published events the page has not seen; the page must then show them all (resumed by
``Last-Event-ID``), exactly like the REST history. Needs Debian's chromium and chromedriver
(`make browser` installs them).
"""

import contextlib
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
from selenium import webdriver
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.remote.webdriver import WebDriver

from kit.api import wait_http
from makeusrich.cli import BUNDLED_SAMPLE
from makeusrich.core.embedded import free_port

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

CHROMIUM = Path("/usr/bin/chromium")
CHROMEDRIVER = Path("/usr/bin/chromedriver")
ARTIFACTS = Path(__file__).resolve().parents[2] / ".mur" / "test-artifacts"
SYMBOL, INTERVAL = "BTCUSDT", "1m"
# Browser-log errors that are expected: the network drops this test makes, /readyz answering
# 503 until the worker is up, and /v1/monitoring answering 404 while a series has no
# monitoring record (the page shows n/a for both).
EXPECTED_NETWORK_ERRORS = re.compile(r"/v1/stream\?|/readyz - .* 503|/v1/monitoring/.* 404")


# ---- a TCP proxy that can drop every connection ---------------------------------------


class DroppingProxy:
    """Forwards 127.0.0.1:<port> to the API; ``drop()`` cuts every open connection and
    ``hold()`` keeps new ones waiting (the browser sees a network outage) until
    ``release()``. Every request head the browser sent is kept in ``requests``."""

    def __init__(self, upstream_port: int) -> None:
        self.upstream_port = upstream_port
        self.server = socket.create_server(("127.0.0.1", 0))
        self.port: int = self.server.getsockname()[1]
        self.requests: list[tuple[str, dict[str, str]]] = []
        self._sockets: set[socket.socket] = set()
        self._lock = threading.Lock()
        self._open = threading.Event()
        self._open.set()
        self._closed = False
        threading.Thread(target=self._accept, daemon=True).start()

    def hold(self) -> None:
        self._open.clear()

    def release(self) -> None:
        self._open.set()

    def drop(self) -> None:
        with self._lock:
            sockets, self._sockets = self._sockets, set()
        for sock in sockets:
            _close(sock)

    def close(self) -> None:
        self._closed = True
        self.release()
        _close(self.server)
        self.drop()

    def _accept(self) -> None:
        while not self._closed:
            try:
                client, _ = self.server.accept()
            except OSError:
                return
            threading.Thread(target=self._serve, args=(client,), daemon=True).start()

    def _serve(self, client: socket.socket) -> None:
        self._open.wait()
        try:
            upstream = socket.create_connection(("127.0.0.1", self.upstream_port))
        except OSError:
            _close(client)
            return
        with self._lock:
            self._sockets |= {client, upstream}
        threading.Thread(target=self._pipe, args=(upstream, client, False), daemon=True).start()
        self._pipe(client, upstream, True)

    def _pipe(self, source: socket.socket, sink: socket.socket, record: bool) -> None:
        pending = b""
        try:
            while chunk := source.recv(65536):
                if record:  # browser -> API: GET requests only, so heads are all there is
                    pending = self._record(pending + chunk)
                sink.sendall(chunk)
        except OSError:
            pass
        finally:
            _close(source)
            _close(sink)

    def _record(self, data: bytes) -> bytes:
        while b"\r\n\r\n" in data:
            head, data = data.split(b"\r\n\r\n", 1)
            request_line, *lines = head.decode("latin-1").split("\r\n")
            headers = dict(line.split(": ", 1) for line in lines if ": " in line)
            self.requests.append((request_line, {k.lower(): v for k, v in headers.items()}))
        return data


def _close(sock: socket.socket) -> None:
    with contextlib.suppress(OSError):
        sock.shutdown(socket.SHUT_RDWR)
    sock.close()


# ---- fixtures -------------------------------------------------------------------------


@dataclass
class Dashboard:
    api: str  # the API itself, for the test's own REST reads
    proxy: DroppingProxy
    driver: WebDriver


@pytest.fixture(scope="module")
def api(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """`mur up` replaying the bundled hour at 20x: a closed candle every 3 s."""
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("MUR_")}
    env["MUR_STATE_DIR"] = str(tmp_path_factory.mktemp("mur-dashboard"))
    # The test polls the API from the browser's IP many times a second: lift the anonymous
    # limits (per client IP) of `mur up`'s dev mode; the limits are tested in test_access.py.
    env.update(MUR_ANONYMOUS_RPM="1000000", MUR_ANONYMOUS_DAILY="100000000",
               MUR_ANONYMOUS_SSE="1000")
    process = subprocess.Popen(
        [sys.executable, "-m", "makeusrich", "up", "--source", f"replay:{BUNDLED_SAMPLE}",
         "--speed", "20", "--symbols", SYMBOL, "--intervals", INTERVAL,
         "--api-port", str(port)],
        env=env, stdin=subprocess.DEVNULL,
    )
    try:
        base = f"http://127.0.0.1:{port}"
        wait_http(f"{base}/healthz", process, 60)
        yield base
    finally:
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
            process.wait(30)


@pytest.fixture(scope="module")
def dashboard(api: str) -> Iterator[Dashboard]:
    missing = [str(p) for p in (CHROMIUM, CHROMEDRIVER) if not os.access(p, os.X_OK)]
    if missing:
        pytest.fail(f"{' and '.join(missing)} missing: the dashboard test drives Debian's "
                    "chromium; `make browser` installs chromium and chromium-driver")
    proxy = DroppingProxy(int(api.rsplit(":", 1)[1]))
    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--window-size=1400,820"):
        options.add_argument(arg)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(options=options, service=Service(str(CHROMEDRIVER)))
    try:
        driver.get(f"http://127.0.0.1:{proxy.port}/")
        yield Dashboard(api, proxy, driver)
    finally:
        driver.quit()
        proxy.close()


# ---- helpers --------------------------------------------------------------------------


def _wait(what: str, check: Callable[[], Any], timeout_s: float = 30) -> Any:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if result := check():
            return result
        time.sleep(0.1)
    raise AssertionError(f"timed out after {timeout_s} s waiting for {what}")


def _chart(d: Dashboard) -> dict[str, str]:
    return d.driver.execute_script(  # type: ignore[no-any-return]
        "return Object.assign({}, document.getElementById('chart').dataset)"
    )


def _conn(d: Dashboard) -> tuple[str, int]:
    badge = d.driver.execute_script(
        "const b = document.getElementById('conn'); return [b.dataset.state, b.dataset.opens]"
    )
    return badge[0], int(badge[1])


def _rest(d: Dashboard, what: str) -> list[dict[str, Any]]:
    path = "candles/" + SYMBOL if what == "candles" else f"predictions/{SYMBOL}/history"
    r = httpx.get(f"{d.api}/v1/{path}", params={"interval": INTERVAL, "limit": 300})
    r.raise_for_status()
    return r.json()  # type: ignore[no-any-return]


def _page_matches_api(d: Dashboard) -> bool:
    """The page holds exactly the candles and predictions the API has (none missed)."""
    chart = _chart(d)
    candles, predictions = _rest(d, "candles"), _rest(d, "predictions")
    return (
        int(chart["candles"]) == len(candles)
        and chart["lastCandleTime"] == str(candles[-1]["open_time"])
        and int(chart["predictions"]) == len(predictions)
        and chart["lastPredictionTime"] == str(predictions[-1]["target_open_time"])
    )


def _monitoring_shown(d: Dashboard) -> bool:
    r = httpx.get(f"{d.api}/v1/monitoring/{SYMBOL}", params={"interval": INTERVAL})
    quality = d.driver.find_element("id", "quality").text
    drift = d.driver.find_element("id", "drift").get_attribute("data-state")
    if r.status_code == 404:
        return quality == "n/a" and drift == "n/a"
    r.raise_for_status()
    body = r.json()
    versions = [q["model_version"] for q in body["quality"]]
    return (
        (all(v in quality for v in versions) if versions else quality == "n/a")
        and drift == (body["drift"]["state"] if body["drift"] else "n/a")
    )


def _assert_no_errors(d: Dashboard) -> None:
    errors = d.driver.execute_script("return window.__murErrors")
    assert errors == [], f"errors in the page: {errors}"
    severe = [
        entry for entry in d.driver.get_log("browser")
        if entry["level"] == "SEVERE"
        and not (entry.get("source") == "network"
                 and EXPECTED_NETWORK_ERRORS.search(entry["message"]))
    ]
    assert severe == [], f"browser log: {severe}"


def _stream_requests(d: Dashboard, since: int) -> list[tuple[str, dict[str, str]]]:
    return [r for r in d.proxy.requests[since:] if r[0].startswith("GET /v1/stream?")]


def _cut_until_missed(d: Dashboard) -> None:
    """With new connections held: wait until the API has a prediction the page lacks."""
    seen = int(_chart(d)["lastPredictionTime"])
    _wait("a prediction made while the page is cut off",
          lambda: _rest(d, "predictions")[-1]["target_open_time"] > seen)
    assert int(_chart(d)["lastPredictionTime"]) == seen, "the page got events while cut off"


# ---- tests (in order: one page, one `mur up`) -----------------------------------------


def test_page_draws_live_predictions(dashboard: Dashboard) -> None:
    d = dashboard
    _wait("history drawn", lambda: _chart(d)["ready"] == "true" and _conn(d)[0] == "live")
    _wait("a first prediction", lambda: int(_chart(d)["predictions"]) > 0)
    loaded = int(_chart(d)["predictions"])
    # A NEW prediction arrives over SSE and is drawn.
    _wait("a prediction pushed over SSE", lambda: int(_chart(d)["predictions"]) > loaded)

    chart = _chart(d)
    last = d.driver.find_element("id", "last-prediction")
    assert last.get_attribute("data-target-open-time") == chart["lastPredictionTime"]
    rest = {p["target_open_time"]: p for p in _rest(d, "predictions")}
    drawn = rest[int(chart["lastPredictionTime"])]
    assert float(last.get_attribute("data-predicted-close") or "nan") == drawn["predicted_close"]
    assert f"{drawn['predicted_close']:.2f}" in last.text
    assert d.driver.find_element("id", "model-version").text == drawn["model_version"]
    assert d.driver.find_element("id", "symbol").get_attribute("value") == SYMBOL
    assert d.driver.find_element("id", "interval").get_attribute("value") == INTERVAL
    # /readyz is polled: the worker's model shows up.
    _wait("the served model", lambda: d.driver.find_element("id", "ready-model").text != "n/a")
    # The chart really drew: its canvases are there and sized.
    canvases = d.driver.execute_script(
        "return [...document.querySelectorAll('#chart canvas')].map(c => c.width * c.height)"
    )
    assert canvases and max(canvases) > 100_000
    # Offline-ready: everything the page loaded came from the API itself.
    origin = f"http://127.0.0.1:{d.proxy.port}/"
    loaded_urls = d.driver.execute_script(
        "return performance.getEntriesByType('resource').map(e => e.name)"
    )
    assert [u for u in loaded_urls if not u.startswith(origin)] == []
    assert any(u.endswith("/static/vendor/lightweight-charts.standalone.production.js")
               for u in loaded_urls)

    # Quality and drift as /v1/monitoring reports them (polled), n/a while it answers 404.
    _wait("the monitoring panel", lambda: _monitoring_shown(d), timeout_s=25)
    # For the eye: a screenshot once a dozen minutes are on the chart.
    _wait("12 candles", lambda: int(_chart(d)["candles"]) >= 12, timeout_s=60)
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    assert d.driver.save_screenshot(str(ARTIFACTS / "dashboard.png"))
    _assert_no_errors(d)


def test_browser_reconnect_after_a_network_drop_misses_nothing(dashboard: Dashboard) -> None:
    d = dashboard
    _wait("live", lambda: _conn(d)[0] == "live")
    opens = _conn(d)[1]
    mark = len(d.proxy.requests)
    d.proxy.hold()
    d.proxy.drop()
    try:
        _wait("the page noticing the drop", lambda: _conn(d)[0] == "reconnecting")
        _cut_until_missed(d)
    finally:
        d.proxy.release()
    # The browser's own EventSource reconnect: it resumes with the Last-Event-ID header.
    _wait("live again", lambda: _conn(d)[0] == "live" and _conn(d)[1] > opens)
    resumed = _stream_requests(d, mark)
    assert resumed and all("last-event-id" in headers for _, headers in resumed), resumed
    _wait("the missed events, and only those", lambda: _page_matches_api(d), timeout_s=15)
    _assert_no_errors(d)


def test_page_reopens_a_closed_stream_misses_nothing(dashboard: Dashboard) -> None:
    d = dashboard
    _wait("live", lambda: _conn(d)[0] == "live")
    opens = _conn(d)[1]
    mark = len(d.proxy.requests)
    d.proxy.hold()
    try:
        # A closed EventSource never reconnects by itself; the page's watchdog reopens it.
        d.driver.execute_script("window.__murSSE.__old = true; window.__murSSE.close()")
        _wait("the page noticing the closed stream", lambda: _conn(d)[0] == "reconnecting")
        _cut_until_missed(d)
    finally:
        d.proxy.release()
    _wait("live again", lambda: _conn(d)[0] == "live" and _conn(d)[1] > opens)
    assert d.driver.execute_script("return window.__murSSE.__old === undefined")
    resumed = _stream_requests(d, mark)
    assert resumed and all("last_event_id=" in line for line, _ in resumed), resumed
    _wait("the missed events, and only those", lambda: _page_matches_api(d), timeout_s=15)
    # Still live afterwards: one more prediction arrives.
    count = int(_chart(d)["predictions"])
    _wait("another prediction", lambda: int(_chart(d)["predictions"]) > count)
    _assert_no_errors(d)
