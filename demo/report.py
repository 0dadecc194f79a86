"""The demo's curves: trainer reward by step and held-out accuracy over time, drawn to a PNG."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path


@dataclass
class Curves:
    """Held-out accuracy (seconds since training started, accuracy, policy version) and reward by step."""

    accuracy: list[tuple[float, float, int]] = field(default_factory=list)
    rewards: list[tuple[int, float]] = field(default_factory=list)


def plot(curves: Curves, path: Path, title: str) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    if curves.rewards:
        steps, rewards = zip(*curves.rewards, strict=True)
        left.plot(steps, rewards, ".", alpha=0.4, label="batch reward")
        k = 5
        smooth = [sum(rewards[max(0, i - k + 1):i + 1]) / len(rewards[max(0, i - k + 1):i + 1])
                  for i in range(len(rewards))]
        left.plot(steps, smooth, "-", label=f"mean of {k}")
        left.legend()
    left.set(xlabel="trainer step", ylabel="reward (training rollouts)", ylim=(-0.05, 1.05), title="reward")
    if curves.accuracy:
        times, accs, versions = zip(*curves.accuracy, strict=True)
        right.plot([t / 60 for t in times], accs, "o-")
        for t, a, v in curves.accuracy:
            right.annotate(f"v{v}", (t / 60, a), textcoords="offset points", xytext=(0, 6), fontsize=7)
    right.set(xlabel="minutes of training", ylabel="held-out accuracy (greedy)", ylim=(-0.05, 1.05),
              title="held-out accuracy")
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
