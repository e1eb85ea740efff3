"""The Faust worker: a thin adapter from the ``trades`` topic to ``TradePipeline``.

Per trade: decode (msgspec) -> validate -> ``TradePipeline.process``. When candles close,
they go to the ``candles`` topic and Redis, predictions to ``predictions`` and Redis, and
the symbol's builder state to a plain Faust table (changelog-backed), so a restarted worker
resumes mid-candle. Candles are built by our own event-time code, not Faust's windowed
tables: those close windows on the wall clock and never fire close callbacks for windows
restored from the changelog.

Delivery is at-least-once (Tansu has no transactions); duplicates are harmless because the
builders drop trade ids they have seen and Redis refuses a candle id it already holds.
"""

import logging
import math
import time
from typing import Any

import faust
import msgspec
from faust.types import EventT

from makeusrich.core.errors import ModelError
from makeusrich.core.schemas import DeadLetter, EndOfStream, Trade, encode, now_ms, trade_decoder
from makeusrich.core.settings import Settings
from makeusrich.core.store import RedisStore
from makeusrich.inference import Forecaster, NaiveForecaster, load_forecaster
from makeusrich.stream.pipeline import Outputs, TradePipeline

__all__ = ["WorkerStats", "create_app", "run_worker"]

log = logging.getLogger(__name__)

_SNAPSHOT_EVERY_S = 1.0  # how often open candles are snapshotted between candle closes


class WorkerStats:
    """Counters the worker keeps (exported as metrics in a later issue)."""

    def __init__(self) -> None:
        self.trades = 0
        self.dead_letters = 0
        self.late = 0
        self.candles = 0
        self.predictions = 0
        self.duplicates = 0

    def as_dict(self) -> dict[str, int]:
        return dict(vars(self))


def _invalid_reason(message: Trade | EndOfStream) -> str | None:
    if isinstance(message, EndOfStream):
        return None
    for name in ("price", "qty", "quote_qty"):
        value = getattr(message, name)
        if not math.isfinite(value) or value <= 0:
            return f"{name} must be a positive finite number, got {value!r}"
    if message.trade_id < 0 or message.ts_event <= 0:
        return "trade_id and ts_event must be positive"
    return None


def _load_model(settings: Settings) -> Forecaster:
    try:
        return load_forecaster(settings.model_dir)
    except ModelError as exc:
        log.error("model rejected, serving the naive baseline instead: %s", exc)
        return NaiveForecaster()


def create_app(settings: Settings, forecaster: Forecaster | None = None) -> faust.App:
    """Build the Faust app for ``settings`` (the broker must be reachable at start)."""
    assert settings.kafka_bootstrap and settings.redis_url, "resolve service URLs first"
    app = faust.App(
        settings.worker_id,
        broker=f"kafka://{settings.kafka_bootstrap}",
        store="memory://",
        # Records (and table snapshots) are msgspec JSON already: Faust moves raw bytes.
        key_serializer="raw",
        value_serializer="raw",
        topic_partitions=settings.trades_partitions,
        topic_allow_declare=True,
        broker_rebalance_timeout=settings.broker_rebalance_timeout_s,
        broker_session_timeout=settings.broker_session_timeout_s,
        broker_heartbeat_interval=1.0,
        consumer_auto_offset_reset="earliest",
        datadir=str(settings.state_dir / "faust"),
        web_enabled=False,
        producer_acks=-1,
    )
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
    pipeline = TradePipeline(settings.intervals, settings.grace_ms,
                             forecaster or _load_model(settings))
    store = RedisStore.from_settings(settings)
    stats = WorkerStats()

    async def dead_letter(reason: str, payload: bytes | str, stage: str = "worker") -> None:
        stats.dead_letters += 1
        text = payload if isinstance(payload, str) else payload.decode("utf-8", "replace")
        letter = DeadLetter(reason=reason, payload=text[:10_000], stage=stage, ts_ingest=now_ms())
        await dlq_topic.send(value=encode(letter))

    async def ship(out: Outputs) -> None:
        for candle in out.candles:
            key = candle.symbol.encode()
            await candles_topic.send(key=key, value=encode(candle))
            await store.write_candle(candle)
        for prediction in out.predictions:
            key = prediction.symbol.encode()
            await predictions_topic.send(key=key, value=encode(prediction))
            await store.write_prediction(prediction)
        for trade in out.late:
            await dead_letter("late: its candle had already closed", encode(trade))
        stats.candles += len(out.candles)
        stats.predictions += len(out.predictions)
        stats.late += len(out.late)

    @app.task
    async def announce_model() -> None:
        await store.set_model(pipeline.forecaster.version)

    @app.timer(1.0)
    async def publish_stats() -> None:
        await store.client.hset(settings.redis_keys.worker_stats(settings.worker_id),
                                mapping=stats.as_dict())  # type: ignore[arg-type]

    # Resuming exactly: an event is acked (so its offset may be committed) only once a
    # snapshot holding its effect is in the changelog; Faust flushes the producer before it
    # commits. After a crash, unacked events are redelivered and folded into the last
    # snapshot; the builders drop trade ids they already hold.
    pending: dict[str, list[EventT[bytes]]] = {}
    partition_of: dict[str, int] = {}
    last_sweep = time.monotonic()

    async def save(symbol: str, stream: faust.StreamT[Any]) -> None:
        key, snapshot = symbol.encode(), msgspec.json.encode(pipeline.snapshot(symbol))
        state.data[key] = snapshot
        state.send_changelog(partition_of[symbol], key, snapshot)
        for event in pending.pop(symbol, ()):
            await stream.ack(event)

    @app.agent(trades_topic)
    async def process(stream: faust.StreamT[bytes]) -> None:
        nonlocal last_sweep
        acks = stream.noack()  # type: ignore[attr-defined]  # Stream has it, StreamT does not
        async for event in acks.events():
            raw = event.value
            try:
                message = trade_decoder.decode(raw)
            except (msgspec.DecodeError, msgspec.ValidationError) as exc:
                await dead_letter(f"undecodable: {exc}", raw)
                await acks.ack(event)
                continue
            reason = _invalid_reason(message)
            if reason is not None:
                await dead_letter(f"invalid: {reason}", raw)
                await acks.ack(event)
                continue
            symbol = message.symbol
            if symbol not in partition_of:
                partition_of[symbol] = event.message.partition
                saved = state.get(symbol.encode())
                if saved:
                    pipeline.restore(symbol, msgspec.json.decode(saved))
            stats.trades += 1
            pipeline.process(message)
            pending.setdefault(symbol, []).append(event)
            if pipeline.has_output:
                await ship(pipeline.drain())
                await save(symbol, acks)
            now = time.monotonic()
            if now - last_sweep >= _SNAPSHOT_EVERY_S:
                last_sweep = now
                stats.duplicates = pipeline.duplicates
                for waiting in list(pending):
                    await save(waiting, acks)

    return app


def run_worker(settings: Settings) -> None:
    """Run the worker until SIGINT/SIGTERM (blocks)."""
    from makeusrich.stream.publisher import ensure_topics

    ensure_topics(settings)
    app = create_app(settings)
    worker = faust.Worker(app, loglevel=settings.log_level.lower(), quiet=True)
    worker.execute_from_commandline()


