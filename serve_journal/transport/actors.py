"""The embedded default transport, producer side: batches to a pool of Ray writer actors.

Replicas split each batch by partition key (model, hour bucket) and route every part by key and
producer to one writer of the pool (``serve_journal.sink.actor.JournalWriter``), which writes the
Parquet files. Writers are detached, named actors, one pool per journal root: :func:`pool_id`
and :func:`writer_name` name them, so that replicas and the driver-side tools
(``serve_journal.api``) find the same writers.

Fail-closed as the Kafka transport: a write a writer failed (the actor died, or raised) is not
given up: the part is kept and sent again with back-off, to a replacement writer when the actor
is gone (``get_writer_pool`` creates the named actor anew). While parts are unacknowledged beyond
:data:`MAX_IN_FLIGHT`, :meth:`RayActorTransport.has_room` is false and the replica's flusher holds
its buffer, so the request path's risk tiers decide (drop counted, wait, or refuse with 503).
"""

from __future__ import annotations

import hashlib
import logging
import threading
import time
import zlib

import pyarrow as pa
import ray

from serve_journal.catalog.layout import PartitionKey, split_by_partition
from serve_journal.retry import Backoff
from serve_journal.sink.actor import get_writer_pool
from serve_journal.sink.settings import SinkSettings
from serve_journal.transport import TransportError
from serve_journal.transport.wire import arrow_stream

logger = logging.getLogger(__name__)

MAX_IN_FLIGHT = 64
"""Unacknowledged writes a transport allows before ``send`` waits for half of them."""
RESEND_DELAY_S = 0.2
"""First wait before a failed write is sent again; doubles up to :data:`RESEND_MAX_DELAY_S`."""
RESEND_MAX_DELAY_S = 5.0
WRITERS_READY_TIMEOUT_S = 60.0
"""How long a new transport waits for its writers to answer before it lets sends queue."""
INLINE_BYTES = 100_000
"""A part's Arrow stream under this many bytes goes as ``bytes`` (Ray inlines it in the call,
under its ``max_direct_call_object_size``), a larger one as the ``pa.Buffer``."""


def pool_id(journal_uri: str) -> str:
    """Short stable id of a journal root; names its writer pool and coordinator."""
    return hashlib.sha256(journal_uri.encode()).hexdigest()[:12]


def writer_name(journal_uri: str, index: int) -> str:
    """Actor name of writer ``index`` of a journal root's pool."""
    return f"sj-writer-{pool_id(journal_uri)}-{index}"


class RayActorTransport:
    """Sends batches to the writer pool; ``flush`` waits until the writers wrote them."""

    def __init__(self, settings: SinkSettings, *, pool_size: int = 2,
                 namespace: str = "serve_journal", producer_id: str = "") -> None:
        self._settings = settings
        self._names = [writer_name(settings.journal_uri, i) for i in range(pool_size)]
        self._namespace = namespace
        self._writers = get_writer_pool(settings, self._names, namespace)
        self._await_writers(WRITERS_READY_TIMEOUT_S)
        self._shard = zlib.crc32(producer_id.encode())
        self._in_flight: list[ray.ObjectRef] = []
        self._parts: dict[ray.ObjectRef, tuple[PartitionKey, pa.RecordBatch]] = {}
        self._failed: list[tuple[PartitionKey, pa.RecordBatch]] = []  # to send again
        self._resend_at = 0.0
        self._backoff = Backoff(RESEND_DELAY_S, RESEND_MAX_DELAY_S)
        self._lock = threading.RLock()  # the flusher sends while a driver-side flush may wait
        self.resent = 0
        """Parts sent again after a failed write."""
        self._closed = False

    def __repr__(self) -> str:
        return f"RayActorTransport(writers={len(self._writers)})"

    def _await_writers(self, timeout: float) -> None:
        """Wait until every writer of the pool answers (at once when the pool already runs).

        A new writer's process takes a second or more to start; entries sent before it runs
        wait in Ray's queue that long on top of the roll, which was the whole persistence tail
        of a new pool (files of the first second written 0.85-1.5 s after capture, steady files
        ~0.55 s). So the replica's ``__init__`` returns once its writers can take entries. A pool
        that does not answer in ``timeout`` is logged, not fatal: sends queue and are retried
        as before."""
        refs = [writer.stats.remote() for writer in self._writers]
        ready, _ = ray.wait(refs, num_returns=len(refs), timeout=timeout)
        if len(ready) < len(refs):
            logger.warning("serve_journal: %d of %d journal writers did not start within %.0f s; "
                           "entries queue for them", len(refs) - len(ready), len(refs), timeout)

    def _route(self, key: PartitionKey) -> ray.actor.ActorHandle:
        h = zlib.crc32(f"{key.model}|{key.date}|{key.hour}".encode()) ^ self._shard
        return self._writers[h % len(self._writers)]

    def _write(self, key: PartitionKey, part: pa.RecordBatch) -> None:
        # As an Arrow IPC stream: per call, a small part costs the sender a third of the CPU of a
        # RecordBatch argument as ``bytes`` (inlined in the task), a large one less as the
        # ``pa.Buffer`` (one out-of-band copy into the object store instead of two).
        stream = arrow_stream(part)
        ref = self._route(key).write.remote(key, bytes(stream) if stream.size < INLINE_BYTES else stream)
        with self._lock:
            self._in_flight.append(ref)
            self._parts[ref] = (key, part)

    def send(self, batch: pa.RecordBatch) -> None:
        """Split ``batch`` by partition and send each part to its writer; waits only when
        more than ``MAX_IN_FLIGHT`` writes are unacknowledged (see :meth:`has_room`)."""
        if self._closed:
            raise TransportError("transport is closed")
        for key, part in split_by_partition(batch):
            self._write(key, part)
        if len(self._in_flight) > MAX_IN_FLIGHT:
            self._settle(timeout=None, keep=MAX_IN_FLIGHT // 2)

    def has_room(self) -> bool:
        """Whether :meth:`send` would not wait (the flusher's backpressure gate); never raises."""
        if self._closed:
            return False
        try:
            return self.in_flight() < MAX_IN_FLIGHT
        except Exception:  # noqa: BLE001 - Ray unreachable: hold the buffer, try again later
            logger.warning("checking the writer actors failed", exc_info=True)
            return False

    def _collect(self, ready: list[ray.ObjectRef]) -> None:
        """Take the results of finished writes; keep the parts of failed ones to send again."""
        for ref in ready:
            key, part = self._parts.pop(ref)
            try:
                ray.get(ref)
            except Exception as exc:  # noqa: BLE001 - the part is kept and sent again
                logger.warning("a writer actor failed a write of %d entries (%s); sending it again",
                               part.num_rows, type(exc).__name__)
                self._failed.append((key, part))
        if not self._failed:
            self._backoff.reset()

    def _resend_due(self) -> None:
        """Send failed parts again, once their back-off passed, to a fresh pool handle (a dead
        named writer is created anew)."""
        if not self._failed or time.monotonic() < self._resend_at:
            return
        with self._lock:
            self._resend_locked()

    def _resend_locked(self) -> None:
        if not self._failed:
            return
        self._resend_at = time.monotonic() + self._backoff.next_delay()
        try:
            self._writers = get_writer_pool(self._settings, self._names, self._namespace)
        except Exception:  # noqa: BLE001 - keep the parts; try again after the back-off
            logger.warning("getting the writer actors failed", exc_info=True)
            return
        failed, self._failed = self._failed, []
        for key, part in failed:
            self._write(key, part)
            self.resent += 1

    def _settle(self, timeout: float | None, keep: int = 0) -> bool:
        """Wait until at most ``keep`` sends are unacknowledged (failed ones are sent again)."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            self._resend_due()
            pending = self._in_flight
            if len(pending) <= keep and not self._failed:
                return True
            remaining = None if deadline is None else max(0.0, deadline - time.monotonic())
            if remaining == 0.0:
                return False
            wait_s = RESEND_DELAY_S if remaining is None else min(remaining, RESEND_DELAY_S)
            if len(pending) > keep:
                with self._lock:
                    pending = self._in_flight  # another thread may have collected meanwhile
                    if len(pending) > keep:
                        ready, self._in_flight = ray.wait(pending, num_returns=len(pending) - keep,
                                                          timeout=wait_s)
                        self._collect(ready)
            else:
                time.sleep(wait_s)  # only failed parts left: their back-off, bounded by timeout

    def in_flight(self) -> int:
        """Writes not yet acknowledged by a writer, including failed ones waiting to be resent."""
        self._resend_due()
        with self._lock:
            if self._in_flight:
                ready, self._in_flight = ray.wait(self._in_flight,
                                                  num_returns=len(self._in_flight), timeout=0)
                self._collect(ready)
            return len(self._in_flight) + len(self._failed)

    def flush(self, timeout: float | None = None) -> bool:
        """Wait for every send, then make the writers write their open files; ``True`` when done
        within ``timeout`` with nothing left buffered."""
        start = time.monotonic()
        if not self._settle(timeout):
            return False
        remaining = None if timeout is None else max(0.0, timeout - (time.monotonic() - start))
        refs = [w.flush.remote() for w in self._writers]
        ready, _ = ray.wait(refs, num_returns=len(refs), timeout=remaining)
        return len(ready) == len(refs) and all(left == 0 for left in ray.get(ready))

    def close(self, timeout: float | None = None) -> None:
        """Flush within ``timeout``; later sends raise ``TransportError``."""
        if self._closed:
            return
        try:
            self.flush(timeout)
        finally:
            self._closed = True
