"""The ``rollstream`` command: one entry point, one subcommand per process."""

from __future__ import annotations

import argparse
import importlib
import logging
import sys
from collections.abc import Sequence

from rich.console import Console
from rich.table import Table

from rollstream.errors import RollstreamError


def _stack(args: argparse.Namespace, console: Console) -> int:
    from rollstream.stack import Stack

    stack = Stack(report=lambda msg: console.print(f"[dim]·[/] {msg}"))
    if args.action == "up":
        with console.status("bringing the local stack up…"):
            statuses = stack.up()
    elif args.action == "down":
        stopped = stack.down()
        console.print("stopped: " + (", ".join(stopped) if stopped else "nothing was running"))
        return 0
    else:
        statuses = stack.status()
    table = Table("service", "url", "port", "health", "pid")
    for st in statuses:
        health = "[green]healthy[/]" if st.healthy else "[red]down[/]"
        table.add_row(st.name, st.url, str(st.port), health, str(st.pid or "-"))
    console.print(table)
    if args.action == "status":
        return 0 if all(st.healthy for st in statuses) else 1
    return 0


def _smoke(args: argparse.Namespace, console: Console) -> int:
    from rollstream.smoke import run_smoke

    return run_smoke(console, count=args.count)


def _topics(args: argparse.Namespace, console: Console) -> int:
    """Create a prefix's topics and register its schemas, publishing nothing (for producers of any language)."""

    from rollstream.schemas.codec import register_schemas, registry_client
    from rollstream.schemas.topics import Topics, create_topics
    from rollstream.settings import ConnectionSettings

    conn = ConnectionSettings.from_args(args, "topic_prefix", "partitions")
    topics = Topics(conn.topic_prefix, conn.partitions)
    created = create_topics(topics, conn)
    ids = register_schemas(registry_client(conn), topics)
    table = Table("topic", "partitions", "subject", "schema id", "created now")
    for spec in topics.specs():
        subject = f"{spec.name}-value"
        table.add_row(spec.name, str(spec.partitions), subject if subject in ids else "-",
                      str(ids.get(subject, "-")), "yes" if spec.name in created else "")
    console.print(table)
    return 0


# Subcommands whose options belong to their own module's ``main(argv)``.
DELEGATED = {
    "serve": ("rollstream.serving.server", "the OpenAI-compatible policy server (transformers, CPU/GPU)"),
    "vllm": ("rollstream.serving.vllm", "vLLM's OpenAI server with the policy sync in front (LoRA, reloads)"),
    "gateway": ("rollstream.producers.gateway", "the capturing OpenAI-compatible gateway and reward API"),
    "otlp": ("rollstream.producers.otlp", "the OTLP/HTTP trace receiver: GenAI and reward spans to events"),
    "process": ("rollstream.stream_processors.worker", "the stream processor: calls + rewards -> transitions"),
    "train": ("rollstream.trainer.train", "the continuous policy-gradient trainer"),
    "demo": ("rollstream.demo.main", "the closed loop on a calculator task: agents, stream, trainer, hot reload"),
    "export": ("rollstream.export", "transitions and whole rollouts of a time or policy-version range to Parquet"),
    "ui": ("rollstream.ui.app", "the rollout viewer: a web page of rollouts, calls, rewards, curves, dead letters"),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="rollstream", description=__doc__)
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True)
    stack = sub.add_parser("stack", help="the local stack: Kafka, schema registry, S3, MLflow")
    stack.add_argument("action", choices=["up", "down", "status"])
    stack.set_defaults(func=_stack)
    smoke = sub.add_parser(
        "smoke", help="publish one event of every type through Kafka and the registry, read them back"
    )
    smoke.add_argument("--count", type=int, default=100, help="events per type")
    smoke.set_defaults(func=_smoke)
    topics = sub.add_parser("topics", help="create a prefix's topics and register its schemas (no events published)")
    topics.add_argument("--topic-prefix", help="prefix of the topics (default: ROLLSTREAM_TOPIC_PREFIX)")
    topics.add_argument("--partitions", type=int, help="partitions of new topics (default: ROLLSTREAM_PARTITIONS)")
    topics.set_defaults(func=_topics)
    for name, (_module, text) in DELEGATED.items():
        sub.add_parser(name, help=text + f" (rollstream {name} --help)", add_help=False)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] in DELEGATED:
        entry = importlib.import_module(DELEGATED[argv[0]][0])
        return int(entry.main(argv[1:]))
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    for noisy in ("httpx", "httpx2", "urllib3"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    console = Console()
    try:
        return int(args.func(args, console))
    except RollstreamError as exc:
        console.print(f"[red]error:[/] {exc}")
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
