"""Crash safety: kill -9 the trainer three times during a run; every transition is trained on exactly once.

The trainer runs as ``python -m rollstream.trainer.train`` over a fixed set of transitions (with
some duplicates among them). It is killed at random moments, each time after it has written at
least one more checkpoint, and restarted; the last run drains the topic and exits. Each
checkpoint records the transition ids its steps consumed since the previous one, so the
checkpoints left on S3 (the lineage of the final weights) must together hold every id once.
"""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import pytest
from trainer_helpers import group_of, produce

from rollstream.schemas.codec import EventCodec
from rollstream.schemas.topics import Topics
from rollstream.settings import ConnectionSettings
from rollstream.storage import ObjectStore
from rollstream.trainer.checkpoint import CheckpointStore
from rollstream.trainer.config import TrainConfig

pytestmark = [pytest.mark.integration, pytest.mark.slow]

GROUPS = 120  # enough steps that three kills land before the data runs out, on a fast machine too
KILLS = 3


def trainer_env(settings: ConnectionSettings, topics: Topics) -> dict[str, str]:
    env = dict(os.environ)
    env.update({
        "ROLLSTREAM_KAFKA_BOOTSTRAP": settings.kafka_bootstrap, "ROLLSTREAM_SCHEMA_REGISTRY_URL":
        settings.schema_registry_url, "ROLLSTREAM_S3_ENDPOINT": settings.s3_endpoint,
        "ROLLSTREAM_MLFLOW_TRACKING_URI": settings.mlflow_tracking_uri, "ROLLSTREAM_TOPIC_PREFIX": topics.prefix,
        "ROLLSTREAM_PARTITIONS": str(topics.partitions), "MLFLOW_DISABLE_TELEMETRY": "true",
    })
    return env


def test_kill_9_three_times_trains_each_transition_exactly_once(
    settings: ConnectionSettings, topics: Topics, codec: EventCodec, store: ObjectStore,
    make_config: Callable[..., TrainConfig], policy: str, tmp_path: Path,
) -> None:
    records = []
    for g in range(GROUPS):
        records += group_of(policy, f"g{g}", 4, [0.0, 1.0, 0.5, 0.25])
    rng = random.Random(int(time.time()))
    duplicates = [dict(r) for r in rng.sample(records, 10)]
    produce(settings, codec, topics, records + duplicates)
    expected = sorted(r["transition_id"] for r in records)

    config = make_config(checkpoint_every=2, idle_exit_s=6.0)
    args = [sys.executable, "-m", "rollstream.trainer.train", "--policy", policy, "--model", config.model,
            "--checkpoint-uri", config.checkpoint_uri, "--checkpoint-every", "2", "--batch-size", "8",
            "--group-size", "4", "--idle-exit-s", "6", "--batch-timeout-s", "1", "--threads", "1",
            "--lr", "1e-3", "--consumer-group", config.consumer_group, "--experiment", config.experiment,
            "--max-policy-lag", "1000", "--no-progress"]
    env = trainer_env(settings, topics)
    ckpts = CheckpointStore(store, config.checkpoint_uri)
    kills = 0
    for attempt in range(KILLS + 1):
        log = (tmp_path / f"run{attempt}.log").open("w")
        proc = subprocess.Popen(args, env=env, stdout=log, stderr=subprocess.STDOUT)
        if attempt == KILLS:
            assert proc.wait(timeout=300) == 0, (tmp_path / f"run{attempt}.log").read_text()[-3000:]
            break
        before = len(ckpts.steps())
        deadline = time.monotonic() + 120
        while len(ckpts.steps()) <= before and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        assert proc.poll() is None, f"trainer exited before the kill: {(tmp_path / f'run{attempt}.log').read_text()}"
        time.sleep(rng.uniform(0.0, 0.3))
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
        kills += 1
    assert kills == KILLS

    steps = ckpts.steps()
    assert steps == list(range(2, steps[-1] + 1, 2)), steps  # one lineage, no gaps
    trained = Counter(t for s in steps for ids in ckpts.state(s)["consumed"].values() for t in ids)
    assert sorted(trained) == expected
    assert max(trained.values()) == 1, [t for t, n in trained.items() if n > 1]
    final = ckpts.latest()
    assert final is not None and sum(final["offsets"].values()) == len(records) + len(duplicates)
    restarts = sum("resumed from" in (tmp_path / f"run{i}.log").read_text() for i in range(1, KILLS + 1))
    assert restarts == KILLS
