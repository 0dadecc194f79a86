"""The rollout and reward API: request validation and the events each request becomes.

- ``POST /v1/rollouts`` → RolloutEvent STARTED (``rollout_id`` generated unless given);
- ``POST /v1/rollouts/{id}/finish`` → RolloutEvent SUCCEEDED / FAILED / CANCELLED;
- ``POST /v1/rollouts/{id}/rewards`` → Reward (finite ``value``; NaN and infinities refused).

Invalid input raises ``InvalidEventError`` naming the offending field (``param``), which each front
end maps: the gateway answers 422 with it in ``error.param``, the SDK raises ``ProducerError``.

Every body may carry the client's own ``event_id`` (by default the gateway makes one up and
answers with it). A retry that sends the same ``event_id`` (and, for a reward, the same
``source``) is a duplicate the stream processor drops, since it keeps one event per
``(source, event_id)``: so a request answered 503 because Kafka had not acknowledged its
event in time (it may still arrive) can be retried without counting twice.
"""

from __future__ import annotations

import math
import uuid
from typing import Any

from rollstream.errors import InvalidEventError
from rollstream.schemas import make_event

MAX_ID = 256
MAX_ATTEMPT = 2**31 - 1  # attempts are Avro ints
FINISH_STATUSES = ("SUCCEEDED", "FAILED", "CANCELLED")


def _invalid(param: str, message: str) -> InvalidEventError:
    return InvalidEventError(f"'{param}': {message}", param)


def _known(body: dict[str, Any], allowed: set[str]) -> None:
    unknown = sorted(set(body) - allowed)
    if unknown:
        raise _invalid(unknown[0], f"unknown field; allowed: {', '.join(sorted(allowed))}")


def check_id(value: Any, param: str) -> str:
    if not isinstance(value, str) or not value.strip():
        raise _invalid(param, "must be a non-empty string")
    if len(value) > MAX_ID or "/" in value:
        raise _invalid(param, f"must be at most {MAX_ID} characters, without '/'")
    return value


def _optional_str(body: dict[str, Any], param: str) -> str | None:
    value = body.get(param)
    if value is not None and not isinstance(value, str):
        raise _invalid(param, "must be a string")
    return value


def _event_id(body: dict[str, Any]) -> dict[str, str]:
    """``event_id`` for make_event when the client gave one (else make_event generates one)."""
    value = body.get("event_id")
    return {} if value is None else {"event_id": check_id(value, "event_id")}


def _attempt(body: dict[str, Any], default: int | None) -> int | None:
    value = body.get("attempt", default)
    if value is None:
        return None
    if not isinstance(value, int) or isinstance(value, bool) or not 1 <= value <= MAX_ATTEMPT:
        raise _invalid("attempt", f"must be an integer from 1 to {MAX_ATTEMPT}")
    return value


def _metadata(body: dict[str, Any]) -> dict[str, str]:
    value = body.get("metadata") or {}
    if not isinstance(value, dict):
        raise _invalid("metadata", "must be an object of strings")
    out = {}
    for key, item in value.items():
        if isinstance(item, dict | list):
            raise _invalid(f"metadata.{key}", "must be a string, number or boolean")
        out[str(key)] = item if isinstance(item, str) else str(item).lower() if isinstance(item, bool) else str(item)
    return out


def start_rollout(body: dict[str, Any], source: str, default_policy: str) -> dict[str, Any]:
    """A RolloutEvent STARTED for ``POST /v1/rollouts``."""
    _known(body, {"rollout_id", "attempt", "task_id", "group_id", "policy", "metadata", "event_id"})
    rollout_id = check_id(body["rollout_id"], "rollout_id") if body.get("rollout_id") is not None else uuid.uuid4().hex
    return make_event(
        "RolloutEvent",
        source=source,
        rollout_id=rollout_id,
        attempt=_attempt(body, 1),
        status="STARTED",
        policy=_optional_str(body, "policy") or default_policy,
        task_id=_optional_str(body, "task_id"),
        group_id=_optional_str(body, "group_id"),
        metadata=_metadata(body),
        **_event_id(body),
    )


def finish_rollout(rollout_id: str, body: dict[str, Any], source: str, default_policy: str,
                   attempt: int) -> dict[str, Any]:
    """A RolloutEvent SUCCEEDED / FAILED / CANCELLED for ``POST /v1/rollouts/{id}/finish``."""
    _known(body, {"status", "error", "attempt", "policy", "task_id", "group_id", "metadata", "event_id"})
    status = body.get("status")
    if status is None:
        raise _invalid("status", f"is required: one of {', '.join(FINISH_STATUSES)}")
    if not isinstance(status, str) or status.upper() not in FINISH_STATUSES:
        raise _invalid("status", f"must be one of {', '.join(FINISH_STATUSES)}")
    return make_event(
        "RolloutEvent",
        source=source,
        rollout_id=check_id(rollout_id, "rollout_id"),
        attempt=_attempt(body, attempt),
        status=status.upper(),
        policy=_optional_str(body, "policy") or default_policy,
        task_id=_optional_str(body, "task_id"),
        group_id=_optional_str(body, "group_id"),
        error=_optional_str(body, "error"),
        metadata=_metadata(body),
        **_event_id(body),
    )


def reward(rollout_id: str, body: dict[str, Any], source: str) -> dict[str, Any]:
    """A Reward for ``POST /v1/rollouts/{id}/rewards``; the value must be a finite number."""
    _known(body, {"value", "call_id", "name", "terminal", "attempt", "source", "metadata", "event_id"})
    if "value" not in body or body["value"] is None:
        raise _invalid("value", "is required (a finite number)")
    value = body["value"]
    if not isinstance(value, int | float) or isinstance(value, bool):
        raise _invalid("value", f"must be a number, not {type(value).__name__}")
    try:
        value = float(value)
    except OverflowError:  # an integer literal beyond the largest double
        value = math.inf
    if not math.isfinite(value):
        raise _invalid("value", "must be finite (NaN and infinities are not rewards)")
    terminal = body.get("terminal", False)
    if not isinstance(terminal, bool):
        raise _invalid("terminal", "must be true or false")
    name = body.get("name", "primary")
    if not isinstance(name, str) or not name:
        raise _invalid("name", "must be a non-empty string")
    call_id = body.get("call_id")
    return make_event(
        "Reward",
        source=_optional_str(body, "source") or source,
        rollout_id=check_id(rollout_id, "rollout_id"),
        attempt=_attempt(body, None),
        call_id=check_id(call_id, "call_id") if call_id is not None else None,
        name=name,
        value=value,
        terminal=terminal,
        metadata=_metadata(body),
        **_event_id(body),
    )
