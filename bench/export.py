"""Benchmark: ``rollstream export`` rows/s against a plain consume loop over the same records.

Against the running stack (``rollstream stack up``): N synthetic transitions (64 prompt and 64
response token ids with logprobs, like a short agent call) are published to a fresh prefix. Then:

- **export**: ``rollstream export --kinds transitions`` of the prefix (read_committed, up to the end
  offsets taken at start, decoded, deduplicated, lineage columns, written to Parquet);
- **consume**: the baseline, a plain confluent-kafka consumer (read_committed) reading the same
  records to the same end offsets, ``consume()`` in batches, no decoding or writing.

The ratio is export / consume. Each is run twice and the faster run kept (the first warms the
broker's page cache and the registry lookups).

    .venv/bin/python bench/export.py             # 50,000 transitions, about a minute on 2 cores
    .venv/bin/python bench/export.py --quick     # 10,000
    .venv/bin/python bench/export.py -n 200000

The last line printed is one JSON object with every figure.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq
from confluent_kafka import Consumer, Producer, TopicPartition

from rollstream.export import ExportOptions, export
from rollstream.schemas import make_event
from rollstream.schemas.codec import EventCodec, register_schemas, registry_client
from rollstream.schemas.topics import Topics, consumer_config, create_topics, producer_config
from rollstream.settings import ConnectionSettings

TOKENS = 64


def publish(conn: ConnectionSettings, topics: Topics, n: int) -> int:
    """``n`` transitions of 4-call rollouts over 8 policy versions; returns the bytes published."""
    codec = EventCodec(registry_client(conn), topics)
    producer = Producer(producer_config(conn, **{"linger.ms": 20, "queue.buffering.max.messages": 200_000}))
    prompt = list(range(1000, 1000 + TOKENS))
    size = 0
    for i in range(n):
        rid = f"bench-{i // 4}"
        record = make_event(
            "Transition", transition_id=f"{rid}-{i % 4}", source="bench", rollout_id=rid, call_id=f"c{i % 4}",
            sequence=i % 4, group_id=f"g-{i // 32}", task_id=f"task-{i // 32}", policy="bench",
            policy_version=i // max(1, n // 8), prompt_token_ids=prompt,
            response_token_ids=[(i + k) % 50_000 for k in range(TOKENS)],
            behaviour_logprobs=[-0.5 - k / 100 for k in range(TOKENS)], reward=float(i % 2),
            credited_return=float(i % 2), terminal_reward=float(i % 2), credit_assignment="terminal",
        )
        value = codec.encode(topics.transitions, record)
        size += len(value)
        while True:
            try:
                producer.produce(topics.transitions, value=value, key=rid.encode())
                break
            except BufferError:
                producer.poll(0.05)
        producer.poll(0)
    assert producer.flush(120) == 0
    return size


def consume_baseline(conn: ConnectionSettings, topic: str) -> tuple[int, float]:
    """Records read by a plain read_committed consume loop up to the end offsets, and its seconds."""
    consumer = Consumer(consumer_config(f"bench-export-{uuid.uuid4().hex[:8]}", conn,
                                        **{"enable.partition.eof": True, "fetch.wait.max.ms": 50}))
    started = time.perf_counter()
    parts = sorted(consumer.list_topics(topic, timeout=30).topics[topic].partitions)
    ends = {p: consumer.get_watermark_offsets(TopicPartition(topic, p), timeout=30, cached=False)[1] for p in parts}
    todo = {p for p in parts if ends[p] > 0}
    consumer.assign([TopicPartition(topic, p, 0) for p in todo])
    count = 0
    while todo:
        for msg in consumer.consume(2000, timeout=0.5):
            p = msg.partition()
            if msg.error() is not None:
                if int(msg.offset() or 0) >= ends[p]:
                    todo.discard(p)
                continue
            count += 1
            if int(msg.offset() or 0) >= ends[p] - 1:
                todo.discard(p)
    seconds = time.perf_counter() - started
    consumer.close()
    return count, seconds


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("-n", type=int, default=None, help="transitions to publish (default 50,000; --quick 10,000)")
    parser.add_argument("--quick", action="store_true", help="10,000 transitions: well under a minute")
    parser.add_argument("--partitions", type=int, default=3)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    n = args.n or (10_000 if args.quick else 50_000)
    conn = ConnectionSettings()
    topics = Topics(prefix=f"bench.export.{uuid.uuid4().hex[:8]}.", partitions=args.partitions)
    create_topics(topics, conn)
    register_schemas(registry_client(conn), topics)
    started = time.perf_counter()
    nbytes = publish(conn, topics, n)
    results: dict[str, Any] = {"quick": args.quick, "transitions": n, "partitions": args.partitions,
                               "mean_record_bytes": round(nbytes / n), "publish_s": time.perf_counter() - started}
    export_s, consume_s = [], []
    with tempfile.TemporaryDirectory(prefix="bench-export-") as tmp:
        for k in range(2):
            count, seconds = consume_baseline(conn, topics.transitions)
            assert count == n, f"baseline read {count} of {n}"
            consume_s.append(seconds)
            out = Path(tmp) / f"run{k}"
            res = export(ExportOptions(out=out, topic_prefix=topics.prefix, kinds=("transitions",), progress=False),
                         conn)
            assert res.rows["transitions"] == n, f"export wrote {res.rows} of {n}"
            export_s.append(res.seconds)
            results["parquet_bytes"] = (out / "transitions.parquet").stat().st_size
            assert pq.read_metadata(out / "transitions.parquet").num_rows == n
    results["export_s"] = min(export_s)
    results["consume_s"] = min(consume_s)
    results["export_rows_per_s"] = n / results["export_s"]
    results["consume_records_per_s"] = n / results["consume_s"]
    results["ratio"] = results["export_rows_per_s"] / results["consume_records_per_s"]
    print_table(results)
    print(json.dumps(results, separators=(",", ":")))
    return 0


def print_table(r: dict[str, Any]) -> None:
    print(f"{r['transitions']} transitions ({r['mean_record_bytes']} bytes each on the wire, "
          f"{r['partitions']} partitions); Parquet file {r['parquet_bytes'] / 1e6:.1f} MB")
    print(f"  {'what':28} {'seconds':>8} {'rows/s':>10}")
    print(f"  {'rollstream export':28} {r['export_s']:8.2f} {r['export_rows_per_s']:10.0f}")
    print(f"  {'plain consume (baseline)':28} {r['consume_s']:8.2f} {r['consume_records_per_s']:10.0f}")
    print(f"  ratio export / consume       {r['ratio']:8.3f}")


if __name__ == "__main__":
    sys.exit(main())
