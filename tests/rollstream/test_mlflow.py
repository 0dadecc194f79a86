"""The MLflow tracking server of the stack: runs, artifacts on S3, the Model Registry."""

from __future__ import annotations

import uuid
from pathlib import Path

import mlflow
import pytest
from mlflow import MlflowClient

from rollstream.settings import ConnectionSettings, env
from rollstream.storage import ObjectStore

pytestmark = pytest.mark.integration


def test_run_metric_artifact_registered_version_and_alias(
    settings: ConnectionSettings, store: ObjectStore, tmp_path: Path
) -> None:
    mlflow.set_tracking_uri(settings.mlflow_tracking_uri)
    client = MlflowClient(settings.mlflow_tracking_uri)
    exp_id = mlflow.create_experiment(f"test-{uuid.uuid4().hex[:8]}")
    artifact = tmp_path / "checkpoint.json"
    artifact.write_text('{"step": 3}')
    with mlflow.start_run(experiment_id=exp_id) as run:
        mlflow.log_param("lr", 1e-5)
        for step, loss in enumerate([1.0, 0.5, 0.25]):
            mlflow.log_metric("loss", loss, step=step)
        mlflow.log_artifact(str(artifact), artifact_path="ckpt")
    run_id = run.info.run_id

    got = client.get_run(run_id)
    assert got.data.params["lr"] == "1e-05"
    assert [m.value for m in client.get_metric_history(run_id, "loss")] == [1.0, 0.5, 0.25]
    local = client.download_artifacts(run_id, "ckpt/checkpoint.json", str(tmp_path / "dl"))
    assert Path(local).read_text() == '{"step": 3}'

    # The tracking server proxies artifacts to the S3 server: the object is in its bucket.
    keys = store.list_objects(f"s3://{env('MLFLOW_BUCKET')}/artifacts/")
    assert any(k.endswith(f"{run_id}/artifacts/ckpt/checkpoint.json") for k in keys), keys[:5]

    name = f"policy-{uuid.uuid4().hex[:8]}"
    client.create_registered_model(name)
    v1 = client.create_model_version(name, source=f"runs:/{run_id}/ckpt", run_id=run_id,
                                     tags={"policy_version": "1", "s3_uri": "s3://rollstream/p/step-000001/"})
    v2 = client.create_model_version(name, source=f"runs:/{run_id}/ckpt", run_id=run_id,
                                     tags={"policy_version": "2"})
    client.set_registered_model_alias(name, "current", v1.version)
    assert client.get_model_version_by_alias(name, "current").version == v1.version
    client.set_registered_model_alias(name, "current", v2.version)
    moved = client.get_model_version_by_alias(name, "current")
    assert moved.version == v2.version and moved.tags["policy_version"] == "2"
    assert client.get_model_version(name, v1.version).tags["s3_uri"] == "s3://rollstream/p/step-000001/"
