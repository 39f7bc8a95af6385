"""The partition file writer's time-based roll counts from the capture time of the oldest entry."""

from __future__ import annotations

import time

import pyarrow as pa

from serve_journal.catalog.layout import split_by_partition
from serve_journal.sink.writer import OpenPartition, PartitionFileWriter
from serve_journal.storage import LocalJournalStorage
from tests.fixtures.kafka import make_entries


def _writer(tmp_path, roll_seconds: float = 1.0) -> PartitionFileWriter:
    return PartitionFileWriter(LocalJournalStorage(str(tmp_path)), "w-0", roll_seconds=roll_seconds,
                               roll_bytes=1 << 30)


def test_roll_counts_from_the_oldest_entrys_capture_time(tmp_path):
    writer = _writer(tmp_path)
    captured = 1_000_000.0  # epoch seconds of the oldest entry
    part = OpenPartition(opened_at=50.0, oldest_ts_s=captured)
    # Arrived 0.7 s after capture: due 0.3 s later, not a whole roll_seconds later.
    assert not writer.due(part, 50.29, captured + 0.99)
    assert writer.due(part, 50.30, captured + 1.0)
    # A producer clock far behind: still at least roll_seconds / 4 of buffering.
    assert not writer.due(part, 50.2, captured + 60)
    assert writer.due(part, 50.26, captured + 60)
    # No ts (or a producer clock ahead): roll_seconds after the partition opened.
    part.oldest_ts_s = None
    assert not writer.due(part, 50.99, captured + 60)
    assert writer.due(part, 51.0, captured + 60)


def test_add_records_the_oldest_entry_and_roll_due_writes_it(tmp_path):
    writer = _writer(tmp_path, roll_seconds=3600)
    now_us = time.time_ns() // 1000
    batch = make_entries(10, base_ts_us=now_us - 7_200_000_000, ts_step_us=1)  # captured 2 h ago
    (key, rows), = split_by_partition(pa.Table.from_batches([batch]))
    fresh = make_entries(5, start_seq=10, base_ts_us=now_us - 7_200_000_000 + 100, ts_step_us=1)
    for b in (*rows.to_batches(), fresh):
        writer.add(key, b)
    part = writer._open[key]
    assert part.oldest_ts_s == (now_us - 7_200_000_000) / 1e6  # the first batch's minimum
    assert writer.roll_due() == []  # opened just now: at least roll_seconds / 4 here
    part.opened_at -= 901  # a quarter of the roll passed since it opened
    (stored,) = writer.roll_due()
    assert writer.rows_written == 15 and writer.buffered_rows == 0
    assert stored.path.endswith(".parquet")
