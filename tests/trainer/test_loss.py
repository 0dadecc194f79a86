"""Unit tests of the objectives and the hyperparameter checks (no services)."""

from __future__ import annotations

import pytest
import torch

from rollstream.errors import ConfigError
from rollstream.trainer.batches import RecentIds
from rollstream.trainer.config import TrainConfig, parse_config
from rollstream.trainer.loss import advantages, pack, policy_loss


def test_grpo_rloo_reinforce_advantages() -> None:
    r, g = [1.0, 0.0, 0.5, 0.5, 7.0], [0, 0, 1, 1, 2]
    grpo = advantages(r, g, "grpo", std_normalize=False)
    assert torch.allclose(grpo, torch.tensor([0.5, -0.5, 0.0, 0.0, 0.0]))  # group of one: no baseline
    norm = advantages(r, g, "grpo", std_normalize=True)
    assert torch.allclose(norm[:2], torch.tensor([0.5, -0.5]) / torch.tensor([1.0, 0.0]).std(), atol=1e-5)
    rloo = advantages([1.0, 0.0, 0.5], [0, 0, 0], "rloo")
    assert torch.allclose(rloo, torch.tensor([1.0 - 0.25, 0.0 - 0.75, 0.5 - 0.5]))
    assert torch.allclose(advantages([1.0, 3.0], [0, 1], "reinforce", baseline=2.0), torch.tensor([-1.0, 1.0]))


def test_pack_masks_response_tokens_only() -> None:
    packed = pack([[1, 2, 3], [4]], [[5, 6], [7, 8, 9]], [[-1.0, -2.0], None], torch.tensor([1.0, -1.0]), 0,
                  torch.device("cpu"))
    assert packed.input_ids.tolist() == [[1, 2, 3, 5, 6], [4, 7, 8, 9, 0]]
    assert packed.mask.tolist() == [[0, 0, 1, 1], [1, 1, 1, 0]]
    assert packed.behaviour[0].tolist() == [0, 0, -1.0, -2.0]
    assert packed.has_behaviour.tolist() == [[False, False, True, True], [False, False, False, False]]
    assert packed.advantages.tolist() == [[0, 0, 1.0, 1.0], [-1.0, -1.0, -1.0, 0]]


@pytest.mark.parametrize("correction", ["ppo", "decoupled", "tis"])
def test_on_policy_gradient_is_the_policy_gradient(correction: str) -> None:
    # With mu = pi every correction reduces to -A * grad log pi, averaged over response tokens.
    logp = torch.tensor([[-1.0, -2.0, -0.5]], requires_grad=True)
    packed = pack([[1]], [[2, 3, 4]], [[-1.0, -2.0, -0.5]], torch.tensor([2.0]), 0, torch.device("cpu"))
    packed.mask = torch.ones(1, 3)  # this toy logp has one position per response token
    packed.behaviour = logp.detach().clone()
    loss, stats = policy_loss(logp, packed, correction, 0.2, 2.0, normalizer=3.0)  # type: ignore[arg-type]
    loss.backward()
    assert logp.grad is not None and torch.allclose(logp.grad, torch.full((1, 3), -2.0 / 3))
    assert stats.clipped == 0 and stats.tokens == 3


def test_ppo_clip_stops_the_gradient_past_the_clip() -> None:
    logp = torch.tensor([[0.0, 0.0]], requires_grad=True)
    packed = pack([[1]], [[2, 3]], [[-1.0, 0.0]], torch.tensor([1.0]), 0, torch.device("cpu"))
    packed.mask, packed.behaviour = torch.ones(1, 2), torch.tensor([[-1.0, 0.0]])
    loss, stats = policy_loss(logp, packed, "ppo", 0.2, 2.0, normalizer=2.0)
    loss.backward()
    assert logp.grad is not None and logp.grad[0, 0] == 0 and logp.grad[0, 1] < 0  # ratio e > 1.2 with A > 0
    assert stats.clipped == 1


def test_invalid_combinations_say_how_to_fix() -> None:
    with pytest.raises(ConfigError, match="--policy is required"):
        TrainConfig(model="m")
    with pytest.raises(ConfigError, match="raise --batch-size"):
        TrainConfig(policy="p", model="m", group_size=8, batch_size=4)
    with pytest.raises(ConfigError, match="--group-size >= 2"):
        TrainConfig(policy="p", model="m", group_size=1)
    with pytest.raises(ConfigError, match="reserved by MLflow"):
        TrainConfig(policy="p", model="m", alias="latest")
    config = parse_config(["--policy", "p", "--model", "m", "--objective", "rloo", "--no-std-normalize",
                           "--lr", "3e-4"])
    assert (config.objective, config.std_normalize, config.lr) == ("rloo", False, 3e-4)
    with pytest.raises(SystemExit):
        parse_config(["--policy", "p", "--model", "m", "--objective", "dpo"])


def test_recent_ids_forget_the_oldest() -> None:
    ids = RecentIds(2, ["a", "b"])
    ids.add("c")
    assert "a" not in ids and "b" in ids and ids.to_list() == ["b", "c"]
