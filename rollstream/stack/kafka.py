"""Apache Kafka, one KRaft node (broker + controller), from its Maven Central jars."""

from __future__ import annotations

import base64
import uuid
from pathlib import Path

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
    """A Kafka cluster id: a random UUID, URL-safe base64 without padding."""
    return base64.urlsafe_b64encode(uuid.uuid4().bytes).rstrip(b"=").decode()


class Kafka(Service):
    name = "kafka"
    startup_timeout = 120.0

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

    def start(self) -> None:
        java = require_tool("java")
        conf_dir = self.settings.state_dir / "conf"
        conf_dir.mkdir(parents=True, exist_ok=True)
        props = conf_dir / "kafka.properties"
        props.write_text(self._server_properties())
        (conf_dir / "kafka-log4j2.yaml").write_text(LOG4J2)
        classpath = str(self._home / "libs" / "*")
        if not (self.data_dir / "meta.properties").exists():
            self.data_dir.mkdir(parents=True, exist_ok=True)
            run_checked(
                [java, "-cp", classpath, "kafka.tools.StorageTool", "format",
                 "-t", _cluster_id(), "-c", str(props), "--ignore-formatted"],
                "formatting Kafka storage",
                self.process.log_file,
            )
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
                {"bootstrap.servers": self.url, "socket.timeout.ms": 2000, "log_level": 0}
            )
            meta = admin.list_topics(timeout=2)
            return bool(meta.brokers)
        except Exception:  # noqa: BLE001 - any failure means "not healthy yet"
            return False
