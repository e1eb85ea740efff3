"""Publishes trades to the ``trades`` topic with kafka-python (acks=all, keyed by symbol).

Tansu has no idempotent producer, so delivery is at-least-once; the worker drops
re-delivered trades by trade id.
"""

import contextlib
import logging
from typing import Protocol

from kafka import KafkaProducer
from kafka.admin import KafkaAdminClient, NewTopic
from kafka.errors import KafkaError, TopicAlreadyExistsError

from makeusrich.core.errors import StreamError
from makeusrich.core.schemas import DeadLetter, EndOfStream, Trade, encode, now_ms
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
            NewTopic(name, num_partitions=parts, replication_factor=1)
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

    def dead_letter(self, reason: str, payload: str | bytes, stage: str = "ingest") -> None: ...

    def flush(self, timeout_s: float = 30.0) -> None: ...


class TradePublisher:
    """Thin wrapper over KafkaProducer that speaks the pipeline's trade records."""

    def __init__(self, settings: Settings) -> None:
        assert settings.kafka_bootstrap, "kafka_bootstrap must be resolved first"
        self._topic = settings.topics.trades
        self._dead_letter_topic = settings.topics.dead_letter
        self._producer = KafkaProducer(
            bootstrap_servers=settings.kafka_bootstrap,
            acks="all",
            linger_ms=5,
            batch_size=256 * 1024,
            retries=10,
            max_in_flight_requests_per_connection=1,  # keep per-symbol order across retries
            client_id="mur-ingest",
        )
        self.sent = 0
        self.failed = 0

    def send(self, trade: Trade | EndOfStream) -> None:
        future = self._producer.send(self._topic, encode(trade), key=trade.symbol.encode())
        future.add_errback(self._on_send_error)
        self.sent += 1

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
        self._producer.flush(timeout=timeout_s)
        if self.failed:
            raise StreamError(f"{self.failed} records could not be published; see the log")

    def close(self) -> None:
        try:
            self.flush()
        finally:
            self._producer.close()
