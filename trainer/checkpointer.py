"""Rank 0's checkpoints, start to end: S3, the resume offsets, MLflow, the PolicyUpdate, pruning.

One order, the one that makes restarts exact and announcements safe:

1. weights (or the LoRA adapter), ``optimizer.pt`` and ``trainer_state.json`` to S3, ``meta.json``
   last (``CheckpointStore.upload``): a checkpoint without its meta.json does not exist;
2. the consumer group's offsets committed to the ones in meta.json, only now that they are on S3;
3. the checkpoint registered as an MLflow model version (a failure there is logged, not fatal:
   serving needs the weights, not the registry) and the PolicyUpdate published;
4. checkpoints beyond ``--keep-checkpoints`` deleted (a failure costs disk and is tried again).

A job that resumes calls :meth:`Checkpointer.publish` for the checkpoint it resumed from: a crash
may have come between step 1 and step 3, and both registering and announcing are idempotent.
"""

from __future__ import annotations

import json
import logging
import shutil
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from rollstream.errors import StorageError, TrainerError
from rollstream.events import EventProducer
from rollstream.schemas.topics import Topics
from rollstream.trainer.batches import TransitionReader
from rollstream.trainer.checkpoint import OPTIMIZER, STATE, CheckpointStore, Tracker, announce, prune, step_dir
from rollstream.trainer.config import TrainConfig
from rollstream.trainer.model import save_weights

if TYPE_CHECKING:
    from rollstream.trainer.train import TrainResult

log = logging.getLogger(__name__)


class Checkpointer:
    def __init__(self, config: TrainConfig, store: CheckpointStore, reader: TransitionReader,
                 tracker: Tracker | None, producer: EventProducer | None, topics: Topics, workdir: Path,
                 base_dir: Path, result: TrainResult) -> None:
        self.config, self.store, self.reader, self.tracker, self.producer = config, store, reader, tracker, producer
        self.topics, self.workdir, self.base_dir, self.result = topics, workdir, base_dir, result

    def publish(self, step: int, version: int, uri: str) -> None:
        """Register and announce a checkpoint that is on S3 in full (its meta.json, written last, is there)."""
        started = time.perf_counter()
        mv = None
        if self.tracker is not None:
            try:
                mv = self.tracker.register(uri, step, version)
            except TrainerError as exc:  # serving needs the weights, not the registry: announce them anyway
                log.error("%s; announcing %s without a registry version", exc, uri)
        if self.producer is not None:
            self.result.events.append(announce(self.producer, self.topics, self.config, version, step, uri, mv,
                                               self.config.model))
        self.result.timings.setdefault("publish_s", []).append(time.perf_counter() - started)

    def save(self, step: int, version: int, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
             consumed: dict[str, list[str]], baseline: float | None) -> str:
        """Checkpoint ``step`` as policy ``version`` (steps 1 to 4 above); its URI."""
        started = time.perf_counter()
        reader, config = self.reader, self.config
        local = self.workdir / step_dir(step)
        shutil.rmtree(local, ignore_errors=True)
        files = save_weights(model, local, self.base_dir)
        torch.save(optimizer.state_dict(), local / OPTIMIZER)
        resume, above, seen = reader.checkpoint_state()
        dropped = dict(reader.dropped)
        (local / STATE).write_text(json.dumps({"consumed": consumed, "dropped": dropped, "seen": seen,
                                               "baseline": baseline, "counts": dict(reader.counts)}))
        meta: dict[str, Any] = {
            "format": 1, "policy": config.policy, "step": step, "policy_version": version,
            "kind": "ADAPTER" if config.lora_rank else "FULL", "base_model": config.model,
            "topic": reader.topic, "offsets": {str(p): o for p, o in sorted(resume.items())},
            "trained_above": above, "mlflow_run_id": self.result.run_id, "created_at": time.time(),
            "files": sorted(files + [OPTIMIZER, STATE]), "config": config.to_params()}
        uri = self.store.upload(local, step, meta)
        self.result.timings.setdefault("checkpoint_s", []).append(time.perf_counter() - started)
        for tid in dropped:
            reader.dropped.pop(tid, None)
        reader.commit(resume)  # only after the checkpoint that holds these offsets is on S3
        self.publish(step, version, uri)
        shutil.rmtree(local, ignore_errors=True)
        self.result.checkpoints.append(uri)
        if config.keep_checkpoints:
            try:  # a failed clean-up costs disk, not training: the next checkpoint tries again
                self.result.pruned += prune(self.store, self.tracker, config.keep_checkpoints)
            except (StorageError, TrainerError) as exc:
                log.warning("could not delete old checkpoints: %s", exc)
        log.info("checkpoint %s: policy version %d, resume offsets %s", uri, version, resume)
        return uri
