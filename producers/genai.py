"""OTLP trace payloads to events: decoding (protobuf and OTLP JSON) and the GenAI span mapping.

A span becomes an **LlmCall** when ``gen_ai.operation.name`` is ``chat``, ``text_completion``
or ``generate_content`` and it names a rollout; it becomes a **Reward** when it is named
``rollstream.reward`` (or ``agentlightning.reward``) or carries ``rollstream.reward.value``.
Every other span is ignored (and counted). The rollout comes from the span's attributes,
else its resource's: ``rollstream.rollout_id`` (or ``agentlightning.rollout_id``). See
docs/any-language.md for every attribute read. Mapping validates everything first, so a
request with one bad span publishes nothing.
"""

from __future__ import annotations

import base64
import math
import re
from dataclasses import dataclass, field
from typing import Any

import orjson
from google.protobuf import json_format
from google.protobuf.message import DecodeError
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest
from opentelemetry.proto.common.v1.common_pb2 import AnyValue, KeyValue
from opentelemetry.proto.trace.v1.trace_pb2 import Span
from rollstream.producers.genai_content import input_messages, output_choices
from rollstream.schemas import make_event

from rollstream.errors import OtlpError

SOURCE = "otlp"
LLM_OPERATIONS = {"chat": "CHAT_COMPLETIONS", "generate_content": "CHAT_COMPLETIONS", "text_completion": "COMPLETIONS"}
REWARD_SPAN_NAMES = {"rollstream.reward", "agentlightning.reward"}
ROLLOUT_KEYS = ("rollstream.rollout_id", "agentlightning.rollout_id")
REWARD_VALUE_KEYS = ("rollstream.reward.value", "agentlightning.reward", "reward")
INT32 = (-(2**31), 2**31 - 1)  # most integer fields of LlmCall and Reward are Avro ints
INT64 = (-(2**63), 2**63 - 1)


def decode_request(body: bytes, content_type: str) -> ExportTraceServiceRequest:
    """An ExportTraceServiceRequest from an OTLP/HTTP body (binary protobuf or the OTLP JSON mapping)."""
    request = ExportTraceServiceRequest()
    kind = content_type.split(";")[0].strip().lower()
    if kind in ("application/x-protobuf", "application/protobuf"):
        try:
            request.ParseFromString(body)
        except DecodeError as exc:
            raise OtlpError(f"body is not a protobuf ExportTraceServiceRequest: {exc}") from exc
        return request
    if kind == "application/json":
        try:
            data = orjson.loads(body)
        except orjson.JSONDecodeError as exc:
            raise OtlpError(f"body is not valid JSON: {exc}") from exc
        if not isinstance(data, dict):
            raise OtlpError(f"body must be a JSON object (ExportTraceServiceRequest), not {type(data).__name__}")
        _hex_ids_to_base64(data)
        try:
            json_format.ParseDict(data, request, ignore_unknown_fields=True)
        except json_format.ParseError as exc:
            raise OtlpError(f"body is not an OTLP JSON ExportTraceServiceRequest: {exc}") from exc
        return request
    raise OtlpError(f"unsupported content type {content_type!r}; send application/x-protobuf or application/json")


def _hex_ids_to_base64(data: dict[str, Any]) -> None:
    """OTLP JSON writes ids as hex; the protobuf JSON mapping (json_format) reads bytes as base64."""
    for i, rs in enumerate(_list(data, "resourceSpans")):
        for j, ss in enumerate(_list(rs, "scopeSpans")):
            for k, span in enumerate(_list(ss, "spans")):
                where = f"resourceSpans[{i}].scopeSpans[{j}].spans[{k}]"
                for name, size in (("traceId", 16), ("spanId", 8), ("parentSpanId", 8)):
                    _convert_id(span, name, size, where)
                for n, link in enumerate(_list(span, "links")):
                    _convert_id(link, "traceId", 16, f"{where}.links[{n}]")
                    _convert_id(link, "spanId", 8, f"{where}.links[{n}]")


def _list(obj: Any, key: str) -> list[Any]:
    value = obj.get(key) if isinstance(obj, dict) else None
    if value is None:
        return []
    if not isinstance(value, list):
        raise OtlpError(f"'{key}' must be an array")
    return value


def _convert_id(obj: dict[str, Any], name: str, size: int, where: str) -> None:
    value = obj.get(name)
    if value is None or value == "":
        return
    try:
        raw = bytes.fromhex(value) if isinstance(value, str) else b""
    except ValueError:
        raw = b""
    if len(raw) != size:
        raise OtlpError(f"{where}.{name}: {value!r} is not {size * 2} hex digits")
    obj[name] = base64.b64encode(raw).decode()


def any_value(value: AnyValue) -> Any:
    which = value.WhichOneof("value")
    if which is None:
        return None
    if which == "array_value":
        return [any_value(v) for v in value.array_value.values]
    if which == "kvlist_value":
        return attributes(value.kvlist_value.values)
    return getattr(value, which)


def attributes(kvs: Any) -> dict[str, Any]:
    return {kv.key: any_value(kv.value) for kv in kvs if isinstance(kv, KeyValue)}


@dataclass
class Mapped:
    """What one export request becomes."""

    calls: list[dict[str, Any]] = field(default_factory=list)
    rewards: list[dict[str, Any]] = field(default_factory=list)
    ignored: int = 0  # neither an LLM span nor a reward span
    unattributed: int = 0  # LLM spans without a rollout id
    spans: int = 0


class SpanReader:
    """Typed access to one span's attributes (falling back to its resource's), with errors that locate it."""

    def __init__(self, span: Span, resource: dict[str, Any], where: str) -> None:
        self.span = span
        self.attrs = attributes(span.attributes)
        self.resource = resource
        self.where = where
        self.trace_id = span.trace_id.hex()
        self.span_id = span.span_id.hex()

    def error(self, key: str, message: str) -> OtlpError:
        return OtlpError(f"{self.where} ('{self.span.name}') attribute '{key}': {message}")

    def get(self, *keys: str, resource: bool = False) -> Any:
        for key in keys:
            if self.attrs.get(key) is not None:
                return self.attrs[key]
        if resource:
            for key in keys:
                if self.resource.get(key) is not None:
                    return self.resource[key]
        return None

    def text(self, *keys: str, resource: bool = False) -> str | None:
        value = self.get(*keys, resource=resource)
        if value is None:
            return None
        if isinstance(value, bytes | list | dict):
            raise self.error(keys[0], "must be a string")
        return str(value)

    def integer(self, key: str, minimum: int | None = None, bounds: tuple[int, int] = INT32) -> int | None:
        value = self.get(key)
        if isinstance(value, str) and re.fullmatch(r"-?[0-9]+", value.strip()):  # not str.isdigit: "²" is a digit
            value = int(value)
        if value is None:
            return None
        low = bounds[0] if minimum is None else max(minimum, bounds[0])
        if not isinstance(value, int) or isinstance(value, bool) or not low <= value <= bounds[1]:
            raise self.error(key, f"must be an integer from {low} to {bounds[1]}")
        return value

    def number(self, key: str) -> float | None:
        value = self.get(key)
        if value is None:
            return None
        if not isinstance(value, int | float) or isinstance(value, bool):
            raise self.error(key, "must be a number")
        return float(value)

    def numbers(self, key: str, kind: type) -> list[Any] | None:
        """An int or double array attribute (a JSON array in a string is accepted too); None when absent."""
        value = self.get(key)
        if value is None:
            return None
        if isinstance(value, str):
            try:
                value = orjson.loads(value)
            except orjson.JSONDecodeError as exc:
                raise self.error(key, "must be an array of numbers") from exc
        if not isinstance(value, list):
            raise self.error(key, "must be an array of numbers")
        out = []
        for item in value:
            if kind is int and (not isinstance(item, int) or isinstance(item, bool)
                                or not INT32[0] <= item <= INT32[1]):
                raise self.error(key, f"must be an array of integers (32-bit), found {item!r}")
            if kind is float and (not isinstance(item, int | float) or isinstance(item, bool)):
                raise self.error(key, f"must be an array of numbers, found {item!r}")
            out.append(kind(item))
        return out

    def json(self, key: str) -> Any:
        value = self.get(key)
        if isinstance(value, str):
            try:
                return orjson.loads(value)
            except orjson.JSONDecodeError:
                if key.endswith("messages") or key.endswith("instructions"):
                    raise self.error(key, "must be a JSON array of messages") from None
                return value  # gen_ai.prompt / gen_ai.completion may be plain text
        return value

    def event_attr(self, event_name: str, key: str) -> Any:
        """An attribute of the span event ``event_name`` (older GenAI conventions put content there)."""
        for event in self.span.events:
            if event.name == event_name:
                return attributes(event.attributes).get(key)
        return None


def map_request(request: ExportTraceServiceRequest, default_policy: str) -> Mapped:
    """Every LlmCall and Reward the request holds (sequence numbers not yet assigned); OtlpError if malformed."""
    out = Mapped()
    for i, rs in enumerate(request.resource_spans):
        resource = attributes(rs.resource.attributes)
        for j, ss in enumerate(rs.scope_spans):
            for k, span in enumerate(ss.spans):
                out.spans += 1
                reader = SpanReader(span, resource, f"resourceSpans[{i}].scopeSpans[{j}].spans[{k}]")
                if len(span.trace_id) != 16 or len(span.span_id) != 8:
                    raise OtlpError(f"{reader.where}: traceId must be 16 bytes and spanId 8 bytes")
                if span.name in REWARD_SPAN_NAMES or reader.get("rollstream.reward.value") is not None:
                    out.rewards.append(_reward(reader))
                    continue
                operation = reader.text("gen_ai.operation.name")
                if operation not in LLM_OPERATIONS:
                    out.ignored += 1
                    continue
                if reader.text(*ROLLOUT_KEYS, resource=True) is None:
                    out.unattributed += 1
                    continue
                out.calls.extend(_calls(reader, LLM_OPERATIONS[operation], default_policy))
    return out


def _rollout_id(reader: SpanReader) -> str:
    rollout_id = reader.text(*ROLLOUT_KEYS, resource=True)
    if not rollout_id or "/" in rollout_id or len(rollout_id) > 256:
        raise reader.error(ROLLOUT_KEYS[0], "a non-empty rollout id (at most 256 characters, no '/') is required")
    return rollout_id


def _reward(reader: SpanReader) -> dict[str, Any]:
    value = None
    for key in REWARD_VALUE_KEYS:
        value = reader.number(key)
        if value is not None:
            break
    if value is None:
        raise reader.error(REWARD_VALUE_KEYS[0], "a reward span needs a numeric value")
    if not math.isfinite(value):
        raise reader.error(REWARD_VALUE_KEYS[0], "must be finite (NaN and infinities are not rewards)")
    terminal = reader.get("rollstream.reward.terminal")
    if terminal is not None and not isinstance(terminal, bool):
        raise reader.error("rollstream.reward.terminal", "must be a boolean")
    return make_event(
        "Reward",
        event_id=f"{reader.trace_id}-{reader.span_id}",
        source=reader.text("rollstream.reward.source") or SOURCE,
        rollout_id=_rollout_id(reader),
        attempt=reader.integer("rollstream.attempt", 1),
        call_id=reader.text("rollstream.reward.call_id", "rollstream.call_id"),
        name=reader.text("rollstream.reward.name") or "primary",
        value=value,
        terminal=bool(terminal),
        timestamp=(reader.span.end_time_unix_nano or reader.span.start_time_unix_nano) // 1000,
        metadata={"trace_id": reader.trace_id, "span_id": reader.span_id},
    )


def _calls(reader: SpanReader, endpoint: str, default_policy: str) -> list[dict[str, Any]]:
    span = reader.span
    messages, prompt = input_messages(reader)
    choices = output_choices(reader)
    finish_reasons = reader.get("gen_ai.response.finish_reasons")
    if isinstance(finish_reasons, str):
        finish_reasons = [finish_reasons]
    stop = reader.get("gen_ai.request.stop_sequences")
    call_id = reader.text("rollstream.call_id", "gen_ai.response.id") or reader.span_id
    sequence = reader.integer("rollstream.sequence", 0)
    start, end = span.start_time_unix_nano, max(span.end_time_unix_nano, span.start_time_unix_nano)
    common = {
        "source": SOURCE,
        "rollout_id": _rollout_id(reader),
        "attempt": reader.integer("rollstream.attempt", 1) or 1,
        "agent_name": reader.text("gen_ai.agent.name", "rollstream.agent_name", resource=True),
        "policy": reader.text("rollstream.policy", resource=True) or reader.text("gen_ai.response.model")
        or reader.text("gen_ai.request.model") or default_policy,
        "policy_version": reader.integer("rollstream.policy_version", 0, INT64) or 0,
        "model": reader.text("gen_ai.request.model"),
        "endpoint": endpoint,
        "messages": messages if endpoint == "CHAT_COMPLETIONS" else [],
        "prompt": prompt if endpoint == "COMPLETIONS" else None,
        "tools_json": _tools(reader),
        "sampling": {
            "temperature": reader.number("gen_ai.request.temperature"),
            "top_p": reader.number("gen_ai.request.top_p"),
            "max_tokens": reader.integer("gen_ai.request.max_tokens"),
            "stop": [str(s) for s in stop] if isinstance(stop, list) else [stop] if isinstance(stop, str) else [],
            "seed": reader.integer("gen_ai.request.seed", bounds=INT64),
            "n": reader.integer("gen_ai.request.choice.count", 1) or 1,
        },
        "prompt_tokens": reader.integer("gen_ai.usage.input_tokens") or reader.integer("gen_ai.usage.prompt_tokens"),
        "completion_tokens": reader.integer("gen_ai.usage.output_tokens")
        or reader.integer("gen_ai.usage.completion_tokens"),
        "start_time": start // 1000,
        "end_time": end // 1000,
        "latency_ms": (end - start) / 1e6,
    }
    token_ids = {
        "prompt_token_ids": reader.numbers("rollstream.prompt_token_ids", int),
        "response_token_ids": reader.numbers("rollstream.response_token_ids", int),
        "response_logprobs": reader.numbers("rollstream.response_logprobs", float),
    }
    events = []
    for index, (text, tool_calls_json, finish) in enumerate(choices or [("", None, None)]):
        if finish is None and isinstance(finish_reasons, list) and index < len(finish_reasons):
            finish = str(finish_reasons[index])
        suffix = "" if len(choices) <= 1 else f"-{index}"
        events.append(make_event(
            "LlmCall",
            event_id=f"{reader.trace_id}-{reader.span_id}{suffix}",
            call_id=call_id + suffix,
            sequence=-1 if sequence is None else sequence,  # -1: numbered by the receiver
            response_text=text,
            response_tool_calls_json=tool_calls_json,
            finish_reason=finish,
            metadata={"trace_id": reader.trace_id, "span_id": reader.span_id, "span_name": span.name},
            **common,
            **(token_ids if index == 0 else {}),  # the token attributes describe the first choice
        ))
    return events


def _tools(reader: SpanReader) -> str | None:
    tools = reader.get("gen_ai.tool.definitions", "gen_ai.request.tools")
    if tools is None:
        return None
    return tools if isinstance(tools, str) else dumps(tools)


def dumps(value: Any) -> str:
    """JSON text of an attribute value; bytes values (OTLP bytesValue) are written as hex."""
    return orjson.dumps(value, default=lambda v: v.hex() if isinstance(v, bytes) else str(v)).decode()

