"""What a rollout's page shows, built from its records (read back by offset) and the index."""

from __future__ import annotations

import json
import math
import statistics
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from confluent_kafka.schema_registry.error import SchemaRegistryError

from rollstream.errors import SerializationError
from rollstream.schemas.codec import EventCodec
from rollstream.ui.index import Rollout, RolloutIndex, _micros
from rollstream.ui.kafka import RecordFetcher

PROMPT_IDS_SHOWN = 400  # prompt token ids listed on the page (the count is always shown)


class Tokens:
    """Token ids to text with a Hugging Face tokenizer folder, when the viewer was given one."""

    def __init__(self, path: str | None) -> None:
        self.path = path
        self._tok: Any = None
        self.error: str | None = None

    def _load(self) -> Any:
        if self._tok is None and self.path and self.error is None:
            try:
                from transformers import AutoTokenizer

                self._tok = AutoTokenizer.from_pretrained(self.path, local_files_only=True)
            except Exception as exc:  # transformers raises many kinds for a folder that is not a tokenizer
                self.error = f"cannot load the tokenizer at {self.path}: {exc}"
        return self._tok

    def pieces(self, ids: list[int]) -> list[str] | None:
        tok = self._load()
        if tok is None:
            return None
        return [tok.decode([i]) for i in ids]


@dataclass
class TokenView:
    id: int
    text: str | None
    logprob: float | None

    @property
    def shade(self) -> float:
        """0 (the policy was sure: probability 1) .. 1 (probability near 0): the background's strength."""
        if self.logprob is None or math.isnan(self.logprob):
            return 0.0
        return round(min(1.0, 1.0 - math.exp(self.logprob)), 3)


@dataclass
class ToolCall:
    id: str
    name: str
    arguments: str  # pretty JSON where it parses, else as recorded


@dataclass
class MessageView:
    role: str
    content: str | None
    name: str | None = None
    tool_call_id: str | None = None
    tool_calls: list[ToolCall] = field(default_factory=list)


@dataclass
class CallView:
    record: dict[str, Any]
    messages: list[MessageView]
    tool_calls: list[ToolCall]
    tokens: list[TokenView]
    prompt_ids: list[int]
    prompt_count: int
    mean_logprob: float | None
    tools: list[str]
    where: str


def tool_calls(raw: str | None) -> list[ToolCall]:
    """Tool calls recorded as JSON (OpenAI's shape), with their arguments pretty-printed."""
    if not raw:
        return []
    try:
        items = json.loads(raw)
    except ValueError:
        return [ToolCall("", "(unparsable)", raw)]
    out = []
    for item in items if isinstance(items, list) else [items]:
        if not isinstance(item, dict):
            continue
        fn = item.get("function") or {}
        args = fn.get("arguments", item.get("arguments", ""))
        try:
            args = json.dumps(json.loads(args), indent=1) if isinstance(args, str) else json.dumps(args, indent=1)
        except ValueError:
            pass
        out.append(ToolCall(str(item.get("id") or ""), str(fn.get("name") or item.get("name") or "?"), str(args)))
    return out


def tool_names(raw: str | None) -> list[str]:
    try:
        items = json.loads(raw or "[]")
    except ValueError:
        return []
    return [str((t.get("function") or t).get("name", "?")) for t in items if isinstance(t, dict)]


def call_view(rec: dict[str, Any], tokens: Tokens, where: str) -> CallView:
    ids = list(rec.get("response_token_ids") or [])
    lps = list(rec.get("response_logprobs") or [])
    texts = tokens.pieces(ids) if ids else None
    toks = [TokenView(i, texts[k] if texts else None, lps[k] if k < len(lps) else None) for k, i in enumerate(ids)]
    finite = [x for x in lps if not math.isnan(x)]
    prompt = list(rec.get("prompt_token_ids") or [])
    messages = [MessageView(m["role"], m.get("content"), m.get("name"), m.get("tool_call_id"),
                            tool_calls(m.get("tool_calls_json"))) for m in rec.get("messages") or []]
    if not messages and rec.get("prompt"):
        messages = [MessageView("prompt", rec["prompt"])]
    return CallView(rec, messages, tool_calls(rec.get("response_tool_calls_json")), toks, prompt[:PROMPT_IDS_SHOWN],
                    len(prompt), sum(finite) / len(finite) if finite else None, tool_names(rec.get("tools_json")),
                    where)


@dataclass
class RolloutPage:
    summary: Rollout
    lifecycle: list[dict[str, Any]]
    calls: list[CallView]
    rewards: list[dict[str, Any]]
    transitions: list[dict[str, Any]]
    late: int
    missing: int  # records the index knows of that could not be read back
    end_us: int
    group_size: int
    advantage: float | None  # the rollout's reward against its group's: (r - mean) / std
    tokenizer_error: str | None


def load_rollout(index: RolloutIndex, fetcher: RecordFetcher, codec: EventCodec, tokens: Tokens,
                 rid: str) -> RolloutPage | None:
    summary = index.get(rid)
    if summary is None:
        return None
    refs = index.refs(rid)
    values = fetcher.fetch([ref for ref in refs if not ref[0].endswith("late-events")])
    t = codec.topics
    lifecycle, calls, rewards, transitions = [], [], [], []
    for ref in refs:
        data = values.get(ref)
        if data is None:
            continue
        topic, partition, offset = ref
        where = f"{topic}[{partition}]@{offset}"
        try:
            rec = codec.decode(topic, data)
        except (SerializationError, SchemaRegistryError):  # it was readable when indexed; count it as missing
            del values[ref]
            continue
        if topic == t.calls:
            calls.append(call_view(rec, tokens, where))
        elif topic == t.rewards:
            rewards.append(rec | {"where": where})
        elif topic == t.rollouts:
            lifecycle.append(rec | {"where": where})
        elif topic == t.transitions:
            rec.pop("prompt_token_ids", None)
            rec["response_tokens"] = len(rec.pop("response_token_ids", None) or [])
            rec.pop("behaviour_logprobs", None)
            transitions.append(rec | {"where": where})
    calls.sort(key=lambda c: (c.record["attempt"], c.record["sequence"], c.record["start_time"]))
    transitions.sort(key=lambda x: (x["attempt"], x["sequence"]))
    lifecycle.sort(key=lambda x: _micros(x["timestamp"]))
    end_us = summary.end_us or max((_micros(c.record["end_time"]) for c in calls), default=0)
    for r in rewards:
        ts = _micros(r["timestamp"])
        r["delay_s"] = (ts - end_us) / 1e6 if end_us else None
    rewards.sort(key=lambda r: _micros(r["timestamp"]))
    group_size, advantage = 0, None
    if summary.group:
        members = [m.reward() for m in index.group_members(summary.group)]
        values_ = [v for v in members if v is not None]
        group_size = len(members)
        mine = summary.reward()
        if mine is not None and len(values_) >= 2:
            sd = statistics.pstdev(values_)
            advantage = (mine - statistics.fmean(values_)) / (sd + 1e-6)
    return RolloutPage(summary, lifecycle, calls, rewards, transitions, summary.late,
                       sum(1 for ref in refs if not ref[0].endswith("late-events")) - len(values),
                       end_us, group_size, advantage, tokens.error)


def fmt_time(value: Any) -> str:
    """An event time (µs, or a datetime) as UTC, to the millisecond."""
    if not value:
        return "-"
    us = _micros(value)
    return datetime.fromtimestamp(us / 1e6, UTC).strftime("%Y-%m-%d %H:%M:%S.%f")[:-3]
