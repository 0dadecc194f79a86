"""Turning raw input records into joinable events, or into dead letters that say why not.

Every check that can reject an input lives here: size, wire format, schema id, Avro
body, rollout id and key, finite reward, token ids. A rejected input becomes a
DeadLetter event (with its original topic, partition, offset, key and raw value); the
processor sends it to the dead-letter topic and keeps going.

A call without token ids is tokenized here from its text when the processor has a tokenizer
(``PROCESS_TOKENIZER``, see retokenize.py): the decoded record then carries the ids, no
logprobs, and ``token_source`` = ``tokenizer`` (a key of the decoded record only, which the
join copies into the call's entry), so the rest of the processor handles it like any call.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass
from typing import Any

from confluent_kafka.schema_registry import SchemaRegistryError

from rollstream.errors import BadInputError, SerializationError
from rollstream.schemas import make_event
from rollstream.schemas.codec import EventCodec, parse_header
from rollstream.schemas.rawavro import AvroArray
from rollstream.schemas.topics import Topics
from rollstream.stream_processors.join import Kind
from rollstream.stream_processors.retokenize import CallTokenizer


@dataclass(frozen=True)
class Decoded:
    kind: Kind
    rollout_id: str
    record: dict[str, Any]


class InputDecoder:
    """Validates and decodes the records of the calls, rewards and rollouts topics."""

    def __init__(
        self, codec: EventCodec, topics: Topics, max_message_bytes: int, require_token_ids: bool,
        tokenizer: CallTokenizer | None = None,
    ) -> None:
        self.codec = codec
        self.kinds: dict[str, Kind] = {topics.calls: "call", topics.rewards: "reward", topics.rollouts: "rollout"}
        self.max_message_bytes = max_message_bytes
        self.require_token_ids = require_token_ids
        self.tokenizer = tokenizer
        self._known_ids: set[int] = set()

    def _check_schema_id(self, schema_id: int) -> None:
        if schema_id in self._known_ids:
            return
        try:
            self.codec.client.get_schema(schema_id)
        except SchemaRegistryError as exc:
            if exc.http_status_code == 404:
                raise BadInputError("unknown_schema", f"schema id {schema_id} is not in the registry") from exc
            raise  # the registry is down or refusing: not the input's fault
        self._known_ids.add(schema_id)

    def decode(self, topic: str, key: bytes | None, value: bytes | None) -> Decoded:
        kind = self.kinds[topic]
        if value is None:
            raise BadInputError("undecodable", "record has no value (a tombstone on an event topic)")
        if len(value) > self.max_message_bytes:
            raise BadInputError(
                "oversize", f"value of {len(value)} bytes exceeds the {self.max_message_bytes}-byte limit"
            )
        try:
            schema_id = parse_header(value)
        except SerializationError as exc:
            raise BadInputError("undecodable", str(exc)) from exc
        self._check_schema_id(schema_id)
        try:
            # A call's token arrays stay as their Avro bytes (rawavro.py): the processor copies them
            # into the transition unchanged.
            record = self.codec.decode(topic, value, raw_arrays=kind == "call")
        except SerializationError as exc:
            raise BadInputError("undecodable", str(exc)) from exc
        rollout_id = record.get("rollout_id")
        if not rollout_id:
            raise BadInputError("missing_rollout_id", "event has an empty rollout_id")
        try:
            key_text = key.decode("utf-8") if key is not None else None
        except UnicodeDecodeError:
            key_text = None
        if key_text != rollout_id:
            raise BadInputError(
                "missing_rollout_id", f"Kafka key {key!r} does not match rollout_id {rollout_id!r} (key must be it)"
            )
        if kind == "reward" and not math.isfinite(record["value"]):
            raise BadInputError("invalid_value", f"reward value {record['value']!r} is not finite")
        if kind == "call":
            self._check_call(record)
        return Decoded(kind, rollout_id, record)

    def _check_call(self, record: dict[str, Any]) -> None:
        prompt, response = record.get("prompt_token_ids"), record.get("response_token_ids")
        if self.tokenizer is not None and (not prompt or not response):
            ids = self.tokenizer.token_ids(record)
            record["prompt_token_ids"], record["response_token_ids"] = (AvroArray.from_list(x, "int") for x in ids)
            record["response_logprobs"] = None  # they belong to the engine's tokens, not to these
            record["token_source"] = "tokenizer"
            return
        if self.require_token_ids and (prompt is None or response is None):
            raise BadInputError(
                "invalid_value",
                f"call {record['call_id']!r} has no token ids; the engine must return them, or set "
                "ROLLSTREAM_PROCESS_TOKENIZER to the policy's tokenizer (a folder or s3:// URI) to tokenize the "
                "call's text (or ROLLSTREAM_PROCESS_REQUIRE_TOKEN_IDS=0 to let it through without ids)",
            )
        logprobs = record.get("response_logprobs")
        # -inf is a valid logprob (a token the policy ruled out); NaN and +inf are not.
        if logprobs is not None and not (logprobs.numbers() < math.inf).all():
            raise BadInputError("invalid_value", f"call {record['call_id']!r} has NaN logprobs")


def dead_letter(
    source: str, topic: str, partition: int, offset: int, key: bytes | None, value: bytes | None, exc: BadInputError
) -> dict[str, Any]:
    # Deterministic id: a replay of the same input yields the same dead letter id.
    event_id = hashlib.sha1(f"{topic}\x1f{partition}\x1f{offset}".encode()).hexdigest()[:32]
    return make_event(
        "DeadLetter", event_id=event_id, source=source, topic=topic, partition=partition, offset=offset, key=key,
        value=value, reason=exc.reason, error_type=exc.error_type,
    )
