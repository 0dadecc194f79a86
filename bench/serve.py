"""Benchmark: generated tokens/s of ``rollstream serve`` at 1 and 16 concurrent requests (and vLLM's).

The baseline is sequential single-request generation with the same model in this
process (the engine's decode loop, one request at a time, no HTTP): the batching gain is
the server's throughput at 16 concurrent requests as a ratio of it. The model is a small
Qwen2-style model built in code (random weights; no download), served by a
``rollstream serve`` subprocess on a free port without Kafka (--no-updates).

    .venv/bin/python bench/serve.py            # larger model, more requests
    .venv/bin/python bench/serve.py --quick    # under a minute
    .venv/bin/python bench/serve.py --vllm     # vLLM's CPU build on the same model and load, and the ratios

With ``--vllm`` the same requests go, after ``rollstream serve`` has stopped, to vLLM's OpenAI server
(``scripts/setup-vllm.sh``; float32, started by ``rollstream.serving.vllm``), so both see the same machine.

The last line printed is one JSON object with every figure.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
CACHE = Path(os.environ.get("ROLLSTREAM_HOME", "~/.cache/rollstream")).expanduser() / "bench-serve"
PROMPTS = [f"Request {i}: what is the weather in paris and how does the agent plan its next tool call?"
           for i in range(256)]


def baseline(model_dir: Path, requests: int, max_tokens: int) -> dict[str, float]:
    """Sequential generation in-process: one request at a time through the same decode loop."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from rollstream.serving.engine import Engine, SamplingParams
    from rollstream.serving.loading import set_threads

    set_threads(0)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    engine = Engine(AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32), tokenizer)
    prompts = [tokenizer.encode(p) for p in PROMPTS[:requests]]
    engine.generate(prompts[:1], [SamplingParams(max_tokens=4)])  # warm-up
    started = time.perf_counter()
    tokens = 0
    for i, prompt in enumerate(prompts):
        seq = engine.generate([prompt], [SamplingParams(max_tokens=max_tokens, temperature=1.0, seed=i)])[0]
        tokens += len(seq.output)
    elapsed = time.perf_counter() - started
    return {"requests": requests, "tokens": tokens, "seconds": elapsed, "tokens_per_s": tokens / elapsed}


async def load(base_url: str, concurrency: int, requests: int, max_tokens: int, stream: bool) -> dict[str, float]:
    """``requests`` completions, ``concurrency`` at a time; tokens/s and latency."""
    from openai import AsyncOpenAI

    client = AsyncOpenAI(base_url=base_url, api_key="unused", max_retries=0, timeout=600)
    queue = list(range(requests))
    latencies: list[float] = []
    tokens = 0

    async def worker() -> None:
        nonlocal tokens
        while queue:
            i = queue.pop()
            t0 = time.perf_counter()
            if stream:
                chunks = await client.completions.create(model="bench", prompt=PROMPTS[i], max_tokens=max_tokens,
                                                         temperature=1.0, seed=i, stream=True,
                                                         stream_options={"include_usage": True})
                async for chunk in chunks:
                    if chunk.usage is not None:
                        tokens += chunk.usage.completion_tokens
            else:
                resp = await client.completions.create(model="bench", prompt=PROMPTS[i], max_tokens=max_tokens,
                                                       temperature=1.0, seed=i)
                assert resp.usage is not None
                tokens += resp.usage.completion_tokens
            latencies.append(time.perf_counter() - t0)

    started = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    elapsed = time.perf_counter() - started
    await client.close()
    latencies.sort()
    return {"requests": requests, "tokens": tokens, "seconds": elapsed, "tokens_per_s": tokens / elapsed,
            "p50_ms": 1000 * latencies[len(latencies) // 2], "p99_ms": 1000 * latencies[int(len(latencies) * 0.99)]}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="smaller model and fewer requests (under a minute)")
    p.add_argument("--max-tokens", type=int, help="tokens per request (default 32 quick, 64 full)")
    p.add_argument("--vllm", action="store_true", help="also vLLM's OpenAI server on the same model and load")
    args = p.parse_args(argv)
    sys.path.insert(0, str(ROOT))
    from rollstream.serving.launch import ServerProcess
    from rollstream.serving.tiny import build_tiny_model

    quick = args.quick
    max_tokens = args.max_tokens or (32 if quick else 64)
    hidden, layers = (128, 4) if quick else (256, 6)
    n_single, n_batched = (10, 64) if quick else (24, 192)
    model_dir = build_tiny_model(CACHE / f"qwen2-h{hidden}-l{layers}", seed=0, hidden_size=hidden,
                                 num_layers=layers, vocab_size=512)
    results: dict[str, Any] = {"model": {"hidden_size": hidden, "layers": layers, "vocab": 512},
                               "max_tokens": max_tokens, "cpu_threads": len(os.sched_getaffinity(0))}
    results["sequential_in_process"] = baseline(model_dir, n_single, max_tokens)
    with tempfile.TemporaryDirectory() as tmp:
        server = ServerProcess(model_dir, policy="bench", args=["--no-updates", "--log-level", "warning"],
                               log_path=Path(tmp) / "serve.log")
        with server:
            asyncio.run(load(server.base_url, 1, 2, 4, False))  # warm-up
            results["server_c1"] = asyncio.run(load(server.base_url, 1, n_single, max_tokens, False))
            results["server_c16"] = asyncio.run(load(server.base_url, 16, n_batched, max_tokens, False))
            results["server_c16_stream"] = asyncio.run(load(server.base_url, 16, n_batched, max_tokens, True))
            stats = server.stats()
        if args.vllm:
            from rollstream.serving.vllm import VllmOptions, VllmProcess

            options = VllmOptions(str(model_dir), "bench", tool_call_parser="", max_num_seqs=16)
            with VllmProcess(options, log_path=Path(tmp) / "vllm.log") as vllm:
                results["vllm_start_s"] = round(vllm.started_s, 1)
                url = vllm.url + "/v1"
                asyncio.run(load(url, 1, 2, 4, False))  # warm-up
                results["vllm_c1"] = asyncio.run(load(url, 1, n_single, max_tokens, False))
                results["vllm_c16"] = asyncio.run(load(url, 16, n_batched, max_tokens, False))
                results["vllm_c16_stream"] = asyncio.run(load(url, 16, n_batched, max_tokens, True))
            for c in ("c1", "c16", "c16_stream"):
                ours, theirs = results[f"server_{c}"]["tokens_per_s"], results[f"vllm_{c}"]["tokens_per_s"]
                results[f"vllm_vs_serve_{c}"] = theirs / ours
    base = results["sequential_in_process"]["tokens_per_s"]
    results["batching_gain_vs_sequential"] = results["server_c16"]["tokens_per_s"] / base
    results["server_c1_vs_sequential"] = results["server_c1"]["tokens_per_s"] / base
    results["server_c16_vs_c1"] = results["server_c16"]["tokens_per_s"] / results["server_c1"]["tokens_per_s"]
    results["max_batch_size_observed"] = stats["max_batch_size"]

    print(f"rollstream serve: Qwen2-style h{hidden} x{layers} layers (random weights), {max_tokens} tokens/request, "
          f"{results['cpu_threads']} CPU threads")
    print(f"{'run':28} {'requests':>8} {'tokens':>7} {'tok/s':>9} {'p50 ms':>8} {'p99 ms':>8} {'vs seq':>7}")
    names = ["sequential_in_process", "server_c1", "server_c16", "server_c16_stream"]
    names += ["vllm_c1", "vllm_c16", "vllm_c16_stream"] if args.vllm else []
    for name in names:
        r = results[name]
        print(f"{name:28} {r['requests']:>8} {r['tokens']:>7} {r['tokens_per_s']:>9.1f} "
              f"{r.get('p50_ms', float('nan')):>8.1f} {r.get('p99_ms', float('nan')):>8.1f} "
              f"{r['tokens_per_s'] / base:>6.2f}x")
    print(f"batching gain (16 concurrent vs sequential): {results['batching_gain_vs_sequential']:.2f}x; "
          f"largest batch seen: {results['max_batch_size_observed']}")
    if args.vllm:
        print("vLLM vs rollstream serve (tokens/s): " + ", ".join(
            f"{c} {results[f'vllm_vs_serve_{c}']:.2f}x" for c in ("c1", "c16", "c16_stream"))
            + f"; vLLM started in {results['vllm_start_s']} s")
    print(json.dumps(results, separators=(",", ":")))
    return 0


if __name__ == "__main__":
    sys.exit(main())
