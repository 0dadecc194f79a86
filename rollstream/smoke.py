"""The smoke job: one of every event type through Kafka and the registry, and back.

Until the closed training loop runs end to end, this is what ``rollstream smoke``
proves on a fresh stack: topics exist and are co-partitioned, schemas are registered
with BACKWARD compatibility, and every event decodes to what was published.
"""

from __future__ import annotations

import time
import uuid
from typing import Any

from rich.console import Console
from rich.table import Table
from tqdm import tqdm

from rollstream.events import EventProducer, read_events
from rollstream.schemas import EventType, make_event
from rollstream.schemas.codec import EventCodec, register_schemas, registry_client
from rollstream.schemas.samples import SAMPLES
from rollstream.schemas.topics import Topics, create_topics
from rollstream.settings import ConnectionSettings


def sample_event(event_type: EventType, i: int) -> tuple[str, dict[str, Any]]:
    """A distinct event of ``event_type`` (built from its test vector) and its Kafka key."""
    base = dict(SAMPLES[event_type])
    base.pop("event_id", None)
    base.pop("timestamp", None)
    if event_type == "Transition":
        base["transition_id"] = base["event_id"] = f"tr-{uuid.uuid4().hex}"
    if "rollout_id" in base:
        base["rollout_id"] = f"ro-{i}"
    record = make_event(event_type, **base)
    key = record.get("rollout_id") or record.get("policy") or record["event_id"]
    return str(key), record


def run_smoke(console: Console, count: int = 100, settings: ConnectionSettings | None = None) -> int:
    settings = settings or ConnectionSettings()
    topics = Topics.from_settings(settings)
    created = create_topics(topics, settings)
    if created:
        console.print(f"created topics: {', '.join(created)}")
    client = registry_client(settings)
    ids = register_schemas(client, topics)
    console.print(f"schemas registered (BACKWARD): {len(ids)} subjects")
    codec = EventCodec(client, topics)
    producer = EventProducer(codec, settings)
    by_topic = {spec.name: spec.event_type for spec in topics.specs() if spec.event_type is not None}
    sent: dict[str, dict[str, Any]] = {}
    t0 = time.perf_counter()
    for topic, event_type in tqdm(by_topic.items(), desc="publishing", unit="topic"):
        for i in range(count):
            key, record = sample_event(event_type, i)
            producer.publish(topic, key, record)
            sent[record["event_id"]] = record
    producer.flush()
    t_pub = time.perf_counter() - t0
    t0 = time.perf_counter()
    group = f"rollstream-smoke-{uuid.uuid4().hex[:8]}"
    matched = 0
    # Earlier smoke runs left events on these topics; only this run's ids count.
    expected = len(sent)
    with tqdm(total=expected, desc="reading back", unit="event") as bar:
        for rec in read_events(codec, list(by_topic), group, count=10**9, timeout=120, settings=settings):
            original = sent.get(rec.value["event_id"])
            if original is None:
                continue
            decoded = {k: v for k, v in rec.value.items() if k not in ("timestamp", "start_time", "end_time")}
            if all(decoded[k] == v for k, v in original.items() if k in decoded):
                matched += 1
            bar.update(1)
            if bar.n >= expected:
                break
    t_read = time.perf_counter() - t0
    table = Table("step", "events", "seconds", "events/s")
    table.add_row("publish", str(expected), f"{t_pub:.2f}", f"{expected / t_pub:,.0f}")
    table.add_row("read back", str(matched), f"{t_read:.2f}", f"{matched / t_read:,.0f}")
    console.print(table)
    if matched != expected:
        console.print(f"[red]{expected - matched} event(s) did not decode to what was published[/]")
        return 1
    console.print(f"[green]smoke run passed[/]: {matched} events of {len(by_topic)} types round-tripped")
    return 0
