"""Topic names, keys, partition counts and client configuration, in one place.

Calls, rewards and rollout events are keyed by ``rollout_id`` and must be
co-partitioned (equal partition counts, the same partitioner in every producer) so that
one stream-processor task sees everything of a rollout. Every producer here uses the
Java-compatible murmur2 partitioner; librdkafka's default (CRC32) would put the same key
on a different partition than Java, Faust or aiokafka producers. The gateway's calls that
belong to no rollout go to ``calls-by-response``, keyed by the response id the client got,
for the OTLP receiver to find their token ids (``producers/response_index.py``).
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import Any

from confluent_kafka import KafkaException
from confluent_kafka.admin import AdminClient, NewTopic

from rollstream.errors import TopicError
from rollstream.schemas import EventType
from rollstream.settings import ConnectionSettings, kafka_client_config

log = logging.getLogger(__name__)

# Producers in every language must agree on this, or co-partitioning silently breaks.
PARTITIONER = "murmur2_random"


@dataclass(frozen=True)
class TopicSpec:
    name: str
    partitions: int
    event_type: EventType | None  # None: raw copies of other topics' records
    key: str  # what the Kafka key holds
    config: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class Topics:
    """The topic names of one deployment (all share ``prefix``)."""

    prefix: str = "rollstream."
    partitions: int = 3
    # Prefix of the stream processor's outputs (transitions, dead letters, late events) when they go elsewhere
    # than the inputs: a replay writes them under a prefix of its own. Empty: ``prefix``.
    outputs: str = ""

    @classmethod
    def from_settings(cls, settings: ConnectionSettings | None = None) -> Topics:
        settings = settings or ConnectionSettings()
        return cls(prefix=settings.topic_prefix, partitions=settings.partitions)

    @property
    def calls(self) -> str:
        return self.prefix + "calls"

    @property
    def rewards(self) -> str:
        return self.prefix + "rewards"

    @property
    def rollouts(self) -> str:
        return self.prefix + "rollouts"

    @property
    def transitions(self) -> str:
        return (self.outputs or self.prefix) + "transitions"

    @property
    def policy_updates(self) -> str:
        return self.prefix + "policy-updates"

    @property
    def dead_letters(self) -> str:
        return (self.outputs or self.prefix) + "dead-letters"

    @property
    def late_events(self) -> str:
        return (self.outputs or self.prefix) + "late-events"

    @property
    def calls_by_response(self) -> str:
        """The gateway's calls that belong to no rollout, keyed by the response id the client got."""
        return self.prefix + "calls-by-response"

    @property
    def copartitioned(self) -> tuple[str, ...]:
        return (self.calls, self.rewards, self.rollouts)

    def specs(self) -> list[TopicSpec]:
        n = self.partitions
        # What the processor writes carries a call's tokens (transitions) or a whole input (dead letters, late
        # events): room for the largest input it accepts (ROLLSTREAM_PROCESS_MAX_MESSAGE_BYTES) and more.
        large = {"max.message.bytes": str(MAX_RECORD_BYTES)}
        return [
            TopicSpec(self.calls, n, "LlmCall", "rollout_id"),
            TopicSpec(self.rewards, n, "Reward", "rollout_id"),
            TopicSpec(self.rollouts, n, "RolloutEvent", "rollout_id"),
            TopicSpec(self.transitions, n, "Transition", "rollout_id", large),
            TopicSpec(
                self.policy_updates, 1, "PolicyUpdate", "policy",
                # Compacted: the newest version of each policy is always there to read.
                {"cleanup.policy": "compact", "min.compaction.lag.ms": "0", "segment.ms": "600000"},
            ),
            TopicSpec(self.dead_letters, 1, "DeadLetter", "original key", large),
            TopicSpec(self.late_events, n, None, "rollout_id", large),
            TopicSpec(
                self.calls_by_response, n, "LlmCall", "response_id",
                # Looked up by response id soon after the call (the OTLP receiver joins spans to them): a day is
                # plenty. Not compacted: the n choices of one response share its key.
                {"cleanup.policy": "delete", "retention.ms": str(CALLS_BY_RESPONSE_RETENTION_MS)},
            ),
        ]

    def spec(self, topic: str) -> TopicSpec:
        for spec in self.specs():
            if spec.name == topic:
                return spec
        raise TopicError(f"'{topic}' is not one of Rollstream's topics (prefix {self.prefix!r})")


CALLS_BY_RESPONSE_RETENTION_MS = 24 * 3600 * 1000
MAX_RECORD_BYTES = 16 * 1024 * 1024  # the largest record the processor writes (topics and producer sized for it)


def client_config(settings: ConnectionSettings | None = None, **overrides: Any) -> dict[str, Any]:
    """Settings every Kafka client starts from: the bootstrap servers and ``ROLLSTREAM_KAFKA_CONFIG``
    (SASL, TLS and any other librdkafka setting), then ``overrides``. Admin clients use it as is."""
    settings = settings or ConnectionSettings()
    conf: dict[str, Any] = {"bootstrap.servers": settings.kafka_bootstrap}
    conf.update(kafka_client_config(settings.kafka_config))
    conf.update(overrides)
    return conf


def producer_config(settings: ConnectionSettings | None = None, **overrides: Any) -> dict[str, Any]:
    """Idempotent, fully acknowledged, murmur2-partitioned producer settings.

    Precedence: these defaults, then ``ROLLSTREAM_KAFKA_CONFIG``, then ``overrides`` from the caller.
    """
    settings = settings or ConnectionSettings()
    conf: dict[str, Any] = {
        "partitioner": PARTITIONER,
        "enable.idempotence": True,
        "acks": "all",
        "linger.ms": 5,
    }
    conf.update(kafka_client_config(settings.kafka_config))
    conf.update(overrides)
    return client_config(settings, **conf)


def consumer_config(group_id: str, settings: ConnectionSettings | None = None, **overrides: Any) -> dict[str, Any]:
    """A consumer that sees only committed transactional data and commits explicitly."""
    settings = settings or ConnectionSettings()
    conf: dict[str, Any] = {
        "group.id": group_id,
        "isolation.level": "read_committed",
        "enable.auto.commit": False,
        "auto.offset.reset": "earliest",
    }
    conf.update(kafka_client_config(settings.kafka_config))
    conf.update(overrides)
    return client_config(settings, **conf)


def create_topics(topics: Topics, settings: ConnectionSettings | None = None, timeout: float = 30.0) -> list[str]:
    """Create every topic that is missing; check that existing ones fit. Returns those created."""
    settings = settings or ConnectionSettings()
    admin = AdminClient(client_config(settings))
    try:
        existing = admin.list_topics(timeout=timeout).topics
    except KafkaException as exc:
        raise TopicError(
            f"cannot reach Kafka at {settings.kafka_bootstrap} ({exc}); start it with 'rollstream stack up'"
        ) from exc
    wanted = [s for s in topics.specs() if s.name not in existing]
    created = []
    if wanted:
        futures = admin.create_topics(
            [NewTopic(s.name, num_partitions=s.partitions, replication_factor=1, config=s.config) for s in wanted],
            operation_timeout=timeout,
        )
        for name, fut in futures.items():
            try:
                fut.result()
                created.append(name)
            except KafkaException as exc:
                if exc.args[0].name() != "TOPIC_ALREADY_EXISTS":
                    raise TopicError(f"cannot create topic '{name}': {exc}") from exc
        # The controller has acknowledged the topics; the broker's metadata may lag behind it.
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            listed = admin.list_topics(timeout=timeout).topics
            if all(s.name in listed and listed[s.name].error is None for s in wanted):
                break
            time.sleep(0.1)
    check_copartitioned(topics, settings, admin)
    return created


def check_copartitioned(
    topics: Topics, settings: ConnectionSettings | None = None, admin: AdminClient | None = None
) -> int:
    """The shared partition count of calls, rewards and rollouts, or an error naming the fix."""
    settings = settings or ConnectionSettings()
    admin = admin or AdminClient(client_config(settings))
    meta = admin.list_topics(timeout=30).topics
    counts = {}
    for name in topics.copartitioned:
        if name not in meta or meta[name].error is not None:
            raise TopicError(f"topic '{name}' does not exist; create it with rollstream.schemas.topics.create_topics")
        counts[name] = len(meta[name].partitions)
    first, n = next(iter(counts.items()))
    for name, count in counts.items():
        if count != n:
            raise TopicError(
                f"topic '{first}' has {n} partitions but '{name}' has {count}; calls, rewards and rollouts "
                f"must be co-partitioned — recreate '{name}' with {n}"
            )
    return n
