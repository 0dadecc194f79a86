"""The project's exception hierarchy: one root, one subclass per kind of failure."""


class RollstreamError(Exception):
    """Root of every error Rollstream raises on purpose."""


class ConfigError(RollstreamError):
    """A setting is missing, malformed, or inconsistent with another setting."""


class SchemaError(RollstreamError):
    """An event schema could not be loaded, registered, or is incompatible."""


class SerializationError(RollstreamError):
    """An event could not be encoded or decoded."""


class InvalidEventError(RollstreamError):
    """A rollout, reward or call fails validation; ``param`` names the offending field."""

    def __init__(self, message: str, param: str) -> None:
        super().__init__(message)
        self.message = message
        self.param = param


class TopicError(RollstreamError):
    """A Kafka topic is missing or configured differently than the system needs."""


class StackError(RollstreamError):
    """A local-stack service could not be installed, started, or reached."""


class MissingToolError(StackError):
    """A tool needed to install the local stack (java, mvn, go) is not on PATH."""


class StorageError(RollstreamError):
    """An object-store (S3) operation failed."""


class GatewayError(RollstreamError):
    """The capturing gateway refused a request or could not reach its backend."""


class TrainerError(RollstreamError):
    """The trainer cannot consume transitions, take a step, or write or restore a checkpoint."""


class ServeError(RollstreamError):
    """The policy server could not load a model or generate a response."""


class InvalidRequestError(ServeError):
    """An API request is malformed; ``param`` names the offending field, ``status`` the HTTP status."""

    def __init__(self, message: str, param: str | None = None, status: int = 400) -> None:
        super().__init__(message)
        self.param = param
        self.status = status


class GrammarError(ServeError):
    """A grammar or JSON schema for constrained decoding does not compile for the served tokenizer."""


class ProducerError(RollstreamError):
    """The SDK or the OTLP receiver could not record or publish an event."""


class QueueFullError(ProducerError):
    """A producer's bounded in-memory event queue stayed full (Kafka is slow or unreachable)."""


class OtlpError(ProducerError):
    """An OTLP export request is malformed or holds spans that cannot become events."""


class ProcessorError(RollstreamError):
    """The stream processor cannot start or keep running (topics, settings, state)."""


class BadInputError(ProcessorError):
    """An input record cannot be joined; it goes to the dead-letter topic with ``error_type``."""

    def __init__(self, error_type: str, reason: str) -> None:
        super().__init__(reason)
        self.error_type = error_type
        self.reason = reason


class ExportError(RollstreamError):
    """An export cannot read its topics or write its files."""
