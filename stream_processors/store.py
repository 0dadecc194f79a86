"""The processor's local state of one partition: a SQLite file that holds only committed writes.

Every rollout state and state piece lives under its table key (the same keys as in the
changelog topic) with three index columns the worker asks about: when the timer must look
at the rollout (``deadline``), the stream time a complete rollout waits for (``pending``)
and since when it is open (``open_since``).

Writes of a batch are *staged* (reads see them at once) and reach the file only through
:meth:`PartitionStore.apply`, called after the Kafka transaction that carried the same
writes to the changelog has committed, in one SQLite transaction together with the
changelog offset they reach. So the file never holds a write of an aborted transaction,
and a restart only reads the changelog from that offset on (records committed after the
last apply: a crash between the two), never the whole changelog.
"""

from __future__ import annotations

import logging
import sqlite3
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger(__name__)

RECENT_MAX = 8192  # applied values kept in memory for the next read of their key
RECENT_VALUE_MAX = 64 * 1024  # larger ones (a long rollout's token pieces) are read from the file


@dataclass
class Row:
    value: bytes | None  # None: delete
    deadline: float | None = None
    pending: float | None = None
    open_since: float | None = None


class PartitionStore:
    """Committed state of one input partition, plus the writes staged by the batch in progress."""

    def __init__(self, path: Path, partition: int) -> None:
        self.path = path
        self.partition = partition
        self.db = self._open(path)
        self.staged: dict[bytes, Row] = {}
        self.index_only: dict[bytes, tuple[float | None, float | None]] = {}
        # The values of the latest applied writes, as the very objects staged: a rollout's next event reads
        # its state without a query (and the processor finds the state it parsed from them, processor._load).
        self.recent: dict[bytes, bytes] = {}

    @staticmethod
    def _open(path: Path) -> sqlite3.Connection:
        path.parent.mkdir(parents=True, exist_ok=True)
        try:
            return PartitionStore._connect(path)
        except sqlite3.DatabaseError as exc:  # a torn file (power loss): the changelog has it all
            log.warning("local state %s is unreadable (%s); rebuilding it from the changelog", path, exc)
            path.unlink(missing_ok=True)
            return PartitionStore._connect(path)

    @staticmethod
    def _connect(path: Path) -> sqlite3.Connection:
        db = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
        # The changelog is the durable copy: the file only needs to survive the process (kill -9), not power loss.
        db.execute("PRAGMA journal_mode=WAL")
        db.execute("PRAGMA synchronous=OFF")
        db.execute("CREATE TABLE IF NOT EXISTS state (key BLOB PRIMARY KEY, value BLOB NOT NULL, "
                   "deadline REAL, pending REAL, open_since REAL)")
        db.execute("CREATE INDEX IF NOT EXISTS by_deadline ON state (deadline) WHERE deadline IS NOT NULL")
        db.execute("CREATE INDEX IF NOT EXISTS by_pending ON state (pending) WHERE pending IS NOT NULL")
        db.execute("CREATE TABLE IF NOT EXISTS meta (name TEXT PRIMARY KEY, value INTEGER NOT NULL)")
        db.execute("SELECT count(*) FROM meta").fetchone()  # fails here on a corrupt file
        return db

    # --- reads (staged writes first) -----------------------------------------------------

    def get(self, key: bytes) -> bytes | None:
        row = self.staged.get(key)
        if row is not None:
            return row.value
        value = self.recent.get(key)
        if value is not None:
            return value
        got = self.db.execute("SELECT value FROM state WHERE key = ?", (key,)).fetchone()
        return got[0] if got else None

    def changelog_offset(self) -> int:
        """The changelog offset the file is complete up to (0: nothing applied yet)."""
        got = self.db.execute("SELECT value FROM meta WHERE name = 'changelog_offset'").fetchone()
        return int(got[0]) if got else 0

    def due(self, now: float, limit: int = 1000) -> list[bytes]:
        """Rollouts whose timer deadline has passed (committed state; the caller checks staged ones itself)."""
        rows = self.db.execute("SELECT key FROM state WHERE deadline <= ? ORDER BY deadline LIMIT ?", (now, limit))
        return [r[0] for r in rows]

    def pending(self) -> Iterator[tuple[bytes, float]]:
        """Complete rollouts waiting for the other input topics, with the stream time they wait for."""
        yield from self.db.execute("SELECT key, pending FROM state WHERE pending IS NOT NULL")

    def open_rollouts(self) -> tuple[int, float | None]:
        """How many rollouts are open here, and since when the oldest is."""
        count, oldest = self.db.execute("SELECT count(open_since), min(open_since) FROM state").fetchone()
        return int(count), oldest

    # --- writes ----------------------------------------------------------------------------

    def stage(self, key: bytes, row: Row) -> None:
        self.staged[key] = row
        self.index_only.pop(key, None)

    def stage_index(self, key: bytes, deadline: float | None, pending: float | None) -> None:
        """A new deadline / pending mark for a rollout whose value stays as it is."""
        row = self.staged.get(key)
        if row is not None:
            row.deadline, row.pending = deadline, pending
        else:
            self.index_only[key] = (deadline, pending)

    def changed(self) -> dict[bytes, bytes | None]:
        """The staged values, one per key, for the changelog (deletes of keys never stored are left out)."""
        out: dict[bytes, bytes | None] = {}
        for key, row in self.staged.items():
            if row.value is None and not self._stored(key):
                continue  # added and removed within the batch: nothing to tell the changelog
            out[key] = row.value
        return out

    def _stored(self, key: bytes) -> bool:
        return key in self.recent or self.db.execute("SELECT 1 FROM state WHERE key = ?", (key,)).fetchone() is not None

    def apply(self, changelog_offset: int | None) -> None:
        """Write the staged batch to the file, with the changelog offset it reaches, in one transaction."""
        db = self.db
        db.execute("BEGIN")
        try:
            deletes = [(k,) for k, r in self.staged.items() if r.value is None]
            puts = [(k, r.value, r.deadline, r.pending, r.open_since) for k, r in self.staged.items()
                    if r.value is not None]
            db.executemany("DELETE FROM state WHERE key = ?", deletes)
            db.executemany("INSERT OR REPLACE INTO state VALUES (?, ?, ?, ?, ?)", puts)
            db.executemany("UPDATE state SET deadline = ?, pending = ? WHERE key = ?",
                           [(d, p, k) for k, (d, p) in self.index_only.items()])
            if changelog_offset is not None:
                db.execute("INSERT OR REPLACE INTO meta VALUES ('changelog_offset', ?)", (changelog_offset,))
            db.execute("COMMIT")
        except BaseException:
            db.execute("ROLLBACK")
            self.recent.clear()
            raise
        recent = self.recent
        for key, row in self.staged.items():
            recent.pop(key, None)
            if row.value is not None and len(row.value) <= RECENT_VALUE_MAX:
                recent[key] = row.value
        while len(recent) > RECENT_MAX:
            del recent[next(iter(recent))]
        self.discard()

    def discard(self) -> None:
        """Forget the staged batch (its transaction was aborted)."""
        self.staged.clear()
        self.index_only.clear()

    def clear(self) -> None:
        """Empty the file: the changelog is read again from its start."""
        self.discard()
        self.recent.clear()
        self.db.execute("DELETE FROM state")
        self.db.execute("DELETE FROM meta")

    def close(self) -> None:
        self.db.close()
