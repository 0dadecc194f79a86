"""The gateway's bounded, idempotent Kafka publisher, with per-request acknowledgements.

A front end over ``kafka_core``, which owns the producer, its delivery thread and the Delivery
each ``publish`` returns. Events wait in librdkafka's in-memory queue (``queue.buffering.max.messages``)
with no delivery timeout (``message.timeout.ms=0``), so what was enqueued survives a Kafka outage
and is delivered, once and in order, when the broker returns. When the queue is full the
publisher says so instead of blocking: the gateway then refuses new work (503) or serves
it and counts the dropped event.

``publish`` returns the :class:`Delivery` of one request's records, settled once Kafka acknowledged
every one of them (``acks=all``, idempotent producer) or refused one. With
``ROLLSTREAM_GATEWAY_ACKS=kafka`` (the default) the gateway awaits it before it answers, so
whatever it answered 2xx for is in Kafka even if the gateway is killed the next moment;
with ``queued`` nobody awaits it (the delivery thread then never wakes the event loop).
A waiting request pays the producer's linger in latency, so the acknowledged mode does not
linger (``LINGER_MS["kafka"]``, 0 ms: under load librdkafka still batches what accumulates
while earlier requests are in flight) where the queued mode lingers 50 ms for bigger batches.
"""

from __future__ import annotations

from typing import Any, Literal, Protocol

from rollstream.producers.kafka_core import Delivery, KafkaCore, Recorded
from rollstream.producers.metrics import GatewayMetrics
from rollstream.schemas.codec import EventCodec
from rollstream.settings import ConnectionSettings

# Recorded, from kafka_core, is also what the gateway's answer says about its events (``X-Rollstream-Recorded``).
__all__ = ["LINGER_MS", "Acks", "Delivery", "KafkaPublisher", "Publisher", "Recorded", "acknowledgement"]

Acks = Literal["kafka", "queued"]
# linger.ms by acknowledgement mode: nobody waits on a queued event, so batch for less CPU per event;
# a request waiting for its acknowledgement pays the linger in latency (bench/gateway.py, one client:
# about +1 ms over the backend at 0 ms, +3 ms at 1 ms, +8 ms at 5 ms).
LINGER_MS: dict[Acks, int] = {"kafka": 0, "queued": 50}


async def acknowledgement(delivery: Delivery | None, acks: Acks, timeout: float, metrics: GatewayMetrics,
                          endpoint: str) -> Recorded | None:
    """With ``acks="kafka"``, wait up to ``timeout`` s for ``delivery``: None once Kafka acknowledged it (or when
    nothing is waited for), else ``pending`` or ``failed``, counted in ``rollstream_gateway_unacknowledged``."""
    if acks != "kafka" or delivery is None:
        return None
    outcome = await delivery.wait(timeout)
    if outcome == "kafka":
        return None
    metrics.unacknowledged.labels(endpoint, outcome).inc()
    return outcome


class Publisher(Protocol):
    """Where the gateway puts events; ``publish`` never blocks."""

    def has_room(self, n: int = 1) -> bool: ...

    def publish(self, topic: str, key: str, records: list[dict[str, Any]]) -> Delivery | None:
        """Enqueue all of ``records`` (keyed by ``key``) or none of them: their Delivery, or None when the queue is
        full. A record that cannot be encoded raises SerializationError before anything is enqueued."""
        ...

    def depth(self) -> int: ...

    def close(self, timeout: float = 30.0) -> int:
        """Stop, after waiting up to ``timeout`` s for delivery; returns the number still undelivered."""
        ...


class KafkaPublisher:
    """Encodes records with the schema registry and enqueues them, all or none, without ever blocking."""

    def __init__(
        self, codec: EventCodec, settings: ConnectionSettings, queue_max: int, metrics: GatewayMetrics,
        linger_ms: int = LINGER_MS["kafka"],
    ) -> None:
        self.codec = codec
        self.queue_max = queue_max
        self.metrics = metrics
        self.core = KafkaCore(settings, queue_max=queue_max, name="gateway-delivery", on_report=self._count, **{
            "message.timeout.ms": 0,  # never give up on an enqueued event
            "linger.ms": linger_ms,
            # A partition whose leader was -1 while the broker restarted is looked up again at the
            # next periodic refresh (librdkafka's default: 5 minutes); events wait for it meanwhile.
            "topic.metadata.refresh.interval.ms": 10000,
        })
        self.producer = self.core.producer
        metrics.queue_depth.set_function(self.depth)

    def _count(self, topic: str, error: str | None) -> None:
        (self.metrics.events_published if error is None else self.metrics.delivery_failures).labels(topic).inc()

    def depth(self) -> int:
        return self.core.depth()

    def has_room(self, n: int = 1) -> bool:
        return self.core.has_room(n)

    def publish(self, topic: str, key: str, records: list[dict[str, Any]]) -> Delivery | None:
        if not records:
            return Delivery.settled()
        if not self.has_room(len(records)):
            return None
        values = [self.codec.encode(topic, r) for r in records]
        delivery = Delivery(len(values))
        sent = self.core.send(topic, self.codec.encode_key(topic, key), values, delivery, block=False)
        if sent < len(values):
            # Only the delivery thread changes the queue, and only by shrinking it, so after has_room()
            # this is the queue's size in bytes (queue.buffering.max.kbytes); count what could not go.
            self.metrics.events_dropped.labels("queue_full").inc(len(values) - sent)
            return None
        self.metrics.events_enqueued.labels(topic).inc(len(values))
        return delivery

    def close(self, timeout: float = 30.0) -> int:
        return self.core.close(timeout)
