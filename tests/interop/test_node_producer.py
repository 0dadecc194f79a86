"""Outside Python: a Node producer (Confluent's JavaScript clients) writes events the project reads,
on the same partitions as the Python producer for the same rollout ids."""

from __future__ import annotations

import json
import shutil
import subprocess
import uuid
from collections import defaultdict
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from rollstream.events import read_events
from rollstream.producers.sdk import Client
from rollstream.schemas import make_event
from rollstream.schemas.codec import EventCodec
from rollstream.schemas.samples import SAMPLES
from rollstream.schemas.topics import Topics
from rollstream.settings import ConnectionSettings

pytestmark = pytest.mark.integration

NODE_DIR = Path(__file__).resolve().parent / "node"
ROLLOUTS = 24
EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


def test_node_producer_events_decode_and_share_partitions_with_python(
    codec: EventCodec, topics: Topics, settings: ConnectionSettings, tmp_path: Path
) -> None:
    node = shutil.which("node")
    if node is None or not (NODE_DIR / "node_modules" / "@confluentinc" / "kafka-javascript").exists():
        pytest.fail("Node.js or Confluent's JavaScript clients are missing; run 'bash scripts/setup.sh'")
    rollout_ids = [f"node-{uuid.uuid4().hex[:8]}-{i}" for i in range(ROLLOUTS)]
    sent = {}
    with (tmp_path / "records.jsonl").open("w") as out:
        for rid in rollout_ids:
            call = dict(SAMPLES["LlmCall"], rollout_id=rid, event_id=uuid.uuid4().hex, source="node")
            reward = make_event("Reward", source="node", rollout_id=rid, value=0.5, terminal=True)
            for topic, record in ((topics.calls, call), (topics.rewards, reward)):
                out.write(json.dumps({"topic": topic, "key": rid, "value": record}) + "\n")
                sent[record["event_id"]] = record
    result = subprocess.run([node, "produce.js", settings.kafka_bootstrap, settings.schema_registry_url,
                             str(tmp_path / "records.jsonl")], cwd=NODE_DIR, capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 0, result.stderr[-3000:]
    assert len(result.stdout.splitlines()) == 2 * ROLLOUTS

    with Client(settings, topics=topics) as client:  # the Python producer, same rollout ids
        for rid in rollout_ids:
            client.reward(rid, 1.0, source="python")
        client.flush()

    partitions: dict[str, set[int]] = defaultdict(set)
    seen = 0
    for e in read_events(codec, [topics.calls, topics.rewards], f"test-{uuid.uuid4().hex}", 3 * ROLLOUTS,
                         timeout=60, settings=settings):
        seen += 1
        partitions[e.key or ""].add(e.partition)
        if e.value["source"] == "node":
            original = sent[e.value["event_id"]]
            for field, value in original.items():
                got = e.value[field]
                if isinstance(got, datetime):  # timestamp-micros decodes to an aware datetime
                    got = (got - EPOCH) // timedelta(microseconds=1)
                if field == "response_logprobs":  # Avro floats are 32-bit
                    assert got == pytest.approx(value, rel=1e-6)
                else:
                    assert got == value, field
    assert seen == 3 * ROLLOUTS
    assert set(partitions) == set(rollout_ids)
    assert all(len(p) == 1 for p in partitions.values()), partitions  # Node and Python agree per rollout
    assert len(set().union(*partitions.values())) > 1  # and the rollouts do spread over partitions
