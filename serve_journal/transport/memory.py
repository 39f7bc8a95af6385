"""The in-memory transport (``transport="memory"``): every batch kept in this process's memory.

For unit tests and benchmarks in one process: nothing leaves the process and nothing is durable.
Instances are shared by name (:meth:`InMemoryTransport.shared`), so a test reads back what the
replica runtime it built has sent. :mod:`serve_journal.testing` re-exports it for users.
"""

from __future__ import annotations

import threading
from typing import ClassVar

import pyarrow as pa

from serve_journal.schema import ENTRY_SCHEMA, conform_entries


class InMemoryTransport:
    """Keeps every batch sent in memory; a Transport for tests."""

    _shared: ClassVar[dict[str, InMemoryTransport]] = {}
    _shared_lock: ClassVar[threading.Lock] = threading.Lock()

    def __init__(self) -> None:
        self._batches: list[pa.RecordBatch] = []
        self._lock = threading.Lock()
        self.closed = False

    @classmethod
    def shared(cls, name: str = "default") -> InMemoryTransport:
        """The process-wide instance called ``name``."""
        with cls._shared_lock:
            if name not in cls._shared:
                cls._shared[name] = cls()
            return cls._shared[name]

    def send(self, batch: pa.RecordBatch) -> None:
        """Keep ``batch``."""
        with self._lock:
            self._batches.append(batch)

    def flush(self, timeout: float | None = None) -> bool:
        """Nothing to wait for: what was sent is already held."""
        return True

    def close(self, timeout: float | None = None) -> None:
        """Mark closed; the batches stay readable."""
        self.closed = True

    def table(self) -> pa.Table:
        """Every entry sent so far, in the current entry schema (a batch of an earlier schema
        version has nulls in the columns it lacks)."""
        with self._lock:
            batches = list(self._batches)
        if not batches:
            return ENTRY_SCHEMA.empty_table()
        return pa.concat_tables([conform_entries(pa.Table.from_batches([b])) for b in batches])

    def clear(self) -> None:
        """Forget every batch sent so far."""
        with self._lock:
            self._batches.clear()


__all__ = ["InMemoryTransport"]
