"""The partition file writer's time-based roll counts from the capture time of the oldest entry."""

from __future__ import annotations

import time

import pyarrow as pa
from hypothesis import given, settings
from hypothesis import strategies as st

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


@given(opened_ago=st.floats(0, 10), oldest_ago=st.none() | st.floats(-10, 20),
       roll=st.floats(0.05, 5))
@settings(max_examples=300, deadline=None)
def test_next_due_in_is_exactly_when_due_turns_true(opened_ago, oldest_ago, roll):
    """The writer actor's roll thread sleeps ``next_due_in`` (it polled every 50 ms before): the
    partition is not due a little before that and is due from then on."""
    writer = PartitionFileWriter(LocalJournalStorage("/nonexistent-never-written"), "w-0",
                                 roll_seconds=roll, roll_bytes=1 << 30)
    now, wall = 1000.0, 2_000_000.0
    part = OpenPartition(rows=1, opened_at=now - opened_ago,
                         oldest_ts_s=None if oldest_ago is None else wall - oldest_ago)
    due_in = max(0.0, writer._due_in(part, now, wall))
    eps = 1e-6
    assert writer.due(part, now + due_in + eps, wall + due_in + eps)
    if due_in > eps:
        assert not writer.due(part, now + due_in - eps, wall + due_in - eps)


def test_a_new_partition_wakes_the_roll_thread_and_next_due_in_follows_it(tmp_path):
    writer = _writer(tmp_path, roll_seconds=4.0)
    assert writer.next_due_in() is None and not writer.opened.is_set()
    now_us = time.time_ns() // 1000
    batch = make_entries(3, base_ts_us=now_us - 3_000_000, ts_step_us=1)  # captured 3 s ago
    (key, rows), = split_by_partition(pa.Table.from_batches([batch]))
    writer.add(key, rows.to_batches()[0])
    assert writer.opened.is_set()
    assert 0.9 <= writer.next_due_in() <= 1.0  # 4 s from capture, at least 1 s after it opened
    writer.opened.clear()
    writer.add(key, rows.to_batches()[0])  # same partition: no new wake-up
    assert not writer.opened.is_set()
    writer._open[key].opened_at -= 5  # roll_seconds since it opened
    assert writer.next_due_in() == 0.0
    assert len(writer.roll_due()) == 1 and writer.next_due_in() is None


def test_the_writer_actors_roll_thread_backs_off_while_storage_fails(tmp_path):
    """A due partition whose write fails stays buffered and is retried with back-off (50 ms,
    doubling), not at the roll thread's 5 ms slack; once storage is back it is written."""
    from serve_journal.sink.actor import JournalWriter
    from serve_journal.sink.settings import SinkSettings

    settings = SinkSettings(journal_uri=str(tmp_path / "journal"), roll_seconds=0.05,
                            dev_mode=True, iceberg=None)
    writer = JournalWriter.__ray_actor_class__(settings, 0)
    attempts = []
    real_put = writer.files.storage.put_new
    failing = [True]

    def put_new(path, data):
        if failing[0]:
            attempts.append(time.monotonic())
            raise OSError("storage unavailable")
        return real_put(path, data)

    writer.files.storage.put_new = put_new
    try:
        now_us = time.time_ns() // 1000
        (key, rows), = split_by_partition(pa.Table.from_batches(
            [make_entries(4, base_ts_us=now_us, ts_step_us=1)]))
        writer.write(key, rows.to_batches()[0])
        time.sleep(1.5)
        assert 3 <= len(attempts) <= 8  # 0.05 + 0.1 + 0.2 + 0.4 + 0.8 s apart, not every 5 ms
        failing[0] = False
        deadline = time.monotonic() + 10
        while writer.files.rows_written < 4 and time.monotonic() < deadline:
            time.sleep(0.02)  # a deadline-bounded wait for the roll thread
        assert writer.files.rows_written == 4
        assert writer.files.write_errors == len(attempts)
    finally:
        writer.stop()
    assert not writer._roller.is_alive()


def test_rows_after_an_empty_batch_still_wake_the_roll_thread(tmp_path):
    """An empty batch opens a partition with no rows: the rows that follow must still wake the
    roll thread (it sleeps until a partition with rows is due)."""
    writer = _writer(tmp_path, roll_seconds=0.3)
    now_us = time.time_ns() // 1000
    batch = make_entries(2, base_ts_us=now_us, ts_step_us=1)
    (key, rows), = split_by_partition(pa.Table.from_batches([batch]))
    writer.add(key, rows.to_batches()[0].slice(0, 0))
    assert not writer.opened.is_set() and writer.next_due_in() is None
    writer.add(key, rows.to_batches()[0])
    assert writer.opened.is_set() and writer.next_due_in() is not None


def test_a_root_over_hashes_of_mixed_lengths_pairs_them_as_given():
    """root_from_leaf_hashes joins a level into one buffer only when every hash is 32 bytes:
    lengths that merely add up (30 + 34) are paired as given, as before."""
    import hashlib

    from serve_journal.integrity.merkle import node_hash, root_from_leaf_hashes

    hashes = [b"a" * 30, b"b" * 34, b"c" * 32, b"d" * 32]
    expected = node_hash(node_hash(hashes[0], hashes[1]), node_hash(hashes[2], hashes[3]))
    assert root_from_leaf_hashes(hashes) == expected
    digests = [hashlib.sha256(bytes([i])).digest() for i in range(5)]
    assert root_from_leaf_hashes(digests) == node_hash(
        node_hash(node_hash(digests[0], digests[1]), node_hash(digests[2], digests[3])), digests[4])
