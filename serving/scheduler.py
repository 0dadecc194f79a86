"""Batching requests: an asyncio front and one worker thread that runs every torch call.

Requests wait in a queue; when the worker is idle it collects them for a short window
(``batch_window_ms``) and prefills them as one batch. While a batch decodes, newly
arrived requests join it between steps (continuous batching) up to ``max_batch`` rows.
A new model (hot reload) is swapped in only between batches: once a swap is pending,
no request joins the running batch, the batch finishes on the old model, and every
request reports the policy version of the model that generated it.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections import deque
from collections.abc import AsyncGenerator
from dataclasses import dataclass, field
from typing import TypeAlias

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from rollstream.serving.engine import Batch, Delta, Engine, SamplingParams, Sequence

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Admitted:
    """First event of every request: the policy version that will generate it."""

    version: int


@dataclass(frozen=True)
class Failed:
    """The engine raised while generating this request."""

    message: str


Event: TypeAlias = Admitted | Delta | Failed


def _deliver(items: list[tuple[Pending, Event]]) -> None:
    for pending, event in items:
        pending.events.put_nowait(event)


@dataclass
class Pending:
    """A request waiting for (or in) a batch: ``n`` rows of one prompt."""

    prompt_ids: list[int]
    params: list[SamplingParams]
    loop: asyncio.AbstractEventLoop
    events: asyncio.Queue[Event] = field(default_factory=asyncio.Queue)
    seqs: list[Sequence] = field(default_factory=list)
    outbox: list[tuple[Pending, Event]] = field(default_factory=list)  # the worker's; delivered once per step

    def post(self, event: Event) -> None:
        """Queue an event for delivery (worker thread only)."""
        self.outbox.append((self, event))

    def cancel(self) -> None:
        for seq in self.seqs:
            seq.cancelled = True


class Stats:
    """What the scheduler did, as Prometheus metrics (one registry per server) and plain figures."""

    def __init__(self, policy: str) -> None:
        self.registry = CollectorRegistry()
        self.batch_size = Histogram("rollstream_serve_batch_size", "Rows in each decode step.",
                                    buckets=(1, 2, 4, 8, 16, 32, 64, 128), registry=self.registry)
        self.requests = Counter("rollstream_serve_requests", "Requests admitted to a batch.", registry=self.registry)
        self.tokens = Counter("rollstream_serve_generated_tokens", "Tokens generated.", registry=self.registry)
        self.reloads = Counter("rollstream_serve_reloads", "Policy versions swapped in.", registry=self.registry)
        self.version = Gauge("rollstream_serve_policy_version", "Policy version being served.", ["policy"],
                             registry=self.registry)
        self.policy = policy
        self.max_batch_size = 0
        self.steps = 0
        self.merges = 0
        self.admitted = 0
        self.generated = 0
        self.swaps = 0

    def observe_step(self, rows: int) -> None:
        self.batch_size.observe(rows)
        self.tokens.inc(rows)
        self.generated += rows
        self.steps += 1
        self.max_batch_size = max(self.max_batch_size, rows)


class Scheduler:
    """Owns the engine; ``submit`` from the event loop, everything torch on one thread."""

    def __init__(self, engine: Engine, window_ms: float = 5.0, max_batch: int = 32, policy: str = "policy") -> None:
        self.engine = engine
        self.window = window_ms / 1000.0
        self.max_batch = max_batch
        self.stats = Stats(policy)
        self.stats.version.labels(policy).set(engine.version)
        self._queue: deque[Pending] = deque()
        self._outbox: list[tuple[Pending, Event]] = []
        self._swap: Engine | None = None
        self._cond = threading.Condition()
        self._stopped = False
        self._thread = threading.Thread(target=self._run, name="rollstream-serve-engine", daemon=True)

    @property
    def version(self) -> int:
        return self.engine.version

    @property
    def target_version(self) -> int:
        """The newest version loaded, including one waiting to be swapped in."""
        with self._cond:
            return self._swap.version if self._swap is not None else self.engine.version

    def start(self) -> None:
        self._thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        with self._cond:
            self._stopped = True
            self._cond.notify_all()
        if self._thread.is_alive():
            self._thread.join(timeout)

    def swap(self, engine: Engine) -> None:
        """Serve ``engine`` from the next batch on (thread-safe; called by the reloader)."""
        with self._cond:
            self._swap = engine
            self._cond.notify_all()
        log.info("policy version %d loaded; swapping it in once the running batch ends", engine.version)

    async def submit(self, prompt_ids: list[int], params: list[SamplingParams]) -> AsyncGenerator[Event, None]:
        """Queue one request (a row per element of ``params``) and iterate over its events.

        The first event is ``Admitted``; then each row's deltas until every row has finished.
        Leaving the iteration early cancels the rows.
        """
        pending = Pending(prompt_ids, params, asyncio.get_running_loop(), outbox=self._outbox)
        with self._cond:
            self._queue.append(pending)
            self._cond.notify_all()
        open_rows = len(params)
        try:
            while open_rows:
                event = await pending.events.get()
                if isinstance(event, Delta) and event.finish_reason is not None:
                    open_rows -= 1
                yield event
                if isinstance(event, Failed):
                    return
        finally:
            if open_rows:
                pending.cancel()
                with self._cond:
                    if pending in self._queue:
                        self._queue.remove(pending)

    # --- the worker thread ---------------------------------------------------------------

    def _take(self, room: int, first: bool) -> list[Pending]:
        """Requests to admit now (a first request is taken even if its rows exceed ``room``)."""
        taken: list[Pending] = []
        while self._queue and (len(self._queue[0].params) <= room or (first and not taken)):
            pending = self._queue.popleft()
            room -= len(pending.params)
            taken.append(pending)
        return taken

    def _admit(self, taken: list[Pending]) -> list[Sequence]:
        seqs = []
        for pending in taken:
            pending.seqs = [self.engine.new_sequence(pending.prompt_ids, params, i, pending.post)
                            for i, params in enumerate(pending.params)]
            pending.post(Admitted(self.engine.version))
            seqs += pending.seqs
        self.stats.requests.inc(len(taken))
        self.stats.admitted += len(taken)
        return seqs

    def _flush(self) -> None:
        """Hand this step's events to the event loops, in one wake-up per loop (not one per token)."""
        if not self._outbox:
            return
        by_loop: dict[asyncio.AbstractEventLoop, list[tuple[Pending, Event]]] = {}
        for item in self._outbox:
            by_loop.setdefault(item[0].loop, []).append(item)
        self._outbox.clear()
        for loop, items in by_loop.items():
            try:
                loop.call_soon_threadsafe(_deliver, items)
            except RuntimeError:  # that loop has closed; nobody is listening
                log.debug("dropping %d events for a closed event loop", len(items))

    def _swap_in(self) -> None:
        """Serve the pending engine, if any (only while no batch runs; the lock is held)."""
        if self._swap is None:
            return
        self.engine, self._swap = self._swap, None
        self.stats.reloads.inc()
        self.stats.swaps += 1
        self.stats.version.labels(self.stats.policy).set(self.engine.version)
        log.info("now serving policy version %d", self.engine.version)

    def _run(self) -> None:
        batch: Batch | None = None
        active: list[Pending] = []  # admitted requests with rows still decoding
        while True:
            try:
                with self._cond:
                    if batch is None:
                        self._swap_in()
                        while not self._queue and not self._stopped:
                            self._cond.wait(0.5)
                            self._swap_in()
                    if self._stopped:
                        return
                if batch is None:
                    time.sleep(self.window)  # let concurrent requests arrive and share the batch
                    with self._cond:
                        taken = self._take(self.max_batch, first=True)
                    active = taken
                    batch = self.engine.prefill(self._admit(taken))
                    self.stats.observe_step(len(batch))
                else:
                    joined: list[Pending] = []
                    if self.engine.can_merge and len(batch) < self.max_batch:
                        with self._cond:
                            if self._swap is None:
                                joined = self._take(self.max_batch - len(batch), first=False)
                    if joined:
                        active = [p for p in active if not all(s.finished for s in p.seqs)] + joined
                        newcomers = self.engine.prefill(self._admit(joined))
                        self.stats.observe_step(len(newcomers))
                        batch = self.engine.merge(batch, newcomers)
                        self.stats.merges += 1
                    self.engine.step(batch)
                    self.stats.observe_step(len(batch))
                batch = self.engine.drop_finished(batch)
                self._flush()
            except Exception as exc:  # a failing batch must not take the server down
                log.exception("generation failed")
                for pending in active:
                    if not pending.seqs or not all(s.finished for s in pending.seqs):
                        pending.cancel()
                        pending.post(Failed(f"generation failed: {exc}"))
                self._flush()
                batch, active = None, []
