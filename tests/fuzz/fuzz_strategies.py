"""Hypothesis strategies shared by the fuzz tests: arbitrary JSON, OpenAI-shaped bodies, byte mutations."""

from __future__ import annotations

import json
from typing import Any

from hypothesis import strategies as st

# Numbers at the edges: 32/64-bit limits, beyond them, non-finite floats, negative zero.
EDGE_INTS = st.sampled_from([0, 1, -1, 2**31 - 1, 2**31, -(2**31) - 1, 2**63 - 1, 2**63, 2**64 - 1, 2**64, -(2**63) - 1,
                             10**30, -(10**30)])
INTS = st.integers() | EDGE_INTS
FLOATS = st.floats(allow_nan=True, allow_infinity=True) | st.sampled_from([1e308, -1e308, 1e39, -0.0, 5e-324])
TEXT = st.text(max_size=12) | st.sampled_from(["\ud800", "\x00", "a/b", "", " ", "é" * 3, "../", "%00"])
SCALARS = st.none() | st.booleans() | INTS | FLOATS | TEXT

JSON: st.SearchStrategy[Any] = st.recursive(
    SCALARS,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(TEXT, inner, max_size=4),
    max_leaves=12,
)


def dumps(value: Any) -> bytes:
    """JSON as many clients write it (NaN/Infinity literals allowed, lone surrogates escaped)."""
    return json.dumps(value, allow_nan=True).encode()


def shaped(fields: dict[str, st.SearchStrategy[Any]]) -> st.SearchStrategy[dict[str, Any]]:
    """Objects with any subset of ``fields`` (plausible values or any JSON), plus a stray key now and then."""
    values = {k: v | JSON for k, v in fields.items()}
    return st.fixed_dictionaries({}, optional=values) | st.dictionaries(TEXT, JSON, max_size=3)


MESSAGE = st.fixed_dictionaries(
    {"role": st.sampled_from(["system", "user", "assistant", "tool"]) | JSON},
    optional={"content": TEXT | st.lists(st.fixed_dictionaries({"type": st.just("text"), "text": TEXT}), max_size=2)
              | JSON, "name": TEXT, "tool_call_id": TEXT, "tool_calls": JSON},
)
SAMPLING: dict[str, st.SearchStrategy[Any]] = {
    "model": TEXT, "n": st.integers(-1, 3) | INTS, "stream": st.booleans(), "seed": INTS,
    "stream_options": st.fixed_dictionaries({}, optional={"include_usage": st.booleans()}),
    "max_tokens": st.integers(-1, 4) | INTS, "temperature": FLOATS, "top_p": FLOATS, "stop": TEXT | st.lists(TEXT),
    "return_token_ids": st.booleans(), "tools": JSON,
}
CHAT_BODY = shaped({**SAMPLING, "messages": st.lists(MESSAGE, max_size=3), "logprobs": st.booleans(),
                    "top_logprobs": st.integers(-1, 25), "max_completion_tokens": st.integers(-1, 4)})
COMPLETION_BODY = shaped({**SAMPLING, "prompt": TEXT | st.lists(st.integers(-5, 600), max_size=6) | st.lists(TEXT),
                          "logprobs": st.integers(-1, 25), "echo": st.booleans()})
ROLLOUT_BODY = shaped({"rollout_id": TEXT, "attempt": INTS, "task_id": TEXT, "group_id": TEXT, "policy": TEXT,
                       "metadata": st.dictionaries(TEXT, SCALARS, max_size=3)})
FINISH_BODY = shaped({"status": st.sampled_from(["succeeded", "FAILED", "CANCELLED", "DONE"]), "error": TEXT,
                      "attempt": INTS, "policy": TEXT, "task_id": TEXT, "group_id": TEXT,
                      "metadata": st.dictionaries(TEXT, SCALARS, max_size=3)})
REWARD_BODY = shaped({"value": FLOATS | INTS, "call_id": TEXT, "name": TEXT, "terminal": st.booleans(),
                      "attempt": INTS, "source": TEXT, "metadata": st.dictionaries(TEXT, SCALARS, max_size=3)})

# What an OpenAI-compatible backend might answer (whole response or one stream chunk), right or wrong.
BACKEND_CHOICE = st.fixed_dictionaries({}, optional={
    "index": JSON | st.integers(0, 3), "finish_reason": JSON | st.just("stop"), "text": JSON,
    "message": JSON | st.fixed_dictionaries({}, optional={"content": JSON, "tool_calls": JSON}),
    "delta": JSON | st.fixed_dictionaries({}, optional={"content": JSON, "tool_calls": st.lists(JSON, max_size=2)}),
    "token_ids": JSON | st.lists(JSON, max_size=3), "prompt_token_ids": JSON,
    "logprobs": JSON | st.fixed_dictionaries({}, optional={
        "content": st.lists(JSON | st.fixed_dictionaries({"logprob": JSON}), max_size=3),
        "token_logprobs": st.lists(JSON, max_size=3)}),
})
BACKEND_BODY = st.fixed_dictionaries({}, optional={
    "choices": JSON | st.lists(BACKEND_CHOICE, max_size=3), "prompt_token_ids": JSON | st.lists(JSON, max_size=3),
    "usage": JSON | st.fixed_dictionaries({}, optional={"prompt_tokens": JSON, "completion_tokens": JSON}),
    "model": JSON, "policy_version": JSON,
})


@st.composite
def mutated(draw: st.DrawFn, seed: bytes) -> bytes:
    """``seed`` with a few bytes flipped, inserted, deleted, or cut short."""
    data = bytearray(seed)
    for _ in range(draw(st.integers(1, 4))):
        op = draw(st.sampled_from(["flip", "insert", "delete", "truncate", "set"]))
        pos = draw(st.integers(0, max(len(data) - 1, 0)))
        if op == "flip" and data:
            data[pos] ^= 1 << draw(st.integers(0, 7))
        elif op == "set" and data:
            data[pos] = draw(st.sampled_from([0x00, 0x7F, 0x80, 0xFF, 0x01]))
        elif op == "insert":
            data[pos:pos] = draw(st.binary(min_size=1, max_size=8))
        elif op == "delete" and data:
            del data[pos:pos + draw(st.integers(1, 8))]
        elif op == "truncate":
            del data[pos:]
    return bytes(data)


def bodies(structured: st.SearchStrategy[dict[str, Any]], valid: bytes) -> st.SearchStrategy[bytes]:
    """Request bodies: structured JSON, any JSON, arbitrary bytes, and mutations of a valid body."""
    return st.one_of(structured.map(dumps), structured.map(dumps), JSON.map(dumps), st.binary(max_size=64),
                     mutated(valid))
