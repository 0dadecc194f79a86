"""OTLP payloads to events without Kafka: decoding, the GenAI mapping, and the receiver's answers."""

from __future__ import annotations

import asyncio
import gzip
from typing import Any

import orjson
import pytest
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest
from rollstream.producers.genai import decode_request, map_request
from rollstream.producers.otlp import OtlpReceiver, OtlpSettings
from rollstream.schemas import parsed_schema
from rollstream.schemas.topics import Topics

from rollstream.errors import OtlpError, QueueFullError

TRACE = "5b8efff798038103d269b633813fc60c"


def _attr(key: str, value: Any) -> dict[str, Any]:
    if isinstance(value, bool):
        v: dict[str, Any] = {"boolValue": value}
    elif isinstance(value, int):
        v = {"intValue": str(value)}
    elif isinstance(value, float):
        v = {"doubleValue": value}
    elif isinstance(value, list):
        v = {"arrayValue": {"values": [_attr("x", x)["value"] for x in value]}}
    else:
        v = {"stringValue": value}
    return {"key": key, "value": v}


def span(span_id: str, name: str, attrs: dict[str, Any], start: int = 1_700_000_000_000_000_000) -> dict[str, Any]:
    return {"traceId": TRACE, "spanId": span_id, "name": name, "kind": 3,
            "startTimeUnixNano": str(start), "endTimeUnixNano": str(start + 250_000_000),
            "attributes": [_attr(k, v) for k, v in attrs.items()]}


def payload(*spans: dict[str, Any], resource: dict[str, Any] | None = None) -> dict[str, Any]:
    return {"resourceSpans": [{
        "resource": {"attributes": [_attr(k, v) for k, v in (resource or {}).items()]},
        "scopeSpans": [{"scope": {"name": "test"}, "spans": list(spans)}]}]}


CHAT = {
    "gen_ai.operation.name": "chat", "gen_ai.request.model": "tiny", "gen_ai.response.id": "resp-1",
    "gen_ai.usage.input_tokens": 12, "gen_ai.usage.output_tokens": 3, "gen_ai.request.temperature": 0.7,
    "gen_ai.response.finish_reasons": ["stop"], "gen_ai.agent.name": "planner",
    "gen_ai.input.messages": orjson.dumps([{"role": "user", "parts": [{"type": "text", "content": "hi"}]}]).decode(),
    "gen_ai.output.messages": orjson.dumps([{"role": "assistant", "finish_reason": "stop", "parts": [
        {"type": "text", "content": "hello"},
        {"type": "tool_call", "id": "t1", "name": "search", "arguments": {"q": "x"}}]}]).decode(),
    "gen_ai.system_instructions": orjson.dumps([{"type": "text", "content": "be brief"}]).decode(),
    "rollstream.prompt_token_ids": [1, 2, 3], "rollstream.response_token_ids": [7, 8],
    "rollstream.response_logprobs": [-0.5, -1.0],
}


def _map(body: dict[str, Any]) -> Any:
    return map_request(decode_request(orjson.dumps(body), "application/json"), "fallback")


def test_a_genai_chat_span_becomes_an_llm_call_with_token_ids() -> None:
    mapped = _map(payload(span("0000000000000001", "chat tiny", CHAT), resource={"rollstream.rollout_id": "r1"}))
    (call,) = mapped.calls
    assert (call["rollout_id"], call["call_id"], call["source"], call["agent_name"]) == ("r1", "resp-1", "otlp",
                                                                                      "planner")
    assert [(m["role"], m["content"]) for m in call["messages"]] == [("system", "be brief"), ("user", "hi")]
    assert call["response_text"] == "hello" and orjson.loads(call["response_tool_calls_json"])[0]["id"] == "t1"
    assert (call["prompt_token_ids"], call["response_token_ids"], call["response_logprobs"]) == (
        [1, 2, 3], [7, 8], [-0.5, -1.0])
    assert (call["prompt_tokens"], call["completion_tokens"], call["finish_reason"]) == (12, 3, "stop")
    assert call["policy"] == "tiny" and call["latency_ms"] == pytest.approx(250.0)
    assert call["event_id"] == f"{TRACE}-0000000000000001"
    import fastavro

    fastavro.validate(call, parsed_schema("LlmCall"), raise_errors=True)


def test_legacy_attributes_events_and_absent_token_ids() -> None:
    legacy = {"gen_ai.operation.name": "text_completion", "agentlightning.rollout_id": "r2",
              "gen_ai.prompt.0.role": "user", "gen_ai.prompt.0.content": "2+2=",
              "gen_ai.completion.0.content": "4", "gen_ai.completion.0.finish_reason": "length"}
    event_span = span("0000000000000003", "chat", {"gen_ai.operation.name": "chat", "rollstream.rollout_id": "r2"})
    event_span["events"] = [
        {"name": "gen_ai.content.prompt", "attributes": [_attr("gen_ai.prompt", "plain question")]},
        {"name": "gen_ai.content.completion", "attributes": [_attr("gen_ai.completion", "plain answer")]}]
    mapped = _map(payload(span("0000000000000002", "completion", legacy), event_span))
    first, second = mapped.calls
    assert (first["endpoint"], first["prompt"], first["response_text"], first["finish_reason"]) == (
        "COMPLETIONS", "2+2=", "4", "length")
    assert first["prompt_token_ids"] is None and first["response_token_ids"] is None  # never re-tokenized
    assert second["messages"][0]["content"] == "plain question" and second["response_text"] == "plain answer"


def test_reward_spans_other_spans_and_spans_without_rollout() -> None:
    mapped = _map(payload(
        span("0000000000000004", "rollstream.reward", {"rollstream.reward.value": 1.5, "rollstream.reward.terminal":
                                                       True, "rollstream.reward.call_id": "resp-1"}),
        span("0000000000000005", "GET /search", {"http.method": "GET"}),
        span("0000000000000006", "chat", {"gen_ai.operation.name": "chat"}, ),
        resource={"rollstream.rollout_id": "r3"},
    ))
    (reward,) = mapped.rewards
    assert (reward["rollout_id"], reward["value"], reward["terminal"], reward["call_id"]) == ("r3", 1.5, True,
                                                                                            "resp-1")
    assert mapped.ignored == 1 and len(mapped.calls) == 1
    no_rollout = _map(payload(span("0000000000000007", "chat", {"gen_ai.operation.name": "chat"})))
    assert no_rollout.unattributed == 1 and not no_rollout.calls


@pytest.mark.parametrize(("body", "content_type", "reason"), [
    (b"{not json", "application/json", "not valid JSON"),
    (b"\xff\xff\xff", "application/x-protobuf", "not a protobuf"),
    (orjson.dumps(payload({**span("01", "x", {})})), "application/json", "hex digits"),
    (orjson.dumps(payload(span("0000000000000008", "rollstream.reward", {"rollstream.rollout_id": "r"}))),
     "application/json", "numeric value"),
    (orjson.dumps(payload(span("0000000000000009", "chat", {**CHAT, "rollstream.rollout_id": "r",
                                                            "rollstream.response_token_ids": ["a"]}))),
     "application/json", "array of integers"),
    (b"{}", "text/plain", "unsupported content type"),
])
def test_malformed_payloads_are_refused_with_the_reason(body: bytes, content_type: str, reason: str) -> None:
    with pytest.raises(OtlpError, match=reason):
        map_request(decode_request(body, content_type), "p")


def test_protobuf_and_json_decode_to_the_same_request() -> None:
    body = payload(span("000000000000000a", "chat", CHAT), resource={"rollstream.rollout_id": "r"})
    from_json = decode_request(orjson.dumps(body), "application/json")
    from_proto = decode_request(from_json.SerializeToString(), "application/x-protobuf")
    assert isinstance(from_proto, ExportTraceServiceRequest) and from_proto == from_json


class RecordingEmitter:
    def __init__(self, full: bool = False) -> None:
        self.items: list[Any] = []
        self.full = full
        self.delivered = self.failed = 0

    def submit_many(self, items: list[Any]) -> int:
        if self.full:
            raise QueueFullError("full")
        self.items.extend(items)
        return len(self.items)

    def pending(self) -> int:
        return 0


def _post(app: OtlpReceiver, body: bytes, content_type: str, encoding: str | None = None) -> tuple[int, bytes]:
    headers = [(b"content-type", content_type.encode())]
    if encoding:
        headers.append((b"content-encoding", encoding.encode()))
    scope = {"type": "http", "method": "POST", "path": "/v1/traces", "headers": headers}
    sent: list[dict[str, Any]] = []

    async def receive() -> dict[str, Any]:
        return {"type": "http.request", "body": body, "more_body": False}

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    asyncio.run(app(scope, receive, send))
    return sent[0]["status"], sent[1]["body"]


def test_the_receiver_publishes_all_or_nothing_and_answers_in_otlp_terms() -> None:
    emitter = RecordingEmitter()
    topics = Topics(prefix="unit.")
    app = OtlpReceiver(OtlpSettings(), emitter, topics)  # type: ignore[arg-type]
    good = span("000000000000000b", "chat", CHAT)
    bad = span("000000000000000c", "rollstream.reward", {"rollstream.reward.value": "high"})
    status, body = _post(app, orjson.dumps(payload(good, bad, resource={"rollstream.rollout_id": "r"})),
                         "application/json")
    assert status == 400 and b"must be a number" in body and emitter.items == []
    status, body = _post(app, gzip.compress(orjson.dumps(payload(good, resource={"rollstream.rollout_id": "r"}))),
                         "application/json", "gzip")
    assert (status, body) == (200, b"{}")
    assert [(t, k, r["sequence"]) for t, k, r in emitter.items] == [(topics.calls, "r", 0)]
    request = decode_request(orjson.dumps(payload(good, resource={"rollstream.rollout_id": "r"})), "application/json")
    status, body = _post(app, request.SerializeToString(), "application/x-protobuf")
    assert status == 200 and emitter.items[-1][2]["sequence"] == 1
    status, body = _post(app, b"\x0a\xff", "application/x-protobuf")
    assert status == 400 and body.startswith(b"\x08\x03")  # google.rpc.Status, code INVALID_ARGUMENT
    app.emitter = RecordingEmitter(full=True)  # type: ignore[assignment]
    status, _ = _post(app, request.SerializeToString(), "application/x-protobuf")
    assert status == 503
