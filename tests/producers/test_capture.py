"""Capture: recorded backend responses (whole and streamed) become LlmCall records; stripping."""

from __future__ import annotations

import copy
from typing import Any

import pytest

from rollstream.producers.capture import (
    CallAssembler,
    CallContext,
    ClientWants,
    Endpoint,
    prepare_request,
    strip_chunk,
    strip_response,
)
from rollstream.schemas.codec import decode_body, encode_body

CHAT_REQUEST: dict[str, Any] = {
    "model": "tiny",
    "messages": [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": [{"type": "text", "text": "Add "}, {"type": "text", "text": "2+2."}]},
    ],
    "temperature": 0.7, "top_p": 0.9, "max_tokens": 8, "seed": 3, "stop": "\n",
    "tools": [{"type": "function", "function": {"name": "add", "parameters": {}}}],
}

# What a vLLM-style backend answers to CHAT_REQUEST with return_token_ids and logprobs.
CHAT_RESPONSE: dict[str, Any] = {
    "id": "chatcmpl-1", "object": "chat.completion", "created": 1, "model": "tiny", "policy_version": 4,
    "prompt_token_ids": [1, 2, 3, 4],
    "choices": [{
        "index": 0, "finish_reason": "stop",
        "message": {"role": "assistant", "content": "It is 4."},
        "logprobs": {"content": [
            {"token": "It", "logprob": -0.1, "bytes": None, "top_logprobs": []},
            {"token": " is", "logprob": -0.2, "bytes": None, "top_logprobs": []},
            {"token": " 4.", "logprob": -0.3, "bytes": None, "top_logprobs": []},
        ]},
        "token_ids": [10, 11, 12],
    }],
    "usage": {"prompt_tokens": 4, "completion_tokens": 3, "total_tokens": 7},
}

# The same answer streamed, with a tool call split across deltas and a usage-only final chunk.
CHAT_CHUNKS: list[dict[str, Any]] = [
    {"object": "chat.completion.chunk", "model": "tiny", "policy_version": 4, "prompt_token_ids": [1, 2, 3, 4],
     "choices": [{"index": 0, "delta": {"role": "assistant", "content": "It"}, "finish_reason": None,
                  "logprobs": {"content": [{"token": "It", "logprob": -0.1}]}, "token_ids": [10]}]},
    {"object": "chat.completion.chunk", "model": "tiny", "policy_version": 4,
     "choices": [{"index": 0, "delta": {"content": " is"}, "finish_reason": None,
                  "logprobs": {"content": [{"token": " is", "logprob": -0.2}]}, "token_ids": [11]}]},
    {"object": "chat.completion.chunk", "model": "tiny", "policy_version": 4,
     "choices": [{"index": 0, "delta": {"content": " 4."}, "finish_reason": "stop",
                  "logprobs": {"content": [{"token": " 4.", "logprob": -0.3}]}, "token_ids": [12]}]},
    {"object": "chat.completion.chunk", "model": "tiny", "policy_version": 4, "choices": [],
     "usage": {"prompt_tokens": 4, "completion_tokens": 3, "total_tokens": 7}},
]

COMPLETION_RESPONSE: dict[str, Any] = {
    "object": "text_completion", "model": "tiny",
    "choices": [
        {"index": i, "text": text, "finish_reason": "length", "prompt_token_ids": [5, 6], "token_ids": ids,
         "logprobs": {"tokens": list(text), "token_logprobs": lps, "top_logprobs": None, "text_offset": [0, 1]}}
        for i, (text, ids, lps) in enumerate([("ab", [20, 21], [-1.0, -2.0]), ("cd", [22, 23], [-0.5, -0.25])])
    ],
    "usage": {"prompt_tokens": 2, "completion_tokens": 4, "total_tokens": 6},
}


def context(endpoint: Endpoint = "CHAT_COMPLETIONS", request: dict[str, Any] | None = None) -> CallContext:
    return CallContext(rollout_id="r-1", attempt=2, agent_name="solver", sequence=5, endpoint=endpoint,
                       request=copy.deepcopy(request or CHAT_REQUEST), policy="", policy_version=1)


def roundtrip(event: dict[str, Any]) -> dict[str, Any]:
    """Encode with the LlmCall schema (proves the record is valid) and decode."""
    return decode_body("LlmCall", encode_body("LlmCall", event))


def test_whole_chat_response_becomes_one_call() -> None:
    call = CallAssembler(context())
    call.add_response(copy.deepcopy(CHAT_RESPONSE))
    [event] = [roundtrip(e) for e in call.events()]
    assert event["rollout_id"] == "r-1" and event["attempt"] == 2 and event["sequence"] == 5
    assert event["agent_name"] == "solver" and event["policy"] == "tiny" and event["policy_version"] == 4
    assert event["prompt_token_ids"] == [1, 2, 3, 4]
    assert event["response_token_ids"] == [10, 11, 12]
    assert event["response_logprobs"] == pytest.approx([-0.1, -0.2, -0.3])  # Avro float: single precision
    assert event["response_text"] == "It is 4." and event["finish_reason"] == "stop"
    assert (event["prompt_tokens"], event["completion_tokens"]) == (4, 3)
    assert event["messages"][1]["content"] == "Add 2+2." and event["messages"][0]["role"] == "system"
    assert event["sampling"] == {"temperature": 0.7, "top_p": 0.9, "max_tokens": 8, "stop": ["\n"], "seed": 3, "n": 1}
    assert '"add"' in event["tools_json"] and event["endpoint"] == "CHAT_COMPLETIONS"
    assert event["latency_ms"] >= 0 and event["end_time"] >= event["start_time"]


def test_streamed_chat_assembles_the_same_call() -> None:
    whole = CallAssembler(context())
    whole.add_response(copy.deepcopy(CHAT_RESPONSE))
    streamed = CallAssembler(context())
    for chunk in copy.deepcopy(CHAT_CHUNKS):
        streamed.add_chunk(chunk)
    [a], [b] = whole.events(), streamed.events()
    same = ["prompt_token_ids", "response_token_ids", "response_logprobs", "response_text", "finish_reason",
            "policy_version", "prompt_tokens", "completion_tokens", "messages", "sampling"]
    assert {k: a[k] for k in same} == {k: b[k] for k in same}
    assert a["call_id"] != b["call_id"]


def test_streamed_tool_call_deltas_are_merged_and_cut_off_choices_dropped() -> None:
    call = CallAssembler(context())
    call.add_chunk({"choices": [{"index": 0, "delta": {"tool_calls": [
        {"index": 0, "id": "call_1", "type": "function", "function": {"name": "add", "arguments": '{"a":'}}]}}]})
    call.add_chunk({"choices": [{"index": 0, "delta": {"tool_calls": [
        {"index": 0, "function": {"arguments": " 2}"}}]}, "finish_reason": "tool_calls"}]})
    call.add_chunk({"choices": [{"index": 1, "delta": {"content": "never finished"}}]})
    [event] = call.events(policy_version=9)
    assert event["response_tool_calls_json"] == (
        '[{"function":{"arguments":"{\\"a\\": 2}","name":"add"},"id":"call_1","type":"function"}]')
    assert event["finish_reason"] == "tool_calls" and event["policy_version"] == 9
    assert event["response_token_ids"] is None and event["prompt_token_ids"] is None  # not returned: null


def test_completions_with_n_2_become_two_calls() -> None:
    request = {"model": "tiny", "prompt": "x", "n": 2, "max_tokens": 2}
    call = CallAssembler(context("COMPLETIONS", request))
    call.add_response(copy.deepcopy(COMPLETION_RESPONSE))
    events = [roundtrip(e) for e in call.events()]
    assert [e["response_text"] for e in events] == ["ab", "cd"]
    assert [e["response_token_ids"] for e in events] == [[20, 21], [22, 23]]
    assert [e["response_logprobs"] for e in events] == [[-1.0, -2.0], [-0.5, -0.25]]
    assert all(e["prompt_token_ids"] == [5, 6] and e["prompt"] == "x" and e["messages"] == [] for e in events)
    assert len({e["call_id"] for e in events}) == 2 and {e["sequence"] for e in events} == {5}
    assert [e["metadata"]["choice_index"] for e in events] == ["0", "1"]
    assert events[0]["sampling"]["n"] == 2 and events[0]["endpoint"] == "COMPLETIONS"


def test_prepare_request_asks_for_ids_and_logprobs() -> None:
    body: dict[str, Any] = {"messages": [], "stream": True}
    wants = prepare_request("CHAT_COMPLETIONS", body)
    assert wants == ClientWants(token_ids=False, logprobs=False, stream_usage=False)
    assert body["return_token_ids"] is True and body["logprobs"] is True
    assert body["stream_options"] == {"include_usage": True}
    body = {"prompt": "x", "logprobs": 3}
    wants = prepare_request("COMPLETIONS", body)
    assert wants.logprobs and body["logprobs"] == 3 and "stream_options" not in body
    body = {"prompt": "x"}
    assert not prepare_request("COMPLETIONS", body).logprobs and body["logprobs"] == 1


def test_strip_removes_only_what_the_client_did_not_ask_for() -> None:
    body = copy.deepcopy(CHAT_RESPONSE)
    strip_response(body, ClientWants(token_ids=False, logprobs=False, stream_usage=True))
    assert "prompt_token_ids" not in body and "token_ids" not in body["choices"][0]
    assert body["choices"][0]["logprobs"] is None and body["usage"]["total_tokens"] == 7
    body = copy.deepcopy(CHAT_RESPONSE)
    strip_response(body, ClientWants(token_ids=False, logprobs=True, stream_usage=True))
    assert body["choices"][0]["logprobs"] == CHAT_RESPONSE["choices"][0]["logprobs"]
    body = copy.deepcopy(COMPLETION_RESPONSE)
    strip_response(body, ClientWants(token_ids=False, logprobs=False, stream_usage=True))
    assert all("prompt_token_ids" not in c and "token_ids" not in c and c["logprobs"] is None
               for c in body["choices"])


def test_strip_chunk_drops_the_usage_chunk_the_gateway_added() -> None:
    wants = ClientWants(token_ids=False, logprobs=False, stream_usage=False)
    first, *_, usage = copy.deepcopy(CHAT_CHUNKS)
    assert strip_chunk(first, wants)
    assert "prompt_token_ids" not in first and "token_ids" not in first["choices"][0]
    assert first["choices"][0]["logprobs"] is None and first["choices"][0]["delta"]["content"] == "It"
    assert not strip_chunk(usage, wants)
    assert strip_chunk(usage, ClientWants(token_ids=False, logprobs=False, stream_usage=True))
