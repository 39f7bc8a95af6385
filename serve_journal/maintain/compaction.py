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

The same markers carry lifecycle moves (hot -> cold, see :mod:`serve_journal.maintain.lifecycle`).
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import logging
import re
import uuid
from collections.abc import Callable, Iterable, Mapping, Sequence, Set
from dataclasses import dataclass, field
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from serve_journal import progress
from serve_journal.catalog import (
    CommitMarker,
    DataFile,
    MarkerCache,
    MarkerSigner,
    commit,
    live_files,
    load_markers,
    marker_checks,
    marker_path,
    set_name,
)
from serve_journal.catalog.layout import (
    DEFAULT_SPEC,
    HOT,
    TIERS,
    PartitionKey,
)
from serve_journal.errors import CompactionError, RewriteMemoryError, UnrecordedInputError
from serve_journal.fileformat import ParquetOptions, decode_parquet
from serve_journal.integrity.fingerprint import Fingerprint
from serve_journal.integrity.manifest import MANIFEST_PREFIX, ManifestRecord
from serve_journal.integrity.summary import FileSummary, summarize
from serve_journal.maintain.rewrite import RewriteWorkspace, SpooledFile, parse_memory_limit
from serve_journal.read.verify import signed_records
from serve_journal.schema import ENTRY_SCHEMA
from serve_journal.sink.settings import SinkSettings, publish_table, settings_for
from serve_journal.storage import JournalStorage, ObjectExistsError, StoredObject
from serve_journal.storage.base import file_sha256

log = logging.getLogger(__name__)

COMMITS_PREFIX = "_commits"
COMPACTED_PREFIX = "c-"
MARKER_VERSION = 1

FileWrittenHook = Callable[[StoredObject, FileSummary, tuple[str, ...]], None]
"""``on_file_written(stored, summary, replaces)``: called for every file compaction or lifecycle
wrote (or found already written by an earlier, interrupted run: the hook must be idempotent per
``stored.path``), after it verified and before its commit marker exists. ``summary`` holds what
its manifest record says (rows, time range, sequence ranges, Merkle root), computed by streaming
the file: a day file is never one table in memory."""

RetentionCheck = Callable[[str], bool]
"""``retention_allows(relative_path) -> bool``: may this replaced file be deleted now?"""

CrashHook = Callable[[str], None]


RecordedHashes = Mapping[str, Set[str]]
"""``{path: {sha256, ...}}`` of the data files the manifest chains record."""


def recorded_hashes(storage: JournalStorage, public_key: Any = None) -> dict[str, set[str]]:
    """``path -> {sha256, ...}`` of the data files the manifest records: with ``public_key``, only
    records covered by a valid signed checkpoint (see
    :func:`serve_journal.read.verify.signed_records`); without, every record."""
    out: dict[str, set[str]] = {}
    if public_key is not None:
        for record in signed_records(storage, public_key):
            out.setdefault(record.path, set()).add(record.sha256)
        return out
    for path in storage.list_files(f"{MANIFEST_PREFIX}/", ".json"):
        doc = json.loads(storage.read(path))
        out.setdefault(doc["path"], set()).add(doc["sha256"])
    return out


def read_files(
    storage: JournalStorage, paths: Iterable[str], recorded: RecordedHashes | None = None
) -> pa.Table:
    """Concatenate the entries of journal files (entry schema). With ``recorded``, each file's
    bytes must match one of its manifest records (:class:`UnrecordedInputError` otherwise)."""
    tables = []
    for path in paths:
        data = storage.read(path)
        if recorded is not None and hashlib.sha256(data).hexdigest() not in recorded.get(path, ()):
            raise UnrecordedInputError(
                f"input {path} does not match its manifest record (altered, or never recorded); "
                "run `serve-journal verify`; it was not rewritten"
            )
        tables.append(decode_parquet(data))
    if not tables:
        return ENTRY_SCHEMA.empty_table()
    return pa.concat_tables(tables)


# --------------------------------------------------------------------------------------------
# Writing a rewrite: shared by compaction and lifecycle
# --------------------------------------------------------------------------------------------


def file_sizes(rows: int, max_rows: int) -> int:
    """Rows per file when ``rows`` entries are split into files of at most ``max_rows``: equal
    parts (the last one the rest)."""
    if rows <= max_rows:
        return max(rows, 1)
    parts = -(-rows // max_rows)
    return -(-rows // parts)


def in_written_order(paths: Iterable[str]) -> list[str]:
    """``paths`` sorted with the numbers in their names compared as numbers, so the parts of a
    file set that :func:`write_verified` numbers come in the order it wrote them (``c-…-2``
    before ``c-…-10``). A day compacted into consecutive parts, read in this order, is already
    in lookup order: moving it to the cold tier streams it instead of sorting it again
    (:func:`~serve_journal.maintain.rewrite.in_lookup_order` checks the rows, not the names)."""
    def key(path: str) -> tuple[list[str | int], str]:
        parts = re.split(r"(\d+)", path)  # text, number, text, ...: alike at each place
        return [int(p) if i % 2 else p for i, p in enumerate(parts)], path
    return sorted(paths, key=key)


def write_verified(
    storage: JournalStorage,
    *,
    key: PartitionKey,
    tier: str,
    name: str,
    inputs: Sequence[SpooledFile],
    workspace: RewriteWorkspace,
    expected: Fingerprint,
    options: ParquetOptions,
    max_rows_per_file: int,
    replaces: tuple[str, ...],
    on_file_written: FileWrittenHook | None,
    crash: CrashHook | None,
) -> list[tuple[str, str]]:
    """Write (or find) the file set ``name`` holding the entries of ``inputs`` (spooled into
    ``workspace``), sorted in bounded memory, and check it against ``expected``; returns
    ``(path, sha256)`` of each new file."""
    rows = sum(pq.ParquetFile(f.local).metadata.num_rows for f in inputs)
    per_file = file_sizes(rows, max_rows_per_file)
    count = max(1, -(-rows // per_file))
    names = [name] if count == 1 else [f"{name}-{i}" for i in range(count)]
    paths = [DEFAULT_SPEC.file_path(key, file_name, tier) for file_name in names]
    to_write = [not storage.exists(path) for path in paths]
    local = workspace.write_sorted(inputs, names, options, per_file) if any(to_write) else []
    stored_list = []
    for i, (file_name, path) in enumerate(zip(names, paths, strict=True)):
        try:
            if not to_write[i]:
                raise ObjectExistsError(path)
            stored = storage.put_new_file(path, local[i])
        except ObjectExistsError:  # an earlier run died after writing it: check it like a new one
            found = workspace.fetch(storage, path, file_name)
            stored = StoredObject(path, found.size, found.sha256)
        stored_list.append(stored)
        if crash:
            crash(f"{tier}-file-written")
    # Re-read what the storage holds: it must be the local copy, which is then fingerprinted.
    locals_ = [workspace.out_path(file_name) for file_name in names]
    for stored, copy in zip(stored_list, locals_, strict=True):
        held = storage.sha256(stored.path)
        if held != stored.sha256 or _sha256_file(copy) != held:
            raise CompactionError(f"rewritten file {stored.path} does not read back as written; "
                                  "nothing was committed")
    got = workspace.fingerprint(locals_)
    if got != expected:
        raise CompactionError(
            f"rewritten files {paths} do not hold the entries they replace "
            f"(rows {got.rows}, expected {expected.rows}); nothing was committed"
        )
    if on_file_written is not None:
        for stored, copy in zip(stored_list, locals_, strict=True):
            on_file_written(stored, summarize(copy), replaces)
    return [(stored.path, stored.sha256) for stored in stored_list]


def _sha256_file(path: str) -> str:
    with open(path, "rb") as handle:
        return file_sha256(handle)


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
    """How compaction groups and sizes its output."""

    row_group_size: int = 8 * 1024
    """Rows per row group: a point lookup reads the whole row group that holds its key, so small
    groups keep it cheap (8k fraud entries: ~0.7 MB compressed) for ~1% more bytes on disk."""
    max_rows_per_file: int = 4_000_000
    """Split a partition into several files above this many rows (sorted ranges of subject
    tokens: one subject still sits in one file)."""
    min_files: int = 2
    """Compact an hour partition of the current day only when it has at least this many files."""
    settle: dt.timedelta = dt.timedelta(minutes=5)
    """Leave partitions whose hour (day) ended less than this long ago (writers may still add
    files)."""
    day_level: bool = True
    """Merge every file of a finished day (all its hour partitions) into the day partition
    ``hour=all``: one subject's day then sits in one row group. Files that arrive for a day
    after it was merged become a further day file (the existing one is not rewritten)."""
    parquet: ParquetOptions | None = None
    """Encoding; default: the hot options with ``row_group_size``."""
    memory_limit: int | str | None = None
    """Bytes a rewrite may use (``"2GiB"`` and the like accepted); ``None``: the
    ``SERVE_JOURNAL_MEMORY_LIMIT`` environment variable, else 2 GiB. The sort spills to
    ``temp_dir`` beyond it, so any day size fits."""
    temp_dir: str | None = None
    """Where a rewrite spools its inputs and spills its sort (default: the system temp folder);
    needs about twice the partition's size free."""

    def __post_init__(self) -> None:
        for name in ("row_group_size", "max_rows_per_file", "min_files"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        object.__setattr__(self, "memory_limit", parse_memory_limit(self.memory_limit))

    def encoding(self) -> ParquetOptions:
        # fpp 1%: a day holds hundreds of row groups, 5% would let ~5% of them through per lookup
        return self.parquet or ParquetOptions(row_group_size=self.row_group_size, bloom_fpp=0.01)


@dataclass
class CompactionReport:
    """What one compaction run did (or, in a dry run, would do)."""

    compacted: dict[str, list[str]] = field(default_factory=dict)
    """Marker path -> new files, for partitions rewritten in this run."""
    replaced_files: int = 0
    deleted: list[str] = field(default_factory=list)
    kept_for_retention: list[str] = field(default_factory=list)
    skipped_unverified: list[str] = field(default_factory=list)
    refused: list[tuple[str, str]] = field(default_factory=list)
    """(partition, reason): inputs that match no manifest record were not rewritten."""
    planned: dict[str, list[str]] = field(default_factory=dict)
    """Partition directory -> input files, as planned (filled in a dry run too)."""
    dry_run: bool = False
    manifest_chain: str | None = None
    """The manifest chain the new files were recorded in (``run_compaction``)."""
    iceberg: str | None = None
    """What publishing to the Iceberg table did, when one is configured (``run_compaction``)."""

    def describe(self) -> str:
        """Human-readable summary (the CLI's output)."""
        verb = "would compact" if self.dry_run else "compacted"
        lines = [f"{verb} {len(self.planned)} partition(s)"]
        for partition, inputs in sorted(self.planned.items()):
            lines.append(f"  {partition}: {len(inputs)} file(s)")
        if not self.dry_run:
            lines.append(f"new files: {sum(len(v) for v in self.compacted.values())}, replaced "
                         f"files: {self.replaced_files}, deleted: {len(self.deleted)}, kept for "
                         f"retention: {len(self.kept_for_retention)}")
            for partition, reason in self.refused:
                lines.append(f"REFUSED {partition}: {reason}")
            if self.skipped_unverified:
                lines.append(f"NOT deleted, new files do not check: {self.skipped_unverified}")
            if self.manifest_chain:
                lines.append(f"manifest chain: {self.manifest_chain}")
            if self.iceberg:
                lines.append(f"iceberg: {self.iceberg}")
        if self.dry_run:
            lines.append("dry run: nothing written (use --apply)")
        return "\n".join(lines)


def _plan_partitions(
    storage: JournalStorage, tier: str, now: dt.datetime, options: CompactionOptions,
    cache: MarkerCache | None = None,
) -> list[tuple[PartitionKey, list[str]]]:
    """``(target partition, inputs)``: finished days into their day partition, settled hours of
    the current day into themselves."""
    by_day: dict[PartitionKey, list[DataFile]] = {}
    for f in live_files(storage, tier=tier, cache=cache):
        by_day.setdefault(f.key.day(), []).append(f)
    cutoff = now - options.settle
    out: list[tuple[PartitionKey, list[str]]] = []
    for day, files in sorted(by_day.items(), key=lambda kv: kv[0].sort_key()):
        hourly = [f for f in files if not f.key.is_day]
        if options.day_level and day.end <= cutoff:
            if hourly:
                out.append((day, sorted(f.path for f in hourly)))
            continue
        by_hour: dict[PartitionKey, list[str]] = {}
        for f in hourly:
            by_hour.setdefault(f.key, []).append(f.path)
        for key, paths in sorted(by_hour.items(), key=lambda kv: kv[0].sort_key()):
            if len(paths) >= options.min_files and key.end <= cutoff:
                out.append((key, sorted(paths)))
    return out


def compact_partition(
    storage: JournalStorage,
    key: PartitionKey,
    inputs: Sequence[str],
    *,
    tier: str = HOT,
    options: CompactionOptions | None = None,
    on_file_written: FileWrittenHook | None = None,
    now: dt.datetime | None = None,
    recorded: RecordedHashes | None = None,
    signer: MarkerSigner | None = None,
    _crash: CrashHook | None = None,
) -> CommitMarker:
    """Rewrite ``inputs`` (live files of one partition) into compacted files and commit them.
    With ``recorded`` (see :func:`recorded_hashes`), inputs must match their manifest records;
    ``signer`` (the journal's manifest signer) signs the commit marker."""
    options = options or CompactionOptions()
    inputs = tuple(sorted(inputs))
    name = set_name(COMPACTED_PREFIX, inputs)
    with RewriteWorkspace(options.memory_limit, options.temp_dir) as workspace:
        spooled = workspace.spool(storage, inputs, recorded)
        expected = workspace.fingerprint([f.local for f in spooled])
        new_files = write_verified(
            storage,
            key=key,
            tier=tier,
            name=name,
            inputs=spooled,
            workspace=workspace,
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
        signer=signer,
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
    on_file_written: FileWrittenHook | None = None,
    before_delete: Callable[[], None] | None = None,
    cache: MarkerCache | None = None,
    memory_limit: int | str | None = None,
    _crash: CrashHook | None = None,
) -> CompactionReport:
    """Delete files that committed rewrites replaced, once their new files check again.
    ``cache``: which markers count (with the journal's key: only markers it signed).

    With ``on_file_written`` (the run's manifest recorder), a rewrite an earlier run committed
    but may not have signed (it died in between) is adopted first (:func:`adopt_marker`), and
    ``before_delete`` (the run's checkpoint) signs those records before anything is deleted:
    verify honours ``replaces`` from signed records only."""
    report = report or CompactionReport()
    due = []
    for marker in load_markers(storage, cache=cache):
        if kind is not None and marker.kind != kind:
            continue
        pending = [p for p in marker.replaces if storage.exists(p)]
        if not pending:
            continue
        if not marker_checks(storage, marker):
            report.skipped_unverified.append(marker.path)
            continue
        # All inputs still here: nothing was deleted yet, so the run that committed may have died
        # before signing. (Deletes wait for the signature, so a partly deleted set was signed.)
        if on_file_written is not None and marker.path not in report.compacted \
                and len(pending) == len(marker.replaces) \
                and not adopt_marker(storage, marker, on_file_written, memory_limit):
            report.skipped_unverified.append(marker.path)
            continue
        due.append(marker)
    if due and before_delete is not None:
        before_delete()
    for marker in due:
        deleted, kept = delete_replaced(storage, marker, retention_allows, _crash)
        report.deleted.extend(deleted)
        report.kept_for_retention.extend(kept)
    return report


def adopt_marker(storage: JournalStorage, marker: CommitMarker,
                 on_file_written: FileWrittenHook, memory_limit: int | str | None = None) -> bool:
    """Record ``marker``'s new files again (with what they replace) in this run's chain, when
    every file it replaces is still here and the new files hold exactly their entries. So a
    rewrite whose run died between its commit and its signature is signed by the next run, and
    nothing is signed that a reader would see differently. ``False`` when it cannot be adopted."""
    if not all(storage.exists(p) for p in marker.replaces):
        return False
    with RewriteWorkspace(memory_limit) as workspace:
        old = workspace.spool(storage, list(marker.replaces))
        new = [workspace.fetch(storage, path, f"adopt-{i}")
               for i, path in enumerate(marker.new_files)]
        if workspace.fingerprint([f.local for f in old]) != workspace.fingerprint(
                [f.local for f in new]):
            return False
        for found in new:
            stored = StoredObject(found.path, found.size, found.sha256)
            on_file_written(stored, summarize(found.local), tuple(marker.replaces))
    return True


def compact(
    storage: JournalStorage,
    *,
    now: dt.datetime | None = None,
    tier: str = HOT,
    options: CompactionOptions | None = None,
    on_file_written: FileWrittenHook | None = None,
    retention_allows: RetentionCheck | None = None,
    delete: bool = True,
    recorded: RecordedHashes | None = None,
    before_delete: Callable[[], None] | None = None,
    signer: MarkerSigner | None = None,
    _crash: CrashHook | None = None,
) -> CompactionReport:
    """Compact every settled partition of ``tier`` with several live files, then delete what the
    rewrites replaced (when ``delete`` and ``retention_allows``). ``before_delete`` runs first
    (``run_compaction`` signs the records that name what is replaced: verify honours ``replaces``
    from signed records only). Safe to run again after a crash and safe beside running queries;
    run one compactor per journal at a time. ``signer`` signs the commit markers; then only
    markers it signed are followed."""
    if tier not in TIERS:
        raise ValueError(f"tier must be one of {TIERS}, got {tier!r}")
    options = options or CompactionOptions()
    now = now or dt.datetime.now(dt.UTC)
    report = CompactionReport()
    cache = MarkerCache(signer.public_key) if signer is not None else None
    for key, inputs in progress.track(_plan_partitions(storage, tier, now, options, cache),
                                      "compact partitions"):
        report.planned[key.path(tier)] = list(inputs)
        try:
            marker = compact_partition(
                storage,
                key,
                inputs,
                tier=tier,
                options=options,
                on_file_written=on_file_written,
                now=now,
                recorded=recorded,
                signer=signer,
                _crash=_crash,
            )
        except (UnrecordedInputError, RewriteMemoryError) as exc:
            log.warning("%s", exc)
            report.refused.append((key.path(tier), str(exc)))
            continue
        report.compacted[marker.path] = list(marker.new_files)
        report.replaced_files += len(marker.replaces)
    if delete:
        collect_replaced(
            storage,
            kind="compaction",
            retention_allows=retention_allows,
            report=report,
            on_file_written=on_file_written,
            before_delete=before_delete,
            cache=cache,
            memory_limit=options.memory_limit,
            _crash=_crash,
        )
    return report


def manifest_recorder(manifest_log) -> FileWrittenHook:
    """An ``on_file_written`` hook appending each rewritten file's record (with the paths it
    ``replaces``) to a :class:`serve_journal.integrity.manifest.ManifestLog`.

    After a crash between the append and the commit marker, a re-run appends a second record for
    the same path and sha256; verification treats such records as one file.
    """
    def record(stored: StoredObject, summary: FileSummary, replaces: tuple[str, ...]) -> None:
        tier = DEFAULT_SPEC.parse(stored.path)[0]
        manifest_log.append(ManifestRecord(
            path=stored.path, sha256=stored.sha256, size=stored.size, row_count=summary.rows,
            min_ts_us=summary.min_ts_us, max_ts_us=summary.max_ts_us,
            seq_ranges=summary.seq_ranges, merkle_root=summary.merkle_root, tier=tier,
            version_id=stored.version_id, replaces=list(replaces), chain_id=manifest_log.chain_id,
        ))

    return record


def run_compaction(
    journal_uri: str,
    *,
    apply: bool,
    now: dt.datetime | None = None,
    options: CompactionOptions | None = None,
    settings: SinkSettings | None = None,
) -> CompactionReport:
    """``serve-journal compact [--apply]``: compact the hot tier of the journal at ``journal_uri``.

    ``settings`` says how it writes, as for a sink: the signing key (required for ``s3://``),
    the witness its checkpoints are copied to, and the write-once retention of new files.

    A dry run (``apply=False``) only plans. With ``apply``, every new file gets a manifest record
    naming the files it replaces in a chain of its own (``compactor-<id>``, signed with the
    journal's signing key, copied to the witness when one is configured) which is checkpointed
    before anything is deleted and at the end, so ``serve-journal verify`` keeps passing. A partition with an input whose bytes
    match no manifest record is refused (``report.refused``), so a rewrite never launders an
    altered file; replaced files are then deleted when
    the storage allows (an Object Lock refusal keeps them, reported as kept for retention).
    """
    settings = settings_for(journal_uri, settings)
    storage = settings.storage()
    now = now or dt.datetime.now(dt.UTC)
    options = options or CompactionOptions()
    if not apply:
        report = CompactionReport(dry_run=True)
        for key, inputs in _plan_partitions(storage, HOT, now, options):
            report.planned[key.path(HOT)] = list(inputs)
        return report
    manifest = settings.manifest(storage, f"compactor-{uuid.uuid4().hex[:8]}")
    sign_and_publish = signed_then_published(manifest, settings, storage, "compaction")
    try:
        report = compact(storage, now=now, options=options,
                         on_file_written=manifest_recorder(manifest),
                         recorded=recorded_hashes(storage, manifest.signer.export_public_key()),
                         before_delete=sign_and_publish, signer=manifest.signer)
    finally:
        manifest.checkpoint()
    report.manifest_chain = manifest.chain_id if manifest.length else None
    report.iceberg = sign_and_publish()
    return report


def signed_then_published(manifest, settings: SinkSettings, storage: JournalStorage,
                          reason: str) -> Callable[[], str | None]:
    """A rewrite's ``before_delete``: checkpoint the run's chain, then publish the live files to
    the Iceberg table when one is configured (one replace snapshot), so the table never names a
    file the rewrite is about to delete; a failing publish keeps the replaced files (the next
    run deletes them). Returns what the run's publishes did so far (``None``: no table)."""
    done: list[str] = []

    def run() -> str | None:
        manifest.checkpoint()
        published = publish_table(settings, storage, reason,
                                  cache=MarkerCache(manifest.signer.public_key))
        if published is None:
            return None
        if published.operation != "none" or not done:
            done.append(published.describe())
        return "; ".join(done)

    return run
