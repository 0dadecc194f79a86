"""Structured output: constrained decoding in the engine, ``response_format`` over HTTP, and model names.

The tiny model is random, so every schema here terminates (booleans, enums, bounded integers,
no extra properties) and each test gives ``max_tokens`` room to finish.
"""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Literal

import jsonschema
import pytest
import torch
from openai import OpenAI
from pydantic import BaseModel, Field
from starlette.testclient import TestClient
from transformers import AutoModelForCausalLM, AutoTokenizer

from rollstream.errors import ConfigError, GrammarError
from rollstream.serving.config import ServeSettings
from rollstream.serving.engine import Engine, SamplingParams
from rollstream.serving.grammar import Grammars, output_grammar
from rollstream.serving.launch import ServerProcess
from rollstream.serving.scheduler import Scheduler
from rollstream.serving.server import PolicyServer, build_parser, settings_from_args
from rollstream.serving.tools import parse_calls

MESSAGES = [{"role": "user", "content": "Grade this answer."}]
VERDICT = {"type": "object", "properties": {"ok": {"type": "boolean"}, "grade": {"enum": ["a", "b", "c"]}},
           "required": ["ok", "grade"], "additionalProperties": False}
WEATHER = {"type": "object", "properties": {"city": {"type": "string", "enum": ["paris", "tokyo"]}},
           "required": ["city"], "additionalProperties": False}
TOOLS = [{"type": "function", "function": {"name": "get_weather", "parameters": WEATHER}}]


class Verdict(BaseModel):
    ok: bool
    grade: Literal["a", "b", "c"]
    score: int = Field(ge=0, le=9)


@pytest.fixture(scope="module")
def engine(tiny_model_dir: Path) -> Engine:
    torch.set_num_threads(1)
    return Engine(AutoModelForCausalLM.from_pretrained(tiny_model_dir), AutoTokenizer.from_pretrained(tiny_model_dir))


def prompt(engine: Engine) -> list[int]:
    ids: Any = engine.tokenizer.apply_chat_template(MESSAGES, add_generation_prompt=True, tokenize=True,
                                                    return_dict=False)
    return [int(i) for i in ids]


# --- the engine --------------------------------------------------------------------------


def test_constrained_rows_follow_the_grammar_and_others_are_untouched(engine: Engine) -> None:
    calls = output_grammar([("get_weather", WEATHER)])
    answer = output_grammar(schema=VERDICT)
    free = [SamplingParams(max_tokens=30, temperature=1.0, seed=s) for s in (1, 2)]
    alone = engine.generate([prompt(engine)] * 2, free)
    mixed = engine.generate([prompt(engine)] * 4, [free[0], SamplingParams(max_tokens=150, seed=3, grammar=calls),
                                                   free[1], SamplingParams(max_tokens=150, seed=4, grammar=answer)])
    assert [mixed[0].token_ids, mixed[2].token_ids] == [s.token_ids for s in alone]
    content, parsed = parse_calls("hermes", mixed[1].text)
    assert mixed[1].finish_reason == "stop" and content is None and parsed
    assert all(c.name == "get_weather" and json.loads(c.arguments)["city"] in ("paris", "tokyo") for c in parsed)
    assert mixed[3].finish_reason == "stop"
    jsonschema.validate(json.loads(mixed[3].text), VERDICT)


def test_reported_logprobs_are_the_unconstrained_models(engine: Engine) -> None:
    ids = prompt(engine)
    seq = engine.generate([ids], [SamplingParams(max_tokens=60, seed=7, grammar=output_grammar(schema=VERDICT))])[0]
    with torch.no_grad():
        logits = engine.model(torch.tensor([ids + seq.token_ids])).logits[0].float()
    raw = torch.log_softmax(logits, dim=-1)[len(ids) - 1:-1].gather(1, torch.tensor(seq.token_ids)[:, None])[:, 0]
    assert torch.allclose(raw, torch.tensor([t.logprob for t in seq.output]), atol=1e-4)


def test_a_complete_grammar_stops_the_row_and_max_tokens_still_cuts(engine: Engine) -> None:
    boolean, verdict = output_grammar(schema={"type": "boolean"}), output_grammar(schema=VERDICT)
    done, cut = engine.generate([prompt(engine)] * 2, [SamplingParams(max_tokens=50, seed=1, grammar=boolean),
                                                      SamplingParams(max_tokens=3, seed=1, grammar=verdict)])
    assert done.text in ("true", "false") and done.finish_reason == "stop"
    assert cut.finish_reason == "length" and len(cut.output) == 3


def test_end_tokens_are_allowed_once_the_grammar_may_end(engine: Engine) -> None:
    matcher = engine.grammars.matcher(output_grammar([("get_weather", WEATHER)], parallel=True))
    call = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "paris"}}\n</tool_call>'
    assert matcher.consume_tokens(engine.tokenizer.encode(call))
    logits = torch.zeros((1, engine.model.config.vocab_size))
    allowed = set((engine.grammars.mask(logits, [0], [matcher])[0] > float("-inf")).nonzero()[:, 0].tolist())
    assert engine.stop_ids <= allowed  # the row may end here, on any of the engine's end tokens ...
    assert "\n" in {engine.tokenizer.decode([t]) for t in allowed}  # ... or go on to another call


def test_grammars_compile_once_and_are_bounded(engine: Engine) -> None:
    grammars = Grammars(engine.tokenizer, engine.stop_ids, size=2)
    texts = [output_grammar(schema={"enum": [i]}) for i in range(3)]
    first, again = grammars.matcher(texts[0]), grammars.matcher(texts[0])
    assert first is not again and len(grammars._compiled) == 1
    for text in texts:
        grammars.matcher(text)
    assert list(grammars._compiled) == texts[1:]
    with pytest.raises(GrammarError, match="Invalid type"):
        grammars.matcher(output_grammar(schema={"type": "nope"}))


# --- response_format over HTTP -----------------------------------------------------------


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


@pytest.mark.integration
def test_parse_with_a_pydantic_model(client: OpenAI) -> None:
    for seed in (1, 2):
        resp = client.chat.completions.parse(model="tiny", messages=MESSAGES, response_format=Verdict,  # type: ignore
                                             max_tokens=100, seed=seed)
        assert isinstance(resp.choices[0].message.parsed, Verdict)
        assert resp.choices[0].finish_reason == "stop"


@pytest.mark.integration
def test_streamed_json_equals_the_whole_answer(client: OpenAI) -> None:
    fmt = {"type": "json_schema", "json_schema": {"name": "verdict", "schema": VERDICT, "strict": True}}
    kwargs: dict[str, Any] = {"model": "tiny", "messages": MESSAGES, "response_format": fmt, "max_tokens": 100,
                              "seed": 9, "extra_body": {"return_token_ids": True}}
    whole = client.chat.completions.create(**kwargs).choices[0]
    jsonschema.validate(json.loads(whole.message.content or ""), VERDICT)
    chunks = list(client.chat.completions.create(stream=True, **kwargs))
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == whole.message.content
    ids = [i for c in chunks if c.choices for i in (c.choices[0].token_ids or [])]  # type: ignore[attr-defined]
    assert ids == whole.token_ids  # type: ignore[attr-defined]


@pytest.mark.integration
def test_json_object_gives_objects(client: OpenAI) -> None:
    resp = client.chat.completions.create(model="tiny", messages=MESSAGES, response_format={"type": "json_object"},
                                          max_tokens=100, n=6, seed=1)
    stopped = [c for c in resp.choices if c.finish_reason == "stop"]
    assert stopped, [c.message.content for c in resp.choices]
    assert all(isinstance(json.loads(c.message.content or ""), dict) for c in stopped)
    assert all((c.message.content or "").startswith("{") for c in resp.choices)


@pytest.mark.integration
def test_tools_in_auto_mode_with_a_response_format_give_either(client: OpenAI) -> None:
    fmt = {"type": "json_schema", "json_schema": {"name": "verdict", "schema": VERDICT}}
    resp = client.chat.completions.create(model="tiny", messages=MESSAGES, tools=TOOLS, response_format=fmt,  # type: ignore
                                          max_tokens=120, n=6, seed=1)
    kinds = set()
    for choice in (c for c in resp.choices if c.finish_reason != "length"):
        if choice.message.tool_calls:
            assert choice.finish_reason == "tool_calls" and choice.message.content is None
            for call in choice.message.tool_calls:
                jsonschema.validate(json.loads(call.function.arguments), WEATHER)  # type: ignore[union-attr]
            kinds.add("calls")
        else:
            jsonschema.validate(json.loads(choice.message.content or ""), VERDICT)
            kinds.add("json")
    assert kinds, [c.message for c in resp.choices]


@pytest.mark.integration
@pytest.mark.parametrize(("fmt", "words"), [
    ({"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "nope"}}}, "Invalid type"),
    ({"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "integer", "minimum": 5,
                                                                      "maximum": 1}}}, "minimum"),
    ({"type": "json_schema", "json_schema": {"name": "x", "schema": 3}}, "must be an object"),
    ({"type": "json_schema"}, "json_schema"),
    ({"type": "grammar", "grammar": "start: x"}, '"grammar" is not supported'),
    ({"type": "regex"}, '"regex"'),
    ("json", "response_format"),
])
def test_bad_response_formats_are_400(policy_server: ServerProcess, fmt: Any, words: str) -> None:
    code, reply = post(policy_server, "/chat/completions", {"model": "tiny", "messages": MESSAGES,
                                                            "response_format": fmt})
    assert code == 400, reply
    assert reply["error"]["param"] == "response_format" and words in reply["error"]["message"], reply


@pytest.mark.integration
def test_text_response_format_is_free_text(client: OpenAI) -> None:
    plain = client.chat.completions.create(model="tiny", messages=MESSAGES, max_tokens=12, seed=4)
    text = client.chat.completions.create(model="tiny", messages=MESSAGES, max_tokens=12, seed=4,
                                          response_format={"type": "text"})
    assert text.choices[0].message.content == plain.choices[0].message.content


# --- model names -------------------------------------------------------------------------


@pytest.mark.integration
def test_get_a_model_by_name(policy_server: ServerProcess) -> None:
    with urllib.request.urlopen(policy_server.base_url + "/models/tiny") as resp:
        card = json.loads(resp.read())
    assert card["id"] == "tiny" and card["object"] == "model" and card["policy_version"] == 0
    with pytest.raises(urllib.error.HTTPError) as info:
        urllib.request.urlopen(policy_server.base_url + "/models/gpt-4o")
    assert info.value.code == 404
    error = json.loads(info.value.read())["error"]
    assert error["param"] == "model" and error["code"] == "model_not_found" and "gpt-4o" in error["message"]


@pytest.fixture(scope="module")
def in_process(tiny_model_dir: Path) -> Iterator[Any]:
    """A policy server in this process (real engine and routes), made by ``make(model_names, parser)``."""
    clients: list[TestClient] = []

    def make(model_names: tuple[str, ...], parser: Any = "hermes") -> OpenAI:
        engine = Engine(AutoModelForCausalLM.from_pretrained(tiny_model_dir),
                        AutoTokenizer.from_pretrained(tiny_model_dir))
        server = PolicyServer(Scheduler(engine, 1.0, 8, "tiny"), "tiny", 16, None, model_names, parser)
        http = TestClient(server.app(), base_url="http://serve")
        clients.append(http.__enter__())
        return OpenAI(base_url="http://serve/v1", api_key="unused", http_client=http, max_retries=0)

    yield make
    for http in clients:
        http.__exit__(None, None, None)


def test_aliases_are_answered_and_listed(in_process: Any) -> None:
    client = in_process(("alias-a", "alias-b"))
    assert [m.id for m in client.models.list().data] == ["tiny", "alias-a", "alias-b"]
    assert client.models.retrieve("alias-b").id == "alias-b"
    resp = client.chat.completions.create(model="alias-a", messages=MESSAGES, max_tokens=2)
    assert resp.model == "tiny"  # responses name the policy, whatever name the client used
    with pytest.raises(Exception, match="gpt-4o"):
        client.chat.completions.create(model="gpt-4o", messages=MESSAGES, max_tokens=2)


def test_any_name_and_no_tool_parser(in_process: Any) -> None:
    client = in_process(("*",), "none")
    assert client.models.retrieve("whatever").id == "whatever"
    assert [m.id for m in client.models.list().data] == ["tiny"]
    resp = client.chat.completions.create(model="gpt-4o", messages=MESSAGES, tools=TOOLS, max_tokens=2)  # type: ignore
    assert resp.choices[0].message.tool_calls is None
    with pytest.raises(Exception, match="tool-call parser"):
        client.chat.completions.create(model="gpt-4o", messages=MESSAGES, tools=TOOLS,  # type: ignore
                                       tool_choice="required", max_tokens=2)


def test_settings_and_options(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ROLLSTREAM_SERVE_MODEL_NAMES", " a, b ,,*")
    assert ServeSettings().model_names == ("a", "b", "*")
    assert settings_from_args(build_parser().parse_args(["--served-model-name", "x,y", "z"])).model_names == (
        "x", "y", "z")
    assert settings_from_args(build_parser().parse_args(["--tool-call-parser", "none"])).tool_call_parser == "none"
    monkeypatch.setenv("ROLLSTREAM_SERVE_TOOL_CALL_PARSER", "mistral")
    with pytest.raises(ConfigError, match="ROLLSTREAM_SERVE_TOOL_CALL_PARSER='mistral': choose one of hermes, none"):
        ServeSettings()
