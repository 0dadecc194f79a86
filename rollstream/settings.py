"""Every environment variable Rollstream reads, in one place.

Each service has one frozen settings object loaded from the environment with the
``ROLLSTREAM_`` prefix. Defaults point at the local stack (``rollstream stack up``), so
nothing needs setting on a developer machine.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

from rollstream.errors import ConfigError

PREFIX = "ROLLSTREAM_"

# name (without prefix) -> (default, one-line description). The README's table lists
# this mapping, and a test keeps the two in step.
VARIABLES: dict[str, tuple[str, str]] = {
    "HOME": ("~/.cache/rollstream", "Cache for downloaded services (Kafka jars, registry, S3 server)."),
    "STATE_DIR": ("", "Local stack state: data, logs, pids, stack.env (default: $ROLLSTREAM_HOME/stack)."),
    "KAFKA_VERSION": ("4.1.1", "Apache Kafka version of the local broker (org.apache.kafka:kafka_2.13)."),
    "KAFKA_PORT": ("9092", "Local broker port (the controller uses the next port)."),
    "KAFKA_HEAP": ("512m", "Local broker heap (-Xmx)."),
    "REGISTRY_VERSION": ("3.3.3", "Apicurio Registry version of the local schema registry."),
    "REGISTRY_PORT": ("8081", "Local schema registry port."),
    "REGISTRY_HEAP": ("384m", "Local schema registry heap (-Xmx)."),
    "REGISTRY_JAVA": ("", "java binary (21+) for the registry (default: the newest JDK in JAVA_HOME or /usr/lib/jvm)."),
    "S3_PORT": ("7070", "Local S3 server (versitygw) port."),
    "VERSITYGW_VERSION": ("v1.7.0", "versitygw version of the local S3 server."),
    "MLFLOW_PORT": ("5000", "Local MLflow tracking server port."),
    "KAFKA_BOOTSTRAP": ("127.0.0.1:9092", "Kafka bootstrap servers."),
    "SCHEMA_REGISTRY_URL": (
        "http://127.0.0.1:8081/apis/ccompat/v7",
        "Confluent-compatible schema registry URL.",
    ),
    "S3_ENDPOINT": ("http://127.0.0.1:7070", "S3-compatible endpoint (MinIO, versitygw, AWS)."),
    "S3_ACCESS_KEY": ("rollstream", "S3 access key."),
    "S3_SECRET_KEY": ("rollstream-secret", "S3 secret key."),
    "S3_REGION": ("us-east-1", "S3 region."),
    "S3_BUCKET": ("rollstream", "Bucket for checkpoints and policies."),
    "MLFLOW_BUCKET": ("mlflow", "Bucket the MLflow server stores artifacts in."),
    "MLFLOW_TRACKING_URI": ("http://127.0.0.1:5000", "MLflow tracking server."),
    "TOPIC_PREFIX": ("rollstream.", "Prefix of every Kafka topic name."),
    "PARTITIONS": ("3", "Partitions of the calls, rewards, rollouts and transitions topics."),
    "TEST_START_STACK": ("1", "Tests start the local stack when it is not up (0: require a running stack)."),
}


def env(name: str) -> str:
    """Value of ``ROLLSTREAM_<name>``, or its documented default."""
    if name not in VARIABLES:
        raise ConfigError(f"unknown setting {PREFIX}{name}; add it to rollstream.settings.VARIABLES")
    return os.environ.get(PREFIX + name, VARIABLES[name][0])


def env_int(name: str) -> int:
    raw = env(name)
    try:
        return int(raw)
    except ValueError as exc:
        raise ConfigError(f"{PREFIX}{name}={raw!r} is not an integer") from exc


def _home() -> Path:
    return Path(env("HOME")).expanduser()


@dataclass(frozen=True)
class StackSettings:
    """Where and how the local stack runs."""

    home: Path = field(default_factory=_home)
    state_dir: Path = field(default_factory=lambda: Path(env("STATE_DIR") or _home() / "stack").expanduser())
    kafka_version: str = field(default_factory=lambda: env("KAFKA_VERSION"))
    kafka_port: int = field(default_factory=lambda: env_int("KAFKA_PORT"))
    kafka_heap: str = field(default_factory=lambda: env("KAFKA_HEAP"))
    registry_version: str = field(default_factory=lambda: env("REGISTRY_VERSION"))
    registry_port: int = field(default_factory=lambda: env_int("REGISTRY_PORT"))
    registry_heap: str = field(default_factory=lambda: env("REGISTRY_HEAP"))
    s3_port: int = field(default_factory=lambda: env_int("S3_PORT"))
    versitygw_version: str = field(default_factory=lambda: env("VERSITYGW_VERSION"))
    mlflow_port: int = field(default_factory=lambda: env_int("MLFLOW_PORT"))
    s3_access_key: str = field(default_factory=lambda: env("S3_ACCESS_KEY"))
    s3_secret_key: str = field(default_factory=lambda: env("S3_SECRET_KEY"))
    s3_region: str = field(default_factory=lambda: env("S3_REGION"))
    buckets: tuple[str, ...] = field(default_factory=lambda: (env("S3_BUCKET"), env("MLFLOW_BUCKET")))
    mlflow_bucket: str = field(default_factory=lambda: env("MLFLOW_BUCKET"))


@dataclass(frozen=True)
class ConnectionSettings:
    """How clients reach Kafka, the registry, S3 and MLflow."""

    kafka_bootstrap: str = field(default_factory=lambda: env("KAFKA_BOOTSTRAP"))
    schema_registry_url: str = field(default_factory=lambda: env("SCHEMA_REGISTRY_URL"))
    s3_endpoint: str = field(default_factory=lambda: env("S3_ENDPOINT"))
    s3_access_key: str = field(default_factory=lambda: env("S3_ACCESS_KEY"))
    s3_secret_key: str = field(default_factory=lambda: env("S3_SECRET_KEY"))
    s3_region: str = field(default_factory=lambda: env("S3_REGION"))
    s3_bucket: str = field(default_factory=lambda: env("S3_BUCKET"))
    mlflow_tracking_uri: str = field(default_factory=lambda: env("MLFLOW_TRACKING_URI"))
    topic_prefix: str = field(default_factory=lambda: env("TOPIC_PREFIX"))
    partitions: int = field(default_factory=lambda: env_int("PARTITIONS"))

    def __post_init__(self) -> None:
        if self.partitions < 1:
            raise ConfigError(f"{PREFIX}PARTITIONS must be at least 1, got {self.partitions}")
