"""Choosing the torch device for the policy server and the trainer."""

from __future__ import annotations

import torch

from rollstream.errors import ConfigError


def pick_device(name: str = "auto") -> torch.device:
    """``auto`` is CUDA when present, else CPU; otherwise the named device (cpu, cuda, cuda:N)."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        return torch.device(name)
    except RuntimeError as exc:
        raise ConfigError(f"unknown device {name!r}; use auto, cpu, cuda or cuda:N") from exc
