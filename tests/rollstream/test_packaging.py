"""The wheel installs everything under the one 'rollstream' namespace, schemas included."""

from __future__ import annotations

import subprocess
import sys
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_wheel_has_one_top_level_package_and_the_schemas(tmp_path: Path) -> None:
    out = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "-w", str(tmp_path), str(ROOT)],
        capture_output=True, text=True,
    )
    assert out.returncode == 0, out.stderr[-2000:]
    (wheel,) = tmp_path.glob("rollstream-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    top = {n.split("/")[0] for n in names if not n.split("/")[0].endswith(".dist-info")}
    assert top == {"rollstream"}
    for part in ("schemas", "producers", "stream_processors", "trainer"):
        assert f"rollstream/{part}/__init__.py" in names
    assert "rollstream/schemas/llm_call.avsc" in names
    assert "rollstream/schemas/vectors/LlmCall.bin" in names
