"""Token ids for calls captured without them: the processor's tokenizer fallback (``PROCESS_TOKENIZER``).

Calls captured from OpenTelemetry GenAI spans carry messages and text, never token ids. With
``ROLLSTREAM_PROCESS_TOKENIZER`` set (a Hugging Face tokenizer folder, or ``s3://bucket/prefix``,
with a chat template), such a call is tokenized here instead of being dead-lettered, and its
transition says so (``token_source`` = ``tokenizer``). The rule:

- **Prompt.** Chat calls (every endpoint but COMPLETIONS: Responses and Messages calls are recorded
  in chat form): ``apply_chat_template(messages, tools=<tools_json>, add_generation_prompt=True,
  tokenize=True)``, with each recorded message as the dict a chat template expects (``role``,
  ``content``, and ``name``, ``tool_call_id``, ``tool_calls`` where recorded; tool-call arguments
  given as a JSON object string are passed as the object, as vLLM does). COMPLETIONS calls:
  ``tokenizer(prompt).input_ids`` (the tokenizer's own special tokens included, as an engine adds them).
- **Response.** The response text, tokenized without special tokens. A response with tool calls is
  what the chat template renders for an assistant turn holding the text and those calls: the
  rendering of the conversation with that turn, past the rendering of the prompt, up to the template's
  end token (``eos_token``). When the template does not render the turn that way (the conversation
  with the turn does not start with the prompt, or the end token does not follow), the text alone is
  used and a warning is logged.
- **End token.** The tokenizer's ``eos_token_id`` is appended when ``finish_reason`` is ``stop`` or
  ``tool_calls`` (the engine generated it and stopped); not for ``length`` or no reason. A response
  stopped by a stop *sequence* also says ``stop``: its ids then end in the end token, which the
  engine may not have generated.
- **Logprobs.** None: behaviour logprobs belong to the engine's tokens, and these may differ from
  them. The trainer treats such transitions as on-policy (no importance ratio).

Either both lists come from the engine or both from here: a call missing one of them is
tokenized whole. A tokenized prompt or response that comes out empty, a template that refuses the
messages and malformed tools/tool-call JSON make the call a dead letter (``invalid_value``).
"""

from __future__ import annotations

import json
import logging
import tempfile
from pathlib import Path
from typing import Any, Literal

from rollstream.errors import BadInputError, ConfigError, StorageError
from rollstream.settings import PREFIX, ConnectionSettings

log = logging.getLogger(__name__)

TokenSource = Literal["engine", "tokenizer"]
END_REASONS = frozenset({"stop", "tool_calls"})
# Files of a model folder the tokenizer needs (the weights are not downloaded); config.json tells
# AutoTokenizer the tokenizer's class where tokenizer_config.json does not.
TOKENIZER_FILES = ("tokenizer", "special_tokens", "vocab", "merges", "chat_template", "added_tokens", "config.json")


def load_tokenizer(source: str, connection: ConnectionSettings | None = None) -> CallTokenizer:
    """The tokenizer at ``source``: a local folder, or ``s3://bucket/prefix`` (its tokenizer files downloaded)."""
    if source.startswith("s3://"):
        from rollstream.storage import ObjectStore, S3Uri

        with tempfile.TemporaryDirectory(prefix="rollstream-tokenizer-") as tmp:
            try:
                store = ObjectStore(connection)
                prefix = S3Uri.parse(source.rstrip("/") + "/")
                for uri in store.list_objects(prefix, recursive=False):
                    name = S3Uri.parse(uri).key[len(prefix.key):]
                    if "/" not in name and name.startswith(TOKENIZER_FILES):
                        (Path(tmp) / name).write_bytes(store.get_bytes(uri))
            except StorageError as exc:
                raise ConfigError(f"{PREFIX}PROCESS_TOKENIZER={source!r}: cannot download it: {exc}") from exc
            return _load(Path(tmp), source)
    path = Path(source).expanduser()
    if not path.is_dir():
        raise ConfigError(f"{PREFIX}PROCESS_TOKENIZER={source!r} is not a folder; give a Hugging Face tokenizer "
                          "folder (save_pretrained) or an s3://bucket/prefix holding one")
    return _load(path, source)


def _load(path: Path, source: str) -> CallTokenizer:
    try:
        from transformers import AutoTokenizer
        from transformers.utils import logging as hf_logging
    except ImportError as exc:
        raise ConfigError(f"{PREFIX}PROCESS_TOKENIZER needs transformers: pip install 'rollstream[ml]'") from exc
    hf_logging.disable_progress_bar()
    try:
        tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
    except (OSError, ValueError, KeyError) as exc:
        raise ConfigError(f"{PREFIX}PROCESS_TOKENIZER={source!r}: cannot load a tokenizer there: {exc}") from exc
    if not getattr(tokenizer, "chat_template", None):
        raise ConfigError(f"{PREFIX}PROCESS_TOKENIZER={source!r}: the tokenizer has no chat template; use the "
                          "serving model's own tokenizer (its tokenizer_config.json or chat_template.jinja)")
    if tokenizer.eos_token_id is None:
        raise ConfigError(f"{PREFIX}PROCESS_TOKENIZER={source!r}: the tokenizer has no eos_token")
    log.info("calls without token ids are tokenized with the tokenizer at %s", source)
    return CallTokenizer(tokenizer)


def _json(text: str | None, what: str) -> Any:
    if not text:
        return None
    try:
        return json.loads(text)
    except ValueError as exc:
        raise BadInputError("invalid_value", f"{what} is not JSON ({exc}); cannot tokenize the call") from exc


def _tool_calls(text: str | None, what: str) -> list[dict[str, Any]] | None:
    """Recorded tool calls (OpenAI's shape) as chat templates take them: arguments as an object."""
    calls = _json(text, what)
    if not calls:
        return None
    if not isinstance(calls, list) or not all(isinstance(c, dict) for c in calls):
        raise BadInputError("invalid_value", f"{what} is not a list of tool calls; cannot tokenize the call")
    out = []
    for call in calls:
        fn = call.get("function")
        if isinstance(fn, dict) and isinstance(fn.get("arguments"), str):
            try:
                arguments = json.loads(fn["arguments"])
            except ValueError:
                arguments = None  # not JSON: the template gets the string as it is
            if isinstance(arguments, dict):
                call = {**call, "function": {**fn, "arguments": arguments}}
        out.append(call)
    return out


def chat_messages(messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The LlmCall's ChatMessage records as the message dicts of a chat template."""
    out = []
    for i, m in enumerate(messages):
        message: dict[str, Any] = {"role": m["role"], "content": m.get("content")}
        for name in ("name", "tool_call_id"):
            if m.get(name) is not None:
                message[name] = m[name]
        calls = _tool_calls(m.get("tool_calls_json"), f"messages[{i}].tool_calls_json")
        if calls:
            message["tool_calls"] = calls
        out.append(message)
    return out


class CallTokenizer:
    """Prompt and response token ids of a recorded call, from its text (the rule in the module docstring)."""

    def __init__(self, tokenizer: Any) -> None:
        self.tokenizer = tokenizer
        self.eos_token = str(tokenizer.eos_token)
        self.eos_token_id = int(tokenizer.eos_token_id)

    def token_ids(self, record: dict[str, Any]) -> tuple[list[int], list[int]]:
        """(prompt ids, response ids) of an LlmCall record; BadInputError when its text cannot give them."""
        where = f"call {record.get('call_id')!r}"
        try:
            if record.get("endpoint") == "COMPLETIONS":
                prompt = [int(t) for t in self.tokenizer(record.get("prompt") or "").input_ids]
                text = record.get("response_text") or ""
            else:
                messages = chat_messages(list(record.get("messages") or []))
                tools = _json(record.get("tools_json"), "tools_json") or None
                ids: Any = self.tokenizer.apply_chat_template(messages, tools=tools, add_generation_prompt=True,
                                                              tokenize=True, return_dict=False)
                prompt = [int(t) for t in ids]
                text = self._reply_text(record, messages, tools)
            response = [int(t) for t in self.tokenizer.encode(text, add_special_tokens=False)]
        except BadInputError as exc:
            raise BadInputError(exc.error_type, f"{where}: {exc.reason}") from exc
        except Exception as exc:  # a chat template raises what its author chose (jinja errors, ValueError, ...)
            raise BadInputError("invalid_value", f"{where} has no token ids and the tokenizer of "
                                                 f"{PREFIX}PROCESS_TOKENIZER cannot tokenize it: {exc}") from exc
        if record.get("finish_reason") in END_REASONS:
            response.append(self.eos_token_id)
        if not prompt or not response:
            raise BadInputError("invalid_value", f"{where} has no token ids and its recorded text tokenizes to an "
                                                 f"empty {'prompt' if not prompt else 'response'}")
        return prompt, response

    def _reply_text(self, record: dict[str, Any], messages: list[dict[str, Any]], tools: Any) -> str:
        """The response text, with its tool calls as the chat template renders them in an assistant turn."""
        text = record.get("response_text") or ""
        calls = _tool_calls(record.get("response_tool_calls_json"), "response_tool_calls_json")
        if not calls:
            return text
        turn = {"role": "assistant", "content": text or None, "tool_calls": calls}
        before = str(self.tokenizer.apply_chat_template(messages, tools=tools, add_generation_prompt=True,
                                                        tokenize=False))
        after = str(self.tokenizer.apply_chat_template([*messages, turn], tools=tools, add_generation_prompt=False,
                                                       tokenize=False))
        rest = after[len(before):]
        if not after.startswith(before) or self.eos_token not in rest:
            log.warning("call %r: the chat template does not render its tool calls as an assistant turn after the "
                        "prompt; tokenizing the response text alone", record.get("call_id"))
            return text
        return rest[:rest.index(self.eos_token)]
