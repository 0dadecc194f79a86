"""Rollstream: train LLM agents from their own live traffic.

Agents' model calls and their (often delayed) rewards stream through Kafka as Avro
events, are joined per rollout into RL transitions, and a trainer keeps improving the
policy that serves the agents. The parts live in top-level folders and install under
this namespace: ``rollstream.schemas``, ``rollstream.producers``,
``rollstream.stream_processors``, ``rollstream.trainer``.
"""

__version__ = "0.1.0"
