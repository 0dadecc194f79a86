"""Training metrics for the curves page: the trainer's MLflow run, and a demo run's held-out accuracy."""

from __future__ import annotations

import json
import logging
import os
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

log = logging.getLogger(__name__)

ACCURACY_HINTS = ("accuracy", "acc", "held_out", "eval")


@dataclass
class TrainingMetrics:
    run_id: str | None = None
    run_name: str | None = None
    reward_by_step: list[tuple[float, float]] = field(default_factory=list)
    version_at_step: dict[int, int] = field(default_factory=dict)
    accuracy: dict[str, list[tuple[float, float]]] = field(default_factory=dict)  # metric -> (step, value)
    error: str | None = None


class MlflowMetrics:
    """The newest MLflow run of a trainer consumer group (its ``consumer_group`` parameter), cached."""

    def __init__(self, tracking_uri: str, ttl_s: float = 20.0) -> None:
        self.tracking_uri = tracking_uri
        self.ttl_s = ttl_s
        self._cache: dict[tuple[str, ...], tuple[float, TrainingMetrics]] = {}
        self.lock = threading.Lock()

    def for_groups(self, groups: list[str], policies: list[str]) -> TrainingMetrics:
        key = (*groups, "|", *policies)
        with self.lock:
            hit = self._cache.get(key)
            if hit and time.monotonic() - hit[0] < self.ttl_s:
                return hit[1]
            got = self._read(groups, policies)
            self._cache[key] = (time.monotonic(), got)
            return got

    def _read(self, groups: list[str], policies: list[str]) -> TrainingMetrics:
        if not groups:
            return TrainingMetrics(error="no trainer consumer group has committed offsets on this prefix yet")
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "5")
        os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
        try:
            from mlflow import MlflowClient

            client = MlflowClient(self.tracking_uri)
            filters = [f"params.consumer_group = '{g}'" for g in groups if "'" not in g]
            # The trainer's default group is rollstream-trainer-<policy>, logged as an empty parameter.
            filters += [f"params.policy = '{p}' and params.consumer_group = ''" for p in policies
                        if f"rollstream-trainer-{p}" in groups and "'" not in p]
            exps = [e.experiment_id for e in client.search_experiments()]
            run = None
            for flt in filters:
                found = client.search_runs(exps, flt, order_by=["attributes.start_time DESC"], max_results=1)
                if found and (run is None or found[0].info.start_time > run.info.start_time):
                    run = found[0]
            if run is None:
                return TrainingMetrics(error=f"no MLflow run at {self.tracking_uri} has consumer_group in {groups}")
            out = TrainingMetrics(run.info.run_id, run.info.run_name)
            out.reward_by_step = [(m.step, m.value) for m in client.get_metric_history(run.info.run_id, "reward_mean")]
            out.version_at_step = {m.step: int(m.value) for m in
                                   client.get_metric_history(run.info.run_id, "policy_version")}
            for name in run.data.metrics:
                if any(h in name.lower() for h in ACCURACY_HINTS):
                    out.accuracy[name] = [(m.step, m.value) for m in client.get_metric_history(run.info.run_id, name)]
            return out
        except Exception as exc:  # MLflow down or slow: the page says so and shows the rest
            log.debug("mlflow: %s", exc)
            return TrainingMetrics(error=f"cannot read MLflow at {self.tracking_uri}: {str(exc)[:200]}")


def held_out_accuracy(run_dir: str | None) -> tuple[list[tuple[float, float, int]], str | None]:
    """A ``rollstream demo`` run's held-out accuracy (seconds, accuracy, policy version) from its summary.json."""
    if not run_dir:
        return [], None
    path = Path(run_dir) / "summary.json"
    try:
        curve = json.loads(path.read_text()).get("accuracy_curve") or []
        return [(float(t), float(a), int(v)) for t, a, v in curve], None
    except FileNotFoundError:
        return [], f"{path} does not exist yet (the demo writes it when the run ends)"
    except (OSError, ValueError, TypeError) as exc:
        return [], f"cannot read {path}: {exc}"
