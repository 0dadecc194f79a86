"""The per-rollout join as a pure state machine: add calls, rewards and lifecycle events; complete; expire.

One :class:`RolloutState` per rollout id lives in the processor's table. Events are
applied with :func:`apply`, which never does I/O: it returns what happened (added,
duplicate, late, completed) and the state to store. A completed or expired rollout is
replaced by a small *closed marker* (the ids of the events it saw and when it closed),
kept for ``closed_ttl`` seconds so that later events are recognised as late, and repeats
of events it already saw as duplicates.

Times are the processor's wall clock when it handled the event (processing time), not
the events' own timestamps: expiry is about how long the processor has been waiting.
"""

from __future__ import annotations

import enum
import struct
from array import array
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from datetime import datetime
from typing import Any, Literal

import orjson

from rollstream.errors import ProcessorError
from rollstream.schemas.rawavro import AvroArray


class MissingPieceError(ProcessorError):
    """A piece of a rollout's state (a call's tokens) is not in the state store."""

FINAL_STATUSES = frozenset({"SUCCEEDED", "FAILED", "CANCELLED"})
Kind = Literal["call", "reward", "rollout"]


class Outcome(enum.Enum):
    ADDED = "added"
    DUPLICATE = "duplicate"
    LATE = "late"
    COMPLETED = "completed"
    IGNORED = "ignored"  # a reward of another dimension: remembered (for duplicates), not joined


@dataclass
class CallEntry:
    """The parts of an LlmCall that a transition needs."""

    call_id: str
    attempt: int
    sequence: int
    agent_name: str | None
    policy: str
    policy_version: int
    # Lists inline in states stored before the tokens moved to pieces; AvroArray once read from a piece.
    prompt_token_ids: list[int] | AvroArray
    response_token_ids: list[int] | AvroArray
    response_logprobs: list[float] | AvroArray | None
    start_time: float = 0.0  # seconds since the epoch; orders the calls (the sequence counter restarts with a gateway)
    # True: the token ids and logprobs are stored as a piece of their own (see RolloutState.pieces), not inline.
    piece: bool = False
    # engine: the ids as the engine produced them; tokenizer: tokenized from the call's text (retokenize.py).
    # Defaulted, so states stored before the field existed still load.
    token_source: str = "engine"

    @property
    def piece_id(self) -> str:
        return f"{self.attempt}\x1f{self.call_id}"


PIECE_HEAD = struct.Struct("<cIIIIiI")  # b"A", then (items, bytes) of the prompt, the response, the logprobs
OLD_HEAD = struct.Struct("<cIIi")  # b"I" or b"q", then the prompt's, the response's and the logprobs' lengths


def pack_tokens(prompt: AvroArray, response: AvroArray, logprobs: AvroArray | None) -> bytes:
    """A call's token ids and logprobs as one piece: their Avro encodings, copied as they are."""
    lp = logprobs.data if logprobs is not None else b""
    head = PIECE_HEAD.pack(b"A", prompt.count, len(prompt.data), response.count, len(response.data),
                           -1 if logprobs is None else logprobs.count, len(lp))
    return head + prompt.data + response.data + lp


def unpack_tokens(data: bytes) -> tuple[AvroArray, AvroArray, AvroArray | None]:
    if data[:1] != b"A":  # a piece stored before the Avro form: fixed-width ids, logprobs as doubles
        return _unpack_old(data)
    _, n_prompt, b_prompt, n_response, b_response, n_logprobs, b_logprobs = PIECE_HEAD.unpack_from(data)
    at = PIECE_HEAD.size
    prompt = AvroArray(data[at:at + b_prompt], n_prompt, "int")
    at += b_prompt
    response = AvroArray(data[at:at + b_response], n_response, "int")
    at += b_response
    logprobs = AvroArray(data[at:at + b_logprobs], n_logprobs, "float") if n_logprobs >= 0 else None
    return prompt, response, logprobs


def _unpack_old(data: bytes) -> tuple[AvroArray, AvroArray, AvroArray | None]:
    code, n_prompt, n_response, n_logprobs = OLD_HEAD.unpack_from(data)
    ids: array[int] = array(code.decode())
    at = OLD_HEAD.size
    ids.frombytes(data[at:at + (n_prompt + n_response) * ids.itemsize])
    at += (n_prompt + n_response) * ids.itemsize
    logprobs = None
    if n_logprobs >= 0:
        lp: array[float] = array("d")
        lp.frombytes(data[at:at + n_logprobs * lp.itemsize])
        logprobs = AvroArray.from_list(lp, "float")
    values = ids.tolist()
    return AvroArray.from_list(values[:n_prompt], "int"), AvroArray.from_list(values[n_prompt:], "int"), logprobs


def _as_array(values: list[Any] | AvroArray, kind: str) -> AvroArray:
    return values if isinstance(values, AvroArray) else AvroArray.from_list(values, kind)


@dataclass
class RewardEntry:
    value: float
    attempt: int | None
    call_id: str | None
    terminal: bool


@dataclass
class RolloutState:
    rollout_id: str
    first_seen: float
    last_seen: float
    seen: list[str] = field(default_factory=list)
    calls: list[CallEntry] = field(default_factory=list)
    rewards: list[RewardEntry] = field(default_factory=list)
    status: dict[str, str] = field(default_factory=dict)  # attempt -> last lifecycle status
    info: dict[str, dict[str, str | None]] = field(default_factory=dict)  # attempt -> policy/task/group
    closed_at: float | None = None
    closed_how: str | None = None  # completed | expired
    max_ts: float = 0.0  # latest Kafka timestamp among its events: the stream time it completes at
    # Token pieces of calls added since the state was loaded (piece id -> packed tokens): stored beside the
    # state under keys of their own, so that no write grows with the rollout (see processor.piece_key).
    new_pieces: dict[str, bytes] = field(default_factory=dict)

    @property
    def closed(self) -> bool:
        return self.closed_at is not None

    def dumps(self) -> bytes:
        """The state without its new pieces (they are stored under keys of their own)."""
        pieces, self.new_pieces = self.new_pieces, {}
        try:
            # orjson serializes dataclasses natively; dataclasses.asdict would deep-copy every token id.
            return orjson.dumps(self)
        finally:
            self.new_pieces = pieces

    def tokens(self, call: CallEntry, load: Callable[[str], bytes | None]) -> CallEntry:
        """``call`` with its token ids and logprobs, read from its piece where they are stored apart."""
        if not call.piece:  # a state stored with its tokens inline
            return replace(call, prompt_token_ids=_as_array(call.prompt_token_ids, "int"),
                           response_token_ids=_as_array(call.response_token_ids, "int"),
                           response_logprobs=None if call.response_logprobs is None
                           else _as_array(call.response_logprobs, "float"))
        data = self.new_pieces.get(call.piece_id) or load(call.piece_id)
        if data is None:
            raise MissingPieceError(f"rollout {self.rollout_id}: the tokens of call {call.call_id} "
                                    f"(attempt {call.attempt}) are missing from the state store")
        prompt, response, logprobs = unpack_tokens(data)
        return replace(call, prompt_token_ids=prompt, response_token_ids=response, response_logprobs=logprobs)

    def pieces(self) -> list[str]:
        """The ids of every piece the state has stored apart."""
        return [c.piece_id for c in self.calls if c.piece]

    @classmethod
    def loads(cls, data: bytes) -> RolloutState:
        raw: dict[str, Any] = orjson.loads(data)
        raw["calls"] = [CallEntry(**c) for c in raw.get("calls", [])]
        raw.pop("new_pieces", None)
        raw["rewards"] = [RewardEntry(**r) for r in raw.get("rewards", [])]
        return cls(**raw)

    # --- queries -------------------------------------------------------------------

    def terminal_reward(self) -> RewardEntry | None:
        """The first terminal reward that arrived (later ones are ignored)."""
        return next((r for r in self.rewards if r.terminal), None)

    def latest_attempt(self) -> int:
        attempts = [c.attempt for c in self.calls] + [int(a) for a in self.status] + [int(a) for a in self.info]
        return max(attempts, default=1)

    def target_attempt(self) -> int:
        terminal = self.terminal_reward()
        if terminal is not None and terminal.attempt is not None:
            return terminal.attempt
        return self.latest_attempt()

    def calls_of(self, attempt: int) -> list[CallEntry]:
        """The calls of ``attempt`` in the order they were made: by start time, then sequence number.

        A producer's sequence counter lives in its memory and starts again at 0 when it restarts,
        so it only breaks ties; the start time survives the restart."""
        return sorted((c for c in self.calls if c.attempt == attempt),
                      key=lambda c: (c.start_time, c.sequence, c.call_id))

    def intermediate_of(self, attempt: int) -> dict[str, float]:
        """Non-terminal rewards attached to calls of ``attempt``, summed per call id."""
        out: dict[str, float] = {}
        for r in self.rewards:
            if r.call_id is not None and not r.terminal and r.attempt in (None, attempt):
                out[r.call_id] = out.get(r.call_id, 0.0) + r.value
        return out

    def is_complete(self, completion: str) -> bool:
        if self.closed or self.terminal_reward() is None:
            return False
        if completion == "terminal_reward":
            return True
        return self.status.get(str(self.target_attempt())) in FINAL_STATUSES

    def deadline(self, expire_after: float, expire_from: str, closed_ttl: float) -> float:
        """When the timer must look at this rollout again: expiry if open, forgetting if closed."""
        if self.closed_at is not None:
            return self.closed_at + closed_ttl
        return (self.first_seen if expire_from == "first_event" else self.last_seen) + expire_after


def epoch_seconds(value: Any) -> float:
    """An Avro ``timestamp-micros`` as decoded (a datetime, or micros where the logical type was not applied)."""
    if value is None:
        return 0.0
    if isinstance(value, datetime):
        return value.timestamp()
    return float(value) / 1e6


def event_key(record: dict[str, Any]) -> str:
    """Duplicates are repeats of (source, event_id)."""
    return f"{record.get('source', '')}\x1f{record['event_id']}"


def new_state(rollout_id: str, now: float) -> RolloutState:
    return RolloutState(rollout_id=rollout_id, first_seen=now, last_seen=now)


def apply(
    state: RolloutState | None, kind: Kind, record: dict[str, Any], now: float, completion: str,
    reward_name: str = "primary", ts: float = 0.0,
) -> tuple[RolloutState, Outcome]:
    """Apply one decoded event to a rollout's state (which may be None: not seen yet).

    The returned state is the one to store; on COMPLETED it still holds the calls and
    rewards (the caller builds transitions from it, then stores :func:`close`'s marker).
    """
    state = state or new_state(record["rollout_id"], now)
    key = event_key(record)
    if key in state.seen:
        return state, Outcome.DUPLICATE
    if state.closed:
        return state, Outcome.LATE
    if kind == "call" and any(c.call_id == record["call_id"] and c.attempt == record["attempt"] for c in state.calls):
        return state, Outcome.DUPLICATE  # the same call captured twice under another event id
    state.seen.append(key)
    state.last_seen = now
    state.max_ts = max(state.max_ts, ts)
    outcome = Outcome.ADDED
    if kind == "call":
        entry = CallEntry(
            call_id=record["call_id"], attempt=int(record["attempt"]), sequence=int(record["sequence"]),
            agent_name=record.get("agent_name"), policy=record["policy"],
            policy_version=int(record["policy_version"]), prompt_token_ids=[], response_token_ids=[],
            response_logprobs=None, start_time=epoch_seconds(record.get("start_time")), piece=True,
            token_source=record.get("token_source", "engine"),
        )
        state.calls.append(entry)
        state.new_pieces[entry.piece_id] = pack_tokens(
            _as_array(record.get("prompt_token_ids") or [], "int"),
            _as_array(record.get("response_token_ids") or [], "int"),
            None if record.get("response_logprobs") is None else _as_array(record["response_logprobs"], "float"),
        )
    elif kind == "reward":
        if record.get("name", "primary") != reward_name:
            outcome = Outcome.IGNORED
        else:
            state.rewards.append(
                RewardEntry(float(record["value"]), record.get("attempt"), record.get("call_id"),
                            bool(record.get("terminal")))
            )
    else:
        attempt = str(record["attempt"])
        # A final status is never undone by a STARTED that arrives after it.
        if not (record["status"] == "STARTED" and state.status.get(attempt) in FINAL_STATUSES):
            state.status[attempt] = record["status"]
        info = state.info.setdefault(attempt, {})
        info["policy"] = record.get("policy") or info.get("policy")
        info["task_id"] = record.get("task_id") or info.get("task_id")
        info["group_id"] = record.get("group_id") or info.get("group_id")
    if state.is_complete(completion):
        outcome = Outcome.COMPLETED
    return state, outcome


def close(state: RolloutState, how: str, now: float) -> RolloutState:
    """The small marker kept after completion or expiry: which events it saw, when it closed."""
    return RolloutState(
        rollout_id=state.rollout_id, first_seen=state.first_seen, last_seen=state.last_seen,
        seen=list(state.seen), closed_at=now, closed_how=how, max_ts=state.max_ts,
    )


def is_expired(state: RolloutState, now: float, expire_after: float, expire_from: str) -> bool:
    return not state.closed and now >= state.deadline(expire_after, expire_from, 0.0)


class Watermarks:
    """Stream time per input topic and partition, so a rollout completes only once its calls are in.

    The topics of one partition are consumed at different paces (a backlog of calls may be
    fetched after the rewards that followed them). A complete rollout is *ready* when every
    input topic of its partition has been read past the rollout's latest event timestamp,
    or has been read to its end (``caught_up``: a high-water mark asked of the broker after ``at_ts``) and
    has been idle (nothing read from it) for ``grace`` seconds.
    """

    def __init__(self, topics: tuple[str, ...], grace: float) -> None:
        self.topics = topics
        self.grace = grace
        self.ts: dict[tuple[str, int], float] = {}
        self.wall: dict[tuple[str, int], float] = {}
        self.next_offset: dict[tuple[str, int], int] = {}
        self.first_wall: dict[int, float] = {}

    def observe(self, topic: str, partition: int, ts: float, now: float, offset: int = -1) -> None:
        self.first_wall.setdefault(partition, now)
        if ts > self.ts.get((topic, partition), float("-inf")):
            self.ts[(topic, partition)] = ts
        self.wall[(topic, partition)] = now
        self.next_offset[(topic, partition)] = offset + 1

    def ready(
        self, partition: int, at_ts: float, now: float,
        caught_up: Callable[[str, int, float], bool] = lambda t, p, ts: True, strict: tuple[str, ...] = (),
    ) -> bool:
        """``strict``: topics that only pass by being read past ``at_ts``, never by being idle and caught up."""
        for topic in self.topics:
            # Strictly later: records with the same (millisecond) timestamp may still be behind.
            if self.ts.get((topic, partition), float("-inf")) > at_ts:
                continue
            if topic in strict:
                return False
            # A partition nothing was read from since start counts as idle from the first time it is asked about.
            last = self.wall.get((topic, partition), self.first_wall.setdefault(partition, now))
            if now - last < self.grace or not caught_up(topic, partition, at_ts):
                return False
        return True
