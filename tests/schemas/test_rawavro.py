"""Token arrays read and written as Avro bytes: the same records, the same bytes as fastavro's."""

from __future__ import annotations

import io
import random
from typing import Any

import fastavro
import pytest

from rollstream.schemas import make_event, parsed_schema, schema_dict
from rollstream.schemas.codec import BAD_BODY_ERRORS, TOKEN_ARRAYS, encode_body, split_schema
from rollstream.schemas.rawavro import AvroArray, SplitSchema, read_array
from rollstream.schemas.samples import SAMPLES


def call(rng: random.Random, n_prompt: int, n_response: int, logprobs: bool = True) -> dict[str, Any]:
    response = [rng.randrange(-(2**31), 2**31) for _ in range(n_response)]
    return dict(
        SAMPLES["LlmCall"], prompt_token_ids=[rng.randrange(60000) for _ in range(n_prompt)],
        response_token_ids=response,
        response_logprobs=[-rng.random() * 20 for _ in response] + ([float("-inf")] if response else [])
        if logprobs else None,
        response_text="é" * rng.randrange(50),
    )


def full_read(event_type: str, body: bytes) -> dict[str, Any]:
    record: dict[str, Any] = fastavro.schemaless_reader(io.BytesIO(body), parsed_schema(event_type), None)
    return record


@pytest.mark.parametrize("shape", [(500, 200, True), (0, 0, True), (3, 1, False), (1, 0, True)])
def test_split_read_gives_fastavros_record_with_arrays_as_bytes(shape: tuple[int, int, bool]) -> None:
    rng = random.Random(str(shape))
    record = call(rng, *shape)
    if shape == (1, 0, True):
        record["prompt_token_ids"] = None
    body = encode_body("LlmCall", record)
    got = split_schema("LlmCall").read(body)
    expected = full_read("LlmCall", body)
    assert list(got) == list(expected)
    for name, value in expected.items():
        if name in TOKEN_ARRAYS["LlmCall"] and value is not None:
            assert isinstance(got[name], AvroArray) and len(got[name]) == len(value)
            assert got[name].tolist() == value
        else:
            assert got[name] == value, name
    out = io.BytesIO()
    split_schema("LlmCall").write(out, got)
    assert out.getvalue() == body  # the arrays' bytes copied back give the same record


def test_transition_written_from_a_calls_bytes_equals_fastavros_encoding() -> None:
    rng = random.Random(7)
    body = encode_body("LlmCall", call(rng, 500, 200))
    raw, lists = split_schema("LlmCall").read(body), full_read("LlmCall", body)
    fields = dict(SAMPLES["Transition"])
    for lp in ("response_logprobs", None):
        spliced = dict(fields, prompt_token_ids=raw["prompt_token_ids"], response_token_ids=raw["response_token_ids"],
                       behaviour_logprobs=raw[lp] if lp else None)
        plain = dict(fields, prompt_token_ids=lists["prompt_token_ids"],
                     response_token_ids=lists["response_token_ids"], behaviour_logprobs=lists[lp] if lp else None)
        out = io.BytesIO()
        split_schema("Transition").write(out, spliced)
        assert out.getvalue() == encode_body("Transition", plain)


def test_blocks_with_byte_sizes_and_several_blocks_are_read() -> None:
    """Java's writers may split an array into blocks, and give a block's byte size (a negative count)."""
    schema = {"type": "record", "name": "R", "fields": [
        {"name": "a", "type": "string"}, {"name": "ids", "type": {"type": "array", "items": "long"}},
        {"name": "lp", "type": ["null", {"type": "array", "items": "double"}]}, {"name": "z", "type": "int"}]}
    split = SplitSchema(schema, ["ids", "lp"])

    def varint(n: int) -> bytes:
        n = (n << 1) ^ (n >> 63)
        out = bytearray()
        while n > 0x7F:
            out.append((n & 0x7F) | 0x80)
            n >>= 7
        return bytes(out + bytes([n]))

    ids = [3, -2**40, 127, 128]
    items = b"".join(varint(i) for i in ids[2:])
    blocks = varint(2) + varint(ids[0]) + varint(ids[1]) + varint(-2) + varint(len(items)) + items + b"\x00"
    lps = [-0.5, 1e-300]
    lp_block = b"\x02" + varint(2) + fastavro_bytes({"type": "array", "items": "double"}, lps)[1:]
    body = varint(1) + b"x" + blocks + lp_block + varint(-9)
    got = split.read(body)
    assert got["a"] == "x" and got["z"] == -9
    assert got["ids"].tolist() == ids and len(got["ids"]) == 4
    assert got["lp"].numbers().tolist() == lps and got["lp"].tolist() == lps


def fastavro_bytes(schema: dict[str, Any], value: Any) -> bytes:
    out = io.BytesIO()
    fastavro.schemaless_writer(out, fastavro.parse_schema(schema), value)
    return out.getvalue()


def test_truncated_bodies_raise_a_decoding_error() -> None:
    body = encode_body("LlmCall", call(random.Random(3), 50, 20))
    for cut in range(len(body)):
        with pytest.raises(BAD_BODY_ERRORS):
            split_schema("LlmCall").read(body[:cut])
    with pytest.raises(EOFError):
        read_array(b"\x06\x02\x04", 0, "int")  # three ints announced, two there


def test_a_schema_whose_arrays_are_not_consecutive_is_refused() -> None:
    with pytest.raises(ValueError, match="consecutive"):
        SplitSchema(schema_dict("LlmCall"), ["prompt_token_ids", "response_logprobs"])
    with pytest.raises(ValueError, match="numeric array"):
        SplitSchema(schema_dict("LlmCall"), ["response_text"])


def test_an_array_of_another_kind_is_converted_when_written() -> None:
    ints = AvroArray.from_list([1, 2, 3], "long")
    record = make_event("Transition", **dict(SAMPLES["Transition"], prompt_token_ids=ints))
    out = io.BytesIO()
    split_schema("Transition").write(out, record)
    assert out.getvalue() == encode_body("Transition", dict(record, prompt_token_ids=[1, 2, 3]))
