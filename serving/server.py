"""``rollstream serve``: the OpenAI-compatible HTTP server over one policy.

Endpoints: ``/v1/chat/completions``, ``/v1/completions`` (both streaming or not),
``/v1/models``, ``/v1/models/{id}``, ``/health``, ``/stats`` (JSON figures) and ``/metrics``
(Prometheus). Every response names the policy version that generated it, in a
``policy_version`` field and an ``X-Policy-Version`` header. Requests are batched by the
scheduler; newer policy versions arrive through the policy-update topic (see ``reload``).

Chat completions read tool calls out of the output (``--tool-call-parser``: ``hermes``, the
``<tool_call>`` blocks of Hermes, Qwen2.5 and SmolLM2-style templates, or ``none``), streamed
as tool-call deltas, and honour ``tool_choice`` (``none``, ``auto``, ``required``, a named
function) and ``response_format`` (``json_object``, ``json_schema``) by constrained decoding
(llguidance). The server answers to the policy name and to ``--served-model-name`` aliases.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
from collections.abc import AsyncGenerator, AsyncIterator, Sequence
from typing import Any

import orjson
import uvicorn
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response, StreamingResponse
from starlette.routing import Route

from rollstream.errors import ConfigError, InvalidRequestError, RollstreamError
from rollstream.schemas.topics import Topics
from rollstream.serving.config import ServeSettings
from rollstream.serving.engine import Delta
from rollstream.serving.loading import load_engine, pick_device, set_threads
from rollstream.serving.protocol import (
    GenerationRequest,
    ServeOptions,
    Shaper,
    error_body,
    parse_chat,
    parse_completion,
)
from rollstream.serving.reload import EngineTarget, PolicyWatcher
from rollstream.serving.scheduler import Admitted, Event, Failed, Scheduler
from rollstream.serving.tools import TOOL_CALL_PARSERS, ToolCallParser
from rollstream.settings import ConnectionSettings

log = logging.getLogger(__name__)

VERSION_HEADER = "X-Policy-Version"


def _json(body: Any, status: int = 200, version: int | None = None) -> Response:
    headers = {VERSION_HEADER: str(version)} if version is not None else None
    return Response(orjson.dumps(body), status_code=status, media_type="application/json", headers=headers)


def _error(exc: InvalidRequestError, version: int) -> Response:
    return _json(error_body(str(exc), exc.param, exc.status), exc.status, version)


def _sse(chunk: dict[str, Any]) -> bytes:
    return b"data: " + orjson.dumps(chunk) + b"\n\n"


class PolicyServer:
    """The HTTP routes over a scheduler serving ``policy``."""

    def __init__(self, scheduler: Scheduler, policy: str, default_max_tokens: int = 256,
                 watcher: PolicyWatcher | None = None, model_names: tuple[str, ...] = (),
                 tool_call_parser: ToolCallParser = "hermes") -> None:
        self.scheduler = scheduler
        self.policy = policy
        self.options = ServeOptions(policy, default_max_tokens, model_names, tool_call_parser)
        self.watcher = watcher

    def app(self) -> Starlette:
        routes = [
            Route("/v1/chat/completions", self.chat, methods=["POST"]),
            Route("/v1/completions", self.completions, methods=["POST"]),
            Route("/v1/models", self.models, methods=["GET"]),
            Route("/v1/models/{model:path}", self.model, methods=["GET"]),
            Route("/health", self.health, methods=["GET"]),
            Route("/stats", self.stats, methods=["GET"]),
            Route("/metrics", self.metrics, methods=["GET"]),
        ]
        return Starlette(routes=routes, lifespan=self._lifespan)

    @contextlib.asynccontextmanager
    async def _lifespan(self, app: Starlette) -> AsyncIterator[None]:
        self.scheduler.start()
        if self.watcher is not None:
            self.watcher.start()
        try:
            yield
        finally:
            if self.watcher is not None:
                self.watcher.stop()
            self.scheduler.stop()

    async def health(self, request: Request) -> Response:
        version = self.scheduler.version
        return _json({"status": "ok", "policy": self.policy, "policy_version": version}, version=version)

    def _card(self, name: str) -> dict[str, Any]:
        return {"id": name, "object": "model", "created": 0, "owned_by": "rollstream",
                "policy_version": self.scheduler.version, "max_model_len": self.scheduler.engine.max_context}

    async def models(self, request: Request) -> Response:
        version = self.scheduler.version
        names = [self.policy] + [n for n in self.options.model_names if n not in ("*", self.policy)]
        return _json({"object": "list", "data": [self._card(n) for n in names], "policy_version": version},
                     version=version)

    async def model(self, request: Request) -> Response:
        name = request.path_params["model"]
        version = self.scheduler.version
        if not self.options.answers_to(name):
            return _error(InvalidRequestError(f"model '{name}' does not exist; this server serves '{self.policy}'",
                                              "model", 404), version)
        return _json(self._card(name), version=version)

    async def stats(self, request: Request) -> Response:
        s = self.scheduler.stats
        body = {"policy": self.policy, "policy_version": self.scheduler.version, "max_batch_size": s.max_batch_size,
                "steps": s.steps, "merges": s.merges, "requests": s.admitted, "generated_tokens": s.generated,
                "reloads": s.swaps,
                "reload_failures": self.watcher.failures if self.watcher else 0}
        return _json(body, version=self.scheduler.version)

    async def metrics(self, request: Request) -> Response:
        return Response(generate_latest(self.scheduler.stats.registry), media_type=CONTENT_TYPE_LATEST)

    async def chat(self, request: Request) -> Response:
        return await self._handle(request, "chat")

    async def completions(self, request: Request) -> Response:
        return await self._handle(request, "completion")

    async def _handle(self, request: Request, kind: str) -> Response:
        version = self.scheduler.version
        engine = self.scheduler.engine
        try:
            try:
                body = orjson.loads(await request.body())
            except orjson.JSONDecodeError as exc:
                raise InvalidRequestError(f"the request body is not JSON: {exc}") from exc
            if not isinstance(body, dict):
                raise InvalidRequestError("the request body must be a JSON object")
            parse = parse_chat if kind == "chat" else parse_completion
            req = parse(body, engine, self.options)
        except InvalidRequestError as exc:
            return _error(exc, version)
        shaper = Shaper(req, engine.tokenizer, self.policy)
        events = self.scheduler.submit(req.prompt_ids, req.params)
        first = await anext(events)
        if isinstance(first, Failed):
            return _error(InvalidRequestError(first.message, None, 500), version)
        assert isinstance(first, Admitted)
        shaper.version = first.version
        if req.stream:
            return StreamingResponse(self._stream(req, shaper, events), media_type="text/event-stream",
                                     headers={VERSION_HEADER: str(first.version), "Cache-Control": "no-cache"})
        async for event in events:
            if isinstance(event, Failed):
                return _error(InvalidRequestError(event.message, None, 500), first.version)
            if isinstance(event, Delta):
                shaper.choices[event.index].add(event)
        return _json(shaper.response(), version=first.version)

    async def _stream(self, req: GenerationRequest, shaper: Shaper,
                      events: AsyncGenerator[Event, None]) -> AsyncIterator[bytes]:
        for chunk in shaper.first_chunks():
            yield _sse(chunk)
        open_rows = len(req.params)
        first = True
        try:
            async for event in events:
                if isinstance(event, Failed):
                    yield _sse(error_body(event.message, None, 500))
                    break
                if isinstance(event, Delta):
                    open_rows -= event.finish_reason is not None
                    for chunk in shaper.chunk(event, first, open_rows == 0):
                        yield _sse(chunk)
                    first = False
            yield b"data: [DONE]\n\n"
        finally:
            await events.aclose()


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="rollstream serve", description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", help="Hugging Face model folder or s3://bucket/prefix (ROLLSTREAM_SERVE_MODEL)")
    parser.add_argument("--policy", help="policy name, also the OpenAI model name (ROLLSTREAM_SERVE_POLICY)")
    parser.add_argument("--policy-version", type=int, help="version of --model (ROLLSTREAM_SERVE_POLICY_VERSION)")
    parser.add_argument("--host", help="listen address (ROLLSTREAM_SERVE_HOST)")
    parser.add_argument("--port", type=int, help="listen port (ROLLSTREAM_SERVE_PORT)")
    parser.add_argument("--batch-window-ms", type=int, help="batch window (ROLLSTREAM_SERVE_BATCH_WINDOW_MS)")
    parser.add_argument("--max-batch", type=int, help="most rows per batch (ROLLSTREAM_SERVE_MAX_BATCH)")
    parser.add_argument("--default-max-tokens", type=int, help="max_tokens when a request gives none")
    parser.add_argument("--threads", type=int, help="torch CPU threads, 0: automatic (ROLLSTREAM_SERVE_THREADS)")
    parser.add_argument("--device", help="auto, cpu, cuda or cuda:N (ROLLSTREAM_SERVE_DEVICE)")
    parser.add_argument("--served-model-name", nargs="+", metavar="NAME",
                        help="other model names to answer to, '*' for any (ROLLSTREAM_SERVE_MODEL_NAMES)")
    parser.add_argument("--tool-call-parser", choices=TOOL_CALL_PARSERS,
                        help="format of the model's tool calls (ROLLSTREAM_SERVE_TOOL_CALL_PARSER)")
    parser.add_argument("--topic-prefix", help="prefix of the Kafka topics (ROLLSTREAM_TOPIC_PREFIX)")
    parser.add_argument("--no-updates", action="store_true", help="do not watch the policy-update topic")
    parser.add_argument("--updates-from", choices=["earliest", "latest"], default="earliest",
                        help="earliest: come up on the newest published version; latest: only later updates")
    parser.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    return parser


def settings_from_args(args: argparse.Namespace) -> ServeSettings:
    names = None if args.served_model_name is None else tuple(
        n for arg in args.served_model_name for n in arg.split(",") if n)
    return ServeSettings.from_args(
        args, "model", "policy", "policy_version", "host", "port", "batch_window_ms", "max_batch",
        "default_max_tokens", "threads", "device", "tool_call_parser", model_names=names,
        updates=False if args.no_updates else None, connection=ConnectionSettings.from_args(args, "topic_prefix"))


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        settings = settings_from_args(args)
        if not settings.model:
            raise ConfigError("no model: give --model PATH|s3://bucket/prefix or set ROLLSTREAM_SERVE_MODEL")
        threads = set_threads(settings.threads)
        device = pick_device(settings.device)
        engine = load_engine(settings.model, settings.policy_version, device, settings.connection)
    except RollstreamError as exc:
        log.error("%s", exc)
        return 2
    scheduler = Scheduler(engine, settings.batch_window_ms, settings.max_batch, settings.policy)
    watcher = None
    if settings.updates:
        topics = Topics.from_settings(settings.connection)
        watcher = PolicyWatcher(
            EngineTarget(scheduler, lambda uri, version: load_engine(uri, version, device, settings.connection)),
            settings.policy, topics, settings.connection, from_beginning=args.updates_from == "earliest",
        )
    server = PolicyServer(scheduler, settings.policy, settings.default_max_tokens, watcher, settings.model_names,
                          settings.tool_call_parser)
    log.info("serving policy '%s' version %d from %s on http://%s:%d/v1 (%s, %d threads)", settings.policy,
             settings.policy_version, settings.model, settings.host, settings.port, device, threads)
    uvicorn.run(server.app(), host=settings.host, port=settings.port, log_level=args.log_level,
                access_log=args.log_level == "debug")
    return 0
