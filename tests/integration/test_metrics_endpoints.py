"""Prometheus metrics scraped over real HTTP: the API's ``/metrics`` (uvicorn in a thread,
real redis-server, a real SSE client) and a ``mur worker`` subprocess fed through the real
broker."""

import asyncio
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import msgspec
import pytest
from httpx_sse import aconnect_sse
from kafka import KafkaProducer
from msgspec.structs import replace

from kit.api import RunningApi, serve_in_thread, settings_factory
from kit.broker import Broker, topic_safe
from kit.klines import TRADES_SLICE
from kit.metrics import Samples, parse, series
from kit.metrics import sample as get
from kit.worker import wait_until, worker_processes
from makeusrich.core.embedded import EmbeddedService, free_port
from makeusrich.core.schemas import Candle, EndOfStream, Prediction, now_ms
from makeusrich.core.settings import Settings
from makeusrich.core.store import RedisStore
from makeusrich.inference import load_forecaster
from makeusrich.stream.publisher import TradePublisher, ensure_topics
from makeusrich.stream.sources import read_trades

pytestmark = [pytest.mark.integration, pytest.mark.slow]

MINUTE_MS = 60_000
T0_MS = 1_700_000_040_000

def total(samples: Samples, name: str, **labels: str) -> float:
    """Sum of ``name`` over every series carrying ``labels``."""
    wanted = set(labels.items())
    return sum(value for (sample, sample_labels), value in samples.items()
               if sample == name and wanted <= sample_labels)


# ------------------------------------------------------------------------------ API


@pytest.fixture
def make_settings(redis_server: EmbeddedService) -> Callable[..., Settings]:
    return settings_factory(redis_server.url, symbols=("BTCUSDT", "ETHUSDT"),
                            intervals=("1m",), sse_heartbeat_s=15.0)


def _candle(i: int) -> Candle:
    open_time = T0_MS + i * MINUTE_MS
    return Candle("BTCUSDT", "1m", open_time, open_time + MINUTE_MS - 1, 100.0, 101.0, 99.0,
                  100.5, 1.0, 100.0, 3, 0.5, 50.0, "sim", open_time + MINUTE_MS - 1,
                  open_time + MINUTE_MS)


def _prediction(i: int) -> Prediction:
    open_time = T0_MS + i * MINUTE_MS
    return Prediction("BTCUSDT", "1m", open_time, open_time + MINUTE_MS, 100.5, 100.6, 100.0,
                      101.0, "v-test", open_time + MINUTE_MS, "sim", open_time + MINUTE_MS - 1,
                      open_time + MINUTE_MS)


async def scrape(client: httpx.AsyncClient) -> Samples:
    response = await client.get("/metrics")
    assert response.status_code == 200, response.text
    assert response.headers["content-type"].startswith("text/plain; version=")
    return parse(response.text)


async def until(check: Callable[[], Any], timeout_s: float = 10.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not await check():
        if time.monotonic() > deadline:
            raise AssertionError("condition not met in time")
        await asyncio.sleep(0.02)


async def test_api_metrics(start_api: Callable[..., RunningApi], store: RedisStore) -> None:
    api = start_api()
    async with httpx.AsyncClient(base_url=api.base_url, timeout=10) as client:
        assert (await client.get("/healthz")).status_code == 200
        assert (await client.get("/v1/candles/BTCUSDT")).status_code == 200
        assert (await client.get("/v1/candles/ethusdt")).status_code == 200
        assert (await client.get("/v1/candles/NOPEUSDT")).status_code == 404
        assert (await client.get("/v1/candles/BTCUSDT", params={"limit": 0})).status_code == 422
        assert (await client.get("/v1/no/such/thing")).status_code == 404
        assert "/metrics" not in (await client.get("/openapi.json")).json()["paths"]

        received = []
        async with aconnect_sse(client, "GET", "/v1/stream") as source:
            assert source.response.status_code == 200
            await until(lambda: _subscribed(api, 1))
            assert get(await scrape(client), "mur_sse_clients") == 1
            for i in range(3):
                await store.write_candle(_candle(i))
                await store.write_prediction(_prediction(i))
            async for event in source.aiter_sse():
                received.append(event.event)
                if len(received) == 6:
                    break
        await until(lambda: _subscribed(api, 0))

        samples = await scrape(client)
    assert get(samples, "mur_sse_clients") == 0
    assert received.count("candle") == received.count("prediction") == 3
    # Counted as written to the socket: exactly what the client received.
    assert get(samples, "mur_sse_events_sent_total", type="candle") == 3
    assert get(samples, "mur_sse_events_sent_total", type="prediction") == 3
    assert get(samples, "mur_sse_events_sent_total", type="alert") == 0

    count = "mur_http_request_duration_seconds_count"

    def requests(route: str, status_class: str, method: str = "GET") -> float | None:
        return get(samples, count, method=method, route=route, status_class=status_class)

    assert requests("/healthz", "2xx") == 1
    assert requests("/v1/candles/{symbol}", "2xx") == 2
    assert requests("/v1/candles/{symbol}", "4xx") == 2  # the 404 and the 422
    assert requests("unmatched", "4xx") == 1
    assert requests("/openapi.json", "2xx") == 1
    assert requests("/v1/stream", "2xx") == 1
    assert requests("/metrics", "2xx") == 1  # the scrape before this one
    # Never a raw path: every route label is a template (or "unmatched").
    routes = {labels["route"] for labels in series(samples, count)}
    assert routes == {"/healthz", "/v1/candles/{symbol}", "unmatched", "/openapi.json",
                      "/v1/stream", "/metrics"}
    # Buckets are cumulative and end with every request.
    assert get(samples, "mur_http_request_duration_seconds_bucket", method="GET",
               route="/v1/candles/{symbol}", status_class="2xx", le="+Inf") == 2
    assert total(samples, "mur_redis_errors_total") == 0
    assert get(samples, "process_resident_memory_bytes") is not None


async def _subscribed(api: RunningApi, count: int) -> bool:
    return api.broadcaster.subscriber_count == count


async def test_api_counts_redis_errors(make_settings: Callable[..., Settings]) -> None:
    settings = make_settings(redis_url=f"redis://127.0.0.1:{free_port()}/0")
    with serve_in_thread(settings) as api:
        async with httpx.AsyncClient(base_url=api.base_url, timeout=10) as client:
            assert (await client.get("/v1/candles/BTCUSDT")).status_code == 503
            assert (await client.get("/v1/candles/BTCUSDT")).status_code == 503
            samples = await scrape(client)
    assert get(samples, "mur_redis_errors_total", operation="request") == 2
    assert (get(samples, "mur_redis_errors_total", operation="subscription") or 0) >= 1
    assert get(samples, "mur_http_request_duration_seconds_count", method="GET",
               route="/v1/candles/{symbol}", status_class="5xx") == 2


# --------------------------------------------------------------------------- worker


@pytest.fixture
def worker_settings(kafka: Broker, redis_server: EmbeddedService, tmp_path: Path,
                    request: pytest.FixtureRequest) -> Settings:
    name = topic_safe(request.node.name)
    settings = Settings(
        _env_file=None, kafka_bootstrap=kafka.url, redis_url=redis_server.url,
        topic_prefix=f"{name}-", redis_prefix=name, worker_id=name, state_dir=tmp_path,
        symbols=("BTCUSDT",), intervals=("1m",), log_level="INFO",
        worker_metrics_port=free_port(),
    )
    ensure_topics(settings)
    return settings


@pytest.fixture
def worker(worker_settings: Settings) -> Iterator[subprocess.Popen[bytes]]:
    with worker_processes() as start:
        yield start(worker_settings)


def scrape_worker(settings: Settings) -> Samples:
    response = httpx.get(f"http://127.0.0.1:{settings.worker_metrics_port}/metrics",
                         timeout=5)
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/plain; version=")
    return parse(response.text)


def _worker_scrape_or_empty(settings: Settings) -> Samples:
    try:
        return scrape_worker(settings)
    except httpx.TransportError:
        return {}  # not listening yet


def test_worker_metrics(worker_settings: Settings, worker: subprocess.Popen[bytes]) -> None:
    settings = worker_settings
    producer = KafkaProducer(bootstrap_servers=settings.kafka_bootstrap)
    malformed = {
        "undecodable": [b"not json", b'{"kind":"trade","symbol":"BTCUSDT"}'],
        "invalid": [msgspec.json.encode({
            "kind": "trade", "symbol": "BTCUSDT", "trade_id": 1, "price": -1.0, "qty": 1.0,
            "quote_qty": 1.0, "is_buyer_maker": False, "ts_event": T0_MS,
            "ts_ingest": T0_MS})],
    }
    for raw in [raw for batch in malformed.values() for raw in batch]:
        producer.send(settings.topics.trades, raw, key=b"BTCUSDT")
    producer.flush()
    producer.close()

    # Stamped on publish, as the replay driver does: the ingest lag of a replay is the
    # age of its data, the candle-close latency the real time it took the worker.
    trades = [replace(trade, ts_ingest=now_ms()) for trade in read_trades(TRADES_SLICE)]
    # A valid trade for the first minute, long closed by the time it comes: late.
    late = replace(trades[0], trade_id=trades[-1].trade_id + 1, ts_ingest=now_ms())
    publisher = TradePublisher(settings)
    for trade in [*trades, late]:
        publisher.send(trade)
    publisher.send(EndOfStream("BTCUSDT", trades[-1].ts_event, now_ms(), "replay"))
    publisher.close()

    horizons = len(load_forecaster(None).horizons)

    def done() -> bool:
        samples = _worker_scrape_or_empty(settings)
        return (get(samples, "mur_predictions_total", symbol="BTCUSDT", interval="1m")
                == 30 * horizons
                and get(samples, "mur_dead_letters_total", reason="late") == 1)

    wait_until(done, "the worker's metrics to show every candle and dead letter")
    samples = scrape_worker(settings)

    assert get(samples, "mur_trades_consumed_total", symbol="BTCUSDT") == len(trades) + 1
    for reason, raws in malformed.items():
        assert get(samples, "mur_dead_letters_total", reason=reason) == len(raws)
    assert total(samples, "mur_dead_letters_total") == 3 + 1
    assert get(samples, "mur_late_trades_total", symbol="BTCUSDT") == 1
    assert get(samples, "mur_candles_closed_total", symbol="BTCUSDT", interval="1m") == 30
    # One a horizon of the bundled model per closed candle; one model call per candle.
    assert get(samples, "mur_predictions_total", symbol="BTCUSDT", interval="1m") == 30 * horizons
    assert total(samples, "mur_inference_latency_seconds_count") == 30
    assert total(samples, "mur_inference_latency_seconds_sum") > 0
    assert get(samples, "mur_duplicate_trades_total") == 0

    lag = "mur_ingest_lag_seconds"
    assert get(samples, f"{lag}_count", source="replay") == len(trades) + 1
    expected_lag_s = sum(t.ts_ingest - t.ts_event for t in [*trades, late]) / 1000
    assert get(samples, f"{lag}_sum", source="replay") == pytest.approx(expected_lag_s)

    close = "mur_candle_close_latency_seconds"
    assert get(samples, f"{close}_count", interval="1m") == 30
    close_sum = get(samples, f"{close}_sum", interval="1m")
    assert close_sum is not None and 0 < close_sum < 30 * 300
    assert get(samples, f"{close}_bucket", interval="1m", le="300.0") == 30

    bundled = load_forecaster().version
    assert series(samples, "mur_model_info") == [{"version": bundled, "scope": "shared"}]
    assert get(samples, "mur_model_info", version=bundled, scope="shared") == 1
    assert get(samples, "mur_model_rejections_total") == 0
    assert total(samples, "mur_redis_errors_total") == 0
    assert total(samples, "mur_kafka_errors_total") == 0
    assert get(samples, "process_cpu_seconds_total") is not None
    assert worker.poll() is None
