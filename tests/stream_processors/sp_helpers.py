"""Helpers for the stream-processor tests and the crash test: event factories, a worker subprocess, readers."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

from confluent_kafka import Consumer, KafkaError, Producer

from rollstream.schemas import make_event
from rollstream.schemas.codec import EventCodec
from rollstream.schemas.topics import Topics, consumer_config, producer_config
from rollstream.settings import ConnectionSettings

ROLLSTREAM = Path(sys.executable).with_name("rollstream")


def call(rid: str, seq: int, *, attempt: int = 1, agent: str | None = "solver", policy: str = "pol",
         event_id: str | None = None, call_id: str | None = None, tokens: bool = True, **extra: Any) -> dict[str, Any]:
    return make_event(
        "LlmCall", event_id=event_id or uuid.uuid4().hex, source="gateway", rollout_id=rid, attempt=attempt,
        call_id=call_id or f"c{seq}", sequence=seq, agent_name=agent, policy=policy, policy_version=3,
        sampling={"temperature": 1.0, "top_p": None, "max_tokens": None, "stop": [], "seed": None, "n": 1},
        response_text=f"r{seq}", prompt_token_ids=[1, 2, seq] if tokens else None,
        response_token_ids=[7, seq] if tokens else None, response_logprobs=[-0.5, -0.25] if tokens else None,
        start_time=extra.pop("start_time", 1), end_time=extra.pop("end_time", 2), latency_ms=1.0, **extra,
    )


def reward(rid: str, value: float, *, terminal: bool = True, call_id: str | None = None,
           event_id: str | None = None, attempt: int | None = None, name: str = "primary") -> dict[str, Any]:
    return make_event("Reward", event_id=event_id or uuid.uuid4().hex, source="evaluator", rollout_id=rid,
                      attempt=attempt, call_id=call_id, name=name, value=value, terminal=terminal)


def lifecycle(rid: str, status: str, *, attempt: int = 1, policy: str = "pol", group_id: str | None = None,
              task_id: str | None = None, event_id: str | None = None) -> dict[str, Any]:
    return make_event("RolloutEvent", event_id=event_id or uuid.uuid4().hex, source="sdk", rollout_id=rid,
                      attempt=attempt, status=status, policy=policy, group_id=group_id, task_id=task_id)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Pipe:
    """Publishes events (encoded, or raw bytes) to one deployment's topics and reads its outputs."""

    def __init__(self, settings: ConnectionSettings, topics: Topics, codec: EventCodec) -> None:
        self.settings = settings
        self.topics = topics
        self.codec = codec
        self.producer = Producer(producer_config(settings))

    def send(self, topic: str, record: dict[str, Any], key: str | None = None) -> None:
        self.raw(topic, self.codec.encode(topic, record), (key or record["rollout_id"]).encode())

    def call(self, record: dict[str, Any]) -> None:
        self.send(self.topics.calls, record)

    def reward(self, record: dict[str, Any]) -> None:
        self.send(self.topics.rewards, record)

    def rollout(self, record: dict[str, Any]) -> None:
        self.send(self.topics.rollouts, record)

    def raw(self, topic: str, value: bytes | None, key: bytes | None) -> None:
        self.producer.produce(topic, value=value, key=key)
        self.producer.poll(0)

    def flush(self) -> None:
        assert self.producer.flush(30) == 0

    def read(self, topic: str, count: int, timeout: float = 60.0, settle: float = 0.0) -> list[Any]:
        """``count`` committed records of ``topic`` (then ``settle`` more seconds to catch extras)."""
        consumer = Consumer(consumer_config(f"reader-{uuid.uuid4().hex}", self.settings))
        consumer.subscribe([topic])
        out: list[Any] = []
        deadline = time.monotonic() + timeout
        try:
            while time.monotonic() < deadline:
                msg = consumer.poll(0.5)
                if msg is not None and msg.error() is None:
                    out.append(msg)
                elif msg is not None and msg.error().code() != KafkaError._PARTITION_EOF:
                    raise AssertionError(str(msg.error()))
                if len(out) >= count:
                    deadline = min(deadline, time.monotonic() + settle)
                    if settle == 0:
                        break
        finally:
            consumer.close()
        return out

    def transitions(self, count: int, timeout: float = 60.0, settle: float = 0.0) -> list[dict[str, Any]]:
        msgs = self.read(self.topics.transitions, count, timeout, settle)
        return [self.codec.decode(self.topics.transitions, m.value()) for m in msgs]

    def dead_letters(self, count: int, timeout: float = 60.0, settle: float = 0.0) -> list[dict[str, Any]]:
        msgs = self.read(self.topics.dead_letters, count, timeout, settle)
        return [self.codec.decode(self.topics.dead_letters, m.value()) for m in msgs]


class WorkerProcess:
    """``rollstream process`` as a subprocess with its own app id, data dir and web port."""

    def __init__(self, topics: Topics, settings: ConnectionSettings, tmp: Path, app_id: str,
                 env: dict[str, str] | None = None, index: int = 0) -> None:
        self.topics, self.app_id, self.tmp = topics, app_id, tmp
        self.port = free_port()
        self.log_path = tmp / f"worker-{app_id}-{index}.log"
        self.env = {**os.environ, "ROLLSTREAM_KAFKA_BOOTSTRAP": settings.kafka_bootstrap,
                    "ROLLSTREAM_SCHEMA_REGISTRY_URL": settings.schema_registry_url,
                    "ROLLSTREAM_PROCESS_COMMIT_INTERVAL": "0.2", "ROLLSTREAM_PROCESS_TIMER_INTERVAL": "0.5",
                    **(env or {})}
        self.data_dir = tmp / f"data-{index}"
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> WorkerProcess:
        log = self.log_path.open("ab")
        self.proc = subprocess.Popen(
            [str(ROLLSTREAM), "process", "--topic-prefix", self.topics.prefix, "--partitions",
             str(self.topics.partitions), "--app-id", self.app_id, "--data-dir", str(self.data_dir),
             "--web-port", str(self.port)],
            stdout=log, stderr=subprocess.STDOUT, env=self.env,
        )
        return self

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(30)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.kill()

    def stats(self) -> dict[str, Any]:
        import httpx

        return dict(httpx.get(f"http://127.0.0.1:{self.port}/stats", timeout=5).json())

    def wait_stats(self, pred: Callable[[dict[str, Any]], bool], timeout: float = 60.0) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        last: dict[str, Any] = {}
        while time.monotonic() < deadline:
            try:
                last = self.stats()
                if pred(last):
                    return last
            except Exception:  # not up yet
                pass
            assert self.proc is not None and self.proc.poll() is None, self.log()
            time.sleep(0.5)
        raise AssertionError(f"stats never matched; last {last}\n{self.log()}")

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")[-6000:]


