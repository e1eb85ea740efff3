"""Hot swap of models in running workers.

Promoting a version writes it into the model registry (``Settings.model_dir``) and then
calls :func:`announce_model`, which publishes a :class:`ModelAnnouncement` on the
``model-control`` topic. Every worker runs a :class:`ModelWatcher` and, for each
announcement, loads the version with :func:`load_announced`; it swaps the new model in only
when every check passed, and keeps serving the old one otherwise.
"""

import asyncio
import logging
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Final

import msgspec
from aiokafka import AIOKafkaConsumer
from kafka import KafkaProducer
from kafka.errors import KafkaError

from makeusrich.core.errors import ModelError, ModelIntegrityError, StreamError
from makeusrich.core.schemas import ModelAnnouncement, announcement_decoder, encode, now_ms
from makeusrich.core.settings import Settings
from makeusrich.inference import (
    Forecaster,
    NaiveForecaster,
    OnnxForecaster,
    Registry,
    bundled_models_dir,
    load_forecaster,
    read_manifest,
)
from makeusrich.inference.model import check_parity
from makeusrich.stream.publisher import ensure_topics

__all__ = [
    "ModelWatcher",
    "announce_model",
    "load_announced",
    "load_serving_models",
    "registry_root",
]

log = logging.getLogger(__name__)
_TOPIC_WAIT_S: Final = 10.0

_SEND_TIMEOUT_S: Final = 30.0


def registry_root(settings: Settings) -> Path:
    """The model registry (or single version directory) announced versions come from."""
    return bundled_models_dir() if settings.model_dir is None else Path(settings.model_dir)


def load_serving_models(settings: Settings) -> tuple[Forecaster, dict[str, Forecaster]]:
    """The shared model and the symbols' own champions a worker starts with. A model that
    cannot be loaded is logged and replaced: the shared one by the naive baseline, a
    symbol's own by the shared one."""
    try:
        shared = load_forecaster(settings.model_dir)
    except ModelError as exc:
        log.error("model rejected, serving the naive baseline instead: %s", exc)
        shared = NaiveForecaster()
    registry = Registry(registry_root(settings))
    try:
        champions = registry.symbol_champions()
    except ModelError as exc:
        log.error("per-symbol champions unreadable, serving the shared model: %s", exc)
        return shared, {}
    own: dict[str, Forecaster] = {}
    for symbol, version in champions.items():
        try:
            own[symbol] = OnnxForecaster(registry.root / version)
        except ModelError as exc:
            log.error("model %s for %s rejected, serving the shared model: %s",
                      version, symbol, exc)
    return shared, own


def announce_model(
    settings: Settings, version: str, sha256: str, symbol: str | None = None
) -> ModelAnnouncement:
    """Tell every worker to serve ``version`` (already in the registry) for ``symbol`` (all
    symbols without their own champion when None) and return the announcement once the
    broker has it on all replicas."""
    assert settings.kafka_bootstrap, "kafka_bootstrap must be resolved first"
    ensure_topics(settings)
    ts = now_ms()
    announcement = ModelAnnouncement(version=version, sha256=sha256, ts_event=ts, ts_ingest=ts,
                                     symbol=symbol)
    topic = settings.topics.model_control
    producer = KafkaProducer(
        bootstrap_servers=settings.kafka_bootstrap, acks="all", retries=10,
        client_id="mur-control",
    )
    try:
        producer.send(topic, encode(announcement), key=version.encode()).get(
            timeout=_SEND_TIMEOUT_S
        )
    except KafkaError as exc:
        raise StreamError(f"cannot announce model {version} on {topic}: {exc}") from exc
    finally:
        producer.close()
    return announcement


def load_announced(root: Path, announcement: ModelAnnouncement) -> OnnxForecaster:
    """Load and check an announced version from the registry at ``root``; blocking (file
    reads, onnxruntime), so workers run it in a thread. :class:`ModelError` if unusable."""
    version = announcement.version
    registry = Registry(root)
    # Only a scanned name becomes a path: an announcement cannot point outside the registry.
    if version not in registry.versions():
        raise ModelError(f"version {version!r} is not in the model registry {registry.root}")
    directory = registry.root / version
    forecaster = OnnxForecaster(directory)  # checks model.onnx against its manifest's sha256
    if forecaster.manifest.sha256 != announcement.sha256:
        raise ModelIntegrityError(
            f"{directory} has sha256 {forecaster.manifest.sha256}, the announcement says "
            f"{announcement.sha256}"
        )
    if forecaster.version != version:
        raise ModelError(f"{directory} holds version {forecaster.version}, not {version}")
    check_parity(forecaster)
    return forecaster


class ModelWatcher:
    """The model announcements one worker must act on.

    Not a consumer-group member: a group would hand each announcement to one worker only,
    and every worker must see every one. It reads every partition of the control topic
    from the end it had at :meth:`start`; what was promoted earlier is the registry's
    champion (:meth:`champion`), read after the end is pinned so that no promotion falls
    between the two.
    """

    def __init__(self, settings: Settings) -> None:
        assert settings.kafka_bootstrap, "kafka_bootstrap must be resolved first"
        self._settings = settings
        self._topic = settings.topics.model_control
        self._consumer: AIOKafkaConsumer | None = None

    async def start(self) -> None:
        # Subscribed without a group, the consumer asks the broker for the topic and takes
        # every partition it has. (A consumer's first metadata names no topic on Apache
        # Kafka, so partitions_for_topic() before that is None.)
        consumer = AIOKafkaConsumer(
            self._topic,
            bootstrap_servers=self._settings.kafka_bootstrap,
            group_id=None,
            enable_auto_commit=False,
            auto_offset_reset="latest",
            client_id=f"{self._settings.worker_id}-model-watcher",
        )
        await consumer.start()
        try:
            deadline = time.monotonic() + _TOPIC_WAIT_S
            while not consumer.assignment():
                if time.monotonic() > deadline:
                    raise StreamError(f"topic {self._topic} does not exist; run ensure_topics")
                await asyncio.sleep(0.1)
            # Resolve the end now: left to the first fetch, "latest" would be some later
            # moment, and an announcement made in between would be missed.
            tps = sorted(consumer.assignment())
            await consumer.seek_to_end(*tps)
            for tp in tps:
                await consumer.position(tp)
        except BaseException:
            await consumer.stop()
            raise
        self._consumer = consumer

    def champion(self) -> ModelAnnouncement | None:
        """The registry's current shared champion as an announcement (None when none was
        promoted); blocking file reads. :class:`ModelError` if the registry or the
        champion's manifest is unreadable."""
        registry = Registry(registry_root(self._settings))
        pointer = registry.pointer()
        if pointer is None or pointer.version is None:
            return None
        manifest = read_manifest(registry.root / pointer.version)
        return ModelAnnouncement(version=pointer.version, sha256=manifest.sha256,
                                 ts_event=pointer.promoted_at, ts_ingest=now_ms())

    def symbol_champions(self) -> list[ModelAnnouncement]:
        """The symbols' own champions as announcements, like :meth:`champion`."""
        registry = Registry(registry_root(self._settings))
        pointer = registry.pointer()
        if pointer is None:
            return []
        return [
            ModelAnnouncement(version=own.version,
                              sha256=read_manifest(registry.root / own.version).sha256,
                              ts_event=own.promoted_at, ts_ingest=now_ms(), symbol=symbol)
            for symbol, own in sorted(pointer.symbols.items()) if own.version is not None
        ]

    async def announcements(self) -> AsyncIterator[ModelAnnouncement]:
        """Announcements as they arrive; undecodable ones are logged and skipped."""
        assert self._consumer is not None, "start() first"
        async for record in self._consumer:
            try:
                announcement = announcement_decoder.decode(record.value)
            except (msgspec.DecodeError, msgspec.ValidationError) as exc:
                log.error("ignoring an undecodable model announcement at %s:%d: %s",
                          record.topic, record.offset, exc)
                continue
            yield announcement

    async def stop(self) -> None:
        if self._consumer is not None:
            await self._consumer.stop()
            self._consumer = None
