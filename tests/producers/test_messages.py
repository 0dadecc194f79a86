"""Anthropic Messages over chat completions: requests translated, answers and streams checked against the
``anthropic`` package's own models and its stream accumulator."""

from __future__ import annotations

from typing import Any

import orjson
import pytest
from anthropic.lib.streaming._messages import accumulate_event
from anthropic.types import Message, RawMessageStreamEvent
from pydantic import TypeAdapter
from test_responses import USAGE, chunk, sse_events

from rollstream.producers.http import HttpError, anthropic_error_body
from rollstream.producers.messages import MessagesCall, to_chat

EVENTS: TypeAdapter[Any] = TypeAdapter(RawMessageStreamEvent)
WEATHER = {"name": "weather", "description": "Weather in a city",
           "input_schema": {"type": "object", "properties": {"city": {"type": "string"}}}}
BASE = {"model": "claude-sonnet-4-5", "max_tokens": 64}


def stream(call: MessagesCall, chunks: list[dict[str, Any]]) -> tuple[list[dict[str, Any]], Any]:
    """The events ``chunks`` become, validated by the anthropic package, and the message it accumulates."""
    raw = call.stream_start() + b"".join(call.stream_chunk(c) for c in chunks) + call.stream_end()
    events, snapshot, json_bufs = [], None, {}
    for name, data in sse_events(raw):
        assert name == data["type"]
        events.append(data)
        if name != "ping":
            snapshot = accumulate_event(event=EVENTS.validate_python(data), current_snapshot=snapshot,
                                        json_bufs=json_bufs)
    return events, snapshot


def test_blocks_become_chat_messages_and_tools_chat_tools() -> None:
    chat = to_chat({
        **BASE, "system": [{"type": "text", "text": "Be brief.", "cache_control": {"type": "ephemeral"}}],
        "tools": [WEATHER], "tool_choice": {"type": "tool", "name": "weather", "disable_parallel_tool_use": True},
        "stop_sequences": ["\n\nHuman:"], "temperature": 0.3, "top_p": 0.8, "metadata": {"user_id": "u"},
        "messages": [
            {"role": "user", "content": "Weather in Paris and Rome?"},
            {"role": "assistant", "content": [
                {"type": "text", "text": "Checking."},
                {"type": "tool_use", "id": "toolu_1", "name": "weather", "input": {"city": "Paris"}},
                {"type": "tool_use", "id": "toolu_2", "name": "weather", "input": {"city": "Rome"}}]},
            {"role": "user", "content": [
                {"type": "tool_result", "tool_use_id": "toolu_1", "content": "sunny"},
                {"type": "tool_result", "tool_use_id": "toolu_2", "content": [{"type": "text", "text": "no data"}],
                 "is_error": True},
                {"type": "text", "text": "And tomorrow?", "cache_control": {"type": "ephemeral"}}]},
        ],
    })
    assert chat["messages"] == [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Weather in Paris and Rome?"},
        {"role": "assistant", "content": "Checking.", "tool_calls": [
            {"id": "toolu_1", "type": "function", "function": {"name": "weather", "arguments": '{"city": "Paris"}'}},
            {"id": "toolu_2", "type": "function", "function": {"name": "weather", "arguments": '{"city": "Rome"}'}}]},
        {"role": "tool", "tool_call_id": "toolu_1", "content": "sunny"},
        {"role": "tool", "tool_call_id": "toolu_2", "content": "Error: no data"},
        {"role": "user", "content": "And tomorrow?"},
    ]
    assert chat["tools"] == [{"type": "function", "function": {
        "name": "weather", "description": "Weather in a city", "parameters": WEATHER["input_schema"]}}]
    assert list(chat["tools"][0]["function"]) == ["name", "description", "parameters"]
    assert chat["tool_choice"] == {"type": "function", "function": {"name": "weather"}}
    assert chat["parallel_tool_calls"] is False
    assert (chat["model"], chat["max_tokens"], chat["stop"], chat["temperature"], chat["top_p"]) == (
        "claude-sonnet-4-5", 64, ["\n\nHuman:"], 0.3, 0.8)


@pytest.mark.parametrize(("choice", "expected"), [
    ({"type": "auto"}, "auto"), ({"type": "any"}, "required"), ({"type": "none"}, "none")])
def test_tool_choice(choice: dict[str, Any], expected: str) -> None:
    chat = to_chat({**BASE, "messages": [{"role": "user", "content": "hi"}], "tools": [WEATHER],
                    "tool_choice": choice, "stream": True})
    assert chat["tool_choice"] == expected and chat["stream"] is True and "parallel_tool_calls" not in chat


@pytest.mark.parametrize(("body", "param"), [
    ({"max_tokens": None}, "max_tokens"),
    ({"max_tokens": 0}, "max_tokens"),
    ({"model": None}, "model"),
    ({"messages": []}, "messages"),
    ({"messages": [{"role": "system", "content": "x"}]}, "messages.0"),
    ({"messages": [{"role": "user", "content": [
        {"type": "text", "text": "see"},
        {"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": "AA=="}}]}]},
     "messages.0.content.1"),
    ({"messages": [{"role": "user", "content": [{"type": "document", "source": {"type": "text", "data": "x",
                                                                                 "media_type": "text/plain"}}]}]},
     "messages.0.content.0"),
    ({"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": [
        {"type": "thinking", "thinking": "hmm", "signature": "s"}]}]}, "messages.1.content.0"),
    ({"messages": [{"role": "user", "content": [{"type": "tool_result", "tool_use_id": "t", "content": [
        {"type": "image", "source": {"type": "url", "url": "http://x/y.png"}}]}]}]}, "messages.0.content.0.content.0"),
    ({"thinking": {"type": "enabled", "budget_tokens": 1024}}, "thinking"),
    ({"tools": [{"type": "web_search_20250305", "name": "web_search"}]}, "tools.0"),
    ({"tools": [WEATHER, {"type": "bash_20250124", "name": "bash"}]}, "tools.1"),
    ({"tool_choice": {"type": "everything"}}, "tool_choice"),
    ({"system": [{"type": "image", "source": {}}]}, "system.0"),
    ({"mcp_servers": [{"type": "url", "url": "http://x", "name": "x"}]}, "mcp_servers"),
    ({"output_config": {"effort": "high"}}, "output_config"),
    ({"stop_sequences": "STOP"}, "stop_sequences"),
    ({"frobnicate": 1}, "frobnicate"),
])
def test_what_cannot_be_honoured_is_a_400_naming_the_field(body: dict[str, Any], param: str) -> None:
    with pytest.raises(HttpError) as info:
        to_chat({**BASE, "messages": [{"role": "user", "content": "hi"}], **body})
    assert info.value.status == 400 and info.value.param == param
    assert info.value.message.startswith(param + ": ")
    error = orjson.loads(anthropic_error_body(400, info.value.message))
    assert error == {"type": "error", "error": {"type": "invalid_request_error", "message": info.value.message}}


def test_thinking_disabled_and_a_json_output_format_are_accepted() -> None:
    chat = to_chat({**BASE, "messages": [{"role": "user", "content": "hi"}], "thinking": {"type": "disabled"},
                    "output_config": {"format": {"type": "json_schema", "schema": {"type": "object"}}}})
    assert chat["response_format"] == {"type": "json_schema", "json_schema": {"name": "output",
                                                                               "schema": {"type": "object"}}}


def test_a_whole_answer_is_a_message_the_anthropic_package_parses() -> None:
    call = MessagesCall({**BASE, "messages": [{"role": "user", "content": "hi"}]})
    message = Message.model_validate(call.answer({"choices": [{"index": 0, "finish_reason": "stop", "message": {
        "role": "assistant", "content": "Hello"}}], "usage": USAGE}))
    assert message.id.startswith("msg_") and message.model == "claude-sonnet-4-5" and message.role == "assistant"
    assert [(b.type, b.text) for b in message.content] == [("text", "Hello")]  # type: ignore[union-attr]
    assert (message.stop_reason, message.stop_sequence) == ("end_turn", None)
    assert (message.usage.input_tokens, message.usage.output_tokens) == (9, 3)
    cut = Message.model_validate(call.answer({"choices": [{"index": 0, "finish_reason": "length", "message": {
        "role": "assistant", "content": "It"}}]}))
    assert cut.stop_reason == "max_tokens"


def test_tool_calls_become_tool_use_blocks_and_a_matched_stop_sequence_is_named() -> None:
    call = MessagesCall({**BASE, "messages": [{"role": "user", "content": "weather?"}], "tools": [WEATHER],
                         "stop_sequences": ["END"]})
    message = Message.model_validate(call.answer({"choices": [{"index": 0, "finish_reason": "tool_calls", "message": {
        "role": "assistant", "content": "Checking.", "tool_calls": [
            {"id": "call_a", "type": "function", "function": {"name": "weather", "arguments": '{"city":"Paris"}'}},
            {"id": "call_b", "type": "function", "function": {"name": "weather", "arguments": "not json"}}]}}]}))
    assert message.stop_reason == "tool_use"
    assert [b.type for b in message.content] == ["text", "tool_use", "tool_use"]
    assert [(b.id, b.name, b.input) for b in message.content[1:]] == [  # type: ignore[union-attr]
        ("call_a", "weather", {"city": "Paris"}), ("call_b", "weather", {})]
    # vLLM names the stop string it hit in the choice's stop_reason
    stopped = Message.model_validate(call.answer({"choices": [{"index": 0, "finish_reason": "stop",
                                                               "stop_reason": "END", "message": {
                                                                   "role": "assistant", "content": "done"}}]}))
    assert (stopped.stop_reason, stopped.stop_sequence) == ("stop_sequence", "END")


def test_a_text_stream_is_the_messages_event_sequence() -> None:
    call = MessagesCall({**BASE, "messages": [{"role": "user", "content": "hi"}], "stream": True})
    events, message = stream(call, [
        chunk({"role": "assistant", "content": ""}, prompt_token_ids=[1, 2, 3]),
        chunk({"content": "Hel"}), chunk({"content": "lo"}), chunk({}, "stop"), chunk(usage=USAGE)])
    assert [e["type"] for e in events] == [
        "message_start", "ping", "content_block_start", "content_block_delta", "content_block_delta",
        "content_block_stop", "message_delta", "message_stop"]
    assert events[0]["message"]["usage"]["input_tokens"] == 3 and events[0]["message"]["content"] == []
    assert events[6]["delta"] == {"stop_reason": "end_turn", "stop_sequence": None}
    assert events[6]["usage"] == {"input_tokens": 9, "output_tokens": 3}
    assert [(b.type, b.text) for b in message.content] == [("text", "Hello")]
    assert (message.stop_reason, message.usage.output_tokens, message.usage.input_tokens) == ("end_turn", 3, 9)


def test_streamed_tool_call_deltas_become_tool_use_blocks_with_input_json_deltas() -> None:
    call = MessagesCall({**BASE, "messages": [{"role": "user", "content": "weather?"}], "tools": [WEATHER],
                         "stream": True})
    events, message = stream(call, [
        chunk({"role": "assistant", "content": "Checking."}),
        chunk({"tool_calls": [{"index": 0, "id": "call_a", "type": "function",
                               "function": {"name": "weather", "arguments": ""}}]}),
        chunk({"tool_calls": [{"index": 0, "function": {"arguments": '{"city":'}}]}),
        chunk({"tool_calls": [{"index": 0, "function": {"arguments": '"Paris"}'}}]}),
        chunk({"tool_calls": [{"index": 1, "id": "call_b", "type": "function",
                               "function": {"name": "weather", "arguments": '{"city":"Rome"}'}}]}),
        chunk({}, "tool_calls"), chunk(usage=USAGE)])
    assert [(e["type"], e.get("index")) for e in events] == [
        ("message_start", None), ("ping", None),
        ("content_block_start", 0), ("content_block_delta", 0), ("content_block_stop", 0),
        ("content_block_start", 1), ("content_block_delta", 1), ("content_block_delta", 1), ("content_block_stop", 1),
        ("content_block_start", 2), ("content_block_delta", 2), ("content_block_stop", 2),
        ("message_delta", None), ("message_stop", None)]
    assert events[5]["content_block"] == {"type": "tool_use", "id": "call_a", "name": "weather", "input": {}}
    assert [e["delta"]["partial_json"] for e in events if e.get("index") == 1 and e["type"] == "content_block_delta"
            ] == ['{"city":', '"Paris"}']
    assert [b.type for b in message.content] == ["text", "tool_use", "tool_use"]
    assert [b.input for b in message.content[1:]] == [{"city": "Paris"}, {"city": "Rome"}]
    assert message.stop_reason == "tool_use"


def test_a_stream_cut_by_the_length_says_max_tokens_and_a_broken_one_ends_with_an_error_event() -> None:
    call = MessagesCall({**BASE, "messages": [{"role": "user", "content": "hi"}], "stream": True})
    _, message = stream(call, [chunk({"content": "It"}), chunk({}, "length"), chunk(usage=USAGE)])
    assert message.stop_reason == "max_tokens"
    _, empty = stream(MessagesCall({**BASE, "messages": [{"role": "user", "content": "hi"}], "stream": True}), [])
    assert empty.content == [] and empty.stop_reason == "end_turn"
    broken = MessagesCall({**BASE, "messages": [{"role": "user", "content": "hi"}], "stream": True})
    raw = broken.stream_chunk(chunk({"content": "It"})) + broken.stream_failed("backend broke")
    name, data = sse_events(raw)[-1]
    assert name == "error" and data == {"type": "error", "error": {"type": "api_error", "message": "backend broke"}}
