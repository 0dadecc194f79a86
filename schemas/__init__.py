"""The event schemas: the ``.avsc`` files beside this module are the only declaration.

Everything else (serializers, vectors, the trainer's readers) takes field names and
defaults from here, so an event's shape changes in exactly one place.
"""

from __future__ import annotations

import json
import time
import uuid
from functools import cache
from pathlib import Path
from typing import Any, Literal

import fastavro

from rollstream.errors import SchemaError

SCHEMA_DIR = Path(__file__).resolve().parent

EventType = Literal["RolloutEvent", "LlmCall", "Reward", "Transition", "PolicyUpdate", "DeadLetter"]

SCHEMA_FILES: dict[EventType, str] = {
    "RolloutEvent": "rollout_event.avsc",
    "LlmCall": "llm_call.avsc",
    "Reward": "reward.avsc",
    "Transition": "transition.avsc",
    "PolicyUpdate": "policy_update.avsc",
    "DeadLetter": "dead_letter.avsc",
}
EVENT_TYPES: tuple[EventType, ...] = tuple(SCHEMA_FILES)
NAMESPACE = "dev.rollstream.events"


@cache
def schema_text(event_type: EventType) -> str:
    """The schema exactly as written in its ``.avsc`` file."""
    try:
        return (SCHEMA_DIR / SCHEMA_FILES[event_type]).read_text()
    except KeyError as exc:
        raise SchemaError(f"unknown event type {event_type!r}; known: {', '.join(EVENT_TYPES)}") from exc


def schema_dict(event_type: EventType) -> dict[str, Any]:
    schema: dict[str, Any] = json.loads(schema_text(event_type))
    return schema


@cache
def parsed_schema(event_type: EventType) -> Any:
    """The schema parsed by fastavro (for schemaless encoding and validation)."""
    try:
        return fastavro.parse_schema(schema_dict(event_type))
    except Exception as exc:  # fastavro raises several types for bad schemas
        raise SchemaError(f"{SCHEMA_FILES[event_type]}: {exc}") from exc


@cache
def _fields(event_type: EventType) -> tuple[dict[str, Any], ...]:
    # make_event runs once per event on hot paths: parse the schema once, not per event.
    return tuple(schema_dict(event_type)["fields"])


@cache
def int_fields(event_type: EventType) -> tuple[tuple[str, ...], ...]:
    """Paths of the fields typed plain ``int`` (not in a union), through nested records."""
    out: list[tuple[str, ...]] = []

    def walk(fields: list[dict[str, Any]], prefix: tuple[str, ...]) -> None:
        for f in fields:
            t = f["type"]
            if t == "int" or (isinstance(t, dict) and t.get("type") == "int"):
                out.append((*prefix, f["name"]))
            elif isinstance(t, dict) and t.get("type") == "record":
                walk(t["fields"], (*prefix, f["name"]))

    walk(schema_dict(event_type)["fields"], ())
    return tuple(out)


def field_names(event_type: EventType) -> list[str]:
    return [f["name"] for f in schema_dict(event_type)["fields"]]


def new_event_id() -> str:
    return uuid.uuid4().hex


def now_micros() -> int:
    """Current UTC time in the one timestamp form used by every event."""
    return time.time_ns() // 1000


def make_event(event_type: EventType, **values: Any) -> dict[str, Any]:
    """A complete record of ``event_type``: schema defaults filled in, unknown fields refused.

    ``event_id`` and ``timestamp`` are generated when the schema has them and they are
    not given.
    """
    record: dict[str, Any] = {}
    missing = []
    known = set()
    for field in _fields(event_type):
        name = field["name"]
        known.add(name)
        if name in values:
            record[name] = values[name]
        elif name == "event_id":
            record[name] = values.get("transition_id") or new_event_id()
        elif name == "timestamp":
            record[name] = now_micros()
        elif "default" in field:
            default = field["default"]
            record[name] = list(default) if isinstance(default, list) else (
                dict(default) if isinstance(default, dict) else default
            )
        else:
            missing.append(name)
    unknown = sorted(set(values) - known)
    if unknown:
        raise SchemaError(f"{event_type} has no field(s) {', '.join(unknown)}")
    if missing:
        raise SchemaError(f"{event_type} needs field(s) {', '.join(missing)}")
    return record
