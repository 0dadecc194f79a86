"""Session fixtures: the real local stack, and uniquely named topics and buckets.

Integration tests talk to a real Kafka broker, schema registry, S3 server and MLflow
server. If the stack is not running, the session starts it (``rollstream stack up``)
and stops what it started at the end; set ROLLSTREAM_TEST_START_STACK=0 to require a
stack that is already up.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable, Iterator

import pytest

from rollstream.errors import StackError
from rollstream.schemas.codec import EventCodec, register_schemas, registry_client
from rollstream.schemas.topics import Topics, create_topics
from rollstream.settings import ConnectionSettings, env
from rollstream.stack import Stack
from rollstream.storage import ObjectStore

START_HINT = "start the stack with 'rollstream stack up' (or 'bash .ci/run', which installs and starts everything)"


@pytest.fixture(scope="session")
def stack() -> Iterator[Stack]:
    stk = Stack()
    unhealthy = [s.name for s in stk.status() if not s.healthy]
    started = False
    if unhealthy:
        if env("TEST_START_STACK") == "0":
            pytest.fail(f"local stack services not healthy: {', '.join(unhealthy)}; {START_HINT}", pytrace=False)
        try:
            stk.up()
        except StackError as exc:
            pytest.fail(f"could not start the local stack: {exc}\n{START_HINT}", pytrace=False)
        started = True
    yield stk
    if started:
        stk.down()


@pytest.fixture(scope="session")
def settings(stack: Stack) -> ConnectionSettings:
    return ConnectionSettings(
        kafka_bootstrap=stack.kafka.url,
        schema_registry_url=stack.registry.url,
        s3_endpoint=stack.s3.url,
        mlflow_tracking_uri=stack.mlflow.url,
    )


def unique(prefix: str) -> str:
    return f"{prefix}{uuid.uuid4().hex[:10]}"


@pytest.fixture
def topics_factory(settings: ConnectionSettings) -> Callable[..., Topics]:
    """Creates a fresh set of Rollstream topics (unique prefix) with schemas registered."""

    def make(partitions: int = 3, register: bool = True) -> Topics:
        topics = Topics(prefix=unique("t.") + ".", partitions=partitions)
        create_topics(topics, settings)
        if register:
            register_schemas(registry_client(settings), topics)
        return topics

    return make


@pytest.fixture
def topics(topics_factory: Callable[..., Topics]) -> Topics:
    return topics_factory()


@pytest.fixture
def codec(settings: ConnectionSettings, topics: Topics) -> EventCodec:
    return EventCodec(registry_client(settings), topics)


@pytest.fixture
def store(settings: ConnectionSettings) -> ObjectStore:
    return ObjectStore(settings)


@pytest.fixture
def bucket(store: ObjectStore) -> str:
    name = unique("test-")
    store.ensure_bucket(name)
    return name


# --- the policy server (rollstream serve) on a tiny model built in code ---

from pathlib import Path  # noqa: E402

from rollstream.errors import RollstreamError  # noqa: E402
from rollstream.serving.launch import ServerProcess  # noqa: E402


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny Qwen2-style causal LM with a byte-level BPE tokenizer and a ChatML template."""
    from rollstream.serving.tiny import build_tiny_model

    return build_tiny_model(tmp_path_factory.mktemp("tiny-model") / "tiny")


@pytest.fixture(scope="session")
def policy_server(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    """``rollstream serve`` in a subprocess on a free port, serving the tiny model as policy "tiny".

    Use ``.base_url`` (``http://127.0.0.1:PORT/v1``) with the OpenAI client, ``.policy``
    as the model name and ``.port``; ``.url`` is the server root (``/health``, ``/stats``).
    It does not watch Kafka for policy updates, so it needs no running stack.
    """
    log = tmp_path_factory.mktemp("policy-server") / "serve.log"
    server = ServerProcess(tiny_model_dir, policy="tiny", args=["--no-updates"], log_path=log)
    try:
        server.start()
    except RollstreamError as exc:
        pytest.fail(f"could not start rollstream serve: {exc}", pytrace=False)
    yield server
    server.stop()
