"""Forwarding model calls to the OpenAI-compatible backend and capturing them as LlmCall events.

Whole responses are parsed, recorded and answered with what the client asked for; streams
are relayed event by event as they arrive while the call is assembled from the chunks.
Calls without a rollout are relayed untouched and only counted.

Acknowledgements (``acks="kafka"``, the default): a whole answer is sent once Kafka
acknowledged the call's LlmCall events; a stream is relayed as it comes except its
``data: [DONE]`` (and the end of the body), held until the acknowledgement. The answer is
the model's either way: past ``ack_timeout`` (or when Kafka refused an event) a whole answer
carries ``X-Rollstream-Recorded: pending`` (or ``failed``) and a stream gets the SSE comment
``: rollstream-recorded pending`` (or ``failed``) just before ``data: [DONE]``; SSE clients
ignore comments. Each such answer counts in ``rollstream_gateway_unacknowledged_total``. A
pending event stays queued and is delivered when Kafka can take it. With ``acks="queued"``
nothing waits.
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any, Literal

import aiohttp
import orjson
from rollstream.producers.capture import (
    CallAssembler,
    CallContext,
    ClientWants,
    Endpoint,
    prepare_request,
    strip_chunk,
    strip_response,
)
from rollstream.producers.http import JSON_HEADERS, HttpError, Receive, Scope, Send, error_body, read_body, respond
from rollstream.producers.metrics import GatewayMetrics
from rollstream.producers.publisher import Acks, Delivery, Publisher, Recorded, acknowledgement

from rollstream.errors import SerializationError

log = logging.getLogger(__name__)

OnFull = Literal["reject", "serve-and-count"]
SSE_HEADERS = [(b"content-type", b"text/event-stream"), (b"cache-control", b"no-cache")]
RECORDED_HEADER = b"x-rollstream-recorded"
SSE_DONE = b"data: [DONE]"
TRACKED_ROLLOUTS = 100_000
# Queue room reserved per call is its n, up to this; a larger n is the backend's to refuse (4xx),
# not a reason to answer 503 as if Kafka were away.
MAX_RESERVED_CHOICES = 128


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
    ) -> None:
        self.backend_url = backend_url.rstrip("/")
        self.publisher = publisher
        self.metrics = metrics
        self.calls_topic = calls_topic
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
            raise _Passthrough(resp.status, raw, ctype)
        self.metrics.backend_errors.labels(f"http_{resp.status}").inc()
        raise HttpError(502, _backend_message(resp.status, raw), code="backend_error")

    async def models(self, send: Send) -> None:
        resp = await self._call("GET", "/models", None)
        async with resp:
            raw = await self._read(resp)
        status = resp.status if resp.status < 500 else 502
        await respond(send, status, raw if status != 502 else error_body(502, _backend_message(resp.status, raw)))

    # --- model calls ----------------------------------------------------------------

    async def handle(
        self, endpoint: Endpoint, scope: Scope, receive: Receive, send: Send, who: Attribution | None
    ) -> None:
        try:
            await self._handle(endpoint, receive, send, who)
        except _Passthrough as passed:
            await respond(send, passed.status, passed.body, [(b"content-type", passed.content_type)])

    async def _handle(self, endpoint: Endpoint, receive: Receive, send: Send, who: Attribution | None) -> None:
        raw = await read_body(receive, self.max_body, self.body_timeout)
        suffix = "/chat/completions" if endpoint == "CHAT_COMPLETIONS" else "/completions"
        if who is None:
            self.metrics.unattributed.inc()
            await self._relay(suffix, raw, send)
            return
        try:
            body = orjson.loads(raw)
        except orjson.JSONDecodeError as exc:
            raise HttpError(400, f"request body is not valid JSON: {exc}") from exc
        if not isinstance(body, dict):
            raise HttpError(400, "request body must be a JSON object")
        n: int = body["n"] if isinstance(body.get("n"), int) else 1
        n = min(max(n, 1), MAX_RESERVED_CHOICES)
        record = True
        if not self.publisher.has_room(max(n, 1)):
            if self.on_full == "reject":
                self.metrics.rejected.labels(endpoint.lower()).inc()
                raise HttpError(
                    503, "the gateway's event queue is full (Kafka is unavailable or slow); retry later",
                    code="event_queue_full",
                )
            record = False
            self.metrics.events_dropped.labels("queue_full").inc(max(n, 1))
        if not record:
            await self._relay(suffix, raw, send)
            return
        attempt = who.attempt or self.tracker.attempt(who.rollout_id)
        ctx = CallContext(
            rollout_id=who.rollout_id,
            attempt=attempt,
            agent_name=who.agent_name,
            sequence=self.tracker.next_sequence(who.rollout_id, attempt),
            endpoint=endpoint,
            request=dict(body),
            policy=self.policy,
            policy_version=self.policy_version,
        )
        wants = prepare_request(endpoint, body)
        resp = await self._call("POST", suffix, orjson.dumps(body))
        async with resp:
            await self._check(resp)
            version = _version_header(resp.headers)
            if version is not None:
                self.policy_version = version
            if body.get("stream") and resp.content_type == "text/event-stream":
                await self._stream(resp, send, CallAssembler(ctx), wants, version)
            else:
                await self._whole(await self._read(resp), send, CallAssembler(ctx), wants, version)

    async def _relay(self, suffix: str, raw: bytes, send: Send) -> None:
        """An unrecorded call: the backend's answer goes to the client byte for byte."""
        resp = await self._call("POST", suffix, raw)
        async with resp:
            await self._check(resp)
            ctype = resp.headers.get("Content-Type", "application/json").encode("latin-1")
            if resp.content_type != "text/event-stream":
                await respond(send, resp.status, await self._read(resp), [(b"content-type", ctype)])
                return
            await send({"type": "http.response.start", "status": resp.status, "headers": SSE_HEADERS})
            try:
                async for data in resp.content.iter_any():
                    await send({"type": "http.response.body", "body": data, "more_body": True})
            except (TimeoutError, aiohttp.ClientError) as exc:
                log.warning("backend stream broke: %s", exc)
            await send({"type": "http.response.body", "body": b""})

    def _publish(self, events: list[dict[str, Any]], key: str) -> Delivery | None:
        """The events' Delivery; None when the queue is full."""
        try:
            delivery = self.publisher.publish(self.calls_topic, key, events)
        except SerializationError as exc:
            log.exception("could not encode the LlmCall events of rollout %s; not recorded", key)
            self.metrics.events_dropped.labels("encode_error").inc(len(events))
            return Delivery.settled(f"cannot encode: {exc}")  # a bug of ours, not the client's: serve the answer
        if delivery is None:
            self.metrics.events_dropped.labels("queue_full").inc(len(events))
        return delivery

    async def _acknowledged(self, delivery: Delivery | None, endpoint: Endpoint) -> Recorded | None:
        """What ``X-Rollstream-Recorded`` says (pending or failed), or None once acknowledged."""
        return await acknowledgement(delivery, self.acks, self.ack_timeout, self.metrics, endpoint.lower())

    async def _whole(
        self, raw: bytes, send: Send, call: CallAssembler, wants: ClientWants, version: int | None
    ) -> None:
        try:
            data = orjson.loads(raw)
        except orjson.JSONDecodeError as exc:
            raise HttpError(502, f"backend answered with invalid JSON: {exc}") from exc
        if not isinstance(data, dict):
            raise HttpError(502, f"backend answered with a JSON {type(data).__name__}, not a completion object")
        call.add_response(data)
        if call.policy_version is not None:
            self.policy_version = call.policy_version
        delivery = self._publish(call.events(version), call.ctx.rollout_id)
        if delivery is None and self.on_full == "reject":
            self.metrics.rejected.labels(call.ctx.endpoint.lower()).inc()
            raise HttpError(503, "the call succeeded but could not be recorded (event queue full); retry later",
                            code="event_queue_full")
        if wants.strips:
            strip_response(data, wants)
            raw = orjson.dumps(data)
        recorded = await self._acknowledged(delivery, call.ctx.endpoint)
        await respond(send, 200, raw, JSON_HEADERS if recorded is None else
                      [*JSON_HEADERS, (RECORDED_HEADER, recorded.encode())])

    def _sse_event(self, event: bytes, call: CallAssembler, wants: ClientWants) -> bytes | None:
        """One SSE event (without its blank line) as the client should see it; None to drop it."""
        if not event.startswith(b"data:"):
            return event
        payload = event[5:].strip()
        if payload == b"[DONE]" or not payload.startswith(b"{"):
            return event
        try:
            chunk = orjson.loads(payload)
        except orjson.JSONDecodeError:
            return event
        call.add_chunk(chunk)
        if not wants.strips:
            return event
        if not strip_chunk(chunk, wants):
            return None
        return b"data: " + orjson.dumps(chunk)

    async def _stream(
        self, resp: aiohttp.ClientResponse, send: Send, call: CallAssembler, wants: ClientWants, version: int | None
    ) -> None:
        await send({"type": "http.response.start", "status": 200, "headers": SSE_HEADERS})
        pending = b""
        complete = done = False
        try:
            async for data in resp.content.iter_any():
                pending += data.replace(b"\r\n", b"\n") if b"\r" in data else data
                out = []
                while (cut := pending.find(b"\n\n")) >= 0:
                    event, pending = pending[:cut], pending[cut + 2:]
                    if event == SSE_DONE or (event.startswith(b"data:") and event[5:].strip() == b"[DONE]"):
                        complete = done = True  # held back until the events are recorded
                        continue
                    relayed = self._sse_event(event, call, wants)
                    if relayed is not None:
                        out.append(relayed + b"\n\n")
                if out:
                    await send({"type": "http.response.body", "body": b"".join(out), "more_body": True})
            complete = complete or not pending.strip()
        except (TimeoutError, aiohttp.ClientError) as exc:
            log.warning("backend stream for rollout %s broke: %s", call.ctx.rollout_id, exc)
            error = {"error": {"message": f"backend stream broke: {exc}", "type": "backend_error", "code": 502}}
            await send({"type": "http.response.body", "body": b"data: " + orjson.dumps(error) + b"\n\n",
                        "more_body": True})
        except OSError as exc:  # the client went away
            log.info("client left the stream of rollout %s: %s", call.ctx.rollout_id, exc)
            self.metrics.events_dropped.labels("client_disconnected").inc(max(len(call.choices), 1))
            return
        if call.policy_version is not None:
            self.policy_version = call.policy_version
        events = call.events(version) if complete else []
        if len(events) < len(call.choices):
            self.metrics.events_dropped.labels("incomplete").inc(len(call.choices) - len(events))
        recorded = await self._acknowledged(self._publish(events, call.ctx.rollout_id) if events else None,
                                            call.ctx.endpoint)
        tail = b"" if recorded is None else b": rollstream-recorded " + recorded.encode() + b"\n\n"
        if done:
            tail += SSE_DONE + b"\n\n"
        await send({"type": "http.response.body", "body": tail})


class _Passthrough(Exception):  # noqa: N818 - control flow, not an error of ours
    """A backend client error (4xx) to hand to the client unchanged."""

    def __init__(self, status: int, body: bytes, content_type: bytes) -> None:
        super().__init__(status)
        self.status = status
        self.body = body
        self.content_type = content_type
