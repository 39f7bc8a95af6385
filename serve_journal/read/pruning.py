"""Point-lookup pruning: Parquet footers, row-group statistics and split-block bloom filters.

A file's footer is read once (files are write-once, so it never goes stale) into a
:class:`FileIndex` that keeps, per row group, the subject token's min/max and where the bloom
filters of ``subject_token`` and ``request_id`` are. :meth:`FileIndex.candidates` tests the
statistics and one 32-byte bloom block per row group (Parquet's split-block bloom filter over
XXH64, implemented here from the format specification) and returns the row groups that may hold
a value; :meth:`FileIndex.read_matching` reads only those row groups (the query's point lookups
and forget's count of a subject's entries); :class:`FooterCache` keeps the indexes of recently
used files.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from serve_journal.schema import ADDED_COLUMNS, ENTRY_SCHEMA, restore_output_scores, stored_columns
from serve_journal.storage import JournalStorage

_P1, _P2, _P3 = 0x9E3779B185EBCA87, 0xC2B2AE3D27D4EB4F, 0x165667B19E3779F9
_P4, _P5 = 0x85EBCA77C2B2AE63, 0x27D4EB2F165667C5
_M64 = (1 << 64) - 1
_SALT = (0x47B6137B, 0x44974D91, 0x8824AD5B, 0xA2B7289D, 0x705495C7, 0x2DF1424B, 0x9EFC4947,
         0x5C6BFB31)


def _rotl(x: int, r: int) -> int:
    return ((x << r) | (x >> (64 - r))) & _M64


def _round(acc: int, lane: int) -> int:
    return (_rotl((acc + lane * _P2) & _M64, 31) * _P1) & _M64


def xxh64(data: bytes, seed: int = 0) -> int:
    """XXH64 (the hash Parquet bloom filters use), for one value at a time."""
    n = len(data)
    i = 0
    if n >= 32:
        v = [(seed + _P1 + _P2) & _M64, (seed + _P2) & _M64, seed, (seed - _P1) & _M64]
        while i + 32 <= n:
            for k in range(4):
                v[k] = _round(v[k], int.from_bytes(data[i + 8 * k: i + 8 * k + 8], "little"))
            i += 32
        h = (_rotl(v[0], 1) + _rotl(v[1], 7) + _rotl(v[2], 12) + _rotl(v[3], 18)) & _M64
        for k in range(4):
            h = ((h ^ _round(0, v[k])) * _P1 + _P4) & _M64
    else:
        h = (seed + _P5) & _M64
    h = (h + n) & _M64
    while i + 8 <= n:
        h ^= _round(0, int.from_bytes(data[i: i + 8], "little"))
        h = (_rotl(h, 27) * _P1 + _P4) & _M64
        i += 8
    if i + 4 <= n:
        h ^= (int.from_bytes(data[i: i + 4], "little") * _P1) & _M64
        h = (_rotl(h, 23) * _P2 + _P3) & _M64
        i += 4
    while i < n:
        h ^= (data[i] * _P5) & _M64
        h = (_rotl(h, 11) * _P1) & _M64
        i += 1
    h ^= h >> 33
    h = (h * _P2) & _M64
    h ^= h >> 29
    h = (h * _P3) & _M64
    return h ^ (h >> 32)


def _bloom_maybe(block: bytes, h: int) -> bool:
    """Split-block bloom filter check of hash ``h`` against its 32-byte block."""
    key = h & 0xFFFFFFFF
    for i, salt in enumerate(_SALT):
        word = int.from_bytes(block[4 * i: 4 * i + 4], "little")
        if not word & (1 << (((key * salt) & 0xFFFFFFFF) >> 27)):
            return False
    return True


def _varint(data: bytes, pos: int) -> tuple[int, int]:
    shift = value = 0
    while True:
        byte = data[pos]
        pos += 1
        value |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return value, pos
        shift += 7


class FileIndex:
    """One Parquet file's footer, as a point lookup needs it (built once per file)."""

    LOOKUP_COLUMNS = ("subject_token", "request_id")

    def __init__(self, handle: Any) -> None:
        self.handle = handle
        self.parquet = pq.ParquetFile(handle)
        meta = self.parquet.metadata
        names = [meta.schema.column(i).path for i in range(meta.num_columns)]
        self.num_row_groups = meta.num_row_groups
        self.minmax: dict[str, list[tuple[Any, Any] | None]] = {}
        self.blooms: dict[str, list[tuple[int, int] | None]] = {}
        for column in self.LOOKUP_COLUMNS:
            if column not in names:
                self.minmax[column] = [None] * self.num_row_groups
                self.blooms[column] = [None] * self.num_row_groups
                continue
            ci = names.index(column)
            bounds, blooms = [], []
            for rg in range(self.num_row_groups):
                chunk = meta.row_group(rg).column(ci)
                stats = chunk.statistics
                bounds.append((stats.min, stats.max) if stats is not None and stats.has_min_max
                              else None)
                blooms.append(self._bloom_location(chunk))
            self.minmax[column] = bounds
            self.blooms[column] = blooms

    def _bloom_location(self, chunk: Any) -> tuple[int, int] | None:
        """(offset of the bitset, number of 32-byte blocks), or None without a bloom filter."""
        offset, length = chunk.bloom_filter_offset, chunk.bloom_filter_length
        if not offset or not length:
            return None
        head = self.handle.read_at(min(length, 32), offset)
        if not head or head[0] != 0x15:  # field 1 (numBytes), i32
            return None
        zigzag, _ = _varint(head, 1)
        num_bytes = (zigzag >> 1) ^ -(zigzag & 1)
        if num_bytes <= 0 or num_bytes % 32 or num_bytes > length:
            return None
        return offset + length - num_bytes, num_bytes // 32

    def candidates(self, column: str, value: str) -> list[int]:
        """Row groups that may hold ``column == value`` (statistics, then bloom filter)."""
        raw = value.encode()
        h = xxh64(raw)
        out = []
        bounds, blooms = self.minmax[column], self.blooms[column]
        for rg in range(self.num_row_groups):
            b = bounds[rg]
            if b is not None and not (b[0] <= value <= b[1]):
                continue
            loc = blooms[rg]
            if loc is not None:
                start, blocks = loc
                block = self.handle.read_at(32, start + 32 * (((h >> 32) * blocks) >> 32))
                if not _bloom_maybe(block, h):
                    continue
            out.append(rg)
        return out


    def read_matching(self, column: str, value: str, columns: Sequence[str],
                      groups: Sequence[int] | None = None) -> pa.Table | None:
        """The ``columns`` of the rows with ``column == value``, read from the candidate row groups
        only (``groups``: :meth:`candidates` already asked); ``None`` when statistics and bloom
        filters rule every row group out. A column added by a later schema version than the
        file's (``schema.ADDED_COLUMNS``) reads as nulls."""
        groups = self.candidates(column, value) if groups is None else list(groups)
        if not groups:
            return None
        present = set(self.parquet.schema_arrow.names)
        wanted = [c for c in dict.fromkeys([column, *columns]) if c in present or c not in ADDED_COLUMNS]
        table = self.parquet.read_row_groups(groups, columns=stored_columns(wanted, present),
                                             use_threads=False)
        table = restore_output_scores(table.filter(pc.equal(table[column], value)))
        for name in columns:
            if name not in table.column_names:
                field = ENTRY_SCHEMA.field(name)
                table = table.append_column(field, pa.nulls(table.num_rows, field.type))
        return table.select(list(columns))


def open_index(storage: JournalStorage, path: str) -> FileIndex:
    """The :class:`FileIndex` of the data file ``path`` (relative to the root); the caller closes
    ``index.handle``."""
    handle = storage.filesystem.open_input_file(storage.full_path(path))
    try:
        return FileIndex(handle)
    except BaseException:
        handle.close()
        raise


class FooterCache:
    """``FileIndex`` per file path, least recently used first out."""

    def __init__(self, storage: JournalStorage, capacity: int = 512) -> None:
        self.storage = storage
        self.capacity = capacity
        self._items: dict[str, FileIndex] = {}

    def get(self, path: str) -> FileIndex:
        item = self._items.pop(path, None)
        if item is None:
            item = open_index(self.storage, path)
            while len(self._items) >= self.capacity:
                oldest = next(iter(self._items))
                self._items.pop(oldest).handle.close()
        self._items[path] = item
        return item

    def clear(self) -> None:
        for item in self._items.values():
            item.handle.close()
        self._items.clear()
