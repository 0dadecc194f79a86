"""The rollout viewer at scale: index build rate and page latency with 100k rollouts in the topics.

Publishes N synthetic rollouts to a fresh prefix (per rollout: started, two calls with 150 prompt
and 30 response tokens and their logprobs, succeeded, a reward, two transitions: 7 records), then
measures on the same data:

- baseline: raw consume rate (every record of the prefix's topics read, nothing decoded);
- the viewer's index built from the beginning (records/s, rollouts/s, ratio to the baseline, RSS growth);
- page latency through the app (Starlette's test client, no network): the list's first page, a filtered
  list, and rollout pages, each read back by offset; baseline: the bare fetch of a rollout's records.

    .venv/bin/python bench/ui.py            # 100k rollouts (~700k records)
    .venv/bin/python bench/ui.py --quick    # 10k rollouts, under a minute
"""

from __future__ import annotations

import argparse
import json
import random
import resource
import statistics
import sys
import time
import uuid
from dataclasses import replace
from itertools import islice

from confluent_kafka import OFFSET_BEGINNING, Consumer, Producer, TopicPartition
from confluent_kafka.admin import AdminClient
from starlette.testclient import TestClient

from rollstream.schemas import make_event
from rollstream.schemas.codec import EventCodec, register_schemas, registry_client
from rollstream.schemas.topics import Topics, client_config, consumer_config, create_topics, producer_config
from rollstream.settings import ConnectionSettings
from rollstream.ui.app import Viewer, build_app
from rollstream.ui.index import RolloutIndex

SMALL = 1000  # rollouts in the page-latency baseline
SAMPLING = {"temperature": 1.0, "top_p": None, "max_tokens": 48, "stop": [], "seed": None, "n": 1}


def publish(codec: EventCodec, conn: ConnectionSettings, n: int) -> float:
    t = codec.topics
    producer = Producer(producer_config(conn, **{"linger.ms": 50, "batch.size": 1_000_000,
                                                 "queue.buffering.max.messages": 1_000_000}))
    prompt, resp, lps = list(range(100, 250)), list(range(300, 330)), [-0.1 * (k % 9) for k in range(30)]
    msg = [{"role": "user", "content": "What is 12 plus 30?", "name": None, "tool_call_id": None,
            "tool_calls_json": None}]
    started = time.perf_counter()

    def send(topic: str, rid: str, rec: dict) -> None:
        while True:
            try:
                producer.produce(topic, codec.encode(topic, rec), rid.encode())
                return
            except BufferError:
                producer.poll(0.1)

    for i in range(n):
        rid = f"r{i:07d}-{uuid.uuid4().hex[:6]}"
        group, version = f"g{i // 8}", i * 20 // n
        send(t.rollouts, rid, make_event("RolloutEvent", source="bench", rollout_id=rid, status="STARTED",
                                         policy="p", group_id=group, task_id=f"task-{i // 8}"))
        for seq in range(2):
            send(t.calls, rid, make_event(
                "LlmCall", source="bench", rollout_id=rid, call_id=f"c{seq}", sequence=seq, policy="p",
                policy_version=version, messages=msg, sampling=SAMPLING, response_text="Answer: 42",
                prompt_token_ids=prompt, response_token_ids=resp, response_logprobs=lps, start_time=1, end_time=2,
                latency_ms=1.0))
        send(t.rollouts, rid, make_event("RolloutEvent", source="bench", rollout_id=rid, status="SUCCEEDED",
                                         policy="p", group_id=group))
        value = float(random.random() < 0.5)
        send(t.rewards, rid, make_event("Reward", source="bench", rollout_id=rid, name="primary", value=value,
                                        terminal=True))
        for seq in range(2):
            send(t.transitions, rid, make_event(
                "Transition", transition_id=f"{rid}-{seq}", source="bench", rollout_id=rid, attempt=1,
                call_id=f"c{seq}", sequence=seq, group_id=group, policy="p", policy_version=version,
                prompt_token_ids=prompt, response_token_ids=resp, behaviour_logprobs=lps, reward=value,
                credited_return=value, terminal_reward=value, credit_assignment="broadcast", token_source="engine"))
        producer.poll(0)
    producer.flush(120)
    return time.perf_counter() - started


def raw_consume(conn: ConnectionSettings, topics: Topics, names: list[str]) -> tuple[int, float]:
    """Every record of ``names`` read once and nothing decoded, with the index's consumer settings and loop
    (read_committed, from the beginning, done at the high watermarks seen at the start): (records, seconds)."""
    started = time.perf_counter()
    c = Consumer(consumer_config(f"bench-ui-raw-{uuid.uuid4().hex}", conn, **{
        "enable.partition.eof": False, "fetch.wait.max.ms": 100, "queued.max.messages.kbytes": 65536}))
    meta = c.list_topics(timeout=10).topics
    tps = [TopicPartition(name, p, OFFSET_BEGINNING) for name in names for p in meta[name].partitions]
    ends = {(tp.topic, tp.partition): c.get_watermark_offsets(TopicPartition(tp.topic, tp.partition), timeout=10)[1]
            for tp in tps}
    c.assign(tps)
    count = 0
    while True:
        for m in c.consume(2000, 0.2):
            if m.error() is None:
                count += len(m.value() or b"") >= 0
        if all(tp.offset >= ends[(tp.topic, tp.partition)] for tp in c.position(tps)):
            break
    took = time.perf_counter() - started
    c.close()
    return count, took


def small_viewer(viewer: Viewer, keep: int) -> Viewer:
    """The same viewer over only the first ``keep`` of its rollouts: the page baseline at a small scale."""
    index = RolloutIndex(viewer.codec, viewer.conn)
    index.rollouts = dict(islice(viewer.index.rollouts.items(), keep))
    index.reward_names = viewer.index.reward_names.copy()
    index.stats.caught_up_s = viewer.index.stats.caught_up_s
    for r in index.rollouts.values():
        index._status_counts[r.status] += 1
    return replace(viewer, index=index)


def rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def timed(client: TestClient, url: str, times: int) -> list[float]:
    out = []
    for _ in range(times):
        t0 = time.perf_counter()
        r = client.get(url)
        out.append((time.perf_counter() - t0) * 1000)
        assert r.status_code == 200, (url, r.status_code)
    return out


def summary(xs: list[float]) -> str:
    xs = sorted(xs)
    return f"median {statistics.median(xs):7.1f} ms   p95 {xs[int(0.95 * (len(xs) - 1))]:7.1f} ms"


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--rollouts", type=int, default=100_000)
    p.add_argument("--quick", action="store_true", help="10k rollouts")
    p.add_argument("--keep", action="store_true", help="keep the topics (default: deleted at the end)")
    args = p.parse_args()
    n = 10_000 if args.quick else args.rollouts
    conn = replace(ConnectionSettings(), topic_prefix=f"bench.ui.{uuid.uuid4().hex[:8]}.")
    topics = Topics(conn.topic_prefix, 3)
    create_topics(topics, conn)
    register_schemas(registry_client(conn), topics)
    codec = EventCodec(registry_client(conn), topics)
    try:
        produce_s = publish(codec, conn, n)
        names = [topics.calls, topics.rewards, topics.rollouts, topics.transitions]
        records, raw_s = raw_consume(conn, topics, names)
        rss0 = rss_mb()
        viewer = Viewer.open(conn)
        viewer.index.start()
        assert viewer.index.wait_caught_up(900), "the index did not catch up in 15 minutes"
        build_s = viewer.index.stats.caught_up_s or 0.0
        rss1 = rss_mb()
        indexed = len(viewer.index.rollouts)
        client = TestClient(build_app(viewer))
        small = TestClient(build_app(small_viewer(viewer, SMALL)))
        rids = random.sample(list(viewer.index.rollouts), 30)
        for c in (client, small):  # warm: templates compiled, the fetch consumer's partitions visited
            timed(c, "/", 2)
            timed(c, "/rollouts/" + rids[0], 1)
        pages = {"list": "/", "filtered": "/?status=SUCCEEDED&version=7&page=3", "last": "/?page={last}"}
        lat: dict[str, tuple[list[float], list[float]]] = {}
        for key, url in pages.items():
            big_url = url.format(last=max(1, n // 50))
            small_url = url.format(last=max(1, min(n, SMALL) // 50))
            lat[key] = (timed(client, big_url, 10), timed(small, small_url, 10))
        page = [timed(client, "/rollouts/" + rid, 1)[0] for rid in rids]
        fetch = []
        for rid in rids:
            t0 = time.perf_counter()
            viewer.fetcher.fetch(viewer.index.refs(rid))
            fetch.append((time.perf_counter() - t0) * 1000)
        curves = timed(client, "/curves", 3)
        viewer.close()
    finally:
        if not args.keep:
            AdminClient(client_config(conn)).delete_topics([s.name for s in topics.specs()])
    raw_rate, idx_rate = records / raw_s, records / max(build_s, 1e-9)
    med = statistics.median
    figures: dict[str, float] = {
        "rollouts": n, "records": records, "indexed_rollouts": indexed, "produce_s": round(produce_s, 1),
        "raw_consume_records_per_s": round(raw_rate), "index_build_s": round(build_s, 2),
        "index_records_per_s": round(idx_rate), "index_rollouts_per_s": round(indexed / max(build_s, 1e-9)),
        "index_vs_raw": round(idx_rate / raw_rate, 3), "index_rss_growth_mb": round(rss1 - rss0, 1),
        "rollout_page_ms_median": round(med(page), 1),
        "rollout_page_ms_p95": round(sorted(page)[int(0.95 * (len(page) - 1))], 1),
        "raw_fetch_ms_median": round(med(fetch), 1), "rollout_page_vs_fetch": round(med(page) / med(fetch), 2),
        "curves_ms_median": round(med(curves), 1),
    }
    for key, (big, little) in lat.items():
        figures[f"{key}_ms_median"] = round(med(big), 1)
        figures[f"{key}_ms_median_at_{SMALL}"] = round(med(little), 1)
        figures[f"{key}_vs_{SMALL}"] = round(med(big) / med(little), 2)
    print(f"rollstream ui bench: {n} rollouts, {records} records (published in {produce_s:.1f} s)")
    print(f"  raw consume (baseline)   {raw_rate:10.0f} records/s                          {raw_s:6.2f} s")
    print(f"  index build              {idx_rate:10.0f} records/s  {figures['index_rollouts_per_s']:8.0f} rollouts/s  "
          f"{build_s:6.2f} s  ({figures['index_vs_raw']:.2f}x raw)  RSS +{rss1 - rss0:.0f} MB")
    print(f"  page latency with {n} rollouts (baseline: the same page over {SMALL} of them)")
    for key, label in (("list", "list, first page"), ("filtered", "list, filtered, page 3"),
                       ("last", "list, last page")):
        big, little = lat[key]
        print(f"  {label:24} {summary(big)}   at {SMALL}: {summary(little)}   ({med(big) / med(little):.2f}x)")
    print(f"  rollout page             {summary(page)}   ({figures['rollout_page_vs_fetch']:.2f}x the fetch)")
    print(f"  its records by offset    {summary(fetch)}   (baseline: the fetch alone)")
    print(f"  curves page              {summary(curves)}")
    print(json.dumps(figures))
    return 0


if __name__ == "__main__":
    sys.exit(main())
