"""Consuming transitions: Kafka (read_committed) → filter, dedup, group, staleness → batches.

Offsets and exactly-once. Transitions wait in memory (a group fills, a batch fills) between
being read and being trained on. A checkpoint therefore stores, per partition, the *resume
offset*: the lowest offset still waiting, or the next offset to read when nothing waits. On
restart the consumer is seeked there, so no waiting transition is lost; the ids of
transitions already trained at or beyond a resume offset are stored with it (``trained_above``)
and skipped when they come round again, so none is trained twice. Duplicates the processors
emitted (the same ``transition_id`` twice) are dropped through a window of recent ids that is
checkpointed too.

Staleness is judged when a group is released into a batch, against the trainer's current
policy version: members more than ``max_policy_lag`` versions behind are dropped and counted.
The ids of transitions dropped (stale, too long, empty) since the last checkpoint are kept
with the reason (``dropped``) and written into the next checkpoint, beside the ids trained, so
the checkpoints say what became of every transition the trainer consumed.
"""

from __future__ import annotations

import logging
import time
from collections import Counter, OrderedDict
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from confluent_kafka import OFFSET_BEGINNING, Consumer, KafkaError, KafkaException, TopicPartition

from rollstream.errors import SerializationError, TrainerError
from rollstream.schemas.codec import EventCodec
from rollstream.schemas.topics import consumer_config
from rollstream.settings import ConnectionSettings
from rollstream.trainer.config import TrainConfig

log = logging.getLogger(__name__)


@dataclass
class Sample:
    """One transition, ready to train on."""

    transition_id: str
    partition: int
    offset: int
    group_key: str
    rollout_key: str
    policy_version: int
    prompt_ids: list[int]
    response_ids: list[int]
    behaviour_logprobs: list[float] | None
    reward: float
    token_source: str = "engine"  # tokenizer: ids re-tokenized from text by the processor, never with logprobs
    sequence: int = 0  # the call's order within its rollout attempt

    @property
    def tokens(self) -> int:
        return len(self.prompt_ids) + len(self.response_ids)


@dataclass
class Group:
    key: str
    created: float
    samples: list[Sample] = field(default_factory=list)
    rollouts: set[str] = field(default_factory=set)


@dataclass
class Batch:
    """The samples of one step, with group indices for group-relative advantages."""

    samples: list[Sample]
    group_index: list[int]
    group_sizes: list[int]

    @property
    def tokens(self) -> int:
        return sum(s.tokens for s in self.samples)


class RecentIds:
    """A bounded, insertion-ordered set of transition ids (oldest forgotten first)."""

    def __init__(self, capacity: int, ids: Iterable[str] = ()) -> None:
        self.capacity = capacity
        self._ids: OrderedDict[str, None] = OrderedDict()
        for i in ids:
            self.add(i)

    def __contains__(self, tid: object) -> bool:
        return tid in self._ids

    def add(self, tid: str) -> None:
        self._ids[tid] = None
        self._ids.move_to_end(tid)
        while len(self._ids) > self.capacity:
            self._ids.popitem(last=False)

    def discard(self, tid: str) -> None:
        self._ids.pop(tid, None)

    def to_list(self) -> list[str]:
        return list(self._ids)


class TransitionReader:
    """Reads one policy's transitions and hands out batches of whole groups."""

    def __init__(self, config: TrainConfig, connection: ConnectionSettings, codec: EventCodec,
                 start_offsets: dict[int, int], trained_above: Iterable[str] = (), seen: Iterable[str] = ()) -> None:
        self.config = config
        self.codec = codec
        self.topic = codec.topics.transitions
        self.start_offsets = dict(start_offsets)
        self.skip = set(trained_above)  # trained before the restart, beyond a resume offset
        self.seen = RecentIds(config.dedup_window, seen)
        self.counts: Counter[str] = Counter()
        self.next_read: dict[int, int] = dict(start_offsets)  # partition -> next offset to read
        self.groups: OrderedDict[str, Group] = OrderedDict()  # filling
        self.ready: list[Group] = []  # released, in order
        self.released: OrderedDict[str, Group] = OrderedDict()  # recently released groups by key (late calls)
        self.trained: dict[int, list[tuple[int, str]]] = {}  # partition -> (offset, id) trained since checkpoint
        self.dropped: dict[str, str] = {}  # transition id -> why it was not trained, since the last checkpoint
        self.last_message = time.monotonic()
        self.batch_wait_since: float | None = None
        group_id = config.consumer_group or f"rollstream-trainer-{config.policy}"
        # Static membership: a trainer restarted after a crash takes its partitions back at once instead of
        # waiting for the dead member's session to time out. One trainer job (rank 0) consumes per policy.
        # The session outlasts a broker restart: when it times out locally, librdkafka rejoins under a new
        # member id while the broker may still hold the old one for this instance id, and the "fenced by
        # other consumer with same group.instance.id" that follows is fatal (found by bench/faults.py).
        self.consumer = Consumer(consumer_config(group_id, connection, **{
            "enable.partition.eof": False, "group.instance.id": f"{group_id}-rank0", "session.timeout.ms": 45000,
        }))
        self.consumer.subscribe([self.topic], on_assign=self._on_assign)

    # -- Kafka ---------------------------------------------------------------------------------

    def _on_assign(self, consumer: Consumer, partitions: list[TopicPartition]) -> None:
        """Seek each partition to the checkpoint's resume offset (else the group's committed one).

        On a re-assignment within a run, reading goes on where it stopped (``next_read`` starts as the
        checkpoint's offsets and advances with every message).
        """
        for tp in partitions:
            if tp.partition in self.next_read:
                tp.offset = self.next_read[tp.partition]
            elif not self.start_offsets:
                continue  # no checkpoint: committed offset, else auto.offset.reset
            else:
                tp.offset = OFFSET_BEGINNING  # a partition added after the checkpoint
        consumer.assign(partitions)
        log.info("assigned %s", ", ".join(f"{self.topic}[{tp.partition}]@{tp.offset}" for tp in partitions))

    def commit(self, offsets: dict[int, int]) -> None:
        """Commit resume offsets to the consumer group (after the checkpoint that holds them is on S3)."""
        if not offsets:
            return
        try:
            self.consumer.commit(offsets=[TopicPartition(self.topic, p, o) for p, o in offsets.items()],
                                 asynchronous=False)
        except KafkaException as exc:
            # The checkpoint is authoritative; the group offset only helps tools that show lag.
            log.warning("committing offsets %s failed: %s", offsets, exc)

    def lag(self) -> int:
        """Transitions on the topic not yet trained on (high watermark - resume offset, summed)."""
        total = 0
        resume = self.resume_offsets()
        for p in sorted({tp.partition for tp in self.consumer.assignment()} | set(self.next_read)):
            try:
                # Cached: the watermarks every fetch response carries. Asking the broker would queue behind the
                # consumer's long-polling fetch and stall the step for up to fetch.wait.max.ms per partition.
                marks = self.consumer.get_watermark_offsets(TopicPartition(self.topic, p), cached=True)
            except KafkaException:
                continue
            if marks is None or marks[1] < 0:
                continue
            low, high = marks
            total += max(0, high - max(low, resume.get(p, low)))
        return total

    def close(self) -> None:
        self.consumer.close()

    # -- reading -------------------------------------------------------------------------------

    def poll(self, timeout: float) -> int:
        """Read what is available within ``timeout``; returns the number of messages read."""
        # consume() waits for all num_messages or the timeout, so drain what is buffered without waiting
        # and block only in poll(), which returns as soon as one message arrives.
        messages = self.consumer.consume(num_messages=1000, timeout=0)
        if not messages:
            first = self.consumer.poll(timeout)
            messages = [first] if first is not None else []
        for msg in messages:
            error = msg.error()
            if error is not None:
                if error.code() == KafkaError._PARTITION_EOF:
                    continue
                raise TrainerError(f"consumer error on {self.topic}: {error}")
            partition, offset = msg.partition(), msg.offset()
            assert partition is not None and offset is not None
            self.next_read[partition] = offset + 1
            self._accept(partition, offset, msg.value())
        self._release_full()
        if messages:
            self.last_message = time.monotonic()
        return len(messages)

    def _accept(self, partition: int, offset: int, value: bytes | None) -> None:
        where = f"{self.topic}[{partition}]@{offset}"
        try:
            record = self.codec.decode(self.topic, value or b"")
        except SerializationError as exc:
            log.warning("skipping undecodable transition at %s: %s", where, exc)
            self.counts["undecodable"] += 1
            return
        if record["policy"] != self.config.policy:
            self.counts["other_policy"] += 1
            return
        tid = record["transition_id"]
        if tid in self.skip:
            self.skip.discard(tid)
            self.counts["replayed_skipped"] += 1
            return
        if tid in self.seen:
            self.counts["duplicates"] += 1
            return
        sample = self._sample(record, partition, offset)
        if sample is None:
            return
        self.seen.add(tid)
        key = sample.group_key
        released = self.released.get(key)
        if (released is not None and sample.rollout_key in released.rollouts
                and any(g is released for g in self.ready)):
            # A later call of a rollout whose group was already released (its transitions straddled two
            # reads): it belongs with its rollout, not in a new group of one.
            released.samples.append(sample)
            return
        group = self.groups.get(key)
        if group is None:
            group = self.groups[key] = Group(key, time.monotonic())
        group.samples.append(sample)
        group.rollouts.add(sample.rollout_key)

    def _release_full(self) -> None:
        """Groups holding enough rollouts go to ``ready``: after a whole read, so that a rollout's calls (one
        transaction of the processor, consecutive in one partition) are all in it."""
        needed = self._needed()
        for key in [k for k, g in self.groups.items() if len(g.rollouts) >= needed]:
            group = self.released[key] = self.groups.pop(key)
            self.ready.append(group)
        while len(self.released) > 4 * max(1, self.config.batch_size):
            self.released.pop(next(iter(self.released)))

    def _needed(self) -> int:
        return self.config.group_size if self.config.objective in ("grpo", "rloo") else 1

    def _sample(self, record: dict[str, Any], partition: int, offset: int) -> Sample | None:
        prompt, response = list(record["prompt_token_ids"]), list(record["response_token_ids"])
        if not prompt or not response:
            self.counts["empty"] += 1
            self.dropped[record["transition_id"]] = "empty"
            log.warning("skipping transition %s: empty prompt or response", record["transition_id"])
            return None
        if len(prompt) + len(response) > self.config.max_seq_len:
            self.counts["too_long"] += 1
            self.dropped[record["transition_id"]] = "too_long"
            return None
        behaviour = record.get("behaviour_logprobs")
        token_source = record.get("token_source") or "engine"
        if behaviour is not None and token_source == "tokenizer":
            # Logprobs are the engine's, of the engine's tokens; re-tokenized ids need not be those tokens.
            log.warning("transition %s was re-tokenized by the processor but carries behaviour logprobs; "
                        "ignoring them (no importance ratio)", record["transition_id"])
            self.counts["bad_logprobs"] += 1
            behaviour = None
        if behaviour is not None and len(behaviour) != len(response):
            log.warning("transition %s has %d behaviour logprobs for %d response tokens; treating as missing",
                        record["transition_id"], len(behaviour), len(response))
            self.counts["bad_logprobs"] += 1
            behaviour = None
        rollout_key = f"{record['rollout_id']}/{record.get('attempt', 1)}"
        grouped = self.config.objective in ("grpo", "rloo") and record.get("group_id")
        return Sample(
            transition_id=record["transition_id"], partition=partition, offset=offset,
            group_key=f"g:{record['group_id']}" if grouped else f"t:{record['transition_id']}",
            rollout_key=rollout_key, policy_version=int(record["policy_version"]),
            prompt_ids=prompt, response_ids=response,
            behaviour_logprobs=None if behaviour is None else [float(x) for x in behaviour],
            reward=float(record[self.config.reward_field]), token_source=token_source,
            sequence=int(record.get("sequence") or 0),
        )

    # -- batching ------------------------------------------------------------------------------

    def _release_timed_out(self, now: float, flush: bool) -> None:
        for key in list(self.groups):
            group = self.groups[key]
            if flush or now - group.created >= self.config.group_timeout_s:
                self.counts["groups_incomplete"] += 1
                self.ready.append(self.groups.pop(key))

    def _budget(self, samples: list[Sample]) -> int:
        return len(samples) if self.config.batch_by == "transitions" else sum(s.tokens for s in samples)

    def _limit(self) -> int:
        return self.config.batch_size if self.config.batch_by == "transitions" else self.config.batch_tokens

    def take_batch(self, version: int, flush: bool = False) -> Batch | None:
        """A batch of whole ready groups when one is full (or waited long enough), else None."""
        now = time.monotonic()
        self._release_timed_out(now, flush)
        # Drop stale members now, against the version the step will run under.
        for group in self.ready:
            fresh = [s for s in group.samples if version - s.policy_version <= self.config.max_policy_lag]
            if len(fresh) < len(group.samples):
                self.counts["stale"] += len(group.samples) - len(fresh)
                for s in group.samples:
                    if s not in fresh:
                        self._mark_done(s)
                        self.dropped[s.transition_id] = "stale"
                group.samples = fresh
        self.ready = [g for g in self.ready if g.samples]
        chosen: list[Group] = []
        used = 0
        for group in self.ready:
            size = self._budget(group.samples)
            if chosen and used + size > self._limit():
                break
            chosen.append(group)
            used += size
        if not chosen:
            self.batch_wait_since = None
            return None
        full = used >= self._limit() or len(chosen) < len(self.ready)
        if not full and not flush:
            if self.batch_wait_since is None:
                self.batch_wait_since = now
            if now - self.batch_wait_since < self.config.batch_timeout_s:
                return None
            self.counts["partial_batches"] += 1
        self.batch_wait_since = None
        del self.ready[: len(chosen)]
        samples: list[Sample] = []
        group_index: list[int] = []
        for i, group in enumerate(chosen):
            samples += group.samples
            group_index += [i] * len(group.samples)
            if len(group.samples) == 1 and self.config.objective in ("grpo", "rloo"):
                self.counts["singleton_groups"] += 1
        for s in samples:
            self._mark_done(s)
        self.counts["trained"] += len(samples)
        return Batch(samples, group_index, [len(g.samples) for g in chosen])

    def _mark_done(self, sample: Sample) -> None:
        self.trained.setdefault(sample.partition, []).append((sample.offset, sample.transition_id))

    def waiting(self) -> list[Sample]:
        return [s for g in list(self.groups.values()) + self.ready for s in g.samples]

    def resume_offsets(self) -> dict[int, int]:
        """Per partition, the lowest offset not yet trained on (or the next offset to read)."""
        resume = dict(self.next_read)
        for s in self.waiting():
            resume[s.partition] = min(resume.get(s.partition, s.offset), s.offset)
        return resume

    def checkpoint_state(self) -> tuple[dict[int, int], list[str], list[str]]:
        """(resume offsets, ids trained at or beyond them, the dedup window without waiting ids)."""
        resume = self.resume_offsets()
        above: list[str] = []
        for p, done in self.trained.items():
            kept = [(o, t) for o, t in done if o >= resume.get(p, 0)]
            self.trained[p] = kept
            above += [t for _, t in kept]
        above += [t for t in self.skip]  # skipped ids not yet met again stay owed
        waiting = {s.transition_id for s in self.waiting()}
        seen = [t for t in self.seen.to_list() if t not in waiting]
        return resume, above, seen

    def idle_for(self) -> float:
        return time.monotonic() - self.last_message
