"""The processor's counters: a Prometheus text page, a JSON snapshot and a periodic log line."""

from __future__ import annotations

import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

COUNTERS = (
    "events", "completed", "expired_dropped", "expired_filled", "late", "duplicates", "dead_letters",
    "transitions", "ignored_rewards", "tokenized_calls", "assignments",
)


@dataclass
class Metrics:
    """Counters since start, plus gauges over the open rollouts this worker holds."""

    counts: Counter[str] = field(default_factory=Counter)
    dead_letter_types: Counter[str] = field(default_factory=Counter)
    open_count: int = 0  # open rollouts in this worker's partitions, as of the last timer tick
    oldest_open: float | None = None  # when the oldest of them was first seen
    ready: bool = False  # the first assignment is restored: records are being processed
    restore_seconds: float = 0.0  # how long the last assignment took to restore the local state

    def inc(self, name: str, n: int = 1) -> None:
        self.counts[name] += n

    def dead_letter(self, error_type: str) -> None:
        self.counts["dead_letters"] += 1
        self.dead_letter_types[error_type] += 1

    def set_open(self, count: int, oldest: float | None) -> None:
        self.open_count, self.oldest_open = count, oldest

    def open_rollouts(self) -> int:
        return self.open_count

    def oldest_open_age(self, now: float | None = None) -> float:
        if self.oldest_open is None:
            return 0.0
        return max(0.0, (now or time.time()) - self.oldest_open)

    def snapshot(self) -> dict[str, Any]:
        out: dict[str, Any] = {name: self.counts[name] for name in COUNTERS}
        out["dead_letters_by_type"] = dict(self.dead_letter_types)
        out["open_rollouts"] = self.open_rollouts()
        out["oldest_open_age_seconds"] = round(self.oldest_open_age(), 3)
        out["ready"] = self.ready
        out["restore_seconds"] = round(self.restore_seconds, 3)
        return out

    def prometheus(self) -> str:
        lines = []
        for name in COUNTERS:
            metric = f"rollstream_processor_{name}_total"
            lines += [f"# TYPE {metric} counter", f"{metric} {self.counts[name]}"]
        lines.append("# TYPE rollstream_processor_dead_letters_by_type_total counter")
        for error_type, n in sorted(self.dead_letter_types.items()):
            lines.append(f'rollstream_processor_dead_letters_by_type_total{{error_type="{error_type}"}} {n}')
        lines += [
            "# TYPE rollstream_processor_open_rollouts gauge",
            f"rollstream_processor_open_rollouts {self.open_rollouts()}",
            "# TYPE rollstream_processor_oldest_open_age_seconds gauge",
            f"rollstream_processor_oldest_open_age_seconds {self.oldest_open_age():.3f}",
        ]
        return "\n".join(lines) + "\n"

    def log_line(self) -> str:
        snap = self.snapshot()
        return " ".join(f"{k}={v}" for k, v in snap.items() if k != "dead_letters_by_type")
