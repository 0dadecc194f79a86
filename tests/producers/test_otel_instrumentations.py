"""Real OpenTelemetry GenAI instrumentations of ``openai``, end to end: agent -> spans (and log events)
-> ``rollstream otlp`` -> calls, rewards, rollout ends in Kafka -> the stream processor -> transitions
-> the trainer.

Each instrumentation is installed by ``scripts/setup-otel.sh`` in a directory of its own (their
opentelemetry pins conflict with each other and with ``.venv``) and runs ``otel_agent.py``, a small
tool-using agent, against ``rollstream serve`` on the tiny model: through the gateway without a
rollout id (the gateway records the call with its token ids by response id and the receiver gives
them to the span's call: exact tokens), or straight to the server (no token ids anywhere: the
processor tokenizes the recorded text, ``token_source=tokenizer``). Two rollouts of one group per
instrumentation, rewards 1 and 0, so GRPO has an advantage to train on.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from confluent_kafka import Consumer, TopicPartition
from test_gateway_integration import GatewayProcess, gateway_factory  # noqa: F401 - a fixture
from test_otlp_integration import Receiver, receiver  # noqa: F401 - a fixture

from rollstream.schemas.codec import EventCodec
from rollstream.schemas.topics import Topics, consumer_config
from rollstream.serving.launch import ServerProcess
from rollstream.settings import ConnectionSettings
from rollstream.trainer.config import TrainConfig
from rollstream.trainer.train import train

sys.path.insert(0, str(Path(__file__).parents[1] / "stream_processors"))
from sp_helpers import WorkerProcess  # noqa: E402

pytestmark = [pytest.mark.integration, pytest.mark.slow]

ROOT = Path(__file__).parents[2]
AGENT = Path(__file__).with_name("otel_agent.py")
OTEL_DIR = Path(os.environ.get("ROLLSTREAM_OTEL_DIR", Path.home() / ".cache" / "rollstream" / "otel"))

# (install dir, agent flags, extra environment, route): "gateway" gives exact token ids, "direct" the fallback.
CASES = {
    "openai-v2-spans": ("openai-v2", [], {}, "gateway"),
    "openai-v2-events": ("openai-v2", ["--events"], {}, "gateway"),
    "openai-v2-legacy-events": ("openai-v2-legacy", ["--events"], {}, "direct"),
    "openllmetry-spans": ("openllmetry", [], {}, "direct"),
    "openllmetry-events": ("openllmetry", ["--events"], {}, "gateway"),
    "openllmetry-054-spans": ("openllmetry-054", [], {}, "gateway"),
    "openinference": ("openinference", [], {}, "gateway"),
    "agentlightning": ("agentlightning", [], {}, "gateway"),
}


@pytest.fixture(scope="session")
def otel_installs() -> Path:
    """Every instrumentation installed (idempotent: seconds when ``.ci/run`` or an earlier run did it)."""
    out = subprocess.run(["bash", str(ROOT / "scripts" / "setup-otel.sh")], capture_output=True, text=True,
                         timeout=1800, env={**os.environ, "ROLLSTREAM_OTEL_DIR": str(OTEL_DIR)})
    if out.returncode != 0:
        pytest.fail(f"scripts/setup-otel.sh failed (it installs the instrumentations with pip into {OTEL_DIR}; "
                    f"run it by hand to see why):\n{out.stdout[-2000:]}\n{out.stderr[-2000:]}", pytrace=False)
    return OTEL_DIR


def run_agent(name: str, flags: list[str], env: dict[str, str], base_url: str, otlp: str, rollout: str,
              group: str, reward: float) -> dict[str, Any]:
    out = subprocess.run(
        [sys.executable, str(AGENT), "--instrumentation", name, "--base-url", base_url, "--otlp", otlp,
         "--rollout-id", rollout, "--group-id", group, "--task-id", f"task-{group}", "--reward", str(reward), *flags],
        capture_output=True, text=True, timeout=300, cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(OTEL_DIR / name), **env},
    )
    assert out.returncode == 0, f"{name} agent failed:\n{out.stdout[-3000:]}\n{out.stderr[-3000:]}"
    return dict(json.loads(out.stdout.strip().splitlines()[-1]))


def read_all(codec: EventCodec, settings: ConnectionSettings, topic: str, partitions: int, want: int,
             timeout: float = 60.0) -> list[dict[str, Any]]:
    """The first ``want`` records of ``topic`` (read_committed, from the start), decoded."""
    import time

    consumer = Consumer({**consumer_config(f"t-{uuid.uuid4().hex}", settings), "enable.auto.commit": False})
    consumer.assign([TopicPartition(topic, p, 0) for p in range(partitions)])
    got: list[dict[str, Any]] = []
    deadline = time.monotonic() + timeout
    try:
        while len(got) < want and time.monotonic() < deadline:
            msg = consumer.poll(0.5)
            if msg is None or msg.error():
                continue
            got.append(codec.decode(topic, msg.value()))
    finally:
        consumer.close()
    assert len(got) >= want, f"{topic}: {len(got)} of {want} records within {timeout:.0f} s: {got}"
    return got


@pytest.mark.parametrize("case", list(CASES))
def test_a_real_instrumentation_trains(
    case: str, otel_installs: Path, policy_server: ServerProcess, tiny_model_dir: Path,
    gateway_factory: Callable[..., GatewayProcess],  # noqa: F811
    receiver: Receiver, topics: Topics, codec: EventCodec, settings: ConnectionSettings,  # noqa: F811
    tmp_path: Path, bucket: str,
) -> None:
    name, flags, env, route = CASES[case]
    base_url = policy_server.base_url
    if route == "gateway":
        base_url = gateway_factory(policy_server.base_url, topics).url + "/v1"
    group = f"g-{uuid.uuid4().hex[:6]}"
    rollouts = {f"{case}-{i}-{uuid.uuid4().hex[:6]}": reward for i, reward in enumerate((1.0, 0.0))}
    summaries = [run_agent(name, flags, env, base_url, receiver.url, rid, group, reward)
                 for rid, reward in rollouts.items()]

    # 1. Calls with their content, rewards, and the rollouts' ends, all attributed by the root span.
    calls = read_all(codec, settings, topics.calls, topics.partitions, 4)
    rewards = read_all(codec, settings, topics.rewards, topics.partitions, 2)
    ends = read_all(codec, settings, topics.rollouts, topics.partitions, 2)
    assert sorted({c["rollout_id"] for c in calls}) == sorted(rollouts)
    assert {r["rollout_id"]: r["value"] for r in rewards} == rollouts
    assert {(e["rollout_id"], e["status"], e["group_id"]) for e in ends} == {(r, "SUCCEEDED", group) for r in rollouts}
    for rid, summary in zip(rollouts, summaries, strict=True):
        first, second = sorted((c for c in calls if c["rollout_id"] == rid), key=lambda c: c["sequence"])
        assert [m["role"] for m in first["messages"]][-1] == "user" and first["messages"][-1]["content"]
        (tool_call,) = json.loads(first["response_tool_calls_json"])
        assert tool_call["function"]["name"] == "calculator" and tool_call["id"]
        assert first["metadata"]["response_id"] == summary["response_ids"][0]
        roles = [m["role"] for m in second["messages"]]
        assert roles[-2:] == ["assistant", "tool"], second["messages"]
        assert second["messages"][-1]["tool_call_id"] == tool_call["id"]
        assert json.loads(second["messages"][-2]["tool_calls_json"])[0]["id"] == tool_call["id"]
        if route == "gateway":  # the gateway's record of the same response: its exact tokens and logprobs
            recorded = {(c["metadata"]["response_id"], c["metadata"].get("choice_index", "0")): c for c in
                        read_all(codec, settings, topics.calls_by_response, topics.partitions, 4)}
            for call in (first, second):
                engine = recorded[(call["metadata"]["response_id"], "0")]
                assert call["metadata"]["tokens_from"] == "gateway"
                assert (call["prompt_token_ids"], call["response_token_ids"]) == (
                    engine["prompt_token_ids"], engine["response_token_ids"]) and engine["prompt_token_ids"]
                assert call["response_logprobs"] == engine["response_logprobs"] is not None
        else:
            assert first["prompt_token_ids"] is None and second["response_token_ids"] is None

    # 2. The stream processor makes transitions of them (the tokenizer where the engine's ids are missing).
    worker = WorkerProcess(topics, settings, tmp_path, f"proc-{uuid.uuid4().hex[:8]}",
                           {"ROLLSTREAM_PROCESS_TOKENIZER": str(tiny_model_dir)}).start()
    try:
        transitions = read_all(codec, settings, topics.transitions, topics.partitions, 4, timeout=120)
    finally:
        worker.stop()
    assert {t["rollout_id"] for t in transitions} == set(rollouts)
    source = "engine" if route == "gateway" else "tokenizer"
    assert {t["token_source"] for t in transitions} == {source}
    assert all(t["prompt_token_ids"] and t["response_token_ids"] for t in transitions)
    assert {t["group_id"] for t in transitions} == {group}
    assert all((t["behaviour_logprobs"] is not None) == (route == "gateway") for t in transitions)

    # 3. The trainer trains on them: one GRPO step on the group (rewards 1 and 0).
    (policy,) = {t["policy"] for t in transitions}  # the served model's name, from the gateway or the span
    config = TrainConfig(
        policy=policy, model=str(tiny_model_dir), checkpoint_uri=f"s3://{bucket}/{policy}-{uuid.uuid4().hex[:6]}",
        lr=1e-3, batch_size=4, group_size=2, checkpoint_every=1, threads=1, progress=False, mlflow=False,
        publish=False, max_steps=1, consumer_group=f"trainer-{uuid.uuid4().hex[:8]}",
        # All four are in the topic: wait long enough for the whole batch rather than train on part of it.
        idle_exit_s=20.0, batch_timeout_s=15.0, group_timeout_s=15.0,
    )
    import dataclasses

    result = train(config, dataclasses.replace(settings, topic_prefix=topics.prefix, partitions=topics.partitions))
    assert result.steps == 1 and result.counts["trained"] == 4
    assert result.counts.get("token_source_tokenizer", 0) == (4 if source == "tokenizer" else 0)

