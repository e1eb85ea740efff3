"""Live quality and drift end to end: the worker scores forecasts as their targets close and
the API serves them; a replay whose volatility jumps raises a `drift` event on the SSE feed."""

import asyncio
import json
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from httpx_sse import connect_sse

from kit.api import serve_in_thread
from kit.broker import Broker, topic_safe
from kit.builders import bootstrap_candles, kline_candles, scale_volatility
from kit.worker import worker_over
from makeusrich.cli import BUNDLED_SAMPLE
from makeusrich.core.embedded import EmbeddedService, free_port
from makeusrich.core.settings import Settings
from makeusrich.inference import load_forecaster
from makeusrich.stream.replay import ReplaySpec, replay, replay_settings
from makeusrich.trainer.archive import write_candles

pytestmark = [pytest.mark.integration, pytest.mark.slow]

DAY = Path(__file__).parent.parent / "data" / "BTCUSDT-1m-2025-11-20.csv"


@pytest.fixture
def settings(kafka: Broker, redis_server: EmbeddedService, tmp_path: Path,
             request: pytest.FixtureRequest) -> Settings:
    name = topic_safe(request.node.name)
    return Settings(kafka_bootstrap=kafka.url, redis_url=redis_server.url,
                    topic_prefix=f"{name}-", redis_prefix=name, worker_id=name,
                    state_dir=tmp_path, symbols=("BTCUSDT",), intervals=("1m",),
                    worker_metrics_port=free_port(), archive_dir=tmp_path / "archive")


@pytest.fixture
def worker_done(settings: Settings) -> Iterator[str]:
    """The worker has folded in the bundled hour; yields its metrics page."""
    with worker_over(settings, BUNDLED_SAMPLE):
        yield httpx.get(f"http://127.0.0.1:{settings.worker_metrics_port}/metrics").text


def test_the_api_serves_live_quality_and_drift_status(settings: Settings,
                                                      worker_done: str) -> None:
    lstm = load_forecaster(None).version
    with serve_in_thread(settings) as api:
        body = httpx.get(f"{api.base_url}/v1/monitoring/BTCUSDT", params={"interval": "1m"})
        assert body.status_code == 200, body.text
        monitoring = body.json()
        unknown = httpx.get(f"{api.base_url}/v1/monitoring/DOGEUSDT")
    assert monitoring["model_version"] == lstm
    quality = {q["model_version"]: q for q in monitoring["quality"]}
    assert set(quality) == {lstm, "naive"}
    # 60 candles, 60 predictions: every target but the last one's closed and was scored.
    assert quality[lstm]["scored"] + quality["naive"]["scored"] == 59
    assert quality[lstm]["scored"] == 29  # the LSTM serves from candle 31
    assert quality[lstm]["mae"] > 0 and 0 <= quality[lstm]["coverage_80"] <= 1
    assert quality[lstm]["pinball_bp"] > 0 and quality["naive"]["pinball_bp"] > 0
    (day,) = quality[lstm]["days"]  # one UTC day of targets
    assert day["scored"] == 29 and day["coverage_80"] == quality[lstm]["coverage_80"]
    assert monitoring["drift"]["state"] == "warming_up"
    assert unknown.status_code == 404
    # The worker exports the serving model's quality as metrics.
    assert f'mur_quality_mae{{interval="1m",symbol="BTCUSDT"}} {quality[lstm]["mae"]}' \
        in worker_done
    pinball = quality[lstm]["pinball_bp"]
    assert f'mur_quality_pinball_bp{{interval="1m",symbol="BTCUSDT"}} {pinball}' in worker_done
    assert 'mur_drift_active{interval="1m",symbol="BTCUSDT"} 0.0' in worker_done


def test_a_replay_whose_volatility_jumps_raises_drift_on_the_sse_feed(
    settings: Settings,
) -> None:
    calm = bootstrap_candles(kline_candles(DAY), 1_300, seed=3)
    write_candles(settings.archive_dir, scale_volatility(calm, 10, start=600, stop=900))
    asyncio.run(replay(settings, ReplaySpec(source="archive"), "volatile"))
    with serve_in_thread(replay_settings(settings, "volatile")) as api, httpx.Client() as client:
        drift = []
        # Resuming from the start of the events stream replays every drift event.
        with connect_sse(client, "GET", f"{api.base_url}/v1/stream",
                         params={"events": "drift"},
                         headers={"Last-Event-ID": "0-0"}, timeout=30) as source:
            for event in source.iter_sse():
                drift.append(json.loads(event.data))
                if len(drift) == 2:
                    break
        status = httpx.get(f"{api.base_url}/v1/monitoring/BTCUSDT").json()
    assert [(e["symbol"], e["status"]) for e in drift] == [("BTCUSDT", "drift"),
                                                           ("BTCUSDT", "recovered")]
    assert drift[0]["reason"].startswith("PSI of log_re")  # log_return or log_range
    assert drift[0]["ts_event"] > calm[600].open_time
    assert status["drift"]["state"] == "ok"
