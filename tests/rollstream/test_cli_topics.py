"""``rollstream topics``: a prefix's topics and schemas, ready for a producer of any language, no event published."""

from __future__ import annotations

import os
import subprocess
import sys
import uuid
from pathlib import Path

import pytest
from confluent_kafka import TopicPartition
from confluent_kafka.admin import AdminClient

from rollstream.schemas.codec import registry_client
from rollstream.schemas.topics import Topics, client_config
from rollstream.settings import ConnectionSettings

pytestmark = [pytest.mark.integration]

ROLLSTREAM = Path(sys.executable).with_name("rollstream")


def test_topics_creates_and_registers_without_publishing(settings: ConnectionSettings) -> None:
    prefix = f"cli-{uuid.uuid4().hex[:8]}."
    env = {**os.environ, "ROLLSTREAM_KAFKA_BOOTSTRAP": settings.kafka_bootstrap,
           "ROLLSTREAM_SCHEMA_REGISTRY_URL": settings.schema_registry_url}
    out = subprocess.run([str(ROLLSTREAM), "topics", "--topic-prefix", prefix, "--partitions", "2"],
                         capture_output=True, text=True, env=env, timeout=120)
    assert out.returncode == 0, out.stdout + out.stderr
    topics = Topics(prefix, 2)
    meta = AdminClient(client_config(settings)).list_topics(timeout=30).topics
    for spec in topics.specs():
        assert spec.name in meta and len(meta[spec.name].partitions) == spec.partitions
    subjects = set(registry_client(settings).get_subjects())
    assert {f"{s.name}-value" for s in topics.specs() if s.event_type} <= subjects
    from confluent_kafka import Consumer

    consumer = Consumer({"bootstrap.servers": settings.kafka_bootstrap, "group.id": "cli-check"})
    try:
        for name in topics.copartitioned:
            for p in range(2):
                low, high = consumer.get_watermark_offsets(TopicPartition(name, p), timeout=10)
                assert high == 0, f"{name}[{p}] holds {high} records"
    finally:
        consumer.close()
    again = subprocess.run([str(ROLLSTREAM), "topics", "--topic-prefix", prefix], capture_output=True, text=True,
                           env=env, timeout=120)
    assert again.returncode == 0, again.stdout + again.stderr  # idempotent
