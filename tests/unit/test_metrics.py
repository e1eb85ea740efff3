"""Metric sets (no broker, no server): isolation, the worker's hot path, model-info
updates, and the label guards that keep cardinality bounded."""

from collections.abc import AsyncIterator

import httpx
import pytest
from fastapi import APIRouter, FastAPI, HTTPException
from fastapi.responses import PlainTextResponse
from prometheus_client import CollectorRegistry
from prometheus_client.parser import text_string_to_metric_families
from starlette.routing import Mount

from makeusrich.api.routes.metrics import RequestMetricsMiddleware, route_template, router
from makeusrich.core.metrics import (
    ApiMetrics,
    WorkerMetrics,
    expose,
    method_label,
    status_class,
)
from makeusrich.core.schemas import Candle, Prediction, Trade

T0 = 1_700_000_040_000


def samples(registry: CollectorRegistry) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    """Every sample of the text exposition: (name, labels) -> value."""
    body, _ = expose(registry, None)
    return {
        (sample.name, frozenset(sample.labels.items())): sample.value
        for family in text_string_to_metric_families(body.decode())
        for sample in family.samples
    }


def value(registry: CollectorRegistry, name: str, **labels: str) -> float | None:
    return samples(registry).get((name, frozenset(labels.items())))


def trade(trade_id: int, *, lag_ms: int, symbol: str = "BTCUSDT", ts_ingest: int | None = None,
          source: str = "live") -> Trade:
    ts = T0 + trade_id
    return Trade(symbol, trade_id, 100.0, 1.0, 100.0, False, ts,
                 ts + lag_ms if ts_ingest is None else ts_ingest, source)  # type: ignore[arg-type]


# ----------------------------------------------------------------------- isolation


def test_metric_sets_can_be_created_many_times_in_one_process() -> None:
    # Each owns a registry: a second set must neither raise "Duplicated timeseries" nor
    # share values with the first.
    first, second = WorkerMetrics(), WorkerMetrics()
    first.trade(trade(1, lag_ms=10))
    assert value(first.registry, "mur_trades_consumed_total", symbol="BTCUSDT") == 1
    assert value(second.registry, "mur_trades_consumed_total", symbol="BTCUSDT") is None
    api_a, api_b = ApiMetrics(), ApiMetrics()
    api_a.sse_clients.inc()
    assert value(api_a.registry, "mur_sse_clients") == 1
    assert value(api_b.registry, "mur_sse_clients") == 0
    # And the process metrics are in each set, as with the default registry.
    assert value(api_b.registry, "process_open_fds") is not None


def test_worker_set_defines_quality_and_drift_gauges_for_later() -> None:
    metrics = WorkerMetrics()
    metrics.quality_mae.labels("BTCUSDT", "1m").set(12.5)
    metrics.drift_psi.labels("BTCUSDT", "1m", "log_return").set(0.3)
    assert value(metrics.registry, "mur_quality_mae", symbol="BTCUSDT", interval="1m") == 12.5
    assert value(metrics.registry, "mur_drift_psi", symbol="BTCUSDT", interval="1m",
                 feature="log_return") == 0.3
    names = {family.name for family in metrics.registry.collect()}
    assert {"mur_quality_hit_rate", "mur_quality_coverage_80", "mur_drift_error_ratio",
            "mur_drift_active"} <= names


# ------------------------------------------------------------------ worker hot path


def test_trade_counts_per_symbol_and_observes_ingest_lag_by_source() -> None:
    metrics = WorkerMetrics()
    for i, lag_ms in enumerate([3, 20, 20, 700]):
        metrics.trade(trade(i, lag_ms=lag_ms))
    metrics.trade(trade(9, lag_ms=-4, symbol="ETHUSDT"))  # clock skew: counted as 0 s
    metrics.trade(trade(10, lag_ms=0, ts_ingest=0, source="replay"))  # never stamped: no lag
    registry = metrics.registry
    assert value(registry, "mur_trades_consumed_total", symbol="BTCUSDT") == 5
    assert value(registry, "mur_trades_consumed_total", symbol="ETHUSDT") == 1
    lag = "mur_ingest_lag_seconds"
    assert value(registry, f"{lag}_count", source="live") == 5
    assert value(registry, f"{lag}_sum", source="live") == pytest.approx(0.743)
    assert value(registry, f"{lag}_bucket", source="live", le="0.005") == 2  # 3 ms and 0
    assert value(registry, f"{lag}_bucket", source="live", le="0.025") == 4
    assert value(registry, f"{lag}_bucket", source="live", le="0.5") == 4
    assert value(registry, f"{lag}_bucket", source="live", le="1.0") == 5
    assert value(registry, f"{lag}_bucket", source="live", le="+Inf") == 5
    assert value(registry, f"{lag}_count", source="replay") is None


def test_duplicates_are_read_from_their_owner_at_scrape_time() -> None:
    metrics = WorkerMetrics()
    duplicates = [0]
    metrics.count_duplicates(lambda: duplicates[0])
    assert value(metrics.registry, "mur_duplicate_trades_total") == 0
    duplicates[0] = 7
    assert value(metrics.registry, "mur_duplicate_trades_total") == 7


def _candle(interval: str = "1m") -> Candle:
    return Candle("BTCUSDT", interval, T0, T0 + 59_999, 1, 1, 1, 1, 1, 1, 1, 1, 1, "sim",
                  T0 + 59_999, T0 + 60_000)


def _prediction() -> Prediction:
    return Prediction("BTCUSDT", "1m", T0, T0 + 60_000, 1, 1, 1, 1, "v1", T0, "sim", T0, T0)


def test_closed_outputs_and_dead_letters() -> None:
    metrics = WorkerMetrics()
    ingest_ms = 1_800_000_000_000
    metrics.closed([_candle("1m"), _candle("5m")], [_prediction()], [("v1", 0.0002)],
                   [trade(1, lag_ms=0)], ingest_ms, ingest_ms / 1000 + 0.004)
    metrics.closed([_candle("1m")], [], [], [], 0, 0.0)  # unstamped trade: no latency
    registry = metrics.registry
    assert value(registry, "mur_candles_closed_total", symbol="BTCUSDT", interval="1m") == 2
    assert value(registry, "mur_candles_closed_total", symbol="BTCUSDT", interval="5m") == 1
    assert value(registry, "mur_predictions_total", symbol="BTCUSDT", interval="1m") == 1
    assert value(registry, "mur_late_trades_total", symbol="BTCUSDT") == 1
    latency = "mur_candle_close_latency_seconds"
    assert value(registry, f"{latency}_count", interval="1m") == 1
    assert value(registry, f"{latency}_sum", interval="1m") == pytest.approx(0.004, abs=1e-6)
    assert value(registry, f"{latency}_bucket", interval="1m", le="0.0025") == 0
    assert value(registry, f"{latency}_bucket", interval="1m", le="0.005") == 1
    assert value(registry, "mur_inference_latency_seconds_count", model_version="v1") == 1

    for reason in ["undecodable: bad json", "invalid: price must be positive",
                   "late: its candle had already closed", "something new: ?"]:
        metrics.dead_letter(reason)
    for reason in ("undecodable", "invalid", "late", "other"):
        assert value(registry, "mur_dead_letters_total", reason=reason) == 1


def test_model_info_follows_swaps_and_drops_old_label_sets() -> None:
    metrics = WorkerMetrics()
    metrics.model_served(None, "v1")
    metrics.inference_latency.labels("v1").observe(0.001)
    metrics.inference_latency.labels("naive").observe(0.00001)
    metrics.model_served("ETHUSDT", "eth-1")
    assert value(metrics.registry, "mur_model_info", version="v1", scope="shared") == 1
    assert value(metrics.registry, "mur_model_info", version="eth-1", scope="ETHUSDT") == 1

    metrics.model_served(None, "v2")  # hot swap of the shared model
    metrics.model_served("ETHUSDT", None)  # ETHUSDT rolled back to the shared model
    info = {labels for name, labels in samples(metrics.registry) if name == "mur_model_info"}
    assert info == {frozenset({("version", "v2"), ("scope", "shared")})}
    # v1 serves nothing any more: its latency series goes; the baseline's stays.
    versions = {dict(labels)["model_version"] for name, labels in samples(metrics.registry)
                if name == "mur_inference_latency_seconds_count"}
    assert versions == {"naive"}


def test_a_version_still_serving_a_symbol_keeps_its_latency_series() -> None:
    metrics = WorkerMetrics()
    metrics.model_served(None, "v1")
    metrics.model_served("BTCUSDT", "v1")
    metrics.inference_latency.labels("v1").observe(0.001)
    metrics.model_served(None, "v2")
    assert value(metrics.registry, "mur_inference_latency_seconds_count",
                 model_version="v1") == 1


# ------------------------------------------------------------------- label guards


def test_method_and_status_labels_are_bounded() -> None:
    assert [method_label(m) for m in ("GET", "POST", "BREW", "get")] == [
        "GET", "POST", "other", "other"]
    assert [status_class(s) for s in (200, 204, 307, 404, 422, 503, 99, 600)] == [
        "2xx", "2xx", "3xx", "4xx", "4xx", "5xx", "other", "other"]


def test_route_labels_are_capped() -> None:
    metrics = ApiMetrics()
    labels = {metrics.route_label(f"/r{i}") for i in range(ApiMetrics.MAX_ROUTES + 50)}
    assert len(labels) == ApiMetrics.MAX_ROUTES + 1
    assert "other" in labels
    assert metrics.route_label("/r0") == "/r0"  # known ones keep their label
    assert metrics.route_label(None) == "unmatched"


def _app() -> tuple[FastAPI, ApiMetrics]:
    """A small app laid out like ours: routers with prefixes, included under /v1."""
    metrics = ApiMetrics()
    app = FastAPI()
    app.state.metrics = metrics
    app.add_middleware(RequestMetricsMiddleware, metrics=metrics)
    things = APIRouter(prefix="/things")

    @things.get("/{symbol}")
    async def thing(symbol: str, limit: int = 1) -> dict[str, str]:
        if symbol == "NOPE":
            raise HTTPException(404, "unknown")
        return {"symbol": symbol}

    @things.get("/{symbol}/history/{interval}")
    async def history(symbol: str, interval: str) -> list[str]:
        return [symbol, interval]

    @things.get("/{symbol}/boom")
    async def boom(symbol: str) -> None:
        raise RuntimeError("a bug")

    app.include_router(things, prefix="/v1")
    app.include_router(router)
    app.mount("/static", PlainTextResponse("file"), name="static")
    return app, metrics


@pytest.fixture
async def small_api() -> AsyncIterator[tuple[httpx.AsyncClient, ApiMetrics]]:
    app, metrics = _app()
    transport = httpx.ASGITransport(app=app, raise_app_exceptions=False)
    async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
        yield client, metrics


async def test_requests_are_labelled_by_route_template_never_the_raw_path(
    small_api: tuple[httpx.AsyncClient, ApiMetrics],
) -> None:
    client, metrics = small_api
    for symbol in ("BTCUSDT", "ETHUSDT", "DOGEUSDT", "NOPE"):
        await client.get(f"/v1/things/{symbol}")
    await client.get("/v1/things/BTCUSDT", params={"limit": "x"})  # 422
    await client.get("/v1/things/BTCUSDT/history/1m")
    await client.get("/v1/things/ETHUSDT/history/5m")
    await client.post("/v1/things/BTCUSDT")  # 405: the route matched partially
    await client.get("/v1/things/BTCUSDT/boom")  # unhandled: 500
    await client.request("BREW", "/v1/things/BTCUSDT")
    for path in ("/random/1", "/random/2", "/v1/nothing"):
        await client.get(path)
    await client.get("/static/app.js")
    await client.get("/static/css/site.css")

    counts = {
        (labels["method"], labels["route"], labels["status_class"]): sample.value
        for family in text_string_to_metric_families(expose(metrics.registry, None)[0].decode())
        for sample in family.samples
        if sample.name == "mur_http_request_duration_seconds_count"
        for labels in [sample.labels]
    }
    assert counts == {
        ("GET", "/v1/things/{symbol}", "2xx"): 3,
        ("GET", "/v1/things/{symbol}", "4xx"): 2,  # the 404 and the 422
        ("GET", "/v1/things/{symbol}/history/{interval}", "2xx"): 2,
        ("POST", "/v1/things/{symbol}", "4xx"): 1,
        ("GET", "/v1/things/{symbol}/boom", "5xx"): 1,
        ("other", "/v1/things/{symbol}", "4xx"): 1,
        ("GET", "unmatched", "4xx"): 3,
        ("GET", "/static/{path}", "2xx"): 2,
    }


async def test_metrics_endpoint_serves_the_text_format(
    small_api: tuple[httpx.AsyncClient, ApiMetrics],
) -> None:
    client, _ = small_api
    await client.get("/v1/things/BTCUSDT")
    response = await client.get("/metrics")
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/plain; version=")
    names = {family.name for family in text_string_to_metric_families(response.text)}
    assert {"mur_http_request_duration_seconds", "mur_sse_clients",
            "mur_sse_events_sent", "mur_redis_errors"} <= names
    openmetrics = await client.get(
        "/metrics", headers={"Accept": "application/openmetrics-text; version=1.0.0"})
    assert openmetrics.headers["content-type"].startswith("application/openmetrics-text")
    assert openmetrics.text.endswith("# EOF\n")


def test_route_template_without_a_route_is_none() -> None:
    assert route_template({"type": "http", "path": "/x"}) is None
    mount = Mount("/static", PlainTextResponse("x"))
    assert route_template({"type": "http", "path": "/static/a/b", "route": mount}) == (
        "/static/{path}")
