"""Hot reload: watch the policy-update topic and swap newer versions of our policy in.

Each server reads the topic with a consumer group of its own, so every server sees every
update. By default it reads the (compacted) topic from the beginning and so comes up on
the newest published version; within a burst of updates only the newest is loaded.
Loading runs on this watcher's thread, off the request path; the scheduler swaps the
new model in between batches.
"""

from __future__ import annotations

import logging
import threading
import time
import uuid
from collections.abc import Callable
from typing import Any

from confluent_kafka import Consumer, KafkaError, KafkaException
from rollstream.schemas.codec import EventCodec, registry_client
from rollstream.schemas.topics import Topics, consumer_config
from rollstream.serving.engine import Engine
from rollstream.serving.scheduler import Scheduler

from rollstream.errors import RollstreamError
from rollstream.settings import ConnectionSettings

log = logging.getLogger(__name__)

RETRY_FIRST_S, RETRY_MAX_S = 1.0, 30.0  # pauses between tries of a version that failed to load

Loader = Callable[[str, int], Engine]


class PolicyWatcher:
    """Background thread: PolicyUpdate events of ``policy`` with a higher version → load → swap."""

    def __init__(self, scheduler: Scheduler, policy: str, load: Loader, topics: Topics,
                 connection: ConnectionSettings | None = None, from_beginning: bool = True) -> None:
        self.scheduler = scheduler
        self.policy = policy
        self.load = load
        self.topics = topics
        self.connection = connection or ConnectionSettings()
        self.from_beginning = from_beginning
        self.failures = 0
        self.group_id = f"rollstream-serve-{policy}-{uuid.uuid4().hex[:12]}"
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="rollstream-serve-reload", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout)

    def _consumer(self) -> Consumer:
        conf = consumer_config(self.group_id, self.connection, **{
            "auto.offset.reset": "earliest" if self.from_beginning else "latest",
            "enable.partition.eof": False,
        })
        consumer = Consumer(conf)
        consumer.subscribe([self.topics.policy_updates])
        return consumer

    def _run(self) -> None:
        codec = EventCodec(registry_client(self.connection), self.topics)
        consumer = self._consumer()
        log.info("watching %s for updates of policy '%s'", self.topics.policy_updates, self.policy)
        warned = False
        retry: dict[str, Any] | None = None  # the newest update whose load failed: tried again after a pause
        retry_at, pause = 0.0, RETRY_FIRST_S
        try:
            while not self._stop.is_set():
                try:
                    messages = consumer.consume(num_messages=500, timeout=0.5)
                except KafkaException as exc:
                    log.warning("policy-update consumer: %s", exc)
                    self._stop.wait(1.0)
                    continue
                newest: dict[str, Any] | None = None
                for msg in messages:
                    error = msg.error()
                    if error is not None:
                        if error.code() == KafkaError.UNKNOWN_TOPIC_OR_PART and warned:
                            continue
                        warned = True
                        log.warning("policy-update consumer: %s", error)
                        continue
                    update = self._decode(codec, msg.value(), msg.partition(), msg.offset())
                    if update is not None and (newest is None or update["version"] > newest["version"]):
                        newest = update
                if newest is None and retry is not None and time.monotonic() >= retry_at:
                    newest = retry
                if newest is not None and newest["version"] > self.scheduler.target_version:
                    if self._apply(newest):
                        retry, pause = None, RETRY_FIRST_S
                    else:  # S3 away, say: the version is not skipped, it is loaded once S3 is back
                        retry, retry_at = newest, time.monotonic() + pause
                        pause = min(pause * 2, RETRY_MAX_S)
        finally:
            consumer.close()

    def _decode(self, codec: EventCodec, value: bytes | None, partition: int | None,
                offset: int | None) -> dict[str, Any] | None:
        where = f"{self.topics.policy_updates}[{partition}]@{offset}"
        if value is None:
            return None  # a compaction tombstone
        try:
            update = codec.decode(self.topics.policy_updates, value)
        except RollstreamError as exc:
            log.error("skipping undecodable policy update at %s: %s", where, exc)
            return None
        if update.get("policy") != self.policy:
            return None
        if update.get("kind") != "FULL":
            log.error("skipping policy update at %s: %s weights are not supported by this server, only FULL",
                      where, update.get("kind"))
            return None
        return update

    def _apply(self, update: dict[str, Any]) -> bool:
        version, uri = int(update["version"]), str(update["weights_uri"])
        log.info("policy '%s' version %d published at %s; loading", self.policy, version, uri)
        try:
            engine = self.load(uri, version)
        except Exception as exc:  # S3 errors come as urllib3/botocore exceptions too: never end the watcher
            self.failures += 1
            log.error("cannot load policy '%s' version %d from %s; still serving version %d, trying again: %s",
                      self.policy, version, uri, self.scheduler.target_version, exc)
            return False
        self.scheduler.swap(engine)
        return True
