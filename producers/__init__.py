"""Producers: everything that turns agent activity into events on Kafka.

Calls, rewards and rollout events are keyed by ``rollout_id`` and published with the
murmur2 partitioner and an idempotent producer (see ``rollstream.schemas.topics``).
"""
