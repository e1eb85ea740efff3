"""Monitoring inside the pipeline: every closed candle scores the forecast that targeted it
and judges drift of the serving model (the bundled LSTM and its training reference)."""

from pathlib import Path

import msgspec
import pytest

from kit.builders import bootstrap_candles, kline_candles, scale_volatility
from makeusrich.cli import BUNDLED_SAMPLE
from makeusrich.core.schemas import Candle
from makeusrich.inference import load_forecaster
from makeusrich.monitoring import MonitorConfig, Observation
from makeusrich.stream.pipeline import TradePipeline
from makeusrich.stream.sources import read_trades

DAY = Path(__file__).parent.parent / "data" / "BTCUSDT-1m-2025-11-20.csv"
CALM, WILD = 600, 300  # candles before the volatility jump, and jumped candles


def _pipeline() -> TradePipeline:
    return TradePipeline(["1m"], 2_000, load_forecaster(None), MonitorConfig())


def _observe(pipeline: TradePipeline, candles: list[Candle]) -> list[Observation]:
    seen = []
    for candle in candles:
        pipeline.add_candle(candle)
        seen += pipeline.drain().monitoring
    return seen


def test_every_closed_candle_scores_the_forecast_that_targeted_it() -> None:
    pipeline = _pipeline()
    observations, predictions = [], []
    for trade in read_trades(BUNDLED_SAMPLE):
        pipeline.process(trade)
        out = pipeline.drain()
        observations += out.monitoring
        predictions += [p for p in out.predictions if p.horizon == 1]  # live quality's
    assert len(observations) == len(predictions) == 59  # the hour's last candle stays open
    last = observations[-1]
    by_version = {q.model_version: q for q in last.quality}
    model = pipeline.forecaster.version
    assert set(by_version) == {"naive", model}
    # Each prediction but the newest had its target close: all were scored.
    assert sum(q.scored for q in last.quality) == len(predictions) - 1
    assert [p.model_version for p in predictions].count(model) - 1 == by_version[model].scored
    assert 0 <= by_version[model].coverage_80 <= 1
    assert last.drift.model_version == model
    assert last.drift.state == "warming_up"  # 240 candles of features before judging


def test_a_restored_pipeline_monitors_exactly_like_an_uninterrupted_one() -> None:
    candles = bootstrap_candles(kline_candles(DAY), 400, seed=1)
    straight = _observe(_pipeline(), candles)
    first = _pipeline()
    before = _observe(first, candles[:300])
    state = msgspec.json.decode(msgspec.json.encode(first.snapshot("BTCUSDT")))
    second = _pipeline()
    second.restore("BTCUSDT", state)
    after = _observe(second, candles[300:])
    assert msgspec.json.encode(before + after) == msgspec.json.encode(straight)


@pytest.mark.parametrize("factor", [5, 10])
def test_a_volatility_jump_raises_one_drift_event_and_one_recovery(factor: float) -> None:
    calm = bootstrap_candles(kline_candles(DAY), CALM + WILD + 400, seed=3)
    candles = scale_volatility(calm, factor, start=CALM, stop=CALM + WILD)
    observations = _observe(_pipeline(), candles)
    events = [(i, e) for i, o in enumerate(observations) for e in o.events]
    assert [e.status for _, e in events] == ["drift", "recovered"]
    (entered, drift), (left, _) = events
    assert CALM < entered < CALM + WILD
    assert drift.reason.startswith(("PSI of log_range", "PSI of log_return"))
    assert left > CALM + WILD
    assert {o.drift.state for o in observations[:CALM]} <= {"warming_up", "ok"}
