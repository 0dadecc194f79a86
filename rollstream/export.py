"""``rollstream export``: transitions and whole rollouts of one topic prefix, to Parquet (and a HF dataset).

It reads with ``isolation.level=read_committed`` and reads exactly what was committed when it started:
the end offsets of every partition (under read_committed, the last stable offsets) are taken once,
before anything is read, and each partition is read up to its end offset and no further, so it never
waits for an idle timeout and never sees an aborted or still-open transaction's records.
Transitions are deduplicated by ``transition_id`` (the first copy kept), as the trainer does.
docs/export.md describes the selection, the columns and the lineage.
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
import uuid
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
from confluent_kafka import Consumer, KafkaError, KafkaException, Message, TopicPartition
from rich.console import Console
from tqdm import tqdm

from rollstream.errors import ExportError, RollstreamError, SerializationError
from rollstream.export_columns import Kind, arrow_schema, table
from rollstream.schemas.codec import EventCodec, registry_client
from rollstream.schemas.topics import Topics, consumer_config
from rollstream.settings import ConnectionSettings, env_float
from rollstream.stream_processors.processor import transition_id

log = logging.getLogger(__name__)

Selection = str  # "transitions" or "rollouts" (calls, rewards and lifecycle events of whole rollouts)
SELECTIONS = ("transitions", "rollouts")
FINAL = {"SUCCEEDED", "FAILED", "CANCELLED"}
BATCH = 2000  # records per consume() call
CHUNK = 20_000  # transition rows per Parquet row group
STALL_S = 60.0  # a partition that delivers nothing this long below its end offset is an error


@dataclass(frozen=True)
class ExportOptions:
    out: Path
    topic_prefix: str
    kinds: tuple[Selection, ...] = SELECTIONS
    since: datetime | None = None
    until: datetime | None = None
    min_version: int | None = None
    max_version: int | None = None
    reward_name: str = "primary"  # the reward whose name and source the lineage columns carry
    lookback_s: float = 3600.0  # rollouts and rewards read from this long before --since, for lineage
    hf: bool = False
    progress: bool = True

    def in_time(self, ts_ms: int) -> bool:
        return ((self.since is None or ts_ms >= _ms(self.since))
                and (self.until is None or ts_ms < _ms(self.until)))

    def in_versions(self, version: int | None) -> bool:
        if self.min_version is None and self.max_version is None:
            return True
        return (version is not None and (self.min_version is None or version >= self.min_version)
                and (self.max_version is None or version <= self.max_version))


@dataclass
class ExportResult:
    rows: dict[str, int] = field(default_factory=dict)
    files: list[Path] = field(default_factory=list)
    duplicates: int = 0  # transitions dropped as a repeated transition_id
    undecodable: int = 0  # records skipped: not an event of the topic's schema
    records_read: int = 0
    seconds: float = 0.0


@dataclass(frozen=True)
class Span:
    """Offsets [start, end) of one partition to read."""

    topic: str
    partition: int
    start: int
    end: int


@dataclass
class RewardRef:
    name: str
    source: str
    attempt: int | None
    call_id: str | None
    terminal: bool
    time_us: int


@dataclass
class RolloutInfo:
    """What the lineage of a rollout's rows needs, gathered from its calls, rewards and lifecycle events."""

    first_ts: int | None = None  # the Kafka timestamp (ms) of its first record read
    policy: str | None = None
    versions: set[int] = field(default_factory=set)
    engine: str | None = None
    ended: dict[int, int] = field(default_factory=dict)  # attempt -> time (us) of its final lifecycle event
    calls: dict[tuple[int, str], tuple[int, int, str | None]] = field(default_factory=dict)  # -> end, version, engine
    rewards: list[RewardRef] = field(default_factory=list)

    @property
    def version(self) -> int | None:
        return min(self.versions) if self.versions else None

    def seen(self, ts_ms: int) -> None:
        self.first_ts = ts_ms if self.first_ts is None else min(self.first_ts, ts_ms)

    def reward(self, name: str, attempt: int, call_id: str | None) -> RewardRef | None:
        """The reward a row of (attempt, call_id) carries: one attached to that call, else the terminal one."""
        mine = [r for r in self.rewards if r.name == name and r.attempt in (None, attempt)]
        attached = [r for r in mine if call_id is not None and r.call_id == call_id]
        terminal = [r for r in mine if r.terminal]
        best = attached or terminal or mine
        return best[0] if best else None

    def delay_s(self, reward: RewardRef | None, attempt: int) -> float | None:
        """Reward time minus the rollout's end; for a reward attached to a call, minus that call's end."""
        if reward is None:
            return None
        base: int | None = None
        if reward.call_id is not None and (attempt, reward.call_id) in self.calls:
            base = self.calls[(attempt, reward.call_id)][0]
        elif attempt in self.ended:
            base = self.ended[attempt]
        else:
            ends = [end for (a, _), (end, _, _) in self.calls.items() if a == attempt]
            base = max(ends) if ends else None
        return None if base is None else (reward.time_us - base) / 1e6


def export(opts: ExportOptions, conn: ConnectionSettings | None = None) -> ExportResult:
    """Export ``opts``' range of ``opts.topic_prefix`` to Parquet files in ``opts.out``."""
    conn = conn or ConnectionSettings()
    started = time.perf_counter()
    topics = Topics(prefix=opts.topic_prefix)
    codec = EventCodec(registry_client(conn), topics)
    consumer = Consumer(consumer_config(f"rollstream-export-{uuid.uuid4().hex[:12]}", conn,
                                        **{"enable.partition.eof": True, "fetch.wait.max.ms": 50}))
    result = ExportResult()
    try:
        inputs = (topics.rollouts, topics.calls, topics.rewards)
        spans = plan(consumer, [*inputs, topics.transitions], opts)
        infos: dict[str, RolloutInfo] = {}
        buffered: dict[Kind, list[tuple[dict[str, Any], Message]]] = {"calls": [], "rewards": [], "rollouts": []}
        keep = "rollouts" in opts.kinds
        kinds: tuple[Kind, ...] = ("rollouts", "calls", "rewards")
        for topic, kind in zip(inputs, kinds, strict=True):
            for record, msg in decoded(consumer, codec, spans[topic], opts, result, raw_arrays=not keep):
                info = infos.setdefault(record["rollout_id"], RolloutInfo())
                ts = msg.timestamp()[1]
                learn(info, kind, record, ts)
                # Records before --since (the lookback) only tell where a rollout started.
                if keep and (opts.since is None or ts >= _ms(opts.since)):
                    buffered[kind].append((record, msg))
        opts.out.mkdir(parents=True, exist_ok=True)
        if keep:
            write_rollouts(opts, infos, buffered, result)
        if "transitions" in opts.kinds:
            write_transitions(opts, consumer, codec, spans[topics.transitions], infos, result)
    except KafkaException as exc:
        raise ExportError(f"cannot read from Kafka at {conn.kafka_bootstrap}: {exc}") from exc
    finally:
        consumer.close()
    if opts.hf:
        write_hf(opts.out, result)
    result.seconds = time.perf_counter() - started
    return result


def plan(consumer: Consumer, names: list[str], opts: ExportOptions, timeout: float = 30.0) -> dict[str, list[Span]]:
    """Every partition's [start, end): all end offsets first, in one go, then the starts."""
    meta = consumer.list_topics(timeout=timeout).topics
    missing = [t for t in names if t not in meta or meta[t].error is not None]
    if missing:
        raise ExportError(f"topic(s) {', '.join(missing)} do not exist; check --topic-prefix "
                          f"({opts.topic_prefix!r}) or create them with 'rollstream topics'")
    ends = {(t, p): consumer.get_watermark_offsets(TopicPartition(t, p), timeout=timeout, cached=False)
            for t in names for p in sorted(meta[t].partitions)}
    spans: dict[str, list[Span]] = {}
    for t in names:
        since = opts.since
        if since is not None and not t.endswith("transitions"):
            since = since - timedelta(seconds=opts.lookback_s)
        parts = sorted(meta[t].partitions)
        starts = {p: ends[(t, p)][0] for p in parts}
        if since is not None:
            found = consumer.offsets_for_times([TopicPartition(t, p, _ms(since)) for p in parts], timeout=timeout)
            for tp in found:
                # -1: no record at or after the time, so nothing to read
                low, high = ends[(t, tp.partition)]
                starts[tp.partition] = high if tp.offset < 0 else max(tp.offset, low)
        spans[t] = [Span(t, p, starts[p], ends[(t, p)][1]) for p in parts]
    return spans


def read(consumer: Consumer, spans: list[Span], progress: bool) -> Iterator[Message]:
    """The committed records of ``spans``, each partition up to its end offset, then stop."""
    todo = {s.partition: s for s in spans if s.start < s.end}
    if not todo:
        return
    topic = spans[0].topic
    bar = tqdm(total=sum(s.end - s.start for s in todo.values()), desc=topic, unit="rec", unit_scale=True,
               file=sys.stderr, disable=not progress, mininterval=0.5, leave=False)
    consumer.assign([TopicPartition(topic, p, s.start) for p, s in todo.items()])
    last = time.monotonic()
    try:
        while todo:
            msgs = consumer.consume(BATCH, timeout=0.5)
            if msgs:
                last = time.monotonic()
            for msg in msgs:
                part, span = msg.partition(), todo.get(msg.partition())  # type: ignore[arg-type]
                if span is None:
                    continue
                err = msg.error()
                offset = int(msg.offset() or 0)
                if err is not None:
                    if err.code() != KafkaError._PARTITION_EOF:
                        raise ExportError(f"reading {topic}[{part}]: {err}")
                    if offset >= span.end:  # the rest below the end: control records, aborted data
                        _done(consumer, todo, span)
                    continue
                if offset >= span.end:
                    _done(consumer, todo, span)
                    continue
                bar.update(1)
                yield msg
                if offset >= span.end - 1:
                    _done(consumer, todo, span)
            if todo and time.monotonic() - last > STALL_S:
                raise ExportError(f"no records from {topic} partitions {sorted(todo)} for {STALL_S:.0f} s below "
                                  f"their end offsets {[todo[p].end for p in sorted(todo)]}")
    finally:
        bar.close()
        consumer.unassign()


def _done(consumer: Consumer, todo: dict[int, Span], span: Span) -> None:
    del todo[span.partition]
    consumer.pause([TopicPartition(span.topic, span.partition)])


def decoded(consumer: Consumer, codec: EventCodec, spans: list[Span], opts: ExportOptions, result: ExportResult,
            raw_arrays: bool = False) -> Iterator[tuple[dict[str, Any], Message]]:
    for msg in read(consumer, spans, opts.progress):
        result.records_read += 1
        value = msg.value()
        try:
            if value is None:
                raise SerializationError("no value")
            record = codec.decode(str(msg.topic()), value, raw_arrays=raw_arrays)
            record["rollout_id"]  # noqa: B018 - every exported event has one
        except (SerializationError, KeyError) as exc:
            result.undecodable += 1
            log.warning("skipping %s[%s]@%s: %s", msg.topic(), msg.partition(), msg.offset(), exc)
            continue
        yield record, msg


def learn(info: RolloutInfo, kind: Kind, record: dict[str, Any], ts_ms: int) -> None:
    info.seen(ts_ms)
    if kind == "calls":
        version = int(record["policy_version"])
        engine = (record.get("metadata") or {}).get("engine")
        info.versions.add(version)
        info.policy = info.policy or record["policy"]
        info.engine = info.engine or engine
        info.calls[(int(record["attempt"]), record["call_id"])] = (_us(record["end_time"]), version, engine)
    elif kind == "rewards":
        info.rewards.append(RewardRef(record["name"], record["source"], record.get("attempt"),
                                      record.get("call_id"), bool(record["terminal"]), _us(record["timestamp"])))
    else:
        info.policy = info.policy or record.get("policy")
        info.engine = info.engine or (record.get("metadata") or {}).get("engine")
        if record["status"] in FINAL:
            info.ended.setdefault(int(record["attempt"]), _us(record["timestamp"]))


def lineage(msg: Message, info: RolloutInfo | None, opts: ExportOptions, attempt: int, call_id: str | None,
            *, policy: str | None = None, version: int | None = None, engine: str | None = None,
            reward: RewardRef | None = None) -> dict[str, Any]:
    info = info or RolloutInfo()
    reward = reward or info.reward(opts.reward_name, attempt, call_id)
    return {
        "policy": policy or info.policy, "policy_version": info.version if version is None else version,
        "engine": engine or info.engine,
        "reward_name": reward.name if reward else None, "reward_source": reward.source if reward else None,
        "reward_delay_s": info.delay_s(reward, attempt),
        "transition_id": None,
        "kafka_topic": msg.topic(), "kafka_partition": msg.partition(), "kafka_offset": msg.offset(),
        "kafka_timestamp": datetime.fromtimestamp(msg.timestamp()[1] / 1000, UTC),
    }


def write_rollouts(opts: ExportOptions, infos: dict[str, RolloutInfo],
                   buffered: dict[Kind, list[tuple[dict[str, Any], Message]]], result: ExportResult) -> None:
    """Whole rollouts: those whose first record falls in the time range and whose calls' version does."""
    chosen = {rid for rid, info in infos.items()
              if info.first_ts is not None and opts.in_time(info.first_ts) and opts.in_versions(info.version)}
    kind: Kind
    for kind in ("calls", "rewards", "rollouts"):
        rows = []
        for record, msg in buffered[kind]:
            rid = record["rollout_id"]
            if rid not in chosen:
                continue
            info = infos[rid]
            row = dict(record)
            if kind == "calls":
                attempt, call_id = int(record["attempt"]), record["call_id"]
                row.update(lineage(msg, info, opts, attempt, call_id, policy=record["policy"],
                                   version=int(record["policy_version"]),
                                   engine=(record.get("metadata") or {}).get("engine")))
                row["transition_id"] = transition_id(rid, attempt, call_id)
            elif kind == "rewards":
                ref = RewardRef(record["name"], record["source"], record.get("attempt"), record.get("call_id"),
                                bool(record["terminal"]), _us(record["timestamp"]))
                attempt = int(record.get("attempt") or 1)
                called = info.calls.get((attempt, record["call_id"])) if record.get("call_id") else None
                row.update(lineage(msg, info, opts, attempt, None, reward=ref,
                                   version=called[1] if called else None))
                if record.get("call_id"):
                    row["transition_id"] = transition_id(rid, attempt, record["call_id"])
            else:
                row.update(lineage(msg, info, opts, int(record["attempt"]), None, policy=record["policy"]))
            rows.append(row)
        path = opts.out / f"{kind}.parquet"
        pq.write_table(table(kind, rows), path, compression="zstd")
        result.rows[kind] = len(rows)
        result.files.append(path)


def write_transitions(opts: ExportOptions, consumer: Consumer, codec: EventCodec, spans: list[Span],
                      infos: dict[str, RolloutInfo], result: ExportResult) -> None:
    path = opts.out / "transitions.parquet"
    seen: set[str] = set()
    rows: list[dict[str, Any]] = []
    count = 0
    with pq.ParquetWriter(path, arrow_schema("transitions"), compression="zstd") as writer:
        for record, msg in decoded(consumer, codec, spans, opts, result):
            if not (opts.in_time(msg.timestamp()[1]) and opts.in_versions(int(record["policy_version"]))):
                continue
            tid = record["transition_id"]
            if tid in seen:
                result.duplicates += 1
                continue
            seen.add(tid)
            attempt, info = int(record["attempt"]), infos.get(record["rollout_id"])
            called = info.calls.get((attempt, record["call_id"])) if info else None
            row = dict(record)
            row.update(lineage(msg, info, opts, attempt, record["call_id"], policy=record["policy"],
                               version=int(record["policy_version"]),
                               engine=(record.get("metadata") or {}).get("engine") or (called[2] if called else None)))
            row["transition_id"] = tid
            rows.append(row)
            if len(rows) >= CHUNK:
                writer.write_table(table("transitions", rows))
                count += len(rows)
                rows = []
        if rows:
            writer.write_table(table("transitions", rows))
            count += len(rows)
    result.rows["transitions"] = count
    result.files.append(path)


def write_hf(out: Path, result: ExportResult) -> None:
    """Each Parquet file as a Hugging Face ``datasets`` folder under ``out/hf/<kind>``.

    ``datasets`` has no map type: map columns (``metadata``) become lists of {key, value}, the same data."""
    import tempfile

    try:
        import datasets
    except ImportError as exc:
        raise ExportError("--hf needs the 'datasets' package: pip install -e '.[export]'") from exc
    with tempfile.TemporaryDirectory(prefix="rollstream-export-hf-") as tmp:
        for path in list(result.files):
            plain = Path(tmp) / path.name
            pq.write_table(without_maps(pq.read_table(path)), plain)
            target = out / "hf" / path.stem
            datasets.Dataset.from_parquet(str(plain), cache_dir=str(Path(tmp) / "cache")).save_to_disk(str(target))
            result.files.append(target)


def without_maps(t: pa.Table) -> pa.Table:
    for i, f in enumerate(t.schema):
        if pa.types.is_map(f.type):
            entries = pa.list_(pa.struct([pa.field("key", f.type.key_type), pa.field("value", f.type.item_type)]))
            column = pa.chunked_array([pa.ListArray.from_arrays(c.offsets, pa.StructArray.from_arrays(
                [c.keys, c.items], ["key", "value"]), mask=c.is_null()) for c in t.column(i).chunks], entries)
            t = t.set_column(i, pa.field(f.name, entries), column)
    return t


def _ms(t: datetime) -> int:
    return int(t.timestamp() * 1000)


def _us(value: Any) -> int:
    if isinstance(value, datetime):
        return int(value.timestamp() * 1_000_000)
    return int(value)


def parse_time(text: str) -> datetime:
    """An ISO 8601 time; without a zone it is UTC."""
    try:
        t = datetime.fromisoformat(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"{text!r} is not an ISO 8601 time (e.g. 2025-06-01T12:00:00Z)") from exc
    return t if t.tzinfo is not None else t.replace(tzinfo=UTC)


def parse_kinds(text: str) -> tuple[Selection, ...]:
    kinds = tuple(k.strip() for k in text.split(",") if k.strip())
    bad = [k for k in kinds if k not in SELECTIONS]
    if bad or not kinds:
        raise argparse.ArgumentTypeError(f"unknown kind(s) {', '.join(bad) or '(none)'}; "
                                         f"choose from {', '.join(SELECTIONS)}")
    return kinds


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="rollstream export", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, required=True, help="output folder (created; must be empty unless --force)")
    p.add_argument("--topic-prefix", help="prefix of the topics (default: ROLLSTREAM_TOPIC_PREFIX)")
    p.add_argument("--kinds", type=parse_kinds, default=SELECTIONS,
                   help="what to export: transitions, rollouts (calls + rewards + lifecycle events), or both "
                        "(default: transitions,rollouts)")
    p.add_argument("--since", type=parse_time, help="from this time (ISO 8601, inclusive; no zone: UTC)")
    p.add_argument("--until", type=parse_time, help="before this time (ISO 8601, exclusive; no zone: UTC)")
    p.add_argument("--min-version", type=int, help="lowest policy version (inclusive)")
    p.add_argument("--max-version", type=int, help="highest policy version (inclusive)")
    p.add_argument("--reward-name", default="primary",
                   help="the reward named in the lineage columns (default: primary, as the processor)")
    p.add_argument("--lookback-s", type=float, default=None,
                   help="with --since, read rollout events and rewards from this many seconds earlier, for "
                        "lineage and to know where rollouts start (default: ROLLSTREAM_PROCESS_EXPIRE_AFTER)")
    p.add_argument("--hf", action="store_true", help="also write a Hugging Face datasets folder per file (out/hf/)")
    p.add_argument("--force", action="store_true", help="write into a non-empty output folder")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bars")
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    return p


def options_from(args: argparse.Namespace, parser: argparse.ArgumentParser) -> ExportOptions:
    """The options, or ``parser.error`` (exit 2) naming what to change."""
    if args.since and args.until and args.since >= args.until:
        parser.error(f"--since ({args.since.isoformat()}) must be before --until ({args.until.isoformat()})")
    if args.min_version is not None and args.max_version is not None and args.min_version > args.max_version:
        parser.error(f"--min-version {args.min_version} is above --max-version {args.max_version}")
    for name in ("min_version", "max_version"):
        if getattr(args, name) is not None and getattr(args, name) < 0:
            parser.error(f"--{name.replace('_', '-')} must be 0 or more")
    lookback = env_float("PROCESS_EXPIRE_AFTER") if args.lookback_s is None else args.lookback_s
    if lookback < 0:
        parser.error("--lookback-s must be 0 or more")
    if args.out.exists() and not args.out.is_dir():
        parser.error(f"--out {args.out} is a file, not a folder")
    if args.out.is_dir() and any(args.out.iterdir()) and not args.force:
        parser.error(f"--out {args.out} is not empty; choose another folder or pass --force to overwrite")
    if args.hf:
        try:
            import datasets  # noqa: F401
        except ImportError:
            parser.error("--hf needs the 'datasets' package: pip install -e '.[export]'")
    conn = ConnectionSettings()
    return ExportOptions(out=args.out, topic_prefix=args.topic_prefix or conn.topic_prefix, kinds=args.kinds,
                         since=args.since, until=args.until, min_version=args.min_version,
                         max_version=args.max_version, reward_name=args.reward_name, lookback_s=lookback,
                         hf=args.hf, progress=not args.quiet)


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(list(sys.argv[1:] if argv is None else argv))
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.WARNING,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    console = Console(stderr=True)
    try:
        opts = options_from(args, parser)
        result = export(opts)
    except RollstreamError as exc:
        console.print(f"[red]error:[/] {exc}")
        return 2
    except KeyboardInterrupt:
        return 130
    for kind, n in result.rows.items():
        console.print(f"{kind:12} {n:8d} rows  {opts.out / (kind + '.parquet')}")
    console.print(f"read {result.records_read} records in {result.seconds:.1f} s; "
                  f"{result.duplicates} duplicate transitions dropped, {result.undecodable} undecodable skipped"
                  + (f"; datasets in {opts.out / 'hf'}" if opts.hf else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
