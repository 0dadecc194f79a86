"""The scheduler in-process: concurrent requests share batches; swaps happen between batches."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from rollstream.serving.engine import Delta, Engine, SamplingParams
from rollstream.serving.scheduler import Admitted, Event, Failed, Scheduler
from rollstream.serving.tiny import build_tiny_model


def make_engine(path: Path, version: int = 0) -> Engine:
    torch.set_num_threads(1)
    return Engine(AutoModelForCausalLM.from_pretrained(path), AutoTokenizer.from_pretrained(path), version)


async def collect(scheduler: Scheduler, prompt: list[int], params: list[SamplingParams]) -> tuple[int, list[list[int]]]:
    version = -1
    ids: list[list[int]] = [[] for _ in params]
    async for event in scheduler.submit(prompt, params):
        if isinstance(event, Admitted):
            version = event.version
        elif isinstance(event, Delta):
            ids[event.index] += [t.token_id for t in event.tokens]
        else:
            raise AssertionError(event)
    return version, ids


def test_concurrent_requests_share_batches_and_match_solo_decoding(tiny_model_dir: Path) -> None:
    engine = make_engine(tiny_model_dir)
    prompts = [engine.tokenizer.encode(f"request {i} about the weather") for i in range(8)]
    params = [SamplingParams(max_tokens=5 + i, temperature=0.0) for i in range(8)]
    solo = [engine.generate([p], [sp])[0].token_ids for p, sp in zip(prompts, params, strict=True)]
    scheduler = Scheduler(engine, window_ms=20, max_batch=6)
    scheduler.start()

    async def run() -> list[tuple[int, list[list[int]]]]:
        return await asyncio.gather(*(collect(scheduler, p, [sp]) for p, sp in zip(prompts, params, strict=True)))

    try:
        results = asyncio.run(run())
    finally:
        scheduler.stop()
    assert [ids[0] for _, ids in results] == solo
    assert 1 < scheduler.stats.max_batch_size <= 6
    assert scheduler.stats.admitted == 8


def test_swap_waits_for_the_running_batch(tiny_model_dir: Path, tmp_path: Path) -> None:
    old = make_engine(tiny_model_dir, version=0)
    old.stop_ids = set()  # the first request runs its full length, well past the swap
    new = make_engine(build_tiny_model(tmp_path / "v1", seed=1), version=1)
    prompt = old.tokenizer.encode("hello")
    scheduler = Scheduler(old, window_ms=1)
    scheduler.start()

    async def run() -> tuple[tuple[int, list[list[int]]], tuple[int, list[list[int]]]]:
        first = asyncio.create_task(collect(scheduler, prompt, [SamplingParams(max_tokens=300, temperature=0.0)]))
        await asyncio.sleep(0.05)
        scheduler.swap(new)
        assert scheduler.target_version == 1
        second = await collect(scheduler, prompt, [SamplingParams(max_tokens=4, temperature=0.0)])
        return await first, second

    try:
        (v_first, ids_first), (v_second, ids_second) = asyncio.run(run())
    finally:
        scheduler.stop()
    assert (v_first, v_second) == (0, 1)
    assert ids_first[0] == old.generate([prompt], [SamplingParams(max_tokens=300, temperature=0.0)])[0].token_ids
    assert ids_second[0] == new.generate([prompt], [SamplingParams(max_tokens=4, temperature=0.0)])[0].token_ids


def test_a_failing_batch_fails_its_requests_not_the_scheduler(tiny_model_dir: Path,
                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    engine = make_engine(tiny_model_dir)
    prompt = engine.tokenizer.encode("hello")
    scheduler = Scheduler(engine, window_ms=1)
    scheduler.start()
    real_prefill = engine.prefill

    def broken(*args: object) -> object:
        raise RuntimeError("out of memory")

    async def events() -> list[Event]:
        return [e async for e in scheduler.submit(prompt, [SamplingParams(max_tokens=3)])]

    try:
        monkeypatch.setattr(engine, "prefill", broken)
        failed = asyncio.run(events())
        monkeypatch.setattr(engine, "prefill", real_prefill)
        recovered = asyncio.run(events())
    finally:
        scheduler.stop()
    assert isinstance(failed[-1], Failed) and "out of memory" in failed[-1].message
    assert isinstance(recovered[-1], Delta) and recovered[-1].finish_reason is not None
