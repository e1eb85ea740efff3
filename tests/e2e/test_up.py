"""`mur up` as a user runs it: embedded broker and Redis, a real replay, real HTTP and SSE;
once on Tansu and once on Apache Kafka (`mur up --kafka apache`)."""

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
from httpx_sse import connect_sse

from kit.api import wait_http
from kit.klines import aggregate, assert_same_as_binance, binance_klines
from makeusrich.cli import BUNDLED_SAMPLE
from makeusrich.core.embedded import free_port
from makeusrich.inference import load_forecaster

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

MINUTES = 60  # the bundled sample: one hour of real BTCUSDT trades


@dataclass
class Running:
    base_url: str
    process: subprocess.Popen[bytes]
    state_dir: Path


def _pids_with_env(marker: str) -> list[int]:
    """Processes whose environment holds ``marker`` (our children, if any survived)."""
    pids = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if marker.encode() in (entry / "environ").read_bytes():
                    pids.append(int(entry.name))
            except OSError:
                continue
    return pids


ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module",
                params=["tansu", pytest.param("apache", marks=pytest.mark.apache)])
def running(tmp_path_factory: pytest.TempPathFactory,
            request: pytest.FixtureRequest) -> Iterator[Running]:
    state_dir = tmp_path_factory.mktemp("mur-up")
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("MUR_")}
    env["MUR_STATE_DIR"] = str(state_dir)
    # The test polls the API every half second while it waits: lift the anonymous
    # limits (per client IP) of `mur up`'s dev mode; the limits are tested in test_access.py.
    env.update(MUR_ANONYMOUS_RPM="1000000", MUR_ANONYMOUS_DAILY="100000000",
               MUR_ANONYMOUS_SSE="1000",
               MUR_KAFKA_LIBS_DIR=str(ROOT / ".kafka-libs"),  # `make kafka-libs`
               MUR_KAFKA_PROPERTIES=str(ROOT / "infra" / "kafka" / "server.properties"))
    process = subprocess.Popen(
        [sys.executable, "-m", "makeusrich", "up", "--source", f"replay:{BUNDLED_SAMPLE}",
         "--speed", "max", "--symbols", "BTCUSDT", "--intervals", "1m,5m",
         "--api-port", str(port), "--kafka", request.param],
        env=env, stdin=subprocess.DEVNULL,
    )
    try:
        base = f"http://127.0.0.1:{port}"
        wait_http(f"{base}/healthz", process, 120)
        yield Running(base, process, state_dir)
    finally:
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
            process.wait(30)


def _wait_candles(base: str, interval: str, count: int, timeout_s: float = 90) -> list[dict]:
    deadline = time.monotonic() + timeout_s
    candles: list[dict] = []
    while time.monotonic() < deadline:
        r = httpx.get(f"{base}/v1/candles/BTCUSDT", params={"interval": interval, "limit": 5000})
        if r.status_code == 200:
            candles = r.json()
            if len(candles) >= count:
                return candles
        time.sleep(0.5)
    raise AssertionError(f"only {len(candles)} {interval} candles after {timeout_s} s")


def _assert_same(ours: list[dict], binance: list[dict]) -> None:
    assert_same_as_binance(ours, binance)
    assert all(c["source"] == "replay" and c["symbol"] == "BTCUSDT" for c in ours)


@pytest.mark.parametrize(("interval", "minutes"), [("1m", 1), ("5m", 5)])
def test_candles_equal_binance_klines(running: Running, interval: str, minutes: int) -> None:
    expected = aggregate(binance_klines(), minutes)
    candles = _wait_candles(running.base_url, interval, len(expected))
    _assert_same(candles, expected)


def _read_events(base: str, last_id: str, stop_after: int) -> list[tuple[str, str, dict]]:
    events = []
    with httpx.Client(timeout=httpx.Timeout(30, read=30)) as client, connect_sse(
        client, "GET", f"{base}/v1/stream", headers={"Last-Event-ID": last_id},
    ) as source:
        for sse in source.iter_sse():
            events.append((sse.id, sse.event, json.loads(sse.data)))
            if len(events) >= stop_after:
                break
    return events


def test_sse_one_prediction_per_closed_candle_and_resume(running: Running) -> None:
    _wait_candles(running.base_url, "1m", MINUTES)
    _wait_candles(running.base_url, "5m", MINUTES // 5)
    total = 2 * (MINUTES + MINUTES // 5)  # a candle and a prediction per closed candle
    events = _read_events(running.base_url, "0", total)
    assert len(events) == total
    for interval, count in (("1m", MINUTES), ("5m", MINUTES // 5)):
        candles = [d for _, e, d in events if e == "candle" and d["interval"] == interval]
        predictions = [d for _, e, d in events if e == "prediction" and d["interval"] == interval]
        assert len(candles) == count
        assert [p["candle_open_time"] for p in predictions] == [c["open_time"] for c in candles]
        for p, c in zip(predictions, candles, strict=True):
            assert p["last_close"] == c["close"] and p["source"] == "replay"
            assert p["lower"] <= p["predicted_close"] <= p["upper"]
            assert p["target_open_time"] == c["close_time"] + 1
        versions = [p["model_version"] for p in predictions]
        if interval == "1m":  # the bundled LSTM takes over once its 30-candle window is full
            assert set(versions[:30]) == {"naive"}
            assert versions[30:] == [load_forecaster().version] * (count - 30)
        else:  # trained on 1m only: other intervals get the persistence baseline
            assert set(versions) == {"naive"}
    ids = [i for i, _, _ in events]
    assert len(set(ids)) == len(ids)

    # A client that saw the first k events reconnects with Last-Event-ID: exactly the rest.
    k = 17
    resumed = _read_events(running.base_url, ids[k - 1], total - k)
    assert [i for i, _, _ in resumed] == ids[k:]


def test_latest_prediction_and_errors(running: Running) -> None:
    _wait_candles(running.base_url, "1m", MINUTES)
    base = running.base_url
    ready = httpx.get(f"{base}/readyz", timeout=20)
    assert ready.status_code == 200 and ready.json()["status"] == "ok", ready.text
    assert "partitions in sync" in ready.json()["checks"]["kafka"]["detail"]
    latest = httpx.get(f"{base}/v1/predictions/BTCUSDT/latest", params={"interval": "1m"})
    assert latest.status_code == 200
    assert latest.json()["candle_open_time"] == binance_klines()[-1]["open_time"]
    unknown = httpx.get(f"{base}/v1/candles/DOGEBTC", params={"interval": "1m"})
    assert unknown.status_code == 404 and "DOGEBTC" in unknown.text
    bad = httpx.get(f"{base}/v1/candles/BTCUSDT", params={"interval": "7m"})
    assert 400 <= bad.status_code < 500 and "interval" in bad.text


def test_sigterm_stops_everything(running: Running) -> None:
    marker = f"MUR_STATE_DIR={running.state_dir}"
    assert len(_pids_with_env(marker)) >= 3  # api, worker, ingest (or ingest done)
    running.process.send_signal(signal.SIGTERM)
    assert running.process.wait(30) == 0
    deadline = time.monotonic() + 10
    while _pids_with_env(marker) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert _pids_with_env(marker) == []
