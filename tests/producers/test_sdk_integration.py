"""The SDK on the real stack, with the instrumented openai client against the real policy server."""

from __future__ import annotations

import asyncio
import subprocess
import sys
import threading
import uuid
from collections import defaultdict
from typing import Any

import pytest
from confluent_kafka import Consumer, TopicPartition
from openai import AsyncOpenAI, OpenAI

from rollstream.events import Received, read_events
from rollstream.producers.instrument import instrument
from rollstream.producers.sdk import Client, bind, current_rollout
from rollstream.schemas.codec import EventCodec
from rollstream.schemas.topics import Topics, consumer_config
from rollstream.settings import ConnectionSettings

pytestmark = pytest.mark.integration


def _read(codec: EventCodec, topics: list[str], count: int, settings: ConnectionSettings) -> list[Received]:
    return list(read_events(codec, topics, f"test-{uuid.uuid4().hex}", count, timeout=60, settings=settings))


def _end_offsets(settings: ConnectionSettings, topic: str, partitions: int) -> int:
    consumer = Consumer(consumer_config(f"offsets-{uuid.uuid4().hex}", settings))
    try:
        return sum(consumer.get_watermark_offsets(TopicPartition(topic, p), timeout=10)[1] for p in range(partitions))
    finally:
        consumer.close()


@pytest.fixture
def sdk(settings: ConnectionSettings, topics: Topics) -> Any:
    client = Client(settings, topics=topics)
    yield client
    client.close()


def test_an_agent_produces_linked_started_calls_reward_succeeded(
    sdk: Client, codec: EventCodec, topics: Topics, settings: ConnectionSettings, policy_server: Any
) -> None:
    oa = instrument(OpenAI(base_url=policy_server.base_url, api_key="none"))
    with sdk.rollout(task_id="task-1", group_id="group-1", policy=policy_server.policy) as r:
        first = oa.chat.completions.create(model=policy_server.policy, max_tokens=6, seed=1,
                                           messages=[{"role": "user", "content": "plan"}])
        first_call = r.last_call_id
        r.reward(0.25, call_id=first_call)
        with r.agent("solver"):
            stream = oa.chat.completions.create(model=policy_server.policy, max_tokens=6, stream=True,
                                                messages=[{"role": "user", "content": "solve"}])
            text = "".join(c.choices[0].delta.content or "" for c in stream if c.choices)
        r.reward(1.0, terminal=True)
    assert "prompt_token_ids" not in (first.model_extra or {})  # stripped: the caller did not ask
    events = _read(codec, [topics.rollouts, topics.calls, topics.rewards], 6, settings)
    assert {e.key for e in events} == {r.rollout_id}
    assert len({e.partition for e in events}) == 1  # co-partitioned by rollout id
    by_topic: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for e in events:
        by_topic[e.topic].append(e.value)
    assert [e["status"] for e in by_topic[topics.rollouts]] == ["STARTED", "SUCCEEDED"]
    assert by_topic[topics.rollouts][0]["group_id"] == "group-1"
    calls = sorted(by_topic[topics.calls], key=lambda c: c["sequence"])
    assert [(c["sequence"], c["agent_name"]) for c in calls] == [(0, None), (1, "solver")]
    for call in calls:
        assert call["rollout_id"] == r.rollout_id and call["policy"] == policy_server.policy
        assert call["prompt_token_ids"] and call["response_token_ids"]
        assert len(call["response_logprobs"]) == len(call["response_token_ids"])
    assert calls[0]["call_id"] == first_call and calls[0]["response_text"] == first.choices[0].message.content
    assert calls[1]["response_text"] == text
    rewards = {w["value"]: w for w in by_topic[topics.rewards]}
    assert rewards[0.25]["call_id"] == first_call and rewards[1.0]["terminal"] is True


def test_a_raising_agent_produces_failed(
    sdk: Client, codec: EventCodec, topics: Topics, settings: ConnectionSettings
) -> None:
    with pytest.raises(RuntimeError, match="tool crashed"):
        with sdk.rollout(task_id="t") as r:
            raise RuntimeError("tool crashed")
    events = _read(codec, [topics.rollouts], 2, settings)
    assert [(e.key, e.value["status"]) for e in events] == [(r.rollout_id, "STARTED"), (r.rollout_id, "FAILED")]
    assert events[1].value["error"] == "RuntimeError: tool crashed"


def test_fifty_concurrent_rollouts_never_mix_calls(
    sdk: Client, codec: EventCodec, topics: Topics, settings: ConnectionSettings, policy_server: Any
) -> None:
    oa = instrument(OpenAI(base_url=policy_server.base_url, api_key="none"))
    aoa = instrument(AsyncOpenAI(base_url=policy_server.base_url, api_key="none"))
    expected: dict[str, list[str]] = {}
    lock = threading.Lock()

    def note(rollout_id: str, marker: str) -> None:
        with lock:
            expected.setdefault(rollout_id, []).append(marker)

    def threaded(i: int) -> None:
        with sdk.rollout(task_id=f"thread-{i}") as r:
            for step in range(2):
                marker = f"{r.rollout_id}:{step}"
                note(r.rollout_id, marker)
                # a helper thread inside the rollout, carrying the context explicitly
                helper = threading.Thread(target=bind(lambda m=marker: oa.chat.completions.create(
                    model=policy_server.policy, max_tokens=1, messages=[{"role": "user", "content": m}])))
                helper.start()
                helper.join()

    async def task(i: int) -> None:
        async with sdk.arollout(task_id=f"task-{i}") as r:
            for step in range(2):
                marker = f"{r.rollout_id}:{step}"
                note(r.rollout_id, marker)
                await aoa.chat.completions.create(model=policy_server.policy, max_tokens=1,
                                                  messages=[{"role": "user", "content": marker}])
                assert current_rollout() is r

    async def tasks() -> None:
        await asyncio.gather(*(task(i) for i in range(25)))

    threads = [threading.Thread(target=threaded, args=(i,)) for i in range(25)]
    for t in threads:
        t.start()
    asyncio.run(tasks())
    for t in threads:
        t.join()
    sdk.flush()
    assert len(expected) == 50
    calls = _read(codec, [topics.calls], 100, settings)
    got: dict[str, list[str]] = defaultdict(list)
    for e in calls:
        assert e.key == e.value["rollout_id"]
        marker = e.value["messages"][0]["content"]
        assert marker.split(":")[0] == e.value["rollout_id"], "a call was recorded in another rollout"
        got[e.value["rollout_id"]].append(marker)
    assert {k: sorted(v) for k, v in got.items()} == {k: sorted(v) for k, v in expected.items()}
    assert _end_offsets(settings, topics.calls, topics.partitions) == 100


REWARD_SCRIPT = """
import sys
from rollstream.producers.sdk import Client
from rollstream.schemas.topics import Topics
from rollstream.settings import ConnectionSettings
settings = ConnectionSettings(kafka_bootstrap=sys.argv[1], schema_registry_url=sys.argv[2])
client = Client(settings, topics=Topics(prefix=sys.argv[3], partitions=int(sys.argv[4])))
client.reward(sys.argv[5], 0.75, terminal=True, name="grader")
client.finish(sys.argv[5], "SUCCEEDED")
client.close()
"""


def test_a_reward_sent_later_from_another_process_has_the_right_key(
    sdk: Client, codec: EventCodec, topics: Topics, settings: ConnectionSettings
) -> None:
    rollout_id = sdk.start(task_id="delayed")
    sdk.flush()
    out = subprocess.run(
        [sys.executable, "-c", REWARD_SCRIPT, settings.kafka_bootstrap, settings.schema_registry_url,
         topics.prefix, str(topics.partitions), rollout_id],
        capture_output=True, text=True, timeout=120,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    events = _read(codec, [topics.rollouts, topics.rewards], 3, settings)
    assert {e.key for e in events} == {rollout_id} and len({e.partition for e in events}) == 1
    reward = next(e.value for e in events if e.topic == topics.rewards)
    assert (reward["value"], reward["name"], reward["terminal"]) == (0.75, "grader", True)
    assert sorted(e.value["status"] for e in events if e.topic == topics.rollouts) == ["STARTED", "SUCCEEDED"]
