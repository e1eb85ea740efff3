"""Every Redis key and Kafka topic name, in one place.

Redis (``{p}`` is ``Settings.redis_prefix``, ``mur`` by default):

- ``{p}:symbols`` — set of symbols the worker has seen.
- ``{p}:candle:{symbol}:{interval}`` — stream of closed candles; entry id is
  ``{open_time}-0``, so a re-delivered candle is refused (idempotent writes) and
  ``XRANGE`` by time needs no index. Field ``d`` holds the JSON record. Capped (MAXLEN ~).
- ``{p}:prediction:{symbol}:{interval}`` — same, for the predictions of horizon 1 (the next
  candle), id ``{candle_open_time}-0``.
- ``{p}:prediction:{symbol}:{interval}:h{horizon}`` — same, for the predictions of horizon
  ``horizon`` > 1 (that many candles ahead), one stream per horizon: the predictions of
  every horizon made at one candle share its id. Horizon 1 has no ``:h1`` suffix, so the
  keys written before predictions had a horizon are still the horizon-1 keys.
- ``{p}:latest:candle:{symbol}:{interval}`` / ``{p}:latest:prediction:{symbol}:{interval}``
  / ``{p}:latest:prediction:{symbol}:{interval}:h{horizon}`` (horizon > 1) — string with
  the newest record's JSON.
- ``{p}:events`` — stream of every candle/prediction/alert/drift event (auto ids), the
  predictions of every horizon included (their JSON's ``horizon`` says which); the ids
  are the SSE event ids, so ``Last-Event-ID`` resumes with ``XRANGE (id +``. Fields
  ``type``, ``symbol``, ``interval``, ``d`` (alerts have an empty symbol and interval).
- ``{p}:events:live`` — pub/sub channel carrying ``{id}\\n{type}\\n{symbol}\\n{interval}\\n{d}``
  for each new event, fanned out to SSE clients by each API process.
- ``{p}:monitoring:quality:{symbol}:{interval}`` / ``{p}:monitoring:drift:{symbol}:{interval}``
  — JSON of the series' rolling live-quality scores (a list, one per model version) and of
  its drift status, replaced by the worker as each candle closes.
- ``{p}:model`` — hash describing the model the worker serves (version, loaded_at).
- ``{p}:worker:{worker_id}`` — hash of the worker's counters (trades, candles, predictions,
  dead_letters, late, duplicates, model_rejections, end_of_streams, drift_events,
  read_backs) and ``partitions``, the number of trades partitions it holds now; refreshed
  every second. ``worker_id`` is the Faust app id and consumer group. Several workers of one
  group (scale-out) each set ``MUR_WORKER_INSTANCE`` and publish to their own
  ``{p}:worker:{worker_id}:{instance}`` instead; a group's totals are the sum over its
  instances (each counts what it processed, so messages a rebalance handed over can be
  counted twice).
- ``{p}:backtest:{job_id}`` — hash of one backtest job run by the API (``status``
  queued|running|done|failed, ``stage``, ``progress``, ``message``, ``created_ms``,
  ``updated_ms``, ``request``/``metrics``/``files`` as JSON, ``report_dir``, ``owner``).
  ``updated_ms`` doubles as the owner's heartbeat. Expires 7 days after its last update.
- ``{p}:backtest:{job_id}:events`` — capped stream of that job's progress events (fields
  ``type`` progress|done|failed and ``d`` JSON); the ids are the SSE event ids of
  ``/v1/backtests/{id}/events``. Same expiry as the hash.

API keys and their limits (:mod:`makeusrich.access`). A key is ``mur_`` + 32 url-safe
characters; its first 8 after ``mur_`` are its public id. Redis never holds a key, only its
sha256. A *subject* is what limits apply to: ``key:{id}``, or ``ip:{address}`` for anonymous
clients; a *route class* is ``read``, ``stream`` or ``backtest``.

- ``{p}:apikey:{sha256}`` — hash: the record of the key whose sha256 (hex) this is: ``id``,
  ``name``, ``plan`` (free|pro|custom), ``rpm``, ``daily``, ``sse``, ``admin`` (0|1),
  ``created_ms``, and ``revoked_ms`` once revoked (absent while the key is active).
- ``{p}:apikeys`` — hash: key id -> sha256, to find a record by its id (list, revoke, usage).
- ``{p}:access:bucket:{subject}:{class}`` — hash: the subject's token bucket for a route
  class: ``u`` (tokens, in 1/60000ths of a token) and ``t`` (Redis time of the last update,
  epoch ms). Expires once it would be full again.
- ``{p}:access:quota:{subject}`` — hash: the subject's requests of the current UTC day:
  ``day`` (days since the epoch), ``total``, ``read``, ``stream``, ``backtest``, ``last_ms``.
  Expires at the next UTC midnight.
- ``{p}:access:streams:{subject}`` — sorted set: the subject's open SSE streams (one lease
  id each, member) scored by when the lease expires (Redis time, epoch ms); the API process
  serving a stream refreshes its lease while it is open and removes it when it ends.

Kafka topics (``{t}`` is ``Settings.topic_prefix``, empty by default): ``{t}trades``
(keyed by symbol), ``{t}candles``, ``{t}predictions``, ``{t}trades-dlq``, and
``{t}model-control`` (model announcements, read by every worker outside any consumer group).
"""

from dataclasses import dataclass


def _horizon_suffix(horizon: int) -> str:
    """``""`` for horizon 1 (the keys as they were before horizons), else ``":h{horizon}"``."""
    if horizon == 1:
        return ""
    if horizon < 1:
        raise ValueError(f"a prediction horizon is a positive number of candles, not {horizon}")
    return f":h{horizon}"


@dataclass(frozen=True, slots=True)
class RedisKeys:
    prefix: str = "mur"

    @property
    def symbols(self) -> str:
        return f"{self.prefix}:symbols"

    @property
    def events(self) -> str:
        return f"{self.prefix}:events"

    @property
    def events_channel(self) -> str:
        return f"{self.prefix}:events:live"

    @property
    def model(self) -> str:
        return f"{self.prefix}:model"

    def worker_stats(self, worker_id: str, instance: str = "") -> str:
        base = f"{self.prefix}:worker:{worker_id}"
        return f"{base}:{instance}" if instance else base

    def history(self, kind: str, symbol: str, interval: str, horizon: int = 1) -> str:
        """History stream of ``kind`` records; ``horizon`` (predictions only) > 1 gets a
        stream of its own, ``...:h{horizon}``."""
        return f"{self.prefix}:{kind}:{symbol}:{interval}{_horizon_suffix(horizon)}"

    def latest(self, kind: str, symbol: str, interval: str, horizon: int = 1) -> str:
        """Newest ``kind`` record; ``horizon`` as in :meth:`history`."""
        return f"{self.prefix}:latest:{kind}:{symbol}:{interval}{_horizon_suffix(horizon)}"

    def monitoring(self, kind: str, symbol: str, interval: str) -> str:
        return f"{self.prefix}:monitoring:{kind}:{symbol}:{interval}"

    def backtest(self, job_id: str) -> str:
        return f"{self.prefix}:backtest:{job_id}"

    def backtest_events(self, job_id: str) -> str:
        return f"{self.prefix}:backtest:{job_id}:events"

    def api_key(self, key_hash: str) -> str:
        return f"{self.prefix}:apikey:{key_hash}"

    @property
    def api_key_ids(self) -> str:
        return f"{self.prefix}:apikeys"

    def rate_bucket(self, subject: str, route_class: str) -> str:
        return f"{self.prefix}:access:bucket:{subject}:{route_class}"

    def daily_quota(self, subject: str) -> str:
        return f"{self.prefix}:access:quota:{subject}"

    def stream_leases(self, subject: str) -> str:
        return f"{self.prefix}:access:streams:{subject}"


@dataclass(frozen=True, slots=True)
class Topics:
    prefix: str = ""

    @property
    def trades(self) -> str:
        return f"{self.prefix}trades"

    @property
    def candles(self) -> str:
        return f"{self.prefix}candles"

    @property
    def predictions(self) -> str:
        return f"{self.prefix}predictions"

    @property
    def dead_letter(self) -> str:
        return f"{self.prefix}trades-dlq"

    @property
    def model_control(self) -> str:
        return f"{self.prefix}model-control"

    @property
    def all(self) -> tuple[str, ...]:
        return (self.trades, self.candles, self.predictions, self.dead_letter,
                self.model_control)
