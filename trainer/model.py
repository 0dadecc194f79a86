"""Loading the policy (full weights or a LoRA adapter over a base model), offline, and saving it.

Any Hugging Face causal LM that loads from a folder works; an ``s3://`` model is downloaded first.
Weights stay float32 for the optimizer; on CUDA the forward pass runs under bf16 autocast.
The S3 client is imported only for an ``s3://`` model, so loading a local folder needs no storage client.
"""

from __future__ import annotations

import logging
import shutil
from pathlib import Path
from typing import Any

import torch
from transformers import AutoModelForCausalLM
from transformers.utils import logging as hf_logging

from rollstream.errors import StorageError, TrainerError
from rollstream.settings import ConnectionSettings
from rollstream.trainer.config import TrainConfig

log = logging.getLogger(__name__)

TOKENIZER_PREFIXES = ("tokenizer", "special_tokens", "vocab", "merges", "chat_template", "added_tokens")


def local_model_dir(source: str, connection: ConnectionSettings, workdir: Path) -> Path:
    """``source`` as a local folder (an s3:// model is downloaded under ``workdir``)."""
    if source.startswith("s3://"):
        from rollstream.storage import ObjectStore

        dest = workdir / "base-model"
        try:
            ObjectStore(connection).download_dir(source, dest)
        except StorageError as exc:
            raise TrainerError(f"cannot download the model {source}: {exc}") from exc
        return dest
    path = Path(source).expanduser()
    if not (path / "config.json").is_file():
        raise TrainerError(f"'{source}' is not a Hugging Face model folder (no config.json); pass --model a folder "
                           "saved with save_pretrained, or an s3://bucket/prefix holding one")
    return path


def _from_pretrained(path: Path) -> Any:
    hf_logging.disable_progress_bar()
    try:
        return AutoModelForCausalLM.from_pretrained(path, local_files_only=True, dtype=torch.float32)
    except (OSError, ValueError, KeyError) as exc:
        raise TrainerError(f"cannot load a causal LM from {path}: {exc}") from exc


def load_policy(config: TrainConfig, base_dir: Path, checkpoint_dir: Path | None, device: torch.device) -> Any:
    """The trainable policy: full weights (from the checkpoint if any), or LoRA over the base model."""
    if config.lora_rank == 0:
        model = _from_pretrained(checkpoint_dir or base_dir)
    else:
        from peft import LoraConfig, PeftModel, get_peft_model

        base = _from_pretrained(base_dir)
        if checkpoint_dir is not None:
            model = PeftModel.from_pretrained(base, str(checkpoint_dir), is_trainable=True)
        else:
            targets: Any = config.lora_targets if config.lora_targets == "all-linear" else [
                t.strip() for t in config.lora_targets.split(",") if t.strip()]
            lora = LoraConfig(r=config.lora_rank, lora_alpha=config.lora_alpha, lora_dropout=config.lora_dropout,
                              target_modules=targets, task_type="CAUSAL_LM")
            model = get_peft_model(base, lora)
    model.to(device)
    model.train()
    return model


def load_reference(config: TrainConfig, base_dir: Path, device: torch.device) -> Any | None:
    """A frozen copy of the initial model for the KL penalty (None under LoRA: the adapter is switched off)."""
    if config.kl_coef == 0 or config.lora_rank > 0:
        return None
    ref = _from_pretrained(base_dir)
    ref.to(device)
    ref.eval()
    for p in ref.parameters():
        p.requires_grad_(False)
    return ref


def save_weights(model: Any, out_dir: Path, base_dir: Path) -> list[str]:
    """save_pretrained (safetensors; the adapter only under LoRA) plus the base model's tokenizer files."""
    out_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out_dir, safe_serialization=True)
    for path in base_dir.iterdir():
        if path.is_file() and path.name.startswith(TOKENIZER_PREFIXES):
            shutil.copy2(path, out_dir / path.name)
    return sorted(p.name for p in out_dir.iterdir())
