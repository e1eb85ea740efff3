"""Prometheus metrics of the processes without an API of their own, scraped over real HTTP
from real subprocesses: `mur ingest` against the local fake Binance (publishing to the
session broker), and `mur trainer` after a scheduled run. (The API's and the worker's are
in test_metrics_endpoints.py; a successful trainer run's, in test_schedule.py.)"""

import asyncio
import os
import subprocess
import sys
import uuid
from pathlib import Path
from typing import Any

import httpx
import pytest

from kit.broker import Broker
from kit.fake_binance import (
    BTCUSDT_TRADES_CSV,
    Drop,
    FakeBinance,
    Script,
    generate_trades,
    load_trades_csv,
)
from kit.metrics import Samples, sample, scrape
from kit.worker import wait_until
from makeusrich.core.embedded import EmbeddedService, free_port, kill_with_parent, terminate
from makeusrich.core.settings import Settings

pytestmark = [pytest.mark.integration, pytest.mark.slow]


def _start(command: str, settings: Settings, *args: str) -> "subprocess.Popen[bytes]":
    return subprocess.Popen([sys.executable, "-m", "makeusrich", command, *args],
                            env={**os.environ, **settings.as_env()},
                            preexec_fn=kill_with_parent)


def _scrape_when_up(port: int | None, process: "subprocess.Popen[bytes]") -> Samples:
    assert process.poll() is None, "the process exited"
    try:
        return scrape(f"http://127.0.0.1:{port}/metrics")
    except httpx.TransportError:
        return {}  # not listening yet


async def test_ingest_metrics_count_what_the_live_source_did(
    kafka: Broker, redis_server: EmbeddedService
) -> None:
    btc = load_trades_csv(BTCUSDT_TRADES_CSV, "BTCUSDT", 400)
    eth = generate_trades("ETHUSDT", 300, first_id=5_000, start_ms=btc[0].time_ms,
                          step_ms=(btc[-1].time_ms - btc[0].time_ms) // 300, price=141.0)
    garbage = ["not json", '{"stream":"btcusdt@trade","data":{"e":"trade"}}',
               generate_trades("DOGEUSDT", 1)[0].ws_message()]
    script = Script(
        drops=(Drop(200), Drop(500)),  # clean closes: every frame sent is received
        replayed_on_reconnect=3,
        skip_ids={"BTCUSDT": {btc[50].id, btc[51].id}, "ETHUSDT": {eth[30].id}},
        inject={100: garbage},
    )
    async with FakeBinance({"BTCUSDT": btc, "ETHUSDT": eth}, script) as fake:
        settings = Settings(
            _env_file=None, kafka_bootstrap=kafka.url, redis_url=redis_server.url,
            topic_prefix=f"t-ingest-metrics-{uuid.uuid4().hex[:8]}-", source="binance",
            symbols=("BTCUSDT", "ETHUSDT"), binance_ws_url=fake.ws_url,
            binance_rest_url=fake.rest_url, reconnect_max_backoff_s=1.0,
            api_host="127.0.0.1", ingest_metrics_port=free_port(),
        )
        process = _start("ingest", settings)
        try:
            def published() -> float:
                samples = _scrape_when_up(settings.ingest_metrics_port, process)
                return sum(sample(samples, "mur_ingest_trades_published_total", symbol=s) or 0
                           for s in settings.symbols)

            await asyncio.to_thread(wait_until, lambda: published() == len(btc) + len(eth),
                                    "every trade to be published")
            samples = scrape(f"http://127.0.0.1:{settings.ingest_metrics_port}/metrics")
        finally:
            # In a thread: the fake (on this loop) must answer the ingestor's closing handshake.
            await asyncio.to_thread(terminate, process, 15)

    def count(name: str, **labels: str) -> float | None:
        return sample(samples, f"mur_ingest_{name}", **labels)

    assert count("trades_published_total", symbol="BTCUSDT") == len(btc)
    assert count("trades_published_total", symbol="ETHUSDT") == len(eth)
    for symbol, trades in (("BTCUSDT", btc), ("ETHUSDT", eth)):
        newest_s = trades[-1].time_ms / 1000
        assert count("last_trade_event_timestamp_seconds", symbol=symbol) == newest_s
    assert count("messages_received_total") == len(fake.sent) + len(garbage)
    assert count("reconnects_total") == 2 == fake.connections - 1
    assert count("gaps_backfilled_total") == 2  # BTCUSDT's two adjacent ids, ETHUSDT's one
    assert count("trades_backfilled_total") == 3
    assert count("duplicate_trades_total") == 2 * 3
    assert count("bad_messages_total") == len(garbage)
    assert sample(samples, "process_cpu_seconds_total") is not None


def test_trainer_metrics_after_a_failed_scheduled_run(tmp_path: Path) -> None:
    settings = Settings(_env_file=None, kafka_bootstrap=None, redis_url=None,
                        api_host="127.0.0.1", trainer_metrics_port=free_port())
    # No candles yet (the archive is empty): the run fails and the schedule waits.
    process = _start("trainer", settings, "--every", "1h", "--registry",
                     str(tmp_path / "registry"), "--data", str(tmp_path / "none-*.csv"))
    try:
        def runs(samples: Samples, outcome: str) -> Any:
            return sample(samples, "mur_trainer_runs_total", outcome=outcome,
                          trigger="schedule")

        wait_until(lambda: runs(_scrape_when_up(settings.trainer_metrics_port, process),
                                "failed") == 1, "the first run to be recorded")
        samples = scrape(f"http://127.0.0.1:{settings.trainer_metrics_port}/metrics")
        assert process.poll() is None, "the schedule outlives a failed run"
    finally:
        terminate(process, 15)

    assert runs(samples, "promoted") == runs(samples, "kept") == 0
    assert sample(samples, "mur_trainer_runs_total", outcome="failed", trigger="drift") == 0
    assert sample(samples, "mur_trainer_last_success_timestamp_seconds") == 0
    duration_s = sample(samples, "mur_trainer_last_run_duration_seconds")
    assert duration_s is not None and duration_s >= 0
    assert sample(samples, "mur_trainer_promotions_total") == 0
