"""Learning, not just stepping: the closed loop raises the expected reward on a task with a known answer.

The test plays the agents and serving: it samples one-token answers from the newest checkpoint of
the policy, rewards 1 when the token is in a target set (20 tokens the initial model finds
neither likely nor unlikely), and publishes the samples as transitions with their behaviour
logprobs and policy version. The trainer runs in a thread and checkpoints every few steps; each
checkpoint is a new version that the sampler loads. The expected reward (the policy's probability
mass on the target set, computed exactly) must rise well above its start.
"""

from __future__ import annotations

import threading
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load
from trainer_helpers import connection_for, produce, transition
from transformers import AutoModelForCausalLM

from rollstream.schemas.codec import EventCodec
from rollstream.schemas.topics import Topics
from rollstream.settings import ConnectionSettings
from rollstream.storage import ObjectStore
from rollstream.trainer.checkpoint import CheckpointStore
from rollstream.trainer.config import TrainConfig
from rollstream.trainer.train import TrainResult, train

pytestmark = [pytest.mark.integration, pytest.mark.slow]

PROMPT = [1, 40, 41, 42, 43]
GROUP = 8
GROUPS_PER_STEP = 2
EVERY = 4  # steps per checkpoint (= per policy version)
VERSIONS = 50


def expected_reward(model: Any, target: torch.Tensor) -> float:
    with torch.no_grad():
        probs = model(torch.tensor([PROMPT])).logits[0, -1].float().softmax(-1)
    return float(probs[target].sum())


def test_expected_reward_rises(
    settings: ConnectionSettings, topics: Topics, codec: EventCodec, store: ObjectStore,
    make_config: Callable[..., TrainConfig], policy: str, trainer_model_dir: Path,
) -> None:
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(trainer_model_dir).eval()
    with torch.no_grad():
        ranked = model(torch.tensor([PROMPT])).logits[0, -1].argsort(descending=True)
    target = ranked[10:30]
    config = make_config(objective="grpo", group_size=GROUP, batch_size=GROUP * GROUPS_PER_STEP,
                         checkpoint_every=EVERY, max_steps=EVERY * VERSIONS, lr=2e-3, idle_exit_s=60.0,
                         max_policy_lag=1, mlflow=False, publish=False)
    connection = connection_for(settings, topics)
    done: dict[str, TrainResult | BaseException] = {}

    def run() -> None:
        try:
            done["result"] = train(config, connection)
        except BaseException as exc:  # surfaced by the assertion below
            done["result"] = exc

    trainer = threading.Thread(target=run, daemon=True)
    trainer.start()
    ckpts = CheckpointStore(store, config.checkpoint_uri)
    rewards = [expected_reward(model, target)]
    for version in range(VERSIONS):
        # The agents: EVERY steps' worth of groups sampled from policy version `version`.
        records = []
        with torch.no_grad():
            logprobs = model(torch.tensor([PROMPT])).logits[0, -1].float().log_softmax(-1)
        for g in range(EVERY * GROUPS_PER_STEP):
            group = f"v{version}-g{g}-{uuid.uuid4().hex[:6]}"
            tokens = torch.multinomial(logprobs.exp(), GROUP, replacement=True)
            for i, tok in enumerate(tokens.tolist()):
                reward = 1.0 if tok in target else 0.0
                records.append(transition(policy, f"{group}-{i}", PROMPT, [tok], reward, version, group_id=group,
                                          logprobs=[float(logprobs[tok])]))
        produce(connection, codec, topics, records)
        # Serving: wait for the next version, load it.
        step = EVERY * (version + 1)
        while step not in ckpts.steps():
            assert trainer.is_alive(), f"trainer stopped: {done.get('result')!r}"
            trainer.join(0.1)
        model.load_state_dict(load(store.get_bytes(ckpts.uri(step) + "model.safetensors")), strict=False)
        rewards.append(expected_reward(model, target))
    trainer.join(60)
    result = done.get("result")
    assert isinstance(result, TrainResult), result
    assert result.steps == EVERY * VERSIONS and result.counts.get("stale", 0) == 0
    print("expected reward by version:", [round(r, 3) for r in rewards])
    assert rewards[-1] > rewards[0] + 0.3, rewards
    assert min(rewards[-3:]) > max(rewards[:3]), rewards
