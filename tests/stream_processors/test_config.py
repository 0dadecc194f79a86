"""Processor settings: pipelines on two topic prefixes never share a consumer group, changelog or state."""

from __future__ import annotations

from pathlib import Path

import pytest

from rollstream.stream_processors.config import ProcessorSettings


def test_app_id_and_data_dir_follow_the_topic_prefix(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("ROLLSTREAM_HOME", str(tmp_path))
    monkeypatch.delenv("ROLLSTREAM_PROCESS_APP_ID", raising=False)
    monkeypatch.delenv("ROLLSTREAM_PROCESS_DATA_DIR", raising=False)
    a, b = ProcessorSettings().for_prefix("team-a."), ProcessorSettings().for_prefix("team-b.")
    assert (a.app_id, b.app_id) == ("team-a.processor", "team-b.processor")
    assert a.data_dir == tmp_path / "processor" / "team-a.processor" and a.data_dir != b.data_dir


def test_an_explicit_app_id_and_data_dir_are_kept(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("ROLLSTREAM_HOME", str(tmp_path))
    monkeypatch.setenv("ROLLSTREAM_PROCESS_APP_ID", "shared-join")
    monkeypatch.delenv("ROLLSTREAM_PROCESS_DATA_DIR", raising=False)
    s = ProcessorSettings().for_prefix("team-a.")
    assert s.app_id == "shared-join" and s.data_dir == tmp_path / "processor" / "shared-join"
    monkeypatch.setenv("ROLLSTREAM_PROCESS_DATA_DIR", str(tmp_path / "state"))
    assert ProcessorSettings().for_prefix("team-a.").data_dir == tmp_path / "state"
