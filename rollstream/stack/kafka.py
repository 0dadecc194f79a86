"""Apache Kafka, one KRaft node (broker + controller), from its Maven Central jars.

``SaslKafka`` is the same broker with SASL/PLAIN on its client listener, for checking that
``ROLLSTREAM_KAFKA_CONFIG`` (security.protocol, sasl.*) reaches every client; it is not part
of the local stack.
"""

from __future__ import annotations

import base64
import uuid
from pathlib import Path
from typing import Any

from rollstream.stack.base import Service
from rollstream.stack.process import require_tool, run_checked

LOG4J2 = """Configuration:
  Appenders:
    Console:
      name: STDOUT
      PatternLayout:
        pattern: "[%d] %p %m (%c)%n"
  Loggers:
    Root:
      level: INFO
      AppenderRef:
        - ref: STDOUT
    Logger:
      - name: org.apache.kafka
        level: WARN
      - name: org.apache.kafka.common.utils.AppInfoParser
        level: INFO
      - name: kafka.coordinator
        level: WARN
      - name: state.change.logger
        level: WARN
"""


def _cluster_id() -> str:
    """A Kafka cluster id: a random UUID, URL-safe base64 without padding (one in 64 starts with "-", so it is
    passed as ``--cluster-id=ID``: after ``-t`` the tool's parser would take it for an option)."""
    return base64.urlsafe_b64encode(uuid.uuid4().bytes).rstrip(b"=").decode()


class Kafka(Service):
    name = "kafka"
    # A fresh broker is healthy in ~10 s, but one whose data folder holds thousands of topics replays
    # them all before it answers: the wait ends early anyway if the process exits.
    startup_timeout = 300.0

    @property
    def port(self) -> int:
        return self.settings.kafka_port

    @property
    def ports(self) -> list[int]:
        return [self.port, self.port + 1]

    @property
    def url(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def _home(self) -> Path:
        return self.settings.home / f"kafka-{self.settings.kafka_version}"

    def installed(self) -> bool:
        return (self._home / ".complete").exists()

    def install(self) -> None:
        self.maven_fetch(
            self._home,
            [
                f"org.apache.kafka:kafka_2.13:{self.settings.kafka_version}",
                # Kafka's POM brings SLF4J 1.7 but no binding; without one the broker logs nothing.
                "org.apache.logging.log4j:log4j-slf4j-impl:2.25.3",
            ],
        )

    def _server_properties(self) -> str:
        port, ctrl = self.port, self.port + 1
        return "\n".join(
            [
                "process.roles=broker,controller",
                "node.id=1",
                f"controller.quorum.voters=1@127.0.0.1:{ctrl}",
                f"listeners=PLAINTEXT://127.0.0.1:{port},CONTROLLER://127.0.0.1:{ctrl}",
                f"advertised.listeners=PLAINTEXT://127.0.0.1:{port}",
                "controller.listener.names=CONTROLLER",
                "listener.security.protocol.map=PLAINTEXT:PLAINTEXT,CONTROLLER:PLAINTEXT",
                "inter.broker.listener.name=PLAINTEXT",
                f"log.dirs={self.data_dir}",
                "num.partitions=1",
                "auto.create.topics.enable=false",
                # One node: internal topics cannot be replicated, and few partitions start faster.
                "offsets.topic.replication.factor=1",
                "offsets.topic.num.partitions=6",
                "transaction.state.log.replication.factor=1",
                "transaction.state.log.min.isr=1",
                "transaction.state.log.num.partitions=6",
                "share.coordinator.state.topic.replication.factor=1",
                "share.coordinator.state.topic.min.isr=1",
                "group.initial.rebalance.delay.ms=0",
                # Compacted topics (policy updates) clean up promptly on a small stack.
                "log.cleaner.backoff.ms=1000",
                "",
            ]
        )

    def format_storage(self, java: str, classpath: str, props: Path, cluster_id: str) -> None:
        """Format the (KRaft) data folder for ``cluster_id``."""
        self.data_dir.mkdir(parents=True, exist_ok=True)
        run_checked(
            [java, "-cp", classpath, "kafka.tools.StorageTool", "format",
             f"--cluster-id={cluster_id}", "-c", str(props), "--ignore-formatted"],
            "formatting Kafka storage",
            self.process.log_file,
        )

    def start(self) -> None:
        java = require_tool("java")
        conf_dir = self.settings.state_dir / "conf"
        conf_dir.mkdir(parents=True, exist_ok=True)
        props = conf_dir / f"{self.name}.properties"
        props.write_text(self._server_properties())
        (conf_dir / "kafka-log4j2.yaml").write_text(LOG4J2)
        classpath = str(self._home / "libs" / "*")
        if not (self.data_dir / "meta.properties").exists():
            self.format_storage(java, classpath, props, _cluster_id())
        self.process.start(
            [
                java, f"-Xmx{self.settings.kafka_heap}", "-Xms128m", "-XX:+UseG1GC",
                f"-Dlog4j2.configurationFile={conf_dir / 'kafka-log4j2.yaml'}",
                "-cp", classpath, "kafka.Kafka", str(props),
            ]
        )

    def healthy(self) -> bool:
        from confluent_kafka.admin import AdminClient

        try:
            admin = AdminClient(
                # log_level 0: a broker that is still starting is expected, not worth a log line.
                {"bootstrap.servers": self.url, "socket.timeout.ms": 2000, "log_level": 0, **self.client_config()}
            )
            meta = admin.list_topics(timeout=2)
            return bool(meta.brokers)
        except Exception:  # noqa: BLE001 - any failure means "not healthy yet"
            return False

    def client_config(self) -> dict[str, Any]:
        """What a client needs beyond bootstrap.servers to talk to this broker."""
        return {}


class SaslKafka(Kafka):
    """A single-node broker whose client listener requires SASL/PLAIN (``users``: name -> password).

    The controller listener stays PLAINTEXT on loopback. Run it with its own ``state_dir`` and
    ports; ``client_config(user)`` gives the librdkafka settings a client of ``user`` needs.
    """

    name = "kafka-sasl"

    def __init__(self, settings: Any, users: dict[str, str]) -> None:
        super().__init__(settings)
        if "admin" not in users:
            raise ValueError("SaslKafka needs an 'admin' user: the broker authenticates to itself as admin")
        self.users = users

    def _server_properties(self) -> str:
        port = self.port
        accounts = " ".join(f'user_{name}="{password}"' for name, password in self.users.items())
        jaas = (f'org.apache.kafka.common.security.plain.PlainLoginModule required username="admin" '
                f'password="{self.users["admin"]}" {accounts};')
        lines = []
        for line in super()._server_properties().splitlines():
            key = line.partition("=")[0]
            if key in ("listeners", "advertised.listeners", "listener.security.protocol.map",
                       "inter.broker.listener.name"):
                continue
            lines.append(line)
        lines[-1:-1] = [
            f"listeners=SASL_PLAINTEXT://127.0.0.1:{port},CONTROLLER://127.0.0.1:{port + 1}",
            f"advertised.listeners=SASL_PLAINTEXT://127.0.0.1:{port}",
            "listener.security.protocol.map=SASL_PLAINTEXT:SASL_PLAINTEXT,CONTROLLER:PLAINTEXT",
            "inter.broker.listener.name=SASL_PLAINTEXT",
            "sasl.enabled.mechanisms=PLAIN",
            "sasl.mechanism.inter.broker.protocol=PLAIN",
            f"listener.name.sasl_plaintext.plain.sasl.jaas.config={jaas}",
        ]
        return "\n".join(lines) + "\n"

    def client_config(self, user: str = "admin") -> dict[str, Any]:
        return {"security.protocol": "SASL_PLAINTEXT", "sasl.mechanism": "PLAIN", "sasl.username": user,
                "sasl.password": self.users[user]}
