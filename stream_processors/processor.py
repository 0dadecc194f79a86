"""What the processor does with one input record or timer check, independent of Kafka.

:class:`Processor` takes a raw record and the rollout's stored state and returns a
:class:`Decision`: the state to store (or delete) and the records to produce
(transitions, a dead letter, a late-event copy). The engine does the I/O, inside
the Kafka transaction of the input's partition (engine.py).
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from rollstream.errors import BadInputError
from rollstream.schemas import make_event
from rollstream.schemas.codec import EventCodec
from rollstream.schemas.topics import Topics
from rollstream.stream_processors import credit, join
from rollstream.stream_processors.config import ProcessorSettings
from rollstream.stream_processors.dead_letters import InputDecoder, dead_letter
from rollstream.stream_processors.join import Outcome, RolloutState
from rollstream.stream_processors.metrics import Metrics
from rollstream.stream_processors.retokenize import CallTokenizer, load_tokenizer
from rollstream.stream_processors.store import Row

log = logging.getLogger(__name__)

PARSED_MAX = 4096  # parsed states kept for the next event of their rollout
KEEP = b"\x00keep"  # Decision.state sentinel: leave the stored state as it is
REASON_HEADER = "rollstream-late-reason"


@dataclass
class Output:
    topic: str
    key: bytes | None
    value: bytes
    headers: list[tuple[str, bytes]] | None = None


@dataclass
class Decision:
    state: bytes | None = KEEP  # bytes: store; None: delete; KEEP: unchanged
    outputs: list[Output] = field(default_factory=list)
    deadline: float | None = None  # when the timer must check this rollout again (None: forget it)
    pending_ts: float | None = None  # complete, waiting for the other topics to reach this stream time
    # False: the record did not change the rollout (a duplicate, a late or a bad record), so the timer's
    # deadline and the waiting completion it may have stay as they are.
    tracks: bool = True
    # Pieces of the state stored under keys of their own (piece id -> value; None: delete), see piece_key.
    pieces: list[tuple[str, bytes | None]] = field(default_factory=list)
    open_since: float | None = None  # with a stored state: when the rollout was first seen, while it is open


Load = Callable[[str], bytes | None]  # a stored piece of the rollout's state by its id, or None


def no_pieces(piece_id: str) -> bytes | None:
    return None


PIECE = b"\x00piece\x1f"  # table keys of state pieces (never a rollout id: those are non-empty text)


def piece_key(key: bytes, piece_id: str) -> bytes:
    """Where a piece of rollout ``key``'s state lives in the table (beside the state, in its partition)."""
    return PIECE + key + b"\x1f" + piece_id.encode()


def transition_id(rollout_id: str, attempt: int, call_id: str) -> str:
    """Deterministic: a replay or a retry of the same call yields the same id."""
    return hashlib.sha1(f"{rollout_id}\x1f{attempt}\x1f{call_id}".encode()).hexdigest()[:32]


class Processor:
    def __init__(
        self, settings: ProcessorSettings, topics: Topics, codec: EventCodec, metrics: Metrics,
        tokenizer: CallTokenizer | None = None,
    ) -> None:
        """``tokenizer``: for calls without token ids; by default the one ``settings.tokenizer`` names, if any."""
        self.settings = settings
        self.topics = topics
        self.codec = codec
        self.metrics = metrics
        if tokenizer is None and settings.tokenizer:
            tokenizer = load_tokenizer(settings.tokenizer)
        self.decoder = InputDecoder(codec, topics, settings.max_message_bytes, settings.require_token_ids, tokenizer)
        self.rules = settings.credit_rules()
        self.agent_pattern = settings.agent_pattern()
        # key -> (the stored bytes, the state they were dumped from): a rollout's next event finds its state
        # parsed already, as long as what the store hands back is that very bytes object (see _load).
        self._parsed: dict[bytes, tuple[bytes, RolloutState]] = {}

    def _load(self, key: bytes | None, stored: bytes) -> RolloutState:
        """The state in ``stored``: the object it was dumped from when the store returns the same bytes object.

        Identity, not equality: the store returns the object staged with the decision (or a new one read
        from the file, after a restart or an aborted batch), so a state object is reused only for exactly
        the write it made. Each object is taken once, and its new pieces are already staged.
        """
        got = self._parsed.pop(key, None) if key is not None else None
        if got is not None and got[0] is stored:
            return got[1]
        return RolloutState.loads(stored)

    def _remember(self, key: bytes | None, decision: Decision, state: RolloutState,
                  stored: bytes | None = None) -> Decision:
        """``decision``, keeping ``state`` for the rollout's next look: as the bytes the decision stores, or
        as ``stored`` where the decision leaves the state as it was (and ``state`` was not changed)."""
        value = stored if decision.state is KEEP else decision.state
        if key is not None and value is not None:
            state.new_pieces = {}  # staged with the decision: what a state loaded from the store has
            if len(self._parsed) >= PARSED_MAX:
                del self._parsed[next(iter(self._parsed))]
            self._parsed[key] = (value, state)
        return decision

    def _deadline(self, state: RolloutState) -> float:
        s = self.settings
        return state.deadline(s.expire_after, s.expire_from, s.closed_ttl)

    def index_row(self, key: bytes, value: bytes | None) -> Row:
        """A changelog record as the local store keeps it, with the index columns the worker asks about."""
        if value is None or key.startswith(PIECE):
            return Row(value)
        state = RolloutState.loads(value)
        pending = state.max_ts if state.is_complete(self.settings.completion) else None
        return Row(value, self._deadline(state), pending, None if state.closed else state.first_seen)

    def handle(
        self, topic: str, partition: int, offset: int, key: bytes | None, value: bytes | None,
        stored: bytes | None, now: float, ts: float = 0.0, ready: Callable[[RolloutState], bool] = lambda s: True,
        load: Load = no_pieces,
    ) -> Decision:
        """One record of the calls, rewards or rollouts topic."""
        self.metrics.inc("events")
        try:
            decoded = self.decoder.decode(topic, key, value)
        except BadInputError as exc:
            self.metrics.dead_letter(exc.error_type)
            log.warning("dead letter %s[%d]@%d (%s): %s", topic, partition, offset, exc.error_type, exc.reason)
            record = dead_letter(self.settings.source, topic, partition, offset, key, value, exc)
            value_out = self.codec.encode(self.topics.dead_letters, record)
            return Decision(outputs=[Output(self.topics.dead_letters, key, value_out)], tracks=False)
        if decoded.record.get("token_source") == "tokenizer":
            self.metrics.inc("tokenized_calls")
        state = self._load(key, stored) if stored is not None else None
        state, outcome = join.apply(
            state, decoded.kind, decoded.record, now, self.settings.completion, self.settings.reward_name, ts
        )
        if outcome is Outcome.DUPLICATE:
            self.metrics.inc("duplicates")
            return self._remember(key, Decision(tracks=False), state, stored)
        if outcome is Outcome.LATE:
            self.metrics.inc("late")
            log.info("late %s %s[%d]@%d for rollout %s (%s)", decoded.kind, topic, partition, offset,
                     decoded.rollout_id, state.closed_how)
            headers = [
                (REASON_HEADER, (state.closed_how or "closed").encode()),
                ("rollstream-topic", topic.encode()),
                ("rollstream-partition", str(partition).encode()),
                ("rollstream-offset", str(offset).encode()),
            ]
            return self._remember(key, Decision(outputs=[Output(self.topics.late_events, key, value or b"", headers)],
                                                tracks=False), state, stored)
        if outcome is Outcome.IGNORED:
            self.metrics.inc("ignored_rewards")
        if outcome is Outcome.COMPLETED:
            if ready(state):
                return self._complete(key, state, now, load)
            return self._keep(key, state, pending_ts=state.max_ts)
        return self._keep(key, state)

    def _keep(self, key: bytes | None, state: RolloutState, pending_ts: float | None = None) -> Decision:
        """Store the open state, and the pieces added to it."""
        pieces: list[tuple[str, bytes | None]] = list(state.new_pieces.items())
        return self._remember(key, Decision(state.dumps(), [], self._deadline(state), pending_ts=pending_ts,
                                            pieces=pieces, open_since=state.first_seen), state)

    def _close(self, key: bytes | None, state: RolloutState, how: str, now: float, outputs: list[Output]) -> Decision:
        """Replace the state by its closed marker, deleting the pieces stored for it."""
        stored: list[tuple[str, bytes | None]] = [(pid, None) for pid in state.pieces() if pid not in state.new_pieces]
        closed = join.close(state, how, now)
        return self._remember(key, Decision(closed.dumps(), outputs, self._deadline(closed), pieces=stored), closed)

    def _complete(self, key: bytes | None, state: RolloutState, now: float, load: Load) -> Decision:
        terminal = state.terminal_reward()
        assert terminal is not None
        outputs = self.transitions(state, terminal.value, "completed", load)
        self.metrics.inc("completed")
        return self._close(key, state, "completed", now, outputs)

    def check(
        self, stored: bytes | None, now: float, ready: Callable[[RolloutState], bool] = lambda s: True,
        load: Load = no_pieces, key: bytes | None = None,
    ) -> Decision:
        """A look at one rollout: complete it once ready, expire it, or forget its closed marker, when due.

        ``key``: the rollout's table key, which lets the state parsed at its last write be reused."""
        if stored is None:
            return Decision(deadline=None)
        state = self._load(key, stored)
        s = self.settings
        if state.is_complete(s.completion):
            if ready(state):
                return self._complete(key, state, now, load)
            return self._remember(key, Decision(deadline=self._deadline(state), pending_ts=state.max_ts), state,
                                  stored)
        if state.closed:
            if now >= self._deadline(state):
                return Decision(state=None, deadline=None)
            return self._remember(key, Decision(deadline=self._deadline(state)), state, stored)
        if not join.is_expired(state, now, s.expire_after, s.expire_from):
            return self._remember(key, Decision(deadline=self._deadline(state)), state, stored)
        outputs: list[Output] = []
        if s.expire_action == "fill":
            terminal = state.terminal_reward()
            outputs = self.transitions(state, terminal.value if terminal else s.fill_value, "expired", load)
            self.metrics.inc("expired_filled")
        else:
            self.metrics.inc("expired_dropped")
        log.info("rollout %s expired (%s, %d calls)", state.rollout_id, s.expire_action, len(state.calls))
        return self._close(key, state, "expired", now, outputs)

    def transitions(self, state: RolloutState, terminal: float, how: str, load: Load = no_pieces) -> list[Output]:
        attempt = state.target_attempt()
        calls = state.calls_of(attempt)
        if not calls:
            return []
        info = state.info.get(str(attempt), {})
        policy = info.get("policy") or calls[0].policy
        rule = credit.rule_for(self.rules, policy)
        credited = credit.assign([c.call_id for c in calls], state.intermediate_of(attempt), terminal, rule)
        outputs = []
        key = self.codec.encode_key(self.topics.transitions, state.rollout_id)
        for call, (reward, ret) in zip(calls, credited, strict=True):
            if self.agent_pattern is not None and not self.agent_pattern.search(call.agent_name or ""):
                continue
            tid = transition_id(state.rollout_id, attempt, call.call_id)
            record = self._transition(state, state.tokens(call, load), tid, info, reward, ret, terminal, rule, how)
            outputs.append(Output(self.topics.transitions, key, self.codec.encode(self.topics.transitions, record)))
        self.metrics.inc("transitions", len(outputs))
        return outputs

    def _transition(
        self, state: RolloutState, call: join.CallEntry, tid: str, info: dict[str, str | None], reward: float,
        ret: float, terminal: float, rule: credit.CreditRule, how: str,
    ) -> dict[str, Any]:
        return make_event(
            "Transition", transition_id=tid, event_id=tid, source=self.settings.source,
            rollout_id=state.rollout_id, attempt=call.attempt, call_id=call.call_id, sequence=call.sequence,
            agent_name=call.agent_name, task_id=info.get("task_id"), group_id=info.get("group_id"),
            policy=call.policy, policy_version=call.policy_version, prompt_token_ids=call.prompt_token_ids,
            response_token_ids=call.response_token_ids, behaviour_logprobs=call.response_logprobs,
            reward=reward, credited_return=ret, terminal_reward=terminal, credit_assignment=rule.mode,
            token_source=call.token_source,
            metadata={"closed": how, "gamma": str(rule.gamma)} if rule.mode == "discounted" else {"closed": how},
        )
