"""The MLflow tracking server: SQLite backend, artifacts proxied to the S3 server."""

from __future__ import annotations

import sys
import urllib.request

from rollstream.settings import StackSettings
from rollstream.stack.base import Service


class MlflowServer(Service):
    name = "mlflow"
    startup_timeout = 120.0

    def __init__(self, settings: StackSettings, s3_url: str) -> None:
        super().__init__(settings)
        self.s3_url = s3_url

    @property
    def port(self) -> int:
        return self.settings.mlflow_port

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def installed(self) -> bool:
        return True  # a Python dependency of this package

    def install(self) -> None:
        return None

    def start(self) -> None:
        self.data_dir.mkdir(parents=True, exist_ok=True)
        self.process.start(
            [
                sys.executable, "-m", "mlflow", "server",
                "--backend-store-uri", f"sqlite:///{self.data_dir / 'mlflow.db'}",
                "--artifacts-destination", f"s3://{self.settings.mlflow_bucket}/artifacts",
                "--host", "127.0.0.1", "--port", str(self.port), "--workers", "1",
            ],
            env={
                "MLFLOW_S3_ENDPOINT_URL": self.s3_url,
                "AWS_ACCESS_KEY_ID": self.settings.s3_access_key,
                "AWS_SECRET_ACCESS_KEY": self.settings.s3_secret_key,
                "AWS_DEFAULT_REGION": self.settings.s3_region,
                "MLFLOW_DISABLE_TELEMETRY": "true",
            },
        )

    def healthy(self) -> bool:
        try:
            with urllib.request.urlopen(f"{self.url}/health", timeout=2) as resp:
                return bool(resp.status == 200)
        except OSError:
            return False
