"""Credit assignment: how a rollout's rewards become per-call rewards and returns (pure functions).

Rules, chosen per policy (``ROLLSTREAM_PROCESS_CREDIT``, e.g. ``"calc=discounted:0.9,*=broadcast"``):

- ``broadcast``: every call gets the terminal reward as its reward and return (Agent
  Lightning's default). Intermediate rewards are ignored.
- ``discounted:GAMMA``: each call's reward is the sum of the intermediate rewards attached
  to it by ``call_id``, plus the terminal reward on the last call; its return is the
  discounted return-to-go ``G_i = r_i + GAMMA * G_{i+1}``.
- ``last_call``: the last call gets the terminal reward, every other call 0 (reward and
  return alike). Intermediate rewards are ignored.

Returns run over all calls of the attempt in ``sequence`` order; the agent-name filter is
applied afterwards, so a selected call's return still counts what unselected calls earned.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Literal

from rollstream.errors import ConfigError

CreditMode = Literal["broadcast", "discounted", "last_call"]
MODES: tuple[CreditMode, ...] = ("broadcast", "discounted", "last_call")


@dataclass(frozen=True)
class CreditRule:
    mode: CreditMode = "broadcast"
    gamma: float = 1.0


def parse_rule(text: str) -> CreditRule:
    """``broadcast``, ``last_call``, ``discounted`` or ``discounted:0.9``."""
    mode, _, arg = text.strip().partition(":")
    if mode not in MODES:
        raise ConfigError(f"unknown credit assignment {mode!r}: choose one of {', '.join(MODES)}")
    if mode != "discounted":
        if arg:
            raise ConfigError(f"credit assignment {mode!r} takes no parameter (got {text!r})")
        return CreditRule(mode)
    try:
        gamma = float(arg) if arg else 1.0
    except ValueError as exc:
        raise ConfigError(f"discount in {text!r} is not a number") from exc
    if not 0.0 <= gamma <= 1.0:
        raise ConfigError(f"discount in {text!r} must be within [0, 1]")
    return CreditRule("discounted", gamma)


def parse_rules(spec: str) -> dict[str, CreditRule]:
    """``"policyA=discounted:0.9,*=broadcast"`` → {policy: rule}; ``*`` is the fallback."""
    rules: dict[str, CreditRule] = {}
    for part in filter(None, (p.strip() for p in spec.split(","))):
        policy, sep, rule = part.partition("=")
        if not sep or not policy.strip():
            raise ConfigError(f"credit rule {part!r} should look like 'policy=mode' or '*=mode'")
        rules[policy.strip()] = parse_rule(rule)
    rules.setdefault("*", CreditRule())
    return rules


def rule_for(rules: Mapping[str, CreditRule], policy: str) -> CreditRule:
    return rules.get(policy) or rules.get("*") or CreditRule()


def assign(
    call_ids: Sequence[str], intermediate: Mapping[str, float], terminal: float, rule: CreditRule
) -> list[tuple[float, float]]:
    """(reward, credited_return) for each call, ``call_ids`` in sequence order."""
    n = len(call_ids)
    if n == 0:
        return []
    if rule.mode == "broadcast":
        return [(terminal, terminal)] * n
    if rule.mode == "last_call":
        return [(0.0, 0.0)] * (n - 1) + [(terminal, terminal)]
    rewards = [float(intermediate.get(cid, 0.0)) for cid in call_ids]
    rewards[-1] += terminal
    out: list[tuple[float, float]] = [(0.0, 0.0)] * n
    ret = 0.0
    for i in range(n - 1, -1, -1):
        ret = rewards[i] + rule.gamma * ret
        out[i] = (rewards[i], ret)
    if not all(math.isfinite(r) for pair in out for r in pair):
        raise ValueError("credit assignment produced a non-finite value")
    return out
