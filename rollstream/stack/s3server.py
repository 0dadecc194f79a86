"""An S3-compatible object store for the local stack: versitygw on a local folder.

MinIO remains the production store (infra/docker-compose.yml); everything in Rollstream
reaches S3 through an endpoint URL, so any S3 server serves.
"""

from __future__ import annotations

import os
from pathlib import Path

import urllib3
from minio import Minio

from rollstream.stack.base import Service
from rollstream.stack.process import require_tool, run_checked


class VersityGateway(Service):
    name = "s3"
    startup_timeout = 30.0

    @property
    def port(self) -> int:
        return self.settings.s3_port

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def binary(self) -> Path:
        return self.settings.home / "bin" / f"versitygw-{self.settings.versitygw_version}"

    def installed(self) -> bool:
        return self.binary.exists()

    def install(self) -> None:
        go = require_tool("go")
        gobin = self.settings.home / "gobuild" / self.settings.versitygw_version
        gobin.mkdir(parents=True, exist_ok=True)
        env = dict(os.environ)
        env.update(GOBIN=str(gobin), GOPATH=str(self.settings.home / "go"), GOFLAGS="-modcacherw")
        run_checked(
            [go, "install", f"github.com/versity/versitygw/cmd/versitygw@{self.settings.versitygw_version}"],
            "building versitygw with 'go install'",
            self.settings.state_dir / "logs" / "install.log",
            env=env,
        )
        self.binary.parent.mkdir(parents=True, exist_ok=True)
        (gobin / "versitygw").rename(self.binary)

    def start(self) -> None:
        root = self.data_dir / "buckets"
        sidecar = self.data_dir / "meta"
        root.mkdir(parents=True, exist_ok=True)
        sidecar.mkdir(parents=True, exist_ok=True)
        self.process.start(
            [
                str(self.binary),
                "--access", self.settings.s3_access_key,
                "--secret", self.settings.s3_secret_key,
                "--region", self.settings.s3_region,
                "--port", f"127.0.0.1:{self.port}",
                "--quiet",
                # Object metadata in a side folder: works where the filesystem lacks xattrs.
                "posix", "--sidecar", str(sidecar), str(root),
            ]
        )

    def _client(self, retries: int = 3) -> Minio:
        return Minio(
            f"127.0.0.1:{self.port}",
            access_key=self.settings.s3_access_key,
            secret_key=self.settings.s3_secret_key,
            region=self.settings.s3_region,
            secure=False,
            http_client=urllib3.PoolManager(retries=urllib3.Retry(total=retries), timeout=5.0),
        )

    def healthy(self) -> bool:
        try:
            self._client(retries=0).list_buckets()
            return True
        except Exception:  # noqa: BLE001 - any failure means "not healthy yet"
            return False

    def ensure_buckets(self) -> None:
        client = self._client()
        for bucket in self.settings.buckets:
            if not client.bucket_exists(bucket):
                client.make_bucket(bucket)
