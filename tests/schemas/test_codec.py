"""Every event type through a real Kafka broker and a real schema registry."""

from __future__ import annotations

import json
import uuid

import pytest
from confluent_kafka.schema_registry import SchemaRegistryClient

from rollstream.errors import SchemaError, SerializationError
from rollstream.events import EventProducer, read_events
from rollstream.schemas import EVENT_TYPES, make_event, schema_dict
from rollstream.schemas.codec import COMPATIBILITY, EventCodec, register, registry_client, subject
from rollstream.schemas.samples import SAMPLES
from rollstream.schemas.topics import Topics
from rollstream.settings import ConnectionSettings

pytestmark = pytest.mark.integration


def _comparable(record: dict) -> dict:
    """Timestamps come back as datetimes; compare them as epoch microseconds."""
    out = {}
    for k, v in record.items():
        if hasattr(v, "timestamp"):
            v = round(v.timestamp() * 1_000_000)
        out[k] = v
    return out


def test_every_event_type_round_trips(codec: EventCodec, topics: Topics, settings: ConnectionSettings) -> None:
    producer = EventProducer(codec, settings)
    sent = {}
    for spec in topics.specs():
        if spec.event_type is None:
            continue
        record = dict(SAMPLES[spec.event_type], event_id=uuid.uuid4().hex)
        key = record.get("rollout_id") or record.get("policy") or "dl"
        producer.publish(spec.name, key, record)
        sent[spec.name] = (key, record)
    producer.flush()
    assert sorted({topics.spec(name).event_type for name in sent}) == sorted(EVENT_TYPES)  # LlmCall on two topics
    got = {r.topic: r for r in read_events(codec, list(sent), f"g-{uuid.uuid4().hex}", len(sent), settings=settings)}
    for topic, (key, record) in sent.items():
        assert got[topic].key == key
        assert _comparable(got[topic].value) == _comparable(record), topic


def test_subjects_registered_backward(codec: EventCodec, topics: Topics) -> None:
    for spec in topics.specs():
        if spec.event_type is None:
            continue
        name = subject(spec.name)
        assert name in codec.client.get_subjects()
        assert str(codec.client.get_compatibility(name)).upper().endswith(COMPATIBILITY)


def _evolved(extra_field: dict) -> str:
    schema = schema_dict("Reward")
    schema["fields"].append(extra_field)
    return json.dumps(schema)


def test_compatible_change_is_accepted_and_old_readers_still_decode(
    settings: ConnectionSettings, topics: Topics
) -> None:
    client = registry_client(settings)
    new_schema = _evolved({"name": "judge", "type": ["null", "string"], "default": None, "doc": "Who judged."})
    new_id = register(client, topics.rewards, new_schema)
    assert int(client.get_latest_version(subject(topics.rewards)).schema_id) > 0

    from confluent_kafka.schema_registry.avro import AvroSerializer
    from confluent_kafka.serialization import MessageField, SerializationContext

    new_writer = AvroSerializer(client, new_schema, conf={"auto.register.schemas": False, "use.latest.version": False})
    record = dict(make_event("Reward", source="judge-svc", rollout_id="r-1", value=0.5, terminal=True), judge="gpt")
    data = new_writer(record, SerializationContext(topics.rewards, MessageField.VALUE))
    assert data is not None and int.from_bytes(data[1:5], "big") == new_id

    # A reader built on the committed schema (no 'judge') decodes the newer writer's bytes.
    old_reader = EventCodec(SchemaRegistryClient({"url": settings.schema_registry_url}), topics)
    decoded = old_reader.decode(topics.rewards, data)
    assert decoded["value"] == 0.5 and decoded["terminal"] is True
    assert "judge" not in decoded


@pytest.mark.parametrize(
    "bad_field",
    [
        {"name": "judge", "type": "string", "doc": "Required, no default."},
    ],
)
def test_incompatible_change_is_rejected_with_a_clear_error(
    settings: ConnectionSettings, topics: Topics, bad_field: dict
) -> None:
    client = registry_client(settings)
    with pytest.raises(SchemaError) as info:
        register(client, topics.rewards, _evolved(bad_field))
    message = str(info.value)
    assert "HTTP 409" in message and subject(topics.rewards) in message
    assert "BACKWARD" in message


def test_changed_field_type_is_rejected(settings: ConnectionSettings, topics: Topics) -> None:
    schema = schema_dict("Reward")
    for field in schema["fields"]:
        if field["name"] == "value":
            field["type"] = "string"
    with pytest.raises(SchemaError, match="HTTP 409"):
        register(registry_client(settings), topics.rewards, json.dumps(schema))


def test_unknown_schema_id_is_a_serialization_error(codec: EventCodec, topics: Topics) -> None:
    with pytest.raises(SerializationError, match=topics.calls):
        codec.decode(topics.calls, b"\x00\x7f\xff\xff\xf0" + b"\x02")


def test_encoding_a_bad_record_names_the_event(codec: EventCodec, topics: Topics) -> None:
    with pytest.raises(SerializationError, match="Reward"):
        codec.encode(topics.rewards, {"rollout_id": "r"})


def _endpoint_schema(symbols: list[str], default: bool) -> str:
    """The committed LlmCall schema with the Endpoint enum's symbols (and its enum-level default) replaced."""
    schema = schema_dict("LlmCall")
    for field in schema["fields"]:
        if field["name"] == "endpoint":
            field["type"]["symbols"] = symbols
            if not default:
                field["type"].pop("default", None)
    return json.dumps(schema)


def test_endpoint_symbols_added_to_a_registered_schema_are_accepted_and_read(
    settings: ConnectionSettings, topics: Topics
) -> None:
    """The Endpoint enum grew RESPONSES and MESSAGES (and a default): the registry takes it over the schema
    registered before, and a reader of the committed schema reads a symbol newer than it as the default."""
    from confluent_kafka.schema_registry.avro import AvroSerializer
    from confluent_kafka.serialization import MessageField, SerializationContext

    client = registry_client(settings)
    topic = f"{topics.prefix}evolve-calls"
    register(client, topic, _endpoint_schema(["CHAT_COMPLETIONS", "COMPLETIONS"], default=False))
    committed_id = register(client, topic, json.dumps(schema_dict("LlmCall")))
    future = _endpoint_schema(["CHAT_COMPLETIONS", "COMPLETIONS", "RESPONSES", "MESSAGES", "REALTIME"], default=True)
    future_id = register(client, topic, future)
    assert future_id != committed_id

    codec = EventCodec(registry_client(settings), topics)
    writer = AvroSerializer(client, future, conf={"auto.register.schemas": False, "use.latest.version": False})
    for endpoint, read_as in (("MESSAGES", "MESSAGES"), ("RESPONSES", "RESPONSES"), ("REALTIME", "CHAT_COMPLETIONS")):
        record = dict(SAMPLES["LlmCall"], endpoint=endpoint)
        data = writer(record, SerializationContext(topic, MessageField.VALUE))
        assert data is not None
        assert codec.decode(topics.calls, data)["endpoint"] == read_as
