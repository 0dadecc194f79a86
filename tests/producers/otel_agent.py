"""A tiny tool-using agent traced by a REAL OpenTelemetry GenAI instrumentation of ``openai``.

Not a test module: tests run it as a subprocess with one instrumentation's install dir (made by
``scripts/setup-otel.sh``) first on PYTHONPATH, so that dir's opentelemetry packages win::

    PYTHONPATH=~/.cache/rollstream/otel/<name> .venv/bin/python tests/producers/otel_agent.py \\
        --instrumentation <name> --base-url http://127.0.0.1:PORT/v1 --otlp http://127.0.0.1:4318 \\
        --rollout-id R --group-id G --task-id T [--events]

It exports spans with OTLP/HTTP protobuf to ``<otlp>/v1/traces`` and, where the content goes to
log events, logs to ``<otlp>/v1/logs``. The agent: a root span ``rollout`` with attributes
``rollstream.rollout_id``/``group_id``/``task_id``; inside it one chat completion with a
``calculator`` function tool, and when the model calls it, a second completion with the tool
result; then a reward (``rollstream.reward`` span with ``rollstream.reward.value``, or for
agentlightning its own ``emit_reward`` annotation span) as a child of the root; then the root
ends and the providers are flushed and shut down. Prints one JSON line with what it did.

Content capture per instrumentation (env vars are only defaults; the caller's environment wins):

- ``openai-v2`` (opentelemetry-instrumentation-openai-v2): ``OTEL_SEMCONV_STABILITY_OPT_IN=
  gen_ai_latest_experimental`` and ``OTEL_INSTRUMENTATION_GENAI_CAPTURE_MESSAGE_CONTENT=
  SPAN_ONLY`` (content as span attributes) or, with ``--events``, ``EVENT_ONLY`` (content in a
  ``gen_ai.client.inference.operation.details`` log event). ``--content-mode`` sets any value
  (e.g. ``SPAN_AND_EVENT``). With util-genai >= 1.0 (the ``openai-v2`` dir) the instrumentation
  is always on the latest experimental conventions, whatever OTEL_SEMCONV_STABILITY_OPT_IN says.
- ``openai-v2-legacy`` (the same 2.4b0 with util-genai 0.4b0, the ``openai-v2-legacy`` dir):
  OTEL_SEMCONV_STABILITY_OPT_IN unset, ``..._CAPTURE_MESSAGE_CONTENT=true``: the v1.30 conventions,
  content only as ``gen_ai.{system,user,assistant,tool}.message`` / ``gen_ai.choice`` log events
  (``--events`` is implied).
- ``openllmetry``/``openllmetry-054`` (Traceloop): ``TRACELOOP_TRACE_CONTENT=true``; span mode
  is the default, ``--events`` passes ``use_attributes=False`` (0.62; ``use_legacy_attributes=
  False`` on 0.54) to the instrumentor, which then logs ``gen_ai.*`` events.
- ``openinference``: spans only (``--events`` is refused).
- ``agentlightning``: agent-lightning's ``AgentOpsTracer`` (``--agl-tracer agentops``, default:
  AgentOps instruments openai) or ``OtelTracer`` (``--agl-tracer otel``: no LLM spans, only its
  annotation spans); our OTLP exporter is added to the tracer's provider.
"""

from __future__ import annotations

import argparse
import ast
import json
import operator
import os
import sys
import time
from collections.abc import Callable
from typing import Any

VARIANTS = ("openai-v2", "openai-v2-legacy", "openllmetry", "openllmetry-054", "openinference", "agentlightning")

CALCULATOR_TOOL: dict[str, Any] = {
    "type": "function",
    "function": {
        "name": "calculator",
        "description": "Evaluate an arithmetic expression such as '2 + 3 * 4'.",
        "parameters": {
            "type": "object",
            # The pattern keeps the tiny test model's (constrained) arguments short and arithmetic.
            "properties": {"expression": {"type": "string", "description": "the expression",
                                          "pattern": "^[0-9]{1,3} [-+*/] [0-9]{1,3}$"}},
            "required": ["expression"],
            "additionalProperties": False,
        },
    },
}
SYSTEM = "You are a careful assistant. Use the calculator tool for arithmetic."
QUESTION = "What is 17 * 23?"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--instrumentation", required=True, choices=VARIANTS)
    p.add_argument("--base-url", required=True, help="the OpenAI client's base_url (http://host:port/v1)")
    p.add_argument("--otlp", required=True, help="OTLP/HTTP endpoint root, e.g. http://127.0.0.1:4318")
    p.add_argument("--rollout-id", required=True)
    p.add_argument("--group-id", required=True)
    p.add_argument("--task-id", required=True)
    p.add_argument("--events", action="store_true", help="content as log events where the library supports it")
    p.add_argument("--content-mode", help="openai-v2: OTEL_INSTRUMENTATION_GENAI_CAPTURE_MESSAGE_CONTENT value")
    p.add_argument("--agl-tracer", choices=("agentops", "otel"), default="agentops",
                   help="agentlightning: which agent-lightning tracer")
    p.add_argument("--agl-trace-context", action="store_true",
                   help="agentlightning: run the rollout inside the tracer's trace_context() (no store)")
    p.add_argument("--model", default="tiny")
    p.add_argument("--api-key", default=os.environ.get("OPENAI_API_KEY", "sk-none"))
    p.add_argument("--tool-choice", default="required",
                   help="tool_choice of the first call: required (default: forces a tool call), auto, none")
    p.add_argument("--max-tokens", type=int, default=128, help="max_tokens of the first (tool-calling) call")
    p.add_argument("--answer-max-tokens", type=int, default=16, help="max_tokens of the second call")
    p.add_argument("--return-token-ids", action="store_true",
                   help="ask the server for token ids (vLLM's return_token_ids, extra_body); agent-lightning "
                        "records them as prompt_token_ids / response_token_ids span attributes")
    p.add_argument("--reward", type=float, default=1.0)
    p.add_argument("--service-name", default=None)
    p.add_argument("--batch", action="store_true", help="BatchSpanProcessor instead of SimpleSpanProcessor")
    args = p.parse_args(argv)
    if args.events and args.instrumentation == "openinference":
        p.error("openinference has no event/log content mode")
    return args


def set_content_env(args: argparse.Namespace) -> None:
    """Content-capture settings, before the instrumentation is imported (some read env at import)."""
    name = args.instrumentation
    if name == "openai-v2":
        os.environ.setdefault("OTEL_SEMCONV_STABILITY_OPT_IN", "gen_ai_latest_experimental")
        mode = args.content_mode or ("EVENT_ONLY" if args.events else "SPAN_ONLY")
        os.environ.setdefault("OTEL_INSTRUMENTATION_GENAI_CAPTURE_MESSAGE_CONTENT", mode)
    elif name == "openai-v2-legacy":
        os.environ.pop("OTEL_SEMCONV_STABILITY_OPT_IN", None)
        os.environ.setdefault("OTEL_INSTRUMENTATION_GENAI_CAPTURE_MESSAGE_CONTENT", args.content_mode or "true")
    elif name in ("openllmetry", "openllmetry-054"):
        os.environ.setdefault("TRACELOOP_TRACE_CONTENT", "true")
    elif name == "agentlightning":
        # litellm (imported by agentlightning) fetches a price list from GitHub at import without this.
        os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")
        os.environ.setdefault("AGENTOPS_API_KEY", "dummy")
        os.environ.setdefault("AGENTOPS_LOGGING_TO_FILE", "False")  # else it writes ./agentops.log
        os.environ.setdefault("TRACELOOP_TRACE_CONTENT", "true")


class Telemetry:
    """Tracer/logger providers exporting OTLP/HTTP protobuf to the given endpoint."""

    def __init__(self, args: argparse.Namespace, tracer_provider: Any = None) -> None:
        from opentelemetry import trace
        from opentelemetry._logs import set_logger_provider
        from opentelemetry.exporter.otlp.proto.http._log_exporter import OTLPLogExporter
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
        from opentelemetry.sdk._logs import LoggerProvider
        from opentelemetry.sdk._logs.export import BatchLogRecordProcessor
        from opentelemetry.sdk.resources import Resource
        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.sdk.trace.export import BatchSpanProcessor, SimpleSpanProcessor

        otlp = args.otlp.rstrip("/")
        resource = Resource.create({"service.name": args.service_name or f"otel-agent-{args.instrumentation}"})
        self.own_tracer_provider = tracer_provider is None
        if tracer_provider is None:
            tracer_provider = TracerProvider(resource=resource)
            trace.set_tracer_provider(tracer_provider)
        processor_cls = BatchSpanProcessor if args.batch else SimpleSpanProcessor
        tracer_provider.add_span_processor(processor_cls(OTLPSpanExporter(endpoint=f"{otlp}/v1/traces")))
        self.tracer_provider = tracer_provider
        self.logger_provider = LoggerProvider(resource=resource)
        self.logger_provider.add_log_record_processor(
            BatchLogRecordProcessor(OTLPLogExporter(endpoint=f"{otlp}/v1/logs")))
        set_logger_provider(self.logger_provider)
        try:  # the deprecated Events API, for instrumentations that still use it
            from opentelemetry._events import set_event_logger_provider
            from opentelemetry.sdk._events import EventLoggerProvider

            set_event_logger_provider(EventLoggerProvider(self.logger_provider))
        except ImportError:
            pass

    def tracer(self) -> Any:
        return self.tracer_provider.get_tracer("rollstream.otel_agent")

    def shutdown(self) -> None:
        self.tracer_provider.force_flush()
        self.logger_provider.force_flush()
        self.logger_provider.shutdown()
        self.tracer_provider.shutdown()


def instrument(args: argparse.Namespace, tel: Telemetry) -> dict[str, Any]:
    """Instruments openai with the chosen library; returns what was used (for the summary line)."""
    name = args.instrumentation
    kw = {"tracer_provider": tel.tracer_provider, "logger_provider": tel.logger_provider}
    if name in ("openai-v2", "openai-v2-legacy"):
        from opentelemetry.instrumentation.openai_v2 import OpenAIInstrumentor

        OpenAIInstrumentor().instrument(**kw)
        return {"capture": os.environ["OTEL_INSTRUMENTATION_GENAI_CAPTURE_MESSAGE_CONTENT"]}
    if name in ("openllmetry", "openllmetry-054"):
        import inspect

        from opentelemetry.instrumentation.openai import OpenAIInstrumentor

        params = inspect.signature(OpenAIInstrumentor.__init__).parameters
        flag = "use_attributes" if "use_attributes" in params else "use_legacy_attributes"
        OpenAIInstrumentor(**{flag: not args.events}).instrument(**kw)
        return {flag: not args.events}
    if name == "openinference":
        from openinference.instrumentation.openai import OpenAIInstrumentor

        OpenAIInstrumentor().instrument(tracer_provider=tel.tracer_provider)
        return {}
    return {}  # agentlightning: its tracer instruments


def calculator(expression: str) -> str:
    ops: dict[type, Callable[..., float]] = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul,
                                             ast.Div: operator.truediv, ast.USub: operator.neg, ast.Pow: operator.pow}

    def ev(node: ast.AST) -> float:
        if isinstance(node, ast.Constant) and isinstance(node.value, (int, float)):
            return node.value
        if isinstance(node, ast.BinOp) and type(node.op) in ops:
            return ops[type(node.op)](ev(node.left), ev(node.right))
        if isinstance(node, ast.UnaryOp) and type(node.op) in ops:
            return ops[type(node.op)](ev(node.operand))
        raise ValueError(f"not arithmetic: {expression!r}")

    try:
        return str(ev(ast.parse(expression, mode="eval").body))
    except (SyntaxError, ValueError, ZeroDivisionError, OverflowError, TypeError) as exc:
        return f"error: {exc}"


def run_agent(args: argparse.Namespace, assistant_content_none: bool = True) -> dict[str, Any]:
    """The two-step tool-using conversation; returns a summary of it."""
    from openai import OpenAI

    client: Any = OpenAI(base_url=args.base_url, api_key=args.api_key)  # Any: messages are plain dicts
    messages: list[dict[str, Any]] = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": QUESTION}]
    extra: dict[str, Any] = {"extra_body": {"return_token_ids": True}} if args.return_token_ids else {}
    first = client.chat.completions.create(model=args.model, messages=messages, tools=[CALCULATOR_TOOL],
                                           tool_choice=args.tool_choice, max_tokens=args.max_tokens,
                                           temperature=0.7,
                                           **({"parallel_tool_calls": False} if args.tool_choice != "none" else {}),
                                           **extra)
    summary: dict[str, Any] = {"calls": 1, "response_ids": [first.id], "tool_calls": []}
    msg = first.choices[0].message
    if msg.tool_calls:
        content = msg.content if msg.content is not None or assistant_content_none else ""
        messages.append({"role": "assistant", "content": content,
                         "tool_calls": [{"id": c.id, "type": "function",
                                         "function": {"name": c.function.name, "arguments": c.function.arguments}}
                                        for c in msg.tool_calls]})
        for call in msg.tool_calls:
            try:
                expr = str(json.loads(call.function.arguments or "{}").get("expression", ""))
            except (ValueError, AttributeError):
                expr = ""
            result = calculator(expr)
            summary["tool_calls"].append({"id": call.id, "name": call.function.name,
                                          "arguments": call.function.arguments, "result": result})
            messages.append({"role": "tool", "tool_call_id": call.id, "content": result})
        second = client.chat.completions.create(model=args.model, messages=messages, tools=[CALCULATOR_TOOL],
                                                tool_choice="none", max_tokens=args.answer_max_tokens,
                                                temperature=0.7, **extra)
        summary["calls"] = 2
        summary["response_ids"].append(second.id)
    return summary


def root_attributes(args: argparse.Namespace) -> dict[str, str]:
    return {"rollstream.rollout_id": args.rollout_id, "rollstream.group_id": args.group_id,
            "rollstream.task_id": args.task_id}


def main_plain(args: argparse.Namespace) -> dict[str, Any]:
    tel = Telemetry(args)
    info = instrument(args, tel)
    tracer = tel.tracer()
    with tracer.start_as_current_span("rollout", attributes=root_attributes(args)) as root:
        summary = run_agent(args)
        with tracer.start_as_current_span("rollstream.reward",
                                          attributes={"rollstream.reward.value": float(args.reward)}):
            pass
        trace_id = format(root.get_span_context().trace_id, "032x")
    tel.shutdown()
    return {**summary, **info, "trace_id": trace_id}


def main_agentlightning(args: argparse.Namespace) -> dict[str, Any]:
    import site

    # AgentOps instruments a library only when its module file lies under site.getsitepackages()
    # (others count as "local modules"); our install dir on PYTHONPATH is not one, so count it.
    extra = [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]
    original = site.getsitepackages
    site.getsitepackages = lambda *a, **k: [*original(*a, **k), *extra]  # type: ignore[assignment]

    import agentlightning as agl
    from agentlightning.tracer.base import clear_active_tracer, set_active_tracer

    if args.agl_tracer == "agentops":
        # agent-lightning patches AgentOps' own exporters into a local mode that sends nothing;
        # the spans reach us through the exporter Telemetry adds to AgentOps' provider.
        tracer = agl.AgentOpsTracer()
    else:
        tracer = agl.OtelTracer()
    tracer.init_worker(0)
    provider = tracer._get_tracer_provider()  # noqa: SLF001 - the provider its spans go to
    tel = Telemetry(args, tracer_provider=provider)
    otel_tracer = tel.tracer()

    def rollout() -> tuple[dict[str, Any], str]:
        with otel_tracer.start_as_current_span("rollout", attributes=root_attributes(args)) as root:
            # agentlightning 0.3.0 + agentops 0.4.21: an assistant message with content None makes
            # AgentOps set gen_ai.prompt.N.content=None, and agent-lightning's span processor then
            # raises (pydantic ValidationError) from span.end(), inside the openai call. Send "".
            summary = run_agent(args, assistant_content_none=False)
            agl.emit_reward(float(args.reward))
            return summary, format(root.get_span_context().trace_id, "032x")

    if args.agl_trace_context:  # as agent-lightning's runner does (there with a store, rollout and attempt)
        import asyncio

        async def traced() -> tuple[dict[str, Any], str]:
            async with tracer.trace_context(name=args.rollout_id):
                return rollout()

        summary, trace_id = asyncio.run(traced())
    else:
        set_active_tracer(tracer)  # what emit_reward() emits through (trace_context() sets it itself)
        try:
            summary, trace_id = rollout()
        finally:
            clear_active_tracer()
    tel.tracer_provider.force_flush()
    tel.logger_provider.force_flush()
    tel.logger_provider.shutdown()
    tracer.teardown_worker(0)
    provider.shutdown()
    return {**summary, "agl_tracer": args.agl_tracer, "agl_trace_context": args.agl_trace_context,
            "agentlightning": getattr(agl, "__version__", "?"), "trace_id": trace_id}


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    set_content_env(args)
    start = time.monotonic()
    if args.instrumentation == "agentlightning":
        summary = main_agentlightning(args)
    else:
        summary = main_plain(args)
    events = args.events or args.instrumentation == "openai-v2-legacy"
    summary.update(instrumentation=args.instrumentation, events=events, seconds=round(time.monotonic() - start, 2))
    print(json.dumps(summary), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
