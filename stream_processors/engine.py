"""The processor's exactly-once core: batches in, one Kafka transaction per partition and batch, out.

Reads ``<prefix>calls``, ``<prefix>rewards`` and ``<prefix>rollouts`` (co-partitioned by
rollout id) in one consumer group, runs every record of a batch through the pure
:class:`~rollstream.stream_processors.processor.Processor`, and commits each input
partition's share of the batch in ONE transaction of that partition's producer, in this
order (see :meth:`Engine._commit`):

1. the outputs (transitions, dead letters, late-event copies), in processing order;
2. the changelog: each rollout state or piece the batch changed, once, with its final value;
3. the input offsets reached (``send_offsets_to_transaction``, fenced by the group generation);
4. ``commit_transaction``; only then
5. the same state writes reach the local store, with the changelog offset they reach.

A partition's position is recorded in one place: the consumer group's committed offsets,
which move only inside the transaction that carries the batch's effects. The local store
never holds a write of an aborted transaction, so after a crash it is only caught up from
the changelog offset it records (a crash between 4 and 5), never rebuilt from scratch.

Each input partition has its own transactional id (``<app id>-<partition>``): the worker
that takes a partition over fences the previous owner at once (``init_transactions`` aborts
its open transaction), instead of every reader waiting for that transaction to time out.

Timers (expiry, forgetting closed markers, completions waiting for an idle topic) run on
the same thread between batches, so every state change of a rollout happens in one place,
in order, without locks and without messages sent to itself.
"""

from __future__ import annotations

import hashlib
import logging
import socket
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from confluent_kafka import Consumer, KafkaError, KafkaException, Producer, TopicPartition

from rollstream.errors import ProcessorError
from rollstream.schemas.topics import Topics, consumer_config, producer_config
from rollstream.settings import ConnectionSettings
from rollstream.stream_processors.config import ProcessorSettings
from rollstream.stream_processors.join import RolloutState, Watermarks
from rollstream.stream_processors.metrics import Metrics
from rollstream.stream_processors.processor import KEEP, Decision, Output, Processor, piece_key
from rollstream.stream_processors.store import PartitionStore, Row

log = logging.getLogger(__name__)

HIGHWATER_MARGIN = 0.2  # seconds after a rollout's last event before a high-water mark may stand for it
BATCH_MAX = 2000  # records per batch at most
# A transaction's first request (AddPartitionsToTxn, or AddOffsetsToTxn) that reaches the coordinator while it
# still writes the previous transaction's markers is answered CONCURRENT_TRANSACTIONS and retried after this
# backoff. librdkafka's default (100 ms) was paid by every batch: the median send_offsets_to_transaction took
# 102 ms with it, 8 ms with 5 ms. Other retries back off exponentially from it, up to retry.backoff.max.ms.
RETRY_BACKOFF_MS = 5


def changelog_topic(app_id: str) -> str:
    return f"{app_id}-rollouts-changelog"


def instance_id(app_id: str, data_dir: Path) -> str:
    """The worker's static group member id: one per host and state folder (two workers never share a folder)."""
    digest = hashlib.sha1(str(data_dir.resolve()).encode()).hexdigest()[:10]
    return f"{app_id}-{socket.gethostname()}-{digest}"


@dataclass
class Partition:
    """What the worker holds for one input partition while it is assigned."""

    number: int
    store: PartitionStore
    producer: Any  # confluent_kafka.Producer: transactional under exactly-once
    pending: dict[bytes, float] = field(default_factory=dict)  # complete rollouts waiting -> stream time
    outputs: list[Output] = field(default_factory=list)
    positions: dict[str, int] = field(default_factory=dict)  # input topic -> next offset, this batch


class Engine:
    """One worker's consume → process → commit loop (run on a thread of its own by ``run``)."""

    def __init__(self, settings: ProcessorSettings, conn: ConnectionSettings, topics: Topics,
                 processor: Processor, metrics: Metrics, stop_at_end: bool = False) -> None:
        self.settings, self.conn, self.topics = settings, conn, topics
        self.processor, self.metrics = processor, metrics
        self.exactly_once = settings.guarantee == "exactly_once"
        self.changelog = changelog_topic(settings.app_id)
        self.inputs = topics.copartitioned
        self.parts: dict[int, Partition] = {}
        self.watermarks = Watermarks(self.inputs, settings.idle_grace)
        self.highwaters: dict[tuple[str, int], tuple[int, float]] = {}
        self.started_at: dict[tuple[str, int], int] = {}  # committed offset at assignment, until a record is read
        self.stop = threading.Event()
        self.stop_at_end = stop_at_end  # replay: stop once every input is read to where it ended at start
        self.ends: dict[tuple[str, int], int] = {}
        # (topic, partition) -> the offset after its last record in the batch in progress: until the batch has
        # handled that record, the consumer's position (already past the whole batch) is not what was read.
        self.batch_end: dict[tuple[str, int], int] = {}
        assert settings.data_dir is not None
        self.data_dir: Path = settings.data_dir
        self.consumer = Consumer(consumer_config(settings.app_id, conn, **{
            "partition.assignment.strategy": "range",  # co-partitioned topics: partition n of each to one worker
            # Static membership: a worker restarted on its state folder gets its partitions back at once,
            # instead of after the dead instance's session times out and the group rebalances.
            "group.instance.id": instance_id(settings.app_id, self.data_dir),
            "session.timeout.ms": 10000, "heartbeat.interval.ms": 1000, "fetch.wait.max.ms": 20,
            "max.poll.interval.ms": 600000,
        }))
        self.marks = Consumer(consumer_config(f"{settings.app_id}-marks", conn))
        self._committer = ThreadPoolExecutor(max_workers=8, thread_name_prefix="commit")
        self._last_tick = 0.0

    # --- the loop --------------------------------------------------------------------------

    def run(self) -> None:
        self.consumer.subscribe(list(self.inputs), on_assign=self._on_assign, on_revoke=self._on_revoke,
                                on_lost=self._on_revoke)
        try:
            while not self.stop.is_set():
                msgs = self._next_batch()
                if msgs:
                    self._batch(msgs)
                if time.monotonic() - self._last_tick >= self.settings.timer_interval:
                    self._tick()
                if self.stop_at_end and self.parts and self._at_end():
                    log.info("read every input to where it ended at start; stopping")
                    break
        finally:
            self._release(list(self.parts))
            self._committer.shutdown()
            self.consumer.close()
            self.marks.close()

    def _next_batch(self) -> list[Any]:
        """What has arrived, up to BATCH_MAX; when nothing has, what arrives first within the commit interval.

        A batch never waits to fill: under load it holds what came in while the last one committed, so
        batches grow with the rate and a quiet stream's records go through at once."""
        msgs: list[Any] = self.consumer.consume(BATCH_MAX, timeout=0)
        if not msgs:
            msgs = self.consumer.consume(1, timeout=self.settings.commit_interval)
            if msgs:
                msgs += self.consumer.consume(BATCH_MAX - 1, timeout=0)
        return msgs

    def _batch(self, msgs: Sequence[Any]) -> None:
        now = time.time()
        touched: set[int] = set()
        self.batch_end = {(m.topic(), m.partition()): m.offset() + 1 for m in msgs if m.error() is None}
        for msg in msgs:
            err = msg.error()
            if err is not None:
                if err.code() != KafkaError._PARTITION_EOF:
                    log.warning("consumer: %s", err)
                continue
            part = self.parts.get(msg.partition())
            if part is None:  # revoked while the batch was fetched
                continue
            self._record(part, msg, now)
            touched.add(part.number)
        self.batch_end = {}
        for p in touched:
            self._waiting(self.parts[p], now)
        self._commit([self.parts[p] for p in sorted(touched)])

    def _record(self, part: Partition, msg: Any, now: float) -> None:
        topic, offset, key, value = msg.topic(), msg.offset(), msg.key(), msg.value()
        ts = msg.timestamp()[1] / 1000.0
        self.watermarks.observe(topic, part.number, ts, now, offset)
        part.positions[topic] = offset + 1
        stored = part.store.get(key) if key is not None else None
        decision = self.processor.handle(topic, part.number, offset, key, value, stored, now, ts,
                                         self._ready(part.number, now), self._loader(part, key or b""))
        if key is None:  # a dead letter of a record without a key: nothing to store
            part.outputs.extend(decision.outputs)
        else:
            self._stage(part, key, decision)

    def _stage(self, part: Partition, key: bytes, decision: Decision) -> None:
        for piece_id, piece in decision.pieces:
            part.store.stage(piece_key(key, piece_id), Row(piece))
        if decision.state is not KEEP:
            part.store.stage(key, Row(decision.state, decision.deadline, decision.pending_ts, decision.open_since))
        elif decision.tracks:
            part.store.stage_index(key, decision.deadline, decision.pending_ts)
        part.outputs.extend(decision.outputs)
        if decision.tracks or decision.state is not KEEP:
            if decision.pending_ts is None:
                part.pending.pop(key, None)
            else:
                part.pending[key] = decision.pending_ts

    def _waiting(self, part: Partition, now: float) -> None:
        """Complete the rollouts that were waiting for this partition's other topics to catch up."""
        ready = self._ready(part.number, now)
        for key, ts in list(part.pending.items()):
            if self.watermarks.ready(part.number, ts, now, self._caught_up):
                self._stage(part, key, self.processor.check(part.store.get(key), now, ready,
                                                            self._loader(part, key), key))

    def _tick(self) -> None:
        """Expiry and forgetting by deadline, and completions that waited for an idle topic."""
        self._last_tick = time.monotonic()
        now = time.time()
        touched = []
        for part in list(self.parts.values()):
            ready = self._ready(part.number, now)
            for key in part.store.due(now):
                self._stage(part, key, self.processor.check(part.store.get(key), now, ready,
                                                            self._loader(part, key), key))
            self._waiting(part, now)
            if part.store.staged or part.store.index_only or part.outputs:
                touched.append(part)
        self._commit(touched)
        count, oldest = 0, None
        for part in self.parts.values():
            n, first = part.store.open_rollouts()
            count += n
            oldest = first if oldest is None or (first is not None and first < oldest) else oldest
        self.metrics.set_open(count, oldest)

    # --- commit: the one place where effects become visible ----------------------------------

    def _commit(self, parts: Sequence[Partition]) -> None:
        """Commit each partition's share of the batch in its own transaction, the partitions side by side.

        Their transactions are independent (one producer each), and most of a commit is waiting for the
        broker (the offsets, then the commit markers): done one after another, the waits add up. A
        partition whose commit failed is rolled back; the others stand, and the first error is raised."""
        if len(parts) <= 1:
            results = [self._try_commit(p) for p in parts]
        else:
            results = list(self._committer.map(self._try_commit, parts))
        for exc in results:
            if exc is not None:
                raise exc

    def _try_commit(self, part: Partition) -> BaseException | None:
        try:
            self._commit_one(part)
            return None
        except Exception as exc:
            part.store.discard()
            part.outputs.clear()
            part.positions.clear()
            if self.exactly_once:
                try:
                    part.producer.abort_transaction(30)
                except Exception:  # fenced or fatal: nothing more to abort
                    pass
            return exc

    def _commit_one(self, part: Partition) -> None:
        changes = part.store.changed()
        if not (part.outputs or changes or part.positions or part.store.index_only):
            return
        producer = part.producer
        delivered: list[int] = []

        def on_delivery(err: Any, msg: Any) -> None:
            if err is None:
                delivered.append(msg.offset())

        if self.exactly_once:
            producer.begin_transaction()
        for out in part.outputs:  # 1. outputs, in processing order
            self._produce(producer, out.topic, out.key, out.value, None, out.headers)
        for key, value in changes.items():  # 2. the changelog: each changed key once
            self._produce(producer, self.changelog, key, value, part.number, None, on_delivery)
        offsets = [TopicPartition(t, part.number, o) for t, o in part.positions.items()]
        if self.exactly_once:
            if offsets:  # 3. the input offsets, in the same transaction
                producer.send_offsets_to_transaction(offsets, self.consumer.consumer_group_metadata(), 30)
            producer.commit_transaction(60)  # 4.
        else:
            if producer.flush(60):
                raise ProcessorError("records still undelivered after 60 s; not committing the input offsets")
            if offsets:
                self.consumer.commit(offsets=offsets, asynchronous=False)
        # 5. committed: the local store takes the same writes, with the changelog offset they reach.
        part.store.apply(max(delivered) + 1 if delivered else None)
        part.outputs.clear()
        part.positions.clear()

    @staticmethod
    def _produce(producer: Any, topic: str, key: bytes | None, value: bytes | None, partition: int | None,
                 headers: Any, on_delivery: Callable[..., None] | None = None) -> None:
        kwargs: dict[str, Any] = {"key": key, "value": value, "headers": headers, "on_delivery": on_delivery}
        if partition is not None:
            kwargs["partition"] = partition
        while True:
            try:
                producer.produce(topic, **kwargs)
                return
            except BufferError:  # the producer's queue is full: let it drain
                producer.poll(0.05)

    # --- assignment: restore, fence, release -------------------------------------------------

    def _on_assign(self, consumer: Any, tps: list[TopicPartition]) -> None:
        numbers = sorted({tp.partition for tp in tps} - set(self.parts))
        t0 = time.monotonic()
        for p in numbers:
            producer = self._producer(p)  # first: fences the previous owner, whose open transaction is aborted
            store = PartitionStore(self.data_dir / f"partition-{p}.sqlite", p)
            restored = self._restore(store, p)
            part = Partition(p, store, producer, pending=dict(store.pending()))
            self.parts[p] = part
            log.info("partition %d: restored %d changelog records in %.2f s (%d complete rollouts waiting)",
                     p, restored, time.monotonic() - t0, len(part.pending))
        if self.stop_at_end:
            for tp in tps:
                self.ends[(tp.topic, tp.partition)] = self._highwater(tp.topic, tp.partition)
        self.metrics.restore_seconds = time.monotonic() - t0
        self.metrics.inc("assignments")
        self.metrics.ready = True

    def _on_revoke(self, consumer: Any, tps: list[TopicPartition]) -> None:
        # Called inside consume(), between batches: every batch is committed by now.
        self._release(sorted({tp.partition for tp in tps}))

    def _release(self, numbers: list[int]) -> None:
        self.started_at.clear()
        for p in numbers:
            part = self.parts.pop(p, None)
            if part is None:
                continue
            part.store.close()
            part.producer.flush(10)

    def _producer(self, p: int) -> Any:
        conf: dict[str, Any] = {"linger.ms": 5, "message.max.bytes": self.settings.max_message_bytes * 2,
                                "retry.backoff.ms": RETRY_BACKOFF_MS}
        if self.exactly_once:
            conf["transactional.id"] = f"{self.settings.app_id}-{p}"
            conf["transaction.timeout.ms"] = 60000
        producer = Producer(producer_config(self.conn, **conf))
        if self.exactly_once:
            producer.init_transactions(60)
        return producer

    def _restore(self, store: PartitionStore, p: int) -> int:
        """Catch the local store up with the changelog of partition ``p`` (read_committed)."""
        start = store.changelog_offset()
        low, high = self.marks.get_watermark_offsets(TopicPartition(self.changelog, p), timeout=30, cached=False)
        if start < low:  # the file predates what compaction kept: start over from the changelog's beginning
            log.info("partition %d: local state is older than the changelog's start; rebuilding it", p)
            store.clear()
            start = 0
        if start >= high:
            return 0
        reader = Consumer(consumer_config(f"{self.settings.app_id}-restore", self.conn,
                                          **{"enable.partition.eof": True}))
        reader.assign([TopicPartition(self.changelog, p, start)])
        n, end, deadline = 0, start, time.monotonic() + 600
        try:
            while time.monotonic() < deadline:
                batch: list[Any] = reader.consume(5000, timeout=1.0)
                eof = False
                for msg in batch:
                    if msg.error() is not None:
                        eof = eof or msg.error().code() == KafkaError._PARTITION_EOF
                        continue
                    store.stage(msg.key(), self.processor.index_row(msg.key(), msg.value()))
                    end = msg.offset() + 1
                    n += 1
                store.apply(end)
                if eof:
                    return n
        finally:
            reader.close()
        raise ProcessorError(f"could not read the changelog {self.changelog}[{p}] from {start} to {high} in 600 s")

    # --- readiness: has every input of the partition passed a rollout's stream time? ---------

    def _ready(self, p: int, now: float) -> Callable[[RolloutState], bool]:
        calls = (self.topics.calls,)

        def ready(state: RolloutState) -> bool:
            # Complete without a single call, a rollout would train nothing: its calls may still be on their way
            # (their producer slower than the reward's, past the high-water margin), so an idle calls topic does
            # not vouch for them. It completes once the calls topic is read past it, or expires.
            attempt = state.target_attempt()
            strict = () if any(c.attempt == attempt for c in state.calls) else calls
            return self.watermarks.ready(p, state.max_ts, now, self._caught_up, strict)

        return ready

    def _caught_up(self, topic: str, partition: int, at_ts: float) -> bool:
        """Whether everything the topic-partition held when ``at_ts`` was passed has been read.

        The high-water mark is asked of the broker once it is older than ``at_ts`` plus a margin
        for records still on their way (a mark fetched before then may predate them)."""
        key = (topic, partition)
        if time.time() < at_ts + HIGHWATER_MARGIN:
            return False
        cached = self.highwaters.get(key)
        if cached is None or cached[1] < at_ts + HIGHWATER_MARGIN:
            try:
                cached = (self._highwater(topic, partition), time.time())
            except KafkaException as exc:  # unknown: wait, rather than complete a rollout without its calls
                log.warning("could not read the high-water mark of %s[%d]: %s", topic, partition, exc)
                return False
            self.highwaters[key] = cached
        return self._position(topic, partition) >= cached[0]

    def _highwater(self, topic: str, partition: int) -> int:
        _, high = self.marks.get_watermark_offsets(TopicPartition(topic, partition), timeout=10, cached=False)
        return int(high)

    def _position(self, topic: str, partition: int) -> int:
        # The consumer's position is past transaction markers, which the last record's offset is not.
        # Before the first record of a partition it has none: then the committed offset it started from.
        handled = self.watermarks.next_offset.get((topic, partition), 0)
        if handled < self.batch_end.get((topic, partition), 0):
            return handled  # records of this batch not handled yet
        tp = TopicPartition(topic, partition)
        got = self.consumer.position([tp])[0].offset
        if got < 0 and (topic, partition) not in self.watermarks.next_offset:
            if (topic, partition) not in self.started_at:
                self.started_at[(topic, partition)] = max(0, self.consumer.committed([tp], timeout=10)[0].offset)
            got = self.started_at[(topic, partition)]
        return max(got, handled)

    def _at_end(self) -> bool:
        """Replay: every input read to where it ended at start, and no complete rollout still waiting."""
        if any(part.pending for part in self.parts.values()):
            return False
        return all(self._position(t, p) >= end for (t, p), end in self.ends.items() if p in self.parts)

    def _loader(self, part: Partition, key: bytes) -> Callable[[str], bytes | None]:
        store = part.store
        return lambda piece_id: store.get(piece_key(key, piece_id))
