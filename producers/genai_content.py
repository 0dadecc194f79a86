"""Prompt and completion content of GenAI spans, in the shapes the OpenTelemetry conventions have used.

Read, in this order of preference:

- ``gen_ai.input.messages`` / ``gen_ai.output.messages`` (JSON arrays of ``{"role", "parts": [...]}``,
  parts of type ``text``, ``tool_call``, ``tool_call_response``; output messages carry
  ``finish_reason``), with ``gen_ai.system_instructions`` as a leading system message;
- the flattened ``gen_ai.prompt.{i}.role`` / ``.content`` and ``gen_ai.completion.{i}.content`` /
  ``.finish_reason`` attributes (OpenLLMetry);
- ``gen_ai.prompt`` / ``gen_ai.completion`` as a span attribute, or as the attribute of the span
  events ``gen_ai.content.prompt`` / ``gen_ai.content.completion``: a JSON array of messages
  (OpenAI shape accepted too) or plain text.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import orjson

if TYPE_CHECKING:
    from rollstream.producers.genai import SpanReader

Choice = tuple[str, str | None, str | None]  # text, tool calls as JSON, finish reason


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
    if content is not None:
        texts.append(content if isinstance(content, str) else "".join(
            str(p.get("text", "")) for p in content if isinstance(p, dict)) if isinstance(content, list)
            else _json(content))
    if isinstance(raw.get("tool_calls"), list):
        tool_calls.extend(raw["tool_calls"])
    name = raw.get("name")
    finish = raw.get("finish_reason")
    return {
        "role": str(raw.get("role") or "user"),
        "content": "".join(texts) if texts or content is not None else None,
        "name": name if isinstance(name, str) else None,
        "tool_call_id": tool_call_id if isinstance(tool_call_id, str) else None,
        "tool_calls_json": _dumps(tool_calls) if tool_calls else None,
    }, None if finish is None else str(finish)


def _flattened(reader: SpanReader, prefix: str) -> list[dict[str, Any]]:
    """``gen_ai.prompt.0.role``, ``gen_ai.prompt.0.content``, ... as convention messages."""
    out: list[Any] = []
    i = 0
    while True:
        keys = {k[len(f"{prefix}.{i}."):]: v for k, v in reader.attrs.items() if k.startswith(f"{prefix}.{i}.")}
        if not keys:
            return out
        out.append(keys)
        i += 1


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
    raw = _listed(reader.json("gen_ai.input.messages"))
    if raw is None:
        raw = _flattened(reader, "gen_ai.prompt") or None
    if raw is None:
        raw, text = _legacy_content(reader, "gen_ai.prompt", "gen_ai.content.prompt")
        if text is not None:
            plain = text
            raw = [text]
    messages = [_message(m)[0] for m in raw or ()]
    system = reader.json("gen_ai.system_instructions")
    if system is not None:
        parts = system if isinstance(system, list) else [{"type": "text", "content": str(system)}]
        messages.insert(0, _message({"role": "system", "parts": parts})[0])
    if plain is None and messages:
        plain = "\n".join(m["content"] or "" for m in messages if m["role"] != "system")
    return messages, plain


def output_choices(reader: SpanReader) -> list[Choice]:
    """One (text, tool calls JSON, finish reason) per generated choice."""
    raw = _listed(reader.json("gen_ai.output.messages"))
    if raw is None:
        raw = _flattened(reader, "gen_ai.completion") or None
    if raw is None:
        raw, text = _legacy_content(reader, "gen_ai.completion", "gen_ai.content.completion")
        if text is not None:
            raw = [{"role": "assistant", "content": text}]
    choices = []
    for m in raw or ():
        message, finish = _message(m)
        choices.append((message["content"] or "", message["tool_calls_json"], finish))
    return choices
