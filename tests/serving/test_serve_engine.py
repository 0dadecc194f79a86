"""The batched decode loop: sampling, stops, per-row limits, logprobs, and merging batches."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from rollstream.serving.engine import Engine, SamplingParams, Sequence

PROMPTS = ["hello world what is", "the agent", "a b c d e f g h i j k l", "Weather in paris?"]


@pytest.fixture(scope="module")
def engine(tiny_model_dir: Path) -> Engine:
    torch.set_num_threads(1)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    return Engine(model, AutoTokenizer.from_pretrained(tiny_model_dir))


@pytest.fixture
def no_stop_tokens(engine: Engine) -> object:
    """Rows end only by length or stop string (a random model may emit its end token anywhere)."""
    saved = engine.stop_ids
    engine.stop_ids = set()
    yield
    engine.stop_ids = saved


def prompts(engine: Engine) -> list[list[int]]:
    return [engine.tokenizer.encode(p) for p in PROMPTS]


def ids(seqs: list[Sequence]) -> list[list[int]]:
    return [s.token_ids for s in seqs]


def test_greedy_is_deterministic_and_independent_of_the_batch(engine: Engine) -> None:
    params = [SamplingParams(max_tokens=12, temperature=0.0)] * len(PROMPTS)
    batched = engine.generate(prompts(engine), params)
    assert ids(batched) == ids(engine.generate(prompts(engine), params))
    for prompt, seq in zip(prompts(engine), batched, strict=True):
        assert engine.generate([prompt], params[:1])[0].token_ids == seq.token_ids


def test_same_seed_same_output_other_seed_other_output(engine: Engine) -> None:
    p = prompts(engine)[:1]
    first = engine.generate(p, [SamplingParams(max_tokens=24, temperature=1.0, seed=7)])[0]
    again = engine.generate(p, [SamplingParams(max_tokens=24, temperature=1.0, seed=7)])[0]
    other = engine.generate(p, [SamplingParams(max_tokens=24, temperature=1.0, seed=8)])[0]
    assert first.token_ids == again.token_ids and first.text == again.text
    assert first.token_ids != other.token_ids
    # The seed fixes a row's output whatever else shares its batch.
    crowd = engine.generate(prompts(engine), [SamplingParams(max_tokens=24, temperature=1.0, seed=7 + i)
                                              for i in range(len(PROMPTS))])
    assert crowd[0].token_ids == first.token_ids


def test_tiny_top_p_is_greedy(engine: Engine) -> None:
    p = prompts(engine)
    greedy = engine.generate(p, [SamplingParams(max_tokens=10, temperature=0.0)] * len(p))
    nucleus = engine.generate(p, [SamplingParams(max_tokens=10, temperature=1.5, top_p=1e-6, seed=i)
                                  for i in range(len(p))])
    assert ids(greedy) == ids(nucleus)


@pytest.mark.usefixtures("no_stop_tokens")
def test_rows_finish_at_their_own_max_tokens(engine: Engine) -> None:
    limits = [3, 11, 1, 7]
    seqs = engine.generate(prompts(engine), [SamplingParams(max_tokens=n, temperature=1.0, seed=n) for n in limits])
    assert [len(s.output) for s in seqs] == limits
    assert all(s.finish_reason == "length" for s in seqs)


@pytest.mark.usefixtures("no_stop_tokens")
def test_stop_string_truncates_the_text(engine: Engine) -> None:
    p = prompts(engine)[:1]
    full = engine.generate(p, [SamplingParams(max_tokens=40, temperature=0.0)])[0]
    clean = [i for i, ch in enumerate(full.text) if ch.isalpha()]
    assert len(clean) > 6, full.text
    start = clean[len(clean) // 2]
    stop = full.text[start:start + 2]
    expected = full.text[:full.text.find(stop)]
    cut = engine.generate(p, [SamplingParams(max_tokens=40, temperature=0.0, stop=("never-there", stop))])[0]
    assert cut.text == expected
    assert cut.finish_reason == "stop"
    assert cut.token_ids == full.token_ids[:len(cut.token_ids)]  # every sampled token is kept
    assert len(cut.token_ids) < len(full.token_ids)


def test_stop_token_ends_the_row_and_is_kept(engine: Engine) -> None:
    p = prompts(engine)[:1]
    first = engine.generate(p, [SamplingParams(max_tokens=5, temperature=0.0)])[0].token_ids[0]
    saved = engine.stop_ids
    engine.stop_ids = {first}
    try:
        seq = engine.generate(p, [SamplingParams(max_tokens=5, temperature=0.0)])[0]
    finally:
        engine.stop_ids = saved
    assert (seq.token_ids, seq.finish_reason) == ([first], "stop")


def full_forward_logprobs(engine: Engine, prompt: list[int], output: list[int]) -> list[float]:
    with torch.no_grad():
        logits = engine.model(torch.tensor([prompt + output])).logits[0].float()
    logprobs = torch.log_softmax(logits, dim=-1)
    return [logprobs[len(prompt) - 1 + j, tok].item() for j, tok in enumerate(output)]


def test_logprobs_match_a_full_forward_pass(engine: Engine) -> None:
    """Padded, cached, sampled decoding reports exactly the model's log-softmax at the chosen tokens."""
    p = prompts(engine)
    seqs = engine.generate(p, [SamplingParams(max_tokens=6 + 3 * i, temperature=0.9, seed=i, top_logprobs=3)
                               for i in range(len(p))])
    for prompt, seq in zip(p, seqs, strict=True):
        reference = full_forward_logprobs(engine, prompt, seq.token_ids)
        assert [t.logprob for t in seq.output] == pytest.approx(reference, abs=1e-4)
        for t in seq.output:
            assert len(t.top) == 3
            assert [lp for _, lp in t.top] == sorted((lp for _, lp in t.top), reverse=True)
            assert t.top[0][1] >= t.logprob - 1e-6


def test_rows_joining_a_running_batch_decode_as_if_alone(engine: Engine) -> None:
    p = prompts(engine)
    params = [SamplingParams(max_tokens=10, temperature=0.0)] * len(p)
    alone = [engine.generate([prompt], params[:1])[0] for prompt in p]
    first = [engine.new_sequence(prompt, params[0], i) for i, prompt in enumerate(p[:2])]
    batch = engine.prefill(first)
    for _ in range(3):
        engine.step(batch)
    late = [engine.new_sequence(prompt, params[0], i) for i, prompt in enumerate(p[2:])]
    merged = engine.merge(batch, engine.prefill(late))
    current = engine.drop_finished(merged)
    while current is not None:
        engine.step(current)
        current = engine.drop_finished(current)
    for seq, ref in zip(first + late, alone, strict=True):
        assert seq.token_ids == ref.token_ids
        assert [t.logprob for t in seq.output] == pytest.approx([t.logprob for t in ref.output], abs=1e-4)


def test_deltas_add_up_to_the_text(engine: Engine) -> None:
    deltas = []
    seq = engine.new_sequence(prompts(engine)[0], SamplingParams(max_tokens=30, temperature=1.0, seed=3),
                              sink=deltas.append)
    batch = engine.prefill([seq])
    current = engine.drop_finished(batch)
    while current is not None:
        engine.step(current)
        current = engine.drop_finished(current)
    assert "".join(d.text for d in deltas) == seq.text
    assert [t.token_id for d in deltas for t in d.tokens] == seq.token_ids
    assert [d.finish_reason for d in deltas][-1] == seq.finish_reason
    assert all(d.finish_reason is None for d in deltas[:-1])
