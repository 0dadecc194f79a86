"""The policy server (``rollstream serve``) under fuzzing, in-process on a tiny model built in the test.

Property: any body on ``/v1/chat/completions`` and ``/v1/completions`` is answered 200 or 4xx,
never 5xx, and the server keeps serving afterwards. The engine's context is cut to 64 tokens so
that a valid request with a huge ``max_tokens`` still finishes quickly.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from fuzz_strategies import CHAT_BODY, COMPLETION_BODY, bodies
from hypothesis import example, given, settings
from hypothesis import strategies as st

pytestmark = pytest.mark.fuzz

import torch  # noqa: E402 - the policy server needs it; setup installs the ml extra
from starlette.testclient import TestClient  # noqa: E402

from rollstream.serving.loading import load_engine  # noqa: E402
from rollstream.serving.scheduler import Scheduler  # noqa: E402
from rollstream.serving.server import PolicyServer  # noqa: E402
from rollstream.serving.tiny import build_tiny_model  # noqa: E402

CHAT_OK = b'{"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2, "logprobs": true}'
COMPLETION_OK = b'{"model": "tiny", "prompt": "hi", "max_tokens": 2, "n": 2, "return_token_ids": true}'


@pytest.fixture(scope="module")
def client(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TestClient]:
    torch.set_num_threads(1)
    model = build_tiny_model(tmp_path_factory.mktemp("fuzz-model") / "tiny")
    engine = load_engine(str(Path(model)), 0, torch.device("cpu"))
    engine.max_context = 64
    server = PolicyServer(Scheduler(engine, 1.0, 8, "tiny"), "tiny", default_max_tokens=2)
    with TestClient(server.app(), raise_server_exceptions=False) as test_client:
        yield test_client


@settings(max_examples=150)
@example(path="/v1/completions", body=b'{"prompt": "hi", "seed": 18446744073709551615, "n": 2, "max_tokens": 1}')
@given(path=st.sampled_from(["/v1/chat/completions", "/v1/completions"]),
       body=st.one_of(bodies(CHAT_BODY, CHAT_OK), bodies(COMPLETION_BODY, COMPLETION_OK)))
def test_generation_endpoints(client: TestClient, path: str, body: bytes) -> None:
    response = client.post(path, content=body, headers={"content-type": "application/json"})
    assert response.status_code < 500, (response.status_code, response.text[:300], body[:300])


def test_still_serving_after_the_fuzz(client: TestClient) -> None:
    assert client.post("/v1/chat/completions", content=CHAT_OK).status_code == 200
