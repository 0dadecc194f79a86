"""Publishing and reading events: a thin layer over the codec, the producer core (``kafka_core``) and a consumer."""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from confluent_kafka import Consumer, KafkaError

from rollstream.errors import RollstreamError
from rollstream.producers.kafka_core import Delivery, KafkaCore
from rollstream.schemas import EventType, schema_text
from rollstream.schemas.codec import EventCodec, register, registry_client
from rollstream.schemas.topics import Topics, consumer_config, create_topics
from rollstream.settings import ConnectionSettings


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
    """Encodes events with the registry and publishes them idempotently, keyed by rollout; ``flush`` waits."""

    def __init__(self, codec: EventCodec, settings: ConnectionSettings | None = None, **overrides: Any) -> None:
        self.codec = codec
        self.failed: list[str] = []
        self.core = KafkaCore(settings, name="rollstream-events", on_report=self._count, **overrides)
        self.producer = self.core.producer

    @property
    def delivered(self) -> int:
        return self.core.delivered

    def _count(self, topic: str, error: str | None) -> None:
        if error is not None:
            self.failed.append(f"{topic}: {error}")

    def publish(self, topic: str, key: str, record: dict[str, Any]) -> Delivery:
        """Enqueue ``record``, waiting while the local queue is full; its Delivery can be waited for."""
        value = self.codec.encode(topic, record)
        delivery = Delivery(1)
        self.core.send(topic, self.codec.encode_key(topic, key), [value], delivery)
        return delivery

    def flush(self, timeout: float = 30.0) -> None:
        remaining = self.core.flush(timeout)
        if remaining:
            raise DeliveryError(f"{remaining} event(s) still undelivered after {timeout:.0f}s")
        if self.failed:
            raise DeliveryError(f"{len(self.failed)} event(s) failed: {self.failed[:3]}")

    def close(self, timeout: float = 30.0) -> int:
        """Stop the delivery thread, after waiting up to ``timeout`` s; returns the number of events undelivered."""
        return self.core.close(timeout)


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
