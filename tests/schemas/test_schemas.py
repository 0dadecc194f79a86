"""The .avsc files follow the project's schema rules, and the test vectors still hold."""

from __future__ import annotations

import pytest

from rollstream.errors import SchemaError, SerializationError
from rollstream.schemas import EVENT_TYPES, SCHEMA_FILES, field_names, make_event, schema_dict
from rollstream.schemas.codec import decode_body, encode_body, parse_header
from rollstream.schemas.samples import SAMPLES, VECTOR_DIR, from_json, to_json


def _fields(schema: dict) -> list[dict]:
    """Every field of the record and of records nested in it."""
    out = []
    for field in schema["fields"]:
        out.append(field)
        t = field["type"]
        for candidate in ([t] if not isinstance(t, list) else t):
            if isinstance(candidate, dict):
                if candidate.get("type") == "record":
                    out += _fields(candidate)
                elif candidate.get("type") == "array" and isinstance(candidate["items"], dict):
                    if candidate["items"].get("type") == "record":
                        out += _fields(candidate["items"])
    return out


@pytest.mark.parametrize("event_type", EVENT_TYPES)
def test_every_record_and_field_is_documented(event_type: str) -> None:
    schema = schema_dict(event_type)
    assert schema["namespace"] == "dev.rollstream.events"
    assert schema["doc"].strip()
    undocumented = [f["name"] for f in _fields(schema) if not f.get("doc", "").strip()]
    assert not undocumented, f"{SCHEMA_FILES[event_type]}: fields without doc: {undocumented}"


@pytest.mark.parametrize("event_type", EVENT_TYPES)
def test_optional_fields_are_null_first_with_null_default(event_type: str) -> None:
    for field in _fields(schema_dict(event_type)):
        t = field["type"]
        if isinstance(t, list):
            assert t[0] == "null" and len(t) == 2, f"{field['name']}: optional is ['null', T]"
            assert "default" in field and field["default"] is None, f"{field['name']}: default null"


@pytest.mark.parametrize("event_type", EVENT_TYPES)
def test_identity_and_timestamp_conventions(event_type: str) -> None:
    names = field_names(event_type)
    assert "event_id" in names and "source" in names
    assert "timestamp" in names or "end_time" in names
    for field in _fields(schema_dict(event_type)):
        t = field["type"]
        if field["name"] in ("timestamp", "start_time", "end_time"):
            assert t == {"type": "long", "logicalType": "timestamp-micros"}, field["name"]


def test_keyed_events_carry_rollout_id() -> None:
    for event_type in ("RolloutEvent", "LlmCall", "Reward", "Transition"):
        assert "rollout_id" in field_names(event_type)


def test_make_event_fills_defaults_and_generates_ids() -> None:
    a = make_event("Reward", source="t", rollout_id="r", value=1.0)
    b = make_event("Reward", source="t", rollout_id="r", value=1.0)
    assert a["event_id"] != b["event_id"]
    assert a["name"] == "primary" and a["terminal"] is False and a["attempt"] is None
    a["metadata"]["x"] = "1"
    assert b["metadata"] == {}, "mutable defaults must not be shared between events"


def test_make_event_refuses_unknown_and_missing_fields() -> None:
    with pytest.raises(SchemaError, match="no field.*bogus"):
        make_event("Reward", source="t", rollout_id="r", value=1.0, bogus=1)
    with pytest.raises(SchemaError, match="needs field.*value"):
        make_event("Reward", source="t", rollout_id="r")


def test_transition_event_id_is_its_transition_id() -> None:
    rec = dict(SAMPLES["Transition"])
    del rec["event_id"]
    assert make_event("Transition", **rec)["event_id"] == rec["transition_id"]


@pytest.mark.parametrize("event_type", EVENT_TYPES)
def test_vectors_match_schema_bytes(event_type: str) -> None:
    """The committed JSON record encodes to exactly the committed binary body, and back."""
    record = from_json(event_type, (VECTOR_DIR / f"{event_type}.json").read_text())
    body = (VECTOR_DIR / f"{event_type}.bin").read_bytes()
    assert encode_body(event_type, record) == body, "regenerate with: python -m rollstream.schemas.samples"
    decoded = decode_body(event_type, body)
    assert to_json(event_type, decoded) == to_json(event_type, record)


def test_encoding_rejects_wrong_types() -> None:
    record = dict(SAMPLES["Reward"], value="not a number")
    with pytest.raises(SerializationError, match="Reward"):
        encode_body("Reward", record)


@pytest.mark.parametrize(
    ("data", "message"),
    [(b"\x00\x01", "too short"), (b"\x01\x00\x00\x00\x01abc", "magic byte 1")],
)
def test_wire_header_errors_name_the_problem(data: bytes, message: str) -> None:
    with pytest.raises(SerializationError, match=message):
        parse_header(data)


def test_wire_header_schema_id() -> None:
    assert parse_header(b"\x00\x00\x00\x01\x02rest") == 258
