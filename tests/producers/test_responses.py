"""The Responses API over chat completions: requests translated, answers and streams checked against the
``openai`` package's own models and its stream accumulator."""

from __future__ import annotations

from typing import Any

import orjson
import pytest
from openai import omit
from openai.lib.streaming.responses._responses import ResponseStreamState
from openai.types.responses import Response, ResponseStreamEvent
from pydantic import TypeAdapter

from rollstream.producers.http import HttpError
from rollstream.producers.responses import ResponsesCall, to_chat

EVENTS: TypeAdapter[Any] = TypeAdapter(ResponseStreamEvent)
WEATHER = {"type": "function", "name": "weather", "description": "Weather in a city",
           "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}, "strict": True}
USAGE = {"prompt_tokens": 9, "completion_tokens": 3, "total_tokens": 12}


def sse_events(raw: bytes) -> list[tuple[str, dict[str, Any]]]:
    """(event line, data) of each server-sent event."""
    out = []
    for block in raw.decode().split("\n\n"):
        if not block.strip():
            continue
        lines = dict(line.split(": ", 1) for line in block.split("\n"))
        out.append((lines["event"], orjson.loads(lines["data"])))
    return out


def stream(call: ResponsesCall, chunks: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The events a stream of ``chunks`` becomes, each validated by the openai package and accumulated as its
    ``responses.stream()`` helper does."""
    raw = call.stream_start() + b"".join(call.stream_chunk(c) for c in chunks) + call.stream_end()
    events = []
    state: ResponseStreamState[Any] = ResponseStreamState(input_tools=omit, text_format=omit)
    for name, data in sse_events(raw):
        assert name == data["type"]
        state.handle_event(EVENTS.validate_python(data))
        events.append(data)
    assert [e["sequence_number"] for e in events] == list(range(len(events)))
    return events


def chunk(delta: dict[str, Any] | None = None, finish: str | None = None, **top: Any) -> dict[str, Any]:
    choices = [] if delta is None else [{"index": 0, "delta": delta, "finish_reason": finish, "logprobs": None}]
    return {"id": "c", "object": "chat.completion.chunk", "created": 0, "model": "tiny", "choices": choices, **top}


def test_input_items_become_chat_messages_and_function_tools_chat_tools() -> None:
    chat = to_chat({
        "model": "gpt-4o", "instructions": "Be brief.", "tools": [WEATHER], "parallel_tool_calls": False,
        "tool_choice": {"type": "function", "name": "weather"}, "max_output_tokens": 32, "temperature": 0.2,
        "top_p": 0.9, "text": {"format": {"type": "json_schema", "name": "answer", "schema": {"type": "object"},
                                          "strict": True}},
        "input": [
            {"role": "developer", "content": "Use tools."},
            {"type": "message", "role": "user", "content": [{"type": "input_text", "text": "Weather in "},
                                                            {"type": "input_text", "text": "Paris?"}]},
            {"type": "message", "role": "assistant", "content": [{"type": "output_text", "text": "Checking.",
                                                                  "annotations": []}], "id": "msg_1"},
            {"type": "function_call", "call_id": "call_1", "name": "weather", "arguments": '{"city":"Paris"}',
             "id": "fc_1", "status": "completed"},
            {"type": "function_call", "call_id": "call_2", "name": "weather", "arguments": '{"city":"Lyon"}'},
            {"type": "function_call_output", "call_id": "call_1", "output": "sunny"},
            {"type": "function_call_output", "call_id": "call_2", "output": [{"type": "input_text", "text": "rain"}]},
        ],
    })
    assert chat["messages"] == [
        {"role": "system", "content": "Be brief."},
        {"role": "system", "content": "Use tools."},
        {"role": "user", "content": "Weather in Paris?"},
        {"role": "assistant", "content": "Checking.", "tool_calls": [
            {"id": "call_1", "type": "function", "function": {"name": "weather", "arguments": '{"city":"Paris"}'}},
            {"id": "call_2", "type": "function", "function": {"name": "weather", "arguments": '{"city":"Lyon"}'}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": "sunny"},
        {"role": "tool", "tool_call_id": "call_2", "content": "rain"},
    ]
    assert chat["tools"] == [{"type": "function", "function": {
        "name": "weather", "description": "Weather in a city", "parameters": WEATHER["parameters"], "strict": True}}]
    assert chat["tool_choice"] == {"type": "function", "function": {"name": "weather"}}
    assert chat["response_format"] == {"type": "json_schema", "json_schema": {
        "name": "answer", "schema": {"type": "object"}, "strict": True}}
    assert (chat["model"], chat["max_tokens"], chat["temperature"], chat["top_p"], chat["parallel_tool_calls"]) == (
        "gpt-4o", 32, 0.2, 0.9, False)
    assert "stream" not in chat


def test_a_string_input_and_the_simple_settings() -> None:
    chat = to_chat({"model": "m", "input": "hi", "stream": True, "tool_choice": "required", "include": [],
                    "text": {"format": {"type": "json_object"}}, "store": False, "metadata": {"k": "v"}})
    assert chat == {"model": "m", "messages": [{"role": "user", "content": "hi"}], "tool_choice": "required",
                    "response_format": {"type": "json_object"}, "stream": True}
    assert "response_format" not in to_chat({"model": "m", "input": "hi", "text": {"format": {"type": "text"}}})
    # a function_call with no message before it is an assistant turn of its own
    chat = to_chat({"model": "m", "input": [
        {"role": "user", "content": "go"},
        {"type": "function_call", "call_id": "c1", "name": "f", "arguments": "{}"}]})
    assert chat["messages"][1] == {"role": "assistant", "content": None, "tool_calls": [
        {"id": "c1", "type": "function", "function": {"name": "f", "arguments": "{}"}}]}


@pytest.mark.parametrize(("body", "param"), [
    ({"previous_response_id": "resp_1"}, "previous_response_id"),
    ({"conversation": "conv_1"}, "conversation"),
    ({"background": True}, "background"),
    ({"prompt": {"id": "pmpt_1"}}, "prompt"),
    ({"tools": [{"type": "web_search"}]}, "tools[0].type"),
    ({"tools": [WEATHER, {"type": "file_search", "vector_store_ids": ["v"]}]}, "tools[1].type"),
    ({"input": [{"role": "user", "content": [{"type": "input_text", "text": "see"},
                                             {"type": "input_image", "image_url": "http://x/y.png"}]}]},
     "input[0].content[1]"),
    ({"input": [{"role": "user", "content": [{"type": "input_file", "file_id": "f"}]}]}, "input[0].content[0]"),
    ({"input": [{"type": "item_reference", "id": "msg_1"}]}, "input[0].type"),
    ({"input": [{"type": "reasoning", "id": "rs_1", "summary": []}]}, "input[0].type"),
    ({"input": [{"role": "critic", "content": "x"}]}, "input[0].role"),
    ({"input": []}, "input"),
    ({"reasoning": {"effort": "high"}}, "reasoning"),
    ({"tool_choice": {"type": "web_search_preview"}}, "tool_choice"),
    ({"text": {"format": {"type": "json_schema"}}}, "text.format"),
    ({"max_output_tokens": 0}, "max_output_tokens"),
    ({"instructions": ["x"]}, "instructions"),
    ({"frobnicate": 1}, "frobnicate"),
])
def test_what_cannot_be_honoured_is_a_400_naming_the_field(body: dict[str, Any], param: str) -> None:
    with pytest.raises(HttpError) as info:
        to_chat({"model": "m", "input": "hi", **body})
    assert info.value.status == 400 and info.value.param == param, info.value.message
    assert orjson.loads(info.value.body())["error"]["param"] == param


def test_a_whole_answer_is_a_response_the_openai_package_parses() -> None:
    call = ResponsesCall({"model": "gpt-4o", "input": "hi", "instructions": "Be brief.", "tools": [WEATHER],
                          "include": ["message.output_text.logprobs"]})
    lp = [{"token": "Hel", "logprob": -0.1, "bytes": [72, 101, 108], "top_logprobs": []},
          {"token": "lo", "logprob": -0.2, "bytes": [108, 111], "top_logprobs": []}]
    answer = call.answer({"id": "c", "object": "chat.completion", "model": "tiny", "usage": {
        **USAGE, "prompt_tokens_details": {"cached_tokens": 4}}, "choices": [{
            "index": 0, "finish_reason": "stop", "logprobs": {"content": lp},
            "message": {"role": "assistant", "content": "Hello"}}]})
    response = Response.model_validate(answer)
    assert response.id.startswith("resp_") and response.object == "response" and response.status == "completed"
    assert response.output_text == "Hello" and response.model == "gpt-4o" and response.instructions == "Be brief."
    assert response.output[0].type == "message" and response.output[0].id.startswith("msg_")
    assert [t.logprob for t in response.output[0].content[0].logprobs or []] == [-0.1, -0.2]  # type: ignore[union-attr]
    assert response.usage is not None and (response.usage.input_tokens, response.usage.output_tokens,
                                           response.usage.total_tokens) == (9, 3, 12)
    assert response.usage.input_tokens_details.cached_tokens == 4
    assert response.usage.output_tokens_details.reasoning_tokens == 0
    assert response.tools[0].name == "weather" and response.tool_choice == "auto"  # type: ignore[union-attr]
    assert response.parallel_tool_calls is True and response.incomplete_details is None


def test_tool_calls_become_function_call_items_and_a_length_stop_is_incomplete() -> None:
    call = ResponsesCall({"model": "m", "input": "weather?", "tools": [WEATHER]})
    message = {"role": "assistant", "content": None, "tool_calls": [
        {"id": "call_a", "type": "function", "function": {"name": "weather", "arguments": '{"city":"Paris"}'}},
        {"id": "call_b", "type": "function", "function": {"name": "weather", "arguments": '{"city":"Rome"}'}}]}
    response = Response.model_validate(call.answer({"choices": [
        {"index": 0, "finish_reason": "tool_calls", "message": message}], "usage": USAGE}))
    assert [(o.type, o.call_id, o.name, o.arguments, o.status) for o in response.output] == [  # type: ignore[union-attr]
        ("function_call", "call_a", "weather", '{"city":"Paris"}', "completed"),
        ("function_call", "call_b", "weather", '{"city":"Rome"}', "completed")]
    assert all(o.id.startswith("fc_") for o in response.output)  # type: ignore[union-attr]
    cut = Response.model_validate(call.answer({"choices": [
        {"index": 0, "finish_reason": "length", "message": {"role": "assistant", "content": "It is"}}]}))
    assert cut.status == "incomplete" and cut.incomplete_details is not None
    assert cut.incomplete_details.reason == "max_output_tokens" and cut.output_text == "It is"


def test_a_text_stream_is_the_responses_event_sequence() -> None:
    call = ResponsesCall({"model": "gpt-4o", "input": "hi", "stream": True})
    events = stream(call, [
        chunk({"role": "assistant", "content": ""}, prompt_token_ids=[1, 2]),
        chunk({"content": "Hel"}), chunk({"content": "lo"}), chunk({}, "stop"), chunk(usage=USAGE)])
    assert [e["type"] for e in events] == [
        "response.created", "response.in_progress", "response.output_item.added", "response.content_part.added",
        "response.output_text.delta", "response.output_text.delta", "response.output_text.done",
        "response.content_part.done", "response.output_item.done", "response.completed"]
    assert events[0]["response"]["status"] == "in_progress" and events[0]["response"]["output"] == []
    assert [e["delta"] for e in events if e["type"] == "response.output_text.delta"] == ["Hel", "lo"]
    assert events[6]["text"] == "Hello"
    final = Response.model_validate(events[-1]["response"])
    assert final.output_text == "Hello" and final.status == "completed" and final.id == events[0]["response"]["id"]
    assert final.usage is not None and final.usage.output_tokens == 3


def test_streamed_tool_call_deltas_become_function_call_items() -> None:
    call = ResponsesCall({"model": "m", "input": "weather?", "tools": [WEATHER], "stream": True})
    events = stream(call, [
        chunk({"role": "assistant", "content": "Let me check."}),
        chunk({"tool_calls": [{"index": 0, "id": "call_a", "type": "function",
                               "function": {"name": "weather", "arguments": ""}}]}),
        chunk({"tool_calls": [{"index": 0, "function": {"arguments": '{"city":'}}]}),
        chunk({"tool_calls": [{"index": 0, "function": {"arguments": '"Paris"}'}}]}),
        chunk({"tool_calls": [{"index": 1, "id": "call_b", "type": "function",
                               "function": {"name": "weather", "arguments": '{"city":"Rome"}'}}]}),
        chunk({}, "tool_calls"), chunk(usage=USAGE)])
    kinds = [e["type"] for e in events]
    assert kinds == [
        "response.created", "response.in_progress",
        "response.output_item.added", "response.content_part.added", "response.output_text.delta",
        "response.output_text.done", "response.content_part.done", "response.output_item.done",
        "response.output_item.added", "response.function_call_arguments.delta",
        "response.function_call_arguments.delta", "response.function_call_arguments.done", "response.output_item.done",
        "response.output_item.added", "response.function_call_arguments.delta",
        "response.function_call_arguments.done", "response.output_item.done", "response.completed"]
    added = [e for e in events if e["type"] == "response.output_item.added"]
    assert [(e["output_index"], e["item"]["type"]) for e in added] == [(0, "message"), (1, "function_call"),
                                                                       (2, "function_call")]
    done = [e for e in events if e["type"] == "response.function_call_arguments.done"]
    assert [(e["name"], e["arguments"], e["output_index"]) for e in done] == [
        ("weather", '{"city":"Paris"}', 1), ("weather", '{"city":"Rome"}', 2)]
    final = Response.model_validate(events[-1]["response"])
    assert [o.type for o in final.output] == ["message", "function_call", "function_call"]
    assert [(o.call_id, o.arguments) for o in final.output[1:]] == [  # type: ignore[union-attr]
        ("call_a", '{"city":"Paris"}'), ("call_b", '{"city":"Rome"}')]
    assert final.output[1].id == added[1]["item"]["id"]  # type: ignore[union-attr]


def test_a_stream_cut_by_the_length_ends_incomplete_and_an_empty_one_still_has_a_message() -> None:
    events = stream(ResponsesCall({"model": "m", "input": "hi", "stream": True}),
                    [chunk({"content": "It is"}), chunk({}, "length"), chunk(usage=USAGE)])
    assert events[-1]["type"] == "response.incomplete"
    final = Response.model_validate(events[-1]["response"])
    assert final.status == "incomplete" and final.incomplete_details.reason == "max_output_tokens"  # type: ignore
    assert final.output[0].status == "incomplete"  # type: ignore[union-attr]
    events = stream(ResponsesCall({"model": "m", "input": "hi", "stream": True}), [chunk({}, "stop")])
    final = Response.model_validate(events[-1]["response"])
    assert [o.type for o in final.output] == ["message"] and final.output_text == "" and final.usage is None


def test_a_broken_stream_ends_with_response_failed() -> None:
    call = ResponsesCall({"model": "m", "input": "hi", "stream": True})
    raw = call.stream_start() + call.stream_chunk(chunk({"content": "It"})) + call.stream_failed("backend broke")
    events = [EVENTS.validate_python(data) for _, data in sse_events(raw)]
    assert events[-1].type == "response.failed" and events[-1].response.error.message == "backend broke"
