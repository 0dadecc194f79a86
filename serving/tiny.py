"""Tiny causal LMs built in code, for tests, demos and benchmarks (no model hub needed).

``build_tiny_model`` trains a byte-level BPE tokenizer on a small generated corpus (well
under a second), wraps it as a ``PreTrainedTokenizerFast`` with a ChatML chat template
that understands ``tools``, and saves it beside a randomly initialised Qwen2-style model.
The weights are random: the text is gibberish, but token ids, logprobs, batching, chat
templating and reloading behave exactly as with a real model.
"""

from __future__ import annotations

import json
import logging
import random
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import GenerationConfig, PreTrainedTokenizerFast, Qwen2Config, Qwen2ForCausalLM

log = logging.getLogger(__name__)

MARKER = "rollstream-tiny.json"
SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|pad|>"]

# ChatML with Hermes-style tool calls, as Qwen2.5 renders them: tools are listed in the system turn;
# an assistant turn's tool calls follow its text as <tool_call>{"name": ..., "arguments": {...}}</tool_call>
# blocks (arguments given as a JSON string are written as they are, an object as JSON), which is also
# the format the server's "hermes" tool-call parser reads back from the model's output.
CHAT_TEMPLATE = (
    "{%- if tools %}"
    "{{- '<|im_start|>system\\n' }}"
    "{%- if messages[0].role == 'system' %}{{- messages[0].content + '\\n\\n' }}{%- endif %}"
    "{{- '# Tools\\nYou may call these functions:\\n<tools>\\n' }}"
    "{%- for tool in tools %}{{- tool | tojson + '\\n' }}{%- endfor %}"
    "{{- '</tools><|im_end|>\\n' }}"
    "{%- endif %}"
    "{%- for message in messages %}"
    "{%- if not (tools and loop.first and message.role == 'system') %}"
    "{{- '<|im_start|>' + message.role + '\\n' + (message.content or '') }}"
    "{%- if message.tool_calls %}{%- for call in message.tool_calls %}"
    "{%- set fn = call.function if call.function is defined else call %}"
    "{%- if message.content or not loop.first %}{{- '\\n' }}{%- endif %}"
    "{{- '<tool_call>\\n{\"name\": \"' + fn.name + '\", \"arguments\": ' }}"
    "{{- fn.arguments if fn.arguments is string else fn.arguments | tojson }}"
    "{{- '}\\n</tool_call>' }}"
    "{%- endfor %}{%- endif %}"
    "{{- '<|im_end|>\\n' }}"
    "{%- endif %}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)

_WORDS = (
    "the a an agent policy reward rollout call model token stream kafka train step value "
    "search tool answer question user assistant system function result error retry plan "
    "think write read file code test pass fail score good bad one two three four five "
    "hello world what is how why when where which yes no maybe done ok please thanks "
    "weather city paris london tokyo temperature sunny rain cloud number sum add multiply"
).split()


def _corpus(seed: int, lines: int = 2000) -> list[str]:
    rng = random.Random(seed)
    out = []
    for _ in range(lines):
        words = [rng.choice(_WORDS) for _ in range(rng.randint(3, 12))]
        if rng.random() < 0.3:
            words.append(str(rng.randint(0, 999)))
        sentence = " ".join(words)
        out.append(sentence.capitalize() + rng.choice([".", "?", "!", ","]))
    out += ['{"name": "get_weather", "arguments": {"city": "Paris"}}', "<tool_call>", "</tool_call>"]
    out += ["héllo wörld ✓ 日本語 🙂"]  # multi-byte characters, so byte-level merges are exercised
    return out


def build_tokenizer(vocab_size: int = 512, seed: int = 0) -> PreTrainedTokenizerFast:
    """A byte-level BPE tokenizer trained on a generated corpus, with ChatML special tokens."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_corpus(seed), trainer=trainer)
    wrapped = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token="<|im_end|>",
        pad_token="<|pad|>",
        additional_special_tokens=["<|endoftext|>", "<|im_start|>"],
        clean_up_tokenization_spaces=False,
        model_max_length=2048,
    )
    wrapped.chat_template = CHAT_TEMPLATE
    return wrapped


def _is_built(path: Path, spec: dict[str, int]) -> bool:
    marker = path / MARKER
    if not marker.is_file():
        return False
    try:
        return bool(json.loads(marker.read_text()) == spec)
    except (OSError, ValueError):
        return False


def build_tiny_model(
    path: Path,
    seed: int = 0,
    hidden_size: int = 64,
    num_layers: int = 2,
    num_heads: int = 4,
    vocab_size: int = 512,
) -> Path:
    """Save a tiny Qwen2-style causal LM and its tokenizer under ``path``; returns ``path``.

    Cached: when ``path`` already holds a model built with the same arguments, nothing is
    rebuilt. Different seeds give different weights (and the same tokenizer).
    """
    spec = {"seed": seed, "hidden_size": hidden_size, "num_layers": num_layers, "num_heads": num_heads,
            "vocab_size": vocab_size}
    path = Path(path)
    if _is_built(path, spec):
        return path
    path.mkdir(parents=True, exist_ok=True)
    tokenizer = build_tokenizer(vocab_size)
    eos_ids = [int(tokenizer.convert_tokens_to_ids(t)) for t in ("<|im_end|>", "<|endoftext|>")]  # type: ignore[arg-type]
    config = Qwen2Config(
        vocab_size=len(tokenizer),
        hidden_size=hidden_size,
        intermediate_size=hidden_size * 2,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        num_key_value_heads=max(1, num_heads // 2),
        max_position_embeddings=2048,
        tie_word_embeddings=True,
        # Larger than the usual 0.02 so that the random model has peaked, varied outputs.
        initializer_range=0.2,
        bos_token_id=None,
        eos_token_id=eos_ids,
        pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(seed)
    model = Qwen2ForCausalLM(config)
    model.generation_config = GenerationConfig(eos_token_id=eos_ids, pad_token_id=tokenizer.pad_token_id)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    (path / MARKER).write_text(json.dumps(spec))
    log.info("built a tiny model (seed %d, %d parameters) in %s", seed, model.num_parameters(), path)
    return path
