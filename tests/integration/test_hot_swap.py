"""Hot swap of models in a running worker, against the real broker and redis-server."""

import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path

import msgspec
import pytest
import redis

from kit.broker import Broker, on_both_brokers, topic_safe
from kit.klines import assert_same_as_binance, binance_klines
from kit.registry import add_version, corrupt_model
from kit.worker import history, wait_until, worker_processes, worker_stats
from makeusrich.cli import BUNDLED_SAMPLE
from makeusrich.core.embedded import EmbeddedService
from makeusrich.core.schemas import EndOfStream, Trade
from makeusrich.core.settings import Settings
from makeusrich.inference import Registry, read_manifest
from makeusrich.stream.control import announce_model
from makeusrich.stream.publisher import TradePublisher, ensure_topics
from makeusrich.stream.sources import read_trades

pytestmark = [pytest.mark.integration, pytest.mark.slow, on_both_brokers]

A, B, C = "lstm-hot-a", "lstm-hot-b", "lstm-hot-c"


@pytest.fixture
def registry(tmp_path: Path) -> Path:
    root = tmp_path / "registry"
    root.mkdir()
    for name in (A, B, C):
        add_version(root, name)
    corrupt_model(root / C)  # after its manifest was written: C no longer matches it
    Registry(root).promote(A, "test: the model the worker starts with")
    return root


@pytest.fixture
def settings(kafka: Broker, redis_server: EmbeddedService, tmp_path: Path,
             registry: Path, request: pytest.FixtureRequest) -> Settings:
    name = topic_safe(request.node.name)
    settings = Settings(
        kafka_bootstrap=kafka.url, redis_url=redis_server.url, topic_prefix=f"{name}-",
        redis_prefix=name, worker_id=name, state_dir=tmp_path / "state",
        symbols=("BTCUSDT",), intervals=("1m",), model_dir=registry, log_level="INFO",
    )
    ensure_topics(settings)
    return settings


@pytest.fixture
def worker(settings: Settings) -> Iterator[subprocess.Popen[bytes]]:
    with worker_processes() as start:
        yield start(settings)


def _serving(client: redis.Redis, settings: Settings) -> str:
    return (client.hget(settings.redis_keys.model, "version") or b"").decode()


def _alerts(client: redis.Redis, settings: Settings) -> list[dict]:
    return [msgspec.json.decode(fields[b"d"])
            for _, fields in client.xrange(settings.redis_keys.events)
            if fields[b"type"] == b"alert"]


def _sample() -> tuple[list[Trade], int, list[list[Trade]]]:
    """The bundled hour of trades, its start and three parts of it."""
    trades = list(read_trades(BUNDLED_SAMPLE))  # 00:00-00:59
    hour = trades[0].ts_event - trades[0].ts_event % 3_600_000
    parts = [[t for t in trades if lo <= t.ts_event - hour < hi]
             for lo, hi in ((0, 45 * 60_000), (45 * 60_000, 52 * 60_000),
                            (52 * 60_000, 3_600_000))]
    return trades, hour, parts


def _feeder(settings: Settings, publisher: TradePublisher, client: redis.Redis,
            hour: int) -> Callable[[list[Trade]], int]:
    def feed(part: list[Trade]) -> int:
        """Publish, wait for every candle the part closes to be predicted; their count."""
        for trade in part:
            publisher.send(trade)
        publisher.flush()
        # A candle closes once event time passes its end by grace_ms.
        closed = (part[-1].ts_event - settings.grace_ms - hour) // 60_000
        wait_until(lambda: len(history(client, settings, "prediction")) >= closed,
              f"{closed} predictions")
        return closed
    return feed


def test_announced_models_are_swapped_in_between_candles(
    settings: Settings, registry: Path, worker: subprocess.Popen[bytes],
    redis_client: redis.Redis,
) -> None:
    trades, hour, parts = _sample()
    publisher = TradePublisher(settings)
    feed = _feeder(settings, publisher, redis_client, hour)

    wait_until(lambda: _serving(redis_client, settings) == A, f"the worker to serve {A}")
    warm_up = read_manifest(registry / A).window  # candles predicted by the naive baseline
    switched_at = feed(parts[0])
    assert switched_at > warm_up + 1, "A must make real predictions before the swap"

    Registry(registry).promote(B, "test: hot swap")
    announce_model(settings, B, read_manifest(registry / B).sha256)
    wait_until(lambda: _serving(redis_client, settings) == B, f"the worker to serve {B}")
    feed(parts[1])

    announce_model(settings, C, read_manifest(registry / C).sha256)  # corrupt model.onnx
    wait_until(lambda: _alerts(redis_client, settings) != [], "an alert for the corrupt model")
    wait_until(lambda: worker_stats(redis_client, settings).get("model_rejections", 0) == 1,
               "the rejection count")
    assert _serving(redis_client, settings) == B
    (alert,) = _alerts(redis_client, settings)
    assert alert["kind"] == "model_rejected" and alert["model_version"] == C
    assert "sha256" in alert["message"]

    feed(parts[2])
    publisher.send(EndOfStream("BTCUSDT", trades[-1].ts_event, 0, "replay"))
    publisher.close()
    expected = binance_klines(minutes=60)
    wait_until(lambda: len(history(redis_client, settings, "prediction")) >= len(expected),
          "every candle's prediction")

    candles = history(redis_client, settings, "candle")
    assert_same_as_binance(candles, expected)
    predictions = history(redis_client, settings, "prediction")
    # One prediction per candle: none skipped or doubled across the swaps.
    assert [p["candle_open_time"] for p in predictions] == [c["open_time"] for c in candles]
    versions = [p["model_version"] for p in predictions]
    assert versions == (["naive"] * warm_up + [A] * (switched_at - warm_up)
                        + [B] * (len(candles) - switched_at))
    assert worker.poll() is None


def test_symbol_champions_are_served_and_swapped_for_their_symbol_only(
    settings: Settings, registry: Path, redis_client: redis.Redis,
    request: pytest.FixtureRequest,
) -> None:
    Registry(registry).promote(B, "test: BTCUSDT's own champion", symbol="BTCUSDT")
    worker: subprocess.Popen[bytes] = request.getfixturevalue("worker")  # starts after it
    trades, hour, parts = _sample()
    publisher = TradePublisher(settings)
    feed = _feeder(settings, publisher, redis_client, hour)

    wait_until(lambda: _serving(redis_client, settings) == A, f"the worker to serve {A}")
    warm_up = read_manifest(registry / B).window
    switched_at = feed(parts[0])

    announce_model(settings, C, read_manifest(registry / C).sha256, "BTCUSDT")  # corrupt
    wait_until(lambda: len(_alerts(redis_client, settings)) == 1, "an alert for BTCUSDT's C")
    assert _alerts(redis_client, settings)[0]["model_version"] == C

    assert Registry(registry).rollback(symbol="BTCUSDT") == A
    announce_model(settings, A, read_manifest(registry / A).sha256, "BTCUSDT")
    # Announcements are handled in order: once this one is rejected the rollback is in.
    announce_model(settings, C, read_manifest(registry / C).sha256)
    wait_until(lambda: len(_alerts(redis_client, settings)) == 2, "an alert for the shared C")
    assert _serving(redis_client, settings) == A

    feed(parts[1] + parts[2])
    publisher.send(EndOfStream("BTCUSDT", trades[-1].ts_event, 0, "replay"))
    publisher.close()
    expected = binance_klines(minutes=60)
    wait_until(lambda: len(history(redis_client, settings, "prediction")) >= len(expected),
               "every candle's prediction")
    versions = [p["model_version"] for p in history(redis_client, settings, "prediction")]
    assert versions == (["naive"] * warm_up + [B] * (switched_at - warm_up)
                        + [A] * (len(expected) - switched_at))
    assert worker.poll() is None
