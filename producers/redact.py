"""Redaction of personal data and secrets at capture, before anything is published to Kafka.

One :class:`Redactor` serves the gateway, the OTLP receiver and the SDK. It applies regex rules
(built-in: ``email``, ``phone``, ``api_key``, ``aws_key``, ``bearer``; more by configuration) and an
optional Python hook (``text -> text``) to text, replacing each match by ``[REDACTED:<rule>]``.

Token ids encode text, so redacting text alone would leak: where a model call can still be changed
(the gateway, the SDK's instrumented client) the *request* is redacted before it reaches the model
(:meth:`Redactor.request`), so the model never sees the raw value and the engine's prompt token ids are
those of the redacted text. What can no longer be changed (the model's answer, spans that arrive after
the fact) is redacted on the event (:meth:`Redactor.record`): where a text field changes, the token
ids that encode that text (prompt or response side) are dropped (null) and the event is marked
``metadata["redacted_tokens"] = "prompt" | "response" | "prompt,response"``. Nothing is re-tokenized.

A failing hook fails closed (:class:`RedactionError`): the request is not forwarded or the event not
published. Every replacement is counted per rule and surface (``rollstream_redactions_total``), every
drop of token ids per side and surface (``rollstream_redaction_tokens_dropped_total``). See
docs/redaction.md for what this does not cover.
"""

from __future__ import annotations

import importlib
import json
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Literal

from prometheus_client import Counter

from rollstream.errors import ConfigError, RollstreamError
from rollstream.settings import Settings, setting

Hook = Callable[[str], str]
Surface = Literal["gateway", "otlp", "sdk"]
HOOK_RULE = "hook"
PLACEHOLDER = "[REDACTED:{rule}]"
RULE_NAME = re.compile(r"^[a-z][a-z0-9_]{0,39}$")
# Request fields that carry text the model reads (chat, completions, Responses, Messages bodies).
REQUEST_FIELDS = ("messages", "prompt", "input", "instructions", "system", "tools")
# Keys whose values are structure, not text: left as they are (base64 images, ids, roles).
STRUCTURAL_KEYS = frozenset({"role", "type", "id", "tool_call_id", "call_id", "image_url", "input_audio", "file",
                             "file_data", "source", "data", "cache_control"})
PROMPT_TEXT = ("prompt", "tools_json")
MESSAGE_TEXT = ("content", "tool_calls_json", "name")
RESPONSE_TEXT = ("response_text", "response_tool_calls_json")


class RedactionError(RollstreamError):
    """A redaction hook failed or returned something other than text; nothing was published."""


def _phone_like(match: re.Match[str]) -> bool:
    """Whether a phone candidate looks like a phone number rather than a date, a version or a list of numbers."""
    text = match.group(0)
    digits = sum(c.isdigit() for c in text)
    if not 9 <= digits <= 15 or re.match(r"\d{4}-\d{2}-\d{2}", text):
        return False
    groups = re.findall(r"\d+", text)
    return text.startswith("+") or len(groups[-1]) >= 3


@dataclass(frozen=True)
class Rule:
    """A named regex; only its ``secret`` group is replaced when it has one; ``accept`` may veto a match."""

    name: str
    pattern: re.Pattern[str]
    accept: Callable[[re.Match[str]], bool] | None = None

    def sub(self, text: str, placeholder: str) -> tuple[str, int]:
        mark = placeholder.format(rule=self.name)
        count = 0

        def replace(match: re.Match[str]) -> str:
            nonlocal count
            if self.accept is not None and not self.accept(match):
                return match.group(0)
            count += 1
            if "secret" in self.pattern.groupindex:
                start, end = match.span("secret")
                whole = match.group(0)
                return whole[:start - match.start()] + mark + whole[end - match.start():]
            return mark

        return self.pattern.sub(replace, text), count


BUILTIN_RULES: dict[str, Rule] = {r.name: r for r in (
    Rule("email", re.compile(r"[A-Za-z0-9._%+-]+@[A-Za-z0-9-]+(?:\.[A-Za-z0-9-]+)*\.[A-Za-z]{2,}")),
    Rule("phone", re.compile(
        r"(?<![\w+.-])(?:\+\d{8,14}|(?:\+\d{1,3}[ .-]?)?(?:\(\d{1,4}\)[ .-]?)?\d{2,4}(?:[ .-]\d{2,4}){1,3})"
        r"(?![\w.-]?\d)"),
        accept=_phone_like),
    Rule("api_key", re.compile(
        r"\b(?:sk-(?:proj-|ant-(?:api\d\d-)?)?[A-Za-z0-9_-]{16,}|gh[pousr]_[A-Za-z0-9]{30,}"
        r"|xox[abposr]-[A-Za-z0-9-]{10,}|AIza[0-9A-Za-z_-]{35})")),
    Rule("aws_key", re.compile(r"\b(?:AKIA|ASIA)[0-9A-Z]{16}\b")),
    Rule("bearer", re.compile(r"(?i)\bbearer\s+(?P<secret>[A-Za-z0-9._~+/=-]{12,})")),
)}


def parse_rules(text: str) -> list[str]:
    """``ROLLSTREAM_REDACT``: built-in rule names, comma-separated; ``all`` for every one; empty or ``none``: off."""
    names = [n.strip().lower() for n in text.split(",") if n.strip()]
    if names in ([], ["none"]):
        return []
    if "all" in names:
        return list(BUILTIN_RULES)
    unknown = [n for n in names if n not in BUILTIN_RULES]
    if unknown:
        raise ConfigError(f"ROLLSTREAM_REDACT: unknown rule(s) {', '.join(unknown)}; use all, none or any of "
                          f"{', '.join(BUILTIN_RULES)} (add your own with ROLLSTREAM_REDACT_PATTERNS)")
    return list(dict.fromkeys(names))


def parse_patterns(text: str) -> list[Rule]:
    """``ROLLSTREAM_REDACT_PATTERNS``: a JSON object ``{"name": "regex"}``, or one ``name=regex`` per line."""
    text = text.strip()
    if not text:
        return []
    if text.startswith("{"):
        try:
            value = json.loads(text)
        except ValueError as exc:
            raise ConfigError(f"ROLLSTREAM_REDACT_PATTERNS is not a valid JSON object: {exc}") from exc
        if not isinstance(value, dict) or not all(isinstance(v, str) for v in value.values()):
            raise ConfigError('ROLLSTREAM_REDACT_PATTERNS must be a JSON object of strings: {"name": "regex"}')
        pairs = list(value.items())
    else:
        pairs = []
        for line in (entry.strip() for entry in text.splitlines()):
            name, sep, regex = line.partition("=")
            if line and (not sep or not regex):
                raise ConfigError(f"ROLLSTREAM_REDACT_PATTERNS: {line!r} is not 'name=regex'")
            if line:
                pairs.append((name.strip(), regex))
    rules = []
    for name, regex in pairs:
        if not RULE_NAME.match(name) or name in BUILTIN_RULES or name == HOOK_RULE:
            raise ConfigError(f"ROLLSTREAM_REDACT_PATTERNS: rule name {name!r} must be lowercase letters, digits "
                              f"and _ (up to 40), and not a built-in one ({', '.join(BUILTIN_RULES)}, {HOOK_RULE})")
        try:
            pattern = re.compile(regex)
        except re.error as exc:
            raise ConfigError(f"ROLLSTREAM_REDACT_PATTERNS: the regex of {name!r} does not compile: {exc}") from exc
        if pattern.match(""):
            raise ConfigError(f"ROLLSTREAM_REDACT_PATTERNS: the regex of {name!r} matches empty text")
        rules.append(Rule(name, pattern))
    return rules


def load_hook(path: str) -> Hook | None:
    """The callable that ``module:function`` (or ``module:Class.method``) names; None for an empty path."""
    path = path.strip()
    if not path:
        return None
    module_name, sep, attr = path.partition(":")
    if not sep or not module_name or not attr:
        raise ConfigError(f"ROLLSTREAM_REDACT_HOOK={path!r}: use 'module:function', e.g. 'mypkg.pii:scrub'")
    try:
        target: Any = importlib.import_module(module_name)
        for part in attr.split("."):
            target = getattr(target, part)
    except (ImportError, AttributeError) as exc:
        raise ConfigError(f"ROLLSTREAM_REDACT_HOOK={path!r} cannot be loaded: {exc}") from exc
    if not callable(target):
        raise ConfigError(f"ROLLSTREAM_REDACT_HOOK={path!r} is not callable")
    return target  # type: ignore[no-any-return]


@dataclass(frozen=True)
class RedactionSettings(Settings):
    """Which rules redact captured text, the extra patterns, and the hook; shared by gateway, OTLP receiver, SDK."""

    rules: str = setting("REDACT")
    patterns: str = setting("REDACT_PATTERNS")
    hook: str = setting("REDACT_HOOK")

    def validate(self) -> None:
        parse_rules(self.rules)  # malformed settings are a ConfigError at start, not at the first call
        parse_patterns(self.patterns)
        load_hook(self.hook)


class Redactor:
    """Rules and a hook applied to text, requests and events of one surface, counted in ``counters``."""

    def __init__(self, rules: Sequence[Rule] = (), hook: Hook | None = None, *, surface: Surface = "sdk",
                 counters: tuple[Counter, Counter] | None = None, placeholder: str = PLACEHOLDER) -> None:
        self.rules = list(rules)
        self.hook = hook
        self.surface = surface
        self.counters = counters
        self.placeholder = placeholder

    @classmethod
    def from_settings(cls, settings: RedactionSettings, *, surface: Surface,
                      counters: tuple[Counter, Counter] | None = None, hook: Hook | None = None) -> Redactor:
        """The rules ``settings`` select plus their patterns; ``hook`` (given in code) runs after the settings'."""
        rules = [BUILTIN_RULES[n] for n in parse_rules(settings.rules)] + parse_patterns(settings.patterns)
        hooks = [h for h in (load_hook(settings.hook), hook) if h is not None]
        chained: Hook | None = hooks[0] if len(hooks) == 1 else None
        if len(hooks) == 2:
            first, second = hooks

            def chained(text: str) -> str:
                return second(first(text))

        return cls(rules, chained, surface=surface, counters=counters)

    @property
    def active(self) -> bool:
        return bool(self.rules) or self.hook is not None

    @property
    def rule_names(self) -> list[str]:
        return [r.name for r in self.rules] + ([HOOK_RULE] if self.hook is not None else [])

    # --- text --------------------------------------------------------------------------

    def text(self, text: str, count: bool = True) -> str:
        """``text`` with every match replaced (the hook last); counted unless ``count`` is False."""
        for rule in self.rules:
            text, n = rule.sub(text, self.placeholder)
            if n and count:
                self._count(rule.name, n)
        if self.hook is not None:
            try:
                rewritten = self.hook(text)
            except Exception as exc:
                raise RedactionError(f"the redaction hook failed: {type(exc).__name__}: {exc}") from exc
            if not isinstance(rewritten, str):
                raise RedactionError(f"the redaction hook returned {type(rewritten).__name__}, not str")
            if rewritten != text and count:
                self._count(HOOK_RULE, 1)
            text = rewritten
        return text

    def _count(self, rule: str, n: int) -> None:
        if self.counters is not None:
            self.counters[0].labels(rule, self.surface).inc(n)

    def value(self, value: Any, count: bool = True) -> Any:
        """A JSON-like value with its text redacted; the same object when nothing changed (never mutated)."""
        if isinstance(value, str):
            return self.text(value, count)
        if isinstance(value, dict):
            out = None
            for key, item in value.items():
                if key in STRUCTURAL_KEYS:
                    continue
                new = self.value(item, count)
                if new is not item:
                    out = dict(value) if out is None else out
                    out[key] = new
            return value if out is None else out
        if isinstance(value, list | tuple):
            items = [self.value(item, count) for item in value]
            return value if all(a is b for a, b in zip(items, value, strict=True)) else items
        if hasattr(value, "model_dump"):  # an SDK message object (pydantic) appended from a previous answer
            plain = value.model_dump(mode="json", exclude_none=True)
            new = self.value(plain, count)
            return value if new is plain else new
        return value

    # --- requests and events -----------------------------------------------------------------

    def request(self, body: dict[str, Any]) -> dict[str, Any]:
        """A model request with the text the model reads redacted: a new dict, or ``body`` itself unchanged."""
        if not self.active:
            return body
        out = None
        for key in REQUEST_FIELDS:
            if key in body:
                new = self.value(body[key])
                if new is not body[key]:
                    out = dict(body) if out is None else out
                    out[key] = new
        return body if out is None else out

    def record(self, record: dict[str, Any]) -> dict[str, Any]:
        """An event about to be published, redacted in place (and returned).

        LlmCall: prompt and response text; where a side's text changed, its token ids (and the response's
        logprobs) are dropped, because they encode the text as it was. Every event: metadata values (not
        ids) and a RolloutEvent's error text."""
        if not self.active:
            return record
        if "response_text" in record:
            dropped = []
            in_messages = [self._fields(m, MESSAGE_TEXT) for m in record.get("messages") or ()]  # all of them
            if self._fields(record, PROMPT_TEXT) or any(in_messages):
                if record.get("prompt_token_ids") is not None:
                    record["prompt_token_ids"] = None
                    dropped.append("prompt")
            if self._fields(record, RESPONSE_TEXT):
                if record.get("response_token_ids") is not None or record.get("response_logprobs") is not None:
                    record["response_token_ids"] = record["response_logprobs"] = None
                    dropped.append("response")
            if dropped:
                record["metadata"] = {**(record.get("metadata") or {}), "redacted_tokens": ",".join(dropped)}
                if self.counters is not None:
                    for side in dropped:
                        self.counters[1].labels(side, self.surface).inc()
        self._fields(record, ("error",))
        metadata = record.get("metadata")
        if isinstance(metadata, dict):
            for key, item in metadata.items():
                if isinstance(item, str) and not key.endswith(("_id", "_index")) and key != "redacted_tokens":
                    metadata[key] = self.text(item)
        return record

    def _fields(self, record: dict[str, Any], names: Sequence[str]) -> bool:
        """Redact ``record``'s text fields ``names`` in place; whether any changed."""
        changed = False
        for name in names:
            text = record.get(name)
            if isinstance(text, str):
                new = self.text(text)
                if new != text:
                    record[name] = new
                    changed = True
        return changed

    def leaky_sides(self, call: dict[str, Any]) -> set[str]:
        """The sides ("prompt", "response") of an LlmCall whose text the rules would change (nothing counted):
        their token ids would encode what this redactor removes."""
        if not self.active:
            return set()

        def dirty(obj: dict[str, Any], names: Sequence[str]) -> bool:
            return any(isinstance(obj.get(n), str) and self.text(obj[n], count=False) != obj[n] for n in names)

        sides = set()
        if dirty(call, PROMPT_TEXT) or any(dirty(m, MESSAGE_TEXT) for m in call.get("messages") or ()):
            sides.add("prompt")
        if dirty(call, RESPONSE_TEXT):
            sides.add("response")
        return sides


def redaction_flags(parser: Any) -> None:
    """The ``--redact``, ``--redact-pattern``, ``--redact-hook`` options of ``rollstream gateway`` and ``otlp``."""
    parser.add_argument("--redact", metavar="RULES",
                        help=f"redact captured text: comma-separated rules ({', '.join(BUILTIN_RULES)}), all or none "
                             "(ROLLSTREAM_REDACT; docs/redaction.md)")
    parser.add_argument("--redact-pattern", action="append", metavar="NAME=REGEX",
                        help="one more redaction rule; repeatable (replaces ROLLSTREAM_REDACT_PATTERNS)")
    parser.add_argument("--redact-hook", metavar="MODULE:FUNCTION",
                        help="a Python function text -> text run after the rules (ROLLSTREAM_REDACT_HOOK)")


def settings_from_flags(args: Any) -> RedactionSettings:
    """RedactionSettings from the environment, with the ``--redact*`` options that were given."""
    given: dict[str, str] = {}
    if args.redact is not None:
        given["rules"] = args.redact
    if args.redact_pattern:
        given["patterns"] = "\n".join(args.redact_pattern)
    if args.redact_hook is not None:
        given["hook"] = args.redact_hook
    return RedactionSettings(**given)
