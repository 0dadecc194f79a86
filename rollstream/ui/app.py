"""``rollstream ui``: the rollout viewer, a Starlette app of server-rendered pages over one topic prefix.

Pages: ``/`` the rollouts (live, paged, filtered), ``/rollouts/<id>`` one rollout (its calls as a
conversation, per-token logprobs, rewards with their delay, transitions and credit), ``/curves``
(reward per policy version, the trainer's MLflow metrics), ``/dead-letters`` (with the consumer lag
of the processor and trainer groups). A background consumer keeps the index (``index.py``) current.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import math
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any
from urllib.parse import quote, urlencode

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import HTMLResponse, JSONResponse, Response
from starlette.routing import Route
from starlette.templating import Jinja2Templates

from rollstream.errors import RollstreamError
from rollstream.schemas.codec import EventCodec, registry_client
from rollstream.schemas.topics import Topics
from rollstream.settings import ConnectionSettings
from rollstream.ui import charts
from rollstream.ui.index import Filters, RolloutIndex
from rollstream.ui.kafka import LagReader, RecordFetcher, describe
from rollstream.ui.metrics import MlflowMetrics, held_out_accuracy
from rollstream.ui.views import Tokens, fmt_time, load_rollout

log = logging.getLogger(__name__)

TEMPLATES = Path(__file__).resolve().parent / "templates"
PAGE_SIZES = (25, 50, 100, 200)
STATUSES = ("STARTED", "SUCCEEDED", "FAILED", "CANCELLED", "CALLS")


@dataclasses.dataclass
class Viewer:
    """Everything the pages read from."""

    conn: ConnectionSettings
    topics: Topics
    codec: EventCodec
    index: RolloutIndex
    fetcher: RecordFetcher
    lags: LagReader
    mlflow: MlflowMetrics
    tokens: Tokens
    run_dir: str | None = None
    refresh_s: int = 5

    @classmethod
    def open(cls, conn: ConnectionSettings, tokenizer: str | None = None, run_dir: str | None = None) -> Viewer:
        topics = Topics(conn.topic_prefix, conn.partitions)
        codec = EventCodec(registry_client(conn), topics)
        fetcher = RecordFetcher(conn)
        fetcher.connect()
        return cls(conn, topics, codec, RolloutIndex(codec, conn), fetcher, LagReader(conn, topics),
                   MlflowMetrics(conn.mlflow_tracking_uri), Tokens(tokenizer), run_dir)

    def close(self) -> None:
        self.index.stop()
        self.fetcher.close()


def _float(value: float | None, digits: int = 3) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    return f"{value:.{digits}f}"


def _ago(us: int) -> str:
    if not us:
        return "-"
    s = max(0.0, time.time() - us / 1e6)
    if s < 60:
        return f"{s:.0f} s ago"
    if s < 3600:
        return f"{s / 60:.0f} min ago"
    if s < 86400:
        return f"{s / 3600:.1f} h ago"
    return f"{s / 86400:.1f} d ago"


def build_app(viewer: Viewer) -> Starlette:
    templates = Jinja2Templates(directory=str(TEMPLATES))
    templates.env.filters.update(num=_float, time=fmt_time, ago=_ago, q=lambda s: quote(str(s), safe=""))
    index = viewer.index

    def render(request: Request, name: str, **context: Any) -> Response:
        stats = index.stats
        context |= {"prefix": viewer.topics.prefix, "indexed": len(index.rollouts),
                    "caught_up": stats.caught_up_s is not None, "nav": name, "refresh_s": viewer.refresh_s}
        return templates.TemplateResponse(request, name, context)

    def rollouts(request: Request) -> Response:
        qp = request.query_params
        version = qp.get("version", "").strip()
        filters = Filters(status=qp.get("status", ""), group=qp.get("group", "").strip(),
                          version=int(version) if version.lstrip("-").isdigit() else None,
                          q=qp.get("q", "").strip(), has_reward=qp.get("reward", ""))
        per = int(qp.get("per", "50")) if qp.get("per", "50").isdigit() else 50
        per = per if per in PAGE_SIZES else 50
        page = max(1, int(qp.get("page", "1")) if qp.get("page", "1").isdigit() else 1)
        items, total = index.page(filters, (page - 1) * per, per)
        pages = max(1, -(-total // per))
        kept = {k: v for k, v in qp.items() if k != "page" and v}
        return render(request, "rollouts.html", items=items, total=total, page=page, pages=pages, per=per,
                      filters=filters, statuses=STATUSES, counts=index.status_counts(), sizes=PAGE_SIZES,
                      link=lambda p: "?" + urlencode({**kept, "page": p}), live=qp.get("live", "1") != "0",
                      reward_name=_primary(index))

    def rollout(request: Request) -> Response:
        rid = request.path_params["rid"]
        started = time.perf_counter()
        page = load_rollout(index, viewer.fetcher, viewer.codec, viewer.tokens, rid)
        if page is None:
            return render(request, "missing.html", rid=rid)
        return render(request, "rollout.html", r=page, load_ms=(time.perf_counter() - started) * 1000,
                      tokenized=viewer.tokens.path is not None)

    def curves(request: Request) -> Response:
        name = _primary(index)
        stats = index.version_stats()
        groups, lag_error = viewer.lags.lags()
        trainer_groups = [g.group for g in groups if g.role == "trainer"]
        policies = sorted({r.policy for r in index.page(Filters(), 0, 200)[0] if r.policy})
        training = viewer.mlflow.for_groups(trainer_groups, policies)
        accuracy, acc_error = held_out_accuracy(viewer.run_dir)
        acc_by_version: dict[int, float] = {}
        for _, acc, version in accuracy:
            acc_by_version[version] = acc  # the last measurement of each version
        svgs = {
            "reward": charts.reward_by_version(stats, name or "primary"),
            "delay": charts.delay_histogram(index.reward_delays()),
            "trainer": charts.series("trainer batch reward (MLflow reward_mean)", "trainer step", "mean reward",
                                     training.reward_by_step),
            "accuracy": charts.series("held-out accuracy per policy version (demo summary.json)", "policy version",
                                      "accuracy", sorted(acc_by_version.items())),
        }
        for metric, points in training.accuracy.items():
            svgs[metric] = charts.series(f"{metric} (MLflow)", "trainer step", metric, points)
        return render(request, "curves.html", svgs=svgs, stats=stats, training=training, reward_name=name,
                      acc_error=acc_error, run_dir=viewer.run_dir, lag_error=lag_error)

    def dead_letters(request: Request) -> Response:
        groups, lag_error = viewer.lags.lags()
        with index.lock:
            letters = list(index.dead_letters)[::-1][:200]
            counts = sorted(index.dead_letter_counts.items(), key=lambda kv: -kv[1])
        return render(request, "dead_letters.html", letters=letters, counts=counts, total=sum(c for _, c in counts),
                      groups=describe(groups), lag_error=lag_error, stats=index.stats,
                      rate=_rate(index), updates=index.policy_updates[-20:][::-1])

    def stats(request: Request) -> Response:
        s = index.stats
        return JSONResponse({"rollouts": len(index.rollouts), "records": dict(s.records), "bytes": s.bytes,
                             "caught_up_s": s.caught_up_s, "decode_errors": s.decode_errors,
                             "records_per_s": _rate(index)})

    def healthz(request: Request) -> Response:
        return HTMLResponse("ok")

    app = Starlette(routes=[
        Route("/", rollouts), Route("/rollouts/{rid:path}", rollout), Route("/curves", curves),
        Route("/dead-letters", dead_letters), Route("/api/stats", stats), Route("/healthz", healthz),
    ])
    app.state.viewer = viewer
    return app


def _primary(index: RolloutIndex) -> str | None:
    names = index.reward_names.most_common()
    if not names:
        return None
    return "primary" if any(n == "primary" for n, _ in names) else names[0][0]


def _rate(index: RolloutIndex) -> float | None:
    s = index.stats
    took = s.caught_up_s
    if not took:
        return None
    return sum(s.records.values()) / took


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="rollstream ui", description="A web viewer of one topic prefix's rollouts, "
                                "calls, rewards, transitions, curves, dead letters and consumer lag.")
    p.add_argument("--topic-prefix", help="prefix of the topics (default: ROLLSTREAM_TOPIC_PREFIX)")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on")
    p.add_argument("--port", type=int, default=8700, help="port to listen on")
    p.add_argument("--tokenizer", help="a Hugging Face tokenizer folder to show token ids as text (e.g. the "
                   "served model's folder; a demo run's summary.json names it as 'model')")
    p.add_argument("--run-dir", help="a rollstream demo run folder: its held-out accuracy curve (summary.json)")
    p.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    return p


def main(argv: Sequence[str] | None = None) -> int:
    import uvicorn

    args = build_parser().parse_args(list(sys.argv[1:] if argv is None else argv))
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    for noisy in ("httpx", "httpx2", "matplotlib", "urllib3"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    conn = ConnectionSettings()
    if args.topic_prefix:
        conn = dataclasses.replace(conn, topic_prefix=args.topic_prefix)
    try:
        viewer = Viewer.open(conn, args.tokenizer, args.run_dir)
    except RollstreamError as exc:
        log.error("%s", exc)
        return 2
    viewer.index.start()
    log.info("rollstream ui on http://%s:%d for topics %s*", args.host, args.port, conn.topic_prefix)
    config = uvicorn.Config(build_app(viewer), host=args.host, port=args.port, access_log=False,
                            log_level="warning")
    try:
        uvicorn.Server(config).run()
    except KeyboardInterrupt:
        pass
    finally:
        viewer.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
