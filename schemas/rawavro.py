"""Numeric Avro arrays kept as their encoded bytes, from an input record to the record written from it.

A model call carries some 700 token ids and 200 logprobs. Decoding them into Python numbers
and encoding them again into the transition costs most of the processor's time, and the
processor never looks at a single one: it checks them for NaN, counts them and copies them.
So the calls' reader leaves each numeric array as an :class:`AvroArray` (its encoded bytes
and its length), and the transitions' writer copies those bytes into its output unchanged.

:class:`SplitSchema` does both around fastavro: the fields before the arrays and those after
them are read and written by fastavro with two partial schemas, the consecutive array fields
in between by hand. The Avro binary encoding of a record is the concatenation of its fields'
encodings, so the bytes equal what fastavro writes for the whole record (a test holds them to
it). It is used only where the writer's schema is the reader's own (same canonical form):
another writer schema goes through fastavro's schema resolution, and its lists are converted.
"""

from __future__ import annotations

import io
from collections.abc import Iterable, Sequence
from typing import Any

import fastavro
import numpy as np

NUMERIC = ("int", "long", "float", "double")
_FIXED = {"float": 4, "double": 8}
_DTYPE = {"float": "<f4", "double": "<f8"}


class AvroArray:
    """A numeric Avro array as its binary encoding (blocks and the closing zero) and its item count."""

    __slots__ = ("count", "data", "kind")

    def __init__(self, data: bytes, count: int, kind: str) -> None:
        self.data = data
        self.count = count
        self.kind = kind

    @classmethod
    def from_list(cls, values: Iterable[float], kind: str) -> AvroArray:
        values = list(values)
        buf = io.BytesIO()
        fastavro.schemaless_writer(buf, _array_schema(kind), values)
        return cls(buf.getvalue(), len(values), kind)

    def __len__(self) -> int:
        return self.count

    def tolist(self) -> list[Any]:
        values = fastavro.schemaless_reader(io.BytesIO(self.data), _array_schema(self.kind), None)
        assert isinstance(values, list)
        return values

    def numbers(self) -> np.ndarray:
        """The items of a float or double array as a numpy array (no Python number per item)."""
        dtype, width = _DTYPE[self.kind], _FIXED[self.kind]
        data, pos, parts = self.data, 0, []
        while True:
            n, pos = read_long(data, pos)
            if n == 0:
                break
            if n < 0:
                n = -n
                _, pos = read_long(data, pos)
            parts.append(np.frombuffer(data, dtype, count=n, offset=pos))
            pos += n * width
        return np.concatenate(parts) if parts else np.empty(0, dtype)

    def __eq__(self, other: object) -> bool:
        if isinstance(other, AvroArray):
            return self.kind == other.kind and self.tolist() == other.tolist()
        if isinstance(other, Sequence):
            return self.tolist() == list(other)
        return NotImplemented

    __hash__ = None  # type: ignore[assignment]

    def __repr__(self) -> str:
        return f"AvroArray({self.kind}, {self.count} items, {len(self.data)} bytes)"


_ARRAY_SCHEMAS = {kind: fastavro.parse_schema({"type": "array", "items": kind}) for kind in NUMERIC}


def _array_schema(kind: str) -> Any:
    return _ARRAY_SCHEMAS[kind]


def read_long(data: bytes, pos: int) -> tuple[int, int]:
    """The zig-zag varint at ``pos`` and the position after it (IndexError past the end)."""
    b = data[pos]
    pos += 1
    n, shift = b & 0x7F, 7
    while b & 0x80:
        b = data[pos]
        pos += 1
        n |= (b & 0x7F) << shift
        shift += 7
    return (n >> 1) ^ -(n & 1), pos


def read_array(data: bytes, pos: int, kind: str) -> tuple[AvroArray, int]:
    """The numeric array encoded at ``pos``, and the position after it; EOFError when it runs past the end."""
    start, count, end = pos, 0, len(data)
    while True:
        n, pos = read_long(data, pos)
        if n == 0:
            break
        if n < 0:  # a block with its byte size: skip it whole
            n = -n
            size, pos = read_long(data, pos)
            pos += size
        elif kind in _FIXED:
            pos += n * _FIXED[kind]
        else:  # n varints: the n-th byte below 0x80 from here closes the last one
            window = np.frombuffer(data, np.uint8, count=min(end - pos, n * 10), offset=pos)
            ends = np.flatnonzero(window < 0x80)
            if len(ends) < n:
                raise EOFError(f"an array of {n} {kind}s runs past the end of the record")
            pos += int(ends[n - 1]) + 1
        if pos > end:
            raise EOFError(f"an array of {kind}s runs past the end of the record")
        count += n
    return AvroArray(data[start:pos], count, kind), pos


def _array_kind(avro_type: Any) -> tuple[str, bool] | None:
    """(item kind, nullable) of a numeric array type or a ["null", array] union; None for anything else."""
    nullable = False
    if isinstance(avro_type, list):
        if len(avro_type) != 2 or avro_type[0] != "null":
            return None
        avro_type, nullable = avro_type[1], True
    if isinstance(avro_type, dict) and avro_type.get("type") == "array" and avro_type.get("items") in NUMERIC:
        return avro_type["items"], nullable
    return None


class SplitSchema:
    """A record schema read and written as: fields before, numeric array fields as bytes, fields after.

    ``arrays`` names consecutive fields, each a numeric array or a ``["null", array]`` union.
    """

    def __init__(self, schema: dict[str, Any], arrays: Sequence[str]) -> None:
        fields = schema["fields"]
        names = [f["name"] for f in fields]
        first = names.index(arrays[0])
        if names[first:first + len(arrays)] != list(arrays):
            raise ValueError(f"fields {list(arrays)} are not consecutive in {schema['name']}")
        self.arrays: list[tuple[str, str, bool]] = []
        for f in fields[first:first + len(arrays)]:
            kind = _array_kind(f["type"])
            if kind is None:
                raise ValueError(f"field {f['name']} of {schema['name']} is not a numeric array")
            self.arrays.append((f["name"], *kind))
        namespace = schema.get("namespace")
        self.head = fastavro.parse_schema(
            {"type": "record", "name": schema["name"] + "Head", "namespace": namespace, "fields": fields[:first]})
        self.tail = fastavro.parse_schema(
            {"type": "record", "name": schema["name"] + "Tail", "namespace": namespace,
             "fields": fields[first + len(arrays):]})

    def read(self, data: bytes, offset: int = 0) -> dict[str, Any]:
        """The record encoded in ``data[offset:]``, its arrays as AvroArray (or None)."""
        buf = io.BytesIO(data)
        buf.seek(offset)
        record = fastavro.schemaless_reader(buf, self.head, None)
        assert isinstance(record, dict)
        pos = buf.tell()
        for name, kind, nullable in self.arrays:
            if nullable:
                branch, pos = read_long(data, pos)
                if branch == 0:
                    record[name] = None
                    continue
                if branch != 1:
                    raise IndexError(f"union index {branch} of field {name} is out of range")
            record[name], pos = read_array(data, pos, kind)
        buf.seek(pos)
        tail = fastavro.schemaless_reader(buf, self.tail, None)
        assert isinstance(tail, dict)
        record.update(tail)
        return record

    def write(self, out: io.BytesIO, record: dict[str, Any]) -> None:
        """``record`` encoded; its arrays may be AvroArray (copied as they are), lists or None."""
        fastavro.schemaless_writer(out, self.head, record)
        for name, kind, nullable in self.arrays:
            value = record[name]
            if value is None:
                if not nullable:
                    raise ValueError(f"field {name} may not be null")
                out.write(b"\x00")
                continue
            if not isinstance(value, AvroArray) or value.kind != kind:
                value = AvroArray.from_list(value.tolist() if isinstance(value, AvroArray) else value, kind)
            if nullable:
                out.write(b"\x02")
            out.write(value.data)
        fastavro.schemaless_writer(out, self.tail, record)


def as_arrays(record: dict[str, Any], split: SplitSchema) -> dict[str, Any]:
    """``record`` (decoded by fastavro) with its split array fields as AvroArray."""
    for name, kind, _ in split.arrays:
        value = record.get(name)
        if value is not None and not isinstance(value, AvroArray):
            record[name] = AvroArray.from_list(value, kind)
    return record
