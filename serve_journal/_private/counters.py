"""Drop accounting of one replica: every captured call ends up counted exactly once.

A captured call is kept, sampled out or dropped; the exact counters
(:class:`serve_journal.counters.CounterSet`, written next to the journal) record which, with the
drop reason, so verify can explain every gap in a producer's sequence numbers. This module holds
the replica's side of that bookkeeping: :class:`DropCounter` (drops the replica itself decides:
buffer full, wait timeout, ...), :class:`TransportDropCounter` (entries a transport accepted and
then dropped) and :class:`ReplicaCounters`, which owns both, flushes the counters to storage and
keeps the producer's *sequence lease*: the replica answers a call only when its sequence number
is within a lease already durable in the signed counters chain (:class:`LeasedBuffer` is that
one integer compare on the request path; a small thread keeps the lease ahead), so a replica killed at any moment leaves a signed
bound on what it may have answered and lost. The counter data structures themselves live in
:mod:`serve_journal.counters`.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any

import pyarrow as pa
from pyarrow.compute import equal as pc_equal

from serve_journal.counters import DROPPED, LEASE_KEEPALIVE_S, CounterSet, CountersSigner
from serve_journal.metrics import JournalMetrics
from serve_journal.storage import JournalStorage

from .entries import CapturedCall, Finalized

logger = logging.getLogger("serve_journal")

REASON_LEASE_PENDING = "lease_pending"
WARN_EVERY_S = 10.0
"""At most one "dropped journal entries" warning per this many seconds."""
LEASE_S = 2.0
"""A lease extension covers about this many seconds of the replica's recent traffic..."""
LEASE_MIN = 4096
"""...and at least this many sequence numbers (the first lease, quiet replicas): a fresh or idle
replica hit by a burst admits this many calls before the keeper's next durable extension (256
dropped the low-risk part of a 4,000-call burst; the price is a wider loss bound, not more loss)."""
LEASE_MAX = 100_000
LEASE_IDLE_POLL_S = 0.5
"""How often the lease keeper looks at the lease unwoken (the request path wakes it as soon as
half the lease is used: :attr:`ReplicaCounters.wake_at`). It polled every 20 ms before, and
those 50 wake-ups a second took the GIL from a saturated replica's event loop each time."""
LEASE_RETRY_CHECK_S = 0.05
"""While backing off, how often the keeper looks whether a counters flush made the store good."""
LEASE_RETRY_S = 1.0
"""After a failed lease write, the next attempt waits this long (the counters flush may still
write the lease sooner)."""
"""...and at most this many (a burst does not make the bound on a death's loss huge)."""


class DropCounter:
    """Counts every drop with its reason: in the exact counters (so verify can explain the
    sequence gap), in metrics, and in a per-reason total for reports; warns, rate-limited."""

    def __init__(self, counters: CounterSet, metrics: JournalMetrics, default_tier: str) -> None:
        self.by_reason: dict[str, int] = {}
        self._counters = counters
        self._metrics = metrics
        self._default_tier = default_tier
        self._lock = threading.Lock()
        self._last_warning = 0.0

    def __call__(self, items: Sequence[CapturedCall], reason: str) -> None:
        """Count ``items`` as dropped for ``reason`` (the batch worker's ``on_drop``)."""
        for item in items:
            tier = item.tier.name if item.tier is not None else self._default_tier
            rate = item.tier.sample_rate if item.tier is not None else 1.0
            self._counters.record(item.model.name, item.model.version, item.ts_us, None, tier,
                                  rate, item.outcome, item.seq, DROPPED, reason)
            self._metrics.add_dropped(reason, tier)
        with self._lock:
            self.by_reason[reason] = self.by_reason.get(reason, 0) + len(items)
            now = time.monotonic()
            warn = now - self._last_warning >= WARN_EVERY_S
            if warn:
                self._last_warning = now
        if warn:
            logger.warning("serve_journal: dropped journal entries (%s so far: %s)",
                           sum(self.by_reason.values()), dict(self.by_reason))

    @property
    def total(self) -> int:
        """Entries dropped so far, all reasons."""
        return sum(self.by_reason.values())


class TransportDropCounter:
    """Counts entries a transport accepted and then dropped (its ``on_drop`` callback)."""

    def __init__(self, counters: CounterSet, metrics: JournalMetrics, producer_id: str) -> None:
        self.by_reason: dict[str, int] = {}
        self._counters = counters
        self._metrics = metrics
        self._producer_id = producer_id

    def __call__(self, reason: str, count: int, entries: pa.Table | pa.RecordBatch | None = None
                 ) -> None:
        """Count ``count`` dropped entries; with their sequence numbers when the transport still
        has the ``entries`` (then verify can tell this drop from a loss)."""
        self.by_reason[reason] = self.by_reason.get(reason, 0) + count
        if entries is None:
            return
        own = entries.filter(pc_equal(entries.column("producer_id"), self._producer_id))
        ts = own.column("ts").cast("int64").to_pylist()
        for model, version, ts_us, decision, tier, rate, outcome, seq in zip(
                own.column("model_name").to_pylist(), own.column("model_version").to_pylist(), ts,
                own.column("decision").to_pylist(), own.column("risk_tier").to_pylist(),
                own.column("sample_rate").to_pylist(), own.column("outcome").to_pylist(),
                own.column("seq").to_pylist(), strict=True):
            self._counters.record(model, version, ts_us, decision, tier, rate, outcome, seq,
                                  DROPPED, reason)
            self._metrics.add_dropped(reason, tier)


class ReplicaCounters:
    """The exact counters of one producer, its drop counters, its sequence lease, and their
    flush to storage."""

    def __init__(self, producer_id: str, metrics: JournalMetrics, default_tier: str,
                 storage: JournalStorage, signer: CountersSigner | None = None) -> None:
        self.exact = CounterSet(producer_id, signer)
        self.drops = DropCounter(self.exact, metrics, default_tier)
        self.transport_drops = TransportDropCounter(self.exact, metrics, producer_id)
        self._metrics = metrics
        self._storage = storage
        self.lease_through = -1
        """Calls with ``seq <= lease_through`` may be answered: the lease is durable. Read on
        the request path; only :meth:`extend_lease` and :meth:`flush` raise it."""
        self._lease_size = LEASE_MIN
        self.wake_at = -LEASE_MIN // 2
        """The first sequence number at which less than half the lease is left: the request path
        wakes the keeper (:meth:`wake_keeper`) from there on, until the lease is extended."""
        self._lease_mark: tuple[float, int] | None = None  # (monotonic time, next seq) at last extension
        self._lease_retry_at = 0.0
        self._keeper: threading.Thread | None = None
        self._keeper_stop = threading.Event()
        self._keeper_wake = threading.Event()

    def _lease_written(self) -> None:
        """Take the durable lease as the admission bound, and move the keeper's wake mark."""
        self.lease_through = through = self.exact.durable_lease
        self.wake_at = through + 1 - self._lease_size // 2

    def wake_keeper(self) -> None:
        """Less than half the lease is left (request path): the keeper extends it now."""
        if not self._keeper_wake.is_set():
            self._keeper_wake.set()

    def extend_lease(self, next_seq: int, model: str) -> None:
        """Write a longer lease when less than half of the current one is left (flusher thread,
        and once before the replica serves). ``next_seq``: the next sequence number to be used.
        The new lease covers about :data:`LEASE_S` of recent traffic beyond ``next_seq``; it
        counts only once its counters file is written."""
        if self.lease_through - next_seq + 1 >= self._lease_size // 2:
            return
        now = time.monotonic()
        if now < self._lease_retry_at:
            return  # the last write failed: the flusher's every wake-up would only log it again
        if self._lease_mark is not None and now > self._lease_mark[0]:
            rate = (next_seq - self._lease_mark[1]) / (now - self._lease_mark[0])
            self._lease_size = max(LEASE_MIN, min(LEASE_MAX, int(rate * LEASE_S)))
        self._lease_mark = (now, next_seq)
        self.exact.carry_lease(model, max(self.lease_through, next_seq - 1) + self._lease_size)
        try:
            self.exact.flush_to(self._storage)
        except BaseException:
            self._lease_retry_at = now + LEASE_RETRY_S
            raise
        finally:
            self._lease_written()

    def record_finalized(self, calls: Sequence[CapturedCall], fin: Finalized) -> None:
        """Count a finalized batch: each call kept or sampled out, per tier."""
        self.exact.record_batch(
            [m.name for m in fin.models], [m.version for m in fin.models],
            [c.ts_us for c in calls], fin.decisions, fin.tiers, fin.rates, fin.outcomes,
            [c.seq for c in calls], fin.keep,
        )
        self._metrics.add_batch(fin.tiers, fin.keep)

    def dropped(self) -> dict[str, int]:
        """Entries dropped so far, by reason: the replica's own drops and the transport's."""
        return {**self.drops.by_reason, **self.transport_drops.by_reason}

    def flush(self) -> None:
        """Write the counters gathered since the last flush to storage (with the lease; a
        lease-only file when idle for :data:`LEASE_KEEPALIVE_S`, so a live replica never looks
        dead)."""
        idle = time.time() - self.exact.last_written >= LEASE_KEEPALIVE_S
        try:
            self.exact.flush_to(self._storage, keepalive=idle)
            self._lease_retry_at = 0.0  # the store takes writes again
        finally:
            self._lease_written()

    def start_lease_keeper(self, next_seq: Callable[[], int], model: str) -> None:
        """Keep the lease ahead of ``next_seq()`` on a small thread of its own: a flusher held
        up by a slow transport must not hold up the lease (calls beyond it would wait, drop or
        be refused long before the buffer is full)."""
        if self._keeper is not None:
            return

        def keep() -> None:
            last_warning = 0.0
            while True:
                self._keeper_wake.wait(LEASE_IDLE_POLL_S)
                self._keeper_wake.clear()
                if self._keeper_stop.is_set():
                    return
                try:
                    self.extend_lease(next_seq(), model)
                except Exception:  # noqa: BLE001 - retried; calls beyond the lease are handled per tier
                    now = time.monotonic()
                    if now - last_warning >= WARN_EVERY_S:
                        last_warning = now
                        logger.warning("serve_journal: extending the sequence lease failed; calls "
                                       "beyond it wait, drop (counted) or are refused per tier",
                                       exc_info=True)
                # A failed write backs off here, however often the request path wakes it, until
                # the retry time (which a successful counters flush clears).
                while self._lease_retry_at > time.monotonic():
                    if self._keeper_stop.wait(LEASE_RETRY_CHECK_S):
                        return

        self._keeper = threading.Thread(target=keep, name="serve-journal-lease", daemon=True)
        self._keeper.start()

    def close(self, last_seq: int, timeout: float | None = None) -> None:
        """Stop the lease keeper and write the final counters file: everything counted and the
        closed mark with ``last_seq``, the last sequence number used (-1: none). No call is
        admitted after."""
        self._keeper_stop.set()
        self._keeper_wake.set()
        if self._keeper is not None:
            self._keeper.join(timeout)
        self.lease_through = -1
        self.exact.mark_closed(last_seq)
        self.exact.flush_to(self._storage)


class LeasedBuffer:
    """The replica's buffer as the request path sees it: a call beyond the durable lease finds
    no room, so its risk tier decides (drop counted, wait, or refuse), as for a full buffer."""

    __slots__ = ("_counters", "_offer", "_on_drop")

    def __init__(self, offer: Callable[..., bool], counters: ReplicaCounters,
                 on_drop: Callable[[Sequence[Any], str], None]) -> None:
        self._offer = offer
        self._counters = counters
        self._on_drop = on_drop

    def offer(self, item: CapturedCall, *, report_drop: bool = True,
              reserved: bool = False) -> bool:
        """Buffer ``item`` if its sequence number is within the lease; see
        :meth:`serve_journal._private.batching.BatchWorker.offer`. Never raises."""
        counters = self._counters
        if item.seq >= counters.wake_at:
            counters.wake_keeper()
        if item.seq > counters.lease_through:
            counters.wake_keeper()  # a lease behind its wake mark (a race) heals at once
            if report_drop:
                try:
                    self._on_drop((item,), REASON_LEASE_PENDING)
                except Exception:  # noqa: BLE001 - the request path never raises
                    pass
            return False
        return self._offer(item, report_drop=report_drop, reserved=reserved)
