"""A STAND-IN FOR vLLM: the gateway against vLLM's documented OpenAI-compatible response shapes.

The real vLLM server runs in ``tests/serving/test_vllm.py`` (it needs ``scripts/setup-vllm.sh`` and a minute
to start); this fast stand-in backend replays the JSON and SSE shapes that vLLM's
OpenAI-compatible server documents for ``return_token_ids`` (its protocol's field description:
"the result will include token IDs alongside the generated text. In streaming mode,
prompt_token_ids is included only in the first chunk, and token_ids contains the delta tokens
for each chunk") and for logprobs:

- chat, whole: top-level ``prompt_token_ids``; ``choices[i].token_ids``;
  ``choices[i].logprobs.content[j] = {token, logprob, bytes, top_logprobs}``;
- chat, streamed: ``prompt_token_ids`` on the first chunk only; per chunk ``choices[i].token_ids``
  (the delta) and ``choices[i].logprobs.content``; the finish reason on the last choice chunk;
  a final usage-only chunk (``choices: []``) when ``stream_options.include_usage`` is set;
- completions: ``choices[i].prompt_token_ids`` and ``choices[i].token_ids``;
  ``choices[i].logprobs = {tokens, token_logprobs, top_logprobs, text_offset}``.

It proves the gateway records exactly those ids and logprobs (never re-tokenized) and hands the
client only what it asked for.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any

import httpx
import orjson
from aiohttp import web

from rollstream.producers.gateway import Gateway, GatewaySettings
from rollstream.producers.publisher import Delivery
from rollstream.schemas.codec import encode_body
from rollstream.schemas.topics import Topics

TOPICS = Topics(prefix="vllm.")
MODEL = "Qwen/Qwen2.5-0.5B-Instruct"
PROMPT_IDS = [151644, 872, 198, 13048, 151645, 198, 151644, 77091, 198]
OUT_IDS = [9707, 0, 151645]
OUT_TOKENS = ["Hello", "!", ""]
OUT_LOGPROBS = [-0.0123, -0.5, -0.0001]


def chat_logprobs(start: int, end: int) -> dict[str, Any]:
    return {"content": [{"token": OUT_TOKENS[i], "logprob": OUT_LOGPROBS[i], "bytes": list(OUT_TOKENS[i].encode()),
                         "top_logprobs": []} for i in range(start, end)]}


def chat_response(request: dict[str, Any]) -> dict[str, Any]:
    return {
        "id": "chatcmpl-5f1c", "object": "chat.completion", "created": 1760000000, "model": MODEL,
        "choices": [{"index": 0, "message": {"role": "assistant", "content": "Hello!", "tool_calls": [],
                                             "reasoning_content": None},
                     "logprobs": chat_logprobs(0, 3) if request.get("logprobs") else None,
                     "finish_reason": "stop", "stop_reason": None, "token_ids": OUT_IDS}],
        "usage": {"prompt_tokens": len(PROMPT_IDS), "total_tokens": len(PROMPT_IDS) + 3, "completion_tokens": 3,
                  "prompt_tokens_details": None},
        "prompt_logprobs": None, "prompt_token_ids": PROMPT_IDS, "kv_transfer_params": None,
    }


def chat_chunks(request: dict[str, Any]) -> list[dict[str, Any]]:
    base = {"id": "chatcmpl-5f1c", "object": "chat.completion.chunk", "created": 1760000000, "model": MODEL}
    lp = bool(request.get("logprobs"))
    chunks = [{**base, "choices": [{"index": 0, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                                    "finish_reason": None}], "prompt_token_ids": PROMPT_IDS}]
    for i, text in enumerate(["Hello", "!", ""]):
        last = i == 2
        chunks.append({**base, "choices": [{
            "index": 0, "delta": {"content": text}, "logprobs": chat_logprobs(i, i + 1) if lp else None,
            "finish_reason": "stop" if last else None, "stop_reason": None, "token_ids": [OUT_IDS[i]]}]})
    if (request.get("stream_options") or {}).get("include_usage"):
        chunks.append({**base, "choices": [], "usage": {"prompt_tokens": len(PROMPT_IDS), "completion_tokens": 3,
                                                         "total_tokens": len(PROMPT_IDS) + 3}})
    return chunks


def completion_response(request: dict[str, Any]) -> dict[str, Any]:
    logprobs = {"text_offset": [0, 5, 6], "token_logprobs": OUT_LOGPROBS, "tokens": OUT_TOKENS,
                "top_logprobs": [{}, {}, {}]} if request.get("logprobs") is not None else None
    return {
        "id": "cmpl-77aa", "object": "text_completion", "created": 1760000000, "model": MODEL,
        "choices": [{"index": 0, "text": "Hello!", "logprobs": logprobs, "finish_reason": "stop",
                     "stop_reason": None, "prompt_logprobs": None, "prompt_token_ids": PROMPT_IDS,
                     "token_ids": OUT_IDS}],
        "usage": {"prompt_tokens": len(PROMPT_IDS), "total_tokens": len(PROMPT_IDS) + 3, "completion_tokens": 3},
        "kv_transfer_params": None,
    }


class VllmShapes:
    """The stand-in backend; records what the gateway asked it for."""

    def __init__(self) -> None:
        self.requests: list[dict[str, Any]] = []

    async def chat(self, request: web.Request) -> web.StreamResponse:
        body = await request.json()
        self.requests.append(body)
        if not body.get("return_token_ids"):
            raise AssertionError("the gateway must ask vLLM for token ids (return_token_ids)")
        if not body.get("stream"):
            return web.json_response(chat_response(body))
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await resp.prepare(request)
        for chunk in chat_chunks(body):
            await resp.write(b"data: " + orjson.dumps(chunk) + b"\n\n")
        await resp.write(b"data: [DONE]\n\n")
        return resp

    async def completions(self, request: web.Request) -> web.StreamResponse:
        body = await request.json()
        self.requests.append(body)
        return web.json_response(completion_response(body))


class Recorder:
    def __init__(self) -> None:
        self.sent: list[tuple[str, str, dict[str, Any]]] = []

    def has_room(self, n: int = 1) -> bool:
        return True

    def publish(self, topic: str, key: str, records: list[dict[str, Any]]) -> Delivery | None:
        self.sent += [(topic, key, r) for r in records]
        return Delivery.settled()

    def depth(self) -> int:
        return 0

    def close(self, timeout: float = 30.0) -> int:
        return 0


def run(test: Callable[[httpx.AsyncClient, VllmShapes], Awaitable[None]]) -> list[dict[str, Any]]:
    backend, recorder = VllmShapes(), Recorder()

    async def go() -> None:
        app = web.Application()
        app.router.add_post("/v1/chat/completions", backend.chat)
        app.router.add_post("/v1/completions", backend.completions)
        runner = web.AppRunner(app, access_log=None)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        port = runner.addresses[0][1]
        gateway = Gateway(GatewaySettings(backend_url=f"http://127.0.0.1:{port}/v1"), recorder, TOPICS)
        await gateway.proxy.start()
        try:
            async with httpx.AsyncClient(transport=httpx.ASGITransport(app=gateway), base_url="http://gw") as client:
                await test(client, backend)
        finally:
            await gateway.proxy.stop()
            await runner.cleanup()

    asyncio.run(go())
    for _, _, record in recorder.sent:
        encode_body("LlmCall", record)
    return [r for _, _, r in recorder.sent]


def _check_call(call: dict[str, Any]) -> None:
    assert call["prompt_token_ids"] == PROMPT_IDS
    assert call["response_token_ids"] == OUT_IDS
    assert call["response_logprobs"] == OUT_LOGPROBS
    assert call["policy"] == MODEL and call["finish_reason"] == "stop" and call["response_text"] == "Hello!"


def test_vllm_chat_whole_response_is_captured_and_stripped_for_the_client() -> None:
    async def test(client: httpx.AsyncClient, backend: VllmShapes) -> None:
        r = await client.post("/rollouts/r-1/v1/chat/completions",
                              json={"model": MODEL, "messages": [{"role": "user", "content": "hi"}]})
        assert r.status_code == 200, r.text
        body = r.json()
        assert "prompt_token_ids" not in body and "token_ids" not in body["choices"][0]
        assert body["choices"][0]["logprobs"] is None  # the client did not ask
        assert backend.requests[0]["return_token_ids"] is True and backend.requests[0]["logprobs"] is True

    (call,) = run(test)
    _check_call(call)
    assert call["endpoint"] == "CHAT_COMPLETIONS" and call["completion_tokens"] == 3


def test_vllm_chat_stream_with_ids_on_the_first_chunk_and_delta_ids() -> None:
    async def test(client: httpx.AsyncClient, backend: VllmShapes) -> None:
        r = await client.post("/rollouts/r-2/v1/chat/completions", json={
            "model": MODEL, "messages": [{"role": "user", "content": "hi"}], "stream": True, "logprobs": True,
            "return_token_ids": True})
        assert r.status_code == 200
        chunks = [orjson.loads(line[6:]) for line in r.text.split("\n\n") if line.startswith("data: {")]
        assert chunks[0]["prompt_token_ids"] == PROMPT_IDS  # the client asked for ids: they pass through
        assert all(c["choices"] for c in chunks)  # but not the usage chunk only the gateway wanted
        assert backend.requests[0]["stream_options"] == {"include_usage": True}

    (call,) = run(test)
    _check_call(call)
    assert call["prompt_tokens"] == len(PROMPT_IDS)


def test_vllm_completions_with_per_choice_prompt_token_ids() -> None:
    async def test(client: httpx.AsyncClient, backend: VllmShapes) -> None:
        r = await client.post("/v1/completions", json={"model": MODEL, "prompt": "hi", "logprobs": 1},
                              headers={"X-Rollout-Id": "r-3", "X-Attempt": "2"})
        assert r.status_code == 200
        assert r.json()["choices"][0]["logprobs"]["token_logprobs"] == OUT_LOGPROBS  # asked for: kept
        assert "token_ids" not in r.json()["choices"][0]

    (call,) = run(test)
    _check_call(call)
    assert call["endpoint"] == "COMPLETIONS" and call["prompt"] == "hi" and call["attempt"] == 2
