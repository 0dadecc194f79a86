"""Settings of the stream processor (``rollstream process``), from ROLLSTREAM_PROCESS_* variables."""

from __future__ import annotations

import re
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Literal

from rollstream.errors import ConfigError
from rollstream.settings import PREFIX, env, env_float, env_int
from rollstream.stream_processors.credit import CreditRule, parse_rules

Guarantee = Literal["exactly_once", "at_least_once"]
Completion = Literal["finished", "terminal_reward"]
ExpireFrom = Literal["first_event", "last_activity"]
ExpireAction = Literal["drop", "fill"]


def _choice(name: str, choices: tuple[str, ...]) -> str:
    raw = env(name)
    if raw not in choices:
        raise ConfigError(f"{PREFIX}{name}={raw!r}: choose one of {', '.join(choices)}")
    return raw


def default_app_id(topic_prefix: str) -> str:
    """The app id (consumer group, changelog and state) of the pipeline on ``topic_prefix``.

    Derived from the prefix so that pipelines on two prefixes of one cluster never share a
    consumer group, a changelog or local state by accident."""
    return f"{topic_prefix}processor"


def _data_dir() -> Path | None:
    raw = env("PROCESS_DATA_DIR")
    return Path(raw).expanduser() if raw else None


@dataclass(frozen=True)
class ProcessorSettings:
    """How the join behaves; every field maps to one ROLLSTREAM_PROCESS_* variable."""

    app_id: str = field(default_factory=lambda: env("PROCESS_APP_ID"))
    data_dir: Path | None = field(default_factory=_data_dir)  # None: $ROLLSTREAM_HOME/processor/<app id>
    guarantee: Guarantee = field(
        default_factory=lambda: _choice("PROCESS_GUARANTEE", ("exactly_once", "at_least_once"))  # type: ignore[arg-type,return-value]
    )
    commit_interval: float = field(default_factory=lambda: env_float("PROCESS_COMMIT_INTERVAL"))
    completion: Completion = field(
        default_factory=lambda: _choice("PROCESS_COMPLETION", ("finished", "terminal_reward"))  # type: ignore[arg-type,return-value]
    )
    agent_match: str = field(default_factory=lambda: env("PROCESS_AGENT_MATCH"))
    credit: str = field(default_factory=lambda: env("PROCESS_CREDIT"))
    reward_name: str = field(default_factory=lambda: env("PROCESS_REWARD_NAME"))
    expire_after: float = field(default_factory=lambda: env_float("PROCESS_EXPIRE_AFTER"))
    expire_from: ExpireFrom = field(
        default_factory=lambda: _choice("PROCESS_EXPIRE_FROM", ("first_event", "last_activity"))  # type: ignore[arg-type,return-value]
    )
    expire_action: ExpireAction = field(
        default_factory=lambda: _choice("PROCESS_EXPIRE_ACTION", ("drop", "fill"))  # type: ignore[arg-type,return-value]
    )
    fill_value: float = field(default_factory=lambda: env_float("PROCESS_FILL_VALUE"))
    closed_ttl: float = field(default_factory=lambda: env_float("PROCESS_CLOSED_TTL"))
    timer_interval: float = field(default_factory=lambda: env_float("PROCESS_TIMER_INTERVAL"))
    max_message_bytes: int = field(default_factory=lambda: env_int("PROCESS_MAX_MESSAGE_BYTES"))
    require_token_ids: bool = field(default_factory=lambda: env("PROCESS_REQUIRE_TOKEN_IDS") not in ("0", "false", ""))
    # A tokenizer folder or s3:// URI: calls without token ids are tokenized from their text (see retokenize.py).
    tokenizer: str = field(default_factory=lambda: env("PROCESS_TOKENIZER"))
    web_port: int = field(default_factory=lambda: env_int("PROCESS_WEB_PORT"))
    log_interval: float = field(default_factory=lambda: env_float("PROCESS_LOG_INTERVAL"))
    idle_grace: float = field(default_factory=lambda: env_float("PROCESS_IDLE_GRACE"))
    source: str = "processor"

    def __post_init__(self) -> None:
        try:
            re.compile(self.agent_match)
        except re.error as exc:
            raise ConfigError(f"{PREFIX}PROCESS_AGENT_MATCH={self.agent_match!r} is not a regex: {exc}") from exc
        self.credit_rules()  # fails early on a malformed rule
        for name, value in (("EXPIRE_AFTER", self.expire_after), ("CLOSED_TTL", self.closed_ttl),
                            ("TIMER_INTERVAL", self.timer_interval), ("COMMIT_INTERVAL", self.commit_interval)):
            if value <= 0:
                raise ConfigError(f"{PREFIX}PROCESS_{name} must be positive, got {value}")

    def for_prefix(self, topic_prefix: str) -> ProcessorSettings:
        """These settings with the app id and data dir that were left to their defaults derived from the prefix."""
        app_id = self.app_id or default_app_id(topic_prefix)
        data_dir = self.data_dir or Path(env("HOME")).expanduser() / "processor" / app_id
        return replace(self, app_id=app_id, data_dir=data_dir)

    def credit_rules(self) -> dict[str, CreditRule]:
        return parse_rules(self.credit)

    def agent_pattern(self) -> re.Pattern[str] | None:
        return re.compile(self.agent_match) if self.agent_match else None
