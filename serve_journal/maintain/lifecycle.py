"""Hot -> cold lifecycle: move partitions older than the hot window into the cold tier.

For each partition (an hour, or a day compacted into ``hour=all``) whose time range ended more
than ``hot_days`` ago, :func:`apply`:

1. reads the partition's live hot files and fingerprints their entries (entry ids and hashes);
2. writes ``cold/model=../date=../hour=../l-<hash of the hot file set>.parquet`` create-only with
   the cold encoding (zstd level 19, 1M-row row groups) and reports it to ``on_file_written``
   (the manifest record naming the hot files it replaces); the hot files are read in the order
   they were written (:func:`~serve_journal.maintain.compaction.in_written_order`), so a
   compacted day is streamed in lookup order rather than sorted again;
3. re-reads the cold copy and refuses the partition if its entries differ in any way;
4. hands the cold files to ``lock`` (the cold retention policy: Object Lock on S3);
5. writes the commit marker (``_commits/cold/...``): from now on readers see the cold copy and
   not the hot files;
6. checks the cold copy once more against the marker and only then deletes the hot copies (when
   ``retention_allows``). A cold copy that no longer checks is never trusted: hot data stays.

Each step is safe to interrupt; running again completes the work. Nothing is done unless
``dry_run=False``. The bucket itself moves ``cold/`` to Glacier classes by the rules from
:func:`s3_lifecycle_configuration`.
"""

from __future__ import annotations

import datetime as dt
import logging
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import pyarrow.parquet as pq

from serve_journal import progress
from serve_journal.catalog import (
    MarkerCache,
    MarkerSigner,
    commit,
    live_files,
    load_markers,
    marker_checks,
    marker_path,
    set_name,
)
from serve_journal.catalog.layout import COLD, DEFAULT_SPEC, HOT, TIERS, PartitionKey
from serve_journal.errors import RewriteMemoryError
from serve_journal.fileformat import COLD_OPTIONS, ParquetOptions
from serve_journal.maintain.compaction import (
    CompactionError,
    CrashHook,
    FileWrittenHook,
    RecordedHashes,
    RetentionCheck,
    UnrecordedInputError,
    adopt_marker,
    delete_replaced,
    in_written_order,
    manifest_recorder,
    recorded_hashes,
    signed_then_published,
    write_verified,
)
from serve_journal.maintain.rewrite import RewriteWorkspace, parse_memory_limit
from serve_journal.sink.settings import SinkSettings, settings_for
from serve_journal.storage import JournalStorage

log = logging.getLogger(__name__)

LIFECYCLE_PREFIX = "l-"
DEFAULT_HOT_DAYS = 30

LockHook = Callable[[Sequence[str]], None]
"""``lock(cold_paths)``: apply the cold retention policy (e.g. Object Lock) to new cold files."""


@dataclass(frozen=True)
class PartitionMove:
    """One hour partition to move to the cold tier."""

    key: PartitionKey
    hot_files: tuple[str, ...]

    @property
    def cold_name(self) -> str:
        return set_name(LIFECYCLE_PREFIX, self.hot_files)


@dataclass(frozen=True)
class LifecyclePlan:
    """What :func:`apply` would do."""

    now: dt.datetime
    hot_days: int
    moves: tuple[PartitionMove, ...]
    pending_expiry: tuple[str, ...]
    """Commit markers of earlier moves whose hot copies still exist."""

    def describe(self) -> str:
        """Human-readable summary (the CLI's dry-run output)."""
        lines = [
            f"hot window: {self.hot_days} days (partitions before "
            f"{(self.now - dt.timedelta(days=self.hot_days)).isoformat()})",
            f"partitions to move to cold: {len(self.moves)}",
        ]
        for move in self.moves:
            lines.append(
                f"  {move.key.path(HOT)}: {len(move.hot_files)} file(s) -> "
                f"{move.key.path(COLD)}/{move.cold_name}.parquet"
            )
        lines.append(f"moved partitions with hot copies left to expire: {len(self.pending_expiry)}")
        return "\n".join(lines)


@dataclass
class LifecycleReport:
    """What :func:`apply` did (or, in a dry run, would do)."""

    dry_run: bool
    moved: list[str] = field(default_factory=list)
    cold_files: list[str] = field(default_factory=list)
    expired: list[str] = field(default_factory=list)
    kept_for_retention: list[str] = field(default_factory=list)
    refused: list[tuple[str, str]] = field(default_factory=list)
    """(partition, reason) of partitions whose cold copy did not check: hot data kept."""
    plan: LifecyclePlan | None = None
    manifest_chain: str | None = None
    """The manifest chain the cold files were recorded in (``run_lifecycle``)."""
    iceberg: str | None = None
    """What publishing to the Iceberg table did, when one is configured (``run_lifecycle``)."""

    def describe(self) -> str:
        """Human-readable summary (the CLI's output)."""
        lines = [self.plan.describe()] if self.plan is not None else []
        if self.dry_run:
            lines.append("dry run: nothing written (use --apply)")
            return "\n".join(lines)
        lines.append(f"moved to cold: {len(self.moved)} partition(s), {len(self.cold_files)} "
                     f"cold file(s); hot files expired: {len(self.expired)}, kept for retention: "
                     f"{len(self.kept_for_retention)}")
        for partition, reason in self.refused:
            lines.append(f"  REFUSED {partition}: {reason}")
        if self.manifest_chain:
            lines.append(f"manifest chain: {self.manifest_chain}")
        if self.iceberg:
            lines.append(f"iceberg: {self.iceberg}")
        return "\n".join(lines)


def plan(
    storage: JournalStorage, now: dt.datetime | None = None, hot_days: int = DEFAULT_HOT_DAYS,
    cache: MarkerCache | None = None,
) -> LifecyclePlan:
    """Partitions whose hour ended more than ``hot_days`` before ``now``; ``cache`` says which
    commit markers count (default: the readers', see :func:`serve_journal.catalog.reader_cache`)."""
    if not isinstance(hot_days, int) or hot_days < 0:
        raise ValueError(f"hot_days must be a non-negative integer, got {hot_days!r}")
    now = (now or dt.datetime.now(dt.UTC)).astimezone(dt.UTC)
    cutoff = now - dt.timedelta(days=hot_days)
    groups: dict[PartitionKey, list[str]] = {}
    for f in live_files(storage, tier=HOT, cache=cache):
        if f.key.end <= cutoff:
            groups.setdefault(f.key, []).append(f.path)
    moves = tuple(PartitionMove(k, tuple(in_written_order(v)))
                  for k, v in sorted(groups.items(), key=lambda kv: kv[0].sort_key()))
    pending = tuple(
        m.path
        for m in load_markers(storage, prefix=COLD, cache=cache)
        if m.kind == "lifecycle" and any(storage.exists(p) for p in m.replaces)
    )
    return LifecyclePlan(now=now, hot_days=hot_days, moves=moves, pending_expiry=pending)


def apply(
    storage: JournalStorage,
    lifecycle_plan: LifecyclePlan,
    *,
    dry_run: bool = True,
    options: ParquetOptions = COLD_OPTIONS,
    max_rows_per_file: int = 16_000_000,
    retention_allows: RetentionCheck | None = None,
    lock: LockHook | None = None,
    on_file_written: FileWrittenHook | None = None,
    recorded: RecordedHashes | None = None,
    before_delete: Callable[[], None] | None = None,
    signer: MarkerSigner | None = None,
    memory_limit: int | str | None = None,
    temp_dir: str | None = None,
    _crash: CrashHook | None = None,
) -> LifecycleReport:
    """Carry out ``lifecycle_plan``; a dry run (the default) only reports. ``signer`` (the
    journal's manifest signer) signs the commit markers; then only markers it signed count.
    ``memory_limit`` bounds the memory a move uses (``None``: ``SERVE_JOURNAL_MEMORY_LIMIT``,
    else 2 GiB); its sort spills to ``temp_dir`` (default: the system temp folder) beyond it.

    ``on_file_written(stored, table, replaces)`` records each cold file (see
    :func:`serve_journal.maintain.compaction.manifest_recorder`); without it ``serve-journal verify``
    reports the cold files as unrecorded."""
    report = LifecycleReport(dry_run=dry_run)
    memory_limit = parse_memory_limit(memory_limit)
    cache = MarkerCache(signer.public_key) if signer is not None else None
    markers = list(lifecycle_plan.pending_expiry)
    for move in progress.track(lifecycle_plan.moves, "move partitions to cold"):
        partition = move.key.path(HOT)
        if dry_run:
            report.moved.append(partition)
            continue
        with RewriteWorkspace(memory_limit, temp_dir) as workspace:
            try:
                spooled = workspace.spool(storage, move.hot_files, recorded)
            except UnrecordedInputError as exc:
                report.refused.append((partition, str(exc)))
                continue
            try:
                expected = workspace.fingerprint([f.local for f in spooled])
                cold_files = write_verified(
                    storage,
                    key=move.key,
                    tier=COLD,
                    name=move.cold_name,
                    inputs=spooled,
                    workspace=workspace,
                    expected=expected,
                    options=options,
                    max_rows_per_file=max_rows_per_file,
                    replaces=move.hot_files,
                    on_file_written=on_file_written,
                    crash=_crash,
                )
            except RewriteMemoryError as exc:
                report.refused.append((partition, str(exc)))
                continue
            except CompactionError:
                report.refused.append((partition, "cold copy does not hold the hot entries"))
                continue
            except OSError as exc:
                report.refused.append((partition, f"cold copy unreadable ({type(exc).__name__})"))
                continue
        if lock is not None:
            lock([p for p, _ in cold_files])
        marker = commit(
            storage,
            kind="lifecycle",
            path=marker_path(move.key, COLD, move.cold_name),
            new_files=cold_files,
            replaces=move.hot_files,
            expected=expected,
            signer=signer,
            now=lifecycle_plan.now,
        )
        if _crash:
            _crash("committed")
        report.moved.append(partition)
        report.cold_files.extend(p for p, _ in cold_files)
        markers.append(marker.path)
    if dry_run:
        return report
    by_path = {m.path: m for m in load_markers(storage, prefix=COLD, cache=cache)}
    earlier = set(lifecycle_plan.pending_expiry)
    due = []
    for path in markers:
        marker = by_path.get(path)
        if marker is None:
            report.refused.append((path, "commit marker not signed by this journal's key"))
            continue
        if not marker_checks(storage, marker):
            report.refused.append((path, "cold copy no longer checks; hot copies kept"))
            continue
        # A move an earlier run committed and may not have signed (it died in between): this
        # run records it again, if the cold copy holds exactly the hot entries still here.
        if on_file_written is not None and path in earlier \
                and all(storage.exists(p) for p in marker.replaces) \
                and not adopt_marker(storage, marker, on_file_written, memory_limit):
            report.refused.append((path, "cold copy does not hold the hot entries"))
            continue
        due.append(marker)
    if before_delete is not None and due:
        before_delete()  # the records that replace the hot files are signed before any goes
    for marker in due:
        deleted, kept = delete_replaced(storage, marker, retention_allows, _crash)
        report.expired.extend(deleted)
        report.kept_for_retention.extend(kept)
        _expire_superseded(storage, marker, retention_allows, report, cache)
    return report


def run_lifecycle(
    journal_uri: str,
    *,
    apply: bool,
    hot_days: int = DEFAULT_HOT_DAYS,
    now: dt.datetime | None = None,
    options: ParquetOptions = COLD_OPTIONS,
    settings: SinkSettings | None = None,
    memory_limit: int | str | None = None,
    temp_dir: str | None = None,
) -> LifecycleReport:
    """``serve-journal lifecycle run [--hot-days N] [--apply]`` for the journal at ``journal_uri``.

    ``memory_limit`` and ``temp_dir`` bound a move's memory and say where its sort spills, as for
    :func:`apply_plan` (``--memory-limit``, ``--temp-dir``).

    ``settings`` says how it writes, as for a sink: the signing key (required for ``s3://``),
    the witness, and the write-once retention (its ``cold`` policy locks the cold files).

    A dry run (``apply=False``) only plans. With ``apply``, every cold file gets a manifest record
    naming the hot files it replaces in a chain of its own (``lifecycle-<id>``, signed with the
    journal's signing key, witnessed when configured), checkpointed before any hot copy is deleted
    (verify honours ``replaces`` from signed records only) and at the end, so
    ``serve-journal verify`` keeps passing after the hot copies expire. A partition with a hot
    file whose bytes match no manifest record is refused: its change is not laundered into cold.
    """
    settings = settings_for(journal_uri, settings)
    storage = settings.storage()
    if not apply:
        the_plan = plan(storage, now, hot_days)
        report = apply_plan(storage, the_plan, dry_run=True, options=options)
        report.plan = the_plan
        return report
    manifest = settings.manifest(storage, f"lifecycle-{uuid.uuid4().hex[:8]}")
    the_plan = plan(storage, now, hot_days, MarkerCache(manifest.signer.public_key))
    sign_and_publish = signed_then_published(manifest, settings, storage, "lifecycle")
    try:
        report = apply_plan(storage, the_plan, dry_run=False, options=options,
                            on_file_written=manifest_recorder(manifest),
                            recorded=recorded_hashes(storage, manifest.signer.export_public_key()),
                            before_delete=sign_and_publish, signer=manifest.signer,
                            memory_limit=memory_limit, temp_dir=temp_dir)
    finally:
        manifest.checkpoint()
    report.plan = the_plan
    report.manifest_chain = manifest.chain_id if manifest.length else None
    report.iceberg = sign_and_publish()
    return report


def _expire_superseded(
    storage: JournalStorage,
    marker: Any,
    retention_allows: RetentionCheck | None,
    report: LifecycleReport,
    cache: MarkerCache | None = None,
) -> None:
    """Delete hot files of the moved partition that earlier compactions replaced (no longer read)."""
    _, key = DEFAULT_SPEC.parse(marker.new_files[0])
    # a day partition replaced the files of its hour partitions too
    hot_dir = (key.path(HOT).rsplit("/", 1)[0] if key.is_day else key.path(HOT)) + "/"
    replaced = set()
    for m in load_markers(storage, prefix=HOT, cache=cache):
        replaced.update(p for p in m.replaces if p.startswith(hot_dir))
    for path in sorted(replaced):
        if not storage.exists(path):
            continue
        if retention_allows is not None and not retention_allows(path):
            report.kept_for_retention.append(path)
            continue
        try:
            storage.delete(path)
        except OSError:
            report.kept_for_retention.append(path)
            continue
        report.expired.append(path)


def s3_lifecycle_configuration(
    *,
    prefix: str = "",
    glacier_after_days: int | None = 30,
    deep_archive_after_days: int | None = 180,
    cold_retention_days: int | None = None,
    access_log_retention_days: int | None = None,
    noncurrent_expire_days: int | None = 30,
) -> dict[str, Any]:
    """The bucket lifecycle configuration for a journal under ``prefix`` (S3 JSON shape, as for
    ``aws s3api put-bucket-lifecycle-configuration --lifecycle-configuration file://...``).

    ``cold/`` moves to GLACIER (Flexible Retrieval) then DEEP_ARCHIVE after the given days since
    it was written, and expires after ``cold_retention_days``. ``hot/`` gets no rule: the journal
    expires hot copies itself, only after their cold copy checks. Note that queries of cold
    objects in Glacier classes need a restore first.
    """
    base = prefix.strip("/")
    base = f"{base}/" if base else ""
    transitions = []
    if glacier_after_days is not None:
        transitions.append({"Days": _days("glacier_after_days", glacier_after_days),
                            "StorageClass": "GLACIER"})
    if deep_archive_after_days is not None:
        days = _days("deep_archive_after_days", deep_archive_after_days)
        if glacier_after_days is not None and days <= glacier_after_days:
            raise ValueError(
                f"deep_archive_after_days must be later than glacier_after_days "
                f"({glacier_after_days}), got {days}"
            )
        transitions.append({"Days": days, "StorageClass": "DEEP_ARCHIVE"})
    cold_rule: dict[str, Any] = {
        "ID": "serve-journal-cold-tier",
        "Filter": {"Prefix": f"{base}{COLD}/"},
        "Status": "Enabled",
    }
    if transitions:
        cold_rule["Transitions"] = transitions
    if cold_retention_days is not None:
        days = _days("cold_retention_days", cold_retention_days)
        if transitions and days <= transitions[-1]["Days"]:
            raise ValueError(
                f"cold_retention_days must be later than the last transition "
                f"({transitions[-1]['Days']} days), got {days}"
            )
        cold_rule["Expiration"] = {"Days": days}
    if noncurrent_expire_days is not None:
        cold_rule["NoncurrentVersionExpiration"] = {
            "NoncurrentDays": _days("noncurrent_expire_days", noncurrent_expire_days)
        }
    rules = [
        cold_rule,
        {
            "ID": "serve-journal-abort-incomplete-uploads",
            "Filter": {"Prefix": base},
            "Status": "Enabled",
            "AbortIncompleteMultipartUpload": {"DaysAfterInitiation": 1},
        },
    ]
    if access_log_retention_days is not None:
        rules.append({
            "ID": "serve-journal-access-log",
            "Filter": {"Prefix": f"{base}_access/"},
            "Status": "Enabled",
            "Expiration": {"Days": _days("access_log_retention_days", access_log_retention_days)},
        })
    return {"Rules": rules}


def _days(name: str, value: int) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ValueError(f"{name} must be a positive number of days, got {value!r}")
    return value


def bytes_per_entry(storage: JournalStorage, tier: str = HOT) -> float | None:
    """Bytes on disk per live entry of ``tier`` (``None`` when it holds no entries)."""
    if tier not in TIERS:
        raise ValueError(f"tier must be one of {TIERS}, got {tier!r}")
    size = rows = 0
    for f in live_files(storage, tier=tier):
        full = storage.full_path(f.path)
        size += storage.filesystem.get_file_info(full).size or 0
        with storage.filesystem.open_input_file(full) as handle:
            rows += pq.ParquetFile(handle).metadata.num_rows
    return size / rows if rows else None


apply_plan = apply
"""Alias of :func:`apply` for code that has a local variable named ``apply``."""
