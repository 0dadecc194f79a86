"""The project's S3 client: objects and folders on any S3-compatible server.

Configured by endpoint (``ROLLSTREAM_S3_ENDPOINT``), so MinIO in production, versitygw
on the local stack and AWS all serve. Locations are written ``s3://bucket/key``.
"""

from __future__ import annotations

import io
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlparse

from minio import Minio
from minio.deleteobjects import DeleteObject
from minio.error import MinioException, S3Error
from urllib3.exceptions import HTTPError

from rollstream.errors import StorageError
from rollstream.settings import ConnectionSettings

# What the client raises: S3 error replies, bad responses, and the network (urllib3 raises
# MaxRetryError, not an OSError, once the server has refused its connections a few times).
CLIENT_ERRORS = (MinioException, HTTPError, OSError)
# S3 error codes that a later attempt may not get.
TRANSIENT_CODES = frozenset({"InternalError", "ServiceUnavailable", "SlowDown", "RequestTimeout",
                             "RequestTimeTooSkewed"})


def transient(exc: BaseException) -> bool:
    """Whether a failed S3 call is worth retrying: the network or the server's fault, not a refusal."""
    cause = exc.__cause__ if isinstance(exc, StorageError) and exc.__cause__ is not None else exc
    if isinstance(cause, S3Error):
        status = cause.response.status if cause.response is not None else 0
        return status >= 500 or status == 429 or cause.code in TRANSIENT_CODES
    return isinstance(cause, CLIENT_ERRORS)


@dataclass(frozen=True)
class S3Uri:
    bucket: str
    key: str

    @classmethod
    def parse(cls, uri: str) -> S3Uri:
        parsed = urlparse(uri)
        if parsed.scheme != "s3" or not parsed.netloc:
            raise StorageError(f"'{uri}' is not an s3://bucket/key URI")
        return cls(parsed.netloc, parsed.path.lstrip("/"))

    def __str__(self) -> str:
        return f"s3://{self.bucket}/{self.key}"

    def child(self, name: str) -> S3Uri:
        return S3Uri(self.bucket, f"{self.key.rstrip('/')}/{name}" if self.key else name)


class ObjectStore:
    def __init__(self, settings: ConnectionSettings | None = None) -> None:
        self.settings = settings or ConnectionSettings()
        endpoint = urlparse(self.settings.s3_endpoint)
        if not endpoint.hostname:
            raise StorageError(f"S3 endpoint '{self.settings.s3_endpoint}' has no host")
        self.client = Minio(
            endpoint.netloc,
            access_key=self.settings.s3_access_key,
            secret_key=self.settings.s3_secret_key,
            region=self.settings.s3_region,
            secure=endpoint.scheme == "https",
        )

    def _fail(self, what: str, exc: Exception) -> StorageError:
        return StorageError(f"{what} on {self.settings.s3_endpoint} failed: {exc}")

    def ensure_bucket(self, bucket: str) -> None:
        try:
            if not self.client.bucket_exists(bucket):
                self.client.make_bucket(bucket)
        except CLIENT_ERRORS as exc:
            raise self._fail(f"creating bucket '{bucket}'", exc) from exc

    def put_bytes(self, uri: str | S3Uri, data: bytes, content_type: str = "application/octet-stream") -> None:
        loc = uri if isinstance(uri, S3Uri) else S3Uri.parse(uri)
        try:
            self.client.put_object(loc.bucket, loc.key, io.BytesIO(data), len(data), content_type=content_type)
        except CLIENT_ERRORS as exc:
            raise self._fail(f"writing {loc}", exc) from exc

    def get_bytes(self, uri: str | S3Uri) -> bytes:
        loc = uri if isinstance(uri, S3Uri) else S3Uri.parse(uri)
        try:
            resp = self.client.get_object(loc.bucket, loc.key)
            try:
                return resp.read()
            finally:
                resp.close()
                resp.release_conn()
        except CLIENT_ERRORS as exc:
            raise self._fail(f"reading {loc}", exc) from exc

    def list_objects(self, uri: str | S3Uri, recursive: bool = True) -> list[str]:
        """Keys under a prefix, as full s3:// URIs, sorted."""
        loc = uri if isinstance(uri, S3Uri) else S3Uri.parse(uri)
        try:
            objs = self.client.list_objects(loc.bucket, prefix=loc.key or None, recursive=recursive)
            return sorted(str(S3Uri(loc.bucket, o.object_name)) for o in objs if o.object_name)
        except CLIENT_ERRORS as exc:
            raise self._fail(f"listing {loc}", exc) from exc

    def delete(self, uris: list[str]) -> None:
        """Delete these objects (s3:// URIs): one multi-object delete per bucket, in no set order."""
        by_bucket: dict[str, list[str]] = {}
        for loc in map(S3Uri.parse, uris):
            by_bucket.setdefault(loc.bucket, []).append(loc.key)
        for bucket, keys in by_bucket.items():
            try:
                errors = list(self.client.remove_objects(bucket, (DeleteObject(k) for k in keys)))
            except CLIENT_ERRORS as exc:
                raise self._fail(f"deleting {len(keys)} objects in bucket '{bucket}'", exc) from exc
            if errors:
                raise StorageError(f"deleting in bucket '{bucket}' on {self.settings.s3_endpoint} failed: "
                                   + "; ".join(f"{e.name}: {e.message}" for e in errors[:5]))

    def upload_file(self, path: Path, uri: str | S3Uri) -> None:
        dest = uri if isinstance(uri, S3Uri) else S3Uri.parse(uri)
        try:
            self.client.fput_object(dest.bucket, dest.key, str(path))
        except CLIENT_ERRORS as exc:
            raise self._fail(f"uploading {path} to {dest}", exc) from exc

    def upload_dir(self, local: Path, uri: str | S3Uri) -> list[str]:
        """Upload every file under ``local`` below ``uri``; returns the URIs written."""
        loc = uri if isinstance(uri, S3Uri) else S3Uri.parse(uri)
        written = []
        for path in files_under(local):
            dest = loc.child(path.relative_to(local).as_posix())
            self.upload_file(path, dest)
            written.append(str(dest))
        return written

    def download_dir(self, uri: str | S3Uri, local: Path) -> list[Path]:
        loc = uri if isinstance(uri, S3Uri) else S3Uri.parse(uri)
        prefix = loc.key.rstrip("/") + "/" if loc.key else ""
        paths = []
        for full in self.list_objects(S3Uri(loc.bucket, prefix)):
            key = S3Uri.parse(full).key
            dest = local / key[len(prefix):]
            dest.parent.mkdir(parents=True, exist_ok=True)
            try:
                self.client.fget_object(loc.bucket, key, str(dest))
            except CLIENT_ERRORS as exc:
                raise self._fail(f"downloading {full}", exc) from exc
            paths.append(dest)
        if not paths:
            raise StorageError(f"nothing found under {loc}")
        return paths


def files_under(local: Path) -> list[Path]:
    """The files below a folder, sorted: the order ``upload_dir`` writes them in."""
    return sorted(p for p in local.rglob("*") if p.is_file())
