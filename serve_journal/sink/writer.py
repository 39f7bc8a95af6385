"""The one partition file writer: journal rows to create-only Parquet files, one per partition.

Both writers of journal files go through :class:`PartitionFileWriter`:

* the Ray writer actor (``sink/actor.py``) buffers rows per partition (:meth:`~PartitionFileWriter.add`)
  and rolls each partition into a file named ``<prefix>-<n>`` when it reaches ``roll_bytes`` or
  ``roll_seconds`` of age;
* the Kafka sink (``sink/kafka.py``) writes each part of a chunk at once under its deterministic
  name (:meth:`~PartitionFileWriter.write_file` with ``name``).

Either way a file is encoded by :func:`serve_journal.fileformat.encode_parquet`, stored with
:meth:`JournalStorage.put_new` (exclusive create locally, If-None-Match on S3: an existing file is
never overwritten) and then handed to every ``on_file_written`` hook (the manifest record).
Plain Python, no Ray.

:func:`warm_up` runs a file's encoding steps once on a synthetic entry, in memory, so that the
first real file of a new writer process is not the one that pays for lazy imports and first-use
initialisation (~0.3-0.6 s measured: pandas is imported on the first partition split).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

import pyarrow as pa
import pyarrow.compute as pc

from serve_journal.catalog.layout import (
    DEFAULT_SPEC,
    PartitionKey,
    PartitionSpec,
    split_by_partition,
)
from serve_journal.fileformat import HOT_OPTIONS, ParquetOptions, encode_parquet
from serve_journal.integrity.manifest import build_file_record
from serve_journal.schema import ENTRY_SCHEMA, SCHEMA_VERSION
from serve_journal.storage import JournalStorage, StoredObject

logger = logging.getLogger("serve_journal")

FileWrittenHook = Callable[[StoredObject, pa.Table, PartitionKey], None]
"""``hook(stored, table, key)``: called after each file is stored, with the rows it holds."""


@dataclass
class OpenPartition:
    """Rows buffered for one partition, not yet in a file."""

    batches: list[pa.RecordBatch] = field(default_factory=list)
    nbytes: int = 0
    rows: int = 0
    opened_at: float = field(default_factory=time.monotonic)
    oldest_ts_s: float | None = None
    """Epoch seconds of the oldest entry buffered (its capture time), when the rows have ``ts``."""


RollPredicate = Callable[[PartitionKey, OpenPartition], bool]


class PartitionFileWriter:
    """Writes journal rows as create-only Parquet files, one partition per file; see the module
    docstring. ``name_prefix`` names the files of the buffered path (``<prefix>-000000``, ...)."""

    def __init__(self, storage: JournalStorage, name_prefix: str, *, roll_seconds: float,
                 roll_bytes: int, on_file_written: Iterable[FileWrittenHook] | None = None,
                 parquet: ParquetOptions = HOT_OPTIONS, spec: PartitionSpec = DEFAULT_SPEC) -> None:
        self.storage = storage
        self.name_prefix = name_prefix
        self.roll_seconds = roll_seconds
        self.roll_bytes = roll_bytes
        self.on_file_written = list(on_file_written or [])
        self.parquet = parquet
        self.spec = spec
        self._open: dict[PartitionKey, OpenPartition] = {}
        self.opened = threading.Event()
        """Set when a partition opens (a roll becomes due some time from now): a thread waiting
        for :meth:`next_due_in` to pass wakes to look again."""
        self._lock = threading.Lock()
        self._io_lock = threading.Lock()
        self._files = 0
        self.rows_written = 0
        self.bytes_written = 0
        self.write_errors = 0

    # -- one file ------------------------------------------------------------------------------

    def write_file(self, key: PartitionKey, table: pa.Table, name: str | None = None) -> StoredObject:
        """Encode ``table`` and store it create-only as a file of partition ``key``, then call
        every hook. ``name`` (no suffix) defaults to the next ``<prefix>-<n>``.

        Raises :class:`~serve_journal.storage.ObjectExistsError` when a file of that name
        exists (nothing is stored nor recorded then), or what storage raised.
        """
        data = encode_parquet(table, self.parquet)
        numbered = name is None
        path = self.spec.file_path(key, f"{self.name_prefix}-{self._files:06d}" if numbered else name)
        stored = self.storage.put_new(path, data)
        if numbered:
            self._files += 1
        self.rows_written += table.num_rows
        self.bytes_written += len(data)
        for hook in self.on_file_written:
            hook(stored, table, key)
        return stored

    # -- buffered rows, rolled by size or age --------------------------------------------------

    def add(self, key: PartitionKey, batch: pa.RecordBatch) -> None:
        """Buffer ``batch`` (rows of partition ``key``); roll the partition once it is full."""
        with self._lock:
            part = self._open.get(key)
            if part is None:
                part = self._open[key] = OpenPartition()
            if not part.rows and batch.num_rows:
                self.opened.set()  # rows to roll some time from now
            if part.oldest_ts_s is None:
                part.oldest_ts_s = _oldest_ts_s(batch)
            part.batches.append(batch)
            part.nbytes += batch.nbytes
            part.rows += batch.num_rows
            full = part.nbytes >= self.roll_bytes
        if full:
            self.roll_quietly(lambda k, p: k == key)

    def roll_due(self) -> list[StoredObject] | None:
        """Roll (quietly) every partition due: see :meth:`due`; ``None`` when a write failed."""
        now, wall = time.monotonic(), time.time()
        return self.roll_quietly(lambda k, p: self.due(p, now, wall))

    def due(self, part: OpenPartition, now: float, wall: float) -> bool:
        """Whether ``part`` is to be written now (``now``: monotonic, ``wall``: epoch seconds).

        ``roll_seconds`` counts from the capture time of its oldest entry, so the time entries
        spent in the replica's buffer and on the way here is not added on top (persistence
        latency stays near ``roll_seconds``); a producer clock far behind this one still leaves
        files of at least ``roll_seconds / 4`` of buffering. Without ``ts`` it counts from when
        the partition opened here."""
        age = now - part.opened_at
        if age >= self.roll_seconds:
            return True
        return (part.oldest_ts_s is not None and wall - part.oldest_ts_s >= self.roll_seconds
                and age >= self.roll_seconds / 4)

    def next_due_in(self) -> float | None:
        """Seconds until the first open partition is :meth:`due` (0 when one is), ``None`` when
        none is open: how long a roll thread may sleep."""
        now, wall = time.monotonic(), time.time()
        with self._lock:
            parts = [p for p in self._open.values() if p.rows]
        if not parts:
            return None
        soonest = min(self._due_in(p, now, wall) for p in parts)
        return max(0.0, soonest)

    def _due_in(self, part: OpenPartition, now: float, wall: float) -> float:
        """Seconds until :meth:`due` turns true for ``part`` (its two conditions, solved)."""
        by_age = part.opened_at + self.roll_seconds - now
        if part.oldest_ts_s is None:
            return by_age
        by_ts = max(part.oldest_ts_s + self.roll_seconds - wall,
                    part.opened_at + self.roll_seconds / 4 - now)
        return min(by_age, by_ts)

    def roll_quietly(self, predicate: RollPredicate) -> list[StoredObject] | None:
        """Roll; on a storage failure keep the rows buffered (retried next time), count it and
        return ``None``."""
        try:
            return self.roll(predicate)
        except Exception:  # noqa: BLE001 - the rows stay buffered and are retried
            self.write_errors += 1
            logger.warning("serve_journal writer %s: writing a file failed; will retry",
                           self.name_prefix, exc_info=True)
            return None

    def roll_all(self) -> list[StoredObject]:
        """Roll every open partition; raises when storage fails (the rows stay buffered)."""
        return self.roll(lambda k, p: True)

    def roll(self, predicate: RollPredicate) -> list[StoredObject]:
        """Write one file per open partition that ``predicate`` selects; returns the files.

        On a failure the partitions not written are put back, ahead of newer rows, and the error
        is raised.
        """
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
                    written.append(self.write_file(key, pa.Table.from_batches(part.batches)))
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
                    self.opened.set()  # due again, maybe sooner than the roll thread thinks
                    raise
            return written

    @property
    def buffered_rows(self) -> int:
        """Rows buffered and not yet in a file."""
        with self._lock:
            return sum(p.rows for p in self._open.values())


def warm_up(parquet: ParquetOptions = HOT_OPTIONS, table: pa.Table | None = None) -> None:
    """Split, encode and record ``table`` (default: one synthetic entry) once, in memory.

    Nothing is stored and no hook runs: this only loads what a file's first write would load
    lazily (modules, Arrow kernels, Parquet writer), so that a new writer's first file is
    written as fast as its later ones. Call it when the writer starts, before it takes entries.
    """
    try:
        table = synthetic_entries() if table is None else table
        for _, rows in split_by_partition(table):
            rows = rows if isinstance(rows, pa.Table) else pa.Table.from_batches([rows])
            data = encode_parquet(rows, parquet)
            build_file_record(StoredObject("warm-up.parquet", len(data), "", None), rows, "hot")
    except Exception:  # noqa: BLE001 - only a speed-up: the real writes report their own errors
        logger.warning("serve_journal: warming up the file writer failed", exc_info=True)


def synthetic_entries() -> pa.Table:
    """One made-up entry of every column of the entry schema (no real data; for warm-ups)."""
    now_us = time.time_ns() // 1000
    row = {field.name: _synthetic_value(field.type, now_us) for field in ENTRY_SCHEMA}
    row["schema_version"] = SCHEMA_VERSION
    return pa.Table.from_pylist([row], schema=ENTRY_SCHEMA)


def _synthetic_value(typ: pa.DataType, now_us: int):
    if pa.types.is_timestamp(typ):
        return now_us
    if pa.types.is_string(typ):
        return "warm-up"
    if pa.types.is_integer(typ):
        return 1
    if pa.types.is_floating(typ):
        return 0.5
    if pa.types.is_boolean(typ):
        return True
    if pa.types.is_list(typ):
        return [_synthetic_value(typ.value_type, now_us)]
    if pa.types.is_struct(typ):
        return {typ.field(i).name: _synthetic_value(typ.field(i).type, now_us)
                for i in range(typ.num_fields)}
    return None


def _oldest_ts_s(batch: pa.RecordBatch) -> float | None:
    if "ts" not in batch.schema.names or not batch.num_rows:
        return None
    oldest = pc.min(batch.column("ts").cast(pa.int64())).as_py()
    return None if oldest is None else oldest / 1e6


__all__ = ["FileWrittenHook", "OpenPartition", "PartitionFileWriter", "synthetic_entries", "warm_up"]
