"""The OpenAI wire format: validating request bodies and shaping responses and stream chunks.

Beyond OpenAI, as vLLM does: ``return_token_ids: true`` adds ``prompt_token_ids`` and
per-choice ``token_ids``. Every body carries the ``policy_version`` that generated it.

Chat requests may give ``tools`` with ``tool_choice`` (``none`` leaves the tools out of the
prompt; ``auto`` parses calls out of the output; ``required`` and a named function constrain
the output to calls) and ``response_format`` (``json_object``, ``json_schema``: constrained to
that JSON; with tools in ``auto`` mode, to either calls or that JSON). What cannot be honoured
is a 400 naming the field, never a silent 200.
"""

from __future__ import annotations

import json
import time
import uuid
from dataclasses import dataclass, field
from typing import Any, Literal, cast

from transformers import PreTrainedTokenizerBase

from rollstream.errors import GrammarError, InvalidRequestError
from rollstream.serving.engine import Delta, Engine, FinishReason, SamplingParams, TokenLogprob
from rollstream.serving.grammar import output_grammar
from rollstream.serving.text import token_bytes, token_text
from rollstream.serving.tools import HermesStream, ToolCall, ToolCallParser, parse_calls, stream_parser

Kind = Literal["chat", "completion"]
MAX_TOP_LOGPROBS = 20
MAX_N = 64


@dataclass(frozen=True)
class ServeOptions:
    """What parsing a request needs from the server's settings."""

    policy: str
    default_max_tokens: int = 256
    model_names: tuple[str, ...] = ()  # other names the server answers to; "*": any
    tool_call_parser: ToolCallParser = "hermes"

    def answers_to(self, model: str) -> bool:
        return model == self.policy or model in self.model_names or "*" in self.model_names


@dataclass(frozen=True)
class GenerationRequest:
    """A validated chat or completion request, tokenized."""

    kind: Kind
    prompt_ids: list[int]
    params: list[SamplingParams]  # one per choice
    stream: bool = False
    return_token_ids: bool = False
    logprobs: bool = False
    include_usage: bool | None = None  # stream_options.include_usage as given
    tool_call_parser: ToolCallParser = "none"  # how tool calls are read out of the output ("none": text)


def _get(body: dict[str, Any], name: str, types: type | tuple[type, ...], default: Any = None) -> Any:
    value = body.get(name, default)
    if value is None:
        return default
    # bool is an int in Python; a JSON true is never a valid count or number here.
    if not isinstance(value, types) or (isinstance(value, bool) and bool not in _as_tuple(types)):
        names = "/".join(t.__name__ for t in _as_tuple(types))
        raise InvalidRequestError(f"'{name}' must be of type {names}, got {value!r}", name)
    return value


def _as_tuple(types: type | tuple[type, ...]) -> tuple[type, ...]:
    return types if isinstance(types, tuple) else (types,)


def _check_model(body: dict[str, Any], options: ServeOptions) -> None:
    model = body.get("model")
    if model is not None and (not isinstance(model, str) or not options.answers_to(model)):
        raise InvalidRequestError(f"model '{model}' does not exist; this server serves '{options.policy}'",
                                  "model", 404)


def _sampling(body: dict[str, Any], max_tokens_key: tuple[str, ...], default_max_tokens: int,
              top_logprobs: int, grammar: str | None = None) -> tuple[list[SamplingParams], bool]:
    n = _get(body, "n", int, 1)
    if not 1 <= n <= MAX_N:
        raise InvalidRequestError(f"'n' must be between 1 and {MAX_N}, got {n}", "n")
    max_tokens = default_max_tokens
    for key in max_tokens_key:
        if body.get(key) is not None:
            max_tokens = _get(body, key, int)
            if max_tokens < 1:
                raise InvalidRequestError(f"'{key}' must be at least 1, got {max_tokens}", key)
    temperature = float(_get(body, "temperature", (int, float), 1.0))
    if not 0.0 <= temperature <= 2.0:
        raise InvalidRequestError(f"'temperature' must be between 0 and 2, got {temperature}", "temperature")
    top_p = float(_get(body, "top_p", (int, float), 1.0))
    if not 0.0 < top_p <= 1.0:
        raise InvalidRequestError(f"'top_p' must be in (0, 1], got {top_p}", "top_p")
    stop = _get(body, "stop", (str, list), [])
    stops = [stop] if isinstance(stop, str) else stop
    if not all(isinstance(s, str) for s in stops):
        raise InvalidRequestError("'stop' must be a string or a list of strings", "stop")
    seed = _get(body, "seed", int)
    # torch generators take 64-bit seeds and choice i uses seed + i; a seed past that range would
    # fail the whole batch it is admitted into, other clients' requests included.
    if seed is not None and not -(2**63) <= seed <= 2**63 - 1:
        raise InvalidRequestError(f"'seed' must be a 64-bit signed integer, got {seed}", "seed")
    stream = _get(body, "stream", bool, False)
    params = [
        SamplingParams(max_tokens=max_tokens, temperature=temperature, top_p=top_p,
                       seed=None if seed is None else seed + i, stop=tuple(stops), top_logprobs=top_logprobs,
                       grammar=grammar)
        for i in range(n)
    ]
    return params, stream


def _stream_options(body: dict[str, Any]) -> bool | None:
    options = _get(body, "stream_options", dict, {})
    value = options.get("include_usage")
    if value is not None and not isinstance(value, bool):
        raise InvalidRequestError("'stream_options.include_usage' must be a boolean", "stream_options")
    return value


def _text_content(content: Any, where: str) -> str | None:
    if content is None or isinstance(content, str):
        return content
    if isinstance(content, list):
        parts = []
        for part in content:
            if not isinstance(part, dict) or part.get("type") != "text" or not isinstance(part.get("text"), str):
                raise InvalidRequestError(f"{where}: only text content parts are supported", "messages")
            parts.append(part["text"])
        return "".join(parts)
    raise InvalidRequestError(f"{where}: 'content' must be a string or a list of text parts", "messages")


def chat_prompt_ids(tokenizer: PreTrainedTokenizerBase, messages: list[dict[str, Any]],
                    tools: list[dict[str, Any]] | None = None) -> list[int]:
    """The prompt token ids of a chat: the tokenizer's chat template with the generation prompt."""
    ids: Any = tokenizer.apply_chat_template(messages, tools=cast(Any, tools), add_generation_prompt=True,
                                             tokenize=True, return_dict=False)
    return [int(i) for i in ids]


def _tools(body: dict[str, Any]) -> dict[str, Any]:
    """The functions of ``tools`` by name (their parameters schema), checking each tool's shape."""
    functions: dict[str, Any] = {}
    for i, tool in enumerate(_get(body, "tools", list, [])):
        fn = tool.get("function") if isinstance(tool, dict) and tool.get("type", "function") == "function" else None
        if not isinstance(fn, dict) or not isinstance(fn.get("name"), str) or not fn["name"]:
            raise InvalidRequestError(f"tools[{i}] must be {{\"type\": \"function\", \"function\": "
                                      "{\"name\": ..., \"parameters\": {...}}}", "tools")
        params = fn.get("parameters")
        if params is not None and not isinstance(params, dict):
            raise InvalidRequestError(f"tools[{i}].function.parameters must be a JSON schema object", "tools")
        functions[fn["name"]] = params if params is not None else {"type": "object", "properties": {}}
    return functions


def _tool_choice(body: dict[str, Any], functions: dict[str, Any], parser: ToolCallParser) -> str:
    """"none", "auto", "required", or the name of the one function to call."""
    choice = body.get("tool_choice")
    if choice is None:
        return "auto" if functions else "none"
    if isinstance(choice, dict) and choice.get("type") == "function" and isinstance(choice.get("function"), dict) \
            and isinstance(choice["function"].get("name"), str):
        name = choice["function"]["name"]
        if name not in functions:
            known = ", ".join(functions) or "none given"
            raise InvalidRequestError(f"tool_choice names function '{name}', which is not in 'tools' ({known})",
                                      "tool_choice")
    elif choice in ("none", "auto", "required"):
        name = choice
    else:
        raise InvalidRequestError("'tool_choice' must be 'none', 'auto', 'required' or "
                                  '{"type": "function", "function": {"name": ...}}', "tool_choice")
    if name not in ("none", "auto"):
        if not functions:
            raise InvalidRequestError(f"tool_choice {json.dumps(choice)} needs 'tools'", "tool_choice")
        if parser == "none":
            raise InvalidRequestError(f"tool_choice {json.dumps(choice)} needs a tool-call parser; this server "
                                      "reads no tool calls (--tool-call-parser none)", "tool_choice")
    return name


def _response_format(body: dict[str, Any]) -> Any:
    """The JSON schema the output must follow, or None for free text."""
    fmt = _get(body, "response_format", dict)
    kind = None if fmt is None else fmt.get("type")
    if fmt is None or kind == "text":
        return None
    if kind == "json_object":
        return {"type": "object"}
    if kind == "json_schema":
        spec = fmt.get("json_schema")
        if not isinstance(spec, dict):
            raise InvalidRequestError("response_format.json_schema must be an object with a 'schema'",
                                      "response_format")
        return spec.get("schema", {"type": "object"})
    raise InvalidRequestError(f"response_format type {json.dumps(kind)} is not supported; use 'text', "
                              "'json_object' or 'json_schema'", "response_format")


def _compile(engine: Engine, param: str, what: str, tools: list[tuple[str, Any]] | None = None,
             parallel: bool = True, schema: Any = None) -> str:
    """The grammar of ``output_grammar(tools, parallel, schema)``, compiled; a 400 naming ``param`` if it fails."""
    try:
        grammar = output_grammar(tools or (), parallel, schema)
        engine.grammars.matcher(grammar)
    except GrammarError as exc:
        raise InvalidRequestError(f"{what} cannot be enforced: {exc}", param) from exc
    return grammar


def _structure(body: dict[str, Any], engine: Engine,
               parser: ToolCallParser) -> tuple[dict[str, Any], str | None, ToolCallParser]:
    """(tools to render into the prompt, grammar of the output or None, parser of its tool calls)."""
    functions = _tools(body)
    choice = _tool_choice(body, functions, parser)
    parallel = _get(body, "parallel_tool_calls", bool, True)
    schema = _response_format(body)
    answer = None if schema is None else _compile(engine, "response_format", "response_format", schema=schema)
    if choice == "none":
        return {}, answer, "none"
    if choice == "auto" and (schema is None or not functions or parser == "none"):
        return functions, answer, parser
    forced = list(functions.items()) if choice in ("auto", "required") else [(choice, functions[choice])]
    many = parallel and choice in ("auto", "required")
    try:
        grammar = output_grammar(forced, many, schema if choice == "auto" else None)
        engine.grammars.matcher(grammar)
    except GrammarError as exc:
        for name, params in forced:  # find the tool whose parameters do not compile, and name it
            _compile(engine, "tools", f"tools: function '{name}'", [(name, params)])
        raise InvalidRequestError(f"tools cannot be enforced: {exc}", "tools") from exc
    return functions, grammar, parser


def parse_chat(body: dict[str, Any], engine: Engine, options: ServeOptions) -> GenerationRequest:
    _check_model(body, options)
    tokenizer = engine.tokenizer
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise InvalidRequestError("'messages' is required and must be a non-empty list", "messages")
    normalized = []
    for i, message in enumerate(messages):
        if not isinstance(message, dict) or not isinstance(message.get("role"), str):
            raise InvalidRequestError(f"messages[{i}] must be an object with a 'role'", "messages")
        normalized.append({**message, "content": _text_content(message.get("content"), f"messages[{i}]")})
    functions, grammar, parser = _structure(body, engine, options.tool_call_parser)
    tools = [tool for tool in body.get("tools") or [] if tool["function"]["name"] in functions] or None
    logprobs = _get(body, "logprobs", bool, False)
    top_logprobs = _get(body, "top_logprobs", int, 0)
    if not 0 <= top_logprobs <= MAX_TOP_LOGPROBS:
        raise InvalidRequestError(f"'top_logprobs' must be between 0 and {MAX_TOP_LOGPROBS}", "top_logprobs")
    if top_logprobs and not logprobs:
        raise InvalidRequestError("'top_logprobs' needs 'logprobs': true", "top_logprobs")
    params, stream = _sampling(body, ("max_completion_tokens", "max_tokens"), options.default_max_tokens,
                               top_logprobs, grammar)
    try:
        prompt_ids = chat_prompt_ids(tokenizer, normalized, tools)
    except Exception as exc:  # jinja raises its own errors for templates that reject the input
        raise InvalidRequestError(f"the chat template rejected the messages: {exc}", "messages") from exc
    _check_length(prompt_ids, engine.max_context, "messages")
    return GenerationRequest("chat", prompt_ids, params, stream, _get(body, "return_token_ids", bool, False),
                             logprobs, _stream_options(body), parser)


def parse_completion(body: dict[str, Any], engine: Engine, options: ServeOptions) -> GenerationRequest:
    _check_model(body, options)
    tokenizer = engine.tokenizer
    prompt = body.get("prompt")
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str):
        prompt = prompt[0]
    if isinstance(prompt, str):
        prompt_ids = [int(i) for i in tokenizer.encode(prompt, add_special_tokens=True)]
    elif isinstance(prompt, list) and prompt and all(isinstance(i, int) and not isinstance(i, bool) for i in prompt):
        prompt_ids = list(prompt)
        if max(prompt_ids) >= len(tokenizer) or min(prompt_ids) < 0:
            raise InvalidRequestError("'prompt' holds token ids outside the vocabulary", "prompt")
    else:
        raise InvalidRequestError("'prompt' is required: a string, or a list of token ids", "prompt")
    if _get(body, "echo", bool, False):
        raise InvalidRequestError("'echo' is not supported", "echo")
    logprobs = _get(body, "logprobs", int)
    if logprobs is not None and not 0 <= logprobs <= MAX_TOP_LOGPROBS:
        raise InvalidRequestError(f"'logprobs' must be between 0 and {MAX_TOP_LOGPROBS}", "logprobs")
    params, stream = _sampling(body, ("max_tokens",), options.default_max_tokens, logprobs or 0)
    if not prompt_ids:
        raise InvalidRequestError("'prompt' tokenizes to nothing", "prompt")
    _check_length(prompt_ids, engine.max_context, "prompt")
    return GenerationRequest("completion", prompt_ids, params, stream, _get(body, "return_token_ids", bool, False),
                             logprobs is not None, _stream_options(body))


def _check_length(prompt_ids: list[int], max_context: int, param: str) -> None:
    if len(prompt_ids) >= max_context:
        raise InvalidRequestError(
            f"the prompt has {len(prompt_ids)} tokens; this model's context is {max_context}", param)


def error_body(message: str, param: str | None, status: int) -> dict[str, Any]:
    kind = {404: "NotFoundError", 500: "InternalServerError"}.get(status, "invalid_request_error")
    code = "model_not_found" if status == 404 and param == "model" else None
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}


def _with_calls(reason: FinishReason | None) -> str | None:
    """A row that ended normally with tool calls finished to call them."""
    return "tool_calls" if reason == "stop" else reason


@dataclass
class Choice:
    """What one choice has accumulated."""

    text: str = ""
    tokens: list[TokenLogprob] = field(default_factory=list)
    finish_reason: FinishReason | None = None

    def add(self, delta: Delta) -> None:
        self.text += delta.text
        self.tokens.extend(delta.tokens)
        self.finish_reason = delta.finish_reason or self.finish_reason


class Shaper:
    """Builds the response (or its stream chunks) of one request."""

    def __init__(self, req: GenerationRequest, tokenizer: PreTrainedTokenizerBase, policy: str) -> None:
        self.req = req
        self.tokenizer = tokenizer
        self.policy = policy
        prefix = "chatcmpl-" if req.kind == "chat" else "cmpl-"
        self.id = prefix + uuid.uuid4().hex
        self.created = int(time.time())
        self.version = 0
        self.choices = [Choice() for _ in req.params]
        self._offsets = [0] * len(req.params)
        self._parsers: list[HermesStream | None] = [stream_parser(req.tool_call_parser) for _ in req.params]

    def _head(self, obj: str) -> dict[str, Any]:
        return {"id": self.id, "object": obj, "created": self.created, "model": self.policy,
                "policy_version": self.version}

    def usage(self) -> dict[str, int]:
        completion = sum(len(c.tokens) for c in self.choices)
        prompt = len(self.req.prompt_ids)
        return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}

    def _logprobs(self, index: int, tokens: list[TokenLogprob] | tuple[TokenLogprob, ...]) -> dict[str, Any] | None:
        if not self.req.logprobs:
            return None
        tok = self.tokenizer
        if self.req.kind == "chat":
            return {"content": [
                {"token": token_text(tok, t.token_id), "logprob": t.logprob,
                 "bytes": list(token_bytes(tok, t.token_id)),
                 "top_logprobs": [{"token": token_text(tok, i), "logprob": lp, "bytes": list(token_bytes(tok, i))}
                                  for i, lp in t.top]}
                for t in tokens]}
        texts = [token_text(tok, t.token_id) for t in tokens]
        offsets = []
        for text in texts:
            offsets.append(self._offsets[index])
            self._offsets[index] += len(text)
        return {"tokens": texts, "token_logprobs": [t.logprob for t in tokens],
                "top_logprobs": [{token_text(tok, i): lp for i, lp in t.top} for t in tokens],
                "text_offset": offsets}

    def response(self) -> dict[str, Any]:
        body = self._head("chat.completion" if self.req.kind == "chat" else "text_completion")
        choices = []
        for i, c in enumerate(self.choices):
            choice: dict[str, Any] = {"index": i}
            reason = c.finish_reason
            if self.req.kind == "chat":
                content, calls = parse_calls(self.req.tool_call_parser, c.text)
                choice["message"] = {"role": "assistant", "content": content}
                if calls:
                    choice["message"]["tool_calls"] = [call.to_openai() for call in calls]
                    reason = _with_calls(reason)
            else:
                choice["text"] = c.text
            choice["logprobs"] = self._logprobs(i, c.tokens)
            choice["finish_reason"] = reason
            if self.req.return_token_ids:
                choice["token_ids"] = [t.token_id for t in c.tokens]
            choices.append(choice)
        body["choices"] = choices
        body["usage"] = self.usage()
        if self.req.return_token_ids:
            body["prompt_token_ids"] = self.req.prompt_ids
        return body

    def first_chunks(self) -> list[dict[str, Any]]:
        """Chunks sent on admission: the assistant role (chat), and the prompt's token ids."""
        if self.req.kind != "chat":
            return []
        chunk = self._head("chat.completion.chunk")
        chunk["choices"] = [{"index": i, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                             "finish_reason": None} for i in range(len(self.choices))]
        if self.req.return_token_ids:
            chunk["prompt_token_ids"] = self.req.prompt_ids
            for choice in chunk["choices"]:
                choice["token_ids"] = []
        return [chunk]

    def _parse(self, delta: Delta) -> tuple[str, list[dict[str, Any]]]:
        """The content and tool-call deltas that ``delta`` releases."""
        parser = self._parsers[delta.index]
        if parser is None:
            return delta.text, []
        before = parser.calls
        pieces = parser.push(delta.text) + (parser.finish() if delta.finish_reason else [])
        calls = [p for p in pieces if isinstance(p, ToolCall)]
        text = "".join(p for p in pieces if isinstance(p, str))
        return text, [call.to_openai(before + k) for k, call in enumerate(calls)]

    def chunk(self, delta: Delta, first: bool, last: bool) -> list[dict[str, Any]]:
        """Chunks for one delta; ``last``: no choice is left open after it."""
        self.choices[delta.index].add(delta)
        chat = self.req.kind == "chat"
        body = self._head("chat.completion.chunk" if chat else "text_completion")
        choice: dict[str, Any] = {"index": delta.index}
        reason = delta.finish_reason
        if chat:
            text, calls = self._parse(delta)
            choice["delta"] = {"content": text} if text or not (calls or reason) else {}
            if calls:
                choice["delta"]["tool_calls"] = calls
            parser = self._parsers[delta.index]
            if parser is not None and parser.calls:
                reason = _with_calls(reason)
        else:
            choice["text"] = delta.text
        # Token ids and logprobs go out with the step that sampled them, even while its text is held back.
        choice["logprobs"] = self._logprobs(delta.index, delta.tokens) if delta.tokens else None
        choice["finish_reason"] = reason
        if self.req.return_token_ids:
            choice["token_ids"] = [t.token_id for t in delta.tokens]
            if first and not chat:
                body["prompt_token_ids"] = self.req.prompt_ids
        body["choices"] = [choice]
        chunks = [body]
        if last:
            if self.req.include_usage:
                tail = self._head(body["object"])
                tail["choices"] = []
                tail["usage"] = self.usage()
                chunks.append(tail)
            elif self.req.include_usage is None:
                body["usage"] = self.usage()
        return chunks
