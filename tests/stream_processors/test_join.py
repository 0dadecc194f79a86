"""The per-rollout state machine: order, duplicates, completion, closing, expiry, watermarks."""

from __future__ import annotations

import dataclasses

from sp_helpers import call, lifecycle, reward

from rollstream.stream_processors.join import Outcome, RolloutState, Watermarks, apply, close, is_expired


def feed(events: list[tuple[str, dict]], completion: str = "finished") -> tuple[RolloutState | None, list[Outcome]]:
    state: RolloutState | None = None
    outcomes = []
    for i, (kind, record) in enumerate(events):
        state, outcome = apply(state, kind, record, now=100.0 + i, completion=completion)  # type: ignore[arg-type]
        outcomes.append(outcome)
    return state, outcomes


def test_completes_on_terminal_reward_and_final_status_in_any_order() -> None:
    state, outcomes = feed([("reward", reward("r", 1.0)), ("call", call("r", 1)), ("call", call("r", 0)),
                            ("rollout", lifecycle("r", "SUCCEEDED"))])
    assert outcomes == [Outcome.ADDED, Outcome.ADDED, Outcome.ADDED, Outcome.COMPLETED]
    assert state is not None
    assert [c.sequence for c in state.calls_of(1)] == [0, 1]  # ordered by sequence, not arrival


def test_terminal_reward_alone_closes_when_configured() -> None:
    _, outcomes = feed([("call", call("r", 0)), ("reward", reward("r", 1.0))], completion="terminal_reward")
    assert outcomes[-1] is Outcome.COMPLETED
    _, outcomes = feed([("call", call("r", 0)), ("reward", reward("r", 1.0))], completion="finished")
    assert outcomes[-1] is Outcome.ADDED


def test_duplicates_by_source_and_event_id_and_by_call_id() -> None:
    c = call("r", 0, event_id="e1")
    _, outcomes = feed([("call", c), ("call", c), ("call", call("r", 0, event_id="e2"))])
    assert outcomes == [Outcome.ADDED, Outcome.DUPLICATE, Outcome.DUPLICATE]


def test_closed_marker_tells_late_from_duplicate() -> None:
    r = reward("r", 1.0, event_id="rw")
    state, _ = feed([("call", call("r", 0)), ("rollout", lifecycle("r", "FAILED")), ("reward", r)])
    assert state is not None
    marker = close(state, "completed", 200.0)
    assert marker.calls == [] and marker.closed
    marker = RolloutState.loads(marker.dumps())
    assert apply(marker, "reward", r, 201.0, "finished")[1] is Outcome.DUPLICATE
    assert apply(marker, "call", call("r", 5), 201.0, "finished")[1] is Outcome.LATE
    assert marker.deadline(10, "first_event", closed_ttl=50) == 250.0


def test_intermediate_rewards_and_attempts() -> None:
    state, _ = feed([("call", call("r", 0, attempt=2)), ("reward", reward("r", 0.5, terminal=False, call_id="c0")),
                     ("reward", reward("r", 1.0)), ("reward", reward("r", 9.0))])
    assert state is not None
    assert state.target_attempt() == 2
    assert state.intermediate_of(2) == {"c0": 0.5}
    assert state.terminal_reward().value == 1.0  # type: ignore[union-attr]  # the first terminal reward wins


def test_other_reward_dimensions_are_ignored() -> None:
    state, outcome = apply(None, "reward", reward("r", 1.0, name="style"), 1.0, "terminal_reward")
    assert outcome is Outcome.IGNORED and state.terminal_reward() is None


def test_expiry_from_first_event_or_last_activity() -> None:
    state, _ = feed([("call", call("r", 0)), ("call", call("r", 1))])  # at 100 and 101
    assert state is not None
    assert state.deadline(10, "first_event", 0) == 110 and state.deadline(10, "last_activity", 0) == 111
    assert is_expired(state, 110.5, 10, "first_event") and not is_expired(state, 110.5, 10, "last_activity")


def test_state_round_trips() -> None:
    state, _ = feed([("call", call("r", 0)), ("rollout", lifecycle("r", "STARTED", group_id="g"))])
    assert state is not None
    loaded = RolloutState.loads(state.dumps())
    # A call's tokens are a piece of their own, stored under another key: not in the state's record.
    assert loaded == dataclasses.replace(state, new_pieces={}) and list(state.new_pieces) == ["1\x1fc0"]
    assert b'"new_pieces":{}' in state.dumps() and state.new_pieces  # dumps leaves the pieces in place
    full = loaded.tokens(loaded.calls[0], state.new_pieces.get)
    assert (full.prompt_token_ids, full.response_token_ids) == ([1, 2, 0], [7, 0])
    assert full.response_logprobs == [-0.5, -0.25]


def test_watermarks_wait_for_lagging_topics_or_idleness() -> None:
    wm = Watermarks(("calls", "rewards"), grace=0.5)
    wm.observe("rewards", 0, ts=10.0, now=1000.0)
    assert not wm.ready(0, 10.0, now=1000.1)  # calls not read past 10 yet
    wm.observe("calls", 0, ts=10.5, now=1000.2)
    wm.observe("rewards", 0, ts=10.6, now=1000.2)
    assert wm.ready(0, 10.0, now=1000.2)
    wm.observe("rewards", 0, ts=20.0, now=1000.3)
    assert not wm.ready(0, 20.0, now=1000.4)
    assert wm.ready(0, 20.0, now=1001.0)  # everything idle for the grace period
    # A partition nothing was read from since a restart: idle from the first time it is asked about.
    wm2 = Watermarks(("calls", "rewards"), grace=0.5)
    assert not wm2.ready(1, 5.0, now=2000.0)
    assert not wm2.ready(1, 5.0, now=2000.3)
    assert wm2.ready(1, 5.0, now=2000.6)
    assert not wm2.ready(1, 5.0, now=2000.6, caught_up=lambda t, p, ts: False)  # unless records are still unread


def test_calls_are_ordered_by_start_time_when_the_sequence_restarts() -> None:
    """A gateway restarted during a rollout numbers its calls from 0 again; their start times still tell the order."""
    from datetime import UTC, datetime

    def at(second: int) -> datetime:
        return datetime.fromtimestamp(1_800_000_000 + second, tz=UTC)

    # Before the restart: sequences 0, 1; after it: 0, 1 again. Arrival order mixed.
    calls = [call("r", 0, call_id="after-0", start_time=at(30)), call("r", 0, call_id="before-0", start_time=at(10)),
             call("r", 1, call_id="after-1", start_time=at(40)), call("r", 1, call_id="before-1", start_time=at(20))]
    state, _ = feed([("call", c) for c in calls] + [("reward", reward("r", 1.0))])
    assert state is not None
    assert [c.call_id for c in state.calls_of(1)] == ["before-0", "before-1", "after-0", "after-1"]
    # The order survives the state's round trip through the changelog.
    assert [c.call_id for c in RolloutState.loads(state.dumps()).calls_of(1)] == [
        "before-0", "before-1", "after-0", "after-1"]
