"""The viewer's in-memory index of one topic prefix, built and kept current by a background consumer.

Per rollout it keeps summary fields (status, policy version, group, rewards, counts) and the
(topic, partition, offset) of each of its records packed into one ``array('q')``; it never holds a
token array or a message. A rollout's page reads its records back by offset (``kafka.RecordFetcher``).

Calls are read only up to ``policy_version`` (a prefix of the LlmCall schema: the Avro encoding of a
record is its fields one after the other, so fastavro stops there and the messages and token arrays
are never decoded) when the writer's schema is the reader's own; any other writer schema is decoded
in full, with schema resolution.
"""

from __future__ import annotations

import io
import json
import logging
import threading
import time
from array import array
from collections import Counter, deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from itertools import islice
from typing import Any

import fastavro
from confluent_kafka import OFFSET_BEGINNING, Consumer, KafkaError, Message, TopicPartition
from confluent_kafka.schema_registry.error import SchemaRegistryError
from fastavro.schema import to_parsing_canonical_form

from rollstream.errors import RollstreamError, SerializationError
from rollstream.schemas import EventType, parsed_schema, schema_dict
from rollstream.schemas.codec import HEADER, EventCodec, parse_header
from rollstream.schemas.topics import Topics, consumer_config
from rollstream.settings import ConnectionSettings

log = logging.getLogger(__name__)

# Topic codes packed into a record reference: code << 60 | partition << 44 | offset.
CALLS, REWARDS, ROLLOUTS, TRANSITIONS, DEAD_LETTERS, POLICY_UPDATES, LATE = range(7)
TOPIC_NAMES = ("calls", "rewards", "rollouts", "transitions", "dead-letters", "policy-updates", "late-events")
_PART_SHIFT, _CODE_SHIFT = 44, 60
_OFFSET_MASK, _PART_MASK = (1 << _PART_SHIFT) - 1, (1 << (_CODE_SHIFT - _PART_SHIFT)) - 1
DEAD_LETTERS_KEPT = 2000  # the newest dead letters shown (all are counted)
CALL_INDEX_FIELDS = "policy_version"  # the last LlmCall field the index reads


def pack(code: int, partition: int, offset: int) -> int:
    return (code << _CODE_SHIFT) | (partition << _PART_SHIFT) | offset


def unpack(ref: int) -> tuple[int, int, int]:
    return ref >> _CODE_SHIFT, (ref >> _PART_SHIFT) & _PART_MASK, ref & _OFFSET_MASK


class Rollout:
    """What the list shows of one rollout, and where its records are."""

    __slots__ = ("attempt", "calls", "end_us", "first_us", "group", "last_us", "late", "policy", "refs", "rewards",
                 "rid", "status", "task", "transitions", "version")

    def __init__(self, rid: str) -> None:
        self.rid = rid
        self.attempt = 1
        self.status = "CALLS"  # no lifecycle event yet
        self.policy: str | None = None
        self.version: int | None = None  # the newest policy version among its calls
        self.group: str | None = None
        self.task: str | None = None
        self.calls = 0
        self.transitions = 0
        self.late = 0
        self.first_us = 0  # first record's time
        self.last_us = 0  # latest record's time
        self.end_us = 0  # SUCCEEDED/FAILED/CANCELLED time (0: not finished)
        self.rewards: list[tuple[str, float, bool, int]] = []  # (name, value, terminal, timestamp µs)
        self.refs = array("q")

    def reward(self, name: str | None = None) -> float | None:
        """The terminal reward (of ``name``, or the first terminal one), else the latest reward."""
        chosen = None
        for r_name, value, terminal, _ in self.rewards:
            if name is not None and r_name != name:
                continue
            if terminal:
                return value
            chosen = value
        return chosen

    def touch(self, ts_us: int) -> None:
        if ts_us and (not self.first_us or ts_us < self.first_us):
            self.first_us = ts_us
        self.last_us = max(self.last_us, ts_us)


@dataclass
class Filters:
    """What the list page narrows the rollouts to."""

    status: str = ""
    group: str = ""
    version: int | None = None
    q: str = ""  # substring of the rollout id or task id
    has_reward: str = ""  # "", "yes", "no"


@dataclass
class VersionStats:
    version: int
    rollouts: int = 0
    rewarded: int = 0
    reward_sum: float = 0.0

    @property
    def mean(self) -> float | None:
        return self.reward_sum / self.rewarded if self.rewarded else None


@dataclass
class IndexStats:
    records: Counter[str] = field(default_factory=Counter)
    bytes: int = 0
    decode_errors: int = 0
    started: float = field(default_factory=time.monotonic)
    caught_up_s: float | None = None  # seconds from start until every partition reached its start-time end


class CallReader:
    """The head of an LlmCall (fields up to ``policy_version``), or the whole record for other writers."""

    def __init__(self, codec: EventCodec, topic: str, event_type: EventType, last_field: str) -> None:
        self.codec, self.topic = codec, topic
        fields = schema_dict(event_type)["fields"]
        names = [f["name"] for f in fields]
        head = fields[:names.index(last_field) + 1]
        prefix = {**schema_dict(event_type), "name": event_type + "Head", "fields": head}
        self.head = fastavro.parse_schema(prefix)
        self.ours = to_parsing_canonical_form(parsed_schema(event_type))
        self.same: dict[int, bool] = {}  # schema id -> written with our schema

    def read(self, data: bytes) -> dict[str, Any]:
        schema_id = parse_header(data)
        same = self.same.get(schema_id)
        if same is None:
            try:
                text = self.codec.client.get_schema(schema_id).schema_str or ""
            except SchemaRegistryError as exc:
                raise SerializationError(f"schema id {schema_id}: {exc.error_message}") from exc
            same = self.same[schema_id] = to_parsing_canonical_form(
                fastavro.parse_schema(json.loads(text))) == self.ours
        if same:
            record = fastavro.schemaless_reader(io.BytesIO(data[HEADER.size:]), self.head, None)
            assert isinstance(record, dict)
            return record
        return self.codec.decode(self.topic, data, raw_arrays=True)


class RolloutIndex:
    """The rollouts, dead letters and policy updates of one topic prefix, updated as records arrive."""

    def __init__(self, codec: EventCodec, conn: ConnectionSettings) -> None:
        self.codec, self.conn = codec, conn
        self.topics: Topics = codec.topics
        t = self.topics
        self.names = (t.calls, t.rewards, t.rollouts, t.transitions, t.dead_letters, t.policy_updates, t.late_events)
        self.code = {name: i for i, name in enumerate(self.names)}
        self.calls = CallReader(codec, t.calls, "LlmCall", CALL_INDEX_FIELDS)
        self.rollouts: dict[str, Rollout] = {}
        self.dead_letters: deque[dict[str, Any]] = deque(maxlen=DEAD_LETTERS_KEPT)
        self.dead_letter_counts: Counter[tuple[str, str]] = Counter()  # (source topic, error type) -> count
        self.policy_updates: list[dict[str, Any]] = []
        self.reward_names: Counter[str] = Counter()
        self._groups: dict[str, list[Rollout]] = {}  # group id -> its rollouts (a rollout page shows its group)
        self._status_counts: Counter[str] = Counter()  # kept as statuses change: the list shows it on every page
        self.stats = IndexStats()
        self.lock = threading.Lock()
        self.generation = 0  # bumped with every applied batch: caches key on it
        self._ends: dict[tuple[str, int], int] = {}  # partition -> high watermark when it was assigned
        self._assigned: set[str] = set()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._handlers: tuple[Callable[[Message], None], ...] = (
            self._call, self._reward, self._lifecycle, self._transition, self._dead_letter, self._policy_update,
            self._late)

    # --- the background consumer ---

    def start(self) -> RolloutIndex:
        self._thread = threading.Thread(target=self._run, name="ui-index", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(10)

    def _consumer(self) -> Consumer:
        return Consumer(consumer_config(
            f"rollstream-ui-{id(self):x}", self.conn, **{
                "enable.partition.eof": False, "fetch.wait.max.ms": 100, "queued.max.messages.kbytes": 65536}))

    def _assign_new(self, consumer: Consumer) -> None:
        """Assign, from the beginning, the partitions of the prefix's topics that exist and are not assigned yet."""
        meta = consumer.list_topics(timeout=10).topics
        new = []
        for name in self.names:
            if name in self._assigned or name not in meta or meta[name].error is not None:
                continue
            for p in meta[name].partitions:
                new.append(TopicPartition(name, p, OFFSET_BEGINNING))
                _, high = consumer.get_watermark_offsets(TopicPartition(name, p), timeout=10)
                self._ends[(name, p)] = high
            self._assigned.add(name)
        if new:
            consumer.incremental_assign(new)

    def _run(self) -> None:
        consumer = self._consumer()
        try:
            last_meta = 0.0
            while not self._stop.is_set():
                if len(self._assigned) < len(self.names) and time.monotonic() - last_meta > 2.0:
                    self._assign_new(consumer)
                    last_meta = time.monotonic()
                msgs = consumer.consume(2000, 0.2)
                if msgs:
                    self.apply(msgs)
                if self.stats.caught_up_s is None and self._assigned and self._caught_up(consumer):
                    self.stats.caught_up_s = time.monotonic() - self.stats.started
                    log.info("index caught up: %d rollouts in %.1f s", len(self.rollouts), self.stats.caught_up_s)
        except Exception:  # the pages keep serving what was indexed; the log says why it stopped
            log.exception("the index consumer stopped")
        finally:
            consumer.close()

    def _caught_up(self, consumer: Consumer) -> bool:
        positions = consumer.position([TopicPartition(t, p) for t, p in self._ends])
        for tp in positions:
            end = self._ends[(tp.topic, tp.partition)]
            if end > 0 and (tp.offset < 0 or tp.offset < end):
                return False
        return True

    def wait_caught_up(self, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        while self.stats.caught_up_s is None and time.monotonic() < deadline:
            time.sleep(0.05)
        return self.stats.caught_up_s is not None

    def apply(self, msgs: Iterable[Message]) -> None:
        """Index a batch of records (any of the prefix's topics)."""
        with self.lock:
            for msg in msgs:
                err = msg.error()
                if err is not None:
                    if err.code() != KafkaError._PARTITION_EOF:
                        log.warning("index: %s", err)
                    continue
                code = self.code.get(msg.topic() or "")
                if code is None or msg.value() is None:
                    continue
                self.stats.records[TOPIC_NAMES[code]] += 1
                self.stats.bytes += len(msg.value() or b"")
                try:
                    self._handlers[code](msg)
                except (RollstreamError, SchemaRegistryError, ValueError, EOFError, IndexError, KeyError,
                        TypeError, AttributeError) as exc:
                    # Undecodable input is the processor's to dead-letter; the index only counts it.
                    self.stats.decode_errors += 1
                    log.debug("index: cannot read %s[%d]@%d: %s", msg.topic(), msg.partition(), msg.offset(), exc)
            self.generation += 1

    def _rollout(self, rid: str) -> Rollout:
        r = self.rollouts.get(rid)
        if r is None:
            r = self.rollouts[rid] = Rollout(rid)
            self._status_counts[r.status] += 1
        return r

    @staticmethod
    def _ts_us(msg: Message) -> int:
        return int(msg.timestamp()[1]) * 1000

    def _ref(self, r: Rollout, code: int, msg: Message) -> None:
        r.refs.append(pack(code, msg.partition() or 0, msg.offset() or 0))

    def _call(self, msg: Message) -> None:
        rec = self.calls.read(msg.value() or b"")
        r = self._rollout(rec["rollout_id"])
        self._ref(r, CALLS, msg)
        r.calls += 1
        r.attempt = max(r.attempt, int(rec.get("attempt") or 1))
        r.policy = r.policy or rec["policy"]
        version = int(rec["policy_version"])
        r.version = version if r.version is None else max(r.version, version)
        r.touch(self._ts_us(msg))

    def _reward(self, msg: Message) -> None:
        rec = self.codec.decode(self.names[REWARDS], msg.value() or b"")
        r = self._rollout(rec["rollout_id"])
        self._ref(r, REWARDS, msg)
        ts = _micros(rec["timestamp"])
        r.rewards.append((rec["name"], float(rec["value"]), bool(rec["terminal"]), ts))
        self.reward_names[rec["name"]] += 1
        r.touch(ts)

    def _lifecycle(self, msg: Message) -> None:
        rec = self.codec.decode(self.names[ROLLOUTS], msg.value() or b"")
        r = self._rollout(rec["rollout_id"])
        self._ref(r, ROLLOUTS, msg)
        ts = _micros(rec["timestamp"])
        attempt, status = int(rec.get("attempt") or 1), rec["status"]
        # A newer attempt starts over; within one, a STARTED (a duplicate, or out of order) never undoes its end.
        if attempt > r.attempt or (attempt == r.attempt and (status != "STARTED" or r.status in ("CALLS", "STARTED"))):
            self._status_counts[r.status] -= 1
            self._status_counts[status] += 1
            r.attempt, r.status = attempt, status
            if status != "STARTED":
                r.end_us = ts
        r.policy = r.policy or rec["policy"]
        group: str | None = rec.get("group_id") or r.group
        if group is not None and group != r.group:
            if r.group is not None:
                self._groups[r.group].remove(r)
            self._groups.setdefault(group, []).append(r)
            r.group = group
        r.task = rec.get("task_id") or r.task
        r.touch(ts)

    def _transition(self, msg: Message) -> None:
        rid = (msg.key() or b"").decode(errors="replace")
        if not rid:
            rid = self.codec.decode(self.names[TRANSITIONS], msg.value() or b"", raw_arrays=True)["rollout_id"]
        r = self._rollout(rid)
        self._ref(r, TRANSITIONS, msg)
        r.transitions += 1

    def _late(self, msg: Message) -> None:
        rid = (msg.key() or b"").decode(errors="replace")
        if rid:
            r = self._rollout(rid)
            self._ref(r, LATE, msg)
            r.late += 1

    def _dead_letter(self, msg: Message) -> None:
        rec = self.codec.decode(self.names[DEAD_LETTERS], msg.value() or b"")
        key = rec.get("key") or b""
        self.dead_letter_counts[(rec["topic"], rec["error_type"])] += 1
        self.dead_letters.append({
            "topic": rec["topic"], "partition": rec["partition"], "offset": rec["offset"],
            "reason": rec["reason"], "error_type": rec["error_type"], "source": rec["source"],
            "timestamp_us": _micros(rec["timestamp"]), "key": key[:80].decode(errors="replace"),
            "size": len(rec.get("value") or b""), "at": (msg.partition(), msg.offset())})

    def _policy_update(self, msg: Message) -> None:
        rec = self.codec.decode(self.names[POLICY_UPDATES], msg.value() or b"")
        self.policy_updates.append({k: rec.get(k) for k in (
            "policy", "version", "step", "weights_uri", "kind", "mlflow_model_name", "mlflow_model_version")}
            | {"timestamp_us": _micros(rec["timestamp"])})

    # --- queries (each takes the lock only to copy what it needs) ---

    def get(self, rid: str) -> Rollout | None:
        with self.lock:
            return self.rollouts.get(rid)

    def refs(self, rid: str) -> list[tuple[str, int, int]]:
        with self.lock:
            r = self.rollouts.get(rid)
            packed = list(r.refs) if r is not None else []
        return [(self.names[c], p, o) for c, p, o in map(unpack, packed)]

    def page(self, filters: Filters, start: int, limit: int) -> tuple[list[Rollout], int]:
        """Rollouts matching ``filters``, newest first: ``limit`` of them from ``start``, and how many match."""
        with self.lock:
            if filters == Filters():  # the plain list: a slice from the newest end, whatever the index's size
                return list(islice(reversed(self.rollouts.values()), start, start + limit)), len(self.rollouts)
            items = list(self.rollouts.values())
        items.reverse()
        if filters.status:
            items = [r for r in items if r.status == filters.status]
        if filters.group:
            items = [r for r in items if r.group == filters.group]
        if filters.version is not None:
            items = [r for r in items if r.version == filters.version]
        if filters.has_reward:
            want = filters.has_reward == "yes"
            items = [r for r in items if bool(r.rewards) == want]
        if filters.q:
            q = filters.q
            items = [r for r in items if q in r.rid or (r.task is not None and q in r.task)]
        return items[start:start + limit], len(items)

    def group_members(self, group: str) -> list[Rollout]:
        with self.lock:
            return list(self._groups.get(group, ()))

    def status_counts(self) -> Counter[str]:
        with self.lock:
            return self._status_counts.copy()

    def version_stats(self, reward_name: str | None = None) -> list[VersionStats]:
        """Mean reward of the rollouts each policy version served (the newest version among a rollout's calls)."""
        out: dict[int, VersionStats] = {}
        with self.lock:
            items = list(self.rollouts.values())
        for r in items:
            if r.version is None:
                continue
            vs = out.get(r.version)
            if vs is None:
                vs = out[r.version] = VersionStats(r.version)
            vs.rollouts += 1
            value = r.reward(reward_name)
            if value is not None:
                vs.rewarded += 1
                vs.reward_sum += value
        return [out[v] for v in sorted(out)]

    def reward_delays(self, limit: int = 200_000) -> list[float]:
        """Seconds from each rollout's end to each of its rewards (negative: the reward came first)."""
        with self.lock:
            items = list(self.rollouts.values())
        delays: list[float] = []
        for r in items:
            end = r.end_us
            if not end:
                continue
            delays.extend((ts - end) / 1e6 for _, _, _, ts in r.rewards)
            if len(delays) >= limit:
                break
        return delays


def _micros(value: Any) -> int:
    """A decoded timestamp-micros field (fastavro gives a datetime) as integer microseconds."""
    if isinstance(value, int):
        return value
    return int(value.timestamp() * 1_000_000)
