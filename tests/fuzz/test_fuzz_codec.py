"""Random and mutated bytes against every event deserializer: SerializationError or a record, nothing else."""

from __future__ import annotations

from typing import Any

import pytest
from conftest import mock_codec
from fuzz_strategies import mutated
from hypothesis import given
from hypothesis import strategies as st

from rollstream.errors import SerializationError
from rollstream.schemas import EVENT_TYPES, EventType
from rollstream.schemas.codec import HEADER, decode_body, parse_header
from rollstream.schemas.samples import VECTOR_DIR
from rollstream.schemas.topics import Topics

pytestmark = pytest.mark.fuzz

TOPICS = Topics(prefix="fuzz.")
CODEC, SCHEMA_IDS = mock_codec(TOPICS)
TOPIC_OF: dict[EventType, str] = {s.event_type: s.name for s in TOPICS.specs() if s.event_type is not None}
BODIES = {e: (VECTOR_DIR / f"{e}.bin").read_bytes() for e in EVENT_TYPES}
ALL_TOPICS = [s.name for s in TOPICS.specs()]


def framed(schema_id: int, body: bytes) -> bytes:
    return HEADER.pack(0, schema_id) + body


@st.composite
def messages(draw: st.DrawFn) -> tuple[str, bytes]:
    """A topic and bytes for it: random, mutated valid messages, or valid bodies under the wrong schema id."""
    event_type = draw(st.sampled_from(EVENT_TYPES))
    topic = draw(st.sampled_from(ALL_TOPICS) | st.just(TOPIC_OF[event_type]))
    good = framed(SCHEMA_IDS[TOPIC_OF[event_type]], BODIES[event_type])
    data = draw(st.one_of(
        st.binary(max_size=64),
        st.binary(max_size=32).map(lambda b: b"\x00" + b),
        mutated(good),
        st.builds(framed, st.sampled_from(sorted(SCHEMA_IDS.values())) | st.integers(0, 2**32 - 1),
                  st.sampled_from(list(BODIES.values())) | st.binary(max_size=32)),
    ))
    return topic, data


@given(st.binary(max_size=16))
def test_parse_header(data: bytes) -> None:
    try:
        schema_id = parse_header(data)
    except SerializationError:
        return
    assert data[0] == 0 and 0 <= schema_id < 2**32


@given(messages())
def test_codec_decode_every_topic(message: tuple[str, bytes]) -> None:
    topic, data = message
    try:
        record = CODEC.decode(topic, data)
    except SerializationError:
        return
    assert isinstance(record, dict)


@pytest.mark.parametrize("event_type", EVENT_TYPES)
@given(data=st.data())
def test_decode_body_every_event_type(event_type: EventType, data: Any) -> None:
    body = data.draw(st.one_of(mutated(BODIES[event_type]), st.binary(max_size=64),
                               st.sampled_from(list(BODIES.values()))))
    try:
        record = decode_body(event_type, body)
    except SerializationError:
        return
    assert isinstance(record, dict)


def test_the_valid_vectors_still_decode() -> None:
    for event_type in EVENT_TYPES:
        topic = TOPIC_OF[event_type]
        assert CODEC.decode(topic, framed(SCHEMA_IDS[topic], BODIES[event_type]))["event_id"]
        assert decode_body(event_type, BODIES[event_type])["event_id"]
