"""The gateway's Responses and Messages routes and its model names, in-process against a canned chat backend:
what the backend is sent, what the client gets, what is recorded."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any

import httpx
import orjson
import pytest
from aiohttp import web
from anthropic.types import Message
from openai.types.responses import Response
from test_gateway_app import RecordingPublisher
from test_responses import sse_events

from rollstream.errors import ConfigError
from rollstream.producers.gateway import Gateway, GatewaySettings
from rollstream.producers.model_names import BACKEND_MODEL, ModelMap
from rollstream.schemas.codec import encode_body
from rollstream.schemas.topics import Topics

TOPICS = Topics(prefix="unit.")
PROMPT_IDS, OUT_IDS = [5, 6, 7], [11, 12]
CONTENT = [{"token": "Hel", "logprob": -0.25, "bytes": [72, 101, 108], "top_logprobs": []},
           {"token": "lo", "logprob": -0.5, "bytes": [108, 111], "top_logprobs": []}]
USAGE = {"prompt_tokens": 3, "completion_tokens": 2, "total_tokens": 5}
RESPONSES = {"model": "gpt-4o", "instructions": "Be brief.", "input": "hi"}
MESSAGES = {"model": "claude-sonnet-4-5", "max_tokens": 16, "system": "Be brief.",
            "messages": [{"role": "user", "content": "hi"}]}


class Backend:
    """A chat completions backend serving model "tiny" (404 for any other name) at policy version 7; it keeps
    the bodies it is sent."""

    def __init__(self) -> None:
        self.bodies: list[dict[str, Any]] = []
        self.runner: web.AppRunner | None = None

    async def chat(self, request: web.Request) -> web.StreamResponse:
        body = await request.json()
        self.bodies.append(body)
        headers = {"X-Policy-Version": "7"}
        if body.get("model") != "tiny":
            return web.json_response({"error": {"message": f"model '{body.get('model')}' does not exist",
                                                "type": "NotFoundError", "param": "model"}}, status=404)
        if body["messages"][-1].get("content") == "refuse":
            return web.json_response({"error": {"message": "the prompt is too long", "param": "messages"}},
                                     status=400, headers=headers)
        head = {"id": "chatcmpl-1", "created": 0, "model": "tiny", "policy_version": 7}
        if not body.get("stream"):
            return web.json_response({**head, "object": "chat.completion", "prompt_token_ids": PROMPT_IDS,
                                      "choices": [{"index": 0, "finish_reason": "stop", "token_ids": OUT_IDS,
                                                   "logprobs": {"content": CONTENT},
                                                   "message": {"role": "assistant", "content": "Hello"}}],
                                      "usage": USAGE}, headers=headers)
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream", **headers})
        await resp.prepare(request)
        chunks = [
            {"choices": [{"index": 0, "delta": {"role": "assistant", "content": ""}, "finish_reason": None,
                          "logprobs": None, "token_ids": []}], "prompt_token_ids": PROMPT_IDS},
            {"choices": [{"index": 0, "delta": {"content": "Hel"}, "finish_reason": None, "token_ids": OUT_IDS[:1],
                          "logprobs": {"content": CONTENT[:1]}}]},
            {"choices": [{"index": 0, "delta": {"content": "lo"}, "finish_reason": "stop", "token_ids": OUT_IDS[1:],
                          "logprobs": {"content": CONTENT[1:]}}]},
        ]
        if (body.get("stream_options") or {}).get("include_usage"):
            chunks.append({"choices": [], "usage": USAGE})
        for chunk in chunks:
            await resp.write(b"data: " + orjson.dumps({**head, "object": "chat.completion.chunk", **chunk}) + b"\n\n")
        await resp.write(b"data: [DONE]\n\n")
        return resp

    async def models(self, request: web.Request) -> web.Response:
        return web.json_response({"object": "list", "data": [{"id": "tiny", "object": "model", "created": 0,
                                                              "owned_by": "rollstream"}]},
                                 headers={"X-Policy-Version": "7"})

    async def start(self) -> str:
        app = web.Application()
        app.router.add_post("/v1/chat/completions", self.chat)
        app.router.add_get("/v1/models", self.models)
        self.runner = web.AppRunner(app, access_log=None)
        await self.runner.setup()
        await web.TCPSite(self.runner, "127.0.0.1", 0).start()
        return f"http://127.0.0.1:{self.runner.addresses[0][1]}/v1"


def run(test: Callable[[httpx.AsyncClient, Backend], Awaitable[None]], topic: str = TOPICS.calls,
        **settings: Any) -> list[dict[str, Any]]:
    """Run ``test`` against a gateway in front of a fresh Backend; the LlmCall records it published to ``topic``
    (calls, or calls-by-response: then with the key of each in its ``metadata["key"]``)."""
    publisher = RecordingPublisher()

    async def go() -> None:
        backend = Backend()
        app = Gateway(GatewaySettings(backend_url=await backend.start(), **settings), publisher, TOPICS)
        await app.proxy.start()
        try:
            async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://gw") as client:
                await test(client, backend)
        finally:
            await app.proxy.stop()
            assert backend.runner is not None
            await backend.runner.cleanup()

    asyncio.run(go())
    for _, _, record in publisher.sent:
        encode_body("LlmCall", record)  # valid against the schema
    if topic == TOPICS.calls_by_response:
        return [{**r, "metadata": {**r["metadata"], "key": k}} for t, k, r in publisher.sent if t == topic]
    return [record for t, _, record in publisher.sent if t == topic]


def test_responses_whole_and_streamed_are_translated_and_recorded_in_chat_form() -> None:
    async def test(client: httpx.AsyncClient, backend: Backend) -> None:
        r = await client.post("/rollouts/r-1/agents/solver/v1/responses", json=RESPONSES)
        assert r.status_code == 200 and r.headers["x-policy-version"] == "7"
        response = Response.model_validate(r.json())
        assert response.output_text == "Hello" and response.model == "gpt-4o"
        sent = backend.bodies[-1]
        assert sent["model"] == "tiny" and sent["return_token_ids"] is True and sent["logprobs"] is True
        assert sent["messages"] == [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "hi"}]

        r = await client.post("/v1/responses", json={**RESPONSES, "stream": True}, headers={"X-Rollout-Id": "r-2"})
        assert r.status_code == 200 and r.headers["x-policy-version"] == "7"
        assert r.headers["content-type"] == "text/event-stream"
        events = [data for _, data in sse_events(r.content)]
        assert events[0]["type"] == "response.created" and events[-1]["type"] == "response.completed"
        assert Response.model_validate(events[-1]["response"]).usage.output_tokens == 2  # type: ignore[union-attr]
        assert backend.bodies[-1]["stream_options"] == {"include_usage": True}
        assert b"[DONE]" not in r.content and b"chat.completion" not in r.content

    calls = run(test)
    assert [(c["rollout_id"], c["endpoint"], c["model"]) for c in calls] == [("r-1", "RESPONSES", "gpt-4o"),
                                                                            ("r-2", "RESPONSES", "gpt-4o")]
    for call in calls:
        assert call["prompt_token_ids"] == PROMPT_IDS and call["response_token_ids"] == OUT_IDS
        assert call["response_logprobs"] == [-0.25, -0.5] and call["response_text"] == "Hello"
        assert [(m["role"], m["content"]) for m in call["messages"]] == [("system", "Be brief."), ("user", "hi")]
        assert call["policy_version"] == 7
    assert calls[0]["agent_name"] == "solver"


def test_messages_whole_and_streamed_are_translated_and_recorded_in_chat_form() -> None:
    async def test(client: httpx.AsyncClient, backend: Backend) -> None:
        key = {"x-api-key": "agent-key", "anthropic-version": "2023-06-01"}
        r = await client.post("/rollouts/r-1/v1/messages", json=MESSAGES, headers=key)
        assert r.status_code == 200 and r.headers["x-policy-version"] == "7"
        message = Message.model_validate(r.json())
        assert message.content[0].text == "Hello" and message.model == "claude-sonnet-4-5"  # type: ignore[union-attr]
        assert message.stop_reason == "end_turn" and message.usage.input_tokens == 3
        assert backend.bodies[-1]["max_tokens"] == 16 and backend.bodies[-1]["model"] == "tiny"

        r = await client.post("/rollouts/r-1/v1/messages", json={**MESSAGES, "stream": True}, headers=key)
        events = sse_events(r.content)
        assert [name for name, _ in events] == ["message_start", "ping", "content_block_start",
                                                "content_block_delta", "content_block_delta", "content_block_stop",
                                                "message_delta", "message_stop"]
        assert events[0][1]["message"]["usage"]["input_tokens"] == 3
        assert events[-2][1]["usage"]["output_tokens"] == 2

    calls = run(test, api_keys="agent-key=models")
    assert [(c["endpoint"], c["model"], c["sequence"]) for c in calls] == [("MESSAGES", "claude-sonnet-4-5", 0),
                                                                          ("MESSAGES", "claude-sonnet-4-5", 1)]
    assert all(c["response_token_ids"] == OUT_IDS and c["sampling"]["max_tokens"] == 16 for c in calls)


def test_unattributed_calls_on_these_routes_are_translated_and_recorded_by_the_id_the_client_got() -> None:
    ids: list[str] = []
    recorded = "2.0"

    async def test(client: httpx.AsyncClient, backend: Backend) -> None:
        r = await client.post("/v1/responses", json=RESPONSES)
        assert Response.model_validate(r.json()).output_text == "Hello"
        ids.append(r.json()["id"])
        r = await client.post("/v1/messages", json={**MESSAGES, "stream": True})
        assert sse_events(r.content)[-1][0] == "message_stop"
        ids.append(sse_events(r.content)[0][1]["message"]["id"])
        metrics = (await client.get("/metrics")).text
        assert "rollstream_gateway_unattributed_calls_total 2.0" in metrics
        assert f"rollstream_gateway_unattributed_recorded_total {recorded}" in metrics
        assert 'rollstream_gateway_requests_total{endpoint="responses",status="200"} 1.0' in metrics
        assert 'rollstream_gateway_requests_total{endpoint="messages",status="200"} 1.0' in metrics

    calls = run(test, TOPICS.calls_by_response)
    assert ids[0].startswith("resp_") and ids[1].startswith("msg_")
    assert [(c["endpoint"], c["metadata"]["key"], c["metadata"]["response_id"]) for c in calls] == [
        ("RESPONSES", ids[0], ids[0]), ("MESSAGES", ids[1], ids[1])]
    assert all(c["rollout_id"] == "" and c["response_token_ids"] == OUT_IDS for c in calls)
    assert run(test) == []  # nothing on calls
    recorded = "0.0"
    assert run(test, TOPICS.calls_by_response, record_unattributed=False) == []


def test_errors_come_in_each_protocols_shape() -> None:
    async def test(client: httpx.AsyncClient, backend: Backend) -> None:
        r = await client.post("/rollouts/r-1/v1/responses", json={**RESPONSES, "previous_response_id": "resp_1"})
        assert r.status_code == 400 and r.json()["error"]["param"] == "previous_response_id"
        r = await client.post("/rollouts/r-1/v1/messages", json={**MESSAGES, "max_tokens": None})
        assert r.status_code == 400 and r.json()["type"] == "error"
        assert r.json()["error"]["type"] == "invalid_request_error" and "max_tokens" in r.json()["error"]["message"]
        # a backend's 4xx: passed on as it is to OpenAI clients, in Anthropic's shape to Anthropic clients
        refuse = [{"role": "user", "content": "refuse"}]
        r = await client.post("/rollouts/r-1/v1/responses", json={**RESPONSES, "input": refuse})
        assert r.status_code == 400 and r.json()["error"]["message"] == "the prompt is too long"
        assert r.headers["x-policy-version"] == "7"
        r = await client.post("/rollouts/r-1/v1/messages", json={**MESSAGES, "messages": refuse})
        assert r.status_code == 400 and r.json()["type"] == "error"
        assert "the prompt is too long" in r.json()["error"]["message"]
        r = await client.post("/rollouts/r-1/v1/messages", content=b"{not json")
        assert r.status_code == 400 and r.json()["error"]["type"] == "invalid_request_error"

    assert run(test) == []


def test_messages_keys_errors_are_anthropic_shaped() -> None:
    async def test(client: httpx.AsyncClient, backend: Backend) -> None:
        r = await client.post("/v1/messages", json=MESSAGES)
        assert r.status_code == 401 and r.json()["error"]["type"] == "authentication_error"
        assert "x-api-key" in r.json()["error"]["message"]
        r = await client.post("/v1/messages", json=MESSAGES, headers={"x-api-key": "grader-key"})
        assert r.status_code == 403 and r.json()["error"]["type"] == "permission_error"
        r = await client.post("/v1/messages", json=MESSAGES, headers={"Authorization": "Bearer agent-key"})
        assert r.status_code == 200

    run(test, api_keys="agent-key=models,grader-key=rewards")


def test_model_names_are_mapped_for_the_backend_and_recorded_as_the_client_sent_them() -> None:
    chat = {"model": "gpt-4o", "messages": [{"role": "user", "content": "hi"}]}

    async def test(client: httpx.AsyncClient, backend: Backend) -> None:
        for path in ("/rollouts/r-1/v1/chat/completions", "/v1/chat/completions"):  # recorded, and relayed
            for stream in (False, True):
                r = await client.post(path, json={**chat, "stream": stream})
                assert r.status_code == 200 and r.headers["x-policy-version"] == "7", r.text
                assert backend.bodies[-1]["model"] == "tiny"
        r = await client.get("/v1/models")
        assert r.json()["data"][0]["id"] == "tiny" and r.headers["x-policy-version"] == "7"
        r = await client.get("/v1/models/gpt-4o")
        assert r.status_code == 200 and r.json() == {"id": "gpt-4o", "object": "model", "created": 0,
                                                     "owned_by": "rollstream"}

    calls = run(test)  # the default map, '*': every name is the backend's model
    assert [c["model"] for c in calls] == ["gpt-4o", "gpt-4o"]

    async def pairs(client: httpx.AsyncClient, backend: Backend) -> None:
        r = await client.post("/v1/chat/completions", json={**chat, "model": "small"})
        assert r.status_code == 200 and backend.bodies[-1]["model"] == "tiny"
        r = await client.post("/v1/chat/completions", json=chat)  # not mapped: passes unchanged, the backend 404s
        assert r.status_code == 404 and backend.bodies[-1]["model"] == "gpt-4o"
        assert (await client.get("/v1/models/small")).json()["id"] == "small"
        r = await client.get("/v1/models/gpt-4o")
        assert r.status_code == 404 and r.json()["error"]["code"] == "model_not_found"
        assert r.json()["error"]["param"] == "model"

    run(pairs, model_map="small=tiny")

    async def unchanged(client: httpx.AsyncClient, backend: Backend) -> None:
        r = await client.post("/rollouts/r-1/v1/responses", json=RESPONSES)
        assert r.status_code == 404 and backend.bodies[-1]["model"] == "gpt-4o"
        assert (await client.get("/v1/models/tiny")).status_code == 200
        assert (await client.get("/v1/models/gpt-4o")).status_code == 404

    run(unchanged, model_map="")

    async def star(client: httpx.AsyncClient, backend: Backend) -> None:
        r = await client.post("/v1/chat/completions", json=chat)
        assert r.status_code == 404 and backend.bodies[-1]["model"] == "other"

    run(star, model_map="*=other")


def test_model_map_parsing() -> None:
    m = ModelMap.parse(" gpt-4o = tiny , claude-3 =tiny, *")
    assert m.pairs == {"gpt-4o": "tiny", "claude-3": "tiny"} and m.other is BACKEND_MODEL
    assert (m.target("gpt-4o"), m.target("x"), m.target(None)) == ("tiny", BACKEND_MODEL, BACKEND_MODEL)
    assert ModelMap.parse("*=big").target("x") == "big"
    assert ModelMap.parse("a=b").target("x") == "x" and ModelMap.parse("a=b").target(None) is None
    assert ModelMap.parse("").identity and not ModelMap.parse("*").identity
    for bad, match in (("gpt-4o", "not 'client=backend'"), ("a=", "not 'client=backend'"), ("*,*=x", "catch-all"),
                       ("a=b,a=c", "mapped twice")):
        with pytest.raises(ConfigError, match=match):
            ModelMap.parse(bad)
    with pytest.raises(ConfigError, match="ROLLSTREAM_GATEWAY_MODEL_MAP"):
        GatewaySettings(model_map="nonsense")
