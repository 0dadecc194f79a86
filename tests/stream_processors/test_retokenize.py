"""The tokenizer fallback for calls without token ids: the tokenization rule, and the processor's use of it."""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import orjson
import pytest
from confluent_kafka.schema_registry import Schema, SchemaRegistryClient
from sp_helpers import call, lifecycle, reward

from rollstream.errors import BadInputError, ConfigError
from rollstream.schemas import schema_text
from rollstream.schemas.codec import EventCodec, subject
from rollstream.schemas.topics import Topics
from rollstream.stream_processors.config import ProcessorSettings
from rollstream.stream_processors.join import RolloutState
from rollstream.stream_processors.metrics import Metrics
from rollstream.stream_processors.processor import Processor
from rollstream.stream_processors.retokenize import CallTokenizer, load_tokenizer

TOOLS = [{"type": "function", "function": {"name": "get_weather", "description": "Weather of a city",
                                           "parameters": {"type": "object",
                                                          "properties": {"city": {"type": "string"}}}}}]


def message(role: str, content: str | None, **extra: Any) -> dict[str, Any]:
    return {"role": role, "content": content, "name": None, "tool_call_id": None, "tool_calls_json": None, **extra}


def tool_call(call_id: str, city: str) -> dict[str, Any]:
    return {"id": call_id, "type": "function",
            "function": {"name": "get_weather", "arguments": json.dumps({"city": city})}}


def chat_call(rid: str = "ro-t", seq: int = 0, **extra: Any) -> dict[str, Any]:
    """A call as the OTLP receiver records it: messages, tools and a tool call, no token ids."""
    record = call(
        rid, seq, tokens=False, tools_json=extra.pop("tools_json", json.dumps(TOOLS)),
        messages=[
            message("system", "You help."),
            message("user", "Weather in Paris?"),
            message("assistant", None, tool_calls_json=json.dumps([tool_call("call_1", "Paris")])),
            message("tool", "sunny", tool_call_id="call_1"),
        ],
        response_tool_calls_json=json.dumps([tool_call("call_2", "London")]), finish_reason="tool_calls", **extra,
    )
    record["response_text"] = ""
    return record


@pytest.fixture(scope="module")
def tokenizer(tiny_model_dir: Path) -> CallTokenizer:
    return load_tokenizer(str(tiny_model_dir))


def test_chat_call_with_a_tool_message_and_a_tool_call(tokenizer: CallTokenizer) -> None:
    tok = tokenizer.tokenizer
    prompt, response = tokenizer.token_ids(chat_call())
    # The messages as a chat template takes them: tool-call arguments as objects, the tool message's call id.
    history = [
        {"role": "system", "content": "You help."},
        {"role": "user", "content": "Weather in Paris?"},
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": {"city": "Paris"}}}]},
        {"role": "tool", "content": "sunny", "tool_call_id": "call_1"},
    ]
    assert prompt == list(tok.apply_chat_template(history, tools=TOOLS, add_generation_prompt=True, tokenize=True,
                                                  return_dict=False))
    text = tok.decode(prompt)
    assert '"arguments": {"city": "Paris"}' in text and "<|im_start|>tool\nsunny<|im_end|>" in text
    assert text.endswith("<|im_start|>assistant\n") and '"name": "get_weather"' in text  # tools in the system turn
    # The response: the tool call as the template renders it in an assistant turn, then the end token.
    reply = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "London"}}\n</tool_call>'
    assert response == tok.encode(reply, add_special_tokens=False) + [tok.eos_token_id]

    with_text = chat_call()
    with_text["response_text"] = "Let me check."
    assert tokenizer.token_ids(with_text)[1] == tok.encode("Let me check.\n" + reply, add_special_tokens=False) + [
        tok.eos_token_id]


def test_completions_call_and_the_end_token_rule(tokenizer: CallTokenizer) -> None:
    tok = tokenizer.tokenizer
    record = call("ro-c", 0, tokens=False, endpoint="COMPLETIONS", prompt="The weather in Paris is",
                  finish_reason="length")
    record["response_text"] = " sunny and good"
    prompt, response = tokenizer.token_ids(record)
    assert prompt == tok("The weather in Paris is").input_ids
    assert response == tok.encode(" sunny and good", add_special_tokens=False)  # length: no end token
    record["finish_reason"] = "stop"
    assert tokenizer.token_ids(record)[1] == response + [tok.eos_token_id]


def test_a_template_that_does_not_continue_the_prompt_gets_the_text_alone(tokenizer: CallTokenizer) -> None:
    tok = copy.deepcopy(tokenizer.tokenizer)
    # The generation prompt opens a thinking block that the rendered assistant turn does not have.
    tok.chat_template = str(tok.chat_template).replace("'<|im_start|>assistant\\n' }}{%- endif %}",
                                                       "'<|im_start|>assistant\\n<think>\\n' }}{%- endif %}")
    record = chat_call()
    record["response_text"] = "Let me check."
    prompt, response = CallTokenizer(tok).token_ids(record)
    assert tok.decode(prompt).endswith("<|im_start|>assistant\n<think>\n")
    assert response == tok.encode("Let me check.", add_special_tokens=False) + [tok.eos_token_id]


def test_malformed_json_is_a_dead_letter_reason(tokenizer: CallTokenizer) -> None:
    with pytest.raises(BadInputError, match="call 'c0': tools_json is not JSON") as info:
        tokenizer.token_ids(chat_call(tools_json="[{oops"))
    assert info.value.error_type == "invalid_value"
    record = call("ro-c", 0, tokens=False, endpoint="COMPLETIONS", prompt=None, finish_reason="length")
    record["response_text"] = ""
    with pytest.raises(BadInputError, match="empty prompt"):
        tokenizer.token_ids(record)


def test_a_folder_that_is_not_a_tokenizer_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="ROLLSTREAM_PROCESS_TOKENIZER=.*is not a folder"):
        load_tokenizer(str(tmp_path / "missing"))
    with pytest.raises(ConfigError, match="cannot load a tokenizer"):
        load_tokenizer(str(tmp_path))


# --- the processor, offline (an in-process schema registry) ------------------------------------------------------


def offline_codec(topics: Topics) -> EventCodec:
    client = SchemaRegistryClient.new_client({"url": "mock://"})
    for spec in topics.specs():
        if spec.event_type is not None:
            client.register_schema(subject(spec.name), Schema(schema_text(spec.event_type), "AVRO"))
    return EventCodec(client, topics)


def run(proc: Processor, codec: EventCodec, events: list[tuple[str, dict[str, Any]]]) -> list[tuple[str, Any]]:
    """Feed ``events`` of one rollout through ``proc``; the (topic, decoded record) of every output."""
    state: bytes | None = None
    pieces: dict[str, bytes] = {}
    out = []
    for offset, (topic, record) in enumerate(events):
        decision = proc.handle(topic, 0, offset, record["rollout_id"].encode(), codec.encode(topic, record), state,
                               now=100.0 + offset, load=pieces.get)
        if isinstance(decision.state, bytes) and not decision.state.startswith(b"\x00"):
            state = decision.state
        pieces.update({pid: v for pid, v in decision.pieces if v is not None})
        out += [(o.topic, codec.decode(o.topic, o.value)) for o in decision.outputs]
    return out


def test_processor_tokenizes_calls_without_ids_and_marks_them(tokenizer: CallTokenizer) -> None:
    topics = Topics("offline.", 1)
    codec = offline_codec(topics)
    metrics = Metrics()
    proc = Processor(ProcessorSettings(), topics, codec, metrics, tokenizer=tokenizer)
    otel = chat_call("ro-t", 1)
    out = run(proc, codec, [(topics.calls, call("ro-t", 0)), (topics.calls, otel),
                            (topics.rollouts, lifecycle("ro-t", "SUCCEEDED")), (topics.rewards, reward("ro-t", 1.0))])
    got = {t["call_id"]: t for topic, t in out if topic == topics.transitions}
    assert sorted(got) == ["c0", "c1"]
    prompt, response = tokenizer.token_ids(otel)
    assert (got["c1"]["prompt_token_ids"], got["c1"]["response_token_ids"]) == (prompt, response)
    assert got["c1"]["token_source"] == "tokenizer" and got["c1"]["behaviour_logprobs"] is None
    engine = got["c0"]
    assert engine["token_source"] == "engine" and engine["prompt_token_ids"] == [1, 2, 0]
    assert engine["behaviour_logprobs"] == [-0.5, -0.25]
    assert metrics.counts["tokenized_calls"] == 1


def test_without_a_tokenizer_a_call_without_ids_is_a_dead_letter() -> None:
    topics = Topics("offline.", 1)
    codec = offline_codec(topics)
    proc = Processor(ProcessorSettings(), topics, codec, Metrics())
    out = run(proc, codec, [(topics.calls, chat_call("ro-d", 0))])
    assert [topic for topic, _ in out] == [topics.dead_letters]
    letter = out[0][1]
    assert letter["error_type"] == "invalid_value" and "has no token ids" in letter["reason"]
    assert "ROLLSTREAM_PROCESS_TOKENIZER" in letter["reason"]


def test_state_stored_before_token_source_loads_as_engine() -> None:
    entry = {"call_id": "c0", "attempt": 1, "sequence": 0, "agent_name": None, "policy": "pol",
             "policy_version": 3, "prompt_token_ids": [], "response_token_ids": [], "response_logprobs": None,
             "start_time": 1.0, "piece": True}
    old = orjson.dumps({"rollout_id": "r", "first_seen": 1.0, "last_seen": 1.0, "calls": [entry]})
    state = RolloutState.loads(old)
    assert state.calls[0].token_source == "engine"
    assert RolloutState.loads(state.dumps()).calls[0].token_source == "engine"
