"""The gateway under fuzzing, in-process: random bodies on every route, random backend answers.

The gateway's ASGI app runs on one event loop with an ``EncodingPublisher`` (the real codec,
no Kafka) and a small OpenAI-compatible backend on a free port. Properties:

- client input never gets a 5xx while the backend and the event queue are healthy;
- a refused request (4xx) publishes nothing; what is published always encodes;
- no captured call is dropped for a reason of ours (``events_dropped{reason="encode_error"}`` stays 0);
- whatever a backend answers, the client gets the answer or a 502, never a 500.
"""

from __future__ import annotations

import asyncio
import urllib.parse
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import httpx
import orjson
import pytest
from aiohttp import web
from conftest import EncodingPublisher
from fuzz_strategies import (
    BACKEND_BODY,
    CHAT_BODY,
    COMPLETION_BODY,
    FINISH_BODY,
    JSON,
    REWARD_BODY,
    ROLLOUT_BODY,
    TEXT,
    bodies,
    dumps,
)
from hypothesis import example, given
from hypothesis import strategies as st

from rollstream.producers.gateway import Gateway, GatewaySettings
from rollstream.schemas.topics import Topics

pytestmark = pytest.mark.fuzz

TOPICS = Topics(prefix="fuzz.")
CHAT_OK = orjson.dumps({"model": "m", "messages": [{"role": "user", "content": "hi"}], "n": 2, "seed": 3})
COMPLETION_OK = orjson.dumps({"model": "m", "prompt": "hi", "max_tokens": 2, "stream": True})


@dataclass
class Backend:
    """An OpenAI-compatible backend answering in vLLM's shape; ``garbage`` replaces its answer when set."""

    garbage: tuple[int, bytes, str] | None = None
    requests: list[Any] = field(default_factory=list)

    async def handle(self, request: web.Request) -> web.StreamResponse:
        if self.garbage is not None:
            status, body, ctype = self.garbage
            return web.Response(status=status, body=body, content_type=ctype)
        try:
            body = orjson.loads(await request.read())
        except orjson.JSONDecodeError:
            return web.json_response({"error": {"message": "invalid JSON"}}, status=400)
        if not isinstance(body, dict):
            return web.json_response({"error": {"message": "not an object"}}, status=400)
        n = body.get("n", 1)
        if not isinstance(n, int) or isinstance(n, bool) or not 1 <= n <= 4:
            return web.json_response({"error": {"message": "bad n", "param": "n"}}, status=400)
        chat = request.path.endswith("/chat/completions")
        if body.get("stream") is True:
            resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
            await resp.prepare(request)
            for i in range(n):
                delta = {"delta": {"content": "hi"}} if chat else {"text": "hi"}
                chunk = {"choices": [{"index": i, **delta, "token_ids": [5, 6], "finish_reason": "stop",
                                      "logprobs": None}], "prompt_token_ids": [1, 2], "model": "m"}
                await resp.write(b"data: " + orjson.dumps(chunk) + b"\n\n")
            await resp.write(b"data: [DONE]\n\n")
            return resp
        choice = ({"message": {"role": "assistant", "content": "hi"},
                   "logprobs": {"content": [{"token": "hi", "logprob": -0.5}]}} if chat
                  else {"text": "hi", "logprobs": {"token_logprobs": [-0.5]}})
        return web.json_response({
            "id": "x", "model": "m", "prompt_token_ids": [1, 2],
            "choices": [{"index": i, **choice, "token_ids": [5], "finish_reason": "stop"} for i in range(n)],
            "usage": {"prompt_tokens": 2, "completion_tokens": 1},
        })


@dataclass
class Harness:
    loop: asyncio.AbstractEventLoop
    app: Gateway
    client: httpx.AsyncClient
    backend: Backend

    def call(self, method: str, path: str, body: bytes, headers: dict[str, str] | None = None) -> tuple[int, int]:
        """(status, events published by this request); header values are sent as latin-1 bytes.

        Fails when the request made the gateway drop a captured call it could not encode.
        """
        raw = {k: v.encode("latin-1") for k, v in (headers or {}).items()}
        publisher: EncodingPublisher = self.app.publisher  # type: ignore[assignment]
        before, dropped = len(publisher.sent), self.dropped("encode_error")
        response = self.loop.run_until_complete(self.client.request(method, path, content=body, headers=raw))
        assert self.dropped("encode_error") == dropped, f"a captured call could not be encoded: {body[:300]!r}"
        return response.status_code, len(publisher.sent) - before

    def dropped(self, reason: str) -> float:
        return float(self.app.metrics.events_dropped.labels(reason)._value.get())


@pytest.fixture(scope="module")
def gateway() -> Iterator[Harness]:
    loop = asyncio.new_event_loop()
    backend = Backend()
    web_app = web.Application()
    web_app.router.add_route("*", "/v1/{tail:.*}", backend.handle)
    runner = web.AppRunner(web_app, access_log=None)
    loop.run_until_complete(runner.setup())
    site = web.TCPSite(runner, "127.0.0.1", 0)
    loop.run_until_complete(site.start())
    port = runner.addresses[0][1]
    settings = GatewaySettings(backend_url=f"http://127.0.0.1:{port}/v1", max_body=4096, backend_timeout=10)
    app = Gateway(settings, EncodingPublisher(TOPICS), TOPICS)
    loop.run_until_complete(app.proxy.start())
    client = httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://gw")
    yield Harness(loop, app, client, backend)
    loop.run_until_complete(client.aclose())
    loop.run_until_complete(app.proxy.stop())
    loop.run_until_complete(runner.cleanup())
    loop.close()


MODEL_PATHS = st.sampled_from(["/v1/chat/completions", "/v1/completions", "/rollouts/r-1/v1/chat/completions",
                               "/rollouts/r-2/attempts/2/agents/planner/v1/completions", "/v1/chat/completions/"])
ATTRIBUTION = st.fixed_dictionaries({}, optional={
    "X-Rollout-Id": st.sampled_from(["r-3", "", "a/b", "x" * 300]),
    "X-Attempt": st.sampled_from(["1", "0", "-1", "two", "2147483648", "99999999999999999999", " 3 "]),
    "X-Agent-Name": st.sampled_from(["agent", "\xe9", "\x00"]),
})


@example(path="/v1/completions", headers={"X-Rollout-Id": "r", "X-Attempt": "99999999999999999999"}, body=b"{}")
@example(path="/rollouts/r-1/v1/chat/completions", headers={}, body=b'{"n": 999958}')  # not a 503
@given(path=MODEL_PATHS, headers=ATTRIBUTION,
       body=st.one_of(bodies(CHAT_BODY, CHAT_OK), bodies(COMPLETION_BODY, COMPLETION_OK)))
def test_model_endpoints(gateway: Harness, path: str, headers: dict[str, str], body: bytes) -> None:
    status, published = gateway.call("POST", path, body, headers)
    assert status < 500, (status, body)
    if status >= 400:
        assert published == 0


ID = TEXT.map(lambda s: urllib.parse.quote(s.encode("utf-8", "surrogatepass"), safe="")) | st.just("r-1")


@given(data=st.data())
def test_rollout_and_reward_api(gateway: Harness, data: Any) -> None:
    _api(gateway, data)


@pytest.mark.parametrize(("path", "body"), [
    ("/v1/rollouts", b'{"task_id": "\\ud800"}'),  # an unpaired surrogate: valid JSON, not encodable UTF-8
    ("/v1/rollouts", b'{"attempt": 2147483648}'),
    ("/v1/rollouts", b'{"\\ud800": null}'),  # unknown field named in the error: the error body must still encode
    ("/v1/rollouts", b"[" * 100_000),  # nesting deeper than the JSON parser recurses
    ("/v1/rollouts/r/rewards", b'{"value": 1' + b"0" * 400 + b"}"),  # beyond the largest double
    ("/v1/rollouts/r/finish", b'{"status": "failed", "attempt": 99999999999999999999}'),
])
def test_regressions(gateway: Harness, path: str, body: bytes) -> None:
    status, published = gateway.call("POST", path, body)
    assert 400 <= status < 500 and published == 0, status


def _api(gateway: Harness, data: Any) -> None:
    route = data.draw(st.sampled_from(["start", "finish", "rewards", "other"]))
    rid = data.draw(ID)
    if route == "start":
        path, body = "/v1/rollouts", data.draw(bodies(ROLLOUT_BODY, b'{"task_id": "t", "attempt": 2}'))
    elif route == "finish":
        path, body = f"/v1/rollouts/{rid}/finish", data.draw(bodies(FINISH_BODY, b'{"status": "succeeded"}'))
    elif route == "rewards":
        path, body = f"/v1/rollouts/{rid}/rewards", data.draw(bodies(REWARD_BODY, b'{"value": 1, "terminal": true}'))
    else:
        path, body = data.draw(st.sampled_from(["/v1/rollouts/", f"/v1/rollouts/{rid}", f"/v1/rollouts/{rid}/x",
                                                "/v1/rollouts/a/b/c/d"])), data.draw(JSON.map(dumps))
    method = data.draw(st.sampled_from(["POST", "POST", "POST", "GET", "PUT"]))
    status, published = gateway.call(method, path, body)
    assert status < 500, (status, path, body)
    assert published == (1 if status in (200, 201) else 0)


@example(answer=b"null", status=200, ctype="application/json", path="/rollouts/r-9/v1/completions", stream=False)
@given(
    answer=st.one_of(BACKEND_BODY.map(dumps), JSON.map(dumps),
                     st.binary(max_size=32),
                     st.lists(BACKEND_BODY.map(lambda c: b"data: " + dumps(c)), max_size=3).map(
                         lambda events: b"\n\n".join([*events, b"data: [DONE]", b""]))),
    status=st.sampled_from([200, 200, 200, 400, 404, 500, 503]),
    ctype=st.sampled_from(["application/json", "text/event-stream", "text/plain"]),
    path=st.sampled_from(["/rollouts/r-9/v1/chat/completions", "/rollouts/r-9/v1/completions", "/v1/completions"]),
    stream=st.booleans(),
)
def test_backend_answers(gateway: Harness, answer: bytes, status: int, ctype: str, path: str, stream: bool) -> None:
    gateway.backend.garbage = (status, answer, ctype)
    try:
        body = orjson.dumps({"model": "m", "prompt": "p", "messages": [{"role": "user", "content": "x"}],
                             "stream": stream})
        got, published = gateway.call("POST", path, body)
    finally:
        gateway.backend.garbage = None
    assert got in (200, 502) or 400 <= got < 500, got
    if got != 200:
        assert published == 0
