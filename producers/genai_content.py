"""Prompt and completion content of GenAI spans, in the shapes the OpenTelemetry conventions have used.

Read, in this order of preference:

- ``gen_ai.input.messages`` / ``gen_ai.output.messages`` (JSON arrays of ``{"role", "parts": [...]}``,
  parts of type ``text``, ``tool_call``, ``tool_call_response``; output messages carry
  ``finish_reason``), with ``gen_ai.system_instructions`` as a leading system message;
- the flattened ``gen_ai.prompt.{i}.role`` / ``.content`` and ``gen_ai.completion.{i}.content`` /
  ``.finish_reason`` attributes (OpenLLMetry);
- GenAI log events sent to ``/v1/logs`` inside the span: the ``gen_ai.client.inference.operation.details``
  event's ``gen_ai.input.messages`` / ``gen_ai.output.messages``, or one event per message
  (``gen_ai.system.message``, ``gen_ai.user.message``, ``gen_ai.assistant.message``,
  ``gen_ai.tool.message``) and per choice (``gen_ai.choice``), bodies in the OpenAI shape;
- the flattened ``gen_ai.prompt.{i}.role`` / ``.content`` / ``.tool_calls.{j}.name`` ... and
  ``gen_ai.completion.{i}.*`` attributes (OpenLLMetry, AgentOps);
- OpenInference's ``llm.input_messages.{i}.message.*`` and ``llm.output_messages.{i}.message.*``;
- the raw request and response JSON in ``input.value`` / ``output.value`` (OpenInference);
- ``gen_ai.prompt`` / ``gen_ai.completion`` as a span attribute, or as the attribute of the span
  events ``gen_ai.content.prompt`` / ``gen_ai.content.completion``: a JSON array of messages
  (OpenAI shape accepted too) or plain text.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import orjson

if TYPE_CHECKING:
    from rollstream.producers.genai import SpanReader

Choice = tuple[str, str | None, str | None]  # text, tool calls as JSON, finish reason
DETAILS_EVENT = "gen_ai.client.inference.operation.details"
MESSAGE_EVENTS = {"gen_ai.system.message": "system", "gen_ai.user.message": "user",
                  "gen_ai.assistant.message": "assistant", "gen_ai.tool.message": "tool"}
CHOICE_EVENT = "gen_ai.choice"


def unflatten(attrs: dict[str, Any], prefix: str) -> list[Any]:
    """``prefix.0.a.b = 1, prefix.1.a = 2`` as ``[{"a": {"b": 1}}, {"a": 2}]``: numbered levels become lists."""
    root: dict[str, Any] = {}
    start = prefix + "."
    for key, value in attrs.items():
        if not key.startswith(start):
            continue
        node = root
        *path, leaf = key[len(start):].split(".")
        for part in path:
            child = node.get(part)
            if not isinstance(child, dict):
                child = node[part] = {}
            node = child
        node[leaf] = value
    listed = _lists(root)
    return listed if isinstance(listed, list) else []


def _lists(node: Any) -> Any:
    if not isinstance(node, dict):
        return node
    if node and all(k.isdigit() for k in node):
        return [_lists(node[k]) for k in sorted(node, key=int)]
    return {k: _lists(v) for k, v in node.items()}


def _raw(reader: SpanReader, key: str) -> dict[str, Any]:
    value = reader.get(key)
    if isinstance(value, str) and value.lstrip().startswith("{"):
        try:
            value = orjson.loads(value)
        except orjson.JSONDecodeError:
            return {}
    return value if isinstance(value, dict) else {}


def raw_request(reader: SpanReader) -> dict[str, Any]:
    """The request as the instrumentation recorded it (OpenInference ``input.value``); {} when absent."""
    return _raw(reader, "input.value")


def raw_response(reader: SpanReader) -> dict[str, Any]:
    """The response as the instrumentation recorded it (OpenInference ``output.value``); {} when absent."""
    return _raw(reader, "output.value")


def _json(value: Any) -> str:
    return value if isinstance(value, str) else _dumps(value)


def _dumps(value: Any) -> str:
    # Attribute values may hold bytes (OTLP bytesValue), which JSON has no type for: written as hex.
    return orjson.dumps(value, default=lambda v: v.hex() if isinstance(v, bytes) else str(v)).decode()


def _message(raw: Any) -> tuple[dict[str, Any], str | None]:
    """A ChatMessage record from one convention message, and its finish reason (output messages)."""
    if isinstance(raw, str):
        return {"role": "user", "content": raw, "name": None, "tool_call_id": None, "tool_calls_json": None}, None
    if not isinstance(raw, dict):
        raw = {"role": "user", "content": _json(raw)}
    if isinstance(raw.get("message"), dict):  # OpenInference: llm.input_messages.<i>.message.*
        raw = {**raw["message"], **{k: v for k, v in raw.items() if k != "message"}}
    texts: list[str] = []
    tool_calls: list[dict[str, Any]] = []
    tool_call_id = raw.get("tool_call_id")
    for part in raw.get("parts") or ():
        if not isinstance(part, dict):
            continue
        kind = part.get("type")
        if kind == "text":
            texts.append(str(part.get("content", "")))
        elif kind == "tool_call":
            tool_calls.append({"id": part.get("id"), "type": "function", "function": {
                "name": part.get("name"), "arguments": _json(part.get("arguments", {}))}})
        elif kind == "tool_call_response":
            tool_call_id = tool_call_id or part.get("id")
            texts.append(_json(part.get("response", "")))
    content = raw.get("content")
    if content is None and isinstance(raw.get("contents"), list):  # OpenInference message contents
        content = [c.get("message_content", c) for c in raw["contents"] if isinstance(c, dict)]
    if content is not None:
        texts.append(content if isinstance(content, str) else "".join(
            str(p.get("text", "")) for p in content if isinstance(p, dict)) if isinstance(content, list)
            else _json(content))
    if isinstance(raw.get("tool_calls"), list):
        tool_calls.extend(_tool_call(c) for c in raw["tool_calls"])
    name = raw.get("name")
    finish = raw.get("finish_reason")
    return {
        "role": str(raw.get("role") or "user"),
        "content": "".join(texts) if texts or content is not None else None,
        "name": name if isinstance(name, str) else None,
        "tool_call_id": tool_call_id if isinstance(tool_call_id, str) else None,
        "tool_calls_json": _dumps(tool_calls) if tool_calls else None,
    }, None if finish is None else str(finish)


def _tool_call(raw: Any) -> Any:
    """An OpenAI-shape tool call from the shapes instrumentations record (flat, or wrapped in ``tool_call``)."""
    if not isinstance(raw, dict):
        return raw
    if isinstance(raw.get("tool_call"), dict):
        raw = raw["tool_call"]
    if isinstance(raw.get("function"), dict):
        function = raw["function"]
        return {**raw, "type": raw.get("type") or "function",
                "function": {**function, "arguments": _json(function.get("arguments", {}))}}
    return {"id": raw.get("id"), "type": "function",
            "function": {"name": raw.get("name"), "arguments": _json(raw.get("arguments", {}))}}


def _from_logs(reader: SpanReader, key: str) -> list[Any] | None:
    """Messages carried by the span's GenAI log events: input (``key`` input) or output messages."""
    for name, attrs, _ in reader.logs:
        if name == DETAILS_EVENT and attrs.get(key) is not None:
            value = attrs[key]
            if isinstance(value, str):
                try:
                    value = orjson.loads(value)
                except orjson.JSONDecodeError:
                    return None
            return _listed(value)
    out: list[Any] = []
    if key == "gen_ai.input.messages":
        for name, attrs, body in reader.logs:
            role = MESSAGE_EVENTS.get(name)
            if role is None:
                continue
            message = dict(body) if isinstance(body, dict) else {"content": body}
            message.setdefault("role", attrs.get("gen_ai.message.role") or role)
            if role == "tool" and "tool_call_id" not in message and message.get("id"):
                message["tool_call_id"] = message.pop("id")
            out.append(message)
    else:
        choices = [body for name, _, body in reader.logs if name == CHOICE_EVENT and isinstance(body, dict)]
        for body in sorted(choices, key=lambda b: int(b.get("index") or 0)):
            message = dict(body.get("message") or {})
            message.setdefault("role", "assistant")
            if body.get("tool_calls") and not message.get("tool_calls"):  # OpenLLMetry: beside the message
                message["tool_calls"] = body["tool_calls"]
            if body.get("finish_reason") is not None:
                message["finish_reason"] = body["finish_reason"]
            out.append(message)
    return _tool_call_ids(out) or None


def _tool_call_ids(messages: list[Any]) -> list[Any]:
    """Tool results recorded without the id of the call they answer (OpenLLMetry's events) get it from
    the assistant message before them: its tool calls, answered in order."""
    pending: list[str] = []
    for message in messages:
        if message.get("role") == "assistant" and isinstance(message.get("tool_calls"), list):
            pending = [str(c.get("id")) for c in message["tool_calls"] if isinstance(c, dict) and c.get("id")]
        elif message.get("role") == "tool" and pending:
            if message.get("tool_call_id"):
                pending = [p for p in pending if p != message["tool_call_id"]]
            else:
                message["tool_call_id"] = pending.pop(0)
    return messages


def _first(*sources: Callable[[], list[Any] | None]) -> list[Any] | None:
    """The first non-empty list of messages, in the order of preference of the module's docstring."""
    for source in sources:
        found = source()
        if found:
            return found
    return None


def _raw_messages(reader: SpanReader) -> list[Any] | None:
    messages = raw_request(reader).get("messages")
    return messages if isinstance(messages, list) and messages else None


def _raw_choices(reader: SpanReader) -> list[Any] | None:
    choices = raw_response(reader).get("choices")
    if not isinstance(choices, list) or not choices:
        return None
    out = []
    for choice in sorted((c for c in choices if isinstance(c, dict)), key=lambda c: int(c.get("index") or 0)):
        message = dict(choice.get("message") or {"content": choice.get("text", "")})
        message.setdefault("role", "assistant")
        if choice.get("finish_reason") is not None:
            message["finish_reason"] = choice["finish_reason"]
        out.append(message)
    return out


def _listed(value: Any) -> list[Any] | None:
    if value is None:
        return None
    return value if isinstance(value, list) else [value]


def _legacy_content(reader: SpanReader, attr: str, event: str) -> tuple[list[Any] | None, str | None]:
    """The older ``gen_ai.prompt``/``gen_ai.completion`` content, from the attribute or its span event:
    a list of messages (given as such, or as a JSON string), or else the plain text."""
    value = reader.get(attr)
    if value is None:
        value = reader.event_attr(event, attr)
    if not isinstance(value, str):
        return _listed(value), None
    try:
        parsed = orjson.loads(value)
    except orjson.JSONDecodeError:
        parsed = None
    return (parsed, None) if isinstance(parsed, list) else (None, value)


def input_messages(reader: SpanReader) -> tuple[list[dict[str, Any]], str | None]:
    """The request's chat messages, and its prompt text (for text completions)."""
    plain: str | None = None
    raw = _first(
        lambda: _listed(reader.json("gen_ai.input.messages")),
        lambda: _from_logs(reader, "gen_ai.input.messages"),
        lambda: unflatten(reader.attrs, "gen_ai.prompt"),
        lambda: unflatten(reader.attrs, "llm.input_messages"),
        lambda: _raw_messages(reader),
    )
    if raw is None:
        raw, text = _legacy_content(reader, "gen_ai.prompt", "gen_ai.content.prompt")
        if text is not None:
            plain = text
            raw = [text]
    messages = [_message(m)[0] for m in raw or ()]
    system = reader.json("gen_ai.system_instructions")
    if system is None:
        system = next((a["gen_ai.system_instructions"] for n, a, _ in reader.logs
                       if n == DETAILS_EVENT and a.get("gen_ai.system_instructions") is not None), None)
        if isinstance(system, str) and system.startswith("["):
            system = orjson.loads(system)
    if system is not None:
        parts = system if isinstance(system, list) else [{"type": "text", "content": str(system)}]
        messages.insert(0, _message({"role": "system", "parts": parts})[0])
    if plain is None and messages:
        plain = "\n".join(m["content"] or "" for m in messages if m["role"] != "system")
    return messages, plain


def output_choices(reader: SpanReader) -> list[Choice]:
    """One (text, tool calls JSON, finish reason) per generated choice."""
    raw = _first(
        lambda: _listed(reader.json("gen_ai.output.messages")),
        lambda: _from_logs(reader, "gen_ai.output.messages"),
        lambda: unflatten(reader.attrs, "gen_ai.completion"),
        lambda: unflatten(reader.attrs, "llm.output_messages"),
        lambda: _raw_choices(reader),
    )
    if raw is None:
        raw, text = _legacy_content(reader, "gen_ai.completion", "gen_ai.content.completion")
        if text is not None:
            raw = [{"role": "assistant", "content": text}]
    choices = []
    for m in raw or ():
        message, finish = _message(m)
        choices.append((message["content"] or "", message["tool_calls_json"], finish))
    return choices
