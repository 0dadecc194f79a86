"""A real vLLM server (CPU build, its own environment) behind ``rollstream vllm`` and the gateway.

Nothing here is a stand-in: ``rollstream vllm`` starts vLLM's OpenAI server on the demo model
(head size 32, which vLLM's CPU attention takes) with runtime LoRA, and its policy front loads
PolicyUpdates from Kafka; the gateway in front records every call. Needs ``bash scripts/setup-vllm.sh``
(``.ci/run`` calls it).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
import urllib.request
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from confluent_kafka import Consumer
from openai import OpenAI
from transformers import AutoModelForCausalLM, AutoTokenizer

from rollstream.demo import tasks
from rollstream.demo.model import build_tiny
from rollstream.errors import ConfigError
from rollstream.events import EventProducer
from rollstream.schemas import make_event
from rollstream.schemas.codec import EventCodec, register_schemas, registry_client
from rollstream.schemas.topics import Topics, consumer_config, create_topics
from rollstream.serving.launch import free_port, get_json
from rollstream.serving.vllm import vllm_python
from rollstream.settings import ConnectionSettings
from rollstream.storage import ObjectStore
from rollstream.trainer.config import TrainConfig
from rollstream.trainer.model import load_policy, save_weights

pytestmark = [pytest.mark.integration, pytest.mark.slow]

POLICY = "calc"
LORA_RANK = 8
QUESTION = [{"role": "system", "content": tasks.SYSTEM}, {"role": "user", "content": "What is 8 times 2?"}]


def wait_for(check: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, f"timed out after {timeout:.0f}s waiting for {what}"
        time.sleep(0.2)


def answers(url: str) -> bool:
    try:
        urllib.request.urlopen(url, timeout=2).close()
        return True
    except OSError:
        return False


class Child:
    """A rollstream subcommand in a subprocess, with its log."""

    def __init__(self, args: list[str], log: Path, env: dict[str, str]) -> None:
        self.log = log
        self.proc = subprocess.Popen([sys.executable, "-m", "rollstream.cli", *args], stdout=log.open("ab"),
                                     stderr=subprocess.STDOUT, env={**os.environ, **env})

    def wait_until(self, url: str, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while not answers(url):
            assert self.proc.poll() is None, f"exited with {self.proc.returncode}: {self.log.read_text()[-4000:]}"
            assert time.monotonic() < deadline, f"{url} did not answer within {timeout:.0f}s: " \
                                                f"{self.log.read_text()[-4000:]}"
            time.sleep(0.5)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                self.proc.kill()


@pytest.fixture(scope="module")
def model_dir() -> Path:
    try:
        vllm_python()
    except ConfigError as exc:
        pytest.fail(str(exc), pytrace=False)
    return build_tiny()


@pytest.fixture(scope="module")
def vtopics(settings: ConnectionSettings) -> Topics:
    topics = Topics(prefix=f"vllm-{uuid.uuid4().hex[:8]}.", partitions=1)
    create_topics(topics, settings)
    register_schemas(registry_client(settings), topics)
    return topics


@pytest.fixture(scope="module")
def service_env(settings: ConnectionSettings, vtopics: Topics) -> dict[str, str]:
    return {"ROLLSTREAM_KAFKA_BOOTSTRAP": settings.kafka_bootstrap,
            "ROLLSTREAM_SCHEMA_REGISTRY_URL": settings.schema_registry_url,
            "ROLLSTREAM_S3_ENDPOINT": settings.s3_endpoint, "ROLLSTREAM_TOPIC_PREFIX": vtopics.prefix,
            "ROLLSTREAM_GATEWAY_API_KEYS": ""}


@pytest.fixture(scope="module")
def front(model_dir: Path, service_env: dict[str, str], tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """``rollstream vllm`` (vLLM with LoRA, plus the policy front watching Kafka); yields the front's URL."""
    logs = tmp_path_factory.mktemp("vllm")
    port = free_port()
    child = Child(["vllm", "--model", str(model_dir), "--policy", POLICY, "--port", str(port),
                   "--lora-rank", str(LORA_RANK), "--log", str(logs / "vllm.log")], logs / "front.log", service_env)
    try:
        child.wait_until(f"http://127.0.0.1:{port}/health", 400)
        yield f"http://127.0.0.1:{port}"
    finally:
        child.stop()


@pytest.fixture(scope="module")
def gateway(front: str, service_env: dict[str, str], tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    port = free_port()
    child = Child(["gateway", "--port", str(port), "--backend-url", front + "/v1"],
                  tmp_path_factory.mktemp("gateway") / "gateway.log", service_env)
    try:
        child.wait_until(f"http://127.0.0.1:{port}/healthz", 60)
        yield f"http://127.0.0.1:{port}"
    finally:
        child.stop()


def calls_of(settings: ConnectionSettings, topics: Topics, rollout: str, count: int) -> list[dict[str, Any]]:
    """The LlmCalls of ``rollout`` (exactly ``count``: one more arriving within a second fails)."""
    codec = EventCodec(registry_client(settings), topics)
    consumer = Consumer(consumer_config(f"g-{uuid.uuid4().hex}", settings))
    consumer.subscribe([topics.calls])
    found: list[dict[str, Any]] = []
    deadline = time.monotonic() + 30
    try:
        while time.monotonic() < deadline:
            msg = consumer.poll(0.5)
            if msg is None or msg.error() is not None:
                continue
            value = codec.decode(topics.calls, msg.value())  # type: ignore[arg-type]
            if value["rollout_id"] == rollout:
                found.append(value)
                if len(found) == count:
                    deadline = min(deadline, time.monotonic() + 1.0)
    finally:
        consumer.close()
    assert len(found) == count, f"{len(found)} LlmCalls of {rollout}, expected {count}"
    return sorted(found, key=lambda c: (c["sequence"], c["call_id"]))


def agent(gateway: str, rollout: str) -> OpenAI:
    return OpenAI(base_url=f"{gateway}/rollouts/{rollout}/v1", api_key="unused", max_retries=0, timeout=120)


def direct(front: str) -> OpenAI:
    return OpenAI(base_url=front + "/v1", api_key="unused", max_retries=0, timeout=120)


def test_calls_through_the_gateway_are_recorded_with_vllms_token_ids_and_logprobs(
    gateway: str, front: str, settings: ConnectionSettings, vtopics: Topics,
) -> None:
    rollout = f"r-{uuid.uuid4().hex[:8]}"
    client, engine = agent(gateway, rollout), direct(front)
    ask: dict[str, Any] = {"model": POLICY, "messages": QUESTION, "max_tokens": 24, "seed": 7}
    whole = client.chat.completions.create(**ask, temperature=0)
    streamed = "".join(c.choices[0].delta.content or "" for c in client.chat.completions.create(
        **ask, temperature=0, stream=True) if c.choices)
    pair = client.chat.completions.create(**ask, temperature=1.0, n=2)
    completion = client.completions.create(model=POLICY, prompt="What is 2 plus 3?", max_tokens=12, temperature=0)
    # What vLLM itself answers to the same requests, with the ids and logprobs the gateway asked for
    extra = {"return_token_ids": True}
    ref_whole = engine.chat.completions.create(**ask, temperature=0, logprobs=True, extra_body=extra)
    ref_pair = engine.chat.completions.create(**ask, temperature=1.0, n=2, logprobs=True, extra_body=extra)
    ref_completion = engine.completions.create(model=POLICY, prompt="What is 2 plus 3?", max_tokens=12, temperature=0,
                                               logprobs=1, extra_body=extra)
    assert not hasattr(whole, "prompt_token_ids") or whole.prompt_token_ids is None  # type: ignore[attr-defined]
    calls = calls_of(settings, vtopics, rollout, 5)
    chat_calls = [c for c in calls if c["endpoint"] == "CHAT_COMPLETIONS"]
    (completion_call,) = [c for c in calls if c["endpoint"] == "COMPLETIONS"]
    ref_prompt = ref_whole.prompt_token_ids  # type: ignore[attr-defined]
    ref_ids = ref_whole.choices[0].token_ids  # type: ignore[attr-defined]
    ref_logprobs = [t.logprob for t in ref_whole.choices[0].logprobs.content]  # type: ignore[union-attr]
    for call in chat_calls:
        assert call["prompt_token_ids"] == ref_prompt
        assert call["policy"] == POLICY and call["policy_version"] == 0
    for call in chat_calls[:2]:  # greedy, whole and streamed: what vLLM answers
        assert call["response_token_ids"] == ref_ids
        assert call["response_logprobs"] == pytest.approx(ref_logprobs, abs=1e-4)
    assert chat_calls[0]["response_text"] == whole.choices[0].message.content == streamed
    sampled = sorted(tuple(c["response_token_ids"]) for c in chat_calls[2:])
    assert sampled == sorted(tuple(c.token_ids) for c in ref_pair.choices)  # type: ignore[attr-defined]
    assert len(pair.choices) == 2
    ref_choice = ref_completion.choices[0]
    assert completion_call["prompt_token_ids"] == ref_choice.prompt_token_ids  # type: ignore[attr-defined]
    assert completion_call["response_token_ids"] == ref_choice.token_ids  # type: ignore[attr-defined]
    assert completion_call["response_logprobs"] == pytest.approx(ref_choice.logprobs.token_logprobs, abs=1e-4)  # type: ignore[union-attr]
    assert completion_call["response_text"] == completion.choices[0].text


def test_a_tool_call_parsed_by_vllm_is_recorded_with_its_tool_calls(
    gateway: str, settings: ConnectionSettings, vtopics: Topics,
) -> None:
    rollout = f"r-{uuid.uuid4().hex[:8]}"
    resp = agent(gateway, rollout).chat.completions.create(
        model=POLICY, messages=QUESTION, tools=[tasks.CALCULATOR], temperature=0, max_tokens=48)  # type: ignore[list-item]
    choice = resp.choices[0]
    assert choice.finish_reason == "tool_calls", choice
    (tool_call,) = choice.message.tool_calls or []
    assert tool_call.function.name == tasks.TOOL_NAME  # type: ignore[union-attr]
    assert "8" in tool_call.function.arguments  # type: ignore[union-attr]
    (call,) = calls_of(settings, vtopics, rollout, 1)
    recorded = json.loads(call["response_tool_calls_json"])
    assert [(t["function"]["name"], t["function"]["arguments"]) for t in recorded] == [
        (tool_call.function.name, tool_call.function.arguments)]  # type: ignore[union-attr]
    assert call["finish_reason"] == "tool_calls" and call["response_token_ids"]
    assert json.loads(call["tools_json"])[0]["function"]["name"] == tasks.TOOL_NAME


def publish_update(settings: ConnectionSettings, topics: Topics, version: int, uri: str, kind: str,
                   base_model: str | None = None, policy: str = POLICY) -> None:
    producer = EventProducer(EventCodec(registry_client(settings), topics), settings)
    producer.publish(topics.policy_updates, policy, make_event(
        "PolicyUpdate", source="test-trainer", policy=policy, version=version, step=version, weights_uri=uri,
        kind=kind, base_model=base_model))
    producer.flush(30)


def served_version(front: str) -> int:
    return int(get_json(front + "/policy")["version"])


def first_logprob(model: Any, tokenizer: Any) -> tuple[int, float]:
    ids = tokenizer.apply_chat_template(QUESTION, add_generation_prompt=True, return_tensors="pt", return_dict=True)
    with torch.no_grad():
        logprobs = model(ids["input_ids"]).logits[0, -1].log_softmax(-1)
    token = int(logprobs.argmax())
    return token, float(logprobs[token])


def test_a_lora_checkpoint_published_as_a_policy_update_is_served_under_its_version(
    gateway: str, front: str, model_dir: Path, settings: ConnectionSettings, vtopics: Topics, tmp_path: Path,
) -> None:
    # A trainer checkpoint: the trainer's own LoRA policy, moved off zero, saved as the trainer saves it
    config = TrainConfig(model=str(model_dir), policy=POLICY, lora_rank=LORA_RANK)
    policy = load_policy(config, model_dir, None, torch.device("cpu"))
    torch.manual_seed(3)
    with torch.no_grad():
        for name, weight in policy.named_parameters():
            if "lora_B" in name:
                weight.normal_(0, 0.05)
    save_weights(policy, tmp_path / "step-000003", model_dir)
    policy.eval()
    expected = first_logprob(policy, AutoTokenizer.from_pretrained(model_dir))
    store = ObjectStore(settings)
    bucket = f"vllm-{uuid.uuid4().hex[:8]}"
    store.ensure_bucket(bucket)
    uri = f"s3://{bucket}/{POLICY}/step-000003/"
    store.upload_dir(tmp_path / "step-000003", uri)
    publish_update(settings, vtopics, 3, uri, "ADAPTER", str(model_dir))
    wait_for(lambda: served_version(front) == 3, 120, "the adapter to be served")
    rollout = f"r-{uuid.uuid4().hex[:8]}"
    raw = agent(gateway, rollout).chat.completions.with_raw_response.create(
        model=POLICY, messages=QUESTION, temperature=0, max_tokens=8)  # type: ignore[arg-type]
    assert raw.headers["x-policy-version"] == "3"
    (call,) = calls_of(settings, vtopics, rollout, 1)
    assert call["policy_version"] == 3
    assert call["response_token_ids"][0] == expected[0]
    assert call["response_logprobs"][0] == pytest.approx(expected[1], abs=2e-3)  # the adapter's, not the base's
    assert get_json(front + "/policy")["served"] == f"{POLICY}-v3"


def test_full_weights_reloaded_answer_as_a_fresh_server_on_them_and_no_request_fails(
    model_dir: Path, settings: ConnectionSettings, vtopics: Topics, service_env: dict[str, str], tmp_path: Path,
) -> None:
    """A server started on checkpoint W1 answers A; reloaded to the base weights W0 it answers otherwise
    (no request failing meanwhile); reloaded back to W1 it answers A again, token for token."""
    policy = "calc-full"  # full weights: a server without LoRA (see serving/vllm.py)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    torch.manual_seed(5)
    with torch.no_grad():
        for weight in model.parameters():
            weight.add_(torch.randn_like(weight) * 0.02)
    w1 = tmp_path / "step-000001"
    save_weights(model, w1, model_dir)
    store = ObjectStore(settings)
    bucket = f"vllm-{uuid.uuid4().hex[:8]}"
    store.ensure_bucket(bucket)
    uris = {name: f"s3://{bucket}/{policy}/{name}/" for name in ("step-000001", "base")}
    store.upload_dir(w1, uris["step-000001"])
    store.upload_dir(model_dir, uris["base"])
    port, gw_port = free_port(), free_port()
    front = Child(["vllm", "--model", uris["step-000001"], "--policy", policy, "--policy-version", "1",
                   "--port", str(port), "--log", str(tmp_path / "vllm.log")], tmp_path / "front.log", service_env)
    url = f"http://127.0.0.1:{port}"
    gateway = None
    try:
        front.wait_until(url + "/health", 400)
        gateway = Child(["gateway", "--port", str(gw_port), "--backend-url", url + "/v1"], tmp_path / "gw.log",
                        service_env)
        gateway.wait_until(f"http://127.0.0.1:{gw_port}/healthz", 60)
        gw = f"http://127.0.0.1:{gw_port}"

        def greedy() -> tuple[int, list[int]]:
            rollout = f"r-{uuid.uuid4().hex[:8]}"
            raw = agent(gw, rollout).chat.completions.with_raw_response.create(
                model=policy, messages=QUESTION, temperature=0, max_tokens=32)  # type: ignore[arg-type]
            (call,) = calls_of(settings, vtopics, rollout, 1)
            assert call["policy_version"] == int(raw.headers["x-policy-version"])
            return call["policy_version"], call["response_token_ids"]

        fresh = greedy()
        assert fresh[0] == 1
        results: list[tuple[int, str] | str] = []
        stop = threading.Event()

        def load() -> None:
            client = agent(gw, f"r-load-{uuid.uuid4().hex[:6]}")
            while not stop.is_set():
                try:
                    raw = client.chat.completions.with_raw_response.create(
                        model=policy, messages=QUESTION, temperature=0, max_tokens=16)  # type: ignore[arg-type]
                    results.append((int(raw.headers["x-policy-version"]), raw.parse().choices[0].message.content or ""))
                except Exception as exc:  # every failure fails the test below
                    results.append(repr(exc))

        workers = [threading.Thread(target=load) for _ in range(2)]
        for w in workers:
            w.start()
        try:
            wait_for(lambda: len(results) >= 4, 60, "answers before the reload")
            publish_update(settings, vtopics, 2, uris["base"], "FULL", policy=policy)
            wait_for(lambda: served_version(url) == 2, 120, "the base weights to be reloaded")
            count = len(results)
            wait_for(lambda: len(results) >= count + 4, 60, "answers after the reload")
        finally:
            stop.set()
            for w in workers:
                w.join(120)
        failures = [r for r in results if isinstance(r, str)]
        assert not failures, failures[:3]
        versions = [r[0] for r in results if not isinstance(r, str)]
        assert set(versions) == {1, 2}, versions
        texts = {v: {r[1] for r in results if not isinstance(r, str) and r[0] == v} for v in (1, 2)}
        assert texts[1].isdisjoint(texts[2]), texts  # each answer is from the version it says
        on_base = greedy()
        assert on_base[0] == 2 and on_base[1] != fresh[1]
        publish_update(settings, vtopics, 3, uris["step-000001"], "FULL", policy=policy)
        wait_for(lambda: served_version(url) == 3, 120, "the checkpoint to be reloaded")
        assert greedy() == (3, fresh[1])  # token for token what the server started on these weights said
        loads = get_json(url + "/policy")["loads"]
        assert [x["version"] for x in loads] == [2, 3]
    finally:
        if gateway is not None:
            gateway.stop()
        front.stop()
