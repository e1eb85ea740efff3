"""TradePipeline: the model per symbol, and batches against single trades (no broker)."""

from collections.abc import Sequence

from msgspec.structs import replace

from kit.builders import random_trades
from makeusrich.core.schemas import Candle, EndOfStream, Prediction, Trade, TradeBatch
from makeusrich.inference import Forecast, NaiveForecaster
from makeusrich.stream.candles import TradeColumns
from makeusrich.stream.pipeline import TradePipeline

T0 = 1_700_000_040_000  # a minute boundary


class StubForecaster:
    """Predicts a constant, so its predictions are told apart by value and version."""

    interval: str | None = None
    horizons = (1,)

    def __init__(self, version: str, window: int = 3) -> None:
        self.version = version
        self.window = window

    def predict(self, candles: Sequence[Candle], horizon: int = 1) -> Forecast | None:
        if len(candles) < self.window + 1:
            return None
        return Forecast(predicted_close=1.0, lower=0.5, upper=1.5)

    def predict_batch(
        self, histories: Sequence[Sequence[Candle]], horizon: int = 1
    ) -> list[Forecast | None]:
        return [self.predict(candles) for candles in histories]

    def predict_horizons(self, candles: Sequence[Candle]) -> list[Forecast] | None:
        forecast = self.predict(candles)
        return None if forecast is None else [forecast]


def _feed(pipeline: TradePipeline, symbols: Sequence[str], minutes: int) -> dict[str, set[str]]:
    """One trade a minute per symbol; the model versions each symbol's predictions name."""
    for minute in range(minutes):
        for n, symbol in enumerate(symbols):
            ts = T0 + minute * 60_000 + 1_000
            pipeline.process(Trade(symbol, minute, 100.0 + n + minute, 1.0, 100.0, False, ts, ts))
    for symbol in symbols:
        pipeline.process(EndOfStream(symbol, T0 + minutes * 60_000, 0, "replay"))
    versions: dict[str, set[str]] = {symbol: set() for symbol in symbols}
    for prediction in pipeline.drain().predictions:
        versions[prediction.symbol].add(prediction.model_version)
    return versions


def test_symbols_are_predicted_by_their_own_model_else_the_shared_one() -> None:
    pipeline = TradePipeline(("1m",), 0, NaiveForecaster())
    pipeline.set_forecaster(StubForecaster("stub-eth"), "ETHUSDT")

    versions = _feed(pipeline, ("BTCUSDT", "ETHUSDT"), minutes=10)

    assert versions["BTCUSDT"] == {"naive"}
    # Until the stub has its window the naive baseline answers, as for the shared model.
    assert versions["ETHUSDT"] == {"naive", "stub-eth"}
    assert pipeline.forecaster_for("BTCUSDT") is pipeline.forecaster
    assert pipeline.forecaster_for("ETHUSDT").version == "stub-eth"


def test_a_shared_swap_leaves_symbol_models_and_removing_one_restores_the_shared() -> None:
    pipeline = TradePipeline(("1m",), 0, NaiveForecaster())
    pipeline.set_forecaster(StubForecaster("stub-eth", window=1), "ETHUSDT")
    pipeline.set_forecaster(StubForecaster("stub-shared", window=1))
    assert _feed(pipeline, ("BTCUSDT", "ETHUSDT"), minutes=5) == {
        "BTCUSDT": {"naive", "stub-shared"}, "ETHUSDT": {"naive", "stub-eth"},
    }
    pipeline.set_forecaster(None, "ETHUSDT")
    assert pipeline.forecaster_for("ETHUSDT").version == "stub-shared"


def test_histories_grow_for_a_symbol_model_with_a_longer_window() -> None:
    pipeline = TradePipeline(("1m",), 0, NaiveForecaster())
    _feed(pipeline, ("ETHUSDT",), minutes=2)
    pipeline.set_forecaster(StubForecaster("stub-long", window=100), "ETHUSDT")
    versions = _feed(pipeline, ("ETHUSDT",), minutes=110)
    assert "stub-long" in versions["ETHUSDT"]



def _outputs(pipeline: TradePipeline) -> tuple[list[tuple[object, ...]], ...]:
    """What the pipeline made, sorted, without wall-clock stamps."""
    out = pipeline.drain()

    def strip(records: Sequence[Candle | Prediction]) -> list[tuple[object, ...]]:
        return sorted(
            tuple(getattr(r, f) for f in type(r).__struct_fields__
                  if f not in ("ts_ingest", "made_at"))
            for r in records
        )

    return strip(out.candles), strip(out.predictions), sorted(
        (t.symbol, t.trade_id) for t in out.late)


def test_batches_make_what_single_trades_make() -> None:
    trades = [replace(t, trade_id=t.trade_id * 10) for t in random_trades(
        6_000, seed=3, symbols=("BTCUSDT", "ETHUSDT"), mean_gap_ms=40)]
    # Redeliveries, and stragglers 2 s old: late for their 1s candle, not for their 1m one.
    trades = trades[:3_000] + trades[2_900:3_010] + trades[3_000:]
    for i in range(500, 6_000, 500):
        t = trades[i]
        trades.insert(i + 1, replace(t, trade_id=t.trade_id + 5, ts_event=t.ts_event - 2_000))
    one, many = (TradePipeline(("1s", "1m"), 500, NaiveForecaster()) for _ in range(2))
    for t in trades:
        one.process(t)
    for symbol in ("BTCUSDT", "ETHUSDT"):
        own = [t for t in trades if t.symbol == symbol]
        for start in range(0, len(own), 257):
            many.process_batch(TradeColumns.of(TradeBatch.of(own[start:start + 257])))
    candles, predictions, late = _outputs(many)
    assert (candles, predictions, late) == _outputs(one)
    assert candles and predictions
    assert many.duplicates == one.duplicates > 0
    assert late
