"""Starting, watching and stopping one local service process.

A service is started detached (its own session), with its pid written to
``<state>/<name>.pid`` and its output to ``<state>/logs/<name>.log``. ``stop`` only
signals a pid that this module recorded and that still runs the recorded command, so
``rollstream stack down`` never kills a process it did not start.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from rollstream.errors import MissingToolError, StackError

log = logging.getLogger(__name__)

INSTALL_HINTS = {
    "java": "install a JDK 17+ (Debian: apt-get install -y openjdk-17-jdk-headless)",
    "mvn": "install Maven (Debian: apt-get install -y maven)",
    "go": "install Go 1.25+ (https://go.dev/doc/install; Debian's golang package is too old)",
}


def require_tool(name: str) -> str:
    """Absolute path of ``name`` on PATH, or an error that says how to install it."""
    path = shutil.which(name)
    if path is None:
        raise MissingToolError(f"'{name}' is not on PATH; {INSTALL_HINTS.get(name, 'install it')}")
    return path


def run_checked(cmd: Sequence[str], what: str, log_path: Path, **kwargs: object) -> None:
    """Run an install step, logging its output; raise with the log's tail if it fails."""
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with log_path.open("ab") as out:
        out.write(f"\n$ {' '.join(cmd)}\n".encode())
        out.flush()
        proc = subprocess.run(list(cmd), stdout=out, stderr=subprocess.STDOUT, **kwargs)  # type: ignore[call-overload]
    if proc.returncode != 0:
        tail = log_path.read_text(errors="replace").splitlines()[-15:]
        raise StackError(f"{what} failed (exit {proc.returncode}); see {log_path}:\n" + "\n".join(tail))


@dataclass
class ManagedProcess:
    """The pid and log files of one service under the stack's state folder."""

    name: str
    state_dir: Path

    @property
    def pid_file(self) -> Path:
        return self.state_dir / f"{self.name}.pid"

    @property
    def log_file(self) -> Path:
        return self.state_dir / "logs" / f"{self.name}.log"

    def recorded(self) -> dict[str, object] | None:
        try:
            data: dict[str, object] = json.loads(self.pid_file.read_text())
            return data
        except (OSError, ValueError):
            return None

    def pid(self) -> int | None:
        """The recorded pid if that process still runs the command we started."""
        rec = self.recorded()
        if not rec:
            return None
        pid = int(str(rec["pid"]))
        for _ in range(50):
            try:
                cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
            except OSError:
                return None
            if cmdline != [b""]:
                break
            # Just forked: the command line is not there until the exec completes.
            time.sleep(0.02)
        else:
            return pid if _alive(pid) else None
        first = str(rec.get("argv0", ""))
        return pid if cmdline[0].decode(errors="replace") == first else None

    def start(self, argv: Sequence[str], env: dict[str, str] | None = None, cwd: Path | None = None) -> int:
        self.log_file.parent.mkdir(parents=True, exist_ok=True)
        full_env = dict(os.environ)
        full_env.update(env or {})
        with self.log_file.open("ab") as out:
            out.write(f"\n=== {time.strftime('%Y-%m-%d %H:%M:%S')} starting: {' '.join(argv)}\n".encode())
            out.flush()
            proc = subprocess.Popen(
                list(argv),
                stdout=out,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                env=full_env,
                cwd=str(cwd) if cwd else None,
                start_new_session=True,
            )
        self.pid_file.write_text(json.dumps({"pid": proc.pid, "argv0": argv[0]}))
        return proc.pid

    def stop(self, timeout: float = 20.0, kill: bool = False) -> bool:
        """Stop the recorded process group (``kill``: SIGKILL at once, as a crash); True if something was stopped."""
        pid = self.pid()
        self.pid_file.unlink(missing_ok=True)
        if pid is None:
            return False
        signals = ((signal.SIGKILL, 5.0),) if kill else ((signal.SIGTERM, timeout), (signal.SIGKILL, 5.0))
        for sig, wait in signals:
            try:
                os.killpg(pid, sig)
            except ProcessLookupError:
                return True
            deadline = time.monotonic() + wait
            while time.monotonic() < deadline:
                if not _alive(pid):
                    return True
                time.sleep(0.2)
        return True

    def log_tail(self, lines: int = 20) -> str:
        try:
            return "\n".join(self.log_file.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A zombie child of ours counts as gone.
    try:
        return Path(f"/proc/{pid}/stat").read_text().split()[2] != "Z"
    except OSError:
        return False


def port_in_use(port: int) -> bool:
    """True when something accepts connections on 127.0.0.1:port."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.settimeout(0.5)
        return sock.connect_ex(("127.0.0.1", port)) == 0


def wait_until(check: Callable[[], bool], timeout: float, interval: float = 0.5) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():
            return True
        time.sleep(interval)
    return check()
