"""Outcomes joined to the journal entries they are about.

The latest-label rule: a request's outcome is its record with the latest ``recorded_at`` (ties:
the greater ``outcome_id``), whatever its ``outcome_time`` and source; earlier records stay in the
journal as history (a correction is a new record, never an edit). Entries and outcomes join on
``request_id``; a composed request's entries (one per journaled deployment) all share its outcome.
"""

from __future__ import annotations

from typing import Any

import pyarrow as pa
import pyarrow.compute as pc

from serve_journal.outcomes.record import load_outcomes
from serve_journal.outcomes.schema import OUTCOME_SCHEMA
from serve_journal.read.query import JournalQuery
from serve_journal.storage import JournalStorage

ENTRY_COLUMNS = ("ts", "model_name", "model_version", "decision", "score", "subject_token")
"""Entry columns :func:`find_outcomes` puts beside each outcome record (``entry_`` prefixed)."""


def latest_outcomes(outcomes: pa.Table) -> pa.Table:
    """One record per request id: the latest recorded (see the module docstring)."""
    if outcomes.num_rows <= 1:
        return outcomes
    ordered = outcomes.take(pc.sort_indices(outcomes, sort_keys=[
        ("request_id", "ascending"), ("recorded_at", "descending"), ("outcome_id", "descending")]))
    ids = ordered["request_id"].to_pylist()
    keep = [i for i in range(len(ids)) if i == 0 or ids[i] != ids[i - 1]]
    return ordered.take(pa.array(keep, pa.int64()))


def find_outcomes(query: JournalQuery, *, history: bool = False, **filters: Any) -> pa.Table:
    """Outcomes of the entries ``query.find(**filters)`` returns (so the lookup is in the access
    log, and a subject goes through its token: a forgotten subject's entries, and so their
    outcomes, are not found). One row per entry with an outcome: the latest record, or with
    ``history`` every record, oldest first; columns: the outcome schema's, then
    ``entry_<column>`` of :data:`ENTRY_COLUMNS` and ``latest`` (the record the latest-label rule
    picks)."""
    entries = query.find(**filters)
    outcomes = load_outcomes(query.storage, entries["request_id"].to_pylist())
    latest_ids = set(latest_outcomes(outcomes)["outcome_id"].to_pylist())
    if not history:
        outcomes = outcomes.filter(pc.is_in(outcomes["outcome_id"],
                                            value_set=pa.array(sorted(latest_ids), pa.string())))
    by_request: dict[str, list[dict[str, Any]]] = {}
    for row in entries.select(["request_id", *ENTRY_COLUMNS]).to_pylist():
        by_request.setdefault(row["request_id"], []).append(row)
    rows = []
    for record in outcomes.to_pylist():
        for entry in by_request.get(record["request_id"], []):
            rows.append({**record, **{f"entry_{c}": entry[c] for c in ENTRY_COLUMNS},
                         "latest": record["outcome_id"] in latest_ids})
    schema = pa.schema([*OUTCOME_SCHEMA,
                        *(pa.field(f"entry_{c}", entries.schema.field(c).type) for c in ENTRY_COLUMNS),
                        pa.field("latest", pa.bool_())])
    return pa.Table.from_pylist(rows, schema=schema)


JOINED_COLUMNS: tuple[tuple[str, str, pa.DataType], ...] = (
    ("outcome_label", "label", pa.string()),
    ("outcome_value", "value", pa.float64()),
    ("outcome_time", "outcome_time", pa.timestamp("us", tz="UTC")),
    ("outcome_source", "source", pa.string()),
    ("outcome_recorded_at", "recorded_at", pa.timestamp("us", tz="UTC")),
)
"""Columns :func:`join_outcomes` adds to entries: ``(name, outcome column, type)``."""


def join_outcomes(entries: pa.Table, journal: str | JournalStorage) -> pa.Table:
    """``entries`` (e.g. a :meth:`JournalQuery.find` result, so the lookup is in the access log)
    with each entry's latest outcome (the latest-label rule) beside it: the columns of
    :data:`JOINED_COLUMNS`, null for an entry without an outcome. Rows and their order are
    unchanged; outcomes are read only from files whose bytes match their manifest record (see
    :func:`~serve_journal.outcomes.record.load_outcomes`)."""
    ids = sorted({r for r in entries["request_id"].to_pylist() if r}) if entries.num_rows else []
    latest = latest_outcomes(load_outcomes(journal, ids)) if ids else OUTCOME_SCHEMA.empty_table()
    by_request = {row["request_id"]: row for row in latest.to_pylist()}
    out = entries
    for name, column, dtype in JOINED_COLUMNS:
        values = [by_request.get(r, {}).get(column) for r in entries["request_id"].to_pylist()]
        if name in out.column_names:
            out = out.drop_columns([name])
        out = out.append_column(pa.field(name, dtype), pa.array(values, dtype))
    return out


__all__ = ["ENTRY_COLUMNS", "JOINED_COLUMNS", "find_outcomes", "join_outcomes", "latest_outcomes"]
