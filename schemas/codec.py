"""Encoding events in the Confluent wire format through a schema registry.

Wire format: magic byte 0, a 4-byte big-endian schema id, then the Avro binary body.
Schemas are registered under the topic-name strategy (``<topic>-value``) with BACKWARD
compatibility, so readers on an older schema keep decoding what newer writers send.
"""

from __future__ import annotations

import io
import json
import struct
from functools import cache
from typing import Any

import fastavro
from confluent_kafka.schema_registry import Schema, SchemaRegistryClient, SchemaRegistryError
from confluent_kafka.serialization import MessageField, SerializationContext, StringDeserializer, StringSerializer
from fastavro.read import SchemaResolutionError
from fastavro.schema import to_parsing_canonical_form

from rollstream.errors import SchemaError, SerializationError
from rollstream.schemas import EventType, int_fields, parsed_schema, schema_dict, schema_text
from rollstream.schemas.rawavro import AvroArray, SplitSchema, as_arrays
from rollstream.schemas.topics import Topics
from rollstream.settings import ConnectionSettings

COMPATIBILITY = "BACKWARD"
MAGIC_BYTE = 0
HEADER = struct.Struct(">bI")
# What fastavro raises on bytes that are not a record of the reader's schema: truncated input,
# invalid UTF-8, out-of-range enum or union indexes, a writer schema the reader cannot resolve.
# Errors reaching the registry (a connection refused) are not among them: they are not the data's fault.
BAD_BODY_ERRORS = (ValueError, EOFError, IndexError, TypeError, KeyError, OverflowError,
                   SchemaResolutionError)


# The token arrays of the events that carry them: read and written as bytes where the processor
# only copies them from a call to its transition (rawavro.py).
TOKEN_ARRAYS: dict[EventType, tuple[str, ...]] = {
    "LlmCall": ("prompt_token_ids", "response_token_ids", "response_logprobs"),
    "Transition": ("prompt_token_ids", "response_token_ids", "behaviour_logprobs"),
}


@cache
def split_schema(event_type: EventType) -> SplitSchema:
    return SplitSchema(schema_dict(event_type), TOKEN_ARRAYS[event_type])


REGISTRY_TIMEOUT_S = 10  # seconds a schema registry request may take


def registry_client(settings: ConnectionSettings | None = None) -> SchemaRegistryClient:
    settings = settings or ConnectionSettings()
    # The client's default is no timeout: one request that a restarting registry accepted and never answered
    # would block its caller for good. Timed out, it is retried (max.retries) on a new connection.
    return SchemaRegistryClient({"url": settings.schema_registry_url, "timeout": REGISTRY_TIMEOUT_S})


def subject(topic: str) -> str:
    return f"{topic}-value"


def register_schemas(client: SchemaRegistryClient, topics: Topics) -> dict[str, int]:
    """Register every topic's schema with BACKWARD compatibility; subject -> schema id."""
    ids = {}
    for spec in topics.specs():
        if spec.event_type is None:
            continue
        ids[subject(spec.name)] = register(client, spec.name, schema_text(spec.event_type))
    return ids


def register(client: SchemaRegistryClient, topic: str, schema_str: str) -> int:
    """Register ``schema_str`` for ``topic``'s values; an incompatible change raises SchemaError."""
    name = subject(topic)
    try:
        client.set_compatibility(subject_name=name, level=COMPATIBILITY)
        return int(client.register_schema(name, Schema(schema_str, "AVRO")))
    except SchemaRegistryError as exc:
        raise SchemaError(
            f"schema registry refused the schema for subject '{name}' (HTTP {exc.http_status_code}, "
            f"code {exc.error_code}): {exc.error_message}. Schemas may only evolve by adding fields "
            f"with defaults (BACKWARD compatibility)."
        ) from exc


def parse_header(data: bytes) -> int:
    """The schema id of a Confluent-framed message, or SerializationError."""
    if len(data) < HEADER.size:
        raise SerializationError(f"message of {len(data)} bytes is too short for the Confluent wire format")
    magic, schema_id = HEADER.unpack_from(data)
    if magic != MAGIC_BYTE:
        raise SerializationError(f"unknown magic byte {magic} (expected {MAGIC_BYTE}); not a Confluent Avro message")
    return int(schema_id)


class EventCodec:
    """Encoders and decoders for the events of one deployment's topics.

    fastavro does the Avro work directly: the writer schema of each schema id is fetched from the
    registry once and kept, and the wire-format header is read and written here (confluent's
    serializer classes cost several times more per record, most of it outside Avro)."""

    def __init__(self, client: SchemaRegistryClient, topics: Topics) -> None:
        self.client = client
        self.topics = topics
        self._ids: dict[str, bytes] = {}  # topic -> the wire-format header of its registered schema
        self._writers: dict[tuple[int, str], tuple[Any, Any]] = {}  # (schema id, topic) -> (writer, reader|None)
        self._types: dict[str, EventType] = {}  # topic -> the event type its records hold
        self._key_ser = StringSerializer("utf_8")
        self._key_de = StringDeserializer("utf_8")

    @classmethod
    def from_settings(cls, settings: ConnectionSettings | None = None) -> EventCodec:
        settings = settings or ConnectionSettings()
        return cls(registry_client(settings), Topics.from_settings(settings))

    def _event_type(self, topic: str) -> EventType:
        event_type = self._types.get(topic)
        if event_type is not None:
            return event_type
        event_type = self.topics.spec(topic).event_type
        if event_type is not None:
            self._types[topic] = event_type
        if event_type is None:
            raise SerializationError(f"topic '{topic}' carries raw copies of other topics' records, not one event type")
        return event_type

    def encode(self, topic: str, record: dict[str, Any]) -> bytes:
        event_type = self._event_type(topic)
        header = self._ids.get(topic)
        if header is None:
            try:
                schema_id = self.client.register_schema(subject(topic), Schema(schema_text(event_type), "AVRO"))
            except SchemaRegistryError as exc:
                raise SerializationError(f"cannot register the {event_type} schema for '{topic}': {exc}") from exc
            header = self._ids[topic] = HEADER.pack(MAGIC_BYTE, schema_id)
        check_int_fields(event_type, record)
        buf = io.BytesIO()
        buf.write(header)
        arrays = TOKEN_ARRAYS.get(event_type, ())
        try:
            if any(isinstance(record.get(name), AvroArray) for name in arrays):
                split_schema(event_type).write(buf, record)
            else:
                fastavro.schemaless_writer(buf, parsed_schema(event_type), record)
        except (ValueError, TypeError, KeyError, AttributeError, OverflowError) as exc:
            raise SerializationError(f"cannot encode a {event_type} for '{topic}': {exc}") from exc
        return buf.getvalue()

    def _schemas(self, schema_id: int, topic: str) -> tuple[Any, Any]:
        """The writer schema of ``schema_id`` and the reader schema to resolve it to (None: the same)."""
        got = self._writers.get((schema_id, topic))
        if got is None:
            reader = parsed_schema(self._event_type(topic))
            try:
                writer = fastavro.parse_schema(json.loads(self.client.get_schema(schema_id).schema_str or ""))
            except SchemaRegistryError as exc:
                if exc.http_status_code != 404:  # the registry's trouble, not the record's: let the caller retry
                    raise
                raise SerializationError(f"cannot decode a record of '{topic}': schema id {schema_id} is unknown "
                                         f"to the registry ({exc.error_message})") from exc
            except (ValueError, TypeError, KeyError, fastavro.schema.SchemaParseException) as exc:
                raise SerializationError(f"cannot decode a record of '{topic}': schema id {schema_id} is not "
                                         f"a usable Avro schema ({_short(exc)})") from exc
            same = to_parsing_canonical_form(writer) == to_parsing_canonical_form(reader)
            got = self._writers[(schema_id, topic)] = (writer, None if same else reader)
        return got

    def decode(self, topic: str, data: bytes, raw_arrays: bool = False) -> dict[str, Any]:
        """Decode with the writer's schema (from the registry) into this reader's schema.

        ``raw_arrays``: the token arrays of the events that have them (TOKEN_ARRAYS) come back as
        :class:`AvroArray`, their encoded bytes, not as lists (read as bytes when the writer's schema
        is the reader's own, converted otherwise)."""
        schema_id = parse_header(data)
        writer, reader = self._schemas(schema_id, topic)
        event_type = self._event_type(topic)
        split = raw_arrays and event_type in TOKEN_ARRAYS
        try:
            if split and reader is None:
                record = split_schema(event_type).read(data, HEADER.size)
            else:
                record = fastavro.schemaless_reader(io.BytesIO(data[HEADER.size:]), writer, reader)
                if split and isinstance(record, dict):
                    as_arrays(record, split_schema(event_type))
        except BAD_BODY_ERRORS as exc:
            raise SerializationError(f"cannot decode a record of '{topic}': {_short(exc)}") from exc
        if not isinstance(record, dict):
            raise SerializationError(f"record of '{topic}' decoded to {type(record).__name__}, not a record")
        return record

    def encode_key(self, topic: str, key: str) -> bytes:
        data = self._key_ser(key, SerializationContext(topic, MessageField.KEY))
        assert data is not None
        return data

    def decode_key(self, topic: str, data: bytes | None) -> str | None:
        return None if data is None else self._key_de(data, SerializationContext(topic, MessageField.KEY))


def encode_body(event_type: EventType, record: dict[str, Any]) -> bytes:
    """The bare Avro binary body of ``record`` (no wire-format header): the test vectors' form."""
    check_int_fields(event_type, record)
    buf = io.BytesIO()
    try:
        fastavro.schemaless_writer(buf, parsed_schema(event_type), record)
    except (ValueError, TypeError, KeyError, AttributeError, OverflowError) as exc:
        raise SerializationError(f"cannot encode a {event_type}: {exc}") from exc
    return buf.getvalue()


INT_MIN, INT_MAX = -(2**31), 2**31 - 1


def check_int_fields(event_type: EventType, record: dict[str, Any]) -> None:
    """SerializationError when a plain ``int`` field holds a value outside 32 bits.

    fastavro range-checks ints inside unions but writes a plain ``int`` field of any size as a
    longer varint, which Java and librdkafka-based readers then refuse to decode.
    """
    for path in int_fields(event_type):
        value: Any = record
        for name in path:
            value = value.get(name) if isinstance(value, dict) else None
        if isinstance(value, int) and not INT_MIN <= value <= INT_MAX:
            raise SerializationError(
                f"cannot encode a {event_type}: field {'.'.join(path)}={value} does not fit Avro's 32-bit int")


def decode_body(event_type: EventType, body: bytes) -> dict[str, Any]:
    """The record in a bare Avro body of ``event_type``; SerializationError when the bytes are not one."""
    try:
        record = fastavro.schemaless_reader(io.BytesIO(body), parsed_schema(event_type), None)
    except BAD_BODY_ERRORS as exc:
        raise SerializationError(f"cannot decode a {event_type} body of {len(body)} bytes: {_short(exc)}") from exc
    if not isinstance(record, dict):
        raise SerializationError(f"a {event_type} body decoded to {type(record).__name__}, not a record")
    return record


def _short(exc: BaseException) -> str:
    # fastavro's schema-mismatch message embeds both whole schemas; the first line says enough.
    text = str(exc)
    return text if len(text) <= 300 else text[:300] + "..."
