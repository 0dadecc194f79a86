"""The trainer against the real stack: steps, checkpoints with offsets, MLflow, PolicyUpdate, staleness."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from mlflow import MlflowClient
from safetensors.torch import load_file
from trainer_helpers import connection_for, group_of, produce, transition

from rollstream.events import read_events
from rollstream.schemas.codec import EventCodec
from rollstream.schemas.topics import Topics
from rollstream.settings import ConnectionSettings
from rollstream.storage import ObjectStore
from rollstream.trainer.checkpoint import CheckpointStore
from rollstream.trainer.config import TrainConfig
from rollstream.trainer.train import train

pytestmark = [pytest.mark.integration, pytest.mark.slow]


def test_grpo_checkpoint_offsets_mlflow_and_policy_update(
    settings: ConnectionSettings, topics: Topics, codec: EventCodec, store: ObjectStore,
    make_config: Callable[..., TrainConfig], policy: str, trainer_model_dir: Path,
) -> None:
    records = []
    for g in range(4):
        records += group_of(policy, f"g{g}", 4, [0.0, 1.0, 0.5, 0.0])
    records.append(transition("someone-else", "other-0", [1, 2], [3], 1.0))  # another policy: skipped
    records.append(dict(records[0]))  # a duplicate transition id: dropped
    produce(settings, codec, topics, records)

    config = make_config(objective="grpo")
    result = train(config, connection_for(settings, topics))

    assert result.steps == 2 and result.version == 1
    assert result.counts["trained"] == 16
    assert result.counts["other_policy"] == 1 and result.counts["duplicates"] == 1

    # The checkpoint: weights, optimizer, state, and meta.json with the offsets after all 18 messages.
    ckpts = CheckpointStore(store, config.checkpoint_uri)
    assert ckpts.steps() == [2]
    meta = ckpts.latest()
    assert meta is not None and meta["policy_version"] == 1 and meta["kind"] == "FULL"
    assert sum(meta["offsets"].values()) == len(records)
    uri = ckpts.uri(2)
    keys = store.list_objects(uri)
    for name in ("model.safetensors", "config.json", "optimizer.pt", "trainer_state.json", "meta.json",
                 "tokenizer.json"):
        assert uri + name in keys, keys
    state = ckpts.state(2)
    assert sorted(t for ids in state["consumed"].values() for t in ids) == sorted(
        r["transition_id"] for r in records[:16])
    # The weights moved.
    local = store.get_bytes(uri + "model.safetensors")
    (trainer_model_dir.parent / "ck.safetensors").write_bytes(local)
    after = load_file(str(trainer_model_dir.parent / "ck.safetensors"))
    before = load_file(str(trainer_model_dir / "model.safetensors"))
    assert any(not torch.equal(before[k], after[k]) for k in before)

    # MLflow: the run with its parameters and per-step metrics; a registered version with the alias.
    client = MlflowClient(settings.mlflow_tracking_uri)
    run = client.get_run(result.run_id or "")
    assert run.data.params["objective"] == "grpo" and run.info.status == "FINISHED"
    for metric in ("loss", "reward_mean", "reward_std", "advantage_std", "clip_fraction", "kl", "staleness_mean",
                   "tokens_per_s", "consumer_lag"):
        assert [m.step for m in client.get_metric_history(run.info.run_id, metric)] == [1, 2], metric
    mv = client.get_model_version_by_alias(policy, "current")
    assert mv.source == uri and mv.tags["policy_version"] == "1" and mv.tags["s3_uri"] == uri

    # The PolicyUpdate event on the compacted topic, keyed by the policy.
    got = list(read_events(codec, [topics.policy_updates], f"check-{policy}", 1,
                           settings=connection_for(settings, topics)))
    assert got[0].key == policy
    event = got[0].value
    assert (event["policy"], event["version"], event["step"], event["weights_uri"], event["kind"]) == (
        policy, 1, 2, uri, "FULL")
    assert event["mlflow_model_name"] == policy and event["mlflow_model_version"] == mv.version


@pytest.mark.parametrize("objective", ["rloo", "reinforce"])
def test_objectives_take_steps(
    settings: ConnectionSettings, topics: Topics, codec: EventCodec,
    make_config: Callable[..., TrainConfig], policy: str, objective: str,
) -> None:
    records = []
    for g in range(4):
        records += group_of(policy, f"g{g}", 4, [1.0, 0.0, 0.25, 0.75], logprob=None if g == 0 else -2.0)
    produce(settings, codec, topics, records)
    result = train(make_config(objective=objective, mlflow=False, publish=False, kl_coef=0.1),
                   connection_for(settings, topics))
    assert result.steps == 2 and result.counts["trained"] == 16
    # Group 0 came without behaviour logprobs: treated as on-policy, and counted.
    assert result.counts["no_behaviour_logprobs"] == 4


def test_retokenized_transitions_get_no_importance_ratio_and_are_counted(
    settings: ConnectionSettings, topics: Topics, codec: EventCodec,
    make_config: Callable[..., TrainConfig], policy: str,
) -> None:
    records = group_of(policy, "engine", 4, [1.0, 0.0], logprob=-2.0)
    # Re-tokenized by the processor: without logprobs, as the processor emits them, and (a foreign producer)
    # with logprobs, which belong to other tokens and are ignored.
    records += [dict(r, token_source="tokenizer") for r in group_of(policy, "tok", 4, [1.0, 0.0], logprob=None)]
    records += [dict(r, token_source="tokenizer") for r in group_of(policy, "tok-lp", 4, [0.0, 1.0], logprob=-2.0)]
    records += group_of(policy, "engine-2", 4, [0.0, 1.0], logprob=-2.0)
    produce(settings, codec, topics, records)
    result = train(make_config(objective="grpo", publish=False), connection_for(settings, topics))
    assert result.steps == 2 and result.counts["trained"] == 16
    assert result.counts["token_source_tokenizer"] == 8
    assert result.counts["no_behaviour_logprobs"] == 8 and result.counts["bad_logprobs"] == 4
    history = MlflowClient(settings.mlflow_tracking_uri).get_metric_history(result.run_id or "",
                                                                            "count_token_source_tokenizer")
    # Cumulative, like every count; which groups make up the first step depends on the partitions' read order.
    assert [m.step for m in sorted(history, key=lambda m: m.step)] == [1, 2]
    assert max(history, key=lambda m: m.step).value == 8.0


def test_lora_checkpoint_is_an_adapter(
    settings: ConnectionSettings, topics: Topics, codec: EventCodec, store: ObjectStore,
    make_config: Callable[..., TrainConfig], policy: str,
) -> None:
    produce(settings, codec, topics, group_of(policy, "g", 4, [0.0, 1.0]) + group_of(policy, "h", 4, [1.0, 0.0]))
    config = make_config(lora_rank=4, lr=1e-2, mlflow=False, kl_coef=0.05)
    result = train(config, connection_for(settings, topics))
    assert result.steps == 1 and result.events[0]["kind"] == "ADAPTER"
    assert result.events[0]["base_model"] == config.model
    keys = store.list_objects(result.checkpoints[0])
    assert any(k.endswith("adapter_model.safetensors") for k in keys)
    assert not any(k.endswith("/model.safetensors") for k in keys)
    config_json = json.loads(store.get_bytes(result.checkpoints[0] + "adapter_config.json"))
    assert config_json["r"] == 4


def test_stale_samples_are_dropped_exactly(
    settings: ConnectionSettings, topics: Topics, codec: EventCodec, store: ObjectStore,
    make_config: Callable[..., TrainConfig], policy: str,
) -> None:
    # Current version 10, max lag 2: versions 8, 9, 10 are used; 5, 6, 7 dropped.
    records = []
    versions = [5, 6, 7, 8, 9, 10]
    for i, v in enumerate(versions):
        records.append(transition(policy, f"r{i}", [5, 6, 7], [9, 9], float(i % 2), version=v,
                                  logprobs=[-1.0, -1.0]))
    produce(settings, codec, topics, records)
    config = make_config(objective="reinforce", start_version=10, max_policy_lag=2, batch_size=3, mlflow=False,
                         publish=False)
    result = train(config, connection_for(settings, topics))
    assert result.counts["stale"] == 3
    assert result.counts["trained"] == 3
    # The checkpoint says what became of each: the trained ids by step, the dropped ones with the reason.
    ckpts = CheckpointStore(store, config.checkpoint_uri)
    states = [ckpts.state(step) for step in ckpts.steps()]
    assert sorted(t for st in states for ids in st["consumed"].values() for t in ids) == sorted(
        r["transition_id"] for r in records if r["policy_version"] >= 8)
    dropped = {t: why for st in states for t, why in st["dropped"].items()}
    assert dropped == {r["transition_id"]: "stale" for r in records if r["policy_version"] < 8}


def test_keep_checkpoints_deletes_older_ones_and_their_versions_but_not_pinned_ones(
    settings: ConnectionSettings, topics: Topics, codec: EventCodec, store: ObjectStore,
    make_config: Callable[..., TrainConfig], policy: str,
) -> None:
    client = MlflowClient(settings.mlflow_tracking_uri)
    records = [r for g in range(4) for r in group_of(policy, f"a{g}", 4, [0.0, 1.0])]
    produce(settings, codec, topics, records)
    config = make_config(checkpoint_every=1, publish=False, keep_checkpoints=2)
    first = train(config, connection_for(settings, topics))
    ckpts = CheckpointStore(store, config.checkpoint_uri)
    assert first.steps == 2 and ckpts.steps() == [1, 2] and first.pruned == []
    # A user pins step 1's version with an alias of their own.
    by_step = {int(mv.tags["step"]): mv for mv in client.search_model_versions(f"name = '{policy}'")}
    client.set_registered_model_alias(policy, "production", by_step[1].version)
    # A deletion cut short earlier: an incomplete folder below the newest checkpoints.
    store.put_bytes(ckpts.uri(0) + "optimizer.pt", b"left over")

    produce(settings, codec, topics, [r for g in range(6) for r in group_of(policy, f"b{g}", 4, [1.0, 0.0])])
    second = train(config, connection_for(settings, topics))
    assert second.steps == 5
    # Steps 3, 4, 5 were written; 2 and 3 went (3 once 5 came); 1 stays, pinned; the leftover went too.
    assert ckpts.steps() == [1, 4, 5]
    assert sorted(set(second.pruned)) == [0, 2, 3]
    assert not store.list_objects(ckpts.uri(0)) and not store.list_objects(ckpts.uri(2))
    versions = {int(mv.tags["step"]) for mv in client.search_model_versions(f"name = '{policy}'")}
    assert versions == {1, 4, 5}
    assert client.get_model_version_by_alias(policy, "current").tags["step"] == "5"
    # The trainer still resumes from the newest checkpoint.
    meta = ckpts.latest()
    assert meta is not None and meta["step"] == 5 and meta["policy_version"] == 5
