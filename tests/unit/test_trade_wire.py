"""The ``trades`` topic's batch message, both wire versions (no broker)."""

import msgspec
import pytest

from kit.builders import random_trades
from makeusrich.core.schemas import TradeBatch, encode, encode_batch, trade_decoder


def _batch(count: int, seed: int = 1) -> TradeBatch:
    return TradeBatch.of(random_trades(count, seed=seed, symbols=("BTCUSDT",)))


def test_version_2_round_trips_bit_for_bit_and_is_under_half_of_version_1() -> None:
    batch = _batch(1_000)
    packed = encode_batch(batch)
    assert trade_decoder.decode(packed) == batch
    assert b'"v":2' in packed and b'"quote_qty"' not in packed  # each is price * qty
    assert len(packed) < 0.5 * len(encode(batch)), (len(packed), len(encode(batch)))


def test_version_2_keeps_any_order_of_ids_and_times() -> None:
    """Differences may be negative or zero: a batch holds what the source sent, in order."""
    batch = msgspec.structs.replace(_batch(6), trade_id=[9, 3, 3, 12, 1, 2],
                                    ts_event=[50, 40, 40, 70, 10, 10 ** 13])
    assert trade_decoder.decode(encode_batch(batch)) == batch


def test_version_2_sends_quote_qty_when_one_is_not_price_times_qty() -> None:
    """Binance files give quote_qty rounded: it then travels, so candles stay exact."""
    batch = _batch(50)
    rounded = [*batch.quote_qty[:-1], round(batch.quote_qty[-1], 2) + 0.001]
    batch = msgspec.structs.replace(batch, quote_qty=rounded)
    packed = encode_batch(batch)
    assert b'"quote_qty"' in packed
    assert trade_decoder.decode(packed) == batch


def test_an_empty_batch_round_trips() -> None:
    empty = TradeBatch("BTCUSDT", 5, [], [], [], [], [], [])
    assert trade_decoder.decode(encode_batch(empty)) == empty


def test_version_1_messages_still_decode() -> None:
    """Topics written before version 2 replay unchanged."""
    batch = _batch(100, seed=2)
    assert b'"v":1' in encode(batch)
    assert trade_decoder.decode(encode(batch)) == batch


@pytest.mark.parametrize(("change", "reason"), [
    ({"is_buyer_maker": "0120"}, "string of 0 and 1"),
    ({"is_buyer_maker": "01"}, "differ in length"),
    ({"price": [1.0]}, "differ in length"),
    ({"v": 1}, "version 1 batch has is_buyer_maker and quote_qty lists"),
    ({"v": 3}, "Invalid enum value 3"),
    ({"trade_id": ["x", 1, 1, 1]}, "Expected `int`"),
])
def test_a_batch_that_breaks_its_version_is_refused(change: dict[str, object],
                                                    reason: str) -> None:
    wire = {**msgspec.json.decode(encode_batch(_batch(4))), **change}
    with pytest.raises(msgspec.ValidationError, match=reason):
        trade_decoder.decode(msgspec.json.encode(wire))
