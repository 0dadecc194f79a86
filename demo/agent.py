"""The calculator agent and the workers that keep it busy.

The agent is an ordinary ``openai`` client program with a native function tool: ask the model
with ``tools=[calculator]``, run the calculator on the tool call it makes, send the result back
as a ``tool`` message, read the final answer. The
workers wrap it in the rollout API of the gateway: start a rollout (with the task's ``group_id``),
point the client's ``base_url`` at ``/rollouts/{id}/v1`` so every call is attributed, finish it,
and post the reward — a share of the rewards a few seconds later, as a slow grader would.

The rollout API calls (start, finish, reward) are retried while the gateway is unreachable or
answers 502/503/504, for up to ``retry_s`` seconds; a model call that still fails after the
``openai`` client's own retry abandons the rollout, which the stream processor then expires.
With a ``ledger`` path, every rollout's start, end (and why it was abandoned) and delayed reward
is appended there as one JSON line, the agents' own record for an accounting (``bench/faults.py``).

Held-out evaluation talks to the policy server directly (greedy), so its calls are not captured
and never become training data.
"""

from __future__ import annotations

import heapq
import json
import logging
import random
import threading
import time
import uuid
from collections import deque
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
from openai import OpenAI

from rollstream.demo import tasks
from rollstream.demo.tasks import Task

log = logging.getLogger(__name__)


@dataclass
class Episode:
    """What one run of the agent did."""

    answer: int | None
    reward: float
    calls: int
    policy_version: int | None


def solve(client: OpenAI, model: str, task: Task, temperature: float, max_tokens: int = 48) -> Episode:
    """The agent: a calculator tool call, then the final answer (at most two model calls)."""
    messages: list[dict[str, Any]] = tasks.first_messages(task)
    raw = client.chat.completions.with_raw_response.create(model=model, messages=messages,  # type: ignore[arg-type]
                                                           tools=[tasks.CALCULATOR],  # type: ignore[list-item]
                                                           temperature=temperature, max_tokens=max_tokens)
    first = raw.parse()
    message = first.choices[0].message
    header = raw.headers.get("x-policy-version")  # rollstream serve and rollstream vllm send it
    version = int(header) if header is not None else (first.model_extra or {}).get("policy_version")
    calls = [c for c in message.tool_calls or [] if c.type == "function"]
    if not calls:  # no tool call: take whatever answer the model gave
        answer = tasks.parse_answer(message.content or "")
        return Episode(answer, tasks.reward(task, answer), 1, version)
    call = calls[0]
    expr = tasks.parse_arguments(call.function.arguments) if call.function.name == tasks.TOOL_NAME else None
    # The call goes back exactly as the model made it; a call of another tool, or arguments that are
    # not the calculator's, gets "error" as its result.
    messages += [tasks.tool_call(call.id, call.function.arguments, call.function.name, message.content),
                 tasks.tool_message(call.id, tasks.calculator(expr) if expr is not None else "error")]
    second = client.chat.completions.create(model=model, messages=messages,  # type: ignore[arg-type]
                                            tools=[tasks.CALCULATOR],  # type: ignore[list-item]
                                            temperature=temperature, max_tokens=max_tokens)
    answer = tasks.parse_answer(second.choices[0].message.content or "")
    return Episode(answer, tasks.reward(task, answer), 2, version)


class DelayedRewards:
    """A thread that posts rewards when they fall due (a slow grader)."""

    def __init__(self, post: Callable[[str, float], None], on_result: Callable[[str, str | None], None]) -> None:
        self.post = post
        self.on_result = on_result  # (rollout id, error or None) once each reward was posted or given up
        self.heap: list[tuple[float, str, float]] = []
        self.cond = threading.Condition()
        self.stopped = False
        self.busy = False
        self.thread = threading.Thread(target=self._run, name="delayed-rewards", daemon=True)
        self.thread.start()

    def post_later(self, delay: float, rollout_id: str, value: float) -> None:
        with self.cond:
            heapq.heappush(self.heap, (time.monotonic() + delay, rollout_id, value))
            self.cond.notify()

    def _run(self) -> None:
        while True:
            with self.cond:
                while not self.stopped and (not self.heap or self.heap[0][0] > time.monotonic()):
                    self.cond.wait(0.2 if not self.heap else max(0.0, self.heap[0][0] - time.monotonic()))
                if self.stopped:
                    return
                _, rollout_id, value = heapq.heappop(self.heap)
                self.busy = True
            try:
                self.post(rollout_id, value)
                self.on_result(rollout_id, None)
            except httpx.HTTPError as exc:
                log.warning("could not post the reward of rollout %s: %s", rollout_id, exc)
                self.on_result(rollout_id, f"reward not posted: {exc!r}")
            finally:
                with self.cond:
                    self.busy = False
                    self.cond.notify_all()

    def stop(self, wait_s: float = 0.0) -> None:
        """Stop, after waiting up to ``wait_s`` for the rewards not yet posted; those left are reported."""
        deadline = time.monotonic() + wait_s
        with self.cond:
            while (self.heap or self.busy) and time.monotonic() < deadline:
                self.cond.wait(0.1)
            self.stopped = True
            left, self.heap = self.heap, []
            self.cond.notify_all()
        for _, rollout_id, _ in left:
            self.on_result(rollout_id, "reward not posted: the agents stopped first")


RETRY_STATUS = (502, 503, 504)  # the gateway is restarting, or its event queue is full while Kafka is away


def post_with_retry(http: httpx.Client, path: str, body: dict[str, Any], retry_s: float) -> None:
    """POST to the gateway's rollout API, retrying for up to ``retry_s`` while it cannot take the request.

    Every try carries the same ``event_id``: a request the gateway queued but could not confirm
    (503 while Kafka is away) may still reach Kafka, and the stream processor then drops the
    retry as a duplicate of it.
    """
    body = {**body, "event_id": body.get("event_id") or uuid.uuid4().hex}
    deadline = time.monotonic() + retry_s
    delay = 0.25
    while True:
        try:
            http.post(path, json=body).raise_for_status()
            return
        except httpx.HTTPStatusError as exc:
            if exc.response.status_code not in RETRY_STATUS or time.monotonic() + delay > deadline:
                raise
        except httpx.TransportError:
            if time.monotonic() + delay > deadline:
                raise
        time.sleep(delay)
        delay = min(2 * delay, 2.0)


class Ledger:
    """Append-only JSON lines, one per rollout start, end and delayed reward (None: record nothing)."""

    def __init__(self, path: Path | None) -> None:
        self.lock = threading.Lock()
        self.file = open(path, "a", buffering=1) if path is not None else None  # noqa: SIM115 - closed in close()

    def write(self, **fields: Any) -> None:
        if self.file is None:
            return
        line = json.dumps({"t": round(time.time(), 3), **fields})
        with self.lock:
            if not self.file.closed:
                self.file.write(line + "\n")

    def close(self) -> None:
        if self.file is not None:
            with self.lock:
                self.file.close()


@dataclass
class WorkerStats:
    """Counters the progress display reads (updated by the worker threads)."""

    rollouts: int = 0
    calls: int = 0
    errors: int = 0
    active: int = 0  # rollouts under way
    rewards: deque[tuple[float, float]] = field(default_factory=lambda: deque(maxlen=4000))  # (time, reward)
    # GRPO groups whose rollouts all ended: how many had every reward 0 (no advantage, no gradient), every
    # reward 1 (the same), or a mix (the only ones that teach anything), and the rewards by operator word.
    groups: dict[str, int] = field(default_factory=lambda: {"all_fail": 0, "all_pass": 0, "mixed": 0})
    by_op: dict[str, deque[float]] = field(default_factory=dict)
    open_groups: dict[str, list[float]] = field(default_factory=dict)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def reward_mean(self, window_s: float = 30.0) -> float | None:
        now = time.monotonic()
        with self.lock:
            recent = [r for t, r in self.rewards if now - t <= window_s]
        return sum(recent) / len(recent) if recent else None

    def record(self, task: Task, group_id: str, group_size: int, reward: float | None) -> None:
        """One rollout of ``group_id`` ended (``reward`` None: abandoned); counts the group once all ended."""
        with self.lock:
            if reward is not None:
                self.by_op.setdefault(task.op, deque(maxlen=400)).append(reward)
            got = self.open_groups.setdefault(group_id, [])
            got.append(-1.0 if reward is None else reward)
            if len(got) < group_size:
                return
            del self.open_groups[group_id]
            done = [r for r in got if r >= 0]
            if done:
                kind = "all_fail" if max(done) == 0 else "all_pass" if min(done) == 1 else "mixed"
                self.groups[kind] += 1

    def op_means(self) -> dict[str, float]:
        """Mean training reward by operator word over its last 400 rollouts."""
        with self.lock:
            return {op: round(sum(r) / len(r), 3) for op, r in sorted(self.by_op.items()) if r}


class Workers:
    """``concurrency`` agents solving training tasks through the gateway, in GRPO groups."""

    def __init__(self, gateway_url: str, policy: str, group_size: int, concurrency: int,
                 delayed_share: float = 0.25, max_delay_s: float = 4.0, temperature: float = 1.0,
                 seed: int = 0, held_out: list[Task] | None = None,
                 allowance: Callable[[], int] | None = None, retry_s: float = 30.0,
                 ledger: Path | None = None) -> None:
        self.gateway_url = gateway_url.rstrip("/")
        self.policy = policy
        self.group_size = group_size
        self.concurrency = concurrency
        self.delayed_share = delayed_share
        self.max_delay_s = max_delay_s
        self.temperature = temperature
        self.retry_s = retry_s
        self.ledger = Ledger(ledger)
        self.rng = random.Random(seed)
        self.tasks = tasks.TrainTasks(held_out or [], seed)
        self.stats = WorkerStats()
        self.http = httpx.Client(base_url=self.gateway_url, timeout=60.0,
                                 limits=httpx.Limits(max_connections=concurrency * 2 + 4))
        self.client = OpenAI(base_url=self.gateway_url + "/v1", api_key="demo", max_retries=1, timeout=120.0)
        self.delayed = DelayedRewards(self._post_reward, self._reward_result)
        # How many groups may have been started so far: keeps the agents a few trainer steps ahead
        # of the trainer instead of flooding it with rollouts that go stale before they are used.
        self.allowance = allowance
        self.groups = 0
        self.stop_event = threading.Event()
        self.thread = threading.Thread(target=self._run, name="workers", daemon=True)

    def start(self) -> None:
        self.thread.start()

    def stop(self) -> None:
        """Start no more rollouts; let those under way finish and the delayed rewards fall due."""
        self.stop_event.set()
        if self.thread.ident is not None:  # started
            self.thread.join(90)
        self.delayed.stop(wait_s=self.max_delay_s + 5.0)
        self.ledger.close()

    def _post_reward(self, rollout_id: str, value: float) -> None:
        post_with_retry(self.http, f"/v1/rollouts/{rollout_id}/rewards", {"value": value, "terminal": True},
                        self.retry_s)

    def _reward_result(self, rollout_id: str, error: str | None) -> None:
        self.ledger.write(event="reward", rollout_id=rollout_id, posted=error is None, error=error)
        if error is not None:
            with self.stats.lock:
                self.stats.errors += 1

    def _run(self) -> None:
        slots = threading.Semaphore(self.concurrency)
        with ThreadPoolExecutor(self.concurrency, thread_name_prefix="agent") as pool:
            while not self.stop_event.is_set():
                if self.allowance is not None and self.groups >= self.allowance():
                    time.sleep(0.1)
                    continue
                self.groups += 1
                task = self.tasks.next()
                group_id = f"{task.task_id}-{uuid.uuid4().hex[:6]}"
                for _ in range(self.group_size):
                    while not slots.acquire(timeout=0.2):
                        if self.stop_event.is_set():
                            return
                    future = pool.submit(self.rollout, task, group_id)
                    future.add_done_callback(lambda _f: slots.release())

    def rollout(self, task: Task, group_id: str) -> None:
        rollout_id = uuid.uuid4().hex
        stage = "start"
        self.ledger.write(event="start", rollout_id=rollout_id, task_id=task.task_id, group_id=group_id)
        with self.stats.lock:
            self.stats.active += 1
        try:
            post_with_retry(self.http, "/v1/rollouts", {"rollout_id": rollout_id, "task_id": task.task_id,
                                                        "group_id": group_id, "policy": self.policy}, self.retry_s)
            stage = "model call"
            client = self.client.with_options(base_url=f"{self.gateway_url}/rollouts/{rollout_id}/v1")
            episode = solve(client, self.policy, task, self.temperature)
            stage = "finish"
            post_with_retry(self.http, f"/v1/rollouts/{rollout_id}/finish",
                            {"status": "SUCCEEDED", "task_id": task.task_id, "group_id": group_id}, self.retry_s)
            stage = "reward"
            delayed = self.rng.random() < self.delayed_share
            if delayed:
                self.delayed.post_later(self.rng.uniform(1.0, self.max_delay_s), rollout_id, episode.reward)
            else:
                self._post_reward(rollout_id, episode.reward)
        except Exception as exc:  # an agent failing must not stop the others
            self.stats.record(task, group_id, self.group_size, None)
            with self.stats.lock:
                self.stats.errors += 1
                self.stats.active -= 1
            # Abandoned: whatever reached the gateway stays an open rollout until the processor expires it.
            self.ledger.write(event="end", rollout_id=rollout_id, ok=False, stage=stage, error=repr(exc)[:300])
            if not self.stop_event.is_set():
                log.warning("rollout %s failed at its %s: %s", rollout_id, stage, exc)
            return
        self.ledger.write(event="end", rollout_id=rollout_id, ok=True, calls=episode.calls, reward=episode.reward,
                          reward_delayed=delayed)
        self.stats.record(task, group_id, self.group_size, episode.reward)
        with self.stats.lock:
            self.stats.active -= 1
            self.stats.rollouts += 1
            self.stats.calls += episode.calls
            self.stats.rewards.append((time.monotonic(), episode.reward))


def evaluate(server_base_url: str, policy: str, held_out: list[Task], concurrency: int = 16,
             by_op: dict[str, float] | None = None) -> tuple[float, int]:
    """(greedy accuracy on the held-out tasks, the policy version that answered most of them).

    ``by_op``, when given, receives the accuracy for each operator word."""
    with OpenAI(base_url=server_base_url, api_key="demo", max_retries=2, timeout=120.0) as client, \
            ThreadPoolExecutor(concurrency, thread_name_prefix="eval") as pool:
        episodes = list(pool.map(lambda t: solve(client, policy, t, temperature=0.0), held_out))
    if by_op is not None:
        for op in sorted({t.op for t in held_out}):
            mine = [e.reward for t, e in zip(held_out, episodes, strict=True) if t.op == op]
            by_op[op] = round(sum(mine) / len(mine), 3)
    versions = [e.policy_version for e in episodes if e.policy_version is not None]
    version = max(set(versions), key=versions.count) if versions else -1
    return sum(e.reward for e in episodes) / len(episodes), int(version)
