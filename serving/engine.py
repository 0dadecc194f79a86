"""The batched decode loop: padded generation over a Hugging Face causal LM with a KV cache.

Rows are left-padded so that every row's next token sits in the last column; each row
carries its own position ids, sampling parameters (temperature, top_p, a seeded
``torch.Generator``), ``max_tokens`` and stop strings, and finishes on its own. A running
batch can take in new rows between steps (continuous batching): they are prefilled on
their own and their KV cache is left-padded onto the running one.

Logprobs are ``log_softmax`` of the model's raw logits, before temperature and top_p:
the behaviour policy's own distribution, which is what importance-weighted policy
gradients need. The logprob of every sampled token is always computed.

A row may be constrained by a grammar (``SamplingParams.grammar``: tool calls, JSON): before
sampling, the tokens its matcher forbids are masked out of that row's logits, and each sampled
token is fed to the matcher; the row ends ("stop") once the grammar is complete and admits no
more, or on an end token it allows. The reported logprobs stay those of the unmasked model: the
trainer recomputes logprobs with the unconstrained model, and the two must agree. A batch without
a constrained row does no mask work.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal, cast

import torch
from transformers import DynamicCache, PreTrainedModel, PreTrainedTokenizerBase
from transformers.cache_utils import DynamicLayer

from rollstream.serving.grammar import Grammars
from rollstream.serving.text import Detokenizer

log = logging.getLogger(__name__)

FinishReason = Literal["stop", "length", "abort"]


@dataclass(frozen=True)
class SamplingParams:
    """Per-row sampling settings, as an OpenAI request gives them."""

    max_tokens: int = 16
    temperature: float = 1.0  # 0: greedy
    top_p: float = 1.0
    seed: int | None = None  # same seed, same output
    stop: tuple[str, ...] = ()
    top_logprobs: int = 0  # alternatives reported per token
    grammar: str | None = None  # llguidance grammar the output must follow (see serving.grammar)


@dataclass(frozen=True)
class TokenLogprob:
    token_id: int
    logprob: float
    top: tuple[tuple[int, float], ...] = ()  # (token id, logprob), most likely first


@dataclass(frozen=True)
class Delta:
    """What one row produced in one step: released text, the tokens of the step, and the end."""

    index: int
    text: str
    tokens: tuple[TokenLogprob, ...]
    finish_reason: FinishReason | None


Sink = Callable[[Delta], None]


@dataclass
class Sequence:
    """One row: a prompt, how to sample it, what it has produced, and where deltas go."""

    prompt_ids: list[int]
    params: SamplingParams
    index: int = 0
    sink: Sink | None = None
    generator: torch.Generator | None = None
    output: list[TokenLogprob] = field(default_factory=list)
    text: str = ""
    finish_reason: FinishReason | None = None
    cancelled: bool = False  # set from another thread: stop at the next step
    detok: Detokenizer | None = None
    matcher: Any = None  # llguidance.LLMatcher of params.grammar

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None

    @property
    def token_ids(self) -> list[int]:
        return [t.token_id for t in self.output]


@dataclass
class Batch:
    """Rows decoding together, with their shared KV cache and attention mask."""

    seqs: list[Sequence]
    cache: DynamicCache
    mask: torch.Tensor  # (rows, cached tokens): 1 where a real token is, 0 for left padding
    positions: torch.Tensor  # (rows,) position id of each row's next input token
    next_ids: torch.Tensor  # (rows,) the token each row feeds in next

    def __len__(self) -> int:
        return len(self.seqs)


class Engine:
    """One model (at one policy version) and the decode steps over it; not thread-safe."""

    def __init__(self, model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, version: int = 0) -> None:
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.version = version
        self.device = next(model.parameters()).device
        self.stop_ids = _stop_token_ids(model, tokenizer)
        pad = tokenizer.pad_token_id
        self.pad_id = int(pad if pad is not None else min(self.stop_ids, default=0))
        self.max_context = int(getattr(model.config, "max_position_embeddings", 0) or 1 << 30)
        # Merging caches needs plain full-attention layers; other caches decode in fixed batches.
        self.can_merge = all(type(layer) is DynamicLayer for layer in self._new_cache().layers)
        self.grammars = Grammars(tokenizer, self.stop_ids)

    def _new_cache(self) -> DynamicCache:
        return DynamicCache(config=self.model.config)

    def new_sequence(self, prompt_ids: list[int], params: SamplingParams, index: int = 0,
                     sink: Sink | None = None) -> Sequence:
        gen = torch.Generator(device=self.device)
        if params.seed is None:
            gen.seed()
        else:
            gen.manual_seed(params.seed)
        detok = Detokenizer(self.tokenizer, params.stop)
        matcher = self.grammars.matcher(params.grammar) if params.grammar is not None else None
        return Sequence(list(prompt_ids), params, index, sink, gen, detok=detok, matcher=matcher)

    @torch.inference_mode()
    def prefill(self, seqs: list[Sequence]) -> Batch:
        """Run the prompts of ``seqs`` (left-padded) and sample each row's first token."""
        longest = max(len(s.prompt_ids) for s in seqs)
        ids = torch.full((len(seqs), longest), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(seqs), longest), dtype=torch.long)
        for row, seq in enumerate(seqs):
            ids[row, longest - len(seq.prompt_ids):] = torch.tensor(seq.prompt_ids, dtype=torch.long)
            mask[row, longest - len(seq.prompt_ids):] = 1
        ids, mask = ids.to(self.device), mask.to(self.device)
        position_ids = (mask.cumsum(-1) - 1).clamp(min=0)
        cache = self._new_cache()
        out = self.model(input_ids=ids, attention_mask=mask, position_ids=position_ids, past_key_values=cache,
                         use_cache=True, logits_to_keep=1)
        batch = Batch(seqs, out.past_key_values, mask, mask.sum(-1), ids[:, -1])
        self._advance(batch, out.logits[:, -1, :])
        return batch

    @torch.inference_mode()
    def step(self, batch: Batch) -> None:
        """Feed every row its last token and sample the next one."""
        batch.mask = torch.cat([batch.mask, batch.mask.new_ones((len(batch), 1))], dim=1)
        out = self.model(input_ids=batch.next_ids[:, None], attention_mask=batch.mask,
                         position_ids=batch.positions[:, None], past_key_values=batch.cache, use_cache=True)
        batch.cache = out.past_key_values
        batch.positions = batch.positions + 1
        self._advance(batch, out.logits[:, -1, :])

    def _advance(self, batch: Batch, logits: torch.Tensor) -> None:
        logits = logits.float()
        logprobs = torch.log_softmax(logits, dim=-1)
        constrained = [i for i, s in enumerate(batch.seqs) if s.matcher is not None and not s.finished]
        if constrained:
            logits = self.grammars.mask(logits, constrained, [batch.seqs[i].matcher for i in constrained])
        chosen = sample(logits, [s.params for s in batch.seqs], [s.generator for s in batch.seqs])
        k = max(s.params.top_logprobs for s in batch.seqs)
        top_vals, top_ids = (logprobs.topk(k, dim=-1) if k else (None, None))
        chosen_lp = logprobs.gather(1, chosen[:, None])[:, 0].tolist()
        chosen_ids = chosen.tolist()
        for row, seq in enumerate(batch.seqs):
            if seq.finished:
                continue
            top: tuple[tuple[int, float], ...] = ()
            if seq.params.top_logprobs and top_ids is not None and top_vals is not None:
                n = seq.params.top_logprobs
                top = tuple(zip(top_ids[row, :n].tolist(), top_vals[row, :n].tolist(), strict=True))
            token = TokenLogprob(chosen_ids[row], chosen_lp[row], top)
            self._append(seq, token, len(seq.prompt_ids) + len(seq.output) + 1)
        batch.next_ids = chosen

    def _append(self, seq: Sequence, token: TokenLogprob, total_len: int) -> None:
        seq.output.append(token)
        assert seq.detok is not None
        is_stop_token = token.token_id in self.stop_ids
        text, hit_stop = seq.detok.push(token.token_id, skip=is_stop_token)
        reason: FinishReason | None = None
        grammar_done = False
        if seq.matcher is not None:
            if not seq.matcher.consume_token(token.token_id):  # the mask allowed it: a matcher bug
                log.warning("grammar matcher refused token %d: %s", token.token_id, seq.matcher.get_error())
            grammar_done = seq.matcher.is_stopped()
        if hit_stop or is_stop_token or grammar_done:
            reason = "stop"
        elif len(seq.output) >= seq.params.max_tokens or total_len >= self.max_context:
            reason = "length"
        elif seq.cancelled:
            reason = "abort"
        if reason is not None:
            text += seq.detok.flush()
            seq.finish_reason = reason
        seq.text += text
        if seq.sink is not None:
            seq.sink(Delta(seq.index, text, (token,), reason))

    def drop_finished(self, batch: Batch) -> Batch | None:
        """The batch without its finished rows (None when none is left)."""
        for seq in batch.seqs:
            if seq.cancelled and not seq.finished:
                seq.finish_reason = "abort"
                if seq.sink is not None:
                    seq.sink(Delta(seq.index, "", (), "abort"))
        keep = [i for i, s in enumerate(batch.seqs) if not s.finished]
        if not keep:
            return None
        if len(keep) == len(batch):
            return batch
        idx = torch.tensor(keep, dtype=torch.long, device=self.device)
        batch.cache.batch_select_indices(idx)
        mask = batch.mask[idx]
        start = int((mask.sum(0) > 0).nonzero()[0].item()) if self.can_merge else 0
        if start:  # columns where every remaining row is padding carry nothing: cut them off
            for layer in _layers(batch.cache):
                layer.keys, layer.values = _kv(layer)[0][:, :, start:], _kv(layer)[1][:, :, start:]
        return Batch([batch.seqs[i] for i in keep], batch.cache, mask[:, start:], batch.positions[idx],
                     batch.next_ids[idx])

    def merge(self, a: Batch, b: Batch) -> Batch:
        """One batch of the rows of ``a`` and ``b``: the shorter cache is left-padded."""
        if not self.can_merge:
            raise ValueError("this model's cache layers cannot be merged; decode in fixed batches")
        width = max(a.mask.shape[1], b.mask.shape[1])
        for layer_a, layer_b in zip(_layers(a.cache), _layers(b.cache), strict=True):
            (keys_a, values_a), (keys_b, values_b) = _kv(layer_a), _kv(layer_b)
            layer_a.keys = torch.cat([_left_pad(keys_a, width, 2), _left_pad(keys_b, width, 2)])
            layer_a.values = torch.cat([_left_pad(values_a, width, 2), _left_pad(values_b, width, 2)])
        mask = torch.cat([_left_pad(a.mask, width, 1), _left_pad(b.mask, width, 1)])
        return Batch(a.seqs + b.seqs, a.cache, mask, torch.cat([a.positions, b.positions]),
                     torch.cat([a.next_ids, b.next_ids]))

    def generate(self, prompts: list[list[int]], params: list[SamplingParams]) -> list[Sequence]:
        """Decode ``prompts`` as one batch to the end (no scheduler): for tests and baselines."""
        seqs = [self.new_sequence(p, sp, i) for i, (p, sp) in enumerate(zip(prompts, params, strict=True))]
        batch: Batch | None = self.prefill(seqs)
        while batch is not None:
            batch = self.drop_finished(batch)
            if batch is not None:
                self.step(batch)
        return seqs


def _layers(cache: DynamicCache) -> list[DynamicLayer]:
    return [cast(DynamicLayer, layer) for layer in cache.layers]


def _kv(layer: DynamicLayer) -> tuple[torch.Tensor, torch.Tensor]:
    assert layer.keys is not None and layer.values is not None
    return layer.keys, layer.values


def _left_pad(t: torch.Tensor, width: int, dim: int) -> torch.Tensor:
    missing = width - t.shape[dim]
    if missing <= 0:
        return t
    shape = list(t.shape)
    shape[dim] = missing
    return torch.cat([t.new_zeros(shape), t], dim=dim)


def sample(logits: torch.Tensor, params: list[SamplingParams],
           generators: list[torch.Generator | None]) -> torch.Tensor:
    """One token per row: greedy where temperature is 0, else nucleus sampling with the row's generator."""
    chosen = logits.argmax(dim=-1)
    rows = [i for i, p in enumerate(params) if p.temperature > 0]
    if not rows:
        return chosen
    temps = torch.tensor([params[i].temperature for i in rows], device=logits.device)[:, None]
    top_p = torch.tensor([params[i].top_p for i in rows], device=logits.device)[:, None]
    probs = torch.softmax(logits[rows] / temps, dim=-1)
    sorted_probs, order = probs.sort(dim=-1, descending=True)
    # Keep the smallest prefix whose mass reaches top_p (the first token always stays).
    drop = sorted_probs.cumsum(-1) - sorted_probs >= top_p
    sorted_probs = sorted_probs.masked_fill(drop, 0.0)
    for j, row in enumerate(rows):
        pick = torch.multinomial(sorted_probs[j], 1, generator=generators[row])
        chosen[row] = order[j, pick[0]]
    return chosen


def _stop_token_ids(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase) -> set[int]:
    ids: set[int] = set()
    for source in (getattr(model, "generation_config", None), model.config, tokenizer):
        value: Any = getattr(source, "eos_token_id", None)
        if isinstance(value, int):
            ids.add(value)
        elif isinstance(value, list | tuple):
            ids.update(int(v) for v in value)
    return ids
