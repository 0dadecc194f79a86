"""Response parsing shared by the gateway and the SDK's instrumented clients, under fuzzing.

``CallAssembler`` takes whatever a backend (or an ``openai`` client's parsed object) holds:
whole responses and stream chunks of any shape. It must never raise, and every LlmCall it
builds must encode, so that a captured call is never lost to a malformed answer.

Text with unpaired surrogates is left out: the gateway parses backend answers with orjson,
which refuses them, so they never reach the assembler there (see the fuzz report in the docs).
"""

from __future__ import annotations

import json
from typing import Any

import pytest
from conftest import mock_codec
from fuzz_strategies import BACKEND_BODY, CHAT_BODY, COMPLETION_BODY, JSON
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from rollstream.producers.capture import CallAssembler, CallContext, Endpoint, prepare_request, strip_chunk
from rollstream.schemas.topics import Topics

pytestmark = pytest.mark.fuzz

TOPICS = Topics(prefix="fuzz.")
CODEC, _ = mock_codec(TOPICS)
OBJECTS = BACKEND_BODY | st.dictionaries(st.text(max_size=4), JSON, max_size=3)


def _utf8(value: Any) -> bool:
    try:
        json.dumps(value, ensure_ascii=False).encode()
    except UnicodeEncodeError:
        return False
    return True


@settings(max_examples=150)
@given(endpoint=st.sampled_from(["CHAT_COMPLETIONS", "COMPLETIONS"]), request=CHAT_BODY | COMPLETION_BODY,
       whole=st.booleans(), bodies=st.lists(OBJECTS, max_size=4))
def test_any_response_becomes_encodable_calls(endpoint: Endpoint, request: dict[str, Any], whole: bool,
                                              bodies: list[dict[str, Any]]) -> None:
    assume(_utf8([request, bodies]))
    ctx = CallContext(rollout_id="r", attempt=1, agent_name=None, sequence=0, endpoint=endpoint,
                      request=dict(request), policy="", policy_version=0)
    wants = prepare_request(endpoint, dict(request))
    call = CallAssembler(ctx)
    for body in bodies:
        if whole:
            call.add_response(body)
        else:
            call.add_chunk(body)
            strip_chunk(body, wants)
    for event in call.events():
        CODEC.encode(TOPICS.calls, event)
