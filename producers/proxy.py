"""Forwarding model calls to the OpenAI-compatible backend and capturing them as LlmCall events.

Whole responses are parsed, recorded and answered with what the client asked for; streams
are relayed event by event as they arrive while the call is assembled from the chunks.
The Responses and Messages routes have no backend route to relay to: they are translated to
chat completions (``responses``, ``messages``) and back, recorded or not. The backend's
``X-Policy-Version`` header is passed on to the client.

Calls without a rollout are captured the same way but published to ``calls-by-response`` instead
of ``calls``, keyed by the id of the answer the client got (the backend's ``id``; a translated
call's own ``resp_...`` or ``msg_...``), which OpenTelemetry instrumentations report as
``gen_ai.response.id``: the OTLP receiver finds their token ids there (``response_index``). They
carry ``rollout_id`` "" and metadata ``response_id`` and ``choice_index``. Their recording is best
effort: it is dropped (and counted) once the event queue is half full (``unattributed_depth``), so
that they never crowd out calls of rollouts, and the answer never waits for Kafka. With
``ROLLSTREAM_GATEWAY_RECORD_UNATTRIBUTED=0`` they are relayed untouched (but for the model name,
see ``model_names``) and only counted.

Acknowledgements (``acks="kafka"``, the default): a whole answer is sent once Kafka
acknowledged the call's LlmCall events; a stream is relayed as it comes except its
``data: [DONE]`` (and the end of the body), held until the acknowledgement. The answer is
the model's either way: past ``ack_timeout`` (or when Kafka refused an event) a whole answer
carries ``X-Rollstream-Recorded: pending`` (or ``failed``) and a stream gets the SSE comment
``: rollstream-recorded pending`` (or ``failed``) just before ``data: [DONE]``; SSE clients
ignore comments. Each such answer counts in ``rollstream_gateway_unacknowledged_total``. A
pending event stays queued and is delivered when Kafka can take it. With ``acks="queued"``
nothing waits.

With a ``redactor`` (``redact``), every request is redacted before it is forwarded (recorded or not,
so the model's view never depends on recording), and every event before it is published.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any, Literal

import aiohttp
import orjson

from rollstream.errors import SerializationError
from rollstream.producers.capture import (
    CallAssembler,
    CallContext,
    ClientWants,
    Endpoint,
    prepare_request,
    strip_chunk,
    strip_response,
)
from rollstream.producers.dialect import DialectCall
from rollstream.producers.http import JSON_HEADERS, HttpError, Receive, Scope, Send, error_body, read_body, respond
from rollstream.producers.messages import MessagesCall
from rollstream.producers.metrics import GatewayMetrics
from rollstream.producers.model_names import BACKEND_MODEL, ModelMap
from rollstream.producers.publisher import Acks, Delivery, Publisher, Recorded, acknowledgement
from rollstream.producers.redact import RedactionError, Redactor
from rollstream.producers.responses import ResponsesCall

log = logging.getLogger(__name__)

OnFull = Literal["reject", "serve-and-count"]
SSE_HEADERS = [(b"content-type", b"text/event-stream"), (b"cache-control", b"no-cache")]
RECORDED_HEADER = b"x-rollstream-recorded"
SSE_DONE = b"data: [DONE]"
TRACKED_ROLLOUTS = 100_000
# Queue room reserved per call is its n, up to this; a larger n is the backend's to refuse (4xx),
# not a reason to answer 503 as if Kafka were away.
MAX_RESERVED_CHOICES = 128
DIALECTS: dict[str, type[ResponsesCall] | type[MessagesCall]] = {"RESPONSES": ResponsesCall, "MESSAGES": MessagesCall}
BACKEND_MODEL_RETRY_S = 5.0  # how soon to ask the backend for its model again after it could not say


@dataclass(frozen=True)
class Attribution:
    """Which rollout (and attempt, and agent) a call belongs to."""

    rollout_id: str
    attempt: int | None = None
    agent_name: str | None = None


class RolloutTracker:
    """Per-(rollout, attempt) call counters and the attempt each rollout last started, bounded (LRU)."""

    def __init__(self, capacity: int = TRACKED_ROLLOUTS) -> None:
        self.capacity = capacity
        self._sequences: OrderedDict[tuple[str, int], int] = OrderedDict()
        self._attempts: OrderedDict[str, int] = OrderedDict()

    def _put(self, table: OrderedDict[Any, int], key: Any, value: int) -> None:
        table[key] = value
        table.move_to_end(key)
        if len(table) > self.capacity:
            table.popitem(last=False)

    def started(self, rollout_id: str, attempt: int) -> None:
        self._put(self._attempts, rollout_id, attempt)

    def attempt(self, rollout_id: str) -> int:
        return self._attempts.get(rollout_id, 1)

    def next_sequence(self, rollout_id: str, attempt: int) -> int:
        key = (rollout_id, attempt)
        sequence = self._sequences.get(key, 0)
        self._put(self._sequences, key, sequence + 1)
        return sequence


def _backend_message(status: int, raw: bytes) -> str:
    try:
        data = orjson.loads(raw)
        error = data.get("error", data) if isinstance(data, dict) else data
        message = error.get("message", error) if isinstance(error, dict) else error
    except orjson.JSONDecodeError:
        message = raw[:2000].decode(errors="replace")
    return f"backend answered HTTP {status}: {message}"


def _passed_headers(headers: Any) -> list[tuple[bytes, bytes]]:
    """The backend's response headers that the client gets too (X-Policy-Version)."""
    value = headers.get("X-Policy-Version")
    return [] if value is None else [(b"x-policy-version", value.encode("latin-1"))]


def _json_object(raw: bytes) -> dict[str, Any]:
    try:
        body = orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        raise HttpError(400, f"request body is not valid JSON: {exc}") from exc
    if not isinstance(body, dict):
        raise HttpError(400, "request body must be a JSON object")
    return body


def _version_header(headers: Any) -> int | None:
    value = headers.get("X-Policy-Version")
    try:
        return int(value) if value is not None else None
    except ValueError:
        return None


class ModelProxy:
    """The OpenAI-compatible endpoints: forward, relay, capture, publish."""

    def __init__(
        self,
        backend_url: str,
        publisher: Publisher,
        metrics: GatewayMetrics,
        calls_topic: str,
        *,
        responses_topic: str | None = None,
        unattributed_depth: int | None = None,
        backend_api_key: str = "",
        timeout: float = 600.0,
        connections: int = 512,
        on_full: OnFull = "reject",
        policy: str = "",
        policy_version: int = 0,
        max_body: int = 32 * 1024 * 1024,
        acks: Acks = "kafka",
        ack_timeout: float = 10.0,
        body_timeout: float = 30.0,
        model_map: ModelMap | None = None,
        redactor: Redactor | None = None,
    ) -> None:
        self.backend_url = backend_url.rstrip("/")
        self.publisher = publisher
        self.metrics = metrics
        self.calls_topic = calls_topic
        self.responses_topic = responses_topic  # where calls of no rollout are recorded; None: they are not
        # The queue depth up to which they are: the rest of the queue is kept for what rollouts need.
        self.unattributed_depth = unattributed_depth
        self.timeout = timeout
        self.connections = connections
        self.on_full = on_full
        self.policy = policy
        self.policy_version = policy_version  # the last version the backend reported
        self.max_body = max_body
        self.acks = acks
        self.ack_timeout = ack_timeout
        self.body_timeout = body_timeout
        self.tracker = RolloutTracker()
        self.model_map = model_map or ModelMap()
        self.redactor = redactor or Redactor()  # no rules: inactive
        self._backend_model: str | None = None
        self._backend_model_retry = 0.0
        self._backend_model_lock = asyncio.Lock()
        self.headers = {"Content-Type": "application/json"}
        if backend_api_key:
            self.headers["Authorization"] = f"Bearer {backend_api_key}"
        self._session: aiohttp.ClientSession | None = None

    async def start(self) -> None:
        self._session = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(limit=self.connections, keepalive_timeout=60.0),
            timeout=aiohttp.ClientTimeout(total=None, sock_connect=self.timeout, sock_read=self.timeout),
            auto_decompress=False,
        )

    async def stop(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    @property
    def session(self) -> aiohttp.ClientSession:
        if self._session is None:
            raise RuntimeError("ModelProxy.start() was not awaited (the ASGI lifespan did not run)")
        return self._session

    # --- forwarding ---------------------------------------------------------------

    async def _call(self, method: str, suffix: str, payload: bytes | None) -> aiohttp.ClientResponse:
        url = self.backend_url + suffix
        try:
            return await self.session.request(method, url, data=payload, headers=self.headers)
        except TimeoutError as exc:
            self.metrics.backend_errors.labels("timeout").inc()
            raise HttpError(504, f"backend {url} did not answer within {self.timeout:.0f}s") from exc
        except aiohttp.ClientError as exc:
            self.metrics.backend_errors.labels("unreachable").inc()
            raise HttpError(502, f"backend {url} is unreachable: {exc}") from exc

    async def _read(self, resp: aiohttp.ClientResponse) -> bytes:
        try:
            return await resp.read()
        except TimeoutError as exc:
            self.metrics.backend_errors.labels("timeout").inc()
            raise HttpError(504, f"backend did not finish its answer within {self.timeout:.0f}s") from exc
        except aiohttp.ClientError as exc:
            self.metrics.backend_errors.labels("broken").inc()
            raise HttpError(502, f"backend connection broke: {exc}") from exc

    async def _check(self, resp: aiohttp.ClientResponse) -> None:
        """Client errors pass through unchanged; backend failures become 502."""
        if resp.status < 400:
            return
        raw = await self._read(resp)
        if resp.status < 500:
            ctype = resp.headers.get("Content-Type", "application/json").encode("latin-1")
            raise _Passthrough(resp.status, raw, [(b"content-type", ctype), *_passed_headers(resp.headers)])
        self.metrics.backend_errors.labels(f"http_{resp.status}").inc()
        raise HttpError(502, _backend_message(resp.status, raw), code="backend_error")

    async def _backend_models(self) -> tuple[int, bytes, list[tuple[bytes, bytes]]]:
        """The backend's ``GET /models``: status (502 for its failures), body and the headers passed on."""
        resp = await self._call("GET", "/models", None)
        async with resp:
            raw = await self._read(resp)
        if resp.status >= 500:
            return 502, error_body(502, _backend_message(resp.status, raw)), []
        return resp.status, raw, [*JSON_HEADERS, *_passed_headers(resp.headers)]

    async def models(self, send: Send) -> None:
        status, raw, headers = await self._backend_models()
        await respond(send, status, raw, headers)

    async def model(self, send: Send, model_id: str) -> None:
        """``GET /models/{id}``: the backend's model that ``model_id`` names (under the client's name), or 404."""
        target = self.model_map.target(model_id)
        if target is BACKEND_MODEL:
            target = await self.backend_model()
        status, raw, headers = await self._backend_models()
        if status != 200:
            await respond(send, status, raw, headers)
            return
        try:
            listed = orjson.loads(raw).get("data")
            found = next((m for m in listed if isinstance(m, dict) and m.get("id") == target), None)
        except (orjson.JSONDecodeError, AttributeError, TypeError):
            found = None
        if found is None:
            raise HttpError(404, f"the model '{model_id}' does not exist (see GET /v1/models and "
                                 "ROLLSTREAM_GATEWAY_MODEL_MAP)", param="model", code="model_not_found")
        await respond(send, 200, orjson.dumps({**found, "id": model_id}), headers)

    # --- model names ------------------------------------------------------------------

    async def backend_model(self) -> str | None:
        """The backend's own model (its first ``GET /models`` id), asked once and kept; None while it cannot say."""
        if self._backend_model is not None or time.monotonic() < self._backend_model_retry:
            return self._backend_model
        async with self._backend_model_lock:
            if self._backend_model is None and time.monotonic() >= self._backend_model_retry:
                try:
                    status, raw, _ = await self._backend_models()
                    self._backend_model = str(orjson.loads(raw)["data"][0]["id"]) if status == 200 else None
                except (HttpError, orjson.JSONDecodeError, LookupError, TypeError):
                    pass
                if self._backend_model is None:
                    log.warning("the backend did not name its model (GET %s/models); model names pass unchanged "
                                "for %.0f s", self.backend_url, BACKEND_MODEL_RETRY_S)
                    self._backend_model_retry = time.monotonic() + BACKEND_MODEL_RETRY_S
        return self._backend_model

    async def _rename(self, body: dict[str, Any]) -> bool:
        """Put the backend's name for the client's model in ``body``; whether it changed."""
        if self.model_map.identity:
            return False
        name = body.get("model")
        target = self.model_map.target(name if isinstance(name, str) else None)
        if target is BACKEND_MODEL:
            target = await self.backend_model()
        if target is None or target == name:
            return False
        body["model"] = target
        return True

    async def _renamed(self, raw: bytes) -> bytes:
        """A request to relay, with the backend's model name (unchanged bytes when the name is the same)."""
        if self.model_map.identity:
            return raw
        try:
            body = orjson.loads(raw)
        except orjson.JSONDecodeError:
            return raw  # the backend says what is wrong with it
        return orjson.dumps(body) if isinstance(body, dict) and await self._rename(body) else raw

    # --- model calls ----------------------------------------------------------------

    async def handle(
        self, endpoint: Endpoint, scope: Scope, receive: Receive, send: Send, who: Attribution | None
    ) -> None:
        try:
            await self._handle(endpoint, receive, send, who)
        except _Passthrough as passed:
            if endpoint == "MESSAGES":  # an Anthropic client reads Anthropic's error shape
                raise HttpError(passed.status, _backend_message(passed.status, passed.body)) from None
            await respond(send, passed.status, passed.body, passed.headers)

    async def _handle(self, endpoint: Endpoint, receive: Receive, send: Send, who: Attribution | None) -> None:
        raw = await read_body(receive, self.max_body, self.body_timeout)
        suffix = "/completions" if endpoint == "COMPLETIONS" else "/chat/completions"
        translate = DIALECTS.get(endpoint)
        if who is None:
            self.metrics.unattributed.inc()
        body = self._recordable(raw) if who is None and translate is None else _json_object(raw)
        if body is None:
            await self._relay(suffix, await self._renamed(self._redacted_raw(raw)), send)
            return
        dialect = translate(body) if translate is not None else None
        if dialect is not None:
            body = dialect.chat
        body = self._redacted(body)  # before the backend sees it: its prompt token ids are of the redacted text
        request = dict(body)  # as recorded: with the client's model name
        await self._rename(body)
        record = who is not None or self.responses_topic is not None
        if record:
            n: int = body["n"] if isinstance(body.get("n"), int) else 1
            n = min(max(n, 1), MAX_RESERVED_CHOICES)
            if not self._has_room(n, who):
                if who is not None and self.on_full == "reject":  # a call of no rollout is served unrecorded
                    self.metrics.rejected.labels(endpoint.lower()).inc()
                    raise HttpError(
                        503, "the gateway's event queue is full (Kafka is unavailable or slow); retry later",
                        code="event_queue_full",
                    )
                record = False
                self.metrics.events_dropped.labels("queue_full").inc(n)
        if not record and dialect is None:
            await self._relay(suffix, orjson.dumps(body), send)
            return
        call = self._assembler(who, endpoint, request, dialect) if record else None
        wants = prepare_request("CHAT_COMPLETIONS" if dialect is not None else endpoint, body)
        resp = await self._call("POST", suffix, orjson.dumps(body))
        async with resp:
            await self._check(resp)
            version = _version_header(resp.headers)
            if version is not None:
                self.policy_version = version
            answer = _Answer(endpoint, call, wants, version, dialect, _passed_headers(resp.headers))
            if body.get("stream") and resp.content_type == "text/event-stream":
                await self._stream(resp, send, answer)
            else:
                await self._whole(await self._read(resp), send, answer)

    def _redacted(self, body: dict[str, Any]) -> dict[str, Any]:
        """The request as the backend may see it; a failing redaction hook forwards nothing (500)."""
        try:
            return self.redactor.request(body)
        except RedactionError as exc:
            raise HttpError(500, f"the request was not forwarded: {exc}", code="redaction_failed") from exc

    def _redacted_raw(self, raw: bytes) -> bytes:
        """A body relayed unparsed, redacted when redaction is on (unchanged bytes when nothing matched)."""
        if not self.redactor.active:
            return raw
        try:
            body = orjson.loads(raw)
        except orjson.JSONDecodeError:
            return raw  # the backend says what is wrong with it
        if not isinstance(body, dict):
            return raw
        redacted = self._redacted(body)
        return raw if redacted is body else orjson.dumps(redacted)

    def _has_room(self, n: int, who: Attribution | None) -> bool:
        if who is None and self.unattributed_depth is not None and self.publisher.depth() + n > self.unattributed_depth:
            return False
        return self.publisher.has_room(n)

    def _recordable(self, raw: bytes) -> dict[str, Any] | None:
        """The body of a chat or completions call of no rollout, to record; None to relay it untouched: recording
        is off, or it is no JSON object (the backend says what is wrong with it)."""
        if self.responses_topic is None:
            return None
        try:
            return _json_object(raw)
        except HttpError:
            return None

    def _assembler(self, who: Attribution | None, endpoint: Endpoint, request: dict[str, Any],
                   dialect: DialectCall | None) -> CallAssembler:
        """Where a call to record is assembled: in its rollout's order, or of no rollout (rollout id "")."""
        rollout_id, attempt, agent_name, sequence = "", 1, None, 0
        if who is not None:
            rollout_id, agent_name = who.rollout_id, who.agent_name
            attempt = who.attempt or self.tracker.attempt(who.rollout_id)
            sequence = self.tracker.next_sequence(who.rollout_id, attempt)
        call = CallAssembler(CallContext(
            rollout_id=rollout_id,
            attempt=attempt,
            agent_name=agent_name,
            sequence=sequence,
            endpoint=endpoint,
            request=request,
            policy=self.policy,
            policy_version=self.policy_version,
        ))
        if dialect is not None:
            call.response_id = dialect.id  # the client's answer carries the dialect's id, not the backend's
        return call

    async def _relay(self, suffix: str, raw: bytes, send: Send) -> None:
        """An unrecorded call: the backend's answer goes to the client byte for byte."""
        resp = await self._call("POST", suffix, raw)
        async with resp:
            await self._check(resp)
            ctype = resp.headers.get("Content-Type", "application/json").encode("latin-1")
            passed = _passed_headers(resp.headers)
            if resp.content_type != "text/event-stream":
                await respond(send, resp.status, await self._read(resp), [(b"content-type", ctype), *passed])
                return
            await send({"type": "http.response.start", "status": resp.status, "headers": [*SSE_HEADERS, *passed]})
            try:
                async for data in resp.content.iter_any():
                    await send({"type": "http.response.body", "body": data, "more_body": True})
            except (TimeoutError, aiohttp.ClientError) as exc:
                log.warning("backend stream broke: %s", exc)
            await send({"type": "http.response.body", "body": b""})

    def _record(self, call: CallAssembler, events: list[dict[str, Any]]) -> Delivery | None:
        """Publish a call's events. A rollout's go to calls: their Delivery, None when the queue is full. A call of
        no rollout's go to calls-by-response under its response id, and nobody waits for them: always None."""
        if call.ctx.rollout_id:
            return self._publish(self.calls_topic, events, call.ctx.rollout_id)
        if not events or self.responses_topic is None:
            return None
        if call.response_id is None:  # nothing to find it by
            self.metrics.events_dropped.labels("no_response_id").inc(len(events))
            return None
        delivery = self._publish(self.responses_topic, events, call.response_id)
        if delivery is not None and delivery.error is None:
            self.metrics.unattributed_recorded.inc()
        return None

    def _publish(self, topic: str, events: list[dict[str, Any]], key: str) -> Delivery | None:
        """The events' Delivery; None when the queue is full."""
        try:
            events = [self.redactor.record(e) for e in events]
        except RedactionError:
            log.exception("could not redact the LlmCall events keyed %r; not recorded", key)
            self.metrics.events_dropped.labels("redaction_error").inc(len(events))
            return Delivery.settled("redaction failed")  # fail closed; the client still gets its answer
        try:
            delivery = self.publisher.publish(topic, key, events)
        except SerializationError as exc:
            log.exception("could not encode the LlmCall events keyed %r; not recorded", key)
            self.metrics.events_dropped.labels("encode_error").inc(len(events))
            return Delivery.settled(f"cannot encode: {exc}")  # a bug of ours, not the client's: serve the answer
        if delivery is None:
            self.metrics.events_dropped.labels("queue_full").inc(len(events))
        return delivery

    async def _acknowledged(self, delivery: Delivery | None, endpoint: Endpoint) -> Recorded | None:
        """What ``X-Rollstream-Recorded`` says (pending or failed), or None once acknowledged."""
        return await acknowledgement(delivery, self.acks, self.ack_timeout, self.metrics, endpoint.lower())

    async def _whole(self, raw: bytes, send: Send, answer: _Answer) -> None:
        call, wants, dialect = answer.call, answer.wants, answer.dialect
        try:
            data = orjson.loads(raw)
        except orjson.JSONDecodeError as exc:
            raise HttpError(502, f"backend answered with invalid JSON: {exc}") from exc
        if not isinstance(data, dict):
            raise HttpError(502, f"backend answered with a JSON {type(data).__name__}, not a completion object")
        delivery = None
        if call is not None:
            call.add_response(data)
            if call.policy_version is not None:
                self.policy_version = call.policy_version
            delivery = self._record(call, call.events(answer.version))
            if delivery is None and call.ctx.rollout_id and self.on_full == "reject":
                self.metrics.rejected.labels(call.ctx.endpoint.lower()).inc()
                raise HttpError(503, "the call succeeded but could not be recorded (event queue full); retry later",
                                code="event_queue_full")
        if dialect is not None:
            raw = orjson.dumps(dialect.answer(data))
        elif wants.strips:
            strip_response(data, wants)
            raw = orjson.dumps(data)
        recorded = await self._acknowledged(delivery, answer.endpoint)
        await respond(send, 200, raw, [*JSON_HEADERS, *answer.headers] if recorded is None else
                      [*JSON_HEADERS, *answer.headers, (RECORDED_HEADER, recorded.encode())])

    def _sse_event(self, event: bytes, answer: _Answer) -> bytes | None:
        """One SSE event (without its blank line) as the client should see it, with its blank line; None to drop it.

        A translated call's client gets its own protocol's events for each chunk instead."""
        dialect = answer.dialect
        if not event.startswith(b"data:"):
            return event + b"\n\n" if dialect is None else None
        payload = event[5:].strip()
        try:
            chunk = orjson.loads(payload) if payload.startswith(b"{") else None
        except orjson.JSONDecodeError:
            chunk = None
        if not isinstance(chunk, dict):
            return event + b"\n\n" if dialect is None else None
        if answer.call is not None:
            answer.call.add_chunk(chunk)
        if dialect is not None:
            return dialect.stream_chunk(chunk) or None
        if not answer.wants.strips:
            return event + b"\n\n"
        if not strip_chunk(chunk, answer.wants):
            return None
        return b"data: " + orjson.dumps(chunk) + b"\n\n"

    async def _stream(self, resp: aiohttp.ClientResponse, send: Send, answer: _Answer) -> None:
        call, dialect = answer.call, answer.dialect
        await send({"type": "http.response.start", "status": 200, "headers": [*SSE_HEADERS, *answer.headers]})
        if dialect is not None and (first := dialect.stream_start()):
            await send({"type": "http.response.body", "body": first, "more_body": True})
        pending = b""
        complete = done = broke = False
        try:
            async for data in resp.content.iter_any():
                pending += data.replace(b"\r\n", b"\n") if b"\r" in data else data
                out = []
                while (cut := pending.find(b"\n\n")) >= 0:
                    event, pending = pending[:cut], pending[cut + 2:]
                    if event == SSE_DONE or (event.startswith(b"data:") and event[5:].strip() == b"[DONE]"):
                        complete = done = True  # held back until the events are recorded
                        continue
                    relayed = self._sse_event(event, answer)
                    if relayed is not None:
                        out.append(relayed)
                if out:
                    await send({"type": "http.response.body", "body": b"".join(out), "more_body": True})
            complete = complete or not pending.strip()
        except (TimeoutError, aiohttp.ClientError) as exc:
            log.warning("backend stream for rollout %s broke: %s", call.ctx.rollout_id if call else None, exc)
            broke = True
            error = {"error": {"message": f"backend stream broke: {exc}", "type": "backend_error", "code": 502}}
            await send({"type": "http.response.body", "more_body": True,
                        "body": b"data: " + orjson.dumps(error) + b"\n\n" if dialect is None
                        else dialect.stream_failed(f"backend stream broke: {exc}")})
        except OSError as exc:  # the client went away
            log.info("client left the stream of rollout %s: %s", call.ctx.rollout_id if call else None, exc)
            if call is not None:
                self.metrics.events_dropped.labels("client_disconnected").inc(max(len(call.choices), 1))
            return
        delivery = None
        if call is not None:
            if call.policy_version is not None:
                self.policy_version = call.policy_version
            events = call.events(answer.version) if complete else []
            if len(events) < len(call.choices):
                self.metrics.events_dropped.labels("incomplete").inc(len(call.choices) - len(events))
            delivery = self._record(call, events) if events else None
        recorded = await self._acknowledged(delivery, answer.endpoint)
        tail = b"" if recorded is None else b": rollstream-recorded " + recorded.encode() + b"\n\n"
        if dialect is not None and not broke:
            tail += dialect.stream_end() if complete else dialect.stream_failed("the backend's stream ended early")
        elif done:
            tail += SSE_DONE + b"\n\n"
        await send({"type": "http.response.body", "body": tail})


@dataclass(frozen=True)
class _Answer:
    """How to answer one forwarded call: what to record it in (None: not recorded), what the client asked for,
    the protocol to translate to (None: chat or completions as they are), the headers passed on."""

    endpoint: Endpoint
    call: CallAssembler | None
    wants: ClientWants
    version: int | None
    dialect: DialectCall | None
    headers: list[tuple[bytes, bytes]]


class _Passthrough(Exception):  # noqa: N818 - control flow, not an error of ours
    """A backend client error (4xx) to hand to the client unchanged."""

    def __init__(self, status: int, body: bytes, headers: list[tuple[bytes, bytes]]) -> None:
        super().__init__(status)
        self.status = status
        self.body = body
        self.headers = headers
