"""Benchmark: multi-turn rollouts trained one row per call, and merged into one sequence per rollout.

An agent that calls the model T times sends the whole conversation each time: call t's prompt is
call t-1's prompt and response plus a tool result. One run publishes the same GRPO groups of such
rollouts (exact token prefixes, as an engine records them) to two fresh transition topics, and runs
``rollstream train`` (Kafka, read_committed, real checkpoints to S3) on each: once with
``--no-merge-turns`` (the per-call path, the baseline) and once with ``--merge-turns``. It prints
tokens trained per rollout and steps/s of both, and the ratios. The two paths give the same
gradient (tests/trainer/test_merge.py); what differs is the work.

    .venv/bin/python bench/multiturn.py            # 8 turns, 12 steps per mode
    .venv/bin/python bench/multiturn.py --quick    # 6 turns, 4 steps per mode (needs `rollstream stack up`)

The last line printed is one JSON object with every figure.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import random
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

GROUP = 4
SYSTEM, TOOL, RESPONSE = 96, 24, 24  # tokens: system + question, each tool result, each response


def rollout_records(policy: str, rid: str, group: str, turns: int, rng: random.Random,
                    vocab: int) -> list[dict[str, Any]]:
    from rollstream.schemas import make_event

    reward = float(rng.random() < 0.5)
    prompt = [rng.randrange(4, vocab) for _ in range(SYSTEM)]
    out = []
    for t in range(turns):
        response = [rng.randrange(4, vocab) for _ in range(RESPONSE)]
        out.append(make_event(
            "Transition", transition_id=f"tr-{rid}-{t}", source="bench", rollout_id=rid, call_id=f"c{t}",
            sequence=t, group_id=group, policy=policy, policy_version=0, prompt_token_ids=list(prompt),
            response_token_ids=response, behaviour_logprobs=[-6.0] * RESPONSE, reward=reward,
            credited_return=reward, terminal_reward=reward))
        prompt = prompt + response + [rng.randrange(4, vocab) for _ in range(TOOL)]
    return out


def run(merge: bool, steps: int, turns: int, model_dir: Path, threads: int) -> dict[str, float]:
    from rollstream.events import EventProducer
    from rollstream.schemas.codec import EventCodec, register_schemas, registry_client
    from rollstream.schemas.topics import Topics, create_topics
    from rollstream.settings import ConnectionSettings
    from rollstream.storage import ObjectStore
    from rollstream.trainer.config import TrainConfig
    from rollstream.trainer.train import train

    base = ConnectionSettings()
    topics = Topics(prefix=f"rollstream-bench.{uuid.uuid4().hex[:8]}.", partitions=base.partitions)
    connection = ConnectionSettings(topic_prefix=topics.prefix)
    create_topics(topics, connection)
    register_schemas(registry_client(connection), topics)
    policy = f"bench-mt-{uuid.uuid4().hex[:8]}"
    rng = random.Random(0)  # the same rollouts for both modes
    producer = EventProducer(EventCodec(registry_client(connection), topics), connection)
    for g in range(steps):
        for i in range(GROUP):
            for rec in rollout_records(policy, f"r{g}-{i}", f"grp-{g}", turns, rng, 1000):
                producer.publish(topics.transitions, rec["rollout_id"], rec)
    producer.flush()
    ObjectStore(connection).ensure_bucket(connection.s3_bucket)
    config = TrainConfig(
        policy=policy, model=str(model_dir), objective="grpo", group_size=GROUP, batch_size=GROUP * turns,
        micro_batch_size=GROUP * turns, lr=1e-5, max_steps=steps, checkpoint_every=steps, idle_exit_s=5.0,
        max_policy_lag=1000, max_seq_len=8192, threads=threads, progress=False, mlflow=False, publish=False,
        merge_turns=merge, experiment="rollstream-bench", checkpoint_uri=f"s3://{connection.s3_bucket}/{policy}",
    )
    result = train(config, connection)
    t = result.timings
    ends = t["step_end"]
    # steps/s over the stepping phase: first step's end to the last's, checkpoints excluded by the trainer
    return {
        "steps": float(result.steps),
        "rollouts": sum(t["step_rollouts"]),
        "transition_tokens_per_rollout": sum(t["step_tokens"]) / sum(t["step_rollouts"]),
        "trained_tokens_per_rollout": sum(t["step_trained_tokens"]) / sum(t["step_rollouts"]),
        "step_seconds_mean": sum(t["step_s"]) / len(t["step_s"]),
        "steps_per_s": len(t["step_s"]) / sum(t["step_s"]),
        "loop_steps_per_s": (len(ends) - 1) / max(ends[-1] - ends[0], 1e-9) if len(ends) > 1 else 0.0,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="6 turns, 4 steps per mode")
    parser.add_argument("--turns", type=int, default=0, help="model calls per rollout (default 8, 6 with --quick)")
    parser.add_argument("--steps", type=int, default=0, help="steps per mode (default 12, 4 with --quick)")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args(argv)
    turns = args.turns or (6 if args.quick else 8)
    steps = args.steps or (4 if args.quick else 12)
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    logging.basicConfig(level=logging.WARNING)
    from rich.console import Console
    from rich.table import Table

    from rollstream.serving.tiny import build_tiny_model

    console = Console(stderr=True)
    work = Path(tempfile.mkdtemp(prefix="rollstream-bench-mt-"))
    model_dir = build_tiny_model(work / "model", seed=0, hidden_size=128, num_layers=2, num_heads=4, vocab_size=1024)
    started = time.perf_counter()
    console.print(f"{turns} calls per rollout, groups of {GROUP}, {steps} steps per mode")
    per_call = run(False, steps, turns, model_dir, args.threads)
    merged = run(True, steps, turns, model_dir, args.threads)
    figures = {
        "bench": "multiturn", "turns": turns, "steps": steps,
        "per_call": {k: round(v, 3) for k, v in per_call.items()},
        "merged": {k: round(v, 3) for k, v in merged.items()},
        "ratio_trained_tokens_merged_to_per_call": round(
            merged["trained_tokens_per_rollout"] / per_call["trained_tokens_per_rollout"], 3),
        "ratio_steps_per_s_merged_to_per_call": round(merged["steps_per_s"] / per_call["steps_per_s"], 3),
        "wall_s": round(time.perf_counter() - started, 1),
    }
    table = Table("figure", "one row per call", "merged", title="multi-turn rollouts in the trainer")
    for key in ("trained_tokens_per_rollout", "transition_tokens_per_rollout", "step_seconds_mean", "steps_per_s"):
        table.add_row(key, f"{per_call[key]:,.3f}", f"{merged[key]:,.3f}")
    console.print(table)
    print(json.dumps(figures))
    return 0


if __name__ == "__main__":
    sys.exit(main())
