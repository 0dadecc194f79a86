"""The OpenAI wire format: validating request bodies and shaping responses and stream chunks.

Beyond OpenAI, as vLLM does: ``return_token_ids: true`` adds ``prompt_token_ids`` and
per-choice ``token_ids``. Every body carries the ``policy_version`` that generated it.
"""

from __future__ import annotations

import time
import uuid
from dataclasses import dataclass, field
from typing import Any, Literal, cast

from rollstream.serving.engine import Delta, FinishReason, SamplingParams, TokenLogprob
from rollstream.serving.text import token_bytes, token_text
from transformers import PreTrainedTokenizerBase

from rollstream.errors import InvalidRequestError

Kind = Literal["chat", "completion"]
MAX_TOP_LOGPROBS = 20
MAX_N = 64


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


def _check_model(body: dict[str, Any], policy: str) -> None:
    model = body.get("model")
    if model is not None and model != policy:
        raise InvalidRequestError(f"model '{model}' does not exist; this server serves '{policy}'", "model", 404)


def _sampling(body: dict[str, Any], max_tokens_key: tuple[str, ...], default_max_tokens: int,
              top_logprobs: int) -> tuple[list[SamplingParams], bool]:
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
                       seed=None if seed is None else seed + i, stop=tuple(stops), top_logprobs=top_logprobs)
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


def parse_chat(body: dict[str, Any], tokenizer: PreTrainedTokenizerBase, policy: str, default_max_tokens: int,
               max_context: int) -> GenerationRequest:
    _check_model(body, policy)
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise InvalidRequestError("'messages' is required and must be a non-empty list", "messages")
    normalized = []
    for i, message in enumerate(messages):
        if not isinstance(message, dict) or not isinstance(message.get("role"), str):
            raise InvalidRequestError(f"messages[{i}] must be an object with a 'role'", "messages")
        normalized.append({**message, "content": _text_content(message.get("content"), f"messages[{i}]")})
    tools = _get(body, "tools", list)
    logprobs = _get(body, "logprobs", bool, False)
    top_logprobs = _get(body, "top_logprobs", int, 0)
    if not 0 <= top_logprobs <= MAX_TOP_LOGPROBS:
        raise InvalidRequestError(f"'top_logprobs' must be between 0 and {MAX_TOP_LOGPROBS}", "top_logprobs")
    if top_logprobs and not logprobs:
        raise InvalidRequestError("'top_logprobs' needs 'logprobs': true", "top_logprobs")
    params, stream = _sampling(body, ("max_completion_tokens", "max_tokens"), default_max_tokens, top_logprobs)
    try:
        prompt_ids = chat_prompt_ids(tokenizer, normalized, tools)
    except Exception as exc:  # jinja raises its own errors for templates that reject the input
        raise InvalidRequestError(f"the chat template rejected the messages: {exc}", "messages") from exc
    _check_length(prompt_ids, max_context, "messages")
    return GenerationRequest("chat", prompt_ids, params, stream, _get(body, "return_token_ids", bool, False),
                             logprobs, _stream_options(body))


def parse_completion(body: dict[str, Any], tokenizer: PreTrainedTokenizerBase, policy: str,
                     default_max_tokens: int, max_context: int) -> GenerationRequest:
    _check_model(body, policy)
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
    params, stream = _sampling(body, ("max_tokens",), default_max_tokens, logprobs or 0)
    if not prompt_ids:
        raise InvalidRequestError("'prompt' tokenizes to nothing", "prompt")
    _check_length(prompt_ids, max_context, "prompt")
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
            if self.req.kind == "chat":
                choice["message"] = {"role": "assistant", "content": c.text}
            else:
                choice["text"] = c.text
            choice["logprobs"] = self._logprobs(i, c.tokens)
            choice["finish_reason"] = c.finish_reason
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

    def chunk(self, delta: Delta, first: bool, last: bool) -> list[dict[str, Any]]:
        """Chunks for one delta; ``last``: no choice is left open after it."""
        self.choices[delta.index].add(delta)
        chat = self.req.kind == "chat"
        body = self._head("chat.completion.chunk" if chat else "text_completion")
        choice: dict[str, Any] = {"index": delta.index}
        if chat:
            choice["delta"] = {"content": delta.text} if delta.text or not delta.finish_reason else {}
        else:
            choice["text"] = delta.text
        choice["logprobs"] = self._logprobs(delta.index, delta.tokens) if delta.tokens else None
        choice["finish_reason"] = delta.finish_reason
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
