"""Reading single records back by offset, and the consumer lag of the groups that read a prefix."""

from __future__ import annotations

import threading
import time
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from confluent_kafka import Consumer, ConsumerGroupTopicPartitions, KafkaException, TopicPartition
from confluent_kafka.admin import AdminClient

from rollstream.errors import TopicError
from rollstream.schemas.topics import Topics, client_config, consumer_config
from rollstream.settings import ConnectionSettings

FETCH_TIMEOUT_S = 5.0


class RecordFetcher:
    """One consumer, shared under a lock, that reads the records at given offsets (a rollout's page)."""

    def __init__(self, conn: ConnectionSettings) -> None:
        self.consumer = Consumer(consumer_config(
            f"rollstream-ui-fetch-{id(self):x}", conn, **{
                # A page wants a handful of records: fetch little beyond each one.
                "fetch.wait.max.ms": 10, "max.partition.fetch.bytes": 262144, "queued.max.messages.kbytes": 4096,
                "enable.partition.eof": True}))
        self.bootstrap = conn.kafka_bootstrap
        self.lock = threading.Lock()

    def connect(self, timeout: float = 10.0) -> None:
        """Connect to the broker now, so that the first rollout page does not pay for it (seconds, not ms)."""
        try:
            self.consumer.list_topics(timeout=timeout)
        except KafkaException as exc:
            raise TopicError(f"cannot reach Kafka at {self.bootstrap} ({exc}); start it with 'rollstream stack up'"
                             ) from exc

    def fetch(self, refs: Sequence[tuple[str, int, int]]) -> dict[tuple[str, int, int], bytes]:
        """The value of each (topic, partition, offset); a record that is gone (retention) is left out.

        Offsets of one partition are read in one pass when they lie close together, else one by one."""
        by_partition: dict[tuple[str, int], list[int]] = defaultdict(list)
        for topic, partition, offset in refs:
            by_partition[(topic, partition)].append(offset)
        out: dict[tuple[str, int, int], bytes] = {}
        with self.lock:
            for (topic, partition), offsets in by_partition.items():
                for run in _runs(sorted(set(offsets))):
                    self._read_run(topic, partition, run, out)
        return out

    def _read_run(self, topic: str, partition: int, run: list[int], out: dict[tuple[str, int, int], bytes]) -> None:
        """Read ``topic[partition]`` from ``run[0]`` to ``run[-1]``, keeping the offsets in ``run``."""
        wanted, last = set(run), run[-1]
        self.consumer.assign([TopicPartition(topic, partition, run[0])])
        deadline = time.monotonic() + FETCH_TIMEOUT_S
        try:
            while time.monotonic() < deadline:
                msg = self.consumer.poll(0.5)
                if msg is None:
                    continue
                if msg.error() is not None:  # the end of the partition: what is wanted is not (or no longer) there
                    return
                offset = msg.offset() or 0
                if offset in wanted:
                    out[(topic, partition, offset)] = msg.value() or b""
                if offset >= last:
                    return
        finally:
            self.consumer.unassign()

    def close(self) -> None:
        with self.lock:
            self.consumer.close()


RUN_GAP = 50  # offsets closer than this are read in one pass rather than sought one by one


def _runs(offsets: list[int]) -> list[list[int]]:
    """``offsets`` (sorted) cut where two neighbours lie more than RUN_GAP apart."""
    runs: list[list[int]] = []
    for o in offsets:
        if runs and o - runs[-1][-1] <= RUN_GAP:
            runs[-1].append(o)
        else:
            runs.append([o])
    return runs


@dataclass
class GroupLag:
    group: str
    role: str  # processor (reads calls/rewards/rollouts), trainer (reads transitions), other
    topics: list[str]
    committed: int
    end: int

    @property
    def lag(self) -> int:
        return max(0, self.end - self.committed)


class LagReader:
    """The consumer groups with offsets committed on the prefix's topics, and how far behind each is.

    Found by asking every group of the cluster for its committed offsets (concurrently), cached a few seconds."""

    def __init__(self, conn: ConnectionSettings, topics: Topics, ttl_s: float = 5.0) -> None:
        self.admin = AdminClient(client_config(conn))
        self.conn = conn
        self.topics = topics
        self.ttl_s = ttl_s
        self._cached: tuple[float, list[GroupLag], str | None] = (0.0, [], None)
        self._ends_consumer: Consumer | None = None
        self.lock = threading.Lock()

    def lags(self) -> tuple[list[GroupLag], str | None]:
        """(groups, error message or None)."""
        with self.lock:
            at, groups, error = self._cached
            if time.monotonic() - at < self.ttl_s:
                return groups, error
            try:
                groups, error = self._read(), None
            except KafkaException as exc:
                error = f"cannot read consumer groups from Kafka at {self.conn.kafka_bootstrap}: {exc}"
            self._cached = (time.monotonic(), groups, error)
            return groups, error

    def _read(self) -> list[GroupLag]:
        t = self.topics
        mine = {t.calls: "processor", t.rewards: "processor", t.rollouts: "processor", t.transitions: "trainer"}
        listing = self.admin.list_consumer_groups(request_timeout=10).result()
        names = [g.group_id for g in listing.valid if not g.group_id.startswith("rollstream-ui-")]
        futures = {}
        for name in names:
            futures.update(self.admin.list_consumer_group_offsets([ConsumerGroupTopicPartitions(name)],
                                                                   request_timeout=10))
        committed: dict[str, list[TopicPartition]] = {}
        for name, fut in futures.items():
            try:
                result = fut.result()
            except KafkaException:
                continue
            tps = [tp for tp in result.topic_partitions or [] if tp.topic in mine and tp.offset >= 0]
            if tps:
                committed[name] = tps
        if not committed:
            return []
        ends = self._ends({(tp.topic, tp.partition) for tps in committed.values() for tp in tps})
        out = []
        for name, tps in sorted(committed.items()):
            read = sorted({tp.topic for tp in tps})
            roles = {mine[x] for x in read}
            role = roles.pop() if len(roles) == 1 else "other"
            out.append(GroupLag(name, role, read, sum(tp.offset for tp in tps),
                                sum(ends.get((tp.topic, tp.partition), tp.offset) for tp in tps)))
        return out

    def _ends(self, partitions: set[tuple[str, int]]) -> dict[tuple[str, int], int]:
        if self._ends_consumer is None:
            self._ends_consumer = Consumer(consumer_config("rollstream-ui-lag", self.conn))
        out = {}
        for topic, partition in partitions:
            _, high = self._ends_consumer.get_watermark_offsets(TopicPartition(topic, partition), timeout=5)
            out[(topic, partition)] = int(high)
        return out


def describe(groups: list[GroupLag]) -> list[dict[str, Any]]:
    return [{"group": g.group, "role": g.role, "topics": ", ".join(g.topics), "committed": g.committed,
             "end": g.end, "lag": g.lag} for g in groups]
