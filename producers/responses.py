"""The OpenAI Responses API (``POST /v1/responses``) over a chat completions backend.

A request is translated to one chat completion: ``instructions`` becomes the system message,
``input`` items become messages (``function_call`` items an assistant message's tool calls,
``function_call_output`` items tool messages), function tools become chat tools, ``text.format``
the ``response_format``, ``max_output_tokens`` the ``max_tokens``. The answer is a Response object
(``resp_...``) with ``message`` and ``function_call`` output items; a stream is the Responses event
sequence (``response.created`` ... ``response.completed``, each with its ``sequence_number``).

Nothing is stored: ``previous_response_id``, conversations, stored prompts, built-in tools (web
search, file search, computer use, MCP ...) and non-text input are refused with a 400 whose
``param`` names the field, as are reasoning settings the model cannot follow.
"""

from __future__ import annotations

import time
from typing import Any

from rollstream.producers.capture import Endpoint
from rollstream.producers.dialect import (
    StreamedToolCalls,
    chat_logprobs,
    count,
    first_choice,
    new_id,
    obj,
    sse,
    text_of,
    tool_calls,
)
from rollstream.producers.http import HttpError

# Accepted and without effect here: nothing is stored, cached, billed by tier or moderated.
IGNORED = {"store", "metadata", "user", "safety_identifier", "prompt_cache_key", "prompt_cache_retention",
           "prompt_cache_options", "service_tier", "stream_options", "truncation", "include", "access_programs",
           "moderation"}
# Refused unless null: they need state or tools the gateway does not have.
UNSUPPORTED = {"previous_response_id": "responses are not stored, so send the whole conversation in 'input'",
               "conversation": "conversations are not stored, so send the whole conversation in 'input'",
               "prompt": "stored prompt templates are not available; send 'instructions' and 'input'",
               "background": "background responses are not supported", "background_options": "",
               "context_management": "context management is not supported",
               "max_tool_calls": "a limit on built-in tool calls is not supported", "image": ""}
# Passed on to the chat request as they are (sampling extensions many backends accept).
PASSED = ("temperature", "top_p", "seed", "stop", "presence_penalty", "frequency_penalty")
KNOWN = {"model", "input", "instructions", "tools", "tool_choice", "parallel_tool_calls", "text",
         "max_output_tokens", "top_logprobs", "reasoning", "stream", *PASSED, *IGNORED, *UNSUPPORTED}
ROLES = {"user": "user", "system": "system", "developer": "system", "assistant": "assistant"}
TEXT_PARTS = ("input_text", "output_text", "text")
LOGPROBS_INCLUDE = "message.output_text.logprobs"


def _bad(message: str, param: str) -> HttpError:
    return HttpError(400, message, param=param, code="unsupported_parameter")


def _text(content: Any, where: str) -> str:
    """A message's content (a string or text parts) as text; other parts are refused."""
    if isinstance(content, str):
        return content
    if not isinstance(content, list):
        raise _bad(f"'{where}' must be a string or a list of content parts", where)
    texts = []
    for j, part in enumerate(content):
        kind = part.get("type") if isinstance(part, dict) else None
        if kind not in TEXT_PARTS or not isinstance(part.get("text"), str):  # type: ignore[union-attr]
            raise _bad(f"'{where}[{j}]' is {kind or 'not a content part'}: only text parts (input_text, "
                       "output_text) are supported", f"{where}[{j}]")
        texts.append(part["text"])  # type: ignore[index]
    return "".join(texts)


def _messages(body: dict[str, Any]) -> list[dict[str, Any]]:
    messages: list[dict[str, Any]] = []
    instructions = body.get("instructions")
    if instructions is not None:
        if not isinstance(instructions, str):
            raise _bad("'instructions' must be a string", "instructions")
        messages.append({"role": "system", "content": instructions})
    items = body.get("input")
    if isinstance(items, str):
        return [*messages, {"role": "user", "content": items}]
    if not isinstance(items, list) or not items:
        raise _bad("'input' is required: a string, or a non-empty list of input items", "input")
    for i, item in enumerate(items):
        where = f"input[{i}]"
        if not isinstance(item, dict):
            raise _bad(f"'{where}' must be an object", where)
        kind = item.get("type", "message" if "role" in item else None)
        if kind == "message":
            role = ROLES.get(item["role"]) if isinstance(item.get("role"), str) else None
            if role is None:
                raise _bad(f"'{where}.role' must be user, system, developer or assistant", f"{where}.role")
            messages.append({"role": role, "content": _text(item.get("content"), f"{where}.content")})
        elif kind == "function_call":
            if not isinstance(item.get("call_id"), str) or not isinstance(item.get("name"), str):
                raise _bad(f"'{where}' needs 'call_id' and 'name'", where)
            call = {"id": item["call_id"], "type": "function",
                    "function": {"name": item["name"], "arguments": str(item.get("arguments") or "")}}
            last = messages[-1] if messages else None
            if last is not None and last["role"] == "assistant":  # calls after a message: one assistant turn
                last.setdefault("tool_calls", []).append(call)
            else:
                messages.append({"role": "assistant", "content": None, "tool_calls": [call]})
        elif kind == "function_call_output":
            if not isinstance(item.get("call_id"), str):
                raise _bad(f"'{where}.call_id' is required", f"{where}.call_id")
            messages.append({"role": "tool", "tool_call_id": item["call_id"],
                             "content": _text(item.get("output"), f"{where}.output")})
        else:
            raise _bad(f"'{where}' is an item of type {kind!r}: only message, function_call and "
                       "function_call_output items are supported (nothing is stored to refer to)", f"{where}.type")
    return messages


def _tools(tools: Any) -> list[dict[str, Any]]:
    if not isinstance(tools, list):
        raise _bad("'tools' must be a list", "tools")
    out = []
    for i, tool in enumerate(tools):
        kind = tool.get("type") if isinstance(tool, dict) else None
        if kind != "function" or not isinstance(tool.get("name"), str):  # type: ignore[union-attr]
            raise _bad(f"'tools[{i}]' is of type {kind!r}: only function tools are supported (built-in tools such "
                       "as web_search or file_search are not)", f"tools[{i}].type")
        function = {k: tool[k] for k in ("name", "description", "parameters", "strict")  # type: ignore[index]
                    if tool.get(k) is not None}  # type: ignore[union-attr]
        out.append({"type": "function", "function": function})
    return out


def _tool_choice(choice: Any) -> Any:
    if choice in ("auto", "none", "required"):
        return choice
    if isinstance(choice, dict) and choice.get("type") == "function" and isinstance(choice.get("name"), str):
        return {"type": "function", "function": {"name": choice["name"]}}
    raise _bad("'tool_choice' must be auto, none, required or {\"type\": \"function\", \"name\": ...}",
               "tool_choice")


def _response_format(text: Any) -> dict[str, Any] | None:
    if not isinstance(text, dict):
        raise _bad("'text' must be an object", "text")
    fmt = text.get("format")
    if fmt is None or (isinstance(fmt, dict) and fmt.get("type") == "text"):
        return None
    if isinstance(fmt, dict) and fmt.get("type") == "json_object":
        return {"type": "json_object"}
    if isinstance(fmt, dict) and fmt.get("type") == "json_schema" and isinstance(fmt.get("schema"), dict):
        schema = {k: fmt[k] for k in ("name", "schema", "description", "strict") if fmt.get(k) is not None}
        return {"type": "json_schema", "json_schema": {"name": "response", **schema}}
    raise _bad("'text.format' must be of type text, json_object, or json_schema with a 'schema'", "text.format")


def to_chat(body: dict[str, Any]) -> dict[str, Any]:
    """The chat completions request for a Responses API request; HttpError 400 naming what cannot be honoured."""
    for name in body:
        if name not in KNOWN:
            raise _bad(f"unknown parameter '{name}'", name)
    for name, why in UNSUPPORTED.items():
        if body.get(name) not in (None, False):
            raise _bad(f"'{name}' is not supported by this gateway{': ' + why if why else ''}", name)
    reasoning = body.get("reasoning")
    if reasoning is not None and (not isinstance(reasoning, dict) or reasoning.get("effort") not in (None, "none")
                                  or reasoning.get("summary") is not None):
        raise _bad("'reasoning' settings are not supported: the model's reasoning cannot be configured here",
                   "reasoning")
    chat: dict[str, Any] = {"messages": _messages(body)}
    if body.get("model") is not None:
        chat["model"] = body["model"]
    for name in PASSED:
        if body.get(name) is not None:
            chat[name] = body[name]
    if body.get("tools"):
        chat["tools"] = _tools(body["tools"])
    if body.get("tool_choice") is not None:
        chat["tool_choice"] = _tool_choice(body["tool_choice"])
    if body.get("parallel_tool_calls") is not None:
        chat["parallel_tool_calls"] = body["parallel_tool_calls"]
    if body.get("text") is not None and (fmt := _response_format(body["text"])) is not None:
        chat["response_format"] = fmt
    max_tokens = body.get("max_output_tokens")
    if max_tokens is not None:
        if isinstance(max_tokens, bool) or not isinstance(max_tokens, int) or max_tokens < 1:
            raise _bad(f"'max_output_tokens' must be a positive integer, got {max_tokens!r}", "max_output_tokens")
        chat["max_tokens"] = max_tokens
    if body.get("top_logprobs"):
        chat["top_logprobs"] = body["top_logprobs"]
    if body.get("stream"):
        chat["stream"] = True
    return chat


def usage(chat_usage: Any) -> dict[str, Any] | None:
    """Chat usage as Responses usage."""
    if not isinstance(chat_usage, dict):
        return None
    prompt, completion = count(chat_usage.get("prompt_tokens")), count(chat_usage.get("completion_tokens"))
    prompt_details = obj(chat_usage.get("prompt_tokens_details"))
    completion_details = obj(chat_usage.get("completion_tokens_details"))
    return {"input_tokens": prompt, "output_tokens": completion,
            "total_tokens": count(chat_usage.get("total_tokens"), prompt + completion),
            "input_tokens_details": {"cached_tokens": count(prompt_details.get("cached_tokens")),
                                     "cache_write_tokens": 0},
            "output_tokens_details": {"reasoning_tokens": count(completion_details.get("reasoning_tokens"))}}


def _status(finish_reason: Any) -> tuple[str, dict[str, str] | None]:
    if finish_reason == "length":
        return "incomplete", {"reason": "max_output_tokens"}
    if finish_reason == "content_filter":
        return "incomplete", {"reason": "content_filter"}
    return "completed", None


def _message_item(item_id: str, text: str, status: str, logprobs: list[dict[str, Any]] | None) -> dict[str, Any]:
    part: dict[str, Any] = {"type": "output_text", "text": text, "annotations": []}
    if logprobs is not None:
        part["logprobs"] = logprobs
    return {"id": item_id, "type": "message", "role": "assistant", "status": status, "content": [part]}


def _call_item(item_id: str, call: dict[str, Any], status: str) -> dict[str, Any]:
    return {"id": item_id, "type": "function_call", "call_id": call["id"], "name": call["name"],
            "arguments": call["arguments"], "status": status}


class ResponsesCall:
    """One ``POST /v1/responses``: its chat request, and the Response (whole or as stream events) from the answer."""

    endpoint: Endpoint = "RESPONSES"

    def __init__(self, body: dict[str, Any]) -> None:
        self.body = body
        self.chat = to_chat(body)
        self.stream = bool(body.get("stream"))
        include = body.get("include")
        self.logprobs = isinstance(include, list) and LOGPROBS_INCLUDE in include
        self.id = new_id("resp_")
        self.created_at = int(time.time())
        # streaming state
        self.sequence = 0
        self.output: list[dict[str, Any]] = []
        self.text_item: dict[str, Any] | None = None
        self.text: list[str] = []
        self.text_logprobs: list[dict[str, Any]] = []
        self.calls = StreamedToolCalls()
        self.call_items: dict[int, dict[str, Any]] = {}  # id(call) -> its output item
        self.open_call: dict[str, Any] | None = None
        self.finish_reason: Any = None
        self.usage: Any = None

    def response(self, status: str, output: list[dict[str, Any]], chat_usage: Any = None,
                 incomplete: dict[str, str] | None = None) -> dict[str, Any]:
        """The Response object, echoing the request's settings as OpenAI does."""
        b = self.body
        return {
            "id": self.id, "object": "response", "created_at": self.created_at, "status": status,
            "completed_at": int(time.time()) if status in ("completed", "incomplete") else None,
            "background": False, "error": None, "incomplete_details": incomplete,
            "instructions": b.get("instructions"), "max_output_tokens": b.get("max_output_tokens"),
            "max_tool_calls": None, "model": b.get("model") or "", "output": output,
            "parallel_tool_calls": b.get("parallel_tool_calls", True) is not False,
            "previous_response_id": None, "reasoning": {"effort": None, "summary": None},
            "service_tier": "default", "store": False, "temperature": b.get("temperature", 1.0),
            "text": b.get("text") or {"format": {"type": "text"}}, "tool_choice": b.get("tool_choice") or "auto",
            "tools": b.get("tools") or [], "top_logprobs": b.get("top_logprobs") or 0, "top_p": b.get("top_p", 1.0),
            "truncation": b.get("truncation") or "disabled", "usage": usage(chat_usage), "user": b.get("user"),
            "metadata": b.get("metadata") or {},
        }

    # --- a whole answer -----------------------------------------------------------------

    def answer(self, response: dict[str, Any]) -> dict[str, Any]:
        choice = first_choice(response)
        message = obj(choice.get("message"))
        status, incomplete = _status(choice.get("finish_reason"))
        text = text_of(message.get("content"))
        calls = tool_calls(message)
        output = []
        if text or not calls:
            output.append(_message_item(new_id("msg_"), text, status,
                                        chat_logprobs(choice) if self.logprobs else None))
        output += [_call_item(new_id("fc_"), call, "completed") for call in calls]
        return self.response(status, output, response.get("usage"), incomplete)

    # --- a stream -----------------------------------------------------------------------

    def _event(self, kind: str, **fields: Any) -> bytes:
        data = {"type": kind, "sequence_number": self.sequence, **fields}
        self.sequence += 1
        return sse(kind, data)

    def stream_start(self) -> bytes:
        created = self.response("in_progress", [])
        return self._event("response.created", response=created) + self._event("response.in_progress",
                                                                               response=created)

    def _open_text(self) -> bytes:
        self.text_item = _message_item(new_id("msg_"), "", "in_progress", None)
        self.text_item["content"] = []
        self.output.append(self.text_item)
        index = len(self.output) - 1
        part = {"type": "output_text", "text": "", "annotations": [], "logprobs": []}
        return (self._event("response.output_item.added", output_index=index, item=self.text_item)
                + self._event("response.content_part.added", item_id=self.text_item["id"], output_index=index,
                              content_index=0, part=part))

    def _close_text(self, status: str = "completed") -> bytes:
        item = self.text_item
        if item is None:
            return b""
        self.text_item = None
        index = self.output.index(item)
        text = "".join(self.text)
        logprobs = self.text_logprobs if self.logprobs else None
        done = _message_item(item["id"], text, status, logprobs)
        self.output[index] = done
        part = done["content"][0]
        return (self._event("response.output_text.done", item_id=item["id"], output_index=index, content_index=0,
                            text=text, logprobs=logprobs or [])
                + self._event("response.content_part.done", item_id=item["id"], output_index=index,
                              content_index=0, part=part)
                + self._event("response.output_item.done", output_index=index, item=done))

    def _close_call(self) -> bytes:
        call = self.open_call
        if call is None:
            return b""
        self.open_call = None
        item = self.call_items[id(call)]
        index = self.output.index(item)
        done = _call_item(item["id"], call, "completed")
        self.output[index] = self.call_items[id(call)] = done
        return (self._event("response.function_call_arguments.done", item_id=item["id"], output_index=index,
                            name=call["name"], arguments=call["arguments"])
                + self._event("response.output_item.done", output_index=index, item=done))

    def stream_chunk(self, chunk: dict[str, Any]) -> bytes:
        if isinstance(chunk.get("usage"), dict):
            self.usage = chunk["usage"]
        choice = first_choice(chunk)
        if not choice:
            return b""
        out = []
        delta = obj(choice.get("delta"))
        content = delta.get("content")
        if isinstance(content, str) and content:
            if self.text_item is None:
                out += [self._close_call(), self._open_text()]
            assert self.text_item is not None
            self.text.append(content)
            logprobs = chat_logprobs(choice) if self.logprobs else []
            self.text_logprobs += logprobs
            out.append(self._event("response.output_text.delta", item_id=self.text_item["id"],
                                   output_index=len(self.output) - 1, content_index=0, delta=content,
                                   logprobs=logprobs))
        for call, new, arguments in self.calls.add(delta.get("tool_calls")):
            if new:
                out += [self._close_text(), self._close_call()]
                item = _call_item(new_id("fc_"), {**call, "arguments": ""}, "in_progress")
                self.output.append(item)
                self.call_items[id(call)] = item
                self.open_call = call
                out.append(self._event("response.output_item.added", output_index=len(self.output) - 1, item=item))
            if arguments:
                item = self.call_items[id(call)]
                out.append(self._event("response.function_call_arguments.delta", item_id=item["id"],
                                       output_index=self.output.index(item), delta=arguments))
        if choice.get("finish_reason") is not None:
            self.finish_reason = choice["finish_reason"]
        return b"".join(out)

    def stream_end(self) -> bytes:
        status, incomplete = _status(self.finish_reason)
        out = [self._close_text(status), self._close_call()]
        if not self.output:  # an empty answer is still one (empty) message, as a whole answer has
            out += [self._open_text(), self._close_text(status)]
        response = self.response(status, list(self.output), self.usage, incomplete)
        out.append(self._event("response.completed" if status == "completed" else "response.incomplete",
                               response=response))
        return b"".join(out)

    def stream_failed(self, message: str) -> bytes:
        response = self.response("failed", list(self.output), self.usage)
        response["error"] = {"code": "server_error", "message": message}
        return self._event("response.failed", response=response)
