"""What the gateway needs of a protocol it translates to chat completions (the Responses API, Anthropic Messages).

A dialect call is built from the client's request body (refusing what it cannot honour with a 400 that
names the field) and holds the chat completions request the backend gets. It turns the backend's
chat answer, whole or chunk by chunk, into the client's protocol; the gateway records the chat form.
"""

from __future__ import annotations

import itertools
import json
import uuid
from typing import Any, Protocol

import orjson

from rollstream.producers.capture import Endpoint


class DialectCall(Protocol):
    """One call in a translated protocol."""

    endpoint: Endpoint
    chat: dict[str, Any]  # the chat completions request for the backend ("model" is the client's name)
    stream: bool
    id: str  # the id of the client's answer (resp_..., msg_...): what its OpenTelemetry spans call the response id

    def answer(self, response: dict[str, Any]) -> dict[str, Any]:
        """The client's answer to a whole chat completion."""
        ...

    def stream_start(self) -> bytes:
        """SSE events sent before the backend's first chunk."""
        ...

    def stream_chunk(self, chunk: dict[str, Any]) -> bytes:
        """SSE events for one chat completion chunk (often none)."""
        ...

    def stream_end(self) -> bytes:
        """The closing SSE events, once the backend's stream is complete."""
        ...

    def stream_failed(self, message: str) -> bytes:
        """The SSE events that tell the client the stream broke."""
        ...


def obj(value: Any) -> dict[str, Any]:
    """``value`` if it is a JSON object, else an empty one."""
    return value if isinstance(value, dict) else {}


def count(value: Any, default: int = 0) -> int:
    """A token count from a backend's usage: a non-negative integer, else ``default``."""
    return value if isinstance(value, int) and not isinstance(value, bool) and value >= 0 else default


def sse(event: str, data: dict[str, Any]) -> bytes:
    """One server-sent event with its ``event:`` line (both protocols' clients dispatch on it)."""
    return b"event: " + event.encode() + b"\ndata: " + orjson.dumps(data) + b"\n\n"


# Response, message and item ids: unique per gateway process (a random base, then a counter), without
# a uuid4 per id; each uuid4 reads the kernel's random source, which under load costs more than the rest
# of an id's work.
_ID_BASE = uuid.uuid4().hex[:16]
_ID_COUNTER = itertools.count()


def new_id(prefix: str) -> str:
    return f"{prefix}{_ID_BASE}{next(_ID_COUNTER):016x}"


def first_choice(body: dict[str, Any]) -> dict[str, Any]:
    """Choice 0 of a chat completion (or chunk), or an empty dict."""
    choices = body.get("choices")
    if isinstance(choices, list):
        for choice in choices:
            if isinstance(choice, dict) and (choice.get("index") or 0) == 0:
                return choice
    return {}


def tool_calls(message: dict[str, Any]) -> list[dict[str, Any]]:
    """A chat message's tool calls as ``{id, name, arguments}``."""
    calls = message.get("tool_calls")
    out = []
    for call in calls if isinstance(calls, list) else ():
        if not isinstance(call, dict):
            continue
        function = obj(call.get("function"))
        arguments = function.get("arguments")
        out.append({"id": str(call.get("id") or new_id("call_")), "name": str(function.get("name") or ""),
                    "arguments": arguments if isinstance(arguments, str) else json.dumps(arguments or {})})
    return out


def text_of(content: Any) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return "".join(str(p.get("text", "")) for p in content if isinstance(p, dict) and p.get("type") == "text")
    return ""


def chat_logprobs(choice: dict[str, Any]) -> list[dict[str, Any]]:
    """The per-token logprob entries of a chat choice (``{token, logprob, bytes, top_logprobs}``)."""
    logprobs = choice.get("logprobs")
    content = logprobs.get("content") if isinstance(logprobs, dict) else None
    return [t for t in content if isinstance(t, dict)] if isinstance(content, list) else []


class StreamedToolCalls:
    """Tool calls assembled from chat chunk deltas, in the order they started."""

    def __init__(self) -> None:
        self.calls: dict[int, dict[str, Any]] = {}

    def add(self, deltas: Any) -> list[tuple[dict[str, Any], bool, str]]:
        """Merge one chunk's ``tool_calls`` deltas; per delta: (the call, whether it is new, its arguments text)."""
        out = []
        for position, delta in enumerate(deltas if isinstance(deltas, list) else ()):
            if not isinstance(delta, dict):
                continue
            index: int = delta["index"] if isinstance(delta.get("index"), int) else position
            function = obj(delta.get("function"))
            new = index not in self.calls
            call = self.calls.setdefault(index, {"id": "", "name": "", "arguments": ""})
            if delta.get("id") and not call["id"]:
                call["id"] = str(delta["id"])
            if function.get("name") and not call["name"]:
                call["name"] = str(function["name"])
            arguments = function.get("arguments")
            text = arguments if isinstance(arguments, str) else json.dumps(arguments) if arguments else ""
            call["arguments"] += text
            if new and not call["id"]:
                call["id"] = new_id("call_")
            out.append((call, new, text))
        return out
