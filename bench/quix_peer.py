"""Rollstream's per-rollout join written with quix-streams: a peer to compare ``rollstream process`` with.

It reads the co-partitioned ``<prefix>calls``, ``<prefix>rewards`` and ``<prefix>rollouts`` topics
(Confluent-framed Avro, key = rollout id) in one quixstreams ``Application`` with
``processing_guarantee="exactly-once"``, a fresh consumer group and ``auto_offset_reset="earliest"``.
The three topics' dataframes are concatenated into one, so that one stateful step sees every event
of a rollout; its state is quixstreams' RocksDB store, changelogged to Kafka. Per rollout it keeps
the calls' token ids and logprobs, the lifecycle status and the terminal reward. Once a rollout has
its terminal reward and a SUCCEEDED or FAILED status, one transition per call (JSON: rollout_id,
call_id, sequence, prompt_token_ids, response_token_ids, behaviour_logprobs, reward = the terminal
reward) goes to ``--out-topic``, keyed by the rollout id, and the rollout's state is deleted. A
CANCELLED rollout is dropped. What it leaves out of Rollstream's join: attempts, intermediate
rewards, credit assignment, expiry, late events, dead letters, duplicate detection by event id
(a repeated call id overwrites the call).

Ordering: a concatenation of dataframes of different topics turns on quixstreams' time alignment: of
the records of one partition number it hands on the one with the smallest timestamp, across the
three topics. Records with equal (millisecond) timestamps, common when a rollout's events are
produced together, go in the order of the topics' assignment, which librdkafka sorts by name:
calls, then rewards, then rollouts, so a rollout's calls come before its reward and final status.
A call that still came after them (a producer clock behind, a call published late) would open a
rollout that never completes: the count of transitions would fall short, and the run time out.

Speed: ``--poll-timeout`` defaults to 0.1 s instead of quixstreams' 1 s. Under time alignment each
consumer poll asks for ``max_partition_buffer_size`` (10,000) records and waits for that many or
for the timeout, so at 1 s a backlog smaller than that, or the tail of any backlog, waits idle
for a second per poll.

It needs only quixstreams, fastavro and orjson (not the ``rollstream`` package): run it with the
venv ``scripts/setup-bench.sh`` makes.

    ~/.cache/rollstream/bench-quix/bin/python bench/quix_peer.py --prefix bench-pipe-1a2b3c4d. \\
        --out-topic bench-pipe-1a2b3c4d.quix-transitions --rollouts 3000

It stops once it has emitted ``--rollouts`` x ``--calls`` transitions (or after ``--timeout``
seconds), and prints as its last line one JSON object: rollouts, transitions, seconds (from the
first input record read to the commit of the transaction holding the last transition) and
rollouts_per_s. Exit status 0 when every expected transition was emitted, 1 otherwise.
"""

from __future__ import annotations

import argparse
import io
import json
import logging
import os
import shutil
import struct
import sys
import tempfile
import threading
import time
import urllib.request
import uuid
import warnings
from typing import Any

import fastavro
import orjson

# quixstreams imports confluent_kafka.schema_registry, whose authlib warns about httpx on import (and
# sets its own "always" filter for that warning, so a filter set here would not hide it).
with warnings.catch_warnings():
    warnings.showwarning = lambda *args, **kwargs: None
    import quixstreams
    from quixstreams import Application, State
    from quixstreams.models.serializers import Deserializer, SerializationContext

HEADER = struct.Struct(">bI")
FINAL_STATUSES = ("SUCCEEDED", "FAILED")
META = "meta"  # state key of a rollout's status, terminal reward and call ids
CALL = "call:"  # state key prefix of one call's token ids and logprobs


class Registry:
    """Writer schemas by id, each fetched once from a Confluent-compatible registry."""

    def __init__(self, url: str, timeout: float = 10.0) -> None:
        self.url = url.rstrip("/")
        self.timeout = timeout
        self.schemas: dict[int, Any] = {}
        self.lock = threading.Lock()

    def schema(self, schema_id: int) -> Any:
        parsed = self.schemas.get(schema_id)
        if parsed is None:
            with self.lock:
                parsed = self.schemas.get(schema_id)
                if parsed is None:
                    with urllib.request.urlopen(f"{self.url}/schemas/ids/{schema_id}", timeout=self.timeout) as resp:
                        body = json.load(resp)
                    parsed = fastavro.parse_schema(json.loads(body["schema"]))
                    self.schemas[schema_id] = parsed
        return parsed


class ConfluentAvro(Deserializer):
    """Confluent wire format (magic 0, big-endian schema id, Avro body) to the few fields the join needs."""

    def __init__(self, registry: Registry, kind: str, clock: Clock) -> None:
        super().__init__()
        self.registry = registry
        self.kind = kind
        self.clock = clock

    def __call__(self, value: bytes, ctx: SerializationContext) -> dict[str, Any]:
        if self.clock.first is None:
            self.clock.first = time.monotonic()
        magic, schema_id = HEADER.unpack_from(value)
        if magic != 0:
            raise ValueError(f"unknown magic byte {magic}: not a Confluent-framed Avro record")
        body = io.BytesIO(memoryview(value)[HEADER.size:])
        record: Any = fastavro.schemaless_reader(body, self.registry.schema(schema_id), None)  # type: ignore[arg-type]
        if self.kind == "call":
            return {"kind": "call", "call_id": record["call_id"], "sequence": record["sequence"],
                    "prompt_token_ids": record["prompt_token_ids"] or [],
                    "response_token_ids": record["response_token_ids"] or [],
                    "behaviour_logprobs": record["response_logprobs"]}
        if self.kind == "reward":
            return {"kind": "reward", "value": record["value"], "terminal": record["terminal"],
                    "call_id": record["call_id"]}
        return {"kind": "status", "status": record["status"]}


class Clock:
    """First input record read; commit of the last checkpoint (a transaction, under exactly-once)."""

    def __init__(self) -> None:
        self.first: float | None = None
        self.committed: float | None = None

    def filter(self, record: logging.LogRecord) -> bool:
        # quixstreams logs "Committed a checkpoint" (DEBUG) right after the transaction commits;
        # this filter notes when and drops the record (nothing is printed).
        if record.getMessage().startswith("Committed a checkpoint"):
            self.committed = time.monotonic()
        return record.levelno > logging.DEBUG


def join(value: dict[str, Any], key: bytes, timestamp: int, headers: Any, state: State) -> list[dict[str, Any]]:
    """One event of a rollout into its state; the rollout's transitions once it is complete."""
    kind = value["kind"]
    meta = state.get(META) or {"status": None, "reward": None, "calls": []}
    if kind == "call":
        call_id = value.pop("call_id")
        del value["kind"]
        if call_id not in meta["calls"]:
            meta["calls"].append(call_id)
        state.set_bytes(CALL + call_id, orjson.dumps(value))
    elif kind == "reward":
        if value["terminal"] and value["call_id"] is None:
            meta["reward"] = value["value"]
    else:
        status = value["status"]
        if status == "CANCELLED":
            forget(state, meta)
            return []
        if status in FINAL_STATUSES:
            meta["status"] = status
    if meta["reward"] is None or meta["status"] not in FINAL_STATUSES:
        state.set(META, meta)
        return []
    rollout_id = key.decode()
    reward = meta["reward"]
    out = []
    for call_id in meta["calls"]:
        piece = orjson.loads(state.get_bytes(CALL + call_id))
        out.append({"rollout_id": rollout_id, "call_id": call_id, "sequence": piece["sequence"],
                    "prompt_token_ids": piece["prompt_token_ids"], "response_token_ids": piece["response_token_ids"],
                    "behaviour_logprobs": piece["behaviour_logprobs"], "reward": reward})
    out.sort(key=lambda t: t["sequence"])
    forget(state, meta)
    return out


def forget(state: State, meta: dict[str, Any]) -> None:
    for call_id in meta["calls"]:
        state.delete(CALL + call_id)
    state.delete(META)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--bootstrap", default=os.environ.get("ROLLSTREAM_KAFKA_BOOTSTRAP", "127.0.0.1:9092"))
    ap.add_argument("--registry-url", default=os.environ.get("ROLLSTREAM_SCHEMA_REGISTRY_URL",
                                                             "http://127.0.0.1:8081/apis/ccompat/v7"))
    ap.add_argument("--prefix", required=True,
                    help="topic prefix: reads <prefix>calls, <prefix>rewards, <prefix>rollouts")
    ap.add_argument("--out-topic", required=True, help="where the transitions go (JSON, key = rollout id)")
    ap.add_argument("--rollouts", type=int, required=True,
                    help="rollouts to expect; stops after rollouts x calls transitions")
    ap.add_argument("--calls", type=int, default=4, help="calls per rollout")
    ap.add_argument("--timeout", type=float, default=600.0, help="seconds before giving up")
    ap.add_argument("--commit-interval", type=float, default=5.0,
                    help="seconds between checkpoints, each one transaction (quixstreams' default: 5)")
    ap.add_argument("--poll-timeout", type=float, default=0.1,
                    help="seconds a consumer poll may wait for a full batch (quixstreams' default: 1.0)")
    ap.add_argument("--state-dir", default=None, help="RocksDB directory (default: a fresh temporary one, removed)")
    ap.add_argument("--consumer-group", default=None, help="default: a fresh quix-peer-<random> group")
    ap.add_argument("--loglevel", default="WARNING")
    args = ap.parse_args(argv)

    expected = args.rollouts * args.calls
    clock = Clock()
    registry = Registry(args.registry_url)
    state_dir = args.state_dir or tempfile.mkdtemp(prefix="quix-peer-")
    group = args.consumer_group or f"quix-peer-{uuid.uuid4().hex[:8]}"
    app = Application(
        broker_address=args.bootstrap,
        consumer_group=group,
        auto_offset_reset="earliest",
        processing_guarantee="exactly-once",
        commit_interval=args.commit_interval,
        consumer_poll_timeout=args.poll_timeout,
        state_dir=state_dir,
        use_changelog_topics=True,
        loglevel=args.loglevel,
        # The partitioner of every Rollstream producer (Java-compatible murmur2), for the out topic, and the
        # retry backoff Rollstream's transactional producers use (5 ms; librdkafka's 100 ms default is paid
        # by a transaction that starts while the coordinator still writes the previous one's markers).
        producer_extra_config={"partitioner": "murmur2_random", "retry.backoff.ms": 5},
    )
    context_log = logging.getLogger("quixstreams.processing.context")
    context_log.setLevel(logging.DEBUG)
    context_log.addFilter(clock.filter)

    frames = [
        app.dataframe(app.topic(args.prefix + name, key_deserializer="bytes",
                                value_deserializer=ConfluentAvro(registry, kind, clock)))
        for name, kind in (("calls", "call"), ("rewards", "reward"), ("rollouts", "status"))
    ]
    sdf = frames[0].concat(frames[1]).concat(frames[2])
    sdf = sdf.apply(join, stateful=True, expand=True, metadata=True)
    sdf.to_topic(app.topic(args.out_topic, key_serializer="bytes", value_serializer="json"))

    emitted = 0
    completed = 0
    last_key: bytes | None = None

    def count(value: dict[str, Any], key: bytes, timestamp: int, headers: Any) -> None:
        nonlocal emitted, completed, last_key
        emitted += 1
        if key != last_key:
            completed += 1
            last_key = key
        if emitted >= expected:
            app.stop()

    sdf.update(count, metadata=True)

    timer = threading.Timer(args.timeout, app.stop)
    timer.daemon = True
    timer.start()
    try:
        app.run()
    finally:
        timer.cancel()
        if args.state_dir is None:
            shutil.rmtree(state_dir, ignore_errors=True)
    end = clock.committed or time.monotonic()
    seconds = end - clock.first if clock.first is not None else 0.0
    result = {
        "rollouts": args.rollouts, "transitions": emitted, "completed_rollouts": completed,
        "seconds": round(seconds, 3), "rollouts_per_s": round(completed / seconds, 1) if seconds > 0 else 0.0,
        "ok": emitted == expected, "measured_to": "commit" if clock.committed else "exit",
        "quixstreams": quixstreams.__version__,
        "processing_guarantee": "exactly-once", "consumer_group": group,
    }
    print(json.dumps(result), flush=True)
    return 0 if emitted == expected else 1


if __name__ == "__main__":
    sys.exit(main())
