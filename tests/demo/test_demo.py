"""The closed loop end to end: ``rollstream demo --quick`` on the real stack makes the served policy better.

Runs the demo as a subprocess (policy server, gateway, stream processor, trainer and agents on a
fresh topic prefix) and checks from its ``summary.json`` that the trainer published new policy
versions, that the policy server hot-reloaded them, and that held-out accuracy (greedy, asked of
the server directly) rose by at least MARGIN over its value before training.

The margin is checked on the best version served during the run: on this tiny model GRPO
sometimes peaks and then collapses later in a run, and the demo stops at its target, so the
version at the end is not always the best one.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from rollstream.stack import Stack

pytestmark = [pytest.mark.integration, pytest.mark.slow]

MARGIN = 0.25  # held-out accuracy of a served version must rise by at least 25 points


def test_quick_demo_improves_the_served_policy(stack: Stack, tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    cmd = [sys.executable, "-m", "rollstream.cli", "demo", "--quick", "--run-dir", str(run_dir),
           "--target", "0.8"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    summary = json.loads((run_dir / "summary.json").read_text())
    print(json.dumps({k: v for k, v in summary.items() if k != "accuracy_curve"}, indent=1))
    assert summary["trainer_steps"] > 0
    assert summary["version_after"] > summary["version_before"] == 0, summary
    assert summary["reloads"] >= 1 and summary["served_version"] == summary["version_after"], summary
    assert summary["best_accuracy"] >= summary["accuracy_before"] + MARGIN, summary
    assert Path(summary["png"]).is_file()
    for log in ("serve", "gateway", "processor", "trainer"):
        assert (run_dir / f"{log}.log").is_file()
