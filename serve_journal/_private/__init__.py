"""The replica side of the journal: what runs inside each Ray Serve replica process.

- :mod:`.wrapper`: the ``@journaled`` class wrapper (``wrap_class``, the method wrappers);
- :mod:`.runtime`: :class:`~.runtime.JournalRuntime`, one replica's journal assembled and run;
- :mod:`.wiring`: the parts a config implies (model, identity, privacy, policy, metrics, storage,
  counters, transport, finalizer, caller verifier), built once at replica start;
- :mod:`.capture`: the request path (annotations, caller check, capture, overflow per risk tier);
- :mod:`.batching`: the bounded buffer and the flusher thread;
- :mod:`.entries` and :mod:`.export`: the flusher's export step (captured calls to entries,
  counted, sent);
- :mod:`.counters`: drop accounting and the exact counters' flush;
- :mod:`.metrics`: metrics, reported through Ray;
- :mod:`.coordinator`: the per-journal actor replicas report to, and that driver-side flushes read.

Nothing here imports a read or maintenance tool or a test helper.
"""
