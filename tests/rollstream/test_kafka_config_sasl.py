"""ROLLSTREAM_KAFKA_CONFIG reaches every Kafka client: parsing, precedence, and a real SASL/PLAIN broker.

The broker test starts a second, separate single-node Kafka (``SaslKafka``, its own state
folder and ports; the local stack is left alone) whose client listener requires SASL/PLAIN,
then creates topics, produces and consumes through Rollstream's own config builders with the
credentials given only through ``ROLLSTREAM_KAFKA_CONFIG``.
"""

from __future__ import annotations

import socket
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from confluent_kafka import Consumer, Producer

from rollstream.errors import ConfigError, StackError, TopicError
from rollstream.schemas.topics import Topics, client_config, consumer_config, create_topics, producer_config
from rollstream.settings import ConnectionSettings, StackSettings, kafka_client_config
from rollstream.stack.kafka import SaslKafka
from rollstream.stack.process import wait_until

SASL = "security.protocol=SASL_PLAINTEXT,sasl.mechanism=PLAIN,sasl.username=alice,sasl.password=alice-secret"


def test_both_forms_parse_and_bad_values_are_refused() -> None:
    assert kafka_client_config("") == {}
    assert kafka_client_config(" a.b=1 , c=x=y ,") == {"a.b": "1", "c": "x=y"}
    assert kafka_client_config('{"ssl.ca.location": "/ca.pem", "socket.keepalive.enable": true}') == {
        "ssl.ca.location": "/ca.pem", "socket.keepalive.enable": True}
    for bad in ("novalue", "=x", '{"a": [1]}', "{not json"):
        with pytest.raises(ConfigError, match="ROLLSTREAM_KAFKA_CONFIG"):
            kafka_client_config(bad)
    with pytest.raises(ConfigError, match="ROLLSTREAM_KAFKA_CONFIG"):
        ConnectionSettings(kafka_config="broken")


def test_the_settings_reach_every_client_config(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ROLLSTREAM_KAFKA_CONFIG", SASL + ",linger.ms=20,acks=1")
    conn = ConnectionSettings(kafka_bootstrap="b:9093")
    assert "alice-secret" not in repr(conn)
    for conf in (producer_config(conn), consumer_config("g", conn), client_config(conn)):
        assert conf["bootstrap.servers"] == "b:9093"
        assert (conf["security.protocol"], conf["sasl.username"], conf["sasl.password"]) == (
            "SASL_PLAINTEXT", "alice", "alice-secret")
    # Defaults < ROLLSTREAM_KAFKA_CONFIG < what the calling code insists on.
    assert producer_config(conn)["acks"] == "1" and producer_config(conn)["linger.ms"] == "20"
    assert producer_config(conn, **{"linger.ms": 50})["linger.ms"] == 50
    assert consumer_config("g", conn)["isolation.level"] == "read_committed"


def _free_pair() -> int:
    while True:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = int(s.getsockname()[1])
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port + 1))
                return port
            except OSError:
                continue


@pytest.fixture(scope="module")
def sasl_broker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SaslKafka]:
    state = Path(tmp_path_factory.mktemp("kafka-sasl"))
    broker = SaslKafka(StackSettings(state_dir=state, kafka_port=_free_pair(), kafka_heap="256m"),
                       {"admin": "admin-secret", "alice": "alice-secret"})
    if not broker.installed():
        pytest.fail("Kafka is not downloaded yet: run 'rollstream stack up' once", pytrace=False)
    try:
        broker.start()
    except StackError as exc:
        pytest.fail(f"could not start the SASL broker: {exc}", pytrace=False)
    try:
        if not wait_until(broker.healthy, 120, 1.0):
            pytest.fail(f"the SASL broker did not come up:\n{broker.process.log_tail(40)}", pytrace=False)
        yield broker
    finally:
        broker.process.stop()


@pytest.mark.integration
@pytest.mark.slow
def test_sasl_plain_broker_through_rollstream_kafka_config(sasl_broker: SaslKafka,
                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    topics = Topics(prefix=f"sasl.{uuid.uuid4().hex[:8]}.", partitions=1)
    plain = ConnectionSettings(kafka_bootstrap=sasl_broker.url, kafka_config="")
    with pytest.raises(TopicError, match="cannot reach Kafka"):  # no credentials: the broker refuses
        create_topics(topics, plain, timeout=5)
    wrong = ConnectionSettings(kafka_bootstrap=sasl_broker.url, kafka_config=SASL.replace("alice-secret", "nope"))
    with pytest.raises(TopicError):
        create_topics(topics, wrong, timeout=5)

    monkeypatch.setenv("ROLLSTREAM_KAFKA_CONFIG", SASL)
    conn = ConnectionSettings(kafka_bootstrap=sasl_broker.url)
    assert topics.calls in create_topics(topics, conn)
    producer = Producer(producer_config(conn))
    producer.produce(topics.calls, key=b"r-1", value=b"hello over SASL")
    assert producer.flush(30) == 0
    consumer = Consumer(consumer_config(f"sasl-{uuid.uuid4().hex[:6]}", conn))
    consumer.subscribe([topics.calls])
    try:
        got = None
        for _ in range(60):
            msg = consumer.poll(1.0)
            if msg is not None and msg.error() is None:
                got = msg.value()
                break
        assert got == b"hello over SASL"
    finally:
        consumer.close()


def test_sasl_settings_become_faust_credentials() -> None:
    import faust

    from rollstream.stream_processors.auth import faust_credentials

    assert faust_credentials({}) is None
    creds = faust_credentials(kafka_client_config(SASL))
    assert isinstance(creds, faust.SASLCredentials)
    assert (creds.username, creds.password, creds.mechanism.value, creds.protocol.value) == (
        "alice", "alice-secret", "PLAIN", "SASL_PLAINTEXT")
    scram = faust_credentials({"security.protocol": "SASL_SSL", "sasl.mechanism": "SCRAM-SHA-512",
                               "sasl.username": "u", "sasl.password": "p"})
    assert scram.protocol.value == "SASL_SSL" and scram.ssl_context is not None
    assert isinstance(faust_credentials({"security.protocol": "SSL"}), faust.SSLCredentials)
    with pytest.raises(ConfigError, match="GSSAPI"):
        faust_credentials({"security.protocol": "SASL_PLAINTEXT", "sasl.mechanism": "GSSAPI"})
    with pytest.raises(ConfigError, match="sasl.oauthbearer.config"):
        faust_credentials({"security.protocol": "SASL_SSL", "sasl.oauthbearer.config": "x"})


@pytest.mark.integration
@pytest.mark.slow
def test_stream_processor_runs_on_a_sasl_broker(sasl_broker: SaslKafka, tmp_path: Path,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    """The Faust worker (aiokafka) and its confluent-kafka clients both authenticate from ROLLSTREAM_KAFKA_CONFIG:
    a bad record sent over SASL comes back as a dead letter written by the worker over SASL."""
    import os
    import signal
    import subprocess
    import sys
    import time

    from rollstream.schemas.codec import EventCodec, registry_client

    monkeypatch.setenv("ROLLSTREAM_KAFKA_CONFIG", SASL)
    conn = ConnectionSettings(kafka_bootstrap=sasl_broker.url)
    topics = Topics(prefix=f"saslp.{uuid.uuid4().hex[:8]}.", partitions=1)
    create_topics(topics, conn)
    log = tmp_path / "worker.log"
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "ROLLSTREAM_KAFKA_BOOTSTRAP": sasl_broker.url, "ROLLSTREAM_KAFKA_CONFIG": SASL}
    proc = subprocess.Popen(
        [str(Path(sys.executable).with_name("rollstream")), "process", "--topic-prefix", topics.prefix,
         "--partitions", "1", "--app-id", f"sasl-{uuid.uuid4().hex[:6]}", "--data-dir", str(tmp_path / "data"),
         "--web-port", str(port)], stdout=log.open("wb"), stderr=subprocess.STDOUT, env=env)
    try:
        producer = Producer(producer_config(conn))
        producer.produce(topics.calls, key=b"r-1", value=b"not avro")
        assert producer.flush(30) == 0
        consumer = Consumer(consumer_config(f"sasl-dl-{uuid.uuid4().hex[:6]}", conn))
        consumer.subscribe([topics.dead_letters])
        codec = EventCodec(registry_client(ConnectionSettings()), topics)
        got = None
        deadline = time.monotonic() + 120
        try:
            while got is None and time.monotonic() < deadline:
                assert proc.poll() is None, log.read_text()[-4000:]
                msg = consumer.poll(1.0)
                if msg is not None and msg.error() is None:
                    got = codec.decode(topics.dead_letters, msg.value())
        finally:
            consumer.close()
        assert got is not None, "no dead letter within 120 s:\n" + log.read_text()[-4000:]
        assert (got["topic"], got["error_type"], got["value"]) == (topics.calls, "undecodable",
                                                                                 b"not avro")
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
