"""``rollstream vllm``: vLLM's OpenAI server for a training loop, and the policy sync in front of it.

One command starts two things:

- **vLLM** (its own environment, ``scripts/setup-vllm.sh``; ``ROLLSTREAM_VLLM_ENV``) on an internal
  port, for a model folder or an ``s3://`` prefix (downloaded first), with what training needs:
  token ids and logprobs (asked per request by the gateway), the model's tool-call parser,
  runtime LoRA (``--lora-rank``), and the development routes used to reload weights in place
  (``VLLM_SERVER_DEV_MODE``: keep that port private).
- **The policy front** on ``--port``: every OpenAI route is relayed to vLLM, while a watcher of
  the policy-update topic (``serving/reload.py``) loads each new version of ``--policy``:

  - ``ADAPTER`` (with ``--lora-rank``): ``POST /v1/load_lora_adapter`` as ``<policy>-v<version>``; new requests go to
    it; the previous adapter is unloaded once its last request has finished;
  - ``FULL`` (without ``--lora-rank``: vLLM 0.32 with LoRA enabled keeps its old weights on
    ``reload_weights``): new requests wait, requests in flight finish, then ``POST /collective_rpc``
    ``reload_weights`` and ``/reset_prefix_cache`` (no KV computed by the old weights is reused),
    then the waiting requests go on.

  Every answer carries ``X-Policy-Version`` (as ``rollstream serve`` does), so the gateway records
  the version that really produced it; no request fails during a load.

Agents reach the front through the gateway (``--backend-url http://host:PORT/v1``).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import logging
import os
import shutil
import signal
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import uvicorn

from rollstream.errors import ConfigError, RollstreamError, ServeError, StorageError
from rollstream.producers.http import Receive, Scope, Send, read_body, respond
from rollstream.schemas.topics import Topics
from rollstream.serving.launch import ServerProcess, get_json
from rollstream.serving.reload import PolicyWatcher
from rollstream.settings import ConnectionSettings, env
from rollstream.storage import ObjectStore

log = logging.getLogger(__name__)

VERSION_HEADER = "X-Policy-Version"
MODEL_ROUTES = ("/v1/chat/completions", "/v1/completions", "/v1/responses", "/v1/messages")
HOP_HEADERS = {"connection", "keep-alive", "transfer-encoding", "content-length", "host"}


def vllm_python() -> Path:
    """The vLLM environment's python (``ROLLSTREAM_VLLM_ENV``), or a ConfigError saying how to make it."""
    python = Path(env("VLLM_ENV")).expanduser() / "bin" / "python"
    if not python.is_file():
        raise ConfigError(f"no vLLM environment at {python.parent.parent}: run `bash scripts/setup-vllm.sh` "
                          "(or set ROLLSTREAM_VLLM_ENV to one)")
    return python


@dataclass
class VllmOptions:
    """The vLLM server's flags that a training loop cares about."""

    model: str
    served_name: str = "policy"
    device: str = "cpu"
    lora_rank: int = 0  # > 0: runtime LoRA adapters up to this rank
    max_loras: int = 2  # the adapter being served and the one still finishing its requests
    tool_call_parser: str = "hermes"  # "" for none
    max_model_len: int = 1024
    max_num_seqs: int = 16
    dtype: str = ""  # "" : float32 on CPU (its bf16 path is not reliable), auto on GPU
    kv_cache_gib: int = 1
    extra: list[str] = field(default_factory=list)

    def argv(self, port: int) -> list[str]:
        dtype = self.dtype or ("float32" if self.device == "cpu" else "auto")
        cmd = [str(vllm_python()), "-m", "vllm.entrypoints.openai.api_server", "--model", self.model,
               "--served-model-name", self.served_name, "--host", "127.0.0.1", "--port", str(port),
               "--dtype", dtype, "--max-model-len", str(self.max_model_len), "--max-num-seqs", str(self.max_num_seqs),
               "--distributed-executor-backend", "uni"]
        if self.tool_call_parser:
            cmd += ["--enable-auto-tool-choice", "--tool-call-parser", self.tool_call_parser]
        if self.lora_rank > 0:
            cmd += ["--enable-lora", "--max-lora-rank", str(self.lora_rank), "--max-loras", str(self.max_loras)]
        return cmd + self.extra

    def environment(self) -> dict[str, str]:
        out = {"VLLM_SERVER_DEV_MODE": "1", "VLLM_ALLOW_RUNTIME_LORA_UPDATING": "True",
               "VLLM_ENABLE_V1_MULTIPROCESSING": "0", "VLLM_NO_USAGE_STATS": "1", "HF_HUB_OFFLINE": "1"}
        if self.device == "cpu":
            out |= {"VLLM_CPU_KVCACHE_SPACE": str(self.kv_cache_gib), "VLLM_CPU_OMP_THREADS_BIND": "auto",
                    "CUDA_VISIBLE_DEVICES": ""}
        return out


class VllmProcess(ServerProcess):
    """vLLM's OpenAI server as a child process (its own process group) on 127.0.0.1; waits for /health."""

    new_session = True  # vLLM's engine core is a process of its own: stop() ends the whole group

    def __init__(self, options: VllmOptions, port: int | None = None, log_path: Path | None = None,
                 env_extra: Mapping[str, str] | None = None) -> None:
        super().__init__(options.model, options.served_name, port=port, log_path=log_path,
                         env={**options.environment(), **(env_extra or {})})
        self.options = options
        self.started_s = 0.0

    @property
    def label(self) -> str:
        return "vLLM"

    def command(self) -> list[str]:
        return self.options.argv(self.port)

    def ready(self) -> None:
        urllib.request.urlopen(self.url + "/health", timeout=1.0).close()  # an empty 200, not JSON

    def start(self, timeout: float = 300.0) -> VllmProcess:
        started = time.monotonic()
        super().start(timeout)
        self.started_s = time.monotonic() - started
        log.info("vLLM answers on %s (started in %.0f s)", self.url, self.started_s)
        return self

    def stop(self, timeout: float = 30.0) -> None:
        super().stop(timeout)


class PolicyFront:
    """The ASGI app in front of vLLM: relays, stamps the policy version, and loads new versions."""

    def __init__(self, vllm_url: str, policy: str, version: int = 0, work_dir: Path | None = None,
                 connection: ConnectionSettings | None = None, lora: bool = False) -> None:
        self.vllm_url = vllm_url.rstrip("/")
        self.policy = policy
        self.version = version
        self.served = policy  # the vLLM model name new requests go to: the base model or the newest adapter
        # vLLM 0.32 with --enable-lora keeps the old weights on reload_weights: a LoRA server takes adapters only
        self.kinds = ("ADAPTER",) if lora else ("FULL",)
        self.connection = connection
        self.work_dir = work_dir or Path(tempfile.mkdtemp(prefix="rollstream-vllm-"))
        self.loads: list[dict[str, Any]] = []  # what each load did and took (GET /policy)
        self._in_flight: dict[str, int] = {}
        self._open = asyncio.Event()
        self._open.set()
        self._idle = asyncio.Event()
        self._idle.set()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._session: aiohttp.ClientSession | None = None

    # --- ReloadTarget (called on the watcher's thread) ----------------------------------

    def apply(self, update: dict[str, Any]) -> None:
        if self._loop is None:
            raise ServeError("the front is not running yet")
        started = time.monotonic()
        version, uri, kind = int(update["version"]), str(update["weights_uri"]), str(update["kind"])
        local = self._fetch(uri, version)
        try:
            coro = self._load_adapter(version, local) if kind == "ADAPTER" else self._reload(version, local)
            asyncio.run_coroutine_threadsafe(coro, self._loop).result()
        except BaseException:
            shutil.rmtree(local, ignore_errors=True)
            raise
        if kind == "FULL":
            shutil.rmtree(local, ignore_errors=True)  # the weights are in vLLM's memory now
        took = time.monotonic() - started
        published = update.get("timestamp")
        since = (datetime.now(UTC) - published).total_seconds() if isinstance(published, datetime) else None
        self.loads.append({"version": version, "kind": kind, "uri": uri, "seconds": round(took, 3),
                           "published_to_served_s": None if since is None else round(since, 3)})
        log.info("policy '%s' version %d (%s) served after %.2f s", self.policy, version, kind, took)

    def _fetch(self, uri: str, version: int) -> Path:
        if not uri.startswith("s3://"):
            return Path(uri)
        local = self.work_dir / f"{self.policy}-v{version}"
        shutil.rmtree(local, ignore_errors=True)
        try:
            ObjectStore(self.connection).download_dir(uri, local)
        except StorageError as exc:
            raise ServeError(f"cannot download policy version {version} from {uri}: {exc}") from exc
        return local

    async def _post(self, path: str, body: dict[str, Any]) -> None:
        async with self.session.post(self.vllm_url + path, json=body) as resp:
            text = await resp.text()
            if resp.status >= 400:
                raise ServeError(f"vLLM {path} answered {resp.status}: {text[:500]}")

    async def _load_adapter(self, version: int, local: Path) -> None:
        name = f"{self.policy}-v{version}"
        await self._post("/v1/load_lora_adapter", {"lora_name": name, "lora_path": str(local)})
        old, self.served, self.version = self.served, name, version
        if old != self.policy:
            asyncio.get_running_loop().create_task(self._unload_when_idle(old))

    async def _unload_when_idle(self, name: str) -> None:
        while self._in_flight.get(name, 0) > 0:
            await asyncio.sleep(0.05)
        try:
            await self._post("/v1/unload_lora_adapter", {"lora_name": name})
        except (ServeError, aiohttp.ClientError) as exc:
            log.warning("could not unload adapter %s: %s", name, exc)
        shutil.rmtree(self.work_dir / name, ignore_errors=True)

    async def _reload(self, version: int, local: Path) -> None:
        self._open.clear()  # new requests wait here
        try:
            await self._idle.wait()  # the requests in flight finish on the old weights
            await self._post("/collective_rpc", {"method": "reload_weights", "kwargs": {"weights_path": str(local)}})
            await self._post("/reset_prefix_cache", {})
            self.version = version
        finally:
            self._open.set()

    # --- HTTP -------------------------------------------------------------------------------

    @property
    def session(self) -> aiohttp.ClientSession:
        if self._session is None:
            raise RuntimeError("the ASGI lifespan did not run")
        return self._session

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            while True:
                message = await receive()
                if message["type"] == "lifespan.startup":
                    self._loop = asyncio.get_running_loop()
                    self._session = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=None),
                                                          auto_decompress=False)
                    await send({"type": "lifespan.startup.complete"})
                elif message["type"] == "lifespan.shutdown":
                    await self.session.close()
                    await send({"type": "lifespan.shutdown.complete"})
                    return
        if scope["type"] != "http":
            return
        path, method = scope["path"], scope["method"]
        if path == "/policy" and method == "GET":
            await respond(send, 200, orjson.dumps({"policy": self.policy, "version": self.version,
                                                   "served": self.served, "loads": self.loads}),
                          [(b"content-type", b"application/json")])
            return
        raw = await read_body(receive, 64 * 1024 * 1024, 60.0)
        if method == "POST" and path in MODEL_ROUTES:
            await self._model_call(path, raw, scope, send)
        else:
            await self._relay(method, path, scope, raw, send, None)

    async def _model_call(self, path: str, raw: bytes, scope: Scope, send: Send) -> None:
        while not self._open.is_set():
            await self._open.wait()
        name, version = self.served, self.version
        with contextlib.suppress(orjson.JSONDecodeError):
            body = orjson.loads(raw)
            if isinstance(body, dict):  # any model name means the policy: its newest version
                body["model"] = name
                raw = orjson.dumps(body)
        self._in_flight[name] = self._in_flight.get(name, 0) + 1
        self._idle.clear()
        try:
            await self._relay("POST", path, scope, raw, send, version)
        finally:
            self._in_flight[name] -= 1
            if not any(self._in_flight.values()):
                self._idle.set()

    async def _relay(self, method: str, path: str, scope: Scope, raw: bytes, send: Send, version: int | None) -> None:
        query = scope.get("query_string", b"").decode()
        url = self.vllm_url + path + (f"?{query}" if query else "")
        headers = {k.decode("latin-1"): v.decode("latin-1") for k, v in scope["headers"]
                   if k.decode("latin-1").lower() not in HOP_HEADERS}
        try:
            resp = await self.session.request(method, url, data=raw or None, headers=headers)
        except aiohttp.ClientError as exc:
            await respond(send, 502, orjson.dumps({"error": {"message": f"vLLM is unreachable: {exc}",
                                                             "type": "backend_error", "code": 502}}),
                          [(b"content-type", b"application/json")])
            return
        async with resp:
            out = [(k.encode("latin-1"), v.encode("latin-1")) for k, v in resp.headers.items()
                   if k.lower() not in HOP_HEADERS]
            if version is not None:
                out.append((VERSION_HEADER.lower().encode(), str(version).encode()))
            await send({"type": "http.response.start", "status": resp.status, "headers": out})
            async for data in resp.content.iter_any():
                await send({"type": "http.response.body", "body": data, "more_body": True})
            await send({"type": "http.response.body", "body": b""})


def download_model(source: str, work_dir: Path, connection: ConnectionSettings | None) -> str:
    """A local folder for ``source`` (an ``s3://`` prefix is downloaded into ``work_dir``)."""
    if not source.startswith("s3://"):
        if not (Path(source).expanduser() / "config.json").is_file():
            raise ConfigError(f"--model {source!r} is not a Hugging Face model folder (no config.json)")
        return str(Path(source).expanduser())
    local = work_dir / "base-model"
    try:
        ObjectStore(connection).download_dir(source, local)
    except StorageError as exc:
        raise ServeError(f"cannot download the model {source}: {exc}") from exc
    return str(local)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="rollstream vllm", description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", help="Hugging Face model folder or s3://bucket/prefix (not with --vllm-url)")
    parser.add_argument("--vllm-url", help="a vLLM server already running (started with the flags below, e.g. "
                        "in its own container): only the front runs here")
    parser.add_argument("--work-dir", type=Path, help="where downloaded weights go; with --vllm-url a folder that "
                        "vLLM reads too (default: a temporary folder)")
    parser.add_argument("--policy", default="policy", help="policy name: vLLM's served model name and the "
                        "PolicyUpdates it loads")
    parser.add_argument("--policy-version", type=int, default=0, help="version of --model")
    parser.add_argument("--host", default="127.0.0.1", help="the front's listen address")
    parser.add_argument("--port", type=int, default=8000, help="the front's port (agents' gateway points here)")
    parser.add_argument("--vllm-port", type=int, default=0, help="vLLM's own port (default: a free one)")
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--lora-rank", type=int, default=0, help="> 0: runtime LoRA adapters up to this rank")
    parser.add_argument("--tool-call-parser", default="hermes", help="vLLM's tool-call parser ('' for none)")
    parser.add_argument("--max-model-len", type=int, default=1024)
    parser.add_argument("--max-num-seqs", type=int, default=16)
    parser.add_argument("--topic-prefix", help="prefix of the Kafka topics (ROLLSTREAM_TOPIC_PREFIX)")
    parser.add_argument("--no-updates", action="store_true", help="do not watch the policy-update topic")
    parser.add_argument("--log", type=Path, help="vLLM's log file (default: in the work folder)")
    parser.add_argument("--start-timeout", type=float, default=300.0)
    parser.add_argument("vllm_args", nargs="*", help="more vLLM flags, after --")
    return parser


_TERMINATED: list[int] = []


def _terminate(signum: int, frame: Any) -> None:
    _TERMINATED.append(signum)
    raise SystemExit(0)


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    # SIGTERM must end in the finally blocks that stop vLLM (its own process group, which would outlive us):
    # uvicorn shuts down on it and then raises it again, which with the default handler ends the process at once.
    signal.signal(signal.SIGTERM, _terminate)
    connection = ConnectionSettings()
    if args.topic_prefix is not None:
        connection = dataclasses.replace(connection, topic_prefix=args.topic_prefix)
    if bool(args.model) == bool(args.vllm_url):
        log.error("give --model (start vLLM here) or --vllm-url (use a running vLLM), not both or neither")
        return 2
    work_dir = args.work_dir or Path(tempfile.mkdtemp(prefix="rollstream-vllm-"))
    work_dir.mkdir(parents=True, exist_ok=True)
    vllm: VllmProcess | None = None
    try:
        if args.vllm_url:
            vllm_url = args.vllm_url.rstrip("/")
            urllib.request.urlopen(vllm_url + "/health", timeout=10).close()
        else:
            vllm = start_vllm(args, work_dir, connection)
            vllm_url = vllm.url
    except (RollstreamError, OSError) as exc:
        log.error("%s", exc)
        if args.work_dir is None:
            shutil.rmtree(work_dir, ignore_errors=True)
        return 2
    front = PolicyFront(vllm_url, args.policy, args.policy_version, work_dir, connection, lora=args.lora_rank > 0)

    watcher = None
    if not args.no_updates:
        watcher = PolicyWatcher(front, args.policy, Topics.from_settings(connection), connection,
                                group_prefix="rollstream-vllm")
    try:
        config = uvicorn.Config(front, host=args.host, port=args.port, log_level="warning", lifespan="on")
        server = uvicorn.Server(config)
        if watcher is not None:
            # the watcher needs the front's event loop: start it once the server runs
            async def serve() -> None:
                task = asyncio.create_task(server.serve())
                while not server.started:
                    await asyncio.sleep(0.05)
                watcher.start()
                log.info("policy '%s' on http://%s:%d/v1 (vLLM %s)", args.policy, args.host, args.port, vllm_url)
                await task
            asyncio.run(serve())
        else:
            server.run()
    finally:
        if watcher is not None:
            watcher.stop()
        if vllm is not None:
            vllm.stop()
        if args.work_dir is None:
            shutil.rmtree(work_dir, ignore_errors=True)
        if _TERMINATED:  # stopped and cleaned up: skip the interpreter's teardown, which can spin in native code
            logging.shutdown()
            os._exit(0)
    return 0


def start_vllm(args: argparse.Namespace, work_dir: Path, connection: ConnectionSettings) -> VllmProcess:
    model = download_model(args.model, work_dir, connection)
    options = VllmOptions(model, args.policy, args.device, args.lora_rank, tool_call_parser=args.tool_call_parser,
                          max_model_len=args.max_model_len, max_num_seqs=args.max_num_seqs,
                          extra=list(args.vllm_args))
    vllm = VllmProcess(options, args.vllm_port or None, args.log or work_dir / "vllm.log")
    log.info("starting vLLM for %s (log: %s)", args.model, vllm.log_path)
    return vllm.start(args.start_timeout)


def status(url: str) -> dict[str, Any]:
    """The front's ``GET /policy``: the version served and each load's time."""
    body: dict[str, Any] = get_json(url.rstrip("/") + "/policy")
    return body


if __name__ == "__main__":
    sys.exit(main())
