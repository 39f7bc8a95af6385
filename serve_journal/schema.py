"""The journal entry schema, defined once.

Every journal file, every Kafka message and every query speaks this schema. Changing a column
means a new ``SCHEMA_VERSION`` and a note in ``docs/schema.md``; readers accept every version
listed in ``SUPPORTED_SCHEMA_VERSIONS``.

No column ever holds a raw feature value or a raw subject identifier: ``features_hmac`` is a keyed
HMAC of the canonical feature encoding and ``subject_token`` a keyed token of the subject id.
"""

from __future__ import annotations

import re

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

SCHEMA_VERSION = 3
SUPPORTED_SCHEMA_VERSIONS = frozenset({1, 2, 3})

OUTCOME_OK = "ok"
OUTCOME_ERROR = "error"
OUTCOME_REJECTED = "rejected"
OUTCOMES = (OUTCOME_OK, OUTCOME_ERROR, OUTCOME_REJECTED)

OUTPUT_TYPE = pa.struct([("label", pa.string()), ("score", pa.float64())])
MODEL_TYPE = pa.struct([("name", pa.string()), ("version", pa.string()), ("run_id", pa.string()),
                        ("digest", pa.string()), ("role", pa.string())])
"""One model that took part in a call (the ``models`` column)."""

#: Column name -> (Arrow type, nullable, description). Docs and the Arrow schema are built from it.
COLUMNS: tuple[tuple[str, pa.DataType, bool, str], ...] = (
    ("schema_version", pa.int16(), False, "Entry schema version (1, 2 or 3)."),
    ("request_id", pa.string(), False,
     "Stable request id: Serve's request id (X-Request-ID when the caller sent one), shared by every "
     "journaled deployment of one composed request."),
    ("ts", pa.timestamp("us", tz="UTC"), False, "Decision time, UTC, microseconds."),
    ("caller", pa.string(), False, "Caller identity from the configured extractor (its keyed ct- token with caller_privacy=token), or 'anonymous'."),
    ("subject_token", pa.string(), True,
     "Keyed token of the data subject (never the raw id); null when the request names no subject."),
    ("model_name", pa.string(), False, "Registered name of the model that decided."),
    ("model_version", pa.string(), False,
     "Registered version of the model that decided: the version the deployment loaded through "
     "serve_journal.load_model (pinned per replica, moved only when it reloads), or one named per "
     "call with annotate(model_version=...); without either, the version resolved at replica start."),
    ("dataset_hash", pa.string(), True, "'sha256:<hex>' manifest hash of the training data."),
    ("dataset_hash_source", pa.string(), False,
     "Where dataset_hash came from: 'tag', 'mlflow_inputs' or 'none'."),
    ("features_hmac", pa.string(), True, "Hex HMAC-SHA256 of the canonical feature encoding."),
    ("key_id", pa.string(), True, "Id of the key features_hmac and subject_token were made with."),
    ("outputs", pa.list_(OUTPUT_TYPE), True, "Top outputs, label and score, best first."),
    ("score", pa.float64(), True, "The score the decision was taken on."),
    ("threshold", pa.float64(), True, "Decision threshold in force."),
    ("decision", pa.string(), True, "The decision served (e.g. 'block', 'allow')."),
    ("explanation_ref", pa.string(), True, "Reference to an explanation stored elsewhere."),
    ("outcome", pa.string(), False, "'ok', 'error' (the model raised) or 'rejected' (refused)."),
    ("error_type", pa.string(), True,
     "Exception class name for outcome 'error' or the reason for 'rejected'; never a message."),
    ("latency_ms", pa.float32(), False, "Time spent in the wrapped method, milliseconds."),
    ("risk_tier", pa.string(), False, "Risk tier the entry was classified in."),
    ("sample_rate", pa.float32(), False, "Probability with which entries of this tier are kept."),
    ("producer_id", pa.string(), False, "Id of the replica process that captured the entry."),
    ("seq", pa.int64(), False,
     "Per-producer sequence number, assigned at capture; gaps are explained by counted drops."),
    ("app_name", pa.string(), True, "Serve application name."),
    ("deployment", pa.string(), False, "Serve deployment name."),
    ("replica", pa.string(), False, "Serve replica id."),
    ("model_run_id", pa.string(), True,
     "(v2) MLflow run id of the deciding model version: immutable, unlike a version number a "
     "registry admin can delete and recreate. Null when unknown."),
    ("model_digest", pa.string(), True,
     "(v2) Identity of the deciding model's artifact: 'sha256:<hex>' over the manifest (path, "
     "size, SHA-256) of every file load_model read, or 'mlmodel-sha256:<hex>' of the MLmodel file "
     "alone for a deployment that loads its model itself. Null when unknown."),
    ("models", pa.list_(MODEL_TYPE), True,
     "(v2) Every model that took part in the call when more than one did (ensemble members, "
     "shadow challengers), in the order they were called, each with its name, version, run id, "
     "digest and role ('decision' or 'shadow'); null when only the deciding model did."),
    ("trace_id", pa.string(), True,
     "(v3) W3C trace id of the request (32 lowercase hex): the active OpenTelemetry span's "
     "(Serve tracing, or the application's own instrumentation), else the incoming "
     "'traceparent' header's. Null when neither was there."),
    ("span_id", pa.string(), True,
     "(v3) Span id (16 lowercase hex) that goes with trace_id: the active span's, or the "
     "header's parent id. Null when trace_id is."),
)

ADDED_COLUMNS: dict[str, int] = {"model_run_id": 2, "model_digest": 2, "models": 2,
                                 "trace_id": 3, "span_id": 3}
"""Columns added after version 1, with the schema version that added them. They are nullable;
files of an earlier version lack them, and readers see nulls. Hashes over entries (Merkle
leaves, fingerprints) leave a null added column out, so an entry of an earlier version hashes
the same before and after it is read under the current schema."""

ENTRY_SCHEMA: pa.Schema = pa.schema(
    [pa.field(name, typ, nullable=nullable) for name, typ, nullable, _ in COLUMNS],
    metadata={b"serve_journal.schema_version": str(SCHEMA_VERSION).encode()},
)

DERIVED_SCORES = "outputs_derived"
"""A column of cold-tier files only, not of entries: where an entry's output scores were left out
because they follow from its ``score`` (:func:`derive_output_scores`). Readers restore them
(:func:`restore_output_scores`, called by :func:`conform_entries` of a file's rows) and never see
the column; anywhere but a file (a Kafka message) it is refused as unknown."""

STORED_SCHEMA: pa.Schema = ENTRY_SCHEMA.append(pa.field(DERIVED_SCORES, pa.int16(), nullable=True))
"""The columns of a file written with derived output scores: the entry schema, then
:data:`DERIVED_SCORES`."""

COLUMN_NAMES: tuple[str, ...] = tuple(name for name, *_ in COLUMNS)
_TYPE_NAMES = tuple(map(str, ENTRY_SCHEMA.types))


def conform_entries(table: pa.Table, *, stored: bool = False) -> pa.Table:
    """``table`` (any supported schema version) in the current entry schema, column order and
    types: the columns a file of an earlier version lacks are added as nulls. ``stored``: the
    table was read from a journal file, whose output scores may be derived (its
    :data:`DERIVED_SCORES` column): restore them. Anywhere else (Kafka messages, entries handed
    to a writer) that column is unknown, like any other.

    Raises ``ValueError`` naming the columns when ``table`` lacks a column that is not one of
    :data:`ADDED_COLUMNS`, or has one the schema does not know.
    """
    # Arrow's == ignores a list's element name; Parquet reads ``element`` where the schema says
    # ``item``, and hashes over types (fingerprints) see the difference: compare type strings too.
    if table.schema == ENTRY_SCHEMA and tuple(map(str, table.schema.types)) == _TYPE_NAMES:
        return table
    names = set(table.column_names)
    if stored and DERIVED_SCORES in names:
        table = restore_output_scores(table)
        names.discard(DERIVED_SCORES)
    unknown = sorted(names - set(COLUMN_NAMES))
    missing = [name for name in COLUMN_NAMES if name not in names]
    required = [name for name in missing if name not in ADDED_COLUMNS]
    if unknown or required:
        raise ValueError(f"not a journal entry table: unknown columns {unknown}, missing columns "
                         f"{required} (entry schema version {SCHEMA_VERSION} reads versions "
                         f"{sorted(SUPPORTED_SCHEMA_VERSIONS)})")
    for name in missing:
        table = table.append_column(ENTRY_SCHEMA.field(name),
                                    pa.nulls(table.num_rows, ENTRY_SCHEMA.field(name).type))
    return table.select(list(COLUMN_NAMES)).cast(ENTRY_SCHEMA)


_MAX_POSITION = 15
"""Output positions a code can name (4 bits each, 0 for none)."""


def _output_positions(outputs: pa.ListArray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(row, position in its row's list, whether its row's list is valid) of every child value
    of the list array ``outputs`` from its first offset to its last: :func:`_elements` order,
    values behind a null list included (Arrow allows them; they are never derived)."""
    offsets = outputs.offsets.to_numpy(zero_copy_only=False).astype(np.int64)
    lengths = np.diff(offsets)
    rows = np.repeat(np.arange(len(outputs), dtype=np.int64), lengths)
    position = np.arange(offsets[0], offsets[-1], dtype=np.int64) - offsets[:-1][rows]
    row_valid = (np.ones(len(outputs), dtype=bool) if outputs.null_count == 0
                 else pc.is_valid(outputs).to_numpy(zero_copy_only=False))
    return rows, position, row_valid[rows]


def _elements(outputs: pa.ListArray) -> pa.StructArray:
    """The child values of ``outputs`` from its first offset to its last (unlike
    ``list_flatten``, those behind a null list too: positions stay aligned)."""
    start = outputs.offsets[0].as_py()
    return outputs.values.slice(start, outputs.offsets[len(outputs)].as_py() - start)


def _first_per_row(rows: np.ndarray, mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(rows, element indices) of the first element of each row where ``mask`` holds."""
    where = np.flatnonzero(mask)
    found, first = np.unique(rows[where], return_index=True)
    return found, where[first]


def _bits(values: np.ndarray) -> np.ndarray:
    return values.view(np.int64)


def _floats(array: pa.Array) -> tuple[np.ndarray, np.ndarray]:
    """(values with nulls as 0.0, validity) of a float64 array."""
    valid = (np.ones(len(array), dtype=bool) if array.null_count == 0
             else pc.is_valid(array).to_numpy(zero_copy_only=False))
    return pc.fill_null(array, 0.0).to_numpy(zero_copy_only=False).astype(np.float64), valid


def _with_scores(outputs: pa.ListArray, scores: pa.Array) -> pa.ListArray:
    """``outputs`` with its elements' ``score`` field replaced by ``scores``."""
    flat = outputs.values.slice(outputs.offsets[0].as_py(), len(scores))
    struct = pa.StructArray.from_arrays(
        [flat.field("label"), scores], fields=list(flat.type), mask=flat.is_null())
    offsets = pc.subtract(outputs.offsets, outputs.offsets[0])
    return pa.ListArray.from_arrays(offsets, struct, type=outputs.type, mask=outputs.is_null())


def derive_output_scores(table: pa.Table) -> pa.Table:
    """``table`` (entry schema) in :data:`STORED_SCHEMA`: an output score that equals the entry's
    ``score`` s, or ``1 - s``, bit for bit, is stored as null and the :data:`DERIVED_SCORES` code
    says where it was: ``p + 16 * q``, ``p`` the 1-based position of the first output equal to
    s, ``q`` that of the first other one equal to ``1 - s`` (0: none; positions past 15 are kept).
    A binary classifier's two scores take ~13 bytes per entry in a cold file and the code almost
    none. :func:`restore_output_scores` gives back ``table`` exactly; nothing else changes."""
    outputs = table.column("outputs").combine_chunks() if table.num_rows else None
    codes = np.zeros(table.num_rows, dtype=np.int16)
    if outputs is not None and len(_elements(outputs)):
        rows, position, listed = _output_positions(outputs)
        flat = _elements(outputs)
        values, valid = _floats(pc.struct_field(flat, "score"))
        valid &= pc.is_valid(flat).to_numpy(zero_copy_only=False)  # a null output: kept as is
        s, s_valid = _floats(table.column("score").combine_chunks())
        mine = s[rows]
        mine_valid = s_valid[rows] & valid & listed & (position < _MAX_POSITION)
        equal = mine_valid & (_bits(values) == _bits(mine))
        found, first = _first_per_row(rows, equal)
        codes[found] = position[first] + 1
        with np.errstate(invalid="ignore"):  # a signalling NaN score: IEEE gives a NaN, quietly
            complement = mine_valid & (_bits(values) == _bits(np.subtract(1.0, mine)))
        complement[first] = False
        found_c, first_c = _first_per_row(rows, complement)
        codes[found_c] += (position[first_c] + 1).astype(np.int16) * 16
        dropped = np.zeros(len(values), dtype=bool)
        dropped[first] = dropped[first_c] = True
        if dropped.any():
            scores = pa.array(values, pa.float64(), mask=~valid | dropped)
            outputs = _with_scores(outputs, scores)
    column = pa.array(codes, pa.int16(), mask=codes == 0)
    out = table.set_column(table.schema.get_field_index("outputs"), table.schema.field("outputs"),
                           [outputs] if outputs is not None else table.column("outputs"))
    return out.append_column(STORED_SCHEMA.field(DERIVED_SCORES), column)


def restore_output_scores(table: pa.Table) -> pa.Table:
    """``table`` without its :data:`DERIVED_SCORES` column, each output score it names put back
    (``score`` or ``1 - score``); a table without the column is returned as it is.

    Raises ``ValueError`` when the column is not a code :func:`derive_output_scores` writes (not
    an integer, or outside 0-255) or ``table`` lacks ``score`` or ``outputs``: a file that was
    altered (verify names it); the message holds no value of the file."""
    if DERIVED_SCORES not in table.column_names:
        return table
    index = table.schema.get_field_index(DERIVED_SCORES)
    codes = table.column(DERIVED_SCORES)
    missing = [name for name in ("score", "outputs") if name not in table.column_names]
    if not pa.types.is_integer(codes.type):
        raise ValueError(f"not a journal file: {DERIVED_SCORES} is {codes.type}, not int16")
    if missing:
        raise ValueError(f"not a journal file: {DERIVED_SCORES} without the column(s) {missing}")
    table = table.remove_column(index)
    if codes.null_count == len(codes) or not table.num_rows:
        return table
    code = pc.fill_null(codes.combine_chunks(), 0).to_numpy(zero_copy_only=False).astype(np.int64)
    if code.min() < 0 or code.max() > 255:
        raise ValueError(f"not a journal file: {DERIVED_SCORES} holds codes outside 0-255")
    outputs = table.column("outputs").combine_chunks()
    if not len(_elements(outputs)):
        return table
    rows, position, listed = _output_positions(outputs)
    flat = _elements(outputs)
    values, valid = _floats(pc.struct_field(flat, "score"))
    s, s_valid = _floats(table.column("score").combine_chunks())
    mine, mine_valid = s[rows], s_valid[rows]
    is_s = (position + 1 == code[rows] % 16) & listed
    is_c = (position + 1 == code[rows] // 16) & listed & ~is_s
    with np.errstate(invalid="ignore"):  # as in derive_output_scores
        values = np.where(is_s, mine, np.where(is_c, np.subtract(1.0, mine), values))
    valid = np.where(is_s | is_c, mine_valid, valid)  # a null score restores null (as the SQL)
    scores = pa.array(values, pa.float64(), mask=~valid)
    index = table.schema.get_field_index("outputs")
    return table.set_column(index, table.schema.field(index), [_with_scores(outputs, scores)])


RESTORE_OUTPUTS_SQL = (
    "CASE WHEN outputs_derived IS NULL THEN outputs ELSE list_transform(outputs, lambda o, i: "
    "CASE WHEN o IS NULL THEN NULL ELSE struct_pack(label := o.label, score := CASE "
    "WHEN i = outputs_derived % 16 THEN score WHEN i = outputs_derived // 16 THEN 1::DOUBLE - score "
    "ELSE o.score END) END) END"
)
"""DuckDB SQL for the ``outputs`` of a file with derived scores (an engine that reads the files
or the Iceberg table itself, not through this package): the same values, bit for bit, as
:func:`restore_output_scores` for every file it writes (a forged code outside 0-255 is refused by
the package and read differently by the SQL; verify names such a file). Other engines translate it (Spark: ``transform``)."""


def stored_columns(columns: list[str], present: set[str] | list[str]) -> list[str]:
    """The columns to read from a file whose columns are ``present`` to get the entry columns
    ``columns`` (those the file has): ``columns``, and when they name ``outputs`` in a file with
    derived scores, ``score`` and :data:`DERIVED_SCORES` too. Pass what was read to
    :func:`restore_output_scores`, then select ``columns``."""
    wanted = [c for c in columns if c in present]
    if "outputs" in wanted and DERIVED_SCORES in present:
        wanted += [c for c in ("score", DERIVED_SCORES) if c not in wanted]
    return wanted


_TRACE_ID = re.compile(r"[0-9a-f]{32}")


def check_trace_id(value: object, parameter: str = "trace_id") -> str:
    """``value`` as a trace id the ``trace_id`` column holds (W3C: 32 hex digits, not all
    zeros; upper case is folded to lower case). Raises ``ValueError`` naming ``parameter`` and
    the expected format otherwise; the value is not echoed."""
    folded = value.strip().lower() if isinstance(value, str) else None
    if folded is None or _TRACE_ID.fullmatch(folded) is None or folded == "0" * 32:
        raise ValueError(f"{parameter} must be a W3C trace id: 32 hexadecimal digits, not all zeros")
    return folded


def empty_table() -> pa.Table:
    """An empty table with the entry schema."""
    return ENTRY_SCHEMA.empty_table()


def schema_markdown() -> str:
    """The schema as a Markdown table (docs/schema.md is generated from it)."""
    lines = ["| column | type | nullable | meaning |", "|---|---|---|---|"]
    for name, typ, nullable, doc in COLUMNS:
        lines.append(f"| `{name}` | `{typ}` | {'yes' if nullable else 'no'} | {doc} |")
    return "\n".join(lines)
