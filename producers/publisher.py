"""A bounded, idempotent Kafka publisher for the gateway's events, with per-request acknowledgements.

Events wait in librdkafka's in-memory queue (``queue.buffering.max.messages``) with no
delivery timeout (``message.timeout.ms=0``), so what was enqueued survives a Kafka outage
and is delivered, once and in order, when the broker returns. When the queue is full the
publisher says so instead of blocking: the gateway then refuses new work (503) or serves
it and counts the dropped event. A background thread serves delivery reports.

``publish`` returns a :class:`Delivery` for the records of one request: an awaitable
settled from the delivery thread (``loop.call_soon_threadsafe``) once Kafka acknowledged
every one of them (``acks=all``, idempotent producer) or refused one. With
``ROLLSTREAM_GATEWAY_ACKS=kafka`` (the default) the gateway awaits it before it answers, so
whatever it answered 2xx for is in Kafka even if the gateway is killed the next moment;
with ``queued`` nobody awaits it (the delivery thread then never wakes the event loop).
A waiting request pays the producer's linger in latency, so the acknowledged mode does not
linger (``LINGER_MS["kafka"]``, 0 ms: under load librdkafka still batches what accumulates
while earlier requests are in flight) where the queued mode lingers 50 ms for bigger batches.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import threading
import time
from typing import Any, Literal, Protocol

from confluent_kafka import KafkaError, Message, Producer
from rollstream.producers.metrics import GatewayMetrics
from rollstream.schemas.codec import EventCodec
from rollstream.schemas.topics import producer_config

from rollstream.settings import ConnectionSettings

log = logging.getLogger(__name__)

Acks = Literal["kafka", "queued"]
# What the gateway's answer can say about its events (``X-Rollstream-Recorded`` on model calls):
# acknowledged by Kafka; queued but not acknowledged within the timeout; refused (not recorded).
Recorded = Literal["kafka", "pending", "failed"]
# linger.ms by acknowledgement mode: nobody waits on a queued event, so batch for less CPU per event;
# a request waiting for its acknowledgement pays the linger in latency (bench/gateway.py, one client:
# about +1 ms over the backend at 0 ms, +3 ms at 1 ms, +8 ms at 5 ms).
LINGER_MS: dict[Acks, int] = {"kafka": 0, "queued": 50}


def _wake(future: asyncio.Future[None]) -> None:
    if not future.done():
        future.set_result(None)


class Delivery:
    """Kafka's acknowledgement of the records of one ``publish``; settled from any thread, awaited on the loop.

    The event loop that awaits it is woken once, when the last record is acknowledged or
    refused; a Delivery that is never awaited costs a counter and a lock, no wake-up.
    """

    __slots__ = ("_left", "_error", "_lock", "_waiter")

    def __init__(self, count: int, error: str | None = None) -> None:
        self._left = count
        self._error = error
        self._lock = threading.Lock()
        self._waiter: tuple[asyncio.AbstractEventLoop, asyncio.Future[None]] | None = None

    @classmethod
    def settled(cls, error: str | None = None) -> Delivery:
        """A Delivery with nothing left to wait for: acknowledged, or refused with ``error``."""
        return cls(0, error)

    @property
    def error(self) -> str | None:
        """Why Kafka refused one of the records (the first reason); None while none was refused."""
        return self._error

    def settle(self, count: int = 1, error: str | None = None) -> None:
        """``count`` records acknowledged (``error`` None) or refused; thread-safe."""
        with self._lock:
            if error is not None and self._error is None:
                self._error = error
            self._left -= count
            if self._left > 0 or self._waiter is None:
                return
            loop, future = self._waiter
        try:
            loop.call_soon_threadsafe(_wake, future)
        except RuntimeError:  # the loop is closed (shutdown): nobody waits any more
            pass

    async def wait(self, timeout: float) -> Recorded:
        """Wait up to ``timeout`` s: ``kafka`` (all acknowledged), ``failed`` (one refused) or ``pending``."""
        with self._lock:
            if self._left > 0:
                if self._waiter is None:
                    loop = asyncio.get_running_loop()
                    self._waiter = (loop, loop.create_future())
                future = self._waiter[1]
            else:
                future = None
        if future is not None:
            done, _ = await asyncio.wait((future,), timeout=timeout)
            if not done:
                return "pending"
        return "kafka" if self._error is None else "failed"


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
    """Encodes records with the schema registry and enqueues them on an idempotent producer."""

    def __init__(
        self, codec: EventCodec, settings: ConnectionSettings, queue_max: int, metrics: GatewayMetrics,
        linger_ms: int = LINGER_MS["kafka"],
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
                    "linger.ms": linger_ms,
                    # An acknowledgement means "on every in-sync replica, once": not to be weakened
                    # by ROLLSTREAM_KAFKA_CONFIG.
                    "acks": "all",
                    "enable.idempotence": True,
                    # A partition whose leader was -1 while the broker restarted is looked up again at the
                    # next periodic refresh (librdkafka's default: 5 minutes); events wait for it meanwhile.
                    "topic.metadata.refresh.interval.ms": 10000,
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

    def _on_delivery(self, delivery: Delivery, err: KafkaError | None, msg: Message) -> None:
        topic = msg.topic() or "?"
        if err is not None:
            self.metrics.delivery_failures.labels(topic).inc()
            log.error("event to %s (key %r) was not delivered: %s", topic, msg.key(), err)
            delivery.settle(1, str(err))
        else:
            self.metrics.events_published.labels(topic).inc()
            delivery.settle(1)

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

    def publish(self, topic: str, key: str, records: list[dict[str, Any]]) -> Delivery | None:
        if not records:
            return Delivery.settled()
        if not self.has_room(len(records)):
            return None
        values = [self.codec.encode(topic, r) for r in records]
        key_bytes = self.codec.encode_key(topic, key)
        delivery = Delivery(len(values))
        report = functools.partial(self._on_delivery, delivery)
        for i, value in enumerate(values):
            try:
                self.producer.produce(topic, value=value, key=key_bytes, on_delivery=report)
            except BufferError:
                # Only the delivery thread changes the queue, and only by shrinking it, so
                # this is unreachable after has_room(); count what could not go.
                self.metrics.events_dropped.labels("queue_full").inc(len(values) - i)
                delivery.settle(len(values) - i, "the event queue is full")
                return None
        self.metrics.events_enqueued.labels(topic).inc(len(values))
        return delivery

    def close(self, timeout: float = 30.0) -> int:
        self._stop.set()
        self._thread.join()
        remaining = int(self.producer.flush(timeout))
        if remaining:
            log.error("%d event(s) still undelivered after %.0f s at shutdown; they are lost", remaining, timeout)
        return remaining
