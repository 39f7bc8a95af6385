"""The flusher's export step: finalize a batch of captured calls, count it, send it.

:class:`BatchExporter` is the ``export`` callable of the replica's
:class:`~serve_journal._private.batching.BatchWorker`. It runs on the flusher thread only:
:class:`~serve_journal._private.entries.EntryFinalizer` turns the calls into entries, the exact
counters record every call as kept or sampled out, and the kept entries go to the transport,
retried with back-off (:func:`serve_journal.retry.retry_call`) while the transport fails.
Finalizing gives the GIL back every :data:`~serve_journal._private.batching.GIL_SLICE_S`
(:class:`~serve_journal._private.batching.GilPacer`), so the replica's event loop never waits
behind a whole batch. A batch
that still fails after :data:`SEND_DEADLINE_S` raises; the worker then counts it as dropped.
"""

from __future__ import annotations

import logging
import time

import pyarrow as pa

from serve_journal.metrics import JournalMetrics
from serve_journal.retry import retry_call
from serve_journal.transport import Transport

from .batching import GilPacer
from .counters import ReplicaCounters
from .entries import CapturedCall, EntryFinalizer

logger = logging.getLogger("serve_journal")

SEND_RETRY_DELAY_S = 0.05
"""First wait after a failed send; doubles up to :data:`SEND_RETRY_MAX_DELAY_S`."""
SEND_RETRY_MAX_DELAY_S = 2.0
SEND_DEADLINE_S = 30.0
"""How long one batch is retried before it is given up (and counted as dropped)."""


class BatchExporter:
    """Finalizes, counts and sends batches of captured calls (on the flusher thread)."""

    def __init__(self, finalizer: EntryFinalizer, counters: ReplicaCounters, metrics: JournalMetrics,
                 transport: Transport) -> None:
        self.finalizer = finalizer
        self.counters = counters
        self.metrics = metrics
        self.transport = transport
        self.exported = 0
        """Calls finalized and, when kept, handed to the transport."""
        self.pacer = GilPacer()
        """Gives the GIL back to the replica's event loop every fraction of a millisecond of
        finalizing (the flusher shares the replica's interpreter)."""

    def __call__(self, calls: list[CapturedCall]) -> None:
        """Export one batch; raises when the transport keeps failing past the deadline."""
        started = time.perf_counter()
        self.pacer.restart()
        fin = self.finalizer.finalize(calls, self.pacer)
        self.pacer()
        if fin.batch.num_rows:
            # Counted only once sent: a batch given up raises, and the worker then counts every
            # call of it as dropped (export_failed), so no call is counted both ways.
            self.send(fin.batch)
            self.pacer()
        self.counters.record_finalized(calls, fin)
        self.exported += len(calls)
        if fin.batch.num_rows == 0:
            return
        self.metrics.observe_flush_ms((time.perf_counter() - started) * 1000.0)

    def send(self, batch: pa.RecordBatch) -> None:
        """Hand ``batch`` to the transport, retrying with back-off (a warning per retry)."""
        retry_call(
            lambda: self.transport.send(batch),
            retry_on=Exception,
            deadline_s=SEND_DEADLINE_S,
            delay_s=SEND_RETRY_DELAY_S,
            max_delay_s=SEND_RETRY_MAX_DELAY_S,
            logger=logger,
            message="transport send failed; retrying",
        )
