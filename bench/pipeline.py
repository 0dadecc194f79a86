"""Benchmark: rollouts/s and reward→transition latency through the join, against a plain pass-through.

One run creates fresh topics on the running local stack and pre-encodes realistic rollouts
(STARTED, 4 calls of ~500 prompt and ~200 response token ids with logprobs, SUCCEEDED,
one terminal reward: 7 events). Then:

1. ceiling: a plain confluent-kafka consume→produce loop (read_committed, idempotent
   producer, no decoding) copies a backlog of the same events to an output topic;
2. throughput: the same backlog goes through ``rollstream process`` (exactly-once by
   default); rollouts/s counts from the first to the last transition readable with
   read_committed;
3. latency: with the worker caught up, rollouts are published at a steady rate; the
   latency of a rollout is from the produce call of its terminal reward to its first
   transition being readable with read_committed (p50, p99);
4. the peer: the same join written with quix-streams (exactly-once, RocksDB state with its
   changelog) on the same backlog (bench/quix_peer.py, in its own environment:
   ``bash scripts/setup-bench.sh``);
5. restart: a worker holding many open rollouts (STARTED and one call each) is killed with
   SIGKILL and started again on its state folder (the local store is caught up from the
   changelog) and on an empty one (the whole changelog read, as every start did before the
   store kept only committed writes); the time until it processes records again;
6. where the time goes: the processor's own per-event work (decode, join, credit, encode)
   timed in this process with cProfile, the rest being Kafka clients and transactions.

    .venv/bin/python bench/pipeline.py            # 10,000 rollouts, restart with 100,000 open
    .venv/bin/python bench/pipeline.py --quick    # under two minutes (needs `rollstream stack up`)

The last line printed is one JSON object with every figure.
"""

from __future__ import annotations

import argparse
import cProfile
import io
import json
import os
import pstats
import random
import signal
import socket
import statistics
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path
from typing import Any

from confluent_kafka import Consumer, Producer

from rollstream.schemas import make_event
from rollstream.schemas.codec import EventCodec, register_schemas, registry_client
from rollstream.schemas.topics import Topics, consumer_config, create_topics, producer_config
from rollstream.settings import ConnectionSettings

ROOT = Path(__file__).resolve().parents[1]
CALLS = 4
WARMUP_SECONDS = 1.0  # paced traffic published before the latency is measured


def rollout_events(codec: EventCodec, topics: Topics, rid: str, rng: random.Random) -> list[tuple[str, bytes, bytes]]:
    """(topic, key, value) of one realistic rollout, encoded."""
    key = rid.encode()
    out = [(topics.rollouts, key, codec.encode(topics.rollouts, make_event(
        "RolloutEvent", source="bench", rollout_id=rid, status="STARTED", policy="bench", group_id="g", task_id="t")))]
    for seq in range(CALLS):
        prompt = [rng.randrange(50000) for _ in range(500)]
        response = [rng.randrange(50000) for _ in range(200)]
        out.append((topics.calls, key, codec.encode(topics.calls, make_event(
            "LlmCall", source="bench", rollout_id=rid, call_id=f"c{seq}", sequence=seq, agent_name="solver",
            policy="bench", policy_version=1, messages=[{"role": "user", "content": "solve " * 50}],
            sampling={"temperature": 1.0, "top_p": None, "max_tokens": 256, "stop": [], "seed": None, "n": 1},
            response_text="answer " * 40, prompt_token_ids=prompt, response_token_ids=response,
            response_logprobs=[-rng.random() for _ in response], start_time=1, end_time=2, latency_ms=100.0))))
    out.append((topics.rollouts, key, codec.encode(topics.rollouts, make_event(
        "RolloutEvent", source="bench", rollout_id=rid, status="SUCCEEDED", policy="bench", group_id="g"))))
    out.append((topics.rewards, key, codec.encode(topics.rewards, make_event(
        "Reward", source="bench", rollout_id=rid, value=rng.random(), terminal=True))))
    return out


def publish(settings: ConnectionSettings, events: list[tuple[str, bytes, bytes]],
            on_reward: dict[str, float] | None = None, rate: float = 0.0) -> None:
    producer = Producer(producer_config(settings, **{"linger.ms": 5, "queue.buffering.max.messages": 200000}))
    t0 = time.monotonic()
    per_rollout = 2 + CALLS + 1
    for i, (topic, key, value) in enumerate(events):
        if rate and i % per_rollout == 0:
            ahead = (i / per_rollout) / rate - (time.monotonic() - t0)
            if ahead > 0:
                time.sleep(ahead)
        if on_reward is not None and topic.endswith("rewards"):
            on_reward[key.decode()] = time.time()
        while True:
            try:
                producer.produce(topic, value=value, key=key)
                break
            except BufferError:
                producer.poll(0.05)
        producer.poll(0)
    producer.flush(60)


class Reader(threading.Thread):
    """Reads a topic (read_committed) and notes when each key was first readable."""

    def __init__(self, settings: ConnectionSettings, topic: str) -> None:
        super().__init__(daemon=True)
        self.consumer = Consumer(consumer_config(f"bench-{uuid.uuid4().hex}", settings, **{"fetch.wait.max.ms": 10}))
        self.consumer.subscribe([topic])
        self.first_seen: dict[str, float] = {}
        self.count = 0
        self.first = self.last = 0.0
        self.stop = False

    def run(self) -> None:
        while not self.stop:
            for msg in self.consumer.consume(500, 0.05):
                if msg.error() is not None:
                    continue
                now = time.time()
                self.count += 1
                self.first = self.first or now
                self.last = now
                self.first_seen.setdefault((msg.key() or b"").decode(), now)
        self.consumer.close()

    def wait(self, count: int, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        while self.count < count and time.monotonic() < deadline:
            time.sleep(0.1)
        return self.count >= count


def ceiling(settings: ConnectionSettings, topics: Topics, n_events: int, out_topic: str) -> float:
    """events/s of a plain read_committed consume -> produce copy of the backlog."""
    consumer = Consumer(consumer_config(f"bench-ceiling-{uuid.uuid4().hex}", settings))
    consumer.subscribe(list(topics.copartitioned))
    producer = Producer(producer_config(settings, **{"linger.ms": 5}))
    seen = 0
    t0 = 0.0
    deadline = time.monotonic() + 300
    while seen < n_events and time.monotonic() < deadline:
        for msg in consumer.consume(500, 0.5):
            if msg.error() is not None:
                continue
            t0 = t0 or time.monotonic()
            while True:
                try:
                    producer.produce(out_topic, value=msg.value(), key=msg.key())
                    break
                except BufferError:
                    producer.poll(0.05)
            seen += 1
        producer.poll(0)
    undelivered = producer.flush(60)
    elapsed = time.monotonic() - t0
    consumer.close()
    if undelivered:
        raise RuntimeError(f"pass-through left {undelivered} records undelivered")
    return seen / max(elapsed, 1e-9)


def profile_processor(codec: EventCodec, topics: Topics, events: list[tuple[str, bytes, bytes]]) -> dict[str, Any]:
    """The processor's own CPU per event, measured in-process (no Kafka)."""
    from rollstream.stream_processors.config import ProcessorSettings
    from rollstream.stream_processors.metrics import Metrics
    from rollstream.stream_processors.processor import KEEP, Processor, piece_key

    proc = Processor(ProcessorSettings(), topics, codec, Metrics())
    state: dict[bytes, bytes] = {}
    prof = cProfile.Profile()
    t0 = time.perf_counter()
    prof.enable()
    for offset, (topic, key, value) in enumerate(events):
        decision = proc.handle(topic, 0, offset, key, value, state.get(key), time.time(), 0.0,
                               load=lambda pid, key=key: state.get(piece_key(key, pid)))
        for pid, piece in decision.pieces:
            if piece is None:
                state.pop(piece_key(key, pid), None)
            else:
                state[piece_key(key, pid)] = piece
        if decision.state is not KEEP:
            if decision.state is None:
                state.pop(key, None)
            else:
                state[key] = decision.state
    prof.disable()
    elapsed = time.perf_counter() - t0
    buf = io.StringIO()
    stats = pstats.Stats(prof, stream=buf)
    stats.sort_stats("tottime").print_stats(8)
    top = [line for line in buf.getvalue().splitlines() if line.strip() and line.strip()[0].isdigit()][:8]
    return {"us_per_event": elapsed / len(events) * 1e6, "top": top}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Worker:
    """``rollstream process`` as a subprocess on a given state folder."""

    def __init__(self, topics: Topics, app_id: str, data_dir: Path, guarantee: str) -> None:
        self.topics, self.app_id, self.data_dir, self.guarantee = topics, app_id, data_dir, guarantee
        self.log_path = data_dir.with_suffix(".log")
        self.port = free_port()
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> Worker:
        env = {**os.environ, "ROLLSTREAM_PROCESS_GUARANTEE": self.guarantee, "ROLLSTREAM_PROCESS_LOG_INTERVAL": "10"}
        self.proc = subprocess.Popen(
            [str(Path(sys.executable).with_name("rollstream")), "process", "--topic-prefix", self.topics.prefix,
             "--partitions", str(self.topics.partitions), "--app-id", self.app_id, "--data-dir", str(self.data_dir),
             "--web-port", str(self.port)],
            stdout=self.log_path.open("ab"), stderr=subprocess.STDOUT, env=env,
        )
        return self

    def stats(self) -> dict[str, Any]:
        import httpx

        try:
            return dict(httpx.get(f"http://127.0.0.1:{self.port}/stats", timeout=5).json())
        except Exception:  # not up yet
            return {}

    def wait(self, pred: Any, timeout: float) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            got = self.stats()
            if got and pred(got):
                return got
            if self.proc is not None and self.proc.poll() is not None:
                raise RuntimeError(f"the worker exited; see {self.log_path}")
            time.sleep(0.1)
        raise RuntimeError(f"the worker did not get there in {timeout:.0f} s; see {self.log_path}")

    def stop(self, sig: int = signal.SIGTERM) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(sig)
            self.proc.wait(60)


def new_topics(partitions: int, tag: str) -> Topics:
    settings = ConnectionSettings()
    topics = Topics(prefix=f"bench-{tag}-{uuid.uuid4().hex[:8]}.", partitions=partitions)
    create_topics(topics, settings)
    register_schemas(registry_client(settings), topics)
    return topics


def peer(settings: ConnectionSettings, topics: Topics, rollouts: int) -> dict[str, Any]:
    """The same join with quix-streams, on the backlog already in ``topics`` (its own environment)."""
    python = Path.home() / ".cache" / "rollstream" / "bench-quix" / "bin" / "python"
    if not python.exists():
        raise SystemExit(f"the quix-streams peer is not installed ({python}): run 'bash scripts/setup-bench.sh', "
                         "or pass --no-peer")
    out = topics.prefix + "quix-transitions"
    from confluent_kafka.admin import AdminClient, NewTopic

    admin = AdminClient({"bootstrap.servers": settings.kafka_bootstrap})
    admin.create_topics([NewTopic(out, num_partitions=topics.partitions, replication_factor=1)])[out].result()
    run = subprocess.run(
        [str(python), str(ROOT / "bench" / "quix_peer.py"), "--bootstrap", settings.kafka_bootstrap,
         "--registry-url", settings.schema_registry_url, "--prefix", topics.prefix, "--out-topic", out,
         "--rollouts", str(rollouts), "--timeout", "900"],
        capture_output=True, text=True, timeout=1000,
    )
    lines = [line for line in run.stdout.splitlines() if line.startswith("{")]
    if run.returncode != 0 or not lines:
        raise RuntimeError(f"quix-streams peer failed ({run.returncode}): {run.stderr[-2000:]}")
    return dict(json.loads(lines[-1]))


def restart(settings: ConnectionSettings, codec_for: Any, partitions: int, n_open: int,
            guarantee: str) -> dict[str, Any]:
    """Seconds until a killed worker holding ``n_open`` open rollouts processes again: in place, and from empty."""
    topics = new_topics(partitions, "restart")
    codec = codec_for(topics)
    rng = random.Random(2)
    events = []
    for i in range(n_open):
        first_two = rollout_events(codec, topics, f"open-{i}", rng)[:2]  # STARTED and one call: open
        events.extend(first_two)
    publish(settings, events)
    tmp = Path(os.environ.get("TMPDIR", "/tmp")) / f"bench-restart-{uuid.uuid4().hex[:6]}"
    app_id = f"bench-r-{uuid.uuid4().hex[:6]}"
    worker = Worker(topics, app_id, tmp, guarantee).start()
    t0 = time.monotonic()
    worker.wait(lambda s: s.get("events", 0) >= len(events) and s.get("open_rollouts") == n_open, timeout=1800)
    fill_s = time.monotonic() - t0
    worker.stop(signal.SIGKILL)
    out: dict[str, Any] = {"open_rollouts": n_open, "fill_seconds": round(fill_s, 1)}
    for name, data_dir in (("in_place", tmp), ("empty_folder", tmp.with_name(tmp.name + "-fresh"))):
        worker = Worker(topics, app_id, data_dir, guarantee)
        t0 = time.monotonic()
        worker.start()
        got = worker.wait(lambda s: s.get("ready"), timeout=1800)
        out[f"restart_{name}_seconds"] = round(time.monotonic() - t0, 2)
        out[f"restore_{name}_seconds"] = got.get("restore_seconds")
        worker.wait(lambda s: s.get("open_rollouts") == n_open, timeout=120)  # nothing lost on the way
        worker.stop(signal.SIGKILL)
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="small run, under two minutes")
    ap.add_argument("--rollouts", type=int, default=10000, help="rollouts in the throughput backlog")
    ap.add_argument("--open-rollouts", type=int, default=100000, help="open rollouts held when restarting")
    ap.add_argument("--no-peer", action="store_true", help="skip the quix-streams peer")
    ap.add_argument("--latency-rate", type=float, default=300.0, help="rollouts/s in the latency phase")
    ap.add_argument("--latency-seconds", type=float, default=15.0)
    ap.add_argument("--partitions", type=int, default=3)
    ap.add_argument("--guarantee", default="exactly_once", choices=["exactly_once", "at_least_once"])
    args = ap.parse_args(argv)
    if args.quick:
        args.rollouts, args.latency_seconds, args.open_rollouts = 2000, 5.0, 5000

    settings = ConnectionSettings()
    topics = new_topics(args.partitions, "pipe")
    codec = EventCodec(registry_client(settings), topics)
    rng = random.Random(1)
    n_lat = int(args.latency_rate * args.latency_seconds)
    backlog = [e for i in range(args.rollouts) for e in rollout_events(codec, topics, f"tp-{i}", rng)]
    # The first second of paced traffic warms up a fresh producer (its first records wait for topic metadata):
    # published, not measured; the percentiles are those of the traffic after it.
    n_warm = int(args.latency_rate * WARMUP_SECONDS)
    paced = [e for i in range(n_warm) for e in rollout_events(codec, topics, f"warm-{i}", rng)]
    paced += [e for i in range(n_lat) for e in rollout_events(codec, topics, f"lat-{i}", rng)]
    mb = sum(len(v) for _, _, v in backlog) / 1e6

    # 1. the ceiling: a plain pass-through of the same backlog
    publish(settings, backlog)
    copy_topic = topics.prefix + "passthrough"
    from confluent_kafka.admin import AdminClient, NewTopic

    admin = AdminClient({"bootstrap.servers": settings.kafka_bootstrap})
    new = NewTopic(copy_topic, num_partitions=args.partitions, replication_factor=1)
    admin.create_topics([new])[copy_topic].result()
    ceiling_eps = ceiling(settings, topics, len(backlog), copy_topic)

    # 2. throughput through the join, on the same backlog
    reader = Reader(settings, topics.transitions)
    reader.start()
    tmp = Path(os.environ.get("TMPDIR", "/tmp")) / f"bench-pipeline-{uuid.uuid4().hex[:6]}"
    worker = Worker(topics, f"bench-{uuid.uuid4().hex[:6]}", tmp, args.guarantee).start()
    try:
        ok = reader.wait(args.rollouts * CALLS, timeout=900)
        join_s = max(reader.last - reader.first, 1e-9)
        rollouts_s = args.rollouts / join_s if ok else 0.0

        # 3. latency at a steady rate, the worker caught up
        sent: dict[str, float] = {}
        publish(settings, paced, on_reward=sent, rate=args.latency_rate)
        reader.wait((args.rollouts + n_warm + n_lat) * CALLS, timeout=120)
        time.sleep(1.0)
        lat = sorted(reader.first_seen[k] - t for k, t in sent.items()
                     if k in reader.first_seen and k.startswith("lat-"))
    finally:
        worker.stop()
        reader.stop = True
    p50 = statistics.median(lat) if lat else float("nan")
    p99 = lat[min(len(lat) - 1, int(0.99 * len(lat)))] if lat else float("nan")

    # 4. the peer on the same backlog
    quix = None if args.no_peer else peer(settings, topics, args.rollouts)

    # 5. restart with many open rollouts
    restarted = restart(settings, lambda t: EventCodec(registry_client(settings), t), args.partitions,
                        args.open_rollouts, args.guarantee)

    # 6. the processor's own work per event
    prof = profile_processor(codec, topics, backlog[: 7 * 300])

    events_per_rollout = 2 + CALLS + 1
    events_s = rollouts_s * events_per_rollout
    quix_rps = quix["rollouts_per_s"] if quix else None
    result = {
        "rollouts": args.rollouts, "events": len(backlog), "backlog_mb": round(mb, 1), "guarantee": args.guarantee,
        "partitions": args.partitions, "join_rollouts_per_s": round(rollouts_s, 1),
        "join_events_per_s": round(events_s, 1), "ceiling_events_per_s": round(ceiling_eps, 1),
        "ratio_join_to_ceiling": round(events_s / ceiling_eps, 3) if ceiling_eps else None,
        "quix_rollouts_per_s": quix_rps,
        "ratio_join_to_quix": round(rollouts_s / quix_rps, 2) if quix_rps else None,
        "latency_rate_rollouts_per_s": args.latency_rate, "latency_warmup_rollouts": n_warm,
        "latency_samples": len(lat),
        "latency_missing": n_lat - len(lat), "latency_p50_ms": round(p50 * 1000, 1),
        "latency_p99_ms": round(p99 * 1000, 1), **restarted,
        "restart_ratio_empty_to_in_place": round(restarted["restart_empty_folder_seconds"]
                                                 / max(restarted["restart_in_place_seconds"], 1e-9), 2),
        "processor_cpu_us_per_event": round(prof["us_per_event"], 1),
        "processor_cpu_ceiling_events_per_s": round(1e6 / prof["us_per_event"], 1),
        "target_met": rollouts_s >= 1000 and p99 < 0.25,
    }
    print(f"{'measure':40s} value")
    for k, v in result.items():
        print(f"{k:40s} {v}")
    print("processor hot spots (cProfile, tottime):")
    for line in prof["top"]:
        print("   " + line)
    print(f"worker log: {worker.log_path}")
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
