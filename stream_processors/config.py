"""Settings of the stream processor (``rollstream process``), from ROLLSTREAM_PROCESS_* variables."""

from __future__ import annotations

import re
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Literal

from rollstream.errors import ConfigError
from rollstream.settings import PREFIX, Settings, env, setting
from rollstream.stream_processors.credit import CreditRule, parse_rules

Guarantee = Literal["exactly_once", "at_least_once"]
Completion = Literal["finished", "terminal_reward"]
ExpireFrom = Literal["first_event", "last_activity"]
ExpireAction = Literal["drop", "fill"]


def default_app_id(topic_prefix: str) -> str:
    """The app id (consumer group, changelog and state) of the pipeline on ``topic_prefix``.

    Derived from the prefix so that pipelines on two prefixes of one cluster never share a
    consumer group, a changelog or local state by accident."""
    return f"{topic_prefix}processor"


@dataclass(frozen=True)
class ProcessorSettings(Settings):
    """How the join behaves; every field maps to one ROLLSTREAM_PROCESS_* variable."""

    app_id: str = setting("PROCESS_APP_ID")
    data_dir: Path | None = setting("PROCESS_DATA_DIR")  # None: $ROLLSTREAM_HOME/processor/<app id>
    guarantee: Guarantee = setting("PROCESS_GUARANTEE")
    commit_interval: float = setting("PROCESS_COMMIT_INTERVAL")
    completion: Completion = setting("PROCESS_COMPLETION")
    agent_match: str = setting("PROCESS_AGENT_MATCH")
    credit: str = setting("PROCESS_CREDIT")
    reward_name: str = setting("PROCESS_REWARD_NAME")
    expire_after: float = setting("PROCESS_EXPIRE_AFTER")
    expire_from: ExpireFrom = setting("PROCESS_EXPIRE_FROM")
    expire_action: ExpireAction = setting("PROCESS_EXPIRE_ACTION")
    fill_value: float = setting("PROCESS_FILL_VALUE")
    closed_ttl: float = setting("PROCESS_CLOSED_TTL")
    timer_interval: float = setting("PROCESS_TIMER_INTERVAL")
    max_message_bytes: int = setting("PROCESS_MAX_MESSAGE_BYTES")
    require_token_ids: bool = setting("PROCESS_REQUIRE_TOKEN_IDS")
    # A tokenizer folder or s3:// URI: calls without token ids are tokenized from their text (see retokenize.py).
    tokenizer: str = setting("PROCESS_TOKENIZER")
    web_port: int = setting("PROCESS_WEB_PORT")
    log_interval: float = setting("PROCESS_LOG_INTERVAL")
    idle_grace: float = setting("PROCESS_IDLE_GRACE")
    source: str = "processor"

    def validate(self) -> None:
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
