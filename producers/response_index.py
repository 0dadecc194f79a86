"""The gateway's calls of no rollout, by response id: an in-memory index read from ``calls-by-response``.

The OTLP receiver knows a span's rollout but not its token ids. When the same call went through the
gateway without a rollout, the gateway recorded it with the engine's token ids on ``calls-by-response``,
keyed by the id of the answer the client got: the span's ``gen_ai.response.id``. A :class:`ResponseIndex`
reads that topic on a thread of its own, from ``lookback_s`` ago onwards (``read_committed``, its partitions
assigned by hand: no consumer group joined, nothing committed), into a bounded LRU of what training needs
of each choice, and answers :meth:`~ResponseIndex.get` at once and :meth:`~ResponseIndex.wait_for` as soon
as the record arrives. Token ids and logprobs are held as packed arrays (4 bytes a token, not ~36).
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
import uuid
from array import array
from collections import OrderedDict
from types import TracebackType
from typing import Any

from confluent_kafka import Consumer, KafkaError, KafkaException, Message, TopicPartition

from rollstream.errors import SerializationError
from rollstream.schemas.codec import EventCodec, registry_client
from rollstream.schemas.topics import Topics, consumer_config
from rollstream.settings import ConnectionSettings

log = logging.getLogger(__name__)

LOOKBACK_S = 3600.0
MAX_ENTRIES = 100_000
RETRY_S = 5.0  # how soon to try again when the topic is missing or a record cannot be read for now
BATCH = 500
KEPT = ("call_id", "model", "policy", "policy_version")
PACKED = {"prompt_token_ids": "i", "response_token_ids": "i", "response_logprobs": "f"}  # Avro int and float

Waiter = tuple[asyncio.AbstractEventLoop, asyncio.Future[dict[str, Any]]]


def _resolve(future: asyncio.Future[dict[str, Any]], record: dict[str, Any]) -> None:
    if not future.done():
        future.set_result(record)


def _kept(record: dict[str, Any]) -> dict[str, Any]:
    kept = {name: record.get(name) for name in KEPT}
    for name, code in PACKED.items():
        value = record.get(name)
        kept[name] = None if value is None else array(code, value)
    return kept


def _unpacked(kept: dict[str, Any]) -> dict[str, Any]:
    return {name: list(value) if isinstance(value, array) else value for name, value in kept.items()}


class ResponseIndex:
    """response id -> choice index -> the record's call_id, model, policy, policy_version, prompt_token_ids,
    response_token_ids and response_logprobs; at most ``max_entries`` response ids, the least recently used
    forgotten first. ``start()`` it, ``close()`` it (or use it as a context manager)."""

    def __init__(self, settings: ConnectionSettings | None = None, topics: Topics | None = None, *,
                 lookback_s: float = LOOKBACK_S, max_entries: int = MAX_ENTRIES, poll_s: float = 0.2) -> None:
        self.settings = settings or ConnectionSettings()
        topics = topics or Topics.from_settings(self.settings)
        self.codec = EventCodec(registry_client(self.settings), topics)  # its own: it decodes on the index's thread
        self.topic = topics.calls_by_response
        self.lookback_s = lookback_s
        self.max_entries = max_entries
        self.poll_s = poll_s
        self.indexed = 0  # records taken in
        self.undecodable = 0  # records skipped: not an LlmCall of this topic's schema, or no response id
        self.evicted = 0  # response ids forgotten to stay within max_entries
        self._entries: OrderedDict[str, dict[int, dict[str, Any]]] = OrderedDict()
        self._waiters: dict[tuple[str, int], list[Waiter]] = {}
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._ready = threading.Event()
        self._behind: set[int] = set()  # partitions not yet read up to their end offset at start
        self._ends: dict[int, int] = {}
        self._thread: threading.Thread | None = None

    # --- lookups -----------------------------------------------------------------------

    def _lookup(self, response_id: str, choice_index: int) -> dict[str, Any] | None:
        """Under the lock: the record, marked as just used."""
        choices = self._entries.get(response_id)
        if choices is None or choice_index not in choices:
            return None
        self._entries.move_to_end(response_id)
        return choices[choice_index]

    def get(self, response_id: str, choice_index: int = 0) -> dict[str, Any] | None:
        """The record of choice ``choice_index`` of the response ``response_id``, or None when it was not seen."""
        with self._lock:
            found = self._lookup(response_id, choice_index)
        return None if found is None else _unpacked(found)

    async def wait_for(self, response_id: str, choice_index: int = 0, timeout_s: float = 5.0) -> dict[str, Any] | None:
        """The record as :meth:`get` gives it, as soon as it is in the index; None when it is not within
        ``timeout_s`` seconds."""
        loop = asyncio.get_running_loop()
        future: asyncio.Future[dict[str, Any]] = loop.create_future()
        key = (response_id, choice_index)
        with self._lock:  # looked up and registered at once: a record arriving in between still wakes us
            found = self._lookup(response_id, choice_index)
            if found is None:
                self._waiters.setdefault(key, []).append((loop, future))
        if found is not None:
            return _unpacked(found)
        try:
            return _unpacked(await asyncio.wait_for(future, timeout_s))
        except TimeoutError:
            return None
        finally:
            with self._lock:
                waiting = self._waiters.get(key)
                if waiting is not None:
                    waiting[:] = [w for w in waiting if w[1] is not future]
                    if not waiting:
                        del self._waiters[key]

    def ready(self) -> bool:
        """Whether the index has read every partition up to the end offset it had when the index started."""
        return self._ready.is_set()

    def __len__(self) -> int:
        with self._lock:
            return len(self._entries)

    def stats(self) -> dict[str, int]:
        """Counters for metrics: response ids held, records taken in, skipped and response ids evicted."""
        return {"entries": len(self), "indexed": self.indexed, "undecodable": self.undecodable,
                "evicted": self.evicted}

    def _put(self, response_id: str, choice_index: int, record: dict[str, Any]) -> None:
        with self._lock:
            choices = self._entries.get(response_id)
            if choices is None:
                choices = self._entries[response_id] = {}
            else:
                self._entries.move_to_end(response_id)
            choices[choice_index] = record
            while len(self._entries) > self.max_entries:
                self._entries.popitem(last=False)
                self.evicted += 1
            waiters = self._waiters.pop((response_id, choice_index), [])
            self.indexed += 1
        for loop, future in waiters:
            try:
                loop.call_soon_threadsafe(_resolve, future, record)
            except RuntimeError:  # that loop is closed: nobody waits any more
                pass

    # --- the reading thread ---------------------------------------------------------------

    def start(self) -> None:
        """Start reading on a background thread; returns at once (see :meth:`ready`)."""
        if self._thread is not None:
            return
        self._thread = threading.Thread(target=self._run, name="response-index", daemon=True)
        self._thread.start()

    def close(self, timeout: float = 10.0) -> None:
        """Stop reading and close the consumer; what is indexed stays readable."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout)

    def __enter__(self) -> ResponseIndex:
        self.start()
        return self

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        self.close()

    def _run(self) -> None:
        consumer: Consumer | None = None
        try:
            while not self._stop.is_set():
                if consumer is None:
                    consumer = self._connect()
                    if consumer is None:
                        self._stop.wait(RETRY_S)
                    continue
                self._take_all(consumer, consumer.consume(BATCH, self.poll_s))
        except Exception:
            log.exception("the response index of %s stopped reading", self.topic)
            raise
        finally:
            if consumer is not None:
                consumer.close()

    def _connect(self) -> Consumer | None:
        """A consumer assigned every partition of the topic at ``lookback_s`` ago; None to try again later."""
        consumer = Consumer(consumer_config(f"rollstream-response-index-{uuid.uuid4().hex}", self.settings,
                                            **{"enable.partition.eof": True}))
        try:
            listed = consumer.list_topics(self.topic, timeout=10).topics.get(self.topic)
            if listed is None or listed.error is not None or not listed.partitions:
                log.warning("topic '%s' does not exist (yet); create it with 'rollstream topics' or start the "
                            "gateway. Looking again in %.0f s", self.topic, RETRY_S)
                consumer.close()
                return None
            since = int((time.time() - self.lookback_s) * 1000)
            found = consumer.offsets_for_times([TopicPartition(self.topic, p, since) for p in listed.partitions],
                                               timeout=10)
            starts = []
            for tp in found:
                _, end = consumer.get_watermark_offsets(TopicPartition(self.topic, tp.partition), timeout=10,
                                                        cached=False)
                # -1: nothing as new as `since` in this partition: start at its end.
                offset = tp.offset if tp.error is None and tp.offset >= 0 else end
                starts.append(TopicPartition(self.topic, tp.partition, offset))
                self._ends[tp.partition] = end
                if offset < end:
                    self._behind.add(tp.partition)
            consumer.assign(starts)
        except KafkaException as exc:
            log.warning("cannot read '%s' (%s); trying again in %.0f s", self.topic, exc, RETRY_S)
            consumer.close()
            return None
        log.info("indexing %s from %.0f s ago: %d record(s) to catch up on", self.topic, self.lookback_s,
                 sum(self._ends[tp.partition] - tp.offset for tp in starts))
        self._caught_up()
        return consumer

    def _caught_up(self, partition: int | None = None, offset: int = 0) -> None:
        """Partition ``partition`` was read up to ``offset`` (exclusive)."""
        if partition is not None and offset >= self._ends.get(partition, 0):
            self._behind.discard(partition)
        if not self._behind and not self._ready.is_set():
            self._ready.set()

    def _take_all(self, consumer: Consumer, messages: list[Message]) -> None:
        for i, msg in enumerate(messages):
            try:
                self._take(msg)
            except Exception as exc:  # the schema registry unreachable, say: read them again later
                log.warning("cannot index %s[%s]@%s now (%s); reading it again in %.0f s", self.topic,
                            msg.partition(), msg.offset(), exc, RETRY_S)
                first: dict[int, int] = {}
                for m in messages[i:]:
                    partition, offset = m.partition(), m.offset()
                    if m.error() is None and partition is not None and offset is not None:
                        first.setdefault(partition, offset)
                for partition, offset in first.items():
                    consumer.seek(TopicPartition(self.topic, partition, offset))
                self._stop.wait(RETRY_S)
                return

    def _take(self, msg: Message) -> None:
        partition, offset = msg.partition(), msg.offset()
        error = msg.error()
        if error is not None:
            if error.code() == KafkaError._PARTITION_EOF:
                self._caught_up(partition, offset or 0)
            else:
                log.warning("reading %s: %s", self.topic, error)
            return
        try:
            record = self.codec.decode(self.topic, msg.value() or b"")
            metadata = record.get("metadata") or {}
            key = msg.key()
            response_id = metadata.get("response_id") or (key.decode("utf-8", "replace") if key else "")
            choice_index = int(metadata.get("choice_index") or 0)
            if not response_id:
                raise SerializationError("the record names no response id (key or metadata.response_id)")
        except (SerializationError, ValueError) as exc:
            self.undecodable += 1
            log.warning("%s[%s]@%s skipped: %s", self.topic, partition, offset, exc)
        else:
            self._put(response_id, choice_index, _kept(record))
        if partition is not None and offset is not None:
            self._caught_up(partition, offset + 1)
