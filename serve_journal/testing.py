"""Test helpers for users of serve_journal: an in-memory transport to assert on entries.

Use ``@journaled(..., transport="memory")`` in your own unit tests (a single process, e.g. a
plain instance of your class or ``serve.run`` on a local cluster with one replica) and read the
entries back with ``InMemoryTransport.shared().table()``. Our own tests use the real parts.
"""

from __future__ import annotations

import threading
from typing import ClassVar

import pyarrow as pa

from serve_journal.schema import ENTRY_SCHEMA


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
        with self._lock:
            self._batches.append(batch)

    def flush(self, timeout: float | None = None) -> bool:
        return True

    def close(self, timeout: float | None = None) -> None:
        self.closed = True

    def table(self) -> pa.Table:
        """Every entry sent so far."""
        with self._lock:
            return pa.Table.from_batches(list(self._batches), schema=ENTRY_SCHEMA)

    def clear(self) -> None:
        with self._lock:
            self._batches.clear()


__all__ = ["InMemoryTransport"]
