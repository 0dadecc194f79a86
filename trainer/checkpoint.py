"""Checkpoints on S3, the MLflow run and Model Registry, and PolicyUpdate events.

A checkpoint is a folder ``<root>/step-000120/`` holding the weights (``save_pretrained``:
safetensors, or the adapter under LoRA) with the tokenizer, so serving loads it as is;
``optimizer.pt``; ``trainer_state.json`` (dedup window, baseline, the transition ids each step
since the previous checkpoint consumed, and the ids dropped since then with the reason); and
``meta.json`` (step, policy version, the resume offsets per partition, the ids trained beyond
them). ``meta.json`` is uploaded last: a folder without it is an interrupted upload and is
ignored (and overwritten when that step comes again). Pruning a checkpoint keeps its record of
what each step trained and dropped as ``<root>/records/step-000120.json``: that record is the
only durable account of which transitions the weights have seen.

Every S3 write and MLflow call goes through ``Retry``: exponential backoff, bounded in total time
(``--retry-s``), one warning per failed attempt, so an outage of either pauses the trainer instead
of ending it. A checkpoint whose files cannot all be written within that time ends the trainer
(it resumes from the previous one); MLflow staying down only costs the registry version and the
metrics of that time.

Each checkpoint becomes a version of the registered model named after the policy
(source = the checkpoint's S3 URI, tags ``policy_version`` and ``s3_uri``), and the alias
(``current`` by default) moves to it. MLflow reserves the alias ``latest`` (it always means the
highest version number), so the trainer cannot set it.
"""

from __future__ import annotations

import functools
import json
import logging
import os
import re
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from rollstream.errors import StorageError, TrainerError
from rollstream.events import DeliveryError, EventProducer
from rollstream.schemas import make_event
from rollstream.schemas.topics import Topics
from rollstream.storage import ObjectStore, S3Uri, files_under, transient
from rollstream.trainer.config import TrainConfig

log = logging.getLogger(__name__)

T = TypeVar("T")

META = "meta.json"
STATE = "trainer_state.json"
OPTIMIZER = "optimizer.pt"
RECORDS = "records"
STEP_RE = re.compile(r"/step-(\d{6,})/meta\.json$")
FOLDER_RE = re.compile(r"/step-(\d{6,})/")
RECORD_RE = re.compile(rf"/{RECORDS}/step-(\d{{6,}})\.json$")
METRICS_PER_BATCH = 1000  # MLflow's limit for one log_batch call


def step_dir(step: int) -> str:
    return f"step-{step:06d}"


@dataclass(frozen=True)
class Retry:
    """Call again with exponential backoff while a call fails with a transient error, for at most ``total_s``."""

    total_s: float = 0.0  # 0: one attempt
    first_s: float = 0.5  # the first wait; each next one doubles
    max_s: float = 30.0  # the longest wait

    def __call__(self, what: str, call: Callable[[], T], retryable: Callable[[BaseException], bool]) -> T:
        started = time.monotonic()
        wait, attempt = self.first_s, 1
        while True:
            try:
                return call()
            except Exception as exc:
                spent = time.monotonic() - started
                if not retryable(exc):
                    raise
                if spent + min(wait, self.max_s) > self.total_s:
                    if self.total_s > 0:
                        log.error("%s: giving up after %d attempts in %.1f s (--retry-s %g): %s", what, attempt,
                                  spent, self.total_s, exc)
                    raise
                log.warning("%s failed (attempt %d, %.1f s of %g): %s; retrying in %.1f s", what, attempt, spent,
                            self.total_s, exc, min(wait, self.max_s))
                time.sleep(min(wait, self.max_s))
                wait, attempt = wait * 2, attempt + 1


def mlflow_transient(exc: BaseException) -> bool:
    """Whether a failed MLflow call is worth retrying: no answer, a server error, or rate limiting."""
    from mlflow.exceptions import MlflowException

    return isinstance(exc, MlflowException) and (exc.get_http_status_code() >= 500
                                                 or exc.get_http_status_code() == 429)


class CheckpointStore:
    """The checkpoints of one policy under an ``s3://bucket/prefix`` root."""

    def __init__(self, store: ObjectStore, root: str, retry: Retry | None = None) -> None:
        self.store = store
        self.root = S3Uri.parse(root.rstrip("/"))
        self.retry = retry or Retry()

    def _s3(self, what: str, call: Callable[[], T]) -> T:
        return self.retry(f"S3: {what}", call, transient)

    @property
    def prefix(self) -> S3Uri:
        """The folder holding every step folder."""
        return S3Uri(self.root.bucket, self.root.key.rstrip("/") + "/")

    def uri(self, step: int) -> str:
        return str(self.root.child(step_dir(step))) + "/"

    def record_uri(self, step: int) -> str:
        """Where a pruned checkpoint's record of what its steps trained and dropped stays."""
        return str(self.root.child(f"{RECORDS}/{step_dir(step)}.json"))

    def ensure_bucket(self) -> None:
        self._s3(f"creating bucket '{self.root.bucket}'", functools.partial(self.store.ensure_bucket, self.root.bucket))

    def _list(self) -> list[str]:
        return self._s3(f"listing {self.prefix}", functools.partial(self.store.list_objects, self.prefix))

    def _json(self, uri: str) -> dict[str, Any]:
        data: dict[str, Any] = json.loads(self._s3(f"reading {uri}", functools.partial(self.store.get_bytes, uri)))
        return data

    def steps(self) -> list[int]:
        """Steps with a complete checkpoint (meta.json present), ascending."""
        return sorted(int(m.group(1)) for k in self._list() if (m := STEP_RE.search(k)))

    def latest(self) -> dict[str, Any] | None:
        steps = self.steps()
        return self.meta(steps[-1]) if steps else None

    def meta(self, step: int) -> dict[str, Any]:
        return self._json(self.uri(step) + META)

    def state(self, step: int) -> dict[str, Any]:
        return self._json(self.uri(step) + STATE)

    def records(self) -> dict[int, dict[str, Any]]:
        """What the checkpoints' steps trained and dropped, pruned checkpoints included: checkpoint step ->
        ``{"consumed": {step: [transition ids]}, "dropped": {transition id: reason}}``."""
        keys = self._list()
        complete = {int(m.group(1)) for k in keys if (m := STEP_RE.search(k))}
        pruned = {int(m.group(1)) for k in keys if (m := RECORD_RE.search(k))} - complete
        out = {step: self.state(step) for step in complete}
        out.update({step: self._json(self.record_uri(step)) for step in pruned})
        return {step: {"consumed": out[step].get("consumed", {}), "dropped": out[step].get("dropped", {})}
                for step in sorted(out)}

    def upload(self, local: Path, step: int, meta: dict[str, Any]) -> str:
        """Upload the folder's files, then meta.json; returns the checkpoint's URI."""
        uri = self.uri(step)
        (local / META).unlink(missing_ok=True)
        try:
            for path in files_under(local):
                dest = uri + path.relative_to(local).as_posix()
                self._s3(f"writing {dest}", functools.partial(self.store.upload_file, path, dest))
            data = json.dumps(meta, indent=1).encode()
            self._s3(f"writing {uri}{META}", functools.partial(self.store.put_bytes, uri + META, data,
                                                               "application/json"))
        except StorageError as exc:
            raise TrainerError(f"cannot write checkpoint {uri}: {exc}") from exc
        return uri

    def prune(self, keep: int, pinned: set[int]) -> list[int]:
        """Delete all but the newest ``keep`` complete checkpoints, sparing the ``pinned`` steps.

        The record of what a deleted checkpoint's steps trained and dropped is written under
        ``records/`` first. Then a deleted checkpoint loses its meta.json, so a deletion cut short
        leaves an incomplete folder, which resume ignores and the next prune removes with the rest
        of the older folders. Deletions are not retried: the next checkpoint's prune tries again.
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
        for step in sorted(set(folders) & set(complete)):
            state = json.loads(self.store.get_bytes(self.uri(step) + STATE))
            record = {"step": step, "consumed": state.get("consumed", {}), "dropped": state.get("dropped", {})}
            self.store.put_bytes(self.record_uri(step), json.dumps(record).encode(), "application/json")
        keys = [k for step in sorted(folders) for k in folders[step]]
        metas = [k for k in keys if k.endswith("/" + META)]
        self.store.delete(metas)
        self.store.delete([k for k in keys if not k.endswith("/" + META)])
        return sorted(folders)

    def download(self, step: int, local: Path) -> Path:
        try:
            self._s3(f"downloading {self.uri(step)}", functools.partial(self.store.download_dir, self.uri(step), local))
        except StorageError as exc:
            raise TrainerError(f"cannot read checkpoint {self.uri(step)}: {exc}") from exc
        return local


class Tracker:
    """One MLflow run per training job (continued across restarts) and the Model Registry.

    Every call is retried (``Retry``) while MLflow does not answer. Once one has failed for the
    whole retry time, MLflow counts as down and later calls get one attempt each until one succeeds,
    so a long outage does not stall every checkpoint. Metrics go through a background thread, so a
    step never waits for MLflow; the ones that could not be sent are dropped and counted.
    """

    def __init__(self, config: TrainConfig, tracking_uri: str, run_id: str | None, retry: Retry | None = None) -> None:
        os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
        # MLflow's own client retries each request for about four minutes, unlogged: Retry does it instead.
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "30")
        from mlflow import MlflowClient
        from mlflow.entities import Param

        self.config = config
        self.retry = retry or Retry()
        self.client = MlflowClient(tracking_uri, registry_uri=tracking_uri)
        self.down = False
        self.metrics_dropped = 0
        self._pending: list[Any] = []
        self._wake = threading.Condition()
        self._closing = False
        try:
            if run_id is None:
                exp_id = self._call(f"finding experiment '{config.experiment}'", self._experiment_id)
                run = self._call("starting a run", functools.partial(
                    self.client.create_run, exp_id, run_name=f"{config.policy}-train"))
                self.run_id: str = run.info.run_id
                params = [Param(k, str(v)[:500]) for k, v in config.to_params().items()]
                for i in range(0, len(params), 100):  # MLflow takes 100 params per batch
                    self._call("logging the parameters", functools.partial(
                        self.client.log_batch, self.run_id, params=params[i: i + 100]))
            else:
                self.run_id = run_id
                self._call(f"continuing run {run_id}", functools.partial(
                    self.client.update_run, run_id, status="RUNNING"))
        except Exception as exc:  # mlflow raises MlflowException and requests errors alike
            raise TrainerError(f"cannot start an MLflow run at {tracking_uri}: {exc}; start it with "
                               "'rollstream stack up' or pass --no-mlflow") from exc
        self._sender = threading.Thread(target=self._send_metrics, name="mlflow-metrics", daemon=True)
        self._sender.start()

    def _experiment_id(self) -> str:
        from mlflow.exceptions import MlflowException

        name = self.config.experiment
        if exp := self.client.get_experiment_by_name(name):
            return str(exp.experiment_id)
        try:
            return str(self.client.create_experiment(name))
        except MlflowException as exc:  # another trainer created it in between
            if "RESOURCE_ALREADY_EXISTS" not in str(exc.error_code) or not (
                    exp := self.client.get_experiment_by_name(name)):
                raise
            return str(exp.experiment_id)

    def _call(self, what: str, call: Callable[[], T]) -> T:
        retry = Retry(0.0) if self.down else self.retry
        try:
            out = retry(f"MLflow: {what}", call, mlflow_transient)
        except Exception as exc:
            if mlflow_transient(exc) and not self.down:
                self.down = True
                log.warning("MLflow counts as down: later calls get one attempt each until one succeeds")
            raise
        if self.down:
            log.info("MLflow answers again")
        self.down = False
        return out

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        """Queue the metrics of a step for the background sender."""
        from mlflow.entities import Metric

        stamp = int(time.time() * 1000)
        with self._wake:
            self._pending += [Metric(k, float(v), stamp, step) for k, v in metrics.items()]
            self._wake.notify()

    def _send_metrics(self) -> None:
        from mlflow.exceptions import MlflowException

        dropping = False
        while True:
            with self._wake:
                while not self._pending and not self._closing:
                    self._wake.wait()
                if not self._pending:
                    return
                batch, self._pending = self._pending[:METRICS_PER_BATCH], self._pending[METRICS_PER_BATCH:]
            try:
                self._call(f"logging {len(batch)} metrics", functools.partial(
                    self.client.log_batch, self.run_id, metrics=batch))
                dropping = False
            except MlflowException as exc:
                self.metrics_dropped += len(batch)
                if not dropping:  # once per outage: it would otherwise repeat every step
                    log.warning("dropping metrics that MLflow does not take until it does: %s", exc)
                dropping = True

    def register(self, uri: str, step: int, version: int) -> str:
        """Register the checkpoint as a model version (once per URI), move the alias; returns the version."""
        from mlflow.exceptions import MlflowException

        try:
            return self._call(f"registering {uri}", functools.partial(self._register, uri, step, version))
        except MlflowException as exc:
            raise TrainerError(f"cannot register {uri} as a version of model '{self.config.policy}': {exc}") from exc

    def _register(self, uri: str, step: int, version: int) -> str:
        from mlflow.exceptions import MlflowException

        name = self.config.policy
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
        return mv_version

    def versions(self, root: str) -> dict[int, tuple[str, list[str]]]:
        """The registered versions of checkpoints under ``root``: step -> (version, its aliases)."""
        from mlflow.exceptions import MlflowException

        prefix = root.rstrip("/") + "/"
        name = self.config.policy
        try:
            found = self._call("listing model versions", functools.partial(
                self.client.search_model_versions, f"name = '{name}'"))
            # Search results leave the aliases out; the registered model has them all.
            model = self._call("reading the registered model", functools.partial(
                self.client.get_registered_model, name))
        except MlflowException as exc:
            raise TrainerError(f"cannot list the versions of model '{name}': {exc}") from exc
        aliases = model.aliases or {}
        return {int(mv.tags["step"]): (str(mv.version), [a for a, v in aliases.items() if str(v) == str(mv.version)])
                for mv in found if mv.tags.get("s3_uri", "").startswith(prefix) and "step" in mv.tags}

    def delete_version(self, version: str) -> None:
        from mlflow.exceptions import MlflowException

        try:
            self._call(f"deleting version {version}", functools.partial(
                self.client.delete_model_version, self.config.policy, version))
        except MlflowException as exc:
            raise TrainerError(f"cannot delete version {version} of model '{self.config.policy}': {exc}") from exc

    def end(self, status: str = "FINISHED") -> None:
        """Send the queued metrics and close the run; logs, never raises (the job's outcome is decided)."""
        from mlflow.exceptions import MlflowException

        with self._wake:
            self._closing = True
            self._wake.notify()
        self._sender.join(timeout=self.retry.total_s + 60)
        if self.metrics_dropped:
            log.warning("%d metrics were dropped while MLflow was down", self.metrics_dropped)
        try:
            self._call(f"ending run {self.run_id}", functools.partial(
                self.client.set_terminated, self.run_id, status))
        except MlflowException as exc:
            log.error("could not mark MLflow run %s %s: %s", self.run_id, status, exc)


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
