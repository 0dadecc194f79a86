"""The gateway's Prometheus metrics, in a registry of its own (served at ``/metrics``), and the redaction counters."""

from __future__ import annotations

import threading

from prometheus_client import REGISTRY, CollectorRegistry, Counter, Gauge, Histogram, generate_latest

LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0)


class GatewayMetrics:
    """Requests, latency, events and the publish queue; one instance per gateway."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.requests = Counter(
            "rollstream_gateway_requests", "HTTP requests answered, by endpoint and status.",
            ["endpoint", "status"], registry=r,
        )
        self.latency = Histogram(
            "rollstream_gateway_request_seconds", "Time from request to last response byte, by endpoint.",
            ["endpoint"], buckets=LATENCY_BUCKETS, registry=r,
        )
        self.events_enqueued = Counter(
            "rollstream_gateway_events_enqueued", "Events accepted into the publish queue, by topic.",
            ["topic"], registry=r,
        )
        self.events_published = Counter(
            "rollstream_gateway_events_published", "Events acknowledged by Kafka, by topic.", ["topic"], registry=r
        )
        self.delivery_failures = Counter(
            "rollstream_gateway_delivery_failures", "Events Kafka did not accept, by topic.", ["topic"], registry=r
        )
        self.events_dropped = Counter(
            "rollstream_gateway_events_dropped",
            "Events not recorded, by reason (queue_full, encode_error, client_disconnected, incomplete, "
            "no_response_id, redaction_error).",
            ["reason"], registry=r,
        )
        self.queue_depth = Gauge(
            "rollstream_gateway_queue_depth", "Events waiting in memory for Kafka's acknowledgement.", registry=r
        )
        self.unattributed = Counter(
            "rollstream_gateway_unattributed_calls", "Model calls served without a rollout id.", registry=r,
        )
        self.unattributed_recorded = Counter(
            "rollstream_gateway_unattributed_recorded",
            "Model calls without a rollout id whose LlmCall events were queued for the calls-by-response topic "
            "(ROLLSTREAM_GATEWAY_RECORD_UNATTRIBUTED).", registry=r,
        )
        self.rejected = Counter(
            "rollstream_gateway_rejected", "Requests answered 503 because the event queue was full, by endpoint.",
            ["endpoint"], registry=r,
        )
        self.unacknowledged = Counter(
            "rollstream_gateway_unacknowledged",
            "Requests answered without Kafka's acknowledgement of their events (ROLLSTREAM_GATEWAY_ACKS=kafka), "
            "by endpoint and outcome (pending: not acknowledged within the ack timeout; failed: refused).",
            ["endpoint", "outcome"], registry=r,
        )
        self.backend_errors = Counter(
            "rollstream_gateway_backend_errors", "Backend failures (502/504), by kind.", ["kind"], registry=r
        )
        self.redactions = redaction_counters(r)

    def render(self) -> bytes:
        return bytes(generate_latest(self.registry))


def redaction_counters(registry: CollectorRegistry) -> tuple[Counter, Counter]:
    """Replacements made by redaction (per rule and surface) and token-id drops (per side and surface)."""
    return (
        Counter("rollstream_redactions", "Matches replaced by redaction before publishing, by rule (a built-in, "
                "a ROLLSTREAM_REDACT_PATTERNS name, or hook) and surface (gateway, otlp, sdk).",
                ["rule", "surface"], registry=registry),
        Counter("rollstream_redaction_tokens_dropped", "LlmCalls whose prompt or response token ids were dropped "
                "because the text they encode was redacted on the event, by side and surface.",
                ["side", "surface"], registry=registry),
    )


_process_counters: tuple[Counter, Counter] | None = None
_process_lock = threading.Lock()


def process_redaction_counters() -> tuple[Counter, Counter]:
    """The redaction counters of an SDK process, in prometheus_client's default registry (created once)."""
    global _process_counters
    with _process_lock:
        if _process_counters is None:
            _process_counters = redaction_counters(REGISTRY)
        return _process_counters
