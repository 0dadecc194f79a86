"""Background publishing for the SDK and the OTLP receiver: the caller enqueues, a thread encodes and sends.

The caller's thread only appends a job to a bounded in-memory queue: no Avro encoding, no
network. Between its polls for delivery reports, the delivery thread of the producer core
(``kafka_core``) builds the records (a job may carry a function that builds them, so that
converting a captured response happens off the agent's thread too), encodes them with the
schema registry (``EventCodec``) and hands them, in order, to the idempotent, murmur2-
partitioned producer. A job is complete when its Delivery is settled; ``flush`` sees jobs
complete in the order they were submitted (a watermark).

Nothing is lost silently:

- a full queue blocks the caller up to ``block_timeout`` seconds (``on_full="block"``) or
  raises at once (``"raise"``); either way the caller gets ``QueueFullError``;
- ``flush()`` waits until every job submitted before it was acknowledged by Kafka, and raises
  ``DeliveryError`` naming the events that failed (encoding errors and delivery failures);
- ``close()`` runs at interpreter exit (``atexit``) and flushes first.
"""

from __future__ import annotations

import atexit
import functools
import logging
import threading
import time
from collections import deque
from collections.abc import Callable
from typing import Any, Literal

from rollstream.errors import ConfigError, QueueFullError, RollstreamError
from rollstream.events import DeliveryError
from rollstream.producers.kafka_core import Delivery, KafkaCore
from rollstream.schemas.codec import EventCodec
from rollstream.settings import ConnectionSettings

log = logging.getLogger(__name__)

OnFull = Literal["block", "raise"]
Record = dict[str, Any]
# What a job holds: a finished record, or a function that builds the job's records.
Payload = Record | Callable[[], list[Record]]
MAX_REPORTED_FAILURES = 1000


class Job:
    """Records for one topic and key; complete when each was acknowledged or failed."""

    __slots__ = ("seq", "topic", "key", "payload")

    def __init__(self, seq: int, topic: str, key: str, payload: Payload) -> None:
        self.seq = seq
        self.topic = topic
        self.key = key
        self.payload = payload


class EventEmitter:
    """A bounded queue in front of one idempotent Kafka producer, drained by a background thread."""

    def __init__(
        self,
        codec: EventCodec,
        settings: ConnectionSettings | None = None,
        *,
        queue_max: int = 100_000,
        on_full: OnFull = "block",
        block_timeout: float = 30.0,
        flush_timeout: float = 30.0,
        delivery_timeout_ms: int = 300_000,
        name: str = "rollstream-events",
        **overrides: Any,
    ) -> None:
        if queue_max < 1:
            raise ConfigError(f"queue_max must be at least 1, got {queue_max}")
        if on_full not in ("block", "raise"):
            raise ConfigError(f"on_full={on_full!r}: use 'block' or 'raise'")
        self.codec = codec
        self.queue_max = queue_max
        self.on_full = on_full
        self.block_timeout = block_timeout
        self.flush_timeout = flush_timeout
        self._lock = threading.Lock()
        self._wake = threading.Condition(self._lock)  # the background thread waits for jobs
        self._progress = threading.Condition(self._lock)  # callers wait for room or for flush
        self._queue: deque[Job] = deque()
        self._seq = 0  # jobs submitted
        self._watermark = 0  # every job with seq <= watermark is complete
        self._done_ahead: set[int] = set()  # complete jobs above the watermark
        self._failures: list[tuple[int, int, str]] = []  # (seq, events, reason)
        self._unencoded = 0
        self._closed = False
        self.core = KafkaCore(settings, queue_max=max(queue_max * 4, 100_000), name=name, work=self._work,
                              **{"message.timeout.ms": delivery_timeout_ms, **overrides})
        self.producer = self.core.producer
        atexit.register(self.close)

    # --- the caller's side -----------------------------------------------------------------

    @property
    def delivered(self) -> int:
        """Events Kafka acknowledged."""
        return self.core.delivered

    @property
    def failed(self) -> int:
        """Events that could not be encoded or that Kafka refused."""
        return self.core.failed + self._unencoded

    def pending(self) -> int:
        """Jobs submitted and not yet complete (queued, or awaiting Kafka's acknowledgement)."""
        return self._seq - self._watermark - len(self._done_ahead)

    def submit(self, topic: str, key: str, payload: Payload) -> int:
        """Enqueue one job; returns its sequence number (for ``flush(upto=...)``)."""
        return self.submit_many([(topic, key, payload)])

    def submit_many(self, items: list[tuple[str, str, Payload]]) -> int:
        """Enqueue all of ``items`` or none of them (QueueFullError); returns the last sequence number."""
        n = len(items)
        if n > self.queue_max:
            raise QueueFullError(f"{n} events exceed the queue size {self.queue_max}; raise the queue size")
        with self._lock:
            if self._closed:
                raise RollstreamError("the event emitter is closed")
            if self.pending() + n > self.queue_max:
                self._wait_for_room(n)
            for topic, key, payload in items:
                self._seq += 1
                self._queue.append(Job(self._seq, topic, key, payload))
            self._wake.notify()
            return self._seq

    def _wait_for_room(self, n: int) -> None:  # holds self._lock
        if self.on_full == "raise" or self.block_timeout <= 0:
            raise QueueFullError(
                f"event queue full ({self.pending()} of {self.queue_max} events waiting for Kafka); "
                "Kafka is slow or unreachable"
            )
        deadline = time.monotonic() + self.block_timeout
        while self.pending() + n > self.queue_max:
            left = deadline - time.monotonic()
            if left <= 0 or not self._progress.wait(left):
                if self.pending() + n <= self.queue_max:
                    return
                raise QueueFullError(
                    f"event queue stayed full for {self.block_timeout:.1f}s ({self.pending()} events waiting); "
                    "Kafka is slow or unreachable"
                )

    def flush(self, timeout: float | None = None, upto: int | None = None) -> None:
        """Wait until every job submitted so far (or up to sequence ``upto``) is acknowledged.

        Raises ``DeliveryError`` when some did not arrive in time or failed (each failure is
        reported once, to the first flush that covers it).
        """
        timeout = self.flush_timeout if timeout is None else timeout
        deadline = time.monotonic() + timeout
        with self._lock:
            target = self._seq if upto is None else upto
            while self._watermark < target:
                left = deadline - time.monotonic()
                if left <= 0:
                    waiting = target - self._watermark - sum(1 for s in self._done_ahead if s <= target)
                    raise DeliveryError(
                        f"{waiting} event(s) not acknowledged by Kafka within {timeout:.1f}s "
                        "(they stay queued and are retried)"
                    )
                self._progress.wait(left)
            failures = [f for f in self._failures if f[0] <= target]
            if failures:
                self._failures = [f for f in self._failures if f[0] > target]
        if failures:
            sample = "; ".join(reason for _, _, reason in failures[:3])
            raise DeliveryError(f"{sum(n for _, n, _ in failures)} event(s) were not published: {sample}")

    def close(self, timeout: float | None = None) -> int:
        """Flush, then stop the background thread; returns the number of events not delivered."""
        with self._lock:
            if self._closed:
                return 0
        try:
            self.flush(timeout)
        except DeliveryError as exc:
            log.error("closing the event emitter: %s", exc)
        with self._lock:
            self._closed = True
            self._wake.notify()
        remaining = self.core.close(1.0)
        atexit.unregister(self.close)
        return remaining + self.pending()

    # --- the background thread -------------------------------------------------------------

    def _work(self) -> float:
        """The delivery thread's turn between polls: send what was submitted; returns the next poll's timeout."""
        with self._lock:
            if not self._queue and not self.pending() and not self._closed:
                self._wake.wait(0.2)  # nothing in flight: no report to serve, wait for a job
            batch = list(self._queue)
            self._queue.clear()
        for job in batch:
            self._send(job)
        return 0 if batch else 0.005

    def _send(self, job: Job) -> None:
        try:
            payload = job.payload
            records = payload() if callable(payload) else [payload]
            key = self.codec.encode_key(job.topic, job.key)
            values = [self.codec.encode(job.topic, r) for r in records]
        except Exception as exc:  # a bad record must not stop the thread; it is reported by flush()
            log.error("cannot encode an event for %s (key %r): %s", job.topic, job.key, exc)
            with self._lock:
                self._unencoded += 1
                self._complete(job, 1, f"{job.topic}: {exc}")
            return
        job.payload = {}  # release the records
        if not values:
            with self._lock:
                self._complete(job, 0, None)
            return
        self.core.send(job.topic, key, values, Delivery(len(values), on_done=functools.partial(self._delivered, job)))

    def _delivered(self, job: Job, delivery: Delivery) -> None:
        with self._lock:
            self._complete(job, delivery.failures, None if delivery.error is None else f"{job.topic}: {delivery.error}")

    def _complete(self, job: Job, failures: int, reason: str | None) -> None:  # holds self._lock
        if reason is not None and len(self._failures) < MAX_REPORTED_FAILURES:
            self._failures.append((job.seq, failures, reason))
        seq = job.seq
        if seq == self._watermark + 1:
            self._watermark = seq
            while self._watermark + 1 in self._done_ahead:
                self._watermark += 1
                self._done_ahead.discard(self._watermark)
        else:
            self._done_ahead.add(seq)
        self._progress.notify_all()
