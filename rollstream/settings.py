"""Every environment variable Rollstream reads, in one place.

Each service has one frozen settings object loaded from the environment with the
``ROLLSTREAM_`` prefix. Defaults point at the local stack (``rollstream stack up``), so
nothing needs setting on a developer machine.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import sys
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

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
    # --- producers: sdk and otlp ---
    "SDK_SOURCE": ("sdk", "Source name the Python SDK writes on its events."),
    "SDK_POLICY": ("default", "Policy recorded by the SDK when a rollout names none."),
    "SDK_POLICY_VERSION": ("0", "Policy version recorded on SDK-captured calls when the engine reports none."),
    "SDK_GATEWAY_URL": ("http://127.0.0.1:8080", "Gateway the SDK builds each rollout's base_url from."),
    "SDK_QUEUE_MAX": ("100000", "Events the SDK holds in memory (a bounded queue) while Kafka is slow or down."),
    "SDK_ON_FULL": ("block", "When the SDK's queue is full: block (up to SDK_BLOCK_TIMEOUT s, then raise) or raise."),
    "SDK_BLOCK_TIMEOUT": ("30", "Seconds a full SDK queue blocks the caller before QueueFullError."),
    "SDK_FLUSH_TIMEOUT": ("30", "Seconds flush() waits for Kafka (at the end of each rollout and at exit)."),
    "SDK_FLUSH_ON_FINISH": ("1", "Flush at the end of every rollout (0: only on flush() and at exit)."),
    "SDK_DELIVERY_TIMEOUT_MS": ("300000", "How long the SDK retries delivering an event before it fails (0: forever)."),
    "SDK_TOKEN_IDS": ("1", "Instrumented clients ask the engine for token ids (return_token_ids) and logprobs."),
    "OTLP_HOST": ("127.0.0.1", "Address the OTLP/HTTP trace receiver (rollstream otlp) listens on."),
    "OTLP_PORT": ("4318", "Port the OTLP/HTTP trace receiver listens on."),
    "OTLP_POLICY": ("default", "Policy recorded on calls from spans that name none (nor a response model)."),
    "OTLP_QUEUE_MAX": ("100000", "Events the OTLP receiver holds in memory while Kafka is slow or down (503 past it)."),
    "OTLP_MAX_BODY": ("16777216", "Largest OTLP request body accepted, in bytes (413 past it)."),
    "OTLP_JOIN_WAIT": (
        "2.0",
        "Seconds an export waits for what its LLM spans lack: the gateway's record of the same response (token ids) "
        "and GenAI log events (content); 0: publish at once.",
    ),
    "OTLP_HOLD": (
        "600",
        "Seconds the OTLP receiver keeps spans whose ancestors (with the rollout id) have not arrived yet; in "
        "memory: put the rollout id on every span (docs/any-language.md) where a receiver restart must lose nothing.",
    ),
    "OTLP_GATEWAY_JOIN": (
        "1",
        "Read the gateway's calls-by-response topic and give LLM spans the token ids of the call with the same "
        "gen_ai.response.id (0: off).",
    ),
    # --- stream processor (rollstream process) ---
    "PROCESS_APP_ID": ("", "App id of the stream processor: its consumer group, transactional ids and changelog "
                           "(default: <topic prefix>processor)."),
    "PROCESS_DATA_DIR": ("", "Local state (SQLite, committed writes only) of the stream processor "
                             "(default: $ROLLSTREAM_HOME/processor/<app id>)."),
    "PROCESS_GUARANTEE": ("exactly_once", "Processing guarantee: exactly_once (Kafka transactions) or at_least_once."),
    "PROCESS_COMMIT_INTERVAL": ("0.05", "Longest a batch waits to fill (seconds) before it is processed and committed "
                                        "in one transaction per partition; bounds reward-to-transition latency."),
    "PROCESS_COMPLETION": (
        "finished",
        "When a rollout completes: finished (terminal reward and a final lifecycle event) or terminal_reward.",
    ),
    "PROCESS_AGENT_MATCH": ("", "Regex on the agent name selecting the calls that become transitions (empty: all)."),
    "PROCESS_CREDIT": (
        "*=broadcast",
        "Credit rule per policy: 'pol=discounted:0.9,*=broadcast' (broadcast, discounted:G, last_call).",
    ),
    "PROCESS_REWARD_NAME": ("primary", "Reward dimension that is joined and trained on; other names are ignored."),
    "PROCESS_EXPIRE_AFTER": ("3600", "Seconds after which an incomplete rollout expires."),
    "PROCESS_EXPIRE_FROM": ("first_event", "Expiry clock starts at the rollout's first_event or its last_activity."),
    "PROCESS_EXPIRE_ACTION": ("drop", "What expiry does: drop the rollout, or fill (complete it with the fill value)."),
    "PROCESS_FILL_VALUE": ("0", "Terminal reward given to expired rollouts when PROCESS_EXPIRE_ACTION=fill."),
    "PROCESS_CLOSED_TTL": ("86400", "Seconds a completed or expired rollout is remembered (later events are late)."),
    "PROCESS_TIMER_INTERVAL": ("1.0", "Seconds between expiry scans of the local partitions."),
    "PROCESS_MAX_MESSAGE_BYTES": ("8388608", "Largest input message accepted; bigger ones are dead letters."),
    "PROCESS_REQUIRE_TOKEN_IDS": ("1", "Calls without prompt/response token ids are dead letters (0: allow them)."),
    "PROCESS_TOKENIZER": (
        "",
        "Tokenizer (Hugging Face folder or s3://bucket/prefix, with a chat template) that tokenizes calls captured "
        "without token ids (OTel GenAI spans) instead of dead-lettering them: transitions with "
        "token_source=tokenizer and no behaviour logprobs (empty: off).",
    ),
    "PROCESS_WEB_PORT": ("6066", "Port of the processor's web server (/metrics, /stats)."),
    "PROCESS_LOG_INTERVAL": ("30", "Seconds between counter log lines."),
    "PROCESS_IDLE_GRACE": (
        "0.5",
        "Seconds an input topic-partition must be idle before completions wait no more for it.",
    ),
    # --- security ---
    "KAFKA_CONFIG": (
        "",
        "Extra librdkafka settings for every Kafka client (SASL, TLS): JSON object or 'k=v,k=v'.",
    ),
    "OTLP_API_KEYS": ("", "OTLP receiver keys: 'key=traces,key2'; empty: no auth, loopback only."),
    "VLLM_ENV": ("~/.cache/rollstream/vllm-env", "vLLM's own environment (scripts/setup-vllm.sh): rollstream vllm."),
    # --- redaction at capture (gateway, otlp, sdk; docs/redaction.md) ---
    "REDACT": ("", "Redact captured text before it is published: comma-separated rules (email, phone, api_key, "
                   "aws_key, bearer), all, or empty/none (off)."),
    "REDACT_PATTERNS": ("", "More redaction rules: JSON object {\"name\": \"regex\"} or one name=regex per line."),
    "REDACT_HOOK": ("", "Python function (module:function, text -> text) that rewrites captured text after the rules."),
    # --- serving (rollstream serve) ---
    "SERVE_HOST": ("127.0.0.1", "Address the policy server (rollstream serve) listens on."),
    "SERVE_PORT": ("8000", "Port the policy server listens on."),
    "SERVE_MODEL": ("", "Model the policy server loads: a local Hugging Face folder or an s3://bucket/prefix URI."),
    "SERVE_POLICY": ("policy", "Policy the server serves: the OpenAI model name; its PolicyUpdates reload it."),
    "SERVE_POLICY_VERSION": ("0", "Policy version of the model given at start."),
    "SERVE_BATCH_WINDOW_MS": ("5", "How long an idle server collects concurrent requests into one batch, in ms."),
    "SERVE_MAX_BATCH": ("32", "Most sequences (rows) decoded together in one batch."),
    "SERVE_DEFAULT_MAX_TOKENS": ("256", "max_tokens of requests that give none."),
    "SERVE_THREADS": ("0", "torch CPU threads of the policy server (0: one per core but one, 1 to 8)."),
    "SERVE_DEVICE": ("auto", "Device the policy server runs on: auto (cuda when present), cpu, cuda, cuda:N."),
    "SERVE_UPDATES": ("1", "Reload on PolicyUpdate events from Kafka (0: serve the start model only)."),
    "SERVE_MODEL_NAMES": ("", "Other model names the policy server answers to, comma-separated ('*': any name)."),
    "SERVE_TOOL_CALL_PARSER": ("hermes", "How the policy server reads tool calls out of the output: hermes "
                                         "(<tool_call> blocks) or none (left as text)."),
    # --- gateway (rollstream gateway) ---
    "GATEWAY_HOST": ("127.0.0.1", "Address the gateway listens on (anything but loopback needs API keys)."),
    "GATEWAY_PORT": ("8080", "Port the gateway listens on."),
    "GATEWAY_BACKEND_URL": ("http://127.0.0.1:8000/v1", "OpenAI-compatible backend the gateway forwards to."),
    "GATEWAY_BACKEND_API_KEY": ("", "Bearer key the gateway sends to the backend (none when empty)."),
    "GATEWAY_BACKEND_TIMEOUT": ("600", "Seconds to wait for the backend (connect, and between reads); 504 past it."),
    "GATEWAY_BACKEND_CONNECTIONS": ("512", "Size of the gateway's keep-alive connection pool to the backend."),
    "GATEWAY_API_KEYS": (
        "",
        "Client keys and scopes: 'key=models+rewards,key2=models'; empty: no auth, loopback only.",
    ),
    "GATEWAY_POLICY": ("", "Policy name recorded on calls and rollouts (default: the model the backend reports)."),
    "GATEWAY_POLICY_VERSION": ("0", "Policy version recorded until the backend reports one (policy_version)."),
    "GATEWAY_QUEUE_MAX": ("100000", "Events the gateway holds in memory while Kafka is slow or down."),
    "GATEWAY_ON_FULL": ("reject", "When the event queue is full: reject (503) or serve-and-count (drop the event)."),
    "GATEWAY_MAX_BODY": ("33554432", "Largest request body the gateway accepts, in bytes (413 past it)."),
    "GATEWAY_BODY_TIMEOUT": (
        "30",
        "Seconds the gateway waits for more of a request body (one that stalls or is shorter than its "
        "Content-Length); 408 past it.",
    ),
    "GATEWAY_ACKS": (
        "kafka",
        "When the gateway answers: kafka (once Kafka acknowledged the request's events) or queued (lower latency).",
    ),
    "GATEWAY_ACK_TIMEOUT": (
        "10",
        "Seconds the gateway waits for Kafka's acknowledgement (acks=kafka): 503 past it, or a model call's answer "
        "with X-Rollstream-Recorded: pending.",
    ),
    "GATEWAY_RECORD_UNATTRIBUTED": (
        "1",
        "Record model calls without a rollout on the calls-by-response topic, keyed by response id, for the OTLP "
        "receiver to join to spans (0: relay them only).",
    ),
    "GATEWAY_MODEL_MAP": (
        "*",
        "Model names: 'client=backend' pairs, '*=NAME' for every other name, a bare '*' for the backend's own "
        "model; empty: names pass unchanged.",
    ),
}


def env(name: str) -> str:
    """Value of ``ROLLSTREAM_<name>``, or its documented default."""
    if name not in VARIABLES:
        raise ConfigError(f"unknown setting {PREFIX}{name}; add it to rollstream.settings.VARIABLES")
    return os.environ.get(PREFIX + name, VARIABLES[name][0])


def env_int(name: str) -> int:
    return parse_value(PREFIX + name, env(name), int)  # type: ignore[no-any-return]


def env_float(name: str) -> float:
    return parse_value(PREFIX + name, env(name), float)  # type: ignore[no-any-return]


TRUE, FALSE = ("1", "true", "yes", "on"), ("0", "false", "no", "off", "")


def parse_value(source: str, raw: str, hint: Any) -> Any:
    """``raw`` (the text of ``source``: a variable) as a value of type ``hint``; a ConfigError naming ``source``.

    str, int, float, bool (1/true/yes/on or 0/false/no/off/empty, any case), Path, ``Path | None``
    (empty: None), a Literal (its check is :func:`check_choice`), ``tuple[str, ...]`` (comma-separated)."""
    if hint is bool:
        word = raw.strip().lower()
        if word in TRUE or word in FALSE:
            return word in TRUE
        raise ConfigError(f"{source}={raw!r} is not a boolean: use 1/true/yes/on or 0/false/no/off")
    if hint is int:
        try:
            return int(raw)
        except ValueError as exc:
            raise ConfigError(f"{source}={raw!r} is not an integer") from exc
    if hint is float:
        try:
            return float(raw)
        except ValueError as exc:
            raise ConfigError(f"{source}={raw!r} is not a number") from exc
    if hint is Path:
        return Path(raw).expanduser()
    if hint == Path | None:
        return Path(raw).expanduser() if raw else None
    if typing.get_origin(hint) is tuple:
        return tuple(part.strip() for part in raw.split(",") if part.strip())
    return raw  # str, or a Literal of strings


def check_choice(label: str, value: Any, hint: Any) -> None:
    """The one check of a Literal-typed setting, wherever its value came from (``label`` names it)."""
    if typing.get_origin(hint) is Literal and value not in typing.get_args(hint):
        raise ConfigError(f"{label}: choose one of {', '.join(map(str, typing.get_args(hint)))}")


_UNSET: Any = type("Unset", (), {"__repr__": lambda self: "<from the environment>"})()


def option(default: Any, doc: str) -> Any:
    """A field of a :class:`Settings` class with an ``env_prefix``: ``ROLLSTREAM_<env_prefix><FIELD>`` or ``default``.

    For settings that are mainly command-line options (the trainer's): one documented default and
    help text here, the variable named after the field."""
    return field(default=_UNSET, metadata={"doc": doc, "default": default})


def setting(name: str, *, secret: bool = False) -> Any:
    """A field of a :class:`Settings` class read from ``ROLLSTREAM_<name>`` unless given, parsed by its type."""
    if name not in VARIABLES:
        raise ConfigError(f"unknown setting {PREFIX}{name}; add it to rollstream.settings.VARIABLES")
    return field(default=_UNSET, repr=not secret, metadata={"env": name})


class Settings:
    """The base of every service's settings: a dataclass whose ``setting(NAME)`` fields come from the environment.

    - from the environment with one prefix: a field not given is ``ROLLSTREAM_<NAME>`` (or the default
      documented in ``VARIABLES``), parsed by the field's type (:func:`parse_value`); an :func:`option`
      field of a class with ``env_prefix`` is ``ROLLSTREAM_<env_prefix><FIELD>`` or the option's default;
    - CLI overrides applied one way: ``Cls.load(**overrides)``, where None means "not given";
    - one Literal check for every Literal field, whether its value came from the environment or the caller;
    - then the class's own ``validate()``.
    """

    env_prefix: typing.ClassVar[str] = ""  # for option() fields: ROLLSTREAM_<env_prefix><FIELD>

    def __post_init__(self) -> None:
        hints = _hints(type(self).__module__, type(self).__qualname__)
        for f in dataclasses.fields(self):  # type: ignore[arg-type]
            name: str = f.metadata.get("env", "")
            if not name and "default" in f.metadata and self.env_prefix:
                name = self.env_prefix + f.name.upper()
            value = getattr(self, f.name)
            label = f"{f.name}={value!r}" + (f" ({PREFIX}{name})" if name else "")  # given by the caller
            if value is _UNSET:
                if name in VARIABLES:
                    value = parse_value(PREFIX + name, env(name), hints[f.name])
                else:  # an option(): its variable when set, else its default
                    raw = os.environ.get(PREFIX + name) if name else None
                    value = f.metadata["default"] if raw is None else parse_value(PREFIX + name, raw, hints[f.name])
                object.__setattr__(self, f.name, value)  # frozen dataclasses too
                label = f"{PREFIX}{name}={value!r}"
            check_choice(label, value, hints[f.name])
        self.validate()

    def validate(self) -> None:
        """Checks across fields; a ConfigError that names the variable and the fix."""

    @classmethod
    def load(cls: type[_S], **overrides: Any) -> _S:
        """These settings from the environment, with the given values (None: not given) in place of their variables."""
        known = {f.name for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
        unknown = sorted(set(overrides) - known)
        if unknown:
            raise ConfigError(f"{cls.__name__} has no setting {', '.join(unknown)}")
        return cls(**{k: v for k, v in overrides.items() if v is not None})

    @classmethod
    def from_args(cls: type[_S], args: Any, *names: str, **overrides: Any) -> _S:
        """``load`` with the options ``names`` of ``args`` (argparse; None: not given), then ``overrides``."""
        return cls.load(**{n: getattr(args, n, None) for n in names}, **overrides)



_S = typing.TypeVar("_S", bound=Settings)


@functools.cache
def _hints(module: str, qualname: str) -> dict[str, Any]:
    cls: Any = sys.modules[module]
    for part in qualname.split("."):
        cls = getattr(cls, part)
    return typing.get_type_hints(cls)


@dataclass(frozen=True)
class StackSettings(Settings):
    """Where and how the local stack runs."""

    home: Path = setting("HOME")
    state_dir: Path = field(default=None)  # type: ignore[assignment]  # ROLLSTREAM_STATE_DIR, or <home>/stack
    kafka_version: str = setting("KAFKA_VERSION")
    kafka_port: int = setting("KAFKA_PORT")
    kafka_heap: str = setting("KAFKA_HEAP")
    registry_version: str = setting("REGISTRY_VERSION")
    registry_port: int = setting("REGISTRY_PORT")
    registry_heap: str = setting("REGISTRY_HEAP")
    s3_port: int = setting("S3_PORT")
    versitygw_version: str = setting("VERSITYGW_VERSION")
    mlflow_port: int = setting("MLFLOW_PORT")
    s3_access_key: str = setting("S3_ACCESS_KEY")
    s3_secret_key: str = setting("S3_SECRET_KEY", secret=True)
    s3_region: str = setting("S3_REGION")
    s3_bucket: str = setting("S3_BUCKET")
    mlflow_bucket: str = setting("MLFLOW_BUCKET")

    def validate(self) -> None:
        if self.state_dir is None:
            raw = env("STATE_DIR")
            object.__setattr__(self, "state_dir", Path(raw).expanduser() if raw else self.home / "stack")

    @property
    def buckets(self) -> tuple[str, ...]:
        return self.s3_bucket, self.mlflow_bucket


@dataclass(frozen=True)
class ConnectionSettings(Settings):
    """How clients reach Kafka, the registry, S3 and MLflow."""

    kafka_bootstrap: str = setting("KAFKA_BOOTSTRAP")
    schema_registry_url: str = setting("SCHEMA_REGISTRY_URL")
    s3_endpoint: str = setting("S3_ENDPOINT")
    s3_access_key: str = setting("S3_ACCESS_KEY")
    s3_secret_key: str = setting("S3_SECRET_KEY", secret=True)
    s3_region: str = setting("S3_REGION")
    s3_bucket: str = setting("S3_BUCKET")
    mlflow_tracking_uri: str = setting("MLFLOW_TRACKING_URI")
    topic_prefix: str = setting("TOPIC_PREFIX")
    partitions: int = setting("PARTITIONS")
    kafka_config: str = setting("KAFKA_CONFIG", secret=True)  # may hold passwords

    def validate(self) -> None:
        if self.partitions < 1:
            raise ConfigError(f"{PREFIX}PARTITIONS must be at least 1, got {self.partitions}")
        kafka_client_config(self.kafka_config)  # refuse a malformed value at start, not at first use


def kafka_client_config(text: str) -> dict[str, Any]:
    """``ROLLSTREAM_KAFKA_CONFIG`` as librdkafka settings: a JSON object, or ``key=value`` pairs split on commas.

    For example ``security.protocol=SASL_SSL,sasl.mechanism=PLAIN,sasl.username=u,sasl.password=p`` or
    ``{"security.protocol": "SSL", "ssl.ca.location": "/etc/ssl/ca.pem"}``. Values are never logged.
    """
    text = text.strip()
    if not text:
        return {}
    if text.startswith("{"):
        try:
            value = json.loads(text)
        except ValueError as exc:
            raise ConfigError(f"{PREFIX}KAFKA_CONFIG is not a valid JSON object: {exc}") from exc
        if not isinstance(value, dict) or not all(isinstance(v, str | int | float | bool) for v in value.values()):
            raise ConfigError(f"{PREFIX}KAFKA_CONFIG must be a JSON object of strings, numbers or booleans")
        return value
    out: dict[str, Any] = {}
    for position, entry in enumerate((e.strip() for e in text.split(",")), start=1):
        if not entry:
            continue
        key, sep, value = entry.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"{PREFIX}KAFKA_CONFIG: entry {position} is not 'key=value' (use JSON for values "
                              "with commas)")
        out[key.strip()] = value.strip()
    return out
