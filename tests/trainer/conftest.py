"""Trainer test helpers: a tiny model, transitions produced into real topics, a small config."""

from __future__ import annotations

import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from rollstream.serving.tiny import build_tiny_model
from rollstream.trainer.config import TrainConfig


@pytest.fixture(scope="session")
def trainer_model_dir(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The shared ``tiny_model_dir`` when the suite defines it, else the same tiny Qwen2 built here."""
    try:
        return Path(request.getfixturevalue("tiny_model_dir"))
    except pytest.FixtureLookupError:
        return build_tiny_model(tmp_path_factory.mktemp("trainer-model") / "tiny", seed=0)


@pytest.fixture
def policy() -> str:
    return f"pol-{uuid.uuid4().hex[:8]}"


@pytest.fixture
def make_config(trainer_model_dir: Path, bucket: str, policy: str) -> Callable[..., TrainConfig]:
    def make(**overrides: Any) -> TrainConfig:
        values: dict[str, Any] = dict(
            policy=policy, model=str(trainer_model_dir), checkpoint_uri=f"s3://{bucket}/{policy}", lr=1e-3,
            batch_size=8, group_size=4, checkpoint_every=2, idle_exit_s=4.0, batch_timeout_s=1.0,
            group_timeout_s=5.0, threads=1, progress=False, experiment="rollstream-trainer-tests",
            consumer_group=f"trainer-{uuid.uuid4().hex[:8]}",
        )
        values.update(overrides)
        return TrainConfig(**values)

    return make
