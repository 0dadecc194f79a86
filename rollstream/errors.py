"""The project's exception hierarchy: one root, one subclass per kind of failure."""


class RollstreamError(Exception):
    """Root of every error Rollstream raises on purpose."""


class ConfigError(RollstreamError):
    """A setting is missing, malformed, or inconsistent with another setting."""


class SchemaError(RollstreamError):
    """An event schema could not be loaded, registered, or is incompatible."""


class SerializationError(RollstreamError):
    """An event could not be encoded or decoded."""


class TopicError(RollstreamError):
    """A Kafka topic is missing or configured differently than the system needs."""


class StackError(RollstreamError):
    """A local-stack service could not be installed, started, or reached."""


class MissingToolError(StackError):
    """A tool needed to install the local stack (java, mvn, go) is not on PATH."""


class StorageError(RollstreamError):
    """An object-store (S3) operation failed."""
