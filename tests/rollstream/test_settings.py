"""Settings come from ROLLSTREAM_* variables, all declared and documented in one place."""

from __future__ import annotations

from pathlib import Path

import pytest

from rollstream.errors import ConfigError
from rollstream.settings import PREFIX, VARIABLES, ConnectionSettings, StackSettings, env, env_int

README = Path(__file__).resolve().parents[2] / "README.md"


def test_every_variable_is_in_the_readme_table() -> None:
    text = README.read_text()
    missing = [PREFIX + name for name in VARIABLES if f"| `{PREFIX}{name}` |" not in text]
    assert not missing, f"add to the README's configuration table: {missing}"


def test_environment_overrides_defaults(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ROLLSTREAM_KAFKA_BOOTSTRAP", "broker:1234")
    monkeypatch.setenv("ROLLSTREAM_PARTITIONS", "8")
    s = ConnectionSettings()
    assert (s.kafka_bootstrap, s.partitions) == ("broker:1234", 8)
    assert StackSettings().kafka_port == int(VARIABLES["KAFKA_PORT"][0])


def test_bad_values_name_the_variable(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ROLLSTREAM_KAFKA_PORT", "ninety")
    with pytest.raises(ConfigError, match="ROLLSTREAM_KAFKA_PORT='ninety' is not an integer"):
        env_int("KAFKA_PORT")
    monkeypatch.setenv("ROLLSTREAM_PARTITIONS", "0")
    with pytest.raises(ConfigError, match="ROLLSTREAM_PARTITIONS must be at least 1"):
        ConnectionSettings()
    with pytest.raises(ConfigError, match="unknown setting ROLLSTREAM_NOPE"):
        env("NOPE")


def test_settings_are_frozen() -> None:
    s = ConnectionSettings()
    with pytest.raises(AttributeError):
        s.partitions = 5  # type: ignore[misc]
