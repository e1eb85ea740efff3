"""The API's in-memory latest predictions, broker-free: fed by events, filled from the store
on a miss, emptied when the subscription is lost, never keeping a read that raced with it.

The store is a stand-in answering from a dict (its Redis behaviour is tested in
tests/integration/test_api.py)."""

import json
from collections.abc import Callable, Sequence
from typing import cast

from kit.builders import make_candles, make_predictions
from makeusrich.api.latest import LatestPredictions, json_array
from makeusrich.core.schemas import Prediction, encode
from makeusrich.core.store import RedisStore, StoredEvent

_CLOSES = [100.0, 101.0, 102.0, 103.0]
PREDICTIONS = make_predictions(make_candles(_CLOSES), _CLOSES)


class _Store:
    """What LatestPredictions reads, counting reads; ``during_read`` runs inside each one."""

    def __init__(self, latest: dict[str, Prediction],
                 other_horizons: Sequence[Prediction] = ()) -> None:
        self.latest = latest  # horizon 1
        self.other_horizons = list(other_horizons)
        self.reads = 0
        self.during_read: Callable[[], None] = lambda: None

    async def latest_predictions(self, symbols: Sequence[str], interval: str,
                                 horizon: int = 1) -> dict[str, Prediction]:
        self.reads += 1
        self.during_read()
        candidates = (self.latest.values() if horizon == 1 else
                      [p for p in self.other_horizons if p.horizon == horizon])
        return {p.symbol: p for p in candidates if p.symbol in symbols
                and p.interval == interval}

    async def known_symbols(self) -> list[str]:
        self.reads += 1
        self.during_read()
        return sorted(self.latest)


def _event(prediction: Prediction, n: int) -> StoredEvent:
    return StoredEvent(f"{n}-0", "prediction", prediction.symbol, prediction.interval,
                       encode(prediction))


def _latest(store: _Store, live: list[bool] | None = None) -> LatestPredictions:
    state = [True] if live is None else live
    return LatestPredictions(cast(RedisStore, store), live=lambda: state[0])


def _open_times(bodies: list[bytes]) -> list[int]:
    return [json.loads(body)["candle_open_time"] for body in bodies]


async def test_a_miss_is_read_once_then_events_keep_it_current() -> None:
    store = _Store({"BTCUSDT": PREDICTIONS[0]})
    latest = _latest(store)
    assert _open_times(await latest.get(["BTCUSDT"], "1m")) == [PREDICTIONS[0].candle_open_time]
    latest.take([_event(PREDICTIONS[1], 1)])
    assert _open_times(await latest.get(["BTCUSDT"], "1m")) == [PREDICTIONS[1].candle_open_time]
    assert store.reads == 1


async def test_a_symbol_without_prediction_is_remembered_as_such() -> None:
    store = _Store({})
    latest = _latest(store)
    assert await latest.get(["BTCUSDT"], "1m") == []
    assert await latest.get(["BTCUSDT"], "1m") == []
    assert store.reads == 1
    latest.take([_event(PREDICTIONS[0], 1)])
    assert _open_times(await latest.get(["BTCUSDT"], "1m")) == [PREDICTIONS[0].candle_open_time]


async def test_the_newest_candle_wins_whichever_arrives_first() -> None:
    store = _Store({"BTCUSDT": PREDICTIONS[1]})
    latest = _latest(store)
    # An event newer than what the read will return arrives while the read is under way.
    store.during_read = lambda: latest.take([_event(PREDICTIONS[2], 2)])
    assert _open_times(await latest.get(["BTCUSDT"], "1m")) == [PREDICTIONS[2].candle_open_time]


async def test_a_read_racing_with_a_lost_subscription_is_not_kept() -> None:
    store = _Store({"BTCUSDT": PREDICTIONS[1]})
    latest = _latest(store)
    store.during_read = latest.forget
    assert _open_times(await latest.get(["BTCUSDT"], "1m")) == [PREDICTIONS[1].candle_open_time]
    store.during_read = lambda: None
    store.latest["BTCUSDT"] = PREDICTIONS[3]
    assert _open_times(await latest.get(["BTCUSDT"], "1m")) == [PREDICTIONS[3].candle_open_time]


async def test_a_read_racing_with_a_lost_subscription_answers_every_symbol() -> None:
    eth = make_predictions(make_candles([50.0], symbol="ETHUSDT"), [50.0])[0]
    store = _Store({"BTCUSDT": PREDICTIONS[0], "ETHUSDT": eth})
    latest = _latest(store)
    await latest.get(["BTCUSDT"], "1m")
    # ETHUSDT is read; the subscription is lost meanwhile, which empties BTCUSDT's entry too.
    store.during_read = latest.forget
    assert _open_times(await latest.get(["BTCUSDT", "ETHUSDT"], "1m")) == [
        PREDICTIONS[0].candle_open_time, eth.candle_open_time]


async def test_without_a_live_subscription_every_request_reads_the_store() -> None:
    live = [True]
    store = _Store({"BTCUSDT": PREDICTIONS[0]})
    latest = _latest(store, live)
    await latest.get(["BTCUSDT"], "1m")
    live[0] = False
    latest.forget()
    store.latest["BTCUSDT"] = PREDICTIONS[1]
    for _ in range(2):
        assert _open_times(await latest.get(["BTCUSDT"], "1m")) == [
            PREDICTIONS[1].candle_open_time]
    assert store.reads == 3
    assert await latest.known_symbols() == ["BTCUSDT"]
    assert store.reads == 4


async def test_known_symbols_are_read_once_and_grow_with_events() -> None:
    store = _Store({"BTCUSDT": PREDICTIONS[0]})
    latest = _latest(store)
    # A symbol written while the read is under way, which the read did not see.
    eth = make_predictions(make_candles([50.0], symbol="ETHUSDT"), [50.0])[0]
    store.during_read = lambda: latest.take([_event(eth, 1)])
    assert await latest.known_symbols() == ["BTCUSDT", "ETHUSDT"]
    store.during_read = lambda: None
    sol = make_predictions(make_candles([20.0], symbol="SOLUSDT"), [20.0])[0]
    latest.take([_event(sol, 2)])
    assert await latest.known_symbols() == ["BTCUSDT", "ETHUSDT", "SOLUSDT"]
    assert store.reads == 1


async def test_an_unreadable_prediction_event_is_skipped_and_read_again() -> None:
    store = _Store({"BTCUSDT": PREDICTIONS[0]})
    latest = _latest(store)
    await latest.get(["BTCUSDT"], "1m")
    latest.take([StoredEvent("5-0", "prediction", "BTCUSDT", "1m", b'{"symbol": 1}')])
    store.latest["BTCUSDT"] = PREDICTIONS[2]
    assert _open_times(await latest.get(["BTCUSDT"], "1m")) == [PREDICTIONS[2].candle_open_time]
    assert store.reads == 2


async def test_each_horizon_has_its_own_latest_prediction() -> None:
    candles = make_candles(_CLOSES)
    h5 = make_predictions(candles, _CLOSES, horizon=5)
    store = _Store({"BTCUSDT": PREDICTIONS[0]}, other_horizons=[h5[0]])
    latest = _latest(store)
    assert [json.loads(b)["horizon"] for b in await latest.get(["BTCUSDT"], "1m")] == [1]
    assert [json.loads(b)["horizon"] for b in await latest.get(["BTCUSDT"], "1m", 5)] == [5]
    assert await latest.get(["BTCUSDT"], "1m", 15) == []
    assert store.reads == 3
    # Events of one horizon update that horizon only, from the event's own JSON.
    latest.take([_event(h5[2], 1)])
    assert _open_times(await latest.get(["BTCUSDT"], "1m")) == [PREDICTIONS[0].candle_open_time]
    assert _open_times(await latest.get(["BTCUSDT"], "1m", 5)) == [h5[2].candle_open_time]
    latest.take([_event(PREDICTIONS[1], 2)])
    body = json.loads((await latest.get(["BTCUSDT"], "1m"))[0])
    assert (body["candle_open_time"], body["horizon"]) == (PREDICTIONS[1].candle_open_time, 1)
    assert _open_times(await latest.get(["BTCUSDT"], "1m", 5)) == [h5[2].candle_open_time]
    assert await latest.get(["BTCUSDT"], "1m", 15) == []
    assert store.reads == 3
    # The horizon-5 prediction targets 5 candles on.
    five = json.loads((await latest.get(["BTCUSDT"], "1m", 5))[0])
    assert five["target_open_time"] == five["candle_open_time"] + 5 * 60_000


def test_json_array() -> None:
    assert json.loads(json_array([b"1", b'{"a":2}'])) == [1, {"a": 2}]
    assert json_array([]) == b"[]"
