"""``rollstream otlp`` on the real stack: Python and Node OpenTelemetry exporters deliver spans that become events."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import orjson
import pytest
from confluent_kafka import Consumer, TopicPartition

from rollstream.events import Received, read_events
from rollstream.schemas.codec import EventCodec
from rollstream.schemas.topics import Topics, consumer_config
from rollstream.settings import ConnectionSettings

pytestmark = pytest.mark.integration

NODE_DIR = Path(__file__).resolve().parents[1] / "interop" / "node"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Receiver:
    def __init__(self, port: int, proc: subprocess.Popen[bytes], log: Path) -> None:
        self.port, self.proc, self.log = port, proc, log
        self.url = f"http://127.0.0.1:{port}"
        self.traces = self.url + "/v1/traces"

    def post(self, body: bytes, content_type: str = "application/json") -> tuple[int, bytes]:
        req = urllib.request.Request(self.traces, data=body, headers={"content-type": content_type}, method="POST")
        try:
            with urllib.request.urlopen(req, timeout=10) as resp:
                return resp.status, resp.read()
        except urllib.error.HTTPError as exc:
            return exc.code, exc.read()

    def metrics(self) -> str:
        with urllib.request.urlopen(self.url + "/metrics", timeout=10) as resp:
            return str(resp.read().decode())


def start_receiver(settings: ConnectionSettings, topics: Topics, log: Path, args: tuple[str, ...] = ()) -> Receiver:
    """``rollstream otlp`` in a subprocess on a free port, healthy."""
    port = _free_port()
    with log.open("wb") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "rollstream.cli", "otlp", "--port", str(port), "--policy", "otlp-default",
             "--kafka-bootstrap", settings.kafka_bootstrap, "--schema-registry-url", settings.schema_registry_url,
             "--topic-prefix", topics.prefix, *args],
            stdout=out, stderr=subprocess.STDOUT, env={**os.environ, "ROLLSTREAM_PARTITIONS": str(topics.partitions)},
        )
    rec = Receiver(port, proc, log)
    deadline = time.monotonic() + 60
    while True:
        try:
            urllib.request.urlopen(rec.url + "/healthz", timeout=1).close()
            return rec
        except OSError:
            if proc.poll() is not None or time.monotonic() > deadline:
                proc.kill()
                pytest.fail(f"rollstream otlp did not start:\n{log.read_text()[-3000:]}")
            time.sleep(0.2)


def stop_receiver(rec: Receiver) -> None:
    rec.proc.terminate()
    assert rec.proc.wait(timeout=30) == 0, rec.log.read_text()[-3000:]


@pytest.fixture
def receiver(settings: ConnectionSettings, topics: Topics, tmp_path: Path) -> Iterator[Receiver]:
    rec = start_receiver(settings, topics, tmp_path / "otlp.log")
    yield rec
    stop_receiver(rec)


def _read(codec: EventCodec, topics: list[str], count: int, settings: ConnectionSettings) -> list[Received]:
    return list(read_events(codec, topics, f"test-{uuid.uuid4().hex}", count, timeout=60, settings=settings))


def _count(settings: ConnectionSettings, topic: str, partitions: int) -> int:
    consumer = Consumer(consumer_config(f"offsets-{uuid.uuid4().hex}", settings))
    try:
        return sum(consumer.get_watermark_offsets(TopicPartition(topic, p), timeout=10)[1] for p in range(partitions))
    finally:
        consumer.close()


def test_python_opentelemetry_sdk_spans_become_calls_and_rewards(
    receiver: Receiver, codec: EventCodec, topics: Topics, settings: ConnectionSettings
) -> None:
    from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
    from opentelemetry.sdk.resources import Resource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import SimpleSpanProcessor

    rollout_id = uuid.uuid4().hex
    provider = TracerProvider(resource=Resource.create({"service.name": "py-agent",
                                                        "rollstream.rollout_id": rollout_id}))
    provider.add_span_processor(SimpleSpanProcessor(OTLPSpanExporter(endpoint=receiver.traces)))
    tracer = provider.get_tracer("agent")
    with tracer.start_as_current_span("invoke_agent"):
        for i in range(2):
            with tracer.start_as_current_span("chat tiny") as span:
                span.set_attributes({
                    "gen_ai.operation.name": "chat", "gen_ai.request.model": "tiny",
                    "gen_ai.response.id": f"py-{i}", "gen_ai.usage.input_tokens": 5,
                    "gen_ai.usage.output_tokens": 2, "gen_ai.response.finish_reasons": ["stop"],
                    "gen_ai.prompt.0.role": "user", "gen_ai.prompt.0.content": f"question {i}",
                    "gen_ai.completion.0.content": f"answer {i}",
                    "rollstream.prompt_token_ids": [1, 2, 3, 4, 5], "rollstream.response_token_ids": [9, 10],
                    "rollstream.response_logprobs": [-0.5, -0.75],
                })
        with tracer.start_as_current_span("tool search"):
            pass
        with tracer.start_as_current_span("rollstream.reward") as span:
            span.set_attributes({"rollstream.reward.value": 1.0, "rollstream.reward.terminal": True})
    provider.shutdown()
    events = _read(codec, [topics.calls, topics.rewards], 3, settings)
    assert {e.key for e in events} == {rollout_id} and len({e.partition for e in events}) == 1
    calls = sorted((e.value for e in events if e.topic == topics.calls), key=lambda c: c["sequence"])
    assert [(c["call_id"], c["sequence"], c["response_text"]) for c in calls] == [
        ("py-0", 0, "answer 0"), ("py-1", 1, "answer 1")]
    assert calls[0]["messages"][0]["content"] == "question 0" and calls[0]["source"] == "otlp"
    assert (calls[0]["prompt_token_ids"], calls[0]["response_token_ids"]) == ([1, 2, 3, 4, 5], [9, 10])
    assert calls[0]["response_logprobs"] == pytest.approx([-0.5, -0.75])
    (reward,) = [e.value for e in events if e.topic == topics.rewards]
    assert (reward["value"], reward["terminal"]) == (1.0, True)
    metrics = receiver.metrics()
    assert 'rollstream_otlp_spans_total{kind="ignored"} 2.0' in metrics  # invoke_agent and the tool span


def test_a_bad_span_is_refused_alone_and_undecodable_bodies_get_400(
    receiver: Receiver, topics: Topics, settings: ConnectionSettings
) -> None:
    good = {"traceId": "5b8efff798038103d269b633813fc60c", "spanId": "00000000000000aa", "name": "chat",
            "startTimeUnixNano": "1", "endTimeUnixNano": "2", "attributes": [
                {"key": "gen_ai.operation.name", "value": {"stringValue": "chat"}},
                {"key": "rollstream.rollout_id", "value": {"stringValue": "r-bad"}}]}
    bad_reward = {**good, "spanId": "00000000000000ab", "name": "rollstream.reward", "attributes": [
        {"key": "rollstream.rollout_id", "value": {"stringValue": "r-bad"}},
        {"key": "rollstream.reward.value", "value": {"stringValue": "NaN-ish"}}]}
    body = {"resourceSpans": [{"scopeSpans": [{"spans": [good, bad_reward]}]}]}
    status, answer = receiver.post(orjson.dumps(body))
    partial = orjson.loads(answer)["partialSuccess"]
    assert status == 200 and partial["rejectedSpans"] == "1" and "must be a number" in partial["errorMessage"]
    for raw, ctype in ((b"{oops", "application/json"), (b"\x0a\x05\xff", "application/x-protobuf"),
                       (orjson.dumps({"resourceSpans": [{"scopeSpans": [{"spans": [{**good, "traceId": "xyz"}]}]}]}),
                        "application/json")):
        status, _ = receiver.post(raw, ctype)
        assert status == 400, raw
    assert receiver.post(b"{}", "text/plain")[0] == 415
    time.sleep(1.0)
    assert _count(settings, topics.calls, topics.partitions) == 1  # the good span of the partial request
    assert _count(settings, topics.rewards, topics.partitions) == 0
    assert "rollstream_otlp_spans_rejected_total 1.0" in receiver.metrics()


@pytest.mark.parametrize("mode", ["proto", "json"])
def test_node_opentelemetry_exporter_spans_become_events(
    mode: str, receiver: Receiver, codec: EventCodec, topics: Topics, settings: ConnectionSettings
) -> None:
    node = shutil.which("node")
    if node is None or not (NODE_DIR / "node_modules" / "@opentelemetry" / "sdk-trace-base").exists():
        pytest.fail("Node.js or the OpenTelemetry JS packages are missing; run 'bash scripts/setup.sh'")
    rollout_id = uuid.uuid4().hex
    out = subprocess.run([node, "otlp.js", receiver.traces, mode, rollout_id], cwd=NODE_DIR,
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr[-3000:]
    events = _read(codec, [topics.calls, topics.rewards], 2, settings)
    assert {e.key for e in events} == {rollout_id}
    call: dict[str, Any] = next(e.value for e in events if e.topic == topics.calls)
    reward: dict[str, Any] = next(e.value for e in events if e.topic == topics.rewards)
    assert (call["call_id"], call["response_text"], call["finish_reason"]) == (f"node-{mode}", "hello", "stop")
    assert call["messages"][0]["content"] == "hi from node"
    assert (call["prompt_token_ids"], call["response_token_ids"]) == ([11, 12, 13, 14], [21, 22])
    assert call["response_logprobs"] == pytest.approx([-0.25, -1.5])
    assert (call["prompt_tokens"], call["completion_tokens"], call["policy"]) == (4, 2, "tiny")
    assert (reward["value"], reward["terminal"], reward["call_id"]) == (0.5, True, f"node-{mode}")
