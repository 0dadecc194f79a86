"""Loading a Hugging Face causal LM and its tokenizer, offline, from a folder or from S3."""

from __future__ import annotations

import logging
import os
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer
from transformers.utils import logging as hf_logging

from rollstream.devices import pick_device
from rollstream.errors import GrammarError, ServeError, StorageError
from rollstream.serving.engine import Engine
from rollstream.settings import ConnectionSettings
from rollstream.storage import ObjectStore

log = logging.getLogger(__name__)


def set_threads(threads: int = 0) -> int:
    """Torch CPU threads: ``threads``, or one per core available to this process but one, 1 to 8.

    One core is left to the HTTP event loop (and the tokenizer): torch's worker threads
    spin while they wait, and oversubscribed cores make every decode step several times slower.
    """
    if threads <= 0:
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
        threads = max(1, min(8, cores - 1))
    torch.set_num_threads(threads)
    return threads


def load_engine(source: str, version: int, device: torch.device | None = None,
                connection: ConnectionSettings | None = None) -> Engine:
    """An engine over the model at ``source`` (a local folder, or s3://bucket/prefix, downloaded first)."""
    started = time.monotonic()
    if source.startswith("s3://"):
        with tempfile.TemporaryDirectory(prefix="rollstream-serve-") as tmp:
            try:
                ObjectStore(connection).download_dir(source, Path(tmp))
            except StorageError as exc:
                raise ServeError(f"cannot download policy version {version} from {source}: {exc}") from exc
            engine = _load(Path(tmp), source, version, device)
    else:
        path = Path(source).expanduser()
        if not (path / "config.json").is_file():
            raise ServeError(f"'{source}' is not a Hugging Face model folder (no config.json there)")
        engine = _load(path, source, version, device)
    log.info("loaded policy version %d from %s in %.1fs", version, source, time.monotonic() - started)
    return engine


def _load(path: Path, source: str, version: int, device: torch.device | None) -> Engine:
    device = device or pick_device()
    hf_logging.disable_progress_bar()
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    try:
        tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
        # Weights may stay memory-mapped; on POSIX they remain readable once the temporary folder is gone.
        model: Any = AutoModelForCausalLM.from_pretrained(path, local_files_only=True, dtype=dtype)
        model.to(device)
    except (OSError, ValueError, KeyError) as exc:
        raise ServeError(f"cannot load a causal LM and tokenizer from {source}: {exc}") from exc
    engine = Engine(model, tokenizer, version)
    try:
        engine.grammars.prepare()
    except GrammarError as exc:  # requests that need a grammar get a 400 saying so
        log.warning("constrained decoding (tool_choice, response_format) is unavailable: %s", exc)
    return engine
