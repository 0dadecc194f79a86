"""The SDK without Kafka: rollout lifecycle, rewards, context propagation, instrumentation, the bounded queue."""

from __future__ import annotations

import asyncio
import contextvars
import threading
import time
from typing import Any

import httpx2
import orjson
import pytest
from openai import AsyncOpenAI, OpenAI

from rollstream.errors import ProducerError, QueueFullError
from rollstream.events import DeliveryError
from rollstream.producers.emitter import EventEmitter
from rollstream.producers.instrument import instrument
from rollstream.producers.sdk import Client, SdkSettings, bind, current_rollout
from rollstream.schemas.topics import Topics
from rollstream.settings import ConnectionSettings


class ListEmitter:
    """Stands in for EventEmitter: builds jobs at once and keeps the records."""

    def __init__(self) -> None:
        self.records: list[tuple[str, str, dict[str, Any]]] = []
        self.lock = threading.Lock()
        self.flushes = 0

    def submit(self, topic: str, key: str, payload: Any) -> int:
        built = payload() if callable(payload) else [payload]
        with self.lock:
            self.records.extend((topic, key, r) for r in built)
            return len(self.records)

    def flush(self, timeout: float | None = None, upto: int | None = None) -> None:
        self.flushes += 1

    def close(self, timeout: float | None = None) -> int:
        return 0

    def of(self, topic: str) -> list[dict[str, Any]]:
        return [r for t, _, r in self.records if t == topic]


TOPICS = Topics(prefix="unit.")


@pytest.fixture
def sink() -> ListEmitter:
    return ListEmitter()


@pytest.fixture
def client(sink: ListEmitter) -> Client:
    return Client(ConnectionSettings(), SdkSettings(gateway_url="http://gw:8080"), topics=TOPICS,
                  emitter=sink)  # type: ignore[arg-type]


def test_rollout_publishes_started_then_succeeded_with_rewards(client: Client, sink: ListEmitter) -> None:
    with client.rollout(task_id="task", group_id="grp", policy="p", rollout_id="r1") as r:
        assert current_rollout() is r
        assert r.base_url == "http://gw:8080/rollouts/r1/v1"
        r.reward(0.5, call_id="c1")
        r.reward(1.0, terminal=True)
    assert current_rollout() is None
    statuses = [(e["status"], e["task_id"], e["group_id"], e["policy"]) for e in sink.of(TOPICS.rollouts)]
    assert statuses == [("STARTED", "task", "grp", "p"), ("SUCCEEDED", "task", "grp", "p")]
    rewards = sink.of(TOPICS.rewards)
    assert [(w["value"], w["call_id"], w["terminal"], w["attempt"]) for w in rewards] == [
        (0.5, "c1", False, 1), (1.0, None, True, 1)]
    assert {k for _, k, _ in sink.records} == {"r1"}
    assert sink.flushes == 1


def test_a_raising_block_publishes_failed_and_reraises(client: Client, sink: ListEmitter) -> None:
    with pytest.raises(KeyError):
        with client.rollout(rollout_id="r2"):
            raise KeyError("no tool")
    final = sink.of(TOPICS.rollouts)[-1]
    assert final["status"] == "FAILED" and final["error"] == "KeyError: 'no tool'"


def test_async_rollout_and_cancellation(client: Client, sink: ListEmitter) -> None:
    async def main() -> None:
        async with client.arollout(rollout_id="a1") as r:
            assert current_rollout() is r
        task = asyncio.create_task(_cancelled(client))
        await asyncio.sleep(0.01)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

    asyncio.run(main())
    assert [(e["rollout_id"], e["status"]) for e in sink.of(TOPICS.rollouts)] == [
        ("a1", "STARTED"), ("a1", "SUCCEEDED"), ("a2", "STARTED"), ("a2", "CANCELLED")]


async def _cancelled(client: Client) -> None:
    async with client.arollout(rollout_id="a2"):
        await asyncio.sleep(10)


def test_rewards_and_finish_by_rollout_id_are_validated(client: Client, sink: ListEmitter) -> None:
    client.reward("later", 2.0, terminal=True, name="quality")
    client.finish("later", "failed", error="timeout")
    assert sink.of(TOPICS.rewards)[0]["name"] == "quality"
    assert sink.of(TOPICS.rollouts)[0]["status"] == "FAILED"
    with pytest.raises(ProducerError, match="finite"):
        client.reward("later", float("nan"))
    with pytest.raises(ProducerError, match="status"):
        client.finish("later", "DONE")
    with pytest.raises(ProducerError, match="rollout_id"):
        client.reward("a/b", 1.0)
    with pytest.raises(ProducerError, match="rollout_id"):
        client.rollout("a/b")


def test_context_is_per_task_and_carried_into_threads_only_when_asked(client: Client) -> None:
    seen: dict[str, Any] = {}

    def in_thread(name: str) -> None:
        r = current_rollout()
        seen[name] = r.rollout_id if r else None

    with client.rollout(rollout_id="outer"):
        plain = threading.Thread(target=in_thread, args=("plain",))
        bound = threading.Thread(target=bind(in_thread), args=("bound",))
        ctx = threading.Thread(target=contextvars.copy_context().run, args=(in_thread, "copied"))
        for t in (plain, bound, ctx):
            t.start()
            t.join()
    assert seen == {"plain": None, "bound": "outer", "copied": "outer"}

    async def one(i: int) -> str | None:
        async with client.arollout(rollout_id=f"task-{i}"):
            await asyncio.sleep(0.001 * (i % 3))
            r = current_rollout()
            return r.rollout_id if r else None

    async def many() -> list[str | None]:
        return list(await asyncio.gather(*(one(i) for i in range(20))))

    assert asyncio.run(many()) == [f"task-{i}" for i in range(20)]


def _fake_engine(with_token_ids: bool, seen: list[dict[str, Any]]) -> httpx2.MockTransport:
    def handle(request: httpx2.Request) -> httpx2.Response:
        body = orjson.loads(request.content)
        seen.append(body)
        if body.get("stream"):
            chunks = [
                {"id": "c", "object": "chat.completion.chunk", "created": 1, "model": "m", "choices": [
                    {"index": 0, "delta": {"role": "assistant", "content": "he"}, "finish_reason": None,
                     **({"token_ids": [5]} if with_token_ids else {})}],
                 **({"prompt_token_ids": [1, 2]} if with_token_ids else {})},
                {"id": "c", "object": "chat.completion.chunk", "created": 1, "model": "m", "choices": [
                    {"index": 0, "delta": {"content": "y"}, "finish_reason": "stop",
                     **({"token_ids": [6]} if with_token_ids else {})}]},
                {"id": "c", "object": "chat.completion.chunk", "created": 1, "model": "m", "choices": [],
                 "usage": {"prompt_tokens": 2, "completion_tokens": 2, "total_tokens": 4}},
            ]
            text = "".join(f"data: {orjson.dumps(c).decode()}\n\n" for c in chunks) + "data: [DONE]\n\n"
            return httpx2.Response(200, content=text.encode(), headers={"content-type": "text/event-stream"})
        choice: dict[str, Any] = {"index": 0, "message": {"role": "assistant", "content": "hey"},
                                  "finish_reason": "stop", "logprobs": {"content": [
                                      {"token": "he", "logprob": -0.5, "bytes": [104, 101], "top_logprobs": []},
                                      {"token": "y", "logprob": -0.25, "bytes": [121], "top_logprobs": []}]}}
        out: dict[str, Any] = {"id": "x", "object": "chat.completion", "created": 1, "model": "m",
                               "choices": [choice], "usage": {"prompt_tokens": 2, "completion_tokens": 2,
                                                              "total_tokens": 4}, "policy_version": 7}
        if with_token_ids:
            out["prompt_token_ids"] = [1, 2]
            choice["token_ids"] = [5, 6]
        return httpx2.Response(200, json=out)

    return httpx2.MockTransport(handle)


@pytest.mark.parametrize("with_token_ids", [True, False])
def test_instrumented_client_records_calls_and_strips_what_was_not_asked(
    client: Client, sink: ListEmitter, with_token_ids: bool
) -> None:
    seen: list[dict[str, Any]] = []
    oa = instrument(OpenAI(base_url="http://engine/v1", api_key="k",
                           http_client=httpx2.Client(transport=_fake_engine(with_token_ids, seen))))
    messages = [{"role": "user", "content": "hi"}]
    oa.chat.completions.create(model="m", messages=messages)  # outside a rollout: untouched, unrecorded
    assert "return_token_ids" not in seen[-1]
    with client.rollout(rollout_id="inst", policy="p") as r, r.agent("planner"):
        resp = oa.chat.completions.create(model="m", messages=messages, temperature=0.5)
        messages.append({"role": "assistant", "content": "hey"})  # after the call: not part of the request
        chunks = list(oa.chat.completions.create(model="m", messages=messages, stream=True))
    assert seen[-2]["return_token_ids"] is True and seen[-2]["logprobs"] is True
    assert seen[-1]["stream_options"] == {"include_usage": True}
    assert resp.choices[0].logprobs is None and "prompt_token_ids" not in (resp.model_extra or {})
    assert "token_ids" not in (resp.choices[0].model_extra or {})
    assert len(chunks) == 2 and all(c.choices for c in chunks)  # the usage chunk was added by us
    whole, streamed = sink.of(TOPICS.calls)
    assert (whole["sequence"], streamed["sequence"]) == (0, 1)
    assert whole["agent_name"] == "planner" and whole["source"] == "sdk" and whole["policy"] == "p"
    assert [m["content"] for m in whole["messages"]] == ["hi"]
    assert whole["response_text"] == "hey" and streamed["response_text"] == "hey"
    assert whole["policy_version"] == 7 and whole["sampling"]["temperature"] == 0.5
    assert whole["response_logprobs"] == [-0.5, -0.25]
    assert streamed["completion_tokens"] == 2
    if with_token_ids:
        assert (whole["prompt_token_ids"], whole["response_token_ids"]) == ([1, 2], [5, 6])
        assert (streamed["prompt_token_ids"], streamed["response_token_ids"]) == ([1, 2], [5, 6])
    else:  # the engine returned none: recorded as null, never re-tokenized
        assert whole["prompt_token_ids"] is None and whole["response_token_ids"] is None
        assert streamed["response_token_ids"] is None


def test_instrumented_async_client(client: Client, sink: ListEmitter) -> None:
    seen: list[dict[str, Any]] = []
    oa = instrument(AsyncOpenAI(base_url="http://engine/v1", api_key="k",
                                http_client=httpx2.AsyncClient(transport=_fake_engine(True, seen))))

    async def main() -> None:
        async with client.arollout(rollout_id="async-inst"):
            await oa.chat.completions.create(model="m", messages=[{"role": "user", "content": "a"}])
            stream = await oa.chat.completions.create(model="m", messages=[], stream=True)
            async for _ in stream:
                pass

    asyncio.run(main())
    calls = sink.of(TOPICS.calls)
    assert [(c["rollout_id"], c["sequence"], c["response_token_ids"]) for c in calls] == [
        ("async-inst", 0, [5, 6]), ("async-inst", 1, [5, 6])]


class _BytesCodec:
    def encode(self, topic: str, record: dict[str, Any]) -> bytes:
        return b"v"

    def encode_key(self, topic: str, key: str) -> bytes:
        return key.encode()


def test_a_full_queue_raises_or_blocks_then_raises_never_drops() -> None:
    dead = ConnectionSettings(kafka_bootstrap="127.0.0.1:1")
    em = EventEmitter(_BytesCodec(), dead, queue_max=2, on_full="raise", log_level=0)  # type: ignore[arg-type]
    try:
        em.submit("t", "k", {})
        em.submit("t", "k", {})
        with pytest.raises(QueueFullError):
            em.submit("t", "k", {})
        with pytest.raises(QueueFullError):  # all or nothing
            em.submit_many([("t", "k", {}), ("t", "k", {})])
        with pytest.raises(DeliveryError, match="not acknowledged"):
            em.flush(timeout=0.3)
    finally:
        em.close(timeout=0.1)
    em = EventEmitter(_BytesCodec(), dead, queue_max=1, on_full="block", block_timeout=0.3,  # type: ignore[arg-type]
                      log_level=0)
    try:
        em.submit("t", "k", {})
        started = time.monotonic()
        with pytest.raises(QueueFullError, match="stayed full"):
            em.submit("t", "k", {})
        assert time.monotonic() - started >= 0.25
    finally:
        em.close(timeout=0.1)


def test_encoding_errors_are_reported_by_flush() -> None:
    class Broken(_BytesCodec):
        def encode(self, topic: str, record: dict[str, Any]) -> bytes:
            raise ValueError("bad record")

    em = EventEmitter(Broken(), ConnectionSettings(kafka_bootstrap="127.0.0.1:1"), log_level=0)  # type: ignore[arg-type]
    try:
        em.submit("t", "k", {})
        with pytest.raises(DeliveryError, match="bad record"):
            em.flush(timeout=5)
        em.flush(timeout=1)  # reported once
    finally:
        em.close(timeout=0.1)
