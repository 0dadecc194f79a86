"""Publishing and reading events: a thin layer over confluent-kafka and the codec."""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from confluent_kafka import Consumer, KafkaError, Message, Producer

from rollstream.errors import RollstreamError
from rollstream.schemas import EventType, schema_text
from rollstream.schemas.codec import EventCodec, register, registry_client
from rollstream.schemas.topics import Topics, consumer_config, create_topics, producer_config
from rollstream.settings import ConnectionSettings

log = logging.getLogger(__name__)


def prepare_codec(
    settings: ConnectionSettings, event_types: list[EventType], create_missing: bool = True
) -> EventCodec:
    """A codec for a service that publishes ``event_types``: topics created, their schemas registered."""
    topics = Topics.from_settings(settings)
    if create_missing:
        create_topics(topics, settings)
    codec = EventCodec(registry_client(settings), topics)
    for spec in topics.specs():
        if spec.event_type in event_types:
            register(codec.client, spec.name, schema_text(spec.event_type))
    return codec


class DeliveryError(RollstreamError):
    """Kafka did not acknowledge one or more published events."""


class EventProducer:
    """Encodes events with the registry and publishes them idempotently, keyed by rollout."""

    def __init__(self, codec: EventCodec, settings: ConnectionSettings | None = None, **overrides: Any) -> None:
        self.codec = codec
        self.producer = Producer(producer_config(settings, **overrides))
        self.delivered = 0
        self.failed: list[str] = []

    def _on_delivery(self, err: KafkaError | None, msg: Message) -> None:
        if err is not None:
            self.failed.append(f"{msg.topic()}: {err}")
            log.error("delivery to %s failed: %s", msg.topic(), err)
        else:
            self.delivered += 1

    def publish(self, topic: str, key: str, record: dict[str, Any]) -> None:
        value = self.codec.encode(topic, record)
        while True:
            try:
                self.producer.produce(
                    topic, value=value, key=self.codec.encode_key(topic, key), on_delivery=self._on_delivery
                )
                break
            except BufferError:
                self.producer.poll(0.1)  # local queue full: serve delivery reports, then retry
        self.producer.poll(0)

    def flush(self, timeout: float = 30.0) -> None:
        remaining = self.producer.flush(timeout)
        if remaining:
            raise DeliveryError(f"{remaining} event(s) still undelivered after {timeout:.0f}s")
        if self.failed:
            raise DeliveryError(f"{len(self.failed)} event(s) failed: {self.failed[:3]}")


@dataclass(frozen=True)
class Received:
    topic: str
    partition: int
    offset: int
    key: str | None
    value: dict[str, Any]


def read_events(
    codec: EventCodec,
    topics: list[str],
    group_id: str,
    count: int,
    timeout: float = 30.0,
    settings: ConnectionSettings | None = None,
) -> Iterator[Received]:
    """Read ``count`` events from the beginning of ``topics`` (read_committed), decoded."""
    consumer = Consumer(consumer_config(group_id, settings))
    consumer.subscribe(topics)
    seen = 0
    deadline = time.monotonic() + timeout
    try:
        while seen < count:
            if time.monotonic() > deadline:
                raise RollstreamError(f"read {seen} of {count} events from {topics} within {timeout:.0f}s")
            msg = consumer.poll(0.5)
            if msg is None:
                continue
            error = msg.error()
            if error is not None:
                if error.code() == KafkaError._PARTITION_EOF:
                    continue
                raise RollstreamError(f"consumer error on {msg.topic()}: {error}")
            seen += 1
            topic = msg.topic()
            assert topic is not None
            yield Received(
                topic, msg.partition() or 0, msg.offset() or 0,
                codec.decode_key(topic, msg.key()),  # type: ignore[arg-type]
                codec.decode(topic, msg.value()),  # type: ignore[arg-type]
            )
    finally:
        consumer.close()
