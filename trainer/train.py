"""``rollstream train``: consume transitions, take policy-gradient steps, checkpoint, publish.

The loop, top to bottom:

1. Find the latest complete checkpoint under ``s3://<bucket>/<policy>/`` and load it: weights (or
   the LoRA adapter), optimizer state, step, policy version, the dedup window, and the Kafka
   resume offsets, to which the consumer is seeked when its partitions are assigned.
2. Read the policy's transitions (``read_committed``), group them by ``group_id``, drop stale ones,
   and form a batch of whole groups (``batches.py``).
3. Compute advantages for the whole batch, lay a rollout's calls out as one sequence where each
   prompt extends the last prompt + response token for token (``merge.py``; ``--no-merge-turns``: one
   row per call), then (``Learner.step``) the clipped importance-corrected token loss (``loss.py``)
   in micro-batches of rows; clip the gradient; AdamW step.
4. Every ``checkpoint_every`` steps: write the checkpoint to S3 (meta.json last), commit the resume
   offsets to the consumer group, register the checkpoint as a new MLflow model version and move
   the alias, and publish a PolicyUpdate (``checkpointer.py``, in that order; ``checkpoint.py`` has the
   S3 layout, MLflow and the event). Each checkpoint is a new policy version.
   S3 and MLflow calls are retried with backoff for ``--retry-s``; the PolicyUpdate goes out only
   once meta.json is written, after every other file (without a registry version if MLflow is down).

Past one GPU, run it under torchrun (``torchrun --nproc-per-node N -m rollstream.trainer.train …``).
Rank 0 is the only Kafka consumer: it forms each batch and broadcasts it, and every rank trains on
a disjoint shard of the batch's rows while DDP averages the gradients (the loss is scaled so the
result equals one process on the whole batch). Ranks do not read disjoint partitions because a
group's rollouts are keyed by rollout_id and so spread over partitions (a rank would rarely see a
whole group), and because one reader keeps one set of resume offsets and one dedup window, which is
what makes restarts exact. Consuming a batch costs microseconds next to a step, so one reader is
not the bottleneck.
"""

from __future__ import annotations

import json
import logging
import math
import os
import shutil
import signal
import sys
import tempfile
import threading
import time
from collections.abc import Sequence
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from tqdm import tqdm

from rollstream.devices import pick_device
from rollstream.errors import RollstreamError
from rollstream.events import EventProducer
from rollstream.schemas.codec import EventCodec, registry_client
from rollstream.schemas.topics import Topics
from rollstream.settings import ConnectionSettings
from rollstream.storage import ObjectStore
from rollstream.trainer.batches import Batch, TransitionReader
from rollstream.trainer.checkpoint import OPTIMIZER, STATE, CheckpointStore, Retry, Tracker
from rollstream.trainer.checkpointer import Checkpointer
from rollstream.trainer.config import TrainConfig, parse_config
from rollstream.trainer.loss import LossStats, advantages, pack_rows, policy_loss, token_logprobs
from rollstream.trainer.merge import Row, merged_rows, single_rows
from rollstream.trainer.model import load_policy, load_reference, local_model_dir

log = logging.getLogger(__name__)


@dataclass
class TrainResult:
    """What a training job did (returned by ``train``; the CLI logs it)."""

    steps: int
    version: int
    counts: dict[str, int]
    checkpoints: list[str] = field(default_factory=list)
    pruned: list[int] = field(default_factory=list)  # steps of checkpoints deleted (--keep-checkpoints)
    run_id: str | None = None
    events: list[dict[str, Any]] = field(default_factory=list)
    timings: dict[str, list[float]] = field(default_factory=dict)


def broadcast(obj: Any, world: int) -> Any:
    if world == 1:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


@dataclass
class Learner:
    """What one optimizer step needs: the policy (and its DDP wrapper), the reference, the optimizer."""

    config: TrainConfig
    model: Any  # the policy itself (a PEFT model with LoRA)
    net: Any  # the module to call: the model, or its DistributedDataParallel wrapper
    reference: Any | None  # a frozen copy for the KL term (None: none, or LoRA's base model)
    optimizer: torch.optim.Optimizer
    params: list[torch.nn.Parameter]
    device: torch.device
    rank: int
    world: int

    def __post_init__(self) -> None:
        self.amp = torch.autocast("cuda", dtype=torch.bfloat16) if self.device.type == "cuda" else nullcontext()
        self.pad_id = int(getattr(self.model.config, "pad_token_id", None) or 0)

    def step(self, batch: Batch, adv: torch.Tensor, rows: list[Row]) -> tuple[float, LossStats, float]:
        """One gradient step on the batch's rows with these advantages: (loss, its statistics, the gradient norm).

        Every rank takes a disjoint shard of the rows; the loss is normalized by the whole batch's response
        tokens and scaled by the world size, so DDP's gradient average equals the single-process gradient."""
        config, net, world, amp = self.config, self.net, self.world, self.amp
        samples = batch.samples
        behaviour = [s.behaviour_logprobs for s in samples]
        shard = rows[self.rank::world]
        normalizer = sum(len(s.response_ids) for s in samples) / world
        self.optimizer.zero_grad(set_to_none=True)
        stats, loss_sum = LossStats(), 0.0
        chunks = [shard[i: i + config.micro_batch_size] for i in range(0, len(shard), config.micro_batch_size)]
        for i, chunk in enumerate(chunks or [[]]):
            sync = net.no_sync() if world > 1 and i < len(chunks) - 1 else nullcontext()
            with sync:
                if not chunk:  # this rank has no rows: a zero loss keeps DDP's all-reduce in step
                    with amp:
                        dummy = net(input_ids=torch.full((1, 1), self.pad_id, device=self.device), use_cache=False)
                    (dummy.logits.float().sum() * 0.0).backward()
                    continue
                packed = pack_rows(chunk, behaviour, adv, self.pad_id, self.device)
                with amp:
                    logits = net(input_ids=packed.input_ids, attention_mask=packed.attention_mask,
                                 use_cache=False).logits
                logp = token_logprobs(logits, packed.input_ids)
                ref_logp = self._reference_logprobs(packed) if config.kl_coef > 0 else None
                loss, st = policy_loss(logp, packed, config.correction, config.clip_eps, config.is_cap,
                                       normalizer, ref_logp, config.kl_coef)
                loss.backward()
                stats.add(st)
                loss_sum += float(loss.detach()) / world
        grad_norm = float(torch.nn.utils.clip_grad_norm_(self.params, config.grad_clip or math.inf))
        self.optimizer.step()
        if world > 1:
            packed_stats = torch.tensor([loss_sum, stats.tokens, stats.clipped, stats.truncated, stats.ratio,
                                         stats.kl], dtype=torch.float64, device=self.device)
            dist.all_reduce(packed_stats)
            loss_sum, stats.tokens, stats.clipped, stats.truncated, stats.ratio, stats.kl = packed_stats.tolist()
        return loss_sum, stats, grad_norm

    def _reference_logprobs(self, packed: Any) -> torch.Tensor:
        with torch.no_grad(), self.amp:
            if self.reference is not None:
                ref_logits = self.reference(input_ids=packed.input_ids, attention_mask=packed.attention_mask,
                                            use_cache=False).logits
            else:  # LoRA: the base model is the reference
                with self.model.disable_adapter():
                    ref_logits = self.model(input_ids=packed.input_ids, attention_mask=packed.attention_mask,
                                            use_cache=False).logits
        return token_logprobs(ref_logits, packed.input_ids)


def train(config: TrainConfig, connection: ConnectionSettings | None = None,
          stop: threading.Event | None = None) -> TrainResult:
    """Run one training job until ``max_steps``, ``idle_exit_s`` of silence, SIGTERM, or ``stop``."""
    connection = connection or ConnectionSettings()
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    stop = stop or threading.Event()
    device = pick_device(config.device)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = 0
    if world > 1:
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
        rank = dist.get_rank()
        if device.type == "cuda":
            device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
            torch.cuda.set_device(device)
    if config.threads:
        torch.set_num_threads(config.threads)
    torch.manual_seed(config.seed)
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, lambda *_: stop.set())  # finish the step, checkpoint, exit

    # 1. Resume point: the latest complete checkpoint, if any.
    retry = Retry(config.retry_s)
    ckpts = CheckpointStore(ObjectStore(connection),
                            config.checkpoint_uri or f"s3://{connection.s3_bucket}/{config.policy}", retry)
    if rank == 0:
        ckpts.ensure_bucket()
    meta: dict[str, Any] | None = broadcast(ckpts.latest() if rank == 0 else None, world)
    workdir = Path(tempfile.mkdtemp(prefix="rollstream-train-"))
    base_dir = local_model_dir(config.model, connection, workdir)
    resume_dir = ckpts.download(meta["step"], workdir / "resume") if meta else None
    model = load_policy(config, base_dir, resume_dir, device)
    reference = load_reference(config, base_dir, device)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=config.lr, betas=(config.adam_beta1, config.adam_beta2),
                                  weight_decay=config.weight_decay)
    state: dict[str, Any] = {}
    if resume_dir is not None:
        optimizer.load_state_dict(torch.load(resume_dir / OPTIMIZER, map_location=device))
        state = json.loads((resume_dir / STATE).read_text())
    step = int(meta["step"]) if meta else 0
    version = int(meta["policy_version"]) if meta else config.start_version
    baseline: float | None = state.get("baseline")
    net: Any = model
    if world > 1:
        net = torch.nn.parallel.DistributedDataParallel(model, device_ids=[device] if device.type == "cuda" else None)
    learner = Learner(config, model, net, reference, optimizer, params, device, rank, world)
    log.info("rank %d/%d on %s: step %d, policy version %d, %s, %d trainable parameters", rank, world, device,
             step, version, f"resumed from {ckpts.uri(step)}" if meta else f"fresh from {config.model}",
             sum(p.numel() for p in params))

    # 2. Rank 0 talks to the outside world: the stream, MLflow, the policy-update topic.
    reader: TransitionReader | None = None
    tracker: Tracker | None = None
    checkpointer: Checkpointer | None = None
    result = TrainResult(step, version, {})
    if rank == 0:
        topics = Topics.from_settings(connection)
        codec = EventCodec(registry_client(connection), topics)
        offsets = {int(p): int(o) for p, o in (meta or {}).get("offsets", {}).items()}
        reader = TransitionReader(config, connection, codec, offsets,
                                  (meta or {}).get("trained_above", []), state.get("seen", []))
        if config.mlflow:
            tracker = Tracker(config, connection.mlflow_tracking_uri, (meta or {}).get("mlflow_run_id"), retry)
            result.run_id = tracker.run_id
        producer = EventProducer(codec, connection) if config.publish else None
        checkpointer = Checkpointer(config, ckpts, reader, tracker, producer, topics, workdir, base_dir, result)
    bar = tqdm(total=config.max_steps or None, initial=step, unit="step", dynamic_ncols=True,
               disable=rank != 0 or not config.progress or not sys.stderr.isatty())
    consumed: dict[str, list[str]] = {}  # step -> transition ids, since the last checkpoint
    last_end = time.perf_counter()
    loop_started, paused = 0.0, 0.0  # the stepping phase's start, and time spent checkpointing within it

    def checkpoint() -> None:
        """Rank 0 writes and announces a checkpoint; every other rank only counts the new version."""
        nonlocal version, consumed, paused
        started = time.perf_counter()
        if checkpointer is not None:
            checkpointer.save(step, version + 1, model, optimizer, consumed, baseline)
        version += 1
        consumed = {}
        paused += time.perf_counter() - started

    def next_batch() -> tuple[Batch | None, bool]:
        """(batch, finished); (None, False) after a while without one, so other ranks hear from rank 0."""
        assert reader is not None
        waited = time.monotonic()
        while True:
            if stop.is_set():
                return None, True
            batch = reader.take_batch(version)
            if batch is not None:
                return batch, False
            if config.idle_exit_s and reader.idle_for() >= config.idle_exit_s:
                batch = reader.take_batch(version, flush=True)
                return batch, batch is None
            if time.monotonic() - waited > 30:
                return None, False
            reader.poll(0.2)

    # 3. The step loop.
    try:
        if checkpointer is not None and meta:  # a crash may have come between upload and announcement: redo it
            checkpointer.publish(meta["step"], meta["policy_version"], ckpts.uri(meta["step"]))
        while not (config.max_steps and step >= config.max_steps):
            batch, finished = broadcast(next_batch() if rank == 0 else None, world)
            if finished:
                break
            if batch is None:
                continue
            step += 1
            started = time.perf_counter()
            loop_started = loop_started or started
            samples = batch.samples
            returns = [s.reward for s in samples]
            adv = advantages(returns, batch.group_index, config.objective, config.std_normalize, baseline or 0.0)
            if config.objective == "reinforce":
                mean = sum(returns) / len(returns)
                baseline = mean if baseline is None else config.baseline_decay * baseline + (
                    1 - config.baseline_decay) * mean
            rows = merged_rows(samples) if config.merge_turns else single_rows(samples)
            loss_sum, stats, grad_norm = learner.step(batch, adv, rows)
            consumed[str(step)] = [s.transition_id for s in samples]
            now = time.perf_counter()
            if reader is not None:
                reader.counts["no_behaviour_logprobs"] += sum(1 for s in samples if s.behaviour_logprobs is None)
                reader.counts["token_source_tokenizer"] += sum(1 for s in samples if s.token_source == "tokenizer")
                lags = [max(0, version - s.policy_version) for s in samples]
                r = torch.tensor(returns)
                tokens = max(stats.tokens, 1.0)
                metrics = {
                    "loss": loss_sum, "reward_mean": float(r.mean()),
                    "reward_std": float(r.std()) if len(r) > 1 else 0.0,
                    "advantage_mean": float(adv.mean()), "advantage_std": float(adv.std()) if len(adv) > 1 else 0.0,
                    "advantage_abs_mean": float(adv.abs().mean()), "clip_fraction": stats.clipped / tokens,
                    "is_truncated_fraction": stats.truncated / tokens, "behaviour_ratio_mean": stats.ratio / tokens,
                    "kl": stats.kl / tokens, "staleness_mean": sum(lags) / len(lags), "staleness_max": float(max(lags)),
                    "grad_norm": grad_norm, "batch_transitions": float(len(samples)),
                    "batch_tokens": float(batch.tokens), "batch_rows": float(len(rows)),
                    "trained_tokens": float(sum(len(r.ids) for r in rows)),
                    "step_seconds": now - started, "tokens_per_s": batch.tokens / max(now - last_end, 1e-9),
                    "policy_version": float(version),
                    **{f"count_{k}": float(v) for k, v in reader.counts.items()},
                }
                if step % config.log_every == 0:
                    metrics["consumer_lag"] = float(reader.lag())
                    if tracker is not None:
                        tracker.log_metrics(metrics, step)
                    log.info("step %d  loss %.4f  reward %.3f±%.3f  tok/s %.0f  lag %d  stale %.1f  clip %.3f", step,
                             metrics["loss"], metrics["reward_mean"], metrics["reward_std"], metrics["tokens_per_s"],
                             metrics["consumer_lag"], metrics["staleness_mean"], metrics["clip_fraction"])
                bar.update(1)
                bar.set_postfix(reward=f"{metrics['reward_mean']:.3f}", tok_s=f"{metrics['tokens_per_s']:.0f}",
                                lag=int(metrics.get("consumer_lag", 0)))
                result.timings.setdefault("step_s", []).append(now - started)
                result.timings.setdefault("step_tokens", []).append(float(batch.tokens))
                result.timings.setdefault("step_trained_tokens", []).append(float(metrics["trained_tokens"]))
                result.timings.setdefault("step_rollouts", []).append(float(len({s.rollout_key for s in samples})))
            if step % config.checkpoint_every == 0:
                checkpoint()
            last_end = time.perf_counter()
            result.timings.setdefault("step_end", []).append(last_end)
        if loop_started:  # first step to last, checkpoints excluded: the bench's streaming throughput
            result.timings["loop_s"] = [last_end - loop_started - paused]
        if consumed:  # steps since the last checkpoint: keep them
            checkpoint()
        if tracker is not None:
            tracker.end()
    except BaseException:
        if tracker is not None:
            tracker.end("FAILED" if not isinstance(sys.exc_info()[1], KeyboardInterrupt) else "KILLED")
        raise
    finally:
        bar.close()
        if reader is not None:
            result.counts = dict(reader.counts)
            reader.close()
        shutil.rmtree(workdir, ignore_errors=True)
        if world > 1:
            dist.destroy_process_group()
    result.steps, result.version = step, version
    log.info("stopped at step %d, policy version %d; counts %s", step, version, result.counts)
    return result


def main(argv: Sequence[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    for noisy in ("httpx", "httpx2", "urllib3", "mlflow"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    try:
        train(parse_config(argv))
    except RollstreamError as exc:
        log.error("%s", exc)
        return 2
    except KeyboardInterrupt:
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
