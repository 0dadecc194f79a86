"""The curves page's charts, drawn server-side by matplotlib as SVG."""

from __future__ import annotations

import io
import threading
from collections.abc import Sequence

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from rollstream.ui.index import VersionStats  # noqa: E402

_LOCK = threading.Lock()  # pyplot's state is global
BLUE, ORANGE, GREY = "#2563eb", "#ea580c", "#94a3b8"


def _svg(fig: plt.Figure) -> str:
    buf = io.StringIO()
    fig.savefig(buf, format="svg", bbox_inches="tight")
    plt.close(fig)
    text = buf.getvalue()
    return text[text.index("<svg"):]  # drop the XML prolog and doctype: the SVG goes inline into the page


def _axes(title: str, xlabel: str, ylabel: str) -> tuple[plt.Figure, plt.Axes]:
    fig, ax = plt.subplots(figsize=(6.4, 3.2))
    ax.set_title(title, fontsize=11, loc="left")
    ax.set_xlabel(xlabel, fontsize=9)
    ax.set_ylabel(ylabel, fontsize=9)
    ax.tick_params(labelsize=8)
    ax.grid(True, alpha=0.3)
    for side in ("top", "right"):
        ax.spines[side].set_visible(False)
    return fig, ax


def reward_by_version(stats: Sequence[VersionStats], name: str) -> str | None:
    points = [(s.version, s.mean, s.rewarded) for s in stats if s.mean is not None]
    if not points:
        return None
    with _LOCK:
        fig, ax = _axes(f"mean {name} reward per policy version (from the events)", "policy version", "mean reward")
        versions, means, counts = zip(*points, strict=True)
        ax.plot(versions, means, "o-", color=BLUE)
        for v, m, n in points if len(points) <= 12 else ():
            ax.annotate(f"n={n}", (v, m), textcoords="offset points", xytext=(0, 7), fontsize=7, ha="center",
                        color="#475569")
        if len(versions) <= 25:
            ax.set_xticks(list(versions))
        return _svg(fig)


def series(title: str, xlabel: str, ylabel: str, points: Sequence[tuple[float, float]],
           labels: Sequence[str] = ()) -> str | None:
    if not points:
        return None
    with _LOCK:
        fig, ax = _axes(title, xlabel, ylabel)
        xs, ys = zip(*points, strict=True)
        ax.plot(xs, ys, ".-" if len(points) < 60 else "-", color=ORANGE)
        for (x, y), label in zip(points, labels, strict=False):
            ax.annotate(label, (x, y), textcoords="offset points", xytext=(0, 6), fontsize=7, ha="center")
        return _svg(fig)


def delay_histogram(delays: Sequence[float]) -> str | None:
    if not delays:
        return None
    with _LOCK:
        fig, ax = _axes("reward arrival delay (reward time - rollout end)", "seconds", "rewards")
        ax.hist(list(delays), bins=40, color=GREY, edgecolor="white", log=True)
        return _svg(fig)
