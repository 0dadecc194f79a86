"""The demo task: arithmetic word questions answered with a calculator tool (in the spirit of Calc-X).

A task is a question such as "What is 3 plus 5?". The agent answers in two model calls with a
textual tool protocol: the first reply should be a calculator call, ``<calc> 3 + 5 </calc>``; the
agent evaluates it and sends the result back as a ``tool`` message; the second reply should be the
final answer, ``Answer: 8``. The reward is 1 when the final answer equals the true value, else 0.

Tasks are generated in code from a seed; the evaluation set is drawn from a disjoint seed space so
that held-out questions are never trained on. ``warm_start_dialogues`` gives the supervised examples
the demo model is warm-started on: the copy-and-calculate skills are always shown correctly, but the
operator word is deliberately mis-translated in a share of them, so the warm-started policy starts
out often wrong (mostly for "plus" and "minus") and reinforcement learning has something to fix.
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass
from typing import Any

SYSTEM = "Compute with <calc> a + b </calc>, then reply Answer: N."
OPS = {"plus": "+", "minus": "-", "times": "*"}
# How often each operator word appears among tasks.
OP_WEIGHTS = {"plus": 0.375, "minus": 0.375, "times": 0.25}
# Warm start: probability that the example translates the operator word correctly; otherwise it
# uses the listed wrong operator. Below 0.5 the greedy policy starts out wrong on that operator.
WARM_CORRECT = {"plus": 0.2, "minus": 0.2, "times": 0.6}
WARM_WRONG = {"plus": "-", "minus": "+", "times": "+"}
MAX_OPERAND = 9

_CALC = re.compile(r"<calc>(.*?)</calc>", re.S)
_ANSWER = re.compile(r"Answer:\s*(-?\d+)")
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
    return f" {a} {op} {b} "


def calculate(expression: str) -> int | None:
    """The calculator tool: integer a+b, a-b or a*b; None for anything else."""
    m = _EXPR.match(expression)
    if not m:
        return None
    a, op, b = int(m.group(1)), m.group(2), int(m.group(3))
    return a + b if op == "+" else a - b if op == "-" else a * b


def parse_calc(text: str) -> str | None:
    m = _CALC.search(text)
    return m.group(1) if m else None


def parse_answer(text: str) -> int | None:
    m = _ANSWER.search(text)
    return int(m.group(1)) if m else None


def first_messages(task: Task) -> list[dict[str, Any]]:
    return [{"role": "system", "content": SYSTEM}, {"role": "user", "content": task.question}]


def tool_message(result: int | None) -> dict[str, Any]:
    return {"role": "tool", "content": "error" if result is None else f"= {result}"}


def reward(task: Task, answer: int | None) -> float:
    return 1.0 if answer is not None and answer == task.answer else 0.0


def warm_start_dialogues(n: int, seed: int = 0) -> list[list[dict[str, Any]]]:
    """``n`` generated dialogues (both assistant turns) for the supervised warm start."""
    rng = random.Random(f"warm-{seed}")
    out = []
    for i in range(n):
        task = make_task(rng, f"warm-{i}")
        op = OPS[task.op] if rng.random() < WARM_CORRECT[task.op] else WARM_WRONG[task.op]
        expr = expression(task.a, op, task.b)
        call = f"<calc>{expr}</calc>"
        result = calculate(expr)
        # The second turn is always right: copy the tool's result into the answer.
        out.append([*first_messages(task), {"role": "assistant", "content": call}, tool_message(result),
                    {"role": "assistant", "content": f"Answer: {result}"}])
    return out
