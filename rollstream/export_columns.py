"""The columns of ``rollstream export``'s Parquet files: Arrow types derived from the Avro schemas, plus lineage.

Every event field keeps its name and gets the Arrow type of its Avro type (``int`` → int32, ``float`` →
float32, ``timestamp-micros`` → timestamp[us, UTC], arrays → lists, maps → map<string, string>, records →
structs, enums → strings), so token ids are ``list<int32>`` and logprobs ``list<float32>`` exactly as
the events carry them. The lineage columns (:data:`LINEAGE`) follow, except where the event already has
a field of that name (a Transition's own ``policy_version`` and ``transition_id``).
"""

from __future__ import annotations

from functools import cache
from typing import Any, Literal

import pyarrow as pa

from rollstream.schemas import EventType, schema_dict

Kind = Literal["transitions", "calls", "rewards", "rollouts"]
EVENT_OF: dict[Kind, EventType] = {
    "transitions": "Transition", "calls": "LlmCall", "rewards": "Reward", "rollouts": "RolloutEvent",
}

PRIMITIVES: dict[str, pa.DataType] = {
    "string": pa.string(), "bytes": pa.binary(), "int": pa.int32(), "long": pa.int64(),
    "float": pa.float32(), "double": pa.float64(), "boolean": pa.bool_(),
}
LOGICAL: dict[str, pa.DataType] = {
    "timestamp-micros": pa.timestamp("us", tz="UTC"), "timestamp-millis": pa.timestamp("ms", tz="UTC"),
}

# Where each row came from and what produced it; null where the events do not say.
LINEAGE: tuple[tuple[str, pa.DataType], ...] = (
    ("policy", pa.string()),
    ("policy_version", pa.int64()),
    ("engine", pa.string()),
    ("reward_name", pa.string()),
    ("reward_source", pa.string()),
    ("reward_delay_s", pa.float64()),
    ("transition_id", pa.string()),
    ("kafka_topic", pa.string()),
    ("kafka_partition", pa.int32()),
    ("kafka_offset", pa.int64()),
    ("kafka_timestamp", pa.timestamp("ms", tz="UTC")),
)
LINEAGE_NAMES = tuple(name for name, _ in LINEAGE)


def arrow_type(avro: Any, named: dict[str, pa.DataType] | None = None) -> pa.DataType:
    """The Arrow type of an Avro type (a union with null is the nullable other branch)."""
    named = {} if named is None else named
    if isinstance(avro, list):
        branches = [b for b in avro if b != "null"]
        if len(branches) != 1:
            raise ValueError(f"union {avro} has more than one non-null branch; no single Arrow type fits")
        return arrow_type(branches[0], named)
    if isinstance(avro, str):
        if avro in PRIMITIVES:
            return PRIMITIVES[avro]
        return named[avro.rsplit(".", 1)[-1]]
    logical = avro.get("logicalType")
    if logical in LOGICAL:
        return LOGICAL[logical]
    kind = avro["type"]
    if kind == "record":
        out = pa.struct([pa.field(f["name"], arrow_type(f["type"], named)) for f in avro["fields"]])
    elif kind == "enum":
        out = pa.string()
    elif kind == "array":
        return pa.list_(arrow_type(avro["items"], named))
    elif kind == "map":
        return pa.map_(pa.string(), arrow_type(avro["values"], named))
    elif kind == "fixed":
        out = pa.binary(int(avro["size"]))
    else:
        return arrow_type(kind, named)
    named[avro["name"]] = out
    return out


@cache
def arrow_schema(kind: Kind) -> pa.Schema:
    """The event's fields, then the lineage columns it lacks."""
    named: dict[str, pa.DataType] = {}
    fields = [pa.field(f["name"], arrow_type(f["type"], named)) for f in schema_dict(EVENT_OF[kind])["fields"]]
    have = {f.name for f in fields}
    fields += [pa.field(name, typ) for name, typ in LINEAGE if name not in have]
    return pa.schema(fields, metadata={"rollstream.kind": kind, "rollstream.event": EVENT_OF[kind]})


def table(kind: Kind, rows: list[dict[str, Any]]) -> pa.Table:
    return pa.Table.from_pylist(rows, schema=arrow_schema(kind))
