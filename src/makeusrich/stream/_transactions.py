"""Exactly-once for the worker on Apache Kafka: Faust's transactions, fitted to our topics.

Faust (``processing_guarantee="exactly_once"``) keeps one transactional producer per
partition of the topics the app reads, and sends each record in the transaction of the
partition it is written *to*. The worker writes candles, predictions and dead letters to
topics it does not read, for which Faust has no transaction (``group_for_topic`` fails).
Here a record made while an event is handled goes into the transaction of that event's
``trades`` partition, which commits together with the event's offset and the symbol's
table snapshot; a kill before that commit aborts all three, and the restarted worker makes
them again. Records made outside an event (the snapshot timer's changelog writes) keep
Faust's choice: the changelog partition equals the trades partition.
"""

from typing import Any

from faust.streams import current_event
from faust.transport.consumer import TransactionManager
from faust.types import HeadersArg

__all__ = ["SourceTransactions"]


class SourceTransactions(TransactionManager):  # type: ignore[misc]  # Faust is untyped here
    async def send(self, topic: str, key: bytes | None, value: bytes | None,
                   partition: int | None, timestamp: float | None,
                   headers: HeadersArg | None, *,
                   transactional_id: str | None = None) -> Any:
        event = current_event()
        if event is None:
            return await super().send(topic, key, value, partition, timestamp, headers)
        source = event.message.tp
        group = self.app.assignor.group_for_topic(source.topic)
        return await self.producer.send(
            topic, key, value, partition, timestamp, headers,
            transactional_id=f"{self.app.conf.id}-{group}-{source.partition}")


