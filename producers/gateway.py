"""``rollstream gateway``: the capturing OpenAI-compatible gateway, with the rollout and reward API.

A raw ASGI app on uvicorn (uvloop, httptools) in front of any OpenAI-compatible backend.
Every model call that belongs to a rollout becomes one LlmCall event per choice on the
calls topic; one that belongs to none, on the calls-by-response topic keyed by its response
id (``ROLLSTREAM_GATEWAY_RECORD_UNATTRIBUTED``; see ``proxy``); rollouts and rewards posted
to the same service become RolloutEvent and Reward events. Routes:

- ``/v1/chat/completions``, ``/v1/completions``, ``/v1/models``, ``/v1/models/{id}`` (scope ``models``),
  also under ``/rollouts/{rollout_id}[/attempts/{n}][/agents/{name}]/v1/...`` for agents that can only
  set a base URL; otherwise the ``X-Rollout-Id``, ``X-Attempt``, ``X-Agent-Name`` headers;
- ``/v1/responses`` (the OpenAI Responses API) and ``/v1/messages`` (Anthropic Messages, key also in
  ``x-api-key``), attributed the same way and translated to chat completions for the backend
  (``responses``, ``messages``); recorded with endpoint RESPONSES or MESSAGES;
- ``POST /v1/rollouts``, ``/v1/rollouts/{id}/finish``, ``/v1/rollouts/{id}/rewards`` (scope ``rewards``);
- ``GET /metrics`` (Prometheus) and ``GET /healthz``.

When it answers (``ROLLSTREAM_GATEWAY_ACKS``):

- ``kafka`` (the default): only once Kafka acknowledged every event of the request (``acks=all``,
  idempotent producer), so nothing the gateway answered 2xx for is lost if it is killed the next
  moment. A rollout or reward request whose event is not acknowledged within
  ``ROLLSTREAM_GATEWAY_ACK_TIMEOUT`` seconds is answered 503 (``event_not_acknowledged``; the event
  stays queued and may still arrive) with its ``event_id`` (and ``rollout_id``): sending the
  request again with that ``event_id`` in the body is safe, as the stream processor drops a
  repeated ``(source, event_id)``. A model call is answered all the same (the client got real
  tokens), whole answers with ``X-Rollstream-Recorded: pending`` (``failed`` if Kafka refused the
  event), streams with an SSE comment ``: rollstream-recorded pending`` before ``data: [DONE]``,
  which the gateway holds back until the acknowledgement; both are counted in
  ``rollstream_gateway_unacknowledged_total``.
- ``queued``: as soon as the events are in the publisher's memory queue (lowest latency; a
  ``kill -9`` loses what was queued in the last moments).

Model names: ``ROLLSTREAM_GATEWAY_MODEL_MAP`` (``model_names``) turns the client's model name into the
backend's (by default every name into the backend's own model); LlmCall.model records the client's.
The backend's ``X-Policy-Version`` header reaches the client on every model route.

A full queue is handled in both modes alike: 503 ``event_queue_full``, or served and counted
(``ROLLSTREAM_GATEWAY_ON_FULL``).

Redaction (``ROLLSTREAM_REDACT*``, ``--redact``; ``redact``, docs/redaction.md): every model request is
redacted before it is forwarded, so the backend never sees the raw text and the captured prompt token
ids are the redacted text's; the answer reaches the client as the model gave it, and its event is
redacted with its response token ids dropped where its text matched.
"""

from __future__ import annotations

import argparse
import logging
import time
from dataclasses import dataclass, field
from typing import Any, get_args

import orjson

from rollstream.errors import ConfigError, RollstreamError, SerializationError
from rollstream.events import prepare_codec
from rollstream.producers import api
from rollstream.producers.auth import KeyRing, ScopeName, guard_unauthenticated, is_loopback  # noqa: F401 - re-exported
from rollstream.producers.capture import SOURCE
from rollstream.producers.http import (
    HttpError,
    Message,
    Receive,
    Scope,
    Send,
    header,
    parse_json_object,
    read_body,
    respond,
    respond_json,
)
from rollstream.producers.metrics import GatewayMetrics
from rollstream.producers.model_names import ModelMap
from rollstream.producers.proxy import Attribution, ModelProxy, OnFull
from rollstream.producers.publisher import LINGER_MS, Acks, Delivery, KafkaPublisher, Publisher, acknowledgement
from rollstream.producers.redact import (
    RedactionError,
    RedactionSettings,
    Redactor,
    redaction_flags,
    settings_from_flags,
)
from rollstream.schemas.topics import Topics
from rollstream.settings import ConnectionSettings, Settings, setting

log = logging.getLogger(__name__)

MODEL_ROUTES = {"chat/completions": "CHAT_COMPLETIONS", "completions": "COMPLETIONS", "responses": "RESPONSES",
                "messages": "MESSAGES"}


@dataclass(frozen=True)
class GatewaySettings(Settings):
    """How the gateway listens, where it forwards, when it answers, and how it treats a full event queue."""

    host: str = setting("GATEWAY_HOST")
    port: int = setting("GATEWAY_PORT")
    backend_url: str = setting("GATEWAY_BACKEND_URL")
    backend_api_key: str = setting("GATEWAY_BACKEND_API_KEY", secret=True)
    backend_timeout: int = setting("GATEWAY_BACKEND_TIMEOUT")
    backend_connections: int = setting("GATEWAY_BACKEND_CONNECTIONS")
    api_keys: str = setting("GATEWAY_API_KEYS", secret=True)
    policy: str = setting("GATEWAY_POLICY")
    policy_version: int = setting("GATEWAY_POLICY_VERSION")
    queue_max: int = setting("GATEWAY_QUEUE_MAX")
    on_full: OnFull = setting("GATEWAY_ON_FULL")
    max_body: int = setting("GATEWAY_MAX_BODY")
    body_timeout: float = setting("GATEWAY_BODY_TIMEOUT")
    acks: Acks = setting("GATEWAY_ACKS")
    ack_timeout: float = setting("GATEWAY_ACK_TIMEOUT")
    model_map: str = setting("GATEWAY_MODEL_MAP")
    record_unattributed: bool = setting("GATEWAY_RECORD_UNATTRIBUTED")
    redaction: RedactionSettings = field(default_factory=RedactionSettings)

    def validate(self) -> None:
        for name in ("ack_timeout", "body_timeout"):
            if not getattr(self, name) > 0:
                raise ConfigError(f"ROLLSTREAM_GATEWAY_{name.upper()} must be a positive number of seconds, "
                                  f"got {getattr(self, name)}")
        for name in ("queue_max", "backend_timeout", "backend_connections", "max_body"):
            if getattr(self, name) < 1:
                raise ConfigError(f"ROLLSTREAM_GATEWAY_{name.upper()} must be at least 1")
        ModelMap.parse(self.model_map)  # a malformed map is a ConfigError at start, not at the first call
        if not self.backend_url.startswith(("http://", "https://")):
            raise ConfigError(f"ROLLSTREAM_GATEWAY_BACKEND_URL={self.backend_url!r} must be an http(s) URL")


def endpoint_label(path: str) -> str:
    """The metrics label of a request path."""
    if path.startswith("/v1/rollouts"):
        return "rewards" if path.endswith("/rewards") else "rollouts.finish" if path.endswith("/finish") else "rollouts"
    for suffix, label in (("/chat/completions", "chat_completions"), ("/completions", "completions"),
                          ("/responses", "responses"), ("/messages", "messages"), ("/models", "models"),
                          ("/metrics", "metrics"), ("/healthz", "health")):
        if path.endswith(suffix):
            return label
    return "models" if "/v1/models/" in path else "other"


def parse_attribution(path: str, scope: Scope) -> tuple[str, Attribution | None]:
    """Split ``/rollouts/{id}[/attempts/{n}][/agents/{name}]/v1/...`` into ``/v1/...`` and who called.

    An empty rollout id (``X-Rollout-Id:`` with no value, or ``/rollouts//v1/...``) is a 400: it is a
    client that meant to attribute its call and lost the id on the way, and serving it as an
    unattributed call would drop its events without a word."""
    rollout_id = header(scope, b"x-rollout-id")
    if rollout_id is not None and not rollout_id.strip():
        raise HttpError(400, "the X-Rollout-Id header is empty: send the rollout's id (from POST /v1/rollouts), "
                             "or leave the header out for a call that belongs to no rollout",
                        param="X-Rollout-Id", code="empty_rollout_id")
    attempt_text = header(scope, b"x-attempt")
    agent = header(scope, b"x-agent-name")
    if path.startswith("/rollouts/"):
        parts = path.split("/")  # ['', 'rollouts', id, ...]
        rest = parts[3:]
        rollout_id = parts[2]
        if not rollout_id.strip():
            raise HttpError(400, f"the rollout id in the path {path!r} is empty: use /rollouts/{{rollout_id}}/v1/...",
                            param="rollout_id", code="empty_rollout_id")
        while len(rest) >= 2 and rest[0] in ("attempts", "agents"):
            if rest[0] == "attempts":
                attempt_text = attempt_text or rest[1]
            else:
                agent = agent or rest[1]
            rest = rest[2:]
        path = "/" + "/".join(rest)
    if not rollout_id:
        return path, None
    api.check_id(rollout_id, "rollout_id")
    attempt = None
    if attempt_text:
        try:
            attempt = int(attempt_text)
        except ValueError:
            attempt = 0
        if not 1 <= attempt <= api.MAX_ATTEMPT:
            raise HttpError(400, f"attempt must be an integer from 1 to {api.MAX_ATTEMPT}, got {attempt_text!r}",
                            param="X-Attempt")
    return path, Attribution(rollout_id, attempt, agent or None)


class Gateway:
    """The ASGI application."""

    def __init__(self, settings: GatewaySettings, publisher: Publisher, topics: Topics,
                 metrics: GatewayMetrics | None = None) -> None:
        self.settings = settings
        self.publisher = publisher
        self.topics = topics
        self.metrics = metrics or GatewayMetrics()
        self.keys = KeyRing.from_text(settings.api_keys)
        self.redactor = Redactor.from_settings(settings.redaction, surface="gateway",
                                               counters=self.metrics.redactions)
        self.proxy = ModelProxy(
            settings.backend_url, publisher, self.metrics, topics.calls,
            responses_topic=topics.calls_by_response if settings.record_unattributed else None,
            unattributed_depth=settings.queue_max // 2,
            backend_api_key=settings.backend_api_key, timeout=float(settings.backend_timeout),
            connections=settings.backend_connections, on_full=settings.on_full, policy=settings.policy,
            policy_version=settings.policy_version, max_body=settings.max_body, acks=settings.acks,
            ack_timeout=settings.ack_timeout, body_timeout=settings.body_timeout,
            model_map=ModelMap.parse(settings.model_map), redactor=self.redactor,
        )

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            await self._http(scope, receive, send)
        elif scope["type"] == "lifespan":
            await self._lifespan(receive, send)

    async def _lifespan(self, receive: Receive, send: Send) -> None:
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                await self.proxy.start()
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                await self.proxy.stop()
                await send({"type": "lifespan.shutdown.complete"})
                return

    async def _http(self, scope: Scope, receive: Receive, send: Send) -> None:
        started = time.perf_counter()
        status = 500
        endpoint = endpoint_label(scope["path"])

        async def tracked_send(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self._route(scope, receive, tracked_send)
        except (HttpError, api.InvalidEventError) as exc:
            error = HttpError.of(exc)
            status = error.status
            await error.send(send, anthropic=endpoint == "messages")
        except Exception:
            log.exception("unexpected error serving %s %s", scope["method"], scope["path"])
            await respond(send, 500, HttpError(500, "internal gateway error").body())
        finally:
            self.metrics.requests.labels(endpoint, str(status)).inc()
            self.metrics.latency.labels(endpoint).observe(time.perf_counter() - started)

    def _authorize(self, scope: Scope, needed: ScopeName) -> None:
        api_key = header(scope, b"x-api-key") or "" if scope["path"].endswith("/v1/messages") else None
        self.keys.authorize(header(scope, b"authorization"), needed, api_key)

    async def _route(self, scope: Scope, receive: Receive, send: Send) -> None:
        method, path = scope["method"], scope["path"]
        if path == "/metrics" and method == "GET":
            await respond(send, 200, self.metrics.render(), [(b"content-type", b"text/plain; version=0.0.4")])
            return
        if path == "/healthz" and method == "GET":
            await respond_json(send, 200, {"status": "ok", "queue_depth": self.publisher.depth()})
            return
        if path.startswith("/v1/rollouts"):
            await self._rollouts(scope, receive, send, method, path)
            return
        try:
            path, who = parse_attribution(path, scope)
        except (HttpError, api.InvalidEventError):
            self._authorize(scope, "models")  # only callers with a key learn what is wrong with the attribution
            raise
        if path.startswith("/v1/"):
            route = path[4:].rstrip("/")
            if route in MODEL_ROUTES:
                if method != "POST":
                    raise HttpError(405, f"{path} accepts POST")
                self._authorize(scope, "models")
                endpoint = MODEL_ROUTES[route]
                await self.proxy.handle(endpoint, scope, receive, send, who)  # type: ignore[arg-type]
                return
            if route == "models":
                self._authorize(scope, "models")
                await self.proxy.models(send)
                return
            if route.startswith("models/") and method == "GET":
                self._authorize(scope, "models")
                await self.proxy.model(send, route[len("models/"):])
                return
        raise HttpError(404, f"no route {method} {scope['path']}")

    async def _rollouts(self, scope: Scope, receive: Receive, send: Send, method: str, path: str) -> None:
        parts = path.rstrip("/").split("/")  # ['', 'v1', 'rollouts', id?, action?]
        if method != "POST" or len(parts) not in (3, 5) or (len(parts) == 5 and parts[4] not in ("finish", "rewards")):
            raise HttpError(404, f"no route {method} {path}; see POST /v1/rollouts, /v1/rollouts/{{id}}/finish "
                                 "and /v1/rollouts/{id}/rewards")
        self._authorize(scope, "rewards")
        body = parse_json_object(await read_body(receive, self.settings.max_body, self.settings.body_timeout))
        policy = self.settings.policy or "default"
        if len(parts) == 3:
            record = api.start_rollout(body, SOURCE, policy)
            delivery = self._publish(self.topics.rollouts, record, "rollouts")
            self.proxy.tracker.started(record["rollout_id"], record["attempt"])
            await self._acknowledged(delivery, record, "rollouts", {"rollout_id": record["rollout_id"]})
            rid = record["rollout_id"]
            await respond_json(send, 201, {
                "rollout_id": rid, "attempt": record["attempt"], "event_id": record["event_id"],
                "base_path": f"/rollouts/{rid}/v1",
            })
            return
        rollout_id = api.check_id(parts[3], "rollout_id")
        if parts[4] == "finish":
            attempt = self.proxy.tracker.attempt(rollout_id)
            record = api.finish_rollout(rollout_id, body, SOURCE, policy, attempt)
            await self._acknowledged(self._publish(self.topics.rollouts, record, "rollouts.finish"), record,
                                     "rollouts.finish")
            await respond_json(send, 200, {"rollout_id": rollout_id, "status": record["status"],
                                           "event_id": record["event_id"]})
            return
        record = api.reward(rollout_id, body, SOURCE)
        await self._acknowledged(self._publish(self.topics.rewards, record, "rewards"), record, "rewards")
        await respond_json(send, 200, {"rollout_id": rollout_id, "event_id": record["event_id"]})

    def _publish(self, topic: str, record: dict[str, Any], endpoint: str) -> Delivery:
        # Rollout and reward events are never dropped silently, whatever --on-full says.
        try:
            self.redactor.record(record)
        except RedactionError as exc:  # fail closed: nothing unredacted is published
            raise HttpError(500, f"the event cannot be recorded: {exc}", code="redaction_failed") from exc
        try:
            delivery = self.publisher.publish(topic, record["rollout_id"], [record])
        except SerializationError as exc:  # e.g. text with unpaired surrogates (\ud800), which JSON allows
            raise HttpError(422, f"the event cannot be recorded: {exc}", code="invalid_field") from exc
        if delivery is None:
            self.metrics.rejected.labels(endpoint).inc()
            raise HttpError(503, "the gateway's event queue is full (Kafka is unavailable or slow); retry later",
                            code="event_queue_full")
        return delivery

    async def _acknowledged(self, delivery: Delivery, record: dict[str, Any], endpoint: str,
                            retry_with: dict[str, str] | None = None) -> None:
        """With acks=kafka, return once Kafka acknowledged ``record``; 503 when it did not in time or refused it."""
        outcome = await acknowledgement(delivery, self.settings.acks, self.settings.ack_timeout, self.metrics, endpoint)
        if outcome is None:
            return
        fields = {**(retry_with or {}), "event_id": record["event_id"]}
        retry = (f"sending the same request again with {orjson.dumps(fields).decode()} in its body is safe: the "
                 "stream processor drops a repeated (source, event_id)")
        extra = {"rollout_id": record["rollout_id"], "event_id": record["event_id"]}
        if outcome == "pending":
            raise HttpError(
                503, f"the event is queued but Kafka has not acknowledged it within {self.settings.ack_timeout:g} s "
                     f"(is the broker unavailable?); it may still be recorded later, and {retry}",
                code="event_not_acknowledged", extra=extra)
        raise HttpError(503, f"Kafka refused the event ({delivery.error}); it is not recorded, and {retry}",
                        code="event_not_recorded", extra=extra)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="rollstream gateway", description=__doc__.split("\n\n")[0])
    p.add_argument("--host", help="listen address (ROLLSTREAM_GATEWAY_HOST)")
    p.add_argument("--port", type=int, help="listen port (ROLLSTREAM_GATEWAY_PORT)")
    p.add_argument("--backend-url", help="OpenAI-compatible backend, e.g. http://127.0.0.1:8000/v1")
    p.add_argument("--policy", help="policy name recorded on calls (default: the backend's model name)")
    p.add_argument("--policy-version", type=int, help="policy version until the backend reports one")
    p.add_argument("--queue-max", type=int, help="events held in memory while Kafka is unavailable")
    p.add_argument("--on-full", choices=get_args(OnFull), help="full event queue: 503 (reject) or serve and count")
    p.add_argument("--backend-timeout", type=int, help="seconds to wait for the backend (504 past it)")
    p.add_argument("--acks", choices=get_args(Acks),
                   help="answer once Kafka acknowledged the request's events (kafka) or once they are queued")
    p.add_argument("--ack-timeout", type=float,
                   help="seconds to wait for Kafka's acknowledgement (ROLLSTREAM_GATEWAY_ACK_TIMEOUT)")
    p.add_argument("--body-timeout", type=float,
                   help="seconds to wait for more of a request body (408 past it; ROLLSTREAM_GATEWAY_BODY_TIMEOUT)")
    p.add_argument("--model-map", help="client=backend model names, '*' for the backend's model "
                                        "(ROLLSTREAM_GATEWAY_MODEL_MAP)")
    redaction_flags(p)
    p.add_argument("--kafka-bootstrap", help="Kafka bootstrap servers (ROLLSTREAM_KAFKA_BOOTSTRAP)")
    p.add_argument("--schema-registry-url", help="schema registry URL (ROLLSTREAM_SCHEMA_REGISTRY_URL)")
    p.add_argument("--topic-prefix", help="topic prefix (ROLLSTREAM_TOPIC_PREFIX)")
    p.add_argument("--no-create-topics", action="store_true", help="do not create missing topics at start")
    p.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    return p


def main(argv: list[str] | None = None) -> int:
    """Run the gateway until interrupted; 2 on a configuration error."""
    import uvicorn

    args = build_parser().parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    for noisy in ("httpx", "httpx2"):  # the schema registry client logs every request at INFO
        logging.getLogger(noisy).setLevel(logging.WARNING)
    try:
        settings = GatewaySettings.from_args(
            args, "host", "port", "backend_url", "policy", "policy_version", "queue_max", "on_full", "backend_timeout",
            "acks", "ack_timeout", "body_timeout", "model_map", redaction=settings_from_flags(args))
        conn = ConnectionSettings.from_args(args, "kafka_bootstrap", "schema_registry_url", "topic_prefix")
        guard_unauthenticated(KeyRing.from_text(settings.api_keys), settings.host, "gateway",
                              "ROLLSTREAM_GATEWAY_API_KEYS", "agent-key=models,grader-key=rewards")
        codec = prepare_codec(conn, ["LlmCall", "Reward", "RolloutEvent"], create_missing=not args.no_create_topics)
    except RollstreamError as exc:
        log.error("%s", exc)
        return 2
    metrics = GatewayMetrics()
    publisher = KafkaPublisher(codec, conn, settings.queue_max, metrics, linger_ms=LINGER_MS[settings.acks])
    app = Gateway(settings, publisher, codec.topics, metrics)
    log.info("gateway on http://%s:%d -> %s; events to %s* (queue %d, on full: %s, answers once %s; calls of no "
             "rollout %s)", settings.host, settings.port, settings.backend_url, codec.topics.prefix, settings.queue_max,
             settings.on_full, "Kafka acknowledged" if settings.acks == "kafka" else "queued",
             f"to {codec.topics.calls_by_response}" if settings.record_unattributed else "not recorded")
    if app.redactor.active:
        log.info("redacting captured text: %s", ", ".join(app.redactor.rule_names))
    config = uvicorn.Config(app, host=settings.host, port=settings.port, loop="uvloop", http="httptools",
                            lifespan="on", access_log=False, log_level="warning", timeout_keep_alive=75)
    try:
        uvicorn.Server(config).run()
    finally:
        remaining = publisher.close(timeout=30.0)
    return 0 if remaining == 0 else 1
