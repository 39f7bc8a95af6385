"""Kafka client security (TLS, SASL): validated and turned into aiokafka arguments in one place.

The producer (``KafkaSettings`` in ``transport/kafka.py``) and the sink's consumer
(``KafkaSinkSettings`` in ``sink/kafka.py``) both inherit :class:`KafkaSecurity`: the same flat,
keyword-only fields (``security_protocol``, ``ssl_*``, ``sasl_*``), validated once in its
``__post_init__``, and their client arguments from :meth:`KafkaSecurity.client_kwargs`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

SECURITY_PROTOCOLS = ("PLAINTEXT", "SSL", "SASL_PLAINTEXT", "SASL_SSL")
SASL_MECHANISMS = ("PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512", "GSSAPI", "OAUTHBEARER")


@dataclass(frozen=True, kw_only=True)
class KafkaSecurity:
    """How a Kafka client authenticates and encrypts; passwords are kept out of ``repr``.

    The producer and sink settings inherit these fields (keyword-only), so a flat settings mapping
    (``extra={"kafka": {"security_protocol": ...}}``) configures both the same way."""

    security_protocol: str = "PLAINTEXT"
    ssl_cafile: str | None = None
    ssl_certfile: str | None = None
    ssl_keyfile: str | None = None
    ssl_password: str | None = field(default=None, repr=False)
    sasl_mechanism: str | None = None
    sasl_plain_username: str | None = None
    sasl_plain_password: str | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        if self.security_protocol not in SECURITY_PROTOCOLS:
            raise ValueError(f"security_protocol must be one of {SECURITY_PROTOCOLS}, got {self.security_protocol!r}")
        if self.sasl_mechanism is not None and self.sasl_mechanism not in SASL_MECHANISMS:
            raise ValueError(f"sasl_mechanism must be one of {SASL_MECHANISMS}, got {self.sasl_mechanism!r}")
        if self.security_protocol.startswith("SASL") and self.sasl_mechanism is None:
            raise ValueError("sasl_mechanism is required when security_protocol is SASL_*")

    def client_kwargs(self) -> dict[str, Any]:
        """Keyword arguments for an aiokafka producer or consumer: the protocol, an SSL context
        for ``SSL``/``SASL_SSL``, the SASL credentials when a mechanism is set."""
        kwargs: dict[str, Any] = {"security_protocol": self.security_protocol}
        if self.security_protocol in ("SSL", "SASL_SSL"):
            from aiokafka.helpers import create_ssl_context  # inside: slow import; CLI start-up

            kwargs["ssl_context"] = create_ssl_context(
                cafile=self.ssl_cafile, certfile=self.ssl_certfile, keyfile=self.ssl_keyfile,
                password=self.ssl_password,
            )
        if self.sasl_mechanism is not None:
            kwargs["sasl_mechanism"] = self.sasl_mechanism
            kwargs["sasl_plain_username"] = self.sasl_plain_username
            kwargs["sasl_plain_password"] = self.sasl_plain_password
        return kwargs


__all__ = ["SASL_MECHANISMS", "SECURITY_PROTOCOLS", "KafkaSecurity"]
