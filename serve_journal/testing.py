"""Test helpers for users of serve_journal: an in-memory transport to assert on entries.

Use ``@journaled(..., transport="memory")`` in your own unit tests (a single process, e.g. a
plain instance of your class or ``serve.run`` on a local cluster with one replica) and read the
entries back with ``InMemoryTransport.shared().table()``. Our own tests use the real parts.

The transport itself lives in :mod:`serve_journal.transport.memory` (the replica builds it from
there and never imports this module); it is re-exported here as the public test-helper name.
"""

from __future__ import annotations

from serve_journal.transport.memory import InMemoryTransport

__all__ = ["InMemoryTransport"]
