"""The gateway as a process, between the official OpenAI client and the real policy server, with real Kafka."""

from __future__ import annotations

import dataclasses
import http.client
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from confluent_kafka import Consumer, TopicPartition
from openai import OpenAI

from rollstream.events import read_events
from rollstream.schemas.codec import EventCodec, register_schemas, registry_client
from rollstream.schemas.topics import Topics, consumer_config
from rollstream.settings import ConnectionSettings, StackSettings
from rollstream.stack.kafka import Kafka

pytestmark = [pytest.mark.integration, pytest.mark.slow]

CHAT = [{"role": "user", "content": "Count to three."}]


def free_port(pair: bool = False) -> int:
    while True:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = int(s.getsockname()[1])
        if not pair:
            return port
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port + 1))
                return port
            except OSError:
                continue


class GatewayProcess:
    """``rollstream gateway`` in a subprocess on a free port."""

    def __init__(self, backend: str, topics: Topics, settings: ConnectionSettings, log: Path,
                 args: list[str] | None = None, env: dict[str, str] | None = None) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        cmd = [sys.executable, "-m", "rollstream.cli", "gateway", "--port", str(self.port), "--backend-url", backend,
               "--kafka-bootstrap", settings.kafka_bootstrap, "--schema-registry-url", settings.schema_registry_url,
               "--topic-prefix", topics.prefix, *(args or [])]
        self.log = log
        self.proc = subprocess.Popen(cmd, stdout=log.open("ab"), stderr=subprocess.STDOUT,
                                     env={**os.environ, "ROLLSTREAM_GATEWAY_API_KEYS": "", **(env or {})})
        deadline = time.monotonic() + 60
        while True:
            assert self.proc.poll() is None, f"gateway exited: {log.read_text()[-3000:]}"
            try:
                urllib.request.urlopen(self.url + "/healthz", timeout=2).close()
                return
            except OSError:
                assert time.monotonic() < deadline, f"gateway did not start: {log.read_text()[-3000:]}"
                time.sleep(0.2)

    def post(self, path: str, body: bytes | dict[str, Any], headers: dict[str, str] | None = None) -> tuple[int, Any]:
        data = body if isinstance(body, bytes) else json.dumps(body).encode()
        req = urllib.request.Request(self.url + path, data=data, headers={"Content-Type": "application/json",
                                                                           **(headers or {})})
        try:
            with urllib.request.urlopen(req, timeout=60) as resp:
                return resp.status, json.loads(resp.read())
        except urllib.error.HTTPError as err:
            return err.code, json.loads(err.read())

    def metric(self, line_start: str) -> float:
        text = urllib.request.urlopen(self.url + "/metrics", timeout=5).read().decode()
        return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines() if line.startswith(line_start))

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=40)
            except subprocess.TimeoutExpired:
                self.proc.kill()
        return self.proc.wait()


@pytest.fixture
def gateway_factory(settings: ConnectionSettings, tmp_path: Path) -> Iterator[Callable[..., GatewayProcess]]:
    started: list[GatewayProcess] = []

    def make(backend: str, topics: Topics, conn: ConnectionSettings | None = None, **kw: Any) -> GatewayProcess:
        gw = GatewayProcess(backend, topics, conn or settings, tmp_path / f"gateway-{len(started)}.log", **kw)
        started.append(gw)
        return gw

    yield make
    for gw in started:
        gw.stop()


def events(settings: ConnectionSettings, topics: Topics, topic: str, count: int) -> list[dict[str, Any]]:
    codec = EventCodec(registry_client(settings), topics)
    return [r.value for r in read_events(codec, [topic], f"g-{uuid.uuid4().hex}", count, 60, settings)]


def test_calls_are_relayed_unchanged_and_captured_with_engine_token_ids(
    policy_server: Any, topics_factory: Callable[..., Topics], settings: ConnectionSettings,
    gateway_factory: Callable[..., GatewayProcess],
) -> None:
    topics = topics_factory()
    gw = gateway_factory(policy_server.base_url, topics)
    model = policy_server.policy
    direct = OpenAI(base_url=policy_server.base_url, api_key="none")
    params: dict[str, Any] = {"model": model, "max_tokens": 8, "temperature": 0, "seed": 1}
    truth = direct.chat.completions.create(messages=CHAT, logprobs=True, extra_body={"return_token_ids": True},
                                           **params)
    truth_extra = truth.model_extra or {}
    truth_ids = truth.choices[0].model_extra["token_ids"]  # type: ignore[index]

    # An agent that can only set base_url: attributed by the path.
    by_path = OpenAI(base_url=f"{gw.url}/rollouts/r-path/agents/solver/v1", api_key="none")
    whole = by_path.chat.completions.create(messages=CHAT, **params)
    assert whole.choices[0].message.content == truth.choices[0].message.content
    assert whole.choices[0].logprobs is None  # not asked for: stripped
    assert "prompt_token_ids" not in (whole.model_extra or {})
    assert "token_ids" not in (whole.choices[0].model_extra or {})

    # Headers, streamed.
    by_header = OpenAI(base_url=f"{gw.url}/v1", api_key="none",
                       default_headers={"X-Rollout-Id": "r-head", "X-Attempt": "2", "X-Agent-Name": "critic"})
    chunks = list(by_header.chat.completions.create(messages=CHAT, stream=True, **params))
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == truth.choices[0].message.content
    assert all("token_ids" not in (c.choices[0].model_extra or {}) for c in chunks if c.choices)
    assert all(c.choices for c in chunks)  # the usage chunk the gateway asked for is not passed on

    completion = by_header.completions.create(prompt="One, two,", **params)
    direct_completion = direct.completions.create(prompt="One, two,", **params)
    assert completion.choices[0].text == direct_completion.choices[0].text
    several = by_header.chat.completions.create(messages=CHAT, n=2, **{**params, "temperature": 1.0})
    assert len(several.choices) == 2
    models = by_header.models.list()
    assert model in [m.id for m in models.data]

    calls = events(settings, topics, topics.calls, 5)
    by_rollout: dict[str, list[dict[str, Any]]] = {}
    for call in calls:
        by_rollout.setdefault(call["rollout_id"], []).append(call)
    [path_call] = by_rollout["r-path"]
    head_calls = sorted(by_rollout["r-head"], key=lambda c: (c["sequence"], c["metadata"]["choice_index"]))
    assert len(head_calls) == 4
    for call in (path_call, head_calls[0]):  # whole and streamed chat: the engine's own ids
        assert call["prompt_token_ids"] == truth_extra["prompt_token_ids"]
        assert call["response_token_ids"] == truth_ids
        assert call["response_logprobs"] == pytest.approx([t.logprob for t in truth.choices[0].logprobs.content],
                                                          abs=1e-4)
        assert call["response_text"] == truth.choices[0].message.content
        assert call["policy_version"] == truth_extra["policy_version"] and call["policy"]
        assert call["endpoint"] == "CHAT_COMPLETIONS" and call["sampling"]["seed"] == 1
    assert (path_call["agent_name"], path_call["attempt"], path_call["sequence"]) == ("solver", 1, 0)
    assert [c["sequence"] for c in head_calls] == [0, 1, 2, 2]  # the n=2 choices share their call's place
    assert all(c["agent_name"] == "critic" and c["attempt"] == 2 for c in head_calls)
    assert head_calls[1]["endpoint"] == "COMPLETIONS" and head_calls[1]["prompt"] == "One, two,"
    assert head_calls[1]["response_text"] == direct_completion.choices[0].text
    assert len(head_calls[1]["response_logprobs"]) == len(head_calls[1]["response_token_ids"]) > 0
    assert {c["response_text"] for c in head_calls[2:]} == {c.message.content for c in several.choices}
    assert len({c["call_id"] for c in calls}) == 5


def test_unattributed_calls_are_served_recorded_only_by_response_id_and_backend_failures_are_502(
    policy_server: Any, topics_factory: Callable[..., Topics], settings: ConnectionSettings,
    gateway_factory: Callable[..., GatewayProcess],
) -> None:
    topics = topics_factory()
    gw = gateway_factory(policy_server.base_url, topics)
    client = OpenAI(base_url=f"{gw.url}/v1", api_key="none")
    r = client.chat.completions.create(model=policy_server.policy, messages=CHAT, max_tokens=4)
    assert r.choices[0].message.content is not None
    assert gw.metric("rollstream_gateway_unattributed_calls_total") == 1
    # Not on calls: on calls-by-response, for the OTLP receiver (tests/producers/test_response_index.py).
    assert gw.metric(f'rollstream_gateway_events_enqueued_total{{topic="{topics.calls_by_response}"}}') == 1
    [call] = events(settings, topics, topics.calls_by_response, 1)
    assert (call["rollout_id"], call["metadata"]["response_id"]) == ("", r.id)
    assert in_kafka(settings, topics, topics.calls) == 0

    dead = gateway_factory(f"http://127.0.0.1:{free_port()}/v1", topics)
    status, body = dead.post("/rollouts/r-1/v1/chat/completions", {"model": "m", "messages": CHAT})
    assert status == 502 and "unreachable" in body["error"]["message"]
    assert dead.metric("rollstream_gateway_events_enqueued_total") == 0


def test_rewards_api_validates_authorizes_and_publishes(
    topics_factory: Callable[..., Topics], settings: ConnectionSettings,
    gateway_factory: Callable[..., GatewayProcess],
) -> None:
    topics = topics_factory()
    gw = gateway_factory("http://127.0.0.1:9/v1", topics, env={"ROLLSTREAM_GATEWAY_API_KEYS":
                                                                 "agent-key=models,grader-key=rewards"})
    grader = {"Authorization": "Bearer grader-key"}
    assert gw.post("/v1/rollouts/r-1/rewards", {"value": 1.0})[0] == 401
    assert gw.post("/v1/rollouts/r-1/rewards", {"value": 1.0}, {"Authorization": "Bearer x"})[0] == 401
    assert gw.post("/v1/rollouts/r-1/rewards", {"value": 1.0}, {"Authorization": "Bearer agent-key"})[0] == 403
    status, body = gw.post("/v1/rollouts/r-1/rewards", b'{"value": NaN}', grader)
    assert status == 422 and body["error"]["param"] == "value"
    status, body = gw.post("/v1/rollouts/r-1/rewards", {"terminal": True}, grader)
    assert status == 422 and body["error"]["param"] == "value"
    status, started = gw.post("/v1/rollouts", {"task_id": "t", "group_id": "g"}, grader)
    assert status == 201
    rid = started["rollout_id"]
    assert gw.post(f"/v1/rollouts/{rid}/rewards", {"value": 0.75, "terminal": True}, grader)[0] == 200
    assert gw.post(f"/v1/rollouts/{rid}/finish", {"status": "SUCCEEDED"}, grader)[0] == 200
    [reward] = events(settings, topics, topics.rewards, 1)
    assert (reward["rollout_id"], reward["value"], reward["terminal"], reward["name"]) == (rid, 0.75, True, "primary")
    lifecycle = events(settings, topics, topics.rollouts, 2)
    assert [e["status"] for e in lifecycle] == ["STARTED", "SUCCEEDED"]
    assert lifecycle[0]["task_id"] == "t" and lifecycle[0]["group_id"] == "g"


def test_kafka_outage_fills_the_queue_then_nothing_acknowledged_is_lost(
    policy_server: Any, settings: ConnectionSettings, tmp_path: Path,
    gateway_factory: Callable[..., GatewayProcess],
) -> None:
    kafka = Kafka(StackSettings(state_dir=tmp_path / "kafka", kafka_port=free_port(pair=True), kafka_heap="384m"))
    if not kafka.installed():
        kafka.install()
    kafka.start()
    try:
        wait(kafka.healthy, 120, "the test's Kafka broker did not start")
        conn = ConnectionSettings(kafka_bootstrap=kafka.url, schema_registry_url=settings.schema_registry_url)
        topics = Topics(prefix=f"outage{uuid.uuid4().hex[:8]}.")
        register_schemas(registry_client(conn), topics)
        gw = gateway_factory(policy_server.base_url, topics, conn, args=["--queue-max", "4", "--ack-timeout", "1"])
        request = {"model": policy_server.policy, "messages": CHAT, "max_tokens": 3}
        assert gw.post("/rollouts/r-0/v1/chat/completions", request)[0] == 200
        wait(lambda: gw.metric("rollstream_gateway_events_published_total") == 1, 30, "first event not delivered")

        kafka.process.stop()
        answers = [gw.post(f"/rollouts/r-{i}/v1/chat/completions", request)[0] for i in range(1, 8)]
        assert answers == [200] * 4 + [503] * 3  # 4 events fit the queue (answered "pending"); then admission control
        status, body = gw.post("/rollouts/r-9/v1/chat/completions", {**request, "stream": True})
        assert status == 503 and body["error"]["code"] == "event_queue_full"
        assert gw.metric("rollstream_gateway_rejected_total") == 4

        kafka.start()
        wait(lambda: gw.metric("rollstream_gateway_events_published_total") == 5, 120,
             "queued events not delivered after Kafka came back")
        calls = events(conn, topics, topics.calls, 5)
        assert sorted(c["rollout_id"] for c in calls) == [f"r-{i}" for i in range(5)]
        assert gw.metric("rollstream_gateway_delivery_failures_total") == 0
        assert gw.post("/rollouts/r-10/v1/chat/completions", request)[0] == 200
    finally:
        kafka.process.stop()


def in_kafka(settings: ConnectionSettings, topics: Topics, topic: str) -> int:
    """How many events ``topic`` holds for a read_committed consumer, asked of the broker now."""
    consumer = Consumer(consumer_config(f"wm-{uuid.uuid4().hex}", settings))
    try:
        return sum(consumer.get_watermark_offsets(TopicPartition(topic, p), timeout=10)[1]
                   for p in range(topics.partitions))
    finally:
        consumer.close()


def raw_post(url: str, body: dict[str, Any]) -> tuple[int, dict[str, str], bytes, float]:
    """Status, headers, body and seconds taken of one POST, whatever the status."""
    req = urllib.request.Request(url, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"})
    started = time.monotonic()
    try:
        with urllib.request.urlopen(req, timeout=60) as resp:
            return resp.status, dict(resp.headers), resp.read(), time.monotonic() - started
    except urllib.error.HTTPError as err:
        return err.code, dict(err.headers), err.read(), time.monotonic() - started


def test_what_the_gateway_acknowledged_is_in_kafka_when_it_answers(
    policy_server: Any, topics_factory: Callable[..., Topics], settings: ConnectionSettings,
    gateway_factory: Callable[..., GatewayProcess],
) -> None:
    topics = topics_factory()
    gw = gateway_factory(policy_server.base_url, topics)  # ROLLSTREAM_GATEWAY_ACKS=kafka, the default
    chat = {"model": policy_server.policy, "messages": CHAT, "max_tokens": 3}
    steps: list[tuple[str, dict[str, Any], str]] = [
        ("/v1/rollouts", {"rollout_id": "r-ack", "event_id": "start-1"}, topics.rollouts),
        ("/rollouts/r-ack/v1/chat/completions", chat, topics.calls),
        ("/rollouts/r-ack/v1/chat/completions", {**chat, "stream": True}, topics.calls),
        ("/v1/rollouts/r-ack/rewards", {"value": 1.0, "terminal": True, "event_id": "reward-1"}, topics.rewards),
        ("/v1/rollouts/r-ack/finish", {"status": "SUCCEEDED"}, topics.rollouts),
    ]
    expected = dict.fromkeys((topics.rollouts, topics.calls, topics.rewards), 0)
    for path, body, topic in steps:
        status, headers, raw, _ = raw_post(gw.url + path, body)
        assert status in (200, 201), raw
        assert "x-rollstream-recorded" not in {k.lower() for k in headers} and b"rollstream-recorded" not in raw
        expected[topic] += 1
        # Answered means acknowledged: the event is in Kafka already, no waiting.
        assert {t: in_kafka(settings, topics, t) for t in expected} == expected, path
    gw.proc.kill()  # kill -9 right after the last answer loses nothing
    gw.proc.wait()
    assert [e["event_id"] for e in events(settings, topics, topics.rewards, 1)] == ["reward-1"]
    lifecycle = events(settings, topics, topics.rollouts, 2)
    assert [e["status"] for e in lifecycle] == ["STARTED", "SUCCEEDED"] and lifecycle[0]["event_id"] == "start-1"
    assert [c["rollout_id"] for c in events(settings, topics, topics.calls, 2)] == ["r-ack", "r-ack"]


def test_without_kafka_the_gateway_says_what_is_not_acknowledged(
    policy_server: Any, topics_factory: Callable[..., Topics], settings: ConnectionSettings,
    gateway_factory: Callable[..., GatewayProcess],
) -> None:
    topics = topics_factory()
    nowhere = dataclasses.replace(settings, kafka_bootstrap=f"127.0.0.1:{free_port()}")  # nothing listens
    acked = gateway_factory(policy_server.base_url, topics, nowhere, args=["--no-create-topics", "--ack-timeout", "1"])
    queued = gateway_factory(policy_server.base_url, topics, nowhere, args=["--no-create-topics", "--acks", "queued"])
    chat = {"model": policy_server.policy, "messages": CHAT, "max_tokens": 3}
    try:
        status, _, raw, took = raw_post(acked.url + "/v1/rollouts/r-1/rewards", {"value": 1.0, "event_id": "rw-1"})
        error = json.loads(raw)["error"]
        assert status == 503 and error["code"] == "event_not_acknowledged" and 1 <= took < 5
        assert "queued but Kafka has not acknowledged it within 1 s (is the broker unavailable?)" in error["message"]
        assert '{"event_id":"rw-1"}' in error["message"] and error["event_id"] == "rw-1"
        status, _, raw, _ = raw_post(acked.url + "/v1/rollouts", {})
        assert status == 503 and json.loads(raw)["error"]["rollout_id"] in json.loads(raw)["error"]["message"]

        status, headers, raw, took = raw_post(acked.url + "/rollouts/r-1/v1/chat/completions", chat)
        assert status == 200 and headers["x-rollstream-recorded"] == "pending" and 1 <= took < 5
        assert json.loads(raw)["choices"][0]["message"]["content"] is not None  # the model's answer all the same
        status, _, raw, _ = raw_post(acked.url + "/rollouts/r-1/v1/chat/completions", {**chat, "stream": True})
        assert status == 200 and raw.endswith(b": rollstream-recorded pending\n\ndata: [DONE]\n\n")
        assert acked.metric("rollstream_gateway_unacknowledged_total") == 4

        # acks=queued: the old behaviour, answered at once while Kafka is away.
        status, _, raw, took = raw_post(queued.url + "/v1/rollouts/r-2/rewards", {"value": 1.0})
        assert status == 200 and took < 1, raw
        status, _, _, _ = raw_post(queued.url + "/v1/rollouts", {})
        assert status == 201
        status, headers, raw, took = raw_post(queued.url + "/rollouts/r-2/v1/chat/completions", chat)
        assert status == 200 and "x-rollstream-recorded" not in {k.lower() for k in headers}
        assert queued.metric("rollstream_gateway_queue_depth") == 3
    finally:
        for gw in (acked, queued):  # nothing to flush to: no 30 s shutdown
            gw.proc.kill()


def wait(check: Callable[[], bool], timeout: float, message: str) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, message
        time.sleep(0.5)


def raw_exchange(port: int, request: bytes, hang_up: bool = False) -> tuple[int, dict[str, str], bytes, float]:
    """Send ``request`` as is on a fresh socket and read one answer: status, headers, body and seconds
    taken; ``headers["closed"]`` says whether the gateway then closed the connection. With ``hang_up``
    the client closes its side at once and reads nothing."""
    started = time.monotonic()
    with socket.create_connection(("127.0.0.1", port), timeout=30) as sock:
        sock.sendall(request)
        if hang_up:
            return 0, {}, b"", 0.0
        resp = http.client.HTTPResponse(sock)
        resp.begin()
        body = resp.read()
        closed = sock.recv(1) == b""  # the gateway closes the connection after a 408
        took = time.monotonic() - started
    headers = {k.lower(): v for k, v in resp.getheaders()}
    return resp.status, {**headers, "closed": str(closed)}, body, took


def short_body(path: str, headers: str = "") -> bytes:
    """A POST whose Content-Length announces 100 bytes, of which 10 are sent."""
    return (f"POST {path} HTTP/1.1\r\nHost: gw\r\nContent-Type: application/json\r\nContent-Length: 100\r\n"
            f"{headers}\r\n").encode() + b'{"value": '


def test_a_body_shorter_than_its_content_length_is_answered_408_after_the_body_timeout(
    topics_factory: Callable[..., Topics], settings: ConnectionSettings,
    gateway_factory: Callable[..., GatewayProcess],
) -> None:
    topics = topics_factory()
    gw = gateway_factory("http://127.0.0.1:9/v1", topics, env={"ROLLSTREAM_GATEWAY_BODY_TIMEOUT": "0.5"})
    for path, extra in (("/v1/rollouts/r-1/rewards", ""), ("/rollouts/r-1/v1/chat/completions", ""),
                        ("/v1/chat/completions", "X-Rollout-Id: r-1\r\n"), ("/v1/chat/completions", "")):
        status, headers, body, took = raw_exchange(gw.port, short_body(path, extra))
        error = json.loads(body)["error"]
        assert status == 408 and error["code"] == "body_timeout", (path, body)
        assert "nothing more came for 0.5 s after 10 bytes (ROLLSTREAM_GATEWAY_BODY_TIMEOUT)" in error["message"]
        assert (headers["connection"], headers["closed"]) == ("close", "True") and 0.5 <= took < 10, (path, took)
    # A client that gives up before the timeout: the gateway closes its side and goes on serving.
    raw_exchange(gw.port, short_body("/v1/rollouts/r-1/rewards"), hang_up=True)
    time.sleep(1)
    assert gw.post("/v1/rollouts/r-2/rewards", {"value": 1.0})[0] == 200
    assert gw.metric('rollstream_gateway_requests_total{endpoint="rewards",status="408"}') == 1
    assert gw.metric('rollstream_gateway_requests_total{endpoint="chat_completions",status="408"}') == 3
    assert gw.proc.poll() is None and "unexpected error" not in gw.log.read_text()
    # Nothing of the cut-off requests was recorded: only the one whole reward is in Kafka.
    assert (in_kafka(settings, topics, topics.calls), in_kafka(settings, topics, topics.rewards)) == (0, 1)


def test_an_empty_rollout_id_is_400_naming_it_and_nothing_is_published(
    topics_factory: Callable[..., Topics], settings: ConnectionSettings,
    gateway_factory: Callable[..., GatewayProcess],
) -> None:
    topics = topics_factory()
    gw = gateway_factory("http://127.0.0.1:9/v1", topics)  # a call served unattributed would be a 502
    chat = {"model": "m", "messages": CHAT}
    status, error = gw.post("/v1/chat/completions", chat, headers={"X-Rollout-Id": ""})
    assert status == 400 and error["error"]["param"] == "X-Rollout-Id", error
    assert "X-Rollout-Id header is empty" in error["error"]["message"]
    status, _, body, _ = raw_exchange(gw.port, b"POST /rollouts//v1/chat/completions HTTP/1.1\r\nHost: gw\r\n"
                                                b"Content-Length: 2\r\nConnection: close\r\n\r\n{}")
    assert status == 400 and json.loads(body)["error"]["param"] == "rollout_id", body
    assert gw.metric("rollstream_gateway_unattributed_calls_total") == 0
    assert gw.metric("rollstream_gateway_events_enqueued_total") == 0
    assert in_kafka(settings, topics, topics.calls) == 0
