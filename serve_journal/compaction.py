"""Compaction: merge the many small files of an hour partition into a few large, sorted ones.

Writers roll a file every second or so; an hour of traffic leaves thousands of small files that
make every query open thousands of footers. Compaction rewrites the live files of a partition into
``c-<hash of the input set>[-<i>].parquet`` files (sorted by subject token, row groups sized for
point lookups) without ever losing or doubling an entry, whatever moment the process dies at:

1. read the partition's live files and fingerprint their entries (count, entry ids, entry hashes);
2. write the new file(s), create-only: a re-run after a crash finds the same deterministic name;
3. re-read the new file(s) and check the fingerprint; a mismatch stops before anything is committed;
4. report each new file to ``on_file_written`` (the manifest log records what it ``replaces``);
5. write the *commit marker* ``_commits/<tier>/model=../date=../hour=../c-<hash>.json`` naming the
   new files and the files they replace. This single create-only write is the commit point;
6. delete the replaced files when retention allows, after checking the new files again.

Readers (:func:`live_files`) apply one rule: a file named in some marker's ``replaces`` is gone; a
derived file (``c-*`` compacted, or anything in the cold tier) is visible only once a marker
names it. Before step 5 readers see the inputs only, after it the new files only.

The same markers carry lifecycle moves (hot -> cold, see :mod:`serve_journal.lifecycle`).
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import logging
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field

import pyarrow as pa

from serve_journal.layout import (
    COLD,
    DEFAULT_SPEC,
    HOT,
    PARQUET_SUFFIX,
    TIERS,
    PartitionKey,
)
from serve_journal.schema import ENTRY_SCHEMA
from serve_journal.sink.parquet import ParquetOptions, decode_parquet, encode_parquet
from serve_journal.storage import JournalStorage, ObjectExistsError, StoredObject

log = logging.getLogger(__name__)

COMMITS_PREFIX = "_commits"
COMPACTED_PREFIX = "c-"
MARKER_VERSION = 1

FileWrittenHook = Callable[[StoredObject, pa.Table, tuple[str, ...]], None]
"""``on_file_written(stored, table, replaces)``: called for every file compaction or lifecycle
wrote (or found already written by an earlier, interrupted run: the hook must be idempotent per
``stored.path``), after it verified and before its commit marker exists."""

RetentionCheck = Callable[[str], bool]
"""``retention_allows(relative_path) -> bool``: may this replaced file be deleted now?"""

CrashHook = Callable[[str], None]


class CompactionError(RuntimeError):
    """A compacted file does not hold exactly the entries of the files it replaces."""


# --------------------------------------------------------------------------------------------
# Entry fingerprints
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Fingerprint:
    """Order-independent digest of a set of entries.

    ``entry_ids`` sums the SHA-256 of each entry's id ``(producer_id, seq)``; ``entries`` sums the
    SHA-256 of each whole entry (its canonical JSON). Sums of 64-bit slices are kept exactly, so
    two equal multisets of entries always give equal fingerprints and any changed, missing or
    doubled entry changes them.
    """

    rows: int
    entry_ids: str
    entries: str

    def as_dict(self) -> dict:
        return {"rows": self.rows, "entry_ids": self.entry_ids, "entries": self.entries}


_FINGERPRINT_SQL = """
SELECT count(*),
       {sums}
FROM (SELECT sha256(to_json(_row)) AS h,
             sha256(_row.producer_id || chr(0) || CAST(_row.seq AS VARCHAR)) AS i
      FROM {source} _row)
"""


def _slice_sums(column: str, slices: int) -> list[str]:
    return [
        f"coalesce(sum(('0x' || substr({column}, {1 + 16 * k}, 16))::UBIGINT::HUGEINT), 0)"
        for k in range(slices)
    ]


def fingerprint(table: pa.Table) -> Fingerprint:
    """Fingerprint the entries of ``table`` (any row order, any chunking)."""
    import duckdb

    if table.schema != ENTRY_SCHEMA:
        table = table.cast(ENTRY_SCHEMA)
    con = duckdb.connect()
    try:
        con.execute("SET TimeZone='UTC'")
        con.register("entries_to_fingerprint", table)
        sums = ", ".join(_slice_sums("h", 4) + _slice_sums("i", 2))
        row = con.execute(
            _FINGERPRINT_SQL.format(sums=sums, source="entries_to_fingerprint")
        ).fetchone()
    finally:
        con.close()
    assert row is not None
    rows = int(row[0])
    entries = hashlib.sha256(":".join(str(v) for v in row[1:5]).encode()).hexdigest()
    ids = hashlib.sha256(":".join(str(v) for v in row[5:7]).encode()).hexdigest()
    return Fingerprint(rows=rows, entry_ids=ids, entries=entries)


def read_files(storage: JournalStorage, paths: Iterable[str]) -> pa.Table:
    """Concatenate the entries of journal files (entry schema)."""
    tables = [decode_parquet(storage.read(path)) for path in paths]
    if not tables:
        return ENTRY_SCHEMA.empty_table()
    return pa.concat_tables(tables)


# --------------------------------------------------------------------------------------------
# Commit markers and the reader's view
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class CommitMarker:
    """A committed rewrite: ``new_files`` now hold exactly the entries of ``replaces``."""

    kind: str  # "compaction" or "lifecycle"
    path: str
    new_files: tuple[str, ...]
    replaces: tuple[str, ...]
    fingerprint: Fingerprint
    created_at: str

    def to_json(self) -> bytes:
        return json.dumps(
            {
                "marker_version": MARKER_VERSION,
                "kind": self.kind,
                "new_files": list(self.new_files),
                "replaces": list(self.replaces),
                "fingerprint": self.fingerprint.as_dict(),
                "created_at": self.created_at,
            },
            sort_keys=True,
            indent=1,
        ).encode()

    @classmethod
    def from_json(cls, path: str, data: bytes) -> CommitMarker:
        doc = json.loads(data)
        fp = doc["fingerprint"]
        return cls(
            kind=doc["kind"],
            path=path,
            new_files=tuple(doc["new_files"]),
            replaces=tuple(doc["replaces"]),
            fingerprint=Fingerprint(fp["rows"], fp["entry_ids"], fp["entries"]),
            created_at=doc["created_at"],
        )


def marker_path(key: PartitionKey, tier: str, name: str) -> str:
    """Where the commit marker of derived file set ``name`` of partition ``key`` lives."""
    return f"{COMMITS_PREFIX}/{key.path(tier)}/{name}.json"


class MarkerCache:
    """Markers are create-only and never change: read each once per process."""

    def __init__(self) -> None:
        self._cache: dict[str, CommitMarker] = {}

    def load(self, storage: JournalStorage, paths: Sequence[str]) -> list[CommitMarker]:
        out = []
        for path in paths:
            marker = self._cache.get(path)
            if marker is None:
                marker = CommitMarker.from_json(path, storage.read(path))
                self._cache[path] = marker
            out.append(marker)
        return out


_DEFAULT_CACHE = MarkerCache()


def load_markers(
    storage: JournalStorage, prefix: str = "", cache: MarkerCache | None = None
) -> list[CommitMarker]:
    """Every commit marker below ``_commits/<prefix>``."""
    base = f"{COMMITS_PREFIX}/{prefix}".rstrip("/")
    paths = storage.list_files(base, suffix=".json")
    return (cache or _DEFAULT_CACHE).load(storage, paths)


def is_derived(path: str) -> bool:
    """Compacted files and cold files exist only once a commit marker names them."""
    name = path.rsplit("/", 1)[-1]
    return path.startswith(f"{COLD}/") or name.startswith(COMPACTED_PREFIX)


@dataclass(frozen=True)
class DataFile:
    """One live journal data file."""

    path: str
    tier: str
    key: PartitionKey


def resolve_live(paths: Iterable[str], markers: Iterable[CommitMarker]) -> list[str]:
    """Apply the reader's rule to a file listing: drop replaced files and uncommitted derived ones."""
    replaced: set[str] = set()
    committed: set[str] = set()
    for marker in markers:
        replaced.update(marker.replaces)
        committed.update(marker.new_files)
    return [
        p for p in paths if p not in replaced and (not is_derived(p) or p in committed)
    ]


def live_files(
    storage: JournalStorage,
    tier: str = "all",
    model: str | None = None,
    cache: MarkerCache | None = None,
) -> list[DataFile]:
    """The files a reader must scan to see every entry of ``tier`` exactly once.

    Markers are listed before and after the data files; if a rewrite committed in between, the
    listing is taken again, so a concurrent compaction or lifecycle run never makes entries vanish
    or double.
    """
    tiers = TIERS if tier == "all" else (tier,)
    if any(t not in TIERS for t in tiers):
        raise ValueError(f"tier must be 'hot', 'cold' or 'all', got {tier!r}")
    for _ in range(20):
        before = load_markers(storage, cache=cache)
        paths: list[str] = []
        for t in TIERS:  # both tiers: a hot file replaced by a cold one must be judged together
            prefix = f"{t}/model={_escape(model)}" if model is not None else t
            paths.extend(storage.list_files(prefix, suffix=PARQUET_SUFFIX))
        after = load_markers(storage, cache=cache)
        if [m.path for m in before] == [m.path for m in after]:
            break
    else:  # pragma: no cover - needs a rewrite committing on every one of 20 listings
        raise RuntimeError("journal listing kept changing; retry the query")
    out = []
    for path in resolve_live(paths, after):
        file_tier, key = DEFAULT_SPEC.parse(path)
        if file_tier in tiers:
            out.append(DataFile(path, file_tier, key))
    return out


def _escape(model: str | None) -> str:
    from serve_journal.layout import escape_value

    return escape_value(model or "")


# --------------------------------------------------------------------------------------------
# Writing a rewrite: shared by compaction and lifecycle
# --------------------------------------------------------------------------------------------


def set_name(prefix: str, inputs: Sequence[str]) -> str:
    """Deterministic name of the file set derived from ``inputs``: ``<prefix><hash>``."""
    digest = hashlib.sha256("\n".join(sorted(inputs)).encode()).hexdigest()[:24]
    return f"{prefix}{digest}"


def _split(table: pa.Table, max_rows: int) -> list[pa.Table]:
    from serve_journal.sink.parquet import sort_for_lookup

    table = sort_for_lookup(table)
    if table.num_rows <= max_rows:
        return [table]
    parts = -(-table.num_rows // max_rows)
    size = -(-table.num_rows // parts)
    return [table.slice(i, size) for i in range(0, table.num_rows, size)]


def write_verified(
    storage: JournalStorage,
    *,
    key: PartitionKey,
    tier: str,
    name: str,
    table: pa.Table,
    expected: Fingerprint,
    options: ParquetOptions,
    max_rows_per_file: int,
    replaces: tuple[str, ...],
    on_file_written: FileWrittenHook | None,
    crash: CrashHook | None,
) -> list[str]:
    """Write (or find) the file set ``name`` holding ``table`` and check it against ``expected``."""
    parts = _split(table, max_rows_per_file)
    paths = []
    stored_list = []
    for i, part in enumerate(parts):
        file_name = name if len(parts) == 1 else f"{name}-{i}"
        path = DEFAULT_SPEC.file_path(key, file_name, tier)
        try:
            stored = storage.put_new(path, encode_parquet(part, options))
        except ObjectExistsError:  # an earlier run died after writing it: check it like a new one
            data = storage.read(path)
            stored = StoredObject(path, len(data), hashlib.sha256(data).hexdigest())
        paths.append(path)
        stored_list.append((stored, part))
        if crash:
            crash(f"{tier}-file-written")
    got = fingerprint(read_files(storage, paths))
    if got != expected:
        raise CompactionError(
            f"rewritten files {paths} do not hold the entries they replace "
            f"(rows {got.rows}, expected {expected.rows}); nothing was committed"
        )
    if on_file_written is not None:
        for stored, part in stored_list:
            on_file_written(stored, part, replaces)
    return paths


def commit(
    storage: JournalStorage,
    *,
    kind: str,
    path: str,
    new_files: Sequence[str],
    replaces: Sequence[str],
    expected: Fingerprint,
    now: dt.datetime | None = None,
) -> CommitMarker:
    """Write the commit marker (create-only); an existing marker from an earlier run is kept."""
    marker = CommitMarker(
        kind=kind,
        path=path,
        new_files=tuple(new_files),
        replaces=tuple(sorted(replaces)),
        fingerprint=expected,
        created_at=(now or dt.datetime.now(dt.UTC)).isoformat(),
    )
    try:
        storage.put_new(path, marker.to_json())
    except ObjectExistsError:
        marker = CommitMarker.from_json(path, storage.read(path))
        if set(marker.new_files) != set(new_files) or marker.fingerprint != expected:
            raise CompactionError(f"commit marker {path} exists with other content") from None
    return marker


def marker_checks(storage: JournalStorage, marker: CommitMarker) -> bool:
    """Do the marker's new files (still) hold exactly the entries it promises?"""
    try:
        return fingerprint(read_files(storage, marker.new_files)) == marker.fingerprint
    except Exception as exc:  # unreadable, missing or damaged: it does not check
        log.warning("files of %s do not check: %s", marker.path, type(exc).__name__)
        return False


def delete_replaced(
    storage: JournalStorage,
    marker: CommitMarker,
    retention_allows: RetentionCheck | None,
    crash: CrashHook | None = None,
) -> tuple[list[str], list[str]]:
    """Delete the files ``marker`` replaces that still exist; returns (deleted, kept)."""
    deleted, kept = [], []
    for path in marker.replaces:
        if not storage.exists(path):
            continue
        if retention_allows is not None and not retention_allows(path):
            kept.append(path)
            continue
        try:
            storage.delete(path)
        except OSError as exc:  # e.g. an Object Lock retention the caller did not know about
            log.info("kept %s: delete refused (%s)", path, type(exc).__name__)
            kept.append(path)
            continue
        deleted.append(path)
        if crash:
            crash("replaced-file-deleted")
    return deleted, kept


# --------------------------------------------------------------------------------------------
# Compaction
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class CompactionOptions:
    """How compaction sizes its output."""

    row_group_size: int = 16 * 1024
    """Rows per row group: a point lookup reads whole row groups of the columns it returns, so
    small groups keep it cheap (16k fraud entries: ~1.4 MB) for ~2% more bytes on disk."""
    max_rows_per_file: int = 4_000_000
    """Split a partition into several sorted files above this many rows."""
    min_files: int = 2
    """Compact a partition only when it has at least this many live files."""
    settle: dt.timedelta = dt.timedelta(minutes=5)
    """Leave partitions whose hour ended less than this long ago (writers may still add files)."""
    parquet: ParquetOptions | None = None
    """Encoding; default: the hot options with ``row_group_size``."""

    def __post_init__(self) -> None:
        for name in ("row_group_size", "max_rows_per_file", "min_files"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")

    def encoding(self) -> ParquetOptions:
        # fpp 1%: a day holds hundreds of row groups, 5% would let ~5% of them through per lookup
        return self.parquet or ParquetOptions(row_group_size=self.row_group_size, bloom_fpp=0.01)


@dataclass
class CompactionReport:
    """What one compaction run did."""

    compacted: dict[str, list[str]] = field(default_factory=dict)
    """Marker path -> new files, for partitions rewritten in this run."""
    replaced_files: int = 0
    deleted: list[str] = field(default_factory=list)
    kept_for_retention: list[str] = field(default_factory=list)
    skipped_unverified: list[str] = field(default_factory=list)


def _plan_partitions(
    storage: JournalStorage, tier: str, now: dt.datetime, options: CompactionOptions
) -> dict[PartitionKey, list[str]]:
    groups: dict[PartitionKey, list[str]] = {}
    for f in live_files(storage, tier=tier):
        groups.setdefault(f.key, []).append(f.path)
    cutoff = now - options.settle
    return {
        key: sorted(paths)
        for key, paths in sorted(groups.items())
        if len(paths) >= options.min_files and key.start + dt.timedelta(hours=1) <= cutoff
    }


def compact_partition(
    storage: JournalStorage,
    key: PartitionKey,
    inputs: Sequence[str],
    *,
    tier: str = HOT,
    options: CompactionOptions | None = None,
    on_file_written: FileWrittenHook | None = None,
    now: dt.datetime | None = None,
    _crash: CrashHook | None = None,
) -> CommitMarker:
    """Rewrite ``inputs`` (live files of one partition) into compacted files and commit them."""
    options = options or CompactionOptions()
    inputs = tuple(sorted(inputs))
    name = set_name(COMPACTED_PREFIX, inputs)
    table = read_files(storage, inputs)
    expected = fingerprint(table)
    new_files = write_verified(
        storage,
        key=key,
        tier=tier,
        name=name,
        table=table,
        expected=expected,
        options=options.encoding(),
        max_rows_per_file=options.max_rows_per_file,
        replaces=inputs,
        on_file_written=on_file_written,
        crash=_crash,
    )
    marker = commit(
        storage,
        kind="compaction",
        path=marker_path(key, tier, name),
        new_files=new_files,
        replaces=inputs,
        expected=expected,
        now=now,
    )
    if _crash:
        _crash("committed")
    return marker


def collect_replaced(
    storage: JournalStorage,
    *,
    kind: str | None = None,
    retention_allows: RetentionCheck | None = None,
    report: CompactionReport | None = None,
    _crash: CrashHook | None = None,
) -> CompactionReport:
    """Delete files that committed rewrites replaced, once their new files check again."""
    report = report or CompactionReport()
    for marker in load_markers(storage):
        if kind is not None and marker.kind != kind:
            continue
        pending = [p for p in marker.replaces if storage.exists(p)]
        if not pending:
            continue
        if not marker_checks(storage, marker):
            report.skipped_unverified.append(marker.path)
            continue
        deleted, kept = delete_replaced(storage, marker, retention_allows, _crash)
        report.deleted.extend(deleted)
        report.kept_for_retention.extend(kept)
    return report


def compact(
    storage: JournalStorage,
    *,
    now: dt.datetime | None = None,
    tier: str = HOT,
    options: CompactionOptions | None = None,
    on_file_written: FileWrittenHook | None = None,
    retention_allows: RetentionCheck | None = None,
    delete: bool = True,
    _crash: CrashHook | None = None,
) -> CompactionReport:
    """Compact every settled partition of ``tier`` with several live files, then delete what the
    rewrites replaced (when ``delete`` and ``retention_allows``). Safe to run again after a crash
    and safe beside running queries; run one compactor per journal at a time."""
    if tier not in TIERS:
        raise ValueError(f"tier must be one of {TIERS}, got {tier!r}")
    options = options or CompactionOptions()
    now = now or dt.datetime.now(dt.UTC)
    report = CompactionReport()
    for key, inputs in _plan_partitions(storage, tier, now, options).items():
        marker = compact_partition(
            storage,
            key,
            inputs,
            tier=tier,
            options=options,
            on_file_written=on_file_written,
            now=now,
            _crash=_crash,
        )
        report.compacted[marker.path] = list(marker.new_files)
        report.replaced_files += len(marker.replaces)
    if delete:
        collect_replaced(
            storage,
            kind="compaction",
            retention_allows=retention_allows,
            report=report,
            _crash=_crash,
        )
    return report


def manifest_recorder(manifest_log) -> FileWrittenHook:
    """An ``on_file_written`` hook appending each rewritten file's record (with the paths it
    ``replaces``) to a :class:`serve_journal.sink.manifest.ManifestLog`.

    After a crash between the append and the commit marker, a re-run appends a second record for
    the same path and sha256; verification treats such records as one file.
    """
    from serve_journal.sink.manifest import build_file_record

    def record(stored: StoredObject, table: pa.Table, replaces: tuple[str, ...]) -> None:
        tier = DEFAULT_SPEC.parse(stored.path)[0]
        manifest_log.append(build_file_record(stored, table, tier, replaces=list(replaces)))

    return record
