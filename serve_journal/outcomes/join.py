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


__all__ = ["ENTRY_COLUMNS", "find_outcomes", "latest_outcomes"]
