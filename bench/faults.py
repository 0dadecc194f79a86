"""Fault run: the demo's closed loop under kill -9 and a broker restart, then an accounting of every rollout.

The loop is the one ``rollstream demo`` runs (policy server, capturing gateway, stream processor,
trainer and calculator agents on a fresh topic prefix, the tiny default model). While the agents
work, at spaced moments, it

1. kills the stream processor with ``kill -9`` and starts it again (same app id and data folder);
2. kills the trainer with ``kill -9`` between two checkpoints and starts it again (it resumes from
   its newest checkpoint, replaying the steps after it);
3. kills the gateway with ``kill -9`` and starts it again on the same port (calls under way fail: the
   agents retry the rollout API for a while and abandon a rollout whose model call failed);
4. kills the Kafka broker with ``kill -9`` and starts it again (``Stack.restart``: same ports, same data folder);
5. kills the schema registry with ``kill -9`` and starts it again (its schemas and ids are on disk);
6. stops the S3 server for ``--outage-s`` seconds while the trainer checkpoints (it retries with backoff,
   and publishes no policy update for a checkpoint that is not completely written);
7. stops the MLflow server for ``--outage-s`` seconds likewise.

Each fault waits for the loop to have recovered from the one before: a new trainer step, a new
rollout finished by the agents and a new transition from the processor. A child that exits on its
own is started again and reported as an unplanned restart.

Then the agents stop, the processor is given ``--expire-after`` seconds to expire what was abandoned,
the trainer is stopped (SIGTERM: it checkpoints) and run once more with ``--idle-exit-s`` to train
what is left, and the accounting reads only durable records:

- the agents' own ledger (``rollouts.jsonl``: every rollout they started, and how it ended);
- the topics, with read_committed: rollouts, calls, rewards, transitions, dead letters, late events,
  and the processor's changelog (how each rollout closed: completed or expired);
- the trainer's checkpoints on S3 (``trainer_state.json``: the transition ids each step trained,
  and those dropped as stale, since the previous checkpoint; a pruned checkpoint leaves that record
  under ``records/``).

Every rollout is then trained, dropped by the trainer (stale), expired, dead-lettered, not started
(the gateway was unreachable for its start), or LOST. It is LOST when an event the gateway
acknowledged to the agent (start, call, finish, reward: a 2xx answer, per the ledger) is not in
Kafka, whatever became of the rest; when one of its transitions was never trained nor dropped;
when a completed rollout has a call without a transition; or when it is still open. A transition
id in more than one trainer step is trained twice.

    .venv/bin/python bench/faults.py            # 10 minutes of agents, every fault twice (about 16 in all)
    .venv/bin/python bench/faults.py --quick    # 5 minutes of agents, every fault once (about 9 in all)
    .venv/bin/python bench/faults.py --quick --faults processor,trainer,broker

It needs the local stack (``rollstream stack up``; it is started if it is not) and restarts its broker.
The last line printed is one JSON object with every figure; the exit code is 1 when a rollout is
lost or a transition was trained twice, 2 when the run could not be made.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import signal
import subprocess
import sys
import time
import uuid
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import orjson
from confluent_kafka import OFFSET_BEGINNING, Consumer, KafkaError, TopicPartition
from rich.console import Console
from rich.table import Table

from rollstream.demo import agent, model, tasks
from rollstream.demo.main import add_loop_arguments, ensure_stack, trainer_args
from rollstream.demo.services import Loop
from rollstream.errors import RollstreamError
from rollstream.schemas.codec import EventCodec, registry_client
from rollstream.schemas.topics import Topics, consumer_config
from rollstream.settings import ConnectionSettings, env
from rollstream.stack import Stack
from rollstream.storage import ObjectStore
from rollstream.trainer.checkpoint import CheckpointStore

log = logging.getLogger("faults")

FAULTS = ("processor", "trainer", "gateway", "broker", "registry", "s3", "mlflow")
OUTAGES = {"s3": "s3", "mlflow": "mlflow"}  # fault -> stack service stopped for --outage-s


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--quick", action="store_true", help="5 minutes of agents, every fault once")
    p.add_argument("--minutes", type=float, default=10.0, help="minutes the agents work (faults happen meanwhile)")
    p.add_argument("--rounds", type=int, default=2, help="times each fault is injected")
    add_loop_arguments(p)
    p.add_argument("--faults", default=",".join(FAULTS), help="which faults, in this order (comma-separated)")
    p.add_argument("--expire-after", type=float, default=60.0,
                   help="seconds after which the processor expires an unfinished rollout (PROCESS_EXPIRE_AFTER)")
    p.add_argument("--broker-down-s", type=float, default=5.0, help="seconds the broker stays down after its kill -9")
    p.add_argument("--outage-s", type=float, default=60.0, help="seconds the S3 and MLflow servers stay stopped")
    p.add_argument("--recovery-timeout", type=float, default=120.0,
                   help="seconds a fault may take to recover before the next one is injected anyway")
    p.add_argument("--policy", default="calc-faults", help="policy name (also the MLflow registered model)")
    p.add_argument("--run-dir", default="", help="run folder (default: $ROLLSTREAM_HOME/faults/runs/<run>)")
    p.add_argument("--threads", type=int, default=1, help="torch threads of the server and the trainer")
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    return p


# -- the run -----------------------------------------------------------------------------------


@dataclass
class Fault:
    kind: str
    at_s: float  # seconds since the agents started
    detail: str = ""
    recovered_s: float | None = None  # until the loop moved again (trainer step, rollout, transition)
    errors_before: int = 0
    abandoned: int = 0  # rollouts the agents abandoned between the fault and the recovery


@dataclass
class Progress:
    """What shows that the loop moves: trainer steps logged, rollouts the agents finished, transitions."""

    steps_logged: int
    rollouts: int
    processor_pid: int
    transitions: int

    def advanced_from(self, before: Progress) -> bool:
        transitions_before = before.transitions if self.processor_pid == before.processor_pid else 0
        return (self.steps_logged > before.steps_logged and self.rollouts > before.rollouts
                and self.transitions > transitions_before)


class FaultRun:
    def __init__(self, args: argparse.Namespace, console: Console) -> None:
        self.args = args
        self.console = console
        self.run_id = "faults-" + time.strftime("%Y%m%d-%H%M%S") + "-" + uuid.uuid4().hex[:4]
        self.run_dir = Path(args.run_dir or Path(env("HOME")).expanduser() / "faults" / "runs" / self.run_id)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.stack = Stack(report=lambda msg: log.info("stack: %s", msg))
        self.conn = dataclasses.replace(ConnectionSettings(), topic_prefix=f"faults.{self.run_id}.")
        self.faults: list[Fault] = []
        self.unplanned: list[dict[str, Any]] = []
        self.t0 = 0.0
        self.loop: Loop | None = None
        self.workers: agent.Workers | None = None

    @property
    def ledger(self) -> Path:
        return self.run_dir / "rollouts.jsonl"

    @property
    def app_id(self) -> str:
        return f"demo-processor-{self.run_id}"

    @property
    def checkpoint_uri(self) -> str:
        return f"s3://{self.conn.s3_bucket}/demo/{self.run_id}"

    def say(self, msg: str) -> None:
        elapsed = f"{time.monotonic() - self.t0:6.1f} s" if self.t0 else "   setup"
        self.console.print(f"[{elapsed}] {msg}", highlight=False)

    def progress(self) -> Progress:
        assert self.loop is not None and self.workers is not None
        self.loop.poll()
        processor = self.loop.child("processor")
        stats = self.loop.processor_stats() if processor.alive() else {}
        return Progress(len(self.loop.trainer.rewards), self.workers.stats.rollouts, processor.process.pid,
                        int(stats.get("transitions", 0)))

    def supervise(self) -> None:
        """Start again any child that exited on its own (an unplanned restart, reported)."""
        assert self.loop is not None
        for name, rc, log_tail in self.loop.supervise(max_restarts=1000):
            tail = log_tail.strip().splitlines()[-3:]
            self.unplanned.append({"at_s": round(time.monotonic() - self.t0, 1), "process": name,
                                   "exit_code": rc, "log_tail": tail})
            self.say(f"[yellow]{name} exited on its own (exit code {rc}); started again as pid "
                     f"{self.loop.child(name).process.pid}[/]; its last log lines: {' | '.join(tail)}")

    def inject(self, kind: str) -> Fault:
        assert self.loop is not None
        fault = Fault(kind, round(time.monotonic() - self.t0, 1))
        if kind == "broker":
            self.say(f"[red]fault[/]: kill -9 of the Kafka broker ({self.stack.kafka.url}), "
                     f"down for {self.args.broker_down_s:.0f} s")
            down = self.stack.restart("kafka", down_s=self.args.broker_down_s, kill=True)
            fault.detail = f"broker killed (-9) and started again: down {down:.1f} s until healthy"
        elif kind == "registry":
            down = self.stack.restart("registry", kill=True)
            fault.detail = f"schema registry killed (-9) and started again: down {down:.1f} s until healthy"
        elif kind in OUTAGES:
            service = OUTAGES[kind]
            step = self.loop.trainer.step
            self.say(f"[red]fault[/]: stopping the {service} server for {self.args.outage_s:.0f} s "
                     f"at trainer step {step}")
            down = self.stack.restart(service, down_s=self.args.outage_s)
            fault.detail = (f"{service} server stopped at trainer step {step}, back after {down:.1f} s "
                            f"(trainer step {self.loop.trainer.step} then)")
        else:
            child = self.loop.child(kind)
            pid, step = child.process.pid, self.loop.trainer.step
            rc = child.kill(signal.SIGKILL)
            if kind == "gateway":
                time.sleep(2.0)  # a gateway that stays away a moment: agents' calls meanwhile fail
            new = self.loop.respawn(kind)
            fault.detail = f"kill -9 pid {pid} (exit {rc}) at trainer step {step}; restarted as pid {new.process.pid}"
        self.say(f"[red]fault[/]: {kind}: {fault.detail}")
        self.faults.append(fault)
        return fault

    def ready_for(self, kind: str) -> bool:
        """Faults land where they test something: the processor once it has emitted transitions, the trainer
        between two checkpoints (after its first), the gateway while rollouts are under way."""
        assert self.loop is not None
        if kind == "trainer":
            step, every = self.loop.trainer.step, self.args.checkpoint_every
            return step > every and step % every not in (0, every - 1)
        if kind == "processor":
            return int(self.loop.processor_stats().get("transitions", 0)) > 0
        if kind == "gateway":  # while agents are mid-rollout (they run in bursts, as the trainer allows)
            assert self.workers is not None
            deadline = time.monotonic() + 1.0
            while time.monotonic() < deadline:
                if self.workers.stats.active >= max(1, self.args.agents // 2):
                    return True
                time.sleep(0.01)
            return False
        return True

    def schedule(self, work_s: float) -> list[tuple[float, str]]:
        kinds = [k for _ in range(self.args.rounds) for k in self.args.faults.split(",") if k]
        first, last = 0.12 * work_s, 0.8 * work_s
        gap = (last - first) / max(len(kinds) - 1, 1)
        return [(first + i * gap, k) for i, k in enumerate(kinds)]

    def run(self) -> dict[str, Any]:
        args = self.args
        ensure_stack(self.console)
        with self.console.status(f"preparing the {args.model} model…"):
            model_dir = model.build_model(args.model)
        train_args = trainer_args(args, self.conn, self.run_id)
        self.loop = loop = Loop(self.run_dir, self.conn, model_dir, args.policy, train_args, self.run_id,
                                threads=args.threads, engine=args.engine,
                                extra_env={"ROLLSTREAM_PROCESS_EXPIRE_AFTER": str(args.expire_after)})
        self.say(f"run {self.run_id}: topics {self.conn.topic_prefix}*, logs in {self.run_dir}")
        try:
            with self.console.status("starting the policy server, gateway, processor and trainer…"):
                loop.start()
            self.workers = workers = agent.Workers(
                loop.gateway_url, args.policy, args.group_size, args.agents, delayed_share=args.delayed_share,
                held_out=tasks.eval_tasks(60), ledger=self.ledger,
                allowance=lambda: (loop.trainer.step + args.ahead) * args.groups_per_step)
            self.t0 = time.monotonic()
            workers.start()
            self.say(f"{args.agents} agents started; faults at "
                     + ", ".join(f"{t:.0f} s {k}" for t, k in self.schedule(args.minutes * 60)))
            self._work(args.minutes * 60)
            self.say("stopping the agents (rollouts under way finish, delayed rewards are posted)")
            workers.stop()
            self._drain()
        finally:
            if self.workers is not None:
                self.workers.stop()
            loop.stop()
        return self.account()

    def _work(self, work_s: float) -> None:
        pending = self.schedule(work_s)
        last_print = 0.0
        fault: Fault | None = None
        before: Progress | None = None
        extended = False
        while True:
            time.sleep(0.5)
            self.supervise()
            now = time.monotonic() - self.t0
            current = self.progress()
            if fault is not None and before is not None and current.advanced_from(before):
                fault.recovered_s = round(now - fault.at_s, 1)
                fault.abandoned = (self.workers.stats.errors if self.workers else 0) - fault.errors_before
                self.say(f"[green]recovered[/] from the {fault.kind} fault in {fault.recovered_s:.1f} s "
                         f"(trainer step {self.loop.trainer.step if self.loop else '?'}, "
                         f"{current.rollouts} rollouts done, {fault.abandoned} abandoned by agents meanwhile)")
                fault = None
            if now - last_print >= 20:
                self._print_progress(current)
                last_print = now
            if now >= work_s:
                if pending and not extended:
                    self.say(f"[yellow]the agents' time is up before these faults: {[k for _, k in pending]}[/]")
                if fault is None:
                    return
                if now - fault.at_s > self.args.recovery_timeout:
                    self.say(f"[yellow]no recovery from the {fault.kind} fault after "
                             f"{self.args.recovery_timeout:.0f} s[/]")
                    return
                if not extended:
                    extended = True
                    self.say(f"the agents' time is up; they go on until the loop recovers from the {fault.kind} fault")
            overdue = fault is not None and now - fault.at_s > self.args.recovery_timeout
            due = pending and pending[0][0] <= now < work_s
            if due and (fault is None or overdue) and self.ready_for(pending[0][1]):
                if overdue and fault is not None:
                    self.say(f"[yellow]no recovery from the {fault.kind} fault after "
                             f"{self.args.recovery_timeout:.0f} s; going on[/]")
                _, kind = pending.pop(0)
                errors = self.workers.stats.errors if self.workers else 0
                fault = self.inject(kind)
                fault.errors_before = errors
                before = self.progress()  # after the restart: the broker restart blocks until Kafka is back

    def _print_progress(self, p: Progress) -> None:
        assert self.loop is not None and self.workers is not None
        served = self.loop.server_stats().get("policy_version", "?")
        stats = self.loop.processor_stats()
        self.say(f"trainer step {self.loop.trainer.step}, policy v{served} served, {p.rollouts} rollouts done, "
                 f"{self.workers.stats.errors} abandoned; processor since its start: "
                 f"{stats.get('transitions', '-')} transitions, {stats.get('open_rollouts', '-')} open, "
                 f"{stats.get('expired_dropped', '-')} expired")

    def _drain(self) -> None:
        """Let the processor close every rollout, then have the trainer train all that is left."""
        assert self.loop is not None
        loop = self.loop
        stopped = time.monotonic()
        deadline = stopped + self.args.expire_after + 5 * self.args.recovery_timeout
        self.say(f"draining: waiting {self.args.expire_after:.0f} s for the processor to expire abandoned rollouts")
        while True:
            time.sleep(1.0)
            self.supervise()
            stats = loop.processor_stats()
            waited = time.monotonic() - stopped
            if waited >= self.args.expire_after + 5 and stats.get("open_rollouts") == 0:
                break
            if time.monotonic() > deadline:
                self.say(f"[yellow]the processor still reports {stats.get('open_rollouts')} open rollouts[/]")
                break
        self.say(f"processor: {loop.processor_stats()}")
        trainer = loop.child("trainer")
        self.say(f"stopping the trainer (SIGTERM: it checkpoints) at step {loop.trainer.step}")
        trainer.stop(timeout=120)
        self.say("running the trainer once more to train what is left (--idle-exit-s 10)")
        last = loop.respawn("trainer", trainer.args + ["--idle-exit-s", "10"])
        try:
            rc = last.process.wait(600)
        except subprocess.TimeoutExpired:
            rc = last.kill()
        loop.poll()
        self.say(f"trainer exited with {rc} at step {loop.trainer.step}")

    # -- the accounting ------------------------------------------------------------------------

    def account(self) -> dict[str, Any]:
        self.say("accounting from the ledger, the topics (read_committed) and the checkpoints")
        return Accounting(self.conn, self.ledger, self.app_id, self.checkpoint_uri).run()


def read_topic(conn: ConnectionSettings, topic: str, timeout: float = 120.0) -> list[Any]:
    """Every committed record of ``topic``, from the beginning to the end of each partition."""
    consumer = Consumer(consumer_config(f"faults-audit-{uuid.uuid4().hex[:8]}", conn,
                                        **{"enable.partition.eof": True}))
    try:
        meta = consumer.list_topics(topic, timeout=30)
        partitions = sorted(meta.topics[topic].partitions)
        consumer.assign([TopicPartition(topic, p, OFFSET_BEGINNING) for p in partitions])
        done: set[int] = set()
        out: list[Any] = []
        deadline = time.monotonic() + timeout
        while len(done) < len(partitions):
            if time.monotonic() > deadline:
                raise RollstreamError(f"could not read {topic} to its end within {timeout:.0f} s")
            for msg in consumer.consume(1000, timeout=1.0):
                err = msg.error()
                if err is not None:
                    if err.code() == KafkaError._PARTITION_EOF:
                        done.add(msg.partition() or 0)
                        continue
                    raise RollstreamError(f"reading {topic}: {err}")
                out.append(msg)
        return out
    finally:
        consumer.close()


@dataclass
class RolloutRecord:
    """What the durable records say about one rollout."""

    agent_start: bool = False
    agent_end: dict[str, Any] | None = None
    agent_reward: dict[str, Any] | None = None
    statuses: list[str] = field(default_factory=list)
    calls: set[str] = field(default_factory=set)
    rewards: int = 0
    transitions: set[str] = field(default_factory=set)
    closed: str | None = None  # completed | expired | open (a state that never closed) | None (no state)
    dead_letters: list[str] = field(default_factory=list)
    late: list[tuple[str, str]] = field(default_factory=list)  # (why late, the input topic)

    def in_kafka(self) -> bool:
        return bool(self.statuses or self.calls or self.rewards)

    def missing(self) -> str:
        """Which events of the rollout are not in Kafka (what kept it from completing)."""
        parts = [name for name, present in (("start", "STARTED" in self.statuses), ("calls", bool(self.calls)),
                                            ("finish", "SUCCEEDED" in self.statuses), ("reward", self.rewards > 0))
                 if not present]
        return "no " + " and no ".join(parts) + " in Kafka" if parts else "every event in Kafka"

    def acknowledged_missing(self) -> list[str]:
        """Events the gateway acknowledged to the agent (a 2xx answer, per the ledger) that are not in Kafka."""
        end = self.agent_end or {}
        stages = ("start", "model call", "finish", "reward")
        done = len(stages) if end.get("ok") else stages.index(end["stage"]) if end.get("stage") in stages else 0
        out = []
        if done > 0 and "STARTED" not in self.statuses:
            out.append("start")
        if end.get("ok") and len(self.calls) < int(end.get("calls", 0)):
            out.append("calls")
        if done > 2 and "SUCCEEDED" not in self.statuses:
            out.append("finish")
        reward_acked = end.get("ok") and (not end.get("reward_delayed") or (self.agent_reward or {}).get("posted"))
        if reward_acked and self.rewards == 0:
            out.append("reward")
        return out

    def agent_outcome(self) -> str:
        if not self.agent_start:
            return "not in the ledger"
        end = self.agent_end
        if end is None:
            return "no end recorded"
        if not end.get("ok"):
            return "start refused" if end.get("stage") == "start" else "abandoned"
        if end.get("reward_delayed") and not (self.agent_reward or {}).get("posted"):
            return "reward not posted"
        return "completed"


CLASSES = {
    "trained": "trained (its transitions in a trainer step)",
    "dropped_stale": "dropped by the trainer as stale (recorded)",
    "expired": "expired by the processor",
    "dead_lettered": "dead-lettered",
    "not_started": "not started (the gateway refused or was away)",
    "lost_untrained": "LOST: transitions never trained",
    "lost_missing_transition": "LOST: a call without its transition",
    "lost_completed_without_calls": "LOST: completed without calls",
    "lost_acknowledged": "LOST: events acknowledged by the gateway are not in Kafka",
    "lost_open": "LOST: still open in the processor",
    "lost_unseen": "LOST: never seen by the processor",
}
OUTCOMES = ("completed", "abandoned", "start refused", "reward not posted", "no end recorded", "not in the ledger")


class Accounting:
    def __init__(self, conn: ConnectionSettings, ledger: Path, app_id: str, checkpoint_uri: str) -> None:
        self.conn = conn
        self.ledger = ledger
        self.app_id = app_id
        self.checkpoint_uri = checkpoint_uri
        self.topics = Topics.from_settings(conn)
        self.codec = EventCodec(registry_client(conn), self.topics)

    def collect(self) -> tuple[dict[str, RolloutRecord], Counter[str], dict[str, str], dict[str, Any]]:
        rollouts: dict[str, RolloutRecord] = {}

        def of(rid: str) -> RolloutRecord:
            return rollouts.setdefault(rid, RolloutRecord())

        for line in self.ledger.read_text().splitlines():
            entry = json.loads(line)
            r = of(entry["rollout_id"])
            if entry["event"] == "start":
                r.agent_start = True
            elif entry["event"] == "end":
                r.agent_end = entry
            elif entry["event"] == "reward":
                r.agent_reward = entry
        t = self.topics
        for msg in read_topic(self.conn, t.rollouts):
            event = self.codec.decode(t.rollouts, msg.value())
            of(event["rollout_id"]).statuses.append(event["status"])
        for msg in read_topic(self.conn, t.calls):
            event = self.codec.decode(t.calls, msg.value())
            of(event["rollout_id"]).calls.add(event["call_id"])
        for msg in read_topic(self.conn, t.rewards):
            of(self.codec.decode(t.rewards, msg.value())["rollout_id"]).rewards += 1
        transition_of: dict[str, str] = {}
        for msg in read_topic(self.conn, t.transitions):
            event = self.codec.decode(t.transitions, msg.value())
            of(event["rollout_id"]).transitions.add(event["transition_id"])
            transition_of[event["transition_id"]] = event["rollout_id"]
        for msg in read_topic(self.conn, t.dead_letters):
            event = self.codec.decode(t.dead_letters, msg.value())
            key = (msg.key() or b"").decode(errors="replace")
            of(key or "(no key)").dead_letters.append(event.get("error_type") or "?")
        for msg in read_topic(self.conn, t.late_events):
            headers = dict(msg.headers() or [])
            key = (msg.key() or b"").decode(errors="replace")
            of(key).late.append(((headers.get("rollstream-late-reason") or b"?").decode(),
                                 (headers.get("rollstream-topic") or b"?").decode()))
        changelog = f"{self.app_id}-rollouts-changelog"
        last: dict[bytes, bytes | None] = {}
        for msg in read_topic(self.conn, changelog):
            key = msg.key() or b""
            if not key.startswith(b"\x00"):  # the processor's own bookkeeping keys start with a zero byte
                last[key] = msg.value()
        for key, value in last.items():
            state = orjson.loads(value) if value is not None else None
            r = of(key.decode(errors="replace"))
            r.closed = None if state is None else (state.get("closed_how") or "open")
        # The checkpoints that are the final weights' lineage: which step trained which transition.
        store = CheckpointStore(ObjectStore(self.conn), self.checkpoint_uri)
        trained: Counter[str] = Counter()
        dropped: dict[str, str] = {}
        steps = store.steps()
        for record in store.records().values():  # pruned checkpoints (--keep-checkpoints) leave their record
            for ids in record["consumed"].values():
                trained.update(ids)
            dropped.update(record["dropped"])
        latest = store.latest() or {}
        trainer = {"checkpoints": len(steps), "final_step": latest.get("step", 0),
                   "final_policy_version": latest.get("policy_version", 0)}
        return rollouts, trained, dropped, trainer

    def classify(self, r: RolloutRecord, trained: Counter[str], dropped: dict[str, str]) -> str:
        t = self.topics
        if r.acknowledged_missing():  # whatever became of the rest, the gateway lost what it had accepted
            return "lost_acknowledged"
        if r.transitions:
            if any(trained[tid] == 0 and tid not in dropped for tid in r.transitions):
                return "lost_untrained"
            late_calls = sum(1 for _, topic in r.late if topic == t.calls)
            if r.closed == "completed" and len(r.transitions) + late_calls < len(r.calls):
                return "lost_missing_transition"
            return "trained" if any(trained[tid] for tid in r.transitions) else "dropped_stale"
        if r.closed == "expired":
            return "expired"
        if r.dead_letters:
            return "dead_lettered"
        if r.closed == "completed":
            return "lost_completed_without_calls"
        if not r.in_kafka() and r.agent_outcome() == "start refused":
            return "not_started"
        return "lost_open" if r.closed == "open" else "lost_unseen"

    def run(self) -> dict[str, Any]:
        rollouts, trained, dropped, trainer = self.collect()
        table: dict[str, Counter[str]] = {c: Counter() for c in CLASSES}
        classes: dict[str, str] = {}
        for rid, r in rollouts.items():
            c = classes[rid] = self.classify(r, trained, dropped)
            table[c][r.agent_outcome()] += 1
        all_transitions = {t for r in rollouts.values() for t in r.transitions}
        twice = sorted(t for t, n in trained.items() if n > 1)
        lost = sorted(rid for rid, c in classes.items() if c.startswith("lost"))
        by_class = {c: sum(table[c].values()) for c in CLASSES}
        abandoned = [rid for rid, r in rollouts.items() if r.agent_outcome() == "abandoned"]
        result = {
            "rollouts": len(rollouts),
            "started_by_agents": sum(r.agent_start for r in rollouts.values()),
            "in_kafka": sum(r.in_kafka() for r in rollouts.values()),
            **by_class,
            "lost": len(lost),
            "abandoned_by_agents": len(abandoned),
            "abandoned_expired": sum(classes[rid] == "expired" for rid in abandoned),
            "expired_though_agent_completed": table["expired"]["completed"],
            "expired_why": dict(Counter(r.missing() for rid, r in rollouts.items() if classes[rid] == "expired")),
            "acknowledged_missing": dict(Counter(e for r in rollouts.values() for e in r.acknowledged_missing())),
            "late_events": sum(len(r.late) for r in rollouts.values()),
            "calls": sum(len(r.calls) for r in rollouts.values()),
            "transitions": len(all_transitions),
            "transitions_trained": sum(1 for t in all_transitions if trained[t]),
            "transitions_dropped": sum(1 for t in all_transitions if t in dropped),
            "dropped_reasons": dict(Counter(dropped[t] for t in all_transitions if t in dropped)),
            "trained_unknown_ids": sum(1 for t in trained if t not in all_transitions),
            "trained_twice": len(twice),
            **trainer,
            "lost_ids": lost[:20],
            "trained_twice_ids": twice[:20],
        }
        return {"table": {c: dict(n) for c, n in table.items()}, "result": result, "classes": classes}


def print_report(console: Console, run: FaultRun, accounting: dict[str, Any]) -> dict[str, Any]:
    faults = Table("at", "fault", "what happened", "recovered in", "rollouts abandoned", title="faults")
    for f in run.faults:
        faults.add_row(f"{f.at_s:.0f} s", f.kind, f.detail, "-" if f.recovered_s is None else f"{f.recovered_s:.1f} s",
                       str(f.abandoned))
    for u in run.unplanned:
        faults.add_row(f"{u['at_s']:.0f} s", f"{u['process']} (unplanned)", f"exited with {u['exit_code']}; restarted",
                       "", "")
    console.print(faults)
    rows = Table("rollouts", "total", *OUTCOMES, title="accounting: what became of every rollout (by the agents' view)")
    lost = [c for c in CLASSES if c.startswith("lost") and accounting["table"][c]]
    for c, label in CLASSES.items():
        counts = accounting["table"][c]
        if c.startswith("lost") and c not in lost:
            continue
        style = "bold red" if c.startswith("lost") else None
        rows.add_row(label, str(sum(counts.values())), *(str(counts.get(o, 0)) for o in OUTCOMES), style=style)
    if not lost:
        rows.add_row("LOST", "0", *("0" for _ in OUTCOMES))
    console.print(rows)
    r = accounting["result"]
    if r["expired"]:
        console.print(f"expired rollouts, by what of them is in Kafka: {r['expired_why']}", highlight=False)
    if r["acknowledged_missing"]:
        console.print(f"events the gateway acknowledged that are not in Kafka: {r['acknowledged_missing']}",
                      highlight=False)
    console.print(f"transitions: {r['transitions']} in the topic, {r['transitions_trained']} trained, "
                  f"{r['transitions_dropped']} dropped by the trainer {r['dropped_reasons'] or ''}, "
                  f"{r['trained_twice']} trained twice; trainer: {r['checkpoints']} checkpoints, final step "
                  f"{r['final_step']}, policy version {r['final_policy_version']}", highlight=False)
    summary = {
        "run_dir": str(run.run_dir), "topic_prefix": run.conn.topic_prefix, "agent_minutes": run.args.minutes,
        "faults": [{"fault": f.kind, "at_s": f.at_s, "recovered_s": f.recovered_s, "abandoned": f.abandoned}
                   for f in run.faults],
        "unplanned_restarts": [{k: u[k] for k in ("process", "at_s", "exit_code")} for u in run.unplanned],
        **{k: v for k, v in r.items() if not k.endswith("_ids")},
        "ok": r["lost"] == 0 and r["trained_twice"] == 0,
    }
    (run.run_dir / "accounting.json").write_text(json.dumps({**summary, "lost_ids": r["lost_ids"],
                                                             "trained_twice_ids": r["trained_twice_ids"],
                                                             "classes": accounting["classes"]}, indent=1))
    return summary


def _interrupt(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    unknown = sorted(set(args.faults.split(",")) - set(FAULTS) - {""})
    if unknown:
        build_parser().error(f"unknown fault(s) {', '.join(unknown)}; choose from {', '.join(FAULTS)}")
    if args.quick:
        args.minutes, args.rounds = min(args.minutes, 5.0), 1
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.WARNING,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    signal.signal(signal.SIGTERM, _interrupt)
    console = Console(width=max(Console().width, 140))
    run = FaultRun(args, console)
    try:
        accounting = run.run()
    except RollstreamError as exc:
        console.print(f"[red]error:[/] {exc}")
        return 2
    except KeyboardInterrupt:
        console.print("interrupted; every process the run started is stopped")
        return 130
    summary = print_report(console, run, accounting)
    print(json.dumps(summary))
    return 0 if summary["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
