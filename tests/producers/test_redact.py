"""Redaction at capture without Kafka: the rules, patterns and hook, events' token ids, and the gateway in-process."""

from __future__ import annotations

import asyncio
import sys
import types
from typing import Any

import httpx
import orjson
import pytest
from aiohttp import web
from prometheus_client import CollectorRegistry
from test_gateway_app import RecordingPublisher

from rollstream.errors import ConfigError
from rollstream.producers.gateway import Gateway, GatewaySettings, build_parser
from rollstream.producers.metrics import redaction_counters
from rollstream.producers.redact import (
    BUILTIN_RULES,
    RedactionError,
    RedactionSettings,
    Redactor,
    parse_patterns,
    parse_rules,
    settings_from_flags,
)
from rollstream.schemas.topics import Topics

EMAIL = "jane.doe@example.com"


def everything(**kw: Any) -> Redactor:
    return Redactor.from_settings(RedactionSettings(rules="all", patterns="", hook=""), surface="gateway", **kw)


@pytest.mark.parametrize(("text", "expected"), [
    (f"write to {EMAIL}.", "write to [REDACTED:email]."),
    ("mailto:a_b+tag@mail.example.co.uk?x", "mailto:[REDACTED:email]?x"),
    ("call +1 (415) 555-0132 now", "call [REDACTED:phone] now"),
    ("415-555-0132", "[REDACTED:phone]"),
    ("+44 20 7946 0958", "[REDACTED:phone]"),
    ("+14155550132", "[REDACTED:phone]"),
    ("key sk-proj-abcdefghijklmnop1234 ok", "key [REDACTED:api_key] ok"),
    ("sk-ant-api03-abcdefghijklmnopqrstu", "[REDACTED:api_key]"),
    ("ghp_" + "a" * 36, "[REDACTED:api_key]"),
    ("id AKIAIOSFODNN7EXAMPLE,", "id [REDACTED:aws_key],"),
    ("Authorization: Bearer eyJhbGciOiJIUzI1NiJ9.abc", "Authorization: Bearer [REDACTED:bearer]"),
])
def test_builtin_rules_replace_what_they_match(text: str, expected: str) -> None:
    assert everything().text(text) == expected


@pytest.mark.parametrize("text", [
    "2024-01-15", "2024-01-15 10:30", "version 1.2.3", "12345", "3.14159", "1 2 3 4 5 6 7 8 9", "ts 1700000000",
    "task-abcdefghijklmnopqrstuvwx", "[151644, 872, 198]", "user@localhost", "the bearer of news",
])
def test_builtin_rules_leave_look_alikes(text: str) -> None:
    assert everything().text(text) == text


def test_rules_are_selectable_and_extendable_and_bad_settings_say_how_to_fix_them() -> None:
    assert parse_rules("") == parse_rules("none") == []
    assert parse_rules("all") == list(BUILTIN_RULES)
    assert parse_rules("email, phone,email") == ["email", "phone"]
    with pytest.raises(ConfigError, match="unknown rule.*emails.*ROLLSTREAM_REDACT_PATTERNS"):
        parse_rules("emails")
    only_email = Redactor.from_settings(RedactionSettings(rules="email", patterns="", hook=""), surface="sdk")
    assert only_email.text(f"{EMAIL} 415-555-0132") == "[REDACTED:email] 415-555-0132"
    [rule] = parse_patterns('{"ticket": "TICKET-\\\\d{4,}"}')
    assert rule.name == "ticket"
    assert [r.name for r in parse_patterns("ticket=TICKET-\\d+\nemployee=E\\d{6}")] == ["ticket", "employee"]
    custom = Redactor.from_settings(RedactionSettings(rules="", patterns="ticket=TICKET-\\d+", hook=""),
                                    surface="sdk")
    assert custom.active and custom.text("see TICKET-1234, mail " + EMAIL) == "see [REDACTED:ticket], mail " + EMAIL
    for bad, message in (("{oops", "not a valid JSON"), ("x=(", "does not compile"), ("email=x", "built-in"),
                         ("Bad Name=x", "rule name"), ("empty=a*", "matches empty text"), ("noequals", "name=regex")):
        with pytest.raises(ConfigError, match=message):
            parse_patterns(bad)
    with pytest.raises(ConfigError, match="module:function"):
        RedactionSettings(rules="", patterns="", hook="no_colon")
    with pytest.raises(ConfigError, match="cannot be loaded"):
        RedactionSettings(rules="", patterns="", hook="no_such_module_here:f")
    assert not Redactor.from_settings(RedactionSettings(rules="", patterns="", hook=""), surface="sdk").active


def test_settings_come_from_the_environment_and_the_cli_flags(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ROLLSTREAM_REDACT", "email")
    monkeypatch.setenv("ROLLSTREAM_REDACT_PATTERNS", '{"ticket": "T-\\\\d+"}')
    assert (RedactionSettings().rules, parse_patterns(RedactionSettings().patterns)[0].name) == ("email", "ticket")
    assert GatewaySettings().redaction.rules == "email"
    args = build_parser().parse_args(["--redact", "phone,api_key", "--redact-pattern", "a=A\\d+",
                                      "--redact-pattern", "b=B\\d+"])
    flagged = settings_from_flags(args)
    assert flagged.rules == "phone,api_key" and [r.name for r in parse_patterns(flagged.patterns)] == ["a", "b"]
    assert settings_from_flags(build_parser().parse_args([])).rules == "email"  # no flag: the environment's


def test_a_hook_by_path_or_in_code_rewrites_text_is_counted_and_fails_closed(monkeypatch: pytest.MonkeyPatch) -> None:
    module = types.ModuleType("redact_hooks_for_test")
    module.names = lambda text: text.replace("Jane Doe", "[NAME]")  # type: ignore[attr-defined]
    module.broken = lambda text: 1 / 0  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, module.__name__, module)
    counters = redaction_counters(CollectorRegistry())
    redactor = Redactor.from_settings(
        RedactionSettings(rules="email", patterns="", hook=f"{module.__name__}:names"), surface="sdk",
        counters=counters, hook=lambda text: text.replace("Acme", "[ORG]"))
    assert redactor.text(f"Jane Doe of Acme, {EMAIL}") == "[NAME] of [ORG], [REDACTED:email]"
    assert counters[0].labels("hook", "sdk")._value.get() == 1
    assert counters[0].labels("email", "sdk")._value.get() == 1
    failing = Redactor.from_settings(RedactionSettings(rules="", patterns="", hook=f"{module.__name__}:broken"),
                                     surface="otlp")
    with pytest.raises(RedactionError, match="ZeroDivisionError"):
        failing.text("anything")
    with pytest.raises(RedactionError, match="not str"):
        Redactor(hook=lambda text: None).text("x")  # type: ignore[arg-type, return-value]


def test_requests_are_redacted_in_a_copy_with_structure_left_alone() -> None:
    messages = [{"role": "system", "content": "be brief"},
                {"role": "user", "content": [{"type": "text", "text": f"mail {EMAIL}"},
                                             {"type": "image_url", "image_url": {"url": f"data:{EMAIL}"}}]},
                {"role": "assistant", "content": None, "tool_calls": [{"id": "c1", "type": "function", "function": {
                    "name": "send", "arguments": orjson.dumps({"to": EMAIL}).decode()}}]},
                {"role": "tool", "tool_call_id": "c1", "content": f"sent to {EMAIL}"}]
    body = {"model": "m", "messages": messages, "temperature": 0}
    out = everything().request(body)
    assert out is not body and body["messages"] is messages and EMAIL in orjson.dumps(body).decode()  # untouched
    assert out["messages"][0] is messages[0]  # unchanged parts are shared, not copied
    assert out["messages"][1]["content"][0]["text"] == "mail [REDACTED:email]"
    assert out["messages"][1]["content"][1] == messages[1]["content"][1]  # images are structure
    assert orjson.loads(out["messages"][2]["tool_calls"][0]["function"]["arguments"]) == {"to": "[REDACTED:email]"}
    assert out["messages"][3] == {"role": "tool", "tool_call_id": "c1", "content": "sent to [REDACTED:email]"}
    clean = {"model": "m", "messages": [{"role": "user", "content": "hi"}]}
    assert everything().request(clean) is clean
    assert everything().request({"prompt": [f"a {EMAIL}", "b"]})["prompt"] == ["a [REDACTED:email]", "b"]


def _call(**fields: Any) -> dict[str, Any]:
    return {"messages": [{"role": "user", "content": "hi", "name": None, "tool_call_id": None,
                          "tool_calls_json": None}], "prompt": None, "tools_json": None, "response_text": "ok",
            "response_tool_calls_json": None, "prompt_token_ids": [1, 2], "response_token_ids": [3],
            "response_logprobs": [-0.1], "metadata": {"request_id": "r"}, **fields}


def test_events_lose_the_token_ids_of_the_side_whose_text_was_redacted() -> None:
    counters = redaction_counters(CollectorRegistry())
    redactor = everything(counters=counters)
    clean = redactor.record(_call())
    assert clean["prompt_token_ids"] == [1, 2] and "redacted_tokens" not in clean["metadata"]
    answer = redactor.record(_call(response_text=f"reach me at {EMAIL}"))
    assert answer["response_text"] == "reach me at [REDACTED:email]"
    assert (answer["response_token_ids"], answer["response_logprobs"], answer["prompt_token_ids"]) == (None, None,
                                                                                                      [1, 2])
    assert answer["metadata"]["redacted_tokens"] == "response"
    late = _call(response_tool_calls_json=orjson.dumps([{"function": {"arguments": "sk-" + "x" * 20}}]).decode())
    late["messages"].append({"role": "user", "content": f"second {EMAIL}", "name": None, "tool_call_id": None,
                             "tool_calls_json": None})
    redactor.record(late)
    assert late["messages"][1]["content"] == "second [REDACTED:email]"
    assert (late["prompt_token_ids"], late["response_token_ids"]) == (None, None)
    assert late["metadata"]["redacted_tokens"] == "prompt,response"
    assert counters[1].labels("response", "gateway")._value.get() == 2
    assert counters[1].labels("prompt", "gateway")._value.get() == 1
    rollout = redactor.record({"status": "FAILED", "error": f"no user {EMAIL}", "metadata": {
        "note": EMAIL, "task_id": EMAIL}})
    assert rollout["error"] == "no user [REDACTED:email]" and rollout["metadata"] == {
        "note": "[REDACTED:email]", "task_id": EMAIL}  # ids are left as they are
    assert redactor.leaky_sides(_call(prompt=EMAIL, response_text=EMAIL)) == {"prompt", "response"}
    assert redactor.leaky_sides(_call()) == set()


def test_the_gateway_forwards_redacted_requests_and_publishes_redacted_answers_without_their_tokens() -> None:
    seen: list[dict[str, Any]] = []

    async def chat(request: web.Request) -> web.Response:
        body = await request.json()
        seen.append(body)
        return web.json_response({
            "id": "c-1", "object": "chat.completion", "created": 0, "model": "m", "prompt_token_ids": [1, 2],
            "choices": [{"index": 0, "message": {"role": "assistant", "content": f"Sure, {EMAIL}."},
                         "finish_reason": "stop", "logprobs": None, "token_ids": [7, 8]}]})

    async def go() -> tuple[Gateway, list[httpx.Response]]:
        backend = web.Application()
        backend.router.add_post("/v1/chat/completions", chat)
        runner = web.AppRunner(backend, access_log=None)
        await runner.setup()
        await web.TCPSite(runner, "127.0.0.1", 0).start()
        url = f"http://127.0.0.1:{runner.addresses[0][1]}/v1"
        app = Gateway(GatewaySettings(backend_url=url, redaction=RedactionSettings(rules="email", patterns="",
                                                                                   hook="")),
                      RecordingPublisher(), Topics(prefix="unit."))
        await app.proxy.start()
        answers = []
        try:
            async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://gw") as client:
                for path in ("/rollouts/r1/v1/chat/completions", "/v1/chat/completions"):
                    answers.append(await client.post(path, json={
                        "model": "m", "messages": [{"role": "user", "content": f"My address is {EMAIL}"}]}))
                answers.append(await client.post("/v1/rollouts/r1/rewards", json={
                    "value": 1.0, "terminal": True, "metadata": {"grader": f"by {EMAIL}"}}))
        finally:
            await app.proxy.stop()
            await runner.cleanup()
        return app, answers

    app, answers = asyncio.run(go())
    assert [a.status_code for a in answers] == [200, 200, 200]
    assert EMAIL in answers[0].json()["choices"][0]["message"]["content"]  # the client gets the model's answer
    assert [m["messages"][0]["content"] for m in seen] == ["My address is [REDACTED:email]"] * 2  # never the raw one
    sent = app.publisher.sent  # type: ignore[attr-defined]
    assert [t for t, _, _ in sent] == ["unit.calls", "unit.calls-by-response", "unit.rewards"]
    assert EMAIL not in repr(sent)
    for _, _, call in sent[:2]:
        assert call["messages"][0]["content"] == "My address is [REDACTED:email]"
        assert call["prompt_token_ids"] == [1, 2]  # of the redacted text: the model saw only that
        assert call["response_text"] == "Sure, [REDACTED:email]."
        assert (call["response_token_ids"], call["response_logprobs"]) == (None, None)
        assert call["metadata"]["redacted_tokens"] == "response"
    metrics = app.metrics.render().decode()
    assert 'rollstream_redactions_total{rule="email",surface="gateway"} 5.0' in metrics
    assert 'rollstream_redaction_tokens_dropped_total{side="response",surface="gateway"} 2.0' in metrics
