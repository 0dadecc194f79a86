"""The in-process Python SDK: rollouts, rewards and captured calls, published from a background thread.

::

    client = Client()                                   # settings from ROLLSTREAM_* variables
    openai_client = instrument(OpenAI(base_url=...))    # rollstream.producers.instrument
    with client.rollout(task_id="t1", group_id="g1", policy="policy") as r:
        reply = openai_client.chat.completions.create(model="policy", messages=[...])  # -> LlmCall
        r.reward(1.0, terminal=True)                                                   # -> Reward
    # RolloutEvent STARTED on entry; SUCCEEDED on exit, or FAILED with the error text (re-raised)

``async with client.arollout(...)`` is the asyncio form. Agents that go through the gateway
instead use ``r.base_url`` (``<gateway>/rollouts/<rollout_id>/v1``) as their OpenAI base URL.
A reward or the finish can come later from another process that knows only the rollout id:
``Client().reward(rollout_id, 1.0, terminal=True)``, ``Client().finish(rollout_id, "SUCCEEDED")``.

The current rollout lives in a ``contextvars.ContextVar``: asyncio tasks (and
``asyncio.to_thread``) inherit it, so concurrent rollouts in one process never mix. A new
``threading.Thread`` or a ``ThreadPoolExecutor`` worker does not inherit context: start it
with ``contextvars.copy_context().run`` as the target, or wrap the function with ``bind(fn)``.

Redaction (``ROLLSTREAM_REDACT*``, or ``Client(redact=fn)`` with a ``text -> text`` function or a
``Redactor``; docs/redaction.md): the instrumented client redacts a call's request before it is sent
to the model, and every event is redacted on the background thread before it is encoded.
"""

from __future__ import annotations

import asyncio
import contextvars
import functools
import itertools
import logging
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any, ParamSpec, TypeVar

from rollstream.errors import ConfigError, InvalidEventError, ProducerError
from rollstream.events import DeliveryError
from rollstream.producers import api
from rollstream.producers.emitter import EventEmitter, OnFull, Payload
from rollstream.producers.metrics import process_redaction_counters
from rollstream.producers.redact import Hook, RedactionSettings, Redactor
from rollstream.schemas import schema_text
from rollstream.schemas.codec import EventCodec, register, registry_client
from rollstream.schemas.topics import Topics
from rollstream.settings import ConnectionSettings, Settings, setting

log = logging.getLogger(__name__)

P = ParamSpec("P")
R = TypeVar("R")

_current: contextvars.ContextVar[Rollout | None] = contextvars.ContextVar("rollstream_rollout", default=None)
_agent: contextvars.ContextVar[str | None] = contextvars.ContextVar("rollstream_agent", default=None)
_last_call: contextvars.ContextVar[str | None] = contextvars.ContextVar("rollstream_last_call", default=None)


@dataclass(frozen=True)
class SdkSettings(Settings):
    """How the SDK names its events, where the gateway is, and how its event queue behaves."""

    source: str = setting("SDK_SOURCE")
    policy: str = setting("SDK_POLICY")
    policy_version: int = setting("SDK_POLICY_VERSION")
    gateway_url: str = setting("SDK_GATEWAY_URL")
    queue_max: int = setting("SDK_QUEUE_MAX")
    on_full: OnFull = setting("SDK_ON_FULL")
    block_timeout: float = setting("SDK_BLOCK_TIMEOUT")
    flush_timeout: float = setting("SDK_FLUSH_TIMEOUT")
    flush_on_finish: bool = setting("SDK_FLUSH_ON_FINISH")
    delivery_timeout_ms: int = setting("SDK_DELIVERY_TIMEOUT_MS")
    token_ids: bool = setting("SDK_TOKEN_IDS")
    redaction: RedactionSettings = field(default_factory=RedactionSettings)

    def validate(self) -> None:
        if self.queue_max < 1:
            raise ConfigError("ROLLSTREAM_SDK_QUEUE_MAX must be at least 1")
        if self.delivery_timeout_ms < 0:
            raise ConfigError("ROLLSTREAM_SDK_DELIVERY_TIMEOUT_MS must be 0 (forever) or more")


def current_rollout() -> Rollout | None:
    """The rollout of the calling context, if any."""
    return _current.get()


def last_call_id() -> str | None:
    """The ``call_id`` of the last call recorded in this context (for intermediate rewards)."""
    return _last_call.get()


def bind(fn: Callable[P, R]) -> Callable[P, R]:
    """``fn`` wrapped to run in (a copy of) the caller's context: use it as a thread's target.

    ``threading.Thread(target=bind(work))`` keeps calls made in ``work`` in the current rollout.
    """
    ctx = contextvars.copy_context()

    @functools.wraps(fn)
    def run(*args: P.args, **kwargs: P.kwargs) -> R:
        return ctx.copy().run(fn, *args, **kwargs)

    return run


def _checked(make: Callable[[], R]) -> R:
    """What the API's validators return, with their errors as ProducerError."""
    try:
        return make()
    except InvalidEventError as exc:
        raise ProducerError(exc.message) from exc


class Client:
    """Publishes rollout events, rewards and captured calls of one process."""

    def __init__(
        self,
        settings: ConnectionSettings | None = None,
        sdk: SdkSettings | None = None,
        *,
        topics: Topics | None = None,
        emitter: EventEmitter | None = None,
        register_schemas: bool = True,
        redact: Redactor | Hook | None = None,
    ) -> None:
        self.settings = settings or ConnectionSettings()
        self.sdk = sdk or SdkSettings()
        # ``redact``: a Redactor used as it is, or a function run after the rules of ROLLSTREAM_REDACT*.
        self.redactor = redact if isinstance(redact, Redactor) else Redactor.from_settings(
            self.sdk.redaction, surface="sdk", counters=process_redaction_counters(), hook=redact)
        self.topics = topics or Topics.from_settings(self.settings)
        if emitter is None:
            codec = EventCodec(registry_client(self.settings), self.topics)
            if register_schemas:
                for topic, event_type in ((self.topics.calls, "LlmCall"), (self.topics.rewards, "Reward"),
                                          (self.topics.rollouts, "RolloutEvent")):
                    register(codec.client, topic, schema_text(event_type))  # type: ignore[arg-type]
            emitter = EventEmitter(
                codec, self.settings, queue_max=self.sdk.queue_max, on_full=self.sdk.on_full,
                block_timeout=self.sdk.block_timeout, flush_timeout=self.sdk.flush_timeout,
                delivery_timeout_ms=self.sdk.delivery_timeout_ms, name="rollstream-sdk",
            )
        self.emitter = emitter

    # --- rollouts ------------------------------------------------------------------------

    def rollout(
        self,
        rollout_id: str | None = None,
        *,
        task_id: str | None = None,
        group_id: str | None = None,
        policy: str | None = None,
        attempt: int = 1,
        agent_name: str | None = None,
        metadata: dict[str, str] | None = None,
    ) -> Rollout:
        """A rollout scope: ``with client.rollout(...) as r`` (or ``async with``)."""
        return Rollout(self, rollout_id or uuid.uuid4().hex, attempt=attempt, task_id=task_id, group_id=group_id,
                       policy=policy or self.sdk.policy, agent_name=agent_name, metadata=metadata or {})

    arollout = rollout  # the same scope object also supports ``async with``

    def start(self, rollout_id: str | None = None, *, task_id: str | None = None, group_id: str | None = None,
              policy: str | None = None, attempt: int = 1, metadata: dict[str, str] | None = None) -> str:
        """Publish RolloutEvent STARTED without a scope (for rollouts finished elsewhere); returns the id."""
        body = {"rollout_id": rollout_id, "attempt": attempt, "task_id": task_id, "group_id": group_id,
                "policy": policy, "metadata": metadata or {}}
        record = _checked(lambda: api.start_rollout(body, self.sdk.source, self.sdk.policy))
        self.publish(self.topics.rollouts, record["rollout_id"], record)
        return str(record["rollout_id"])

    def finish(self, rollout_id: str, status: str = "SUCCEEDED", *, error: str | None = None, attempt: int = 1,
               policy: str | None = None, task_id: str | None = None, group_id: str | None = None,
               metadata: dict[str, str] | None = None) -> str:
        """Publish RolloutEvent SUCCEEDED / FAILED / CANCELLED for ``rollout_id``; returns the event id."""
        body = {"status": status, "error": error, "attempt": attempt, "policy": policy, "task_id": task_id,
                "group_id": group_id, "metadata": metadata or {}}
        record = _checked(lambda: api.finish_rollout(rollout_id, body, self.sdk.source, self.sdk.policy, attempt))
        self.publish(self.topics.rollouts, rollout_id, record)
        return str(record["event_id"])

    def reward(self, rollout_id: str, value: float, *, call_id: str | None = None, name: str = "primary",
               terminal: bool = False, attempt: int | None = None, source: str | None = None,
               metadata: dict[str, str] | None = None) -> str:
        """Publish a Reward for ``rollout_id`` (value must be finite); returns the event id."""
        body: dict[str, Any] = {"value": value, "name": name, "terminal": terminal, "attempt": attempt,
                                "source": source, "metadata": metadata or {}}
        if call_id is not None:
            body["call_id"] = call_id
        record = _checked(lambda: api.reward(rollout_id, body, self.sdk.source))
        self.publish(self.topics.rewards, rollout_id, record)
        return str(record["event_id"])

    # --- publishing ----------------------------------------------------------------------

    def publish(self, topic: str, key: str, payload: Payload) -> int:
        """Enqueue a record (or a function building records) for ``topic``; never waits for the network."""
        if self.redactor.active:
            payload = _redacting(self.redactor, payload)
        return self.emitter.submit(topic, key, payload)

    def flush(self, timeout: float | None = None) -> None:
        """Wait until everything published so far is acknowledged by Kafka (DeliveryError if not)."""
        self.emitter.flush(timeout)

    def close(self, timeout: float | None = None) -> int:
        """Flush and stop the background thread; returns the number of events not delivered."""
        return self.emitter.close(timeout)

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class Rollout:
    """One rollout attempt in progress: the scope that captured calls and rewards belong to."""

    def __init__(self, client: Client, rollout_id: str, *, attempt: int, task_id: str | None, group_id: str | None,
                 policy: str, agent_name: str | None, metadata: dict[str, str]) -> None:
        _checked(lambda: api.check_id(rollout_id, "rollout_id"))
        self.client = client
        self.rollout_id = rollout_id
        self.attempt = attempt
        self.task_id = task_id
        self.group_id = group_id
        self.policy = policy
        self.agent_name = agent_name
        self.metadata = metadata
        self.policy_version = client.sdk.policy_version
        self._sequence = itertools.count()
        self._token: contextvars.Token[Rollout | None] | None = None
        self._last_seq = 0

    @property
    def base_url(self) -> str:
        """The gateway URL whose calls are recorded in this rollout (an OpenAI client's ``base_url``)."""
        base = self.client.sdk.gateway_url.rstrip("/") + f"/rollouts/{self.rollout_id}"
        if self.attempt != 1:
            base += f"/attempts/{self.attempt}"
        return base + "/v1"

    @property
    def last_call_id(self) -> str | None:
        return _last_call.get()

    def next_sequence(self) -> int:
        return next(self._sequence)  # atomic under the GIL: safe from several threads and tasks

    @contextmanager
    def agent(self, name: str) -> Iterator[None]:
        """Calls made inside are recorded with ``agent_name=name`` (sub-agents)."""
        token = _agent.set(name)
        try:
            yield
        finally:
            _agent.reset(token)

    def current_agent(self) -> str | None:
        return _agent.get() or self.agent_name

    def reward(self, value: float, call_id: str | None = None, name: str = "primary", terminal: bool = False,
               metadata: dict[str, str] | None = None) -> str:
        """Publish a Reward for this rollout attempt; returns the event id."""
        return self.client.reward(self.rollout_id, value, call_id=call_id, name=name, terminal=terminal,
                                  attempt=self.attempt, metadata=metadata)

    def record(self, topic: str, payload: Payload) -> None:
        """Enqueue a record (or builder) keyed by this rollout; used by the instrumentation."""
        seq = self.client.publish(topic, self.rollout_id, payload)
        self._last_seq = max(self._last_seq, seq)

    def _status(self, status: str, error: str | None = None) -> None:
        c = self.client
        body = {"rollout_id": self.rollout_id, "attempt": self.attempt, "task_id": self.task_id,
                "group_id": self.group_id, "policy": self.policy, "metadata": self.metadata}
        if status == "STARTED":
            record = _checked(lambda: api.start_rollout(body, c.sdk.source, c.sdk.policy))
        else:
            body.pop("rollout_id")
            body.update(status=status, error=error)
            record = _checked(lambda: api.finish_rollout(self.rollout_id, body, c.sdk.source, c.sdk.policy,
                                                         self.attempt))
        self.record(c.topics.rollouts, record)

    def _enter(self) -> Rollout:
        if self._token is not None:
            raise ProducerError(f"rollout {self.rollout_id} is already entered; create a new scope per attempt")
        self._status("STARTED")
        self._token = _current.set(self)
        return self

    def _exit(self, exc: BaseException | None) -> bool:
        if self._token is not None:
            _current.reset(self._token)
            self._token = None
        if exc is None:
            self._status("SUCCEEDED")
        elif isinstance(exc, asyncio.CancelledError | KeyboardInterrupt | GeneratorExit):
            self._status("CANCELLED", f"{type(exc).__name__}: {exc}".rstrip(": "))
        else:
            self._status("FAILED", f"{type(exc).__name__}: {exc}".rstrip(": "))
        return self.client.sdk.flush_on_finish

    def _flush(self, raising: BaseException | None) -> None:
        try:
            self.client.emitter.flush(upto=self._last_seq)
        except DeliveryError:
            if raising is None:
                raise
            log.exception("rollout %s: events not published while the rollout failed", self.rollout_id)

    def __enter__(self) -> Rollout:
        return self._enter()

    def __exit__(self, et: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        if self._exit(exc):
            self._flush(exc)

    async def __aenter__(self) -> Rollout:
        return self._enter()

    async def __aexit__(self, et: type[BaseException] | None, exc: BaseException | None,
                        tb: TracebackType | None) -> None:
        if self._exit(exc):
            # Wait for Kafka off the event loop; the context (and so no rollout) is irrelevant there.
            await asyncio.to_thread(self._flush, exc)


def _redacting(redactor: Redactor, payload: Payload) -> Payload:
    """``payload`` as a builder whose records are redacted on the background thread (a failing hook: the
    job fails like an unencodable event, reported by ``flush``, and nothing of it is published)."""

    def build() -> list[dict[str, Any]]:
        records = payload() if callable(payload) else [payload]
        return [redactor.record(r) for r in records]

    return build


def with_rollout(rollout: Rollout, fn: Callable[P, R], *args: P.args, **kwargs: P.kwargs) -> R:
    """Run ``fn`` with ``rollout`` as the current rollout (e.g. in a worker thread from a pool)."""
    token = _current.set(rollout)
    try:
        return fn(*args, **kwargs)
    finally:
        _current.reset(token)


def set_last_call(call_id: str) -> None:
    _last_call.set(call_id)


__all__ = ["Client", "Rollout", "SdkSettings", "bind", "current_rollout", "last_call_id", "with_rollout"]
