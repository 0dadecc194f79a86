"""The Kafka producer core every Rollstream producer stands on: one confluent Producer, its delivery thread,
and per-batch deliveries that a thread can wait for or an event loop can await.

Three front ends share it, each adding only its own policy:

- ``rollstream.events.EventProducer``: synchronous, for CLI commands, tests and the demo (publish, flush);
- ``rollstream.producers.emitter.EventEmitter``: the SDK's and OTLP receiver's ordered background emitter;
- ``rollstream.producers.publisher.KafkaPublisher``: the gateway's bounded publisher, whose requests await
  their :class:`Delivery`.

What the core owns so that no front end repeats it:

- the producer: idempotent, ``acks=all`` (``producer_config``, then ``ROLLSTREAM_KAFKA_CONFIG``, then these
  two, then the front end's own settings: the gateway's ``message.timeout.ms=0``, its linger), its queue
  bounded by ``queue.buffering.max.messages`` (``has_room``);
- one daemon thread serving delivery reports. It holds the producer but not the core, so a core nobody closes
  (a CLI's EventProducer) is still collected, and its thread then ends. A front end with work for that thread
  gives ``work``, run before each poll (the emitter encodes and sends its jobs there: encoding, sending and
  delivery reports then share one thread, with no hand-off of the GIL between two for every event);
- the delivery callback: each record's report settles its batch's Delivery, is counted (``delivered``,
  ``failed``), logged when Kafka refused it, and passed to the front end's ``on_report`` (metrics);
- a full queue: ``send`` waits for room (``block=True``) or settles what did not fit as refused; a record
  the producer refuses at once (larger than ``message.max.bytes``) is settled as refused too;
- Kafka's error callback, logged at most every 10 s (librdkafka repeats the same errors every few seconds
  while the broker is down), fatal errors always.

A Delivery is settled from the delivery thread and has two views: ``wait_blocking(timeout)`` blocks a thread,
``await wait(timeout)`` suspends a task, whose loop is woken with ``call_soon_threadsafe`` once, when the last
record is settled. A Delivery nobody waits for costs a counter and no wake-up; ``on_done`` runs once, on the
settling thread, for a front end that tracks completion itself (the emitter's ordered watermark).
"""

from __future__ import annotations

import asyncio
import functools
import logging
import threading
import time
import weakref
from collections.abc import Callable
from typing import Any, Literal

from confluent_kafka import KafkaError, KafkaException, Message, Producer

from rollstream.schemas.topics import producer_config
from rollstream.settings import ConnectionSettings

log = logging.getLogger(__name__)

# What is known of a Delivery after a wait: acknowledged by Kafka; not settled within the timeout;
# refused (at least one record was not recorded).
Recorded = Literal["kafka", "pending", "failed"]
QUEUE_FULL = "the event queue is full"
# One lock for every Delivery's few-instruction updates: allocating a lock per batch costs more than sharing one.
_SETTLING = threading.Lock()


def _wake(future: asyncio.Future[None]) -> None:
    if not future.done():
        future.set_result(None)


class Delivery:
    """Kafka's acknowledgement of a batch of records; settled from any thread, waited for from a thread or a loop."""

    __slots__ = ("_left", "_error", "_failures", "_waiter", "_event", "_on_done")

    def __init__(self, count: int, error: str | None = None,
                 on_done: Callable[[Delivery], None] | None = None) -> None:
        self._left = count
        self._error = error
        self._failures = 0
        self._waiter: tuple[asyncio.AbstractEventLoop, asyncio.Future[None]] | None = None
        self._event: threading.Event | None = None
        self._on_done = on_done

    @classmethod
    def settled(cls, error: str | None = None) -> Delivery:
        """A Delivery with nothing left to wait for: acknowledged, or refused with ``error``."""
        return cls(0, error)

    @property
    def error(self) -> str | None:
        """Why Kafka refused one of the records (the first reason); None while none was refused."""
        return self._error

    @property
    def failures(self) -> int:
        """How many of the records were refused so far."""
        return self._failures

    def settle(self, count: int = 1, error: str | None = None) -> None:
        """``count`` records acknowledged (``error`` None) or refused; thread-safe."""
        with _SETTLING:
            if error is not None:
                self._failures += count
                if self._error is None:
                    self._error = error
            self._left -= count
            if self._left > 0:
                return
            waiter, event, on_done = self._waiter, self._event, self._on_done
            self._on_done = None
        if event is not None:
            event.set()
        if waiter is not None:
            try:
                waiter[0].call_soon_threadsafe(_wake, waiter[1])
            except RuntimeError:  # the loop is closed (shutdown): nobody waits any more
                pass
        if on_done is not None:
            on_done(self)

    def _outcome(self) -> Recorded:
        return "kafka" if self._error is None else "failed"

    def wait_blocking(self, timeout: float | None = None) -> Recorded:
        """Block up to ``timeout`` s (None: until settled): ``kafka``, ``failed`` (one refused) or ``pending``."""
        with _SETTLING:
            if self._left > 0:
                if self._event is None:
                    self._event = threading.Event()
                event: threading.Event | None = self._event
            else:
                event = None
        if event is not None and not event.wait(timeout):
            return "pending"
        return self._outcome()

    async def wait(self, timeout: float) -> Recorded:
        """Wait up to ``timeout`` s on the running loop: ``kafka``, ``failed`` (one refused) or ``pending``."""
        with _SETTLING:
            if self._left > 0:
                if self._waiter is None:
                    loop = asyncio.get_running_loop()
                    self._waiter = (loop, loop.create_future())
                future: asyncio.Future[None] | None = self._waiter[1]
            else:
                future = None
        if future is not None:
            done, _ = await asyncio.wait((future,), timeout=timeout)
            if not done:
                return "pending"
        return self._outcome()


def _weakly(method: Callable[..., None]) -> Callable[..., None]:
    """``method`` called through a weak reference: the producer's callbacks must not keep the core alive."""
    ref = weakref.WeakMethod(method)

    def call(*args: Any) -> None:
        target = ref()
        if target is not None:
            target(*args)

    return call


def _serve_reports(producer: Producer, stop: threading.Event, work: Callable[[], float] | None) -> None:
    while not stop.is_set():
        producer.poll(0.1 if work is None else work())


class KafkaCore:
    """One idempotent producer, its delivery thread, and the delivery callback that settles batches."""

    def __init__(self, settings: ConnectionSettings | None = None, *, queue_max: int = 100_000,
                 name: str = "rollstream-kafka", on_report: Callable[[str, str | None], None] | None = None,
                 work: Callable[[], float] | None = None, **overrides: Any) -> None:
        self.queue_max = queue_max
        self.on_report = on_report  # (topic, None or why Kafka refused it) for each record, before it settles
        self.delivered = 0
        self.failed = 0
        self.queued = 0  # records enqueued whose delivery report has not been served yet
        self._counting = threading.Lock()  # reports are served by the delivery thread, and by flush() callers
        self._last_error_log = 0.0
        self.producer = Producer(producer_config(settings, **{
            "queue.buffering.max.messages": queue_max,
            # An acknowledgement means "on every in-sync replica, once": not weakened by ROLLSTREAM_KAFKA_CONFIG.
            "acks": "all",
            "enable.idempotence": True,
            "error_cb": _weakly(self._on_error),
            **overrides,
        }))
        self._stop = threading.Event()
        # work: run on the delivery thread before each poll (keeping its owner alive until close); returns
        # the poll's timeout in seconds.
        self._thread = threading.Thread(target=_serve_reports, args=(self.producer, self._stop, work), name=name,
                                        daemon=True)
        self._thread.start()
        weakref.finalize(self, self._stop.set)

    def depth(self) -> int:
        """Records in the producer's queue: not yet acknowledged, or their reports not yet served."""
        return len(self.producer)

    def has_room(self, n: int = 1) -> bool:
        # Counted here, not with len(producer): that also counts librdkafka's queued events (a connection
        # error of an unreachable broker, say), which take no room in the message queue.
        return self.queued + n <= self.queue_max

    def send(self, topic: str, key: bytes, values: list[bytes], delivery: Delivery, *, block: bool = True) -> int:
        """Enqueue ``values`` in order, keyed by ``key``, each settling ``delivery``; returns how many were taken.

        A full queue is waited out (``block``), else what did not fit is settled as refused at once and not
        counted as taken; a record the producer refuses outright is settled as refused and counted."""
        report = functools.partial(self._report, delivery)
        for i, value in enumerate(values):
            while True:
                try:
                    self.producer.produce(topic, value=value, key=key, on_delivery=report)
                    with self._counting:
                        self.queued += 1
                    break
                except KafkaException as exc:
                    self._settle(delivery, topic, key, exc.args[0] if exc.args else exc)
                    break
                except BufferError:
                    if not block or self._stop.is_set():  # closing: the delivery thread must not wait for room
                        delivery.settle(len(values) - i, QUEUE_FULL)
                        return i
                    self.producer.poll(0.05)  # serve reports (on the delivery thread too) to make room
        return len(values)

    def _report(self, delivery: Delivery, err: KafkaError | None, msg: Message) -> None:
        with self._counting:
            self.queued -= 1
        self._settle(delivery, msg.topic() or "?", msg.key(), err)

    def _settle(self, delivery: Delivery, topic: str, key: Any, err: object | None) -> None:
        error = None if err is None else str(err)
        with self._counting:
            if error is None:
                self.delivered += 1
            else:
                self.failed += 1
        if error is not None:
            log.error("event to %s (key %r) was not delivered: %s", topic, key, error)
        if self.on_report is not None:
            self.on_report(topic, error)
        delivery.settle(1, error)

    def _on_error(self, err: KafkaError) -> None:
        now = time.monotonic()
        if err.fatal() or now - self._last_error_log > 10.0:
            self._last_error_log = now
            log.warning("kafka: %s (%d event(s) queued)", err, len(self.producer))

    def flush(self, timeout: float) -> int:
        """Wait up to ``timeout`` s for every queued record's report; returns the number still queued."""
        return int(self.producer.flush(timeout))

    def close(self, timeout: float = 30.0) -> int:
        """Stop the delivery thread, then wait up to ``timeout`` s for delivery; returns the number undelivered."""
        self._stop.set()
        if threading.current_thread() is not self._thread:
            self._thread.join()
        remaining = self.flush(timeout)
        if remaining:
            log.error("%d event(s) still undelivered after %.0f s at shutdown; they are lost", remaining, timeout)
        return remaining
