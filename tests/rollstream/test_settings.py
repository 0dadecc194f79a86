"""Settings come from ROLLSTREAM_* variables, all declared and documented in one place."""

from __future__ import annotations

import argparse
import dataclasses
import typing
from pathlib import Path
from typing import Any, Literal

import pytest

from rollstream.errors import ConfigError
from rollstream.settings import PREFIX, VARIABLES, ConnectionSettings, Settings, StackSettings, env, env_int

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


# --- one settings base for every service -----------------------------------------------------------------------

def _all_settings() -> list[type[Settings]]:
    from rollstream.producers.gateway import GatewaySettings
    from rollstream.producers.otlp import OtlpSettings
    from rollstream.producers.redact import RedactionSettings
    from rollstream.producers.sdk import SdkSettings
    from rollstream.serving.config import ServeSettings
    from rollstream.stream_processors.config import ProcessorSettings
    from rollstream.trainer.config import TrainConfig

    return [StackSettings, ConnectionSettings, SdkSettings, RedactionSettings, GatewaySettings, OtlpSettings,
            ProcessorSettings, ServeSettings, TrainConfig]


REQUIRED = {"TrainConfig": {"policy": "p", "model": "m"}}


def _fields(cls: type[Settings], kind: Any) -> list[tuple[str, str]]:
    """(field, variable) of the fields of ``cls`` whose type is ``kind`` (or a Literal when kind is Literal)."""
    hints = typing.get_type_hints(cls)
    out = []
    for f in dataclasses.fields(cls):  # type: ignore[arg-type]
        hint = hints[f.name]
        if (typing.get_origin(hint) is Literal) if kind is Literal else hint is kind:
            name = f.metadata.get("env") or cls.env_prefix + f.name.upper()
            out.append((f.name, PREFIX + name))
    return out


@pytest.mark.parametrize("cls", _all_settings(), ids=lambda c: c.__name__)
def test_booleans_parse_one_way(cls: type[Settings], monkeypatch: pytest.MonkeyPatch) -> None:
    for name, var in _fields(cls, bool):
        for raw, want in (("1", True), ("Yes", True), ("on", True), ("true", True),
                          ("0", False), ("no", False), ("OFF", False), ("False", False), ("", False)):
            monkeypatch.setenv(var, raw)
            assert getattr(cls(**REQUIRED.get(cls.__name__, {})), name) is want, (var, raw)
        monkeypatch.setenv(var, "maybe")
        with pytest.raises(ConfigError, match=f"{var}='maybe' is not a boolean"):
            cls(**REQUIRED.get(cls.__name__, {}))
        monkeypatch.delenv(var)


@pytest.mark.parametrize("cls", _all_settings(), ids=lambda c: c.__name__)
def test_choices_are_checked_once_from_the_environment_and_from_code(
        cls: type[Settings], monkeypatch: pytest.MonkeyPatch) -> None:
    required = REQUIRED.get(cls.__name__, {})
    for name, var in _fields(cls, Literal):
        monkeypatch.setenv(var, "nonsense")
        with pytest.raises(ConfigError, match=f"{var}='nonsense': choose one of"):
            cls(**required)
        monkeypatch.delenv(var)
        with pytest.raises(ConfigError, match=f"{name}='nonsense'( \\({var}\\))?: choose one of"):
            cls(**required, **{name: "nonsense"})


def test_every_service_has_the_base() -> None:
    classes = _all_settings()
    assert len(classes) == 9
    for cls in classes:
        assert issubclass(cls, Settings)
        fields = dataclasses.fields(cls)  # type: ignore[arg-type]
        from_env = [f for f in fields if "env" in f.metadata or "default" in f.metadata]
        assert from_env, cls.__name__
        for f in fields:
            if "env" in f.metadata:
                assert f.metadata["env"] in VARIABLES, (cls.__name__, f.name)


def test_overrides_apply_one_way(monkeypatch: pytest.MonkeyPatch) -> None:
    from rollstream.stream_processors.config import ProcessorSettings

    monkeypatch.setenv("ROLLSTREAM_PROCESS_GUARANTEE", "at_least_once")
    monkeypatch.setenv("ROLLSTREAM_PROCESS_WEB_PORT", "7001")
    s = ProcessorSettings.load(guarantee="exactly_once", web_port=None)  # None: not given, the variable stands
    assert (s.guarantee, s.web_port) == ("exactly_once", 7001)
    args = argparse.Namespace(guarantee=None, web_port=7002)
    assert ProcessorSettings.from_args(args, "guarantee", "web_port").web_port == 7002
    assert ProcessorSettings.from_args(args, "guarantee").guarantee == "at_least_once"
    with pytest.raises(ConfigError, match="ProcessorSettings has no setting nope"):
        ProcessorSettings.load(nope=1)


def test_the_trainer_reads_the_environment_like_the_others(monkeypatch: pytest.MonkeyPatch) -> None:
    from rollstream.trainer.config import TrainConfig, parse_config

    monkeypatch.setenv("ROLLSTREAM_TRAIN_LR", "3e-4")
    monkeypatch.setenv("ROLLSTREAM_TRAIN_MERGE_TURNS", "off")
    monkeypatch.setenv("ROLLSTREAM_TRAIN_OBJECTIVE", "rloo")
    got = parse_config(["--policy", "p", "--model", "m"])
    assert (got.lr, got.merge_turns, got.objective, got.batch_size) == (3e-4, False, "rloo", 8)
    got = parse_config(["--policy", "p", "--model", "m", "--lr", "1e-3", "--merge-turns", "--objective", "grpo"])
    assert (got.lr, got.merge_turns, got.objective) == (1e-3, True, "grpo")  # the command line wins
    assert TrainConfig(policy="p", model="m", lr=2e-5).lr == 2e-5
    monkeypatch.setenv("ROLLSTREAM_TRAIN_BATCH_SIZE", "eight")
    with pytest.raises(ConfigError, match="ROLLSTREAM_TRAIN_BATCH_SIZE='eight' is not an integer"):
        TrainConfig(policy="p", model="m")
