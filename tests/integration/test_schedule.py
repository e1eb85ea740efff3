"""Scheduled retraining on a real day of 1m klines: each run trains on the data as it is then,
the promotion rule decides, and every run is summarised and counted in the trainer's metrics;
and the evaluation in a manifest."""

import threading
import time
from pathlib import Path
from typing import Any

import msgspec
import pytest

from kit.metrics import parse, sample, series
from makeusrich.core.errors import ConfigError
from makeusrich.core.metrics import TrainerMetrics, expose
from makeusrich.core.settings import Settings
from makeusrich.inference import Registry
from makeusrich.trainer import RunSummary, parse_duration, run_schedule, schedule
from makeusrich.trainer.evaluate import MODEL, Report

DAY = Path(__file__).parent.parent / "data" / "BTCUSDT-1m-2025-11-20.csv"
FIRST_CANDLES = 1100  # the first run sees these; the rest of the day arrives after it
MINUTE = 60_000
NO_BROKER = Settings(kafka_bootstrap=None)


@pytest.fixture(scope="module")
def trainer_metrics() -> TrainerMetrics:
    return TrainerMetrics()


@pytest.fixture(scope="module")
def scheduled(
    tmp_path_factory: pytest.TempPathFactory, trainer_metrics: TrainerMetrics
) -> tuple[list[RunSummary], Registry]:
    data = tmp_path_factory.mktemp("data")
    lines = DAY.read_text().splitlines(keepends=True)
    (data / "BTCUSDT-1m-2025-11-20-a.csv").write_text("".join(lines[:FIRST_CANDLES]))
    real_train = schedule.train

    def train_then_more_data_arrives(*args: Any, **kwargs: Any) -> Path:
        version_dir = real_train(*args, **kwargs)
        (data / "BTCUSDT-1m-2025-11-20-b.csv").write_text("".join(lines[FIRST_CANDLES:]))
        return version_dir

    registry_dir = tmp_path_factory.mktemp("registry")
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(schedule, "train", train_then_more_data_arrives)
        summaries = run_schedule(
            NO_BROKER,
            [str(data / "BTCUSDT-1m-*.csv")],  # a glob: resolved anew for each run
            registry_dir,
            every_s=0,
            runs=2,
            epochs=1,
            metrics=trainer_metrics,
            hidden=16,
            stride=8,
            progress=False,
        )
    return summaries, Registry(registry_dir)


@pytest.mark.train
@pytest.mark.slow
def test_first_run_is_promoted_and_the_second_decided_by_the_rule(
    scheduled: tuple[list[RunSummary], Registry],
) -> None:
    (first, second), registry = scheduled

    for number, summary in enumerate((first, second), start=1):
        assert summary.ok, summary.error
        assert summary.run == number and summary.arch == "lstm"
        assert summary.version is not None and summary.version.startswith("lstm-")
        assert summary.symbols == ("BTCUSDT",) and summary.interval == "1m"
        assert summary.first_open_time is not None and summary.last_open_time is not None
        assert summary.validation_mae is not None and summary.validation_mae > 0
        assert summary.duration_s > 0 and summary.decision
        assert not summary.announced  # no broker configured
        assert summary.version in summary.render()
    # The glob picked up the file that arrived after the first run.
    assert (first.candles, second.candles) == (FIRST_CANDLES, 1440)
    assert second.last_open_time == first.last_open_time + (1440 - FIRST_CANDLES) * MINUTE

    # An LSTM of one epoch on a day does not beat GARCH(1,1) by 1%: the serving rule keeps
    # both runs unserved, with no champion to compare against.
    for summary in (first, second):
        assert summary.champion is None and not summary.promoted
        assert summary.decision is not None
        assert "fails the serving rule" in summary.decision and "horizon 1:" in summary.decision
        assert summary.pinball_bp is not None and summary.champion_pinball_bp is None
        assert "kept unserved" in summary.render()

    # A losing version stays in the registry too. (Both may share a second: compare sets.)
    assert set(registry.versions()) == {first.version, second.version}
    assert registry.champion() is None


@pytest.mark.train
@pytest.mark.slow
def test_the_runs_are_counted_in_the_trainer_metrics(
    scheduled: tuple[list[RunSummary], Registry], trainer_metrics: TrainerMetrics
) -> None:
    (first, second), registry = scheduled
    body, _ = expose(trainer_metrics.registry, None)  # what `mur trainer` serves
    samples = parse(body.decode())

    def runs(outcome: str, trigger: str = "schedule") -> float | None:
        return sample(samples, "mur_trainer_runs_total", outcome=outcome, trigger=trigger)

    promoted = sum(summary.promoted for summary in (first, second))
    assert runs("promoted") == promoted and runs("kept") == 2 - promoted
    assert runs("failed") == runs("promoted", "drift") == 0
    assert sample(samples, "mur_trainer_promotions_total") == promoted
    champion = registry.champion()
    assert series(samples, "mur_trainer_promoted_version_info") == (
        [] if champion is None else [{"version": champion}])
    assert sample(samples, "mur_trainer_last_run_duration_seconds") == second.duration_s
    last_success_s = sample(samples, "mur_trainer_last_success_timestamp_seconds")
    assert last_success_s is not None and second.started_at / 1000 <= last_success_s <= time.time()


@pytest.mark.train
@pytest.mark.slow
def test_manifest_holds_the_evaluation_on_the_validation_span(
    scheduled: tuple[list[RunSummary], Registry],
) -> None:
    (_, second), registry = scheduled
    assert second.version is not None
    manifest = registry.show(second.version).manifest  # what `mur models show` prints
    assert manifest is not None and manifest.evaluation is not None
    report = msgspec.convert(manifest.evaluation, Report)
    data = manifest.training_data

    assert report.model == manifest.version
    assert not report.overlaps_training  # its own validation span was held out
    assert report.training_last_open_time == data.validation_first_target_open_time - MINUTE
    assert report.start_open_time == data.validation_first_target_open_time - MINUTE
    assert report.overall.first_target_open_time == data.validation_first_target_open_time
    assert report.overall.last_target_open_time == data.last_open_time
    assert report.overall.forecasts == data.validation_windows
    assert [(s.symbol, s.interval) for s in report.symbols] == [("BTCUSDT", "1m")]
    for scores in (report.overall, *report.symbols):
        assert set(scores.metrics) == {MODEL, "persistence", "ewma_vol", "drift", "ema", "garch"}
        for m in scores.metrics.values():
            assert 0 < m.mae <= m.rmse
            assert m.skill is not None and m.directional_accuracy is not None
            assert 0 <= m.coverage_80 <= 1 and m.interval_width_bp > 0
    # The headline metrics are the evaluation's numbers.
    model, persistence = report.overall.metrics[MODEL], report.overall.metrics["persistence"]
    assert persistence.skill == 0.0
    assert manifest.metrics["mae"] == model.mae == second.validation_mae
    assert manifest.metrics["mae_persistence"] == persistence.mae
    assert manifest.metrics["skill"] == model.skill
    assert manifest.metrics["coverage_80"] == model.coverage_80
    assert manifest.metrics["coverage_80_naive"] == persistence.coverage_80
    assert manifest.metrics["interval_width_bp"] == model.interval_width_bp


@pytest.mark.train
@pytest.mark.slow
def test_a_failed_run_is_summarised_and_the_schedule_goes_on(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], caplog: pytest.LogCaptureFixture
) -> None:
    summaries = run_schedule(
        NO_BROKER,
        [str(tmp_path / "BTCUSDT-1m-*.csv")],
        tmp_path / "registry",
        every_s=0,
        runs=2,
        epochs=1,
    )

    assert [s.run for s in summaries] == [1, 2]
    for summary in summaries:
        assert not summary.ok and summary.error is not None
        assert summary.error.startswith("TrainingError") and "matches no files" in summary.error
        assert summary.version is None and not summary.promoted and summary.decision is None
    assert capsys.readouterr().out.count("FAILED") == 2
    assert "run 2 failed" in caplog.text


@pytest.mark.train
@pytest.mark.slow
def test_stop_ends_the_wait_for_the_next_run(tmp_path: Path) -> None:
    stop = threading.Event()
    timer = threading.Timer(0.2, stop.set)
    timer.start()
    started = time.monotonic()
    try:
        summaries = run_schedule(
            NO_BROKER,
            [str(tmp_path / "none-*.csv")],
            tmp_path / "registry",
            every_s=3600,
            stop=stop,
        )
    finally:
        timer.cancel()

    assert len(summaries) == 1 and time.monotonic() - started < 60


@pytest.mark.parametrize(
    ("text", "seconds"),
    [
        ("6h", 21_600),
        ("30m", 1_800),
        ("90s", 90),
        ("1d", 86_400),
        ("1h30m", 5_400),
        (" 1.5H ", 5_400),
        ("0.5s", 0.5),
    ],
)
def test_parse_duration(text: str, seconds: float) -> None:
    assert parse_duration(text) == seconds


@pytest.mark.parametrize("text", ["", "6", "h", "6x", "-1h", "1h 30m", "0s", "0h0m", "six hours"])
def test_parse_duration_refuses_what_is_not_a_positive_duration(text: str) -> None:
    with pytest.raises(ConfigError, match="duration"):
        parse_duration(text)


def test_an_invalid_schedule_is_a_config_error(tmp_path: Path) -> None:
    day, registry = [DAY], tmp_path / "registry"
    with pytest.raises(ConfigError, match="every_s"):
        run_schedule(NO_BROKER, day, registry, every_s=-1)
    with pytest.raises(ConfigError, match="runs"):
        run_schedule(NO_BROKER, day, registry, every_s=0, runs=0)
    with pytest.raises(ConfigError, match="'rnn'"):
        run_schedule(NO_BROKER, day, registry, every_s=0, arch="rnn")
    with pytest.raises(ConfigError, match="no candle data"):
        run_schedule(NO_BROKER, [], registry, every_s=0)
    assert not registry.exists()


@pytest.mark.train
@pytest.mark.slow
@pytest.mark.integration
def test_a_drift_event_starts_the_next_run_at_once(
    redis_server: Any, tmp_path: Path
) -> None:
    import asyncio

    from makeusrich.core.store import RedisStore

    settings = Settings(kafka_bootstrap=None, redis_url=redis_server.url,
                        redis_prefix="drift-retrain", drift_retrain=True)
    done: list[RunSummary] = []

    def schedule_in_background() -> None:
        done.extend(run_schedule(settings, [str(DAY)], tmp_path / "registry", every_s=3_600,
                                 runs=2, epochs=1, hidden=16, stride=8, progress=False))

    thread = threading.Thread(target=schedule_in_background, daemon=True)
    started = time.monotonic()
    thread.start()
    # Once the first run has written its version, a worker raises drift.
    while not list((tmp_path / "registry").glob("lstm-*")) and thread.is_alive():
        time.sleep(0.2)

    async def raise_drift() -> None:
        store = RedisStore.from_settings(settings)
        await store.write_drift("BTCUSDT", "1m", msgspec.json.encode({
            "symbol": "BTCUSDT", "interval": "1m", "status": "drift",
            "reason": "PSI of log_range 0.41 > 0.25"}))
        await store.aclose()

    asyncio.run(raise_drift())
    thread.join(300)
    assert not thread.is_alive(), "the second run did not start on the drift event"
    first, second = done
    assert first.trigger == "schedule"
    assert second.trigger == "drift (BTCUSDT 1m: PSI of log_range 0.41 > 0.25)"
    assert time.monotonic() - started < 3_600  # not the hour the schedule would have waited
