"""Producers that compress: every Kafka codec is read, and a batch Faust cannot decode stops nothing."""

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
    assert stats["dead_letters"] == 0 and stats["unreadable_batches"] == 0


def test_a_batch_faust_cannot_decode_is_read_again_and_stops_nothing(
    settings: ConnectionSettings, topics_factory: Callable[..., Topics], worker_factory: Callable[..., Any],
    tmp_path: Path,
) -> None:
    """A worker whose aiokafka lacks snappy (cramjam hidden, as on an install without it) meets a snappy batch:
    it stays up, counts the batch, reads its records again through librdkafka, and goes on with the rest."""
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
    # The three snappy batches (calls, rewards, rollouts) were skipped by Faust's consumer and read again.
    assert stats["unreadable_batches"] == 3 and stats["unreadable_records"] == 5, stats
    assert stats["transitions"] == 5 and stats["dead_letters"] == 0
    assert "UnsupportedCodecError" in worker.log()


def test_the_batch_guard_still_fits_aiokafka() -> None:
    """Pins the private aiokafka seam the guard wraps: PartitionRecords(tp, records, ...) iterating
    records.has_next()/next_batch() and each batch's records, base_offset and next_offset."""
    import inspect

    from aiokafka.consumer import fetcher
    from aiokafka.record.default_records import DefaultRecordBatchBuilder
    from aiokafka.record.memory_records import MemoryRecords
    from aiokafka.structs import TopicPartition

    from rollstream.stream_processors.unreadable import Unreadable, guard_batches

    params = list(inspect.signature(fetcher.PartitionRecords.__init__).parameters)
    assert params[:3] == ["self", "tp", "records"], params
    found: list[Unreadable] = []
    guard_batches(found.append)

    def batch(offset: int, codec: int) -> bytes:
        builder = DefaultRecordBatchBuilder(2, codec, False, -1, -1, -1, 1000)
        for i in range(2):
            builder.append(i, timestamp=None, key=b"k", value=b"v%d" % i, headers=[])
        data = bytearray(builder.build())
        data[0:8] = offset.to_bytes(8, "big")  # base offset
        return bytes(data)

    tp = TopicPartition("t", 0)
    records = MemoryRecords(batch(0, 0) + batch(2, 2) + batch(4, 0))  # plain, snappy, plain
    import aiokafka.codec

    real = aiokafka.codec.cramjam
    part = None
    try:
        aiokafka.codec.cramjam = None
        part = fetcher.PartitionRecords(tp, records, [], 0, None, None, True, 0)
        got = [(r.offset, r.value) for r in part]
    finally:
        aiokafka.codec.cramjam = real
    assert got == [(0, b"v0"), (1, b"v1"), (4, b"v0"), (5, b"v1")]
    assert part.next_fetch_offset == 6
    assert [(f.first_offset, f.next_offset) for f in found] == [(2, 4)]
    assert "UnsupportedCodecError" in found[0].reason
