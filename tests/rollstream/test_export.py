"""``rollstream export`` against the real stack: a demo-like run joined by the real processor, read back from Parquet.

The run is the viewer tests' (tests/ui/ui_helpers.py): calculator rollouts of three tasks, policy
versions 0, 1 and 2, one reward seconds late, one undecodable record. On top of it the transitions topic
gets a duplicate of one transition, a transactional write that was aborted and one still open when the
export starts: the export must find each transition the trainer would train exactly once, at the offset
a read_committed consumer reads it from, and nothing of the two transactions.
"""

from __future__ import annotations

import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from confluent_kafka import Producer

TESTS = Path(__file__).resolve().parents[1]
for folder in ("ui", "stream_processors"):  # the run and the reader those tests use
    if str(TESTS / folder) not in sys.path:
        sys.path.insert(0, str(TESTS / folder))

from sp_helpers import Pipe  # noqa: E402
from ui_helpers import Processor, RunWriter, publish_run  # noqa: E402

from rollstream.export import ExportOptions, export, main  # noqa: E402
from rollstream.schemas import make_event  # noqa: E402
from rollstream.schemas.codec import EventCodec, register_schemas, registry_client  # noqa: E402
from rollstream.schemas.topics import Topics, create_topics  # noqa: E402
from rollstream.settings import ConnectionSettings  # noqa: E402

pytestmark = [pytest.mark.integration, pytest.mark.slow]

GROUPS, GROUP_SIZE, CALLS = 3, 3, 2  # version g for task g: versions 0, 1, 2
N = GROUPS * GROUP_SIZE * CALLS


@pytest.fixture(scope="module")
def run(settings: ConnectionSettings, tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    """The run, once for the module's tests (they only read it)."""
    topics = Topics(prefix=f"t.export{uuid.uuid4().hex[:8]}.", partitions=3)
    create_topics(topics, settings)
    register_schemas(registry_client(settings), topics)
    codec = EventCodec(registry_client(settings), topics)
    processor = Processor(settings, topics, tmp_path_factory.mktemp("processor"))
    try:
        writer = RunWriter(settings, topics, codec)
        info = publish_run(writer, groups=GROUPS, group_size=GROUP_SIZE, late_delay_s=1.5)
        msgs = Pipe(settings, topics, codec).read(topics.transitions, N, timeout=60)
        assert len(msgs) == N, processor.log()
    finally:
        processor.stop()
    # A repeat of one transition (a producer retry), then a transaction aborted and one left open.
    raw = Producer({"bootstrap.servers": settings.kafka_bootstrap, "partitioner": "murmur2_random"})
    raw.produce(topics.transitions, value=msgs[0].value(), key=msgs[0].key())
    assert raw.flush(30) == 0
    open_txn = None
    for tid in ("tr-aborted", "tr-open"):
        txn = Producer({"bootstrap.servers": settings.kafka_bootstrap, "partitioner": "murmur2_random",
                        "transactional.id": f"export-test-{uuid.uuid4().hex[:8]}",
                        "transaction.timeout.ms": 300_000})
        txn.init_transactions(30)
        txn.begin_transaction()
        for k in range(3):  # one per partition, likely: keys spread over them
            rid = f"{tid}-{k}"
            record = make_event("Transition", transition_id=f"{tid}-{k}", source="test", rollout_id=rid,
                                call_id="c0", sequence=0, policy="calc", policy_version=1, prompt_token_ids=[1],
                                response_token_ids=[2], behaviour_logprobs=[-0.1], reward=1.0,
                                credited_return=1.0, terminal_reward=1.0)
            txn.produce(topics.transitions, value=codec.encode(topics.transitions, record), key=rid.encode())
        assert txn.flush(30) == 0
        if tid == "tr-aborted":
            txn.abort_transaction(30)
        else:
            open_txn = txn
    yield {**info, "msgs": msgs, "codec": codec, "topics": topics}
    assert open_txn is not None
    open_txn.abort_transaction(30)


def read_back(out: Path, kind: str) -> pa.Table:
    return pq.read_table(out / f"{kind}.parquet")


def test_export_every_transition_once_with_lineage(run: dict[str, Any], settings: ConnectionSettings,
                                                   tmp_path: Path) -> None:
    topics, codec, msgs = run["topics"], run["codec"], run["msgs"]
    started = time.monotonic()
    result = export(ExportOptions(out=tmp_path / "all", topic_prefix=topics.prefix, progress=False), settings)
    assert time.monotonic() - started < 20  # stops at the end offsets: no idle timeout, no wait for the open txn
    t = read_back(tmp_path / "all", "transitions")
    schema = t.schema
    assert schema.field("prompt_token_ids").type == pa.list_(pa.int32())
    assert schema.field("behaviour_logprobs").type == pa.list_(pa.float32())
    assert schema.field("timestamp").type == pa.timestamp("us", tz="UTC")
    assert schema.field("kafka_timestamp").type == pa.timestamp("ms", tz="UTC")
    rows = t.to_pylist()
    ids = [r["transition_id"] for r in rows]
    expected = {}
    for m in msgs:
        rec = codec.decode(topics.transitions, m.value())
        expected[rec["transition_id"]] = (m, rec)
    assert len(ids) == len(set(ids)) == N and set(ids) == set(expected)  # each once; nothing aborted or open
    assert result.rows["transitions"] == N and result.duplicates == 1
    for row in rows:
        m, rec = expected[row["transition_id"]]
        assert (row["kafka_topic"], row["kafka_partition"], row["kafka_offset"]) == (m.topic(), m.partition(),
                                                                                      m.offset())
        assert int(row["kafka_timestamp"].timestamp() * 1000) == m.timestamp()[1]
        assert row["policy_version"] == rec["policy_version"] == int(row["task_id"].split("-")[1])
        assert row["policy"] == "calc" and row["engine"] is None
        assert row["prompt_token_ids"] == rec["prompt_token_ids"]
        assert row["behaviour_logprobs"] == pytest.approx(rec["behaviour_logprobs"])
        assert row["reward_name"] == "primary"
        late = row["rollout_id"] == run["delayed"]
        assert row["reward_source"] == ("slow-grader" if late else "grader")
        assert row["reward_delay_s"] is not None and (row["reward_delay_s"] > 1.0) == late
        assert row["reward"] == run["rewards"][row["rollout_id"]]
    # Whole rollouts: every call, reward and lifecycle event; the undecodable record skipped.
    calls = read_back(tmp_path / "all", "calls").to_pylist()
    assert len(calls) == N and {c["transition_id"] for c in calls} == set(expected)
    assert read_back(tmp_path / "all", "calls").schema.field("response_logprobs").type == pa.list_(pa.float32())
    rewards = read_back(tmp_path / "all", "rewards").to_pylist()
    assert sorted(r["rollout_id"] for r in rewards) == sorted(run["rids"])
    assert all(r["reward_name"] == "primary" and r["reward_delay_s"] is not None for r in rewards)
    lifecycle = read_back(tmp_path / "all", "rollouts").to_pylist()
    assert len(lifecycle) == 2 * len(run["rids"]) and {r["policy_version"] for r in lifecycle} == {0, 1, 2}
    assert result.undecodable == 1


def test_export_version_and_time_range(run: dict[str, Any], settings: ConnectionSettings, tmp_path: Path,
                                       monkeypatch: pytest.MonkeyPatch) -> None:
    topics = run["topics"]
    monkeypatch.setenv("ROLLSTREAM_KAFKA_BOOTSTRAP", settings.kafka_bootstrap)
    monkeypatch.setenv("ROLLSTREAM_SCHEMA_REGISTRY_URL", settings.schema_registry_url)
    out = tmp_path / "v1"
    assert main(["--out", str(out), "--topic-prefix", topics.prefix, "--min-version", "1", "--max-version", "1",
                 "--hf", "-q"]) == 0
    t = read_back(out, "transitions").to_pylist()
    assert len(t) == GROUP_SIZE * CALLS and {r["policy_version"] for r in t} == {1}
    assert {r["task_id"] for r in t} == {"task-1"}
    calls = read_back(out, "calls").to_pylist()
    assert {c["transition_id"] for c in calls} == {r["transition_id"] for r in t}
    assert {r["policy_version"] for r in read_back(out, "rewards").to_pylist()} == {1}
    assert len(read_back(out, "rollouts")) == 2 * GROUP_SIZE
    import datasets

    ds = datasets.load_from_disk(str(out / "hf" / "transitions"))
    assert len(ds) == len(t) and set(ds["transition_id"]) == {r["transition_id"] for r in t}
    # A time range after every record: nothing; one before it all: nothing either.
    late = tmp_path / "late"
    assert main(["--out", str(late), "--topic-prefix", topics.prefix, "--since", "2999-01-01T00:00:00Z", "-q"]) == 0
    assert len(read_back(late, "transitions")) == 0 and len(read_back(late, "calls")) == 0
    early = tmp_path / "early"
    assert main(["--out", str(early), "--topic-prefix", topics.prefix, "--until", "2001-01-01", "-q"]) == 0
    assert len(read_back(early, "transitions")) == 0


def test_bad_options_exit_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    for argv, says in ((["--min-version", "3", "--max-version", "1"], "--min-version 3 is above"),
                       (["--since", "yesterday"], "not an ISO 8601 time"),
                       (["--since", "2025-02-01", "--until", "2025-01-01"], "must be before --until"),
                       (["--kinds", "everything"], "unknown kind(s) everything")):
        with pytest.raises(SystemExit) as exc:
            main(["--out", str(tmp_path / "x"), *argv])
        assert exc.value.code == 2
        assert says in capsys.readouterr().err
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "f").write_text("x")
    with pytest.raises(SystemExit) as exc:
        main(["--out", str(tmp_path / "full")])
    assert exc.value.code == 2 and "not empty" in capsys.readouterr().err
