"""Tool calls: the hermes parser on strings (whole and streamed), and ``tool_choice`` over HTTP.

The HTTP tests drive a real ``rollstream serve`` on the random tiny model with the OpenAI
client. Its text is gibberish, so the tool schemas keep generated arguments short (enums,
bounded integers, booleans): under a grammar the output always terminates.
"""

from __future__ import annotations

import json
import random
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import jsonschema
import pytest
from openai import OpenAI
from transformers import AutoTokenizer

from rollstream.serving.launch import ServerProcess
from rollstream.serving.protocol import chat_prompt_ids
from rollstream.serving.tools import HermesStream, ToolCall, parse_calls, split

WEATHER = {"type": "object", "properties": {"city": {"type": "string", "enum": ["paris", "tokyo", "london"]},
                                            "days": {"type": "integer", "minimum": 1, "maximum": 7}},
           "required": ["city", "days"], "additionalProperties": False}
ALARM = {"type": "object", "properties": {"on": {"type": "boolean"}}, "required": ["on"], "additionalProperties": False}
TOOLS = [{"type": "function", "function": {"name": "get_weather", "description": "Weather", "parameters": WEATHER}},
         {"type": "function", "function": {"name": "set_alarm", "parameters": ALARM}}]
SCHEMAS = {"get_weather": WEATHER, "set_alarm": ALARM}
MESSAGES = [{"role": "user", "content": "What is the weather in Paris?"}]

CALL = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>'
CALL2 = '<tool_call>\n{"name": "set_alarm", "arguments": {"on": true}}\n</tool_call>'
BAD = '<tool_call>\n{"name": "get_weather", "arguments": {"city": Paris}}\n</tool_call>'


def calls_of(calls: list[ToolCall]) -> list[tuple[str, Any]]:
    return [(c.name, json.loads(c.arguments)) for c in calls]


# --- the parser, on strings --------------------------------------------------------------


def test_text_then_a_call() -> None:
    content, calls = parse_calls("hermes", "Let me look that up.\n" + CALL)
    assert content == "Let me look that up."
    assert calls_of(calls) == [("get_weather", {"city": "Paris"})]
    assert calls[0].id.startswith("call_") and int(calls[0].id[5:], 16) >= 0
    assert calls[0].to_openai() == {"id": calls[0].id, "type": "function",
                                    "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}


def test_several_calls_and_no_text() -> None:
    content, calls = parse_calls("hermes", CALL + "\n" + CALL2)
    assert content is None
    assert calls_of(calls) == [("get_weather", {"city": "Paris"}), ("set_alarm", {"on": True})]
    assert len({c.id for c in calls}) == 2


def test_invalid_json_stays_text() -> None:
    assert parse_calls("hermes", BAD) == (BAD, [])
    content, calls = parse_calls("hermes", "Hm.\n" + BAD + "\n" + CALL2)
    assert content == "Hm.\n" + BAD and calls_of(calls) == [("set_alarm", {"on": True})]
    # JSON that is not a call (no name, arguments not an object) stays text too.
    for block in ('<tool_call>\n{"arguments": {}}\n</tool_call>', '<tool_call>\n[1, 2]\n</tool_call>',
                  '<tool_call>{"name": "f", "arguments": "x"}</tool_call>'):
        assert parse_calls("hermes", block) == (block, [])


def test_output_without_calls_is_its_own_content() -> None:
    for text in ["", "  plain text \n", "a < b and <tool but no call", "<tool_call>"]:
        assert parse_calls("hermes", text) == (text, [])
    assert parse_calls("none", "x\n" + CALL) == ("x\n" + CALL, [])


def test_an_unclosed_last_block_is_a_call_only_when_its_json_is_whole() -> None:
    whole = CALL[:-len("</tool_call>")]
    assert calls_of(parse_calls("hermes", whole)[1]) == [("get_weather", {"city": "Paris"})]
    cut = CALL[:30]
    assert parse_calls("hermes", cut) == (cut, [])


def test_calls_and_their_whitespace_shrink_to_the_whitespace_before_them() -> None:
    assert parse_calls("hermes", "before " + CALL + "\n" + CALL2 + "\n after")[0] == "before after"
    assert parse_calls("hermes", "a\n" + CALL + "\nb ")[0] == "a\nb "
    assert parse_calls("hermes", "a \n" + CALL + "\n\n")[0] == "a"


def test_arguments_missing_are_an_empty_object() -> None:
    _, calls = parse_calls("hermes", '<tool_call>\n{"name": "ping"}\n</tool_call>')
    assert calls_of(calls) == [("ping", {})]


OUTPUTS = ["Let me look that up.\n" + CALL, CALL + "\n" + CALL2, "Hm.\n" + BAD + "\n" + CALL2 + "\n",
           "no calls < here <tool_ca", "  spaced out  ", "before " + CALL + " after", CALL[:-3],
           "ü 日本 " + CALL2, "<tool_call><tool_call>" + CALL]


@pytest.mark.parametrize("text", OUTPUTS)
def test_streaming_over_any_split_releases_the_same(text: str) -> None:
    whole_content, whole_calls = parse_calls("hermes", text)
    rng = random.Random(text)
    splits = [list(text)] + [_random_split(text, rng) for _ in range(30)]
    for pieces in splits:
        stream = HermesStream()
        released: list[str | ToolCall] = []
        for piece in pieces:
            released += stream.push(piece)
            # Nothing released is taken back: content so far begins the final content.
            assert (whole_content or "").startswith("".join(p for p in released if isinstance(p, str)))
        content, calls = split(released + stream.finish())
        assert content == whole_content
        assert calls_of(calls) == calls_of(whole_calls)


def _random_split(text: str, rng: random.Random) -> list[str]:
    cuts = sorted(rng.sample(range(1, len(text)), min(len(text) - 1, rng.randint(1, 12)))) if len(text) > 1 else []
    return [text[a:b] for a, b in zip([0, *cuts], [*cuts, len(text)], strict=True)]


def test_stream_holds_back_a_possible_tag_and_whitespace() -> None:
    stream = HermesStream()
    assert stream.push("Hi <tool_c") == ["Hi"]
    assert stream.push("all>\n{\"name\": \"f\", ") == []
    out = stream.push('"arguments": {}}\n</tool_call>')
    assert len(out) == 1 and isinstance(out[0], ToolCall) and out[0].name == "f"
    assert stream.push("\n") == [] and stream.finish() == []
    stream = HermesStream()
    assert stream.push("x <tool") == ["x"] and stream.finish() == [" <tool"]


# --- tool_choice over HTTP ---------------------------------------------------------------

@pytest.fixture(scope="module")
def client(policy_server: ServerProcess) -> OpenAI:
    return OpenAI(base_url=policy_server.base_url, api_key="unused", max_retries=0, timeout=120)


def post(server: ServerProcess, path: str, body: dict[str, Any]) -> tuple[int, dict[str, Any]]:
    req = urllib.request.Request(server.base_url + path, data=json.dumps(body).encode(),
                                 headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=120) as resp:
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


def _check_calls(message: Any, names: set[str]) -> list[Any]:
    assert message.tool_calls, message
    for call in message.tool_calls:
        assert call.type == "function" and call.id.startswith("call_")
        assert call.function.name in names
        jsonschema.validate(json.loads(call.function.arguments), SCHEMAS[call.function.name])
    return list(message.tool_calls)


@pytest.mark.integration
def test_required_gives_valid_calls(client: OpenAI) -> None:
    resp = client.chat.completions.create(model="tiny", messages=MESSAGES, tools=TOOLS, tool_choice="required",
                                          max_tokens=200, n=3, seed=11)  # type: ignore[arg-type]
    for choice in resp.choices:
        assert choice.finish_reason == "tool_calls"
        assert choice.message.content is None
        _check_calls(choice.message, set(SCHEMAS))


@pytest.mark.integration
def test_named_function_gives_exactly_one_call_of_it(client: OpenAI) -> None:
    resp = client.chat.completions.create(
        model="tiny", messages=MESSAGES, tools=TOOLS, max_tokens=200, n=3, seed=5,  # type: ignore[arg-type]
        tool_choice={"type": "function", "function": {"name": "set_alarm"}})
    for choice in resp.choices:
        assert choice.finish_reason == "tool_calls"
        assert len(_check_calls(choice.message, {"set_alarm"})) == 1


@pytest.mark.integration
def test_no_parallel_calls_gives_one(client: OpenAI) -> None:
    resp = client.chat.completions.create(model="tiny", messages=MESSAGES, tools=TOOLS, tool_choice="required",
                                          parallel_tool_calls=False, max_tokens=200, n=4, seed=1)  # type: ignore
    assert all(len(_check_calls(c.message, set(SCHEMAS))) == 1 for c in resp.choices)


@pytest.mark.integration
@pytest.mark.parametrize("tool_choice", ["required", {"type": "function", "function": {"name": "get_weather"}}])
def test_streamed_calls_equal_the_whole_answer(client: OpenAI, tool_choice: Any) -> None:
    kwargs: dict[str, Any] = {"model": "tiny", "messages": MESSAGES, "tools": TOOLS, "tool_choice": tool_choice,
                              "max_tokens": 200, "seed": 3, "logprobs": True,
                              "extra_body": {"return_token_ids": True}}
    whole = client.chat.completions.create(**kwargs).choices[0]
    chunks = list(client.chat.completions.create(stream=True, **kwargs))
    ids = [i for c in chunks if c.choices for i in (c.choices[0].token_ids or [])]  # type: ignore[attr-defined]
    assert ids == whole.token_ids  # type: ignore[attr-defined]
    logprobs = [e.logprob for c in chunks if c.choices and c.choices[0].logprobs
                for e in c.choices[0].logprobs.content or []]
    assert whole.logprobs is not None and logprobs == [e.logprob for e in whole.logprobs.content or []]
    assert len(logprobs) == len(ids)
    calls: dict[int, dict[str, str]] = {}
    for chunk in chunks:
        for delta in (chunk.choices[0].delta.tool_calls or []) if chunk.choices else []:
            call = calls.setdefault(delta.index, {"id": "", "name": "", "arguments": ""})
            call["id"] += delta.id or ""
            assert delta.function is not None
            call["name"] += delta.function.name or ""
            call["arguments"] += delta.function.arguments or ""
    assert whole.message.tool_calls
    assert [(c["name"], c["arguments"]) for _, c in sorted(calls.items())] == [
        (c.function.name, c.function.arguments) for c in whole.message.tool_calls]  # type: ignore[union-attr]
    assert all(c["id"].startswith("call_") for c in calls.values())
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == ""
    assert chunks[-1].choices[0].finish_reason == whole.finish_reason == "tool_calls"


@pytest.mark.integration
def test_tool_choice_none_leaves_the_tools_out(client: OpenAI, tiny_model_dir: Path) -> None:
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    resp = client.chat.completions.create(model="tiny", messages=MESSAGES, tools=TOOLS, tool_choice="none",
                                          max_tokens=8, extra_body={"return_token_ids": True})  # type: ignore
    assert resp.prompt_token_ids == chat_prompt_ids(tokenizer, MESSAGES)  # type: ignore[attr-defined]
    assert resp.choices[0].message.tool_calls is None
    auto = client.chat.completions.create(model="tiny", messages=MESSAGES, tools=TOOLS, max_tokens=8,  # type: ignore
                                          extra_body={"return_token_ids": True})
    assert auto.prompt_token_ids == chat_prompt_ids(tokenizer, MESSAGES, TOOLS)  # type: ignore[attr-defined]


@pytest.mark.integration
@pytest.mark.parametrize(("extra", "param", "words"), [
    ({"tool_choice": "required"}, "tool_choice", "needs 'tools'"),
    ({"tools": TOOLS, "tool_choice": {"type": "function", "function": {"name": "nope"}}}, "tool_choice", "'nope'"),
    ({"tools": TOOLS, "tool_choice": "sometimes"}, "tool_choice", "must be"),
    ({"tools": TOOLS, "tool_choice": {"type": "function"}}, "tool_choice", "must be"),
    ({"tools": [{"type": "function", "function": {"description": "no name"}}]}, "tools", "tools[0]"),
    ({"tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": "nope"}}}],
      "tool_choice": "required"}, "tools", "function 'f'"),
    ({"tools": TOOLS, "parallel_tool_calls": "yes"}, "parallel_tool_calls", "parallel_tool_calls"),
])
def test_bad_tool_requests_are_400_naming_the_field(policy_server: ServerProcess, extra: dict[str, Any], param: str,
                                                    words: str) -> None:
    code, reply = post(policy_server, "/chat/completions", {"model": "tiny", "messages": MESSAGES, **extra})
    assert code == 400, reply
    assert reply["error"]["param"] == param and words in reply["error"]["message"]
