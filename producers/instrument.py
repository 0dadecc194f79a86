"""In-process capture of OpenAI-client calls: ``instrument(client)`` turns calls inside a rollout into LlmCalls.

Works on ``openai.OpenAI`` and ``openai.AsyncOpenAI`` (``chat.completions.create`` and
``completions.create``, whole or streamed). A call made while a rollout is current (see
``rollstream.producers.sdk``) is recorded on the calls topic, keyed by the rollout id, with
the rollout's next sequence number and the agent name of the context (``r.agent(name)``).

What training needs is asked of the engine as the gateway does (``rollstream.producers.capture``):
``extra_body={"return_token_ids": True}`` (vLLM and ``rollstream serve``: top-level
``prompt_token_ids``, per-choice ``token_ids``), ``logprobs`` and, when streaming,
``stream_options.include_usage``. What the caller did not ask for is stripped from what it
gets back. When the engine returns no token ids the event holds null: nothing is re-tokenized.
``ROLLSTREAM_SDK_TOKEN_IDS=0`` (or ``instrument(client, token_ids=False)``) asks for nothing,
for engines that refuse unknown parameters.

The agent's thread only takes a snapshot of the response (references, no copies of large
parts, and the captured extras removed from the object it returns) and enqueues a job; the
background thread converts it into records and encodes them. Calls outside a rollout, and
``with_raw_response`` / ``with_streaming_response`` / ``with_options`` clients, are not recorded.

With redaction on (``rollstream.producers.redact``), a call in a rollout is sent with its messages,
prompt and tools redacted (the caller's own objects are not changed): the model never sees the raw
text and the engine's prompt token ids are those of the redacted text.
"""

from __future__ import annotations

import functools
import logging
import time
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from typing import Any, TypeVar

from rollstream.producers.capture import CallAssembler, CallContext, ClientWants, Endpoint, prepare_request
from rollstream.producers.sdk import Rollout, current_rollout, set_last_call

log = logging.getLogger(__name__)

T = TypeVar("T")
MARK = "__rollstream_instrumented__"
NOT_SENT = ("extra_headers", "extra_query", "extra_body", "timeout")


def instrument(client: T, *, token_ids: bool | None = None) -> T:
    """Record the calls ``client`` makes inside a rollout; returns the same client (idempotent)."""
    for resource, endpoint in ((client.chat.completions, "CHAT_COMPLETIONS"),  # type: ignore[attr-defined]
                               (client.completions, "COMPLETIONS")):  # type: ignore[attr-defined]
        original = resource.create
        if getattr(original, MARK, False):
            continue
        is_async = type(client).__name__.startswith("Async") or _is_coroutine(original)
        wrapper = _async_create(original, endpoint, token_ids) if is_async else _sync_create(original, endpoint,
                                                                                                token_ids)
        setattr(wrapper, MARK, True)
        resource.create = wrapper
    return client


def _is_coroutine(fn: Any) -> bool:
    import inspect

    return inspect.iscoroutinefunction(fn)


# --- the request ---------------------------------------------------------------------------


class _Capture:
    """One call in a rollout: the request as the caller sent it, and the response snapshots."""

    def __init__(self, rollout: Rollout, endpoint: Endpoint, kwargs: dict[str, Any], token_ids: bool | None) -> None:
        self.rollout = rollout
        kwargs = rollout.client.redactor.request(kwargs)  # a new dict when anything was redacted
        extra_body = kwargs.get("extra_body") or {}
        request = {k: v for k, v in kwargs.items() if k not in NOT_SENT}
        request.update(extra_body)
        if isinstance(request.get("messages"), list):
            request["messages"] = list(request["messages"])  # agents append to their list after the call
        probe = dict(request)
        wants = prepare_request(endpoint, probe)
        self.kwargs = dict(kwargs)
        if rollout.client.sdk.token_ids if token_ids is None else token_ids:
            if not wants.token_ids:
                self.kwargs["extra_body"] = {**extra_body, "return_token_ids": True}
            if not wants.logprobs:
                self.kwargs["logprobs"] = probe["logprobs"]
        else:
            wants = ClientWants(token_ids=True, logprobs=True, stream_usage=wants.stream_usage)
        if not wants.stream_usage:
            self.kwargs["stream_options"] = probe["stream_options"]
        self.wants = wants
        self.call_id = uuid.uuid4().hex
        self.ctx = CallContext(
            rollout_id=rollout.rollout_id, attempt=rollout.attempt, agent_name=rollout.current_agent(),
            sequence=rollout.next_sequence(), endpoint=endpoint, request=request, policy=rollout.policy,
            policy_version=rollout.policy_version, request_id=self.call_id,
        )
        self.snapshots: list[dict[str, Any]] = []
        self.streamed = bool(request.get("stream"))
        self.done = False

    def response(self, resp: Any) -> None:
        """A whole response: snapshot, strip, record."""
        if not hasattr(resp, "choices"):
            log.warning("rollout %s: unexpected response type %s; call not recorded",
                        self.rollout.rollout_id, type(resp).__name__)
            return
        self.snapshots.append(_snapshot(resp, self.wants, self.ctx.endpoint, chunk=False))
        self.finish()

    def chunk(self, chunk: Any) -> bool:
        """One streamed chunk: snapshot and strip; False when the caller should not see it at all."""
        usage_only = not self.wants.stream_usage and not chunk.choices and getattr(chunk, "usage", None) is not None
        self.snapshots.append(_snapshot(chunk, self.wants, self.ctx.endpoint, chunk=True))
        return not usage_only

    def finish(self) -> None:
        if self.done:
            return
        self.done = True
        end_micros = time.time_ns() // 1000
        latency_ms = (time.perf_counter() - self.ctx.started) * 1000.0
        ctx, snapshots, streamed, call_id = self.ctx, self.snapshots, self.streamed, self.call_id
        source = self.rollout.client.sdk.source

        def build() -> list[dict[str, Any]]:
            assembler = CallAssembler(ctx)
            for snap in snapshots:
                plain = _plain(snap)
                if streamed:
                    assembler.add_chunk(plain)
                else:
                    assembler.add_response(plain)
            events = assembler.events()
            for event in events:
                index = event["metadata"]["choice_index"]
                event.update(source=source, end_time=end_micros, latency_ms=latency_ms,
                             call_id=call_id if len(events) == 1 else f"{call_id}-{index}")
            return events

        set_last_call(call_id)
        self.rollout.record(self.rollout.client.topics.calls, build)


def _extras(obj: Any) -> dict[str, Any]:
    extra = getattr(obj, "__pydantic_extra__", None)
    return extra if isinstance(extra, dict) else {}


def _take(extra: dict[str, Any], name: str, keep: bool) -> Any:
    return extra.get(name) if keep else extra.pop(name, None)


def _snapshot(body: Any, wants: ClientWants, endpoint: Endpoint, chunk: bool) -> dict[str, Any]:
    """What the assembler needs, by reference; strips from ``body`` what the caller did not ask for."""
    extra = _extras(body)
    snap: dict[str, Any] = {
        "model": getattr(body, "model", None),
        "usage": getattr(body, "usage", None),
        "policy_version": extra.get("policy_version"),
        "prompt_token_ids": _take(extra, "prompt_token_ids", wants.token_ids),
    }
    choices = []
    for choice in body.choices or ():
        cextra = _extras(choice)
        logprobs = choice.logprobs
        if not wants.logprobs and logprobs is not None:
            choice.logprobs = None
        item: dict[str, Any] = {
            "index": choice.index,
            "finish_reason": choice.finish_reason,
            "token_ids": _take(cextra, "token_ids", wants.token_ids),
            "prompt_token_ids": _take(cextra, "prompt_token_ids", wants.token_ids),
            "logprobs": logprobs,
        }
        if endpoint == "COMPLETIONS":
            item["text"] = choice.text
        else:
            part = choice.delta if chunk else choice.message
            key = "delta" if chunk else "message"
            item[key] = {"content": getattr(part, "content", None), "tool_calls": getattr(part, "tool_calls", None)}
        choices.append(item)
    snap["choices"] = choices
    if not wants.stream_usage and chunk:
        body.usage = None
    return snap


def _logprobs(value: Any) -> Any:
    """Only what the assembler reads of a logprobs object (dumping every token's model is slow)."""
    content = getattr(value, "content", None)
    if isinstance(content, list):
        return {"content": [{"logprob": t.logprob} for t in content]}
    values = getattr(value, "token_logprobs", None)
    if isinstance(values, list):
        return {"token_logprobs": values}
    return _plain(value)


def _plain(value: Any) -> Any:
    """Pydantic models (and containers of them) as plain dicts and lists; on the background thread."""
    if isinstance(value, dict):
        return {k: _logprobs(v) if k == "logprobs" and v is not None else _plain(v) for k, v in value.items()}
    if hasattr(value, "model_dump"):
        return value.model_dump(mode="python", exclude_none=False)
    if isinstance(value, list | tuple):
        if not value or isinstance(value[0], int | float | str):
            return value  # token ids and the like: nothing to convert
        return [_plain(v) for v in value]
    return value


# --- the wrappers --------------------------------------------------------------------------


def _sync_create(original: Callable[..., Any], endpoint: Endpoint, token_ids: bool | None) -> Callable[..., Any]:
    @functools.wraps(original)
    def create(*args: Any, **kwargs: Any) -> Any:
        rollout = current_rollout()
        if rollout is None:
            return original(*args, **kwargs)
        capture = _Capture(rollout, endpoint, kwargs, token_ids)
        result = original(*args, **capture.kwargs)
        if capture.streamed:
            return InstrumentedStream(result, capture)
        capture.response(result)
        return result

    return create


def _async_create(original: Callable[..., Any], endpoint: Endpoint, token_ids: bool | None) -> Callable[..., Any]:
    @functools.wraps(original)
    async def create(*args: Any, **kwargs: Any) -> Any:
        rollout = current_rollout()
        if rollout is None:
            return await original(*args, **kwargs)
        capture = _Capture(rollout, endpoint, kwargs, token_ids)
        result = await original(*args, **capture.kwargs)
        if capture.streamed:
            return InstrumentedAsyncStream(result, capture)
        capture.response(result)
        return result

    return create


class InstrumentedStream:
    """A ``Stream`` of chunks that records the call when it ends (completed choices only)."""

    def __init__(self, inner: Any, capture: _Capture) -> None:
        self._inner = inner
        self._capture = capture

    def __iter__(self) -> Iterator[Any]:
        return self

    def __next__(self) -> Any:
        while True:
            try:
                chunk = next(self._inner)
            except StopIteration:
                self._capture.finish()
                raise
            if self._capture.chunk(chunk):
                return chunk

    def __enter__(self) -> InstrumentedStream:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self._inner.close()
        self._capture.finish()

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)


class InstrumentedAsyncStream:
    """An ``AsyncStream`` of chunks that records the call when it ends (completed choices only)."""

    def __init__(self, inner: Any, capture: _Capture) -> None:
        self._inner = inner
        self._capture = capture

    def __aiter__(self) -> AsyncIterator[Any]:
        return self

    async def __anext__(self) -> Any:
        while True:
            try:
                chunk = await self._inner.__anext__()
            except StopAsyncIteration:
                self._capture.finish()
                raise
            if self._capture.chunk(chunk):
                return chunk

    async def __aenter__(self) -> InstrumentedAsyncStream:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def close(self) -> None:
        await self._inner.close()
        self._capture.finish()

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)
