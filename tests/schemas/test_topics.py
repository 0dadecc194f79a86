"""Topic creation, co-partitioning, the murmur2 partitioner, and transactions on a real broker."""

from __future__ import annotations

import uuid
from collections.abc import Callable

import pytest
from confluent_kafka import Consumer, KafkaError, Producer
from confluent_kafka.admin import AdminClient, ConfigResource, NewTopic

from rollstream.errors import TopicError
from rollstream.events import EventProducer
from rollstream.schemas import make_event
from rollstream.schemas.codec import EventCodec
from rollstream.schemas.topics import Topics, check_copartitioned, consumer_config, create_topics, producer_config
from rollstream.settings import ConnectionSettings

pytestmark = pytest.mark.integration


def murmur2(data: bytes) -> int:
    """Kafka's Java murmur2 (org.apache.kafka.common.utils.Utils.murmur2)."""
    m, r = 0x5BD1E995, 24
    length = len(data)
    h = (0x9747B28C ^ length) & 0xFFFFFFFF
    for i in range(0, length - length % 4, 4):
        k = int.from_bytes(data[i:i + 4], "little")
        k = (k * m) & 0xFFFFFFFF
        k ^= k >> r
        k = (k * m) & 0xFFFFFFFF
        h = (h * m) & 0xFFFFFFFF
        h ^= k
    tail = length % 4
    base = length - tail
    if tail == 3:
        h ^= data[base + 2] << 16
    if tail >= 2:
        h ^= data[base + 1] << 8
    if tail >= 1:
        h ^= data[base]
        h = (h * m) & 0xFFFFFFFF
    h ^= h >> 13
    h = (h * m) & 0xFFFFFFFF
    h ^= h >> 15
    return h


def java_partition(key: str, partitions: int) -> int:
    return (murmur2(key.encode()) & 0x7FFFFFFF) % partitions


def test_create_topics_is_idempotent_and_policy_updates_are_compacted(
    settings: ConnectionSettings,
) -> None:
    topics = Topics(prefix=f"t.{uuid.uuid4().hex[:8]}.", partitions=4)
    created = create_topics(topics, settings)
    assert sorted(created) == sorted(s.name for s in topics.specs())
    assert create_topics(topics, settings) == []
    admin = AdminClient({"bootstrap.servers": settings.kafka_bootstrap})
    meta = admin.list_topics(timeout=10).topics
    for spec in topics.specs():
        assert len(meta[spec.name].partitions) == spec.partitions
    assert check_copartitioned(topics, settings) == 4
    res = ConfigResource(ConfigResource.Type.TOPIC, topics.policy_updates)
    configs = admin.describe_configs([res])[res].result()
    assert configs["cleanup.policy"].value == "compact"


def test_copartitioning_mismatch_names_the_fix(settings: ConnectionSettings) -> None:
    topics = Topics(prefix=f"t.{uuid.uuid4().hex[:8]}.", partitions=3)
    admin = AdminClient({"bootstrap.servers": settings.kafka_bootstrap})
    for fut in admin.create_topics([NewTopic(topics.rewards, num_partitions=2, replication_factor=1)]).values():
        fut.result()
    with pytest.raises(TopicError, match=rf"'{topics.rewards}' has 2.*recreate '{topics.rewards}' with 3"):
        create_topics(topics, settings)


def test_producers_use_javas_murmur2_partitioning(
    codec: EventCodec, topics: Topics, settings: ConnectionSettings
) -> None:
    producer = EventProducer(codec, settings)
    placed: dict[str, int] = {}

    def on_delivery(err: KafkaError | None, msg) -> None:  # type: ignore[no-untyped-def]
        assert err is None
        placed[msg.key().decode()] = msg.partition()

    keys = [f"rollout-{i}" for i in range(40)]
    for key in keys:
        value = codec.encode(topics.rewards, make_event("Reward", source="t", rollout_id=key, value=1.0))
        producer.producer.produce(topics.rewards, key=key.encode(), value=value, on_delivery=on_delivery)
    producer.producer.flush(10)
    assert len(placed) == len(keys)
    assert {k: java_partition(k, 3) for k in keys} == placed
    assert len(set(placed.values())) == 3

    # librdkafka's default (CRC32) partitioner puts some of the same keys elsewhere.
    default = Producer({"bootstrap.servers": settings.kafka_bootstrap})
    crc_placed: dict[str, int] = {}
    for key in keys:
        default.produce(topics.late_events, key=key.encode(), value=b"x",
                        on_delivery=lambda err, msg: crc_placed.__setitem__(msg.key().decode(), msg.partition()))
    default.flush(10)
    assert len(crc_placed) == len(keys) and crc_placed != placed


def test_aborted_transaction_is_invisible_to_read_committed(
    topics_factory: Callable[..., Topics], settings: ConnectionSettings
) -> None:
    topic = topics_factory(partitions=1, register=False).transitions
    producer = Producer(producer_config(settings, **{"transactional.id": f"tx-{uuid.uuid4().hex}"}))
    producer.init_transactions(30)
    producer.begin_transaction()
    producer.produce(topic, key=b"r", value=b"aborted-1")
    producer.produce(topic, key=b"r", value=b"aborted-2")
    producer.flush(10)
    producer.abort_transaction(30)
    producer.begin_transaction()
    producer.produce(topic, key=b"r", value=b"committed")
    producer.commit_transaction(30)

    def read_all(isolation: str) -> list[bytes]:
        consumer = Consumer(consumer_config(f"g-{uuid.uuid4().hex}", settings, **{
            "isolation.level": isolation, "enable.partition.eof": True}))
        consumer.subscribe([topic])
        values: list[bytes] = []
        try:
            while True:
                msg = consumer.poll(10)
                assert msg is not None, f"no end of partition seen reading {topic} ({isolation})"
                if msg.error():
                    if msg.error().code() == KafkaError._PARTITION_EOF:
                        return values
                    raise AssertionError(msg.error())
                values.append(msg.value())
        finally:
            consumer.close()

    assert read_all("read_committed") == [b"committed"]
    assert read_all("read_uncommitted") == [b"aborted-1", b"aborted-2", b"committed"]
