"""A broker restart in the middle of 10,000 SDK events: everything flush() acknowledged is on the topic once.

Runs its own single-node Kafka (its own state folder and ports) so that restarting it does
not disturb the shared stack; the schema registry of the running stack is shared.
"""

from __future__ import annotations

import socket
import uuid
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import pytest
from confluent_kafka import Consumer, KafkaError

from rollstream.producers.sdk import Client, SdkSettings
from rollstream.schemas.codec import EventCodec, register_schemas, registry_client
from rollstream.schemas.topics import Topics, consumer_config, create_topics
from rollstream.settings import ConnectionSettings, StackSettings
from rollstream.stack.kafka import Kafka
from rollstream.stack.process import port_in_use, wait_until

pytestmark = [pytest.mark.integration, pytest.mark.slow]

EVENTS = 10_000


def _free_port_pair() -> int:
    for _ in range(50):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = int(s.getsockname()[1])
        if port < 65000 and not port_in_use(port) and not port_in_use(port + 1):
            return port
    raise RuntimeError("no two consecutive free ports")


@pytest.fixture
def own_broker(tmp_path: Path) -> Iterator[Kafka]:
    kafka = Kafka(StackSettings(state_dir=tmp_path / "kafka", kafka_port=_free_port_pair(), kafka_heap="256m"))
    if not kafka.installed():
        kafka.install()
    kafka.start()
    if not wait_until(kafka.healthy, 120):
        kafka.process.stop()
        pytest.fail(f"the test's own Kafka broker did not start:\n{kafka.process.log_tail()}")
    yield kafka
    kafka.process.stop()


def _event_ids(conn: ConnectionSettings, codec: EventCodec, topic: str, expected: int) -> Counter[str]:
    consumer = Consumer(consumer_config(f"count-{uuid.uuid4().hex}", conn, **{"enable.partition.eof": True}))
    consumer.subscribe([topic])
    ids: Counter[str] = Counter()
    idle = 0
    try:
        while idle < 20:  # read until the topic has been quiet for a while (duplicates would come late)
            msg = consumer.poll(0.5)
            if msg is None or (msg.error() and msg.error().code() == KafkaError._PARTITION_EOF):
                idle += 1 if sum(ids.values()) >= expected else 0
                continue
            assert msg.error() is None, msg.error()
            ids[codec.decode(topic, msg.value())["event_id"]] += 1  # type: ignore[arg-type]
            idle = 0
    finally:
        consumer.close()
    return ids


def test_every_acknowledged_event_is_on_the_topic_exactly_once_across_a_broker_restart(
    own_broker: Kafka, settings: ConnectionSettings
) -> None:
    conn = ConnectionSettings(kafka_bootstrap=own_broker.url, schema_registry_url=settings.schema_registry_url)
    topics = Topics(prefix=f"restart.{uuid.uuid4().hex[:8]}.", partitions=3)
    create_topics(topics, conn)
    register_schemas(registry_client(conn), topics)
    client = Client(conn, SdkSettings(flush_timeout=180.0, queue_max=EVENTS), topics=topics)
    sent: list[str] = []
    try:
        for i in range(EVENTS):
            sent.append(client.reward(f"rollout-{i % 200}", float(i), metadata={"i": str(i)}))
            if i == EVENTS // 3:
                client.flush()
                own_broker.process.stop()  # events keep coming while the broker is down
            if i == 2 * EVENTS // 3:
                own_broker.start()
                assert wait_until(own_broker.healthy, 120), own_broker.process.log_tail()
        client.flush()  # raises DeliveryError unless every event was acknowledged
    finally:
        client.close()
    codec = EventCodec(registry_client(conn), topics)
    counts = _event_ids(conn, codec, topics.rewards, EVENTS)
    duplicates = {k: n for k, n in counts.items() if n > 1}
    assert not duplicates, f"{len(duplicates)} event(s) written more than once"
    assert set(counts) == set(sent) and len(sent) == EVENTS
