"""Discounted credit across a gateway kill: the calls keep their order though the gateway's counters restart."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from sp_helpers import Pipe, free_port

from rollstream.schemas.topics import Topics
from rollstream.settings import ConnectionSettings

pytestmark = [pytest.mark.integration, pytest.mark.slow]


def start_gateway(backend: str, topics: Topics, settings: ConnectionSettings, log: Path) -> tuple[Any, str]:
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    proc = subprocess.Popen(
        [sys.executable, "-m", "rollstream.cli", "gateway", "--port", str(port), "--backend-url", backend,
         "--kafka-bootstrap", settings.kafka_bootstrap, "--schema-registry-url", settings.schema_registry_url,
         "--topic-prefix", topics.prefix],
        stdout=log.open("ab"), stderr=subprocess.STDOUT, env={**os.environ, "ROLLSTREAM_GATEWAY_API_KEYS": ""})
    deadline = time.monotonic() + 60
    while True:
        assert proc.poll() is None, log.read_text()[-3000:]
        try:
            urllib.request.urlopen(url + "/healthz", timeout=2).close()
            return proc, url
        except OSError:
            assert time.monotonic() < deadline, log.read_text()[-3000:]
            time.sleep(0.2)


def post(url: str, body: dict[str, Any]) -> dict[str, Any]:
    req = urllib.request.Request(url, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=60) as resp:
        assert resp.status in (200, 201)
        return dict(json.loads(resp.read()))


def test_discounted_credit_follows_call_order_across_a_gateway_kill(
    policy_server: Any, settings: ConnectionSettings, topics: Topics, pipe: Pipe,
    worker_factory: Callable[..., Any], tmp_path: Path,
) -> None:
    worker_factory({"ROLLSTREAM_PROCESS_CREDIT": "*=discounted:0.5"})
    def chat(turn: int) -> dict[str, Any]:
        return {"model": policy_server.policy, "messages": [{"role": "user", "content": f"turn {turn}"}],
                "max_tokens": 2}

    proc, url = start_gateway(policy_server.base_url, topics, settings, tmp_path / "gw-1.log")
    post(url + "/v1/rollouts", {"rollout_id": "r-order"})
    for turn in (0, 1):
        post(url + "/rollouts/r-order/v1/chat/completions", chat(turn))
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)  # its per-rollout sequence counter dies with it
    proc.wait(30)
    proc, url = start_gateway(policy_server.base_url, topics, settings, tmp_path / "gw-2.log")
    try:
        for turn in (2, 3):
            post(url + "/rollouts/r-order/v1/chat/completions", chat(turn))
            time.sleep(0.01)
        post(url + "/v1/rollouts/r-order/rewards", {"value": 1.0, "terminal": True})
        post(url + "/v1/rollouts/r-order/finish", {"status": "SUCCEEDED"})
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(40)
    transitions = pipe.transitions(4, timeout=90, settle=1.0)
    assert sorted(t["sequence"] for t in transitions) == [0, 0, 1, 1]  # the counter did restart
    calls = [pipe.codec.decode(topics.calls, m.value()) for m in pipe.read(topics.calls, 4)]
    turn_of = {c["call_id"]: int(c["messages"][-1]["content"].split()[-1]) for c in calls}
    by_turn = {turn_of[t["call_id"]]: t["credited_return"] for t in transitions}
    # Return-to-go of the terminal reward: the earlier the call, the more it is discounted.
    assert by_turn == {0: 0.125, 1: 0.25, 2: 0.5, 3: 1.0}, (turn_of, transitions)
