"""The trainer rides out S3 and MLflow outages (Retry), and pruned checkpoints keep their record."""

from __future__ import annotations

import dataclasses
import logging
import time
from collections import Counter
from collections.abc import Callable
from typing import Any
from urllib.parse import urlparse

import pytest
from minio.error import S3Error
from mlflow import MlflowClient
from outage_proxy import OutageProxy
from trainer_helpers import connection_for, group_of, produce
from urllib3.exceptions import MaxRetryError

from rollstream.errors import ConfigError, RollstreamError, StorageError, TrainerError
from rollstream.events import read_events
from rollstream.schemas.codec import EventCodec
from rollstream.schemas.topics import Topics
from rollstream.settings import ConnectionSettings
from rollstream.storage import ObjectStore, transient
from rollstream.trainer.checkpoint import CheckpointStore, Retry, mlflow_transient
from rollstream.trainer.config import TrainConfig
from rollstream.trainer.train import train

CHECKPOINT_LOG = "rollstream.trainer.checkpoint"


class Flaky:
    """A callable that raises ``error`` its first ``failures`` calls, then returns 'done'."""

    def __init__(self, failures: int, error: Exception) -> None:
        self.failures, self.error, self.calls = failures, error, 0

    def __call__(self) -> str:
        self.calls += 1
        if self.calls <= self.failures:
            raise self.error
        return "done"


def test_retry_backs_off_until_the_call_succeeds(caplog: pytest.LogCaptureFixture) -> None:
    call = Flaky(3, ConnectionRefusedError("refused"))
    started = time.monotonic()
    with caplog.at_level(logging.WARNING, CHECKPOINT_LOG):
        assert Retry(total_s=10, first_s=0.02)("S3: writing x", call, lambda exc: True) == "done"
    assert call.calls == 4
    assert time.monotonic() - started >= 0.02 + 0.04 + 0.08  # the waits double
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 3
    assert all("S3: writing x failed" in w and "refused" in w for w in warnings), warnings


def test_retry_gives_up_after_the_total_time(caplog: pytest.LogCaptureFixture) -> None:
    call = Flaky(10**6, ConnectionRefusedError("refused"))
    started = time.monotonic()
    with caplog.at_level(logging.WARNING, CHECKPOINT_LOG), pytest.raises(ConnectionRefusedError):
        Retry(total_s=0.3, first_s=0.02, max_s=0.05)("MLflow: registering", call, lambda exc: True)
    assert time.monotonic() - started < 1.0
    assert call.calls > 3
    assert any("giving up" in r.getMessage() for r in caplog.records if r.levelno == logging.ERROR)


def test_retry_does_not_repeat_a_permanent_failure() -> None:
    call = Flaky(1, ValueError("bad request"))
    with pytest.raises(ValueError):
        Retry(total_s=10, first_s=0.01)("MLflow: registering", call, lambda exc: not isinstance(exc, ValueError))
    assert call.calls == 1
    assert Retry()("one attempt", Flaky(0, ValueError()), lambda exc: True) == "done"


class _Response:
    def __init__(self, status: int) -> None:
        self.status = status


def _s3_error(status: int, code: str) -> StorageError:
    cause = S3Error(_Response(status), code, "m", "r", "id", "host")  # type: ignore[arg-type]
    try:
        raise StorageError("writing s3://b/k failed") from cause
    except StorageError as exc:
        return exc


def _wrapped(cause: Exception) -> StorageError:
    try:
        raise StorageError("writing s3://b/k failed") from cause
    except StorageError as exc:
        return exc


def test_which_failures_are_transient() -> None:
    assert transient(_wrapped(MaxRetryError(None, "/k", "refused")))  # type: ignore[arg-type]
    assert transient(_wrapped(ConnectionResetError()))
    assert transient(_s3_error(503, "SlowDown")) and transient(_s3_error(500, "InternalError"))
    assert not transient(_s3_error(404, "NoSuchBucket")) and not transient(_s3_error(403, "AccessDenied"))
    from mlflow.exceptions import MlflowException
    from mlflow.protos.databricks_pb2 import INVALID_PARAMETER_VALUE, RESOURCE_DOES_NOT_EXIST

    assert mlflow_transient(MlflowException("API request to http://x failed with exception refused"))
    assert not mlflow_transient(MlflowException("bad", error_code=INVALID_PARAMETER_VALUE))
    assert not mlflow_transient(MlflowException("no such run", error_code=RESOURCE_DOES_NOT_EXIST))


def test_retry_s_must_not_be_negative(make_config: Callable[..., TrainConfig]) -> None:
    with pytest.raises(ConfigError, match="--retry-s"):
        make_config(retry_s=-1)


def _proxy_for(url: str, trigger: bytes, outage_s: float) -> OutageProxy:
    parsed = urlparse(url)
    return OutageProxy((parsed.hostname or "127.0.0.1", parsed.port or 80), trigger, outage_s)


@pytest.mark.integration
@pytest.mark.slow
def test_pruned_checkpoints_keep_the_record_of_every_trained_id(
    settings: ConnectionSettings, topics: Topics, codec: EventCodec, store: ObjectStore,
    make_config: Callable[..., TrainConfig], policy: str,
) -> None:
    records = [r for g in range(4) for r in group_of(policy, f"g{g}", 4, [0.0, 1.0])]
    produce(settings, codec, topics, records)
    config = make_config(batch_size=4, checkpoint_every=1, keep_checkpoints=1, mlflow=False, publish=False)
    result = train(config, connection_for(settings, topics))
    ckpts = CheckpointStore(store, config.checkpoint_uri)
    assert result.steps == 4 and sorted(set(result.pruned)) == [1, 2, 3]
    assert ckpts.steps() == [4]
    for step in (1, 2, 3):  # the weights, optimizer and state went; the record stayed
        assert not store.list_objects(ckpts.uri(step))
        assert store.list_objects(ckpts.record_uri(step)) == [ckpts.record_uri(step)]
    found = ckpts.records()
    assert sorted(found) == [1, 2, 3, 4]
    by_step = {int(s): ids for rec in found.values() for s, ids in rec["consumed"].items()}
    assert sorted(by_step) == [1, 2, 3, 4] and all(len(ids) == 4 for ids in by_step.values())
    trained = Counter(t for ids in by_step.values() for t in ids)
    assert trained == Counter(r["transition_id"] for r in records)  # every id, each once
    # A prune cut short after writing the record (meta.json still there) reads as one step, not two.
    store.put_bytes(ckpts.record_uri(4), b'{"step": 4, "consumed": {"4": ["x"]}, "dropped": {}}')
    assert ckpts.records()[4]["consumed"] == found[4]["consumed"]


@pytest.mark.integration
@pytest.mark.slow
def test_checkpoint_completes_after_s3_and_mlflow_outages(
    settings: ConnectionSettings, topics: Topics, codec: EventCodec, store: ObjectStore,
    make_config: Callable[..., TrainConfig], policy: str, bucket: str, caplog: pytest.LogCaptureFixture,
) -> None:
    produce(settings, codec, topics, group_of(policy, "g", 4, [0.0, 1.0]) + group_of(policy, "h", 4, [1.0, 0.0]))
    # S3 goes away at the checkpoint's first file for longer than the client's own retries (~6 s);
    # MLflow goes away when the checkpoint is registered.
    s3 = _proxy_for(settings.s3_endpoint, f"PUT /{bucket}/{policy}/step-".encode(), 10.0)
    ml = _proxy_for(settings.mlflow_tracking_uri, b"/model-versions/create", 4.0)
    connection = dataclasses.replace(connection_for(settings, topics), s3_endpoint=s3.url,
                                     mlflow_tracking_uri=ml.url)
    config = make_config(checkpoint_every=1, retry_s=60.0)
    try:
        with caplog.at_level(logging.WARNING, CHECKPOINT_LOG):
            result = train(config, connection)
    finally:
        s3.close()
        ml.close()
    assert s3.triggered.is_set() and ml.triggered.is_set()
    assert result.steps == 1 and result.timings["checkpoint_s"][0] >= 9.0
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any(w.startswith(f"S3: writing {result.checkpoints[0]}") for w in warnings), warnings
    assert any(w.startswith(f"MLflow: registering {result.checkpoints[0]}") for w in warnings), warnings
    # The checkpoint is complete (every file meta.json lists, and meta.json), registered and announced.
    ckpts = CheckpointStore(store, config.checkpoint_uri)
    meta = ckpts.latest()
    assert meta is not None and ckpts.steps() == [1]
    keys = set(store.list_objects(ckpts.uri(1)))
    assert {ckpts.uri(1) + f for f in meta["files"] + ["meta.json"]} <= keys
    mv = MlflowClient(settings.mlflow_tracking_uri).get_model_version_by_alias(policy, "current")
    event: dict[str, Any] = result.events[0]
    assert event["weights_uri"] == ckpts.uri(1) and event["mlflow_model_version"] == mv.version


@pytest.mark.integration
@pytest.mark.slow
def test_no_policy_update_for_a_checkpoint_s3_did_not_take(
    settings: ConnectionSettings, topics: Topics, codec: EventCodec, store: ObjectStore,
    make_config: Callable[..., TrainConfig], policy: str, bucket: str,
) -> None:
    produce(settings, codec, topics, group_of(policy, "g", 4, [0.0, 1.0]) + group_of(policy, "h", 4, [1.0, 0.0]))
    s3 = _proxy_for(settings.s3_endpoint, f"PUT /{bucket}/{policy}/step-".encode(), 120.0)
    connection = dataclasses.replace(connection_for(settings, topics), s3_endpoint=s3.url)
    config = make_config(checkpoint_every=1, retry_s=1.0, mlflow=False)
    try:
        with pytest.raises(TrainerError, match="cannot write checkpoint"):
            train(config, connection)
    finally:
        s3.close()
    assert CheckpointStore(store, config.checkpoint_uri).steps() == []
    with pytest.raises(RollstreamError, match="read 0 of 1"):
        list(read_events(codec, [topics.policy_updates], f"check-{policy}", 1, timeout=3.0,
                         settings=connection_for(settings, topics)))
