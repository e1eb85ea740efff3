"""Backtests against the real broker and redis-server: reports, determinism, errors."""

import asyncio
import json
import os
import subprocess
import sys
from pathlib import Path

import msgspec
import pyarrow.parquet as pq
import pytest

from kit.broker import Broker, topic_safe
from kit.registry import add_version, bundled_version_dir
from makeusrich.backtest import Costs
from makeusrich.backtest.run import run_backtest
from makeusrich.cli import BUNDLED_SAMPLE
from makeusrich.core.embedded import EmbeddedService
from makeusrich.core.settings import Settings
from makeusrich.stream.replay import ReplaySpec

pytestmark = [pytest.mark.integration, pytest.mark.slow]

REPORT_FILES = {"metrics.json", "predictions.parquet", "price_forecast.png", "equity.png",
                "error.png", "report.html"}


@pytest.fixture
def settings(kafka: Broker, redis_server: EmbeddedService, tmp_path: Path,
             request: pytest.FixtureRequest) -> Settings:
    name = topic_safe(request.node.name)
    return Settings(kafka_bootstrap=kafka.url, redis_url=redis_server.url,
                    topic_prefix=f"{name}-", redis_prefix=name, worker_id=name,
                    state_dir=tmp_path / "state", symbols=("BTCUSDT",), intervals=("1m",))


def _mur(settings: Settings, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "makeusrich", *args], env={**os.environ, **settings.as_env()},
        capture_output=True, text=True, timeout=240, check=False,
    )


def test_two_models_in_one_report(settings: Settings, tmp_path: Path) -> None:
    registry = tmp_path / "registry"
    good = add_version(registry, "lstm-20990101-000000-aaaaaaaa")
    worse = add_version(registry, "lstm-20990101-000001-bbbbbbbb", shift_return_mean=0.01)
    out = tmp_path / "report"
    done = _mur(settings.model_copy(update={"model_dir": registry}), "backtest",
                "--model", good.name, "--model", worse.name, "--from", str(BUNDLED_SAMPLE),
                "--start", "2019-04-01T00:00", "--end", "2019-04-01T01:00",
                "--out", str(out), "--progress", "jsonl")
    assert done.returncode == 0, done.stderr[-2000:]
    lines = [json.loads(line) for line in done.stdout.splitlines()]
    shares = [line["progress"] for line in lines]
    assert shares == sorted(shares) and lines[-1]["stage"] == "done"
    assert lines[-1]["report_dir"] == str(out)

    assert {p.name for p in out.iterdir()} >= REPORT_FILES
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics == lines[-1]["metrics"]
    assert list(metrics["models"]) == [good.name, worse.name]
    for name in (good.name, worse.name):
        model = metrics["models"][name]
        assert model["model_versions"] == [name]
        assert model["forecasts"] > 20  # the hour has 60 candles; the window takes 30
        assert set(model["metrics"]) == {"model", "persistence", "ewma_vol", "drift", "ema",
                                         "garch"}
        series = model["series"][0]
        assert series["buy_and_hold"]["candles"] == series["strategy"]["candles"]
    # A shifted return mean biases every forecast: the worse model must score worse.
    assert (metrics["models"][worse.name]["metrics"]["model"]["pinball_bp"]
            > metrics["models"][good.name]["metrics"]["model"]["pinball_bp"])

    table = pq.read_table(out / "predictions.parquet").to_pylist()
    assert {row["model"] for row in table} == {good.name, worse.name}
    assert len(table) == sum(m["forecasts"] for m in metrics["models"].values())
    html = (out / "report.html").read_text()
    assert html.count("data:image/png;base64,") >= 3
    assert good.name in html and worse.name in html


def test_same_span_and_model_give_identical_metrics(settings: Settings, tmp_path: Path) -> None:
    spec = ReplaySpec(source=str(BUNDLED_SAMPLE))
    model = str(bundled_version_dir())

    def backtest(out: Path) -> bytes:
        outcome = asyncio.run(run_backtest(settings, spec, [model], out, Costs()))
        assert outcome.files["metrics.json"].exists()
        return msgspec.json.encode(outcome.result)

    first, second = backtest(tmp_path / "a"), backtest(tmp_path / "b")
    assert first == second
    assert (tmp_path / "a" / "metrics.json").read_bytes() == (
        tmp_path / "b" / "metrics.json").read_bytes()


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--model", "champion", "--start", "2019-04-02", "--end", "2019-04-03"],
         "no trades in"),
        (["--model", "champion", "--start", "2019-04-01T01:00", "--end", "2019-04-01T00:00"],
         "must be before end"),
        (["--model", "lstm-nope"], "unknown model 'lstm-nope'"),
        (["--model", "naive"], "naive is not a model to replay"),
        (["--model", "champion", "--start", "yesterday"], "is not a time"),
    ],
)
def test_bad_requests_fail_with_a_clear_message(settings: Settings, args: list[str],
                                                message: str) -> None:
    done = _mur(settings, "backtest", "--from", str(BUNDLED_SAMPLE), "--progress", "none",
                *args)
    assert done.returncode == 2
    assert message in done.stderr


def test_a_stopped_backtest_deletes_its_replay_namespace(settings: Settings) -> None:
    import redis

    from kit.worker import wait_until

    proc = subprocess.Popen(
        [sys.executable, "-m", "makeusrich", "backtest", "--model", "champion", "--from",
         str(BUNDLED_SAMPLE), "--speed", "20", "--progress", "none"],
        env={**os.environ, **settings.as_env()}, stderr=subprocess.PIPE, text=True,
    )
    client = redis.Redis.from_url(settings.redis_url or "")
    pattern = f"{settings.redis_prefix}:replay:bt-*"
    try:
        # At 20x the hour takes 3 minutes: stop it once its first candles appear.
        wait_until(lambda: any(k.endswith(b":candle:BTCUSDT:1m")
                               for k in client.scan_iter(match=pattern)),
                   "the backtest's replay to write candles")
        proc.terminate()
        _, stderr = proc.communicate(timeout=60)
        assert proc.returncode == 2
        assert "stopped by a signal" in stderr
        assert not list(client.scan_iter(match=pattern))
    finally:
        if proc.poll() is None:
            proc.kill()
        client.close()
