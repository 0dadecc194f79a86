"""The producer core: a Delivery's thread and event-loop views, queue-full handling, refusals, the real broker."""

from __future__ import annotations

import asyncio
import gc
import threading
import time
import uuid
from typing import Any

import pytest
from confluent_kafka import Consumer
from confluent_kafka.admin import AdminClient, NewTopic

from rollstream.producers.kafka_core import QUEUE_FULL, Delivery, KafkaCore
from rollstream.schemas.topics import client_config, consumer_config
from rollstream.settings import ConnectionSettings

DEAD = ConnectionSettings(kafka_bootstrap="127.0.0.1:1")
QUIET = {"log_level": 0}  # librdkafka's own log of the unreachable broker


def test_a_delivery_wakes_a_blocked_thread_and_its_callback_once() -> None:
    done: list[Delivery] = []
    delivery = Delivery(2, on_done=done.append)
    assert delivery.wait_blocking(0.01) == "pending"
    threading.Timer(0.05, delivery.settle).start()
    threading.Timer(0.1, delivery.settle, [1, "refused"]).start()
    assert delivery.wait_blocking(5) == "failed"
    assert (delivery.error, delivery.failures, done) == ("refused", 1, [delivery])
    delivery.settle()  # a report too many changes nothing
    assert done == [delivery] and Delivery.settled().wait_blocking(0) == "kafka"


def test_an_awaited_delivery_wakes_its_loop_once() -> None:
    async def go() -> None:
        loop = asyncio.get_running_loop()
        wakes = 0
        threadsafe = loop.call_soon_threadsafe

        def counting(*args: Any) -> Any:
            nonlocal wakes
            wakes += 1
            return threadsafe(*args)

        loop.call_soon_threadsafe = counting  # type: ignore[method-assign, assignment]
        delivery = Delivery(3)
        for i in range(3):
            threading.Timer(0.02 * (i + 1), delivery.settle).start()
        assert await delivery.wait(5) == "kafka"
        assert wakes == 1
        unwaited = Delivery(2)
        unwaited.settle(2)
        assert wakes == 1 and await unwaited.wait(0) == "kafka"

    asyncio.run(go())


def test_a_full_queue_refuses_what_does_not_fit_or_waits_for_room() -> None:
    core = KafkaCore(DEAD, queue_max=2, **QUIET)
    try:
        assert core.has_room(2) and not core.has_room(3)
        delivery = Delivery(3)
        assert core.send("t", b"k", [b"1", b"2", b"3"], delivery, block=False) == 2
        assert (delivery.error, delivery.failures, core.has_room()) == (QUEUE_FULL, 1, False)
    finally:
        assert core.close(0.1) == 2
    # Records that expire (message.timeout.ms) make room for the rest, and settle as refused.
    reports: list[tuple[str, str | None]] = []
    core = KafkaCore(DEAD, queue_max=1, on_report=lambda t, e: reports.append((t, e)),
                     **{"message.timeout.ms": 300, **QUIET})
    try:
        delivery = Delivery(2)
        started = time.monotonic()
        assert core.send("t", b"k", [b"1", b"2"], delivery) == 2
        assert time.monotonic() - started >= 0.2
        assert delivery.wait_blocking(10) == "failed" and delivery.failures == 2
        assert "timed out" in (delivery.error or "") and core.failed == 2 and core.delivered == 0
        assert [t for t, e in reports if e] == ["t", "t"]
    finally:
        core.close(1)


def test_close_ends_a_send_waiting_for_room() -> None:
    core = KafkaCore(DEAD, queue_max=1, **QUIET)
    delivery = Delivery(3)
    sender = threading.Thread(target=core.send, args=("t", b"k", [b"1", b"2", b"3"], delivery))
    sender.start()
    time.sleep(0.2)
    assert sender.is_alive()  # waiting for room that a dead broker never makes
    core.close(0.1)
    sender.join(5)
    assert not sender.is_alive() and (delivery.error, delivery.failures) == (QUEUE_FULL, 2)


def test_a_record_the_producer_refuses_outright_settles_as_refused() -> None:
    core = KafkaCore(DEAD, **{"message.max.bytes": 1000, **QUIET})
    try:
        delivery = Delivery(2)
        assert core.send("t", b"k", [b"x" * 2000, b"small"], delivery) == 2
        assert delivery.failures == 1 and "too large" in (delivery.error or "").lower() and core.failed == 1
        assert delivery.wait_blocking(0.05) == "pending"  # the small one waits for the broker
    finally:
        core.close(0.1)


def test_a_core_nobody_closes_is_collected_and_its_thread_ends() -> None:
    core = KafkaCore(DEAD, **QUIET)
    thread = core._thread
    del core
    gc.collect()
    thread.join(5)
    assert not thread.is_alive()


# --- against the real broker ---


@pytest.fixture
def topic(settings: ConnectionSettings) -> str:
    """A one-partition topic whose broker refuses records over 1,000 bytes."""
    name = f"t.core.{uuid.uuid4().hex[:10]}"
    admin = AdminClient(client_config(settings))
    admin.create_topics([NewTopic(name, 1, 1, config={"max.message.bytes": "1000"})])[name].result(30)
    return name


@pytest.mark.integration
def test_deliveries_from_a_thread_and_a_loop_in_key_order_and_a_refusal(settings: ConnectionSettings,
                                                                      topic: str) -> None:
    reports: list[tuple[str, str | None]] = []
    core = KafkaCore(settings, on_report=lambda t, e: reports.append((t, e)))
    try:
        first = Delivery(50)
        assert core.send(topic, b"k", [b"%d" % i for i in range(50)], first) == 50
        assert first.wait_blocking(30) == "kafka"

        async def awaited() -> str:
            second = Delivery(50)
            core.send(topic, b"k", [b"%d" % i for i in range(50, 100)], second, block=False)
            return await second.wait(30)

        assert asyncio.run(awaited()) == "kafka"
        refused = Delivery(1)
        core.send(topic, b"k", [b"x" * 5000], refused)
        assert refused.wait_blocking(30) == "failed" and "too large" in (refused.error or "").lower()
        assert (core.delivered, core.failed) == (100, 1)
        assert reports.count((topic, None)) == 100 and len(reports) == 101
    finally:
        assert core.close(10) == 0
    consumer = Consumer(consumer_config(f"core-{uuid.uuid4().hex[:8]}", settings))
    consumer.subscribe([topic])
    values: list[bytes] = []
    deadline = time.monotonic() + 30
    try:
        while len(values) < 100 and time.monotonic() < deadline:
            msg = consumer.poll(0.5)
            if msg is not None and msg.error() is None:
                values.append(msg.value())  # type: ignore[arg-type]
    finally:
        consumer.close()
    assert values == [b"%d" % i for i in range(100)]
