"""The outcome record schema, defined once, and how an outcome file is encoded and hashed.

An outcome record says what became of one decision after the fact: a label (a chargeback, a
default) or a realised value, for a request id the journal holds, from a named source. It carries
no subject id and no feature value: it links to its subject only through the journal entry with
the same ``request_id``, whose ``subject_token`` forget makes unlinkable.

The Merkle leaf of an outcome record is the canonical encoding
(:func:`serve_journal.integrity.encoding.canonical_encode`) of the row as a mapping of column
name to value, with both timestamps as integer microseconds since the Unix epoch (UTC), as for
journal entries; the file's manifest record holds the RFC 6962 root over its rows in file order.
"""

from __future__ import annotations

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from serve_journal.integrity.merkle import table_merkle_root

OUTCOME_SCHEMA_VERSION = 1

#: Column name -> (Arrow type, nullable, description). Docs and the Arrow schema are built from it.
OUTCOME_COLUMNS: tuple[tuple[str, pa.DataType, bool, str], ...] = (
    ("schema_version", pa.int16(), False, "Outcome schema version (1)."),
    ("outcome_id", pa.string(), False,
     "Random id of this record (32 hex): a repeated label is a new record with a new id."),
    ("request_id", pa.string(), False, "Request id of the journal entry (entries) it is about."),
    ("label", pa.string(), True,
     "The label as text: a bool as 'true'/'false', an int in decimal, a string as given. "
     "Null when the record carries a value instead."),
    ("label_type", pa.string(), True, "'bool', 'int' or 'str': the label's type as given."),
    ("value", pa.float64(), True, "A realised value (e.g. the loss amount); null for a label."),
    ("outcome_time", pa.timestamp("us", tz="UTC"), False,
     "When the outcome happened (the chargeback, the default), UTC."),
    ("recorded_at", pa.timestamp("us", tz="UTC"), False,
     "When the journal recorded this record, UTC: the latest-label rule orders by it."),
    ("source", pa.string(), False, "Who supplied it (e.g. 'chargebacks')."),
    ("batch_id", pa.string(), False, "Id of the ingest batch the record came in."),
)

OUTCOME_SCHEMA = pa.schema(
    [pa.field(name, dtype, nullable=nullable) for name, dtype, nullable, _ in OUTCOME_COLUMNS],
    metadata={b"serve_journal.outcome_schema_version": str(OUTCOME_SCHEMA_VERSION).encode()},
)
_TIME_COLUMNS = ("outcome_time", "recorded_at")


def outcome_merkle_root(table: pa.Table) -> str:
    """Hex RFC 6962 Merkle root over an outcome file's rows in file order (see the module doc)."""
    table = conform_outcomes(table)
    for name in _TIME_COLUMNS:
        index = table.column_names.index(name)
        table = table.set_column(index, name, table.column(name).cast(pa.int64()))
    return table_merkle_root(table)


def conform_outcomes(table: pa.Table) -> pa.Table:
    """``table`` with exactly the outcome schema's columns, in order, cast to their types."""
    missing = [name for name in OUTCOME_SCHEMA.names if name not in table.column_names]
    if missing:
        raise ValueError(f"not an outcome table: lacks column(s) {missing}")
    return table.select(OUTCOME_SCHEMA.names).cast(OUTCOME_SCHEMA)


def encode_outcomes(table: pa.Table) -> bytes:
    """One outcome file: rows sorted by request id then recorded time, zstd, with a bloom
    filter on ``request_id`` (joins and forget look records up by it)."""
    table = conform_outcomes(table)
    if table.num_rows > 1:
        table = table.take(pc.sort_indices(table, sort_keys=[
            ("request_id", "ascending"), ("recorded_at", "ascending"), ("outcome_id", "ascending")]))
    sink = pa.BufferOutputStream()
    extra = {}
    if table.num_rows:
        extra["bloom_filter_options"] = {"request_id": {"ndv": table.num_rows, "fpp": 0.01}}
    with pq.ParquetWriter(sink, OUTCOME_SCHEMA, compression="zstd", compression_level=3,
                          write_statistics=True, **extra) as writer:
        writer.write_table(table)
    return sink.getvalue().to_pybytes()


def decode_outcomes(data: bytes) -> pa.Table:
    """An outcome file's bytes back as a table with the outcome schema."""
    # ParquetFile, not read_table: the dataset path's thread pool aborts some interpreters at exit.
    return conform_outcomes(pq.ParquetFile(pa.BufferReader(data)).read())


__all__ = [
    "OUTCOME_COLUMNS", "OUTCOME_SCHEMA", "OUTCOME_SCHEMA_VERSION", "conform_outcomes",
    "decode_outcomes", "encode_outcomes", "outcome_merkle_root",
]
