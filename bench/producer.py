"""Benchmark: what recording costs the agent's thread, and how many events one process can publish.

Against the running stack (``rollstream stack up``), in fresh topics:

- **call**: one chat completion made through an instrumented ``openai`` client inside a
  rollout, with a canned ~2 KB response (64 prompt and 64 response token ids with logprobs,
  ~1 KB of text) returned at no cost: the time is what the instrumentation adds to the
  caller's thread (request preparation, response snapshot and strip, enqueue);
- **reward**: ``rollout.reward(value, call_id=...)``;
- **raw produce()**: confluent-kafka ``Producer.produce()`` of the same (already encoded)
  call bytes on the same thread, the baseline.

Then sustained throughput: N calls recorded as fast as one thread can, until Kafka has
acknowledged all of them (``flush()``), against N raw ``produce()`` calls of the same bytes
and ``flush()``. Ratios are SDK / raw.

    .venv/bin/python bench/producer.py            # ~1-2 minutes
    .venv/bin/python bench/producer.py --quick    # under a minute

The last line printed is one JSON object with every figure.
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics
import sys
import time
import uuid
from typing import Any

from confluent_kafka import Producer
from openai.types.chat import ChatCompletion

from rollstream.producers.instrument import _sync_create
from rollstream.producers.sdk import Client, SdkSettings
from rollstream.schemas.codec import EventCodec, register_schemas, registry_client
from rollstream.schemas.topics import Topics, create_topics, producer_config
from rollstream.settings import ConnectionSettings

TOKENS = 64


def canned_response() -> ChatCompletion:
    words = [f"w{i % 97}" for i in range(TOKENS)]
    text = (" ".join(words) + " ") * 4  # ~1 KB
    return ChatCompletion.model_validate({
        "id": "chatcmpl-bench", "object": "chat.completion", "created": 1, "model": "policy",
        "policy_version": 3, "prompt_token_ids": list(range(1000, 1000 + TOKENS)),
        "usage": {"prompt_tokens": TOKENS, "completion_tokens": TOKENS, "total_tokens": 2 * TOKENS},
        "choices": [{
            "index": 0, "finish_reason": "length", "token_ids": list(range(2000, 2000 + TOKENS)),
            "message": {"role": "assistant", "content": text[:1000]},
            "logprobs": {"content": [{"token": w, "logprob": -0.5 - i / 100, "bytes": list(w.encode()),
                                      "top_logprobs": []} for i, w in enumerate(words)]},
        }],
    })


def fake_engine(resp: ChatCompletion) -> Any:
    """An ``openai`` create() that answers at once, restoring what the instrumentation strips."""
    extra = resp.__pydantic_extra__ or {}
    choice = resp.choices[0]
    cextra = choice.__pydantic_extra__ or {}
    prompt_ids, token_ids, logprobs = extra["prompt_token_ids"], cextra["token_ids"], choice.logprobs

    def create(**kwargs: Any) -> ChatCompletion:
        extra["prompt_token_ids"] = prompt_ids
        cextra["token_ids"] = token_ids
        choice.logprobs = logprobs
        return resp

    return create


def percentiles(samples_ns: list[int]) -> dict[str, float]:
    s = sorted(samples_ns)
    return {"p50_us": s[len(s) // 2] / 1000, "p99_us": s[int(len(s) * 0.99)] / 1000,
            "mean_us": statistics.fmean(s) / 1000}


def measure(fn: Any, n: int) -> list[int]:
    out = []
    clock = time.perf_counter_ns
    for _ in range(n):
        t0 = clock()
        fn()
        out.append(clock() - t0)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="fewer events: under a minute")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    n_lat, n_tp = (5_000, 10_000) if args.quick else (20_000, 50_000)

    conn = ConnectionSettings()
    topics = Topics(prefix=f"bench.producer.{uuid.uuid4().hex[:8]}.", partitions=conn.partitions)
    create_topics(topics, conn)
    register_schemas(registry_client(conn), topics)
    client = Client(conn, SdkSettings(queue_max=2 * n_tp, flush_on_finish=False, flush_timeout=300), topics=topics)
    resp = canned_response()
    create = _sync_create(fake_engine(resp), "CHAT_COMPLETIONS", None)
    messages = [{"role": "system", "content": "You are a careful agent. " * 8},
                {"role": "user", "content": "Solve the task step by step. " * 8}]

    def call() -> None:
        create(model="policy", messages=messages, max_tokens=TOKENS, temperature=1.0)

    results: dict[str, Any] = {"quick": args.quick, "events_latency": n_lat, "events_throughput": n_tp}
    with client.rollout(policy="policy") as r:
        measure(call, 500)  # warm-up: schema registry lookups, code paths
        client.flush()
        results["call"] = percentiles(measure(call, n_lat))
        client.flush()
        results["reward"] = percentiles(measure(lambda: r.reward(1.0, call_id="c"), n_lat))
        client.flush()

        # The bytes of one call event exactly as published, for the raw baseline.
        from rollstream.producers.capture import CallAssembler, CallContext

        ctx = CallContext(r.rollout_id, 1, None, 0, "CHAT_COMPLETIONS", {"model": "policy", "messages": messages},
                          "policy", 0)
        assembler = CallAssembler(ctx)
        assembler.add_response(resp.model_dump())
        codec = EventCodec(registry_client(conn), topics)
        value = codec.encode(topics.calls, assembler.events()[0])
        key = r.rollout_id.encode()
        results["event_bytes"] = len(value)

        raw = Producer(producer_config(conn, **{"queue.buffering.max.messages": 2 * n_tp}))
        results["raw_produce"] = percentiles(measure(lambda: raw.produce(topics.calls, value=value, key=key), n_lat))
        raw.flush(60)
        if raw.poll(0) is None:
            pass

        started = time.perf_counter()
        for _ in range(n_tp):
            call()
        enqueued = time.perf_counter() - started
        client.flush()
        sdk_s = time.perf_counter() - started
        started = time.perf_counter()
        for _ in range(n_tp):
            raw.produce(topics.calls, value=value, key=key)
            raw.poll(0)
        raw.flush(120)
        raw_s = time.perf_counter() - started
    client.close()
    results["sdk_events_per_s"] = n_tp / sdk_s
    results["sdk_enqueue_per_s"] = n_tp / enqueued
    results["raw_events_per_s"] = n_tp / raw_s
    results["throughput_ratio"] = results["sdk_events_per_s"] / results["raw_events_per_s"]
    results["call_cost_ratio_p50"] = results["call"]["p50_us"] / results["raw_produce"]["p50_us"]
    results["target_call_p50_us"] = 20.0
    results["meets_target"] = results["call"]["p50_us"] < 20.0
    print_table(results)
    print(json.dumps(results, separators=(",", ":")))
    return 0


def print_table(r: dict[str, Any]) -> None:
    print(f"one event on the agent's thread ({r['events_latency']} each; call event {r['event_bytes']} bytes):")
    print(f"  {'what':16} {'p50 us':>8} {'p99 us':>8} {'mean us':>8}")
    for name, label in (("call", "call (SDK)"), ("reward", "reward (SDK)"), ("raw_produce", "raw produce()")):
        m = r[name]
        print(f"  {label:16} {m['p50_us']:8.2f} {m['p99_us']:8.2f} {m['mean_us']:8.2f}")
    print(f"  call / raw produce() at p50: {r['call_cost_ratio_p50']:.1f}x   "
          f"target: call p50 < 20 us -> {'met' if r['meets_target'] else 'NOT met'}")
    print(f"sustained, {r['events_throughput']} call events from one thread until acknowledged:")
    print(f"  SDK            {r['sdk_events_per_s']:10.0f} events/s  (enqueue alone {r['sdk_enqueue_per_s']:.0f}/s)")
    print(f"  raw produce()  {r['raw_events_per_s']:10.0f} events/s")
    print(f"  ratio SDK/raw  {r['throughput_ratio']:10.3f}")


if __name__ == "__main__":
    sys.exit(main())
