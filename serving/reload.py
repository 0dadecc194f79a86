"""Hot reload: watch the policy-update topic and hand newer versions of a policy to a target.

The target is ``rollstream serve``'s scheduler (``EngineTarget``: load, then swap between batches)
or vLLM behind ``rollstream vllm`` (``serving/vllm_sync.py``: a LoRA adapter loaded at run time,
or full weights reloaded in place).

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
from typing import Any, Protocol

from confluent_kafka import Consumer, KafkaError, KafkaException

from rollstream.errors import RollstreamError
from rollstream.schemas.codec import EventCodec, registry_client
from rollstream.schemas.topics import Topics, consumer_config
from rollstream.serving.engine import Engine
from rollstream.serving.scheduler import Scheduler
from rollstream.settings import ConnectionSettings

log = logging.getLogger(__name__)

RETRY_FIRST_S, RETRY_MAX_S = 1.0, 30.0  # pauses between tries of a version that failed to load

Loader = Callable[[str, int], Engine]


class ReloadTarget(Protocol):
    """What serves the policy: the version it serves, the weight kinds it takes, and how it takes one."""

    kinds: tuple[str, ...]

    @property
    def version(self) -> int: ...

    def apply(self, update: dict[str, Any]) -> None:
        """Serve the PolicyUpdate's weights (raises when they cannot be loaded; the old version stays)."""


class EngineTarget:
    """``rollstream serve``: load the weights into a new engine, then swap it in between batches."""

    kinds = ("FULL",)

    def __init__(self, scheduler: Scheduler, load: Loader) -> None:
        self.scheduler = scheduler
        self.load = load

    @property
    def version(self) -> int:
        return self.scheduler.target_version

    def apply(self, update: dict[str, Any]) -> None:
        self.scheduler.swap(self.load(str(update["weights_uri"]), int(update["version"])))


class PolicyWatcher:
    """Background thread: PolicyUpdate events of ``policy`` with a higher version → the target."""

    def __init__(self, target: ReloadTarget, policy: str, topics: Topics,
                 connection: ConnectionSettings | None = None, from_beginning: bool = True,
                 group_prefix: str = "rollstream-serve") -> None:
        self.target = target
        self.policy = policy
        self.topics = topics
        self.connection = connection or ConnectionSettings()
        self.from_beginning = from_beginning
        self.failures = 0
        self.group_id = f"{group_prefix}-{policy}-{uuid.uuid4().hex[:12]}"
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
                if newest is not None and newest["version"] > self.target.version:
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
        if update.get("kind") not in self.target.kinds:
            log.error("skipping policy update at %s: %s weights are not supported here, only %s",
                      where, update.get("kind"), " or ".join(self.target.kinds))
            return None
        return update

    def _apply(self, update: dict[str, Any]) -> bool:
        version, uri = int(update["version"]), str(update["weights_uri"])
        log.info("policy '%s' version %d published at %s; loading", self.policy, version, uri)
        try:
            self.target.apply(update)
        except Exception as exc:  # S3 errors come as urllib3/botocore exceptions too: never end the watcher
            self.failures += 1
            log.error("cannot load policy '%s' version %d from %s; still serving version %d, trying again: %s",
                      self.policy, version, uri, self.target.version, exc)
            return False
        return True
