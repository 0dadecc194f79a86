"""A long rollout of large calls: its state is stored in pieces, and after a kill -9 it still completes whole."""

from __future__ import annotations

import os
import struct
from array import array
from collections.abc import Callable
from typing import Any

import pytest
from sp_helpers import Pipe, call, lifecycle, reward

from rollstream.schemas.codec import EventCodec
from rollstream.schemas.rawavro import AvroArray
from rollstream.schemas.topics import Topics
from rollstream.stream_processors.join import pack_tokens, unpack_tokens

pytestmark = [pytest.mark.integration, pytest.mark.slow]

CALLS = int(os.environ.get("ROLLSTREAM_TEST_LONG_CALLS", "100"))
PROMPT_TOKENS = 200_000


def test_token_pieces_round_trip() -> None:
    prompt, response = list(range(0, 300_000, 3)), [5, 49_000]

    def ints(values: list[int]) -> AvroArray:
        return AvroArray.from_list(values, "int")

    got = unpack_tokens(pack_tokens(ints(prompt), ints(response), AvroArray.from_list([-0.5, -1.25], "float")))
    assert got == (prompt, response, [-0.5, -1.25]) and [a.data for a in got[:2]] == [ints(prompt).data,
                                                                                      ints(response).data]
    assert unpack_tokens(pack_tokens(ints([1]), ints([]), None)) == ([1], [], None)
    assert len(pack_tokens(ints(prompt), ints([1]), None)) < 4 * len(prompt) + 32


def test_pieces_stored_before_the_avro_form_still_load() -> None:
    """Changelogs keep pieces of the fixed-width form (b"I", or b"q" for ids past 32 bits)."""
    narrow = struct.pack("<cIIi", b"I", 2, 1, 1) + array("I", [3, 4, 5]).tobytes() + array("d", [-0.5]).tobytes()
    assert unpack_tokens(narrow) == ([3, 4], [5], [-0.5])
    wide = struct.pack("<cIIi", b"q", 1, 1, -1) + array("q", [7, 2**33]).tobytes()
    prompt, response, logprobs = unpack_tokens(wide)
    assert (prompt, logprobs) == ([7], None) and response.tolist() == [2**33]


def big_prompt(seq: int) -> list[int]:
    return [(seq * 7 + i) % 49_000 for i in range(PROMPT_TOKENS)]


def test_a_hundred_large_calls_survive_a_kill_before_the_finish(
    pipe: Pipe, topics: Topics, codec: EventCodec, worker_factory: Callable[..., Any]
) -> None:
    rid = "ro-long"
    worker = worker_factory()
    for seq in range(CALLS):
        record = call(rid, seq)
        record["prompt_token_ids"] = big_prompt(seq)  # ~590 KB of Avro each
        pipe.call(record)
    pipe.reward(reward(rid, 1.0))
    pipe.flush()
    worker.wait_stats(lambda s: s["events"] >= CALLS + 1, timeout=240)
    worker.kill()  # before the finish event: the rollout is open, its calls only in the changelog
    worker = worker_factory()
    pipe.rollout(lifecycle(rid, "SUCCEEDED"))
    pipe.flush()
    transitions = pipe.transitions(CALLS, timeout=300, settle=2.0)
    assert len(transitions) == CALLS
    by_seq = {t["sequence"]: t for t in transitions}
    assert sorted(by_seq) == list(range(CALLS))
    for seq in (0, CALLS // 2, CALLS - 1):
        assert by_seq[seq]["prompt_token_ids"] == big_prompt(seq)
        assert by_seq[seq]["response_token_ids"] == [7, seq] and by_seq[seq]["behaviour_logprobs"] == [-0.5, -0.25]
    assert all(len(t["prompt_token_ids"]) == PROMPT_TOKENS for t in transitions)
    stats = worker.wait_stats(lambda s: s["completed"] == 1)
    assert stats["dead_letters"] == 0 and stats["open_rollouts"] == 0
