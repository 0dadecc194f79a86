"""Fixtures for the stream-processor tests (helpers live in sp_helpers.py)."""

from __future__ import annotations

import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from sp_helpers import Pipe, WorkerProcess

from rollstream.schemas.codec import EventCodec
from rollstream.schemas.topics import Topics
from rollstream.settings import ConnectionSettings


@pytest.fixture
def pipe(settings: ConnectionSettings, topics: Topics, codec: EventCodec) -> Pipe:
    return Pipe(settings, topics, codec)


@pytest.fixture
def worker_factory(settings: ConnectionSettings, topics: Topics, tmp_path: Path) -> Iterator[Callable[..., Any]]:
    started: list[WorkerProcess] = []
    app_id = f"proc-{uuid.uuid4().hex[:8]}"

    def make(env: dict[str, str] | None = None, start: bool = True, tps: Topics | None = None,
             index: int | None = None) -> WorkerProcess:
        """A worker; ``index`` names its state folder (default: a new one), so a restart can reuse it."""
        at = len(started) if index is None else index
        w = WorkerProcess(tps or topics, settings, tmp_path, app_id, env, index=at)
        started.append(w)
        return w.start() if start else w

    yield make
    for w in started:
        w.stop()
