"""The worker against the real stack with and without PROCESS_TOKENIZER: a call without token ids is
tokenized (tokenizer loaded from S3) and marked, or dead-lettered with the reason."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from sp_helpers import Pipe, call, lifecycle, reward
from test_retokenize import TOOLS, message, tool_call
from transformers import AutoTokenizer

from rollstream.settings import ConnectionSettings
from rollstream.storage import ObjectStore

pytestmark = [pytest.mark.integration, pytest.mark.slow]


def otel_call(rid: str) -> dict[str, Any]:
    """A chat call with a tool round in its history and a text answer, without token ids or logprobs."""
    record = call(
        rid, 1, tokens=False, tools_json=json.dumps(TOOLS), finish_reason="stop",
        messages=[message("user", "Weather in Paris?"),
                  message("assistant", None, tool_calls_json=json.dumps([tool_call("call_1", "Paris")])),
                  message("tool", "sunny", tool_call_id="call_1")],
    )
    record["response_text"], record["source"] = "It is sunny in Paris.", "otlp"
    return record


def send_rollout(pipe: Pipe, rid: str) -> dict[str, Any]:
    otel = otel_call(rid)
    for kind, record in [("call", call(rid, 0)), ("call", otel), ("reward", reward(rid, 1.0)),
                         ("rollout", lifecycle(rid, "SUCCEEDED"))]:
        getattr(pipe, kind)(record)
    pipe.flush()
    return otel


def test_calls_without_ids_are_tokenized_with_the_tokenizer_from_s3(
    pipe: Pipe, worker_factory: Callable[..., Any], tiny_model_dir: Path, store: ObjectStore, bucket: str,
    settings: ConnectionSettings,
) -> None:
    store.upload_dir(tiny_model_dir, f"s3://{bucket}/policy/")
    worker = worker_factory({"ROLLSTREAM_PROCESS_TOKENIZER": f"s3://{bucket}/policy",
                             "ROLLSTREAM_S3_ENDPOINT": settings.s3_endpoint})
    send_rollout(pipe, "ro-otel")
    got = {t["call_id"]: t for t in pipe.transitions(2, timeout=120, settle=1.0)}
    assert sorted(got) == ["c0", "c1"]
    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    history = [{"role": "user", "content": "Weather in Paris?"},
               {"role": "assistant", "content": None, "tool_calls": [
                   {"id": "call_1", "type": "function",
                    "function": {"name": "get_weather", "arguments": {"city": "Paris"}}}]},
               {"role": "tool", "content": "sunny", "tool_call_id": "call_1"}]
    prompt = list(tok.apply_chat_template(history, tools=TOOLS, add_generation_prompt=True, tokenize=True,
                                          return_dict=False))
    response = tok.encode("It is sunny in Paris.", add_special_tokens=False) + [tok.eos_token_id]
    otel = got["c1"]
    assert otel["token_source"] == "tokenizer" and otel["behaviour_logprobs"] is None
    assert (otel["prompt_token_ids"], otel["response_token_ids"]) == (prompt, response) and prompt and response
    assert (otel["reward"], otel["credited_return"]) == (1.0, 1.0)
    engine = got["c0"]
    assert engine["token_source"] == "engine" and engine["response_token_ids"] == [7, 0]
    stats = worker.wait_stats(lambda s: s["completed"] == 1)
    assert stats["tokenized_calls"] == 1 and stats["dead_letters"] == 0


def test_without_the_tokenizer_the_call_is_a_dead_letter_that_names_the_setting(
    pipe: Pipe, worker_factory: Callable[..., Any],
) -> None:
    worker = worker_factory()
    otel = send_rollout(pipe, "ro-otel")
    letters = pipe.dead_letters(1, timeout=120)
    assert letters[0]["error_type"] == "invalid_value"
    assert "no token ids" in letters[0]["reason"] and "ROLLSTREAM_PROCESS_TOKENIZER" in letters[0]["reason"]
    assert pipe.codec.decode(pipe.topics.calls, letters[0]["value"])["event_id"] == otel["event_id"]
    # The rest of the rollout still goes through.
    assert [t["call_id"] for t in pipe.transitions(1, settle=1.0)] == ["c0"]
    stats = worker.wait_stats(lambda s: s["completed"] == 1)
    assert stats["tokenized_calls"] == 0 and stats["dead_letters"] == 1
