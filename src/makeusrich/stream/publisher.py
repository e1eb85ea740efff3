"""Publishes trades to the ``trades`` topic with kafka-python (acks=all, keyed by symbol),
as :class:`TradeBatch` messages (wire version 2): the worker's cost is per message, so many
trades per message is what lets it keep up with 2025 volumes.

A symbol's batch goes out once it holds ``Settings.trades_batch_max`` trades (a replay at
full speed: batches by size) or its first trade has waited ``Settings.trades_linger_ms``
(live trades and paced replays: at most that much added latency). The linger timer runs on
the event loop the trades are sent from; without one, batches wait for the size or
``flush()``. An end-of-stream marker first publishes its symbol's batch, so it stays last.

On Apache Kafka the producer is idempotent: a retry after a broker fault never doubles a
trade on the topic. Tansu has no idempotent producer, so there delivery is at-least-once;
the worker drops re-delivered trades by trade id, inside batches too.
"""

import asyncio
import contextlib
import logging
from typing import Protocol

from kafka import KafkaProducer
from kafka.admin import KafkaAdminClient, NewTopic
from kafka.errors import KafkaError, TopicAlreadyExistsError

from makeusrich.core.errors import StreamError
from makeusrich.core.schemas import (
    DeadLetter,
    EndOfStream,
    Source,
    Trade,
    TradeBatch,
    encode,
    encode_batch,
    now_ms,
)
from makeusrich.core.settings import Settings

__all__ = ["TradePublisher", "TradeSink", "ensure_topics"]

log = logging.getLogger(__name__)


def ensure_topics(settings: Settings) -> None:
    """Create the pipeline topics if missing (trades with ``trades_partitions`` partitions)."""
    assert settings.kafka_bootstrap, "kafka_bootstrap must be resolved before ensure_topics"
    topics = settings.topics
    wanted = {
        topics.trades: settings.trades_partitions,
        topics.candles: 1,
        topics.predictions: 1,
        topics.dead_letter: 1,
        topics.model_control: 1,
    }
    admin = KafkaAdminClient(bootstrap_servers=settings.kafka_bootstrap, client_id="mur-admin")
    try:
        existing = set(admin.list_topics())
        missing = [
            NewTopic(name, num_partitions=parts,
                     replication_factor=settings.kafka_replication_factor)
            for name, parts in wanted.items()
            if name not in existing
        ]
        if missing:
            with contextlib.suppress(TopicAlreadyExistsError):  # another process was first
                admin.create_topics(missing)
    except KafkaError as exc:
        raise StreamError(f"cannot create topics on {settings.kafka_bootstrap}: {exc}") from exc
    finally:
        admin.close()


class TradeSink(Protocol):
    """Where sources publish: ``TradePublisher``, or an in-memory fake in tests."""

    def send(self, trade: Trade | EndOfStream) -> None: ...

    def send_batch(self, batch: TradeBatch) -> None: ...

    def dead_letter(self, reason: str, payload: str | bytes, stage: str = "ingest") -> None: ...

    def flush(self, timeout_s: float = 30.0) -> None: ...


class _Pending:
    """One symbol's trades not yet published, column by column (a batch in the making)."""

    def __init__(self, source: Source) -> None:
        self.source: Source = source
        self.ts_ingest = 0
        self.trade_id: list[int] = []
        self.price: list[float] = []
        self.qty: list[float] = []
        self.quote_qty: list[float] = []
        self.is_buyer_maker: list[bool] = []
        self.ts_event: list[int] = []

    def __len__(self) -> int:
        return len(self.trade_id)

    def add(self, trade: Trade) -> None:
        self.ts_ingest = trade.ts_ingest
        self.trade_id.append(trade.trade_id)
        self.price.append(trade.price)
        self.qty.append(trade.qty)
        self.quote_qty.append(trade.quote_qty)
        self.is_buyer_maker.append(trade.is_buyer_maker)
        self.ts_event.append(trade.ts_event)

    def extend(self, batch: TradeBatch) -> None:
        self.ts_ingest = batch.ts_ingest
        self.trade_id += batch.trade_id
        self.price += batch.price
        self.qty += batch.qty
        self.quote_qty += batch.quote_qty
        self.is_buyer_maker += batch.is_buyer_maker
        self.ts_event += batch.ts_event

    def take(self, symbol: str, n: int) -> TradeBatch:
        """The first ``n`` trades as a batch, removed from here."""
        batch = TradeBatch(symbol, self.ts_ingest, self.trade_id[:n], self.price[:n],
                           self.qty[:n], self.quote_qty[:n], self.is_buyer_maker[:n],
                           self.ts_event[:n], self.source)
        for column in (self.trade_id, self.price, self.qty, self.quote_qty,
                       self.is_buyer_maker, self.ts_event):
            del column[:n]
        return batch


class TradePublisher:
    """Thin wrapper over KafkaProducer that batches the pipeline's trade records."""

    def __init__(self, settings: Settings) -> None:
        assert settings.kafka_bootstrap, "kafka_bootstrap must be resolved first"
        self._topic = settings.topics.trades
        self._dead_letter_topic = settings.topics.dead_letter
        # Apache Kafka: the idempotent producer, retrying until delivery_timeout_ms (its
        # default, 2 min) through leader elections without doubling or reordering a trade.
        # Tansu has none: a bounded number of retries, one request in flight for order.
        delivery: dict[str, object] = (
            {"enable_idempotence": True} if settings.kafka_engine == "apache" else
            {"enable_idempotence": False, "retries": 10,
             "max_in_flight_requests_per_connection": 1})
        self._producer = KafkaProducer(
            bootstrap_servers=settings.kafka_bootstrap,
            acks="all",
            linger_ms=5,
            batch_size=256 * 1024,
            client_id="mur-ingest",
            **delivery,
        )
        self._batch_max = settings.trades_batch_max
        self._linger_s = settings.trades_linger_ms / 1000
        self._pending: dict[str, _Pending] = {}  # symbol -> trades not yet published
        self._timers: dict[str, asyncio.TimerHandle] = {}
        self.sent = 0  # trades and end-of-stream markers handed to send() or send_batch()
        self.messages = 0  # records produced to the topic (batches and markers)
        self.failed = 0

    def send(self, trade: Trade | EndOfStream) -> None:
        """Queue a trade in its symbol's batch (an end-of-stream marker goes out at once,
        after the batch)."""
        self.sent += 1
        symbol = trade.symbol
        if isinstance(trade, EndOfStream):
            self._publish(symbol)
            self._produce(symbol, encode(trade))
            return
        pending = self._pending.get(symbol)
        if pending is None:
            pending = self._pending[symbol] = _Pending(trade.source)
        pending.add(trade)
        self._queued(symbol, pending)

    def send_batch(self, batch: TradeBatch) -> None:
        """Queue a batch's trades, as :meth:`send` queues each (replays read batches)."""
        if not batch:
            return
        self.sent += len(batch)
        pending = self._pending.get(batch.symbol)
        if pending is None:
            pending = self._pending[batch.symbol] = _Pending(batch.source)
        pending.extend(batch)
        self._queued(batch.symbol, pending)

    def _queued(self, symbol: str, pending: _Pending) -> None:
        """Publish what fills batches; start the linger timer for what is left."""
        while len(pending) >= self._batch_max:
            self._produce(symbol, encode_batch(pending.take(symbol, self._batch_max)))
        if pending and not self._linger_s:
            self._publish(symbol)
        elif pending and symbol not in self._timers:
            with contextlib.suppress(RuntimeError):  # no running loop: size or flush()
                loop = asyncio.get_running_loop()
                self._timers[symbol] = loop.call_later(self._linger_s, self._publish, symbol)
        elif not pending:
            self._cancel_timer(symbol)

    def _cancel_timer(self, symbol: str) -> None:
        timer = self._timers.pop(symbol, None)
        if timer is not None:
            timer.cancel()

    def _publish(self, symbol: str) -> None:
        """Publish the symbol's pending trades as one batch (its ts_ingest: when the last
        of them was seen)."""
        self._cancel_timer(symbol)
        pending = self._pending.pop(symbol, None)
        if pending:
            self._produce(symbol, encode_batch(pending.take(symbol, len(pending))))

    def _produce(self, symbol: str, value: bytes) -> None:
        future = self._producer.send(self._topic, value, key=symbol.encode())
        future.add_errback(self._on_send_error)
        self.messages += 1

    def dead_letter(self, reason: str, payload: str | bytes, stage: str = "ingest") -> None:
        text = payload if isinstance(payload, str) else payload.decode("utf-8", "replace")
        letter = DeadLetter(reason=reason, payload=text[:10_000], stage=stage, ts_ingest=now_ms())
        self._producer.send(self._dead_letter_topic, encode(letter)).add_errback(
            self._on_send_error
        )

    def _on_send_error(self, exc: BaseException) -> None:
        self.failed += 1
        log.error("publishing to Kafka failed after retries: %s", exc)

    def flush(self, timeout_s: float = 30.0) -> None:
        for symbol in list(self._pending):
            self._publish(symbol)
        self._producer.flush(timeout=timeout_s)
        if self.failed:
            raise StreamError(f"{self.failed} records could not be published; see the log")

    def close(self) -> None:
        try:
            self.flush()
        finally:
            self._producer.close()
