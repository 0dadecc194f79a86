"""The ``rollstream train`` entry point: help, and a configuration error that says how to fix it."""

from __future__ import annotations

import subprocess
import sys

CLI = [sys.executable, "-m", "rollstream.cli", "train"]


def test_help_lists_the_hyperparameters() -> None:
    out = subprocess.run(CLI + ["--help"], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0
    for flag in ("--objective", "--max-policy-lag", "--correction", "--lora-rank", "--checkpoint-every",
                 "--keep-checkpoints"):
        assert flag in out.stdout


def test_invalid_combination_exits_2_with_the_fix() -> None:
    out = subprocess.run(CLI + ["--policy", "p", "--model", "m", "--group-size", "8", "--batch-size", "4"],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 2
    assert "raise --batch-size to a multiple of the group size" in out.stderr


def test_negative_keep_checkpoints_is_refused() -> None:
    out = subprocess.run(CLI + ["--policy", "p", "--model", "m", "--keep-checkpoints", "-1"],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 2
    assert "--keep-checkpoints must be 0 (keep all) or more" in out.stderr
