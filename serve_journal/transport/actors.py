"""The embedded default transport: a pool of Ray writer actors that write Parquet.

Replicas route each batch by partition key (model, hour bucket) and producer to one writer of the
pool. A writer keeps one open buffer per partition and rolls it into a Parquet file when it
reaches ``roll_bytes`` or ``roll_seconds`` of age, whichever comes first. Writers are detached,
named actors (one pool per journal root), so they outlive the replicas that feed them and finish
writing what a stopping replica flushed.

Durability: an entry is durable once its file is written. Entries a writer holds in memory (at
most ``roll_seconds`` worth) are lost if that writer process crashes; the Kafka transport is the
path that survives that.
"""

from __future__ import annotations

import hashlib
import logging
import threading
import time
import uuid
import zlib
from collections.abc import Callable
from dataclasses import dataclass, field

import pyarrow as pa
import pyarrow.compute as pc
import ray

from serve_journal._private.metrics import JournalMetrics
from serve_journal.catalog.layout import DEFAULT_SPEC, PartitionKey
from serve_journal.fileformat import encode_parquet
from serve_journal.sink.settings import SinkSettings, manifest_hook
from serve_journal.storage import JournalStorage, StoredObject
from serve_journal.transport import TransportError

logger = logging.getLogger("serve_journal")

_US_PER_HOUR = 3_600_000_000
MAX_IN_FLIGHT = 64


def pool_id(journal_uri: str) -> str:
    """Short stable id of a journal root; names its writer pool and coordinator."""
    return hashlib.sha256(journal_uri.encode()).hexdigest()[:12]


def writer_name(journal_uri: str, index: int) -> str:
    return f"sj-writer-{pool_id(journal_uri)}-{index}"


def split_by_partition(batch: pa.RecordBatch) -> list[tuple[PartitionKey, pa.RecordBatch]]:
    """Split a batch into (partition key, rows) groups; one group in the common case."""
    if batch.num_rows == 0:
        return []
    hours = pc.divide(batch.column("ts").cast(pa.int64()), _US_PER_HOUR)
    models = batch.column("model_name")
    lo, hi = pc.min_max(hours).values()
    if lo == hi and pc.count_distinct(models).as_py() == 1:
        key = DEFAULT_SPEC.key_for_micros(models[0].as_py(), lo.as_py() * _US_PER_HOUR)
        return [(key, batch)]
    groups: dict[tuple[str, int], list[int]] = {}
    for i, (model, hour) in enumerate(zip(models.to_pylist(), hours.to_pylist(), strict=True)):
        groups.setdefault((model, hour), []).append(i)
    out = []
    for (model, hour), rows in groups.items():
        key = DEFAULT_SPEC.key_for_micros(model, hour * _US_PER_HOUR)
        out.append((key, batch.take(pa.array(rows, pa.int64()))))
    return out


@dataclass
class _OpenPartition:
    batches: list[pa.RecordBatch] = field(default_factory=list)
    nbytes: int = 0
    rows: int = 0
    opened_at: float = field(default_factory=time.monotonic)


FileWrittenHook = Callable[[StoredObject, pa.Table, PartitionKey], None]


class PartitionFileWriter:
    """Buffers rows per partition and rolls them into create-only Parquet files.

    Plain Python (no Ray) so that the writer actor and the Kafka sink share it.
    """

    def __init__(self, storage: JournalStorage, name_prefix: str, *, roll_seconds: float,
                 roll_bytes: int, on_file_written: list[FileWrittenHook] | None = None) -> None:
        self.storage = storage
        self.name_prefix = name_prefix
        self.roll_seconds = roll_seconds
        self.roll_bytes = roll_bytes
        self.on_file_written = list(on_file_written or [])
        self._open: dict[PartitionKey, _OpenPartition] = {}
        self._lock = threading.Lock()
        self._io_lock = threading.Lock()
        self._files = 0
        self.rows_written = 0
        self.bytes_written = 0
        self.write_errors = 0

    def add(self, key: PartitionKey, batch: pa.RecordBatch) -> None:
        with self._lock:
            part = self._open.get(key)
            if part is None:
                part = self._open[key] = _OpenPartition()
            part.batches.append(batch)
            part.nbytes += batch.nbytes
            part.rows += batch.num_rows
            full = part.nbytes >= self.roll_bytes
        if full:
            self.roll_quietly(lambda k, p: k == key)

    def roll_due(self) -> list[StoredObject]:
        now = time.monotonic()
        return self.roll_quietly(lambda k, p: now - p.opened_at >= self.roll_seconds)

    def roll_quietly(self, predicate) -> list[StoredObject]:
        """Roll; on a storage failure keep the rows buffered (retried next time) and count it."""
        try:
            return self.roll(predicate)
        except Exception:  # noqa: BLE001 - the rows stay buffered and are retried
            self.write_errors += 1
            logger.warning("serve_journal writer %s: writing a file failed; will retry",
                           self.name_prefix, exc_info=True)
            return []

    def roll_all(self) -> list[StoredObject]:
        return self.roll(lambda k, p: True)

    def roll(self, predicate: Callable[[PartitionKey, _OpenPartition], bool]) -> list[StoredObject]:
        # One roll at a time, so file numbers follow write order and a failed write is retried
        # with the same rows before newer ones.
        with self._io_lock:
            with self._lock:
                due = [(k, p) for k, p in self._open.items() if predicate(k, p) and p.rows]
                for k, _ in due:
                    del self._open[k]
            written = []
            for i, (key, part) in enumerate(due):
                try:
                    written.append(self._write(key, part))
                except Exception:
                    # Put back what was not written, ahead of anything newer, and re-raise.
                    with self._lock:
                        for k, p in due[i:]:
                            newer = self._open.pop(k, None)
                            if newer is not None:
                                p.batches.extend(newer.batches)
                                p.nbytes += newer.nbytes
                                p.rows += newer.rows
                            self._open[k] = p
                    raise
            return written

    def _write(self, key: PartitionKey, part: _OpenPartition) -> StoredObject:
        table = pa.Table.from_batches(part.batches)
        data = encode_parquet(table)
        name = f"{self.name_prefix}-{self._files:06d}"
        stored = self.storage.put_new(DEFAULT_SPEC.file_path(key, name), data)
        self._files += 1
        self.rows_written += table.num_rows
        self.bytes_written += len(data)
        for hook in self.on_file_written:
            hook(stored, table, key)
        return stored

    @property
    def buffered_rows(self) -> int:
        with self._lock:
            return sum(p.rows for p in self._open.values())


@ray.remote(num_cpus=0, max_restarts=-1, max_task_retries=-1, max_concurrency=8)
class JournalWriter:
    """A writer actor of the pool: buffers batches per partition, rolls files by size or age.

    Every file it writes gets a record in its own hash-chained manifest (chain id = writer id),
    checkpointed and signed every ``checkpoint_interval_s`` and on flush.
    """

    def __init__(self, settings: SinkSettings, index: int) -> None:
        self.index = index
        self.settings = settings
        storage = settings.storage()
        # A new id per process start: a restarted writer never reuses a file name or a chain.
        self.writer_id = f"w{index:02d}-{uuid.uuid4().hex[:8]}"
        self.manifest = settings.manifest(storage, self.writer_id)
        self.metrics = JournalMetrics("*", "journal-writer", self.writer_id)
        self.files = PartitionFileWriter(storage, self.writer_id, roll_seconds=settings.roll_seconds,
                                         roll_bytes=settings.roll_bytes,
                                         on_file_written=[manifest_hook(self.manifest),
                                                          self._observe_file])
        self.checkpoint_errors = 0
        self._stop = threading.Event()
        tick = min(0.1, settings.roll_seconds / 4)
        self._roller = threading.Thread(target=self._roll_loop, args=(tick,), daemon=True)
        self._roller.start()

    def _observe_file(self, stored: StoredObject, table: pa.Table, key: PartitionKey) -> None:
        """Sink metrics: rows, bytes, and the persistence lag of the file's oldest/newest entry."""
        self.metrics.add_sink(table.num_rows, stored.size)
        bounds = pc.min_max(table.column("ts").cast(pa.int64()))
        now_us = time.time_ns() // 1000
        self.metrics.observe_persistence_lag_ms(
            [(now_us - bounds["min"].as_py()) / 1000.0, (now_us - bounds["max"].as_py()) / 1000.0])

    def _roll_loop(self, tick: float) -> None:
        next_checkpoint = time.monotonic() + self.settings.checkpoint_interval_s
        next_report = time.monotonic() + 5.0
        while not self._stop.wait(tick):
            self.files.roll_due()
            now = time.monotonic()
            if now >= next_checkpoint:
                next_checkpoint = now + self.settings.checkpoint_interval_s
                self._checkpoint()
            if now >= next_report:
                next_report = now + 5.0
                self.metrics.report()

    def _checkpoint(self) -> None:
        try:
            self.manifest.checkpoint()
        except Exception:  # noqa: BLE001 - retried at the next interval; verify shows the lag
            self.checkpoint_errors += 1
            logger.warning("serve_journal writer %s: manifest checkpoint failed", self.writer_id,
                           exc_info=True)

    def write(self, key: PartitionKey, batch: pa.RecordBatch) -> int:
        self.files.add(key, batch)
        return batch.num_rows

    def flush(self) -> int:
        """Write every open partition and checkpoint; returns rows still buffered (0 on success)."""
        self.files.roll_quietly(lambda k, p: True)
        self._checkpoint()
        return self.files.buffered_rows

    def stats(self) -> dict:
        return {
            "writer_id": self.writer_id,
            "rows_written": self.files.rows_written,
            "bytes_written": self.files.bytes_written,
            "buffered_rows": self.files.buffered_rows,
            "write_errors": self.files.write_errors,
            "checkpoint_errors": self.checkpoint_errors,
            "manifest_length": self.manifest.length,
        }


def get_writer_pool(settings: SinkSettings, size: int, namespace: str) -> list[ray.actor.ActorHandle]:
    """Get or create the detached writer actors of a journal root."""
    return [
        JournalWriter.options(
            name=writer_name(settings.journal_uri, i), namespace=namespace, lifetime="detached",
            get_if_exists=True,
        ).remote(settings, i)
        for i in range(size)
    ]


class RayActorTransport:
    """Sends batches to the writer pool; ``flush`` waits until the writers wrote them."""

    def __init__(self, settings: SinkSettings, *, pool_size: int = 2,
                 namespace: str = "serve_journal", producer_id: str = "") -> None:
        self._writers = get_writer_pool(settings, pool_size, namespace)
        self._shard = zlib.crc32(producer_id.encode())
        self._in_flight: list[ray.ObjectRef] = []
        self._closed = False

    def __repr__(self) -> str:
        return f"RayActorTransport(writers={len(self._writers)})"

    def _route(self, key: PartitionKey) -> ray.actor.ActorHandle:
        h = zlib.crc32(f"{key.model}|{key.date}|{key.hour}".encode()) ^ self._shard
        return self._writers[h % len(self._writers)]

    def send(self, batch: pa.RecordBatch) -> None:
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
        start = time.monotonic()
        if not self._settle(timeout):
            return False
        remaining = None if timeout is None else max(0.0, timeout - (time.monotonic() - start))
        refs = [w.flush.remote() for w in self._writers]
        ready, _ = ray.wait(refs, num_returns=len(refs), timeout=remaining)
        return len(ready) == len(refs) and all(left == 0 for left in ray.get(ready))

    def close(self, timeout: float | None = None) -> None:
        if self._closed:
            return
        try:
            self.flush(timeout)
        finally:
            self._closed = True
