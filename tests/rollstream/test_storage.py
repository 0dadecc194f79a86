"""The project's S3 client against the real S3 server of the stack."""

from __future__ import annotations

from pathlib import Path

import pytest

from rollstream.errors import StorageError
from rollstream.storage import ObjectStore, S3Uri

pytestmark = pytest.mark.integration


def test_put_get_list(store: ObjectStore, bucket: str) -> None:
    store.put_bytes(f"s3://{bucket}/a/one.bin", b"\x00\x01payload")
    store.put_bytes(f"s3://{bucket}/a/b/two.json", b"{}", content_type="application/json")
    store.put_bytes(f"s3://{bucket}/c.txt", b"c")
    assert store.get_bytes(f"s3://{bucket}/a/one.bin") == b"\x00\x01payload"
    assert store.list_objects(f"s3://{bucket}/a/") == [f"s3://{bucket}/a/b/two.json", f"s3://{bucket}/a/one.bin"]
    assert len(store.list_objects(f"s3://{bucket}")) == 3


def test_folder_round_trip(store: ObjectStore, bucket: str, tmp_path: Path) -> None:
    src = tmp_path / "src"
    (src / "sub").mkdir(parents=True)
    (src / "weights.safetensors").write_bytes(bytes(range(256)) * 100)
    (src / "sub" / "meta.json").write_text('{"step": 120}')
    written = store.upload_dir(src, f"s3://{bucket}/policy/step-000120")
    assert len(written) == 2
    dest = tmp_path / "dest"
    store.download_dir(f"s3://{bucket}/policy/step-000120/", dest)
    assert (dest / "weights.safetensors").read_bytes() == (src / "weights.safetensors").read_bytes()
    assert (dest / "sub" / "meta.json").read_text() == '{"step": 120}'


def test_missing_object_is_a_storage_error(store: ObjectStore, bucket: str) -> None:
    with pytest.raises(StorageError, match=f"s3://{bucket}/nope"):
        store.get_bytes(f"s3://{bucket}/nope")
    with pytest.raises(StorageError, match="nothing found"):
        store.download_dir(f"s3://{bucket}/empty/", Path("/tmp/unused"))


def test_uri_parsing() -> None:
    uri = S3Uri.parse("s3://b/k/x")
    assert (uri.bucket, uri.key) == ("b", "k/x")
    assert str(uri.child("y")) == "s3://b/k/x/y"
    with pytest.raises(StorageError, match="not an s3://"):
        S3Uri.parse("http://b/k")
