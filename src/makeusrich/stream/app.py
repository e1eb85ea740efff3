"""The Faust worker: a thin adapter from the ``trades`` topic to ``TradePipeline``.

Per message: decode (msgspec) -> validate -> ``TradePipeline.process`` (a single trade or
end-of-stream marker) or ``TradePipeline.process_batch`` (a :class:`TradeBatch`'s valid
trades, as numpy columns: the cost is per batch, not per trade). When candles close,
they go to the ``candles`` topic and Redis, predictions to ``predictions`` and Redis, and
the symbol's builder state to a plain Faust table (changelog-backed), so a restarted worker
resumes mid-candle. Candles are built by our own event-time code, not Faust's windowed
tables: those close windows on the wall clock and never fire close callbacks for windows
restored from the changelog.

Delivery is at-least-once by default; duplicates are harmless because the builders drop
trade ids they have seen and Redis refuses a candle id it already holds. The ``candles``,
``predictions`` and ``trades-dlq`` topics can therefore hold a record more than once (after
a restart or a rebalance): their consumers key on (symbol, interval, open_time; and horizon
for predictions). On Apache
Kafka, ``Settings.processing_guarantee = "exactly_once"`` runs Faust's transactions (see
:mod:`makeusrich.stream._transactions`): read_committed consumers see each record once.

Scale-out: workers with the same ``Settings.worker_id`` (the consumer group) share the
``trades`` partitions, as evenly as they divide (so up to ``Settings.trades_partitions``
workers are useful); a partition that moves resumes on its new owner from the table
snapshot, so adding or killing a worker loses and duplicates nothing in Redis. Each
sets its own ``Settings.worker_instance`` (``auto``: the host name) to publish its counters
to its own hash (see :mod:`makeusrich.core.keys`).

Redis outages: a failed write to Redis is retried with capped backoff until Redis answers
again; meanwhile the agent waits (its trades stay unacked, the broker keeps them), the stats
timer skips its beats, each failure is counted (``mur_redis_errors_total``) and the log says
once when the outage begins and once when it ends. Candle and prediction writes are
idempotent, so a retry never doubles them; an alert or drift event whose write failed after
Redis applied it can appear twice on the events stream.

Hostile input: a message that does not decode, names a symbol outside ``Settings.symbols``,
or carries values no trade has (non-positive or absurd amounts, a quote quantity that is not
price x quantity, integers beyond int64, times before 2009 or more than a day ahead) is
dead-lettered with its reason and counted, like a late trade; nothing a message holds can
stop the worker. Inside a batch each trade is judged alone: the invalid ones are
dead-lettered one by one (as single trades) and the rest folded in.

Models are hot-swapped: announcements on the ``model-control`` topic (see
:mod:`makeusrich.stream.control`) replace the forecaster between two messages once the new
version passed its checks; a rejected one leaves the old model serving and raises an alert.

Prometheus metrics (:class:`makeusrich.core.metrics.WorkerMetrics`) are served on
``Settings.worker_metrics_port`` when it is set. Each is measured here: trades consumed and
ingest lag per folded trade, dead letters where they are sent, candles, predictions, late
trades, inference and candle-close latency once a message's outputs are written, the model
info on every (hot) swap, Redis and Kafka errors around each write and send.
"""

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import faust
import msgspec
import numpy as np
from aiokafka import AIOKafkaConsumer, TopicPartition
from faust.types import TP, EventT
from prometheus_client import Counter
from prometheus_client.context_managers import ExceptionCounter
from redis.exceptions import RedisError
from redis.typing import EncodableT, FieldT

from makeusrich.core.errors import ModelError, StreamError
from makeusrich.core.metrics import WorkerMetrics, serve_metrics
from makeusrich.core.schemas import (
    Alert,
    DeadLetter,
    EndOfStream,
    ModelAnnouncement,
    Trade,
    TradeBatch,
    encode,
    now_ms,
    trade_decoder,
)
from makeusrich.core.settings import Settings
from makeusrich.core.store import RedisStore
from makeusrich.inference import Forecaster, Registry
from makeusrich.monitoring import MonitorConfig, latest_per_series, store_observations
from makeusrich.stream._transactions import SourceTransactions
from makeusrich.stream.candles import Mask, TradeColumns
from makeusrich.stream.control import (
    ModelWatcher,
    load_announced,
    load_serving_models,
    registry_root,
)
from makeusrich.stream.pipeline import Outputs, TradePipeline

__all__ = ["WorkerStats", "create_app", "run_worker"]

log = logging.getLogger(__name__)

_SNAPSHOT_EVERY_S = 1.0  # how often each symbol folded since its last snapshot is saved
# A partition whose consumer position is past the last message delivered, with nothing
# delivered for this long, had fetched messages dropped (see read_back_stranded).
_STRANDED_AFTER_S = 2.0
# Exactly-once: Faust's own commit timer and count are turned off (snapshot_folded commits).
_NEVER_S = 365 * 24 * 3600.0
_NEVER = 2**62
# What a failed Redis call raises (timeouts are OSError too); anything else is a bug.
_REDIS_FAILURES = (RedisError, OSError)
_REDIS_RETRY_FIRST_S = 0.05
_REDIS_RETRY_MAX_S = 2.0  # also the longest a worker lags behind a Redis that came back

# Bounds of a plausible trade. Binance ids and times are int64; no crypto trade predates
# the Bitcoin genesis block, and one from more than a day ahead means a broken or hostile
# clock (each would make the candle builders emit every empty candle in between).
_INT64_MAX = 2**63 - 1
_EARLIEST_TS_MS = 1_230_940_800_000  # 2009-01-03 UTC
_MAX_AHEAD_MS = 86_400_000
# Far above any exchange's price or quantity, and keeps candle sums far from overflowing.
_MAX_AMOUNT = 1e12
# Binance states quote_qty to 8 decimals; sources compute price * qty otherwise.
_QUOTE_REL_TOLERANCE = 1e-6
_QUOTE_ABS_TOLERANCE = 1e-8

_T = TypeVar("_T")


class WorkerStats:
    """Counters the worker publishes to Redis every second (``mur`` and tests read them;
    Prometheus gets the finer-grained :class:`WorkerMetrics`)."""

    def __init__(self) -> None:
        self.trades = 0
        self.dead_letters = 0
        self.late = 0
        self.candles = 0
        self.predictions = 0
        self.duplicates = 0
        self.model_rejections = 0
        self.end_of_streams = 0
        self.drift_events = 0
        self.read_backs = 0  # spans of trades Faust skipped, read back from the topic
        self.partitions = 0  # trades partitions this instance holds now (not a counter)

    def as_dict(self) -> dict[FieldT, EncodableT]:
        """The counters as the Redis hash's fields."""
        return {name: count for name, count in vars(self).items()}


def _invalid_reason(message: Trade | EndOfStream, symbols: frozenset[str]) -> str | None:
    """Why a decoded message cannot be a trade (or end-of-stream marker) of ``symbols``;
    None when it can."""
    if message.symbol not in symbols:
        return f"unknown symbol {message.symbol[:40]!r} (not in MUR_SYMBOLS)"
    if not _EARLIEST_TS_MS <= message.ts_event <= now_ms() + _MAX_AHEAD_MS:
        return f"ts_event {message.ts_event} is not a time between 2009 and tomorrow"
    if not 0 <= message.ts_ingest <= _INT64_MAX:
        return f"ts_ingest {message.ts_ingest} is out of range"
    if isinstance(message, EndOfStream):
        return None
    if not 0 <= message.trade_id <= _INT64_MAX:
        return f"trade_id {message.trade_id} is out of range"
    # The hot path: a few comparisons, which NaN fails too (msgspec lets none through).
    price, qty, quote_qty = message.price, message.qty, message.quote_qty
    if not (0 < price <= _MAX_AMOUNT and 0 < qty <= _MAX_AMOUNT):
        return _amount_reason(price, qty)
    expected = price * qty
    if not abs(quote_qty - expected) <= _QUOTE_REL_TOLERANCE * expected + _QUOTE_ABS_TOLERANCE:
        return f"quote_qty {quote_qty!r} is not price * qty ({expected!r})"
    return None


def _valid_rows(trades: TradeColumns, symbols: frozenset[str]) -> Mask:
    """Where ``_invalid_reason`` finds nothing wrong with a batch's trade, for all at once
    (the same comparisons in the same float arithmetic)."""
    if trades.symbol not in symbols or not 0 <= trades.ts_ingest <= _INT64_MAX:
        return np.zeros(len(trades), np.bool_)
    ts, price, qty = trades.ts_event, trades.price, trades.qty
    expected = price * qty
    valid: Mask = (
        (ts >= _EARLIEST_TS_MS) & (ts <= now_ms() + _MAX_AHEAD_MS) & (trades.trade_id >= 0)
        & (price > 0) & (price <= _MAX_AMOUNT) & (qty > 0) & (qty <= _MAX_AMOUNT)
        & (np.abs(trades.quote_qty - expected)
           <= _QUOTE_REL_TOLERANCE * expected + _QUOTE_ABS_TOLERANCE)
    )
    return valid


def _split(batch: TradeBatch, symbols: frozenset[str]
           ) -> tuple[TradeColumns | None, list[tuple[str, Trade]]]:
    """A batch's valid trades as columns (None when there are none), and each invalid
    trade with the reason ``_invalid_reason`` gives it."""
    if not len(batch):
        return None, []
    try:
        columns = TradeColumns.of(batch)
        if _valid_rows(columns, symbols).all():
            return columns, []
    except OverflowError:
        pass  # an integer beyond int64: judged trade by trade below
    valid: list[Trade] = []
    invalid: list[tuple[str, Trade]] = []
    for trade in batch.trades():
        reason = _invalid_reason(trade, symbols)
        if reason is None:
            valid.append(trade)
        else:
            invalid.append((reason, trade))
    return (TradeColumns.of(TradeBatch.of(valid)) if valid else None), invalid


def _amount_reason(price: float, qty: float) -> str:
    for name, value in (("price", price), ("qty", qty)):
        if not value > 0:
            return f"{name} must be positive, got {value!r}"
        if not value <= _MAX_AMOUNT:
            return f"{name} {value!r} is absurdly large"
    raise AssertionError("both amounts are plausible")


class _RedisCalls:
    """Runs the worker's Redis calls through outages: each failure is counted in
    ``errors`` (by operation), the log says once when an outage starts and once when it
    ends, however many calls fail meanwhile."""

    def __init__(self, errors: Counter, name: str) -> None:
        self._errors = errors
        self._name = name  # the worker (and instance) the log lines name
        self._outage_since_s: float | None = None

    async def until_done(self, operation: str, call: Callable[[], Awaitable[_T]]) -> _T:
        """``call()`` retried with capped backoff until Redis answers: the caller waits
        (backpressure). A failed call may have been applied: a non-idempotent one can take
        effect twice. Cancellation (stopping the worker) ends the wait."""
        delay_s = _REDIS_RETRY_FIRST_S
        while True:
            try:
                result = await call()
            except _REDIS_FAILURES as exc:
                self._failed(operation, exc)
                await asyncio.sleep(delay_s)
                delay_s = min(2 * delay_s, _REDIS_RETRY_MAX_S)
                continue
            self._succeeded()
            return result

    async def once(self, operation: str, call: Callable[[], Awaitable[object]]) -> None:
        """``call()`` once; a failure is counted and logged like the others, not raised."""
        try:
            await call()
        except _REDIS_FAILURES as exc:
            self._failed(operation, exc)
        else:
            self._succeeded()

    def _failed(self, operation: str, exc: BaseException) -> None:
        self._errors.labels(operation).inc()
        if self._outage_since_s is None:
            self._outage_since_s = time.monotonic()
            log.error("%s: Redis is failing (%s: %s); waiting for it, trades stay unacked "
                      "until their candles are written", self._name, operation, exc)

    def _succeeded(self) -> None:
        if self._outage_since_s is not None:
            log.warning("%s: Redis is back after %.1f s", self._name,
                        time.monotonic() - self._outage_since_s)
            self._outage_since_s = None


def create_app(settings: Settings, forecaster: Forecaster | None = None,
               metrics: WorkerMetrics | None = None) -> faust.App:
    """Build the Faust app for ``settings`` (the broker must be reachable at start);
    ``metrics`` receives its measurements (default: a set nobody serves)."""
    assert settings.kafka_bootstrap and settings.redis_url, "resolve service URLs first"
    instance = settings.worker_instance
    name = f"{settings.worker_id}:{instance}" if instance else settings.worker_id
    # Apache Kafka has transactions: outputs, table snapshots and offsets commit together
    # (stream._transactions), only where snapshot_folded says (see below).
    exactly_once = settings.processing_guarantee == "exactly_once"
    commits: dict[str, Any] = ({"broker_commit_interval": _NEVER_S, "broker_commit_every": _NEVER}
                               if exactly_once else {})
    app = faust.App(
        settings.worker_id,
        processing_guarantee="exactly_once" if exactly_once else "at_least_once",
        **commits,
        broker=f"kafka://{settings.kafka_bootstrap}",
        store="memory://",
        # Records (and table snapshots) are msgspec JSON already: Faust moves raw bytes.
        key_serializer="raw",
        value_serializer="raw",
        topic_partitions=settings.trades_partitions,
        topic_allow_declare=True,
        topic_replication_factor=settings.kafka_replication_factor,
        broker_rebalance_timeout=settings.broker_rebalance_timeout_s,
        broker_session_timeout=settings.broker_session_timeout_s,
        broker_heartbeat_interval=1.0,
        consumer_auto_offset_reset="earliest",
        # Events stay unacked until a snapshot covers them (see below): stopping or
        # rebalancing must not wait for them; they are redelivered.
        stream_wait_empty=False,
        # No standby table copies: with them Faust's assignor lets each worker keep up to
        # ceil(partitions / workers), so a third worker on four partitions gets none. The
        # table is one small snapshot per symbol; a new owner reads it from the changelog.
        table_standby_replicas=0,
        datadir=str(settings.state_dir / "faust"),
        web_enabled=False,
        producer_acks=-1,
        # Names the group member on the broker.
        broker_client_id=f"mur-worker-{name.replace(':', '-')}",
    )
    if exactly_once:
        app.transport.TransactionManager = SourceTransactions
    settings.state_dir.mkdir(parents=True, exist_ok=True)
    topics = settings.topics
    raw: dict[str, Any] = {"key_type": bytes, "value_type": bytes}
    trades_topic = app.topic(topics.trades, partitions=settings.trades_partitions, **raw)
    candles_topic = app.topic(topics.candles, **raw)
    predictions_topic = app.topic(topics.predictions, **raw)
    dlq_topic = app.topic(topics.dead_letter, **raw)
    # symbol -> msgspec JSON snapshot of its candle builders and recent candles
    state = app.Table("candle-state", default=None, partitions=settings.trades_partitions,
                      **raw)
    if forecaster is None:
        shared, own = load_serving_models(settings)
    else:
        shared, own = forecaster, {}
    metrics = WorkerMetrics() if metrics is None else metrics
    pipeline = TradePipeline(settings.intervals, settings.grace_ms, shared,
                             MonitorConfig.from_settings(settings), settings.conformal_step,
                             large_trade_quote=settings.large_trade_quote)
    metrics.model_served(None, shared.version)
    metrics.count_duplicates(lambda: pipeline.duplicates)
    store = RedisStore.from_settings(settings)
    redis = _RedisCalls(metrics.redis_errors, name)
    stats = WorkerStats()
    stats_key = settings.redis_keys.worker_stats(settings.worker_id, instance)
    symbols = frozenset(settings.symbols)

    def serve(model: Forecaster | None, symbol: str | None = None) -> None:
        pipeline.set_forecaster(model, symbol)
        metrics.model_served(symbol, None if model is None else model.version)

    for symbol, model in own.items():
        serve(model, symbol)

    # Failures still propagate as before; this only counts them.
    def kafka_errors(topic: str) -> ExceptionCounter:
        return metrics.kafka_errors.labels(topic).count_exceptions(Exception)

    async def dead_letter(reason: str, payload: bytes | str, stage: str = "worker") -> None:
        stats.dead_letters += 1
        metrics.dead_letter(reason)
        text = payload if isinstance(payload, str) else payload.decode("utf-8", "replace")
        letter = DeadLetter(reason=reason, payload=text[:10_000], stage=stage, ts_ingest=now_ms())
        with kafka_errors("dead_letter"):
            await dlq_topic.send(value=encode(letter))

    async def ship(out: Outputs, closed_by_ingest_ms: int) -> None:
        """Write what one message produced; ``closed_by_ingest_ms``: that message's
        ts_ingest, the start of the candle-close latency."""
        with kafka_errors("candles"):
            for candle in out.candles:
                await candles_topic.send(key=candle.symbol.encode(), value=encode(candle))
        with kafka_errors("predictions"):
            for prediction in out.predictions:
                await predictions_topic.send(key=prediction.symbol.encode(),
                                             value=encode(prediction))
        # One round trip; candle and prediction ids make a repeated write a no-op.
        await redis.until_done("write", lambda: store.write_many([*out.candles,
                                                                  *out.predictions]))
        await redis.until_done("write", lambda: store_observations(store, out.monitoring))
        for observation in latest_per_series(out.monitoring):
            metrics.monitored(observation)
        stats.drift_events += sum(len(o.events) for o in out.monitoring)
        metrics.closed(out.candles, out.predictions, out.inference_s, out.late,
                       closed_by_ingest_ms, time.time())
        for trade in out.late:
            await dead_letter("late: its candle had already closed", encode(trade))
        stats.candles += len(out.candles)
        stats.predictions += len(out.predictions)
        stats.late += len(out.late)

    async def reject_model(version: str, ts_event: int, exc: ModelError,
                           symbol: str | None = None) -> None:
        stats.model_rejections += 1
        metrics.model_rejections.inc()
        serving = pipeline.forecaster if symbol is None else pipeline.forecaster_for(symbol)
        log.error("model %s%s rejected, still serving %s: %s", version,
                  "" if symbol is None else f" for {symbol}", serving.version, exc)
        alert = Alert(kind="model_rejected", message=str(exc), model_version=version,
                      ts_event=ts_event, ts_ingest=now_ms())
        await redis.until_done("alert", lambda: store.write_alert(alert))

    async def swap_model(announcement: ModelAnnouncement) -> None:
        """Serve the announced version if it passes every check; else keep the old one.
        An announcement with a symbol changes only that symbol's model."""
        symbol = announcement.symbol
        current = (pipeline.forecaster if symbol is None
                   else pipeline.forecaster_for(symbol)).version
        root = registry_root(settings)
        if symbol is not None:
            try:
                own = await asyncio.to_thread(lambda: Registry(root).symbol_champions())
            except ModelError as exc:
                await reject_model(announcement.version, announcement.ts_event, exc, symbol)
                return
            if symbol not in own:
                # Rolled back to the shared champion: follow it (and its later promotions).
                serve(None, symbol)
                log.info("%s: now serving the shared model %s (was %s)", symbol,
                         pipeline.forecaster.version, current)
                return
        if announcement.version == current:
            return
        try:
            # Off the event loop: loading and the parity check take a while, and trades keep
            # flowing through the old model meanwhile.
            forecaster = await asyncio.to_thread(load_announced, root, announcement)
        except ModelError as exc:
            await reject_model(announcement.version, announcement.ts_event, exc, symbol)
            return
        # Atomic between candles: this runs in the agent's event loop, the agent handles one
        # message at a time and TradePipeline.process (which predicts) never awaits, so the
        # swap lands between two messages and each prediction names the model that made it.
        serve(forecaster, symbol)
        if symbol is None:  # the redis entry names the shared model
            await redis.until_done("model", lambda: store.set_model(forecaster.version))
        log.info("%snow serving model %s (was %s)", "" if symbol is None else f"{symbol}: ",
                 forecaster.version, current)

    @app.task
    async def follow_models() -> None:
        watcher = ModelWatcher(settings)
        await watcher.start()
        try:
            # Said once the watcher listens: an announcement made after a client saw this
            # worker serving is never missed.
            log.info("worker %s serving %s", name, pipeline.forecaster.version)
            await redis.until_done("model",
                                   lambda: store.set_model(pipeline.forecaster.version))
            # A promotion between loading the model and pinning the control topic's end
            # was not announced to this worker: the champion read now covers it.
            try:
                champion = await asyncio.to_thread(watcher.champion)
                own = await asyncio.to_thread(watcher.symbol_champions)
            except ModelError as exc:
                await reject_model("", now_ms(), exc)
            else:
                for announced in ([] if champion is None else [champion]) + own:
                    await swap_model(announced)
            async for announcement in watcher.announcements():
                await swap_model(announcement)
        finally:
            await watcher.stop()

    @app.timer(1.0)
    async def publish_stats() -> None:
        # Skipped while Redis is down: the next beat publishes the then current counters.
        stats.duplicates = pipeline.duplicates
        stats.partitions = sum(tp.topic == topics.trades for tp in app.consumer.assignment())
        await redis.once("stats", lambda: store.client.hset(
            stats_key, mapping=stats.as_dict()))

    # Resuming exactly. An event is acked (so its offset may be committed) only once a
    # snapshot holding its effect is in the changelog; Faust flushes the producer before it
    # commits. Each snapshot records the offset of the last trade folded into it. Two
    # things can still hide trades, both seen with Tansu: its ListOffsets reports the base
    # offset of a partition's last batch as the end, so Faust's table recovery can stop one
    # batch short and restore an older snapshot; and Faust skips messages below an offset it
    # takes for committed. So a symbol resumed from a snapshot older than its first event,
    # and any forward jump in a partition's offsets, is filled by reading the span back.
    # On Apache Kafka too: there Faust skipped spans after rebalances in 2 of 5 scale-out
    # runs. Every read-back is logged and counted (``read_backs`` in the worker's stats), so
    # none goes unseen.
    # Trades seen twice are dropped by trade id; Redis refuses candle ids it holds.
    pending: dict[str, list[EventT[bytes]]] = {}
    partition_of: dict[str, int] = {}
    folded_offset: dict[str, int] = {}
    delivered: dict[int, int] = {}  # partition -> last offset handled
    stranded_at: dict[int, int] = {}  # partition -> position seen ahead, at the last check
    # This process's newest snapshot per symbol: after a rebalance Faust may hand back a
    # table restored one batch short, or none.
    own_snapshots: dict[str, dict[str, Any]] = {}
    last_delivery = time.monotonic()
    unsaved: set[str] = set()  # symbols folded into since their last snapshot
    acks: faust.StreamT[bytes] | None = None
    # The agent and read_back_stranded both fold messages in: one at a time.
    handling = asyncio.Lock()

    async def save(symbol: str) -> None:
        snapshot = {"offset": folded_offset[symbol], "state": pipeline.snapshot(symbol)}
        own_snapshots[symbol] = snapshot
        key, value = symbol.encode(), msgspec.json.encode(snapshot)
        state.data[key] = value
        state.send_changelog(partition_of[symbol], key, value)
        assert acks is not None
        for event in pending.pop(symbol, ()):
            await acks.ack(event)

    async def decode(raw: bytes | None) -> Trade | EndOfStream | TradeColumns | None:
        """The message (a batch: its valid trades), or None once it has been dead-lettered
        (a batch: when none of its trades is valid)."""
        if raw is None:  # a record without a value (a tombstone)
            await dead_letter("undecodable: no value", b"")
            return None
        try:
            message: Trade | EndOfStream | TradeBatch = trade_decoder.decode(raw)
        except (msgspec.DecodeError, msgspec.ValidationError) as exc:
            await dead_letter(f"undecodable: {exc}", raw)
            return None
        if isinstance(message, TradeBatch):
            columns, invalid = _split(message, symbols)
            for why, trade in invalid:
                await dead_letter(f"invalid: {why}", encode(trade))
            return columns
        reason = _invalid_reason(message, symbols)
        if reason is not None:
            await dead_letter(f"invalid: {reason}", raw)
            return None
        return message

    async def fold(message: Trade | EndOfStream | TradeColumns) -> None:
        """Process one message (a batch: its valid trades) and ship what it closed."""
        if isinstance(message, TradeColumns):
            stats.trades += len(message)
            metrics.trades(message.symbol, message.source, message.ts_ingest,
                           message.ts_event)
            pipeline.process_batch(message)
        else:
            stats.trades += 1
            if isinstance(message, EndOfStream):
                stats.end_of_streams += 1
            else:
                metrics.trade(message)
            pipeline.process(message)
        if pipeline.has_output:
            await ship(pipeline.drain(), message.ts_ingest)

    async def resume(symbol: str, partition: int, offset: int) -> None:
        """Restore a symbol from its newest snapshot and fold in what came after it."""
        saved = state.get(symbol.encode())
        candidates = [msgspec.json.decode(saved)] if saved else []
        if symbol in own_snapshots:
            candidates.append(own_snapshots[symbol])
        if not candidates:
            pipeline.forget(symbol)
            return
        snapshot = max(candidates, key=lambda candidate: int(candidate["offset"]))
        pipeline.restore(symbol, snapshot["state"])
        missed = await _read_span(settings, partition, snapshot["offset"] + 1, offset)
        for _, raw in missed:
            if raw is None:
                continue  # dead-lettered when it was first seen, like the undecodable
            try:
                message = trade_decoder.decode(raw)
            except (msgspec.DecodeError, msgspec.ValidationError):
                continue
            if message.symbol != symbol:
                continue
            if isinstance(message, TradeBatch):
                columns, _ = _split(message, symbols)  # the invalid: dead-lettered before
                if columns is not None:
                    await fold(columns)
            elif _invalid_reason(message, symbols) is None:
                await fold(message)
        log.info("%s: resumed from its snapshot at offset %d; %d later messages read back",
                 symbol, snapshot["offset"], len(missed))

    async def handle(raw: bytes | None, partition: int, offset: int,
                     event: EventT[bytes] | None = None) -> None:
        message = await decode(raw)
        if message is None:
            if event is not None:
                assert acks is not None
                await acks.ack(event)
            return
        symbol = message.symbol
        if symbol not in partition_of:
            partition_of[symbol] = partition
            await resume(symbol, partition, offset)
        await fold(message)
        folded_offset[symbol] = offset
        unsaved.add(symbol)
        if event is not None:
            pending.setdefault(symbol, []).append(event)

    @app.timer(_SNAPSHOT_EVERY_S)
    async def snapshot_folded() -> None:
        # Once a second, not at every candle close: in batches a candle closes with nearly
        # every message, and each snapshot is a changelog record (Tansu never compacts).
        # A restart resumes from the snapshot and reads the messages after it back.
        async with handling:
            for symbol in sorted(unsaved):
                if symbol in partition_of:  # else revoked: its new owner resumes it
                    await save(symbol)
            unsaved.clear()
            if exactly_once:
                # Every event handled so far is acked now, so the open transactions hold
                # the outputs of acked events only: commit them with their offsets. (At
                # any other moment a commit could publish the outputs of an event whose
                # offset is not committed, which a restart would then make again.) The
                # snapshots wait in Faust's send buffer: flush it into the transactions
                # first (Faust flushes before an at-least-once commit only).
                await app.producer.flush()
                await app.consumer.commit()

    @app.on_partitions_revoked.connect
    async def forget_revoked(sender: faust.App, revoked: set[TP], **_: Any) -> None:
        # The partitions may come back from the committed offset: resume them from snapshots.
        gone = {tp.partition for tp in revoked if tp.topic == topics.trades}
        for partition in gone:
            delivered.pop(partition, None)
            stranded_at.pop(partition, None)
        for symbol, partition in list(partition_of.items()):
            if partition in gone:
                del partition_of[symbol]
                pending.pop(symbol, None)

    @app.timer(_STRANDED_AFTER_S)
    async def read_back_stranded() -> None:
        # Seen with Tansu: Faust seeks the partitions to their committed offsets once its
        # fetcher has started, and messages fetched before the seek are never delivered.
        # A gap in the middle shows at the next message (the agent reads it back); at a
        # partition's tail nothing follows, so compare with the consumer's position.
        if time.monotonic() - last_delivery < _STRANDED_AFTER_S:
            return
        for tp in app.consumer.assignment():
            if tp.topic != topics.trades:
                continue
            async with handling:
                if tp not in app.consumer.assignment():
                    continue  # revoked while waiting
                # A partition that delivered nothing yet starts at its committed offset
                # (Faust's copy; None: no commit, read from the start).
                last = delivered.get(tp.partition,
                                     (app.consumer._committed_offset.get(tp) or 0) - 1)
                position = await app.consumer.position(tp)
                if position is None or position <= last + 1:
                    stranded_at.pop(tp.partition, None)
                elif stranded_at.get(tp.partition) != position:
                    # Seen once: a partition just assigned may not have begun delivering.
                    stranded_at[tp.partition] = position
                else:
                    del stranded_at[tp.partition]
                    await read_back(tp.partition, last + 1, position, "fetched but never "
                                    "delivered")

    async def read_back(partition: int, start: int, end: int, why: str) -> None:
        """Fold in the messages at offsets [start, end) of a trades partition."""
        missed = await _read_span(settings, partition, start, end)
        stats.read_backs += 1
        log.warning("partition %d: offsets %d..%d were %s; read back %d messages", partition,
                    start, end - 1, why, len(missed))
        for missed_offset, raw in missed:
            await handle(raw, partition, missed_offset)
        delivered[partition] = max(delivered.get(partition, -1), end - 1)

    @app.agent(trades_topic)
    async def process(stream: faust.StreamT[bytes]) -> None:
        nonlocal acks, last_delivery
        acks = stream.noack()
        async for event in acks.events():
            last_delivery = time.monotonic()
            partition, offset = event.message.partition, event.message.offset
            async with handling:
                last = delivered.get(partition)
                if last is not None and offset > last + 1:
                    await read_back(partition, last + 1, offset, "skipped by the consumer")
                delivered[partition] = max(offset, delivered.get(partition, -1))
                await handle(event.value, partition, offset, event)

    return app


async def _read_span(
    settings: Settings, partition: int, start: int, end: int
) -> list[tuple[int, bytes | None]]:
    """(offset, value) of the messages at offsets [start, end) of one ``trades`` partition."""
    if start >= end:
        return []
    tp = TopicPartition(settings.topics.trades, partition)
    consumer = AIOKafkaConsumer(bootstrap_servers=settings.kafka_bootstrap,
                                enable_auto_commit=False)
    await consumer.start()
    try:
        consumer.assign([tp])
        consumer.seek(tp, start)
        values: list[tuple[int, bytes | None]] = []
        while True:
            records = (await consumer.getmany(tp, timeout_ms=5_000)).get(tp, [])
            if not records:
                raise StreamError(f"cannot read back offsets {start}..{end - 1} of {tp}")
            for record in records:
                if record.offset >= end:
                    return values
                values.append((record.offset, record.value))
            if records[-1].offset >= end - 1:
                return values
    finally:
        await consumer.stop()


def run_worker(settings: Settings) -> None:
    """Run the worker until SIGINT/SIGTERM (blocks); with ``worker_metrics_port`` set, serve
    its Prometheus metrics there."""
    from makeusrich.stream.publisher import ensure_topics

    ensure_topics(settings)
    metrics = WorkerMetrics()
    app = create_app(settings, metrics=metrics)
    if settings.worker_metrics_port is not None:
        serve_metrics(metrics, settings.api_host, settings.worker_metrics_port)
    worker = faust.Worker(app, loglevel=settings.log_level.lower(), quiet=True)
    worker.execute_from_commandline()

