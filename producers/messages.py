"""Anthropic Messages (``POST /v1/messages``) over a chat completions backend, for Claude-style agents.

A request is translated to one chat completion: ``system`` becomes the system message, ``text``
blocks message text, ``tool_use`` blocks an assistant message's tool calls (``input`` as JSON
arguments), ``tool_result`` blocks tool messages, ``tools`` chat function tools, ``tool_choice``
auto/any/tool/none the chat ``tool_choice``, ``stop_sequences`` the ``stop``. The answer is a
Message (``msg_...``) with text and ``tool_use`` blocks and a ``stop_reason``; a stream is the
Messages event sequence (``message_start``, ``content_block_start`` / ``_delta`` / ``_stop``,
``message_delta``, ``message_stop``, with a ``ping``).

What cannot be honoured (images, documents, extended thinking, server tools, MCP servers,
containers) is refused with a 400 in Anthropic's error shape whose message names the field;
``cache_control`` marks are accepted and have no effect.
"""

from __future__ import annotations

import json
from typing import Any

from rollstream.producers.capture import Endpoint
from rollstream.producers.dialect import StreamedToolCalls, count, first_choice, new_id, obj, sse, text_of, tool_calls
from rollstream.producers.http import HttpError

# Accepted and without effect here (routing, billing and prompt-caching hints).
IGNORED = {"metadata", "service_tier", "cache_control", "inference_geo", "speed", "diagnostics", "user_profile_id",
           "workspace_id"}
UNSUPPORTED = {"container": "code execution containers", "mcp_servers": "MCP servers",
               "context_management": "context management"}
KNOWN = {"model", "max_tokens", "messages", "system", "tools", "tool_choice", "stop_sequences", "temperature", "top_p",
         "top_k", "stream", "thinking", "output_config", *IGNORED, *UNSUPPORTED}
STOP_REASONS = {"length": "max_tokens", "tool_calls": "tool_use", "function_call": "tool_use",
                "content_filter": "refusal"}


def _bad(message: str, param: str) -> HttpError:
    return HttpError(400, f"{param}: {message}", param=param)


def _text_blocks(content: Any, where: str) -> str:
    """A string, or a list of text blocks, as text."""
    if isinstance(content, str):
        return content
    if not isinstance(content, list):
        raise _bad("must be a string or a list of text blocks", where)
    texts = []
    for j, block in enumerate(content):
        kind = block.get("type") if isinstance(block, dict) else None
        if kind != "text" or not isinstance(block.get("text"), str):  # type: ignore[union-attr]
            raise _bad(f"{kind or 'this'} content is not supported by this gateway (text only)", f"{where}.{j}")
        texts.append(block["text"])  # type: ignore[index]
    return "".join(texts)


def _turn(role: str, content: Any, where: str) -> list[dict[str, Any]]:
    """The chat messages of one Messages turn: tool results first (they answer the previous turn's calls)."""
    if isinstance(content, str):
        return [{"role": role, "content": content}]
    if not isinstance(content, list):
        raise _bad("must be a string or a list of content blocks", f"{where}.content")
    texts: list[str] = []
    calls: list[dict[str, Any]] = []
    results: list[dict[str, Any]] = []
    for j, block in enumerate(content):
        at = f"{where}.content.{j}"
        kind = block.get("type") if isinstance(block, dict) else None
        if kind == "text" and isinstance(block.get("text"), str):  # type: ignore[union-attr]
            texts.append(block["text"])  # type: ignore[index]
        elif kind == "tool_use" and role == "assistant":
            assert isinstance(block, dict)
            if not isinstance(block.get("id"), str) or not isinstance(block.get("name"), str):
                raise _bad("a tool_use block needs 'id' and 'name'", at)
            calls.append({"id": block["id"], "type": "function",
                          "function": {"name": block["name"], "arguments": json.dumps(block.get("input") or {})}})
        elif kind == "tool_result" and role == "user":
            assert isinstance(block, dict)
            if not isinstance(block.get("tool_use_id"), str):
                raise _bad("a tool_result block needs 'tool_use_id'", at)
            result = _text_blocks(block.get("content") or "", f"{at}.content")
            if block.get("is_error"):
                result = f"Error: {result}" if result else "Error"
            results.append({"role": "tool", "tool_call_id": block["tool_use_id"], "content": result})
        elif kind in ("thinking", "redacted_thinking"):
            raise _bad("extended thinking is not supported by this gateway", at)
        else:
            raise _bad(f"{kind or 'this'} content is not supported by this gateway in a {role} turn (text"
                       f"{', tool_use' if role == 'assistant' else ', tool_result'} only)", at)
    out = results
    if texts or calls or not results:
        message: dict[str, Any] = {"role": role, "content": "".join(texts) if texts or not calls else None}
        if calls:
            message["tool_calls"] = calls
        out.append(message)
    return out


def _tools(tools: Any) -> list[dict[str, Any]]:
    if not isinstance(tools, list):
        raise _bad("must be a list", "tools")
    out = []
    for i, tool in enumerate(tools):
        if not isinstance(tool, dict) or tool.get("type") not in (None, "custom") or not isinstance(
                tool.get("name"), str):
            kind = tool.get("type") if isinstance(tool, dict) else None
            raise _bad(f"tool type {kind!r} is not supported by this gateway (client tools with name, description "
                       "and input_schema only)", f"tools.{i}")
        # name, description, parameters: the order chat clients send, which chat templates render as given
        function = {"name": tool["name"]}
        if tool.get("description") is not None:
            function["description"] = tool["description"]
        function["parameters"] = tool.get("input_schema") or {"type": "object"}
        out.append({"type": "function", "function": function})
    return out


def _tool_choice(choice: Any, chat: dict[str, Any]) -> None:
    kind = choice.get("type") if isinstance(choice, dict) else None
    if kind == "auto":
        chat["tool_choice"] = "auto"
    elif kind == "any":
        chat["tool_choice"] = "required"
    elif kind == "none":
        chat["tool_choice"] = "none"
    elif kind == "tool" and isinstance(choice.get("name"), str):  # type: ignore[union-attr]
        chat["tool_choice"] = {"type": "function", "function": {"name": choice["name"]}}  # type: ignore[index]
    else:
        raise _bad("must be {\"type\": \"auto\" | \"any\" | \"none\"} or {\"type\": \"tool\", \"name\": ...}",
                   "tool_choice")
    if choice.get("disable_parallel_tool_use") and kind != "none":  # type: ignore[union-attr]
        chat["parallel_tool_calls"] = False


def to_chat(body: dict[str, Any]) -> dict[str, Any]:
    """The chat completions request for a Messages request; HttpError 400 naming what cannot be honoured."""
    for name in body:
        if name not in KNOWN:
            raise _bad("extra inputs are not permitted", name)
    for name, what in UNSUPPORTED.items():
        if body.get(name) is not None:
            raise _bad(f"{what} are not supported by this gateway", name)
    if not isinstance(body.get("model"), str) or not body["model"]:
        raise _bad("field required: the model name", "model")
    max_tokens = body.get("max_tokens")
    if isinstance(max_tokens, bool) or not isinstance(max_tokens, int) or max_tokens < 1:
        raise _bad(f"field required: a positive integer, got {max_tokens!r}", "max_tokens")
    thinking = body.get("thinking")
    if thinking is not None and not (isinstance(thinking, dict) and thinking.get("type") == "disabled"):
        raise _bad("extended thinking is not supported by this gateway", "thinking")
    chat: dict[str, Any] = {"model": body["model"], "max_tokens": max_tokens, "messages": []}
    if body.get("system") is not None:
        chat["messages"].append({"role": "system", "content": _text_blocks(body["system"], "system")})
    turns = body.get("messages")
    if not isinstance(turns, list) or not turns:
        raise _bad("field required: a non-empty list of messages", "messages")
    for i, turn in enumerate(turns):
        if not isinstance(turn, dict) or turn.get("role") not in ("user", "assistant"):
            raise _bad("must be an object with role user or assistant", f"messages.{i}")
        chat["messages"] += _turn(turn["role"], turn.get("content"), f"messages.{i}")
    if body.get("tools"):
        chat["tools"] = _tools(body["tools"])
    if body.get("tool_choice") is not None:
        _tool_choice(body["tool_choice"], chat)
    stops = body.get("stop_sequences")
    if stops is not None:
        if not isinstance(stops, list) or not all(isinstance(s, str) for s in stops):
            raise _bad("must be a list of strings", "stop_sequences")
        if stops:
            chat["stop"] = stops
    for name in ("temperature", "top_p", "top_k"):
        if body.get(name) is not None:
            chat[name] = body[name]
    output = body.get("output_config")
    if output is not None:
        if not isinstance(output, dict) or output.get("effort") is not None:
            raise _bad("only 'format' is supported (effort settings are not)", "output_config")
        fmt = output.get("format")
        if fmt is not None:
            if not isinstance(fmt, dict) or fmt.get("type") != "json_schema" or not isinstance(fmt.get("schema"), dict):
                raise _bad("must be {\"type\": \"json_schema\", \"schema\": {...}}", "output_config.format")
            chat["response_format"] = {"type": "json_schema",
                                       "json_schema": {"name": "output", "schema": fmt["schema"]}}
    if body.get("stream"):
        chat["stream"] = True
    return chat


def _input(arguments: str) -> dict[str, Any]:
    """A tool call's JSON arguments as a tool_use ``input`` object ({} when they are not a JSON object)."""
    try:
        value = json.loads(arguments) if arguments.strip() else {}
    except ValueError:
        return {}
    return value if isinstance(value, dict) else {}


class MessagesCall:
    """One ``POST /v1/messages``: its chat request, and the Message (whole or as stream events) from the answer."""

    endpoint: Endpoint = "MESSAGES"

    def __init__(self, body: dict[str, Any]) -> None:
        self.body = body
        self.chat = to_chat(body)
        self.stream = bool(body.get("stream"))
        self.id = new_id("msg_")
        # streaming state
        self.started = False
        self.blocks = 0  # content blocks started
        self.open: str | None = None  # "text" or "tool_use": the block still open
        self.calls = StreamedToolCalls()
        self.call_blocks: dict[int, int] = {}  # id(call) -> its block's index
        self.input_tokens = 0
        self.output_tokens = 0
        self.finish: tuple[Any, Any] = (None, None)  # finish_reason, stop_reason of the chat choice
        self.saw_tool_use = False

    def _stop(self, finish_reason: Any, matched: Any, tool_use: bool) -> tuple[str, str | None]:
        """Anthropic's stop_reason and stop_sequence (``matched``: vLLM's stop_reason, the stop string hit)."""
        stops = self.chat.get("stop") or []
        if finish_reason == "stop" and isinstance(matched, str) and matched in stops:
            return "stop_sequence", matched
        if tool_use and finish_reason in ("stop", "tool_calls", None):
            return "tool_use", None
        return STOP_REASONS.get(finish_reason if isinstance(finish_reason, str) else "", "end_turn"), None

    def _usage(self, chat_usage: Any, prompt_ids: Any = None) -> dict[str, Any]:
        chat_usage = obj(chat_usage)
        input_tokens = count(chat_usage.get("prompt_tokens"), len(prompt_ids) if isinstance(prompt_ids, list) else 0)
        return {"input_tokens": input_tokens, "output_tokens": count(chat_usage.get("completion_tokens")),
                "cache_creation_input_tokens": 0, "cache_read_input_tokens": 0}

    def message(self, content: list[dict[str, Any]], stop: tuple[str | None, str | None],
                usage: dict[str, Any]) -> dict[str, Any]:
        return {"id": self.id, "type": "message", "role": "assistant", "model": self.body["model"],
                "content": content, "stop_reason": stop[0], "stop_sequence": stop[1], "usage": usage}

    def answer(self, response: dict[str, Any]) -> dict[str, Any]:
        choice = first_choice(response)
        message = obj(choice.get("message"))
        text = text_of(message.get("content"))
        calls = tool_calls(message)
        content: list[dict[str, Any]] = [{"type": "text", "text": text}] if text else []
        content += [{"type": "tool_use", "id": c["id"], "name": c["name"], "input": _input(c["arguments"])}
                    for c in calls]
        stop = self._stop(choice.get("finish_reason"), choice.get("stop_reason"), bool(calls))
        return self.message(content, stop, self._usage(response.get("usage"), response.get("prompt_token_ids")))

    # --- a stream -----------------------------------------------------------------------

    def stream_start(self) -> bytes:
        return b""  # message_start waits for the first chunk, which carries the prompt's size

    def _start(self) -> bytes:
        if self.started:
            return b""
        self.started = True
        start = self.message([], (None, None), {**self._usage(None), "input_tokens": self.input_tokens})
        return sse("message_start", {"type": "message_start", "message": start}) + sse("ping", {"type": "ping"})

    def _close(self) -> bytes:
        if self.open is None:
            return b""
        self.open = None
        return sse("content_block_stop", {"type": "content_block_stop", "index": self.blocks - 1})

    def _open(self, block: dict[str, Any]) -> bytes:
        out = self._close()
        self.open = block["type"]
        self.blocks += 1
        return out + sse("content_block_start", {"type": "content_block_start", "index": self.blocks - 1,
                                                 "content_block": block})

    def stream_chunk(self, chunk: dict[str, Any]) -> bytes:
        if isinstance(chunk.get("prompt_token_ids"), list) and not self.input_tokens:
            self.input_tokens = len(chunk["prompt_token_ids"])
        usage = chunk.get("usage")
        if isinstance(usage, dict):
            self.input_tokens = count(usage.get("prompt_tokens"), self.input_tokens)
            self.output_tokens = count(usage.get("completion_tokens"))
        choice = first_choice(chunk)
        if not choice:
            return b""
        out = [self._start()]
        delta = obj(choice.get("delta"))
        content = delta.get("content")
        if isinstance(content, str) and content:
            if self.open != "text":
                out.append(self._open({"type": "text", "text": ""}))
            out.append(sse("content_block_delta", {"type": "content_block_delta", "index": self.blocks - 1,
                                                   "delta": {"type": "text_delta", "text": content}}))
        for call, new, arguments in self.calls.add(delta.get("tool_calls")):
            if new:
                self.saw_tool_use = True
                out.append(self._open({"type": "tool_use", "id": call["id"], "name": call["name"], "input": {}}))
                self.call_blocks[id(call)] = self.blocks - 1
            if arguments:
                out.append(sse("content_block_delta", {"type": "content_block_delta",
                                                       "index": self.call_blocks[id(call)],
                                                       "delta": {"type": "input_json_delta",
                                                                 "partial_json": arguments}}))
        if choice.get("finish_reason") is not None:
            self.finish = (choice["finish_reason"], choice.get("stop_reason"))
        return b"".join(out)

    def stream_end(self) -> bytes:
        stop = self._stop(*self.finish, self.saw_tool_use)
        usage = {"input_tokens": self.input_tokens, "output_tokens": self.output_tokens}
        return (self._start() + self._close()
                + sse("message_delta", {"type": "message_delta",
                                        "delta": {"stop_reason": stop[0], "stop_sequence": stop[1]}, "usage": usage})
                + sse("message_stop", {"type": "message_stop"}))

    def stream_failed(self, message: str) -> bytes:
        return sse("error", {"type": "error", "error": {"type": "api_error", "message": message}})
