"""Starting ``rollstream serve`` as a child process and waiting until it answers.

For tests, benchmarks and demos that need a real server on a free port.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Mapping, Sequence
from pathlib import Path
from types import TracebackType
from typing import Any

from rollstream.errors import ServeError


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def get_json(url: str, timeout: float = 5.0) -> Any:
    with urllib.request.urlopen(url, timeout=timeout) as resp:
        return json.loads(resp.read())


class ServerProcess:
    """A ``rollstream serve`` child process on 127.0.0.1; a context manager that stops it."""

    def __init__(self, model: str | Path, policy: str = "tiny", args: Sequence[str] = (), port: int | None = None,
                 env: Mapping[str, str] | None = None, log_path: Path | None = None) -> None:
        self.model = str(model)
        self.policy = policy
        self.port = port or free_port()
        self.args = list(args)
        self.env = {**os.environ, **(env or {})}
        self.log_path = log_path
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def base_url(self) -> str:
        """The OpenAI client's base_url."""
        return self.url + "/v1"

    name, ready_path = "serve", "/health"  # the subcommand, and what answers once it serves
    new_session = False  # its own process group (stop() then signals the whole group)

    def command(self) -> list[str]:
        return [sys.executable, "-m", "rollstream.cli", self.name, "--model", self.model, "--policy", self.policy,
                "--host", "127.0.0.1", "--port", str(self.port), *self.args]

    def start(self, timeout: float = 120.0) -> ServerProcess:
        out = open(self.log_path, "ab") if self.log_path else subprocess.DEVNULL  # noqa: SIM115
        self.process = subprocess.Popen(self.command(), stdout=out, stderr=subprocess.STDOUT, env=self.env,
                                        start_new_session=self.new_session)
        deadline = time.monotonic() + timeout
        try:
            while time.monotonic() < deadline:
                if self.process.poll() is not None:
                    raise ServeError(f"{self.label} exited with {self.process.returncode}: {self.log_tail()}")
                try:
                    self.ready()
                    return self
                except (urllib.error.URLError, OSError, ValueError):
                    time.sleep(0.2)
        except BaseException:  # interrupted (SIGTERM, Ctrl-C) while it starts: it must not outlive us
            self.stop()
            raise
        self.stop()
        raise ServeError(f"{self.label} did not answer {self.ready_path} within {timeout:.0f}s: {self.log_tail()}")

    @property
    def label(self) -> str:
        return f"rollstream {self.name}"

    def ready(self) -> None:
        """Returns once the server answers its ready path (raises OSError or ValueError before)."""
        get_json(self.url + self.ready_path, timeout=1.0)

    def log_tail(self, chars: int = 3000) -> str:
        if self.log_path is None or not self.log_path.exists():
            return "(no log)"
        return self.log_path.read_text(errors="replace")[-chars:]

    def stats(self) -> dict[str, Any]:
        body: dict[str, Any] = get_json(self.url + "/stats")
        return body

    def stop(self, timeout: float = 15.0) -> None:
        if self.process is None or self.process.poll() is not None:
            return
        self._signal(signal.SIGTERM)
        try:
            self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            self._signal(signal.SIGKILL)
            self.process.wait(timeout)

    def _signal(self, sig: int) -> None:
        assert self.process is not None
        with contextlib.suppress(ProcessLookupError):
            if self.new_session:
                os.killpg(self.process.pid, sig)
            else:
                self.process.send_signal(sig)

    def __enter__(self) -> ServerProcess:
        return self.start() if self.process is None else self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.stop()
