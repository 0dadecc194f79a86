"""``rollstream serve`` in a subprocess, driven by the real OpenAI client."""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import openai
import pytest
from openai import OpenAI
from transformers import AutoTokenizer

from rollstream.serving.launch import ServerProcess, get_json
from rollstream.serving.protocol import chat_prompt_ids

pytestmark = pytest.mark.integration

MESSAGES = [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "What is the weather?"}]
CITY = {"type": "object", "properties": {"city": {"type": "string"}}}
TOOLS = [{"type": "function", "function": {"name": "get_weather", "description": "Weather", "parameters": CITY}}]


@pytest.fixture(scope="module")
def client(policy_server: ServerProcess) -> OpenAI:
    return OpenAI(base_url=policy_server.base_url, api_key="unused", max_retries=0, timeout=60)


def post(server: ServerProcess, path: str, body: dict[str, Any]) -> tuple[int, dict[str, Any], dict[str, str]]:
    req = urllib.request.Request(server.base_url + path, data=json.dumps(body).encode(),
                                 headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=60) as resp:
            return resp.status, json.loads(resp.read()), dict(resp.headers)
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read()), dict(exc.headers)


def test_health_models_and_version_header(policy_server: ServerProcess, client: OpenAI) -> None:
    assert get_json(policy_server.url + "/health")["policy_version"] == 0
    models = client.models.list()
    assert [m.id for m in models.data] == ["tiny"]
    raw = client.chat.completions.with_raw_response.create(model="tiny", messages=MESSAGES, max_tokens=3)
    assert raw.headers["x-policy-version"] == "0"
    assert raw.parse().policy_version == 0  # type: ignore[attr-defined]


def test_chat_non_streaming_and_streaming_agree(client: OpenAI) -> None:
    kwargs: dict[str, Any] = {"model": "tiny", "messages": MESSAGES, "max_tokens": 20, "seed": 42, "temperature": 1.0,
                              "extra_body": {"return_token_ids": True}}
    whole = client.chat.completions.create(**kwargs)
    choice = whole.choices[0]
    assert choice.finish_reason in ("stop", "length")
    assert whole.usage is not None and whole.usage.completion_tokens == len(choice.token_ids)  # type: ignore[attr-defined]
    assert client.chat.completions.create(**kwargs).choices[0].message.content == choice.message.content

    chunks = list(client.chat.completions.create(stream=True, **kwargs))
    assert all(c.policy_version == 0 for c in chunks)  # type: ignore[attr-defined]
    assert chunks[0].prompt_token_ids == whole.prompt_token_ids  # type: ignore[attr-defined]
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    ids = [i for c in chunks if c.choices for i in (c.choices[0].token_ids or [])]  # type: ignore[attr-defined]
    assert text == choice.message.content
    assert ids == choice.token_ids  # type: ignore[attr-defined]
    assert chunks[-1].choices[0].finish_reason == choice.finish_reason
    assert chunks[-1].usage is not None and chunks[-1].usage.total_tokens == whole.usage.total_tokens


def test_stream_usage_chunk_when_asked(client: OpenAI) -> None:
    chunks = list(client.chat.completions.create(model="tiny", messages=MESSAGES, max_tokens=4, stream=True,
                                                 stream_options={"include_usage": True}))
    assert chunks[-1].choices == [] and chunks[-1].usage is not None
    assert chunks[-1].usage.completion_tokens <= 4


def test_token_ids_decode_to_the_text(client: OpenAI, tiny_model_dir: Path) -> None:
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    resp = client.chat.completions.create(model="tiny", messages=MESSAGES, tools=TOOLS, max_tokens=16,  # type: ignore
                                          temperature=0, extra_body={"return_token_ids": True})
    assert resp.prompt_token_ids == chat_prompt_ids(tokenizer, MESSAGES, TOOLS)  # type: ignore[attr-defined]
    assert resp.usage is not None and resp.usage.prompt_tokens == len(resp.prompt_token_ids)  # type: ignore
    ids = resp.choices[0].token_ids  # type: ignore[attr-defined]
    assert tokenizer.decode(ids, skip_special_tokens=True) == resp.choices[0].message.content


def test_completions_with_n_and_logprobs(client: OpenAI) -> None:
    resp = client.completions.create(model="tiny", prompt="The agent", max_tokens=8, n=3, logprobs=2, seed=5,
                                     extra_body={"return_token_ids": True})
    assert [c.index for c in resp.choices] == [0, 1, 2]
    assert len({tuple(c.token_ids) for c in resp.choices}) > 1  # type: ignore[attr-defined]
    for c in resp.choices:
        lp = c.logprobs
        assert lp is not None and lp.tokens is not None and lp.token_logprobs is not None
        assert len(lp.tokens) == len(lp.token_logprobs) == len(c.token_ids)  # type: ignore[attr-defined]
        assert lp.top_logprobs is not None and all(1 <= len(t) <= 2 for t in lp.top_logprobs)
        assert lp.text_offset is not None and lp.text_offset[0] == 0 and lp.text_offset == sorted(lp.text_offset)
        assert all(v <= 0 for v in lp.token_logprobs)
    again = client.completions.create(model="tiny", prompt="The agent", max_tokens=8, n=3, seed=5)
    assert [c.text for c in again.choices] == [c.text for c in resp.choices]


def test_chat_logprobs_shape(client: OpenAI) -> None:
    resp = client.chat.completions.create(model="tiny", messages=MESSAGES, max_tokens=6, logprobs=True,
                                          top_logprobs=3, n=2)
    assert len(resp.choices) == 2
    assert resp.usage is not None
    assert sum(len(c.logprobs.content or []) for c in resp.choices if c.logprobs) == resp.usage.completion_tokens
    for choice in resp.choices:
        assert choice.logprobs is not None and choice.logprobs.content is not None
        assert 1 <= len(choice.logprobs.content) <= 6
        for entry in choice.logprobs.content:
            assert entry.logprob <= 0 and entry.bytes is not None and len(entry.top_logprobs) == 3
            assert entry.top_logprobs[0].logprob >= entry.logprob - 1e-6


def test_stop_string(client: OpenAI) -> None:
    base = client.completions.create(model="tiny", prompt="hello", max_tokens=30, temperature=0)
    text = base.choices[0].text
    letters = [i for i, ch in enumerate(text) if ch.isalpha()]
    # The tiny model is seeded, so its greedy text is fixed; it must be long enough to cut.
    assert len(letters) >= 4, f"greedy text too short to test stop strings with: {text!r}"
    stop = text[letters[len(letters) // 2]]
    cut = client.completions.create(model="tiny", prompt="hello", max_tokens=30, temperature=0, stop=[stop])
    assert cut.choices[0].text == text[:text.find(stop)]
    assert cut.choices[0].finish_reason == "stop"


def test_concurrent_requests_are_batched(policy_server: ServerProcess, client: OpenAI) -> None:
    before = policy_server.stats()
    prompts = [f"request number {i}" for i in range(8)]

    def one(prompt: str) -> str:
        return client.completions.create(model="tiny", prompt=prompt, max_tokens=24, temperature=0).choices[0].text

    with ThreadPoolExecutor(8) as pool:
        batched = list(pool.map(one, prompts))
    after = policy_server.stats()
    assert after["max_batch_size"] > 1
    assert after["requests"] - before["requests"] == 8
    assert [one(p) for p in prompts[:2]] == batched[:2]  # batching does not change greedy outputs
    with urllib.request.urlopen(policy_server.url + "/metrics") as resp:
        assert b"rollstream_serve_batch_size_bucket" in resp.read()


@pytest.mark.parametrize(("path", "body", "param", "status"), [
    ("/chat/completions", {"model": "tiny"}, "messages", 400),
    ("/chat/completions", {"model": "tiny", "messages": []}, "messages", 400),
    ("/chat/completions", {"model": "tiny", "messages": MESSAGES, "max_tokens": 0}, "max_tokens", 400),
    ("/chat/completions", {"model": "tiny", "messages": MESSAGES, "n": 0}, "n", 400),
    ("/chat/completions", {"model": "tiny", "messages": MESSAGES, "temperature": -1}, "temperature", 400),
    ("/chat/completions", {"model": "tiny", "messages": MESSAGES, "top_p": 0}, "top_p", 400),
    ("/chat/completions", {"model": "other", "messages": MESSAGES}, "model", 404),
    ("/completions", {"model": "tiny"}, "prompt", 400),
    ("/completions", {"model": "tiny", "prompt": "x", "logprobs": 99}, "logprobs", 400),
])
def test_bad_requests_name_the_field(policy_server: ServerProcess, path: str, body: dict[str, Any], param: str,
                                     status: int) -> None:
    code, reply, headers = post(policy_server, path, body)
    assert code == status
    assert reply["error"]["param"] == param and param in reply["error"]["message"]
    assert headers["x-policy-version"] == "0"


def test_openai_client_raises_on_errors(client: OpenAI) -> None:
    with pytest.raises(openai.BadRequestError, match="max_tokens"):
        client.chat.completions.create(model="tiny", messages=MESSAGES, max_tokens=0)
    with pytest.raises(openai.NotFoundError, match="nope"):
        client.chat.completions.create(model="nope", messages=MESSAGES)
