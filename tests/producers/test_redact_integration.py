"""Redaction at capture, end to end: an e-mail address in a prompt never reaches Kafka.

Three ways in, each with the user's own client and a real broker: the official OpenAI client through
``rollstream gateway --redact email`` to the real policy server; the SDK's instrumented OpenAI client
with ``ROLLSTREAM_REDACT=email`` semantics; OpenTelemetry's Python SDK exporting GenAI spans to
``rollstream otlp --redact email``. Every record of every topic of the prefix is then read back as raw
bytes (Avro writes strings as UTF-8, so the address would appear verbatim), and the calls themselves
are decoded to show that what is published is the redacted text.
"""

from __future__ import annotations

import urllib.request
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from confluent_kafka import Consumer, TopicPartition
from openai import OpenAI
from test_gateway_integration import GatewayProcess, events, gateway_factory  # noqa: F401 - a fixture
from test_otlp_integration import start_receiver, stop_receiver

from rollstream.producers.instrument import instrument
from rollstream.producers.redact import RedactionSettings
from rollstream.producers.sdk import Client, SdkSettings
from rollstream.schemas.topics import Topics, consumer_config
from rollstream.settings import ConnectionSettings

pytestmark = [pytest.mark.integration, pytest.mark.slow]

EMAIL = "jane.doe@example.com"
PROMPT = f"Write back to {EMAIL} and say hello."
MARK = "[REDACTED:email]"


def raw_records(settings: ConnectionSettings, topics: Topics) -> list[tuple[str, bytes]]:
    """Every record of every topic of the prefix, key + value + headers as bytes, read_uncommitted
    (aborted transactions included: nothing written may hold the address, committed or not)."""
    consumer = Consumer(consumer_config(f"raw-{uuid.uuid4().hex}", settings, **{"isolation.level": "read_uncommitted"}))
    out: list[tuple[str, bytes]] = []
    try:
        meta = consumer.list_topics(timeout=10).topics
        ends: dict[tuple[str, int], int] = {}
        for name in (t for t in meta if t.startswith(topics.prefix)):
            for p in meta[name].partitions:
                high = consumer.get_watermark_offsets(TopicPartition(name, p), timeout=10)[1]
                if high > 0:
                    ends[(name, p)] = high
        consumer.assign([TopicPartition(t, p, 0) for t, p in ends])
        while ends:
            msg = consumer.poll(10)
            assert msg is not None, f"records missing while reading back {sorted(ends)}"
            if msg.error():
                continue
            blob = (msg.key() or b"") + (msg.value() or b"") + b"".join(v or b"" for _, v in msg.headers() or [])
            out.append((str(msg.topic()), blob))
            if msg.offset() + 1 >= ends.get((str(msg.topic()), int(msg.partition())), 0):
                ends.pop((str(msg.topic()), int(msg.partition())), None)
    finally:
        consumer.close()
    return out


def assert_never_in_kafka(settings: ConnectionSettings, topics: Topics, expect_topics: set[str]) -> None:
    records = raw_records(settings, topics)
    assert {t for t, _ in records} >= expect_topics, f"nothing captured on {expect_topics - {t for t, _ in records}}"
    leaked = [t for t, blob in records if EMAIL.encode() in blob]
    assert not leaked, f"the address reached Kafka on {leaked}"
    assert any(MARK.encode() in blob for t, blob in records if t == topics.calls), "the calls do not hold the mark"


def test_the_gateway_never_publishes_an_address_in_a_prompt(
    policy_server: Any, topics_factory: Callable[..., Topics], settings: ConnectionSettings,
    gateway_factory: Callable[..., GatewayProcess],  # noqa: F811
) -> None:
    topics = topics_factory()
    gw = gateway_factory(policy_server.base_url, topics, args=["--redact", "email"])
    client = OpenAI(base_url=f"{gw.url}/rollouts/r-redact/v1", api_key="none")
    answer = client.chat.completions.create(model=policy_server.policy, max_tokens=6, temperature=0,
                                            messages=[{"role": "user", "content": PROMPT}])
    assert answer.choices[0].message.content is not None
    # Unattributed too (recorded by response id for the OTLP join), and a reward's metadata.
    OpenAI(base_url=f"{gw.url}/v1", api_key="none").chat.completions.create(
        model=policy_server.policy, max_tokens=4, messages=[{"role": "user", "content": PROMPT}])
    status, _ = gw.post("/v1/rollouts/r-redact/rewards", {"value": 1.0, "terminal": True,
                                                         "metadata": {"note": f"graded for {EMAIL}"}})
    assert status == 200
    (call,) = events(settings, topics, topics.calls, 1)
    assert call["messages"][0]["content"] == f"Write back to {MARK} and say hello."
    assert call["prompt_token_ids"], "the prompt's token ids are the redacted text's, kept"
    assert_never_in_kafka(settings, topics, {topics.calls, topics.calls_by_response, topics.rewards})
    with urllib.request.urlopen(gw.url + "/metrics", timeout=10) as resp:
        metrics = resp.read().decode()
    # the two requests and the reward's metadata (the events carry the request as the model saw it)
    assert 'rollstream_redactions_total{rule="email",surface="gateway"} 3.0' in metrics


def test_the_sdk_never_publishes_an_address_in_a_prompt(
    policy_server: Any, topics: Topics, settings: ConnectionSettings
) -> None:
    sdk = Client(settings, SdkSettings(redaction=RedactionSettings(rules="email", patterns="", hook="")),
                 topics=topics)
    try:
        oa = instrument(OpenAI(base_url=policy_server.base_url, api_key="none"))
        messages = [{"role": "user", "content": PROMPT}]
        with sdk.rollout(task_id="t-redact", policy=policy_server.policy) as r:
            oa.chat.completions.create(model=policy_server.policy, max_tokens=6, messages=messages)
            r.reward(1.0, terminal=True, metadata={"reviewer": EMAIL})
        sdk.flush(30)
    finally:
        sdk.close()
    assert messages[0]["content"] == PROMPT  # the caller's own objects are left as they were
    (call,) = events(settings, topics, topics.calls, 1)
    assert call["messages"][0]["content"] == f"Write back to {MARK} and say hello."
    assert_never_in_kafka(settings, topics, {topics.calls, topics.rewards, topics.rollouts})


def test_the_otlp_receiver_never_publishes_an_address_in_a_span(
    topics: Topics, settings: ConnectionSettings, tmp_path: Path
) -> None:
    from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
    from opentelemetry.sdk.resources import Resource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import SimpleSpanProcessor

    rec = start_receiver(settings, topics, tmp_path / "otlp.log", ("--redact", "email"))
    try:
        rollout_id = uuid.uuid4().hex
        provider = TracerProvider(resource=Resource.create({"service.name": "py-agent",
                                                            "rollstream.rollout_id": rollout_id}))
        provider.add_span_processor(SimpleSpanProcessor(OTLPSpanExporter(endpoint=rec.traces)))
        tracer = provider.get_tracer("agent")
        with tracer.start_as_current_span("chat tiny") as span:
            span.set_attributes({
                "gen_ai.operation.name": "chat", "gen_ai.request.model": "tiny", "gen_ai.response.id": "r-0",
                "gen_ai.prompt.0.role": "user", "gen_ai.prompt.0.content": PROMPT,
                "gen_ai.completion.0.content": "Hello!",
                "rollstream.prompt_token_ids": [1, 2, 3], "rollstream.response_token_ids": [9],
                "rollstream.response_logprobs": [-0.5],
            })
        provider.shutdown()
        (call,) = events(settings, topics, topics.calls, 1)
        assert call["messages"][0]["content"] == f"Write back to {MARK} and say hello."
        # The span's prompt token ids encode the raw text: dropped, and said so; the response's are kept.
        assert call["prompt_token_ids"] is None and call["response_token_ids"] == [9]
        assert call["metadata"]["redacted_tokens"] == "prompt"
        assert 'rollstream_redactions_total{rule="email",surface="otlp"} 1.0' in rec.metrics()
    finally:
        stop_receiver(rec)
    assert_never_in_kafka(settings, topics, {topics.calls})
