"""Reading tool calls back out of generated text, whole or while it streams.

The "hermes" parser reads the format Hermes, Qwen2.5 and SmolLM2-style chat templates (and
the tiny models') render tool calls in: ``<tool_call>\\n{"name": ..., "arguments": {...}}\\n</tool_call>``
blocks after optional text. A block whose JSON is not such an object stays text, as vLLM's
parser of the same name does. The content is the text outside the parsed calls, where a run
of calls and the whitespace around it (the newlines the template puts there) shrinks to the
whitespace before it, or to nothing at the end; an output without calls is its own content.
A stream releases the same content piece by piece, holding back whatever might still become
the start of a block, and whitespace until it knows whether a call follows.
"""

from __future__ import annotations

import json
import uuid
from dataclasses import dataclass, field
from typing import Literal, TypeAlias

ToolCallParser = Literal["hermes", "none"]
TOOL_CALL_PARSERS: tuple[ToolCallParser, ...] = ("hermes", "none")

OPEN, CLOSE = "<tool_call>", "</tool_call>"


def _call_id() -> str:
    return "call_" + uuid.uuid4().hex[:24]


@dataclass(frozen=True)
class ToolCall:
    """One parsed call: the function's name and its arguments as JSON text."""

    name: str
    arguments: str
    id: str = field(default_factory=_call_id)

    def to_openai(self, index: int | None = None) -> dict[str, object]:
        """The call as a ``message.tool_calls`` item, or (with ``index``) a stream delta's."""
        body: dict[str, object] = {"id": self.id, "type": "function",
                                   "function": {"name": self.name, "arguments": self.arguments}}
        return body if index is None else {"index": index, **body}


Piece: TypeAlias = str | ToolCall  # released content, or a call


def _as_call(block: str) -> ToolCall | None:
    """The call a block's inner text holds, or None when it is not ``{"name": str, "arguments": {...}}``."""
    try:
        obj = json.loads(block)
    except ValueError:
        return None
    if not isinstance(obj, dict) or not isinstance(obj.get("name"), str):
        return None
    arguments = obj.get("arguments", {})
    if not isinstance(arguments, dict):
        return None
    return ToolCall(obj["name"], json.dumps(arguments, ensure_ascii=False))


def _partial_tail(text: str, tag: str) -> int:
    """Length of the longest end of ``text`` that is a proper beginning of ``tag``."""
    for k in range(min(len(tag) - 1, len(text)), 0, -1):
        if text.endswith(tag[:k]):
            return k
    return 0


class HermesStream:
    """Feeds on text as it is generated and releases content and calls as soon as they are final."""

    def __init__(self) -> None:
        self._buf = ""  # text not yet released: a possible tag start, or an open block
        self._in_block = False
        self._ws = ""  # whitespace at the end of the content: released only when more content follows
        self._after_call = False  # whitespace that follows a call is dropped
        self.calls = 0

    def push(self, text: str) -> list[Piece]:
        """Pieces that ``text`` (the next part of the output) makes final."""
        self._buf += text
        out: list[Piece] = []
        while True:
            if self._in_block:
                end = self._buf.find(CLOSE)
                if end < 0:
                    return out
                inner, self._buf = self._buf[:end], self._buf[end + len(CLOSE):]
                self._in_block = False
                self._block(inner, OPEN + inner + CLOSE, out)
            else:
                start = self._buf.find(OPEN)
                if start < 0:
                    keep = _partial_tail(self._buf, OPEN)
                    self._content(self._buf[:len(self._buf) - keep], out)
                    self._buf = self._buf[len(self._buf) - keep:]
                    return out
                self._content(self._buf[:start], out)
                self._buf = self._buf[start + len(OPEN):]
                self._in_block = True

    def finish(self) -> list[Piece]:
        """What is left once the output has ended: an open block's call if its JSON is whole, else text."""
        out: list[Piece] = []
        rest, self._buf = self._buf, ""
        if self._in_block:
            self._in_block = False
            self._block(rest, OPEN + rest, out)
        else:
            self._content(rest, out)
        if self._ws and not self._after_call:
            out.append(self._ws)
        self._ws = ""
        return out

    def _block(self, inner: str, raw: str, out: list[Piece]) -> None:
        call = _as_call(inner)
        if call is None:
            self._content(raw, out)
        else:
            self.calls += 1
            self._after_call = True
            out.append(call)

    def _content(self, text: str, out: list[Piece]) -> None:
        if self._after_call:
            text = text.lstrip()
        if not text:
            return
        text = self._ws + text
        body = text.rstrip()
        self._ws = text[len(body):]
        if body:
            self._after_call = False
            out.append(body)


def split(pieces: list[Piece]) -> tuple[str | None, list[ToolCall]]:
    """(content, calls) of a list of pieces; with calls, an empty content is None."""
    content = "".join(p for p in pieces if isinstance(p, str))
    calls = [p for p in pieces if isinstance(p, ToolCall)]
    return (content or None) if calls else content, calls


def stream_parser(name: ToolCallParser) -> HermesStream | None:
    """A fresh streaming parser of the named format (None for "none": the output stays text)."""
    return HermesStream() if name == "hermes" else None


def parse_calls(name: ToolCallParser, text: str) -> tuple[str | None, list[ToolCall]]:
    """(content, calls) of a whole output in the named format; "none" keeps it all as content."""
    parser = stream_parser(name)
    if parser is None:
        return text, []
    return split(parser.push(text) + parser.finish())
