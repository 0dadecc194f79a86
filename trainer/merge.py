"""Multi-turn rollouts as one sequence: a call whose prompt extends an earlier call's prompt + response.

An agent's second call usually sends the whole conversation again: the first call's prompt, its
response, then the tool result or the next user message. Trained one transition per call, a ten-turn
rollout trains its first turn ten times over (as prompt) and pays ten forward passes over the
shared prefix. Here the calls of one rollout are laid out in ``sequence`` order, and a call whose
prompt token ids start with *exactly* the token ids of an existing row (an earlier call's prompt and
response) extends that row: its prompt's new tokens become context and its response is trained in
place. A call that extends no row (the prefix diverges: a sub-agent, a trimmed history, a
re-rendered template) forks a row of its own.

Under a causal model each response token sees the same tokens before it either way, so a merged row
gives every response token the logprob, the advantage and the behaviour logprob it has alone: the
loss, normalized by the batch's response tokens, and its gradient are those of the per-call path
(``tests/trainer/test_merge.py``), with the shared prefix computed once.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Protocol


class Turn(Protocol):
    """What merging reads of a transition (``batches.Sample``)."""

    rollout_key: str
    sequence: int
    prompt_ids: list[int]
    response_ids: list[int]


@dataclass
class Row:
    """One trained sequence: its token ids and the response spans in it, each with its transition's index."""

    ids: list[int]
    spans: list[tuple[int, int, int]] = field(default_factory=list)  # (start, end, sample index): ids[start:end]

    @property
    def samples(self) -> list[int]:
        return [i for _, _, i in self.spans]


def single_rows(turns: Sequence[Turn]) -> list[Row]:
    """One row per transition (the per-call path)."""
    return [_row(t, i) for i, t in enumerate(turns)]


def merged_rows(turns: Sequence[Turn]) -> list[Row]:
    """The transitions of each rollout merged into as few rows as their exact token prefixes allow.

    Rows keep the order of their rollouts' first transition; a rollout's calls are taken in ``sequence``
    order, and each extends the longest of its rollout's rows that its prompt starts with."""
    by_rollout: dict[str, list[int]] = {}
    for i, t in enumerate(turns):
        by_rollout.setdefault(t.rollout_key, []).append(i)
    rows: list[Row] = []
    for members in by_rollout.values():
        own: list[Row] = []
        for i in sorted(members, key=lambda j: (turns[j].sequence, j)):
            t = turns[i]
            prompt = t.prompt_ids
            base = max((r for r in own if len(r.ids) <= len(prompt) and prompt[: len(r.ids)] == r.ids),
                       key=lambda r: len(r.ids), default=None)
            if base is None:
                own.append(_row(t, i))
                continue
            start = len(prompt)
            base.ids = list(prompt) + list(t.response_ids)
            base.spans.append((start, start + len(t.response_ids), i))
        rows += own
    return rows


def _row(t: Turn, i: int) -> Row:
    start = len(t.prompt_ids)
    return Row(list(t.prompt_ids) + list(t.response_ids), [(start, start + len(t.response_ids), i)])
