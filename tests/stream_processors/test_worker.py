"""The worker against the real broker: every join rule, dead letters, late events, expiry, topic checks."""

from __future__ import annotations

import math
import struct
import subprocess
import uuid
from collections.abc import Callable
from typing import Any

import pytest
from sp_helpers import ROLLSTREAM, Pipe, call, lifecycle, reward

from rollstream.schemas.codec import EventCodec, register_schemas, registry_client
from rollstream.schemas.topics import Topics, create_topics
from rollstream.settings import ConnectionSettings

pytestmark = [pytest.mark.integration, pytest.mark.slow]


def by_call(transitions: list[dict[str, Any]]) -> dict[tuple[str, str], dict[str, Any]]:
    return {(t["rollout_id"], t["call_id"]): t for t in transitions}


def test_out_of_order_duplicates_and_every_credit_rule(pipe: Pipe, worker_factory: Callable[..., Any]) -> None:
    worker = worker_factory({"ROLLSTREAM_PROCESS_CREDIT": "disc=discounted:0.5,last=last_call,*=broadcast"})
    # Reward first, calls out of sequence, lifecycle last; every event of "bc" sent twice (producer retry).
    # The same call under another event id, before the rest: the later copy of c1 is a duplicate too.
    pipe.call(call("ro-bc", 1, policy="bc", event_id="other-id"))
    for policy in ("bc", "disc", "last"):
        rid = f"ro-{policy}"
        events = [
            ("reward", reward(rid, 0.5, terminal=False, call_id="c0")),
            ("reward", reward(rid, -0.25, terminal=False, call_id="c1")),
            ("reward", reward(rid, 1.0)),
            ("call", call(rid, 2, policy=policy)), ("call", call(rid, 0, policy=policy)),
            ("call", call(rid, 1, policy=policy)),
            ("rollout", lifecycle(rid, "SUCCEEDED", policy=policy, group_id="g1", task_id="t1")),
        ]
        for kind, record in events:
            for _ in range(2 if policy == "bc" else 1):
                getattr(pipe, kind)(record)
    pipe.flush()
    got = by_call(pipe.transitions(9, settle=2.0))
    assert len(got) == 9
    expected = {
        # broadcast: terminal reward on every call
        "bc": [(1.0, 1.0), (1.0, 1.0), (1.0, 1.0)],
        # discounted 0.5: r=(0.5, -0.25, 1.0); G2=1, G1=-0.25+0.5=0.25, G0=0.5+0.125=0.625
        "disc": [(0.5, 0.625), (-0.25, 0.25), (1.0, 1.0)],
        "last": [(0.0, 0.0), (0.0, 0.0), (1.0, 1.0)],
    }
    for policy, pairs in expected.items():
        for seq, (r, ret) in enumerate(pairs):
            t = got[(f"ro-{policy}", f"c{seq}")]
            assert (t["reward"], t["credited_return"], t["terminal_reward"]) == (r, ret, 1.0), t
            assert t["credit_assignment"] == {"bc": "broadcast", "disc": "discounted", "last": "last_call"}[policy]
            assert (t["sequence"], t["group_id"], t["task_id"], t["prompt_token_ids"]) == (seq, "g1", "t1", [1, 2, seq])
            assert t["event_id"] == t["transition_id"] and len(t["transition_id"]) == 32
    # Counters move as the worker reads; the repeats of closed rollouts may come in after the transitions.
    stats = worker.wait_stats(lambda s: s["completed"] == 3 and s["duplicates"] >= 8)
    assert stats["duplicates"] == 8 and stats["late"] == 0
    assert stats["transitions"] == 9 and stats["open_rollouts"] == 0


def test_late_events_and_dead_letters(
    pipe: Pipe, worker_factory: Callable[..., Any], codec: EventCodec, topics: Topics
) -> None:
    worker = worker_factory({"ROLLSTREAM_PROCESS_MAX_MESSAGE_BYTES": "4000"})
    good = call("ro-1", 0)
    pipe.call(good)
    pipe.raw(topics.calls, b"not avro at all", b"ro-1")  # undecodable
    body = codec.encode(topics.calls, call("ro-1", 7))
    pipe.raw(topics.calls, body[:1] + struct.pack(">I", 987654) + body[5:], b"ro-1")  # unknown schema id
    pipe.send(topics.calls, call("", 3), key="")  # missing rollout id
    pipe.send(topics.calls, call("ro-1", 4), key="ro-other")  # key does not match the rollout id
    pipe.reward(reward("ro-1", math.nan))  # NaN reward
    pipe.call(call("ro-1", 5, agent="x" * 5000))  # oversize
    pipe.call(call("ro-1", 6, tokens=False))  # no token ids
    pipe.call(call("ro-1", 1))
    pipe.rollout(lifecycle("ro-1", "SUCCEEDED"))
    pipe.reward(reward("ro-1", 2.0))
    pipe.flush()
    got = by_call(pipe.transitions(2, settle=1.0))
    assert sorted(got) == [("ro-1", "c0"), ("ro-1", "c1")] and got[("ro-1", "c1")]["reward"] == 2.0
    letters = pipe.dead_letters(7, settle=1.0)
    # Dead letters of different partitions and topics come in any order.
    assert sorted(d["error_type"] for d in letters) == sorted([
        "undecodable", "unknown_schema", "missing_rollout_id", "missing_rollout_id", "invalid_value", "oversize",
        "invalid_value",
    ])
    reasons = " | ".join(d["reason"] for d in letters)
    assert "987654" in reasons and "not finite" in reasons and "no token ids" in reasons and "does not match" in reasons
    garbage = next(d for d in letters if d["error_type"] == "undecodable")
    assert garbage["value"] == b"not avro at all" and garbage["topic"] == topics.calls and garbage["key"] == b"ro-1"
    assert garbage["partition"] >= 0 and garbage["offset"] >= 0

    # After completion: a new call is late, a repeat of a seen event is a duplicate.
    pipe.call(call("ro-1", 9))
    pipe.call(good)
    pipe.flush()
    late = pipe.read(topics.late_events, 1, settle=1.0)
    assert len(late) == 1
    headers = dict(late[0].headers())
    assert headers["rollstream-late-reason"] == b"completed" and headers["rollstream-topic"] == topics.calls.encode()
    assert codec.decode(topics.calls, late[0].value())["call_id"] == "c9"
    stats = worker.wait_stats(lambda s: s["late"] == 1 and s["duplicates"] == 1)
    assert stats["dead_letters"] == 7 and stats["completed"] == 1
    assert stats["dead_letters_by_type"] == {"undecodable": 1, "unknown_schema": 1, "missing_rollout_id": 2,
                                            "invalid_value": 2, "oversize": 1}
    import httpx

    text = httpx.get(f"http://127.0.0.1:{worker.port}/metrics", timeout=5).text
    assert "rollstream_processor_late_total 1" in text and "rollstream_processor_dead_letters_total 7" in text


def test_agent_name_filter(pipe: Pipe, worker_factory: Callable[..., Any]) -> None:
    worker_factory({"ROLLSTREAM_PROCESS_AGENT_MATCH": "^solver$",
                    "ROLLSTREAM_PROCESS_COMPLETION": "terminal_reward"})
    pipe.call(call("ro-f", 0, agent="solver"))
    pipe.call(call("ro-f", 1, agent="planner"))
    pipe.call(call("ro-f", 2, agent=None))
    pipe.call(call("ro-f", 3, agent="solver"))
    pipe.reward(reward("ro-f", 3.0))  # closes it alone (completion=terminal_reward)
    pipe.flush()
    got = pipe.transitions(2, settle=2.0)
    assert sorted(t["call_id"] for t in got) == ["c0", "c3"]
    assert {t["agent_name"] for t in got} == {"solver"}


@pytest.mark.parametrize("action", ["drop", "fill"])
def test_expiry(action: str, pipe: Pipe, worker_factory: Callable[..., Any], topics: Topics) -> None:
    worker = worker_factory({"ROLLSTREAM_PROCESS_EXPIRE_AFTER": "2", "ROLLSTREAM_PROCESS_EXPIRE_ACTION": action,
                             "ROLLSTREAM_PROCESS_FILL_VALUE": "-1", "ROLLSTREAM_PROCESS_CLOSED_TTL": "600"})
    pipe.call(call("ro-x", 0))
    pipe.call(call("ro-x", 1))
    pipe.call(call("ro-ok", 0))
    pipe.rollout(lifecycle("ro-ok", "SUCCEEDED"))
    pipe.reward(reward("ro-ok", 1.0))
    pipe.flush()
    key = "expired_filled" if action == "fill" else "expired_dropped"
    stats = worker.wait_stats(lambda s: s[key] == 1, timeout=60)
    assert stats["completed"] == 1 and stats["open_rollouts"] == 0
    got = by_call(pipe.transitions(3 if action == "fill" else 1, settle=2.0))
    if action == "fill":
        assert sorted(got) == [("ro-ok", "c0"), ("ro-x", "c0"), ("ro-x", "c1")]
        assert got[("ro-x", "c1")]["terminal_reward"] == -1.0 and got[("ro-x", "c1")]["metadata"]["closed"] == "expired"
    else:
        assert sorted(got) == [("ro-ok", "c0")]
    pipe.reward(reward("ro-x", 1.0))  # the reward that came too late
    pipe.flush()
    late = pipe.read(topics.late_events, 1, settle=1.0)
    assert len(late) == 1 and dict(late[0].headers())["rollstream-late-reason"] == b"expired"


def test_refuses_topics_that_are_not_copartitioned(settings: ConnectionSettings, tmp_path: Any) -> None:
    topics = Topics(prefix=f"t.pc{uuid.uuid4().hex[:8]}.", partitions=3)
    create_topics(Topics(topics.prefix, 2), settings)  # everything with 2 partitions ...
    register_schemas(registry_client(settings), topics)
    from confluent_kafka.admin import AdminClient, NewPartitions

    admin = AdminClient({"bootstrap.servers": settings.kafka_bootstrap})
    admin.create_partitions([NewPartitions(topics.rewards, 3)])[topics.rewards].result()  # ... but rewards
    env = {"ROLLSTREAM_KAFKA_BOOTSTRAP": settings.kafka_bootstrap,
           "ROLLSTREAM_SCHEMA_REGISTRY_URL": settings.schema_registry_url, "PATH": "/usr/bin:/bin"}
    out = subprocess.run([str(ROLLSTREAM), "process", "--topic-prefix", topics.prefix, "--app-id", "pc-check",
                          "--data-dir", str(tmp_path)], capture_output=True, text=True, env=env, timeout=60)
    assert out.returncode == 2
    assert f"recreate '{topics.rewards}' with 2" in out.stderr + out.stdout

    admin.create_partitions([NewPartitions(topics.calls, 3)])[topics.calls].result()
    admin.create_partitions([NewPartitions(topics.rollouts, 3)])[topics.rollouts].result()
    out = subprocess.run([str(ROLLSTREAM), "process", "--topic-prefix", topics.prefix, "--app-id", "pc-check",
                          "--data-dir", str(tmp_path)], capture_output=True, text=True, env=env, timeout=60)
    assert out.returncode == 2
    assert f"recreate '{topics.transitions}' with 3" in out.stderr + out.stdout


def test_a_repeat_does_not_drop_a_waiting_completion(settings: ConnectionSettings, topics: Topics,
                                                     codec: EventCodec) -> None:
    """A complete rollout that waits for the other topics keeps waiting (and keeps its expiry deadline) when a
    duplicate, a late copy or a bad record for it comes in meanwhile — redeliveries after a restart do that."""
    from rollstream.stream_processors.config import ProcessorSettings
    from rollstream.stream_processors.metrics import Metrics
    from rollstream.stream_processors.processor import KEEP, Processor

    proc = Processor(ProcessorSettings(), topics, codec, Metrics())
    state: bytes | None = None
    pieces: dict[str, bytes] = {}  # the table's keys of the rollout's pieces, as the worker keeps them
    rid = "ro-wait"
    terminal = codec.encode(topics.rewards, reward(rid, 1.0))
    for i, (topic, value) in enumerate([(topics.calls, codec.encode(topics.calls, call(rid, 0))),
                                        (topics.rollouts, codec.encode(topics.rollouts, lifecycle(rid, "SUCCEEDED"))),
                                        (topics.rewards, terminal)]):
        decision = proc.handle(topic, 0, i, rid.encode(), value, state, now=100.0, ready=lambda s: False)
        assert decision.tracks and decision.state is not KEEP
        state = decision.state  # type: ignore[assignment]
        pieces.update({pid: v for pid, v in decision.pieces if v is not None})
    assert decision.pending_ts is not None and decision.deadline is not None  # complete, waiting
    repeat = proc.handle(topics.rewards, 0, 3, rid.encode(), terminal, state, now=101.0, ready=lambda s: False)
    assert repeat.state is KEEP and not repeat.outputs and not repeat.tracks
    bad = proc.handle(topics.rewards, 0, 4, rid.encode(), b"\x00junk", state, now=101.0, ready=lambda s: False)
    assert bad.outputs and bad.outputs[0].topic == topics.dead_letters and not bad.tracks
    done = proc.check(state, now=102.0, ready=lambda s: True, load=pieces.get)
    assert [o.topic for o in done.outputs] == [topics.transitions]
