"""The embedded default transport, producer side: batches to a pool of Ray writer actors.

Replicas split each batch by partition key (model, hour bucket) and route every part by key and
producer to one writer of the pool (``serve_journal.sink.actor.JournalWriter``), which writes the
Parquet files. Writers are detached, named actors, one pool per journal root: :func:`pool_id`
and :func:`writer_name` name them, so that replicas and the driver-side tools
(``serve_journal.api``) find the same writers.
"""

from __future__ import annotations

import hashlib
import time
import zlib

import pyarrow as pa
import ray

from serve_journal.catalog.layout import PartitionKey, split_by_partition
from serve_journal.sink.actor import get_writer_pool
from serve_journal.sink.settings import SinkSettings
from serve_journal.transport import TransportError

MAX_IN_FLIGHT = 64
"""Unacknowledged writes a transport allows before ``send`` waits for half of them."""


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
        names = [writer_name(settings.journal_uri, i) for i in range(pool_size)]
        self._writers = get_writer_pool(settings, names, namespace)
        self._shard = zlib.crc32(producer_id.encode())
        self._in_flight: list[ray.ObjectRef] = []
        self._closed = False

    def __repr__(self) -> str:
        return f"RayActorTransport(writers={len(self._writers)})"

    def _route(self, key: PartitionKey) -> ray.actor.ActorHandle:
        h = zlib.crc32(f"{key.model}|{key.date}|{key.hour}".encode()) ^ self._shard
        return self._writers[h % len(self._writers)]

    def send(self, batch: pa.RecordBatch) -> None:
        """Split ``batch`` by partition and send each part to its writer; waits only when
        more than ``MAX_IN_FLIGHT`` writes are unacknowledged."""
        if self._closed:
            raise TransportError("transport is closed")
        for key, part in split_by_partition(batch):
            self._in_flight.append(self._route(key).write.remote(key, part))
        if len(self._in_flight) > MAX_IN_FLIGHT:
            self._settle(timeout=None, keep=MAX_IN_FLIGHT // 2)

    def _settle(self, timeout: float | None, keep: int = 0) -> bool:
        """Wait until at most ``keep`` sends are unacknowledged; raise if a write failed."""
        pending = self._in_flight
        deadline = None if timeout is None else time.monotonic() + timeout
        while len(pending) > keep:
            remaining = None if deadline is None else max(0.0, deadline - time.monotonic())
            ready, pending = ray.wait(pending, num_returns=len(pending) - keep, timeout=remaining)
            self._in_flight = pending
            try:
                ray.get(ready)
            except Exception as exc:
                raise TransportError(f"a writer actor failed: {type(exc).__name__}") from exc
            if deadline is not None and time.monotonic() >= deadline and len(pending) > keep:
                return False
        return True

    def in_flight(self) -> int:
        """Sends not yet acknowledged by a writer (raises TransportError if one failed)."""
        if self._in_flight:
            ready, self._in_flight = ray.wait(self._in_flight, num_returns=len(self._in_flight),
                                              timeout=0)
            try:
                ray.get(ready)
            except Exception as exc:
                raise TransportError(f"a writer actor failed: {type(exc).__name__}") from exc
        return len(self._in_flight)

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
