"""Objectives: advantages (GRPO, RLOO, REINFORCE) and the clipped, importance-corrected token loss.

Advantages are per transition, from its return (``--reward-field``):

- ``grpo``: return minus the mean of its group, divided by the group's std when ``std_normalize``;
- ``rloo``: return minus the mean of the *other* members of its group (leave-one-out);
- ``reinforce``: return minus a running mean of returns (updated after each step).

A group of one has no baseline under GRPO/RLOO: its advantage is 0 (the trainer counts such groups).

The loss is token-level over response tokens only, summed and divided by the number of response
tokens in the whole (global) batch, so long responses weigh per token, not per sequence.

Off-policy correction. Transitions come from older policy versions (the behaviour policy mu,
whose per-token logprobs the event carries). With pi the current policy:

- ``ppo`` (default): ratio pi/mu, clipped to [1-eps, 1+eps] PPO-style: a token whose ratio has
  already moved past the clip in the direction of its advantage gets no gradient.
- ``decoupled`` (decoupled PPO, Hilton et al. 2021): the proximal policy is pi detached at the
  start of the step; ratio pi/pi_prox is clipped, and the behaviour weight pi_prox/mu truncated at
  ``is_cap`` multiplies the objective. With one update per batch the clip is inactive and this is
  truncated importance sampling with a PPO form; it stays stable however stale mu is.
- ``tis``: truncated importance sampling, weight min(pi/mu, is_cap) (detached) times the
  policy-gradient term.

A transition without behaviour logprobs is treated as on-policy: mu is taken as pi detached
(ratio 1, weight 1); the trainer counts such transitions (``no_behaviour_logprobs``). Transitions whose
token ids the processor re-tokenized from text (``token_source`` = ``tokenizer``) never have an
importance ratio: they carry no logprobs, and any they carry are ignored (they would be of other
tokens); they are counted too (``token_source_tokenizer``).

The optional KL penalty to the frozen reference uses the k3 estimator exp(r-l) - (r-l) - 1.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from rollstream.trainer.config import Correction, Objective
from rollstream.trainer.merge import Row


def advantages(returns: Sequence[float], group_index: Sequence[int], objective: Objective,
               std_normalize: bool = True, baseline: float = 0.0, eps: float = 1e-6) -> torch.Tensor:
    """One advantage per transition."""
    r = torch.tensor(list(returns), dtype=torch.float64)
    if objective == "reinforce":
        return (r - baseline).float()
    idx = torch.tensor(list(group_index), dtype=torch.long)
    adv = torch.zeros_like(r)
    for g in idx.unique().tolist():
        sel = idx == g
        rg = r[sel]
        n = rg.numel()
        if n < 2:
            continue  # no baseline for a group of one
        if objective == "grpo":
            a = rg - rg.mean()
            if std_normalize:
                a = a / (rg.std() + eps)
        else:  # rloo: r_i - mean of the others = n/(n-1) * (r_i - mean)
            a = (rg - rg.mean()) * n / (n - 1)
        adv[sel] = a
    return adv.float()


@dataclass
class Packed:
    """A padded micro-batch; position t of the shifted tensors predicts token t+1."""

    input_ids: torch.Tensor  # [B, T]
    attention_mask: torch.Tensor  # [B, T]
    mask: torch.Tensor  # [B, T-1] 1 on response tokens
    behaviour: torch.Tensor  # [B, T-1] behaviour logprobs (0 where missing)
    has_behaviour: torch.Tensor  # [B, T-1] bool: the token's behaviour logprob is known
    advantages: torch.Tensor  # [B, T-1] the advantage of the transition each response token belongs to


def pack_rows(rows: Sequence[Row], behaviour: Sequence[Sequence[float] | None], adv: torch.Tensor, pad_id: int,
              device: torch.device) -> Packed:
    """Right-padded rows; each row's response spans take the behaviour logprobs and advantage of their transition.

    ``behaviour`` and ``adv`` are indexed by the spans' sample index."""
    width = max(len(r.ids) for r in rows)
    n = len(rows)
    ids = torch.full((n, width), pad_id, dtype=torch.long)
    attn = torch.zeros((n, width), dtype=torch.long)
    mask = torch.zeros((n, width - 1), dtype=torch.float32)
    mu = torch.zeros((n, width - 1), dtype=torch.float32)
    has = torch.zeros((n, width - 1), dtype=torch.bool)
    a = torch.zeros((n, width - 1), dtype=torch.float32)
    for i, row in enumerate(rows):
        ids[i, : len(row.ids)] = torch.tensor(row.ids)
        attn[i, : len(row.ids)] = 1
        for start, end, s in row.spans:
            span = slice(start - 1, end - 1)  # position t predicts token t+1
            mask[i, span] = 1.0
            a[i, span] = float(adv[s])
            b = behaviour[s]
            if b is not None:
                mu[i, span] = torch.tensor(list(b))
                has[i, span] = True
    return Packed(ids.to(device), attn.to(device), mask.to(device), mu.to(device), has.to(device), a.to(device))


def pack(prompts: Sequence[Sequence[int]], responses: Sequence[Sequence[int]],
         behaviour: Sequence[Sequence[float] | None], adv: torch.Tensor, pad_id: int,
         device: torch.device) -> Packed:
    """Right-padded input ids and masks for prompt+response rows, one row per transition."""
    rows = [Row(list(p) + list(r), [(len(p), len(p) + len(r), i)])
            for i, (p, r) in enumerate(zip(prompts, responses, strict=True))]
    return pack_rows(rows, behaviour, adv, pad_id, device)


def token_logprobs(logits: torch.Tensor, input_ids: torch.Tensor) -> torch.Tensor:
    """Log-probability of each next token: [B, T-1], in float32."""
    shifted = logits[:, :-1].float()
    return -F.cross_entropy(shifted.transpose(1, 2), input_ids[:, 1:], reduction="none")


@dataclass
class LossStats:
    """Sums over response tokens (divide by ``tokens`` for means)."""

    tokens: float = 0.0
    clipped: float = 0.0
    truncated: float = 0.0
    ratio: float = 0.0
    kl: float = 0.0

    def add(self, other: LossStats) -> None:
        self.tokens += other.tokens
        self.clipped += other.clipped
        self.truncated += other.truncated
        self.ratio += other.ratio
        self.kl += other.kl


def policy_loss(logp: torch.Tensor, batch: Packed, correction: Correction, clip_eps: float, is_cap: float,
                normalizer: float, ref_logp: torch.Tensor | None = None,
                kl_coef: float = 0.0) -> tuple[torch.Tensor, LossStats]:
    """Token-level loss summed over this micro-batch's response tokens, divided by ``normalizer``."""
    mask = batch.mask
    detached = logp.detach()
    # Rows without behaviour logprobs: on-policy, mu = pi (detached).
    mu = torch.where(batch.has_behaviour, batch.behaviour, detached)
    adv = batch.advantages
    lo, hi = 1.0 - clip_eps, 1.0 + clip_eps
    if correction == "ppo":
        ratio = torch.exp(logp - mu)
        weight = torch.ones_like(ratio)
        truncated = torch.zeros_like(ratio)
    else:
        raw = torch.exp(detached - mu)
        weight = raw.clamp(max=is_cap)
        truncated = (raw > is_cap).float()
        ratio = torch.exp(logp - detached)
    unclipped = ratio * adv
    clipped = ratio.clamp(lo, hi) * adv
    objective = weight * torch.minimum(unclipped, clipped) if correction != "tis" else weight * unclipped
    clip_active = ((ratio.detach() > hi) & (adv > 0)) | ((ratio.detach() < lo) & (adv < 0))
    per_token = -objective
    kl = torch.zeros_like(logp)
    if ref_logp is not None and kl_coef > 0:
        d = ref_logp - logp
        kl = torch.exp(d) - d - 1.0
        per_token = per_token + kl_coef * kl
    loss = (per_token * mask).sum() / normalizer
    stats = LossStats(
        tokens=float(mask.sum()),
        clipped=float((clip_active.float() * mask).sum()),
        truncated=float((truncated * mask).sum()),
        ratio=float((torch.exp(detached - mu) * mask).sum()),
        kl=float((kl.detach() * mask).sum()),
    )
    return loss, stats
