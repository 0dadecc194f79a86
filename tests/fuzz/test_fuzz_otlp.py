"""The OTLP receiver under fuzzing: protobuf and JSON decoders, the GenAI mapping, and POST /v1/traces.

Properties: decoding and mapping raise only OtlpError; whatever maps is a valid record (it encodes
with the real codec); the receiver answers 4xx (never 5xx) to bad input and then submits nothing.
"""

from __future__ import annotations

import asyncio
import base64
import gzip
from typing import Any

import orjson
import pytest
from conftest import EncodingEmitter, mock_codec
from fuzz_strategies import FLOATS, INTS, JSON, TEXT, dumps, mutated
from hypothesis import example, given
from hypothesis import strategies as st

from rollstream.errors import OtlpError
from rollstream.producers.genai import MAX_ERRORS, decode_request, map_request
from rollstream.producers.otlp import OtlpReceiver, OtlpSettings
from rollstream.schemas.topics import Topics

pytestmark = pytest.mark.fuzz

TOPICS = Topics(prefix="fuzz.")
CODEC, _ = mock_codec(TOPICS)
TRACE = "5b8efff798038103d269b633813fc60c"
KEYS = [
    "gen_ai.operation.name", "rollstream.rollout_id", "agentlightning.rollout_id", "rollstream.attempt",
    "rollstream.sequence", "rollstream.policy", "rollstream.policy_version", "rollstream.call_id",
    "rollstream.prompt_token_ids", "rollstream.response_token_ids", "rollstream.response_logprobs",
    "rollstream.reward.value", "rollstream.reward.terminal", "rollstream.reward.name", "rollstream.reward.call_id",
    "rollstream.reward.source", "agentlightning.reward", "reward", "gen_ai.request.model", "gen_ai.response.model",
    "gen_ai.response.id", "gen_ai.usage.input_tokens", "gen_ai.usage.output_tokens", "gen_ai.request.temperature",
    "gen_ai.request.top_p", "gen_ai.request.max_tokens", "gen_ai.request.seed", "gen_ai.request.choice.count",
    "gen_ai.request.stop_sequences", "gen_ai.response.finish_reasons", "gen_ai.agent.name", "gen_ai.input.messages",
    "gen_ai.output.messages", "gen_ai.system_instructions", "gen_ai.prompt", "gen_ai.completion",
    "gen_ai.prompt.0.role", "gen_ai.prompt.0.content", "gen_ai.completion.0.content", "gen_ai.tool.definitions",
]
OPERATIONS = st.sampled_from(["chat", "text_completion", "generate_content", "embeddings"])


def any_value(depth: int = 2) -> st.SearchStrategy[dict[str, Any]]:
    """An AnyValue in the OTLP JSON mapping (64-bit integers as strings, as exporters write them)."""
    leaves = st.one_of(
        TEXT.map(lambda v: {"stringValue": v}),
        st.integers(-(2**63), 2**63 - 1).map(lambda v: {"intValue": str(v)}),
        st.sampled_from([2**31, -(2**31) - 1, 2**40, 2**63 - 1, -(2**63)]).map(lambda v: {"intValue": str(v)}),
        INTS.map(lambda v: {"intValue": v}),
        FLOATS.map(lambda v: {"doubleValue": v}),
        st.booleans().map(lambda v: {"boolValue": v}),
        st.binary(max_size=6).map(lambda v: {"bytesValue": base64.b64encode(v).decode()}),
        JSON.map(lambda v: {"stringValue": orjson.dumps(v).decode()} if _dumpable(v) else {"stringValue": "x"}),
        st.just({}),
    )
    if depth == 0:
        return leaves
    inner = any_value(depth - 1)
    arrays = st.lists(inner, max_size=3).map(lambda vs: {"arrayValue": {"values": vs}})
    kvlists = st.lists(st.fixed_dictionaries({"key": TEXT, "value": inner}), max_size=2).map(
        lambda kv: {"kvlistValue": {"values": kv}})
    return leaves | arrays | kvlists


def _dumpable(value: Any) -> bool:
    try:
        orjson.dumps(value)
    except TypeError:
        return False
    return True


ATTRIBUTES = st.lists(st.fixed_dictionaries({"key": st.sampled_from(KEYS) | TEXT, "value": any_value()}), max_size=8)
SPAN = st.fixed_dictionaries(
    {"traceId": st.just(TRACE) | st.text("0123456789abcdefxyz", max_size=34),
     "spanId": st.text("0123456789abcdef", min_size=16, max_size=16) | TEXT,
     "name": st.sampled_from(["chat", "rollstream.reward", "agentlightning.reward", "other"]) | TEXT,
     "attributes": st.lists(st.fixed_dictionaries({"key": st.just("gen_ai.operation.name"),
                                                    "value": OPERATIONS.map(lambda o: {"stringValue": o})}),
                            max_size=1).flatmap(lambda op: ATTRIBUTES.map(lambda rest: op + rest))},
    optional={"startTimeUnixNano": st.integers(0, 2**64 - 1).map(str) | INTS | TEXT,
              "endTimeUnixNano": st.integers(0, 2**64 - 1).map(str) | INTS,
              "events": st.lists(st.fixed_dictionaries({"name": st.sampled_from(["gen_ai.content.prompt",
                                                                                 "gen_ai.content.completion"]),
                                                        "attributes": ATTRIBUTES}), max_size=2),
              "parentSpanId": TEXT, "kind": INTS},
)
PAYLOAD = st.fixed_dictionaries({"resourceSpans": st.lists(st.fixed_dictionaries({
    "resource": st.fixed_dictionaries({"attributes": ATTRIBUTES}),
    "scopeSpans": st.lists(st.fixed_dictionaries({"spans": st.lists(SPAN, min_size=1, max_size=3)}), max_size=2),
}), max_size=2)})
VALID = {"resourceSpans": [{"resource": {"attributes": [
    {"key": "rollstream.rollout_id", "value": {"stringValue": "r-1"}}]}, "scopeSpans": [{"spans": [
        {"traceId": TRACE, "spanId": "000000000000000b", "name": "chat", "startTimeUnixNano": "1700000000000000000",
         "endTimeUnixNano": "1700000000250000000", "attributes": [
             {"key": "gen_ai.operation.name", "value": {"stringValue": "chat"}},
             {"key": "gen_ai.output.messages", "value": {"stringValue": '[{"role":"assistant","parts":[]}]'}},
             {"key": "rollstream.prompt_token_ids", "value": {"arrayValue": {"values": [{"intValue": "1"}]}}}]},
        {"traceId": TRACE, "spanId": "000000000000000c", "name": "rollstream.reward", "attributes": [
            {"key": "rollstream.reward.value", "value": {"doubleValue": 1.0}}]}]}]}]}
VALID_JSON = orjson.dumps(VALID)


def _with(extra: list[dict[str, Any]], resource: list[dict[str, Any]], name: str) -> dict[str, Any]:
    """The valid payload with attributes added to its LLM span (or its resource) and the reward span renamed."""
    payload = orjson.loads(VALID_JSON)
    spans = payload["resourceSpans"][0]["scopeSpans"][0]["spans"]
    spans[0]["attributes"] += extra
    spans[1]["attributes"] += extra
    spans[1]["name"] = name
    payload["resourceSpans"][0]["resource"]["attributes"] += resource
    return payload


# Valid spans with one or two known attributes of any type and value: reaches the mapping's every branch.
FEW = st.lists(st.fixed_dictionaries({"key": st.sampled_from(KEYS), "value": any_value(1)}), max_size=2)
TARGETED = st.builds(_with, FEW, FEW, st.sampled_from(["rollstream.reward", "agentlightning.reward"]))
VALID_PROTO = decode_request(VALID_JSON, "application/json").SerializeToString()


def _to_proto(payload: dict[str, Any]) -> bytes:
    try:
        return decode_request(orjson.dumps(payload), "application/json").SerializeToString()
    except (OtlpError, TypeError):
        return VALID_PROTO


def _encodes(records: list[dict[str, Any]], topic: str) -> None:
    for record in records:
        CODEC.encode(topic, record)


def _map(body: bytes, content_type: str) -> None:
    try:
        mapped = map_request(decode_request(body, content_type), "default")
    except OtlpError:
        return
    # Accepted: every event must be publishable, or the receiver would answer 200 and lose it.
    _encodes(mapped.calls, TOPICS.calls)
    _encodes(mapped.rewards, TOPICS.rewards)
    _encodes(mapped.rollouts, TOPICS.rollouts)
    # Each refused span is counted once and the first reasons named; every event has a usable Kafka key.
    assert mapped.rejected + mapped.held <= mapped.spans
    assert len(mapped.errors) == min(mapped.rejected, MAX_ERRORS) and all(mapped.errors)
    for event in (*mapped.calls, *mapped.rewards, *mapped.rollouts):
        assert event["rollout_id"] and "/" not in event["rollout_id"] and len(event["rollout_id"]) <= 256


@given(st.one_of(TARGETED.map(dumps), TARGETED.map(dumps), PAYLOAD.map(dumps), JSON.map(dumps), mutated(VALID_JSON),
                 st.binary(max_size=64)))
@example(dumps(_with([{"key": "rollstream.attempt", "value": {"stringValue": "²"}}], [], "rollstream.reward")))
def test_json_decoder_and_mapping(body: bytes) -> None:
    _map(body, "application/json")


@given(st.one_of(mutated(VALID_PROTO), st.binary(max_size=96),
                 PAYLOAD.map(_to_proto), TARGETED.map(_to_proto)))
def test_protobuf_decoder_and_mapping(body: bytes) -> None:
    _map(body, "application/x-protobuf")


def post(app: OtlpReceiver, body: bytes, headers: list[tuple[bytes, bytes]]) -> int:
    scope = {"type": "http", "method": "POST", "path": "/v1/traces", "headers": headers}
    sent: list[dict[str, Any]] = []

    async def receive() -> dict[str, Any]:
        return {"type": "http.request", "body": body, "more_body": False}

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    asyncio.run(app(scope, receive, send))
    return int(sent[0]["status"])


@given(
    body=st.one_of(PAYLOAD.map(dumps), TARGETED.map(dumps), TARGETED.map(_to_proto), mutated(VALID_JSON),
                   mutated(VALID_PROTO), st.binary(max_size=64),
                   st.just(VALID_JSON), st.just(VALID_PROTO)),
    content_type=st.sampled_from(["application/json", "application/x-protobuf", "application/protobuf",
                                  "text/plain", "", "application/json; charset=utf-8"]),
    encoding=st.sampled_from([None, "gzip", "deflate", "br", "identity"]),
    compress=st.booleans(),
)
def test_receiver_answers_bad_input_with_4xx_and_publishes_nothing(body: bytes, content_type: str,
                                                                   encoding: str | None, compress: bool) -> None:
    emitter = EncodingEmitter(TOPICS)
    app = OtlpReceiver(OtlpSettings(max_body=4096), emitter, TOPICS)  # type: ignore[arg-type]
    if compress and encoding == "gzip":
        body = gzip.compress(body)
    headers = [(b"content-type", content_type.encode())]
    if encoding:
        headers.append((b"content-encoding", encoding.encode()))
    status = post(app, body, headers)
    assert status < 500, status
    if status != 200:
        assert emitter.items == []
