"""A local, bounded, checksummed, append-only disk spool of batches, drained in order.

The Kafka transport writes a batch here when the broker cannot take it, and resends spooled
batches oldest first once the broker is back. Layout of the spool directory::

    seg-000000000001.spool   segment files, appended to, never rewritten
    seg-000000000002.spool
    cursor                   "<segment> <offset>": first record not yet acknowledged

Each record is ``b"SJR1" | u32 length | sha256(payload) (32 bytes) | payload`` and is followed by
``fsync`` before :meth:`DiskSpool.append` returns, so a batch the transport reports as spooled
survives a crash of the process or the machine.

On open every unacknowledged record is read and verified. A torn tail (a record cut short by a
crash) and a corrupt record (checksum mismatch, bad magic) are counted and logged with the segment
name and offset only, never the payload, and are skipped: the spool resynchronises on the next
record whose magic, length and checksum are all valid. Garbage is never handed to the drainer.

Appends always go to a fresh segment after open, so a torn tail is never written after. The spool
is bounded by ``max_bytes`` (segment files on disk); a full spool makes :meth:`DiskSpool.append`
return ``False`` and the caller applies its overflow policy and counts the drop.

Thread safe: one lock serialises appends, reads and acknowledgements.

**Orphaned spools.** A spool is owned by one process through an ``flock`` on ``.lock``; the
kernel releases it when the process dies, however it dies. A spool created with a ``label``
(the Kafka transport uses its bootstrap servers and topic) also carries a ``.serve-journal-spool``
marker holding the label, so a live process of the same deployment can find a dead sibling's
spool (:func:`find_spools`), take it over (:meth:`DiskSpool.adopt`, which fails while the owner
lives), drain it and :meth:`DiskSpool.remove` it. Unlabelled spools are never adopted.
"""

from __future__ import annotations

import collections
import contextlib
import fcntl
import hashlib
import logging
import os
import re
import struct
import threading
from dataclasses import dataclass

from serve_journal.errors import SpoolInUseError

logger = logging.getLogger(__name__)

MAGIC = b"SJR1"
_HEADER = struct.Struct(">4sI32s")
HEADER_SIZE = _HEADER.size
_SEGMENT = re.compile(r"^seg-(\d{12})\.spool$")
_CURSOR = "cursor"
_LOCK = ".lock"
MARKER = ".serve-journal-spool"


@dataclass(frozen=True, slots=True)
class SpoolRecord:
    """One spooled batch: where it sits and its verified payload."""

    segment: int
    offset: int
    payload: bytes

    @property
    def size(self) -> int:
        """Bytes the record takes in its segment, header included."""
        return HEADER_SIZE + len(self.payload)


class DiskSpool:
    """A bounded spool of byte payloads in a directory; see the module docstring."""

    def __init__(self, directory: str, max_bytes: int = 256 * 1024 * 1024,
                 segment_bytes: int = 16 * 1024 * 1024, *, label: str | None = None,
                 _create: bool = True) -> None:
        if not isinstance(max_bytes, int) or max_bytes < HEADER_SIZE + 1:
            raise ValueError(f"max_bytes must be an integer > {HEADER_SIZE}, got {max_bytes!r}")
        if not isinstance(segment_bytes, int) or segment_bytes < 1:
            raise ValueError(f"segment_bytes must be a positive integer, got {segment_bytes!r}")
        self.directory = os.path.abspath(directory)
        self.max_bytes = max_bytes
        self.segment_bytes = segment_bytes
        self._lock = threading.Lock()
        self._index: collections.deque[tuple[int, int, int]] = collections.deque()  # seg, off, len
        self._segment_sizes: dict[int, int] = {}
        self._active: int | None = None
        self._next_number = 1
        self._active_file = None
        self._closed = False
        self.stats: dict[str, int] = {
            "appended": 0, "acked": 0, "full": 0,
            "corrupt_records": 0, "torn_tails": 0, "corrupt_bytes": 0,
        }
        self.label = label
        if _create:
            os.makedirs(self.directory, exist_ok=True)
        # Adopting: no O_CREAT, so a spool removed meanwhile is not brought back empty.
        flags = os.O_RDWR | (os.O_CREAT if _create else 0)
        self._lock_file = os.fdopen(os.open(os.path.join(self.directory, _LOCK), flags, 0o600), "r+")
        try:
            fcntl.flock(self._lock_file, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            self._lock_file.close()
            raise SpoolInUseError(
                f"spool directory {self.directory!r} is in use by another spool; give every "
                "producer process its own directory"
            ) from None
        marker = os.path.join(self.directory, MARKER)
        if not _create and _read_marker(self.directory) != label:
            self._lock_file.close()  # removed (or relabelled) while we waited for the lock
            raise FileNotFoundError(marker)
        if _create and label is not None and _read_marker(self.directory) != label:
            tmp = marker + ".tmp"
            with open(tmp, "w") as handle:
                handle.write(label)
                handle.flush()
                os.fsync(handle.fileno())
            os.replace(tmp, marker)
        self._recover()

    @classmethod
    def adopt(cls, directory: str, label: str, max_bytes: int = 256 * 1024 * 1024,
              segment_bytes: int = 16 * 1024 * 1024) -> DiskSpool | None:
        """Take over the spool another process left in ``directory``.

        ``None`` when its owner still holds it, when it is gone, or when its marker does not
        carry ``label`` (another deployment's spool, or not a spool at all).
        """
        if _read_marker(directory) != label:
            return None
        try:
            return cls(directory, max_bytes, segment_bytes, label=label, _create=False)
        except (SpoolInUseError, FileNotFoundError):
            return None

    def remove(self) -> None:
        """Delete this drained spool's directory and close it; refused while records remain."""
        with self._lock:
            if self._index:
                raise ValueError(f"spool {self.directory!r} still holds {len(self._index)} records")
            self._closed = True
            if self._active_file is not None:
                self._active_file.close()
                self._active_file = None
            # The marker goes first: whoever opened .lock meanwhile sees no marker and backs off.
            for name in [MARKER, *sorted(os.listdir(self.directory))]:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(os.path.join(self.directory, name))
            with contextlib.suppress(OSError):
                os.rmdir(self.directory)
            if not self._lock_file.closed:
                self._lock_file.close()

    # -- introspection -------------------------------------------------------------------------

    def __len__(self) -> int:
        with self._lock:
            return len(self._index)

    def __repr__(self) -> str:
        return f"DiskSpool({self.directory!r}, records={len(self._index)}, bytes={self.bytes_used})"

    @property
    def bytes_used(self) -> int:
        """Bytes of segment files on disk (what ``max_bytes`` bounds)."""
        return sum(self._segment_sizes.values())

    # -- writing -------------------------------------------------------------------------------

    def append(self, payload: bytes) -> bool:
        """Append ``payload`` durably (fsync); ``False`` when the spool is full or closed.

        Raises ``OSError`` when the disk fails; the spool stays usable (a fresh segment next)."""
        record = _HEADER.pack(MAGIC, len(payload), hashlib.sha256(payload).digest()) + payload
        with self._lock:
            if self._closed:
                return False
            if self.bytes_used + len(record) > self.max_bytes:
                self.stats["full"] += 1
                return False
            if self._active is None or self._segment_sizes[self._active] >= self.segment_bytes:
                self._open_new_segment()
            assert self._active is not None and self._active_file is not None
            offset = self._segment_sizes[self._active]
            try:
                self._active_file.write(record)
                self._active_file.flush()
                os.fsync(self._active_file.fileno())
            except OSError:
                # Part of the record may be on disk: never append after it (the next append
                # opens a fresh segment); recovery skips the torn bytes.
                self._segment_sizes[self._active] = offset + len(record)
                with contextlib.suppress(OSError):
                    self._active_file.close()
                self._active_file = None
                self._active = None
                raise
            self._segment_sizes[self._active] = offset + len(record)
            self._index.append((self._active, offset, len(payload)))
            self.stats["appended"] += 1
            return True

    def _open_new_segment(self) -> None:
        if self._active_file is not None:
            self._active_file.close()
            self._active_file = None
            self._active = None  # stays so if opening the next one fails
        number = self._next_number
        self._next_number += 1
        path = self._segment_path(number)
        self._active_file = open(path, "xb")  # noqa: SIM115 - kept open across appends
        self._active = number
        self._segment_sizes[number] = 0
        _fsync_dir(self.directory)

    # -- reading -------------------------------------------------------------------------------

    def peek(self) -> SpoolRecord | None:
        """The oldest unacknowledged record, verified again; ``None`` when the spool is empty."""
        with self._lock:
            while self._index:
                segment, offset, length = self._index[0]
                payload = self._read_verified(segment, offset, length)
                if payload is not None:
                    return SpoolRecord(segment, offset, payload)
                self._index.popleft()
                self._after_consume(segment, offset + HEADER_SIZE + length)
            return None

    def peek_many(self, max_records: int, max_bytes: int = 8 * 1024 * 1024) -> list[SpoolRecord]:
        """Up to ``max_records`` oldest records (at least one if any), verified; ack them in order."""
        out: list[SpoolRecord] = []
        total = 0
        with self._lock:
            position = 0
            while position < len(self._index) and len(out) < max_records:
                segment, offset, length = self._index[position]
                if out and total + length > max_bytes:
                    break
                payload = self._read_verified(segment, offset, length)
                if payload is None:
                    if position == 0:
                        self._index.popleft()
                        self._after_consume(segment, offset + HEADER_SIZE + length)
                        continue
                    break  # a bad record further on: stop before it; peek() skips it later
                out.append(SpoolRecord(segment, offset, payload))
                total += length
                position += 1
        return out

    def ack(self, record: SpoolRecord) -> None:
        """Forget ``record`` (it was delivered); must be the record :meth:`peek` returned."""
        with self._lock:
            if not self._index or self._index[0][:2] != (record.segment, record.offset):
                raise ValueError("ack must name the oldest record, as returned by peek()")
            self._index.popleft()
            self.stats["acked"] += 1
            self._after_consume(record.segment, record.offset + record.size)

    def _after_consume(self, segment: int, next_offset: int) -> None:
        """Persist the cursor; delete segments nothing points into any more."""
        if self._index:
            cursor = self._index[0][:2]
        else:
            # Fully drained: the active segment goes too, so drained bytes stop counting.
            if self._active_file is not None:
                self._active_file.close()
                self._active_file = None
            self._active = None
            cursor = (self._next_number, 0)
        self._write_cursor(*cursor)
        for number in sorted(self._segment_sizes):
            if number >= cursor[0]:
                break
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self._segment_path(number))
            del self._segment_sizes[number]

    def _read_verified(self, segment: int, offset: int, length: int) -> bytes | None:
        try:
            with open(self._segment_path(segment), "rb") as handle:
                handle.seek(offset)
                data = handle.read(HEADER_SIZE + length)
        except OSError:
            if not os.path.isdir(self.directory):
                raise  # the whole spool is unreachable (disk gone): retry later, skip nothing
            logger.warning("spool segment %s unreadable; skipping its record at offset %d",
                           self._segment_name(segment), offset)
            self.stats["corrupt_records"] += 1
            return None
        payload = _verify(data, 0)
        if payload is None:
            logger.warning("spool record in %s at offset %d failed its checksum; skipped",
                           self._segment_name(segment), offset)
            self.stats["corrupt_records"] += 1
            self.stats["corrupt_bytes"] += len(data)
        return payload

    # -- recovery ------------------------------------------------------------------------------

    def _recover(self) -> None:
        numbers = sorted(
            int(m.group(1)) for name in os.listdir(self.directory) if (m := _SEGMENT.match(name))
        )
        cursor_segment, cursor_offset = self._read_cursor()
        for number in numbers:
            path = self._segment_path(number)
            if number < cursor_segment:
                os.unlink(path)
                continue
            with open(path, "rb") as handle:
                data = handle.read()
            self._segment_sizes[number] = len(data)
            start = cursor_offset if number == cursor_segment else 0
            self._scan(number, data, start)
        self._next_number = max([cursor_segment, *numbers]) + 1
        self._active = None  # appends go to a fresh segment

    def _scan(self, number: int, data: bytes, pos: int) -> None:
        name = self._segment_name(number)
        while pos < len(data):
            if len(data) - pos < HEADER_SIZE:
                self._torn(name, pos, len(data) - pos)
                return
            magic, length, _ = _HEADER.unpack_from(data, pos)
            if magic == MAGIC and pos + HEADER_SIZE + length > len(data):
                if _find_valid(data, pos + 1) is None:
                    self._torn(name, pos, len(data) - pos)
                    return
                payload = None
            else:
                payload = _verify(data, pos) if magic == MAGIC else None
            if payload is not None:
                self._index.append((number, pos, length))
                pos += HEADER_SIZE + length
                continue
            resume = _find_valid(data, pos + 1)
            skipped = (resume if resume is not None else len(data)) - pos
            if resume is None:
                self._torn(name, pos, skipped)
                return
            logger.warning("spool %s: %d corrupt bytes at offset %d skipped", name, skipped, pos)
            self.stats["corrupt_records"] += 1
            self.stats["corrupt_bytes"] += skipped
            pos = resume

    def _torn(self, name: str, offset: int, size: int) -> None:
        logger.warning("spool %s: torn or corrupt tail of %d bytes at offset %d discarded",
                       name, size, offset)
        self.stats["torn_tails"] += 1
        self.stats["corrupt_bytes"] += size

    def _read_cursor(self) -> tuple[int, int]:
        try:
            with open(os.path.join(self.directory, _CURSOR)) as handle:
                segment, offset = handle.read().split()
                return int(segment), int(offset)
        except (FileNotFoundError, ValueError):
            return 0, 0

    def _write_cursor(self, segment: int, offset: int) -> None:
        tmp = os.path.join(self.directory, f".{_CURSOR}.tmp")
        with open(tmp, "w") as handle:
            handle.write(f"{segment} {offset}\n")
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, os.path.join(self.directory, _CURSOR))

    # -- lifecycle -----------------------------------------------------------------------------

    def close(self) -> None:
        """Close the active segment; harmless twice. Unacknowledged records stay on disk."""
        with self._lock:
            self._closed = True
            if self._active_file is not None:
                self._active_file.close()
                self._active_file = None
            if not self._lock_file.closed:
                self._lock_file.close()  # releases the flock

    def _segment_name(self, number: int) -> str:
        return f"seg-{number:012d}.spool"

    def _segment_path(self, number: int) -> str:
        return os.path.join(self.directory, self._segment_name(number))


def find_spools(base: str, label: str, exclude: str | None = None) -> list[str]:
    """Directories directly below ``base`` holding a spool marked with ``label``, oldest first."""
    try:
        names = os.listdir(base)
    except OSError:
        return []
    skip = os.path.abspath(exclude) if exclude else None
    found = []
    for name in names:
        directory = os.path.abspath(os.path.join(base, name))
        if directory != skip and _read_marker(directory) == label:
            with contextlib.suppress(OSError):
                found.append((os.stat(os.path.join(directory, MARKER)).st_mtime, directory))
    return [directory for _, directory in sorted(found)]


def _read_marker(directory: str) -> str | None:
    try:
        with open(os.path.join(directory, MARKER)) as handle:
            return handle.read()
    except (OSError, UnicodeDecodeError):
        return None


def _verify(data: bytes, pos: int) -> bytes | None:
    """The payload of a valid record at ``pos`` of ``data``, else ``None``."""
    if len(data) - pos < HEADER_SIZE:
        return None
    magic, length, digest = _HEADER.unpack_from(data, pos)
    end = pos + HEADER_SIZE + length
    if magic != MAGIC or end > len(data):
        return None
    payload = data[pos + HEADER_SIZE:end]
    return payload if hashlib.sha256(payload).digest() == digest else None


def _find_valid(data: bytes, pos: int) -> int | None:
    """Offset of the next valid record at or after ``pos`` (resynchronisation)."""
    while True:
        pos = data.find(MAGIC, pos)
        if pos < 0:
            return None
        if _verify(data, pos) is not None:
            return pos
        pos += 1


def _fsync_dir(directory: str) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


__all__ = ["DiskSpool", "SpoolInUseError", "SpoolRecord", "find_spools"]
