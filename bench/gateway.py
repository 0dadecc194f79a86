"""Benchmark: the latency and throughput the capturing gateway costs, against LiteLLM's proxy.

One run starts a canned OpenAI-compatible backend (a fixed 16-token completion with token
ids and logprobs, streamed or whole, at almost no cost of its own), the gateway in front
of it publishing every call to the local stack's Kafka, and the LiteLLM proxy in front of
the same backend. A load generator in its own process then runs 1, 16 and 128 concurrent
clients, non-streaming and streaming, against the backend directly, the gateway and
LiteLLM, in turn. It reports the latency each proxy adds over the direct call (p50, p99)
and its throughput as a ratio of direct.

    .venv/bin/python bench/gateway.py            # ~8 s per measurement
    .venv/bin/python bench/gateway.py --quick    # under a minute (needs `rollstream stack up`)

The gateway's translated routes are measured beside its chat route, against the same chat backend:
``gw-responses`` (``POST /v1/responses``, OpenAI Responses API) and ``gw-messages`` (``POST /v1/messages``,
Anthropic Messages), at concurrencies up to 16; each row's ``added_vs_chat`` is the latency it adds over
the latency the chat route adds (the target is at most 1.5). A tail latency drifts with whatever else the
machine does, so each measurement is split into ``--rounds`` rounds that take the targets in turn
(direct, gateway, gw-responses, gw-messages, direct, ...); a row's figures are the medians over rounds,
and ``added_vs_chat`` is the median of the per-round ratios.

LiteLLM is installed on first use into its own virtual environment
(~/.cache/rollstream/bench-litellm, pinned below); --no-litellm skips it. The gateway answers
once Kafka acknowledged each call's event (ROLLSTREAM_GATEWAY_ACKS=kafka, the default);
--acks queued measures the answer-once-queued mode instead, --acks both the two side by side
(the second as ``gw-queued``).
The last line printed is one JSON object with every figure.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import statistics
import subprocess
import sys
import time
import urllib.request
import uuid
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
LITELLM_VERSION = "1.106.12"  # newer releases need a litellm-proxy package not on every index
LITELLM_VENV = Path(os.environ.get("ROLLSTREAM_HOME", "~/.cache/rollstream")).expanduser() / "bench-litellm"
TOKENS = 16
LITELLM_KEY = "sk-bench-" + uuid.uuid4().hex
TOPIC_PREFIX = "rollstream-bench."
DIALECT_MAX_CONCURRENCY = 16  # the Responses and Messages routes are measured up to this many clients
PROMPT = "Say something."
BODIES = {  # the request each kind of target is sent (stream set per measurement)
    "chat": {"model": "canned", "messages": [{"role": "user", "content": PROMPT}], "max_tokens": TOKENS},
    "responses": {"model": "canned", "input": PROMPT, "max_output_tokens": TOKENS},
    "messages": {"model": "canned", "messages": [{"role": "user", "content": PROMPT}], "max_tokens": TOKENS},
}

# --- the canned backend ---------------------------------------------------------------------


def _canned_bodies() -> dict[tuple[str, bool], Any]:
    """Pre-serialized answers: (endpoint, with token ids and logprobs) -> whole body / SSE events."""
    import orjson

    words = [f" w{i}" for i in range(TOKENS)]
    ids = list(range(1000, 1000 + TOKENS))
    lps = [-0.5] * TOKENS
    out: dict[tuple[str, bool], Any] = {}
    for endpoint in ("chat", "completions"):
        for extras in (False, True):
            base = {"id": "cmpl-bench", "created": 0, "model": "canned", "policy_version": 7}
            if endpoint == "chat":
                choice: dict[str, Any] = {"index": 0, "finish_reason": "length", "logprobs": None,
                                          "message": {"role": "assistant", "content": "".join(words)}}
                if extras:
                    choice["logprobs"] = {"content": [{"token": w, "logprob": lp, "bytes": None, "top_logprobs": []}
                                                      for w, lp in zip(words, lps, strict=True)]}
            else:
                choice = {"index": 0, "finish_reason": "length", "logprobs": None, "text": "".join(words)}
                if extras:
                    choice["logprobs"] = {"tokens": words, "token_logprobs": lps, "top_logprobs": None,
                                          "text_offset": list(range(TOKENS))}
            whole: dict[str, Any] = {**base, "object": "chat.completion" if endpoint == "chat" else "text_completion",
                                     "choices": [choice], "usage": {"prompt_tokens": 8, "completion_tokens": TOKENS,
                                                                    "total_tokens": 8 + TOKENS}}
            if extras:
                whole["prompt_token_ids"] = list(range(8))
                choice["token_ids"] = ids
            events = []
            for i, w in enumerate(words):
                c: dict[str, Any] = {"index": 0, "finish_reason": "length" if i == TOKENS - 1 else None,
                                     "logprobs": None}
                if endpoint == "chat":
                    c["delta"] = {"content": w} if i else {"role": "assistant", "content": w}
                    if extras:
                        c["logprobs"] = {"content": [{"token": w, "logprob": -0.5, "bytes": None, "top_logprobs": []}]}
                else:
                    c["text"] = w
                    if extras:
                        c["logprobs"] = {"tokens": [w], "token_logprobs": [-0.5], "top_logprobs": None,
                                         "text_offset": [i]}
                chunk: dict[str, Any] = {**base, "object": "chat.completion.chunk" if endpoint == "chat"
                                         else "text_completion", "choices": [c]}
                if extras:
                    c["token_ids"] = [ids[i]]
                    if i == 0:
                        chunk["prompt_token_ids"] = list(range(8))
                events.append(b"data: " + orjson.dumps(chunk) + b"\n\n")
            usage = {**base, "object": "chat.completion.chunk", "choices": [], "usage": whole["usage"]}
            out[(endpoint, extras)] = (orjson.dumps(whole), events, b"data: " + orjson.dumps(usage) + b"\n\n")
    return out


def run_canned(port: int) -> int:
    import orjson
    import uvicorn

    bodies = _canned_bodies()
    json_headers = [(b"content-type", b"application/json"), (b"x-policy-version", b"7")]
    sse_headers = [(b"content-type", b"text/event-stream"), (b"x-policy-version", b"7")]
    models = orjson.dumps({"object": "list", "data": [{"id": "canned", "object": "model"}]})

    async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return
        raw = b""
        while True:
            msg = await receive()
            raw += msg.get("body", b"")
            if not msg.get("more_body"):
                break
        if scope["path"].endswith("/models"):
            await send({"type": "http.response.start", "status": 200, "headers": json_headers})
            await send({"type": "http.response.body", "body": models})
            return
        req = orjson.loads(raw)
        endpoint = "chat" if scope["path"].endswith("/chat/completions") else "completions"
        whole, events, usage = bodies[(endpoint, bool(req.get("return_token_ids")))]
        if not req.get("stream"):
            await send({"type": "http.response.start", "status": 200, "headers": json_headers})
            await send({"type": "http.response.body", "body": whole})
            return
        await send({"type": "http.response.start", "status": 200, "headers": sse_headers})
        for event in events:
            await send({"type": "http.response.body", "body": event, "more_body": True})
        tail = b"data: [DONE]\n\n"
        if (req.get("stream_options") or {}).get("include_usage"):
            tail = usage + tail
        await send({"type": "http.response.body", "body": tail})

    uvicorn.run(app, host="127.0.0.1", port=port, loop="uvloop", http="httptools", log_level="warning",
                access_log=False, lifespan="off")
    return 0


# --- the load generator (its own process; one JSON command per stdin line) ------------------


async def _load(url: str, concurrency: int, seconds: float, stream: bool, headers: dict[str, str],
                warmup: float, kind: str = "chat") -> dict[str, Any]:
    import aiohttp

    body = json.dumps({**BODIES[kind], "stream": stream}).encode()
    latencies: list[float] = []
    errors = 0
    connector = aiohttp.TCPConnector(limit=concurrency, force_close=False)
    async with aiohttp.ClientSession(connector=connector) as session:
        start = time.perf_counter()
        measure_from, end = start + warmup, start + warmup + seconds

        async def client(i: int) -> None:
            nonlocal errors
            hdrs = {"Content-Type": "application/json", **headers}
            if "X-Rollout-Id" in headers:
                hdrs["X-Rollout-Id"] = f"bench-{uuid.uuid4().hex[:12]}"
            while True:
                t0 = time.perf_counter()
                if t0 >= end:
                    return
                try:
                    async with session.post(url, data=body, headers=hdrs) as resp:
                        await resp.read()
                        ok = resp.status == 200
                except aiohttp.ClientError:
                    ok = False
                t1 = time.perf_counter()
                # Completions inside the window count, whenever they started: a proxy slower than
                # the window is still measured (requests still running at the end finish uncounted).
                if measure_from <= t1 <= end:
                    if ok:
                        latencies.append(t1 - t0)
                    else:
                        errors += 1

        await asyncio.gather(*(client(i) for i in range(concurrency)))
    latencies.sort()
    n = len(latencies)
    return {
        "requests": n, "errors": errors, "rps": n / seconds,
        "p50_ms": 1000 * latencies[n // 2] if n else None,
        "p99_ms": 1000 * latencies[min(n - 1, int(n * 0.99))] if n else None,
        "mean_ms": 1000 * statistics.fmean(latencies) if n else None,
    }


def run_loadgen() -> int:
    import uvloop

    for line in sys.stdin:
        cmd = json.loads(line)
        result = uvloop.run(_load(**cmd))
        sys.stdout.write(json.dumps(result) + "\n")
        sys.stdout.flush()
    return 0


# --- orchestration ------------------------------------------------------------------------


def free_ports(n: int) -> list[int]:
    """``n`` distinct free ports (the sockets stay open until all are chosen)."""
    socks = [socket.socket() for _ in range(n)]
    try:
        for s in socks:
            s.bind(("127.0.0.1", 0))
        return [int(s.getsockname()[1]) for s in socks]
    finally:
        for s in socks:
            s.close()


def wait_http(url: str, proc: subprocess.Popen[bytes], timeout: float, headers: dict[str, str] | None = None) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{proc.args!r} exited with {proc.returncode}")
        try:
            with urllib.request.urlopen(urllib.request.Request(url, headers=headers or {}), timeout=2):
                return
        except OSError:
            time.sleep(0.2)
    raise RuntimeError(f"{url} did not answer within {timeout:.0f}s")


def ensure_litellm() -> Path:
    exe = LITELLM_VENV / "bin" / "litellm"
    marker = LITELLM_VENV / f".complete-{LITELLM_VERSION}"
    if not marker.exists():
        print(f"installing litellm[proxy]=={LITELLM_VERSION} into {LITELLM_VENV} (first use) ...", flush=True)
        if not (LITELLM_VENV / "bin" / "pip").exists():
            subprocess.run(["python3", "-m", "venv", str(LITELLM_VENV)], check=True)
        subprocess.run([str(LITELLM_VENV / "bin" / "pip"), "install", "-q", f"litellm[proxy]=={LITELLM_VERSION}"],
                       check=True)
        marker.touch()
    return exe


def start_litellm(backend: str, port: int, workdir: Path, log: Any) -> subprocess.Popen[bytes]:
    exe = ensure_litellm()
    config = workdir / "litellm.yaml"
    config.write_text(
        "model_list:\n"
        "  - model_name: canned\n"
        "    litellm_params:\n"
        "      model: openai/canned\n"
        f"      api_base: {backend}\n"
        "      api_key: bench-backend-key\n"
        "general_settings:\n"
        f"  master_key: {LITELLM_KEY}\n"
        "litellm_settings:\n"
        "  telemetry: false\n"
        "  drop_params: true\n"
    )
    env = {**os.environ, "LITELLM_LOG": "ERROR", "LITELLM_LOCAL_MODEL_COST_MAP": "True", "LITELLM_TELEMETRY": "False"}
    return subprocess.Popen([str(exe), "--config", str(config), "--port", str(port), "--host", "127.0.0.1",
                             "--num_workers", "1"], stdout=log, stderr=subprocess.STDOUT, env=env, cwd=workdir)


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process so far (Linux /proc)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def metric(url: str, name: str) -> float:
    with urllib.request.urlopen(url, timeout=5) as resp:
        text = resp.read().decode()
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines() if line.startswith(name))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="short measurements (under a minute in all)")
    p.add_argument("--seconds", type=float, help="seconds per measurement (default 8; quick: 1.2)")
    p.add_argument("--concurrency", default="1,16,128")
    p.add_argument("--rounds", type=int, help="rounds each measurement is split into, targets in turn (default 4; "
                                              "quick: 1)")
    p.add_argument("--no-litellm", action="store_true", help="skip the LiteLLM comparison")
    p.add_argument("--acks", choices=["kafka", "queued", "both"], default="kafka",
                   help="the gateway's ROLLSTREAM_GATEWAY_ACKS (both: one gateway of each)")
    p.add_argument("--role", choices=["main", "canned", "loadgen"], default="main", help=argparse.SUPPRESS)
    p.add_argument("--port", type=int, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.role == "canned":
        return run_canned(args.port)
    if args.role == "loadgen":
        return run_loadgen()

    seconds = args.seconds or (1.2 if args.quick else 8.0)
    rounds = max(1, args.rounds or (1 if args.quick else 4))
    warmup = 0.3 if args.quick else 1.0
    levels = [int(c) for c in args.concurrency.split(",")]
    workdir = Path(os.environ.get("TMPDIR", "/tmp")) / f"rollstream-bench-{uuid.uuid4().hex[:8]}"
    workdir.mkdir(parents=True)
    log = (workdir / "services.log").open("ab")
    procs: list[subprocess.Popen[Any]] = []

    def spawn(cmd: list[str], **kw: Any) -> subprocess.Popen[bytes]:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, **kw)
        procs.append(proc)
        return proc

    py = sys.executable
    try:
        bport, gport, lport, qport = free_ports(4)
        backend = f"http://127.0.0.1:{bport}/v1"
        canned = spawn([py, __file__, "--role", "canned", "--port", str(bport)])
        modes = ["kafka", "queued"] if args.acks == "both" else [args.acks]
        # name -> (port, process) of each gateway
        gateways = {name: (port, spawn([str(ROOT / ".venv" / "bin" / "rollstream"), "gateway", "--port", str(port),
                                        "--backend-url", backend, "--topic-prefix", TOPIC_PREFIX, "--acks", mode,
                                        "--log-level", "warning"]))
                    for name, port, mode in zip(["gateway", "gw-queued"] if len(modes) == 2 else ["gateway"],
                                                [gport, qport], modes, strict=False)}
        litellm = None if args.no_litellm else start_litellm(backend, lport, workdir, log)
        if litellm is not None:
            procs.append(litellm)
        wait_http(f"{backend}/models", canned, 30)
        for port, gateway in gateways.values():
            wait_http(f"http://127.0.0.1:{port}/healthz", gateway, 60)
        if litellm is not None:
            wait_http(f"http://127.0.0.1:{lport}/v1/models", litellm, 120, {"Authorization": f"Bearer {LITELLM_KEY}"})
        # name -> (url, headers, the process whose CPU time is charged to it, the kind of request)
        targets: dict[str, tuple[str, dict[str, str], int, str]] = {
            "direct": (f"{backend}/chat/completions", {}, canned.pid, "chat")}
        attributed = {"X-Rollout-Id": "set per client", "X-Agent-Name": "bench"}
        for name, (port, gateway) in gateways.items():
            targets[name] = (f"http://127.0.0.1:{port}/v1/chat/completions", attributed, gateway.pid, "chat")
        port, gateway = gateways["gateway"]
        targets["gw-responses"] = (f"http://127.0.0.1:{port}/v1/responses", attributed, gateway.pid, "responses")
        targets["gw-messages"] = (f"http://127.0.0.1:{port}/v1/messages", attributed, gateway.pid, "messages")
        if litellm is not None:
            targets["litellm"] = (f"http://127.0.0.1:{lport}/v1/chat/completions",
                                  {"Authorization": f"Bearer {LITELLM_KEY}"}, litellm.pid, "chat")
        loadgen = subprocess.Popen([py, __file__, "--role", "loadgen"], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                   text=True)
        procs.append(loadgen)
        assert loadgen.stdin is not None and loadgen.stdout is not None

        def measure(url: str, headers: dict[str, str], conc: int, stream: bool, kind: str, secs: float = seconds,
                    warm: float = warmup) -> dict[str, Any]:
            cmd = {"url": url, "concurrency": conc, "seconds": secs, "stream": stream, "headers": headers,
                   "warmup": warm, "kind": kind}
            loadgen.stdin.write(json.dumps(cmd) + "\n")  # type: ignore[union-attr]
            loadgen.stdin.flush()  # type: ignore[union-attr]
            return dict(json.loads(loadgen.stdout.readline()))  # type: ignore[union-attr]

        for url, headers, _pid, kind in targets.values():  # first requests are slow everywhere (imports, pools)
            for stream in (False, True):
                measure(url, headers, 4, stream, kind, 0.5, 0.0)
        def gateway_metric(name: str) -> float:
            return sum(metric(f"http://127.0.0.1:{port}/metrics", name) for port, _ in gateways.values())

        enqueued_before = gateway_metric("rollstream_gateway_events_enqueued_total")
        published_before = gateway_metric("rollstream_gateway_events_published_total")
        results: list[dict[str, Any]] = []
        for stream in (False, True):
            for conc in levels:
                row: dict[str, Any] = {"mode": "stream" if stream else "whole", "concurrency": conc}
                names = [n for n, t in targets.items() if t[3] == "chat" or conc <= DIALECT_MAX_CONCURRENCY]
                per_round: dict[str, list[dict[str, Any]]] = {name: [] for name in names}
                for _ in range(rounds):
                    for name in names:
                        url, headers, pid, kind = targets[name]
                        cpu0 = cpu_seconds(pid)
                        r = measure(url, headers, conc, stream, kind, seconds / rounds)
                        # CPU of the serving process per request (warm-up included, so slightly high);
                        # for proxies this is the proxy's own cost, whatever else runs on the machine.
                        total = r["requests"] * (seconds / rounds + warmup) / (seconds / rounds)
                        r["cpu_us_per_request"] = 1e6 * (cpu_seconds(pid) - cpu0) / total if total else None
                        per_round[name].append(r)
                for name in names:
                    row[name] = _median_round(per_round[name])
                direct = row["direct"]
                for name in names:
                    if name == "direct":
                        continue
                    r = row[name]
                    for q in ("p50", "p99"):
                        r[f"added_{q}_ms"] = _median([_added(x, d, q) for x, d in
                                                      zip(per_round[name], per_round["direct"], strict=True)])
                    r["throughput_ratio"] = r["rps"] / direct["rps"] if direct["rps"] else None
                for name in ("gw-responses", "gw-messages"):
                    if name in row:
                        row[name]["added_vs_chat"] = {
                            q: _median([_ratio(_added(x, d, q), _added(c, d, q))
                                        for x, c, d in zip(per_round[name], per_round["gateway"], per_round["direct"],
                                                           strict=True)])
                            for q in ("p50", "p99")}
                results.append(row)
                print_row(row, names)
        time.sleep(1.0)
        enqueued = gateway_metric("rollstream_gateway_events_enqueued_total")
        published = gateway_metric("rollstream_gateway_events_published_total")
        summary = {
            "bench": "gateway", "quick": args.quick, "seconds_per_measurement": seconds, "rounds": rounds,
            "cpus": os.cpu_count(),
            "litellm_version": None if litellm is None else LITELLM_VERSION, "gateway_acks": modes,
            "gateway_events_enqueued": enqueued - enqueued_before,
            "gateway_events_published": published - published_before,
            "results": results,
        }
        print_dialects(results)
        print(f"\ngateway events: {enqueued - enqueued_before:.0f} captured and enqueued, "
              f"{published - published_before:.0f} acknowledged by Kafka (topics {TOPIC_PREFIX}*)")
        print(json.dumps(summary, separators=(",", ":")))
        return 0
    except Exception:
        log.flush()
        print((workdir / "services.log").read_text(errors="replace")[-4000:], file=sys.stderr)
        raise
    finally:
        for proc in reversed(procs):
            if proc.poll() is None:
                proc.terminate()
        for proc in procs:
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                proc.kill()


def _added(measured: dict[str, Any], direct: dict[str, Any], q: str) -> float | None:
    """The latency quantile ``q`` (p50, p99) a proxy adds over the direct call in the same round."""
    a, b = measured[f"{q}_ms"], direct[f"{q}_ms"]
    return a - b if a is not None and b is not None else None


def _median(values: list[float | None]) -> float | None:
    known = [v for v in values if v is not None]
    return statistics.median(known) if known else None


def _median_round(rounds: list[dict[str, Any]]) -> dict[str, Any]:
    """One target's figures over rounds: counts summed, the rest the median of the rounds."""
    out: dict[str, Any] = {"rounds": len(rounds)}
    for key, value in rounds[0].items():
        if key in ("requests", "errors"):
            out[key] = sum(r[key] for r in rounds)
        elif isinstance(value, int | float) or value is None:
            out[key] = _median([r[key] for r in rounds])
        else:
            out[key] = value
    return out


def _ratio(value: float | None, baseline: float | None) -> float | None:
    """``value / baseline``, with a floor of 0.05 ms on the baseline (a route adding almost nothing is not a
    reason for an infinite ratio)."""
    if value is None or baseline is None:
        return None
    return value / max(baseline, 0.05)


def print_dialects(results: list[dict[str, Any]]) -> None:
    print("\ntranslated routes: latency added over direct, and as a ratio of what the chat route adds "
          "(target <= 1.5)")
    print(f"{'mode':6} {'conc':>4} | {'route':12} {'+p50 ms':>8} {'+p99 ms':>8} | {'p50 x chat':>10} "
          f"{'p99 x chat':>10}")
    for row in results:
        for name in ("gateway", "gw-responses", "gw-messages"):
            if name not in row:
                continue
            r = row[name]
            ratio = r.get("added_vs_chat") or {"p50": 1.0, "p99": 1.0}

            def f(v: Any) -> str:
                return "-" if v is None else f"{v:.2f}"

            print(f"{row['mode']:6} {row['concurrency']:>4} | {name:12} {f(r['added_p50_ms']):>8} "
                  f"{f(r['added_p99_ms']):>8} | {f(ratio['p50']):>10} {f(ratio['p99']):>10}")
    sys.stdout.flush()


_HEADER_PRINTED = False


def print_row(row: dict[str, Any], names: list[str]) -> None:
    global _HEADER_PRINTED
    if not _HEADER_PRINTED:
        print(f"{'mode':6} {'conc':>4} | {'target':12} {'rps':>8} {'p50 ms':>8} {'p99 ms':>8} | "
              f"{'+p50 ms':>8} {'+p99 ms':>8} {'tput/direct':>11} | {'cpu us/req':>10}")
        _HEADER_PRINTED = True
    for name in names:
        r = row[name]

        def f(v: Any, fmt: str = ".2f") -> str:
            return "-" if v is None else format(v, fmt)

        print(f"{row['mode']:6} {row['concurrency']:>4} | {name:12} {f(r['rps'], '.0f'):>8} {f(r['p50_ms']):>8} "
              f"{f(r['p99_ms']):>8} | {f(r.get('added_p50_ms')):>8} {f(r.get('added_p99_ms')):>8} "
              f"{f(r.get('throughput_ratio'), '.3f'):>11} | {f(r.get('cpu_us_per_request'), '.0f'):>10}"
              + (f"  errors={r['errors']}" if r["errors"] else ""))
    sys.stdout.flush()


if __name__ == "__main__":
    sys.exit(main())
