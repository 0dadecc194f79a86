"""The processor's counters: a Prometheus text page, a JSON snapshot and a periodic log line."""

from __future__ import annotations

import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

COUNTERS = (
    "events", "completed", "expired_dropped", "expired_filled", "late", "duplicates", "dead_letters",
    "transitions", "ignored_rewards", "gaps_repaired", "gap_records",
    "unreadable_batches", "unreadable_records", "tokenized_calls",
)


@dataclass
class Metrics:
    """Counters since start, plus gauges over the open rollouts this worker holds."""

    counts: Counter[str] = field(default_factory=Counter)
    dead_letter_types: Counter[str] = field(default_factory=Counter)
    open_first_seen: dict[str, float] = field(default_factory=dict)  # rollout id -> first seen (open only)

    def inc(self, name: str, n: int = 1) -> None:
        self.counts[name] += n

    def dead_letter(self, error_type: str) -> None:
        self.counts["dead_letters"] += 1
        self.dead_letter_types[error_type] += 1

    def open_rollouts(self) -> int:
        return len(self.open_first_seen)

    def oldest_open_age(self, now: float | None = None) -> float:
        if not self.open_first_seen:
            return 0.0
        return max(0.0, (now or time.time()) - min(self.open_first_seen.values()))

    def snapshot(self) -> dict[str, Any]:
        out: dict[str, Any] = {name: self.counts[name] for name in COUNTERS}
        out["dead_letters_by_type"] = dict(self.dead_letter_types)
        out["open_rollouts"] = self.open_rollouts()
        out["oldest_open_age_seconds"] = round(self.oldest_open_age(), 3)
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
