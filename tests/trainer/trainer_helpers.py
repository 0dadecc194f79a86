"""Helpers of the trainer tests: transitions produced into real topics."""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable
from typing import Any

from rollstream.events import EventProducer
from rollstream.schemas import make_event
from rollstream.schemas.codec import EventCodec
from rollstream.schemas.topics import Topics
from rollstream.settings import ConnectionSettings


def transition(policy: str, rollout_id: str, prompt: list[int], response: list[int], reward: float,
               version: int = 0, group_id: str | None = None, logprobs: list[float] | None = None,
               **extra: Any) -> dict[str, Any]:
    return make_event(
        "Transition", transition_id=extra.pop("transition_id", f"tr-{rollout_id}"), source="test",
        rollout_id=rollout_id, call_id=f"{rollout_id}-c0", sequence=0, group_id=group_id, policy=policy,
        policy_version=version, prompt_token_ids=prompt, response_token_ids=response, behaviour_logprobs=logprobs,
        reward=reward, credited_return=reward, terminal_reward=reward, **extra,
    )


def group_of(policy: str, group: str, size: int, rewards: list[float], version: int = 0,
             logprob: float | None = -1.0) -> list[dict[str, Any]]:
    """``size`` single-call rollouts of one group with short responses."""
    out = []
    for i in range(size):
        response = [10 + i, 20 + i, 30]
        out.append(transition(policy, f"{group}-r{i}", [5, 6, 7, 8], response, rewards[i % len(rewards)], version,
                              group_id=group, logprobs=None if logprob is None else [logprob] * len(response)))
    return out


def produce(settings: ConnectionSettings, codec: EventCodec, topics: Topics, records: Iterable[dict[str, Any]]) -> int:
    producer = EventProducer(codec, settings)
    n = 0
    for rec in records:
        producer.publish(topics.transitions, rec["rollout_id"], rec)
        n += 1
    producer.flush()
    return n


def connection_for(settings: ConnectionSettings, topics: Topics) -> ConnectionSettings:
    return dataclasses.replace(settings, topic_prefix=topics.prefix, partitions=topics.partitions)
