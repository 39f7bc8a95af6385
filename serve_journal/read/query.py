"""Investigations: find journal entries by subject, request, model, decision, outcome and time.

DuckDB reads the hive-partitioned Parquet files directly. Partition pruning happens before DuckDB
sees a file: only the live files (see :func:`serve_journal.catalog.live_files`) of the
requested model and of the hours (days) that overlap ``[since, until)`` are handed to it. Inside
each file, rows are sorted by ``subject_token`` and carry min/max statistics, a page index and
Parquet bloom filters on ``subject_token`` and ``request_id``.

Point lookups (``subject_token=`` or ``request_id=``) are pruned further before DuckDB
(:mod:`serve_journal.read.pruning`): each file's footer is read once per :class:`JournalQuery` (files are write-once, so it never goes
stale) and keeps, per row group, the subject token's min/max and where the bloom filters are. A
lookup tests the statistics and one 32-byte bloom block per row group, reads the key column of
the row groups that may hold the value, and only the row groups that do hold it in full; DuckDB
then runs the very same SQL over those rows. Results are exactly those of a full scan.

A trace id lookup (``trace_id=``, schema v3) is pruned the same way by the ``trace_id`` column's
statistics: a file without the column (schema v1 or v2) or whose row groups hold no trace id
(a deployment without tracing) is ruled out from its footer alone, as is a row group whose
min/max range excludes the id; the remaining row groups' ``trace_id`` column is read, and the
row groups that hold the id in full.

Every query writes an access record (who, when, which filter, how many rows) beside the journal;
a subject appears there only as its token, and so does a caller looked up through a caller
tokenizer. A ``subject_token=`` must have a subject token's format
(:func:`serve_journal.privacy.tokens.check_subject_token`). Local file paths reach DuckDB with
their glob characters escaped (:mod:`serve_journal.duckdb_paths`), so a file named ``*.parquet``
reads itself only.
"""

from __future__ import annotations

import datetime as dt
import json
import math
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from serve_journal.catalog import DataFile, live_files, reader_cache
from serve_journal.catalog.layout import TIERS
from serve_journal.duckdb_paths import UnreadableByDuckDB, duckdb_literal_path
from serve_journal.privacy.tokens import check_subject_token, is_caller_token
from serve_journal.read.access_log import read_access_log, record_access
from serve_journal.read.pruning import FooterCache
from serve_journal.retry import retry_call
from serve_journal.schema import (
    ENTRY_SCHEMA,
    OUTCOMES,
    STORED_SCHEMA,
    check_trace_id,
    restore_output_scores,
)
from serve_journal.storage import JournalStorage, open_storage
from serve_journal.times import as_utc

__all__ = [
    "JournalQuery",
    "QueryStats",
    "format_table",
    "read_access_log",
    "to_json",
    "write_parquet",
]

Tokenizer = Callable[[str], "str | None"]

TABLE_COLUMNS = (
    "ts",
    "request_id",
    "subject_token",
    "model_name",
    "model_version",
    "decision",
    "score",
    "threshold",
    "outcome",
    "caller",
    "latency_ms",
)
"""Columns :func:`format_table` shows by default."""

_RETRIES = 3


@dataclass(frozen=True)
class QueryStats:
    """What the last query did (also written to the access log)."""

    files_scanned: int
    rows: int
    elapsed_ms: float
    row_groups_total: int | None = None
    """Point lookups: row groups in the files scanned."""
    row_groups_probed: int | None = None
    """Point lookups: row groups whose key column was read (statistics and bloom filter said
    "maybe")."""
    row_groups_read: int | None = None
    """Point lookups: row groups read in full (they hold the key)."""


def _sql_string(value: str) -> str:
    return "'" + value.replace("'", "''") + "'"


class JournalQuery:
    """Query a journal.

    ``storage_or_uri`` is a :class:`JournalStorage` or a URI/path. ``tokenizer(subject_id)``
    turns a subject id into its token (``None`` when the subject is unknown or was shredded);
    without one, only ``subject_token=`` lookups are possible. ``caller_tokenizer(caller_id)``
    turns a caller id into the caller token replicas with ``caller_privacy="token"`` record
    (:func:`serve_journal.caller_tokenizer`); with it, ``find(caller=...)`` finds the caller's
    entries whether they were journaled plain or tokenized, and the access log holds the token
    only. ``actor`` names who queries, for the access log.
    """

    def __init__(
        self,
        storage_or_uri: JournalStorage | str,
        *,
        tokenizer: Tokenizer | None = None,
        caller_tokenizer: Tokenizer | None = None,
        actor: str,
        threads: int | None = None,
    ) -> None:
        if isinstance(storage_or_uri, JournalStorage):
            self.storage = storage_or_uri
        else:
            self.storage = open_storage(storage_or_uri)
        if not isinstance(actor, str) or not actor.strip():
            raise ValueError("actor must name who runs the query (used in the access log)")
        self.actor = actor
        self._tokenizer = tokenizer
        self._caller_tokenizer = caller_tokenizer
        self._markers = reader_cache(self.storage)
        self._lock = threading.Lock()
        self._con = None
        self._threads = threads
        self._footers = FooterCache(self.storage)
        self._last_source = ""
        self._prune_stats: tuple[int, int, int] | None = None
        self.prune_point_lookups = True
        """Prune point lookups with cached footers before DuckDB (off: DuckDB scans the files)."""
        self.last_stats: QueryStats | None = None

    def __repr__(self) -> str:
        return f"JournalQuery({self.storage.uri!r}, actor={self.actor!r})"

    def _connection(self):
        if self._con is None:
            import duckdb  # inside: 0.2 s to import, and only point-free queries need it

            con = duckdb.connect(config={"autoinstall_known_extensions": False,
                                         "autoload_known_extensions": False})
            con.execute("SET TimeZone='UTC'")
            con.execute("SET parquet_metadata_cache=true")
            con.execute(f"SET threads={int(self._threads or 2)}")
            self._con = con
        return self._con

    def close(self) -> None:
        """Release the DuckDB connection; harmless to call twice."""
        with self._lock:
            if self._con is not None:
                self._con.close()
                self._con = None
            self._footers.clear()

    def __enter__(self) -> JournalQuery:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ---------------------------------------------------------------------------------------

    def files(
        self,
        *,
        model: str | None = None,
        since: dt.datetime | str | None = None,
        until: dt.datetime | str | None = None,
        tier: str = "hot",
    ) -> list[DataFile]:
        """The live files a query with these bounds scans (partition pruning)."""
        if tier not in (*TIERS, "all"):
            raise ValueError(f"tier must be 'hot', 'cold' or 'all', got {tier!r}")
        since_utc = as_utc(since, "since")
        until_utc = as_utc(until, "until")
        out = []
        for f in live_files(self.storage, tier=tier, model=model, cache=self._markers):
            if model is not None and f.key.model != model:
                continue
            if until_utc is not None and f.key.start >= until_utc:
                continue
            if since_utc is not None and f.key.end <= since_utc:
                continue
            out.append(f)
        return out

    def find(
        self,
        subject: str | None = None,
        subject_token: str | None = None,
        request_id: str | None = None,
        model: str | None = None,
        model_version: str | None = None,
        decision: str | None = None,
        outcome: str | None = None,
        since: dt.datetime | str | None = None,
        until: dt.datetime | str | None = None,
        limit: int | None = None,
        tier: str = "hot",
        caller: str | None = None,
        trace_id: str | None = None,
    ) -> pa.Table:
        """Entries matching every given filter, oldest first, as a table with the entry schema.

        ``subject`` is a raw subject id: it is turned into its token with the tokenizer and never
        stored or logged. An unknown or shredded subject gives an empty result without a scan.
        ``subject_token`` must have a subject token's format (``TokenFormatError`` names the
        parameter otherwise). ``caller`` is a caller id (or a ``ct-`` caller token): with a caller
        tokenizer, entries journaled with its token match too (see the class doc).
        ``trace_id`` is a W3C trace id (32 hex digits; ``ValueError`` otherwise): the entries
        every journaled deployment recorded for that trace (schema v3 entries only; see
        docs/query.md). ``since`` is inclusive, ``until`` exclusive (UTC; naive times are taken
        as UTC).
        """
        started = time.perf_counter()
        if subject is not None and subject_token is not None:
            raise ValueError("give subject or subject_token, not both")
        if subject_token is not None:
            check_subject_token(subject_token, "subject_token")
        if outcome is not None and outcome not in OUTCOMES:
            raise ValueError(f"outcome must be one of {OUTCOMES}, got {outcome!r}")
        if limit is not None and (not isinstance(limit, int) or limit < 1):
            raise ValueError(f"limit must be a positive integer, got {limit!r}")
        if trace_id is not None:
            trace_id = check_trace_id(trace_id)
        since_utc = as_utc(since, "since")
        until_utc = as_utc(until, "until")
        unresolved = False
        if subject is not None:
            if self._tokenizer is None:
                raise ValueError(
                    "subject= needs a tokenizer (JournalQuery(..., tokenizer=...)); "
                    "or pass subject_token="
                )
            subject_token = self._tokenizer(subject)
            unresolved = subject_token is None
        callers, caller_logged = self._callers(caller)
        filters: dict[str, Any] = {
            "subject_token": subject_token,
            **caller_logged,
            "request_id": request_id,
            "trace_id": trace_id,
            "model": model,
            "model_version": model_version,
            "decision": decision,
            "outcome": outcome,
            "since": since_utc.isoformat() if since_utc else None,
            "until": until_utc.isoformat() if until_utc else None,
            "limit": limit,
        }
        filters = {k: v for k, v in filters.items() if v is not None}
        if unresolved:
            filters["subject_unresolved"] = True  # unknown or shredded: nothing to find

        with self._lock:
            self._prune_stats = None
            if unresolved:
                table, scanned = ENTRY_SCHEMA.empty_table(), 0
            else:
                table, scanned = self._run(
                    subject_token=subject_token,
                    callers=callers,
                    request_id=request_id,
                    trace_id=trace_id,
                    model=model,
                    model_version=model_version,
                    decision=decision,
                    outcome=outcome,
                    since=since_utc,
                    until=until_utc,
                    limit=limit,
                    tier=tier,
                )
        elapsed_ms = (time.perf_counter() - started) * 1000
        record_access(
            self.storage,
            actor=self.actor,
            filters=filters,
            rows=table.num_rows,
            tier=tier,
            files_scanned=scanned,
            elapsed_ms=elapsed_ms,
        )
        prune = self._prune_stats or (None, None, None)
        self.last_stats = QueryStats(scanned, table.num_rows, elapsed_ms, *prune)
        return table

    def _callers(self, caller: str | None) -> tuple[tuple[str, ...] | None, dict[str, Any]]:
        """The ``caller`` column values a ``caller=`` filter matches, and what the access log
        records of it (the token only when there is a caller tokenizer)."""
        if caller is None:
            return None, {}
        if not isinstance(caller, str) or not caller:
            raise ValueError("caller must be a non-empty string (a caller id or a ct- token)")
        if is_caller_token(caller):
            return (caller,), {"caller_token": caller}
        if self._caller_tokenizer is None:
            return (caller,), {"caller": caller}
        token = self._caller_tokenizer(caller)
        if token is None or token == caller:
            return (caller,), {"caller_token": token or "unresolved"}
        return (caller, token), {"caller_token": token}

    def explain_analyze(self, **filters: Any) -> dict[str, Any]:
        """DuckDB's profile (JSON) of the scan ``find(**filters)`` runs: row groups scanned,
        bytes read. Not recorded in the access log: it returns no entries."""
        with self._lock:
            sql, params, files = self._sql(**self._normalise(filters))
            if not files:
                return {"query": {"total_row_groups_scanned": 0, "total_row_groups_to_scan": 0}}
            con = self._connection()
            con.execute("PRAGMA enable_profiling='json'")
            try:
                text = con.execute("EXPLAIN ANALYZE " + sql, params).fetchall()[0][1]
            finally:
                con.execute("PRAGMA disable_profiling")
        return json.loads(text)

    # ---------------------------------------------------------------------------------------

    def _normalise(self, filters: dict[str, Any]) -> dict[str, Any]:
        out = {
            "subject_token": None, "request_id": None, "model": None, "model_version": None,
            "decision": None, "outcome": None, "since": None, "until": None, "limit": None,
            "tier": "hot", "caller": None, "trace_id": None,
        }
        unknown = set(filters) - set(out)
        if unknown:
            raise ValueError(f"unknown filter(s) {sorted(unknown)}; known: {sorted(out)}")
        out.update(filters)
        if out["subject_token"] is not None:
            check_subject_token(out["subject_token"], "subject_token")
        if out["trace_id"] is not None:
            out["trace_id"] = check_trace_id(out["trace_id"])
        out["callers"] = self._callers(out.pop("caller"))[0]
        out["since"] = as_utc(out["since"], "since")
        out["until"] = as_utc(out["until"], "until")
        return out

    def _sql(
        self,
        *,
        subject_token: str | None,
        callers: tuple[str, ...] | None,
        request_id: str | None,
        trace_id: str | None,
        model: str | None,
        model_version: str | None,
        decision: str | None,
        outcome: str | None,
        since: dt.datetime | None,
        until: dt.datetime | None,
        limit: int | None,
        tier: str,
    ) -> tuple[str, list[Any], list[DataFile]]:
        files = self.files(model=model, since=since, until=until, tier=tier)
        where: list[str] = []
        params: list[Any] = []
        for column, value in (
            ("subject_token", subject_token),
            ("request_id", request_id),
            ("trace_id", trace_id),
            ("model_name", model),
            ("model_version", model_version),
            ("decision", decision),
            ("outcome", outcome),
        ):
            if value is not None:
                where.append(f"{column} = ?")
                params.append(value)
        if callers:
            where.append(f"caller IN ({', '.join('?' for _ in callers)})")
            params.extend(callers)
        if since is not None:
            where.append("ts >= ?")
            params.append(since)
        if until is not None:
            where.append("ts < ?")
            params.append(until)
        source = self._source(files)
        self._last_source = source
        sql = f"SELECT * FROM {source}"
        if where:
            sql += " WHERE " + " AND ".join(where)
        sql += " ORDER BY ts, producer_id, seq"
        if limit is not None:
            sql += f" LIMIT {int(limit)}"
        return sql, params, files

    def _pruned(self, files: Sequence[DataFile], column: str, value: str) -> pa.Table:
        """The rows of ``files`` with ``column == value``, read through cached footers: key
        column of the candidate row groups first, whole row groups only where the key is."""
        parts = []
        total = probed = read = 0
        for f in files:
            index = self._footers.get(f.path)
            total += index.num_row_groups
            groups = (_trace_groups(index.parquet.metadata, value) if column == "trace_id"
                      else index.candidates(column, value))
            if not groups:
                continue
            probed += len(groups)
            keys = index.parquet.read_row_groups(groups, columns=[column], use_threads=False)
            if not pc.any(pc.equal(keys.column(0), value)).as_py():
                continue
            offsets, start = [], 0
            for rg in groups:
                n = index.parquet.metadata.row_group(rg).num_rows
                offsets.append((rg, start, n))
                start += n
            for rg, begin, n in offsets:
                mask = pc.equal(keys.column(0).slice(begin, n), value)
                if not pc.any(mask).as_py():
                    continue
                read += 1
                rows = index.parquet.read_row_group(rg, use_threads=False).filter(mask)
                parts.append(_to_entry_schema(rows))
        self._prune_stats = (total, probed, read)
        if not parts:
            return ENTRY_SCHEMA.empty_table()
        return pa.concat_tables(parts)

    def _source(self, files: Sequence[DataFile]) -> str:
        root = self.storage.local_path()
        if root is not None:
            try:
                listing = ", ".join(_sql_string(duckdb_literal_path(f"{root}/{f.path}"))
                                    for f in files)
            except UnreadableByDuckDB:
                pass  # such a path goes through pyarrow below, which never globs
            else:
                return f"read_parquet([{listing}], hive_partitioning=false, union_by_name=true)"
        # Remote storage (or a local path DuckDB cannot read literally): pyarrow's filesystem
        # reads, DuckDB pushes filters into the dataset scan.
        import pyarrow.dataset as ds  # inside: 0.4 s to import, needed by scans only

        dataset = ds.dataset(
            [self.storage.full_path(f.path) for f in files],
            schema=STORED_SCHEMA,  # cold files' derived-scores column too (nulls elsewhere)
            format="parquet",
            filesystem=self.storage.filesystem,
        )
        self._connection().register("journal_files", dataset)
        return "journal_files"

    def _run(self, **filters: Any) -> tuple[pa.Table, int]:
        import duckdb  # inside: 0.2 s to import, and only point-free queries need it

        # A compaction or lifecycle run may delete a replaced file after we listed it; the next
        # listing sees the committed rewrite instead, so the whole attempt is retried.
        return retry_call(lambda: self._run_once(filters), attempts=_RETRIES, delay_s=0.01,
                          max_delay_s=0.05, retry_on=(duckdb.IOException, OSError))

    def _run_once(self, filters: dict[str, Any]) -> tuple[pa.Table, int]:
        sql, params, files = self._sql(**filters)
        if not files:
            return ENTRY_SCHEMA.empty_table(), 0
        point = next(((c, filters[c]) for c in ("subject_token", "request_id", "trace_id")
                      if filters.get(c) is not None), None)
        # A trace id lookup always goes through the footers: they rule out the files of schema
        # versions before 3 (DuckDB would find no trace_id column if every file were one).
        if point is not None and (filters.get("trace_id") is not None
                                  or (self.prune_point_lookups and len(files) <= 256)):
            rows = self._pruned(files, *point)
            if rows.num_rows == 0:
                return ENTRY_SCHEMA.empty_table(), len(files)
            con = self._connection()
            con.register("journal_rows", rows)
            try:
                sql = sql.replace(f"FROM {self._last_source}", "FROM journal_rows", 1)
                result = con.sql(sql, params=params).to_arrow_table()
            finally:
                con.unregister("journal_rows")
            return _to_entry_schema(result), len(files)
        result = self._connection().sql(sql, params=params).to_arrow_table()
        return _to_entry_schema(result), len(files)


def _trace_groups(meta: pq.FileMetaData, trace_id: str) -> list[int]:
    """Row groups of a file (its footer ``meta``) that may hold ``trace_id``: none when the file
    has no ``trace_id`` column (schema v1, v2); per row group, none when its statistics say the
    column is all null or its min/max range excludes the id."""
    names = [meta.schema.column(i).path for i in range(meta.num_columns)]
    if "trace_id" not in names:
        return []
    ci = names.index("trace_id")
    out = []
    for rg in range(meta.num_row_groups):
        group = meta.row_group(rg)
        stats = group.column(ci).statistics
        if stats is not None:
            if stats.has_null_count and stats.null_count >= group.num_rows:
                continue
            if stats.has_min_max and not (stats.min <= trace_id <= stats.max):
                continue
        out.append(rg)
    return out


def _to_entry_schema(table: pa.Table) -> pa.Table:
    table = restore_output_scores(table)  # a cold file's derived output scores
    columns = [
        table.column(name) if name in table.column_names else pa.nulls(table.num_rows, field.type)
        for name, field in zip(ENTRY_SCHEMA.names, ENTRY_SCHEMA, strict=True)
    ]
    return pa.Table.from_arrays(columns, schema=ENTRY_SCHEMA.remove_metadata()).cast(ENTRY_SCHEMA)


# ------------------------------------------------------------------------------------------------
# Output
# ------------------------------------------------------------------------------------------------


def _cell(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, dt.datetime):
        return value.astimezone(dt.UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")
    if isinstance(value, float):
        return "nan" if math.isnan(value) else f"{value:.4g}"
    return str(value)


def format_table(
    table: pa.Table, columns: Sequence[str] = TABLE_COLUMNS, max_rows: int | None = 200
) -> str:
    """Entries as an aligned text table (the CLI's default output)."""
    columns = [c for c in columns if c in table.column_names]
    shown = table if max_rows is None else table.slice(0, max_rows)
    rows = [[_cell(v) for v in row.values()] for row in shown.select(columns).to_pylist()]
    widths = [max([len(c)] + [len(r[i]) for r in rows]) for i, c in enumerate(columns)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(columns, widths, strict=True)).rstrip()]
    lines.append("  ".join("-" * w for w in widths))
    lines.extend("  ".join(v.ljust(w) for v, w in zip(r, widths, strict=True)).rstrip() for r in rows)
    footer = f"({table.num_rows} entr{'y' if table.num_rows == 1 else 'ies'}"
    if max_rows is not None and table.num_rows > max_rows:
        footer += f", first {max_rows} shown"
    lines.append(footer + ")")
    return "\n".join(lines)


def _json_value(value: Any) -> Any:
    if isinstance(value, dt.datetime):
        return value.astimezone(dt.UTC).isoformat().replace("+00:00", "Z")
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, list):
        return [_json_value(v) for v in value]
    if isinstance(value, dict):
        return {k: _json_value(v) for k, v in value.items()}
    return value


def to_json(table: pa.Table, *, indent: int | None = None) -> str:
    """Entries as a JSON array of objects (times as ISO-8601 UTC)."""
    rows = [{k: _json_value(v) for k, v in row.items()} for row in table.to_pylist()]
    return json.dumps(rows, indent=indent)


def write_parquet(table: pa.Table, path: str) -> None:
    """Write the result to a local Parquet file (zstd)."""
    pq.write_table(table, path, compression="zstd")
