"""The local stack's schema registry keeps its schemas and ids across a restart.

Records in Kafka name their writer's schema by id only. A registry that forgot its schemas
when restarted would hand the same ids to other schemas as they are registered again, and
records already written would decode against the wrong schema. A second registry, on free
ports with its own data folder, is restarted while a stream processor keeps running on it.
"""

from __future__ import annotations

import json
import socket
import sys
import uuid
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest

from rollstream.schemas.codec import EventCodec, register, register_schemas, registry_client, subject
from rollstream.schemas.samples import SAMPLES
from rollstream.schemas.topics import Topics, create_topics
from rollstream.settings import ConnectionSettings, StackSettings
from rollstream.stack import Stack
from rollstream.stack.process import port_in_use, wait_until

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "stream_processors"))
from sp_helpers import Pipe, WorkerProcess, call, lifecycle, reward  # noqa: E402

pytestmark = [pytest.mark.integration, pytest.mark.slow]

PROBE = json.dumps({"type": "record", "name": "Probe", "namespace": "dev.rollstream.test",
                    "fields": [{"name": "n", "type": "string"}]})


def free_port_pair() -> int:
    """A free port whose +1000 (the registry's management port) is free too."""
    for _ in range(50):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = int(s.getsockname()[1])
        if port + 1000 < 65536 and not port_in_use(port + 1000):
            return port
    raise AssertionError("found no free pair of ports (p, p+1000) on 127.0.0.1")


@pytest.fixture
def second(stack: Stack, tmp_path: Path) -> Iterator[Stack]:
    """A stack whose registry alone runs, on free ports with its own data folder."""
    stk = Stack(StackSettings(state_dir=tmp_path / "state", registry_port=free_port_pair(), registry_heap="256m"))
    reg = stk.registry
    if not reg.installed():
        pytest.fail("Apicurio Registry is not downloaded yet: run 'rollstream stack up' once", pytrace=False)
    reg.start()
    try:
        wait_until(lambda: reg.healthy() or reg.process.pid() is None, reg.startup_timeout)
        assert reg.healthy(), f"the second registry did not start:\n{reg.process.log_tail()}"
        yield stk
    finally:
        reg.process.stop()


def send_rollout(pipe: Pipe, rid: str) -> None:
    pipe.call(call(rid, 0))
    pipe.reward(reward(rid, 1.0))
    pipe.rollout(lifecycle(rid, "SUCCEEDED"))
    pipe.flush()


def test_ids_and_schemas_survive_a_restart_under_a_running_processor(
    second: Stack, settings: ConnectionSettings, tmp_path: Path
) -> None:
    conn = replace(settings, schema_registry_url=second.registry.url)
    topics = Topics(prefix=f"t.{uuid.uuid4().hex[:10]}.", partitions=1)
    create_topics(topics, conn)
    client = registry_client(conn)
    ids = register_schemas(client, topics)
    versions = {name: client.get_latest_version(name) for name in ids}
    codec = EventCodec(client, topics)
    encoded = {spec.name: codec.encode(spec.name, SAMPLES[spec.event_type])
               for spec in topics.specs() if spec.event_type is not None}
    decoded = {topic: codec.decode(topic, data) for topic, data in encoded.items()}

    worker = WorkerProcess(topics, conn, tmp_path, f"proc-{uuid.uuid4().hex[:8]}").start()
    try:
        pipe = Pipe(conn, topics, codec)
        send_rollout(pipe, "ro-before")
        assert [t["rollout_id"] for t in pipe.transitions(1, timeout=90)] == ["ro-before"], worker.log()

        down_s = second.restart("registry")
        assert worker.proc is not None and worker.proc.poll() is None, f"down {down_s:.1f}s\n{worker.log()}"

        fresh = registry_client(conn)  # nothing cached: every answer comes from the restarted registry
        missing = set(ids) - set(fresh.get_subjects())
        assert not missing, f"the registry forgot {len(missing)} of {len(ids)} subjects when restarted"
        for name, before in versions.items():
            after = fresh.get_version(name, before.version)
            assert (after.schema_id, after.version) == (before.schema_id, before.version), name
            assert fresh.get_schema(before.schema_id).schema_str == before.schema.schema_str, name
        fresh_codec = EventCodec(fresh, topics)
        for topic, data in encoded.items():
            assert fresh_codec.decode(topic, data) == decoded[topic], topic
        # A schema first registered after the restart gets an id never handed out before it.
        new_id = register(fresh, f"{topics.prefix}probe", PROBE)
        assert new_id not in ids.values() and new_id > max(ids.values())
        assert register_schemas(fresh, topics) == ids
        assert subject(f"{topics.prefix}probe") in fresh.get_subjects()

        # The processor, never restarted, joins a rollout published by a fresh client after the restart.
        send_rollout(Pipe(conn, topics, fresh_codec), "ro-after")
        got: list[dict[str, Any]] = Pipe(conn, topics, fresh_codec).transitions(2, timeout=60)
        assert sorted(t["rollout_id"] for t in got) == ["ro-after", "ro-before"], worker.log()
    finally:
        worker.stop()
