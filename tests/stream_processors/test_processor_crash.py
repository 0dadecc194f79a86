"""Exactly once under crashes: kill -9 the worker while rollouts stream through; two workers equal one.

``ROLLSTREAM_TEST_CRASH_ROLLOUTS`` sets how many rollouts stream through the crash test
(default 5,000).
"""

from __future__ import annotations

import os
import random
import threading
import time
from collections import Counter
from collections.abc import Callable
from typing import Any

import pytest
from sp_helpers import Pipe, call, lifecycle, reward

from rollstream.stream_processors.processor import transition_id

pytestmark = [pytest.mark.integration, pytest.mark.slow]

GAMMA = 0.9
ENV = {"ROLLSTREAM_PROCESS_CREDIT": f"*=discounted:{GAMMA}", "ROLLSTREAM_PROCESS_LOG_INTERVAL": "5"}


def terminal_of(i: int) -> float:
    return (i % 7) / 7


def expected(n: int, prefix: str) -> dict[str, tuple[Any, ...]]:
    """transition id -> (rollout, call, reward, credited_return, terminal), computed independently."""
    out = {}
    for i in range(n):
        rid, v = f"{prefix}{i}", terminal_of(i)
        out[transition_id(rid, 1, "c0")] = (rid, "c0", 0.5, 0.5 + GAMMA * v, v)
        out[transition_id(rid, 1, "c1")] = (rid, "c1", v, v, v)
    return out


def stream(pipe: Pipe, n: int, prefix: str, rate: float) -> None:
    """Publish n rollouts (start, 2 calls, an intermediate and a terminal reward, finish) at ~rate/s."""
    t0 = time.monotonic()
    for i in range(n):
        rid = f"{prefix}{i}"
        pipe.rollout(lifecycle(rid, "STARTED"))
        pipe.call(call(rid, 0))
        pipe.reward(reward(rid, 0.5, terminal=False, call_id="c0"))
        pipe.call(call(rid, 1))
        pipe.rollout(lifecycle(rid, "SUCCEEDED"))
        pipe.reward(reward(rid, terminal_of(i)))
        if i % 100 == 99:
            pipe.producer.poll(0)
            ahead = (i + 1) / rate - (time.monotonic() - t0)
            if ahead > 0:
                time.sleep(ahead)
    pipe.flush()


def check(pipe: Pipe, n: int, prefix: str, timeout: float) -> None:
    want = expected(n, prefix)
    got = pipe.transitions(len(want), timeout=timeout, settle=5.0)
    counts = Counter(t["transition_id"] for t in got)
    duplicated = {k: c for k, c in counts.items() if c > 1}
    missing = set(want) - set(counts)
    assert not duplicated, f"{len(duplicated)} transition ids duplicated, e.g. {list(duplicated.items())[:3]}"
    assert not missing, f"{len(missing)} of {len(want)} transitions missing, e.g. {sorted(missing)[:3]}"
    assert set(counts) == set(want)
    for t in got:
        rid, cid, r, ret, v = want[t["transition_id"]]
        assert (t["rollout_id"], t["call_id"]) == (rid, cid)
        assert t["reward"] == pytest.approx(r) and t["credited_return"] == pytest.approx(ret)
        assert t["terminal_reward"] == pytest.approx(v)


def test_kill_dash_nine_three_times_loses_and_duplicates_nothing(
    pipe: Pipe, worker_factory: Callable[..., Any]
) -> None:
    """Killed at a random moment after it has its partitions, three times; restarted in place (its state folder
    kept: the local store is caught up from the changelog) except once, on a fresh folder (restored in full)."""
    n = int(os.environ.get("ROLLSTREAM_TEST_CRASH_ROLLOUTS", "5000"))
    rate = 150.0  # the stream outlasts the three kills
    worker = worker_factory(ENV, index=0)
    producer = threading.Thread(target=stream, args=(pipe, n, "ro-", rate), daemon=True)
    producer.start()
    rng = random.Random()
    for index in (0, 1, 1):
        worker.wait_stats(lambda s: s["ready"], timeout=120)  # killed while it works, not while it starts
        time.sleep(rng.uniform(0.2, 3.0))
        worker.kill()
        worker = worker_factory(ENV, index=index)
    producer.join()
    check(pipe, n, "ro-", timeout=120 + n / 20)
    worker.wait_stats(lambda s: s["open_rollouts"] == 0, timeout=60)


def test_eight_kills_three_to_five_seconds_apart(pipe: Pipe, worker_factory: Callable[..., Any]) -> None:
    """kill -9 every 3-5 s whatever the worker is doing (starting, restoring, mid-transaction), eight times."""
    n = int(os.environ.get("ROLLSTREAM_TEST_CRASH_ROLLOUTS", "5000"))
    worker = worker_factory(ENV, index=0)
    producer = threading.Thread(target=stream, args=(pipe, n, "k8-", 150.0), daemon=True)
    producer.start()
    rng = random.Random()
    for kill in range(8):
        time.sleep(rng.uniform(3.0, 5.0))
        worker.kill()
        worker = worker_factory(ENV, index=kill % 3)  # mostly in place, sometimes on another folder
    producer.join()
    check(pipe, n, "k8-", timeout=120 + n / 20)
    worker.wait_stats(lambda s: s["open_rollouts"] == 0, timeout=60)


def test_two_workers_make_the_same_transitions_as_one(pipe: Pipe, worker_factory: Callable[..., Any]) -> None:
    n = 600
    worker_factory(ENV)
    worker_factory(ENV)
    stream(pipe, n, "two-", rate=300.0)
    check(pipe, n, "two-", timeout=120)
