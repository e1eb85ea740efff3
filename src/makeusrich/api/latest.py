"""The newest prediction per symbol, interval and horizon, answered from memory.

``GET /v1/predictions/latest`` is what polling clients call, many times a second. Reading
Redis for it (the symbol set, then the latest values) was most of its cost. The broadcaster
already receives every prediction the moment it is written (:meth:`LatestPredictions.take`),
so this process keeps the newest one per (symbol, interval, horizon), encoded once as
response JSON.

The memory is trusted only while the broadcaster's subscription is live and has been since
each entry was read: a lost subscription empties it (events may have been missed), and
requests read Redis until the subscription is back. Entries are filled from Redis on first
use. Redis keeps a prediction as the latest only if its candle opens after the current
one's, so the entry with the newest ``candle_open_time`` wins, whichever arrived first.
"""

import logging
from collections.abc import Callable, Iterable, Sequence
from typing import Final

import msgspec

from makeusrich.api.models import PredictionOut
from makeusrich.core.schemas import Prediction, prediction_decoder
from makeusrich.core.store import RedisStore, StoredEvent

__all__ = ["LatestPredictions", "json_array"]

log = logging.getLogger(__name__)

_MISSING: Final = (-1, b"")  # no prediction yet: newer than nothing, older than any


def _encoded(prediction: Prediction) -> tuple[int, bytes]:
    return prediction.candle_open_time, PredictionOut.from_record(prediction) \
        .model_dump_json().encode()


def json_array(items: Iterable[bytes]) -> bytes:
    """Encoded JSON values as one JSON array."""
    return b"[" + b",".join(items) + b"]"


class LatestPredictions:
    """Newest prediction JSON per (symbol, interval, horizon), and the symbols written so
    far."""

    def __init__(self, store: RedisStore, live: Callable[[], bool]) -> None:
        self._store = store
        self._live = live
        # (symbol, interval, horizon) -> (candle_open_time, PredictionOut JSON); b"" = none
        # yet.
        self._entries: dict[tuple[str, str, int], tuple[int, bytes]] = {}
        # Symbols read from Redis, and those seen in events since (a read can miss one
        # written while it was under way).
        self._symbols_read: set[str] | None = None
        self._symbols_seen: set[str] = set()
        # Bumped when the memory is emptied: a read of Redis started before is not kept.
        self._generation = 0

    def take(self, events: Iterable[StoredEvent]) -> None:
        """Note the predictions (and new symbols) among events just received, in order."""
        for event in events:
            if event.symbol:
                self._symbols_seen.add(event.symbol)
            if event.type != "prediction":
                continue
            key = (event.symbol, event.interval, event.horizon)
            try:
                self._keep(key, _encoded(prediction_decoder.decode(event.data)))
            except (msgspec.DecodeError, ValueError) as exc:
                # Sent as it is to live clients; polling reads this entry from Redis again.
                log.warning("unreadable prediction event %s: %s", event.id, exc)
                self._entries.pop(key, None)

    def forget(self) -> None:
        """Empty the memory: events may be missed from now on (subscription lost)."""
        self._entries.clear()
        self._symbols_read = None
        self._symbols_seen.clear()
        self._generation += 1

    async def known_symbols(self) -> list[str]:
        """Symbols written at least once, sorted (as :meth:`RedisStore.known_symbols`)."""
        if not self._live():
            return await self._store.known_symbols()
        if self._symbols_read is None:
            generation = self._generation
            read = set(await self._store.known_symbols())
            if generation != self._generation or not self._live():
                return sorted(read)
            self._symbols_read = read
        return sorted(self._symbols_read | self._symbols_seen)

    async def get(self, symbols: Sequence[str], interval: str, horizon: int = 1) -> list[bytes]:
        """The newest prediction of ``horizon`` of each of ``symbols`` that has one, as JSON,
        in order."""
        if not self._live():
            return await self._from_store(symbols, interval, horizon)
        missing = [s for s in symbols if (s, interval, horizon) not in self._entries]
        if missing:
            generation = self._generation
            read = await self._store.latest_predictions(missing, interval, horizon)
            if generation != self._generation or not self._live():
                # Emptied meanwhile, the other symbols' entries too: nothing here to trust.
                return await self._from_store(symbols, interval, horizon)
            for symbol in missing:
                self._keep((symbol, interval, horizon),
                           _encoded(read[symbol]) if symbol in read else _MISSING)
        entries = self._entries
        return [body for s in symbols if (body := entries[(s, interval, horizon)][1])]

    async def _from_store(self, symbols: Sequence[str], interval: str,
                          horizon: int) -> list[bytes]:
        read = await self._store.latest_predictions(symbols, interval, horizon)
        return [_encoded(read[symbol])[1] for symbol in symbols if symbol in read]

    def _keep(self, key: tuple[str, str, int], entry: tuple[int, bytes]) -> None:
        current = self._entries.get(key)
        if current is None or entry[0] > current[0]:
            self._entries[key] = entry
