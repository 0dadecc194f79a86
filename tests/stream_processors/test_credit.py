"""Credit assignment: exact numbers for every rule."""

from __future__ import annotations

import pytest

from rollstream.errors import ConfigError
from rollstream.stream_processors.credit import CreditRule, assign, parse_rules, rule_for

CALLS = ["a", "b", "c"]


def test_broadcast_gives_the_terminal_reward_to_every_call() -> None:
    assert assign(CALLS, {"a": 5.0}, 1.0, CreditRule("broadcast")) == [(1.0, 1.0)] * 3


def test_last_call_gives_it_to_the_last_call_only() -> None:
    assert assign(CALLS, {"a": 5.0}, 2.0, CreditRule("last_call")) == [(0.0, 0.0), (0.0, 0.0), (2.0, 2.0)]


def test_discounted_return_to_go_over_intermediate_rewards() -> None:
    out = assign(CALLS, {"a": 0.5, "b": -0.25}, 1.0, CreditRule("discounted", 0.5))
    # rewards: a=0.5, b=-0.25, c=1.0 (terminal); G_c=1, G_b=-0.25+0.5*1=0.25, G_a=0.5+0.5*0.25=0.625
    assert out == [(0.5, 0.625), (-0.25, 0.25), (1.0, 1.0)]


def test_discounted_with_gamma_one_sums_the_future() -> None:
    assert assign(CALLS, {"b": 2.0}, 1.0, CreditRule("discounted", 1.0)) == [(0.0, 3.0), (2.0, 3.0), (1.0, 1.0)]


def test_no_calls_no_credit() -> None:
    assert assign([], {}, 1.0, CreditRule("discounted", 0.9)) == []


def test_rules_per_policy_with_fallback() -> None:
    rules = parse_rules("policyA=discounted:0.9, policyB=last_call, *=broadcast")
    assert rule_for(rules, "policyA") == CreditRule("discounted", 0.9)
    assert rule_for(rules, "policyB") == CreditRule("last_call")
    assert rule_for(rules, "other") == CreditRule("broadcast")
    assert rule_for(parse_rules(""), "x") == CreditRule("broadcast")


@pytest.mark.parametrize("spec", ["a=magic", "discounted:0.9", "p=discounted:2", "p=broadcast:1", "p=discounted:x"])
def test_bad_rules_say_what_is_wrong(spec: str) -> None:
    with pytest.raises(ConfigError):
        parse_rules(spec)
