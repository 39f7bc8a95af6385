"""The writer actors of the embedded transport: a pool of detached Ray actors writing Parquet.

Each :class:`JournalWriter` keeps one open buffer per partition in a
:class:`~serve_journal.sink.writer.PartitionFileWriter` and rolls it into a file when it reaches
``roll_bytes`` or ``roll_seconds`` of age, whichever comes first. Writers are detached, named
actors (one pool per journal root, named by the producer side: ``transport/actors.py``), so they
outlive the replicas that feed them and finish writing what a stopping replica flushed.

Durability: an entry is durable once its file is written. Entries a writer holds in memory (at
most ``roll_seconds`` worth) are lost if that writer process crashes; the Kafka transport is the
path that survives that.
"""

from __future__ import annotations

import logging
import threading
import time
import uuid
from collections.abc import Sequence
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import ray

from serve_journal.catalog.layout import PartitionKey
from serve_journal.metrics import JournalMetrics
from serve_journal.retry import Backoff
from serve_journal.sink.settings import BackgroundPublisher, SinkSettings, manifest_hook
from serve_journal.sink.writer import PartitionFileWriter, warm_up
from serve_journal.storage import StoredObject
from serve_journal.transport.wire import read_arrow_stream

logger = logging.getLogger("serve_journal")

ROLL_SLACK_S = 0.005
"""The roll thread wakes this long after a partition is due (not before: then it rolls it)."""
ROLL_LOOP_MAX_SLEEP_S = 1.0
"""The longest the roll thread sleeps unwoken."""
ROLL_RETRY_S = 0.05
"""After a failed file write the roll thread waits this long, doubling up to
:data:`ROLL_RETRY_MAX_S`, before it tries again (not at every due partition's 5 ms slack)."""
ROLL_RETRY_MAX_S = 2.0


@ray.remote(num_cpus=0, max_restarts=-1, max_task_retries=-1, max_concurrency=8)
class JournalWriter:
    """A writer actor of the pool: buffers batches per partition, rolls files by size or age.

    Every file it writes gets a record in its own hash-chained manifest (chain id = writer id),
    checkpointed and signed every ``checkpoint_interval_s`` and on flush.
    """

    def __init__(self, settings: SinkSettings, index: int) -> None:
        self.index = index
        self.settings = settings
        storage = self.storage = settings.storage()
        # A new id per process start: a restarted writer never reuses a file name or a chain.
        self.writer_id = f"w{index:02d}-{uuid.uuid4().hex[:8]}"
        self.manifest = settings.manifest(storage, self.writer_id)
        self.metrics = JournalMetrics("*", "journal-writer", self.writer_id)
        warm_up()  # before its first roll, not during it (the transport waits for this actor)
        self.files = PartitionFileWriter(storage, self.writer_id, roll_seconds=settings.roll_seconds,
                                         roll_bytes=settings.roll_bytes,
                                         on_file_written=[manifest_hook(self.manifest),
                                                          self._observe_file])
        self.checkpoint_errors = 0
        self._published_length = 0
        self.iceberg = BackgroundPublisher(settings, storage)
        self._stop = threading.Event()
        self._roll_backoff = Backoff(ROLL_RETRY_S, ROLL_RETRY_MAX_S)
        self._roller = threading.Thread(target=self._roll_loop, daemon=True)
        self._roller.start()

    def _observe_file(self, stored: StoredObject, table: pa.Table, key: PartitionKey) -> None:
        """Sink metrics: rows, bytes, and the persistence lag of the file's oldest/newest entry."""
        self.metrics.add_sink(table.num_rows, stored.size)
        bounds = pc.min_max(table.column("ts").cast(pa.int64()))
        now_us = time.time_ns() // 1000
        self.metrics.observe_persistence_lag_ms(
            [(now_us - bounds["min"].as_py()) / 1000.0, (now_us - bounds["max"].as_py()) / 1000.0])

    def _roll_loop(self) -> None:
        """Rolls each partition when it is due, checkpoints and reports; it sleeps until the next
        of those is due or a partition opens (it polled every 50 ms before: 20 wake-ups a second
        of a process that shares the replicas' cores, each a GIL handoff)."""
        next_checkpoint = time.monotonic() + self.settings.checkpoint_interval_s
        next_report = time.monotonic() + 5.0
        files = self.files
        while not self._stop.is_set():
            due_in = files.next_due_in()
            now = time.monotonic()
            wait = min(next_checkpoint - now, next_report - now, ROLL_LOOP_MAX_SLEEP_S)
            if due_in is not None:
                wait = min(wait, due_in + ROLL_SLACK_S)
            if wait > 0:
                files.opened.wait(wait)
            files.opened.clear()
            if self._stop.is_set():
                return
            if files.roll_due() is None:  # storage failed: the rows wait, retried with back-off
                self._stop.wait(self._roll_backoff.next_delay())
            else:
                self._roll_backoff.reset()
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
            return
        # Signed files go to the Iceberg table (when configured), off the roll thread.
        length = self.manifest.length
        if length != self._published_length:
            self._published_length = length
            self.iceberg.request()

    def write(self, key: PartitionKey, batch: pa.RecordBatch | bytes) -> int:
        """Buffer the rows of one partition (a record batch, or one as a bare Arrow IPC stream:
        what the transport sends); returns how many."""
        if not isinstance(batch, pa.RecordBatch):
            batch = read_arrow_stream(batch)
        self.files.add(key, batch)
        return batch.num_rows

    def flush(self) -> int:
        """Write every open partition and checkpoint; returns rows still buffered (0 on success)."""
        self.files.roll_quietly(lambda k, p: True)
        self._checkpoint()
        return self.files.buffered_rows

    def stop(self, timeout: float = 10.0) -> None:
        """Stop the roll thread (rows still buffered stay so: :meth:`flush` first). An actor
        ends with its process; this is for the class run in-process."""
        self._stop.set()
        self.files.opened.set()
        self._roller.join(timeout)

    def stats(self) -> dict[str, Any]:
        """Rows and bytes written, rows buffered, error counts and the manifest chain's length."""
        return {
            "writer_id": self.writer_id,
            "rows_written": self.files.rows_written,
            "bytes_written": self.files.bytes_written,
            "buffered_rows": self.files.buffered_rows,
            "write_errors": self.files.write_errors,
            "roller_alive": self._roller.is_alive(),
            "checkpoint_errors": self.checkpoint_errors,
            "manifest_length": self.manifest.length,
            "iceberg_publishes": self.iceberg.published,
            "iceberg_failures": self.iceberg.failures,
        }


def get_writer_pool(settings: SinkSettings, names: Sequence[str],
                    namespace: str) -> list[ray.actor.ActorHandle]:
    """Get or create the detached writer actors called ``names`` (writer ``i`` gets index ``i``).

    The producer side owns the names (``serve_journal.transport.actors.writer_name``): it is
    the one that finds the writers again.
    """
    return [
        JournalWriter.options(
            name=name, namespace=namespace, lifetime="detached", get_if_exists=True,
        ).remote(settings, i)
        for i, name in enumerate(names)
    ]


__all__ = ["JournalWriter", "get_writer_pool"]
