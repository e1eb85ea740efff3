"""Hot swap of models in a running worker, against the real broker and redis-server."""

import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import msgspec
import pytest
import redis

from kit.klines import assert_same_as_binance, binance_klines
from kit.registry import add_version, corrupt_model
from kit.worker import history, wait_until, worker_stats
from makeusrich.cli import BUNDLED_SAMPLE, _to_env
from makeusrich.core.embedded import EmbeddedService, kill_with_parent
from makeusrich.core.schemas import EndOfStream, Trade
from makeusrich.core.settings import Settings
from makeusrich.inference import Registry, read_manifest
from makeusrich.stream.control import announce_model
from makeusrich.stream.publisher import TradePublisher, ensure_topics
from makeusrich.stream.sources import read_trades

pytestmark = [pytest.mark.integration, pytest.mark.slow]

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
def settings(kafka: EmbeddedService, redis_server: EmbeddedService, tmp_path: Path,
             registry: Path, request: pytest.FixtureRequest) -> Settings:
    name = request.node.name
    settings = Settings(
        kafka_bootstrap=kafka.url, redis_url=redis_server.url, topic_prefix=f"{name}-",
        redis_prefix=name, worker_id=name, state_dir=tmp_path / "state",
        symbols=("BTCUSDT",), intervals=("1m",), model_dir=registry, log_level="INFO",
    )
    ensure_topics(settings)
    return settings


@pytest.fixture
def worker(settings: Settings) -> Iterator[subprocess.Popen[bytes]]:
    proc = subprocess.Popen(
        [sys.executable, "-m", "makeusrich", "worker"],
        env={**os.environ, **_to_env(settings)}, preexec_fn=kill_with_parent,
    )
    yield proc
    if proc.poll() is None:
        proc.kill()
    proc.wait(30)


def _serving(client: redis.Redis, settings: Settings) -> str:
    return (client.hget(settings.redis_keys.model, "version") or b"").decode()


def _alerts(client: redis.Redis, settings: Settings) -> list[dict]:
    return [msgspec.json.decode(fields[b"d"])
            for _, fields in client.xrange(settings.redis_keys.events)
            if fields[b"type"] == b"alert"]


def test_announced_models_are_swapped_in_between_candles(
    settings: Settings, registry: Path, worker: subprocess.Popen[bytes],
    redis_client: redis.Redis,
) -> None:
    trades = list(read_trades(BUNDLED_SAMPLE))  # 00:00-00:59
    hour = trades[0].ts_event - trades[0].ts_event % 3_600_000
    parts = [[t for t in trades if lo <= t.ts_event - hour < hi]
             for lo, hi in ((0, 45 * 60_000), (45 * 60_000, 52 * 60_000),
                            (52 * 60_000, 3_600_000))]
    publisher = TradePublisher(settings)

    def feed(part: list[Trade]) -> int:
        """Publish, wait for every candle the part closes to be predicted; their count."""
        for trade in part:
            publisher.send(trade)
        publisher.flush()
        # A candle closes once event time passes its end by grace_ms.
        closed = (part[-1].ts_event - settings.grace_ms - hour) // 60_000
        wait_until(lambda: len(history(redis_client, settings, "prediction")) >= closed,
              f"{closed} predictions")
        return closed

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
