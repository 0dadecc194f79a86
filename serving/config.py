"""The policy server's settings: one frozen object from ``ROLLSTREAM_SERVE_*`` variables."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import cast

from rollstream.errors import ConfigError
from rollstream.serving.tools import TOOL_CALL_PARSERS, ToolCallParser
from rollstream.settings import PREFIX, ConnectionSettings, env, env_int


@dataclass(frozen=True)
class ServeSettings:
    """How ``rollstream serve`` runs; command-line options override these."""

    host: str = field(default_factory=lambda: env("SERVE_HOST"))
    port: int = field(default_factory=lambda: env_int("SERVE_PORT"))
    model: str = field(default_factory=lambda: env("SERVE_MODEL"))  # local folder or s3:// URI
    policy: str = field(default_factory=lambda: env("SERVE_POLICY"))
    policy_version: int = field(default_factory=lambda: env_int("SERVE_POLICY_VERSION"))
    batch_window_ms: int = field(default_factory=lambda: env_int("SERVE_BATCH_WINDOW_MS"))
    max_batch: int = field(default_factory=lambda: env_int("SERVE_MAX_BATCH"))
    default_max_tokens: int = field(default_factory=lambda: env_int("SERVE_DEFAULT_MAX_TOKENS"))
    threads: int = field(default_factory=lambda: env_int("SERVE_THREADS"))  # 0: one per core but one, 1 to 8
    device: str = field(default_factory=lambda: env("SERVE_DEVICE"))
    updates: bool = field(default_factory=lambda: env("SERVE_UPDATES") not in ("0", "false", "no", ""))
    # Other names the server answers to ("*": any); responses still name the policy.
    model_names: tuple[str, ...] = field(
        default_factory=lambda: tuple(n.strip() for n in env("SERVE_MODEL_NAMES").split(",") if n.strip()))
    tool_call_parser: ToolCallParser = field(
        default_factory=lambda: cast(ToolCallParser, env("SERVE_TOOL_CALL_PARSER")))
    connection: ConnectionSettings = field(default_factory=ConnectionSettings)

    def __post_init__(self) -> None:
        checks = [
            (0 < self.port < 65536, f"{PREFIX}SERVE_PORT must be a TCP port, got {self.port}"),
            (self.policy_version >= 0, f"{PREFIX}SERVE_POLICY_VERSION must be >= 0, got {self.policy_version}"),
            (self.batch_window_ms >= 0, f"{PREFIX}SERVE_BATCH_WINDOW_MS must be >= 0, got {self.batch_window_ms}"),
            (self.max_batch >= 1, f"{PREFIX}SERVE_MAX_BATCH must be at least 1, got {self.max_batch}"),
            (self.default_max_tokens >= 1,
             f"{PREFIX}SERVE_DEFAULT_MAX_TOKENS must be at least 1, got {self.default_max_tokens}"),
            (self.threads >= 0, f"{PREFIX}SERVE_THREADS must be >= 0 (0: automatic), got {self.threads}"),
            (bool(self.policy), f"{PREFIX}SERVE_POLICY must not be empty"),
            (self.tool_call_parser in TOOL_CALL_PARSERS,
             f"{PREFIX}SERVE_TOOL_CALL_PARSER must be one of {', '.join(TOOL_CALL_PARSERS)}, "
             f"got '{self.tool_call_parser}'"),
        ]
        for ok, message in checks:
            if not ok:
                raise ConfigError(message)
