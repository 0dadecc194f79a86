"""``rollstream otlp``: an OTLP/HTTP trace receiver that turns GenAI and reward spans into events.

``POST /v1/traces`` takes an ``ExportTraceServiceRequest`` as binary protobuf
(``application/x-protobuf``) or in the OTLP JSON mapping (``application/json``: hex ids,
lowerCamelCase keys, 64-bit integers as strings), optionally gzip-compressed. LLM spans
(OpenTelemetry GenAI conventions, OpenLLMetry, OpenInference) become LlmCall events, reward
spans Reward events and the end of a rollout's root span a RolloutEvent, keyed by rollout id
(mapping in ``rollstream.producers.genai``). Other spans are ignored and counted at
``GET /metrics``. A malformed span is refused alone: the answer is 200 with OTLP's
``partial_success`` (rejected spans and the first reasons) and the other spans are published.
A body that cannot be decoded is answered 400 with the reason and publishes nothing; a full
event queue (Kafka down for long) is answered 503, which OTLP exporters retry.
``POST /v1/logs`` takes GenAI log events (content sent as events rather than span attributes),
kept in memory for their span, which is mapped when it arrives. ``GET /healthz`` reports the
queue depth.

With ``ROLLSTREAM_OTLP_API_KEYS`` set, ``POST /v1/traces`` needs ``Authorization: Bearer <key>``
with the ``traces`` scope (401 without a known key, 403 without the scope; see
``rollstream.producers.auth``; exporters send it with ``OTEL_EXPORTER_OTLP_HEADERS``). Without
keys the receiver binds loopback only.

Redaction (``ROLLSTREAM_REDACT*``, ``--redact``; docs/redaction.md): spans arrive after the fact, so the
events mapped from them are redacted before they are published, token ids carried by a span dropped
where its text changed; token ids from the gateway's record are taken only where that record's own
text passes the same rules. A failing hook answers 500 and publishes nothing of the export.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import gzip
import logging
import signal
import time
import zlib
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import orjson
from opentelemetry.proto.collector.logs.v1.logs_service_pb2 import ExportLogsServiceResponse
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceResponse
from prometheus_client import CollectorRegistry, Counter, Gauge, generate_latest

from rollstream.errors import ConfigError, OtlpError, QueueFullError, RollstreamError
from rollstream.events import prepare_codec
from rollstream.producers.auth import OTLP_SCOPES, KeyRing, guard_unauthenticated
from rollstream.producers.emitter import EventEmitter, Payload
from rollstream.producers.genai import (
    GENAI_EVENT_PREFIX,
    TraceCache,
    any_value,
    attributes,
    decode_logs,
    decode_request,
    map_request,
    remap,
)
from rollstream.producers.http import HttpError, Receive, Scope, Send, header, read_body, respond
from rollstream.producers.metrics import redaction_counters
from rollstream.producers.proxy import RolloutTracker
from rollstream.producers.redact import (
    RedactionError,
    RedactionSettings,
    Redactor,
    redaction_flags,
    settings_from_flags,
)
from rollstream.producers.response_index import ResponseIndex
from rollstream.schemas.topics import Topics
from rollstream.settings import ConnectionSettings, Settings, setting

log = logging.getLogger(__name__)

PROTOBUF = b"application/x-protobuf"
GRPC_INVALID_ARGUMENT, GRPC_UNAVAILABLE, GRPC_INTERNAL = 3, 14, 13
GRPC_PERMISSION_DENIED, GRPC_UNAUTHENTICATED = 7, 16


@dataclass(frozen=True)
class OtlpSettings(Settings):
    """Where the receiver listens, the policy it records by default, and its event queue."""

    host: str = setting("OTLP_HOST")
    port: int = setting("OTLP_PORT")
    policy: str = setting("OTLP_POLICY")
    queue_max: int = setting("OTLP_QUEUE_MAX")
    max_body: int = setting("OTLP_MAX_BODY")
    api_keys: str = setting("OTLP_API_KEYS", secret=True)
    join_wait: float = setting("OTLP_JOIN_WAIT")
    hold: float = setting("OTLP_HOLD")
    gateway_join: bool = setting("OTLP_GATEWAY_JOIN")
    redaction: RedactionSettings = field(default_factory=RedactionSettings)

    def validate(self) -> None:
        for name in ("queue_max", "max_body"):
            if getattr(self, name) < 1:
                raise ConfigError(f"ROLLSTREAM_OTLP_{name.upper()} must be at least 1")
        if not 0 <= self.join_wait <= 30:
            raise ConfigError("ROLLSTREAM_OTLP_JOIN_WAIT must be from 0 to 30 seconds (exporters time out at 10)")


class OtlpMetrics:
    """Requests, spans by kind, and the event queue; served at ``/metrics``."""

    def __init__(self) -> None:
        self.registry = r = CollectorRegistry(auto_describe=True)
        self.requests = Counter("rollstream_otlp_requests", "Export requests answered, by status.", ["status"],
                                registry=r)
        self.spans = Counter(
            "rollstream_otlp_spans",
            "Spans received, by kind: llm, reward, ignored (neither), unattributed (LLM span without rollout id), "
            "held (kept until their ancestors arrive; counted again when mapped), expired (held past "
            "ROLLSTREAM_OTLP_HOLD seconds without their ancestors: dropped).",
            ["kind"], registry=r,
        )
        self.events = Counter("rollstream_otlp_events_enqueued", "Events enqueued for Kafka, by topic.", ["topic"],
                              registry=r)
        self.queue_depth = Gauge("rollstream_otlp_queue_depth", "Events waiting for Kafka's acknowledgement.",
                                 registry=r)
        self.delivered = Gauge("rollstream_otlp_events_delivered", "Events Kafka acknowledged (since start).",
                               registry=r)
        self.rejected = Counter("rollstream_otlp_spans_rejected",
                                "Malformed spans refused one by one (OTLP partial success).", registry=r)
        self.no_content = Counter(
            "rollstream_otlp_calls_without_content",
            "LLM spans recorded without prompt or completion (content capture is off in the instrumentation).",
            registry=r)
        self.logs = Counter("rollstream_otlp_log_records",
                            "Log records received, by kind: genai (kept for their span), late (their span was "
                            "already published without them), ignored (not a GenAI event or outside a span).",
                            ["kind"], registry=r)
        self.joined = Counter(
            "rollstream_otlp_calls_joined",
            "LLM calls without token ids looked up on the gateway's calls-by-response topic, by result: gateway "
            "(the gateway's token ids attached), missing (not found in time: the processor's tokenizer fallback "
            "or a dead letter), no_response_id (the span names no response id to join on).",
            ["result"], registry=r)
        self.failed = Gauge("rollstream_otlp_events_failed", "Events that could not be published (since start).",
                            registry=r)
        self.redactions = redaction_counters(r)

    def watch(self, emitter: EventEmitter) -> None:
        self.queue_depth.set_function(emitter.pending)
        self.delivered.set_function(lambda: emitter.delivered)
        self.failed.set_function(lambda: emitter.failed)


def status_body(protobuf: bool, code: int, message: str) -> bytes:
    """A google.rpc.Status (what OTLP/HTTP answers failures with) in the request's encoding."""
    if not protobuf:
        return orjson.dumps({"code": code, "message": message})
    text = message.encode()
    return b"\x08" + _varint(code) + b"\x12" + _varint(len(text)) + text


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        byte, n = n & 0x7F, n >> 7
        out.append(byte | (0x80 if n else 0))
        if not n:
            return bytes(out)


class OtlpReceiver:
    """The ASGI application."""

    def __init__(self, settings: OtlpSettings, emitter: EventEmitter, topics: Topics,
                 metrics: OtlpMetrics | None = None, index: ResponseIndex | None = None) -> None:
        self.settings = settings
        self.emitter = emitter
        self.topics = topics
        self.metrics = metrics or OtlpMetrics()
        self.metrics.watch(emitter)
        self.tracker = RolloutTracker()
        self.cache = TraceCache(hold_s=settings.hold)
        self.index = index  # the gateway's calls of no rollout, by response id
        self._gateway_silent = False  # a whole wait found nothing and the index is still empty
        self.trace_locks: dict[str, tuple[asyncio.Lock, int]] = {}  # a trace's exports publish in arrival order
        self.keys = KeyRing.from_text(settings.api_keys, "ROLLSTREAM_OTLP_API_KEYS", OTLP_SCOPES)
        self.redactor = Redactor.from_settings(settings.redaction, surface="otlp", counters=self.metrics.redactions)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            while True:
                kind = (await receive())["type"]
                if kind == "lifespan.startup":
                    await send({"type": "lifespan.startup.complete"})
                elif kind == "lifespan.shutdown":
                    await send({"type": "lifespan.shutdown.complete"})
                    return
        if scope["type"] != "http":
            return
        method, path = scope["method"], scope["path"]
        if path == "/metrics" and method == "GET":
            await respond(send, 200, generate_latest(self.metrics.registry),
                          [(b"content-type", b"text/plain; version=0.0.4")])
        elif path == "/healthz" and method == "GET":
            await respond(send, 200, orjson.dumps({"status": "ok", "queue_depth": self.emitter.pending()}))
        elif path in ("/v1/traces", "/v1/logs") and method == "POST":
            status, body, ctype = await self._export(scope, receive, path)
            self.metrics.requests.labels(str(status)).inc()
            await respond(send, status, body, [(b"content-type", ctype)])
        else:
            await respond(send, 404, orjson.dumps({"code": 5, "message": f"no route {method} {path}; "
                                                   "send traces to POST /v1/traces and logs to POST /v1/logs"}))

    async def _export(self, scope: Scope, receive: Receive, path: str) -> tuple[int, bytes, bytes]:
        content_type = header(scope, b"content-type") or ""
        protobuf = "json" not in content_type.lower()
        ctype = PROTOBUF if protobuf else b"application/json"
        try:
            self.keys.authorize(header(scope, b"authorization"), "traces")
        except HttpError as exc:
            return exc.status, status_body(protobuf, GRPC_UNAUTHENTICATED if exc.status == 401
                                           else GRPC_PERMISSION_DENIED, exc.message), ctype
        try:
            raw = await read_body(receive, self.settings.max_body)
        except HttpError as exc:
            message = exc.message if exc.status != 413 else (
                f"request body is larger than {self.settings.max_body} bytes (ROLLSTREAM_OTLP_MAX_BODY)")
            return exc.status, status_body(protobuf, GRPC_INVALID_ARGUMENT, message), ctype
        try:
            body = _decompress(raw, header(scope, b"content-encoding"))
            if path == "/v1/logs":
                self._logs(decode_logs(body, content_type))
                return 200, ExportLogsServiceResponse().SerializeToString() if protobuf else b"{}", ctype
            request = decode_request(body, content_type)
        except OtlpError as exc:
            status = 415 if str(exc).startswith("unsupported content type") else 400
            log.info("refused an export request (%d): %s", status, exc)
            return status, status_body(protobuf, GRPC_INVALID_ARGUMENT, str(exc)), ctype
        traces = sorted({span.trace_id.hex() for rs in request.resource_spans for ss in rs.scope_spans
                         for span in ss.spans})
        async with contextlib.AsyncExitStack() as stack:
            for trace in traces:  # sorted: two exports of the same traces never hold one lock each
                await stack.enter_async_context(self._trace_lock(trace))
            return await self._publish(request, protobuf, ctype)

    @contextlib.asynccontextmanager
    async def _trace_lock(self, trace: str) -> AsyncIterator[None]:
        """While an export of a trace waits for tokens or content, a later export of that trace (with its
        root span: the rollout's end) waits too, so that a rollout never ends before its calls are out."""
        lock, users = self.trace_locks.get(trace, (asyncio.Lock(), 0))
        self.trace_locks[trace] = (lock, users + 1)
        try:
            async with lock:
                yield
        finally:
            lock, users = self.trace_locks[trace]
            if users == 1:
                del self.trace_locks[trace]
            else:
                self.trace_locks[trace] = (lock, users - 1)

    async def _publish(self, request: Any, protobuf: bool, ctype: bytes) -> tuple[int, bytes, bytes]:
        deadline = time.monotonic() + self.settings.join_wait
        mapped = map_request(request, self.settings.policy, self.cache)
        if mapped.empty_spans and self.settings.join_wait > 0 and await self._content(mapped.empty_spans, deadline):
            mapped = remap(mapped, self.settings.policy, self.cache)  # again, with the log events now here
        try:
            for record in (*mapped.calls, *mapped.rewards, *mapped.rollouts):
                self.redactor.record(record)
        except RedactionError as exc:  # fail closed: nothing of this export is published
            log.error("refused an export: %s", exc)
            return 500, status_body(protobuf, GRPC_INTERNAL, str(exc)), ctype
        await self._join(mapped.calls, deadline)
        self._sequence(mapped.calls)
        items: list[tuple[str, str, Payload]] = [(self.topics.calls, c["rollout_id"], c) for c in mapped.calls]
        items += [(self.topics.rewards, r["rollout_id"], r) for r in mapped.rewards]
        items += [(self.topics.rollouts, e["rollout_id"], e) for e in mapped.rollouts]
        try:
            if items:
                self.emitter.submit_many(items)
        except QueueFullError as exc:
            return 503, status_body(protobuf, GRPC_UNAVAILABLE, str(exc)), ctype
        except RollstreamError as exc:
            return 500, status_body(protobuf, GRPC_INTERNAL, str(exc)), ctype
        for call in mapped.calls:
            self.cache.published(call["metadata"]["trace_id"], call["metadata"]["span_id"])
        m = self.metrics
        m.spans.labels("llm").inc(len({c["metadata"]["span_id"] for c in mapped.calls}))
        m.spans.labels("reward").inc(len(mapped.rewards))
        m.spans.labels("ignored").inc(mapped.ignored)
        m.spans.labels("unattributed").inc(mapped.unattributed)
        if mapped.calls:
            m.events.labels(self.topics.calls).inc(len(mapped.calls))
        if mapped.rewards:
            m.events.labels(self.topics.rewards).inc(len(mapped.rewards))
        if mapped.rollouts:
            m.events.labels(self.topics.rollouts).inc(len(mapped.rollouts))
        m.rejected.inc(mapped.rejected)
        m.spans.labels("held").inc(mapped.held)
        m.spans.labels("expired").inc(mapped.expired)
        m.no_content.inc(mapped.no_content)
        if not mapped.rejected:
            return 200, ExportTraceServiceResponse().SerializeToString() if protobuf else b"{}", ctype
        message = "; ".join(mapped.errors) + (f"; and {mapped.rejected - len(mapped.errors)} more"
                                              if mapped.rejected > len(mapped.errors) else "")
        log.info("refused %d of %d spans: %s", mapped.rejected, mapped.spans, message)
        if protobuf:
            answer = ExportTraceServiceResponse()
            answer.partial_success.rejected_spans = mapped.rejected
            answer.partial_success.error_message = message
            return 200, answer.SerializeToString(), ctype
        return 200, orjson.dumps({"partialSuccess": {"rejectedSpans": str(mapped.rejected),
                                                     "errorMessage": message}}), ctype

    async def _content(self, spans: list[tuple[str, str]], deadline: float) -> bool:
        """Wait (until ``deadline``) for log events of LLM spans that came without content; whether any came."""
        while time.monotonic() < deadline:
            if all(self.cache.has_logs(*s) for s in spans):
                return True
            await asyncio.sleep(0.05)
        return any(self.cache.has_logs(*s) for s in spans)

    async def _join(self, calls: list[dict[str, Any]], deadline: float) -> None:
        """Give calls without token ids the gateway's record of the same response, when there is one."""
        if self.index is None:
            return
        if self._gateway_silent and len(self.index) == 0:  # no gateway records calls here: no wait for it
            return
        lacking = [c for c in calls if c["prompt_token_ids"] is None or c["response_token_ids"] is None]
        if not lacking:
            return
        with_id = [c for c in lacking if c["metadata"].get("response_id")]
        if len(with_id) < len(lacking):
            self.metrics.joined.labels("no_response_id").inc(len(lacking) - len(with_id))
        if not with_id:
            return
        wait = max(0.0, deadline - time.monotonic())
        found = await asyncio.gather(*(self.index.wait_for(c["metadata"]["response_id"],
                                                           int(c["metadata"].get("choice_index", 0)), wait)
                                       for c in with_id))
        # Nothing found and nothing indexed at all: no gateway records calls of no rollout here. Wait no more
        # until its first record comes (a first call's record may still be on its way, so the first wait is whole).
        self._gateway_silent = all(r is None for r in found) and len(self.index) == 0
        for call, record in zip(with_id, found, strict=True):
            if record is None:
                self.metrics.joined.labels("missing").inc()
                continue
            self.metrics.joined.labels("gateway").inc()
            # The gateway's token ids encode the gateway's text: not taken where that text holds what is redacted here.
            leaky = self._leaky(record)
            call.update(prompt_token_ids=None if "prompt" in leaky else record["prompt_token_ids"],
                        response_token_ids=None if "response" in leaky else record["response_token_ids"],
                        response_logprobs=None if "response" in leaky else record["response_logprobs"],
                        policy=record["policy"] or call["policy"],
                        policy_version=record["policy_version"] or call["policy_version"])
            if leaky:
                call["metadata"]["redacted_tokens"] = ",".join(sorted(leaky))
            call["metadata"]["tokens_from"] = "gateway"
            call["metadata"]["gateway_call_id"] = str(record["call_id"])

    def _leaky(self, record: dict[str, Any]) -> set[str]:
        try:
            return self.redactor.leaky_sides(record)
        except RedactionError:
            return {"prompt", "response"}  # cannot tell: take none of its token ids

    def _logs(self, request: Any) -> None:
        """Keep each GenAI log event for the span it was emitted in (by trace and span id)."""
        counts = {"genai": 0, "late": 0, "ignored": 0}
        for rl in request.resource_logs:
            for sl in rl.scope_logs:
                for record in sl.log_records:
                    attrs = attributes(record.attributes)
                    name = record.event_name or str(attrs.get("event.name") or "")
                    if not name.startswith(GENAI_EVENT_PREFIX) or len(record.trace_id) != 16 \
                            or len(record.span_id) != 8:
                        counts["ignored"] += 1
                        continue
                    kept = self.cache.add_log(record.trace_id.hex(), record.span_id.hex(),
                                              (name, attrs, any_value(record.body)))
                    counts["genai" if kept else "late"] += 1
        for kind, n in counts.items():
            if n:
                self.metrics.logs.labels(kind).inc(n)
        if counts["late"]:
            log.warning("%d GenAI log event(s) arrived after their span was published; their content is not "
                        "in the recorded calls (export logs before traces, or with a shorter batch delay)",
                        counts["late"])

    def _sequence(self, calls: list[dict[str, Any]]) -> None:
        """Calls without ``rollstream.sequence`` are numbered per rollout attempt in start-time order."""
        numbered: dict[str, int] = {}
        for call in sorted(calls, key=lambda c: (c["start_time"], c["call_id"])):
            if call["sequence"] >= 0:
                continue
            span = call["metadata"]["span_id"]
            if span not in numbered:  # the choices of one span share its number
                numbered[span] = self.tracker.next_sequence(call["rollout_id"], call["attempt"])
            call["sequence"] = numbered[span]


def _decompress(body: bytes, encoding: str | None) -> bytes:
    encoding = (encoding or "identity").strip().lower()
    try:
        if encoding == "gzip":
            return gzip.decompress(body)
        if encoding == "deflate":
            return zlib.decompress(body)
    except (OSError, zlib.error, EOFError) as exc:
        raise OtlpError(f"body is not valid {encoding} data: {exc}") from exc
    if encoding != "identity":
        raise OtlpError(f"unsupported content encoding {encoding!r}; use gzip or none")
    return body


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="rollstream otlp", description=(__doc__ or "").split("\n\n")[0])
    p.add_argument("--host", help="listen address (ROLLSTREAM_OTLP_HOST)")
    p.add_argument("--port", type=int, help="listen port (ROLLSTREAM_OTLP_PORT, default 4318)")
    p.add_argument("--policy", help="policy recorded on calls whose spans name none (ROLLSTREAM_OTLP_POLICY)")
    p.add_argument("--queue-max", type=int, help="events held in memory while Kafka is unavailable")
    redaction_flags(p)
    p.add_argument("--kafka-bootstrap", help="Kafka bootstrap servers (ROLLSTREAM_KAFKA_BOOTSTRAP)")
    p.add_argument("--schema-registry-url", help="schema registry URL (ROLLSTREAM_SCHEMA_REGISTRY_URL)")
    p.add_argument("--topic-prefix", help="topic prefix (ROLLSTREAM_TOPIC_PREFIX)")
    p.add_argument("--no-create-topics", action="store_true", help="do not create missing topics at start")
    p.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    return p


def main(argv: list[str] | None = None) -> int:
    """Run the receiver until interrupted; 2 on a configuration error."""
    import uvicorn

    args = build_parser().parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        settings = OtlpSettings.from_args(args, "host", "port", "policy", "queue_max",
                                          redaction=settings_from_flags(args))
        conn = ConnectionSettings.from_args(args, "kafka_bootstrap", "schema_registry_url", "topic_prefix")
        keys = KeyRing.from_text(settings.api_keys, "ROLLSTREAM_OTLP_API_KEYS", OTLP_SCOPES)
        guard_unauthenticated(keys, settings.host, "OTLP receiver", "ROLLSTREAM_OTLP_API_KEYS", "exporter-key=traces")
        codec = prepare_codec(conn, ["LlmCall", "Reward", "RolloutEvent"], create_missing=not args.no_create_topics)
    except RollstreamError as exc:
        log.error("%s", exc)
        return 2
    emitter = EventEmitter(codec, conn, queue_max=settings.queue_max, on_full="raise", delivery_timeout_ms=0,
                           name="otlp-events")
    index = ResponseIndex(conn, codec.topics) if settings.gateway_join else None
    if index is not None:
        index.start()
    app = OtlpReceiver(settings, emitter, codec.topics, index=index)
    log.info("OTLP receiver on http://%s:%d/v1/traces; events to %s* (queue %d)", settings.host, settings.port,
             codec.topics.prefix, settings.queue_max)
    if app.redactor.active:
        log.info("redacting captured text: %s", ", ".join(app.redactor.rule_names))
    config = uvicorn.Config(app, host=settings.host, port=settings.port, lifespan="on", access_log=False,
                            log_level="warning")
    # uvicorn re-raises the signal that stopped it once it has shut down; with this handler in
    # place a SIGTERM ends run() normally, so the queued events are flushed below.
    signal.signal(signal.SIGTERM, lambda *_: None)
    try:
        uvicorn.Server(config).run()
    finally:
        if index is not None:
            index.close()
        remaining = emitter.close(timeout=30.0)
        if remaining:
            log.error("%d event(s) still undelivered at shutdown; they are lost", remaining)
    return 0 if remaining == 0 else 1
