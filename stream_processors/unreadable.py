"""A record batch that Faust's consumer cannot decode is skipped and reported, never retried forever.

aiokafka decodes a fetched batch lazily, while Faust's consumer iterates its records. An
error there (a compression codec whose library is missing, a batch it cannot parse)
propagates out of the fetch and stops the worker; the batch stays at the head of its
partition, so the worker stops again at every restart. :func:`guard_batches` wraps the
batches aiokafka hands to its per-partition iterator (``aiokafka.consumer.fetcher.
PartitionRecords``, pinned by a test) so that a batch that fails to decode yields no
records; the iterator then moves past it, as it does for aborted or control batches, and
the batch is reported to a callback with its offsets and the reason. The worker counts it
and reads its offsets again through librdkafka (see ``Runtime.on_unreadable``).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

from aiokafka.consumer import fetcher

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Unreadable:
    """A batch of offsets [first_offset, next_offset) of one topic-partition that could not be decoded."""

    topic: str
    partition: int
    first_offset: int
    next_offset: int
    reason: str


Callback = Callable[[Unreadable], None]
_callbacks: list[Callback] = []
_original_init: Any = None


class _GuardedBatch:
    """A batch as aiokafka sees it, whose records are decoded at once, or not at all."""

    def __init__(self, batch: Any, tp: Any) -> None:
        self._batch = batch
        self._tp = tp

    def __getattr__(self, name: str) -> Any:
        return getattr(self._batch, name)

    def __next__(self) -> Any:  # control batches are read one record at a time
        return next(self._batch)

    def __iter__(self) -> Iterator[Any]:
        try:
            records = list(self._batch)
        except Exception as exc:
            first, nxt = int(self._batch.base_offset), int(self._batch.next_offset)
            found = Unreadable(self._tp.topic, self._tp.partition, first, nxt, f"{type(exc).__name__}: {exc}")
            log.error("%s[%d]: skipping offsets %d..%d, a record batch the consumer cannot decode (%s)",
                      found.topic, found.partition, first, nxt - 1, found.reason)
            for callback in list(_callbacks):
                callback(found)
            return iter(())
        return iter(records)


class _GuardedRecords:
    """The fetched records of one partition, handing out guarded batches."""

    def __init__(self, records: Any, tp: Any) -> None:
        self._records = records
        self._tp = tp

    def __getattr__(self, name: str) -> Any:
        return getattr(self._records, name)

    def has_next(self) -> bool:
        return bool(self._records.has_next())

    def next_batch(self) -> Any:
        batch = self._records.next_batch()
        return None if batch is None else _GuardedBatch(batch, self._tp)


def guard_batches(callback: Callback) -> None:
    """Skip undecodable batches in every aiokafka consumer of this process, reporting each to ``callback``.

    The callback may run on the consumer's own thread: it must only hand the report over."""
    global _original_init
    if _original_init is None:
        _original_init = fetcher.PartitionRecords.__init__

        def __init__(self: Any, tp: Any, records: Any, *args: Any, **kwargs: Any) -> None:
            _original_init(self, tp, _GuardedRecords(records, tp), *args, **kwargs)

        fetcher.PartitionRecords.__init__ = __init__  # type: ignore[method-assign]
    _callbacks.append(callback)
