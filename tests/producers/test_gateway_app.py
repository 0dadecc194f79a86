"""The gateway's ASGI app in-process, with a recording publisher: routing, validation, auth, admission."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Awaitable, Callable
from typing import Any

import httpx
import orjson
import pytest
from aiohttp import web

from rollstream.errors import ConfigError
from rollstream.producers.gateway import Gateway, GatewaySettings, is_loopback, main, parse_attribution
from rollstream.producers.http import HttpError
from rollstream.producers.publisher import Delivery
from rollstream.schemas.codec import encode_body
from rollstream.schemas.topics import Topics

TOPICS = Topics(prefix="unit.")
DEAD_BACKEND = "http://127.0.0.1:9/v1"  # discard port: nothing listens


class RecordingPublisher:
    """Keeps what is published; ``acks`` says what Kafka does with it: acknowledges it at once (kafka),
    0.1 s later from another thread (later), never (pending) or refuses it (failed)."""

    def __init__(self, room: int = 1000, acks: str = "kafka") -> None:
        self.room = room
        self.acks = acks
        self.sent: list[tuple[str, str, dict[str, Any]]] = []

    def has_room(self, n: int = 1) -> bool:
        return len(self.sent) + n <= self.room

    def publish(self, topic: str, key: str, records: list[dict[str, Any]]) -> Delivery | None:
        if not self.has_room(len(records)):
            return None
        self.sent += [(topic, key, r) for r in records]
        if self.acks == "kafka":
            return Delivery.settled()
        if self.acks == "failed":
            return Delivery.settled("Broker: Message size too large")
        delivery = Delivery(len(records))
        if self.acks == "later":
            threading.Timer(0.1, delivery.settle, [len(records)]).start()
        return delivery

    def depth(self) -> int:
        return len(self.sent)

    def close(self, timeout: float = 30.0) -> int:
        return 0


CHAT = {"model": "m", "messages": [{"role": "user", "content": "hi"}]}
ANSWER = {"id": "c-1", "object": "chat.completion", "created": 0, "model": "m", "prompt_token_ids": [1, 2],
          "choices": [{"index": 0, "message": {"role": "assistant", "content": "Hello"}, "finish_reason": "stop",
                       "logprobs": None, "token_ids": [7]}]}
CHUNKS = [{"id": "c-1", "object": "chat.completion.chunk", "created": 0, "model": "m", "prompt_token_ids": [1, 2],
           "choices": [{"index": 0, "delta": {"role": "assistant", "content": "Hello"}, "finish_reason": "stop",
                        "logprobs": None, "token_ids": [7]}]}]


async def canned_backend() -> web.AppRunner:
    """A backend answering every chat completion "Hello", whole or streamed (then ending with data: [DONE])."""

    async def chat(request: web.Request) -> web.StreamResponse:
        if not (await request.json()).get("stream"):
            return web.json_response(ANSWER)
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await resp.prepare(request)
        for chunk in CHUNKS:
            await resp.write(b"data: " + orjson.dumps(chunk) + b"\n\n")
        await resp.write(b"data: [DONE]\n\n")
        return resp

    backend = web.Application()
    backend.router.add_post("/v1/chat/completions", chat)
    runner = web.AppRunner(backend, access_log=None)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", 0).start()
    return runner


def run(test: Callable[[httpx.AsyncClient, Gateway], Awaitable[None]], room: int = 1000, kafka: str = "kafka",
        backend: bool = False, **settings: Any) -> Gateway:
    """Run ``test`` against the gateway app; ``kafka`` is RecordingPublisher's acks; ``backend``: canned_backend()."""
    app: Gateway

    async def go() -> None:
        nonlocal app
        runner = await canned_backend() if backend else None
        url = f"http://127.0.0.1:{runner.addresses[0][1]}/v1" if runner else DEAD_BACKEND
        app = Gateway(GatewaySettings(backend_url=url, **settings), RecordingPublisher(room, kafka), TOPICS)
        await app.proxy.start()
        try:
            async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://gw") as client:
                await test(client, app)
        finally:
            await app.proxy.stop()
            if runner:
                await runner.cleanup()

    asyncio.run(go())
    return app


def sent(app: Gateway) -> list[tuple[str, str, dict[str, Any]]]:
    return app.publisher.sent  # type: ignore[attr-defined, no-any-return]


@pytest.mark.parametrize(
    ("body", "field"),
    [
        (b'{"value": NaN}', "value"),
        (b'{"value": Infinity, "terminal": true}', "value"),
        (b'{"value": -Infinity}', "value"),
        (b'{"value": 1e999}', "value"),
        (b'{"terminal": true}', "value"),
        (b'{"value": "1.0"}', "value"),
        (b'{"value": true}', "value"),
        (b'{"value": 1, "terminal": "yes"}', "terminal"),
        (b'{"value": 1, "attempt": 0}', "attempt"),
        (b'{"value": 1, "colour": "red"}', "colour"),
        (b'{"value": 1, "metadata": {"k": [1]}}', "metadata.k"),
    ],
)
def test_bad_rewards_are_refused_naming_the_field(body: bytes, field: str) -> None:
    async def test(client: httpx.AsyncClient, app: Gateway) -> None:
        r = await client.post("/v1/rollouts/r-1/rewards", content=body)
        assert r.status_code == 422, r.text
        assert r.json()["error"]["param"] == field and field in r.json()["error"]["message"]

    assert sent(run(test)) == []


def test_rollout_lifecycle_and_reward_events() -> None:
    async def test(client: httpx.AsyncClient, app: Gateway) -> None:
        r = await client.post("/v1/rollouts", json={"task_id": "t1", "group_id": "g1", "attempt": 2,
                                                    "metadata": {"seed": 3, "ok": True}})
        assert r.status_code == 201
        rid = r.json()["rollout_id"]
        assert r.json()["base_path"] == f"/rollouts/{rid}/v1"
        r = await client.post(f"/v1/rollouts/{rid}/rewards", json={"value": 0.5, "call_id": "c1", "name": "format"})
        assert r.status_code == 200
        r = await client.post(f"/v1/rollouts/{rid}/finish", json={"status": "failed", "error": "boom"})
        assert r.status_code == 200 and r.json()["status"] == "FAILED"
        assert (await client.post(f"/v1/rollouts/{rid}/finish", json={"status": "DONE"})).status_code == 422
        assert (await client.post("/v1/rollouts", content=b"[1]")).status_code == 400
        assert (await client.get("/v1/rollouts")).status_code == 404

    app = run(test)
    (t1, k1, started), (t2, k2, reward), (t3, k3, finished) = sent(app)
    assert (t1, t2, t3) == (TOPICS.rollouts, TOPICS.rewards, TOPICS.rollouts) and k1 == k2 == k3
    assert started["status"] == "STARTED" and started["attempt"] == 2 and started["metadata"] == {"seed": "3",
                                                                                                     "ok": "true"}
    assert (reward["value"], reward["call_id"], reward["name"], reward["terminal"]) == (0.5, "c1", "format", False)
    assert finished["status"] == "FAILED" and finished["error"] == "boom" and finished["attempt"] == 2
    for record, event_type in ((started, "RolloutEvent"), (reward, "Reward"), (finished, "RolloutEvent")):
        encode_body(event_type, record)  # valid against the schema


def test_keys_and_scopes_are_enforced() -> None:
    async def test(client: httpx.AsyncClient, app: Gateway) -> None:
        reward = {"value": 1.0}
        assert (await client.post("/v1/rollouts/r/rewards", json=reward)).status_code == 401
        bad = {"Authorization": "Bearer nope"}
        assert (await client.post("/v1/rollouts/r/rewards", json=reward, headers=bad)).status_code == 401
        agent = {"Authorization": "Bearer agent-key"}
        r = await client.post("/v1/rollouts/r/rewards", json=reward, headers=agent)
        assert r.status_code == 403 and "agent-key" not in r.text
        grader = {"Authorization": "Bearer grader-key"}
        assert (await client.post("/v1/rollouts/r/rewards", json=reward, headers=grader)).status_code == 200
        chat = {"model": "m", "messages": []}
        assert (await client.post("/v1/chat/completions", json=chat, headers=grader)).status_code == 403
        assert (await client.post("/v1/chat/completions", json=chat)).status_code == 401
        assert (await client.get("/metrics")).status_code == 200

    run(test, api_keys="agent-key=models,grader-key=rewards")


def test_full_queue_rejects_before_calling_the_backend() -> None:
    chat = {"model": "m", "messages": [{"role": "user", "content": "hi"}]}

    async def test(client: httpx.AsyncClient, app: Gateway) -> None:
        # The backend is dead: a 503 (not 502) shows the backend was never called.
        r = await client.post("/rollouts/r-1/v1/chat/completions", json=chat)
        assert r.status_code == 503 and r.json()["error"]["code"] == "event_queue_full"
        r = await client.post("/v1/rollouts/r-1/rewards", json={"value": 1})
        assert r.status_code == 503
        # Without a rollout nothing is recorded, so the call goes on (and meets the dead backend).
        r = await client.post("/v1/chat/completions", json=chat)
        assert r.status_code == 502 and "unreachable" in r.json()["error"]["message"]
        metrics = (await client.get("/metrics")).text
        assert 'rollstream_gateway_rejected_total{endpoint="chat_completions"} 1.0' in metrics
        assert "rollstream_gateway_unattributed_calls_total 1.0" in metrics

    run(test, room=0)


def test_serve_and_count_goes_on_when_full() -> None:
    async def test(client: httpx.AsyncClient, app: Gateway) -> None:
        r = await client.post("/rollouts/r-1/v1/completions", json={"model": "m", "prompt": "x"})
        assert r.status_code == 502  # served (the dead backend answers), not rejected
        assert 'rollstream_gateway_events_dropped_total{reason="queue_full"} 1.0' in (await client.get("/metrics")).text

    run(test, room=0, on_full="serve-and-count")


def test_attribution_from_path_and_headers() -> None:
    def scope(**headers: str) -> dict[str, Any]:
        return {"headers": [(k.lower().replace("_", "-").encode(), v.encode()) for k, v in headers.items()]}

    assert parse_attribution("/v1/chat/completions", scope()) == ("/v1/chat/completions", None)
    path, who = parse_attribution("/rollouts/r-9/attempts/3/agents/planner/v1/completions", scope())
    assert path == "/v1/completions" and who is not None
    assert (who.rollout_id, who.attempt, who.agent_name) == ("r-9", 3, "planner")
    path, who = parse_attribution("/v1/models", scope(X_Rollout_Id="r-1", X_Attempt="2", X_Agent_Name="a"))
    assert path == "/v1/models" and who is not None and (who.rollout_id, who.attempt, who.agent_name) == ("r-1", 2, "a")
    with pytest.raises(HttpError):
        parse_attribution("/v1/completions", scope(X_Rollout_Id="r", X_Attempt="zero"))


def test_empty_rollout_ids_are_refused_naming_them_and_nothing_is_published() -> None:
    async def test(client: httpx.AsyncClient, app: Gateway) -> None:
        for path, headers, param in (
            ("/v1/chat/completions", {"X-Rollout-Id": ""}, "X-Rollout-Id"),
            ("/v1/chat/completions", {"X-Rollout-Id": "   "}, "X-Rollout-Id"),
            ("/rollouts/r-1/v1/chat/completions", {"X-Rollout-Id": ""}, "X-Rollout-Id"),
            ("/rollouts//v1/chat/completions", {}, "rollout_id"),
            ("/rollouts//attempts/2/v1/chat/completions", {}, "rollout_id"),
        ):
            r = await client.post(path, json=CHAT, headers=headers)
            error = r.json()["error"]
            assert r.status_code == 400 and error["param"] == param and error["code"] == "empty_rollout_id", path
            assert "empty" in error["message"] and (param in error["message"] or path in error["message"])
        # The canned backend answers, so a call served as unattributed would have been a 200.
        assert (await client.post("/v1/chat/completions", json=CHAT)).status_code == 200
        metrics = (await client.get("/metrics")).text
        assert "rollstream_gateway_unattributed_calls_total 1.0" in metrics  # only the call without a header
        assert 'rollstream_gateway_requests_total{endpoint="chat_completions",status="400"} 5.0' in metrics

    # Only the call without a rollout is recorded: by its response id, on calls-by-response.
    assert [(topic, key) for topic, key, _ in sent(run(test, backend=True))] == [(TOPICS.calls_by_response, "c-1")]


def test_empty_rollout_id_is_only_explained_to_callers_with_a_key() -> None:
    async def test(client: httpx.AsyncClient, app: Gateway) -> None:
        r = await client.post("/v1/chat/completions", json=CHAT, headers={"X-Rollout-Id": ""})
        assert r.status_code == 401
        r = await client.post("/v1/chat/completions", json=CHAT,
                              headers={"X-Rollout-Id": "", "Authorization": "Bearer agent-key"})
        assert r.status_code == 400 and r.json()["error"]["param"] == "X-Rollout-Id"

    assert sent(run(test, backend=True, api_keys="agent-key=models")) == []


def test_a_body_that_stops_arriving_is_answered_408_and_the_connection_closed() -> None:
    """A client whose Content-Length promises more than it sends; read against the app directly, since
    an in-memory transport always delivers whole bodies (the socket case is in test_gateway_integration)."""

    async def call(app: Gateway, path: str, headers: list[tuple[bytes, bytes]]) -> tuple[list[Any], float]:
        parts = [{"type": "http.request", "body": b'{"value": ', "more_body": True}]
        stalled = asyncio.Event()

        async def receive() -> dict[str, Any]:
            if parts:
                return parts.pop(0)
            await stalled.wait()  # the rest never comes
            raise AssertionError("unreachable")

        out: list[Any] = []

        async def send(message: Any) -> None:
            out.append(message)

        scope = {"type": "http", "method": "POST", "path": path, "headers": headers}
        started = time.monotonic()
        await app(scope, receive, send)
        return out, time.monotonic() - started

    async def go() -> Gateway:
        app = Gateway(GatewaySettings(backend_url=DEAD_BACKEND, body_timeout=0.2), RecordingPublisher(), TOPICS)
        await app.proxy.start()
        try:
            for path, headers in (("/v1/rollouts/r-1/rewards", []),
                                  ("/v1/chat/completions", [(b"x-rollout-id", b"r-1")]),
                                  ("/v1/chat/completions", [])):
                out, took = await call(app, path, [(b"content-length", b"100"), *headers])
                assert 0.2 <= took < 5, path
                start, body = out
                assert start["status"] == 408 and (b"connection", b"close") in start["headers"], path
                error = orjson.loads(body["body"])["error"]
                assert error["code"] == "body_timeout" and "ROLLSTREAM_GATEWAY_BODY_TIMEOUT" in error["message"]
                assert "nothing more came for 0.2 s after 10 bytes" in error["message"]
            assert 'endpoint="rewards",status="408"} 1.0' in app.metrics.render().decode()
        finally:
            await app.proxy.stop()
        return app

    assert sent(asyncio.run(go())) == []


def test_calls_of_no_rollout_are_recorded_by_response_id_and_never_wait_for_kafka() -> None:
    async def test(client: httpx.AsyncClient, app: Gateway) -> None:
        whole = await client.post("/v1/chat/completions", json=CHAT)  # Kafka never acknowledges ("pending")
        assert whole.status_code == 200 and "x-rollstream-recorded" not in whole.headers
        assert whole.json()["id"] == "c-1" and "token_ids" not in whole.json()["choices"][0]  # not asked for
        streamed = await client.post("/v1/chat/completions", json={**CHAT, "stream": True})
        assert streamed.status_code == 200 and b"rollstream-recorded" not in streamed.content
        assert streamed.content.endswith(b"data: [DONE]\n\n") and b"token_ids" not in streamed.content
        metrics = (await client.get("/metrics")).text
        assert "rollstream_gateway_unattributed_calls_total 2.0" in metrics
        assert "rollstream_gateway_unattributed_recorded_total 2.0" in metrics
        assert "rollstream_gateway_unacknowledged_total{" not in metrics

    records = sent(run(test, kafka="pending", backend=True))
    assert [(topic, key) for topic, key, _ in records] == [(TOPICS.calls_by_response, "c-1")] * 2
    for _, _, call in records:
        encode_body("LlmCall", call)
        assert (call["rollout_id"], call["attempt"], call["sequence"], call["agent_name"]) == ("", 1, 0, None)
        assert call["metadata"]["response_id"] == "c-1" and call["metadata"]["choice_index"] == "0"
        assert (call["prompt_token_ids"], call["response_token_ids"], call["response_text"]) == ([1, 2], [7], "Hello")


def test_calls_of_no_rollout_are_served_when_the_queue_is_full_or_recording_is_off() -> None:
    async def full(client: httpx.AsyncClient, app: Gateway) -> None:
        assert (await client.post("/v1/chat/completions", json=CHAT)).status_code == 200  # on_full=reject, all the same
        metrics = (await client.get("/metrics")).text
        assert 'rollstream_gateway_events_dropped_total{reason="queue_full"} 1.0' in metrics
        assert "rollstream_gateway_unattributed_recorded_total 0.0" in metrics

    assert sent(run(full, room=0, backend=True)) == []

    async def half_full(client: httpx.AsyncClient, app: Gateway) -> None:
        for _ in range(3):  # the third finds the queue half full: kept for calls of rollouts
            assert (await client.post("/v1/chat/completions", json=CHAT)).status_code == 200
        assert (await client.post("/rollouts/r-1/v1/chat/completions", json=CHAT)).status_code == 200
        assert "rollstream_gateway_unattributed_recorded_total 2.0" in (await client.get("/metrics")).text

    assert [topic for topic, _, _ in sent(run(half_full, backend=True, queue_max=4))] == [
        TOPICS.calls_by_response, TOPICS.calls_by_response, TOPICS.calls]

    async def off(client: httpx.AsyncClient, app: Gateway) -> None:
        r = await client.post("/v1/chat/completions", json=CHAT)
        assert r.status_code == 200 and r.json() == ANSWER  # relayed untouched
        assert (await client.post("/v1/chat/completions", json={**CHAT, "stream": True})).status_code == 200
        assert "rollstream_gateway_unattributed_calls_total 2.0" in (await client.get("/metrics")).text

    assert sent(run(off, backend=True, record_unattributed=False)) == []


def test_settings_and_loopback_rule(monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(ConfigError, match="ROLLSTREAM_GATEWAY_ON_FULL"):
        GatewaySettings(on_full="drop")  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="acks='maybe' \\(ROLLSTREAM_GATEWAY_ACKS\\)"):
        GatewaySettings(acks="maybe")  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="ACK_TIMEOUT"):
        GatewaySettings(ack_timeout=0)
    with pytest.raises(ConfigError, match="ROLLSTREAM_GATEWAY_BODY_TIMEOUT must be a positive"):
        GatewaySettings(body_timeout=0)
    monkeypatch.setenv("ROLLSTREAM_GATEWAY_BODY_TIMEOUT", "2.5")
    assert GatewaySettings().body_timeout == 2.5
    monkeypatch.delenv("ROLLSTREAM_GATEWAY_BODY_TIMEOUT")
    assert GatewaySettings().body_timeout == 30.0
    assert (GatewaySettings().acks, GatewaySettings().ack_timeout) == ("kafka", 10.0)
    assert GatewaySettings().record_unattributed
    monkeypatch.setenv("ROLLSTREAM_GATEWAY_RECORD_UNATTRIBUTED", "0")
    assert not GatewaySettings().record_unattributed
    monkeypatch.delenv("ROLLSTREAM_GATEWAY_RECORD_UNATTRIBUTED")
    monkeypatch.setenv("ROLLSTREAM_GATEWAY_QUEUE_MAX", "0")
    with pytest.raises(ConfigError, match="QUEUE_MAX"):
        GatewaySettings()
    monkeypatch.delenv("ROLLSTREAM_GATEWAY_QUEUE_MAX")
    assert is_loopback("127.0.0.1") and is_loopback("::1") and is_loopback("localhost")
    assert not is_loopback("0.0.0.0") and not is_loopback("10.0.0.1")
    monkeypatch.setenv("ROLLSTREAM_GATEWAY_API_KEYS", "")
    assert main(["--host", "0.0.0.0", "--port", "1"]) == 2  # refuses before touching Kafka


def test_answers_wait_for_kafkas_acknowledgement() -> None:
    async def test(client: httpx.AsyncClient, app: Gateway) -> None:
        for path, body in (("/v1/rollouts", {"rollout_id": "r-1"}), ("/v1/rollouts/r-1/rewards", {"value": 1}),
                           ("/v1/rollouts/r-1/finish", {"status": "SUCCEEDED"}), ("/rollouts/r-1/v1/chat/completions",
                                                                                  {**CHAT, "stream": True}),
                           ("/rollouts/r-1/v1/chat/completions", CHAT)):
            started = time.perf_counter()
            r = await client.post(path, json=body)
            assert r.status_code in (200, 201), r.text
            assert time.perf_counter() - started >= 0.09, path  # the acknowledgement came 0.1 s after the publish
            assert "x-rollstream-recorded" not in r.headers and "rollstream-recorded" not in r.text
        assert r.json()["choices"][0]["message"]["content"] == "Hello"

    assert len(sent(run(test, kafka="later", backend=True))) == 5


def test_rollout_api_answers_503_naming_the_event_id_when_kafka_does_not_acknowledge() -> None:
    async def test(client: httpx.AsyncClient, app: Gateway) -> None:
        started = time.perf_counter()
        r = await client.post("/v1/rollouts/r-1/rewards", json={"value": 1, "event_id": "reward-r-1"})
        assert 0.2 <= time.perf_counter() - started < 2
        error = r.json()["error"]
        assert r.status_code == 503 and error["code"] == "event_not_acknowledged", r.text
        assert "queued but Kafka has not acknowledged it within 0.2 s" in error["message"]
        assert '{"event_id":"reward-r-1"}' in error["message"] and "safe" in error["message"]
        assert (error["event_id"], error["rollout_id"]) == ("reward-r-1", "r-1")
        r = await client.post("/v1/rollouts", json={})  # a generated rollout id: the retry must name it
        error = r.json()["error"]
        assert r.status_code == 503 and f'"rollout_id":"{error["rollout_id"]}"' in error["message"]
        assert f'"event_id":"{error["event_id"]}"' in error["message"]
        assert (await client.post("/v1/rollouts/r-1/finish", json={"status": "FAILED"})).status_code == 503
        metrics = (await client.get("/metrics")).text
        assert 'rollstream_gateway_unacknowledged_total{endpoint="rewards",outcome="pending"} 1.0' in metrics
        assert 'rollstream_gateway_requests_total{endpoint="rewards",status="503"} 1.0' in metrics

    app = run(test, kafka="pending", ack_timeout=0.2)
    assert sent(app)[0][2]["event_id"] == "reward-r-1"  # the client's event id is the event's


def test_refused_events_are_503_and_queued_mode_does_not_wait() -> None:
    async def refused(client: httpx.AsyncClient, app: Gateway) -> None:
        r = await client.post("/v1/rollouts/r-1/rewards", json={"value": 1})
        assert r.status_code == 503 and r.json()["error"]["code"] == "event_not_recorded"
        assert "Message size too large" in r.json()["error"]["message"]

    run(refused, kafka="failed")

    async def queued(client: httpx.AsyncClient, app: Gateway) -> None:
        started = time.perf_counter()
        assert (await client.post("/v1/rollouts/r-1/rewards", json={"value": 1})).status_code == 200
        assert (await client.post("/v1/rollouts", json={})).status_code == 201
        r = await client.post("/rollouts/r-1/v1/chat/completions", json=CHAT)
        assert r.status_code == 200 and "x-rollstream-recorded" not in r.headers
        assert time.perf_counter() - started < 5  # far below the 30 s ack timeout

    run(queued, kafka="pending", acks="queued", ack_timeout=30, backend=True)


def test_model_calls_are_answered_but_marked_pending_without_an_acknowledgement() -> None:
    async def test(client: httpx.AsyncClient, app: Gateway) -> None:
        r = await client.post("/rollouts/r-1/v1/chat/completions", json=CHAT)
        assert r.status_code == 200 and r.headers["x-rollstream-recorded"] == "pending"
        assert r.json()["choices"][0]["message"]["content"] == "Hello"
        r = await client.post("/rollouts/r-1/v1/chat/completions", json={**CHAT, "stream": True})
        assert r.status_code == 200 and r.text.endswith(": rollstream-recorded pending\n\ndata: [DONE]\n\n")
        assert '"Hello"' in r.text and r.text.count("[DONE]") == 1
        metrics = (await client.get("/metrics")).text
        assert ('rollstream_gateway_unacknowledged_total{endpoint="chat_completions",outcome="pending"} 2.0'
                in metrics)

    assert len(sent(run(test, kafka="pending", ack_timeout=0.2, backend=True))) == 2


def test_client_event_ids_are_checked() -> None:
    async def test(client: httpx.AsyncClient, app: Gateway) -> None:
        for body in ({"value": 1, "event_id": ""}, {"value": 1, "event_id": 5}, {"value": 1, "event_id": "a/b"}):
            r = await client.post("/v1/rollouts/r-1/rewards", json=body)
            assert r.status_code == 422 and r.json()["error"]["param"] == "event_id", body
        r = await client.post("/v1/rollouts", json={"rollout_id": "r-2", "event_id": "start-r-2"})
        assert r.status_code == 201 and r.json()["event_id"] == "start-r-2"
        r = await client.post("/v1/rollouts/r-2/finish", json={"status": "SUCCEEDED", "event_id": "end-r-2"})
        assert r.json()["event_id"] == "end-r-2"

    assert [r["event_id"] for _, _, r in sent(run(test))] == ["start-r-2", "end-r-2"]


def test_delivery_is_woken_from_another_thread_and_times_out() -> None:
    async def go() -> None:
        settled_later = Delivery(2)
        threading.Timer(0.05, settled_later.settle).start()
        threading.Timer(0.1, settled_later.settle, [1, "refused"]).start()
        assert await settled_later.wait(5) == "failed" and settled_later.error == "refused"
        never = Delivery(1)
        assert await never.wait(0.05) == "pending"
        never.settle()
        assert await never.wait(0.05) == "kafka"
        assert await Delivery.settled().wait(0) == "kafka"

    asyncio.run(go())
