"""OTLP trace payloads to events: decoding (protobuf and OTLP JSON) and the GenAI span mapping.

A span becomes an **LlmCall** when it is an LLM span in any convention instrumentations use
(``gen_ai.operation.name``, OpenLLMetry's ``llm.request.type``, AgentOps' ``gen_ai.request.type``,
OpenInference's ``openinference.span.kind`` ``LLM``, flattened ``gen_ai.prompt.0.*``) and it has a
rollout; it becomes a **Reward** when it is named ``rollstream.reward`` (or ``agentlightning.reward``),
carries ``rollstream.reward.value`` or is an Agent Lightning annotation span; the end of a rollout's
root span becomes a **RolloutEvent**. Every other span is ignored (and counted). The rollout comes
from the span's attributes, else its nearest ancestor's (``TraceCache`` remembers them across
requests and holds spans whose ancestors have not arrived), else its resource's:
``rollstream.rollout_id`` (or ``agentlightning.rollout_id``). See docs/any-language.md for every
attribute read. A malformed span is refused on its own; the others are mapped.
"""

from __future__ import annotations

import base64
import math
import re
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any

import orjson
from google.protobuf import json_format
from google.protobuf.message import DecodeError
from opentelemetry.proto.collector.logs.v1.logs_service_pb2 import ExportLogsServiceRequest
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest
from opentelemetry.proto.common.v1.common_pb2 import AnyValue, KeyValue
from opentelemetry.proto.trace.v1.trace_pb2 import Span

from rollstream.errors import OtlpError
from rollstream.producers.genai_content import input_messages, output_choices, raw_request, raw_response, unflatten
from rollstream.schemas import make_event

SOURCE = "otlp"
LLM_OPERATIONS = {"chat": "CHAT_COMPLETIONS", "generate_content": "CHAT_COMPLETIONS", "text_completion": "COMPLETIONS"}
# OpenLLMetry up to 0.54 (and AgentOps, which carries its code) marks LLM spans with llm.request.type only.
LLM_REQUEST_TYPES = {"chat": "CHAT_COMPLETIONS", "completion": "COMPLETIONS"}
REWARD_SPAN_NAMES = {"rollstream.reward", "agentlightning.reward"}
ANNOTATION_SPAN = "agentlightning.annotation"  # Agent Lightning 0.3: agentlightning.reward.<i>.name/.value
ROLLOUT_KEYS = ("rollstream.rollout_id", "agentlightning.rollout_id")
# What a span passes on to its descendants (and a root span to its rollout's end event).
ATTRIBUTION_KEYS = (*ROLLOUT_KEYS, "rollstream.attempt", "agentlightning.attempt_id", "rollstream.agent_name",
                    "gen_ai.agent.name", "rollstream.group_id", "agentlightning.group_id", "rollstream.task_id",
                    "agentlightning.task_id", "rollstream.policy", "rollstream.policy_version")
GROUP_KEYS = ("rollstream.group_id", "agentlightning.group_id")
TASK_KEYS = ("rollstream.task_id", "agentlightning.task_id")
GENAI_EVENT_PREFIX = "gen_ai."  # log events kept for their span: gen_ai.user.message, gen_ai.choice, ...
STATUS_ERROR = 2  # Span.Status.STATUS_CODE_ERROR
MAX_ERRORS = 5  # rejected spans named in the partial-success message
FINISH_REASONS = {"tool_call": "tool_calls", "function_call": "tool_calls"}  # OpenLLMetry writes the singular
TOOL_SPAN_KIND = "AgentOpsSpanKindValues.TOOL"  # AgentOps records a response's tool calls as child spans
REWARD_VALUE_KEYS = ("rollstream.reward.value", "agentlightning.reward", "reward")
INT32 = (-(2**31), 2**31 - 1)  # most integer fields of LlmCall and Reward are Avro ints
INT64 = (-(2**63), 2**63 - 1)


def decode_request(body: bytes, content_type: str) -> ExportTraceServiceRequest:
    """An ExportTraceServiceRequest from an OTLP/HTTP body (binary protobuf or the OTLP JSON mapping)."""
    request = ExportTraceServiceRequest()
    _decode(body, content_type, request, _span_ids)
    return request


def decode_logs(body: bytes, content_type: str) -> ExportLogsServiceRequest:
    """An ExportLogsServiceRequest from an OTLP/HTTP ``/v1/logs`` body."""
    request = ExportLogsServiceRequest()
    _decode(body, content_type, request, _log_ids)
    return request


def _decode(body: bytes, content_type: str, request: Any, hex_ids: Any) -> None:
    name = type(request).__name__
    kind = content_type.split(";")[0].strip().lower()
    if kind in ("application/x-protobuf", "application/protobuf"):
        try:
            request.ParseFromString(body)
        except DecodeError as exc:
            raise OtlpError(f"body is not a protobuf {name}: {exc}") from exc
        return
    if kind == "application/json":
        try:
            data = orjson.loads(body)
        except orjson.JSONDecodeError as exc:
            raise OtlpError(f"body is not valid JSON: {exc}") from exc
        if not isinstance(data, dict):
            raise OtlpError(f"body must be a JSON object ({name}), not {type(data).__name__}")
        hex_ids(data)
        try:
            json_format.ParseDict(data, request, ignore_unknown_fields=True)
        except json_format.ParseError as exc:
            raise OtlpError(f"body is not an OTLP JSON {name}: {exc}") from exc
        return
    raise OtlpError(f"unsupported content type {content_type!r}; send application/x-protobuf or application/json")


def _span_ids(data: dict[str, Any]) -> None:
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


def _log_ids(data: dict[str, Any]) -> None:
    for i, rl in enumerate(_list(data, "resourceLogs")):
        for j, sl in enumerate(_list(rl, "scopeLogs")):
            for k, record in enumerate(_list(sl, "logRecords")):
                where = f"resourceLogs[{i}].scopeLogs[{j}].logRecords[{k}]"
                _convert_id(record, "traceId", 16, where)
                _convert_id(record, "spanId", 8, where)


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


Source = tuple[Span, dict[str, Any], str, dict[str, Any]]  # a span, its resource's attributes, where, its attributes


@dataclass
class Mapped:
    """What one export request becomes."""

    calls: list[dict[str, Any]] = field(default_factory=list)
    rewards: list[dict[str, Any]] = field(default_factory=list)
    rollouts: list[dict[str, Any]] = field(default_factory=list)  # rollout ends (root spans that name a rollout)
    ignored: int = 0  # neither an LLM span nor a reward span
    unattributed: int = 0  # LLM spans without a rollout id (on the span, an ancestor or the resource)
    spans: int = 0
    rejected: int = 0  # malformed spans, refused one by one (OTLP partial success)
    errors: list[str] = field(default_factory=list)  # why, one line per rejected span (the first few)
    no_content: int = 0  # LLM spans recorded without any prompt or completion content
    empty_spans: list[tuple[str, str]] = field(default_factory=list)  # their (trace id, span id)
    held: int = 0  # spans kept for later: their ancestors (with the rollout id) have not arrived
    expired: int = 0  # held spans whose ancestors never came (dropped, unattributed)
    sources: list[Source] = field(default_factory=list)  # the spans mapped (for remap)
    decode_rejected: int = 0  # rejections before mapping (bad ids)
    decode_errors: list[str] = field(default_factory=list)


LogEvent = tuple[str, dict[str, Any], Any]  # event name, attributes, body


class TraceCache:
    """What earlier export requests said about each trace, for the spans of later ones.

    Spans of one trace arrive in several requests (a batch exporter sends children, which end
    first, before their parents), and GenAI content may come as log events on ``/v1/logs``. The
    cache keeps, for the most recent ``max_traces`` traces, each span's parent and the
    attribution attributes it carried, and the GenAI log events of each span. It lives in the
    receiver's memory: after a restart a span finds only what arrived since.
    """

    def __init__(self, max_traces: int = 20_000, hold_s: float = 600.0, max_held: int = 100_000) -> None:
        self.max_traces = max_traces
        self.hold_s = hold_s
        self.max_held = max_held
        self.held: OrderedDict[str, tuple[float, list[Source]]] = OrderedDict()  # by trace, oldest first
        self.held_spans = 0
        self.traces: OrderedDict[str, dict[str, tuple[str, dict[str, Any]]]] = OrderedDict()
        self.logs: OrderedDict[tuple[str, str], list[LogEvent]] = OrderedDict()
        self.mapped: OrderedDict[tuple[str, str], None] = OrderedDict()  # LLM spans already published
        self.tool_calls: OrderedDict[tuple[str, str], list[dict[str, Any]]] = OrderedDict()  # by parent span

    def note(self, trace_id: str, span_id: str, parent_id: str, attribution: dict[str, Any]) -> None:
        nodes = self.traces.get(trace_id)
        if nodes is None:
            nodes = self.traces[trace_id] = {}
            while len(self.traces) > self.max_traces:
                self.traces.popitem(last=False)
        else:
            self.traces.move_to_end(trace_id)
        nodes[span_id] = (parent_id, attribution)

    def inherited(self, trace_id: str, parent_id: str) -> dict[str, Any]:
        """The attribution of the span's ancestors, the nearest first for each key."""
        nodes = self.traces.get(trace_id, {})
        out: dict[str, Any] = {}
        seen: set[str] = set()
        while parent_id and parent_id in nodes and parent_id not in seen:
            seen.add(parent_id)
            parent_id, attribution = nodes[parent_id]
            for key, value in attribution.items():
                out.setdefault(key, value)
        return out

    def resolved(self, trace_id: str, parent_id: str) -> bool:
        """Whether the span's ancestry is known up to an ancestor with a rollout id or the trace's root."""
        nodes = self.traces.get(trace_id, {})
        seen: set[str] = set()
        while parent_id:
            if parent_id not in nodes or parent_id in seen:
                return False
            seen.add(parent_id)
            parent_id, attribution = nodes[parent_id]
            if any(attribution.get(k) for k in ROLLOUT_KEYS):
                return True
        return True

    def hold(self, trace_id: str, source: Source) -> None:
        """Keep a span until its ancestors arrive (in memory: a restart of the receiver loses it)."""
        since, spans = self.held.get(trace_id, (time.monotonic(), []))
        spans.append(source)
        self.held[trace_id] = (since, spans)
        self.held_spans += 1

    def release(self, trace_id: str) -> list[Source]:
        """The spans held for a trace (held again by the caller if still unresolved)."""
        _, spans = self.held.pop(trace_id, (0.0, []))
        self.held_spans -= len(spans)
        return spans

    def expire(self) -> int:
        """Drop the spans held longest past ``hold_s`` (or past ``max_held`` spans); how many."""
        dropped = 0
        deadline = time.monotonic() - self.hold_s
        while self.held:
            trace_id, (since, spans) = next(iter(self.held.items()))
            if since > deadline and self.held_spans <= self.max_held:
                break
            dropped += len(self.release(trace_id))
        return dropped

    def trace_info(self, trace_id: str) -> dict[str, Any]:
        """Attribution found on any span of the trace (group and task ids set on an inner span)."""
        out: dict[str, Any] = {}
        for _, attribution in self.traces.get(trace_id, {}).values():
            for key, value in attribution.items():
                out.setdefault(key, value)
        return out

    def add_log(self, trace_id: str, span_id: str, event: LogEvent) -> bool:
        """Keep a GenAI log event for its span; False when that span was already published without it."""
        key = (trace_id, span_id)
        self.logs.setdefault(key, []).append(event)
        self.logs.move_to_end(key)
        while len(self.logs) > self.max_traces * 4:
            self.logs.popitem(last=False)
        return key not in self.mapped

    def add_tool_call(self, trace_id: str, parent_id: str, call: dict[str, Any]) -> None:
        """A tool call an LLM span's response made, recorded as a child span of it (AgentOps)."""
        calls = self.tool_calls.setdefault((trace_id, parent_id), [])
        if call not in calls:
            calls.append(call)
        while len(self.tool_calls) > self.max_traces * 4:
            self.tool_calls.popitem(last=False)

    def has_logs(self, trace_id: str, span_id: str) -> bool:
        return (trace_id, span_id) in self.logs

    def published(self, trace_id: str, span_id: str) -> None:
        """The span's calls were published: log events that come for it now come too late."""
        self.mapped[(trace_id, span_id)] = None
        while len(self.mapped) > self.max_traces * 4:
            self.mapped.popitem(last=False)


class SpanReader:
    """Typed access to one span's attributes (falling back to its resource's), with errors that locate it."""

    def __init__(self, span: Span, resource: dict[str, Any], where: str, inherited: dict[str, Any] | None = None,
                 logs: list[LogEvent] | None = None) -> None:
        self.span = span
        self.attrs = attributes(span.attributes)
        self.resource = resource
        self.where = where
        self.trace_id = span.trace_id.hex()
        self.span_id = span.span_id.hex()
        self.parent_id = span.parent_span_id.hex()
        self.inherited = inherited or {}  # attribution of the span's ancestors
        self.logs = logs or []  # GenAI log events emitted inside the span

    def error(self, key: str, message: str) -> OtlpError:
        return OtlpError(f"{self.where} ('{self.span.name}') attribute '{key}': {message}")

    def get(self, *keys: str, resource: bool = False) -> Any:
        for key in keys:
            if self.attrs.get(key) is not None:
                return self.attrs[key]
        if resource:
            for source in (self.inherited, self.resource):
                for key in keys:
                    if source.get(key) is not None:
                        return source[key]
        return None

    def text(self, *keys: str, resource: bool = False) -> str | None:
        value = self.get(*keys, resource=resource)
        if value is None:
            return None
        if isinstance(value, bytes | list | dict):
            raise self.error(keys[0], "must be a string")
        return str(value)

    def integer(self, key: str, minimum: int | None = None, bounds: tuple[int, int] = INT32,
                resource: bool = False) -> int | None:
        value = self.get(key, resource=resource)
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


def llm_endpoint(reader: SpanReader) -> str | None:
    """The endpoint an LLM span stands for, in any of the conventions instrumentations use; None: not an LLM span."""
    operation = reader.text("gen_ai.operation.name")
    if operation is not None:
        return LLM_OPERATIONS.get(operation)
    request_type = reader.text("llm.request.type", "gen_ai.request.type")  # the latter: AgentOps
    if request_type is not None:
        return LLM_REQUEST_TYPES.get(request_type)
    if reader.text("openinference.span.kind") == "LLM":
        return "COMPLETIONS" if "llm.prompts" in reader.attrs or "llm.prompts.0" in reader.attrs \
            else "CHAT_COMPLETIONS"
    if any(k.startswith(("gen_ai.prompt.0.", "gen_ai.completion.0.")) for k in reader.attrs):
        return "CHAT_COMPLETIONS"
    return None


def is_reward(reader: SpanReader) -> bool:
    return (reader.span.name in REWARD_SPAN_NAMES or reader.get("rollstream.reward.value") is not None
            or (reader.span.name == ANNOTATION_SPAN and reader.get("agentlightning.reward.0.value") is not None))


def _attribution(attrs: dict[str, Any]) -> dict[str, Any]:
    return {k: attrs[k] for k in ATTRIBUTION_KEYS if attrs.get(k) is not None}


def map_request(request: ExportTraceServiceRequest, default_policy: str, cache: TraceCache | None = None) -> Mapped:
    """Every LlmCall, Reward and rollout end the request holds (sequence numbers not yet assigned).

    A malformed span is refused on its own (counted in ``rejected``, its reason in ``errors``);
    the others are mapped. Attribution comes from the span, else its nearest ancestor that has
    it (in this request or, through ``cache``, an earlier one), else the resource. A span whose
    ancestors have not arrived yet (exporters send children, which end first, before their
    parents) is held in ``cache`` and mapped with the request that brings them.
    """
    cache = cache if cache is not None else TraceCache()
    out = Mapped()
    sources = _collect(request, cache, out)
    out.decode_rejected, out.decode_errors = out.rejected, list(out.errors)
    return map_spans(sources, default_policy, cache, out)


def remap(mapped: Mapped, default_policy: str, cache: TraceCache) -> Mapped:
    """The same spans mapped again (after their GenAI log events arrived)."""
    out = Mapped(spans=mapped.spans, held=mapped.held, expired=mapped.expired, rejected=mapped.decode_rejected,
                 errors=list(mapped.decode_errors), decode_rejected=mapped.decode_rejected,
                 decode_errors=list(mapped.decode_errors))
    return map_spans(mapped.sources, default_policy, cache, out)


def _collect(request: ExportTraceServiceRequest, cache: TraceCache, out: Mapped) -> list[Source]:
    """Note every span's attribution in ``cache`` (a child may come before its parent), then the spans
    to map now: this request's and the held ones it resolves; unresolved ones are held."""
    sources: list[Source] = []
    traces: set[str] = set()
    for i, rs in enumerate(request.resource_spans):
        resource = attributes(rs.resource.attributes)
        for j, ss in enumerate(rs.scope_spans):
            for k, span in enumerate(ss.spans):
                out.spans += 1
                where = f"resourceSpans[{i}].scopeSpans[{j}].spans[{k}]"
                if len(span.trace_id) != 16 or len(span.span_id) != 8 or len(span.parent_span_id) not in (0, 8):
                    _reject(out, OtlpError(f"{where}: traceId must be 16 bytes, spanId and parentSpanId 8 bytes"))
                    continue
                attrs = attributes(span.attributes)
                trace = span.trace_id.hex()
                traces.add(trace)
                cache.note(trace, span.span_id.hex(), span.parent_span_id.hex(), _attribution(attrs))
                if attrs.get("agentops.span.kind") == TOOL_SPAN_KIND and attrs.get("tool.call.id"):
                    cache.add_tool_call(trace, span.parent_span_id.hex(), {
                        "id": str(attrs["tool.call.id"]), "type": "function",
                        "function": {"name": attrs.get("tool.name"), "arguments": attrs.get("tool.parameters", "{}")}})
                sources.append((span, resource, where, attrs))
    for trace in traces:
        sources.extend(cache.release(trace))
    now: list[Source] = []
    for source in sources:
        span, resource, _, attrs = source
        trace = span.trace_id.hex()
        if (not any(attrs.get(k) for k in ROLLOUT_KEYS) and not any(resource.get(k) for k in ROLLOUT_KEYS)
                and not cache.resolved(trace, span.parent_span_id.hex())):
            cache.hold(trace, source)
            out.held += 1
        else:
            now.append(source)
    out.expired = cache.expire()
    return now


def map_spans(sources: list[Source], default_policy: str, cache: TraceCache, out: Mapped) -> Mapped:
    out.sources = sources
    for span, resource, where, _ in sources:
        trace_id, span_id = span.trace_id.hex(), span.span_id.hex()
        reader = SpanReader(span, resource, where, cache.inherited(trace_id, span.parent_span_id.hex()),
                            cache.logs.get((trace_id, span_id)))
        try:
            _map_span(reader, default_policy, cache, out)
        except OtlpError as exc:
            _reject(out, exc)
    return out


def _reject(out: Mapped, exc: OtlpError) -> None:
    out.rejected += 1
    if len(out.errors) < MAX_ERRORS:
        out.errors.append(str(exc))


def _map_span(reader: SpanReader, default_policy: str, cache: TraceCache, out: Mapped) -> None:
    if is_reward(reader):
        out.rewards.extend(_rewards(reader))
        return
    endpoint = llm_endpoint(reader)
    if endpoint is not None:
        if reader.text(*ROLLOUT_KEYS, resource=True) is None:
            out.unattributed += 1
            return
        calls = _calls(reader, endpoint, default_policy, cache.tool_calls.get((reader.trace_id, reader.span_id)))
        if not any(c["messages"] or c["prompt"] or c["response_text"] or c["response_tool_calls_json"]
                   for c in calls):
            out.no_content += 1
            out.empty_spans.append((reader.trace_id, reader.span_id))
        out.calls.extend(calls)
        return
    if not reader.parent_id and reader.text(*ROLLOUT_KEYS) is not None:
        if reader.get("rollstream.rollout.finish") is not False:
            out.rollouts.append(_rollout_end(reader, cache.trace_info(reader.trace_id), default_policy))
        return
    out.ignored += 1


def _rollout_end(reader: SpanReader, trace: dict[str, Any], default_policy: str) -> dict[str, Any]:
    """The root span of a rollout ended: the rollout finished (FAILED when the span's status is an error)."""
    status = reader.span.status
    failed = status.code == STATUS_ERROR

    def first(*keys: str) -> str | None:
        value = reader.text(*keys)
        return value if value is not None else next((str(trace[k]) for k in keys if trace.get(k) is not None), None)

    return make_event(
        "RolloutEvent",
        event_id=f"{reader.trace_id}-{reader.span_id}-end",
        source=SOURCE,
        rollout_id=_rollout_id(reader),
        attempt=reader.integer("rollstream.attempt", 1) or 1,
        status="FAILED" if failed else "SUCCEEDED",
        timestamp=(reader.span.end_time_unix_nano or reader.span.start_time_unix_nano) // 1000,
        policy=first("rollstream.policy") or default_policy,
        task_id=first(*TASK_KEYS),
        group_id=first(*GROUP_KEYS),
        error=(status.message or "the rollout's root span ended with an error") if failed else None,
        metadata={"trace_id": reader.trace_id, "span_id": reader.span_id, "span_name": reader.span.name},
    )


def _rollout_id(reader: SpanReader) -> str:
    rollout_id = reader.text(*ROLLOUT_KEYS, resource=True)
    if not rollout_id or "/" in rollout_id or len(rollout_id) > 256:
        raise reader.error(ROLLOUT_KEYS[0], "a non-empty rollout id (at most 256 characters, no '/') is required")
    return rollout_id


def _rewards(reader: SpanReader) -> list[dict[str, Any]]:
    """The Reward events of a reward span: one, or one per dimension of an Agent Lightning annotation."""
    if reader.span.name == ANNOTATION_SPAN or reader.get("agentlightning.reward.0.value") is not None:
        out = []
        i = 0
        while reader.get(f"agentlightning.reward.{i}.value") is not None:
            key = f"agentlightning.reward.{i}.value"
            name = reader.text(f"agentlightning.reward.{i}.name") or "primary"
            out.append(_reward(reader, key, name if i else "primary", suffix=f"-{i}" if i else ""))
            i += 1
        return out
    return [_reward(reader)]


def _reward(reader: SpanReader, key: str | None = None, name: str | None = None, suffix: str = "") -> dict[str, Any]:
    value = None
    for candidate in (key,) if key else REWARD_VALUE_KEYS:
        value = reader.number(candidate)
        if value is not None:
            break
    if value is None:
        raise reader.error(REWARD_VALUE_KEYS[0], "a reward span needs a numeric value")
    if not math.isfinite(value):
        raise reader.error(key or REWARD_VALUE_KEYS[0], "must be finite (NaN and infinities are not rewards)")
    terminal = reader.get("rollstream.reward.terminal")
    if terminal is not None and not isinstance(terminal, bool):
        raise reader.error("rollstream.reward.terminal", "must be a boolean")
    call_id = reader.text("rollstream.reward.call_id", "rollstream.call_id")
    if terminal is None:
        # A reward of no call rewards the whole rollout: its final reward (an Agent Lightning annotation or
        # reward span is one). A reward of one call is an intermediate one unless it says otherwise.
        terminal = call_id is None
    return make_event(
        "Reward",
        event_id=f"{reader.trace_id}-{reader.span_id}{suffix}",
        source=reader.text("rollstream.reward.source") or SOURCE,
        rollout_id=_rollout_id(reader),
        attempt=reader.integer("rollstream.attempt", 1, resource=True) or 1,
        call_id=call_id,
        name=name or reader.text("rollstream.reward.name") or "primary",
        value=value,
        terminal=bool(terminal),
        timestamp=(reader.span.end_time_unix_nano or reader.span.start_time_unix_nano) // 1000,
        metadata={"trace_id": reader.trace_id, "span_id": reader.span_id},
    )


def _calls(reader: SpanReader, endpoint: str, default_policy: str,
           child_tools: list[dict[str, Any]] | None = None) -> list[dict[str, Any]]:
    span = reader.span
    messages, prompt = input_messages(reader)
    choices = output_choices(reader)
    finish_reasons = reader.get("gen_ai.response.finish_reasons", "llm.finish_reason")
    if isinstance(finish_reasons, str):
        finish_reasons = [finish_reasons]
    stop = reader.get("gen_ai.request.stop_sequences")
    response = raw_response(reader)
    response_id = reader.text("gen_ai.response.id") or (str(response["id"]) if response.get("id") else None)
    call_id = reader.text("rollstream.call_id") or response_id or reader.span_id
    request = raw_request(reader)
    model = reader.text("gen_ai.request.model", "llm.model_name") or (
        str(request["model"]) if request.get("model") else None)
    sequence = reader.integer("rollstream.sequence", 0)
    start, end = span.start_time_unix_nano, max(span.end_time_unix_nano, span.start_time_unix_nano)
    common = {
        "source": SOURCE,
        "rollout_id": _rollout_id(reader),
        "attempt": reader.integer("rollstream.attempt", 1, resource=True) or 1,
        "agent_name": reader.text("gen_ai.agent.name", "rollstream.agent_name", resource=True),
        "policy": reader.text("rollstream.policy", resource=True) or reader.text("gen_ai.response.model")
        or model or default_policy,
        "policy_version": reader.integer("rollstream.policy_version", 0, INT64, resource=True) or 0,
        "model": model,
        "endpoint": endpoint,
        "messages": messages if endpoint == "CHAT_COMPLETIONS" else [],
        "prompt": prompt if endpoint == "COMPLETIONS" else None,
        "tools_json": _tools(reader, request),
        "sampling": {
            "temperature": reader.number("gen_ai.request.temperature"),
            "top_p": reader.number("gen_ai.request.top_p"),
            "max_tokens": reader.integer("gen_ai.request.max_tokens"),
            "stop": [str(s) for s in stop] if isinstance(stop, list) else [stop] if isinstance(stop, str) else [],
            "seed": reader.integer("gen_ai.request.seed", bounds=INT64),
            "n": reader.integer("gen_ai.request.choice.count", 1) or 1,
        },
        "prompt_tokens": reader.integer("gen_ai.usage.input_tokens") or reader.integer("gen_ai.usage.prompt_tokens")
        or reader.integer("llm.token_count.prompt"),
        "completion_tokens": reader.integer("gen_ai.usage.output_tokens")
        or reader.integer("gen_ai.usage.completion_tokens") or reader.integer("llm.token_count.completion"),
        "start_time": start // 1000,
        "end_time": end // 1000,
        "latency_ms": (end - start) / 1e6,
    }
    token_ids = {
        "prompt_token_ids": reader.numbers("rollstream.prompt_token_ids", int)
        or reader.numbers("prompt_token_ids", int),  # Agent Lightning's instrumentation of vLLM-style answers
        "response_token_ids": reader.numbers("rollstream.response_token_ids", int)
        or reader.numbers("response_token_ids", int),
        "response_logprobs": reader.numbers("rollstream.response_logprobs", float),
    }
    events = []
    for index, (text, tool_calls_json, finish) in enumerate(choices or [("", None, None)]):
        if finish is None and isinstance(finish_reasons, list) and index < len(finish_reasons):
            finish = str(finish_reasons[index])
        finish = FINISH_REASONS.get(finish, finish) if finish is not None else None
        if tool_calls_json is None and index == 0 and child_tools:
            tool_calls_json = dumps(child_tools)
        suffix = "" if len(choices) <= 1 else f"-{index}"
        events.append(make_event(
            "LlmCall",
            event_id=f"{reader.trace_id}-{reader.span_id}{suffix}",
            call_id=call_id + suffix,
            sequence=-1 if sequence is None else sequence,  # -1: numbered by the receiver
            response_text=text,
            response_tool_calls_json=tool_calls_json,
            finish_reason=finish,
            metadata={"trace_id": reader.trace_id, "span_id": reader.span_id, "span_name": span.name,
                      **({"response_id": response_id, "choice_index": str(index)} if response_id else {})},
            **common,
            **(token_ids if index == 0 else {}),  # the token attributes describe the first choice
        ))
    return events


def _tools(reader: SpanReader, request: dict[str, Any]) -> str | None:
    """The tools offered, from the GenAI attributes, OpenLLMetry's ``llm.request.functions.<i>.*``,
    OpenInference's ``llm.tools.<i>.tool.json_schema`` or the raw request."""
    tools = _loads(reader.get("gen_ai.tool.definitions", "gen_ai.request.tools"))
    if isinstance(tools, list):  # the conventions' flat {"type", "name", "parameters"}: OpenAI's nested shape
        tools = [{"type": "function", "function": {k: v for k, v in t.items() if k != "type"}}
                 if isinstance(t, dict) and "function" not in t and "name" in t else t for t in tools]
    if tools is None:
        functions = unflatten(reader.attrs, "llm.request.functions") or unflatten(reader.attrs,
                                                                                  "gen_ai.request.functions")
        if functions:
            tools = [{"type": "function", "function": {
                "name": f.get("name"), "description": f.get("description"),
                "parameters": _loads(f.get("parameters"))}} for f in functions]
    if tools is None:
        schemas = [t.get("tool", {}).get("json_schema") for t in unflatten(reader.attrs, "llm.tools")]
        if any(schemas):
            tools = [_loads(x) for x in schemas if x]
    if tools is None and isinstance(request.get("tools"), list):
        tools = request["tools"]
    if tools is None:
        return None
    return tools if isinstance(tools, str) else dumps(tools)


def _loads(value: Any) -> Any:
    if isinstance(value, str):
        try:
            return orjson.loads(value)
        except orjson.JSONDecodeError:
            return value
    return value


def dumps(value: Any) -> str:
    """JSON text of an attribute value; bytes values (OTLP bytesValue) are written as hex."""
    return orjson.dumps(value, default=lambda v: v.hex() if isinstance(v, bytes) else str(v)).decode()

