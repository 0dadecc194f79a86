"""Detokenizing while decoding, token bytes, the tiny model builder, and the server's settings."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
from transformers import AutoTokenizer, PreTrainedTokenizerBase

from rollstream.errors import ConfigError
from rollstream.serving.config import ServeSettings
from rollstream.serving.protocol import chat_prompt_ids
from rollstream.serving.text import Detokenizer, token_bytes
from rollstream.serving.tiny import build_tiny_model

TEXT = "Hello wörld ✓ 日本語 🙂 the agent answers."


@pytest.fixture(scope="module")
def tokenizer(tiny_model_dir: Path) -> PreTrainedTokenizerBase:
    return AutoTokenizer.from_pretrained(tiny_model_dir)


def test_released_text_adds_up_and_never_splits_a_character(tokenizer: PreTrainedTokenizerBase) -> None:
    detok = Detokenizer(tokenizer)
    pieces = [detok.push(i)[0] for i in tokenizer.encode(TEXT)]
    pieces.append(detok.flush())
    assert "".join(pieces) == TEXT
    assert not any("\ufffd" in p for p in pieces)


def test_stop_string_across_tokens_is_held_back_then_cut(tokenizer: PreTrainedTokenizerBase) -> None:
    detok = Detokenizer(tokenizer, stop=("agent ans",))
    released, hit = [], False
    for i in tokenizer.encode(TEXT):
        text, hit = detok.push(i)
        released.append(text)
        if hit:
            break
    assert hit
    assert "".join(released) == TEXT[:TEXT.index("agent ans")]


def test_token_bytes_join_to_the_utf8_text(tokenizer: PreTrainedTokenizerBase) -> None:
    assert b"".join(token_bytes(tokenizer, i) for i in tokenizer.encode(TEXT)) == TEXT.encode()


def test_tiny_model_is_cached_and_templates_tools(tmp_path: Path) -> None:
    path = build_tiny_model(tmp_path / "m", seed=3)
    started = time.monotonic()
    assert build_tiny_model(path, seed=3) == path
    assert time.monotonic() - started < 0.5
    tokenizer = AutoTokenizer.from_pretrained(path)
    tools = [{"type": "function", "function": {"name": "get_weather"}}]
    ids = chat_prompt_ids(tokenizer, [{"role": "user", "content": "hi"}], tools)
    text = tokenizer.decode(ids)
    assert "get_weather" in text and text.endswith("<|im_start|>assistant\n")
    assert "<|im_start|>" in tokenizer.all_special_tokens and tokenizer.pad_token == "<|pad|>"


def test_serve_settings_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ROLLSTREAM_SERVE_PORT", "9123")
    monkeypatch.setenv("ROLLSTREAM_SERVE_UPDATES", "0")
    monkeypatch.setenv("ROLLSTREAM_TOPIC_PREFIX", "x.")
    s = ServeSettings()
    assert (s.port, s.updates, s.connection.topic_prefix, s.host) == (9123, False, "x.", "127.0.0.1")
    monkeypatch.setenv("ROLLSTREAM_SERVE_MAX_BATCH", "0")
    with pytest.raises(ConfigError, match="ROLLSTREAM_SERVE_MAX_BATCH"):
        ServeSettings()
