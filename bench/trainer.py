"""Benchmark: what streaming costs the trainer, and how long checkpoints and policy updates take.

One run builds a small Qwen2-style model in code (hidden 256, 4 layers, ~3.4M parameters), publishes
GRPO groups of transitions (64 prompt + 64 response tokens each) to fresh topics on the local
stack, and then measures:

- training tokens/s of ``rollstream train`` consuming them from Kafka (read_committed, decode,
  dedup, grouping, metrics to MLflow), over its stepping phase with checkpoints excluded;
- training tokens/s of the same loss, model and micro-batching on the same batches held in memory
  (run before and after the streaming run; their mean is the baseline); the ratio is the figure.
  On a shared machine the two runs can differ a lot, so the streaming run also reports the share
  of its own stepping phase spent outside forward/backward/optimizer (consume, batch, metrics);
  that figure does not depend on other load;
- checkpoint save time (weights + optimizer + state to S3), restore time (download + load weights
  and optimizer), and the time from the start of a checkpoint to its PolicyUpdate acknowledged by
  Kafka (S3 upload, offset commit, MLflow registry version and alias included).

    .venv/bin/python bench/trainer.py            # 60 steps per measurement, 2 checkpoints
    .venv/bin/python bench/trainer.py --quick    # under a minute (needs `rollstream stack up`)

The last line printed is one JSON object with every figure.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import random
import statistics
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
PROMPT, RESPONSE, GROUP, BATCH = 64, 64, 4, 8


def build_records(policy: str, steps: int, vocab: int) -> list[dict[str, Any]]:
    from rollstream.schemas import make_event

    rng = random.Random(0)
    records = []
    for g in range(steps * BATCH // GROUP):
        for i in range(GROUP):
            rid = f"bench-{g}-{i}"
            records.append(make_event(
                "Transition", transition_id=f"tr-{rid}", source="bench", rollout_id=rid, call_id="c0", sequence=0,
                group_id=f"grp-{g}", policy=policy, policy_version=0,
                prompt_token_ids=[rng.randrange(4, vocab) for _ in range(PROMPT)],
                response_token_ids=[rng.randrange(4, vocab) for _ in range(RESPONSE)],
                behaviour_logprobs=[-6.0] * RESPONSE, reward=float(i % 2), credited_return=float(i % 2),
                terminal_reward=float(i % 2)))
    return records


def in_memory(config: Any, model_dir: Path, records: list[dict[str, Any]], threads: int) -> tuple[float, list[float]]:
    """Tokens/s of the trainer's loss and step on batches held in memory (no Kafka, no MLflow), and step times."""
    import torch

    from rollstream.trainer.loss import advantages, pack, policy_loss, token_logprobs
    from rollstream.trainer.model import load_policy

    torch.set_num_threads(threads)
    torch.manual_seed(config.seed)
    model = load_policy(config, model_dir, None, torch.device("cpu"))
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=config.lr)
    batches = [records[i: i + BATCH] for i in range(0, len(records), BATCH)]
    tokens = 0
    started = time.perf_counter()
    times = []
    for batch in batches:
        step_started = time.perf_counter()
        adv = advantages([r["credited_return"] for r in batch], [i // GROUP for i in range(len(batch))], "grpo")
        normalizer = sum(len(r["response_token_ids"]) for r in batch)
        optimizer.zero_grad(set_to_none=True)
        for i in range(0, len(batch), config.micro_batch_size):
            rows = batch[i: i + config.micro_batch_size]
            packed = pack([r["prompt_token_ids"] for r in rows], [r["response_token_ids"] for r in rows],
                          [r["behaviour_logprobs"] for r in rows], adv[i: i + len(rows)], 0, torch.device("cpu"))
            logits = model(input_ids=packed.input_ids, attention_mask=packed.attention_mask, use_cache=False).logits
            loss, _ = policy_loss(token_logprobs(logits, packed.input_ids), packed, config.correction,
                                  config.clip_eps, config.is_cap, normalizer)
            loss.backward()
        torch.nn.utils.clip_grad_norm_(params, config.grad_clip)
        optimizer.step()
        tokens += sum(len(r["prompt_token_ids"]) + len(r["response_token_ids"]) for r in batch)
        times.append(time.perf_counter() - step_started)
    return tokens / (time.perf_counter() - started), times


def restore_time(config: Any, model_dir: Path, uri: str) -> float:
    """Download a checkpoint and load its weights and optimizer state, as a restarting trainer does."""
    import torch

    from rollstream.storage import ObjectStore
    from rollstream.trainer.checkpoint import OPTIMIZER, CheckpointStore
    from rollstream.trainer.model import load_policy

    step = int(uri.rstrip("/").rsplit("-", 1)[1])
    with tempfile.TemporaryDirectory() as tmp:
        started = time.perf_counter()
        ckpt = CheckpointStore(ObjectStore(), config.checkpoint_uri).download(step, Path(tmp) / "ck")
        model = load_policy(config, model_dir, ckpt, torch.device("cpu"))
        optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=config.lr)
        optimizer.load_state_dict(torch.load(ckpt / OPTIMIZER, map_location="cpu"))
        return time.perf_counter() - started


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="8 steps per measurement (under a minute in all)")
    parser.add_argument("--steps", type=int, default=0, help="steps per measurement (default 60, 8 with --quick)")
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads for both measurements")
    args = parser.parse_args(argv)
    steps = args.steps or (8 if args.quick else 60)
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    logging.basicConfig(level=logging.WARNING)

    import torch
    from rich.console import Console
    from rich.table import Table

    from rollstream.events import EventProducer
    from rollstream.schemas.codec import EventCodec, register_schemas, registry_client
    from rollstream.schemas.topics import Topics, create_topics
    from rollstream.serving.tiny import build_tiny_model
    from rollstream.settings import ConnectionSettings
    from rollstream.storage import ObjectStore
    from rollstream.trainer.config import TrainConfig
    from rollstream.trainer.train import train

    console = Console(stderr=True)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    base = ConnectionSettings()
    topics = Topics(prefix=f"rollstream-bench.{uuid.uuid4().hex[:8]}.", partitions=base.partitions)
    connection = ConnectionSettings(topic_prefix=topics.prefix)
    create_topics(topics, connection)
    register_schemas(registry_client(connection), topics)
    policy = f"bench-{uuid.uuid4().hex[:8]}"
    work = Path(tempfile.mkdtemp(prefix="rollstream-bench-"))
    model_dir = build_tiny_model(work / "model", seed=0, hidden_size=256, num_layers=4, num_heads=4, vocab_size=1024)
    records = build_records(policy, steps, 1000)
    codec = EventCodec(registry_client(connection), topics)
    producer = EventProducer(codec, connection)
    for rec in records:
        producer.publish(topics.transitions, rec["rollout_id"], rec)
    producer.flush()
    ObjectStore(connection).ensure_bucket(connection.s3_bucket)
    config = TrainConfig(
        policy=policy, model=str(model_dir), objective="grpo", group_size=GROUP, batch_size=BATCH,
        micro_batch_size=BATCH, lr=1e-5, max_steps=steps, checkpoint_every=max(1, steps // 2), idle_exit_s=5.0,
        max_policy_lag=1000, threads=args.threads, progress=False, experiment="rollstream-bench",
        device=device, checkpoint_uri=f"s3://{connection.s3_bucket}/{policy}",
    )
    console.print(f"device {device} ({'no GPU here' if device == 'cpu' else torch.cuda.get_device_name()}), "
                  f"{steps} steps of {BATCH}x{PROMPT + RESPONSE} tokens, {args.threads} threads")
    memory_before, times_before = in_memory(config, model_dir, records, args.threads)
    result = train(config, connection)
    stream_tokens = sum(result.timings["step_tokens"])
    streaming = stream_tokens / result.timings["loop_s"][0]
    memory_after, times_after = in_memory(config, model_dir, records, args.threads)
    memory = (memory_before + memory_after) / 2
    # Medians of per-step wall times (streaming: from one step's end to the next, consumption included;
    # the intervals holding a checkpoint are outliers the median ignores): robust to bursts of other load.
    ends = result.timings["step_end"]
    stream_median = statistics.median(b - a for a, b in zip(ends, ends[1:], strict=False))
    memory_median = statistics.median(times_before + times_after)
    tokens_per_step = BATCH * (PROMPT + RESPONSE)
    save = result.timings["checkpoint_s"]
    to_event = [c + p for c, p in zip(save, result.timings["publish_s"], strict=True)]
    restore = restore_time(config, model_dir, result.checkpoints[-1])
    # Within the streaming run itself (so insensitive to other load on the machine): the share of the
    # stepping phase spent outside forward/backward/optimizer, i.e. consuming, batching, metrics, logging.
    overhead = 1 - sum(result.timings["step_s"]) / result.timings["loop_s"][0]
    figures = {
        "bench": "trainer", "device": device, "steps": result.steps, "tokens_per_step": BATCH * (PROMPT + RESPONSE),
        "streaming_tokens_per_s": round(streaming, 1), "in_memory_tokens_per_s": round(memory, 1),
        "in_memory_before_after": [round(memory_before, 1), round(memory_after, 1)],
        "ratio": round(memory_median / stream_median, 3), "ratio_of_means": round(streaming / memory, 3),
        "streaming_step_median_s": round(stream_median, 4), "in_memory_step_median_s": round(memory_median, 4),
        "streaming_overhead_share": round(overhead, 4),
        "checkpoint_save_s": round(statistics.mean(save), 3),
        "checkpoint_restore_s": round(restore, 3),
        "checkpoint_to_policy_update_s": round(statistics.mean(to_event), 3),
        "checkpoints": len(save), "quick": args.quick,
    }
    table = Table("figure", "value", title="rollstream train: streaming vs in memory")
    table.add_row("device", f"{device}" + (" (no GPU here)" if device == "cpu" else ""))
    table.add_row("steps × tokens/step", f"{result.steps} × {BATCH * (PROMPT + RESPONSE)}")
    table.add_row("streaming tokens/s (Kafka → step)", f"{streaming:,.0f}")
    table.add_row("in-memory tokens/s (same loss, model, batches)", f"{memory:,.0f}")
    table.add_row("per-step median wall: streaming / in memory",
                  f"{stream_median * 1000:.0f} ms / {memory_median * 1000:.0f} ms ({tokens_per_step} tokens)")
    table.add_row("ratio streaming / in memory (step medians)",
                  f"{memory_median / stream_median:.3f}  (target ≥ 0.95)")
    table.add_row("ratio of mean tokens/s", f"{streaming / memory:.3f}")
    table.add_row("in-memory runs before / after", f"{memory_before:,.0f} / {memory_after:,.0f}")
    table.add_row("streaming loop share outside the step (same run)", f"{overhead:.2%}")
    table.add_row("checkpoint save (weights + optimizer + state → S3)", f"{statistics.mean(save):.3f} s")
    table.add_row("checkpoint restore (S3 → weights + optimizer)", f"{restore:.3f} s")
    table.add_row("checkpoint start → PolicyUpdate acked", f"{statistics.mean(to_event):.3f} s")
    Console().print(table)
    print(json.dumps(figures, separators=(",", ":")))
    return 0


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))
    sys.exit(main())
