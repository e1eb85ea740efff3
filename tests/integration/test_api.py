"""The HTTP API served by a real uvicorn (in a thread) over real sockets, against a real
redis-server. SSE tests use real HTTP connections (httpx + httpx-sse)."""

import asyncio
import contextlib
import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import AsyncIterator, Callable, Mapping
from typing import Any

import httpx
import msgspec
import pytest
import redis.asyncio as aioredis
from httpx_sse import ServerSentEvent, aconnect_sse

from kit.api import EventReader, RunningApi, serve_in_thread, settings_factory, wait_for
from kit.broker import Broker
from makeusrich.api import create_app
from makeusrich.api.broadcast import Broadcaster, EventFilter
from makeusrich.api.routes.stream import EVENT_TYPES
from makeusrich.core.embedded import EmbeddedService, free_port
from makeusrich.core.errors import ConfigError
from makeusrich.core.schemas import Alert, Candle, Prediction
from makeusrich.core.settings import Settings
from makeusrich.core.store import RedisStore, parse_stream_id

pytestmark = pytest.mark.integration

MINUTE_MS = 60_000
T0_MS = 1_700_000_040_000
CANDLE_FIELDS = {
    "open_time", "close_time", "open", "high", "low", "close", "volume", "quote_volume",
    "trades", "taker_buy_volume", "taker_buy_quote_volume", "large_trade_quote_volume",
    "symbol", "interval", "source",
}
PREDICTION_FIELDS = {
    "symbol", "interval", "candle_open_time", "target_open_time", "last_close",
    "predicted_close", "lower", "upper", "model_version", "made_at", "source", "horizon",
}


def make_candle(i: int = 0, symbol: str = "BTCUSDT", interval: str = "1m") -> Candle:
    open_time = T0_MS + i * MINUTE_MS
    return Candle(
        symbol=symbol, interval=interval, open_time=open_time,
        close_time=open_time + MINUTE_MS - 1, open=100.0 + i, high=102.5 + i, low=99.0 + i,
        close=101.25 + i, volume=3.5, quote_volume=350.0, trades=7, taker_buy_volume=1.5,
        taker_buy_quote_volume=150.0, source="sim", ts_event=open_time + MINUTE_MS - 1,
        ts_ingest=open_time + MINUTE_MS + 5,
        large_trade_quote_volume=None if i % 2 else 120.0,  # unknown for klines' candles
    )


def make_prediction(
    i: int = 0, symbol: str = "BTCUSDT", interval: str = "1m", horizon: int = 1
) -> Prediction:
    open_time = T0_MS + i * MINUTE_MS
    return Prediction(
        symbol=symbol, interval=interval, candle_open_time=open_time,
        target_open_time=open_time + horizon * MINUTE_MS, last_close=101.25 + i,
        predicted_close=101.5 + i + horizon, lower=100.0 + i, upper=103.0 + i + horizon,
        model_version="v-test", made_at=open_time + MINUTE_MS + 6, source="sim",
        ts_event=open_time + MINUTE_MS - 1, ts_ingest=open_time + MINUTE_MS + 6,
        horizon=horizon,
    )


@pytest.fixture
def make_settings(redis_server: EmbeddedService) -> Callable[..., Settings]:
    return settings_factory(redis_server.url, symbols=("BTCUSDT", "ETHUSDT"),
                            intervals=("1m",), sse_heartbeat_s=15.0)


@pytest.fixture
def api(start_api: Callable[..., RunningApi]) -> RunningApi:
    return start_api()


@pytest.fixture
async def client(api: RunningApi) -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(base_url=api.base_url, timeout=10) as client:
        yield client


@contextlib.asynccontextmanager
async def sse(
    client: httpx.AsyncClient,
    api: RunningApi,
    *,
    params: Mapping[str, str | list[str]] | None = None,
    headers: dict[str, str] | None = None,
    subscribers: int = 1,
) -> AsyncIterator[EventReader]:
    """Open /v1/stream; returns once the server-side client is subscribed."""
    async with aconnect_sse(
        client, "GET", "/v1/stream", params=params, headers=dict(headers or {})
    ) as source:
        assert source.response.status_code == 200, await source.response.aread()
        reader = EventReader(source)
        try:
            await wait_for(lambda: api.broadcaster.subscriber_count >= subscribers)
            yield reader
        finally:
            await reader.close()


# --------------------------------------------------------------------------- health


async def test_healthz(client: httpx.AsyncClient) -> None:
    response = await client.get("/healthz")
    assert response.status_code == 200
    assert response.json() == {"status": "ok"}


async def test_readyz_needs_a_model_record(
    api: RunningApi, client: httpx.AsyncClient, store: RedisStore
) -> None:
    response = await client.get("/readyz")
    assert response.status_code == 503
    body = response.json()
    assert body["status"] == "unavailable"
    assert body["failed"] == ["model"]
    assert body["checks"]["redis"]["ok"] is True
    assert "no model record" in body["checks"]["model"]["detail"]

    await store.client.hset(store.keys.model, mapping={"version": "v7", "loaded_at": "1"})
    response = await client.get("/readyz")
    assert response.status_code == 200
    body = response.json()
    assert (body["status"], body["failed"], body["model_version"]) == ("ok", [], "v7")


async def test_readyz_reports_unreachable_kafka(
    start_api: Callable[..., RunningApi], store: RedisStore
) -> None:
    await store.client.hset(store.keys.model, "version", "v1")
    api = start_api(kafka_bootstrap=f"127.0.0.1:{free_port()}")
    async with httpx.AsyncClient(base_url=api.base_url) as client:
        response = await client.get("/readyz")
    assert response.status_code == 503
    body = response.json()
    assert body["failed"] == ["kafka"]
    assert "kafka unreachable" in body["checks"]["kafka"]["detail"]


async def test_readyz_with_real_kafka(
    start_api: Callable[..., RunningApi], store: RedisStore, kafka: Broker
) -> None:
    await store.client.hset(store.keys.model, "version", "v1")
    api = start_api(kafka_bootstrap=kafka.url)
    async with httpx.AsyncClient(base_url=api.base_url, timeout=10) as client:
        response = await client.get("/readyz")
    assert response.status_code == 200, response.text
    assert response.json()["checks"]["kafka"]["ok"] is True


async def test_readyz_when_redis_is_down(make_settings: Callable[..., Settings]) -> None:
    settings = make_settings(redis_url=f"redis://127.0.0.1:{free_port()}/0")
    with serve_in_thread(settings) as api:
        async with httpx.AsyncClient(base_url=api.base_url) as client:
            assert (await client.get("/healthz")).status_code == 200
            response = await client.get("/readyz")
            assert response.status_code == 503
            assert response.json()["failed"] == ["redis", "model"]
            # Data endpoints answer 503 too, instead of a bare 500.
            response = await client.get("/v1/candles/BTCUSDT")
            assert response.status_code == 503
            assert "storage unavailable" in response.json()["detail"]
            response = await client.get("/v1/stream")
            assert response.status_code == 503
            assert "live events unavailable" in response.json()["detail"]


def test_create_app_needs_redis_url() -> None:
    with pytest.raises(ConfigError, match="redis_url"):
        create_app(Settings(_env_file=None, redis_url=None))


async def test_openapi_docs(client: httpx.AsyncClient) -> None:
    assert (await client.get("/docs")).status_code == 200
    spec = (await client.get("/openapi.json")).json()
    assert {
        "/v1/candles/{symbol}", "/v1/predictions/latest", "/v1/predictions/{symbol}/latest",
        "/v1/predictions/{symbol}/history", "/v1/stream", "/healthz", "/readyz",
    } <= set(spec["paths"])
    candle_schema = spec["components"]["schemas"]["CandleOut"]
    assert set(candle_schema["properties"]) == CANDLE_FIELDS


# -------------------------------------------------------------------------- candles


async def test_candles_oldest_first_with_ranges(
    client: httpx.AsyncClient, store: RedisStore
) -> None:
    candles = [make_candle(i) for i in range(10)]
    await store.write_many(candles)

    response = await client.get("/v1/candles/BTCUSDT", params={"interval": "1m"})
    assert response.status_code == 200
    body = response.json()
    assert [row["open_time"] for row in body] == [c.open_time for c in candles]
    assert set(body[0]) == CANDLE_FIELDS
    expected = {name: getattr(candles[0], name) for name in CANDLE_FIELDS}
    assert body[0] == expected
    assert [row["large_trade_quote_volume"] for row in body[:2]] == [120.0, None]
    assert isinstance(body[0]["close"], float) and isinstance(body[0]["trades"], int)

    # Case-insensitive symbol, default interval, newest `limit` oldest first.
    body = (await client.get("/v1/candles/btcusdt", params={"limit": 3})).json()
    assert [row["open_time"] for row in body] == [c.open_time for c in candles[7:]]

    params = {"start": candles[2].open_time, "end": candles[5].open_time}
    body = (await client.get("/v1/candles/BTCUSDT", params=params)).json()
    assert [row["open_time"] for row in body] == [c.open_time for c in candles[2:6]]

    params = {"start": candles[2].open_time, "limit": 2}
    body = (await client.get("/v1/candles/BTCUSDT", params=params)).json()
    assert [row["open_time"] for row in body] == [c.open_time for c in candles[2:4]]

    assert (await client.get("/v1/candles/ETHUSDT")).json() == []


async def test_candles_max_limit(client: httpx.AsyncClient, store: RedisStore) -> None:
    await store.write_many([make_candle(i) for i in range(5_050)])
    body = (await client.get("/v1/candles/BTCUSDT", params={"limit": 5000})).json()
    assert len(body) == 5000
    assert body[-1]["open_time"] == make_candle(5_049).open_time
    assert len((await client.get("/v1/candles/BTCUSDT")).json()) == 500


async def test_symbol_known_only_from_redis(client: httpx.AsyncClient, store: RedisStore) -> None:
    await store.write_candle(make_candle(symbol="SOLUSDT"))
    response = await client.get("/v1/candles/solusdt")
    assert response.status_code == 200
    assert [row["symbol"] for row in response.json()] == ["SOLUSDT"]
    response = await client.get("/v1/candles/XXX")
    assert response.json() == {"detail": "unknown symbol 'XXX'; known: BTCUSDT, ETHUSDT, SOLUSDT"}


@pytest.mark.parametrize(
    ("path", "params", "status", "detail"),
    [
        ("/v1/candles/XXX", {}, 404, "unknown symbol 'XXX'; known: BTCUSDT, ETHUSDT"),
        ("/v1/candles/xxx", {}, 404, "unknown symbol 'XXX'; known: BTCUSDT, ETHUSDT"),
        (
            "/v1/candles/BTCUSDT", {"interval": "2m"}, 422,
            "unsupported interval '2m'; use one of 1s, 1m, 3m, 5m, 15m, 30m, 1h, 2h, 4h, 1d",
        ),
        (
            "/v1/candles/BTCUSDT", {"interval": "5m"}, 404,
            "interval '5m' is not built by this service; it builds: 1m",
        ),
        ("/v1/candles/BTCUSDT", {"start": 10, "end": 5}, 400, "start (10) is after end (5)"),
        (
            "/v1/predictions/BTCUSDT/history", {"start": 10, "end": 5}, 400,
            "start (10) is after end (5)",
        ),
        ("/v1/predictions/DOGE/latest", {}, 404, "unknown symbol 'DOGE'; known: BTCUSDT, ETHUSDT"),
        (
            "/v1/predictions/latest", {"symbols": "BTCUSDT,nope"}, 404,
            "unknown symbol 'NOPE'; known: BTCUSDT, ETHUSDT",
        ),
        ("/v1/predictions/BTCUSDT/latest", {}, 404, "no prediction yet for BTCUSDT 1m"),
        (
            "/v1/predictions/BTCUSDT/latest", {"horizon": 5}, 404,
            "no prediction yet for BTCUSDT 1m horizon 5",
        ),
        (
            "/v1/stream", {"horizons": "1,0"}, 422,
            "invalid horizon '0'; use whole numbers of candles from 1 to 1440, "
            "comma-separated or repeated, or 'all'",
        ),
        (
            "/v1/stream", {"horizons": ["5", "soon"]}, 422,
            "invalid horizon 'soon'; use whole numbers of candles from 1 to 1440, "
            "comma-separated or repeated, or 'all'",
        ),
        ("/v1/stream", {"symbols": "nope"}, 404, "unknown symbol 'NOPE'; known: BTCUSDT, ETHUSDT"),
        (
            "/v1/stream", {"events": "candle,trade"}, 422,
            "unknown event type 'trade'; use one of candle, prediction, alert, drift",
        ),
        (
            "/v1/stream", {"interval": "7m"}, 422,
            "unsupported interval '7m'; use one of 1s, 1m, 3m, 5m, 15m, 30m, 1h, 2h, 4h, 1d",
        ),
        (
            "/v1/stream", {"last_event_id": "yesterday"}, 400,
            "invalid Last-Event-ID: invalid stream id 'yesterday'; expected '<ms>-<seq>'",
        ),
    ],
)
async def test_error_messages(
    client: httpx.AsyncClient, path: str, params: dict[str, Any], status: int, detail: str
) -> None:
    response = await client.get(path, params=params)
    assert response.status_code == status, response.text
    assert response.json() == {"detail": detail}


@pytest.mark.parametrize("limit", [0, -1, 5001, "many"])
async def test_limit_out_of_range(client: httpx.AsyncClient, limit: object) -> None:
    for path in ("/v1/candles/BTCUSDT", "/v1/predictions/BTCUSDT/history"):
        response = await client.get(path, params={"limit": limit})
        assert response.status_code == 422
        (error,) = response.json()["detail"]
        assert error["loc"] == ["query", "limit"]
        if limit == 5001:
            assert error["msg"] == "Input should be less than or equal to 5000"
        elif limit == "many":
            assert error["msg"].startswith("Input should be a valid integer")
        else:
            assert error["msg"] == "Input should be greater than or equal to 1"


async def test_max_limit_comes_from_settings(start_api: Callable[..., RunningApi]) -> None:
    api = start_api(max_limit=100)
    async with httpx.AsyncClient(base_url=api.base_url) as client:
        response = await client.get("/v1/candles/BTCUSDT", params={"limit": 101})
        assert response.status_code == 422
        assert response.json()["detail"][0]["msg"] == "Input should be less than or equal to 100"
        # The default (500) is clamped rather than refused.
        assert (await client.get("/v1/candles/BTCUSDT")).status_code == 200


# ---------------------------------------------------------------------- predictions


async def test_prediction_endpoints(client: httpx.AsyncClient, store: RedisStore) -> None:
    btc = [make_prediction(i) for i in range(4)]
    eth = make_prediction(0, symbol="ETHUSDT")
    await store.write_many([*btc, eth])

    body = (await client.get("/v1/predictions/BTCUSDT/latest")).json()
    assert set(body) == PREDICTION_FIELDS
    assert body == {name: getattr(btc[-1], name) for name in PREDICTION_FIELDS}

    body = (await client.get("/v1/predictions/latest")).json()
    assert [(row["symbol"], row["candle_open_time"]) for row in body] == [
        ("BTCUSDT", btc[-1].candle_open_time), ("ETHUSDT", eth.candle_open_time),
    ]
    body = (await client.get("/v1/predictions/latest", params={"symbols": "ethusdt"})).json()
    assert [row["symbol"] for row in body] == ["ETHUSDT"]

    body = (await client.get("/v1/predictions/BTCUSDT/history", params={"limit": 2})).json()
    assert [row["candle_open_time"] for row in body] == [p.candle_open_time for p in btc[2:]]
    params = {"start": btc[1].candle_open_time, "end": btc[2].candle_open_time}
    body = (await client.get("/v1/predictions/btcusdt/history", params=params)).json()
    assert [row["candle_open_time"] for row in body] == [p.candle_open_time for p in btc[1:3]]
    assert all(set(row) == PREDICTION_FIELDS for row in body)


async def test_prediction_endpoints_per_horizon(
    client: httpx.AsyncClient, store: RedisStore
) -> None:
    # Horizons 1 and 5 made at the same candles, as the worker writes them.
    h1 = [make_prediction(i) for i in range(3)]
    h5 = [make_prediction(i, horizon=5) for i in range(3)]
    await store.write_many([p for pair in zip(h1, h5, strict=True) for p in pair])

    # Clients that name no horizon get horizon 1, as before.
    body = (await client.get("/v1/predictions/BTCUSDT/latest")).json()
    assert body == {name: getattr(h1[-1], name) for name in PREDICTION_FIELDS}
    assert body["horizon"] == 1
    body = (await client.get("/v1/predictions/BTCUSDT/history")).json()
    assert body == [{name: getattr(p, name) for name in PREDICTION_FIELDS} for p in h1]
    body = (await client.get("/v1/predictions/latest")).json()
    assert [(row["symbol"], row["horizon"]) for row in body] == [("BTCUSDT", 1)]

    five = {"horizon": 5}
    body = (await client.get("/v1/predictions/BTCUSDT/latest", params=five)).json()
    assert body == {name: getattr(h5[-1], name) for name in PREDICTION_FIELDS}
    assert body["horizon"] == 5
    assert body["target_open_time"] == body["candle_open_time"] + 5 * MINUTE_MS
    body = (await client.get("/v1/predictions/BTCUSDT/history",
                             params={**five, "start": h5[1].candle_open_time})).json()
    assert body == [{name: getattr(p, name) for name in PREDICTION_FIELDS} for p in h5[1:]]
    body = (await client.get("/v1/predictions/latest", params=five)).json()
    assert [(row["symbol"], row["horizon"], row["candle_open_time"]) for row in body] == [
        ("BTCUSDT", 5, h5[-1].candle_open_time)]
    # A horizon nothing was written for: none, not another horizon's.
    assert (await client.get("/v1/predictions/latest", params={"horizon": 15})).json() == []
    assert (await client.get("/v1/predictions/BTCUSDT/history",
                             params={"horizon": 15})).json() == []


@pytest.mark.parametrize(
    ("horizon", "message"),
    [
        (0, "Input should be greater than or equal to 1"),
        (-5, "Input should be greater than or equal to 1"),
        (1441, "Input should be less than or equal to 1440"),
        ("soon", "Input should be a valid integer, unable to parse string as an integer"),
    ],
)
async def test_horizon_out_of_range(
    client: httpx.AsyncClient, horizon: object, message: str
) -> None:
    for path in ("/v1/predictions/latest", "/v1/predictions/BTCUSDT/latest",
                 "/v1/predictions/BTCUSDT/history"):
        response = await client.get(path, params={"horizon": horizon})
        assert response.status_code == 422, response.text
        (error,) = response.json()["detail"]
        assert (error["loc"], error["msg"]) == (["query", "horizon"], message)


async def _latest_open_times(client: httpx.AsyncClient) -> list[tuple[str, int]]:
    body = (await client.get("/v1/predictions/latest")).json()
    return [(row["symbol"], row["candle_open_time"]) for row in body]


async def test_latest_predictions_are_current_once_their_event_is_sent(
    api: RunningApi, client: httpx.AsyncClient, store: RedisStore
) -> None:
    await store.write_many([make_prediction(0)])
    assert await _latest_open_times(client) == [("BTCUSDT", make_prediction(0).candle_open_time)]
    async with sse(client, api, params={"events": "prediction"}) as events:
        for i in range(1, 4):
            newer = [make_prediction(i), make_prediction(i, symbol="SOLUSDT")]
            await store.write_many(newer)
            await events.next(2)
            # A client that saw the event and then polls gets at least that prediction.
            assert await _latest_open_times(client) == [
                ("BTCUSDT", newer[0].candle_open_time), ("SOLUSDT", newer[1].candle_open_time)]


async def test_latest_predictions_after_the_subscription_was_lost(
    api: RunningApi, client: httpx.AsyncClient, store: RedisStore, redis_server: EmbeddedService
) -> None:
    await store.write_many([make_prediction(0)])
    assert await _latest_open_times(client) == [("BTCUSDT", make_prediction(0).candle_open_time)]
    admin = aioredis.Redis.from_url(redis_server.url)
    try:
        async with sse(client, api, params={"events": "prediction"}) as events:
            await admin.client_kill_filter(_type="pubsub")
            # Written while the API cannot hear it: caught up when it resubscribes.
            for i in (1, 2):
                await store.write_many([make_prediction(i)])
                await events.next(1)
                assert await _latest_open_times(client) == [
                    ("BTCUSDT", make_prediction(i).candle_open_time)]
    finally:
        await admin.aclose()


# --------------------------------------------------------------------------- stream


def _decode(event: ServerSentEvent) -> Candle | Prediction:
    kind = Candle if event.event == "candle" else Prediction
    return msgspec.json.decode(event.data, type=kind)


async def test_stream_sends_live_events(
    api: RunningApi, client: httpx.AsyncClient, store: RedisStore
) -> None:
    async with sse(client, api) as events:
        candle_id = await store.write_candle(make_candle(0))
        prediction_id = await store.write_prediction(make_prediction(0))
        assert await store.write_candle(make_candle(0)) is None  # duplicate: no event
        received = await events.next(2)
        assert [(e.id, e.event) for e in received] == [
            (candle_id, "candle"), (prediction_id, "prediction"),
        ]
        assert _decode(received[0]) == make_candle(0)
        assert _decode(received[1]) == make_prediction(0)
        await events.assert_quiet()


async def test_stream_resumes_with_exactly_the_missed_events(
    api: RunningApi, client: httpx.AsyncClient, store: RedisStore
) -> None:
    async with sse(client, api) as events:
        first_ids = [await store.write_candle(make_candle(i)) for i in range(6)]
        received = await events.next(3)
    assert [e.id for e in received] == first_ids[:3]
    await wait_for(lambda: api.broadcaster.subscriber_count == 0)

    later_ids = [await store.write_candle(make_candle(i)) for i in range(6, 10)]
    headers = {"Last-Event-ID": received[-1].id}
    async with sse(client, api, headers=headers) as events:
        resumed = await events.next(7)
        assert [e.id for e in resumed] == first_ids[3:] + later_ids
        assert [_decode(e) for e in resumed] == [make_candle(i) for i in range(3, 10)]
        await events.assert_quiet()
        # Live events keep flowing after the backlog, once each.
        live_id = await store.write_candle(make_candle(10))
        assert [e.id for e in await events.next(1)] == [live_id]
        await events.assert_quiet()


async def test_stream_resume_by_query_parameter(
    api: RunningApi, client: httpx.AsyncClient, store: RedisStore
) -> None:
    ids = [await store.write_prediction(make_prediction(i)) for i in range(3)]
    params = {"last_event_id": str(ids[0])}
    async with sse(client, api, params=params) as events:
        assert [e.id for e in await events.next(2)] == ids[1:]
        await events.assert_quiet()
    # The header wins over the query parameter (a reconnecting browser sends the newer id).
    headers = {"Last-Event-ID": str(ids[1])}
    async with sse(client, api, params=params, headers=headers) as events:
        assert [e.id for e in await events.next(1)] == ids[2:]
        await events.assert_quiet()


async def test_resume_under_concurrent_writes_has_no_gap_or_duplicate(
    api: RunningApi, client: httpx.AsyncClient, store: RedisStore
) -> None:
    start_id = await store.write_candle(make_candle(0))
    assert start_id is not None
    stop = asyncio.Event()
    written: list[str] = []

    async def writer() -> None:
        i = 1
        while not stop.is_set() or i < 400:
            event_id = await store.write_candle(make_candle(i))
            assert event_id is not None
            written.append(event_id)
            i += 1
            if i % 20 == 0:
                await asyncio.sleep(0)

    task = asyncio.create_task(writer())
    await wait_for(lambda: len(written) >= 100)
    try:
        headers = {"Last-Event-ID": start_id}
        async with sse(client, api, headers=headers) as events:
            received = [e.id for e in await events.next(300, timeout_s=20)]
            stop.set()
            await task
            total = len(written)
            received += [e.id for e in await events.next(total - 300, timeout_s=20)]
            await events.assert_quiet()
    finally:
        stop.set()
        await task
    assert received == written


async def test_stream_filters(
    api: RunningApi, client: httpx.AsyncClient, store: RedisStore
) -> None:
    start_id = await store.write_candle(make_candle(0, symbol="ETHUSDT"))
    assert start_id is not None
    backlog = [
        await store.write_candle(make_candle(1, symbol="ETHUSDT")),
        await store.write_prediction(make_prediction(1, symbol="ETHUSDT")),
        await store.write_prediction(make_prediction(1, symbol="BTCUSDT")),
    ]
    params = {"symbols": "ethusdt", "events": "prediction", "interval": "1m"}
    headers = {"Last-Event-ID": start_id}
    async with sse(client, api, params=params, headers=headers) as events:
        live = [
            await store.write_prediction(make_prediction(2, symbol="BTCUSDT")),
            await store.write_candle(make_candle(2, symbol="ETHUSDT")),
            await store.write_prediction(make_prediction(2, symbol="ETHUSDT")),
        ]
        received = await events.next(2)
        assert [e.id for e in received] == [backlog[1], live[2]]
        assert all(e.event == "prediction" for e in received)
        assert all(_decode(e).symbol == "ETHUSDT" for e in received)
        await events.assert_quiet()


async def test_stream_sends_horizon_1_predictions_unless_asked_for_others(
    api: RunningApi, client: httpx.AsyncClient, store: RedisStore
) -> None:
    async with (
        sse(client, api) as default,
        sse(client, api, params={"horizons": "1,5"}, subscribers=2) as some,
        sse(client, api, params={"horizons": ["5", "15"]}, subscribers=3) as repeated,
        sse(client, api, params={"horizons": "all", "events": "prediction"},
            subscribers=4) as every,
    ):
        candle_id = await store.write_candle(make_candle(0))
        ids = await store.write_many([make_prediction(0, horizon=h) for h in (1, 5, 15)])
        h1_id, h5_id, h15_id = ids
        received = await default.next(2)
        assert [(e.id, e.event) for e in received] == [
            (candle_id, "candle"), (h1_id, "prediction")]
        assert _decode(received[1]) == make_prediction(0)
        assert msgspec.json.decode(received[1].data)["horizon"] == 1
        await default.assert_quiet()

        received = await some.next(3)
        assert [e.id for e in received] == [candle_id, h1_id, h5_id]
        assert _decode(received[2]) == make_prediction(0, horizon=5)
        await some.assert_quiet()
        # Candles are not filtered by horizon.
        assert [e.id for e in await repeated.next(3)] == [candle_id, h5_id, h15_id]
        await repeated.assert_quiet()
        assert [e.id for e in await every.next(3)] == ids
        await every.assert_quiet()


async def test_stream_resumes_with_the_horizons_asked_for(
    api: RunningApi, client: httpx.AsyncClient, store: RedisStore
) -> None:
    start_id = await store.write_candle(make_candle(0))
    assert start_id is not None
    missed = await store.write_many(
        [make_prediction(i, horizon=h) for i in (1, 2) for h in (1, 5, 15)])
    headers = {"Last-Event-ID": start_id}
    params = {"horizons": "1,5", "events": "prediction"}
    async with sse(client, api, params=params, headers=headers) as events:
        live = await store.write_many([make_prediction(3, horizon=h) for h in (1, 5, 15)])
        received = await events.next(6)
        assert [e.id for e in received] == [missed[0], missed[1], missed[3], missed[4],
                                            live[0], live[1]]
        assert [msgspec.json.decode(e.data)["horizon"] for e in received] == [1, 5] * 3
        await events.assert_quiet()
    # The default resumes with horizon 1 only, exactly as before.
    async with sse(client, api, headers=headers) as events:
        received = await events.next(3)
        assert [e.id for e in received] == [missed[0], missed[3], live[0]]
        await events.assert_quiet()


async def test_alerts_pass_symbol_filters(
    api: RunningApi, client: httpx.AsyncClient, store: RedisStore
) -> None:
    params = {"symbols": "ETHUSDT", "interval": "1m"}
    async with sse(client, api, params=params) as events:
        alert_id = await store.write_alert(
            Alert("model_rejected", "sha256 mismatch", "lstm-x", 1, 2)
        )
        (received,) = await events.next(1)
        assert received.id == alert_id and received.event == "alert"
        assert msgspec.json.decode(received.data)["kind"] == "model_rejected"


async def test_disconnected_client_is_unsubscribed(
    api: RunningApi, client: httpx.AsyncClient, store: RedisStore
) -> None:
    async with sse(client, api) as events:
        async with sse(client, api, subscribers=2) as events2:
            await store.write_candle(make_candle(0))
            assert len(await events2.next(1)) == 1
        # The second client's connection is closed: only its queue goes away.
        await wait_for(lambda: api.broadcaster.subscriber_count == 1)
        assert len(await events.next(1)) == 1
    await wait_for(lambda: api.broadcaster.subscriber_count == 0)


async def test_idle_stream_gets_heartbeats(
    start_api: Callable[..., RunningApi],
) -> None:
    api = start_api(sse_heartbeat_s=0.1)
    async with (
        httpx.AsyncClient(base_url=api.base_url) as client,
        client.stream("GET", "/v1/stream") as response,
    ):
        assert response.headers["content-type"].startswith("text/event-stream")
        lines = response.aiter_lines()
        async with asyncio.timeout(5):
            comments = [line async for line in _take(lines, 2) if line.startswith(":")]
    assert len(comments) >= 1


async def _take(lines: AsyncIterator[str], n_non_empty: int) -> AsyncIterator[str]:
    seen = 0
    async for line in lines:
        yield line
        if line:
            seen += 1
            if seen == n_non_empty:
                return


async def test_slow_client_is_dropped_without_slowing_others(
    make_settings: Callable[..., Settings], store: RedisStore
) -> None:
    settings = make_settings(sse_client_queue_max=5)
    live_store = RedisStore.from_settings(settings)
    broadcaster = Broadcaster(live_store, queue_max=settings.sse_client_queue_max,
                              heartbeat_s=settings.sse_heartbeat_s)
    await broadcaster.start()
    try:
        assert broadcaster.ready
        everything = EventFilter(symbols=None, types=frozenset(EVENT_TYPES), interval=None)
        slow = broadcaster.subscribe(everything)
        fast = broadcaster.subscribe(everything)
        received = []

        async def consume() -> None:
            while (bursts := await fast.next()) is not None:
                received.extend(event.id for burst in bursts for event in burst.events)

        consumer = asyncio.create_task(consume())
        ids = []
        for i in range(20):
            ids.append(await store.write_candle(make_candle(i)))
            await asyncio.sleep(0.005)  # let the consumer keep up
        await wait_for(lambda: len(received) == 20)
        assert received == ids
        assert slow.overflowed and not fast.overflowed
        assert broadcaster.subscriber_count == 1
        assert await slow.next() is None  # its stream ends; the client resumes later
        broadcaster.unsubscribe(fast)
        await consumer
        assert broadcaster.subscriber_count == 0
    finally:
        await broadcaster.stop()
        await live_store.aclose()


async def test_broadcaster_reconnects_without_losing_events(
    api: RunningApi, client: httpx.AsyncClient, store: RedisStore, redis_server: EmbeddedService
) -> None:
    admin = aioredis.Redis.from_url(redis_server.url)
    try:
        async with sse(client, api) as events:
            before = await store.write_candle(make_candle(0))
            assert [e.id for e in await events.next(1)] == [before]
            reconnects = api.broadcaster.reconnects
            # Drop the API's pub/sub connection and write while it is gone.
            await admin.client_kill_filter(_type="pubsub")
            during = [await store.write_candle(make_candle(i)) for i in range(1, 6)]
            received = await events.next(5)
            assert [e.id for e in received] == during
            await wait_for(lambda: api.broadcaster.reconnects > reconnects)
            after = await store.write_candle(make_candle(6))
            assert [e.id for e in await events.next(1)] == [after]
            await events.assert_quiet()
    finally:
        await admin.aclose()


async def test_stream_ids_are_ordered(
    api: RunningApi, client: httpx.AsyncClient, store: RedisStore
) -> None:
    async with sse(client, api) as events:
        for i in range(5):
            await store.write_candle(make_candle(i))
            await store.write_prediction(make_prediction(i))
        received = await events.next(10)
    keys = [parse_stream_id(e.id) for e in received]
    assert keys == sorted(keys) and len(set(keys)) == 10


def test_serve_stops_promptly_with_open_streams(redis_server: EmbeddedService) -> None:
    """`serve` (the CLI path): Ctrl-C ends open SSE streams and exits within seconds."""
    port = free_port()
    env = {key: value for key, value in os.environ.items() if not key.startswith("MUR_")}
    env.update(
        MUR_REDIS_URL=redis_server.url, MUR_API_PORT=str(port), MUR_LOG_LEVEL="WARNING",
        MUR_REDIS_PREFIX=f"t-{uuid.uuid4().hex[:10]}",
        MUR_ENVIRONMENT="dev",  # anonymous clients allowed (the default is prod)
    )
    code = (
        "from makeusrich.api import serve; from makeusrich.core.settings import Settings; "
        "serve(Settings(_env_file=None))"
    )
    proc = subprocess.Popen(
        [sys.executable, "-c", code], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT
    )
    base_url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 20
        while True:
            try:
                if httpx.get(f"{base_url}/healthz").status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert proc.poll() is None and time.monotonic() < deadline, "serve did not start"
            time.sleep(0.05)
        with (
            httpx.Client(base_url=base_url, timeout=10) as client,
            client.stream("GET", "/v1/stream") as response,
        ):
            assert response.status_code == 200
            started_s = time.monotonic()
            proc.send_signal(signal.SIGINT)
            proc.wait(timeout=10)
            assert time.monotonic() - started_s < 4
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        assert proc.stdout is not None
        output = proc.stdout.read().decode()
        proc.stdout.close()
    # uvicorn re-raises the captured SIGINT after its clean shutdown.
    assert proc.returncode in (0, -signal.SIGINT), output
    assert "ERROR" not in output, output
