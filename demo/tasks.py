"""The demo task: arithmetic word questions answered with a calculator tool (in the spirit of Calc-X).

A task is a question such as "What is 3 plus 5?". The agent answers in two model calls with a
native function tool, ``calculator`` (``CALCULATOR``, an OpenAI ``tools`` entry): the first reply
should be a tool call ``calculator({"expression": "3 + 5"})``; the agent runs it and sends the
result back as a ``tool`` message (``= 8``); the second reply should be the final answer,
``Answer: 8``. The reward is 1 when the final answer equals the true value, else 0.

Tasks are generated in code from a seed; the evaluation set is drawn from a disjoint seed space so
that held-out questions are never trained on. ``warm_start_dialogues`` gives the supervised examples
the demo model is warm-started on: the copy-and-calculate skills are always shown correctly, but the
operator word is deliberately mis-translated in a share of them, so the warm-started policy starts
out often wrong (mostly for "plus" and "minus") and reinforcement learning has something to fix.
The dialogues vary what agent frameworks vary (the tool's JSON schema and description, the system
prompt, JSON instead of text for the final answer under ``JSON_SYSTEM``), so the same model serves
an unmodified OpenAI Agents SDK, LangGraph, pydantic-ai or Anthropic-SDK agent that offers the tool.
"""

from __future__ import annotations

import json
import random
import re
from dataclasses import dataclass
from typing import Any

SYSTEM = "Use the calculator tool, then reply Answer: N."
# The system prompt of agents that want the final answer as JSON ({"answer": N}), e.g. a structured output type.
JSON_SYSTEM = "Use the calculator tool, then reply in JSON."
TOOL_NAME = "calculator"
TOOL_DESCRIPTION = "Evaluate an integer expression a + b, a - b or a * b."
CALCULATOR: dict[str, Any] = {
    "type": "function",
    "function": {
        "name": TOOL_NAME,
        "description": TOOL_DESCRIPTION,
        "parameters": {"type": "object", "properties": {"expression": {"type": "string"}}, "required": ["expression"]},
    },
}
OPS = {"plus": "+", "minus": "-", "times": "*"}
# How often each operator word appears among tasks.
OP_WEIGHTS = {"plus": 0.375, "minus": 0.375, "times": 0.25}
# Warm start: probability that the example translates the operator word correctly; otherwise it
# uses the listed wrong operator. Below 0.5 the greedy policy starts out wrong on that operator.
WARM_CORRECT = {"plus": 0.2, "minus": 0.2, "times": 0.6}
WARM_WRONG = {"plus": "-", "minus": "+", "times": "+"}
MAX_OPERAND = 9

_ANSWER = re.compile(r"Answer:\s*(-?\d+)")
_JSON_ANSWER = re.compile(r'"answer"\s*:\s*(-?\d+)')
_EXPR = re.compile(r"^\s*(-?\d{1,6})\s*([-+*])\s*(-?\d{1,6})\s*$")


@dataclass(frozen=True)
class Task:
    """One question with its true answer."""

    task_id: str
    a: int
    b: int
    op: str  # a key of OPS

    @property
    def question(self) -> str:
        return f"What is {self.a} {self.op} {self.b}?"

    @property
    def expression(self) -> str:
        return expression(self.a, OPS[self.op], self.b)

    @property
    def answer(self) -> int:
        value = calculate(self.expression)
        assert value is not None
        return value


def make_task(rng: random.Random, task_id: str) -> Task:
    op = rng.choices(list(OP_WEIGHTS), weights=list(OP_WEIGHTS.values()))[0]
    a, b = rng.randint(0, MAX_OPERAND), rng.randint(0, MAX_OPERAND)
    return Task(task_id, a, b, op)


def eval_tasks(n: int, seed: int = 1234) -> list[Task]:
    """The held-out evaluation set (its questions never appear in training tasks)."""
    rng = random.Random(f"eval-{seed}")
    out: list[Task] = []
    seen: set[str] = set()
    while len(out) < n:
        t = make_task(rng, f"eval-{len(out):04d}")
        if t.question not in seen:
            seen.add(t.question)
            out.append(t)
    return out


class TrainTasks:
    """An endless stream of training tasks, skipping the held-out questions."""

    def __init__(self, held_out: list[Task], seed: int = 0) -> None:
        self.rng = random.Random(f"train-{seed}")
        self.held_out = {t.question for t in held_out}
        self.count = 0

    def next(self) -> Task:
        while True:
            t = make_task(self.rng, f"task-{self.count:06d}")
            if t.question not in self.held_out:
                self.count += 1
                return t


def expression(a: int, op: str, b: int) -> str:
    return f"{a} {op} {b}"


def calculate(expression: str) -> int | None:
    """The calculator tool: integer a+b, a-b or a*b; None for anything else."""
    m = _EXPR.match(expression)
    if not m:
        return None
    a, op, b = int(m.group(1)), m.group(2), int(m.group(3))
    return a + b if op == "+" else a - b if op == "-" else a * b


def calculator(expression: str) -> str:
    """The tool as agents run it: its result as the text of the tool message."""
    value = calculate(expression)
    return "error" if value is None else f"= {value}"


def parse_arguments(arguments: str | None) -> str | None:
    """The ``expression`` of a calculator call's JSON arguments (None when they are not that)."""
    try:
        value = json.loads(arguments or "")
    except ValueError:
        return None
    expr = value.get("expression") if isinstance(value, dict) else None
    return expr if isinstance(expr, str) else None


def parse_answer(text: str) -> int | None:
    m = _ANSWER.search(text) or _JSON_ANSWER.search(text)
    return int(m.group(1)) if m else None


def first_messages(task: Task, system: str = SYSTEM) -> list[dict[str, Any]]:
    return [{"role": "system", "content": system}, {"role": "user", "content": task.question}]


def tool_call(call_id: str, arguments: str, name: str = TOOL_NAME, content: str | None = None) -> dict[str, Any]:
    """An assistant message making one tool call (OpenAI chat shape), ``arguments`` as JSON text."""
    return {"role": "assistant", "content": content, "tool_calls": [
        {"id": call_id, "type": "function", "function": {"name": name, "arguments": arguments}}]}


def tool_message(call_id: str, content: str) -> dict[str, Any]:
    return {"role": "tool", "tool_call_id": call_id, "content": content}


def reward(task: Task, answer: int | None) -> float:
    return 1.0 if answer is not None and answer == task.answer else 0.0


def tool_variant(rng: random.Random) -> dict[str, Any]:
    """The calculator tool as one of many frameworks might describe it (schema details, titles, strictness)."""
    prop: dict[str, Any] = {"type": "string"}
    if rng.random() < 0.4:
        prop = {"title": "Expression", "type": "string"}
    if rng.random() < 0.2:
        prop["description"] = rng.choice(["such as 3 + 5", "The expression to evaluate.", "a + b"])
    params: dict[str, Any] = {"type": "object", "properties": {"expression": prop}, "required": ["expression"]}
    if rng.random() < 0.5:
        params = {"properties": params["properties"], "required": ["expression"], "type": "object"}
    if rng.random() < 0.3:
        params["title"] = rng.choice(["calculator_args", "CalculatorArgs", "calculator"])
    if rng.random() < 0.5:
        params["additionalProperties"] = False
    function: dict[str, Any] = {"name": TOOL_NAME}
    if rng.random() < 0.85:
        function["description"] = rng.choice([TOOL_DESCRIPTION, "Calculate.", "Evaluate an arithmetic expression.",
                                              "A calculator.", "Run the calculator on an expression like 3 + 5."])
    function["parameters"] = params
    if rng.random() < 0.4:
        function["strict"] = True
    return {"type": "function", "function": function}


def warm_start_dialogues(n: int, seed: int = 0) -> list[dict[str, Any]]:
    """``n`` generated dialogues (``messages`` with both assistant turns, and ``tools``) for the warm start."""
    rng = random.Random(f"warm-{seed}")
    out = []
    for i in range(n):
        task = make_task(rng, f"warm-{i}")
        op = OPS[task.op] if rng.random() < WARM_CORRECT[task.op] else WARM_WRONG[task.op]
        expr = expression(task.a, op, task.b)
        result = calculate(expr)
        call_id = f"call_{rng.getrandbits(48):012x}"
        roll = rng.random()
        system = SYSTEM if roll < 0.7 else JSON_SYSTEM if roll < 0.85 else None
        messages = first_messages(task, system or SYSTEM)[0 if system else 1:]
        # The second turn is always right: copy the tool's result into the answer.
        final = json.dumps({"answer": result}) if system == JSON_SYSTEM else f"Answer: {result}"
        messages += [tool_call(call_id, json.dumps({"expression": expr})), tool_message(call_id, calculator(expr)),
                     {"role": "assistant", "content": final}]
        out.append({"messages": messages, "tools": [CALCULATOR if rng.random() < 0.3 else tool_variant(rng)]})
    return out
