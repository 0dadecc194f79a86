"""Producers that compress: every Kafka codec is read (the processor consumes through librdkafka)."""

from __future__ import annotations

import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from confluent_kafka import Producer
from sp_helpers import Pipe, call, lifecycle, reward

from rollstream.schemas.codec import EventCodec
from rollstream.schemas.topics import Topics, producer_config
from rollstream.settings import ConnectionSettings

pytestmark = [pytest.mark.integration, pytest.mark.slow]

CODECS = ("gzip", "snappy", "lz4", "zstd")


def send_rollout(producer: Producer, codec: EventCodec, topics: Topics, rid: str, calls: int = 2) -> None:
    """One whole rollout, each topic's records in one batch (so a compressed batch holds several records)."""
    for seq in range(calls):
        producer.produce(topics.calls, codec.encode(topics.calls, call(rid, seq)), rid.encode())
    producer.produce(topics.rewards, codec.encode(topics.rewards, reward(rid, 1.0)), rid.encode())
    producer.produce(topics.rollouts, codec.encode(topics.rollouts, lifecycle(rid, "SUCCEEDED")), rid.encode())


def compressing(settings: ConnectionSettings, name: str) -> Producer:
    # A long linger puts the records of a rollout into one batch per topic, as a busy producer would.
    return Producer(producer_config(settings, **{"compression.type": name, "linger.ms": 50}))


def test_every_compression_codec_becomes_transitions(
    settings: ConnectionSettings, topics: Topics, codec: EventCodec, pipe: Pipe, worker_factory: Callable[..., Any]
) -> None:
    worker = worker_factory()
    expected = set()
    for name in CODECS:
        producer = compressing(settings, name)
        for i in range(3):
            rid = f"ro-{name}-{i}"
            send_rollout(producer, codec, topics, rid)
            expected |= {(rid, "c0"), (rid, "c1")}
        assert producer.flush(30) == 0
    got = {(t["rollout_id"], t["call_id"]) for t in pipe.transitions(len(expected), timeout=90, settle=1.0)}
    assert got == expected
    stats = worker.wait_stats(lambda s: s["completed"] == 12)
    assert stats["dead_letters"] == 0


def test_snappy_needs_no_python_compression_library(
    settings: ConnectionSettings, topics_factory: Callable[..., Topics], worker_factory: Callable[..., Any],
    tmp_path: Path,
) -> None:
    """A worker on an install without Python compression libraries (cramjam hidden) reads a snappy batch:
    the records go through librdkafka, which has every codec built in."""
    from rollstream.schemas.codec import registry_client

    topics = topics_factory(partitions=1)
    codec = EventCodec(registry_client(settings), topics)
    pipe = Pipe(settings, topics, codec)
    hide = tmp_path / "hide"
    hide.mkdir()
    (hide / "sitecustomize.py").write_text("import sys\nsys.modules['cramjam'] = None  # import cramjam fails\n")
    worker = worker_factory({"PYTHONPATH": str(hide)}, tps=topics)
    snappy = compressing(settings, "snappy")
    send_rollout(snappy, codec, topics, "ro-snappy", calls=3)
    assert snappy.flush(30) == 0
    plain = f"ro-plain-{uuid.uuid4().hex[:4]}"
    send_rollout(pipe.producer, codec, topics, plain)
    pipe.flush()
    got = {(t["rollout_id"], t["call_id"]) for t in pipe.transitions(5, timeout=90, settle=2.0)}
    assert got == {("ro-snappy", "c0"), ("ro-snappy", "c1"), ("ro-snappy", "c2"), (plain, "c0"), (plain, "c1")}
    stats = worker.wait_stats(lambda s: s["completed"] == 2)
    assert stats["transitions"] == 5 and stats["dead_letters"] == 0
