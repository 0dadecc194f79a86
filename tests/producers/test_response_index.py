"""The gateway's calls of no rollout, recorded by response id, and the ResponseIndex that finds them again.

The integration tests run the gateway as a process in front of the real policy server with the official
``openai`` client and read ``calls-by-response`` back with a ResponseIndex; the unit tests start nothing."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Callable
from typing import Any

import pytest
from openai import OpenAI
from test_gateway_integration import CHAT, GatewayProcess, events, gateway_factory, in_kafka  # noqa: F401 - a fixture

from rollstream.producers.response_index import ResponseIndex
from rollstream.schemas.topics import Topics
from rollstream.settings import ConnectionSettings

PARAMS: dict[str, Any] = {"max_tokens": 8, "temperature": 0, "seed": 1}
TOKEN_FIELDS = ("prompt_token_ids", "response_token_ids", "response_logprobs")


def wait_ready(index: ResponseIndex, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while not index.ready():
        assert time.monotonic() < deadline, f"the index of {index.topic} did not catch up in {timeout:.0f} s"
        time.sleep(0.1)


@pytest.mark.integration
@pytest.mark.slow
def test_calls_of_no_rollout_are_found_by_response_id_with_the_engines_tokens(
    policy_server: Any, topics_factory: Callable[..., Topics], settings: ConnectionSettings,
    gateway_factory: Callable[..., GatewayProcess],  # noqa: F811
) -> None:
    topics = topics_factory()
    gw = gateway_factory(policy_server.base_url, topics)
    model = policy_server.policy
    live = ResponseIndex(settings, topics)  # started before the calls: they arrive while it waits
    live.start()
    try:
        wait_ready(live)
        direct = OpenAI(base_url=policy_server.base_url, api_key="none")
        truth = direct.chat.completions.create(model=model, messages=CHAT, logprobs=True,
                                               extra_body={"return_token_ids": True}, **PARAMS)
        expected = {"prompt_token_ids": (truth.model_extra or {})["prompt_token_ids"],
                    "response_token_ids": (truth.choices[0].model_extra or {})["token_ids"],
                    "response_logprobs": [t.logprob for t in truth.choices[0].logprobs.content]}  # type: ignore[union-attr]

        client = OpenAI(base_url=f"{gw.url}/v1", api_key="none")
        whole = client.chat.completions.create(model=model, messages=CHAT, **PARAMS)
        assert whole.choices[0].message.content == truth.choices[0].message.content
        assert whole.choices[0].logprobs is None and "prompt_token_ids" not in (whole.model_extra or {})
        chunks = list(client.chat.completions.create(model=model, messages=CHAT, stream=True, **PARAMS))
        streamed_id = chunks[0].id
        text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
        assert text == whole.choices[0].message.content
        # n=2, sampled: the client asks for the token ids itself, so it sees what the engine returned.
        several = client.chat.completions.create(model=model, messages=CHAT, n=2, logprobs=True, max_tokens=8,
                                                 temperature=1.0, extra_body={"return_token_ids": True})
        assert len(several.choices) == 2
        attributed = OpenAI(base_url=f"{gw.url}/rollouts/r-1/v1", api_key="none")
        attributed.chat.completions.create(model=model, messages=CHAT, **PARAMS)

        async def found(response_id: str, choice: int) -> dict[str, Any] | None:
            return await live.wait_for(response_id, choice, timeout_s=30)

        assert len({whole.id, streamed_id, several.id}) == 3
        records = {rid: asyncio.run(found(rid, 0)) for rid in (whole.id, streamed_id)}
        [recorded_call] = events(settings, topics, topics.calls, 1)  # the attributed call only
        assert recorded_call["rollout_id"] == "r-1"
        for record in records.values():
            assert record is not None
            assert {f: record[f] for f in TOKEN_FIELDS} == {f: recorded_call[f] for f in TOKEN_FIELDS}
            assert record["prompt_token_ids"] == expected["prompt_token_ids"]
            assert record["response_token_ids"] == expected["response_token_ids"]
            assert record["response_logprobs"] == pytest.approx(expected["response_logprobs"], abs=1e-4)
            assert record["policy_version"] == (truth.model_extra or {})["policy_version"] and record["policy"]
            assert record["model"] == model and record["call_id"]
        assert records[whole.id]["call_id"] != records[streamed_id]["call_id"]  # type: ignore[index]
        for choice in several.choices:
            record = asyncio.run(found(several.id, choice.index))
            assert record is not None
            assert record["prompt_token_ids"] == (several.model_extra or {})["prompt_token_ids"]
            assert record["response_token_ids"] == (choice.model_extra or {})["token_ids"]
            assert record["response_logprobs"] == pytest.approx([t.logprob for t in choice.logprobs.content],  # type: ignore[union-attr]
                                                                abs=1e-4)
        assert asyncio.run(live.wait_for("chatcmpl-never", 0, timeout_s=0.2)) is None
        assert live.get(several.id, 2) is None

        # Never on calls; on calls-by-response, one record per choice, keyed by the response id.
        assert in_kafka(settings, topics, topics.calls) == 1
        by_response = events(settings, topics, topics.calls_by_response, 4)
        assert sorted((c["metadata"]["response_id"], c["metadata"]["choice_index"]) for c in by_response) == sorted(
            [(whole.id, "0"), (streamed_id, "0"), (several.id, "0"), (several.id, "1")])
        assert all(c["rollout_id"] == "" for c in by_response)
        assert gw.metric("rollstream_gateway_unattributed_calls_total") == 3
        assert gw.metric("rollstream_gateway_unattributed_recorded_total") == 3

        # An index started afterwards reads the last hour back, then answers at once.
        with ResponseIndex(settings, topics) as late:
            wait_ready(late)
            assert late.get(whole.id) == records[whole.id] and len(late) == 3
    finally:
        live.close()


@pytest.mark.integration
@pytest.mark.slow
def test_with_recording_off_calls_of_no_rollout_are_only_relayed(
    policy_server: Any, topics_factory: Callable[..., Topics], settings: ConnectionSettings,
    gateway_factory: Callable[..., GatewayProcess],  # noqa: F811
) -> None:
    topics = topics_factory()
    gw = gateway_factory(policy_server.base_url, topics, env={"ROLLSTREAM_GATEWAY_RECORD_UNATTRIBUTED": "0"})
    client = OpenAI(base_url=f"{gw.url}/v1", api_key="none")
    client.chat.completions.create(model=policy_server.policy, messages=CHAT, **PARAMS)
    list(client.chat.completions.create(model=policy_server.policy, messages=CHAT, stream=True, **PARAMS))
    assert gw.metric("rollstream_gateway_unattributed_calls_total") == 2
    assert gw.metric("rollstream_gateway_unattributed_recorded_total") == 0
    assert gw.metric("rollstream_gateway_events_enqueued_total") == 0
    assert in_kafka(settings, topics, topics.calls_by_response) == in_kafka(settings, topics, topics.calls) == 0


# --- the index itself, without Kafka ------------------------------------------------------------


def record(response_id: str, choice: int, ids: list[int]) -> dict[str, Any]:
    return {"call_id": f"{response_id}-{choice}", "model": "m", "policy": "p", "policy_version": 3,
            "prompt_token_ids": [1, 2], "response_token_ids": ids, "response_logprobs": [-0.5] * len(ids),
            "response_text": "dropped", "messages": [{"role": "user", "content": "dropped"}],
            "metadata": {"response_id": response_id, "choice_index": str(choice)}}


def test_the_index_keeps_only_what_training_needs_and_forgets_the_least_recently_used() -> None:
    from rollstream.producers.response_index import _kept

    index = ResponseIndex(max_entries=2)
    index._put("a", 0, _kept(record("a", 0, [5])))
    index._put("a", 1, _kept(record("a", 1, [6, 7])))
    index._put("b", 0, _kept(record("b", 0, [8])))
    assert index.get("a", 1) == {"call_id": "a-1", "model": "m", "policy": "p", "policy_version": 3,
                                 "prompt_token_ids": [1, 2], "response_token_ids": [6, 7],
                                 "response_logprobs": [-0.5, -0.5]}
    index._put("c", 0, _kept(record("c", 0, [9])))  # "b" is the least recently used now
    assert index.get("b") is None and index.get("a") is not None and index.get("c") is not None
    assert index.get("a", 2) is None and index.stats() == {"entries": 2, "indexed": 4, "undecodable": 0,
                                                           "evicted": 1}
    assert not index.ready()  # never started


def test_wait_for_returns_as_soon_as_the_record_arrives_from_another_thread() -> None:
    from rollstream.producers.response_index import _kept

    index = ResponseIndex()

    async def go() -> None:
        other = asyncio.ensure_future(index.wait_for("r", 0, timeout_s=0.5))  # another choice: never arrives
        threading.Timer(0.2, index._put, ["r", 1, _kept(record("r", 1, [4]))]).start()
        started = time.monotonic()
        found = await index.wait_for("r", 1, timeout_s=10)
        assert found is not None and found["response_token_ids"] == [4]
        assert 0.15 < time.monotonic() - started < 0.45
        assert await other is None
        assert await index.wait_for("r", 1, timeout_s=0) == found  # already there: no waiting
        assert index._waiters == {}

    asyncio.run(go())
