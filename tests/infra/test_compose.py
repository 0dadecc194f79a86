"""infra/docker-compose.yml validates offline and holds the whole stack."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

COMPOSE = Path(__file__).resolve().parents[2] / "infra" / "docker-compose.yml"


def _docker_compose() -> str:
    exe = shutil.which("docker-compose")
    if exe is None:
        pytest.fail("docker-compose is not installed; 'apt-get install -y docker-compose' (it validates offline)")
    return exe


def test_compose_file_validates_offline() -> None:
    out = subprocess.run([_docker_compose(), "-f", str(COMPOSE), "config", "-q"], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr


def test_compose_has_every_service() -> None:
    out = subprocess.run(
        [_docker_compose(), "-f", str(COMPOSE), "--profile", "jobs", "config", "--services"],
        capture_output=True, text=True, check=True,
    )
    services = set(out.stdout.split())
    assert {"kafka", "registry", "registry-db", "minio", "minio-init", "postgres", "mlflow", "smoke"} <= services
    assert {"serve", "gateway", "processor", "trainer", "trainer-gpu", "vllm"} <= services


def test_gpu_services_are_behind_profiles() -> None:
    spec = yaml.safe_load(COMPOSE.read_text())["services"]
    for name in ("trainer-gpu", "vllm"):
        assert spec[name]["profiles"] in (["gpu"], ["vllm"])
        assert spec[name]["deploy"]["resources"]["reservations"]["devices"][0]["capabilities"] == ["gpu"]
    for name in ("kafka", "registry", "minio", "postgres", "mlflow"):
        assert "profiles" not in spec[name], f"{name} is part of the base stack"


def test_compose_kafka_is_kraft_and_mlflow_uses_postgres_and_minio() -> None:
    spec = yaml.safe_load(COMPOSE.read_text())["services"]
    assert spec["kafka"]["image"].startswith("apache/kafka:")
    assert "controller" in spec["kafka"]["environment"]["KAFKA_PROCESS_ROLES"]
    assert "postgresql://" in spec["mlflow"]["command"]
    assert spec["mlflow"]["environment"]["MLFLOW_S3_ENDPOINT_URL"] == "http://minio:9000"


def test_a_broken_compose_file_is_caught(tmp_path: Path) -> None:
    broken = tmp_path / "compose.yml"
    broken.write_text("services:\n  a:\n    image: x\n    depends_on: [missing]\n")
    out = subprocess.run([_docker_compose(), "-f", str(broken), "config", "-q"], capture_output=True, text=True)
    assert out.returncode != 0


def test_registry_keeps_its_schemas_in_postgres() -> None:
    """Records name their schema by id: a registry that forgot its schemas on restart would reuse the ids."""
    spec = yaml.safe_load(COMPOSE.read_text())["services"]
    env = spec["registry"]["environment"]
    assert env["APICURIO_STORAGE_KIND"] == "sql" and env["APICURIO_STORAGE_SQL_KIND"] == "postgresql"
    assert env["APICURIO_DATASOURCE_URL"].startswith("jdbc:postgresql://postgres:")
    assert not env["APICURIO_DATASOURCE_URL"].endswith("/mlflow"), "the registry gets a database of its own"
    assert "postgres-data:/var/lib/postgresql/data" in spec["postgres"]["volumes"]
    # The job that creates the registry's database runs before the registry starts.
    assert spec["registry"]["depends_on"]["registry-db"]["condition"] == "service_completed_successfully"
    assert "CREATE DATABASE registry" in spec["registry-db"]["command"][0]


def test_long_running_services_restart() -> None:
    spec = yaml.safe_load(COMPOSE.read_text())["services"]
    for name in ("kafka", "registry", "minio", "postgres", "mlflow", "serve", "gateway", "processor", "vllm"):
        assert spec[name].get("restart") == "unless-stopped", f"{name} has no restart policy"
    # A training job may end on its own (--max-steps, --idle-exit-s): restarted only when it fails.
    for name in ("trainer", "trainer-gpu"):
        assert spec[name].get("restart") == "on-failure", f"{name} should restart on failure only"
    for name in ("minio-init", "registry-db", "smoke"):
        assert "restart" not in spec[name], f"{name} is a one-shot job"
