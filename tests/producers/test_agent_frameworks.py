"""Unmodified agent frameworks through the gateway: each runs its tool loop, is captured, and trains.

Every agent below is written the way that framework's users write it, against the capturing
gateway in front of a real ``rollstream serve`` on the demo model (warm-started in code to call
a ``calculator`` tool in the Hermes format), with real Kafka and a real stream processor:

- the OpenAI Agents SDK with its default model (the Responses API) and a ``function_tool``;
- a LangGraph ReAct agent over ``langchain-openai``'s ``ChatOpenAI`` (chat completions, tools);
- a pydantic-ai agent over the Responses API with a tool and a structured output type
  (``NativeOutput``: ``text.format`` JSON Schema, enforced by constrained decoding);
- an ``anthropic`` SDK client looping on ``tool_use`` blocks (the Messages API).

Each must complete its loop (the tool ran, its result came back in the final answer), and each
model call must be on the calls topic once, with the rollout id, the engine's token ids and the
tool call; the processor turns the rollout into transitions.
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import time
import urllib.request
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from confluent_kafka import Consumer

from rollstream.demo import model as demo_model
from rollstream.demo import tasks
from rollstream.schemas.codec import EventCodec, register_schemas, registry_client
from rollstream.schemas.topics import Topics, consumer_config, create_topics
from rollstream.serving.launch import ServerProcess, free_port
from rollstream.settings import ConnectionSettings

pytestmark = [pytest.mark.integration, pytest.mark.slow]

QUESTION = "What is 4 times 2?"  # the warm start translates "times" right more often than not
TOOL_DOC = "Evaluate an integer expression a + b, a - b or a * b."


@dataclass
class Deployment:
    """Server, gateway and processor on one topic prefix."""

    settings: ConnectionSettings
    topics: Topics
    codec: EventCodec
    gateway_url: str
    logs: Path
    children: list[subprocess.Popen[bytes]] = field(default_factory=list)

    def post(self, path: str, body: dict[str, Any]) -> dict[str, Any]:
        req = urllib.request.Request(self.gateway_url + path, data=json.dumps(body).encode(),
                                     headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=30) as resp:
            return dict(json.loads(resp.read()))

    def rollout(self, agent: Callable[[str], str]) -> tuple[str, str]:
        """Start a rollout, run ``agent(base_url_root)`` (returns its final text), finish and reward it."""
        rollout_id = uuid.uuid4().hex
        self.post("/v1/rollouts", {"rollout_id": rollout_id, "task_id": "t-frameworks", "group_id": "g-frameworks"})
        final = agent(f"{self.gateway_url}/rollouts/{rollout_id}")
        self.post(f"/v1/rollouts/{rollout_id}/finish", {"status": "SUCCEEDED"})
        self.post(f"/v1/rollouts/{rollout_id}/rewards", {"value": 1.0, "terminal": True})
        return rollout_id, final

    def logs_tail(self) -> str:
        return "\n".join(f"--- {p.name}\n{p.read_text(errors='replace')[-3000:]}"
                         for p in sorted(self.logs.glob("*.log")))

    def read(self, topic: str, rollout_id: str, count: int, timeout: float = 90.0) -> list[dict[str, Any]]:
        """The decoded records of ``rollout_id`` on ``topic``, once ``count`` are there (then 1 s more)."""
        conf = consumer_config(f"fw-{uuid.uuid4().hex}", self.settings, **{"auto.offset.reset": "earliest"})
        consumer = Consumer(conf)
        consumer.subscribe([topic])
        found: list[dict[str, Any]] = []
        deadline = time.monotonic() + timeout
        settle: float | None = None
        try:
            while time.monotonic() < deadline and (settle is None or time.monotonic() < settle):
                msg = consumer.poll(0.5)
                if msg is None or msg.error():
                    continue
                record = self.codec.decode(msg.topic(), msg.value())
                if record.get("rollout_id") == rollout_id:
                    found.append(record)
                    if len(found) >= count and settle is None:
                        settle = time.monotonic() + 1.0
        finally:
            consumer.close()
        return found


@pytest.fixture(scope="module")
def deployment(settings: ConnectionSettings, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Deployment]:
    logs = tmp_path_factory.mktemp("frameworks")
    topics = Topics(prefix=f"fw{uuid.uuid4().hex[:8]}.", partitions=1)
    create_topics(topics, settings)
    register_schemas(registry_client(settings), topics)
    env = {**os.environ, "ROLLSTREAM_TOPIC_PREFIX": topics.prefix, "ROLLSTREAM_PARTITIONS": "1",
           "ROLLSTREAM_KAFKA_BOOTSTRAP": settings.kafka_bootstrap,
           "ROLLSTREAM_SCHEMA_REGISTRY_URL": settings.schema_registry_url,
           "ROLLSTREAM_GATEWAY_API_KEYS": "", "ROLLSTREAM_PROCESS_COMMIT_INTERVAL": "0.25",
           "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    server = ServerProcess(demo_model.build_tiny(), policy="calc", env=env, log_path=logs / "serve.log",
                           args=["--no-updates", "--threads", "1"])
    server.start(180)
    port = free_port()
    children = []
    for name, args in (
        ("gateway", ["gateway", "--port", str(port), "--backend-url", server.base_url, "--policy", "calc",
                     "--no-create-topics"]),
        ("processor", ["process", "--app-id", f"fw-processor-{uuid.uuid4().hex[:6]}", "--data-dir",
                       str(logs / "processor"), "--web-port", str(free_port())]),
    ):
        out = (logs / f"{name}.log").open("ab")
        children.append(subprocess.Popen([sys.executable, "-m", "rollstream.cli", *args], stdout=out,
                                         stderr=subprocess.STDOUT, env=env))
        out.close()
    dep = Deployment(settings, topics, EventCodec(registry_client(settings), topics), f"http://127.0.0.1:{port}",
                     logs, children)
    deadline = time.monotonic() + 60
    while True:
        try:
            urllib.request.urlopen(dep.gateway_url + "/healthz", timeout=2).close()
            break
        except OSError:
            assert time.monotonic() < deadline, f"the gateway did not start:\n{dep.logs_tail()}"
            time.sleep(0.3)
    yield dep
    for child in children:
        child.terminate()
    for child in children:
        try:
            child.wait(20)
        except subprocess.TimeoutExpired:
            child.kill()
    server.stop()


class Calculator:
    """The tool, recording what it was asked."""

    def __init__(self) -> None:
        self.asked: list[str] = []
        self.results: list[str] = []

    def __call__(self, expression: str) -> str:
        self.asked.append(expression)
        self.results.append(tasks.calculator(expression))
        return self.results[-1]


def check_captured(dep: Deployment, rollout_id: str, endpoint: str, tool: Calculator, final: str) -> None:
    """The loop completed; both calls are on the calls topic once each; the processor made transitions.

    Every agent decodes greedily (temperature 0): the demo model then always calls the tool first and
    copies its result into the answer (sampled, about one answer in ten does not).
    """
    assert tool.asked, f"the agent never ran the tool; final answer {final!r}\n{dep.logs_tail()}"
    value = tool.results[-1].removeprefix("= ")
    assert value in final, f"the final answer {final!r} does not carry the tool's result {tool.results[-1]!r}"
    calls = sorted(dep.read(dep.topics.calls, rollout_id, 2), key=lambda c: c["sequence"])
    assert len(calls) == 2, f"expected the 2 model calls of rollout {rollout_id} once each, got {len(calls)}"
    assert [c["sequence"] for c in calls] == [0, 1]
    for call in calls:
        assert call["endpoint"] == endpoint
        assert call["prompt_token_ids"] and call["response_token_ids"], "token ids missing"
        assert len(call["response_logprobs"]) == len(call["response_token_ids"])
        assert call["tools_json"] and tasks.TOOL_NAME in call["tools_json"]
    made = json.loads(calls[0]["response_tool_calls_json"] or "[]")
    assert calls[0]["finish_reason"] == "tool_calls" and made[0]["function"]["name"] == tasks.TOOL_NAME
    assert json.loads(made[0]["function"]["arguments"])["expression"] == tool.asked[0]
    assert any(m["role"] == "tool" and m["content"] == tool.results[0] for m in calls[1]["messages"]), \
        "the second call's prompt does not hold the tool's result"
    transitions = dep.read(dep.topics.transitions, rollout_id, 1)
    assert transitions, f"no transition for rollout {rollout_id}\n{dep.logs_tail()}"
    assert all(t["terminal_reward"] == 1.0 for t in transitions)


def test_openai_agents_sdk_default_model(deployment: Deployment) -> None:
    from agents import Agent, ModelSettings, RunConfig, Runner, function_tool
    from agents.models.openai_provider import OpenAIProvider
    from openai import AsyncOpenAI

    tool = Calculator()

    @function_tool
    def calculator(expression: str) -> str:
        """Evaluate an integer expression a + b, a - b or a * b."""
        return tool(expression)

    def agent(root: str) -> str:
        client = AsyncOpenAI(base_url=root + "/v1", api_key="local")
        # No model named: the SDK's default model, over its default API (Responses).
        solver = Agent(name="solver", instructions=tasks.SYSTEM, tools=[calculator],
                       model_settings=ModelSettings(temperature=0.0))
        config = RunConfig(model_provider=OpenAIProvider(openai_client=client), tracing_disabled=True)
        result = Runner.run_sync(solver, QUESTION, run_config=config, max_turns=4)
        return str(result.final_output)

    rollout_id, final = deployment.rollout(agent)
    check_captured(deployment, rollout_id, "RESPONSES", tool, final)


def test_langgraph_react_agent(deployment: Deployment) -> None:
    from langchain_core.tools import tool as lc_tool
    from langchain_openai import ChatOpenAI
    from langgraph.prebuilt import create_react_agent

    tool = Calculator()

    @lc_tool
    def calculator(expression: str) -> str:
        """Evaluate an integer expression a + b, a - b or a * b."""
        return tool(expression)

    def agent(root: str) -> str:
        llm = ChatOpenAI(model="gpt-4o-mini", base_url=root + "/v1", api_key="local", temperature=0)  # type: ignore[arg-type]
        graph = create_react_agent(llm, [calculator], prompt=tasks.SYSTEM)
        state = graph.invoke({"messages": [("user", QUESTION)]}, {"recursion_limit": 8})
        return str(state["messages"][-1].content)

    rollout_id, final = deployment.rollout(agent)
    check_captured(deployment, rollout_id, "CHAT_COMPLETIONS", tool, final)


def test_pydantic_ai_agent_with_structured_output(deployment: Deployment) -> None:
    from openai import AsyncOpenAI
    from pydantic import BaseModel, Field
    from pydantic_ai import Agent, NativeOutput
    from pydantic_ai.models.openai import OpenAIResponsesModel
    from pydantic_ai.providers.openai import OpenAIProvider

    class Answer(BaseModel):
        answer: int = Field(ge=-100, le=100)

    tool = Calculator()
    answers: list[Answer] = []

    def agent(root: str) -> str:
        provider = OpenAIProvider(openai_client=AsyncOpenAI(base_url=root + "/v1", api_key="local"))
        solver = Agent(OpenAIResponsesModel("gpt-4.1", provider=provider), output_type=NativeOutput(Answer),
                       system_prompt=tasks.JSON_SYSTEM, model_settings={"temperature": 0.0})

        @solver.tool_plain
        def calculator(expression: str) -> str:
            """Evaluate an integer expression a + b, a - b or a * b."""
            return tool(expression)

        result = asyncio.run(solver.run(QUESTION))
        answers.append(result.output)
        return result.output.model_dump_json()

    rollout_id, final = deployment.rollout(agent)
    assert isinstance(answers[0], Answer)
    check_captured(deployment, rollout_id, "RESPONSES", tool, final)


def test_anthropic_sdk_tool_use(deployment: Deployment) -> None:
    import anthropic

    tool = Calculator()
    tools = [{"name": tasks.TOOL_NAME, "description": TOOL_DOC, "input_schema": {
        "type": "object", "properties": {"expression": {"type": "string"}}, "required": ["expression"]}}]

    def agent(root: str) -> str:
        client = anthropic.Anthropic(base_url=root, api_key="local", max_retries=0)
        messages: list[dict[str, Any]] = [{"role": "user", "content": QUESTION}]
        for _ in range(4):
            # This SDK version has no sampling arguments; the Messages API still takes temperature, sent
            # as the SDK sends any field it has no argument for. Greedy, the demo model's loop is exact.
            reply = client.messages.create(model="claude-sonnet-4-5", max_tokens=64, system=tasks.SYSTEM,
                                           messages=messages, tools=tools,  # type: ignore[arg-type]
                                           extra_body={"temperature": 0.0})
            if reply.stop_reason != "tool_use":
                return "".join(b.text for b in reply.content if b.type == "text")
            results = [{"type": "tool_result", "tool_use_id": b.id, "content": tool(str(b.input["expression"]))}
                       for b in reply.content if b.type == "tool_use"]
            messages += [{"role": "assistant", "content": [b.model_dump() for b in reply.content]},
                         {"role": "user", "content": results}]
        raise AssertionError("the agent did not finish within 4 turns")

    rollout_id, final = deployment.rollout(agent)
    check_captured(deployment, rollout_id, "MESSAGES", tool, final)
