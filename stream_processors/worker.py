"""``rollstream process``: the stream processor that joins calls, rewards and rollout events into transitions.

A Faust app hosts it: its web server (``/metrics``, ``/stats``), its timers (the counter
log line), signals and shutdown. The records themselves go through the exactly-once core
in engine.py (consume a batch, process it, one transaction per partition), on a thread of
its own; the join's logic is the pure Processor in processor.py. See docs/stream-processor.md.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import sys
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import faust
from confluent_kafka.admin import AdminClient, NewTopic

from rollstream.errors import ProcessorError, RollstreamError
from rollstream.schemas.codec import EventCodec, registry_client
from rollstream.schemas.topics import (
    MAX_RECORD_BYTES,
    Topics,
    check_copartitioned,
    client_config,
    create_topics,
)
from rollstream.settings import ConnectionSettings, kafka_client_config
from rollstream.stream_processors.auth import faust_credentials
from rollstream.stream_processors.config import ProcessorSettings
from rollstream.stream_processors.engine import Engine, changelog_topic
from rollstream.stream_processors.metrics import Metrics
from rollstream.stream_processors.processor import Processor

log = logging.getLogger(__name__)


def prepare_topics(settings: ProcessorSettings, conn: ConnectionSettings, topics: Topics) -> int:
    """Create what is missing, then check every topic the worker touches has the same partition count."""
    create_topics(topics, conn)
    n = check_copartitioned(topics, conn)
    admin = AdminClient(client_config(conn))
    changelog = changelog_topic(settings.app_id)
    meta = admin.list_topics(timeout=30).topics
    if changelog not in meta:
        new = NewTopic(changelog, num_partitions=n, replication_factor=1,
                       config={"cleanup.policy": "compact", "max.message.bytes": str(MAX_RECORD_BYTES)})
        try:
            admin.create_topics([new], operation_timeout=30)[changelog].result()
        except Exception as exc:  # already created by a second worker starting alongside is fine
            if "TOPIC_ALREADY_EXISTS" not in str(exc):
                raise ProcessorError(f"cannot create topic '{changelog}': {exc}") from exc
        deadline = time.monotonic() + 30
        while changelog not in meta and time.monotonic() < deadline:
            time.sleep(0.2)  # a new topic takes a moment to show in metadata
            meta = admin.list_topics(timeout=30).topics
    for name in (topics.transitions, topics.late_events, changelog):
        count = len(meta[name].partitions)
        if count != n:
            raise ProcessorError(
                f"topic '{name}' has {count} partitions but '{topics.calls}' has {n}; the processor's output "
                f"and state topics must be co-partitioned with its inputs — recreate '{name}' with {n}"
            )
    return n


def build_engine(settings: ProcessorSettings, conn: ConnectionSettings, topics: Topics,
                 stop_at_end: bool = False) -> Engine:
    metrics = Metrics()
    processor = Processor(settings, topics, EventCodec(registry_client(conn), topics), metrics)
    return Engine(settings, conn, topics, processor, metrics, stop_at_end=stop_at_end)


def build_app(settings: ProcessorSettings, conn: ConnectionSettings, engine: Engine) -> faust.App:
    """The Faust app around the engine: web pages, the log timer, and the engine's thread as a task."""
    brokers = [f"kafka://{h.strip()}" for h in conn.kafka_bootstrap.split(",") if h.strip()]
    app = faust.App(
        f"{settings.app_id}-web", broker=brokers,
        broker_credentials=faust_credentials(kafka_client_config(conn.kafka_config)),
        store="memory://", datadir=str(settings.data_dir), web_enabled=True, web_port=settings.web_port,
        web_bind="127.0.0.1", web_host="127.0.0.1",
    )
    app.producer_only = True  # web server and producer only: no consumer group, agents or tables of its own
    metrics = engine.metrics

    @app.page("/metrics")
    async def prometheus(web: Any, request: Any) -> Any:
        return web.bytes(metrics.prometheus().encode(), content_type="text/plain; version=0.0.4")

    @app.page("/stats")
    async def stats(web: Any, request: Any) -> Any:
        return web.json(metrics.snapshot())

    @app.timer(settings.log_interval, name="stats-log")
    async def stats_log() -> None:
        log.info("processor: %s", metrics.log_line())

    @app.task
    async def run_engine() -> None:
        try:
            await asyncio.get_running_loop().run_in_executor(None, engine.run)
        except BaseException:
            # Nothing of the failed batch was committed: the next start takes it again from the last commit.
            log.critical("the processor stopped on an error; exiting, to start again from the last commit",
                         exc_info=True)
            logging.shutdown()
            os._exit(70)

    @app.on_before_shutdown.connect  # type: ignore[misc,arg-type]
    async def stop_engine(app: Any, **kwargs: Any) -> None:
        engine.stop.set()

    return app


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="rollstream process", description=__doc__.split("\n")[0])
    p.add_argument("--topic-prefix", help="prefix of the topics (default: ROLLSTREAM_TOPIC_PREFIX)")
    p.add_argument("--partitions", type=int, help="partitions of topics created here (default: ROLLSTREAM_PARTITIONS)")
    p.add_argument("--app-id", help="consumer group, transactional ids and changelog (default: "
                                    "ROLLSTREAM_PROCESS_APP_ID, else <topic prefix>processor, <replay prefix>replay)")
    p.add_argument("--data-dir", help="local state folder (default: ROLLSTREAM_PROCESS_DATA_DIR, "
                                      "else $ROLLSTREAM_HOME/processor/<app id>)")
    p.add_argument("--web-port", type=int, help="web server port for /metrics and /stats")
    p.add_argument("--guarantee", choices=["exactly_once", "at_least_once"])
    p.add_argument("--replay-to", metavar="PREFIX",
                   help="replay: read the inputs from their start to where they end now and write transitions, "
                        "dead letters and late events under PREFIX (e.g. 'replay1.'), exactly once, then stop; "
                        "the live pipeline is not touched")
    p.add_argument("--credit", help="credit rules (default: ROLLSTREAM_PROCESS_CREDIT)")
    p.add_argument("--agent-match",
                   help="regex on the agent name of trained calls (default: ROLLSTREAM_PROCESS_AGENT_MATCH)")
    p.add_argument("--reward-name", help="reward dimension joined (default: ROLLSTREAM_PROCESS_REWARD_NAME)")
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    return p


def settings_from(args: argparse.Namespace) -> tuple[ProcessorSettings, ConnectionSettings, Topics]:
    conn = ConnectionSettings.from_args(args, "topic_prefix", "partitions")
    app_id = args.app_id or (f"{args.replay_to}replay" if args.replay_to else None)
    settings = ProcessorSettings.from_args(
        args, "web_port", "guarantee", "credit", "agent_match", "reward_name", app_id=app_id,
        data_dir=Path(args.data_dir) if args.data_dir else None).for_prefix(conn.topic_prefix)
    topics = Topics(conn.topic_prefix, conn.partitions, outputs=args.replay_to or "")
    if args.replay_to == conn.topic_prefix:
        raise ProcessorError(f"--replay-to {args.replay_to!r} is the live prefix; choose another, e.g. 'replay1.'")
    n = prepare_topics(settings, conn, topics)
    return settings, conn, Topics(conn.topic_prefix, n, outputs=topics.outputs)


def replay(engine: Engine) -> int:
    """Run the engine to the inputs' ends on this thread's watch, with a progress bar."""
    from tqdm import tqdm

    errors: list[BaseException] = []

    def run() -> None:
        try:
            engine.run()
        except BaseException as exc:  # reported below
            errors.append(exc)

    thread = threading.Thread(target=run, name="replay", daemon=True)
    thread.start()
    with tqdm(desc="replay", unit="event") as bar:
        while thread.is_alive():
            thread.join(0.5)
            bar.total = sum(engine.ends.values()) or None
            bar.n = engine.metrics.counts["events"]
            bar.refresh()
    if errors:
        log.error("replay stopped: %s", errors[0])
        return 1
    log.info("replay done: %s", engine.metrics.log_line())
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(list(sys.argv[1:] if argv is None else argv))
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        settings, conn, topics = settings_from(args)
        engine = build_engine(settings, conn, topics, stop_at_end=bool(args.replay_to))
    except RollstreamError as exc:
        log.error("%s", exc)
        return 2
    log.info("processing %s -> %s (app %s, %d partitions, %s)", ", ".join(topics.copartitioned),
             topics.transitions, settings.app_id, topics.partitions, settings.guarantee)
    if args.replay_to:
        return replay(engine)
    worker = faust.Worker(build_app(settings, conn, engine), loglevel="DEBUG" if args.verbose else "INFO",
                          quiet=True, override_logging=False)
    try:
        worker.execute_from_commandline()
    except SystemExit as exc:
        return int(exc.code or 0) if not isinstance(exc.code, str) else 1
    return 0
