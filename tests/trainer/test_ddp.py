"""torchrun with 2 CPU processes (gloo) ends with the same parameters as one process on the whole batch.

Rank 0 consumes and broadcasts each batch; each rank trains a disjoint shard of its rows and DDP
averages the gradients. Both jobs read the same one-partition topic (so batches are formed in the
same order) with their own consumer groups and checkpoint folders.
"""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from safetensors.torch import load
from test_crash import trainer_env
from trainer_helpers import group_of, produce

from rollstream.schemas.codec import EventCodec, registry_client
from rollstream.schemas.topics import Topics
from rollstream.settings import ConnectionSettings
from rollstream.storage import ObjectStore
from rollstream.trainer.checkpoint import CheckpointStore
from rollstream.trainer.config import TrainConfig

pytestmark = [pytest.mark.integration, pytest.mark.slow]

STEPS = 3


def test_two_gloo_ranks_match_one_process(
    settings: ConnectionSettings, topics_factory: Callable[..., Topics], store: ObjectStore,
    make_config: Callable[..., TrainConfig], policy: str, tmp_path: Path,
) -> None:
    topics = topics_factory(partitions=1)
    codec = EventCodec(registry_client(settings), topics)
    records = []
    for g in range(2 * STEPS):
        # Uneven response lengths and rewards, so shards differ in tokens and the normalization matters.
        group = group_of(policy, f"g{g}", 4, [0.0, 1.0, 0.3, float(g % 3)])
        for i, rec in enumerate(group):
            rec["response_token_ids"] = rec["response_token_ids"] + [40 + j for j in range(i + g % 2)]
            rec["behaviour_logprobs"] = [-1.5] * len(rec["response_token_ids"])
        records += group
    produce(settings, codec, topics, records)
    env = trainer_env(settings, topics)
    base = make_config()
    weights = {}
    for name, launcher in [("single", [sys.executable, "-m", "rollstream.trainer.train"]),
                           ("ddp", [sys.executable, "-m", "torch.distributed.run", "--standalone",
                                    "--nproc-per-node", "2", "-m", "rollstream.trainer.train"])]:
        uri = f"{base.checkpoint_uri}-{name}"
        args = launcher + [
            "--policy", policy, "--model", base.model, "--checkpoint-uri", uri, "--checkpoint-every", str(STEPS),
            "--max-steps", str(STEPS), "--batch-size", "8", "--group-size", "4", "--micro-batch-size", "3",
            "--lr", "1e-3", "--kl-coef", "0.05", "--threads", "1", "--max-policy-lag", "100", "--no-mlflow",
            "--no-publish", "--no-progress", "--consumer-group", f"{base.consumer_group}-{name}",
        ]
        out = subprocess.run(args, env=env, capture_output=True, text=True, timeout=300)
        assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-4000:]
        ckpts = CheckpointStore(store, uri)
        assert ckpts.steps() == [STEPS]
        weights[name] = load(store.get_bytes(ckpts.uri(STEPS) + "model.safetensors"))
        if name == "ddp":
            assert "rank 1/2" in out.stderr
    single, ddp = weights["single"], weights["ddp"]
    initial = load((Path(base.model) / "model.safetensors").read_bytes())
    assert single.keys() == ddp.keys()
    moved = max(float((single[k] - initial[k]).abs().max()) for k in single)
    assert moved > 1e-4  # the steps changed the weights
    diff = max(float((single[k] - ddp[k]).abs().max()) for k in single)
    print(f"max |ddp - single| = {diff:.2e}; max |single - initial| = {moved:.2e}")
    assert diff < 5e-5, f"DDP and single-process weights differ by {diff} (steps moved them by {moved})"
    assert all(torch.isfinite(v).all() for v in ddp.values())
