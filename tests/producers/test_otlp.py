"""OTLP payloads to events without Kafka: decoding, the GenAI mapping, and the receiver's answers."""

from __future__ import annotations

import asyncio
import gzip
from typing import Any

import fastavro
import orjson
import pytest
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
    ExportTraceServiceRequest,
    ExportTraceServiceResponse,
)
from prometheus_client import generate_latest

from rollstream.errors import OtlpError, QueueFullError
from rollstream.producers.genai import TraceCache, decode_request, map_request
from rollstream.producers.otlp import OtlpReceiver, OtlpSettings
from rollstream.schemas import parsed_schema
from rollstream.schemas.topics import Topics

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


def test_a_reward_of_no_call_is_the_rollouts_final_one_unless_it_says_otherwise() -> None:
    mapped = _map(payload(
        span("0000000000000008", "rollstream.reward", {"rollstream.reward.value": 1.0}),
        span("0000000000000009", "rollstream.reward",
             {"rollstream.reward.value": 0.2, "rollstream.reward.call_id": "c"}),
        span("000000000000000a", "rollstream.reward",
             {"rollstream.reward.value": 0.5, "rollstream.reward.terminal": False}),
        resource={"rollstream.rollout_id": "r4"},
    ))
    assert [(r["value"], r["call_id"], r["terminal"]) for r in mapped.rewards] == [
        (1.0, None, True), (0.2, "c", False), (0.5, None, False)]


@pytest.mark.parametrize(("body", "content_type", "reason"), [
    (b"{not json", "application/json", "not valid JSON"),
    (b"\xff\xff\xff", "application/x-protobuf", "not a protobuf"),
    (orjson.dumps(payload({**span("01", "x", {})})), "application/json", "hex digits"),
    (b"{}", "text/plain", "unsupported content type"),
])
def test_undecodable_payloads_are_refused_with_the_reason(body: bytes, content_type: str, reason: str) -> None:
    with pytest.raises(OtlpError, match=reason):
        map_request(decode_request(body, content_type), "p")


@pytest.mark.parametrize(("bad", "reason"), [
    (span("0000000000000008", "rollstream.reward", {"rollstream.rollout_id": "r"}), "numeric value"),
    (span("0000000000000009", "chat", {**CHAT, "rollstream.rollout_id": "r", "rollstream.response_token_ids": ["a"]}),
     "array of integers"),
    (span("000000000000000d", "rollstream.reward", {"rollstream.reward.value": 1.0}), "rollout id"),
])
def test_a_malformed_span_is_refused_alone(bad: dict[str, Any], reason: str) -> None:
    good = span("0000000000000010", "chat", {**CHAT, "rollstream.rollout_id": "good"})
    mapped = _map(payload(good, bad))
    assert mapped.rejected == 1 and reason in mapped.errors[0] and "spans[1]" in mapped.errors[0]
    assert [c["rollout_id"] for c in mapped.calls] == ["good"]


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


def _post(app: OtlpReceiver, body: bytes, content_type: str = "application/json", encoding: str | None = None,
          path: str = "/v1/traces") -> tuple[int, bytes]:
    headers = [(b"content-type", content_type.encode())]
    if encoding:
        headers.append((b"content-encoding", encoding.encode()))
    scope = {"type": "http", "method": "POST", "path": path, "headers": headers}
    sent: list[dict[str, Any]] = []

    async def receive() -> dict[str, Any]:
        return {"type": "http.request", "body": body, "more_body": False}

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    asyncio.run(app(scope, receive, send))
    return sent[0]["status"], sent[1]["body"]


def test_the_receiver_answers_partial_success_and_otlp_errors() -> None:
    emitter = RecordingEmitter()
    topics = Topics(prefix="unit.")
    app = OtlpReceiver(OtlpSettings(), emitter, topics)  # type: ignore[arg-type]
    good = span("000000000000000b", "chat", CHAT)
    bad = span("000000000000000c", "rollstream.reward", {"rollstream.reward.value": "high"})
    status, body = _post(app, orjson.dumps(payload(good, bad, resource={"rollstream.rollout_id": "r"})),
                         "application/json")
    partial = orjson.loads(body)["partialSuccess"]
    assert status == 200 and partial["rejectedSpans"] == "1" and "must be a number" in partial["errorMessage"]
    assert [(t, k, r["sequence"]) for t, k, r in emitter.items] == [(topics.calls, "r", 0)]
    proto = decode_request(orjson.dumps(payload(good, bad, resource={"rollstream.rollout_id": "r"})),
                           "application/json")
    status, body = _post(app, proto.SerializeToString(), "application/x-protobuf")
    answer = ExportTraceServiceResponse.FromString(body)
    assert status == 200 and answer.partial_success.rejected_spans == 1
    assert "spans[1] ('rollstream.reward')" in answer.partial_success.error_message
    emitter.items.clear()
    app.tracker = type(app.tracker)()
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


def _spans(*spans: dict[str, Any], resource: dict[str, Any] | None = None) -> ExportTraceServiceRequest:
    return decode_request(orjson.dumps(payload(*spans, resource=resource)), "application/json")


def child(span_id: str, parent: str, name: str, attrs: dict[str, Any], **kw: Any) -> dict[str, Any]:
    return {**span(span_id, name, attrs, **kw), "parentSpanId": parent}


def test_attribution_comes_from_ancestors_in_earlier_requests_and_the_root_span_ends_the_rollout() -> None:
    cache = TraceCache()
    root = span("00000000000000a0", "rollout", {"rollstream.rollout_id": "ra", "rollstream.group_id": "g7",
                                                 "rollstream.task_id": "task-3"})
    agent = child("00000000000000a1", "00000000000000a0", "invoke_agent", {"gen_ai.agent.name": "solver"})
    llm = child("00000000000000a2", "00000000000000a1", "chat tiny", {k: v for k, v in CHAT.items()
                                                                      if k != "gen_ai.agent.name"})
    reward = child("00000000000000a3", "00000000000000a0", "rollstream.reward", {"rollstream.reward.value": 1.0})
    # A batch exporter sends the root and the agent span first here, the LLM span later: both orders work.
    first = map_request(_spans(root, agent), "p", cache)
    assert first.calls == [] and first.unattributed == 0
    (end,) = first.rollouts
    assert (end["rollout_id"], end["status"], end["group_id"], end["task_id"]) == ("ra", "SUCCEEDED", "g7", "task-3")
    second = map_request(_spans(llm, reward), "p", cache)
    (call,) = second.calls
    assert (call["rollout_id"], call["agent_name"]) == ("ra", "solver")
    assert second.rewards[0]["rollout_id"] == "ra" and second.rollouts == []
    alone = map_request(_spans(llm), "p")  # without what the earlier request said, the call waits for it
    assert alone.held == 1 and alone.calls == []


def test_a_failed_root_span_fails_its_rollout_and_finish_false_keeps_it_open() -> None:
    failed = {**span("00000000000000b0", "rollout", {"rollstream.rollout_id": "rb"}),
              "status": {"code": 2, "message": "tool crashed"}}
    (end,) = _map(payload(failed)).rollouts
    assert (end["status"], end["error"]) == ("FAILED", "tool crashed")
    fastavro.validate(end, parsed_schema("RolloutEvent"), raise_errors=True)
    kept = span("00000000000000b1", "turn", {"rollstream.rollout_id": "rb", "rollstream.rollout.finish": False})
    assert _map(payload(kept)).rollouts == []


def test_agent_lightning_annotations_become_rewards() -> None:
    annotation = span("00000000000000c0", "agentlightning.annotation", {
        "agentlightning.reward.0.name": "primary", "agentlightning.reward.0.value": 0.75,
        "agentlightning.reward.1.name": "format", "agentlightning.reward.1.value": 1.0})
    mapped = _map(payload(annotation, resource={"agentlightning.rollout_id": "ro-1"}))
    assert [(r["name"], r["value"], r["terminal"], r["rollout_id"]) for r in mapped.rewards] == [
        ("primary", 0.75, True, "ro-1"), ("format", 1.0, True, "ro-1")]
    assert len({r["event_id"] for r in mapped.rewards}) == 2


def test_openllmetry_spans_without_an_operation_name() -> None:
    # OpenLLMetry <= 0.54 (and AgentOps): llm.request.type, flattened prompts with tool calls, functions.
    attrs = {
        "llm.request.type": "chat", "gen_ai.system": "openai", "gen_ai.request.model": "tiny",
        "gen_ai.response.id": "chatcmpl-9", "llm.usage.total_tokens": 20,
        "gen_ai.usage.prompt_tokens": 15, "gen_ai.usage.completion_tokens": 5,
        "gen_ai.prompt.0.role": "user", "gen_ai.prompt.0.content": "What is 3 plus 5?",
        "gen_ai.prompt.1.role": "assistant",
        "gen_ai.prompt.1.tool_calls.0.id": "call_1", "gen_ai.prompt.1.tool_calls.0.name": "calculator",
        "gen_ai.prompt.1.tool_calls.0.arguments": '{"expression": "3 + 5"}',
        "gen_ai.prompt.2.role": "tool", "gen_ai.prompt.2.content": "8", "gen_ai.prompt.2.tool_call_id": "call_1",
        "gen_ai.completion.0.role": "assistant", "gen_ai.completion.0.content": "Answer: 8",
        "gen_ai.completion.0.finish_reason": "stop",
        "llm.request.functions.0.name": "calculator", "llm.request.functions.0.description": "evaluates",
        "llm.request.functions.0.parameters": '{"type": "object", "properties": {"expression": {"type": "string"}}}',
        "rollstream.rollout_id": "rl",
    }
    (call,) = _map(payload(span("00000000000000d0", "openai.chat", attrs))).calls
    assert call["endpoint"] == "CHAT_COMPLETIONS" and call["metadata"]["response_id"] == "chatcmpl-9"
    assert [m["role"] for m in call["messages"]] == ["user", "assistant", "tool"]
    (tool_call,) = orjson.loads(call["messages"][1]["tool_calls_json"])
    assert tool_call == {"id": "call_1", "type": "function",
                         "function": {"name": "calculator", "arguments": '{"expression": "3 + 5"}'}}
    assert call["messages"][2]["tool_call_id"] == "call_1"
    assert (call["response_text"], call["finish_reason"], call["prompt_tokens"]) == ("Answer: 8", "stop", 15)
    assert orjson.loads(call["tools_json"])[0]["function"]["parameters"]["properties"] == {
        "expression": {"type": "string"}}


def test_openinference_llm_spans() -> None:
    request = {"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "tools": [
        {"type": "function", "function": {"name": "calculator", "parameters": {"type": "object"}}}]}
    response = {"id": "chatcmpl-oi", "choices": [{"index": 0, "finish_reason": "tool_calls", "message": {
        "role": "assistant", "content": None,
        "tool_calls": [{"id": "c1", "type": "function", "function": {"name": "calculator",
                                                                     "arguments": '{"expression": "1+1"}'}}]}}]}
    attrs = {
        "openinference.span.kind": "LLM", "llm.model_name": "tiny", "llm.provider": "openai",
        "input.value": orjson.dumps(request).decode(), "input.mime_type": "application/json",
        "output.value": orjson.dumps(response).decode(), "output.mime_type": "application/json",
        "llm.input_messages.0.message.role": "user", "llm.input_messages.0.message.content": "hi",
        "llm.output_messages.0.message.role": "assistant",
        "llm.output_messages.0.message.tool_calls.0.tool_call.id": "c1",
        "llm.output_messages.0.message.tool_calls.0.tool_call.function.name": "calculator",
        "llm.output_messages.0.message.tool_calls.0.tool_call.function.arguments": '{"expression": "1+1"}',
        "llm.tools.0.tool.json_schema": orjson.dumps(request["tools"][0]).decode(),
        "llm.token_count.prompt": 9, "llm.token_count.completion": 4,
    }
    (call,) = _map(payload(span("00000000000000e0", "ChatCompletion", attrs),
                           resource={"rollstream.rollout_id": "ri"})).calls
    assert (call["call_id"], call["model"], call["prompt_tokens"], call["completion_tokens"]) == (
        "chatcmpl-oi", "tiny", 9, 4)
    assert [(m["role"], m["content"]) for m in call["messages"]] == [("user", "hi")]
    assert orjson.loads(call["response_tool_calls_json"])[0]["function"]["name"] == "calculator"
    assert orjson.loads(call["tools_json"])[0]["function"]["name"] == "calculator"
    # With only the raw JSON (no flattened messages) the same content is read from input/output.value.
    raw_only = {k: v for k, v in attrs.items() if not k.startswith(("llm.input_messages", "llm.output_messages"))}
    (same,) = _map(payload(span("00000000000000e1", "ChatCompletion", raw_only),
                           resource={"rollstream.rollout_id": "ri"})).calls
    assert same["messages"][0]["content"] == "hi" and same["finish_reason"] == "tool_calls"
    assert orjson.loads(same["response_tool_calls_json"]) == response["choices"][0]["message"]["tool_calls"]


def _logs(*records: dict[str, Any]) -> bytes:
    return orjson.dumps({"resourceLogs": [{"resource": {}, "scopeLogs": [{"scope": {"name": "t"},
                                                                          "logRecords": list(records)}]}]})


def _body(value: Any) -> dict[str, Any]:
    return _attr("x", value)["value"] if not isinstance(value, dict) else {"kvlistValue": {"values": [
        {"key": k, "value": _body(v)} for k, v in value.items()]}}


def test_content_sent_as_log_events_joins_its_span() -> None:
    emitter = RecordingEmitter()
    topics = Topics(prefix="unit.")
    app = OtlpReceiver(OtlpSettings(), emitter, topics)  # type: ignore[arg-type]
    ids = {"traceId": TRACE, "spanId": "00000000000000f0"}
    records = [
        {**ids, "eventName": "gen_ai.user.message", "body": _body({"content": "What is 2 plus 2?"})},
        {**ids, "attributes": [_attr("event.name", "gen_ai.choice")], "body": _body(
            {"index": 0, "finish_reason": "stop", "message": {"content": "Answer: 4"}})},
        {"traceId": TRACE, "spanId": "00000000000000ff", "eventName": "http.request"},
    ]
    assert _post(app, _logs(*records), path="/v1/logs")[0] == 200
    llm = span("00000000000000f0", "chat tiny", {"gen_ai.operation.name": "chat", "rollstream.rollout_id": "rl"})
    status, _ = _post(app, orjson.dumps(payload(llm)), path="/v1/traces")
    (call,) = [r for _, _, r in emitter.items]
    assert status == 200 and call["messages"][0]["content"] == "What is 2 plus 2?"
    assert (call["response_text"], call["finish_reason"]) == ("Answer: 4", "stop")
    details = {**ids, "spanId": "00000000000000f1", "eventName": "gen_ai.client.inference.operation.details",
               "attributes": [_attr("gen_ai.input.messages", orjson.dumps(
                   [{"role": "user", "parts": [{"type": "text", "content": "hello"}]}]).decode())]}
    assert _post(app, _logs(details), path="/v1/logs")[0] == 200
    late = {**ids, "eventName": "gen_ai.user.message", "body": _body({"content": "too late"})}
    _post(app, _logs(late), path="/v1/logs")
    text = generate_latest(app.metrics.registry).decode()
    assert 'rollstream_otlp_log_records_total{kind="late"} 1.0' in text
    assert 'rollstream_otlp_log_records_total{kind="ignored"} 1.0' in text
    status, body = _post(app, b"{not json", path="/v1/logs")
    assert status == 400 and b"not valid JSON" in body
    assert _post(app, b"{}", path="/v1/metrics")[0] == 404


def test_spans_that_come_before_their_root_are_held_until_it_arrives() -> None:
    cache = TraceCache()
    llm = child("0000000000000102", "0000000000000101", "chat tiny", {**CHAT})
    reward = child("0000000000000103", "0000000000000101", "rollstream.reward", {"rollstream.reward.value": 1.0})
    other = child("0000000000000104", "0000000000000101", "tool", {})
    first = map_request(_spans(llm, reward, other), "p", cache)  # a simple span processor: children end first
    assert (first.held, first.calls, first.rewards, first.rejected) == (3, [], [], 0)
    root = span("0000000000000101", "rollout", {"rollstream.rollout_id": "rh", "rollstream.group_id": "g"})
    second = map_request(_spans(root), "p", cache)
    assert [c["rollout_id"] for c in second.calls] == ["rh"] and second.rewards[0]["rollout_id"] == "rh"
    assert (second.rollouts[0]["group_id"], second.ignored, cache.held_spans) == ("g", 1, 0)
    # A trace whose root names no rollout: its held spans are unattributed, not held forever.
    orphan = child("0000000000000202", "0000000000000201", "chat tiny", {**CHAT})
    assert map_request(_spans(orphan), "p", cache).held == 1
    plain_root = span("0000000000000201", "request", {})
    assert map_request(_spans(plain_root), "p", cache).unattributed == 1 and cache.held_spans == 0
    expiring = TraceCache(hold_s=0.0)
    assert map_request(_spans(llm), "p", expiring).expired == 1 and expiring.held_spans == 0
