"""A small demo-like run for the viewer's tests: events published, the real processor joining them, a browser.

``publish_run`` writes rollouts like the demo's calculator agent makes (a tool call, the tool's
result, the answer), one reward posted seconds after its rollout ended, one after the processor
had completed it (a late event), and one undecodable record (a dead letter).
"""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import Any

from confluent_kafka import Producer

from rollstream.schemas import make_event, now_micros
from rollstream.schemas.codec import EventCodec
from rollstream.schemas.topics import Topics, producer_config
from rollstream.settings import ConnectionSettings

ROLLSTREAM = Path(sys.executable).with_name("rollstream")
CHROMIUM, CHROMEDRIVER = "/usr/bin/chromium", "/usr/bin/chromedriver"
BROWSER_FIX = ("the browser test needs Debian's chromium and chromium-driver: run "
               "'apt-get install -y chromium chromium-driver' (or bash scripts/setup.sh, which installs them) "
               "and '.venv/bin/pip install -e .[dev]' for selenium")
TOOLS = json.dumps([{"type": "function", "function": {"name": "calculator", "description": "Evaluate arithmetic.",
                     "parameters": {"type": "object", "properties": {"expression": {"type": "string"}}}}}])


def _sampling() -> dict[str, Any]:
    return {"temperature": 1.0, "top_p": None, "max_tokens": 48, "stop": [], "seed": None, "n": 1}


def _tokens(n: int, seed: int) -> tuple[list[int], list[float]]:
    ids = [(seed * 31 + k * 17) % 1000 + 3 for k in range(n)]
    return ids, [-(((seed + k) % 7) ** 2) / 12.0 for k in range(n)]


def calculator_calls(rid: str, question: str, expr: str, answer: str, version: int, t0: int) -> list[dict[str, Any]]:
    """The two calls of one calculator episode: a tool call, then the answer after the tool's result."""
    call_id = f"call_{uuid.uuid4().hex[:8]}"
    tool_calls = json.dumps([{"id": call_id, "type": "function",
                              "function": {"name": "calculator", "arguments": json.dumps({"expression": expr})}}])
    system = {"role": "system", "content": "Use the calculator tool, then answer with the number only.",
              "name": None, "tool_call_id": None, "tool_calls_json": None}
    user = {"role": "user", "content": question, "name": None, "tool_call_id": None, "tool_calls_json": None}
    first_ids, first_lps = _tokens(12, version + len(rid))
    second_ids, second_lps = _tokens(4, version + 2 * len(rid))
    common = {"source": "gateway", "rollout_id": rid, "attempt": 1, "agent_name": "calculator", "policy": "calc",
              "policy_version": version, "tools_json": TOOLS, "sampling": _sampling(), "latency_ms": 41.5}
    first = make_event("LlmCall", **common, call_id="c0", sequence=0, messages=[system, user], response_text="",
                       response_tool_calls_json=tool_calls, prompt_token_ids=list(range(40, 80)),
                       response_token_ids=first_ids, response_logprobs=first_lps, finish_reason="tool_calls",
                       start_time=t0, end_time=t0 + 40_000)
    assistant = {"role": "assistant", "content": None, "name": None, "tool_call_id": None,
                 "tool_calls_json": tool_calls}
    result = {"role": "tool", "content": answer, "name": None, "tool_call_id": call_id, "tool_calls_json": None}
    second = make_event("LlmCall", **common, call_id="c1", sequence=1, messages=[system, user, assistant, result],
                        response_text=f"The answer is {answer}.", prompt_token_ids=list(range(40, 110)),
                        response_token_ids=second_ids, response_logprobs=second_lps, finish_reason="stop",
                        start_time=t0 + 50_000, end_time=t0 + 90_000)
    return [first, second]


class RunWriter:
    """Publishes a run's events (encoded with the prefix's codec) to its topics."""

    def __init__(self, conn: ConnectionSettings, topics: Topics, codec: EventCodec) -> None:
        self.topics, self.codec = topics, codec
        self.producer = Producer(producer_config(conn))

    def send(self, topic: str, record: dict[str, Any]) -> None:
        self.producer.produce(topic, value=self.codec.encode(topic, record), key=record["rollout_id"].encode())
        self.producer.poll(0)

    def flush(self) -> None:
        assert self.producer.flush(30) == 0


def publish_run(writer: RunWriter, groups: int = 2, group_size: int = 3, late_delay_s: float = 2.0
                ) -> dict[str, Any]:
    """Rollouts of ``groups`` tasks; returns what the test looks for: ids, the delayed reward's rollout, tool args."""
    t = writer.topics
    rids, rewards = [], {}
    for g in range(groups):
        a, b = 17 + g, 25 + 3 * g
        for k in range(group_size):
            rid = f"ro-{g}-{k}-{uuid.uuid4().hex[:6]}"
            rids.append(rid)
            t0 = now_micros()
            writer.send(t.rollouts, make_event("RolloutEvent", source="sdk", rollout_id=rid, status="STARTED",
                                               policy="calc", task_id=f"task-{g}", group_id=f"grp-{g}"))
            right = k != 1
            answer = str(a * b if right else a * b + 1)
            for call in calculator_calls(rid, f"What is {a} * {b}?", f"{a} * {b}", answer, g, t0):
                writer.send(t.calls, call)
            writer.send(t.rollouts, make_event("RolloutEvent", source="sdk", rollout_id=rid, status="SUCCEEDED",
                                               policy="calc", task_id=f"task-{g}", group_id=f"grp-{g}"))
            rewards[rid] = 1.0 if right else 0.0
    delayed = rids[-1]
    for rid in rids[:-1]:
        writer.send(t.rewards, make_event("Reward", source="grader", rollout_id=rid, name="primary",
                                          value=rewards[rid], terminal=True))
    # Undecodable bytes on the calls topic: the processor dead-letters them.
    writer.producer.produce(t.calls, value=b"\x00\x00\x00\x00\x07not avro", key=b"ro-broken")
    writer.flush()
    time.sleep(late_delay_s)  # a slow grader: this reward arrives seconds after its rollout ended
    writer.send(t.rewards, make_event("Reward", source="slow-grader", rollout_id=delayed, name="primary",
                                      value=rewards[delayed], terminal=True))
    writer.flush()
    return {"rids": rids, "delayed": delayed, "rewards": rewards, "expression": f"{17} * {25}"}


class Processor:
    """``rollstream process`` on the run's prefix, in a subprocess."""

    def __init__(self, conn: ConnectionSettings, topics: Topics, tmp: Path) -> None:
        self.log_path = tmp / "processor.log"
        env = {**os.environ, "ROLLSTREAM_KAFKA_BOOTSTRAP": conn.kafka_bootstrap,
               "ROLLSTREAM_SCHEMA_REGISTRY_URL": conn.schema_registry_url,
               "ROLLSTREAM_PROCESS_COMMIT_INTERVAL": "0.2", "ROLLSTREAM_PROCESS_TIMER_INTERVAL": "0.5"}
        with self.log_path.open("ab") as log:
            self.proc = subprocess.Popen(
                [str(ROLLSTREAM), "process", "--topic-prefix", topics.prefix, "--partitions", str(topics.partitions),
                 "--app-id", f"{topics.prefix}processor", "--data-dir", str(tmp / "processor")],
                stdout=log, stderr=subprocess.STDOUT, env=env)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(30)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")[-4000:]


def chrome(width: int = 1360, height: int = 900) -> Any:
    """Headless Chromium through chromedriver; AssertionError with the fix when either is missing."""
    missing = [p for p in (CHROMIUM, CHROMEDRIVER) if not (os.access(p, os.X_OK) or shutil.which(Path(p).name))]
    if missing:
        raise AssertionError(f"{', '.join(missing)} not found; {BROWSER_FIX}")
    try:
        from selenium import webdriver
        from selenium.webdriver.chrome.service import Service
    except ImportError as exc:
        raise AssertionError(f"selenium is not installed ({exc}); {BROWSER_FIX}") from exc
    opts = webdriver.ChromeOptions()
    opts.binary_location = CHROMIUM if os.access(CHROMIUM, os.X_OK) else str(shutil.which("chromium"))
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu",
                f"--window-size={width},{height}", "--hide-scrollbars"):
        opts.add_argument(arg)
    driver_path = CHROMEDRIVER if os.access(CHROMEDRIVER, os.X_OK) else str(shutil.which("chromedriver"))
    return webdriver.Chrome(service=Service(driver_path), options=opts)


def finite(x: float) -> bool:
    return not (math.isnan(x) or math.isinf(x))
