"""``rollstream process``: the Faust worker that joins calls, rewards and rollout events into transitions.

Reads ``<prefix>calls``, ``<prefix>rewards`` and ``<prefix>rollouts`` (co-partitioned by
rollout id) with ONE agent over one multi-topic source, keeps one state per rollout in a
RocksDB table backed by a changelog topic, and writes ``<prefix>transitions``,
``<prefix>dead-letters`` and ``<prefix>late-events``. Expiry runs from a timer that
looks at the rollouts of this worker's partitions and sends a check command (keyed by
rollout id) to ``<app id>-commands``, which the same agent consumes: every state change
then happens inside the agent, in the Kafka transaction of the rollout's partition.

Exactly-once: each input partition has its own transactional producer (Faust's
``exactly_once``). This module makes the changelog write, the records produced and the
input offset of one event land in the same transaction (see docs/stream-processor.md):
all writes of an event are handed to the transactional producer while holding a lock
that Faust's periodic commit must also take, and the local RocksDB state is rebuilt
from the (read_committed) changelog at every start, so it never holds writes of an
aborted transaction.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import shutil
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Any

import faust
from confluent_kafka import Consumer, TopicPartition
from confluent_kafka.admin import AdminClient, NewTopic
from faust.types import TP

from rollstream.errors import ProcessorError, RollstreamError
from rollstream.schemas.codec import EventCodec, registry_client
from rollstream.schemas.topics import (
    MAX_RECORD_BYTES,
    Topics,
    check_copartitioned,
    client_config,
    consumer_config,
    create_topics,
)
from rollstream.settings import ConnectionSettings, kafka_client_config
from rollstream.stream_processors.auth import faust_credentials
from rollstream.stream_processors.config import ProcessorSettings
from rollstream.stream_processors.join import RolloutState, Watermarks
from rollstream.stream_processors.metrics import Metrics
from rollstream.stream_processors.processor import KEEP, Decision, Output, Processor, piece_key
from rollstream.stream_processors.unreadable import Unreadable, guard_batches

log = logging.getLogger(__name__)

TABLE = "rollouts"
CHECK = b"check"
LEDGER = b"\x00ledger\x1f"  # table keys of the input ledger (never a rollout id: those are non-empty text)
HIGHWATER_MARGIN = 0.2  # seconds after a rollout's last event before a high-water mark may stand for it
LEDGER_CHECK = b"\x00ledger-check"  # command (sent to one partition) to compare the ledger with committed offsets
UNREADABLE_CHECK = b"\x00unreadable"  # command (sent to one partition) to read again a batch Faust could not decode


def ledger_key(topic: str, partition: int) -> bytes:
    return LEDGER + f"{topic}\x1f{partition}".encode()


@dataclass
class Record:
    """An input record read outside Faust (to repair a gap), shaped like the Faust message the agent gets."""

    topic: str
    partition: int
    offset: int
    key: bytes | None
    value: bytes | None
    timestamp: float


class RangeReader:
    """Reads offsets [start, end) of one input partition with read_committed, outside the consumer group."""

    def __init__(self, conn: ConnectionSettings) -> None:
        self.conn = conn
        self._consumer: Any = None
        self._marks: Any = None

    def read(self, topic: str, partition: int, start: int, end: int, timeout: float = 60.0) -> list[Record]:
        if self._consumer is None:
            self._consumer = Consumer(consumer_config("rollstream-process-gap-reader", self.conn))
        consumer = self._consumer
        tp = TopicPartition(topic, partition, start)
        consumer.assign([tp])
        out: list[Record] = []
        deadline = time.monotonic() + timeout
        try:
            while True:
                for msg in consumer.consume(500, timeout=0.5):
                    if msg.error() or msg.offset() >= end:
                        continue
                    out.append(Record(topic, partition, msg.offset(), msg.key(), msg.value(),
                                      msg.timestamp()[1] / 1000.0))
                position = consumer.position([TopicPartition(topic, partition)])[0].offset
                if position >= end or (out and out[-1].offset >= end - 1):
                    return out
                if time.monotonic() > deadline:
                    raise ProcessorError(f"could not read {topic}[{partition}] offsets {start}..{end - 1} "
                                         f"within {timeout:.0f} s (position {position})")
        finally:
            consumer.unassign()

    def highwater(self, topic: str, partition: int) -> int:
        """The partition's end (last stable offset, read_committed) as the broker says now.

        Called on the event loop while ``read`` may run in a thread: it has a consumer of its own."""
        if self._marks is None:
            self._marks = Consumer(consumer_config("rollstream-process-marks", self.conn))
        _, high = self._marks.get_watermark_offsets(TopicPartition(topic, partition), timeout=5, cached=False)
        return int(high)

    def committed(self, group: str, topics: Sequence[str], partition: int) -> dict[str, int]:
        """The offsets ``group`` has committed for ``partition`` of each topic (those it has)."""
        consumer = Consumer(consumer_config(group, self.conn))
        try:
            got = consumer.committed([TopicPartition(t, partition) for t in topics], timeout=30)
        finally:
            consumer.close()
        return {tp.topic: tp.offset for tp in got if tp.offset >= 0}


def changelog_topic(app_id: str) -> str:
    return f"{app_id}-{TABLE}-changelog"


def commands_topic(app_id: str) -> str:
    return f"{app_id}-commands"


def prepare_topics(settings: ProcessorSettings, conn: ConnectionSettings, topics: Topics) -> int:
    """Create what is missing, then check every topic the worker touches has the same partition count."""
    create_topics(topics, conn)
    n = check_copartitioned(topics, conn)
    admin = AdminClient(client_config(conn))
    internal = {
        changelog_topic(settings.app_id): {"cleanup.policy": "compact", "max.message.bytes": str(MAX_RECORD_BYTES)},
        commands_topic(settings.app_id): {"retention.ms": str(24 * 3600 * 1000)},
    }
    meta = admin.list_topics(timeout=30).topics
    missing = [NewTopic(name, num_partitions=n, replication_factor=1, config=cfg)
               for name, cfg in internal.items() if name not in meta]
    if missing:
        for name, fut in admin.create_topics(missing, operation_timeout=30).items():
            try:
                fut.result()
            except Exception as exc:  # already created by a second worker starting alongside is fine
                if "TOPIC_ALREADY_EXISTS" not in str(exc):
                    raise ProcessorError(f"cannot create topic '{name}': {exc}") from exc
        deadline = time.monotonic() + 30
        while not all(name in meta for name in internal) and time.monotonic() < deadline:
            time.sleep(0.2)  # new topics take a moment to show in metadata
            meta = admin.list_topics(timeout=30).topics
    for name in (topics.transitions, topics.late_events, *internal):
        count = len(meta[name].partitions)
        if count != n:
            raise ProcessorError(
                f"topic '{name}' has {count} partitions but '{topics.calls}' has {n}; the processor's output "
                f"and state topics must be co-partitioned with its inputs — recreate '{name}' with {n}"
            )
    return n


class Runtime:
    """The worker's moving parts: the Faust app, its table, and the Processor doing the logic."""

    def __init__(self, settings: ProcessorSettings, conn: ConnectionSettings, topics: Topics) -> None:
        self.settings = settings
        self.topics = topics
        self.metrics = Metrics()
        self.codec = EventCodec(registry_client(conn), topics)
        self.processor = Processor(settings, topics, self.codec, self.metrics)
        self.lock = asyncio.Lock()
        self.deadlines: dict[bytes, float] = {}  # rollout key -> when the timer must check it
        self.indexed: frozenset[Any] | None = None
        self.watermarks = Watermarks(topics.copartitioned, settings.idle_grace)
        self._last_wait_log = 0.0
        self.pending: dict[int, dict[bytes, float]] = {}  # partition -> complete rollouts waiting -> stream time
        # The input ledger: per input topic-partition, the next offset this worker must process. It is
        # written to the changelog in the transaction that commits the input offsets (see _guard_commits).
        self.next_offset: dict[tuple[str, int], int | None] = {}
        self.ledger_written: dict[tuple[str, int], int] = {}
        self.reader = RangeReader(conn)
        self.highwaters: dict[tuple[str, int], tuple[int, float]] = {}  # (topic, partition) -> (mark, asked at)
        # Batches Faust's consumer could not decode: reported from its thread, read again through librdkafka.
        self.unreadable: list[Unreadable] = []
        self.unread: dict[int, list[Unreadable]] = {}  # partition -> batches still to read again
        guard_batches(self.unreadable.append)
        brokers = [f"kafka://{h.strip()}" for h in conn.kafka_bootstrap.split(",") if h.strip()]
        self.app = app = faust.App(
            settings.app_id,
            broker=brokers,
            broker_credentials=faust_credentials(kafka_client_config(conn.kafka_config)),
            store="rocksdb://",
            datadir=str(settings.data_dir),
            processing_guarantee=settings.guarantee,
            topic_partitions=topics.partitions,
            topic_replication_factor=1,
            broker_commit_interval=settings.commit_interval,
            broker_session_timeout=10.0,
            broker_heartbeat_interval=1.0,
            broker_commit_livelock_soft_timeout=300.0,
            consumer_auto_offset_reset="earliest",
            web_enabled=True,
            web_port=settings.web_port,
            web_bind="127.0.0.1",
            web_host="127.0.0.1",
            stream_wait_empty=False,
            producer_linger=0.002,
            producer_max_request_size=MAX_RECORD_BYTES,
            table_cleanup_interval=3600.0,
        )
        self.source = app.topic(
            topics.calls, topics.rewards, topics.rollouts, commands_topic(settings.app_id),
            key_serializer="raw", value_serializer="raw", partitions=topics.partitions,
        )
        self.table = app.Table(TABLE, default=None, partitions=topics.partitions, key_type=bytes, value_type=bytes)
        self.commands = app.topic(commands_topic(settings.app_id), key_serializer="raw", value_serializer="raw",
                                  partitions=topics.partitions)
        self._wire()

    # --- Faust wiring --------------------------------------------------------------------

    def _wire(self) -> None:
        app = self.app

        @app.agent(self.source, name="join")
        async def join(stream: faust.StreamT) -> None:
            async for event in stream.events():
                try:
                    await self.on_message(event.message)
                except Exception:
                    if self.settings.guarantee != "exactly_once":
                        raise
                    # Faust would restart the agent in-process with the local store holding writes that the
                    # aborted transaction took back from the changelog: end the worker instead, so that its
                    # next start rebuilds the store from the changelog and processes the record again.
                    log.critical("could not process %s[%d]@%d; exiting, to start again from the last commit",
                                 event.message.topic, event.message.partition, event.message.offset, exc_info=True)
                    os._exit(70)

        @app.timer(self.settings.timer_interval, name="expiry")
        async def expiry() -> None:
            await self.on_timer()

        @app.timer(self.settings.log_interval, name="stats-log")
        async def stats_log() -> None:
            log.info("processor: %s", self.metrics.log_line())

        @app.page("/metrics")
        async def metrics(web: Any, request: Any) -> Any:
            return web.bytes(self.metrics.prometheus().encode(), content_type="text/plain; version=0.0.4")

        @app.page("/stats")
        async def stats(web: Any, request: Any) -> Any:
            return web.json(self.metrics.snapshot())

        @app.task
        async def guard() -> None:
            self._guard_commits()

    def _guard_commits(self) -> None:
        """Make Faust's commit (offsets + end of transaction) wait for the event being processed.

        Without this, a commit can run while the agent is between two writes of one event
        (any await may yield), committing half of its effects with the offset of the event
        before it; after a crash the event is processed again on top of its own half.
        """
        consumer = self.app.consumer
        original = consumer.commit
        lock = self.lock

        producer: Any = self.app.producer

        async def commit(topics: Any = None, start_new_transaction: bool = True) -> bool:
            async with lock:
                await self._write_ledger()
                # aiokafka sends EndTxn without waiting for the batches still in its accumulator,
                # which then land in the next transaction: deliver them first.
                await producer.flush()
                return bool(await original(topics, start_new_transaction=start_new_transaction))

        consumer.commit = commit  # type: ignore[method-assign]

    async def _write_ledger(self) -> None:
        """Record, in the transaction about to commit the input offsets, how far this worker really got."""
        actives = self.app.assignor.assigned_actives()
        for (topic, partition), nxt in list(self.next_offset.items()):
            if nxt is None or self.ledger_written.get((topic, partition)) == nxt:
                continue
            if TP(topic, partition) not in actives:
                continue
            key, value = ledger_key(topic, partition), str(nxt).encode()
            try:
                # Outside an event, Faust's store cannot tell the partition: put it in that partition's db.
                store: Any = self.table.data
                store._db_for_partition(partition).put(key, value)
                store._key_index[key] = partition
                # With the input partition's transactional id, like the outputs: it commits with those offsets.
                await self._send(Output(changelog_topic(self.settings.app_id), key, value), partition, at=partition)
            except Exception as exc:  # a ledger behind the offsets only makes the next start re-read a range
                log.warning("could not write the input ledger of %s[%d]: %s", topic, partition, exc)
                continue
            self.ledger_written[(topic, partition)] = nxt

    def _expected_offset(self, topic: str, partition: int) -> int | None:
        key = (topic, partition)
        if key not in self.next_offset:
            stored = self.table.data.get(ledger_key(topic, partition))
            self.next_offset[key] = int(stored) if stored is not None else None
            if stored is not None:
                self.ledger_written[key] = int(stored)
        return self.next_offset[key]

    def _tid(self, partition: int) -> str | None:
        if not self.app.in_transaction:
            return None
        group = self.app.assignor.group_for_topic(self.topics.calls)
        return f"{self.app.conf.id}-{group}-{partition}"

    async def _send(self, out: Output, partition: int, at: int | None = None) -> None:
        """Produce ``out`` in the transaction of input ``partition`` (to partition ``at``, else by key)."""
        producer: Any = self.app.producer
        await producer.send(out.topic, out.key, out.value, at, None, out.headers,
                            transactional_id=self._tid(partition))

    async def _store(self, key: bytes, value: bytes | None, partition: int) -> None:
        table: Any = self.table
        if value is None:
            table.data.pop(key, None)
        else:
            table.data[key] = value
        changelog = table.changelog_topic
        fut = changelog.as_future_message(key=key, value=value, partition=partition, key_serializer="raw",
                                          value_serializer="raw", eager_partitioning=True)
        await changelog.publish_message(fut)

    def _loader(self, key: bytes) -> Any:
        data = self.table.data
        return lambda piece_id: data.get(piece_key(key, piece_id))

    async def _apply(self, key: bytes, partition: int, decision: Decision) -> None:
        for piece_id, value in decision.pieces:  # before the state that refers to them
            await self._store(piece_key(key, piece_id), value, partition)
        if decision.state is not KEEP:
            await self._store(key, decision.state, partition)
        for out in decision.outputs:
            await self._send(out, partition)
        if not decision.tracks:
            return
        if decision.deadline is None:
            self.deadlines.pop(key, None)
        else:
            self.deadlines[key] = decision.deadline
        if decision.pending_ts is None:
            self.pending.get(partition, {}).pop(key, None)
        else:
            self.pending.setdefault(partition, {})[key] = decision.pending_ts

    async def on_message(self, message: Any) -> None:
        async with self.lock:
            topic, p, offset = message.topic, message.partition, message.offset
            await self._read_unreadable(p)
            expected = self._expected_offset(topic, p)
            if expected is not None and offset > expected:
                await self._repair_gap(topic, p, expected, offset)
            if topic == self.commands.get_topic_name() and message.value == LEDGER_CHECK:
                await self._check_ledger(p)
            elif topic == self.commands.get_topic_name() and message.value == UNREADABLE_CHECK:
                pass  # it only brought the partition's turn (_read_unreadable above)
            else:
                await self._process(message)
            self.next_offset[(topic, p)] = max(expected or 0, offset + 1)

    def _take_unreadable(self) -> None:
        while self.unreadable:
            found = self.unreadable.pop(0)
            self.metrics.inc("unreadable_batches")
            self.metrics.inc("unreadable_records", found.next_offset - found.first_offset)
            self.unread.setdefault(found.partition, []).append(found)

    async def _read_unreadable(self, partition: int) -> None:
        """Process the records of batches of ``partition`` that Faust's consumer skipped as undecodable.

        librdkafka decodes every codec Kafka has; what it cannot read either stops here with the
        reason, without stopping the partition's other records."""
        self._take_unreadable()
        for found in self.unread.pop(partition, []):
            try:
                await self._repair_gap(found.topic, partition, found.first_offset, found.next_offset)
            except ProcessorError as exc:
                log.error("%s[%d]: offsets %d..%d stay unread (%s): %s", found.topic, partition,
                          found.first_offset, found.next_offset - 1, found.reason, exc)
                continue
            key = (found.topic, partition)
            self.next_offset[key] = max(self._expected_offset(*key) or 0, found.next_offset)

    async def _check_ledger(self, partition: int) -> None:
        """After a partition is assigned: records between the ledger and the committed offset were never
        processed. Repairing them at the next record of the topic is not enough (there may be none)."""
        loop = asyncio.get_running_loop()
        inputs = self.topics.copartitioned
        committed = await loop.run_in_executor(None, self.reader.committed, self.settings.app_id, inputs, partition)
        for topic in inputs:
            expected = self._expected_offset(topic, partition)
            at = committed.get(topic)
            if expected is not None and at is not None and at > expected:
                await self._repair_gap(topic, partition, expected, at)
                self.next_offset[(topic, partition)] = at

    async def _repair_gap(self, topic: str, partition: int, start: int, end: int) -> None:
        """Process the records of [start, end) this worker has not seen, before the one at ``end``.

        faust-streaming can move a partition's committed offset past records its agent never
        processed (offset gaps taken for transaction markers or compaction, messages dropped while
        partitions are reassigned). The ledger, committed in the same transaction as the offsets,
        says where processing really stopped; everything from there is read again here. Records
        processed before are recognised by their event ids, so a false alarm costs only the read.
        """
        loop = asyncio.get_running_loop()
        records = await loop.run_in_executor(None, self.reader.read, topic, partition, start, end)
        self.metrics.inc("gaps_repaired")
        self.metrics.inc("gap_records", len(records))
        if records:
            log.warning("%s[%d]: offsets %d..%d were skipped by the consumer; processing the %d records there",
                        topic, partition, start, end - 1, len(records))
        for record in records:
            await self._process(record)

    async def _process(self, message: Any) -> None:
        now = time.time()
        p = message.partition

        def ready(state: RolloutState) -> bool:
            return self.watermarks.ready(p, state.max_ts, now, self._caught_up)

        stored = self.table.data.get(message.key) if message.key is not None else None
        load = self._loader(message.key or b"")
        if message.topic == self.commands.get_topic_name():
            decision = self.processor.check(stored, now, ready, load)
        else:
            self.watermarks.observe(message.topic, p, message.timestamp or 0.0, now, message.offset)
            decision = self.processor.handle(message.topic, p, message.offset, message.key, message.value,
                                             stored, now, message.timestamp or 0.0, ready, load)
        if message.key is None:  # dead letter of a record without a key: nothing to store
            for out in decision.outputs:
                await self._send(out, p)
        else:
            await self._apply(message.key, p, decision)
        # Completions that were waiting for this partition's other topics to catch up.
        waiting = self.pending.get(p)
        if waiting:
            for key in [k for k, ts in waiting.items() if self.watermarks.ready(p, ts, now, self._caught_up)]:
                await self._apply(key, p, self.processor.check(self.table.data.get(key), now, ready,
                                                               self._loader(key)))

    def _caught_up(self, topic: str, partition: int, at_ts: float) -> bool:
        """Whether this worker has processed everything the topic-partition held when ``at_ts`` was passed.

        The high-water mark is asked of the broker once it is older than ``at_ts`` (plus a margin
        for records still on their way): the consumer's own figure is from its last fetch, and
        after a lull it predates records produced since, which then arrived after their
        rollout had been closed without them.
        """
        key = (topic, partition)
        if time.time() < at_ts + HIGHWATER_MARGIN:
            return False  # too early for any mark to stand for it: ask again at the next record or tick
        cached = self.highwaters.get(key)
        if cached is None or cached[1] < at_ts + HIGHWATER_MARGIN:
            try:
                highwater = self.reader.highwater(topic, partition)
            except Exception as exc:  # unknown: wait, rather than complete a rollout without its calls
                log.warning("could not read the high-water mark of %s[%d]: %s", topic, partition, exc)
                return False
            cached = (highwater, time.time())
            self.highwaters[key] = cached
        nxt = self.watermarks.next_offset.get(key)
        if nxt is None:  # nothing read since start: where the committed offset put the consumer
            consumer: Any = self.app.consumer
            nxt = consumer._read_offset.get(TP(topic, partition)) or 0
        return bool(nxt >= cached[0])

    async def on_timer(self) -> None:
        try:
            await self._on_timer()
        except Exception:  # a bug here must not silently stop expiry for good
            log.exception("expiry timer failed; retrying at the next tick")

    def _why_waiting(self, partition: int, at_ts: float, now: float) -> str:
        parts = []
        for topic in self.watermarks.topics:
            key = (topic, partition)
            consumer: Any = self.app.consumer
            idle = now - self.watermarks.wall.get(key, now)
            parts.append(f"{topic}: ts={self.watermarks.ts.get(key)} idle={idle:.1f}s "
                         f"next={self.watermarks.next_offset.get(key)} hw={consumer.highwater(TP(topic, partition))}")
        return f"p{partition} at {at_ts}: " + "; ".join(parts)

    async def _on_timer(self) -> None:
        app = self.app
        tables: Any = app.tables
        if app.rebalancing or not tables.recovery.completed.is_set():
            return
        producer: Any = self.app.producer
        actives = frozenset(app.assignor.assigned_actives())
        if actives != self.indexed:
            self._reindex()
            new = {tp.partition for tp in actives - (self.indexed or frozenset())
                   if tp.topic == self.commands.get_topic_name()}
            self.indexed = actives
            for partition in sorted(new):
                await producer.send(self.commands.get_topic_name(), LEDGER, LEDGER_CHECK, partition, None, None)
        self._take_unreadable()
        for partition in list(self.unread):  # a record of that partition gives the agent its turn to read them
            await producer.send(self.commands.get_topic_name(), LEDGER, UNREADABLE_CHECK, partition, None, None)
        now = time.time()
        # Snapshots: the agent changes these dicts while this awaits.
        for p, waiting in list(self.pending.items()):
            for key in [k for k, ts in list(waiting.items()) if self.watermarks.ready(p, ts, now, self._caught_up)]:
                waiting.pop(key, None)  # the agent puts it back if it must still wait
                await self._command(key)
        if now - self._last_wait_log > 10:
            self._last_wait_log = now
            for p, waiting in self.pending.items():
                if waiting:
                    log.info("%d complete rollouts waiting on partition %d; %s", len(waiting), p,
                             self._why_waiting(p, min(waiting.values()), now))
        due = [key for key, deadline in self.deadlines.items() if deadline <= now]
        for key in due:
            # The agent replaces this with the real deadline when it handles the command.
            self.deadlines[key] = now + max(5.0, 5 * self.settings.timer_interval)
            await self._command(key)

    async def _command(self, key: bytes) -> None:
        """Ask the agent to look at a rollout. Sent outside any transaction: a transaction is only
        committed along with input offsets, so a command inside one could wait for a next input
        that never comes. Commands are idempotent, so a repeat does no harm."""
        producer: Any = self.app.producer
        await producer.send(self.commands.get_topic_name(), key, CHECK, None, None, None)

    def _reindex(self) -> None:
        """After a rebalance: the deadlines and open rollouts of the partitions now held."""
        self.deadlines.clear()
        self.pending.clear()
        self.metrics.open_first_seen.clear()
        s = self.settings
        table: Any = self.table
        # Partitions that moved: their ledger is reloaded from the recovered table at their next record.
        actives = self.app.assignor.assigned_actives()
        for tp in [tp for tp in self.next_offset if TP(*tp) not in actives]:
            self.next_offset.pop(tp, None)
            self.ledger_written.pop(tp, None)
        for key, value in table.data.items():
            if key.startswith(b"\x00"):  # the ledger and state pieces: not rollouts
                continue
            state = RolloutState.loads(value)
            self.deadlines[key] = state.deadline(s.expire_after, s.expire_from, s.closed_ttl)
            if not state.closed:
                self.metrics.open_first_seen[state.rollout_id] = state.first_seen
                if state.is_complete(s.completion):
                    partition = self.app.consumer.key_partition(changelog_topic(s.app_id), key) or 0
                    self.pending.setdefault(partition, {})[key] = state.max_ts
        log.info("indexed %d rollouts (%d open) of the assigned partitions", len(self.deadlines),
                 self.metrics.open_rollouts())


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="rollstream process", description=__doc__.split("\n")[0])
    p.add_argument("--topic-prefix", help="prefix of the topics (default: ROLLSTREAM_TOPIC_PREFIX)")
    p.add_argument("--partitions", type=int, help="partitions of topics created here (default: ROLLSTREAM_PARTITIONS)")
    p.add_argument("--app-id", help="Faust app id / consumer group (default: ROLLSTREAM_PROCESS_APP_ID, "
                                    "else <topic prefix>processor)")
    p.add_argument("--data-dir", help="local state folder (default: ROLLSTREAM_PROCESS_DATA_DIR, "
                                      "else $ROLLSTREAM_HOME/processor/<app id>)")
    p.add_argument("--web-port", type=int, help="web server port for /metrics and /stats")
    p.add_argument("--guarantee", choices=["exactly_once", "at_least_once"])
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(list(sys.argv[1:] if argv is None else argv))
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        conn = ConnectionSettings()
        conn = replace(conn, topic_prefix=args.topic_prefix or conn.topic_prefix,
                       partitions=args.partitions or conn.partitions)
        settings = ProcessorSettings()
        overrides: dict[str, Any] = {}
        if args.app_id:
            overrides["app_id"] = args.app_id
        if args.data_dir:
            from pathlib import Path

            overrides["data_dir"] = Path(args.data_dir)
        if args.web_port:
            overrides["web_port"] = args.web_port
        if args.guarantee:
            overrides["guarantee"] = args.guarantee
        settings = replace(settings, **overrides).for_prefix(conn.topic_prefix)
        topics = Topics(conn.topic_prefix, conn.partitions)
        n = prepare_topics(settings, conn, topics)
        topics = Topics(conn.topic_prefix, n)
        runtime = Runtime(settings, conn, topics)
    except RollstreamError as exc:
        log.error("%s", exc)
        return 2
    if settings.guarantee == "exactly_once":
        # Local state may hold writes of transactions that a crash aborted: rebuild it from
        # the changelog, which is read with read_committed.
        shutil.rmtree(runtime.app.conf.tabledir, ignore_errors=True)
    log.info("processing %s -> %s (app %s, %d partitions, %s)", ", ".join(topics.copartitioned),
             topics.transitions, settings.app_id, n, settings.guarantee)
    worker = faust.Worker(runtime.app, loglevel="DEBUG" if args.verbose else "INFO", quiet=True,
                          override_logging=False)
    try:
        worker.execute_from_commandline()
    except SystemExit as exc:
        return int(exc.code or 0) if not isinstance(exc.code, str) else 1
    return 0
