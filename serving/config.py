"""The policy server's settings: one frozen object from ``ROLLSTREAM_SERVE_*`` variables."""

from __future__ import annotations

from dataclasses import dataclass, field

from rollstream.errors import ConfigError
from rollstream.serving.tools import ToolCallParser
from rollstream.settings import PREFIX, ConnectionSettings, Settings, setting


@dataclass(frozen=True)
class ServeSettings(Settings):
    """How ``rollstream serve`` runs; command-line options override these."""

    host: str = setting("SERVE_HOST")
    port: int = setting("SERVE_PORT")
    model: str = setting("SERVE_MODEL")  # local folder or s3:// URI
    policy: str = setting("SERVE_POLICY")
    policy_version: int = setting("SERVE_POLICY_VERSION")
    batch_window_ms: int = setting("SERVE_BATCH_WINDOW_MS")
    max_batch: int = setting("SERVE_MAX_BATCH")
    default_max_tokens: int = setting("SERVE_DEFAULT_MAX_TOKENS")
    threads: int = setting("SERVE_THREADS")  # 0: one per core but one, 1 to 8
    device: str = setting("SERVE_DEVICE")
    updates: bool = setting("SERVE_UPDATES")
    # Other names the server answers to ("*": any); responses still name the policy.
    model_names: tuple[str, ...] = setting("SERVE_MODEL_NAMES")
    tool_call_parser: ToolCallParser = setting("SERVE_TOOL_CALL_PARSER")
    connection: ConnectionSettings = field(default_factory=ConnectionSettings)

    def validate(self) -> None:
        checks = [
            (0 < self.port < 65536, f"{PREFIX}SERVE_PORT must be a TCP port, got {self.port}"),
            (self.policy_version >= 0, f"{PREFIX}SERVE_POLICY_VERSION must be >= 0, got {self.policy_version}"),
            (self.batch_window_ms >= 0, f"{PREFIX}SERVE_BATCH_WINDOW_MS must be >= 0, got {self.batch_window_ms}"),
            (self.max_batch >= 1, f"{PREFIX}SERVE_MAX_BATCH must be at least 1, got {self.max_batch}"),
            (self.default_max_tokens >= 1,
             f"{PREFIX}SERVE_DEFAULT_MAX_TOKENS must be at least 1, got {self.default_max_tokens}"),
            (self.threads >= 0, f"{PREFIX}SERVE_THREADS must be >= 0 (0: automatic), got {self.threads}"),
            (bool(self.policy), f"{PREFIX}SERVE_POLICY must not be empty"),
        ]
        for ok, message in checks:
            if not ok:
                raise ConfigError(message)
