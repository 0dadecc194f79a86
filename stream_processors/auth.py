"""``ROLLSTREAM_KAFKA_CONFIG`` (librdkafka settings) as credentials for Faust's own Kafka client (aiokafka).

The processor talks to Kafka through two clients: confluent-kafka (topic checks, gap reads) takes
the librdkafka settings as they are; Faust's aiokafka consumer and producers need them as a
``faust.SASLCredentials`` / ``faust.SSLCredentials`` object. Supported: ``security.protocol``
PLAINTEXT, SSL, SASL_PLAINTEXT and SASL_SSL; ``sasl.mechanism`` PLAIN, SCRAM-SHA-256 and
SCRAM-SHA-512 with ``sasl.username``/``sasl.password``; ``ssl.ca.location``,
``ssl.certificate.location``, ``ssl.key.location``, ``ssl.key.password`` and
``ssl.endpoint.identification.algorithm=none``. Anything else that only librdkafka understands is
refused with a message, rather than silently ignored by Faust.
"""

from __future__ import annotations

import ssl
from typing import Any

from rollstream.errors import ConfigError

SASL_MECHANISMS = ("PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512")
# Settings that change how a client authenticates or encrypts; the ones not mapped here are refused.
MAPPED = {"security.protocol", "sasl.mechanism", "sasl.mechanisms", "sasl.username", "sasl.password",
          "ssl.ca.location", "ssl.certificate.location", "ssl.key.location", "ssl.key.password",
          "ssl.endpoint.identification.algorithm"}


def _ssl_context(conf: dict[str, Any]) -> ssl.SSLContext:
    context = ssl.create_default_context(cafile=conf.get("ssl.ca.location") or None)
    if conf.get("ssl.certificate.location"):
        context.load_cert_chain(conf["ssl.certificate.location"], conf.get("ssl.key.location") or None,
                                conf.get("ssl.key.password") or None)
    if str(conf.get("ssl.endpoint.identification.algorithm", "https")).lower() == "none":
        context.check_hostname = False
    return context


def faust_credentials(conf: dict[str, Any]) -> Any:
    """The ``broker_credentials`` for ``faust.App`` (None for PLAINTEXT)."""
    import faust

    unsupported = sorted(k for k in conf if k.startswith(("sasl.", "ssl.")) and k not in MAPPED)
    if unsupported:
        raise ConfigError(f"ROLLSTREAM_KAFKA_CONFIG: {', '.join(unsupported)} cannot be passed to the stream "
                          "processor's Kafka client (aiokafka); supported: " + ", ".join(sorted(MAPPED)))
    protocol = str(conf.get("security.protocol", "PLAINTEXT")).upper()
    if protocol == "PLAINTEXT":
        return None
    if protocol == "SSL":
        return faust.SSLCredentials(_ssl_context(conf))
    if protocol in ("SASL_PLAINTEXT", "SASL_SSL"):
        mechanism = str(conf.get("sasl.mechanism", conf.get("sasl.mechanisms", "PLAIN"))).upper()
        if mechanism not in SASL_MECHANISMS:
            raise ConfigError(f"ROLLSTREAM_KAFKA_CONFIG: sasl.mechanism {mechanism} is not supported by the stream "
                              f"processor; use one of {', '.join(SASL_MECHANISMS)}")
        context = _ssl_context(conf) if protocol == "SASL_SSL" else None
        return faust.SASLCredentials(username=conf.get("sasl.username"), password=conf.get("sasl.password"),
                                     mechanism=mechanism, ssl_context=context)
    raise ConfigError(f"ROLLSTREAM_KAFKA_CONFIG: security.protocol {protocol} is not one of PLAINTEXT, SSL, "
                      "SASL_PLAINTEXT, SASL_SSL")
