"""The trainer's hyperparameters: one dataclass, one line of documentation per field, parsed from the CLI.

Connection settings (Kafka, registry, S3, MLflow, topic prefix) are not here: they come from
``rollstream.settings.ConnectionSettings`` (``ROLLSTREAM_*`` variables). Invalid combinations raise
``ConfigError`` with a message that says how to fix them.
"""

from __future__ import annotations

import argparse
import dataclasses
import typing
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, ClassVar, Literal

from rollstream.errors import ConfigError
from rollstream.settings import PREFIX, Settings, option

Objective = Literal["grpo", "rloo", "reinforce"]
Correction = Literal["ppo", "decoupled", "tis"]
BatchBy = Literal["transitions", "tokens"]
RewardField = Literal["credited_return", "terminal_reward", "reward"]


_f = option


@dataclass
class TrainConfig(Settings):
    """Hyperparameters of one training job (``rollstream train --help`` lists them).

    Each option ``--some-name`` also reads ``ROLLSTREAM_TRAIN_SOME_NAME``; the command line wins."""

    env_prefix: ClassVar[str] = "TRAIN_"

    policy: str = _f("", "Policy to train: only transitions of this policy are used; names checkpoints and the model.")
    model: str = _f("", "Initial model: a Hugging Face folder or s3://bucket/prefix (the base model under LoRA).")
    objective: Objective = _f("grpo", "grpo: group-relative; rloo: leave-one-out; reinforce: running-mean baseline.")
    reward_field: RewardField = _f("credited_return", "Which reward of a transition is the return to maximize.")
    std_normalize: bool = _f(True, "GRPO: divide advantages by the group's reward std (Dr. GRPO turns this off).")
    baseline_decay: float = _f(0.9, "REINFORCE: decay of the running-mean reward baseline.")
    group_size: int = _f(4, "GRPO/RLOO: rollouts per group_id to wait for before a group is used.")
    group_timeout_s: float = _f(60.0, "Use a group with what has arrived after this many seconds (counted).")
    batch_by: BatchBy = _f("transitions", "Size batches by transitions or by tokens (prompt + response).")
    batch_size: int = _f(8, "Transitions per step (batch_by=transitions); whole groups only.")
    batch_tokens: int = _f(8192, "Tokens per step (batch_by=tokens); whole groups only.")
    batch_timeout_s: float = _f(10.0, "Take a step on a partial batch after waiting this many seconds for it to fill.")
    micro_batch_size: int = _f(8, "Rows per forward/backward pass (gradient accumulation within a step).")
    merge_turns: bool = _f(True, "Train a rollout's calls as one sequence where a call's prompt extends an earlier "
                           "call's prompt + response token for token (forking where it does not); same gradient.")
    max_seq_len: int = _f(4096, "Transitions longer than this (prompt + response tokens) are dropped (counted).")
    max_policy_lag: int = _f(4, "Drop transitions whose policy_version is more than this many versions behind.")
    correction: Correction = _f(
        "ppo", "Off-policy correction: ppo (clip pi/mu), decoupled (clip pi/pi_prox, weight pi_prox/mu), tis.")
    clip_eps: float = _f(0.2, "PPO ratio clip: ratios outside [1-eps, 1+eps] get no gradient in the clipped direction.")
    is_cap: float = _f(2.0, "Truncation of the behaviour importance weight (decoupled, tis).")
    kl_coef: float = _f(0.0, "Weight of the KL penalty to the frozen reference policy (the initial model); 0: off.")
    lr: float = _f(1e-5, "AdamW learning rate.")
    weight_decay: float = _f(0.0, "AdamW weight decay.")
    adam_beta1: float = _f(0.9, "AdamW beta1.")
    adam_beta2: float = _f(0.999, "AdamW beta2.")
    grad_clip: float = _f(1.0, "Clip the global gradient norm to this; 0: off.")
    lora_rank: int = _f(0, "LoRA rank; 0 trains all weights (full fine-tuning).")
    lora_alpha: float = _f(16.0, "LoRA alpha (scale alpha/rank).")
    lora_dropout: float = _f(0.0, "LoRA dropout.")
    lora_targets: str = _f("all-linear", "LoRA target modules: all-linear, or comma-separated module names.")
    start_version: int = _f(0, "Policy version of --model (what serving runs before the first checkpoint).")
    checkpoint_every: int = _f(10, "Steps between checkpoints (each one is a new policy version).")
    keep_checkpoints: int = _f(0, "Keep the newest N checkpoints on S3 and their registry versions; older ones "
                               "are deleted after each checkpoint unless a registry alias pins them (0: keep all).")
    checkpoint_uri: str = _f("", "Where checkpoints go (default: s3://$ROLLSTREAM_S3_BUCKET/<policy>).")
    max_steps: int = _f(0, "Stop after this many steps in total (0: run until stopped).")
    idle_exit_s: float = _f(0.0, "Stop when no transition arrived for this many seconds (0: wait forever).")
    retry_s: float = _f(300.0, "Retry S3 writes and MLflow calls this many seconds in all (backoff from 0.5 s to "
                        "30 s) before giving up on one; a checkpoint not written by then stops the trainer.")
    consumer_group: str = _f("", "Kafka consumer group (default: rollstream-trainer-<policy>).")
    dedup_window: int = _f(100_000, "Transition ids remembered (and checkpointed) to drop duplicates.")
    mlflow: bool = _f(True, "Log the run to MLflow and register each checkpoint in its Model Registry.")
    experiment: str = _f("rollstream-train", "MLflow experiment name.")
    alias: str = _f("current", "Registry alias moved to the newest version ('latest' is reserved by MLflow).")
    publish: bool = _f(True, "Publish a PolicyUpdate event after each checkpoint.")
    device: str = _f("auto", "auto (cuda when present), cpu, cuda, cuda:N.")
    threads: int = _f(0, "torch CPU threads (0: torch's default).")
    seed: int = _f(0, "Random seed.")
    log_every: int = _f(1, "Steps between progress lines and MLflow metric batches.")
    progress: bool = _f(True, "Show a progress bar when stderr is a terminal.")

    def validate(self) -> None:
        """Raise ConfigError naming the field and the fix for any invalid combination."""
        if not self.policy:
            raise ConfigError("--policy is required: the policy whose transitions to train on")
        if not self.model:
            raise ConfigError("--model is required: a Hugging Face model folder or an s3://bucket/prefix URI")
        if self.objective in ("grpo", "rloo") and self.group_size < 2:
            raise ConfigError(f"--objective {self.objective} compares rollouts within a group: set --group-size >= 2, "
                              "or use --objective reinforce for ungrouped transitions")
        if self.batch_by == "transitions" and self.batch_size < 1:
            raise ConfigError("--batch-size must be at least 1")
        if self.batch_by == "tokens" and self.batch_tokens < 1:
            raise ConfigError("--batch-tokens must be at least 1")
        if self.batch_by == "transitions" and self.objective in ("grpo", "rloo") and self.batch_size < self.group_size:
            raise ConfigError(f"--batch-size {self.batch_size} is smaller than --group-size {self.group_size}; "
                              "a step holds whole groups: raise --batch-size to a multiple of the group size")
        if self.micro_batch_size < 1:
            raise ConfigError("--micro-batch-size must be at least 1")
        if self.max_policy_lag < 0:
            raise ConfigError("--max-policy-lag must be >= 0 (0: on-policy samples only)")
        if not 0 < self.clip_eps < 1:
            raise ConfigError(f"--clip-eps {self.clip_eps} must be in (0, 1); 0.2 is the usual value")
        if self.is_cap < 1:
            raise ConfigError(f"--is-cap {self.is_cap} must be >= 1 (weights above it are truncated to it)")
        if self.kl_coef < 0:
            raise ConfigError("--kl-coef must be >= 0")
        if self.lr <= 0:
            raise ConfigError("--lr must be positive")
        if not 0 <= self.baseline_decay < 1:
            raise ConfigError("--baseline-decay must be in [0, 1)")
        if self.lora_rank < 0:
            raise ConfigError("--lora-rank must be >= 0 (0: full fine-tuning)")
        if self.keep_checkpoints < 0:
            raise ConfigError("--keep-checkpoints must be 0 (keep all) or more")
        if self.checkpoint_every < 1:
            raise ConfigError("--checkpoint-every must be at least 1")
        if self.checkpoint_uri and not self.checkpoint_uri.startswith("s3://"):
            raise ConfigError(f"--checkpoint-uri '{self.checkpoint_uri}' must be an s3://bucket/prefix URI")
        if self.alias.lower() == "latest":
            raise ConfigError("--alias latest is reserved by MLflow's Model Registry; use another name, e.g. current")
        if self.max_steps < 0 or self.idle_exit_s < 0 or self.group_timeout_s <= 0 or self.batch_timeout_s <= 0:
            raise ConfigError("--max-steps and --idle-exit-s must be >= 0; the timeouts must be positive")
        if self.retry_s < 0:
            raise ConfigError("--retry-s must be >= 0 (0: one attempt, no retries)")
        if self.dedup_window < 1:
            raise ConfigError("--dedup-window must be at least 1")

    def to_params(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="rollstream train",
        description="Consume transitions from Kafka and train the policy continuously; checkpoint to S3 and MLflow.",
    )
    hints = typing.get_type_hints(TrainConfig)
    for f in dataclasses.fields(TrainConfig):
        flag = "--" + f.name.replace("_", "-")
        hint = hints[f.name]
        var = f"{PREFIX}{TrainConfig.env_prefix}{f.name.upper()}"
        # default None: an option not given is taken from its variable, or the documented default (Settings.load)
        kwargs: dict[str, Any] = {"default": None, "dest": f.name,
                                  "help": f"{f.metadata['doc']} (default: {f.metadata['default']}; env {var})"}
        if hint is bool:
            kwargs["action"] = argparse.BooleanOptionalAction
        elif typing.get_origin(hint) is Literal:
            kwargs["choices"] = typing.get_args(hint)
        else:
            kwargs["type"] = hint
        parser.add_argument(flag, **kwargs)
    return parser


def parse_config(argv: Sequence[str] | None = None) -> TrainConfig:
    """A validated TrainConfig from command-line arguments."""
    args = build_parser().parse_args(argv)
    return TrainConfig.load(**vars(args))
