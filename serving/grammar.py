"""Constrained decoding with llguidance: the grammars requests ask for, compiled once, and token masks.

A grammar is llguidance's definition text (a Lark grammar that may embed JSON schemas with
``%json``). It is what a row's ``SamplingParams.grammar`` carries; ``Grammars`` compiles each
distinct one once per tokenizer and hands every row a fresh matcher of it. JSON is generated
the way ``json.dumps`` and chat templates write it (``", "`` and ``": "``, no other
whitespace): a small model left free to add whitespace may never stop adding it.
"""

from __future__ import annotations

import json
import re
import threading
from collections import OrderedDict
from collections.abc import Sequence
from typing import Any

import llguidance
import llguidance.hf
import llguidance.torch
import torch
from transformers import PreTrainedTokenizerBase

from rollstream.errors import GrammarError
from rollstream.serving.tools import CLOSE, OPEN

JSON_LAYOUT = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}


def _literal(text: str) -> str:
    return json.dumps(text, ensure_ascii=False)


def _schema(schema: Any) -> dict[str, Any]:
    """``schema`` laid out compactly (its own ``x-guidance`` options win)."""
    if not isinstance(schema, dict):
        raise GrammarError(f"a JSON schema must be an object, got {json.dumps(schema)[:80]}")
    own = schema.get("x-guidance")
    return {**schema, "x-guidance": {**JSON_LAYOUT, **(own if isinstance(own, dict) else {})}}


def output_grammar(tools: Sequence[tuple[str, Any]] = (), parallel: bool = True, schema: Any = None) -> str:
    """Tool calls to ``tools`` ((name, parameters schema) pairs; several unless not ``parallel``),
    or JSON that ``schema`` validates, or either of the two when both are given."""
    if not tools and schema is not None:
        return str(llguidance.LLMatcher.grammar_from_json_schema(_schema(schema)))
    alternatives, rules = [], []
    if tools:
        calls = [_literal(OPEN + '\n{"name": ' + _literal(name) + ', "arguments": ') + " %json "
                 + json.dumps(_schema(params)) + " " + _literal("}\n" + CLOSE) for name, params in tools]
        rules.append("call: " + " | ".join(calls))
        rules.append('calls: call ("\\n" call)*' if parallel else "calls: call")
        alternatives.append("calls")
    if schema is not None:
        rules.append("answer: %json " + json.dumps(_schema(schema)))
        alternatives.append("answer")
    if not alternatives:
        raise ValueError("a grammar needs tools, a schema, or both")
    return str(llguidance.LLMatcher.grammar_from_lark("start: " + " | ".join(alternatives) + "\n" + "\n".join(rules)))


def _message(error: str) -> str:
    """llguidance's error on one line, without the listing of the Lark source that may follow it."""
    lines = []
    for line in error.strip().splitlines():
        if re.match(r"\s*\d+ \|", line):
            break
        lines.append(line.strip())
    return " ".join(line for line in lines if line)


class Grammars:
    """Grammars compiled for one tokenizer: llguidance's tokenizer built once, each grammar once (LRU)."""

    def __init__(self, tokenizer: PreTrainedTokenizerBase, stop_ids: set[int], size: int = 64) -> None:
        self.tokenizer = tokenizer
        self.stop_ids = sorted(stop_ids)
        self.size = size
        self._lltok: llguidance.LLTokenizer | None = None
        self._compiled: OrderedDict[str, llguidance.LLMatcher] = OrderedDict()
        self._lock = threading.Lock()  # requests compile on the event loop, rows copy on the engine's thread

    def _tokenizer(self) -> llguidance.LLTokenizer:
        if self._lltok is None:
            try:
                # Every end token the engine stops on may end a complete grammar.
                self._lltok = llguidance.hf.from_tokenizer(self.tokenizer, eos_token=self.stop_ids or None)  # type: ignore[arg-type]
            except ValueError as exc:
                raise GrammarError(f"constrained decoding needs a fast (Rust) tokenizer: {exc}") from exc
        return self._lltok

    def prepare(self) -> None:
        """Build llguidance's tokenizer now (about a second for a large vocabulary) rather than on a request."""
        with self._lock:
            self._tokenizer()

    def matcher(self, grammar: str) -> llguidance.LLMatcher:
        """A fresh matcher of ``grammar``; GrammarError (llguidance's message) when it does not compile."""
        with self._lock:
            compiled = self._compiled.get(grammar)
            if compiled is None:
                compiled = llguidance.LLMatcher(self._tokenizer(), grammar, log_level=0)
                if compiled.is_error():
                    raise GrammarError(_message(compiled.get_error()))
                self._compiled[grammar] = compiled
                while len(self._compiled) > self.size:
                    self._compiled.popitem(last=False)
            else:
                self._compiled.move_to_end(grammar)
            return compiled.deep_copy()

    def mask(self, logits: torch.Tensor, rows: list[int], matchers: list[llguidance.LLMatcher]) -> torch.Tensor:
        """A copy of ``logits`` where each of ``rows`` has the tokens its matcher forbids at -inf."""
        vocab = logits.shape[1]
        shape = llguidance.torch.get_bitmask_shape(len(rows), self._tokenizer().vocab_size)
        bitmask = torch.full(shape, -1, dtype=torch.int32)
        for j, matcher in enumerate(matchers):
            llguidance.torch.fill_next_token_bitmask(matcher, bitmask, j)
        bits = ((bitmask[:, :, None] >> torch.arange(32, dtype=torch.int32)) & 1).reshape(len(rows), -1).bool()
        if bits.shape[1] < vocab:  # logits past the tokenizer's vocabulary (padded embeddings) are never allowed
            bits = torch.cat([bits, bits.new_zeros((len(rows), vocab - bits.shape[1]))], dim=1)
        allowed = bits[:, :vocab].to(logits.device)
        masked = logits.clone()
        masked[rows] = logits[rows].masked_fill(~allowed, float("-inf"))
        return masked
