"""Encoding journal tables as Parquet: one place decides sort order, compression and filters.

Rows are sorted by ``subject_token`` then ``ts`` so that a subject's entries sit in few row groups
whose min/max statistics prune the rest; Parquet bloom filters on ``subject_token`` and
``request_id`` let a point lookup skip row groups whose range happens to include the value.
"""

from __future__ import annotations

from dataclasses import dataclass

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from serve_journal.schema import ENTRY_SCHEMA

SORT_KEYS = [("subject_token", "ascending", "at_end"), ("ts", "ascending", "at_end")]
BLOOM_COLUMNS = ("subject_token", "request_id")


@dataclass(frozen=True)
class ParquetOptions:
    """How a tier encodes its files (hot: fast zstd; cold: heavier zstd, larger row groups)."""

    compression: str = "zstd"
    compression_level: int | None = 3
    row_group_size: int = 128 * 1024
    bloom_filters: bool = True
    bloom_fpp: float = 0.05


HOT_OPTIONS = ParquetOptions()
COLD_OPTIONS = ParquetOptions(compression_level=19, row_group_size=1024 * 1024)


def sort_for_lookup(table: pa.Table) -> pa.Table:
    """Order rows by subject token then time (nulls last)."""
    if table.num_rows <= 1:
        return table
    indices = pc.sort_indices(table, sort_keys=SORT_KEYS)
    return table.take(indices)


def encode_parquet(table: pa.Table, options: ParquetOptions = HOT_OPTIONS) -> bytes:
    """Sort ``table`` for lookups and encode it as one Parquet file in memory."""
    if table.schema != ENTRY_SCHEMA:
        table = table.cast(ENTRY_SCHEMA)
    table = sort_for_lookup(table)
    sink = pa.BufferOutputStream()
    extra = {}
    if options.bloom_filters and table.num_rows:
        ndv = max(64, min(table.num_rows, options.row_group_size))
        extra["bloom_filter_options"] = {
            column: {"ndv": ndv, "fpp": options.bloom_fpp} for column in BLOOM_COLUMNS
        }
    with pq.ParquetWriter(
        sink,
        ENTRY_SCHEMA,
        compression=options.compression,
        compression_level=options.compression_level,
        write_statistics=True,
        write_page_index=True,
        sorting_columns=[pq.SortingColumn(ENTRY_SCHEMA.get_field_index("subject_token"), nulls_first=False)],
        **extra,
    ) as writer:
        writer.write_table(table, row_group_size=options.row_group_size)
    return sink.getvalue().to_pybytes()


def decode_parquet(data: bytes) -> pa.Table:
    """Read a journal file's bytes back as a table with the entry schema."""
    # ParquetFile, not read_table: the dataset path's thread pool aborts some interpreters at exit.
    return pq.ParquetFile(pa.BufferReader(data)).read().cast(ENTRY_SCHEMA)
