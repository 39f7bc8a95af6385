"""Transports carry finalized entry batches from a replica's flusher to the sinks.

A transport is a protocol of three methods; the flusher knows nothing else about it.
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable

import pyarrow as pa

from serve_journal.errors import TransportError


@runtime_checkable
class Transport(Protocol):
    """Carries batches of journal entries (``serve_journal.schema.ENTRY_SCHEMA``) to storage."""

    def send(self, batch: pa.RecordBatch) -> None:
        """Hand over one batch. Must not block for long; raises ``TransportError`` when it cannot."""

    def flush(self, timeout: float | None = None) -> bool:
        """Wait until everything sent is durable; ``True`` when it is, ``False`` on timeout."""

    def close(self, timeout: float | None = None) -> None:
        """Flush within ``timeout`` and release resources. Closing twice is harmless."""


__all__ = ["Transport", "TransportError"]
