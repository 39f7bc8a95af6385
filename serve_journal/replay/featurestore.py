"""Feature stores with time travel: the features a decision was taken on, as of its timestamp.

The journal never stores raw features; replay (:mod:`serve_journal.replay`) recomputes them from a
feature store *as of* each entry's timestamp, hashes them with the entry's key and compares the
result with the journaled ``features_hmac``.

Entity ids here are the **subject ids** (the raw identifiers). The feature store is the operator's
PII store and lives outside the journal; the journal only holds subject tokens. Replay links the
two by turning the entity ids into tokens with the pseudonymizer (see docs/replay.md).

:class:`ParquetFeatureStore` is the built-in implementation: append-only Parquet files of
``(entity_id, ts, features)`` where ``features`` is the JSON text of the feature mapping exactly as
the model received it (JSON keeps ``int`` and ``float`` apart, so the canonical encoding of the
replayed value is byte-identical). Point-in-time reads are one DuckDB ``ASOF JOIN``. Unlike the
journal, the feature store may be rewritten: :meth:`ParquetFeatureStore.purge` rewrites the files
without a forgotten subject.

Another store plugs in by implementing :class:`FeatureStore`; Feast's point-in-time retrieval
does through :class:`~serve_journal.replay.feast_store.FeastFeatureStore` (docs/replay.md).

Errors never carry a feature value or an entity id: a row whose JSON does not parse, or a read
that fails, raises :class:`~serve_journal.errors.ReplayDataError` naming the position and the
error's type only (a ``json.JSONDecodeError`` holds the whole text it failed on, and a database
error may quote the value it could not convert). File paths reach DuckDB with their glob
characters escaped (:mod:`serve_journal.duckdb_paths`).
"""

from __future__ import annotations

import datetime as dt
import json
import os
import threading
import uuid
from collections.abc import Mapping, Sequence
from typing import Any, Protocol, cast, runtime_checkable

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from serve_journal.duckdb_paths import duckdb_literal_paths
from serve_journal.errors import ReplayDataError
from serve_journal.storage import local_root
from serve_journal.times import to_micros

__all__ = [
    "FEATURE_FILE_SCHEMA",
    "FeatureStore",
    "FeatureStorePurge",
    "ParquetFeatureStore",
    "default_feature_store_uri",
    "parse_features_json",
    "record_features",
]

FEATURE_FILE_SCHEMA = pa.schema([
    pa.field("entity_id", pa.string(), nullable=False),
    pa.field("ts", pa.timestamp("us", tz="UTC"), nullable=False),
    pa.field("features", pa.string(), nullable=False),
])
"""Schema of every file of a :class:`ParquetFeatureStore`: ``features`` is JSON text."""

_FILE_PREFIX = "features-"
_SUFFIX = ".parquet"

Timestamp = dt.datetime | int
"""An aware (or UTC-naive) datetime, or microseconds since the epoch."""


@runtime_checkable
class FeatureStore(Protocol):
    """What replay and forget need from a feature store."""

    def get_as_of(self, entity_ids: Sequence[str], timestamps: Sequence[Timestamp]
                  ) -> list[dict[str, Any] | None]:
        """Per position: the entity's latest feature mapping at or before the timestamp, else ``None``."""

    def purge(self, subject: str) -> int:
        """Delete every row of ``subject`` (right to be forgotten); returns how many were removed."""

    def entity_ids(self) -> list[str]:
        """Every entity id that has at least one row (replay's default set of subjects)."""


def default_feature_store_uri(journal_uri: str) -> str:
    """``<journal parent>/features`` for a local journal (where the fraud example writes)."""
    root = local_root(journal_uri)
    if root is None:
        raise ValueError("a remote journal has no default feature store; pass the feature store "
                         "location explicitly (e.g. --features /path/to/features)")
    return os.path.join(os.path.dirname(root), "features")


def _to_micros(value: Timestamp, field: str) -> int:
    """Microseconds since the epoch of an int (as is) or a datetime (naive is UTC)."""
    if isinstance(value, bool):
        raise TypeError(f"{field} must be a datetime or microseconds since the epoch, got bool")
    if isinstance(value, int):
        return value
    if isinstance(value, dt.datetime):
        return cast(int, to_micros(value, field))  # None only for None, which is not a datetime
    raise TypeError(f"{field} must be a datetime or microseconds since the epoch, "
                    f"got {type(value).__name__}")


def _json_default(value: Any) -> Any:
    tolist = getattr(value, "tolist", None)  # numpy scalars and arrays, as canonical_encode sees them
    if tolist is not None:
        return tolist()
    raise TypeError(f"feature of type {type(value).__name__} is not JSON-serializable; use int, "
                    "float, bool, None, str, list, dict or numpy numbers")


def _features_json(features: Mapping[str, Any]) -> str:
    if not isinstance(features, Mapping):
        raise TypeError(f"features must be a mapping of feature name to value, got "
                        f"{type(features).__name__}")
    return json.dumps(features, default=_json_default, separators=(",", ":"), allow_nan=True)


def parse_features_json(text: str, position: int) -> Any:
    """The feature mapping of one stored row, parsed from its JSON text.

    A text that is not JSON raises :class:`ReplayDataError` naming ``position`` (the row's place
    in the request) and where parsing stopped; never the text, which holds the features.
    """
    try:
        return json.loads(text)
    except ValueError as exc:  # JSONDecodeError keeps the whole text in .doc: not passed on
        failure = f"{type(exc).__name__} at character {getattr(exc, 'pos', '?')}"
    raise ReplayDataError(f"features at position {position} are not valid JSON ({failure})")


def _read_failed(what: str, exc: BaseException) -> ReplayDataError:
    """A read error without its message (a database error may quote the value it choked on)."""
    return ReplayDataError(f"reading the feature store ({what}) failed with {type(exc).__name__}; "
                           "its message is withheld because it may quote feature values or "
                           "entity ids")


class ParquetFeatureStore:
    """Append-only Parquet feature history in a local folder, read as of a time with DuckDB.

    ``write`` buffers rows and writes a new file every ``batch_rows`` rows (and on :meth:`flush`
    / :meth:`close`); reads flush pending rows first. Files are written to a temporary name and
    renamed, so a reader never sees half a file. Thread-safe. Pickling carries the folder and
    settings only, so a Ray task can open the same store.
    """

    def __init__(self, root: str | os.PathLike[str], *, batch_rows: int = 10_000,
                 threads: int | None = None) -> None:
        if not isinstance(batch_rows, int) or isinstance(batch_rows, bool) or batch_rows < 1:
            raise ValueError(f"batch_rows must be a positive integer, got {batch_rows!r}")
        if threads is not None and (not isinstance(threads, int) or threads < 1):
            raise ValueError(f"threads must be a positive integer or None, got {threads!r}")
        self.root = os.path.abspath(os.fspath(root))
        self.batch_rows = batch_rows
        self.threads = threads
        self._lock = threading.RLock()
        self._pending: list[tuple[str, int, str]] = []
        self._con: Any = None

    def __repr__(self) -> str:
        return f"ParquetFeatureStore({self.root!r})"

    def __reduce__(self) -> tuple[Any, ...]:
        return (type(self), (self.root,), {"batch_rows": self.batch_rows, "threads": self.threads})

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__init__(self.root, **state)

    # -- writing -------------------------------------------------------------------------------

    def write(self, entity_id: str, features: Mapping[str, Any], ts: Timestamp | None = None) -> None:
        """Record ``features`` of ``entity_id`` valid from ``ts`` (default: now)."""
        self.write_many([entity_id], [features], None if ts is None else [ts])

    def write_many(self, entity_ids: Sequence[str], features: Sequence[Mapping[str, Any]],
                   timestamps: Sequence[Timestamp] | None = None) -> None:
        """Record many rows at once; ``timestamps`` default to now."""
        if len(entity_ids) != len(features):
            raise ValueError(f"entity_ids and features must have the same length, got "
                             f"{len(entity_ids)} and {len(features)}")
        if timestamps is not None and len(timestamps) != len(entity_ids):
            raise ValueError(f"timestamps must have one value per entity id, got {len(timestamps)} "
                             f"for {len(entity_ids)}")
        now = _to_micros(dt.datetime.now(dt.UTC), "ts")
        rows = []
        for i, (entity, values) in enumerate(zip(entity_ids, features, strict=True)):
            if not isinstance(entity, str) or not entity:
                raise ValueError(f"entity_ids[{i}] must be a non-empty string (the subject id)")
            ts = now if timestamps is None else _to_micros(timestamps[i], f"timestamps[{i}]")
            rows.append((entity, ts, _features_json(values)))
        with self._lock:
            self._pending.extend(rows)
            if len(self._pending) >= self.batch_rows:
                self._write_pending()

    def flush(self) -> None:
        """Write buffered rows to a new file."""
        with self._lock:
            if self._pending:
                self._write_pending()

    def close(self) -> None:
        """Flush and release the DuckDB connection; harmless to call twice."""
        with self._lock:
            self.flush()
            if self._con is not None:
                self._con.close()
                self._con = None

    def __enter__(self) -> ParquetFeatureStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _write_pending(self) -> None:
        rows, self._pending = self._pending, []
        rows.sort(key=lambda r: (r[0], r[1]))  # sorted by entity: row-group statistics prune reads
        table = pa.table({
            "entity_id": pa.array([r[0] for r in rows], pa.string()),
            "ts": pa.array([r[1] for r in rows], pa.int64()).cast(pa.timestamp("us", tz="UTC")),
            "features": pa.array([r[2] for r in rows], pa.string()),
        }, schema=FEATURE_FILE_SCHEMA)
        name = f"{_FILE_PREFIX}{dt.datetime.now(dt.UTC):%Y%m%dT%H%M%S%f}-{uuid.uuid4().hex[:8]}{_SUFFIX}"
        self._publish(table, name)

    def _publish(self, table: pa.Table, name: str) -> None:
        os.makedirs(self.root, exist_ok=True)
        tmp = os.path.join(self.root, f".tmp-{uuid.uuid4().hex}{_SUFFIX}")
        pq.write_table(table, tmp, compression="zstd", row_group_size=64 * 1024)
        os.replace(tmp, os.path.join(self.root, name))

    def files(self) -> list[str]:
        """Absolute paths of the store's data files (oldest first)."""
        try:
            names = os.listdir(self.root)
        except FileNotFoundError:
            return []
        return [os.path.join(self.root, n) for n in sorted(names)
                if n.startswith(_FILE_PREFIX) and n.endswith(_SUFFIX)]

    # -- reading -------------------------------------------------------------------------------

    def _connection(self) -> Any:
        if self._con is None:
            import duckdb  # inside: DuckDB is only needed to read, and the CLI imports this module

            con = duckdb.connect(config={"autoinstall_known_extensions": False,
                                         "autoload_known_extensions": False})
            con.execute("SET TimeZone='UTC'")
            if self.threads:
                con.execute(f"SET threads={int(self.threads)}")
            self._con = con
        return self._con

    def features_json_as_of(self, entity_ids: pa.Array | Sequence[str],
                            ts_us: pa.Array | Sequence[int]) -> pa.Array:
        """Arrow form of :meth:`get_as_of`: the JSON text per position (null when none).

        ``ts_us`` are microseconds since the epoch (int64) or a timestamp array. One ASOF join for
        the whole batch; replay calls this inside its Ray tasks, so raw features never pass
        through Ray's object store.
        """
        entities = pa.array(entity_ids, pa.string()) if not isinstance(entity_ids, pa.Array) \
            else entity_ids.cast(pa.string())
        times = ts_us if isinstance(ts_us, pa.Array) else pa.array(ts_us, pa.int64())
        if pa.types.is_timestamp(times.type):
            times = times.cast(pa.timestamp("us", tz="UTC"))
        else:
            times = times.cast(pa.int64()).cast(pa.timestamp("us", tz="UTC"))
        if len(entities) != len(times):
            raise ValueError(f"entity_ids and timestamps must have the same length, got "
                             f"{len(entities)} and {len(times)}")
        with self._lock:
            self.flush()
            files = self.files()
            if not files or len(entities) == 0:
                return pa.nulls(len(entities), pa.string())
            query = pa.table({"i": pa.array(range(len(entities)), pa.int64()),
                              "entity_id": entities, "ts": times})
            con = self._connection()
            con.register("sj_query", query)
            failed: BaseException | None = None
            try:
                result = con.sql(
                    """
                    WITH f AS (
                        SELECT entity_id, ts, features FROM read_parquet(?)
                        WHERE entity_id IN (SELECT DISTINCT entity_id FROM sj_query)
                          AND ts <= (SELECT max(ts) FROM sj_query)
                    )
                    SELECT q.i, f.features
                    FROM sj_query q ASOF LEFT JOIN f
                      ON q.entity_id = f.entity_id AND q.ts >= f.ts
                    ORDER BY q.i
                    """, params=[duckdb_literal_paths(files)]).to_arrow_table()
            except Exception as exc:  # noqa: BLE001 - re-raised below without its message
                failed = exc
            finally:
                con.unregister("sj_query")
        if failed is not None:
            raise _read_failed("features as of a time", failed)
        return result.column("features").combine_chunks()

    def get_as_of(self, entity_ids: Sequence[str], timestamps: Sequence[Timestamp]
                  ) -> list[dict[str, Any] | None]:
        """Per position: the entity's latest features at or before the timestamp, else ``None``."""
        if len(entity_ids) != len(timestamps):
            raise ValueError(f"entity_ids and timestamps must have the same length, got "
                             f"{len(entity_ids)} and {len(timestamps)}")
        micros = [_to_micros(t, f"timestamps[{i}]") for i, t in enumerate(timestamps)]
        texts = self.features_json_as_of(list(entity_ids), micros).to_pylist()
        return [None if t is None else parse_features_json(t, i) for i, t in enumerate(texts)]

    def entity_ids(self) -> list[str]:
        """Every entity id with at least one row, sorted."""
        with self._lock:
            self.flush()
            files = self.files()
            if not files:
                return []
            failed: BaseException | None = None
            try:
                rows = self._connection().execute(
                    "SELECT DISTINCT entity_id FROM read_parquet(?) ORDER BY 1",
                    [duckdb_literal_paths(files)]).fetchall()
            except Exception as exc:  # noqa: BLE001 - re-raised below without its message
                failed = exc
        if failed is not None:
            raise _read_failed("entity ids", failed)
        return [r[0] for r in rows]

    def history(self, entity_id: str) -> pa.Table:
        """Every row of one entity, oldest first (for operators and tests)."""
        with self._lock:
            self.flush()
            files = self.files()
            if not files:
                return FEATURE_FILE_SCHEMA.empty_table()
            return self._connection().sql(
                "SELECT entity_id, ts, features FROM read_parquet(?) WHERE entity_id = ? ORDER BY ts",
                params=[duckdb_literal_paths(files), entity_id]).to_arrow_table()

    # -- rewriting -----------------------------------------------------------------------------

    def purge(self, subject: str) -> int:
        """Rewrite every file holding ``subject`` without its rows; returns the rows removed."""
        if not isinstance(subject, str) or not subject:
            raise TypeError("subject must be a non-empty string (the subject id)")
        removed = 0
        with self._lock:
            self.flush()
            for path in self.files():
                table = pq.ParquetFile(path).read()
                keep = pc.not_equal(table["entity_id"], subject)
                kept = table.filter(keep)
                if kept.num_rows == table.num_rows:
                    continue
                removed += table.num_rows - kept.num_rows
                name = os.path.basename(path)
                if kept.num_rows:
                    self._publish(kept, name)  # atomic replace of the same name
                else:
                    os.remove(path)
        return removed

    def replace_rows(self, entity_id: str, ts: Timestamp, features: Mapping[str, Any]) -> int:
        """Overwrite the features of the row(s) ``(entity_id, ts)`` in place; returns rows changed.

        For corrections of history by the operator (and for tests showing that replay notices):
        entries decided on the old values then no longer verify.
        """
        micros = _to_micros(ts, "ts")
        text = _features_json(features)
        changed = 0
        with self._lock:
            self.flush()
            for path in self.files():
                table = pq.ParquetFile(path).read()
                ts_us = table["ts"].cast(pa.int64())
                hit = pc.and_(pc.equal(table["entity_id"], entity_id), pc.equal(ts_us, micros))
                count = pc.sum(hit.cast(pa.int64())).as_py() or 0
                if not count:
                    continue
                changed += count
                column = pc.if_else(hit, pa.scalar(text, pa.string()), table["features"])
                table = table.set_column(table.schema.get_field_index("features"), "features",
                                         column)
                self._publish(table.cast(FEATURE_FILE_SCHEMA), os.path.basename(path))
        return changed


class FeatureStorePurge:
    """The built-in forget purge hook (``features:PATH``): delete a subject's whole feature
    history from the :class:`ParquetFeatureStore` in ``root``; returns the rows removed.

    Picklable (the folder only). A folder that does not exist is an error, not "nothing to
    purge": a mistyped path must not pass for a purge."""

    def __init__(self, root: str | os.PathLike[str]) -> None:
        self.root = os.path.abspath(os.fspath(root))
        self.hook_name = f"features:{self.root}"

    def __repr__(self) -> str:
        return f"FeatureStorePurge({self.root!r})"

    def __call__(self, subject: str) -> int:
        if not os.path.isdir(self.root):
            raise FileNotFoundError(f"feature store folder {self.root} does not exist")
        store = ParquetFeatureStore(self.root)
        try:
            return store.purge(subject)
        finally:
            store.close()


def record_features(store: FeatureStore | ParquetFeatureStore, entity_id: str,
                    features: Mapping[str, Any], ts: Timestamp | None = None) -> None:
    """Write one entity's features to ``store`` with history (what the fraud example calls).

    Call it *before* the request is served (the decision timestamp must come after ``ts``) and
    with the exact feature mapping the model receives.
    """
    write = getattr(store, "write", None)
    if write is None:
        raise TypeError(f"{type(store).__name__} has no write(entity_id, features, ts) method")
    write(entity_id, features, ts)
