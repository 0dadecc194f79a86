"""The Responses and Messages translations under fuzzing.

A request of any shape is translated or refused with a 400 that names a field, never anything else
(a 500); a backend answer of any shape, whole or as chunks, becomes the client's answer or events
without raising, and what comes out serializes.
"""

from __future__ import annotations

from typing import Any

import orjson
import pytest
from fuzz_strategies import BACKEND_BODY, JSON, TEXT, shaped
from hypothesis import assume, example, given, settings
from hypothesis import strategies as st

from rollstream.producers.http import HttpError
from rollstream.producers.messages import MessagesCall
from rollstream.producers.responses import ResponsesCall

pytestmark = pytest.mark.fuzz

PART = st.fixed_dictionaries({"type": st.sampled_from(["input_text", "output_text", "input_image", "text"]) | JSON},
                             optional={"text": TEXT | JSON})
ITEM = st.fixed_dictionaries({}, optional={
    "type": st.sampled_from(["message", "function_call", "function_call_output", "reasoning"]) | JSON,
    "role": st.sampled_from(["user", "system", "developer", "assistant"]) | JSON,
    "content": TEXT | st.lists(PART, max_size=3) | JSON, "call_id": TEXT | JSON, "name": TEXT | JSON,
    "arguments": TEXT | JSON, "output": TEXT | st.lists(PART, max_size=2) | JSON})
FUNCTION = st.fixed_dictionaries({"type": st.just("function") | JSON}, optional={
    "name": TEXT | JSON, "parameters": JSON, "strict": JSON, "description": JSON})
RESPONSES_BODY = shaped({
    "model": TEXT, "input": TEXT | st.lists(ITEM, max_size=4), "instructions": TEXT, "stream": st.booleans(),
    "tools": st.lists(FUNCTION, max_size=2), "max_output_tokens": st.integers(-1, 64),
    "tool_choice": st.sampled_from(["auto", "none", "required"]) | st.fixed_dictionaries(
        {"type": st.just("function"), "name": TEXT}),
    "text": st.fixed_dictionaries({"format": st.fixed_dictionaries({"type": st.sampled_from(
        ["text", "json_object", "json_schema"])}, optional={"schema": JSON, "name": TEXT})}),
    "reasoning": JSON, "include": st.lists(st.just("message.output_text.logprobs") | TEXT, max_size=2),
    "previous_response_id": TEXT, "temperature": JSON, "parallel_tool_calls": JSON,
})
BLOCK = st.fixed_dictionaries({"type": st.sampled_from(["text", "tool_use", "tool_result", "image", "thinking"])
                               | JSON}, optional={
    "text": TEXT | JSON, "id": TEXT | JSON, "name": TEXT | JSON, "input": JSON, "tool_use_id": TEXT | JSON,
    "content": TEXT | st.lists(st.fixed_dictionaries({"type": st.just("text"), "text": TEXT}), max_size=2) | JSON,
    "is_error": JSON, "cache_control": JSON})
TURN = st.fixed_dictionaries({"role": st.sampled_from(["user", "assistant"]) | JSON},
                             optional={"content": TEXT | st.lists(BLOCK, max_size=3) | JSON})
MESSAGES_BODY = shaped({
    "model": TEXT, "max_tokens": st.integers(-1, 64), "messages": st.lists(TURN, max_size=4),
    "system": TEXT | st.lists(st.fixed_dictionaries({"type": st.just("text"), "text": TEXT}), max_size=2),
    "tools": st.lists(st.fixed_dictionaries({"name": TEXT}, optional={"input_schema": JSON, "description": JSON,
                                                                      "type": JSON}), max_size=2),
    "tool_choice": st.fixed_dictionaries({"type": st.sampled_from(["auto", "any", "tool", "none"]) | JSON},
                                         optional={"name": TEXT, "disable_parallel_tool_use": JSON}),
    "stop_sequences": st.lists(TEXT, max_size=2) | JSON, "thinking": JSON, "output_config": JSON,
    "stream": st.booleans(), "temperature": JSON,
})
CALLS = st.sampled_from([ResponsesCall, MessagesCall])


def _utf8(value: Any) -> bool:
    """Text the gateway can have parsed: orjson refuses unpaired surrogates before any translation."""
    try:
        orjson.dumps(value, option=orjson.OPT_NON_STR_KEYS)
    except TypeError:
        return False
    return True


HELLO = {"model": "m", "max_tokens": 4, "messages": [{"role": "user", "content": "hi"}]}


@settings(max_examples=120)
@example(call_type=ResponsesCall, responses_body={"input": [{"role": ["user"], "content": "x"}]}, messages_body={},
         chat={}, chunks=[])  # an unhashable role was a TypeError (a 500)
@example(call_type=MessagesCall, responses_body={}, messages_body=HELLO,
         chat={"choices": [{"finish_reason": ["stop"], "message": {"content": "a"}}]},
         chunks=[{"choices": [{"delta": {}, "finish_reason": {"x": 1}}]}])  # so was an unhashable finish reason
@example(call_type=ResponsesCall, responses_body={"input": "hi"}, messages_body={},
         chat={"usage": {"prompt_tokens": "9", "completion_tokens": [1]}},
         chunks=[{"choices": [], "usage": {"prompt_tokens": "x"}}])  # and usage counts that are not integers
@example(call_type=MessagesCall, responses_body={}, messages_body=HELLO, chat={"usage": {"prompt_tokens": "9"}},
         chunks=[{"choices": [], "usage": {"prompt_tokens": "x", "completion_tokens": 1.5}}])
@given(call_type=CALLS, responses_body=RESPONSES_BODY, messages_body=MESSAGES_BODY, chat=BACKEND_BODY,
       chunks=st.lists(BACKEND_BODY | st.dictionaries(TEXT, JSON, max_size=2), max_size=5))
def test_any_request_is_translated_or_refused_naming_a_field_and_any_answer_translates(
    call_type: type[ResponsesCall] | type[MessagesCall], responses_body: dict[str, Any],
    messages_body: dict[str, Any], chat: dict[str, Any], chunks: list[dict[str, Any]],
) -> None:
    body = responses_body if call_type is ResponsesCall else messages_body
    assume(_utf8([body, chat, chunks]))
    try:
        call = call_type(body)
    except HttpError as exc:
        assert exc.status == 400 and exc.param is not None, exc.message
        return
    assert isinstance(call.chat["messages"], list) and call.chat["messages"]
    orjson.dumps(call.chat, option=orjson.OPT_NON_STR_KEYS)
    orjson.dumps(call.answer(chat), option=orjson.OPT_NON_STR_KEYS)
    events = call.stream_start() + b"".join(call.stream_chunk(c) for c in chunks) + call.stream_end()
    assert events.endswith(b"\n\n")
    call.stream_failed("broken")
