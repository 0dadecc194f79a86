"""The Responses API and Anthropic Messages through the gateway as a process, with the official ``openai`` and
``anthropic`` clients, to the real policy server (which only speaks chat completions), with real Kafka."""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from collections.abc import Callable
from typing import Any

import anthropic
import openai
import pytest
from openai import OpenAI
from test_gateway_integration import GatewayProcess, events, gateway_factory  # noqa: F401 - a fixture

from rollstream.schemas.topics import Topics
from rollstream.settings import ConnectionSettings

pytestmark = [pytest.mark.integration, pytest.mark.slow]

SYSTEM = "You count."
ASK = "Count to three."
MAX_TOKENS = 8


def truth(policy_server: Any) -> dict[str, Any]:
    """What the policy server itself answers the chat form of the calls below (greedy, so the same each time)."""
    direct = OpenAI(base_url=policy_server.base_url, api_key="none")
    answer = direct.chat.completions.create(
        model=policy_server.policy, max_tokens=MAX_TOKENS, temperature=0, logprobs=True,
        messages=[{"role": "system", "content": SYSTEM}, {"role": "user", "content": ASK}],
        extra_body={"return_token_ids": True})
    choice = answer.choices[0]
    return {"text": choice.message.content, "prompt_token_ids": (answer.model_extra or {})["prompt_token_ids"],
            "token_ids": (choice.model_extra or {})["token_ids"], "finish_reason": choice.finish_reason,
            "logprobs": [t.logprob for t in choice.logprobs.content]}  # type: ignore[union-attr]


def check_calls(calls: list[dict[str, Any]], expected: dict[str, Any], endpoint: str, model: str) -> None:
    for call in calls:
        assert (call["endpoint"], call["model"]) == (endpoint, model)
        assert call["prompt_token_ids"] == expected["prompt_token_ids"] and call["prompt_token_ids"]
        assert call["response_token_ids"] == expected["token_ids"] and call["response_token_ids"]
        assert call["response_logprobs"] == pytest.approx(expected["logprobs"], abs=1e-4)
        assert call["response_text"] == expected["text"]
        assert [(m["role"], m["content"]) for m in call["messages"]] == [("system", SYSTEM), ("user", ASK)]
        assert call["sampling"]["max_tokens"] == MAX_TOKENS and call["policy"]


def post(url: str, body: dict[str, Any], headers: dict[str, str] | None = None) -> tuple[int, Any]:
    req = urllib.request.Request(url, data=json.dumps(body).encode(),
                                 headers={"Content-Type": "application/json", **(headers or {})})
    try:
        with urllib.request.urlopen(req, timeout=60) as resp:
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read())


def test_the_openai_client_calls_the_responses_api_and_each_call_is_captured_with_engine_token_ids(
    policy_server: Any, topics_factory: Callable[..., Topics], settings: ConnectionSettings,
    gateway_factory: Callable[..., GatewayProcess],  # noqa: F811
) -> None:
    topics = topics_factory()
    gw = gateway_factory(policy_server.base_url, topics)
    expected = truth(policy_server)
    client = OpenAI(base_url=f"{gw.url}/rollouts/r-resp/agents/solver/v1", api_key="none")
    params: dict[str, Any] = {"model": "gpt-4o", "instructions": SYSTEM, "input": ASK,
                              "max_output_tokens": MAX_TOKENS, "temperature": 0}

    raw = client.responses.with_raw_response.create(**params)
    assert raw.headers["x-policy-version"] is not None
    whole = raw.parse()
    assert whole.id.startswith("resp_") and whole.model == "gpt-4o" and whole.output_text == expected["text"]
    assert whole.status == ("incomplete" if expected["finish_reason"] == "length" else "completed")
    assert whole.usage is not None and whole.usage.output_tokens == len(expected["token_ids"])
    assert whole.usage.input_tokens == len(expected["prompt_token_ids"])

    streamed = list(client.responses.create(stream=True, **params))
    kinds = [e.type for e in streamed]
    assert kinds[:2] == ["response.created", "response.in_progress"]
    assert kinds[-1] == ("response.incomplete" if expected["finish_reason"] == "length" else "response.completed")
    assert [e.sequence_number for e in streamed] == list(range(len(streamed)))
    assert "".join(e.delta for e in streamed if e.type == "response.output_text.delta") == expected["text"]
    final = streamed[-1].response  # type: ignore[union-attr]
    assert final.output_text == expected["text"] and final.id == streamed[0].response.id  # type: ignore[union-attr]

    # The helper that accumulates the events (and checks their order) reads them too.
    with client.responses.stream(**params) as helper:
        texts = [e.delta for e in helper if e.type == "response.output_text.delta"]
    assert "".join(texts) == expected["text"]

    # Attributed by headers, and the 400s name the field.
    by_header = OpenAI(base_url=f"{gw.url}/v1", api_key="none", default_headers={"X-Rollout-Id": "r-head"})
    for bad, param in (({"previous_response_id": "resp_123"}, "previous_response_id"),
                       ({"tools": [{"type": "web_search"}]}, "tools[0].type"),
                       ({"input": [{"role": "user", "content": [
                           {"type": "input_image", "image_url": "https://example.com/cat.png"}]}]},
                        "input[0].content[0]")):
        with pytest.raises(openai.BadRequestError) as info:
            by_header.responses.create(**{**params, **bad})
        assert info.value.status_code == 400 and info.value.body["param"] == param  # type: ignore[index]
    assert by_header.models.retrieve("gpt-4o").id == "gpt-4o"

    calls = events(settings, topics, topics.calls, 3)
    assert {c["rollout_id"] for c in calls} == {"r-resp"} and len({c["call_id"] for c in calls}) == 3
    assert [c["sequence"] for c in sorted(calls, key=lambda c: c["sequence"])] == [0, 1, 2]
    assert all(c["agent_name"] == "solver" for c in calls)
    check_calls(calls, expected, "RESPONSES", "gpt-4o")
    assert gw.metric("rollstream_gateway_events_enqueued_total") == 3  # the refused calls are not recorded


def test_the_anthropic_client_calls_messages_with_its_x_api_key_and_each_call_is_captured(
    policy_server: Any, topics_factory: Callable[..., Topics], settings: ConnectionSettings,
    gateway_factory: Callable[..., GatewayProcess],  # noqa: F811
) -> None:
    topics = topics_factory()
    gw = gateway_factory(policy_server.base_url, topics, env={"ROLLSTREAM_GATEWAY_API_KEYS": "agent-key=models"})
    expected = truth(policy_server)
    client = anthropic.Anthropic(base_url=f"{gw.url}/rollouts/r-msg/agents/coder", api_key="agent-key")
    params: dict[str, Any] = {"model": "claude-sonnet-4-5", "max_tokens": MAX_TOKENS, "system": SYSTEM,
                              "messages": [{"role": "user", "content": ASK}], "extra_body": {"temperature": 0}}
    stop = "max_tokens" if expected["finish_reason"] == "length" else "end_turn"

    message = client.messages.create(**params)
    assert message.id.startswith("msg_") and message.model == "claude-sonnet-4-5" and message.role == "assistant"
    assert "".join(b.text for b in message.content if b.type == "text") == expected["text"]
    assert message.stop_reason == stop
    assert (message.usage.input_tokens, message.usage.output_tokens) == (len(expected["prompt_token_ids"]),
                                                                         len(expected["token_ids"]))

    with client.messages.stream(**params) as stream:
        text = "".join(stream.text_stream)
        final = stream.get_final_message()
    assert text == expected["text"] and final.stop_reason == stop
    assert final.usage.output_tokens == len(expected["token_ids"])

    with pytest.raises(anthropic.AuthenticationError):
        anthropic.Anthropic(base_url=f"{gw.url}/rollouts/r-msg", api_key="wrong").messages.create(**params)
    with pytest.raises(anthropic.BadRequestError) as info:
        client.messages.create(**{**params, "messages": [{"role": "user", "content": [
            {"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": "iVBORw0KGgo="}}]}]})
    assert info.value.body["error"]["type"] == "invalid_request_error"  # type: ignore[index]
    assert info.value.body["error"]["message"].startswith("messages.0.content.0: ")  # type: ignore[index]
    status, body = post(f"{gw.url}/rollouts/r-msg/v1/messages", {k: v for k, v in params.items()
                                                                 if k not in ("max_tokens", "extra_body")},
                        {"x-api-key": "agent-key"})
    assert status == 400 and body["type"] == "error" and body["error"]["message"].startswith("max_tokens: ")

    calls = events(settings, topics, topics.calls, 2)
    assert {c["rollout_id"] for c in calls} == {"r-msg"} and {c["agent_name"] for c in calls} == {"coder"}
    check_calls(calls, expected, "MESSAGES", "claude-sonnet-4-5")
    assert gw.metric("rollstream_gateway_events_enqueued_total") == 2


# The tiny model's output is random: the schema keeps the arguments it is constrained to short.
ADD = {"name": "add", "description": "Add two digits.",
       "parameters": {"type": "object", "properties": {"a": {"type": "integer", "minimum": 0, "maximum": 9},
                                                       "b": {"type": "integer", "minimum": 0, "maximum": 9}},
                      "required": ["a", "b"], "additionalProperties": False}}


def direct_tool_call(policy_server: Any, messages: list[dict[str, Any]], tool_choice: Any) -> dict[str, Any]:
    """The policy server's own answer to the chat form of a forced tool call (greedy)."""
    direct = OpenAI(base_url=policy_server.base_url, api_key="none")
    answer = direct.chat.completions.create(
        model=policy_server.policy, max_tokens=64, temperature=0, messages=messages,  # type: ignore[arg-type]
        tools=[{"type": "function", "function": ADD}], tool_choice=tool_choice, extra_body={"return_token_ids": True})
    choice = answer.choices[0]
    assert choice.message.tool_calls, "the server did not make the forced tool call"
    return {"calls": [(c.function.name, c.function.arguments) for c in choice.message.tool_calls],  # type: ignore
            "token_ids": (choice.model_extra or {})["token_ids"],
            "prompt_token_ids": (answer.model_extra or {})["prompt_token_ids"]}


def test_forced_tool_calls_come_back_as_function_calls_and_tool_use_blocks_and_are_recorded(
    policy_server: Any, topics_factory: Callable[..., Topics], settings: ConnectionSettings,
    gateway_factory: Callable[..., GatewayProcess],  # noqa: F811
) -> None:
    topics = topics_factory()
    gw = gateway_factory(policy_server.base_url, topics)
    ask = [{"role": "user", "content": "What is 2 + 3?"}]
    expected = direct_tool_call(policy_server, ask, {"type": "function", "function": {"name": "add"}})
    [(name, arguments)] = expected["calls"]

    responses = OpenAI(base_url=f"{gw.url}/rollouts/r-tools/v1", api_key="none")
    params: dict[str, Any] = {"model": "gpt-4o", "input": "What is 2 + 3?", "max_output_tokens": 64,
                              "temperature": 0, "tools": [{"type": "function", **ADD}],
                              "tool_choice": {"type": "function", "name": "add"}}
    whole = responses.responses.create(**params)
    [call] = [o for o in whole.output if o.type == "function_call"]
    assert (call.name, call.arguments, whole.status) == (name, arguments, "completed")
    assert call.id.startswith("fc_") and call.call_id  # type: ignore[union-attr]
    streamed = list(responses.responses.create(stream=True, **params))
    assert streamed[-1].type == "response.completed"
    args = "".join(e.delta for e in streamed if e.type == "response.function_call_arguments.delta")
    [done] = [e for e in streamed if e.type == "response.function_call_arguments.done"]
    assert args == done.arguments == arguments
    # The next turn hands the call and its output back: a tool message for the engine.
    follow = responses.responses.create(**{**params, "tool_choice": "auto", "max_output_tokens": 4, "input": [
        {"role": "user", "content": "What is 2 + 3?"},
        {"type": "function_call", "call_id": call.call_id, "name": name, "arguments": arguments},
        {"type": "function_call_output", "call_id": call.call_id, "output": "5"}]})
    assert follow.status in ("completed", "incomplete")

    claude = anthropic.Anthropic(base_url=f"{gw.url}/rollouts/r-tools", api_key="none")
    mparams: dict[str, Any] = {"model": "claude-sonnet-4-5", "max_tokens": 64, "messages": ask,
                               "tools": [{"name": "add", "description": ADD["description"],
                                          "input_schema": ADD["parameters"]}],
                               "tool_choice": {"type": "tool", "name": "add"}, "extra_body": {"temperature": 0}}
    message = claude.messages.create(**mparams)
    [use] = [b for b in message.content if b.type == "tool_use"]
    assert (use.name, use.input, message.stop_reason) == (name, json.loads(arguments), "tool_use")
    with claude.messages.stream(**mparams) as stream:
        final = stream.get_final_message()
    assert [(b.type, getattr(b, "input", None)) for b in final.content] == [("tool_use", json.loads(arguments))]
    assert final.stop_reason == "tool_use"

    calls = sorted(events(settings, topics, topics.calls, 5), key=lambda c: c["sequence"])
    assert [c["endpoint"] for c in calls] == ["RESPONSES"] * 3 + ["MESSAGES"] * 2
    for c in calls[:2] + calls[3:]:
        assert c["finish_reason"] == "tool_calls" and c["response_token_ids"] == expected["token_ids"]
        assert c["prompt_token_ids"] == expected["prompt_token_ids"], (c["endpoint"], c["tools_json"], c["messages"])
        [recorded] = json.loads(c["response_tool_calls_json"])
        assert (recorded["function"]["name"], recorded["function"]["arguments"]) == (name, arguments)
        assert json.loads(c["tools_json"])[0]["function"]["name"] == "add"
    assert [(m["role"], m["tool_call_id"]) for m in calls[2]["messages"]] == [
        ("user", None), ("assistant", None), ("tool", call.call_id)]
    assert json.loads(calls[2]["messages"][1]["tool_calls_json"])[0]["function"]["arguments"] == arguments
