"""Outside Python: Confluent's JavaScript clients read and decode what Rollstream writes."""

from __future__ import annotations

import base64
import json
import shutil
import subprocess
import uuid
from pathlib import Path
from typing import Any

import pytest

from rollstream.events import EventProducer
from rollstream.schemas.codec import EventCodec
from rollstream.schemas.samples import SAMPLES
from rollstream.schemas.topics import Topics
from rollstream.settings import ConnectionSettings

pytestmark = pytest.mark.integration

NODE_DIR = Path(__file__).resolve().parent / "node"


def _node() -> str:
    node = shutil.which("node")
    if node is None:
        pytest.fail("node is not installed; install Node.js 20+ and run 'bash scripts/setup.sh'")
    if not (NODE_DIR / "node_modules" / "@confluentinc" / "kafka-javascript").exists():
        pytest.fail("Confluent's JavaScript clients are not installed; run 'bash scripts/setup.sh'")
    return node


def _as_node_sees(value: Any) -> Any:
    """How a Python-side value comes out of the JS AvroDeserializer after consume.js."""
    if isinstance(value, bytes):
        return base64.b64encode(value).decode()
    if isinstance(value, dict):
        return {k: _as_node_sees(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_as_node_sees(v) for v in value]
    return value


def test_node_consumer_decodes_every_event_type_to_the_same_values(
    codec: EventCodec, topics: Topics, settings: ConnectionSettings
) -> None:
    node = _node()
    producer = EventProducer(codec, settings)
    sent = {}
    for spec in topics.specs():
        if spec.event_type is None:
            continue
        record = dict(SAMPLES[spec.event_type], event_id=uuid.uuid4().hex)
        key = str(record.get("rollout_id") or record.get("policy") or "dead-letter")
        producer.publish(spec.name, key, record)
        sent[spec.name] = (key, record)
    producer.flush()

    out = subprocess.run(
        [node, "consume.js", settings.kafka_bootstrap, settings.schema_registry_url,
         ",".join(sent), str(len(sent)), "90"],
        cwd=NODE_DIR, capture_output=True, text=True, timeout=150,
    )
    assert out.returncode == 0, f"consume.js exited {out.returncode}:\n{out.stderr[-3000:]}"
    received = {r["topic"]: r for r in map(json.loads, out.stdout.splitlines())}
    assert set(received) == set(sent)
    for topic, (key, record) in sent.items():
        got = received[topic]
        assert got["key"] == key
        expected = _as_node_sees(record)
        for field, value in expected.items():
            if isinstance(value, float) or (isinstance(value, list) and value and isinstance(value[0], float)):
                # Avro floats are 32-bit: JS widens them to doubles.
                assert got["value"][field] == pytest.approx(value, rel=1e-6), (topic, field)
            else:
                assert got["value"][field] == value, (topic, field)


def test_node_consumer_fails_cleanly_without_a_broker() -> None:
    node = _node()
    out = subprocess.run(
        [node, "consume.js", "127.0.0.1:1", "http://127.0.0.1:1", "nothing", "1", "4"],
        cwd=NODE_DIR, capture_output=True, text=True, timeout=60,
    )
    assert out.returncode in (1, 3) and out.stdout == ""
