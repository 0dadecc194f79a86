"""The processes of the loop, started as children of the demo and stopped by their process ids.

Policy server (``rollstream serve``), capturing gateway (``rollstream gateway``), stream processor
(``rollstream process``) and trainer (``rollstream train``), all on one fresh topic prefix, each
logging to its own file in the run folder.
"""

from __future__ import annotations

import logging
import os
import re
import signal
import subprocess
import sys
import time
import urllib.error
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rollstream.errors import RollstreamError
from rollstream.schemas.codec import register_schemas, registry_client
from rollstream.schemas.topics import Topics, create_topics
from rollstream.serving.launch import ServerProcess, free_port, get_json
from rollstream.settings import ConnectionSettings
from rollstream.storage import ObjectStore
from rollstream.trainer.checkpoint import CheckpointStore

log = logging.getLogger(__name__)

STEP_LINE = re.compile(r"step (\d+)\s+loss (\S+)\s+reward (\S+?)±\S+\s+tok/s \S+\s+lag (\d+)")


class DemoError(RollstreamError):
    """A process of the demo loop failed to start or died."""


@dataclass
class Child:
    """One child process and its log file."""

    name: str
    process: subprocess.Popen[bytes]
    log_path: Path
    args: list[str] = field(default_factory=list)  # the rollstream subcommand and its arguments

    def alive(self) -> bool:
        return self.process.poll() is None

    def tail(self, chars: int = 2000) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-chars:]
        except OSError:
            return "(no log)"

    def stop(self, timeout: float = 20.0) -> None:
        if not self.alive():
            return
        self.process.terminate()
        try:
            self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            log.warning("%s (pid %d) did not stop in %.0f s; killing it", self.name, self.process.pid, timeout)
            self.process.kill()
            self.process.wait(timeout)

    def kill(self, sig: int = signal.SIGKILL) -> int:
        """Signal the process (``kill -9`` by default) and reap it; returns its exit code."""
        if self.alive():
            self.process.send_signal(sig)
        return self.process.wait(60)


@dataclass
class TrainerProgress:
    """The newest figures the trainer logged."""

    step: int = 0
    loss: float | None = None
    reward: float | None = None
    lag: int | None = None
    offset: int = 0
    rewards: list[tuple[int, float]] = field(default_factory=list)

    def update(self, log_path: Path) -> None:
        try:
            with open(log_path, "rb") as f:
                f.seek(self.offset)
                chunk = f.read()
        except OSError:
            return
        cut = chunk.rfind(b"\n") + 1
        self.offset += cut
        for m in STEP_LINE.finditer(chunk[:cut].decode(errors="replace")):
            self.step, self.loss, self.reward, self.lag = int(m[1]), float(m[2]), float(m[3]), int(m[4])
            self.rewards.append((self.step, self.reward))


class VllmFrontProcess(ServerProcess):
    """``rollstream vllm`` (vLLM's OpenAI server and the policy front that loads each PolicyUpdate) in the
    place of ``rollstream serve``: the same URLs, and ``stats()`` from the front's ``GET /policy``."""

    name, ready_path = "vllm", "/policy"  # the front answers once vLLM does

    def stats(self) -> dict[str, Any]:
        policy = get_json(self.url + "/policy")
        return {"policy_version": policy["version"], "reloads": len(policy["loads"]), "loads": policy["loads"]}


class Loop:
    """Server, gateway, processor and trainer for one run; ``stop()`` ends every one it started."""

    def __init__(self, run_dir: Path, conn: ConnectionSettings, model_dir: Path, policy: str,
                 train_args: list[str], run_id: str, threads: int = 1,
                 extra_env: dict[str, str] | None = None, engine: str = "serve") -> None:
        self.run_dir = run_dir
        self.run_id = run_id
        self.conn = conn
        self.model_dir = model_dir
        self.policy = policy
        self.train_args = train_args
        self.threads = threads
        self.engine = engine  # serve: rollstream serve; vllm: vLLM behind rollstream vllm
        self.children: list[Child] = []
        self.server: ServerProcess | None = None
        self.gateway_url = ""
        self.env = {**os.environ, "ROLLSTREAM_TOPIC_PREFIX": conn.topic_prefix,
                    "ROLLSTREAM_PARTITIONS": str(conn.partitions), "MLFLOW_DISABLE_TELEMETRY": "true",
                    "OMP_NUM_THREADS": str(threads), "TOKENIZERS_PARALLELISM": "false",
                    "ROLLSTREAM_PROCESS_COMMIT_INTERVAL": "0.25", **(extra_env or {})}
        self.trainer = TrainerProgress()
        self.processor_port = 0
        self.restarts: dict[str, int] = {}  # process name -> restarts after it exited on its own

    def _spawn(self, name: str, args: list[str]) -> Child:
        log_path = self.run_dir / f"{name}.log"
        out = open(log_path, "ab")  # noqa: SIM115 - the child holds it
        cmd = [sys.executable, "-m", "rollstream.cli", *args]
        (self.run_dir / f"{name}.cmd").write_text(" ".join(cmd) + "\n")
        child = Child(name, subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=self.env), log_path,
                      list(args))
        out.close()
        names = [c.name for c in self.children]
        if name in names:  # a restart keeps the process's place (stop() goes through them in order)
            self.children[names.index(name)] = child
        else:
            self.children.append(child)
        log.info("started %s (pid %d), log %s", name, child.process.pid, log_path)
        return child

    def child(self, name: str) -> Child:
        for child in self.children:
            if child.name == name:
                return child
        raise DemoError(f"no process '{name}' in the loop")

    def respawn(self, name: str, args: list[str] | None = None) -> Child:
        """Start ``name`` again with the arguments it had (or ``args``); the old process must be gone."""
        old = self.child(name)
        if old.alive():
            raise DemoError(f"{name} (pid {old.process.pid}) is still running")
        return self._spawn(name, old.args if args is None else args)

    def create_topics(self) -> Topics:
        topics = Topics(self.conn.topic_prefix, self.conn.partitions)
        create_topics(topics, self.conn)
        register_schemas(registry_client(self.conn), topics)
        return topics

    def start(self, timeout: float = 180.0) -> None:
        self.create_topics()
        if self.engine == "vllm":
            self.server = VllmFrontProcess(self.model_dir, policy=self.policy, env=self.env,
                                           log_path=self.run_dir / "vllm-front.log",
                                           args=["--topic-prefix", self.conn.topic_prefix, "--max-num-seqs", "32",
                                                 "--log", str(self.run_dir / "vllm.log")])
            self.server.start(max(timeout, 400.0))
        else:
            self.server = ServerProcess(self.model_dir, policy=self.policy, env=self.env,
                                        log_path=self.run_dir / "serve.log",
                                        args=["--topic-prefix", self.conn.topic_prefix, "--threads", str(self.threads),
                                              "--max-batch", "64", "--log-level", "warning"])
            self.server.start(timeout)
        log.info("started the policy server (pid %d) at %s", self.server.process.pid if self.server.process else -1,
                 self.server.url)
        port = free_port()
        self.gateway_url = f"http://127.0.0.1:{port}"
        self._spawn("gateway", ["gateway", "--port", str(port), "--backend-url", self.server.base_url,
                                "--policy", self.policy, "--no-create-topics", "--log-level", "warning"])
        self.processor_port = free_port()
        self._spawn("processor", ["process", "--app-id", f"demo-processor-{self.run_id}", "--data-dir",
                                  str(self.run_dir / "processor"), "--web-port", str(self.processor_port)])
        self._spawn("trainer", ["train", "--policy", self.policy, "--model", str(self.model_dir),
                                "--threads", str(self.threads), "--no-progress", *self.train_args])
        self.wait_healthy(self.gateway_url + "/healthz", "gateway", timeout)

    def wait_healthy(self, url: str, name: str, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            self.check()
            try:
                get_json(url, timeout=1.0)
                return
            except (urllib.error.URLError, OSError, ValueError):
                time.sleep(0.3)
        raise DemoError(f"{name} did not answer {url} within {timeout:.0f} s; see {self.run_dir}/{name}.log")

    def _check_server(self) -> None:
        if self.server and self.server.process and self.server.process.poll() is not None:
            raise DemoError(f"the policy server exited: {self.server.log_tail()}")

    def check(self) -> None:
        """Raise DemoError when a child has died (the loop cannot go on without it)."""
        self._check_server()
        for child in self.children:
            if not child.alive() and child.name != "trainer":
                raise DemoError(f"{child.name} exited with {child.process.returncode}: {child.tail()}")

    def supervise(self, max_restarts: int = 5) -> list[tuple[str, int | None, str]]:
        """Start again a gateway, processor or trainer that exited on its own (as a process manager would);
        returns (name, exit code, last log lines) of each restarted. The policy server, or a process that keeps
        dying, ends the run."""
        self._check_server()
        restarted = []
        for child in list(self.children):
            if child.alive() or (child.name == "trainer" and child.process.returncode == 0):
                continue
            count = self.restarts.get(child.name, 0)
            if count >= max_restarts:
                raise DemoError(f"{child.name} exited with {child.process.returncode} after {count} restarts: "
                                f"{child.tail()}")
            self.restarts[child.name] = count + 1
            log.warning("%s exited with %s; starting it again (%d/%d). Last lines:\n%s", child.name,
                        child.process.returncode, count + 1, max_restarts, child.tail(600))
            tail = child.tail()
            self.respawn(child.name)
            restarted.append((child.name, child.process.returncode, tail))
        return restarted

    def processor_stats(self) -> dict[str, Any]:
        """The processor's /stats (its counters since it started), or {} when it does not answer."""
        try:
            stats: dict[str, Any] = get_json(f"http://127.0.0.1:{self.processor_port}/stats", timeout=2.0)
        except (urllib.error.URLError, OSError, ValueError):
            return {}
        return stats

    def trainer_alive(self) -> bool:
        return any(c.name == "trainer" and c.alive() for c in self.children)

    def poll(self) -> None:
        trainer = next((c for c in self.children if c.name == "trainer"), None)
        if trainer is not None:
            self.trainer.update(trainer.log_path)

    def finish_training(self, timeout: float = 180.0) -> int:
        """Stop the trainer, which checkpoints the steps it took since its last checkpoint, and wait
        until the server serves the last version it published; returns that version.

        Evaluating while the trainer still runs would race its next checkpoint: the version measured
        and the version served at the end could differ.
        """
        trainer = self.child("trainer")
        trainer.stop(timeout)
        self.poll()
        root = self.train_args[self.train_args.index("--checkpoint-uri") + 1]
        meta = CheckpointStore(ObjectStore(self.conn), root).latest()
        final = int(meta["policy_version"]) if meta else 0
        deadline = time.monotonic() + timeout
        while self.server_stats().get("policy_version", -1) < final:
            self._check_server()
            if time.monotonic() > deadline:
                raise DemoError(f"the policy server did not load policy version {final} within {timeout:.0f} s; "
                                f"see {self.run_dir}/serve.log")
            time.sleep(0.5)
        return final

    def server_stats(self) -> dict[str, int]:
        if self.server is None:
            return {}
        try:
            stats = self.server.stats()
        except (urllib.error.URLError, OSError, ValueError):
            return {}
        return {k: int(v) for k, v in stats.items() if isinstance(v, int | float)}

    def stop(self) -> None:
        # Producers first (gateway), then the processor and trainer, the server last.
        for child in reversed(self.children):
            child.stop()
        if self.server is not None:
            self.server.stop()
