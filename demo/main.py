"""``rollstream demo``: the closed loop, end to end, on a calculator task.

Agents solve arithmetic questions with a calculator tool through the capturing gateway; their
calls and rewards stream through Kafka; the stream processor joins them into transitions; the
trainer takes GRPO steps and publishes policy versions; the policy server hot-reloads them while
the agents keep working. Held-out accuracy (greedy, straight from the policy server) is measured
before, during and after. The run folder gets every process's log, ``summary.json`` and
``curves.png`` (reward and accuracy over time); MLflow holds the trainer's run and the registered
model versions.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import signal
import sys
import time
import uuid
from collections.abc import Sequence
from pathlib import Path
from types import FrameType
from typing import Any

from rich.console import Console
from rich.live import Live
from rich.table import Table

from rollstream.demo import agent, model, tasks
from rollstream.demo.report import Curves, plot
from rollstream.demo.services import Loop
from rollstream.errors import RollstreamError
from rollstream.settings import ConnectionSettings, env

log = logging.getLogger(__name__)


def add_loop_arguments(p: argparse.ArgumentParser) -> None:
    """The knobs of the loop itself (model, agents, grouping, trainer), shared with the fault run."""
    p.add_argument("--engine", default="serve", choices=["serve", "vllm"],
                   help="serve: rollstream serve; vllm: vLLM (scripts/setup-vllm.sh) behind rollstream vllm")
    p.add_argument("--model", default="tiny", help="tiny (built and warm-started here), smollm2, or a model folder")
    p.add_argument("--agents", type=int, default=16, help="concurrent agent rollouts")
    p.add_argument("--group-size", type=int, default=8, help="rollouts per task (one GRPO group)")
    p.add_argument("--groups-per-step", type=int, default=4, help="GRPO groups in one trainer step")
    p.add_argument("--ahead", type=int, default=3, help="trainer steps' worth of groups the agents may run ahead")
    p.add_argument("--lr", type=float, default=0.0,
                   help="trainer learning rate (0: 2e-4 for the tiny model, where 3e-4 collapsed once; 1e-5 for "
                        "smollm2 or a model folder, where 2e-4 wrecked SmolLM2 at its first update)")
    p.add_argument("--checkpoint-every", type=int, default=4, help="trainer steps per policy version")
    p.add_argument("--delayed-share", type=float, default=0.25, help="share of rewards posted 1-4 s late")


def learning_rate(args: argparse.Namespace) -> float:
    """--lr, or the default for the model: a pretrained model needs a far smaller step than the tiny one."""
    return float(args.lr) if args.lr else (2e-4 if args.model == "tiny" else 1e-5)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="rollstream demo", description=__doc__.split("\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    add_loop_arguments(p)
    p.add_argument("--minutes", type=float, default=20.0, help="stop after this many minutes of training")
    p.add_argument("--steps", type=int, default=0, help="stop after this many trainer steps (0: no limit)")
    p.add_argument("--target", type=float, default=0.9, help="stop once held-out accuracy reaches this (0: never)")
    p.add_argument("--eval-tasks", type=int, default=60, help="held-out questions per evaluation")
    p.add_argument("--eval-every", type=float, default=30.0, help="seconds between held-out evaluations")
    p.add_argument("--policy", default="calc-demo", help="policy name (also the MLflow registered model)")
    p.add_argument("--topic-prefix", default="", help="topic prefix (default: a fresh demo.<run>. per run)")
    p.add_argument("--run-dir", default="", help="run folder (default: $ROLLSTREAM_HOME/demo/runs/<run>)")
    p.add_argument("--threads", type=int, default=1, help="torch threads of the server and the trainer")
    p.add_argument("--quick", action="store_true", help="a short run for tests: small eval, 6-minute budget")
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    return p


def trainer_args(args: argparse.Namespace, conn: ConnectionSettings, run_id: str) -> list[str]:
    """The ``rollstream train`` options of a demo run (its own checkpoint folder and consumer group)."""
    batch = args.group_size * args.groups_per_step * 2  # two calls (transitions) per rollout
    return [
        "--objective", "grpo", "--group-size", str(args.group_size), "--batch-size", str(batch),
        "--micro-batch-size", "32", "--lr", str(learning_rate(args)), "--checkpoint-every", str(args.checkpoint_every),
        "--max-policy-lag", "4", "--group-timeout-s", "20", "--batch-timeout-s", "5",
        "--checkpoint-uri", f"s3://{conn.s3_bucket}/demo/{run_id}", "--consumer-group", f"demo-trainer-{run_id}",
        "--experiment", "rollstream-demo",
        # Older checkpoints go once the server has moved on (SmolLM2's weigh 1.6 GB with the optimizer).
        "--keep-checkpoints", "3",
    ]


def _table(elapsed: float, loop: Loop, workers: agent.Workers, curves: Curves, events_per_s: float) -> Table:
    t = Table("elapsed", "trainer step", "policy served", "reward (30 s)", "held-out acc", "events/s", "lag",
              title="rollstream demo")
    stats = loop.server_stats()
    reward = workers.stats.reward_mean()
    acc = f"{curves.accuracy[-1][1]:.0%} (v{curves.accuracy[-1][2]})" if curves.accuracy else "-"
    t.add_row(f"{elapsed:.0f} s", str(loop.trainer.step), f"v{stats.get('policy_version', '?')}",
              "-" if reward is None else f"{reward:.2f}", acc, f"{events_per_s:.0f}",
              "-" if loop.trainer.lag is None else str(loop.trainer.lag))
    return t


def run(args: argparse.Namespace, console: Console) -> dict[str, Any]:
    started = time.monotonic()
    run_id = time.strftime("%Y%m%d-%H%M%S") + "-" + uuid.uuid4().hex[:4]
    run_dir = Path(args.run_dir or Path(env("HOME")).expanduser() / "demo" / "runs" / run_id)
    run_dir.mkdir(parents=True, exist_ok=True)
    ensure_stack(console)
    with console.status(f"preparing the {args.model} model (first run: warm start, a few minutes)…"):
        model_dir = model.build_model(args.model)
    conn = ConnectionSettings()
    conn = dataclasses.replace(conn, topic_prefix=args.topic_prefix or f"demo.{run_id}.")
    train_args = trainer_args(args, conn, run_id)
    held_out = tasks.eval_tasks(args.eval_tasks)
    loop = Loop(run_dir, conn, model_dir, args.policy, train_args, run_id, threads=args.threads, engine=args.engine)
    curves = Curves()
    summary: dict[str, Any] = {"run_dir": str(run_dir), "model": str(model_dir), "topic_prefix": conn.topic_prefix,
                               "policy": args.policy}
    workers: agent.Workers | None = None
    evaluations: list[dict[str, Any]] = []  # each held-out evaluation, with the accuracy by operator word
    try:
        with console.status("starting the policy server, gateway, processor and trainer…"):
            loop.start()
        assert loop.server is not None
        by_op: dict[str, float] = {}
        acc0, v0 = agent.evaluate(loop.server.base_url, args.policy, held_out, by_op=by_op)
        t0 = time.monotonic()
        curves.accuracy.append((0.0, acc0, v0))
        evaluations.append({"t": 0.0, "accuracy": acc0, "version": v0, "by_op": by_op})
        console.print(f"held-out accuracy before training: {acc0:.0%} (policy version {v0}); "
                      f"loop up in {t0 - started:.0f} s, logs in {run_dir}")
        workers = agent.Workers(loop.gateway_url, args.policy, args.group_size, args.agents,
                                delayed_share=args.delayed_share, held_out=held_out,
                                allowance=lambda: (loop.trainer.step + args.ahead) * args.groups_per_step)
        workers.start()
        _drive(args, console, loop, workers, curves, t0, evaluations)
        workers.stop()
        with console.status("stopping the trainer (a last checkpoint) and waiting for the server to load it…"):
            loop.finish_training()
        by_op = {}
        acc1, v1 = agent.evaluate(loop.server.base_url, args.policy, held_out, by_op=by_op)
        curves.accuracy.append((time.monotonic() - t0, acc1, v1))
        evaluations.append({"t": round(time.monotonic() - t0, 1), "accuracy": acc1, "version": v1, "by_op": by_op})
        stats = loop.server_stats()
        summary.update(
            accuracy_before=acc0, accuracy_after=acc1, best_accuracy=max(a for _, a, _ in curves.accuracy),
            version_before=v0, version_after=v1, served_version=stats.get("policy_version"),
            reloads=stats.get("reloads"), trainer_steps=loop.trainer.step, rollouts=workers.stats.rollouts,
            agent_errors=workers.stats.errors, training_seconds=round(time.monotonic() - t0, 1),
            restarts=dict(loop.restarts), engine=args.engine, target=args.target,
            target_seconds=next((e["t"] for e in evaluations if args.target and e["accuracy"] >= args.target), None),
            groups=dict(workers.stats.groups), train_reward_by_op=workers.stats.op_means(),
        )
        if args.engine == "vllm":  # each version's load: published -> served
            summary["loads"] = loop.server.stats().get("loads")
    finally:
        if workers is not None:
            workers.stop()
        loop.stop()
        summary["wall_seconds"] = round(time.monotonic() - started, 1)
        curves.rewards = loop.trainer.rewards
        summary["png"] = str(plot(curves, run_dir / "curves.png", title=f"rollstream demo {run_id}"))
        summary["accuracy_curve"] = curves.accuracy
        summary["evaluations"] = evaluations
        (run_dir / "summary.json").write_text(json.dumps(summary, indent=1))
    return summary


def _drive(args: argparse.Namespace, console: Console, loop: Loop, workers: agent.Workers, curves: Curves,
           t0: float, evaluations: list[dict[str, Any]]) -> None:
    """Show progress, evaluate periodically, and return when a budget or the target is reached."""
    assert loop.server is not None
    last_eval = time.monotonic()
    last_calls, last_t = 0, time.monotonic()
    events_per_s = 0.0
    live = Live(console=console, refresh_per_second=2, transient=False) if console.is_terminal else None
    last_line = 0.0
    try:
        if live:
            live.start()
        while True:
            time.sleep(1.0)
            loop.supervise()
            loop.poll()
            now = time.monotonic()
            calls = workers.stats.calls + workers.stats.rollouts * 3  # calls + started/finished/reward events
            events_per_s = (calls - last_calls) / max(now - last_t, 1e-9)
            last_calls, last_t = calls, now
            if now - last_eval >= args.eval_every:
                by_op: dict[str, float] = {}
                acc, version = agent.evaluate(loop.server.base_url, args.policy, _held_out(args), by_op=by_op)
                curves.accuracy.append((now - t0, acc, version))
                evaluations.append({"t": round(now - t0, 1), "accuracy": acc, "version": version, "by_op": by_op})
                log.info("held-out %.0f%% %s at v%d (step %d, lag %s); groups %s; training reward by op %s",
                         acc * 100, by_op, version, loop.trainer.step, loop.trainer.lag, workers.stats.groups,
                         workers.stats.op_means())
                last_eval = time.monotonic()
                if args.target and acc >= args.target:
                    log.info("held-out accuracy %.0f%% reached the target", acc * 100)
                    return
            table = _table(now - t0, loop, workers, curves, events_per_s)
            if live:
                live.update(table)
            elif now - last_line >= 15:
                console.print(table)
                last_line = now
            if now - t0 >= args.minutes * 60 or (args.steps and loop.trainer.step >= args.steps):
                return
            if not loop.trainer_alive():
                log.error("the trainer stopped; see %s", loop.run_dir / "trainer.log")
                return
    finally:
        if live:
            live.stop()


def _held_out(args: argparse.Namespace) -> list[tasks.Task]:
    return tasks.eval_tasks(args.eval_tasks)


def ensure_stack(console: Console) -> None:
    from rollstream.stack import Stack

    stack = Stack(report=lambda msg: console.print(f"[dim]·[/] {msg}"))
    if not all(s.healthy for s in stack.status()):
        with console.status("bringing the local stack up…"):
            stack.up()


def _interrupt(signum: int, frame: FrameType | None) -> None:
    raise KeyboardInterrupt


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(list(sys.argv[1:] if argv is None else argv))
    if args.quick:
        args.minutes = min(args.minutes, 6.0)
        args.eval_tasks = min(args.eval_tasks, 40)
        args.eval_every = min(args.eval_every, 20.0)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    for noisy in ("httpx", "httpx2", "openai", "urllib3", "matplotlib"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    signal.signal(signal.SIGTERM, _interrupt)
    console = Console()
    try:
        summary = run(args, console)
    except RollstreamError as exc:
        console.print(f"[red]error:[/] {exc}")
        return 2
    except KeyboardInterrupt:
        console.print("interrupted; every process the demo started is stopped")
        return 130
    if "accuracy_after" not in summary:
        return 1
    console.print(
        f"held-out accuracy {summary['accuracy_before']:.0%} -> {summary['accuracy_after']:.0%} "
        f"(best {summary['best_accuracy']:.0%}); {summary['trainer_steps']} trainer steps, policy version "
        f"{summary['version_before']} -> {summary['version_after']} ({summary['reloads']} reloads), "
        f"{summary['rollouts']} rollouts, {summary['training_seconds']:.0f} s of training, "
        f"{summary['wall_seconds']:.0f} s in all\ncurves: {summary['png']}\nrun folder: {summary['run_dir']}; "
        "MLflow experiment 'rollstream-demo', registered model '" + summary["policy"] + "'")
    loads = [x for x in summary.get("loads") or [] if x.get("published_to_served_s") is not None]
    if loads:
        took = sorted(x["published_to_served_s"] for x in loads)
        console.print(f"vLLM loads: {len(loads)}; PolicyUpdate published -> new version served: median "
                      f"{took[len(took) // 2]:.2f} s, max {took[-1]:.2f} s (download and reload: median "
                      f"{sorted(x['seconds'] for x in loads)[len(loads) // 2]:.2f} s)")
    return 0
