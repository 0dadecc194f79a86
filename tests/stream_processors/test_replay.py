"""Replay: the raw topics of a finished run re-derived with another credit rule into a topic of its own."""

from __future__ import annotations

import subprocess
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from sp_helpers import ROLLSTREAM, Pipe, call, lifecycle, reward

from rollstream.schemas.codec import EventCodec, registry_client
from rollstream.schemas.topics import Topics
from rollstream.settings import ConnectionSettings
from rollstream.stream_processors.processor import transition_id

pytestmark = [pytest.mark.integration, pytest.mark.slow]

N = 40


def publish(pipe: Pipe) -> None:
    for i in range(N):
        rid = f"rp-{i}"
        pipe.rollout(lifecycle(rid, "STARTED"))
        pipe.call(call(rid, 0))
        pipe.reward(reward(rid, 0.5, terminal=False, call_id="c0"))
        pipe.call(call(rid, 1))
        pipe.call(call(rid, 2, agent="critic"))
        pipe.rollout(lifecycle(rid, "SUCCEEDED"))
        pipe.reward(reward(rid, i / N))
    pipe.flush()


def replay(settings: ConnectionSettings, topics: Topics, to: str, tmp: Path, *extra: str) -> str:
    run = subprocess.run(
        [str(ROLLSTREAM), "process", "--topic-prefix", topics.prefix, "--replay-to", to,
         "--data-dir", str(tmp / "replay"), *extra],
        capture_output=True, text=True, timeout=300,
        env={"PATH": "/usr/bin:/bin", "ROLLSTREAM_KAFKA_BOOTSTRAP": settings.kafka_bootstrap,
             "ROLLSTREAM_SCHEMA_REGISTRY_URL": settings.schema_registry_url, "HOME": str(tmp)},
    )
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    return run.stderr


def test_replay_with_another_credit_rule_and_agent_filter(
    pipe: Pipe, topics: Topics, settings: ConnectionSettings, worker_factory: Callable[..., Any], tmp_path: Path,
) -> None:
    worker = worker_factory({"ROLLSTREAM_PROCESS_CREDIT": "*=discounted:0.9"})
    publish(pipe)
    live = pipe.transitions(3 * N, timeout=120, settle=2.0)
    assert len(live) == 3 * N and {t["credit_assignment"] for t in live} == {"discounted"}
    worker.stop()

    to = topics.prefix + "replay1."
    replay(settings, topics, to, tmp_path, "--credit", "*=broadcast", "--agent-match", "^solver$")
    out = Topics(topics.prefix, topics.partitions, outputs=to)
    reader = Pipe(settings, out, EventCodec(registry_client(settings), out))
    got = reader.transitions(2 * N, timeout=60, settle=3.0)
    # Exactly the transitions the other settings give: the solver's two calls (not the critic's), each the terminal.
    want = {transition_id(f"rp-{i}", 1, c): i / N for i in range(N) for c in ("c0", "c1")}
    counts = Counter(t["transition_id"] for t in got)
    assert set(counts) == set(want) and max(counts.values()) == 1, counts.most_common(3)
    for t in got:
        assert t["credit_assignment"] == "broadcast"
        assert t["credited_return"] == pytest.approx(want[t["transition_id"]])
    # The live pipeline is untouched: its topic holds what it held.
    assert len(pipe.transitions(3 * N + 1, timeout=10, settle=1.0)) == 3 * N

    # Run again: it resumes from its own committed offsets and has nothing left to write.
    replay(settings, topics, to, tmp_path, "--credit", "*=broadcast", "--agent-match", "^solver$")
    assert len(reader.transitions(2 * N + 1, timeout=15, settle=2.0)) == 2 * N


def test_replay_refuses_the_live_prefix(topics: Topics, settings: ConnectionSettings, tmp_path: Path) -> None:
    run = subprocess.run(
        [str(ROLLSTREAM), "process", "--topic-prefix", topics.prefix, "--replay-to", topics.prefix],
        capture_output=True, text=True, timeout=120,
        env={"PATH": "/usr/bin:/bin", "ROLLSTREAM_KAFKA_BOOTSTRAP": settings.kafka_bootstrap,
             "ROLLSTREAM_SCHEMA_REGISTRY_URL": settings.schema_registry_url, "HOME": str(tmp_path)},
    )
    assert run.returncode == 2 and "is the live prefix" in run.stderr
