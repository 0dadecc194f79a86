"""With keys configured, every route of the gateway and the OTLP receiver that writes (or calls the model)
answers 401 without a key, 401 with an unknown key, 403 with a key lacking its scope, and publishes nothing.

Routes are enumerated from the gateway's own route table (``MODEL_ROUTES``, the attribution prefixes,
the rollout API) and the receiver's; a sweep over arbitrary paths and methods checks that nothing
outside the public ``/metrics`` and ``/healthz`` is served or publishes without a key.
"""

from __future__ import annotations

import asyncio
from typing import Any

import httpx
import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from rollstream.producers.gateway import MODEL_ROUTES, Gateway, GatewaySettings
from rollstream.producers.otlp import OtlpReceiver, OtlpSettings
from rollstream.producers.publisher import Delivery
from rollstream.schemas.topics import Topics

TOPICS = Topics(prefix="unit.")
DEAD_BACKEND = "http://127.0.0.1:9/v1"
GATEWAY_KEYS = "agent-key=models,grader-key=rewards"
OTLP_KEYS = "exporter-key=traces"
PUBLIC = {("GET", "/metrics"), ("GET", "/healthz")}
ATTRIBUTION_PREFIXES = ["/v1/", "/rollouts/r-1/v1/", "/rollouts/r-1/attempts/2/agents/planner/v1/"]
CHAT = orjson.dumps({"model": "m", "messages": [{"role": "user", "content": "hi"}], "prompt": "hi"})
BODIES = {"responses": orjson.dumps({"model": "m", "input": "hi"}),
          "messages": orjson.dumps({"model": "m", "max_tokens": 4, "messages": [{"role": "user", "content": "hi"}]})}

# (method, path, scope the route needs, body)
GATEWAY_ROUTES: list[tuple[str, str, str, bytes]] = [
    *[("POST", prefix + route, "models", BODIES.get(route, CHAT)) for route in MODEL_ROUTES
      for prefix in ATTRIBUTION_PREFIXES],
    *[("GET", prefix + "models", "models", b"") for prefix in ATTRIBUTION_PREFIXES],
    *[("GET", prefix + "models/m", "models", b"") for prefix in ATTRIBUTION_PREFIXES],
    ("POST", "/v1/rollouts", "rewards", b'{"task_id": "t"}'),
    ("POST", "/v1/rollouts/r-1/finish", "rewards", b'{"status": "succeeded"}'),
    ("POST", "/v1/rollouts/r-1/rewards", "rewards", b'{"value": 1.0, "terminal": true}'),
]
OTLP_BODY = orjson.dumps({"resourceSpans": [{"resource": {"attributes": [
    {"key": "rollstream.rollout_id", "value": {"stringValue": "r"}}]}, "scopeSpans": [{"spans": [
        {"traceId": "5b8efff798038103d269b633813fc60c", "spanId": "000000000000000c", "name": "rollstream.reward",
         "attributes": [{"key": "rollstream.reward.value", "value": {"doubleValue": 1.0}}]}]}]}]})


class Recorder:
    """Publisher (gateway) and emitter (OTLP receiver) at once: counts what would reach Kafka."""

    def __init__(self) -> None:
        self.sent: list[Any] = []
        self.delivered = self.failed = 0

    def has_room(self, n: int = 1) -> bool:
        return True

    def publish(self, topic: str, key: str, records: list[dict[str, Any]]) -> Delivery | None:
        self.sent += records
        return Delivery.settled()

    def submit_many(self, items: list[Any]) -> int:
        self.sent += items
        return len(self.sent)

    def depth(self) -> int:
        return 0

    def pending(self) -> int:
        return 0

    def close(self, timeout: float = 30.0) -> int:
        return 0


def request(app: Any, method: str, path: str, body: bytes, key: str | None,
            content_type: str = "application/json", header: str = "authorization") -> int:
    headers = {"content-type": content_type}
    if key is not None:
        headers[header] = f"Bearer {key}" if header == "authorization" else key

    async def go() -> int:
        if isinstance(app, Gateway):
            await app.proxy.start()
        try:
            async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as client:
                return (await client.request(method, path, content=body, headers=headers)).status_code
        finally:
            if isinstance(app, Gateway):
                await app.proxy.stop()

    return asyncio.run(go())


def gateway() -> tuple[Gateway, Recorder]:
    recorder = Recorder()
    return Gateway(GatewaySettings(backend_url=DEAD_BACKEND, api_keys=GATEWAY_KEYS), recorder, TOPICS), recorder


def otlp() -> tuple[OtlpReceiver, Recorder]:
    recorder = Recorder()
    return OtlpReceiver(OtlpSettings(api_keys=OTLP_KEYS), recorder, TOPICS), recorder  # type: ignore[arg-type]


@pytest.mark.parametrize(("method", "path", "scope", "body"), GATEWAY_ROUTES)
def test_every_gateway_route_needs_a_key_with_its_scope(method: str, path: str, scope: str, body: bytes) -> None:
    app, recorder = gateway()
    other = "grader-key" if scope == "models" else "agent-key"
    assert request(app, method, path, body, None) == 401
    assert request(app, method, path, body, "not-a-key") == 401
    assert request(app, method, path, body, other) == 403
    assert recorder.sent == []
    # With the right key the route is served (the model routes then meet the dead backend: 502).
    right = "agent-key" if scope == "models" else "grader-key"
    assert request(app, method, path, body, right) in (200, 201, 502)


@pytest.mark.parametrize("prefix", ATTRIBUTION_PREFIXES)
def test_the_messages_route_also_takes_the_key_in_x_api_key_as_anthropic_clients_send_it(prefix: str) -> None:
    app, recorder = gateway()
    path, body = prefix + "messages", BODIES["messages"]
    assert request(app, "POST", path, body, "not-a-key", header="x-api-key") == 401
    assert request(app, "POST", path, body, "grader-key", header="x-api-key") == 403
    assert request(app, "POST", path, body, "agent-key", header="x-api-key") == 502  # served: the backend is dead
    # Only there: other routes read Authorization alone.
    assert request(app, "POST", prefix + "chat/completions", CHAT, "agent-key", header="x-api-key") == 401
    assert recorder.sent == []


@pytest.mark.parametrize("content_type", ["application/json", "application/x-protobuf"])
def test_otlp_traces_need_a_key_with_the_traces_scope(content_type: str) -> None:
    app, recorder = otlp()
    assert request(app, "POST", "/v1/traces", OTLP_BODY, None, content_type) == 401
    assert request(app, "POST", "/v1/traces", OTLP_BODY, "not-a-key", content_type) == 401
    assert recorder.sent == []
    assert request(app, "POST", "/v1/traces", OTLP_BODY, "exporter-key", "application/json") == 200
    assert len(recorder.sent) == 1


def test_otlp_key_scopes_are_checked() -> None:
    from rollstream.errors import ConfigError
    from rollstream.producers.auth import KeyRing

    with pytest.raises(ConfigError, match="ROLLSTREAM_OTLP_API_KEYS"):
        KeyRing.from_text("k=models", "ROLLSTREAM_OTLP_API_KEYS", ("traces",))
    app = OtlpReceiver(OtlpSettings(api_keys="k"), Recorder(), TOPICS)  # type: ignore[arg-type]
    assert app.keys.keys[0].scopes == {"traces"}


PATHS = st.one_of(
    st.sampled_from([r[1] for r in GATEWAY_ROUTES] + ["/v1/traces", "/metrics", "/healthz", "/", "/v1/"]),
    st.lists(st.sampled_from(["v1", "rollouts", "r", "attempts", "1", "agents", "a", "models", "completions",
                              "chat", "finish", "rewards", "traces", "metrics", ""]), max_size=7).map(
        lambda parts: "/" + "/".join(parts)).filter(lambda path: not path.startswith("//")),  # not a relative URL
)


@settings(max_examples=150, deadline=None)
@given(method=st.sampled_from(["GET", "POST", "PUT", "DELETE", "PATCH"]), path=PATHS,
       service=st.sampled_from(["gateway", "otlp"]))
def test_no_route_serves_or_publishes_without_a_key(method: str, path: str, service: str) -> None:
    app, recorder = gateway() if service == "gateway" else otlp()
    body = OTLP_BODY if service == "otlp" else CHAT
    status = request(app, method, path, body, None)
    if (method, path) in PUBLIC:
        assert status == 200
    else:
        assert status in (401, 404, 405), (method, path, status)
    assert recorder.sent == []
