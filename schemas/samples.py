"""Test vectors: for each event, one record in Avro's JSON encoding and its binary body.

``schemas/vectors/<Event>.json`` holds the record in the JSON encoding of the Avro
specification (unions wrapped as ``{"type": value}``, bytes as code points), which every
Avro library reads; ``<Event>.bin`` holds the exact Avro binary body (no wire-format
header). A producer in another language proves byte-compatibility by encoding the JSON
record and comparing with the ``.bin`` file. Regenerate after a schema change with
``python -m rollstream.schemas.samples``.
"""

from __future__ import annotations

import io
import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import fastavro

from rollstream.schemas import EVENT_TYPES, SCHEMA_DIR, EventType, parsed_schema
from rollstream.schemas.codec import encode_body

VECTOR_DIR = SCHEMA_DIR / "vectors"

# 2026-01-02T03:04:05.678901Z in microseconds.
T0 = 1767323045678901

SAMPLES: dict[EventType, dict[str, Any]] = {
    "RolloutEvent": {
        "event_id": "evt-rollout-0001", "source": "sdk", "rollout_id": "ro-42", "attempt": 2,
        "status": "SUCCEEDED", "timestamp": T0, "policy": "calc-agent", "task_id": "task-7",
        "group_id": "grp-7", "error": None, "metadata": {"framework": "openai-agents", "note": "ünïcode ✓"},
    },
    "LlmCall": {
        "event_id": "evt-call-0001", "source": "gateway", "rollout_id": "ro-42", "attempt": 2,
        "call_id": "call-3", "sequence": 3, "agent_name": "solver", "policy": "calc-agent",
        "policy_version": 12, "model": "calc-agent", "endpoint": "CHAT_COMPLETIONS",
        "messages": [
            {"role": "system", "content": "You are a calculator agent.", "name": None,
             "tool_call_id": None, "tool_calls_json": None},
            {"role": "user", "content": "What is 12*7?", "name": "alice", "tool_call_id": None,
             "tool_calls_json": None},
        ],
        "prompt": None, "tools_json": "[{\"type\":\"function\",\"function\":{\"name\":\"calc\"}}]",
        "sampling": {"temperature": 0.7, "top_p": 0.95, "max_tokens": 64, "stop": ["</answer>"],
                     "seed": -5, "n": 1},
        "response_text": "<answer>84</answer>", "response_tool_calls_json": None,
        "prompt_token_ids": [1, 15, 300, 65535, 70000], "response_token_ids": [9, 8, 2],
        "response_logprobs": [-0.5, -1.25, 0.0], "finish_reason": "stop", "prompt_tokens": 5,
        "completion_tokens": 3, "start_time": T0, "end_time": T0 + 250000, "latency_ms": 250.0,
        "metadata": {},
    },
    "Reward": {
        "event_id": "evt-reward-0001", "source": "evaluator", "rollout_id": "ro-42", "attempt": None,
        "call_id": "call-3", "name": "primary", "value": -0.75, "terminal": True, "timestamp": T0,
        "metadata": {"delay_s": "3600"},
    },
    "Transition": {
        "transition_id": "tr-5f1d", "event_id": "tr-5f1d", "source": "processor", "rollout_id": "ro-42",
        "attempt": 2, "call_id": "call-3", "sequence": 3, "agent_name": "solver", "task_id": "task-7",
        "group_id": "grp-7", "policy": "calc-agent", "policy_version": 12,
        "prompt_token_ids": [1, 15, 300], "response_token_ids": [9, 8, 2],
        "behaviour_logprobs": [-0.5, -1.25, 0.0], "reward": 0.0, "credited_return": 0.9025,
        "terminal_reward": 1.0, "credit_assignment": "discounted", "timestamp": T0, "metadata": {},
        "token_source": "engine",
    },
    "PolicyUpdate": {
        "event_id": "evt-policy-0001", "source": "trainer", "policy": "calc-agent", "version": 13,
        "step": 120, "weights_uri": "s3://rollstream/calc-agent/step-000120/", "kind": "ADAPTER",
        "base_model": "SmolLM2-135M-Instruct", "mlflow_model_name": "calc-agent",
        "mlflow_model_version": "13", "timestamp": T0, "metadata": {},
    },
    "DeadLetter": {
        "event_id": "evt-dead-0001", "source": "processor", "topic": "rollstream.calls", "partition": 1,
        "offset": 123456789012, "key": b"ro-42", "value": b"\x00\x00\x00\x00\x07\xff\xfe",
        "reason": "schema id 7 is not in the registry", "error_type": "unknown_schema", "timestamp": T0,
    },
}


def to_json(event_type: EventType, record: dict[str, Any]) -> str:
    """``record`` in Avro's JSON encoding."""
    buf = io.StringIO()
    fastavro.json_writer(buf, parsed_schema(event_type), [record])
    return json.dumps(json.loads(buf.getvalue()), indent=2, ensure_ascii=False) + "\n"


def from_json(event_type: EventType, text: str) -> dict[str, Any]:
    records = list(fastavro.json_reader(io.StringIO(json.dumps(json.loads(text))), parsed_schema(event_type)))
    assert len(records) == 1
    record = records[0]
    assert isinstance(record, dict)
    return record


def write_vectors(directory: Path = VECTOR_DIR) -> list[Path]:
    directory.mkdir(parents=True, exist_ok=True)
    written = []
    for event_type in EVENT_TYPES:
        record = SAMPLES[event_type]
        (directory / f"{event_type}.json").write_text(to_json(event_type, record))
        (directory / f"{event_type}.bin").write_bytes(encode_body(event_type, record))
        written += [directory / f"{event_type}.json", directory / f"{event_type}.bin"]
    return written


def main(argv: Sequence[str] | None = None) -> int:
    del argv
    for path in write_vectors():
        print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
