"""A bounded, idempotent Kafka publisher for the gateway's events.

Events wait in librdkafka's in-memory queue (``queue.buffering.max.messages``) with no
delivery timeout (``message.timeout.ms=0``), so what was enqueued survives a Kafka outage
and is delivered, once and in order, when the broker returns. When the queue is full the
publisher says so instead of blocking: the gateway then refuses new work (503) or serves
it and counts the dropped event. A background thread serves delivery reports.
"""

from __future__ import annotations

import logging
import threading
import time
from typing import Any, Protocol

from confluent_kafka import KafkaError, Message, Producer
from rollstream.producers.metrics import GatewayMetrics
from rollstream.schemas.codec import EventCodec
from rollstream.schemas.topics import producer_config

from rollstream.settings import ConnectionSettings

log = logging.getLogger(__name__)


class Publisher(Protocol):
    """Where the gateway puts events; ``publish`` never blocks."""

    def has_room(self, n: int = 1) -> bool: ...

    def publish(self, topic: str, key: str, records: list[dict[str, Any]]) -> bool:
        """Enqueue all of ``records`` (keyed by ``key``) or none of them; False when the queue is full."""
        ...

    def depth(self) -> int: ...

    def close(self, timeout: float = 30.0) -> int:
        """Stop, after waiting up to ``timeout`` s for delivery; returns the number still undelivered."""
        ...


class KafkaPublisher:
    """Encodes records with the schema registry and enqueues them on an idempotent producer."""

    def __init__(
        self, codec: EventCodec, settings: ConnectionSettings, queue_max: int, metrics: GatewayMetrics
    ) -> None:
        self.codec = codec
        self.queue_max = queue_max
        self.metrics = metrics
        self._last_error_log = 0.0
        self.producer = Producer(
            producer_config(
                settings,
                **{
                    "queue.buffering.max.messages": queue_max,
                    "message.timeout.ms": 0,  # never give up on an enqueued event
                    "linger.ms": 50,  # bigger batches: less CPU per event; nobody waits on an event
                    "on_delivery": self._on_delivery,
                    "error_cb": self._on_error,
                },
            )
        )
        metrics.queue_depth.set_function(self.depth)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._serve_reports, name="gateway-delivery", daemon=True)
        self._thread.start()

    def _serve_reports(self) -> None:
        while not self._stop.is_set():
            self.producer.poll(0.1)

    def _on_delivery(self, err: KafkaError | None, msg: Message) -> None:
        topic = msg.topic() or "?"
        if err is not None:
            self.metrics.delivery_failures.labels(topic).inc()
            log.error("event to %s (key %r) was not delivered: %s", topic, msg.key(), err)
        else:
            self.metrics.events_published.labels(topic).inc()

    def _on_error(self, err: KafkaError) -> None:
        # While the broker is down librdkafka reports the same errors every few seconds.
        now = time.monotonic()
        if err.fatal() or now - self._last_error_log > 10.0:
            self._last_error_log = now
            log.warning("kafka: %s (%d event(s) queued)", err, self.depth())

    def depth(self) -> int:
        return len(self.producer)

    def has_room(self, n: int = 1) -> bool:
        return len(self.producer) + n <= self.queue_max

    def publish(self, topic: str, key: str, records: list[dict[str, Any]]) -> bool:
        if not records:
            return True
        if not self.has_room(len(records)):
            return False
        values = [self.codec.encode(topic, r) for r in records]
        key_bytes = self.codec.encode_key(topic, key)
        for i, value in enumerate(values):
            try:
                self.producer.produce(topic, value=value, key=key_bytes)
            except BufferError:
                # Only the delivery thread changes the queue, and only by shrinking it, so
                # this is unreachable after has_room(); count what could not go.
                self.metrics.events_dropped.labels("queue_full").inc(len(values) - i)
                return False
        self.metrics.events_enqueued.labels(topic).inc(len(values))
        return True

    def close(self, timeout: float = 30.0) -> int:
        self._stop.set()
        self._thread.join()
        remaining = int(self.producer.flush(timeout))
        if remaining:
            log.error("%d event(s) still undelivered after %.0f s at shutdown; they are lost", remaining, timeout)
        return remaining
