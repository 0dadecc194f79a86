"""Checkpoints on S3, the MLflow run and Model Registry, and PolicyUpdate events.

A checkpoint is a folder ``<root>/step-000120/`` holding the weights (``save_pretrained``:
safetensors, or the adapter under LoRA) with the tokenizer, so serving loads it as is;
``optimizer.pt``; ``trainer_state.json`` (dedup window, baseline, the transition ids each step
since the previous checkpoint consumed, and the ids dropped since then with the reason); and
``meta.json`` (step, policy version, the resume offsets per partition, the ids trained beyond
them). ``meta.json`` is uploaded last: a folder without it is an interrupted upload and is
ignored (and overwritten when that step comes again).

Each checkpoint becomes a version of the registered model named after the policy
(source = the checkpoint's S3 URI, tags ``policy_version`` and ``s3_uri``), and the alias
(``current`` by default) moves to it. MLflow reserves the alias ``latest`` (it always means the
highest version number), so the trainer cannot set it.
"""

from __future__ import annotations

import json
import logging
import os
import re
import time
from pathlib import Path
from typing import Any

from rollstream.schemas import make_event
from rollstream.schemas.topics import Topics
from rollstream.trainer.config import TrainConfig

from rollstream.errors import StorageError, TrainerError
from rollstream.events import DeliveryError, EventProducer
from rollstream.storage import ObjectStore, S3Uri

log = logging.getLogger(__name__)

META = "meta.json"
STATE = "trainer_state.json"
OPTIMIZER = "optimizer.pt"
STEP_RE = re.compile(r"/step-(\d{6,})/meta\.json$")
FOLDER_RE = re.compile(r"/step-(\d{6,})/")


def step_dir(step: int) -> str:
    return f"step-{step:06d}"


class CheckpointStore:
    """The checkpoints of one policy under an ``s3://bucket/prefix`` root."""

    def __init__(self, store: ObjectStore, root: str) -> None:
        self.store = store
        self.root = S3Uri.parse(root.rstrip("/"))

    @property
    def prefix(self) -> S3Uri:
        """The folder holding every step folder."""
        return S3Uri(self.root.bucket, self.root.key.rstrip("/") + "/")

    def uri(self, step: int) -> str:
        return str(self.root.child(step_dir(step))) + "/"

    def steps(self) -> list[int]:
        """Steps with a complete checkpoint (meta.json present), ascending."""
        keys = self.store.list_objects(self.prefix)
        return sorted(int(m.group(1)) for k in keys if (m := STEP_RE.search(k)))

    def latest(self) -> dict[str, Any] | None:
        steps = self.steps()
        return self.meta(steps[-1]) if steps else None

    def meta(self, step: int) -> dict[str, Any]:
        meta: dict[str, Any] = json.loads(self.store.get_bytes(self.uri(step) + META))
        return meta

    def state(self, step: int) -> dict[str, Any]:
        state: dict[str, Any] = json.loads(self.store.get_bytes(self.uri(step) + STATE))
        return state

    def upload(self, local: Path, step: int, meta: dict[str, Any]) -> str:
        """Upload the folder's files, then meta.json; returns the checkpoint's URI."""
        uri = self.uri(step)
        (local / META).unlink(missing_ok=True)
        try:
            self.store.upload_dir(local, uri)
            self.store.put_bytes(uri + META, json.dumps(meta, indent=1).encode(), "application/json")
        except StorageError as exc:
            raise TrainerError(f"cannot write checkpoint {uri}: {exc}") from exc
        return uri

    def prune(self, keep: int, pinned: set[int]) -> list[int]:
        """Delete all but the newest ``keep`` complete checkpoints, sparing the ``pinned`` steps.

        A deleted checkpoint loses its meta.json first, so a deletion cut short leaves an incomplete
        folder, which resume ignores and the next prune removes with the rest of the older folders.
        Returns the steps deleted.
        """
        by_step: dict[int, list[str]] = {}
        for key in self.store.list_objects(self.prefix):
            if m := FOLDER_RE.search(key):
                by_step.setdefault(int(m.group(1)), []).append(key)
        complete = sorted(step for step, keys in by_step.items() if any(k.endswith("/" + META) for k in keys))
        if keep < 1 or len(complete) <= keep:
            return []
        folders = {step: keys for step, keys in by_step.items() if step < complete[-keep] and step not in pinned}
        if not folders:
            return []
        keys = [k for step in sorted(folders) for k in folders[step]]
        metas = [k for k in keys if k.endswith("/" + META)]
        self.store.delete(metas)
        self.store.delete([k for k in keys if not k.endswith("/" + META)])
        return sorted(folders)

    def download(self, step: int, local: Path) -> Path:
        try:
            self.store.download_dir(self.uri(step), local)
        except StorageError as exc:
            raise TrainerError(f"cannot read checkpoint {self.uri(step)}: {exc}") from exc
        return local


class Tracker:
    """One MLflow run per training job (continued across restarts) and the Model Registry."""

    def __init__(self, config: TrainConfig, tracking_uri: str, run_id: str | None) -> None:
        os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
        import mlflow
        from mlflow import MlflowClient

        self.mlflow = mlflow
        self.config = config
        mlflow.set_tracking_uri(tracking_uri)
        self.client = MlflowClient(tracking_uri)
        try:
            if run_id is None:
                mlflow.set_experiment(config.experiment)
                self.run = mlflow.start_run(run_name=f"{config.policy}-train")
                params = {k: str(v)[:500] for k, v in config.to_params().items()}
                mlflow.log_params(params)
            else:
                self.run = mlflow.start_run(run_id=run_id)
        except Exception as exc:  # mlflow raises MlflowException and requests errors alike
            raise TrainerError(f"cannot start an MLflow run at {tracking_uri}: {exc}; start it with "
                               "'rollstream stack up' or pass --no-mlflow") from exc
        self.run_id: str = self.run.info.run_id

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        self.mlflow.log_metrics(metrics, step=step, synchronous=False)

    def register(self, uri: str, step: int, version: int) -> str:
        """Register the checkpoint as a model version (once per URI), move the alias; returns the version."""
        from mlflow.exceptions import MlflowException

        name = self.config.policy
        try:
            try:
                self.client.create_registered_model(name, description=f"Policy '{name}' trained by rollstream train")
            except MlflowException as exc:
                if "RESOURCE_ALREADY_EXISTS" not in str(exc.error_code):
                    raise
            existing = self.client.search_model_versions(f"name = '{name}' and tag.s3_uri = '{uri}'")
            if existing:
                mv_version = str(existing[0].version)
            else:
                mv = self.client.create_model_version(
                    name, source=uri, run_id=self.run_id,
                    tags={"policy_version": str(version), "s3_uri": uri, "step": str(step)},
                    description=f"step {step}",
                )
                mv_version = str(mv.version)
            self.client.set_registered_model_alias(name, self.config.alias, mv_version)
        except MlflowException as exc:
            raise TrainerError(f"cannot register {uri} as a version of model '{name}': {exc}") from exc
        return mv_version

    def versions(self, root: str) -> dict[int, tuple[str, list[str]]]:
        """The registered versions of checkpoints under ``root``: step -> (version, its aliases)."""
        from mlflow.exceptions import MlflowException

        prefix = root.rstrip("/") + "/"
        try:
            found = self.client.search_model_versions(f"name = '{self.config.policy}'")
            # Search results leave the aliases out; the registered model has them all.
            aliases = self.client.get_registered_model(self.config.policy).aliases or {}
        except MlflowException as exc:
            raise TrainerError(f"cannot list the versions of model '{self.config.policy}': {exc}") from exc
        return {int(mv.tags["step"]): (str(mv.version), [a for a, v in aliases.items() if str(v) == str(mv.version)])
                for mv in found if mv.tags.get("s3_uri", "").startswith(prefix) and "step" in mv.tags}

    def delete_version(self, version: str) -> None:
        from mlflow.exceptions import MlflowException

        try:
            self.client.delete_model_version(self.config.policy, version)
        except MlflowException as exc:
            raise TrainerError(f"cannot delete version {version} of model '{self.config.policy}': {exc}") from exc

    def end(self, status: str = "FINISHED") -> None:
        self.mlflow.flush_async_logging()
        self.mlflow.end_run(status=status)


def prune(ckpts: CheckpointStore, tracker: Tracker | None, keep: int) -> list[int]:
    """Keep the newest ``keep`` checkpoints and their registry versions; an older version that
    carries an alias pins its checkpoint. Returns the steps deleted."""
    versions = tracker.versions(str(ckpts.root)) if tracker else {}
    pinned = {step for step, (_, aliases) in versions.items() if aliases}
    deleted = ckpts.prune(keep, pinned)
    for step in deleted:
        if tracker and step in versions:
            tracker.delete_version(versions[step][0])
    return deleted


def announce(producer: EventProducer, topics: Topics, config: TrainConfig, version: int, step: int, uri: str,
             mlflow_version: str | None, base_model: str) -> dict[str, Any]:
    """Publish (and flush) the PolicyUpdate for a checkpoint; returns the event."""
    event = make_event(
        "PolicyUpdate", source=f"rollstream-train/{config.policy}", policy=config.policy, version=version,
        step=step, weights_uri=uri, kind="ADAPTER" if config.lora_rank else "FULL",
        base_model=base_model if config.lora_rank else None,
        mlflow_model_name=config.policy if mlflow_version is not None else None,
        mlflow_model_version=mlflow_version, metadata={"objective": config.objective},
    )
    try:
        producer.publish(topics.policy_updates, config.policy, event)
        producer.flush(30.0)
    except DeliveryError as exc:
        raise TrainerError(f"cannot publish the PolicyUpdate for {uri}: {exc}") from exc
    return event


def timed(started: float) -> float:
    return time.perf_counter() - started
