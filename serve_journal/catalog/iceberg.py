"""The journal as an Apache Iceberg table: the live files, registered in place.

Engines that read the journal folder directly (Spark, Trino, Athena, DuckDB's ``read_parquet``)
cannot apply the journal's own live-file rule and double-count what compaction and lifecycle
replaced. :func:`publish_iceberg` keeps an Iceberg table whose current snapshot holds exactly
the files :func:`serve_journal.catalog.live.live_files` answers, so those engines read each entry
once. Iceberg never copies nor rewrites a journal file: each Parquet file is registered where it
is (its statistics read from its footer), and only Iceberg's own metadata is written, below the
table location (default ``<journal>/_iceberg/<namespace>.<table>``).

One publish diffs the table's current files against the live files and commits the difference:

* only new files: an append snapshot;
* files gone from the live set (a commit marker replaced them): one overwrite snapshot that
  removes them and adds their replacements, so no reader of the table ever sees both or neither
  (snapshot property ``serve-journal.operation`` says ``replace``);
* nothing: no snapshot.

It is idempotent and safe to run again after a crash (the next publish finds the same
difference); a commit that lost a race with another publisher is retried against the new state.
The table is a view: manifests, signatures and commit markers stay the source of truth, and
:func:`table_disagreements` (run by verify when a catalog is configured) says where the view
differs from them.

Catalogs: a SQL catalog (``sqlite:///path/catalog.db`` by default, any SQLAlchemy URL), a REST
catalog (``https://...``) or AWS Glue (``glue``), or a JSON object of pyiceberg catalog properties
passed through as they are; see docs/iceberg.md.
"""

from __future__ import annotations

import json
import logging
import os
import time
import urllib.parse
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from serve_journal.catalog.live import MarkerCache, live_files
from serve_journal.schema import STORED_SCHEMA
from serve_journal.storage import JournalStorage, S3WormStorage, local_root

log = logging.getLogger(__name__)

ICEBERG_CATALOG_ENV = "SERVE_JOURNAL_ICEBERG_CATALOG"
"""The catalog to publish to: ``sqlite:///...``, another SQLAlchemy URL, ``https://...`` (REST),
``glue``, or a JSON object of pyiceberg catalog properties."""
ICEBERG_TABLE_ENV = "SERVE_JOURNAL_ICEBERG_TABLE"
ICEBERG_LOCATION_ENV = "SERVE_JOURNAL_ICEBERG_LOCATION"
DEFAULT_TABLE = "serve_journal.entries"
CATALOG_NAME = "serve_journal"
METADATA_DIR = "_iceberg"
"""Default home of the table's metadata, below the journal root (readers and verify skip it)."""

OPERATION_PROPERTY = "serve-journal.operation"
INSTALL_HINT = "Iceberg publishing needs pyiceberg: pip install 'serve-journal[iceberg]'"


@dataclass(frozen=True)
class IcebergSettings:
    """Where the journal's Iceberg table is published: a catalog, a table name, a location.

    Frozen and picklable (sinks receive it inside their settings); the catalog client is built
    only by :meth:`load_catalog`."""

    catalog: tuple[tuple[str, str], ...]
    """pyiceberg catalog properties (``type``, ``uri``, ``warehouse``, ``s3.endpoint``, ...)."""
    table: str = DEFAULT_TABLE
    """``<namespace>.<table>``."""
    location: str | None = None
    """Where the table's metadata lives; default ``<journal root>/_iceberg/<table>``."""
    retries: int = 20
    """Commits tried before a publish that keeps losing races gives up."""

    def __post_init__(self) -> None:
        if "." not in self.table or self.table.startswith(".") or self.table.endswith("."):
            raise ValueError(f"table must be '<namespace>.<table>', got {self.table!r}")
        if not dict(self.catalog).get("type") and not dict(self.catalog).get("uri"):
            raise ValueError("an Iceberg catalog needs a 'type' or a 'uri' property")
        if not isinstance(self.retries, int) or self.retries < 1:
            raise ValueError(f"retries must be a positive integer, got {self.retries!r}")

    @classmethod
    def parse(cls, value: str | Mapping[str, Any] | IcebergSettings | None, *,
              table: str | None = None, location: str | None = None) -> IcebergSettings | None:
        """Settings from a catalog URI (``sqlite:///x.db``, ``postgresql://..``, ``https://..``
        for REST, ``glue`` or ``glue://?region=..``), a JSON object or mapping of catalog
        properties (its optional ``table`` and ``location`` keys are this object's fields), or
        settings as they are. ``None`` or ``""``: not configured."""
        if value is None or isinstance(value, IcebergSettings):
            return value
        if isinstance(value, str):
            value = value.strip()
            if not value:
                return None
            properties = (json.loads(value) if value.startswith("{")
                          else _properties_from_uri(value))
        else:
            properties = dict(value)
        if not isinstance(properties, dict):
            raise ValueError("Iceberg catalog JSON must be an object of catalog properties")
        table = table or properties.pop("table", None) or DEFAULT_TABLE
        location = location or properties.pop("location", None)
        return cls(catalog=tuple(sorted((str(k), str(v)) for k, v in properties.items())),
                   table=table, location=location)

    @classmethod
    def from_env(cls) -> IcebergSettings | None:
        """``SERVE_JOURNAL_ICEBERG_CATALOG`` (with ``..._TABLE`` and ``..._LOCATION``), or
        ``None`` when Iceberg publishing is not configured."""
        return cls.parse(os.environ.get(ICEBERG_CATALOG_ENV), table=os.environ.get(ICEBERG_TABLE_ENV),
                         location=os.environ.get(ICEBERG_LOCATION_ENV))

    def describe(self) -> str:
        """The catalog and table, without secrets (property values other than type and uri)."""
        props = dict(self.catalog)
        where = props.get("uri") or props.get("type", "?")
        if "://" in where:
            parsed = urllib.parse.urlparse(where)
            where = parsed._replace(netloc=parsed.netloc.rpartition("@")[2]).geturl()
        return f"{self.table} in catalog {where}"

    def load_catalog(self, storage: JournalStorage | None = None) -> Any:
        """The pyiceberg catalog; file I/O reaches an S3 journal's endpoint unless the catalog
        properties say otherwise."""
        catalog_module = _pyiceberg_catalog()
        properties = {**fileio_properties(storage), **dict(self.catalog)}
        if properties.get("type") == "sql" or (
                "type" not in properties and "://" in properties.get("uri", "")
                and not properties["uri"].startswith("http")):
            properties.setdefault("type", "sql")
            properties.setdefault("init_catalog_tables", "true")
            _make_sqlite_folder(properties.get("uri", ""))
        return catalog_module.load_catalog(CATALOG_NAME, **properties)

    def table_location(self, storage: JournalStorage) -> str:
        """The table's metadata location."""
        return self.location or location_of(storage, f"{METADATA_DIR}/{self.table}")


def _properties_from_uri(uri: str) -> dict[str, str]:
    parsed = urllib.parse.urlparse(uri)
    if uri == "glue" or parsed.scheme == "glue":
        return {"type": "glue", **dict(urllib.parse.parse_qsl(parsed.query))}
    if parsed.scheme in ("http", "https"):
        return {"type": "rest", "uri": uri}
    if parsed.scheme.startswith("rest+"):
        return {"type": "rest", "uri": uri.removeprefix("rest+")}
    if "://" in uri:  # sqlite:///..., postgresql://...: a SQLAlchemy URL
        return {"type": "sql", "uri": uri}
    raise ValueError(f"Iceberg catalog must be sqlite:///<file>, a SQLAlchemy URL, https://<rest "
                     f"catalog>, 'glue' or a JSON object of catalog properties, got {uri!r}")


def _make_sqlite_folder(uri: str) -> None:
    """SQLite creates the catalog file, not its folder."""
    if uri.startswith("sqlite:///"):
        path = uri.removeprefix("sqlite:///").split("?", 1)[0]  # "/abs/x.db" or "rel/x.db"
        if path and path != ":memory:":
            os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)


def _pyiceberg_catalog() -> Any:
    try:
        import pyiceberg.catalog  # inside: pyiceberg is optional (pip install 'serve-journal[iceberg]')
    except ImportError as exc:  # pragma: no cover - the test extra installs it
        raise ImportError(INSTALL_HINT) from exc
    return pyiceberg.catalog


def fileio_properties(storage: JournalStorage | None) -> dict[str, str]:
    """pyiceberg FileIO properties that reach ``storage`` (an S3 journal's endpoint and region)."""
    if isinstance(storage, S3WormStorage):
        out = {}
        if storage.endpoint_url:
            out["s3.endpoint"] = storage.endpoint_url
        if storage.region:
            out["s3.region"] = storage.region
        return out
    return {}


def location_of(storage: JournalStorage, relative: str) -> str:
    """The URI Iceberg records for the journal object ``relative`` (``file:///..``, ``s3://..``)."""
    root = local_root(storage.uri)
    if root is not None:
        return "file://" + os.path.join(root, relative)
    scheme = urllib.parse.urlparse(storage.uri).scheme
    return f"{scheme}://{storage.full_path(relative)}"


def relative_of(storage: JournalStorage, location: str) -> str | None:
    """The journal path of an Iceberg file location, or ``None`` when it is outside the journal."""
    base = location_of(storage, "")
    if location.startswith(base):
        return location[len(base):]
    root = local_root(storage.uri)  # a path written without the file:// scheme
    if root is not None and location.startswith(root + "/"):
        return location[len(root) + 1:]
    return None


# --------------------------------------------------------------------------------------------
# Publishing
# --------------------------------------------------------------------------------------------


@dataclass
class PublishReport:
    """What one :func:`publish_iceberg` did."""

    table: str
    operation: str = "none"
    """``none`` (the table already held exactly the live files), ``append`` or ``replace``."""
    added: list[str] = field(default_factory=list)
    """Journal paths registered by this publish."""
    removed: list[str] = field(default_factory=list)
    """Table files (journal paths, or locations outside the journal) no longer live."""
    snapshot_id: int | None = None
    """The table's current snapshot after the publish."""
    attempts: int = 1
    live_files: int = 0

    def describe(self) -> str:
        """One line for the CLI."""
        return (f"{self.table}: {self.operation}, {len(self.added)} file(s) added, "
                f"{len(self.removed)} removed, {self.live_files} live, snapshot "
                f"{self.snapshot_id}, {self.attempts} attempt(s)")

    def to_dict(self) -> dict[str, Any]:
        return {"table": self.table, "operation": self.operation, "added": self.added,
                "removed": self.removed, "snapshot_id": self.snapshot_id,
                "attempts": self.attempts, "live_files": self.live_files}


def open_table(storage: JournalStorage, settings: IcebergSettings, *, create: bool = True) -> Any:
    """The journal's table: created with the entry schema when missing, its properties set and
    its schema evolved to the current :data:`~serve_journal.schema.STORED_SCHEMA` (the entry
    schema and the cold files' derived-scores code). With
    ``create=False`` it is only loaded and nothing is written (verify, status):
    ``NoSuchTableError`` when it does not exist.

    Publishers that start together race to set up the catalog, the namespace and the table;
    the loser of such a race looks again."""
    exceptions = _pyiceberg_exceptions()
    if not create:
        return settings.load_catalog(storage).load_table(settings.table)
    races = _race_errors(exceptions)
    for attempt in range(1, settings.retries + 1):
        try:
            catalog = settings.load_catalog(storage)
            try:
                table = catalog.load_table(settings.table)
            except exceptions.NoSuchTableError:
                try:
                    catalog.create_namespace(settings.table.rsplit(".", 1)[0])
                except exceptions.NamespaceAlreadyExistsError:
                    pass
                table = catalog.create_table(
                    settings.table, schema=STORED_SCHEMA,
                    location=settings.table_location(storage), properties=_TABLE_PROPERTIES)
            return _evolve_schema(_set_properties(table))
        except races as exc:
            if attempt == settings.retries:
                raise
            log.info("opening %s: %s; looking again", settings.table, type(exc).__name__)
            time.sleep(0.02 * attempt)
    raise AssertionError("unreachable")  # pragma: no cover


def _race_errors(exceptions: Any) -> tuple[type[BaseException], ...]:
    """What a publisher that lost a set-up race sees: pyiceberg's conflicts, and for the SQL
    catalog the database's own (two processes creating its tables or one namespace at once)."""
    out: list[type[BaseException]] = [exceptions.CommitFailedException,
                                      exceptions.TableAlreadyExistsError,
                                      exceptions.NamespaceAlreadyExistsError]
    try:
        import sqlalchemy.exc  # inside: only the SQL catalog brings SQLAlchemy
    except ImportError:  # pragma: no cover - pyiceberg[sql-sqlite] installs it
        return tuple(out)
    return (*out, sqlalchemy.exc.IntegrityError, sqlalchemy.exc.OperationalError)


def _name_mapping_property(table: Any) -> dict[str, str]:
    # journal files carry no Iceberg field ids: columns are found by name
    return {"schema.name-mapping.default": table.schema().name_mapping.model_dump_json()}


_TABLE_PROPERTIES = {
    # a sink publishes every few seconds: merge the small manifests its appends leave
    "commit.manifest-merge.enabled": "true",
    # pyiceberg would replay a lost append onto the winner's snapshot, registering a file the
    # winner registered too (entries counted twice): publish_iceberg retries by diffing again
    "commit.retry.num-retries": "0",
    "serve-journal.table": "journal entries; files registered in place by serve-journal",
}


def _set_properties(table: Any) -> Any:
    """Our table properties and a name mapping, on a table created by us or by someone else."""
    missing = {k: v for k, v in _TABLE_PROPERTIES.items() if table.properties.get(k) != v}
    if table.metadata.name_mapping() is None:
        missing.update(_name_mapping_property(table))
    if missing:
        table = table.transaction().set_properties(**missing).commit_transaction()
    return table


def _evolve_schema(table: Any) -> Any:
    """Add the stored schema's columns the table lacks (a newer schema version, or the cold
    files' derived-scores code): files of earlier versions lack them and read as nulls. (pyiceberg updates the name mapping with them.)"""
    have = {f.name for f in table.schema().fields}
    if all(name in have for name in STORED_SCHEMA.names):
        return table
    with table.update_schema() as update:
        update.union_by_name(STORED_SCHEMA)
    return table


def _pyiceberg_exceptions() -> Any:
    try:
        import pyiceberg.exceptions  # inside: pyiceberg is optional (pip install 'serve-journal[iceberg]')
    except ImportError as exc:  # pragma: no cover
        raise ImportError(INSTALL_HINT) from exc
    return pyiceberg.exceptions


def table_files(table: Any, snapshot_id: int | None = None) -> dict[str, Any]:
    """``{location: pyiceberg DataFile}`` of the table's current (or given) snapshot."""
    snapshot = (table.snapshot_by_id(snapshot_id) if snapshot_id is not None
                else table.current_snapshot())
    if snapshot is None:
        return {}
    out = {}
    for manifest in snapshot.manifests(table.io):
        for entry in manifest.fetch_manifest_entry(table.io, discard_deleted=True):
            out[entry.data_file.file_path] = entry.data_file
    return out


def publish_iceberg(
    storage: JournalStorage,
    settings: IcebergSettings | str | Mapping[str, Any],
    *,
    cache: MarkerCache | None = None,
    reason: str = "publish",
) -> PublishReport:
    """Make the Iceberg table's current snapshot hold exactly the live files of ``storage``.

    Appends new files; when live files were replaced (compaction, lifecycle), one overwrite
    snapshot removes the replaced files and adds the new ones. Idempotent (nothing to do: no
    snapshot), safe after a crash, retried when another publisher committed first. ``cache``:
    which commit markers count (default: the readers' cache, checked against the readers' trust
    anchor). ``reason`` goes into the snapshot summary (``sink``, ``compaction``, ...)."""
    resolved = IcebergSettings.parse(settings)
    if resolved is None:
        raise ValueError("no Iceberg catalog given")
    exceptions = _pyiceberg_exceptions()
    table = open_table(storage, resolved)
    report = PublishReport(table=resolved.table)
    prepared: dict[str, Any] = {}
    delay = 0.05
    for attempt in range(1, resolved.retries + 1):
        report.attempts = attempt
        try:
            current = table_files(table)
            live = {location_of(storage, f.path): f.path for f in live_files(storage, cache=cache)}
            report.live_files = len(live)
            missing = sorted(set(live) - set(current))
            extra = sorted(set(current) - set(live))
            if not missing and not extra:
                report.operation = "none"
                report.added, report.removed = [], []
                break
            for location in missing:
                if location not in prepared:
                    prepared[location] = _data_file(table, location)
            operation = "replace" if extra else "append"
            properties = {OPERATION_PROPERTY: operation, "serve-journal.reason": reason,
                          "serve-journal.live-files": str(len(live))}
            with table.transaction() as tx:
                update = tx.update_snapshot(snapshot_properties=properties)
                with (update.overwrite() if extra else update.merge_append()) as snapshot:
                    for location in extra:
                        snapshot.delete_data_file(current[location])
                    for location in missing:
                        snapshot.append_data_file(prepared[location])
            report.operation = operation
            report.added = [live[loc] for loc in missing]
            report.removed = [relative_of(storage, loc) or loc for loc in extra]
            break
        except (*_race_errors(exceptions), OSError) as exc:
            # Another publisher committed first (or held the SQL catalog's lock), or a file
            # listed as live was replaced and deleted since the listing: look again.
            if attempt == resolved.retries:
                raise
            log.info("iceberg publish of %s: %s; retrying", resolved.table, type(exc).__name__)
            time.sleep(delay)
            delay = min(delay * 2, 1.0)
            table.refresh()
    snapshot = table.current_snapshot()
    report.snapshot_id = snapshot.snapshot_id if snapshot is not None else None
    if report.operation != "none":
        log.info("%s", report.describe())
    return report


def _data_file(table: Any, location: str) -> Any:
    """An existing Parquet file as an Iceberg DataFile: statistics from its footer, not copied."""
    try:
        from pyiceberg.io.pyarrow import parquet_file_to_data_file  # inside: pyiceberg is optional
    except ImportError as exc:  # pragma: no cover
        raise ImportError(INSTALL_HINT) from exc
    return parquet_file_to_data_file(table.io, table.metadata, location)


# --------------------------------------------------------------------------------------------
# Agreement (verify)
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Disagreement:
    """One way the table differs from the journal: ``kind`` is a verify problem kind."""

    kind: str
    path: str
    detail: str


def table_disagreements(
    storage: JournalStorage,
    settings: IcebergSettings,
    *,
    cache: MarkerCache | None = None,
    recorded: Mapping[str, Iterable[tuple[int, int]]] | None = None,
) -> list[Disagreement]:
    """Where the table's current snapshot differs from the journal's live files.

    ``iceberg-extra-file``: the table holds a file that is not live (replaced, never written by
    the journal, or outside it); ``iceberg-missing-file``: a live file the table lacks;
    ``iceberg-file-differs``: the table's size or row count of a file is not the file's (its
    size now, and ``recorded``: ``{path: [(size, rows), ...]}`` from the signed manifest
    records); ``iceberg-unavailable``: the catalog or the table cannot be read."""
    try:
        exceptions = _pyiceberg_exceptions()
    except ImportError:
        return [Disagreement("iceberg-unavailable", settings.table, INSTALL_HINT)]
    try:
        table = open_table(storage, settings, create=False)
    except exceptions.NoSuchTableError:
        return [Disagreement("iceberg-unavailable", settings.describe(),
                             "the table does not exist: run `serve-journal iceberg publish`")]
    except Exception as exc:  # noqa: BLE001 - any catalog failure is a finding, not a crash
        return [Disagreement("iceberg-unavailable", settings.describe(),
                             f"cannot read the catalog ({type(exc).__name__})")]
    current = table_files(table)
    live = {location_of(storage, f.path): f.path for f in live_files(storage, cache=cache)}
    out = []
    for location in sorted(set(current) - set(live)):
        out.append(Disagreement("iceberg-extra-file", relative_of(storage, location) or location,
                                "the Iceberg table holds a file that is not a live journal file: "
                                "engines reading the table see entries readers do not"))
    for location in sorted(set(live) - set(current)):
        out.append(Disagreement("iceberg-missing-file", live[location],
                                "a live journal file the Iceberg table lacks: engines reading the "
                                "table miss its entries (run `serve-journal iceberg publish`)"))
    for location in sorted(set(live) & set(current)):
        data_file, path = current[location], live[location]
        size, rows = data_file.file_size_in_bytes, data_file.record_count
        claims = [tuple(c) for c in (recorded or {}).get(path, ())]
        try:
            actual = storage.filesystem.get_file_info(storage.full_path(path)).size
        except OSError:
            actual = None
        if actual is not None and actual != size:
            out.append(Disagreement("iceberg-file-differs", path,
                                    f"the table says {size} bytes, the file has {actual}"))
        elif claims and (size, rows) not in claims:
            out.append(Disagreement("iceberg-file-differs", path,
                                    f"the table says {size} bytes and {rows} rows, the signed "
                                    f"manifest record {claims[0][0]} bytes and {claims[0][1]} rows"))
    return out


@dataclass
class TableStatus:
    """``serve-journal iceberg status``: the table's snapshots and its agreement with the journal."""

    table: str
    catalog: str
    exists: bool
    metadata_location: str | None = None
    """The current metadata file (what DuckDB's ``iceberg_scan`` reads)."""
    snapshots: list[dict[str, Any]] = field(default_factory=list)
    files: int = 0
    rows: int = 0
    disagreements: list[Disagreement] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {"table": self.table, "catalog": self.catalog, "exists": self.exists,
                "metadata_location": self.metadata_location, "snapshots": self.snapshots, "files": self.files, "rows": self.rows,
                "in_agreement": not self.disagreements,
                "disagreements": [vars(d) for d in self.disagreements]}


def table_status(storage: JournalStorage, settings: IcebergSettings,
                 cache: MarkerCache | None = None) -> TableStatus:
    """The table's snapshots (oldest first), its current files and rows, and where it
    disagrees with the journal's live files."""
    status = TableStatus(table=settings.table, catalog=settings.describe(), exists=True)
    exceptions = _pyiceberg_exceptions()
    try:
        table = open_table(storage, settings, create=False)
    except exceptions.NoSuchTableError:
        status.exists = False
        return status
    status.metadata_location = table.metadata_location
    for snapshot in table.snapshots():
        summary = snapshot.summary
        status.snapshots.append({
            "snapshot_id": snapshot.snapshot_id,
            "timestamp_ms": snapshot.timestamp_ms,
            "operation": summary.get(OPERATION_PROPERTY) or str(summary.operation.value),
            "added_files": int(summary.get("added-data-files", 0) or 0),
            "removed_files": int(summary.get("deleted-data-files", 0) or 0),
            "total_files": int(summary.get("total-data-files", 0) or 0),
            "total_rows": int(summary.get("total-records", 0) or 0),
        })
    current = table_files(table)
    status.files = len(current)
    status.rows = sum(f.record_count for f in current.values())
    status.disagreements = table_disagreements(storage, settings, cache=cache)
    return status


__all__ = [
    "DEFAULT_TABLE",
    "ICEBERG_CATALOG_ENV",
    "Disagreement",
    "IcebergSettings",
    "PublishReport",
    "TableStatus",
    "location_of",
    "open_table",
    "publish_iceberg",
    "table_disagreements",
    "table_files",
    "table_status",
]
