"""Multi-turn merging: a rollout's calls trained as one sequence give the per-call path's loss and gradient."""

from __future__ import annotations

import random
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from rollstream.trainer.batches import Batch, Sample
from rollstream.trainer.config import TrainConfig
from rollstream.trainer.merge import merged_rows, single_rows
from rollstream.trainer.train import Learner


def sample(rollout: str, seq: int, prompt: list[int], response: list[int], reward: float,
           logprobs: bool = True) -> Sample:
    rng = random.Random(hash((rollout, seq)))
    return Sample(
        transition_id=f"{rollout}-{seq}", partition=0, offset=seq, group_key="g:1", rollout_key=rollout,
        policy_version=0, prompt_ids=prompt, response_ids=response,
        behaviour_logprobs=[-rng.uniform(0.5, 4.0) for _ in response] if logprobs else None, reward=reward,
        sequence=seq,
    )


def conversation() -> list[Sample]:
    """Rollout a: three turns, each prompt the last one's prompt + response + a tool result; b forks at its
    second call (a trimmed history); c has one call. Listed out of order, as batches are."""
    p0, r0 = [3, 4, 5, 6, 7], [8, 9, 10]
    p1, r1 = p0 + r0 + [11, 12, 13, 14], [15, 16]
    p2, r2 = p1 + r1 + [17, 18], [19, 20, 21, 22]
    q0, s0 = [3, 4, 23, 24], [25, 26, 27]
    q1, s1 = [3, 4, 28] + s0, [29, 30]  # does not start with q0 + s0: a fork
    return [
        sample("a", 1, p1, r1, 1.0), sample("c", 0, [3, 31, 32], [33, 34], 0.0), sample("a", 0, p0, r0, 1.0),
        sample("b", 0, q0, s0, 0.0, logprobs=False), sample("a", 2, p2, r2, 1.0), sample("b", 1, q1, s1, 0.0),
    ]


def test_turns_merge_on_exact_prefixes_and_fork_elsewhere() -> None:
    turns = conversation()
    rows = merged_rows(turns)
    assert [sorted(turns[i].transition_id for i in r.samples) for r in rows] == [
        ["a-0", "a-1", "a-2"], ["c-0"], ["b-0"], ["b-1"]]
    a = rows[0]
    assert a.ids == turns[4].prompt_ids + turns[4].response_ids
    for start, end, i in a.spans:  # every response sits in the row where its call produced it
        assert a.ids[start:end] == turns[i].response_ids and a.ids[:start] == turns[i].prompt_ids
    single = single_rows(turns)
    assert len(single) == 6
    assert sum(len(r.ids) for r in rows) < sum(len(r.ids) for r in single)
    assert sorted(i for r in rows for i in r.samples) == list(range(6))


def learner(model_dir: Path, **overrides: object) -> Learner:
    config = TrainConfig(policy="p", model=str(model_dir), micro_batch_size=2, threads=1, progress=False,
                         **overrides)  # type: ignore[arg-type]
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    return Learner(config=config, model=model, net=model, reference=None,
                   optimizer=torch.optim.SGD(params, lr=0.0), params=params, device=torch.device("cpu"),
                   rank=0, world=1)


@pytest.mark.parametrize("correction", ["ppo", "decoupled"])
def test_merged_rows_train_exactly_like_one_row_per_call(trainer_model_dir: Path, correction: str) -> None:
    turns = conversation()
    batch = Batch(turns, [0] * len(turns), [len(turns)])
    adv = torch.tensor([0.7, -1.2, 0.3, 0.9, -0.4, 1.5])  # one per transition, all different
    per_call, merged = learner(trainer_model_dir, correction=correction), learner(trainer_model_dir,
                                                                                   correction=correction)
    loss_a, stats_a, norm_a = per_call.step(batch, adv, single_rows(turns))
    loss_b, stats_b, norm_b = merged.step(batch, adv, merged_rows(turns))
    assert stats_a.tokens == stats_b.tokens == sum(len(t.response_ids) for t in turns)
    assert loss_a == pytest.approx(loss_b, rel=1e-5, abs=1e-7)
    assert stats_a.ratio == pytest.approx(stats_b.ratio, rel=1e-5)
    assert norm_a == pytest.approx(norm_b, rel=1e-4)
    compared = 0
    for (name, pa), pb in zip(per_call.model.named_parameters(), merged.model.parameters(), strict=True):
        assert pa.grad is not None and pb.grad is not None, name
        assert torch.allclose(pa.grad, pb.grad, rtol=1e-4, atol=1e-6), name
        compared += int(pa.grad.abs().sum() > 0)
    assert compared > 0  # the gradients compared are not all zero


def test_a_changed_token_in_the_history_is_not_merged(trainer_model_dir: Path) -> None:
    turns = conversation()
    first = next(t for t in turns if t.transition_id == "a-0")
    second = next(t for t in turns if t.transition_id == "a-1")
    second.prompt_ids = list(second.prompt_ids)
    second.prompt_ids[len(first.prompt_ids)] += 1  # the response as re-rendered differs by one token
    grouped = [sorted(turns[i].transition_id for i in r.samples) for r in merged_rows(turns)]
    # a-1 forks; a-2's prompt still extends a-0's prompt + response (the original history), so it joins a-0
    assert ["a-1"] in grouped and ["a-0", "a-2"] in grouped
