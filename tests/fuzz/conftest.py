"""Fuzz-suite fixtures: bounded Hypothesis profiles, an in-memory schema registry and a recording publisher.

Everything runs in-process (no Kafka, no registry server): records are encoded with the real
``EventCodec`` against confluent-kafka's in-memory ``MockSchemaRegistryClient``, so a record
that the Kafka path would refuse is refused here too, before anything counts as published.

Profiles: ``fuzz`` (the default, sized so the whole suite runs in about a minute) and
``fuzz-long`` (ten times the examples), chosen with ``pytest -m fuzz --hypothesis-profile fuzz-long``.
"""

from __future__ import annotations

from typing import Any

from confluent_kafka.schema_registry import Schema
from confluent_kafka.schema_registry._sync.mock_schema_registry_client import MockSchemaRegistryClient
from hypothesis import HealthCheck, settings

from rollstream.producers.publisher import Delivery
from rollstream.schemas import schema_text
from rollstream.schemas.codec import EventCodec, subject
from rollstream.schemas.topics import Topics

_CHECKS = [HealthCheck.too_slow, HealthCheck.function_scoped_fixture, HealthCheck.data_too_large,
           HealthCheck.filter_too_much, HealthCheck.large_base_example]
settings.register_profile("fuzz", max_examples=300, deadline=None, suppress_health_check=_CHECKS)
settings.register_profile("fuzz-long", max_examples=3000, deadline=None, suppress_health_check=_CHECKS)
settings.load_profile("fuzz")


def mock_codec(topics: Topics) -> tuple[EventCodec, dict[str, int]]:
    """A codec over an in-memory registry holding every topic's schema; also topic -> schema id."""
    client = MockSchemaRegistryClient({"url": "mock://fuzz"})
    ids = {}
    for spec in topics.specs():
        if spec.event_type is not None:
            schema = Schema(schema_text(spec.event_type), "AVRO")
            ids[spec.name] = int(client.register_schema(subject(spec.name), schema))
    return EventCodec(client, topics), ids


class EncodingPublisher:
    """The gateway's ``Publisher`` without Kafka: encodes every record (as KafkaPublisher does) and keeps them."""

    def __init__(self, topics: Topics, room: int = 1_000_000) -> None:
        self.codec, _ = mock_codec(topics)
        self.room = room
        self.sent: list[tuple[str, str, dict[str, Any]]] = []

    def has_room(self, n: int = 1) -> bool:
        return len(self.sent) + n <= self.room

    def publish(self, topic: str, key: str, records: list[dict[str, Any]]) -> Delivery | None:
        if not records:
            return Delivery.settled()
        if not self.has_room(len(records)):
            return None
        for r in records:  # all encoded before any is enqueued, as in KafkaPublisher.publish
            self.codec.encode(topic, r)
        self.codec.encode_key(topic, key)
        self.sent += [(topic, key, r) for r in records]
        return Delivery.settled()

    def depth(self) -> int:
        return len(self.sent)

    def close(self, timeout: float = 30.0) -> int:
        return 0


class EncodingEmitter:
    """The OTLP receiver's ``EventEmitter`` without Kafka: all-or-nothing, every record encoded at submit."""

    def __init__(self, topics: Topics) -> None:
        self.codec, _ = mock_codec(topics)
        self.items: list[tuple[str, str, Any]] = []
        self.delivered = 0
        self.failed = 0

    def submit_many(self, items: list[tuple[str, str, Any]]) -> int:
        for topic, key, payload in items:
            self.codec.encode(topic, payload)
            self.codec.encode_key(topic, key)
        self.items += items
        return len(self.items)

    def pending(self) -> int:
        return 0
