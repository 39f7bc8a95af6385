"""The disk spool: durable, ordered, bounded; torn and corrupt records detected, never replayed."""

from __future__ import annotations

import logging
import os

import pytest

from serve_journal.transport.spool import HEADER_SIZE, DiskSpool


def _drain(spool: DiskSpool) -> list[bytes]:
    out = []
    while (record := spool.peek()) is not None:
        out.append(record.payload)
        spool.ack(record)
    return out


def _segments(directory) -> list[str]:
    return sorted(name for name in os.listdir(directory) if name.endswith(".spool"))


def test_records_drain_in_order_and_survive_reopen(tmp_path):
    spool = DiskSpool(str(tmp_path), max_bytes=1 << 20, segment_bytes=200)
    payloads = [f"batch-{i}".encode() * (i + 1) for i in range(20)]
    for payload in payloads:
        assert spool.append(payload)
    assert len(_segments(tmp_path)) > 1  # rolled over segments
    first = spool.peek()
    spool.ack(first)
    spool.close()

    reopened = DiskSpool(str(tmp_path), max_bytes=1 << 20, segment_bytes=200)
    assert len(reopened) == 19
    assert _drain(reopened) == payloads[1:]
    assert reopened.bytes_used == 0 and _segments(tmp_path) == []
    # appends after a full drain start cleanly and are found on the next open
    assert reopened.append(b"late")
    reopened.close()
    assert _drain(DiskSpool(str(tmp_path))) == [b"late"]


def test_ack_must_name_the_oldest_record(tmp_path):
    spool = DiskSpool(str(tmp_path))
    spool.append(b"a")
    spool.append(b"b")
    first = spool.peek()
    spool.ack(first)
    with pytest.raises(ValueError, match="oldest"):
        spool.ack(first)


def test_torn_tail_is_detected_and_not_replayed(tmp_path, caplog):
    spool = DiskSpool(str(tmp_path))
    for i in range(3):
        assert spool.append(f"subject-secret-{i}".encode() * 10)
    spool.close()
    (segment,) = _segments(tmp_path)
    path = tmp_path / segment
    size = path.stat().st_size
    with open(path, "r+b") as handle:  # cut the last record in the middle, like a crash would
        handle.truncate(size - 7)
    caplog.set_level(logging.WARNING)
    reopened = DiskSpool(str(tmp_path))
    assert reopened.stats["torn_tails"] == 1
    assert reopened.stats["corrupt_bytes"] == HEADER_SIZE + 160 - 7
    assert _drain(reopened) == [f"subject-secret-{i}".encode() * 10 for i in range(2)]
    assert "torn" in caplog.text
    assert "subject-secret" not in caplog.text  # payloads never reach the log


def test_corrupt_record_in_the_middle_is_skipped_and_counted(tmp_path, caplog):
    spool = DiskSpool(str(tmp_path))
    payloads = [bytes([65 + i]) * 50 for i in range(4)]
    for payload in payloads:
        spool.append(payload)
    spool.close()
    (segment,) = _segments(tmp_path)
    path = tmp_path / segment
    data = bytearray(path.read_bytes())
    data[(HEADER_SIZE + 50) * 1 + HEADER_SIZE + 10] ^= 0xFF  # flip a payload byte of record 2
    path.write_bytes(bytes(data))
    caplog.set_level(logging.WARNING)
    reopened = DiskSpool(str(tmp_path))
    assert reopened.stats["corrupt_records"] == 1
    assert _drain(reopened) == [payloads[0], payloads[2], payloads[3]]
    assert "corrupt" in caplog.text and "BBBB" not in caplog.text


def test_corruption_after_open_is_caught_at_peek(tmp_path):
    spool = DiskSpool(str(tmp_path))
    spool.append(b"x" * 40)
    spool.append(b"y" * 40)
    (segment,) = _segments(tmp_path)
    with open(tmp_path / segment, "r+b") as handle:
        handle.seek(HEADER_SIZE + 5)
        handle.write(b"Z")
    assert _drain(spool) == [b"y" * 40]
    assert spool.stats["corrupt_records"] == 1


def test_full_spool_refuses_and_counts(tmp_path):
    spool = DiskSpool(str(tmp_path), max_bytes=3 * (HEADER_SIZE + 100))
    assert all(spool.append(b"p" * 100) for _ in range(3))
    assert spool.append(b"p" * 100) is False
    assert spool.stats["full"] == 1
    spool.ack(spool.peek())  # the segment is still active: bytes stay until it is drained
    _drain(spool)
    assert spool.append(b"p" * 100)  # fully drained: room again


def test_bad_settings_name_the_field(tmp_path):
    with pytest.raises(ValueError, match="max_bytes"):
        DiskSpool(str(tmp_path), max_bytes=0)


def test_one_spool_per_directory(tmp_path):
    spool = DiskSpool(str(tmp_path))
    with pytest.raises(ValueError, match="in use"):
        DiskSpool(str(tmp_path))
    spool.close()
    DiskSpool(str(tmp_path)).close()
