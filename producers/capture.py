"""Turning OpenAI-compatible requests and responses (whole or streamed) into LlmCall records.

The gateway asks the backend for what training needs (vLLM convention: ``return_token_ids``
for ``prompt_token_ids`` and ``choices[i].token_ids``; chat ``logprobs: true``, completions
``logprobs: 1``), records it, and strips from what the client receives everything the
client did not ask for. Token ids are taken from the engine only, never re-tokenized; when
the backend returns none, the record holds null.
"""

from __future__ import annotations

import time
import uuid
from dataclasses import dataclass, field
from typing import Any, Literal

import orjson

from rollstream.schemas import make_event

Endpoint = Literal["CHAT_COMPLETIONS", "COMPLETIONS", "RESPONSES", "MESSAGES"]
SOURCE = "gateway"


def chat_form(endpoint: Endpoint) -> bool:
    """Whether the backend saw the call as a chat completion (the Responses and Messages routes are translated)."""
    return endpoint != "COMPLETIONS"


@dataclass(frozen=True)
class ClientWants:
    """What the client itself asked for; everything else the gateway added is stripped."""

    token_ids: bool
    logprobs: bool
    stream_usage: bool

    @property
    def strips(self) -> bool:
        return not (self.token_ids and self.logprobs and self.stream_usage)


def prepare_request(endpoint: Endpoint, body: dict[str, Any]) -> ClientWants:
    """Ask the backend for token ids, logprobs (and streamed usage) in place; say what the client wanted."""
    stream = bool(body.get("stream"))
    options = body.get("stream_options")
    wants = ClientWants(
        token_ids=body.get("return_token_ids") is True,
        logprobs=bool(body.get("logprobs")) if chat_form(endpoint) else body.get("logprobs") is not None,
        stream_usage=not stream or (isinstance(options, dict) and bool(options.get("include_usage"))),
    )
    body["return_token_ids"] = True
    if not wants.logprobs:
        body["logprobs"] = True if chat_form(endpoint) else 1
    if not wants.stream_usage:
        body["stream_options"] = {**(options if isinstance(options, dict) else {}), "include_usage": True}
    return wants


def strip_response(body: dict[str, Any], wants: ClientWants) -> None:
    """Remove from a whole response (or one streamed chunk) what the client did not ask for."""
    if not wants.token_ids:
        body.pop("prompt_token_ids", None)
    for choice in _choices(body):
        if not wants.token_ids:
            choice.pop("token_ids", None)
            choice.pop("prompt_token_ids", None)
        if not wants.logprobs and "logprobs" in choice:
            choice["logprobs"] = None


def strip_chunk(chunk: dict[str, Any], wants: ClientWants) -> bool:
    """Strip one streamed chunk; False to drop it: the usage-only chunk the gateway asked for.

    Usage that a backend sends on its own (e.g. on the chunk with the finish reason) stays.
    """
    if not wants.stream_usage and not chunk.get("choices") and chunk.get("usage") is not None:
        return False
    strip_response(chunk, wants)
    return True


# --- the request side ---------------------------------------------------------------


# Backends and clients send anything; what does not fit the LlmCall schema is recorded as null.
INT32 = (-(2**31), 2**31 - 1)
INT64 = (-(2**63), 2**63 - 1)


def _float(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    try:
        return float(value)
    except OverflowError:  # an integer beyond any double
        return None


def _int(value: Any, bounds: tuple[int, int] = INT32) -> int | None:
    if isinstance(value, bool) or not isinstance(value, int):
        return None
    return value if bounds[0] <= value <= bounds[1] else None


def _ints(value: Any) -> list[int] | None:
    """A list of 32-bit integers (token ids), or None when ``value`` is anything else."""
    if not isinstance(value, list) or not all(_int(v) is not None for v in value):
        return None
    return list(value)


def _choices(body: dict[str, Any]) -> list[dict[str, Any]]:
    choices = body.get("choices")
    return [c for c in choices if isinstance(c, dict)] if isinstance(choices, list) else []


def _text(content: Any) -> str | None:
    """Message content as text: content parts of type text are joined, other parts skipped."""
    if content is None or isinstance(content, str):
        return content
    if isinstance(content, list):
        return "".join(str(p.get("text", "")) for p in content if isinstance(p, dict) and p.get("type") == "text")
    return str(content)


def _str(value: Any) -> str:
    return value if isinstance(value, str) else _json(value) or ""


def _json(value: Any) -> str | None:
    if value is None:
        return None
    try:
        return orjson.dumps(value).decode()
    except TypeError:  # integers beyond 64 bits, nesting deeper than orjson allows
        return str(value)


def _messages(messages: Any) -> list[dict[str, Any]]:
    out = []
    for m in messages if isinstance(messages, list) else ():
        if not isinstance(m, dict):
            continue
        name, tool_call_id = m.get("name"), m.get("tool_call_id")
        out.append(
            {
                "role": str(m.get("role", "")),
                "content": _text(m.get("content")),
                "name": name if isinstance(name, str) else None,
                "tool_call_id": tool_call_id if isinstance(tool_call_id, str) else None,
                "tool_calls_json": _json(m.get("tool_calls")),
            }
        )
    return out


def request_fields(endpoint: Endpoint, body: dict[str, Any]) -> dict[str, Any]:
    """The LlmCall fields that come from the request (messages or prompt, tools, sampling)."""
    stop = body.get("stop")
    max_tokens = body.get("max_completion_tokens", body.get("max_tokens"))
    n = _int(body.get("n"))
    seed = _int(body.get("seed"), INT64)
    model = body.get("model")
    return {
        "model": model if isinstance(model, str) else None,
        "endpoint": endpoint,
        "messages": _messages(body.get("messages")) if chat_form(endpoint) else [],
        "tools_json": _json(body.get("tools")),
        "sampling": {
            "temperature": _float(body.get("temperature")),
            "top_p": _float(body.get("top_p")),
            "max_tokens": _int(max_tokens),
            "stop": [stop] if isinstance(stop, str) else [_str(s) for s in stop] if isinstance(stop, list) else [],
            "seed": seed,
            "n": n if n is not None and n > 0 else 1,
        },
    }


def _prompt_text(prompt: Any, index: int, n: int) -> str | None:
    """The prompt of choice ``index``: a list of prompts yields n choices per prompt, in order."""
    if isinstance(prompt, str):
        return prompt
    if isinstance(prompt, list) and prompt and all(isinstance(p, str) for p in prompt):
        return str(prompt[min(index // max(n, 1), len(prompt) - 1)])
    return None  # token-id prompts: the ids are recorded, there is no text


# --- the response side ----------------------------------------------------------------


@dataclass
class CallContext:
    """One proxied request, from its arrival to its last byte; ``rollout_id`` is "" for a call of no rollout."""

    rollout_id: str
    attempt: int
    agent_name: str | None
    sequence: int
    endpoint: Endpoint
    request: dict[str, Any]  # the client's request body as received
    policy: str
    policy_version: int
    start_micros: int = field(default_factory=lambda: time.time_ns() // 1000)
    started: float = field(default_factory=time.perf_counter)
    request_id: str = field(default_factory=lambda: uuid.uuid4().hex)


@dataclass
class ChoiceState:
    """A choice as captured: from a whole response, or assembled from stream deltas."""

    index: int
    text: list[str] = field(default_factory=list)
    tool_calls: dict[int, dict[str, Any]] = field(default_factory=dict)
    token_ids: list[int] | None = None
    logprobs: list[float] | None = None
    prompt_token_ids: list[int] | None = None
    finish_reason: str | None = None
    garbled: bool = False  # a chunk carried token ids or logprobs that are not numbers: record neither


def _logprob_values(endpoint: Endpoint, logprobs: Any) -> list[float] | None:
    if not isinstance(logprobs, dict):
        return None
    values: list[Any]
    if chat_form(endpoint):
        content = logprobs.get("content")
        if not isinstance(content, list):
            return None
        values = [t.get("logprob") for t in content if isinstance(t, dict) and t.get("logprob") is not None]
    else:
        raw = logprobs.get("token_logprobs")
        if not isinstance(raw, list):
            return None
        values = [v for v in raw if v is not None]
    floats = [f for f in (_float(v) for v in values) if f is not None]
    return floats if len(floats) == len(values) else None


def _extend(target: list[Any] | None, more: list[Any] | None) -> list[Any] | None:
    if more is None:
        return target
    if target is None:
        return list(more)
    target.extend(more)
    return target


def _merge_tool_calls(state: ChoiceState, deltas: Any) -> None:
    for position, delta in enumerate(deltas if isinstance(deltas, list) else ()):
        if not isinstance(delta, dict):
            continue
        index = _int(delta.get("index"))
        slot = state.tool_calls.setdefault(position if index is None else index, {"function": {"arguments": ""}})
        for key in ("id", "type"):
            if delta.get(key):
                slot[key] = delta[key]
        function = delta.get("function")
        if not isinstance(function, dict):
            continue
        if function.get("name"):
            slot["function"]["name"] = function["name"]
        if function.get("arguments"):
            slot["function"]["arguments"] += _str(function["arguments"])


class CallAssembler:
    """Collects a response (whole, or chunk by chunk) and builds one LlmCall per completed choice."""

    def __init__(self, ctx: CallContext) -> None:
        self.ctx = ctx
        self.choices: dict[int, ChoiceState] = {}
        self.prompt_token_ids: list[int] | None = None
        self.usage: dict[str, Any] | None = None
        self.model: str | None = None
        self.policy_version: int | None = None
        # The id of the answer the client got: the backend's ``id``, unless set before (a translated call's own).
        self.response_id: str | None = None

    def _top(self, body: dict[str, Any]) -> None:
        if self.response_id is None and isinstance(body.get("id"), str) and body["id"]:
            self.response_id = body["id"]
        if self.prompt_token_ids is None:
            self.prompt_token_ids = _ints(body.get("prompt_token_ids"))
        if isinstance(body.get("usage"), dict):
            self.usage = body["usage"]
        if self.model is None and isinstance(body.get("model"), str):
            self.model = body["model"]
        version = _int(body.get("policy_version"), INT64)
        if version is not None:
            self.policy_version = version

    def _state(self, choice: dict[str, Any]) -> ChoiceState:
        index = _int(choice.get("index")) or 0
        state = self.choices.get(index)
        if state is None:
            state = self.choices[index] = ChoiceState(index)
        if state.prompt_token_ids is None:
            state.prompt_token_ids = _ints(choice.get("prompt_token_ids"))
        if choice.get("finish_reason") is not None:
            state.finish_reason = _str(choice["finish_reason"])
        return state

    def add_response(self, body: dict[str, Any]) -> None:
        """A whole (non-streamed) response."""
        self._top(body)
        endpoint = self.ctx.endpoint
        for choice in _choices(body):
            state = self._state(choice)
            if chat_form(endpoint):
                message = choice.get("message")
                message = message if isinstance(message, dict) else {}
                state.text.append(_text(message.get("content")) or "")
                _merge_tool_calls(state, message.get("tool_calls"))
            else:
                state.text.append(_str(choice.get("text") or ""))
            state.token_ids = _ints(choice.get("token_ids"))
            state.logprobs = _logprob_values(endpoint, choice.get("logprobs"))

    def add_chunk(self, chunk: dict[str, Any]) -> None:
        """One streamed chunk (``chat.completion.chunk`` or ``text_completion``)."""
        self._top(chunk)
        endpoint = self.ctx.endpoint
        for choice in _choices(chunk):
            state = self._state(choice)
            if chat_form(endpoint):
                delta = choice.get("delta")
                delta = delta if isinstance(delta, dict) else {}
                content = delta.get("content")
                if content:
                    state.text.append(_text(content) or "")
                if delta.get("tool_calls"):
                    _merge_tool_calls(state, delta["tool_calls"])
            elif choice.get("text"):
                state.text.append(_str(choice["text"]))
            ids, logprobs = _ints(choice.get("token_ids")), _logprob_values(endpoint, choice.get("logprobs"))
            state.garbled |= (ids is None and choice.get("token_ids") is not None) or (
                logprobs is None and isinstance(choice.get("logprobs"), dict))
            state.token_ids = _extend(state.token_ids, ids)
            state.logprobs = _extend(state.logprobs, logprobs)

    def events(self, policy_version: int | None = None) -> list[dict[str, Any]]:
        """One LlmCall per choice that finished; ``policy_version`` (a response header) beats the default."""
        ctx = self.ctx
        end_micros = time.time_ns() // 1000
        latency_ms = (time.perf_counter() - ctx.started) * 1000.0
        version = self.policy_version if self.policy_version is not None else policy_version
        fields = request_fields(ctx.endpoint, ctx.request)
        n = fields["sampling"]["n"]
        usage = self.usage or {}
        events = []
        for index in sorted(self.choices):
            state = self.choices[index]
            if state.finish_reason is None:
                continue  # cut off: not a completed choice
            tool_calls = [state.tool_calls[i] for i in sorted(state.tool_calls)] or None
            completion_tokens = (
                _int(usage.get("completion_tokens")) if len(self.choices) == 1
                else len(state.token_ids) if state.token_ids is not None else None
            )
            events.append(
                make_event(
                    "LlmCall",
                    source=SOURCE,
                    rollout_id=ctx.rollout_id,
                    attempt=ctx.attempt,
                    call_id=uuid.uuid4().hex,
                    sequence=ctx.sequence,
                    agent_name=ctx.agent_name,
                    policy=ctx.policy or self.model or fields["model"] or "default",
                    policy_version=version if version is not None else ctx.policy_version,
                    prompt=_prompt_text(ctx.request.get("prompt"), index, n) if ctx.endpoint == "COMPLETIONS" else None,
                    response_text="".join(state.text),
                    response_tool_calls_json=_json(tool_calls),
                    prompt_token_ids=state.prompt_token_ids or self.prompt_token_ids,
                    response_token_ids=None if state.garbled else state.token_ids,
                    response_logprobs=None if state.garbled else state.logprobs,
                    finish_reason=state.finish_reason,
                    prompt_tokens=_int(usage.get("prompt_tokens")),
                    completion_tokens=completion_tokens,
                    start_time=ctx.start_micros,
                    end_time=end_micros,
                    latency_ms=latency_ms,
                    metadata={"request_id": ctx.request_id, "choice_index": str(index),
                              **({"response_id": self.response_id} if self.response_id else {})},
                    **fields,
                )
            )
        return events
