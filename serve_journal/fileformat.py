"""Encoding journal tables as Parquet: one place decides sort order, compression and filters.

Rows are sorted by ``subject_token`` then ``ts`` so that a subject's entries sit in few row groups
whose min/max statistics prune the rest; Parquet bloom filters on ``subject_token`` and
``request_id`` let a point lookup skip row groups whose range happens to include the value.

Encodings are chosen per column for bytes on disk (see docs/benchmarks.md): dictionaries only
for the low-cardinality columns; ``BYTE_STREAM_SPLIT`` for the floats, timestamps and sequence
numbers (their high bytes compress away); ``DELTA_LENGTH_BYTE_ARRAY`` for the random hex strings
(no dictionary page to fall back from, no per-value length in the compressed stream). Scores are
the exception that depends on the data: a file whose scores take few distinct values (a model
that rounds, or a classifier with few leaves) dictionary-encodes them, ~2 bytes per entry instead
of ~7 (:data:`DICTIONARY_IF_FEW`).
"""

from __future__ import annotations

from dataclasses import dataclass

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from serve_journal.schema import (
    DERIVED_SCORES,
    ENTRY_SCHEMA,
    STORED_SCHEMA,
    conform_entries,
    derive_output_scores,
)

SORT_KEYS = [("subject_token", "ascending", "at_end"), ("ts", "ascending", "at_end")]
BLOOM_COLUMNS = ("subject_token", "request_id")

COLUMN_ENCODING: dict[str, str] = {
    "request_id": "DELTA_LENGTH_BYTE_ARRAY",
    "features_hmac": "DELTA_LENGTH_BYTE_ARRAY",
    "trace_id": "DELTA_LENGTH_BYTE_ARRAY",
    "span_id": "DELTA_LENGTH_BYTE_ARRAY",
    "ts": "BYTE_STREAM_SPLIT",
    "seq": "BYTE_STREAM_SPLIT",
    "score": "BYTE_STREAM_SPLIT",
    "latency_ms": "BYTE_STREAM_SPLIT",
    "outputs.list.element.score": "BYTE_STREAM_SPLIT",
}
"""Columns written without a dictionary, and their encoding (the v3 trace and span ids are
random hex like the request id: a dictionary costs ~5 B/entry more hot when tracing is on; all
null when it is off); every other column is dictionary
encoded (low cardinality: model, version, caller, decision, producer, the v2 model identity
``model_run_id``/``model_digest``/``models.*``, constant per replica: +0.04 B/entry cold, ... and
the sorted subject token, whose ~10 entries per subject make its dictionary pay)."""

DICTIONARY_IF_FEW = ("score", "outputs.list.element.score")
"""Float columns written with a dictionary instead of their :data:`COLUMN_ENCODING` when a file
holds few distinct values of them (:func:`dictionary_pays`): scores rounded to 4 decimals take
2.2 bytes per entry in a cold file instead of 6.8 (docs/benchmarks.md, "Cold bytes")."""

DICTIONARY_MAX_DISTINCT = 65_536
"""At most this many distinct values: a float64 dictionary of 512 KiB stays under Parquet's 1 MiB
dictionary page limit, past which the writer would fall back to PLAIN for the rest of a row
group (worse than ``BYTE_STREAM_SPLIT``)."""


def dictionary_pays(distinct: int, rows: int) -> bool:
    """Whether a column with ``distinct`` values over ``rows`` rows is smaller with a dictionary:
    at most :data:`DICTIONARY_MAX_DISTINCT` values, each repeated four times on average."""
    return 0 < distinct <= DICTIONARY_MAX_DISTINCT and distinct * 4 <= rows


def score_distinct(table: pa.Table) -> dict[str, int]:
    """Distinct values of the :data:`DICTIONARY_IF_FEW` columns of ``table`` (entry schema)."""
    flat = pc.list_flatten(table.column("outputs"))
    return {
        "score": pc.count_distinct(table.column("score")).as_py(),
        "outputs.list.element.score": pc.count_distinct(pc.struct_field(flat, "score")).as_py(),
    }


_DICTIONARY_COLUMNS = [
    ".".join(path) for path in (
        [f.name] if not pa.types.is_list(f.type) else
        [f.name, "list", "element", sub.name] for f in ENTRY_SCHEMA
        for sub in (f.type.value_type if pa.types.is_list(f.type) else [None])
    )
]
# (the derived-scores code column is left to pyarrow's default, a dictionary: one or two codes
# per file, run-length encoded to nothing)


@dataclass(frozen=True)
class ParquetOptions:
    """How a tier encodes its files (hot: fast zstd; cold: heavier zstd, larger row groups)."""

    compression: str = "zstd"
    compression_level: int | None = 3
    row_group_size: int = 128 * 1024
    bloom_filters: bool = True
    bloom_fpp: float = 0.01
    bloom_columns: tuple[str, ...] = BLOOM_COLUMNS
    """Columns that get a Parquet bloom filter per row group (sized to the values it holds)."""
    column_encoding: tuple[tuple[str, str], ...] | None = tuple(COLUMN_ENCODING.items())
    """``(column path, encoding)`` pairs written without a dictionary; ``None``: pyarrow's
    defaults (dictionary everywhere)."""
    data_page_size: int | None = None
    small_file_rows: int = 0
    """A file of fewer rows (and at least one) is compressed with :attr:`small_file_codec`
    instead: zstd's set-up per column chunk (~1.7 ms of a ~3.4 ms file of 110 entries here)
    dominates a small file, and a writer at a low rate rolls one every ``roll_seconds``;
    compaction (its default options) rewrites them with zstd. ``0``: always ``compression``.
    ``lz4_raw`` is Parquet's ``LZ4_RAW`` codec (pyarrow reports it as ``LZ4``)."""
    small_file_codec: str = "lz4_raw"
    derive_scores: bool = False
    """Leave out the output scores that follow from ``score`` (:func:`~serve_journal.schema.
    derive_output_scores`): the file has :data:`~serve_journal.schema.STORED_SCHEMA`'s extra
    column, and every reader of the package restores the scores."""

    @property
    def schema(self) -> pa.Schema:
        """The schema of the files these options write."""
        return STORED_SCHEMA if self.derive_scores else ENTRY_SCHEMA

    def stored(self, table: pa.Table) -> pa.Table:
        """``table`` (entry schema) as these options store it."""
        return derive_output_scores(table) if self.derive_scores else table


HOT_OPTIONS = ParquetOptions(small_file_rows=512)
COLD_OPTIONS = ParquetOptions(
    compression_level=19, row_group_size=1024 * 1024, bloom_columns=("subject_token",),
    data_page_size=1024 * 1024, derive_scores=True,
)
"""Cold: zstd 19, 1M-row groups, a bloom filter on the subject token only (a request-id filter
costs ~1.2 bytes per entry; cold lookups by request id scan the partition), and the output scores
that follow from ``score`` left out (a binary classifier's two: ~13 bytes per entry)."""


def sort_for_lookup(table: pa.Table) -> pa.Table:
    """Order rows by subject token then time (nulls last)."""
    if table.num_rows <= 1:
        return table
    indices = pc.sort_indices(table, sort_keys=SORT_KEYS)
    return table.take(indices)


def _writer_kwargs(options: ParquetOptions, bloom_ndv: dict[str, int] | None,
                   distinct: dict[str, int] | None = None, rows: int = 0) -> dict:
    """``pq.ParquetWriter`` keyword arguments for ``options``; ``bloom_ndv``: column -> distinct
    values per row group (no bloom filters when ``None`` or empty); ``distinct``: column ->
    distinct values in the file of ``rows`` rows, which picks the :data:`DICTIONARY_IF_FEW`
    columns' encoding (their :data:`COLUMN_ENCODING` when unknown)."""
    extra: dict = {}
    if options.bloom_filters and bloom_ndv:
        extra["bloom_filter_options"] = {
            column: {"ndv": ndv, "fpp": options.bloom_fpp} for column, ndv in bloom_ndv.items()
        }
    if options.column_encoding:
        plain = dict(options.column_encoding)
        for column in DICTIONARY_IF_FEW:
            if distinct and dictionary_pays(distinct.get(column, 0), rows):
                plain.pop(column, None)
        extra["column_encoding"] = plain
        extra["use_dictionary"] = [c for c in _DICTIONARY_COLUMNS if c not in plain]
        if options.derive_scores:
            extra["use_dictionary"].append(DERIVED_SCORES)
    if options.data_page_size:
        extra["data_page_size"] = options.data_page_size
    small = 0 < rows < options.small_file_rows
    return {
        "compression": options.small_file_codec if small else options.compression,
        "compression_level": None if small else options.compression_level,
        "write_statistics": True,
        "write_page_index": True,
        "sorting_columns": [pq.SortingColumn(ENTRY_SCHEMA.get_field_index("subject_token"),
                                             nulls_first=False)],
        **extra,
    }


def encode_parquet(table: pa.Table, options: ParquetOptions = HOT_OPTIONS) -> bytes:
    """Sort ``table`` for lookups and encode it as one Parquet file in memory."""
    table = sort_for_lookup(conform_entries(table))
    sink = pa.BufferOutputStream()
    ndv = None
    if options.bloom_filters and table.num_rows and options.bloom_columns:
        ndv = {column: _ndv(table, column, options.row_group_size)
               for column in options.bloom_columns}
    distinct = score_distinct(table) if options.column_encoding and table.num_rows else None
    kwargs = _writer_kwargs(options, ndv, distinct, table.num_rows)
    with pq.ParquetWriter(sink, options.schema, **kwargs) as writer:
        writer.write_table(options.stored(table), row_group_size=options.row_group_size)
    return sink.getvalue().to_pybytes()


class SortedParquetWriter:
    """Write one journal file from tables that arrive already in lookup order
    (:func:`sort_for_lookup`), a row group at a time: memory holds one row group, not the file.

    Row groups are cut every ``options.row_group_size`` rows exactly as :func:`encode_parquet`
    cuts them, so the same rows give the same file. ``bloom_ndv`` (column -> distinct values in
    the whole file, e.g. an estimate) sizes the bloom filters, see :func:`bloom_ndv`, and picks
    the scores' encoding (:data:`DICTIONARY_IF_FEW`; an over-estimate only forgoes a dictionary).
    Use as a context manager; the file is complete only after a clean exit.
    """

    def __init__(self, where: str | pa.NativeFile, options: ParquetOptions, *, rows: int,
                 distinct: dict[str, int] | None = None) -> None:
        ndv = None
        if options.bloom_filters and rows and options.bloom_columns:
            distinct = distinct or {}
            ndv = {column: bloom_ndv(distinct.get(column, rows), rows, options.row_group_size)
                   for column in options.bloom_columns}
        self._rows_per_group = options.row_group_size
        self._options = options
        self._pending: list[pa.Table] = []
        self._pending_rows = 0
        self.rows = 0
        self._writer = pq.ParquetWriter(
            where, options.schema, **_writer_kwargs(options, ndv, distinct, rows))

    def write(self, table: pa.Table) -> None:
        """Append ``table`` (entries in lookup order, after everything written so far)."""
        table = conform_entries(table)
        self._pending.append(table)
        self._pending_rows += table.num_rows
        self.rows += table.num_rows
        while self._pending_rows >= self._rows_per_group:
            self._flush(self._rows_per_group)

    def _flush(self, rows: int) -> None:
        buffered = pa.concat_tables(self._pending)  # chunks, not a copy: one row group's rows
        self._writer.write_table(self._options.stored(buffered.slice(0, rows)),
                                 row_group_size=self._rows_per_group)
        rest = buffered.slice(rows)
        self._pending = [rest] if rest.num_rows else []
        self._pending_rows = rest.num_rows

    def close(self) -> None:
        """Write the last (partial) row group and the footer."""
        if self._pending_rows:
            self._flush(self._pending_rows)
        self._writer.close()

    def __enter__(self) -> SortedParquetWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def bloom_ndv(distinct: int, rows: int, row_group_size: int) -> int:
    """Distinct values one row group holds (a bloom filter's size), from ``distinct`` values over
    ``rows`` rows: all rows for near-unique columns, the share of the distinct values for sorted
    repeating ones."""
    group = min(rows, row_group_size)
    if distinct >= rows * 0.9:
        return max(64, group)
    share = -(-distinct * group // rows)
    return max(64, min(group, int(share * 1.25) + 1))


def _ndv(table: pa.Table, column: str, row_group_size: int) -> int:
    """:func:`bloom_ndv` of ``column`` of ``table``."""
    return bloom_ndv(pc.count_distinct(table.column(column)).as_py(), table.num_rows,
                     row_group_size)


def decode_parquet(data: bytes) -> pa.Table:
    """Read a journal file's bytes (any supported schema version) back as a table with the
    current entry schema (columns an earlier version lacks are null)."""
    # ParquetFile, not read_table: the dataset path's thread pool aborts some interpreters at exit.
    return conform_entries(pq.ParquetFile(pa.BufferReader(data)).read(), stored=True)
