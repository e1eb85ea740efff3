"""Redis storage of candles, predictions and alerts: idempotent writes and the reads the API
needs.

The key layout is described in :mod:`makeusrich.core.keys`. Every write goes through one Lua
script so that the history entry, the latest value, the symbol set, the events-stream entry
and the pub/sub notification appear together or not at all. Alerts have no history: they
are only an events-stream entry and its notification.

History entries use ``{open_time}-0`` as their stream id, which makes writes idempotent: a
re-delivered record has the same id and Redis refuses it. It also refuses a record *older*
than the newest one stored for that symbol/interval. That is fine because the worker
produces each symbol/interval in order; a late out-of-order record is dropped and reported
as a duplicate (``None``).

Predictions of several horizons made at one candle share its open time, so each horizon
has its own history stream and latest value (horizon 1 on the keys it always had, see
:mod:`makeusrich.core.keys`); the events stream takes them all.
"""

import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, Final, Literal, TypeVar

import msgspec
import redis.asyncio as aioredis

from makeusrich.core.errors import ConfigError
from makeusrich.core.keys import RedisKeys
from makeusrich.core.schemas import (
    Alert,
    Candle,
    Prediction,
    candle_decoder,
    encode,
    now_ms,
    prediction_decoder,
)
from makeusrich.core.settings import Settings

__all__ = [
    "EventType",
    "RedisStore",
    "StoredEvent",
    "format_stream_id",
    "parse_event_message",
    "parse_stream_id",
]

EventType = Literal["candle", "prediction", "alert", "drift"]

_CONNECT_TIMEOUT_S: Final = 3.0
# Idle pooled/pub-sub connections are PINGed after this long, so dead sockets surface.
_HEALTH_CHECK_INTERVAL_S: Final = 15

_R = TypeVar("_R", Candle, Prediction)

# KEYS: history, latest, symbols, events.
# ARGV: history id, record JSON, history maxlen, events maxlen, type, symbol, interval, channel.
# An empty history id (alerts) skips the history, latest value and symbol set.
# redis.pcall so that only the "id too small" refusal is swallowed; other errors propagate.
# Uses only commands/options available since Redis 5/6.2.
_WRITE_LUA: Final = """
if ARGV[1] ~= '' then
  local added = redis.pcall('XADD', KEYS[1], 'MAXLEN', '~', ARGV[3], ARGV[1], 'd', ARGV[2])
  if type(added) == 'table' and added.err then
    if string.find(added.err, 'equal or smaller', 1, true) then
      return false
    end
    return redis.error_reply(added.err)
  end
  redis.call('SET', KEYS[2], ARGV[2])
  redis.call('SADD', KEYS[3], ARGV[6])
end
local event_id = redis.call('XADD', KEYS[4], 'MAXLEN', '~', ARGV[4], '*',
  'type', ARGV[5], 'symbol', ARGV[6], 'interval', ARGV[7], 'd', ARGV[2])
redis.call('PUBLISH', ARGV[8],
  event_id .. '\\n' .. ARGV[5] .. '\\n' .. ARGV[6] .. '\\n' .. ARGV[7] .. '\\n' .. ARGV[2])
return event_id
"""

# KEYS: history. ARGV: XRANGE|XREVRANGE, first bound, second bound, count.
# Returns the records as ONE JSON array, oldest first: a single bulk reply is far cheaper
# for redis-py to read than thousands of stream entries (~10x for 5000 candles).
_RANGE_LUA: Final = """
local entries = redis.call(ARGV[1], KEYS[1], ARGV[2], ARGV[3], 'COUNT', ARGV[4])
local n = #entries
local out = {}
for i = 1, n do
  local fields = entries[i][2]
  local data = '{}'
  for j = 1, #fields, 2 do
    if fields[j] == 'd' then data = fields[j + 1] end
  end
  if ARGV[1] == 'XREVRANGE' then out[n + 1 - i] = data else out[i] = data end
end
return '[' .. table.concat(out, ',') .. ']'
"""

_candles_decoder: Final = msgspec.json.Decoder(list[Candle])
_predictions_decoder: Final = msgspec.json.Decoder(list[Prediction])

_STREAM_ID_RE: Final = re.compile(r"^(\d+)(?:-(\d+))?$")


def parse_stream_id(text: str) -> tuple[int, int]:
    """``"1700000000000-3"`` -> ``(1700000000000, 3)``; a bare ``"ms"`` means sequence 0.

    Tuples compare the way Redis orders stream ids (plain string comparison does not).
    Raises ``ValueError`` for anything else.
    """
    match = _STREAM_ID_RE.match(text.strip())
    if match is None:
        raise ValueError(f"invalid stream id {text!r}; expected '<ms>-<seq>'")
    return int(match.group(1)), int(match.group(2) or 0)


def format_stream_id(key: tuple[int, int]) -> str:
    return f"{key[0]}-{key[1]}"


class _Horizon(msgspec.Struct):
    horizon: int = 1  # predictions written before the field existed were all horizon 1


_horizon_decoder: Final = msgspec.json.Decoder(_Horizon)


def _horizon_of(data: bytes) -> int:
    """The ``horizon`` of a prediction's JSON; 1 when absent or unreadable (as an event whose
    JSON cannot be read was always sent to every client)."""
    try:
        return _horizon_decoder.decode(data).horizon
    except msgspec.DecodeError:
        return 1


@dataclass(frozen=True, slots=True)
class StoredEvent:
    """One entry of the events stream: a candle or prediction as JSON, with its stream id.

    ``horizon`` is a prediction's (read from its JSON once, here, so that filters on it
    cost a comparison); 0 for other events.
    """

    id: str
    type: str
    symbol: str
    interval: str
    data: bytes
    key: tuple[int, int] = field(init=False, repr=False, compare=False)
    horizon: int = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "key", parse_stream_id(self.id))
        object.__setattr__(self, "horizon",
                           _horizon_of(self.data) if self.type == "prediction" else 0)


def parse_event_message(payload: bytes | str) -> StoredEvent:
    """Parse a pub/sub payload ``{id}\\n{type}\\n{symbol}\\n{interval}\\n{json}``.

    Raises ``ValueError`` when it is malformed. The JSON never contains a raw newline
    (msgspec escapes them), so splitting on the first four is safe.
    """
    raw = payload.encode() if isinstance(payload, str) else payload
    parts = raw.split(b"\n", 4)
    if len(parts) != 5:
        raise ValueError(f"malformed event message {raw[:80]!r}")
    event_id, kind, symbol, interval, data = parts
    return StoredEvent(event_id.decode(), kind.decode(), symbol.decode(), interval.decode(), data)


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


_Fields = dict[bytes, bytes]


def _raw(value: bytes | str | None) -> bytes | None:
    return value.encode() if isinstance(value, str) else value


def _entries(raw: Sequence[tuple[Any, Any]] | None) -> list[tuple[bytes, _Fields]]:
    """XRANGE/XREVRANGE reply -> ``[(id, fields)]``; redis-py types allow None parts (only
    XCLAIM-style replies have them), so drop those."""
    if not raw:
        return []
    return [(entry_id, fields) for entry_id, fields in raw if entry_id is not None and fields]


def _event_from_entry(entry_id: bytes, fields: _Fields) -> StoredEvent:
    def get(name: str) -> bytes:
        return fields.get(name.encode(), b"")

    return StoredEvent(
        _text(entry_id),
        get("type").decode(),
        get("symbol").decode(),
        get("interval").decode(),
        get("d"),
    )


class RedisStore:
    """Async access to the pipeline's Redis data (redis.asyncio, bytes responses).

    Build it with :meth:`from_settings` (owns its client) or pass a client in (tests).
    """

    def __init__(
        self,
        client: "aioredis.Redis",
        keys: RedisKeys,
        *,
        history_maxlen: int = 200_000,
        events_maxlen: int = 100_000,
    ) -> None:
        self._client = client
        self._keys = keys
        self._history_maxlen = history_maxlen
        self._events_maxlen = events_maxlen
        # Registered once; redis-py sends EVALSHA and reloads the script after NOSCRIPT.
        self._write_script = client.register_script(_WRITE_LUA)
        self._range_script = client.register_script(_RANGE_LUA)

    @classmethod
    def from_settings(cls, settings: Settings) -> "RedisStore":
        if not settings.redis_url:
            raise ConfigError("redis_url is not set; pass --redis-url or set MUR_REDIS_URL")
        client = aioredis.Redis.from_url(
            settings.redis_url,
            decode_responses=False,
            socket_connect_timeout=_CONNECT_TIMEOUT_S,
            socket_keepalive=True,
            health_check_interval=_HEALTH_CHECK_INTERVAL_S,
        )
        return cls(
            client,
            settings.redis_keys,
            history_maxlen=settings.history_maxlen,
            events_maxlen=settings.events_maxlen,
        )

    @property
    def client(self) -> "aioredis.Redis":
        return self._client

    @property
    def keys(self) -> RedisKeys:
        return self._keys

    async def aclose(self) -> None:
        await self._client.aclose()

    async def ping(self) -> bool:
        return bool(await self._client.ping())

    # ------------------------------------------------------------------ writes

    async def write_candle(self, candle: Candle) -> str | None:
        """Store a closed candle; returns its events-stream id, or None if already stored
        (or older than the newest stored candle of that symbol/interval)."""
        keys, args = self._write_args("candle", candle.symbol, candle.interval,
                                      candle.open_time, encode(candle))
        return self._event_id(await self._write_script(keys=keys, args=args))

    async def write_prediction(self, prediction: Prediction) -> str | None:
        """Store a prediction (history id = ``candle_open_time``, in the history of its
        ``horizon``); same contract as :meth:`write_candle`, per horizon: the predictions of
        several horizons made at one candle are all stored."""
        keys, args = self._prediction_args(prediction)
        return self._event_id(await self._write_script(keys=keys, args=args))

    async def write_alert(self, alert: Alert) -> str:
        """Append an alert to the events stream (type ``alert``, empty symbol and interval)
        and notify live SSE clients; returns its events-stream id."""
        keys, args = self._write_args("alert", "", "", None, encode(alert))
        event_id = self._event_id(await self._write_script(keys=keys, args=args))
        assert event_id is not None, "an event without history is never refused"
        return event_id

    async def write_drift(self, symbol: str, interval: str, data: bytes) -> str:
        """Append a drift event (``data``: its JSON) to the events stream (type ``drift``)
        and notify live SSE clients; returns its events-stream id."""
        keys, args = self._write_args("drift", symbol, interval, None, data)
        event_id = self._event_id(await self._write_script(keys=keys, args=args))
        assert event_id is not None, "an event without history is never refused"
        return event_id

    async def set_monitoring(
        self, symbol: str, interval: str, *, quality: bytes, drift: bytes
    ) -> None:
        """Replace a series' live-quality and drift status (each a JSON document)."""
        await self._client.mset({
            self._keys.monitoring("quality", symbol, interval): quality,
            self._keys.monitoring("drift", symbol, interval): drift,
        })

    async def monitoring(self, symbol: str, interval: str) -> tuple[bytes | None, bytes | None]:
        """A series' (quality, drift) JSON documents as last set; None where absent."""
        quality, drift = await self._client.mget([
            self._keys.monitoring("quality", symbol, interval),
            self._keys.monitoring("drift", symbol, interval),
        ])
        return _raw(quality), _raw(drift)

    async def write_many(self, records: Iterable[Candle | Prediction]) -> list[str | None]:
        """Write records in one round trip (pipeline, in order); one result per record."""
        records = list(records)
        if not records:
            return []
        async with self._client.pipeline(transaction=False) as pipe:
            for record in records:
                if isinstance(record, Candle):
                    keys, args = self._write_args("candle", record.symbol, record.interval,
                                                  record.open_time, encode(record))
                else:
                    keys, args = self._prediction_args(record)
                await self._write_script(keys=keys, args=args, client=pipe)
            results = await pipe.execute()
        return [self._event_id(result) for result in results]

    def _prediction_args(
        self, prediction: Prediction
    ) -> tuple[list[str], list[str | bytes | int]]:
        return self._write_args("prediction", prediction.symbol, prediction.interval,
                                prediction.candle_open_time, encode(prediction),
                                horizon=prediction.horizon)

    def _write_args(
        self, kind: EventType, symbol: str, interval: str, open_time_ms: int | None,
        data: bytes, *, horizon: int = 1,
    ) -> tuple[list[str], list[str | bytes | int]]:
        """Script keys and arguments; ``open_time_ms`` None writes no history."""
        keys = [
            self._keys.history(kind, symbol, interval, horizon),
            self._keys.latest(kind, symbol, interval, horizon),
            self._keys.symbols,
            self._keys.events,
        ]
        history_id = "" if open_time_ms is None else f"{open_time_ms}-0"
        args: list[str | bytes | int] = [
            history_id, data, self._history_maxlen, self._events_maxlen,
            kind, symbol, interval, self._keys.events_channel,
        ]
        return keys, args

    @staticmethod
    def _event_id(result: object) -> str | None:
        if result is None:
            return None
        if isinstance(result, bytes | str):
            return _text(result)
        raise TypeError(f"unexpected write-script reply {result!r}")

    # ------------------------------------------------------------------- reads

    async def candles(
        self,
        symbol: str,
        interval: str,
        start_ms: int | None = None,
        end_ms: int | None = None,
        limit: int = 500,
    ) -> list[Candle]:
        """Closed candles oldest first; ``start_ms``/``end_ms`` are inclusive on open_time.

        With a start: the first ``limit`` candles from it. Without one: the newest ``limit``
        candles up to ``end_ms`` (or now), still returned oldest first.
        """
        key = self._keys.history("candle", symbol, interval)
        return await self._history(key, start_ms, end_ms, limit, _candles_decoder)

    async def predictions(
        self,
        symbol: str,
        interval: str,
        start_ms: int | None = None,
        end_ms: int | None = None,
        limit: int = 500,
        *,
        horizon: int = 1,
    ) -> list[Prediction]:
        """Predictions of ``horizon`` oldest first, ranged on ``candle_open_time``; same
        rules as :meth:`candles`."""
        key = self._keys.history("prediction", symbol, interval, horizon)
        return await self._history(key, start_ms, end_ms, limit, _predictions_decoder)

    async def _history(
        self,
        key: str,
        start_ms: int | None,
        end_ms: int | None,
        limit: int,
        decoder: "msgspec.json.Decoder[list[_R]]",
    ) -> list[_R]:
        if limit <= 0 or (start_ms is not None and end_ms is not None and start_ms > end_ms):
            return []
        # A bare "<ms>" id means <ms>-0 as a start and <ms>-<max seq> as an end: inclusive.
        end = "+" if end_ms is None else str(end_ms)
        if start_ms is None:
            args: list[str | int] = ["XREVRANGE", end, "-", limit]
        else:
            args = ["XRANGE", str(start_ms), end, limit]
        raw = await self._range_script(keys=[key], args=args)
        return decoder.decode(raw)

    async def latest_candle(self, symbol: str, interval: str) -> Candle | None:
        raw = await self._client.get(self._keys.latest("candle", symbol, interval))
        return None if raw is None else candle_decoder.decode(raw)

    async def latest_predictions(
        self, symbols: Sequence[str], interval: str, horizon: int = 1
    ) -> dict[str, Prediction]:
        """Newest prediction of ``horizon`` per symbol in one round trip; symbols without
        one are absent."""
        if not symbols:
            return {}
        raws = await self._client.mget(
            [self._keys.latest("prediction", symbol, interval, horizon) for symbol in symbols]
        )
        return {
            symbol: prediction_decoder.decode(raw)
            for symbol, raw in zip(symbols, raws, strict=True)
            if raw is not None
        }

    async def known_symbols(self) -> list[str]:
        """Symbols the worker has written at least one record for, sorted."""
        members = await self._client.smembers(self._keys.symbols)
        return sorted(_text(member) for member in members)

    async def set_model(self, version: str, *, loaded_at_ms: int | None = None) -> None:
        """Publish the model the worker serves (read by /readyz): hash ``keys.model`` with
        ``version`` and ``loaded_at`` (epoch ms, default now)."""
        loaded_at_ms = now_ms() if loaded_at_ms is None else loaded_at_ms
        await self._client.hset(
            self._keys.model, mapping={"version": version, "loaded_at": str(loaded_at_ms)}
        )

    async def model_info(self) -> dict[str, str]:
        """The hash the worker publishes about the model it serves (empty if none)."""
        raw = await self._client.hgetall(self._keys.model)
        return {_text(name): _text(value) for name, value in raw.items()}

    async def worker_stats(self, worker_id: str, instance: str = "") -> dict[str, int]:
        """The counters worker ``worker_id`` (its ``instance``, if named) last published
        (empty before its first)."""
        raw = await self._client.hgetall(self._keys.worker_stats(worker_id, instance))
        return {_text(name): int(value) for name, value in raw.items()}

    async def events_after(self, last_id: str, count: int) -> list[StoredEvent]:
        """Up to ``count`` events strictly after ``last_id``, oldest first."""
        start = "(" + format_stream_id(parse_stream_id(last_id))
        entries = _entries(
            await self._client.xrange(self._keys.events, min=start, max="+", count=count)
        )
        return [_event_from_entry(entry_id, fields) for entry_id, fields in entries]

    async def last_event_id(self) -> str | None:
        """Id of the newest event, or None if the events stream is empty."""
        entries = _entries(
            await self._client.xrevrange(self._keys.events, max="+", min="-", count=1)
        )
        return _text(entries[0][0]) if entries else None
