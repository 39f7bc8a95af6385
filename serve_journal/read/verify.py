"""``serve-journal verify``: prove the journal complete and unaltered, or name what is wrong.

Checks, each reported with the file, manifest object or chain it concerns:

1. every manifest chain: records numbered 0..n-1 without holes, each record's hash over its own
   content, each ``prev_hash`` equal to the previous record's hash;
2. every checkpoint (in the journal and in the witness): Ed25519 signature under the auditor's
   public key, the two copies identical, and the chain still holding, at ``length - 1``, the head
   hash the checkpoint signed; a chain truncated or rewritten after a checkpoint fails here. Only
   signed records vouch for files: a chain no valid checkpoint announced (writers sign a genesis
   checkpoint of length 0 when they open a chain) is an error, and an unsigned tail counts only
   within ``unsigned_grace_s`` of the chain's last signed checkpoint;
3. every data file (``hot/**.parquet``, ``cold/**.parquet``) against its manifest record: bytes
   (SHA-256, size), object version, row count, time range, producer sequence ranges and the RFC 6962
   Merkle root recomputed over its entries; files with no record are reported as added/forged;
4. every record's file exists, unless a later *signed* record ``replaces`` it (compaction,
   lifecycle) and that replacement verifies; a commit marker (``_commits/``) not signed by the
   auditor's key is an error (``commit-marker-unsigned``: readers holding the key ignore it), and
   so is a signed one whose ``replaces`` no signed record of its new files backs
   (``commit-marker-unbacked``; a warning when its inputs are all here and hold exactly the
   entries of its new files: a rewrite that died before its checkpoint); replacements chain (a writer's hot file -> the compacted day file ->
   its cold copy): a replacement that is gone itself is fine when its own replacement verifies;
   a derived file (``c-*`` compacted or any cold file) that no commit marker names is not part
   of the journal (a rewrite that stopped before its commit): it is reported as a warning, not
   as a forged file; the same record appended twice (same path and SHA-256: a rewrite re-run
   after a crash between recording and committing) counts as one;
5. per-producer sequence continuity over all records: every gap must be covered by an accounted
   gap (counted drops or sampling), otherwise it is reported as loss; two records of one path
   with different contents, or two live files claiming one ``(producer, seq)``, are errors;
6. on versioned object stores (S3): extra object versions and delete markers anywhere in the
   journal's areas;
7. (whole-journal runs) the files readers see (the catalog's live files) are exactly the files
   that verified, that no committed signed rewrite replaced, and that are not the output of a
   rewrite that never committed: ``reader-sees-unverified`` / ``reader-misses-verified``;
8. with ``expected_heads`` (the ``report.heads`` an earlier run kept): no chain the auditor saw
   signed is gone, shorter, or different at the remembered head, so tail truncation and rollback
   to an earlier signed state are caught without a witness. Without a witness and without
   remembered heads the report says plainly that they cannot be excluded;
9. the exact counters (``_counters/``): only files signed by a counters key the auditor's key
   certified, chained per producer, explain sequence gaps (see
   :mod:`serve_journal.read.verify_counters`);
10. the outcome partition (``outcomes/**.parquet``, :mod:`serve_journal.outcomes`) like the data
   files: each file against its record in its source's signed chain (bytes, object version, row
   count, outcome-time range, Merkle root over its records), a file without a record is
   ``file-without-record``, a recorded file gone is ``file-missing``, and on versioned stores
   its versions and delete markers are checked; outcome files are counted apart from entries;
11. (whole-journal runs, when an Iceberg catalog is configured: ``iceberg`` or
   ``SERVE_JOURNAL_ICEBERG_CATALOG``) the table's current snapshot holds exactly the live files,
   each with its size and, per its signed record, its row count (``iceberg-extra-file``,
   ``iceberg-missing-file``, ``iceberg-file-differs``, ``iceberg-unavailable``); the table is a
   view, the manifests stay the source of truth (:mod:`serve_journal.catalog.iceberg`).

``report.ok`` is true only when there are no errors; warnings (e.g. an unsigned tail still
within its grace period) do not fail verification.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import tempfile
from collections import defaultdict
from collections.abc import Callable, Iterable, Mapping, Sequence, Set
from dataclasses import asdict, dataclass, field
from typing import Any, BinaryIO

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from serve_journal import progress
from serve_journal.catalog import (
    COMMITS_PREFIX,
    CommitMarker,
    MarkerCache,
    is_derived,
    live_files,
    marker_path,
)
from serve_journal.catalog.iceberg import IcebergSettings, table_disagreements
from serve_journal.catalog.layout import DEFAULT_SPEC, OUTCOME_SPEC, PARQUET_SUFFIX, TIERS
from serve_journal.counters import COUNTERS_DIR, PRODUCER_STALE_S
from serve_journal.integrity.certificates import KEYS_PREFIX
from serve_journal.integrity.fingerprint import fingerprint_files
from serve_journal.integrity.manifest import (
    CHECKPOINT_PREFIX,
    GENESIS_HASH,
    MANIFEST_PREFIX,
    Checkpoint,
    ManifestError,
    ManifestRecord,
    load_public_key,
    parse_object_index,
    record_path,
)
from serve_journal.integrity.summary import apart, summarize
from serve_journal.outcomes.schema import decode_outcomes, outcome_merkle_root
from serve_journal.read.verify_archived import ArchivedFiles, summary_lines
from serve_journal.read.verify_counters import HEADS_PREFIX as COUNTERS_HEADS
from serve_journal.read.verify_counters import check_counters, lease_findings
from serve_journal.storage import JournalStorage
from serve_journal.storage.base import StoredObject
from serve_journal.times import as_utc, to_micros

ERROR = "error"
WARNING = "warning"

UNSIGNED_GRACE_S = 300.0
"""How long after a chain's last signed checkpoint its unsigned tail still vouches for files
(writers sign every ``checkpoint_interval_s``, 5 s by default); later it vouches for nothing."""

AccountedGaps = Mapping[str, Iterable[tuple[int, int, str]]]


@dataclass(frozen=True)
class Problem:
    """One finding. ``path`` is the journal object it concerns (data file, record, checkpoint)."""

    kind: str
    path: str
    detail: str
    chain_id: str | None = None
    severity: str = ERROR


@dataclass
class VerifyReport:
    """The outcome of :func:`verify_journal`."""

    journal: str
    problems: list[Problem] = field(default_factory=list)
    chains: int = 0
    records: int = 0
    checkpoints: int = 0
    witness_checkpoints: int = 0
    files: int = 0
    entries: int = 0
    producers: int = 0
    accounted_gaps: int = 0
    outcome_files: int = 0
    """Files of the outcome partition checked (not counted in ``files``)."""
    outcomes: int = 0
    """Outcome records in them (not counted in ``entries``)."""
    heads: dict[str, dict[str, Any]] = field(default_factory=dict)
    """``{chain_id: {"length": n, "head_hash": h}}``: each chain's signed head as verified. Keep
    it (``serve-journal verify --heads FILE``) and pass it back as ``expected_heads`` next time,
    so a journal whose signed history went backwards fails."""
    new_chains: list[str] = field(default_factory=list)
    """Chains with a signed head that the remembered heads did not know (new writers, or forged)."""
    truncation_excluded: bool = True
    """False when neither a witness nor remembered heads were given: then a journal cut back to
    an earlier signed state (its newest files, records and checkpoints deleted) cannot be told
    from one that never grew further."""
    archived_mode: str = "report"
    """How archived (S3 Glacier, not restored) files were treated (``verify --archived``)."""
    archived_unchecked: int = 0
    """Archived files not checked: restore needed (a ``restore-needed`` warning)."""
    archived_from_records: int = 0
    """Archived files checked from their signed manifest records only (content not re-hashed)."""

    @property
    def errors(self) -> list[Problem]:
        return [p for p in self.problems if p.severity == ERROR]

    @property
    def warnings(self) -> list[Problem]:
        return [p for p in self.problems if p.severity == WARNING]

    @property
    def ok(self) -> bool:
        """True when nothing failed (warnings allowed)."""
        return not self.errors

    def to_dict(self) -> dict[str, Any]:
        out = {k: v for k, v in asdict(self).items() if k != "problems"}
        out["ok"] = self.ok
        out["problems"] = [asdict(p) for p in self.problems]
        return out

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)

    def _add(self, kind: str, path: str, detail: str, chain_id: str | None = None,
             severity: str = ERROR) -> None:
        self.problems.append(Problem(kind, path, detail, chain_id, severity))


def format_report(report: VerifyReport) -> str:
    """A human summary: verdict, counts, then one line per problem."""
    verdict = "OK" if report.ok else f"FAILED ({len(report.errors)} error(s))"
    lines = [
        f"journal {report.journal}: {verdict}",
        f"  chains {report.chains}, manifest records {report.records}, checkpoints "
        f"{report.checkpoints} (witness {report.witness_checkpoints})",
        f"  data files {report.files}, entries {report.entries}, producers {report.producers}, "
        f"accounted gaps {report.accounted_gaps}",
    ]
    if report.outcome_files:
        lines.append(f"  outcome files {report.outcome_files}, outcome records {report.outcomes}")
    lines.extend(summary_lines(report))
    if report.new_chains:
        lines.append(f"  chains the remembered heads did not know: {', '.join(report.new_chains)}")
    if not report.truncation_excluded:
        lines.append("  NOTE truncation or rollback to an earlier signed state cannot be excluded: "
                     "no witness and no remembered chain heads (verify --heads FILE)")
    for problem in sorted(report.problems, key=lambda p: (p.severity != ERROR, p.path, p.kind)):
        chain = f" [chain {problem.chain_id}]" if problem.chain_id else ""
        lines.append(f"  {problem.severity.upper():7} {problem.kind}: {problem.path}{chain}: {problem.detail}")
    return "\n".join(lines)


# -- helpers -------------------------------------------------------------------------------------


def _in_scope_path(path: str, since_us: int | None, model: str | None) -> bool:
    """Whether a data file path can hold entries of ``model`` at or after ``since``."""
    try:
        _, key = DEFAULT_SPEC.parse(path)
    except ValueError:
        return since_us is None and model is None
    if model is not None and key.model != model:
        return False
    return not (since_us is not None and to_micros(key.end) <= since_us)


def _in_scope_record(record: ManifestRecord, since_us: int | None, model: str | None) -> bool:
    if model is not None and record.model != model:
        return False
    return not (since_us is not None and record.max_ts_us is not None and record.max_ts_us < since_us)


def _merge(runs: Iterable[Sequence[int]]) -> list[list[int]]:
    merged: list[list[int]] = []
    for lo, hi in sorted((int(r[0]), int(r[1])) for r in runs):
        if merged and lo <= merged[-1][1] + 1:
            merged[-1][1] = max(merged[-1][1], hi)
        else:
            merged.append([lo, hi])
    return merged


def _uncovered(lo: int, hi: int, covered: list[list[int]]) -> list[tuple[int, int]]:
    """Sub-ranges of [lo, hi] not inside any of the merged ``covered`` ranges."""
    out = []
    cursor = lo
    for c_lo, c_hi in covered:
        if c_hi < cursor:
            continue
        if c_lo > hi:
            break
        if c_lo > cursor:
            out.append((cursor, min(hi, c_lo - 1)))
        cursor = max(cursor, c_hi + 1)
        if cursor > hi:
            break
    if cursor <= hi:
        out.append((cursor, hi))
    return out


# -- the checks ----------------------------------------------------------------------------------


@dataclass
class _Chain:
    chain_id: str
    records: dict[int, ManifestRecord] = field(default_factory=dict)
    signed_length: int = 0
    signed_head: str = ""
    known: bool = False
    """A valid signed checkpoint of this chain exists (the genesis one of length 0 counts)."""
    last_signed: dt.datetime | None = None
    """Signed time of its newest valid checkpoint."""
    trusted: int = 0
    """Records ``0..trusted-1`` may vouch for files: the signed ones, plus an unsigned tail still
    within the grace period after the last checkpoint."""


def _check_chains(storage: JournalStorage, report: VerifyReport) -> dict[str, _Chain]:
    chains: dict[str, _Chain] = {}
    paths: dict[str, dict[int, str]] = defaultdict(dict)
    for path in storage.list_files(f"{MANIFEST_PREFIX}/", ".json"):
        parts = path.split("/")
        index = parse_object_index(path)
        if len(parts) != 3 or index is None:
            report._add("manifest-unexpected-object", path,
                        "not a manifest record name (_manifest/<chain>/<n:012d>.json)")
            continue
        paths[parts[1]][index] = path
    for chain_id, by_index in sorted(paths.items()):
        chain = chains[chain_id] = _Chain(chain_id)
        for index, path in sorted(by_index.items()):
            try:
                data = storage.read(path)
                record, canonical, hash_ok = ManifestRecord.from_json_checked(data)
            except (ManifestError, TypeError) as exc:
                report._add("manifest-record-unreadable", path, str(exc), chain_id)
                continue
            report.records += 1
            if not canonical:
                report._add("manifest-record-altered", path,
                            "not the bytes its writer stored (records are canonical JSON)", chain_id)
            if not hash_ok:
                report._add("manifest-record-altered", path,
                            "record content does not match its record_hash (edited after writing)",
                            chain_id)
            if record.index != index or record.chain_id != chain_id:
                report._add("manifest-record-misplaced", path,
                            f"record says chain {record.chain_id!r} index {record.index}", chain_id)
            chain.records[index] = record
        last = max(by_index)
        for index in range(last + 1):
            if index not in by_index:
                report._add("manifest-record-missing", record_path(chain_id, index),
                            f"chain has records up to {last} but not this one (removed)", chain_id)
        for index, record in sorted(chain.records.items()):
            if index == 0:
                expected = "0" * 64
            elif index - 1 in chain.records:
                expected = chain.records[index - 1].record_hash
            else:
                continue
            if record.prev_hash != expected:
                report._add("manifest-chain-broken", record_path(chain_id, index),
                            "prev_hash does not match the previous record's hash", chain_id)
    report.chains = len(chains)
    return chains


def _check_checkpoints(
    storage: JournalStorage, witness: JournalStorage | None, public_key: Any,
    chains: dict[str, _Chain], report: VerifyReport, *, now: dt.datetime | None = None,
    grace_s: float = 300.0,
) -> None:
    now = now or dt.datetime.now(dt.UTC)
    sources: list[tuple[str, JournalStorage]] = [("journal", storage)]
    if witness is not None:
        sources.append(("witness", witness))
    copies: dict[str, dict[str, bytes]] = defaultdict(dict)
    for name, source in sources:
        for path in source.list_files(f"{CHECKPOINT_PREFIX}/", ".json"):
            copies[path][name] = source.read(path)
            if name == "journal":
                report.checkpoints += 1
            else:
                report.witness_checkpoints += 1
    witnessed_chains: set[str] = set()
    for path, by_source in sorted(copies.items()):
        parts = path.split("/")
        length_from_name = parse_object_index(path)
        chain_id = parts[1] if len(parts) == 3 else None
        if chain_id is None or length_from_name is None:
            report._add("checkpoint-unexpected-object", path,
                        "not a checkpoint name (_checkpoints/<chain>/<length:012d>.json)")
            continue
        if len(set(by_source.values())) > 1:
            report._add("checkpoint-copies-differ", path,
                        "the journal's copy differs from the witness's copy", chain_id)
        for source_name, data in sorted(by_source.items()):
            where = f"{source_name} copy"
            try:
                checkpoint = Checkpoint.from_json(data)
            except ManifestError as exc:
                report._add("checkpoint-unreadable", path, f"{where}: {exc}", chain_id)
                continue
            if data != checkpoint.to_json():
                report._add("checkpoint-altered", path, f"{where}: not the bytes its writer "
                            "stored (checkpoints are canonical JSON)", chain_id)
                continue
            if not checkpoint.verify(public_key):
                report._add("checkpoint-bad-signature", path,
                            f"{where}: signature does not verify under the auditor's public key "
                            f"(signed as key id {checkpoint.key_id!r})", chain_id)
                continue
            if checkpoint.chain_id != chain_id or checkpoint.length != length_from_name:
                report._add("checkpoint-misplaced", path,
                            f"{where}: signed chain {checkpoint.chain_id!r} length {checkpoint.length}",
                            chain_id)
                continue
            if source_name == "witness":
                witnessed_chains.add(chain_id)
            chain = chains.get(chain_id)
            records = chain.records if chain else {}
            length = max(records) + 1 if records else 0
            head = records.get(checkpoint.length - 1)
            if length < checkpoint.length:
                report._add("manifest-truncated", f"{MANIFEST_PREFIX}/{chain_id}/", (
                    f"chain has {length} record(s) but {where} {path} signed {checkpoint.length}"),
                    chain_id)
            elif checkpoint.length == 0:
                if checkpoint.head_hash != GENESIS_HASH:
                    report._add("checkpoint-misplaced", path,
                                f"{where}: a length-0 checkpoint must sign the genesis hash",
                                chain_id)
                elif chain is not None:
                    chain.known = True
            elif head is None or head.record_hash != checkpoint.head_hash:
                report._add("manifest-rewritten", record_path(chain_id, checkpoint.length - 1),
                            f"record does not have the head hash {where} {path} signed", chain_id)
            elif chain is not None:
                chain.known = True
                if checkpoint.length > chain.signed_length:
                    chain.signed_length = checkpoint.length
                    chain.signed_head = checkpoint.head_hash
            if chain is not None:
                signed_at = _parse_signed_time(checkpoint.time)
                if signed_at is not None and (chain.last_signed is None or signed_at > chain.last_signed):
                    chain.last_signed = signed_at
    for chain_id, chain in sorted(chains.items()):
        length = max(chain.records) + 1 if chain.records else 0
        chain.trusted = chain.signed_length
        if not chain.known:
            report._add("chain-unknown", f"{MANIFEST_PREFIX}/{chain_id}/", (
                f"no valid signed checkpoint of this chain exists: its {length} record(s) vouch "
                "for nothing (a writer announces its chain with a signed checkpoint before its "
                "first file)"), chain_id)
        elif chain.signed_length < length:
            unsigned = length - chain.signed_length
            age = None if chain.last_signed is None else (now - chain.last_signed).total_seconds()
            if age is not None and age <= grace_s:
                chain.trusted = length
                report._add("chain-tail-unsigned", record_path(chain_id, chain.signed_length),
                            f"{unsigned} record(s) after the last signed checkpoint, signed "
                            f"{age:.0f} s ago (within the {grace_s:.0f} s grace period)",
                            chain_id, WARNING)
            else:
                report._add("chain-tail-unsigned", record_path(chain_id, chain.signed_length), (
                    f"{unsigned} record(s) after the last signed checkpoint, past the "
                    f"{grace_s:.0f} s grace period: they vouch for nothing (a writer that died "
                    "before signing, or records appended by someone without the key)"), chain_id)
        if witness is not None and chain_id not in witnessed_chains and chain.records:
            report._add("chain-not-witnessed", f"{MANIFEST_PREFIX}/{chain_id}/",
                        "the witness holds no checkpoint of this chain", chain_id, WARNING)


def _parse_signed_time(value: Any) -> dt.datetime | None:
    try:
        return as_utc(value, "checkpoint time") if isinstance(value, str) else None
    except (ValueError, TypeError):
        return None


def _check_heads(chains: dict[str, _Chain], expected: Mapping[str, Mapping[str, Any]] | None,
                 report: VerifyReport) -> None:
    """Record each chain's signed head; against ``expected`` (an earlier run's heads), refuse a
    signed history that went backwards or changed."""
    for chain_id, chain in sorted(chains.items()):
        if chain.signed_length:
            report.heads[chain_id] = {"length": chain.signed_length, "head_hash": chain.signed_head}
    for chain_id, head in sorted((expected or {}).items()):
        if chain_id.startswith(COUNTERS_HEADS):
            continue  # counters chains: serve_journal.read.verify_counters
        try:
            length, head_hash = int(head["length"]), str(head["head_hash"])
        except (KeyError, TypeError, ValueError):
            report._add("expected-head-unreadable", f"{MANIFEST_PREFIX}/{chain_id}/",
                        "the remembered head of this chain is not {length, head_hash}", chain_id)
            continue
        chain = chains.get(chain_id)
        if chain is None or not chain.records:
            report._add("chain-removed", f"{MANIFEST_PREFIX}/{chain_id}/",
                        f"an earlier verify saw this chain signed to {length} record(s); it is "
                        "gone", chain_id)
        elif chain.signed_length < length:
            report._add("signed-history-rolled-back", f"{MANIFEST_PREFIX}/{chain_id}/",
                        f"an earlier verify saw {length} signed record(s); now {chain.signed_length}"
                        " (newest records, files or checkpoints deleted)", chain_id)
        else:
            record = chain.records.get(length - 1)
            if record is None or record.record_hash != head_hash:
                report._add("signed-history-rewritten", record_path(chain_id, length - 1),
                            "differs from the head an earlier verify saw signed", chain_id)
    for chain_id in sorted(set(report.heads) - set(expected or {})):
        if expected is not None:
            report.new_chains.append(chain_id)


SPOOL_IN_MEMORY_BYTES = 64 * 1024**2
"""A file up to this size is checked from memory; a larger one (a compacted or cold file of
millions of entries) is copied to a private temporary file first and read from there a batch at
a time, so verify's memory does not grow with the files it checks."""


def _check_file(
    storage: JournalStorage, path: str, candidates: list[ManifestRecord], report: VerifyReport,
) -> bool:
    """Check one data file against its record(s); True when it verifies.

    The object's bytes are read once, into a copy that is hashed as it is written; the checks
    of its entries read that same copy, so what is hashed is what is decoded."""
    # An edited file is read whole (its entries are checked too, to say what changed); one far
    # larger than recorded, or a link to an endless file, is not copied past this bound.
    recorded = max(record.size for record in candidates)
    limit = 2 * recorded + SPOOL_IN_MEMORY_BYTES
    with tempfile.SpooledTemporaryFile(max_size=SPOOL_IN_MEMORY_BYTES,
                                       prefix="serve-journal-verify-") as copy:
        try:
            stored = storage.read_into(path, _Bounded(copy, limit))
        except FileNotFoundError:
            report._add("file-missing", path, "listed but cannot be read")
            return False
        except _TooLarge:
            report._add("file-altered", path, (
                f"over {limit:,} bytes where its manifest record says {recorded:,}: not the "
                "file recorded (read stopped there)"), candidates[-1].chain_id)
            return False
        copy.seek(0)
        return _check_copy(copy, stored, path, candidates, report)


class _TooLarge(Exception):
    """The object has more bytes than any of its records says."""


class _Bounded:
    """A writer that raises :class:`_TooLarge` instead of writing past ``limit`` bytes."""

    def __init__(self, out: BinaryIO, limit: int) -> None:
        self.out, self.left = out, limit

    def write(self, chunk: bytes) -> None:
        self.left -= len(chunk)
        if self.left < 0:
            raise _TooLarge
        self.out.write(chunk)


def _check_copy(copy: BinaryIO, stored: StoredObject, path: str,
                candidates: list[ManifestRecord], report: VerifyReport) -> bool:
    sha = stored.sha256
    record = next((r for r in reversed(candidates) if r.sha256 == sha), candidates[-1])
    chain = record.chain_id
    ok = True
    if sha != record.sha256 or stored.size != record.size:
        report._add("file-altered", path, (
            f"bytes differ from the manifest record (sha256 {sha[:16]}.. size {stored.size}, "
            f"recorded {record.sha256[:16]}.. size {record.size})"), chain)
        ok = False
    version = stored.version_id
    if record.version_id is not None and version is not None and version != record.version_id:
        report._add("file-version-mismatch", path,
                    f"current object version {version} is not the recorded version {record.version_id}",
                    chain)
        ok = False
    if OUTCOME_SPEC.contains(path):
        return _check_outcome_rows(copy.read(), path, record, report) and ok
    try:
        summary = summarize(copy)
    except Exception as exc:  # noqa: BLE001 - any decode failure is a finding, not a crash
        report._add("file-unreadable", path, f"not a readable journal Parquet file ({type(exc).__name__})", chain)
        return False
    report.entries += summary.rows
    if summary.rows != record.row_count:
        report._add("file-row-count", path,
                    f"{summary.rows} entries, the manifest record says {record.row_count}", chain)
        ok = False
    if summary.merkle_root != record.merkle_root:
        report._add("file-entries-altered", path,
                    "entries do not match the manifest record's Merkle root "
                    "(an entry was edited, removed, added or reordered)", chain)
        ok = False
    elif summary.rows and ((summary.min_ts_us, summary.max_ts_us)
                           != (record.min_ts_us, record.max_ts_us)
                           or summary.seq_ranges != record.seq_ranges):
        report._add("manifest-record-inconsistent", path,
                    "time range or sequence ranges in the record do not match the entries", chain)
        ok = False
    return ok


def _check_outcome_rows(data: bytes, path: str, record: ManifestRecord,
                        report: VerifyReport) -> bool:
    """An outcome file's records against its manifest record: count, Merkle root, time range."""
    chain = record.chain_id
    try:
        table = decode_outcomes(data)
    except Exception as exc:  # noqa: BLE001 - any decode failure is a finding, not a crash
        report._add("file-unreadable", path,
                    f"not a readable outcome Parquet file ({type(exc).__name__})", chain)
        return False
    report.outcomes += table.num_rows
    ok = True
    if table.num_rows != record.row_count:
        report._add("file-row-count", path,
                    f"{table.num_rows} outcome records, the manifest record says {record.row_count}",
                    chain)
        ok = False
    if outcome_merkle_root(table) != record.merkle_root:
        report._add("file-entries-altered", path,
                    "outcome records do not match the manifest record's Merkle root "
                    "(a record was edited, removed, added or reordered)", chain)
        return False
    if table.num_rows:
        times = pc.min_max(table.column("outcome_time").cast(pa.int64()))
        if (times["min"].as_py(), times["max"].as_py()) != (record.min_ts_us, record.max_ts_us) \
                or record.seq_ranges:
            report._add("manifest-record-inconsistent", path,
                        "outcome-time range or sequence ranges in the record do not match the "
                        "outcome records", chain)
            ok = False
    return ok


def _signed_markers(storage: JournalStorage, key: Any, report: VerifyReport) -> list[Any]:
    """The commit markers signed by ``key``; every other marker is an error (a reader holding
    the key ignores it, a reader without one would follow it)."""
    paths = storage.list_files(COMMITS_PREFIX, suffix=".json")
    out = []
    for path in paths:
        try:
            marker = CommitMarker.from_json(path, storage.read(path))
        except Exception as exc:  # noqa: BLE001 - an unreadable marker is a finding
            report._add("commit-marker-unreadable", path, f"cannot read this commit marker "
                        f"({type(exc).__name__})")
            continue
        if marker.verify(key):
            out.append(marker)
        else:
            report._add("commit-marker-unsigned", path, (
                "not signed by the journal's key (forged, altered or copied): readers holding "
                "the key ignore it, readers without one would follow it"))
    return out


def _marker_home(marker: Any) -> str | None:
    """Where the marker committing ``marker.new_files`` is written: beside the set's partition,
    named after the set (its files are ``<name>.parquet`` or ``<name>-<i>.parquet``)."""
    if not marker.new_files:
        return None
    try:
        tier, key = DEFAULT_SPEC.parse(marker.new_files[0])
    except ValueError:
        return None
    stem = marker.new_files[0].rsplit("/", 1)[-1].removesuffix(PARQUET_SUFFIX)
    if len(marker.new_files) > 1:
        stem = stem.rsplit("-", 1)[0]
    return marker_path(key, tier, stem)


def _is_signed(record: ManifestRecord, chains: Mapping[str, _Chain]) -> bool:
    """Covered by a checkpoint whose signature verified."""
    chain = chains.get(record.chain_id)
    return chain is not None and record.index < chain.signed_length


def _same_entries(storage: JournalStorage, marker: Any, present: set[str],
                  by_path: Mapping[str, list[ManifestRecord]], verified: dict[str, bool],
                  report: VerifyReport) -> bool:
    """Every file ``marker`` replaces is present and verifies, and its new files hold exactly
    their entries (so following the marker changes nothing a reader sees)."""
    for path in marker.replaces:
        if path not in present or path not in by_path:
            return False
        if path not in verified:
            verified[path] = _check_file(storage, path, by_path[path], report)
        if not verified[path]:
            return False
    try:
        return (fingerprint_files(storage, list(marker.replaces))
                == fingerprint_files(storage, list(marker.new_files)))
    except Exception:  # noqa: BLE001 - unreadable new files: not the same entries
        return False


def _check_reader_view(storage: JournalStorage, key: Any, verified: Mapping[str, bool],
                       replaced: set[str],
                       committed: set[str], report: VerifyReport) -> None:
    """Readers (query, console, replay, forget) see the catalog's live files; that set must be
    exactly the files that verified, that no committed signed rewrite replaced, and that are not
    the output of a rewrite that never committed."""
    try:
        seen = {f.path for f in live_files(storage, tier="all", cache=MarkerCache(key))}
    except Exception as exc:  # noqa: BLE001 - a catalog readers cannot list is a finding
        report._add("reader-view-unreadable", "_commits/",
                    f"the catalog cannot list the live files ({type(exc).__name__})")
        return
    accepted = {path for path, ok in verified.items() if ok and path not in replaced
                and (not is_derived(path) or path in committed)
                and not OUTCOME_SPEC.contains(path)}  # outcomes: not in the entries' catalog
    for path in sorted(seen - accepted):
        detail = ("readers see this file, but it did not verify" if verified.get(path) is False
                  else "readers see this file, but signed history says it was replaced"
                  if path in replaced else "readers see this file, but verify did not accept it")
        report._add("reader-sees-unverified", path, detail)
    for path in sorted(accepted - seen):
        report._add("reader-misses-verified", path,
                    "this file verified and nothing signed replaced it, but readers do not see it "
                    "(a commit marker hides it)")


def _check_claims(records: list[ManifestRecord], by_path: Mapping[str, list[ManifestRecord]],
                  replaced: set[str], report: VerifyReport) -> None:
    """One file, one content; one entry, one live file.

    A path is written once, so two records of one path with different SHA-256 mean one of them
    is forged (an attacker edits a file and records the new bytes in a chain of their own). And
    among the records no rewrite replaced, no two may claim the same ``(producer, seq)``: an
    entry is in one live file (a rewrite's inputs are replaced, so they do not count twice)."""
    for path, candidates in sorted(by_path.items()):
        if len({r.sha256 for r in candidates}) > 1:
            chains = ", ".join(sorted({r.chain_id for r in candidates}))
            report._add("conflicting-records", path,
                        f"{len(candidates)} records with different contents claim this file "
                        f"(chains {chains}): a file is written once, so one of them is forged")
    live = [record for record in records if record.path not in replaced]
    paths = sorted({r.path for r in live})
    rank = {path: i for i, path in enumerate(paths)}
    for producer, (lo, hi, owner) in sorted(_runs_by_producer(live, lambda r: rank[r.path]).items()):
        order = np.lexsort((owner, hi, lo))
        lo, hi, owner = lo[order], hi[order], owner[order]
        reach, holder = _reach(hi, owner)
        # a run starting at or below what an earlier run of another file reached
        clash = np.flatnonzero((lo[1:] <= reach[:-1]) & (owner[1:] != holder[:-1])) + 1
        for i in clash.tolist():
            report._add("sequence-claimed-twice", paths[owner[i]], (
                f"producer {producer}: sequence {lo[i]}..{min(hi[i], reach[i - 1])} is also "
                f"claimed by {paths[holder[i - 1]]}, and neither replaces the other (an entry "
                "forged or written twice)"))


def _runs_by_producer(records: Sequence[ManifestRecord], tag: Callable[[ManifestRecord], int]
                      ) -> dict[str, tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """``{producer: (lo, hi, tag)}``: every record's runs as arrays, each run tagged with
    ``tag(record)`` (a compacted file's record holds millions of runs: no Python object each)."""
    parts: dict[str, list[tuple[np.ndarray, int]]] = defaultdict(list)
    for record in records:
        t = tag(record)
        for producer, runs in record.seq_ranges.items():
            if len(runs):
                parts[producer].append((runs.array, t))
    out = {}
    for producer, items in parts.items():
        runs = np.concatenate([array for array, _ in items])
        tags = np.concatenate([np.full(len(array), t, dtype=np.int64) for array, t in items])
        out[producer] = (runs[:, 0], runs[:, 1], tags)
    return out


def _reach(hi: np.ndarray, tags: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """For runs sorted by start: the highest end reached up to each run, and the tag of the first
    run that reached it."""
    reach = np.maximum.accumulate(hi)
    new = np.ones(len(hi), dtype=bool)
    new[1:] = hi[1:] > reach[:-1]
    holder = tags[np.maximum.accumulate(np.where(new, np.arange(len(hi)), 0))]
    return reach, holder


def _check_sequences(
    records: list[ManifestRecord], accounted: AccountedGaps, seq_start: int | None,
    report: VerifyReport,
) -> None:
    index = {id(record): i for i, record in enumerate(records)}
    runs = _runs_by_producer(records, lambda r: index[id(r)])
    report.producers = len(runs)
    covered = {p: _merge((lo, hi) for lo, hi, _ in gaps) for p, gaps in accounted.items()}
    for producer, (lo, hi, owner) in sorted(runs.items()):
        order = np.lexsort((hi, lo))
        lo, hi, owner = lo[order], hi[order], owner[order]
        reach, holder = _reach(hi, owner)
        gaps: list[tuple[int, int, str, str]] = []  # lo, hi, file before, file after
        if seq_start is not None and lo[0] > seq_start:
            gaps.append((seq_start, int(lo[0]) - 1, "", records[owner[0]].path))
        for i in (np.flatnonzero(apart(lo[1:], reach[:-1])) + 1).tolist():
            gaps.append((int(reach[i - 1]) + 1, int(lo[i]) - 1, records[holder[i - 1]].path,
                         records[owner[i]].path))
        _report_gaps(producer, gaps, covered.get(producer, []), report)


def _report_gaps(producer: str, gaps: Sequence[tuple[int, int, str, str]],
                 cover: list[list[int]], report: VerifyReport) -> None:
    """Report each ``(lo, hi, file before, file after)`` gap as loss where the merged accounted
    ranges ``cover`` do not explain it; count the gaps they explain (in part or whole)."""
    for gap_lo, gap_hi, before, after in gaps:
        missing = _uncovered(gap_lo, gap_hi, cover)
        if (gap_hi - gap_lo + 1) - sum(b - a + 1 for a, b in missing):
            report.accounted_gaps += 1
        for a, b in missing:
            where = f"between {before} and {after}" if before else f"before {after}"
            report._add("sequence-gap", after or before, (
                f"producer {producer}: sequence {a}..{b} ({b - a + 1} entries) missing {where} "
                "and not accounted for by a counted drop or sampling: loss"))


def _check_versions(storage: JournalStorage, name: str, report: VerifyReport,
                    in_scope: Any, superseded: Set[str] = frozenset()) -> None:
    """Every area of a versioned store: no object with a second version, and no delete marker
    except on a data file a verified signed rewrite replaced (compaction, lifecycle delete
    those; on a versioned bucket that leaves a marker over the locked version)."""
    lister = getattr(storage, "list_versions", None)
    if lister is None:
        return
    for prefix in (*(f"{tier}/" for tier in TIERS), OUTCOME_SPEC.prefix, f"{MANIFEST_PREFIX}/",
                   f"{CHECKPOINT_PREFIX}/",
                   f"{COMMITS_PREFIX}/", f"{COUNTERS_DIR}/", f"{KEYS_PREFIX}/"):
        by_path: dict[str, list[Any]] = defaultdict(list)
        for version in lister(prefix):
            by_path[version.path].append(version)
        for path, versions in sorted(by_path.items()):
            if not in_scope(path):
                continue
            markers = [v for v in versions if v.is_delete_marker]
            objects = [v for v in versions if not v.is_delete_marker]
            if markers and path not in superseded:
                report._add("delete-marker", path,
                            f"{name}: {len(markers)} delete marker(s) hide this object")
            if len(objects) > 1:
                report._add("extra-object-version", path, (
                    f"{name}: {len(objects)} versions of a write-once object (shadow version "
                    f"written after the first: {', '.join(v.version_id for v in objects)})"))


def verify_journal(
    storage: JournalStorage,
    *,
    public_key: Any,
    witness: JournalStorage | None = None,
    since: dt.datetime | None = None,
    model: str | None = None,
    accounted_gaps: AccountedGaps | None = None,
    seq_start: int | None = 0,
    expected_heads: Mapping[str, Mapping[str, Any]] | None = None,
    unsigned_grace_s: float = UNSIGNED_GRACE_S,
    producer_stale_s: float = PRODUCER_STALE_S,
    now: dt.datetime | None = None,
    archived: str = "report",
    iceberg: IcebergSettings | str | None = None,
) -> VerifyReport:
    """Verify the journal in ``storage``; see the module docstring for what is checked.

    ``public_key``: the auditor's Ed25519 public key (key object, PEM bytes or PEM file path).
    ``since`` / ``model`` restrict the data files and records checked (chains and checkpoints are
    always checked whole). ``accounted_gaps``: ``{producer_id: [(lo, hi, reason), ...]}`` sequence
    ranges known to be dropped or sampled out; default (``None``): those the signed counters
    explain (:mod:`serve_journal.read.verify_counters`, which also checks the counters files and
    remembers their chain heads; a producer that never closed and wrote no counters for
    ``producer_stale_s`` is dead, and its lease's unaccounted range a ``producer-died`` error).
    ``seq_start``: the first sequence number every
    producer uses (``None`` to skip the leading-gap check); ignored when ``since`` is given.
    ``expected_heads``: the ``report.heads`` of an earlier run; a chain missing now, signed to a
    shorter length, or whose record at that length no longer has that hash is an error.
    Only records covered by a valid signature vouch for files, and an unsigned tail within
    ``unsigned_grace_s`` of its chain's last signed checkpoint (writers sign every few seconds);
    ``now`` is the clock for that (default: the current time). ``archived``: how files in an
    archive storage class that are not restored are treated, ``report`` (a ``restore-needed``
    warning) or ``records`` (checked from their signed records; see
    :mod:`serve_journal.read.verify_archived`). ``iceberg``: the Iceberg table whose agreement
    with the live files is checked (default: ``SERVE_JOURNAL_ICEBERG_CATALOG`` when set).
    """
    key = load_public_key(public_key)
    report = VerifyReport(journal=storage.uri)
    since_us = to_micros(since) if since is not None else None

    chains = _check_chains(storage, report)
    _check_checkpoints(storage, witness, key, chains, report, now=now, grace_s=unsigned_grace_s)
    _check_heads(chains, expected_heads, report)
    report.truncation_excluded = witness is not None or expected_heads is not None

    # The same file recorded twice (same path and SHA-256: a rewrite re-run, or adopted by the
    # next run, after a crash) counts once; a signed record wins over an unsigned one.
    chosen: dict[tuple[str, str], ManifestRecord] = {}
    for chain in chains.values():
        for index, record in sorted(chain.records.items()):
            if index >= chain.trusted:
                continue  # unknown chain, or unsigned past the grace period: vouches for nothing
            ident = (record.path, record.sha256)
            if ident not in chosen or (_is_signed(record, chains)
                                       and not _is_signed(chosen[ident], chains)):
                chosen[ident] = record
    records = list(chosen.values())
    scoped = [r for r in records if _in_scope_record(r, since_us, model)]
    markers = _signed_markers(storage, key, report)
    committed = {p for m in markers for p in m.new_files}
    by_path: dict[str, list[ManifestRecord]] = defaultdict(list)
    for record in records:
        by_path[record.path].append(record)

    files = [p for area in (*(f"{tier}/" for tier in TIERS), OUTCOME_SPEC.prefix)
             for p in storage.list_files(area, PARQUET_SUFFIX)]
    files = [p for p in files if _in_scope_path(p, since_us, model)
             or any(_in_scope_record(r, since_us, model) for r in by_path.get(p, []))]
    verified: dict[str, bool] = {}
    archive = ArchivedFiles(storage, report, archived, lambda r: _is_signed(r, chains))
    for path in progress.track(files, "verify files"):
        if path not in by_path and is_derived(path) and path not in committed:
            report._add("uncommitted-derived-file", path,
                        "compacted/cold file that no commit marker names: a rewrite that stopped "
                        "before its commit; readers ignore it", severity=WARNING)
            continue
        if path.startswith(OUTCOME_SPEC.prefix):
            report.outcome_files += 1
        else:
            report.files += 1
        if path not in by_path:
            report._add("file-without-record", path,
                        "data file has no manifest record (added or forged after the fact)")
            verified[path] = False
            continue
        verified[path] = archive.check(path, by_path[path], _check_file)

    # Records whose file is gone: fine only when a verified replacement supersedes them. Only a
    # signed record can say what it replaces (anyone who can write the bucket can write a
    # record); a commit marker's claim counts only as far as signed records back it.
    replaced_by: dict[str, set[str]] = defaultdict(set)
    for record in records:
        if _is_signed(record, chains):
            for old in record.replaces:
                replaced_by[old].add(record.path)
    for marker in markers:  # signed; still canonical bytes, right hashes, right place
        try:
            canonical = storage.read(marker.path) == marker.to_json()
        except OSError:
            canonical = False
        if not canonical:
            report._add("commit-marker-altered", marker.path,
                        "not the bytes its writer stored (markers are canonical JSON)")
        elif marker.file_sha256 and (
                {p for p, _ in marker.file_sha256} != set(marker.new_files)
                or any(h not in {r.sha256 for r in by_path.get(p, [])}
                       for p, h in marker.file_sha256)):
            report._add("commit-marker-altered", marker.path,
                        "its file hashes are not those of its files' manifest records")
        expected = _marker_home(marker)
        if expected != marker.path:
            report._add("commit-marker-misplaced", marker.path, (
                f"a commit marker of {', '.join(marker.new_files[:1]) or 'no file'} belongs at "
                f"{expected} (markers are named after the file set they commit)"))
    present = set(storage.list_files("", PARQUET_SUFFIX))
    tolerated: set[str] = set()  # inputs of unsigned rewrites that hold exactly their entries
    for marker in markers:
        unbacked = [old for old in marker.replaces
                    if not replaced_by.get(old, set()) & set(marker.new_files)]
        if not unbacked:
            continue
        if _same_entries(storage, marker, present, by_path, verified, report):
            # A rewrite that died between its commit and its signature: readers see exactly the
            # entries of the files it replaces, which are all still here and verify.
            tolerated.update(marker.replaces)
            report._add("commit-marker-unbacked", marker.path, (
                f"no signed record backs its replacement of {len(unbacked)} file(s), but its "
                "files hold exactly their entries and they are all still here"), severity=WARNING)
        else:
            report._add("commit-marker-unbacked", marker.path, (
                f"claims {len(unbacked)} file(s) replaced (e.g. {unbacked[0]}) that no signed "
                "record of its new files replaces: readers would stop seeing them"))

    def _replacement_ok(path: str, seen: frozenset[str]) -> bool:
        """A replacement holds: it is present and verifies, or it is gone and replaced in turn
        by files that hold (hot -> compacted -> cold)."""
        if path in seen:
            return False
        if path in present:
            if path not in by_path:
                return False
            if path not in verified:
                verified[path] = archive.check(path, by_path[path], _check_file)
            return verified[path]
        return any(_replacement_ok(r, seen | {path}) for r in sorted(replaced_by.get(path, ())))

    for record in scoped:
        if record.path in present:
            continue
        replacements = sorted(replaced_by.get(record.path, ()))
        if any(_replacement_ok(r, frozenset({record.path})) for r in replacements):
            continue
        detail = "file in the manifest record is missing (deleted)"
        if replacements:
            detail += f"; its replacement {replacements[-1]} does not verify"
        report._add("file-missing", record.path, detail, record.chain_id)

    _check_claims(records, by_path, set(replaced_by) | tolerated, report)
    # A rewrite deletes what it replaces only after its commit marker exists: a signed rewrite
    # whose inputs are gone but whose marker is not (deleted) leaves readers without its entries.
    for record in records:
        if record.replaces and is_derived(record.path) and record.path not in committed \
                and _is_signed(record, chains) and record.path in present \
                and any(old not in present for old in record.replaces):
            report._add("commit-marker-missing", record.path, (
                "a signed rewrite whose replaced files are gone, but no commit marker names it: "
                "readers do not see its entries (the marker was deleted)"), record.chain_id)
    if since is None and model is None:
        # A replacement takes effect for readers at its commit marker (the commit point).
        committed_replaced = {old for m in markers for old in m.replaces} & set(replaced_by)
        _check_reader_view(storage, key, verified, committed_replaced | tolerated, committed,
                           report)
        table = IcebergSettings.parse(iceberg) if iceberg is not None else IcebergSettings.from_env()
        if table is not None:
            recorded = {path: [(r.size, r.row_count) for r in rs] for path, rs in by_path.items()}
            for found in table_disagreements(storage, table, cache=MarkerCache(key),
                                             recorded=recorded):
                report._add(found.kind, found.path, found.detail)
    if accounted_gaps is None:
        counted = check_counters(storage, key, model, expected_heads)
        for kind, path, detail in counted.problems:
            report._add(kind, path, detail)
        report.heads.update(counted.heads)
        accounted_gaps = counted.gaps
        # A dead replica's unaccounted tail, up to its signed lease (verify_counters).
        for kind, path, detail in lease_findings(counted, (r.seq_ranges for r in scoped), now,
                                                 producer_stale_s):
            report._add(kind, path, detail)
    _check_sequences(scoped, accounted_gaps, seq_start if since is None else None, report)
    archive.finish()

    def in_scope(path: str) -> bool:
        if path.endswith(PARQUET_SUFFIX) and not path.startswith(f"{COUNTERS_DIR}/"):
            return _in_scope_path(path, since_us, model)
        return True

    superseded = {path for path, news in replaced_by.items()
                  if any(_replacement_ok(new, frozenset({path})) for new in sorted(news))}
    _check_versions(storage, "journal", report, in_scope, superseded)
    if witness is not None:
        _check_versions(witness, "witness", report, lambda _path: True)
    return report


def signed_records(storage: JournalStorage, public_key: Any,
                   witness: JournalStorage | None = None) -> list[ManifestRecord]:
    """The manifest records covered by a valid signed checkpoint under ``public_key``, from
    chains with no error: what compaction and lifecycle may trust as the record of a file.
    Anything else (unsigned tails, chains of unknown writers, altered chains) is left out, so
    nothing unsigned is ever rewritten into a signed chain."""
    report = VerifyReport(journal=storage.uri)
    chains = _check_chains(storage, report)
    _check_checkpoints(storage, witness, load_public_key(public_key), chains, report)
    damaged = {p.chain_id for p in report.errors if p.chain_id}
    return [record for chain_id, chain in sorted(chains.items()) if chain_id not in damaged
            for index, record in sorted(chain.records.items()) if index < chain.signed_length]


def load_heads(path: str | os.PathLike[str]) -> dict[str, dict[str, Any]] | None:
    """The chain heads an earlier verify kept in ``path``; ``None`` when the file does not exist."""
    try:
        with open(path, encoding="utf-8") as handle:
            doc = json.load(handle)
    except FileNotFoundError:
        return None
    heads = doc.get("heads") if isinstance(doc, dict) else None
    if not isinstance(heads, dict):
        raise ValueError(f"{path} is not a chain heads file (a JSON object with 'heads')")
    return heads


def save_heads(path: str | os.PathLike[str], report: VerifyReport,
               previous: Mapping[str, Mapping[str, Any]] | None = None) -> None:
    """Keep ``report.heads`` in ``path`` for the next verify (atomic replace, mode 0600). Chains
    the earlier heads knew stay remembered even if this run saw none (then it failed anyway)."""
    if not report.ok:
        raise ValueError("only the heads of a journal that verified are worth remembering")
    heads = {**{k: dict(v) for k, v in (previous or {}).items()}, **report.heads}
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    tmp = f"{path}.{os.getpid()}.tmp"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w", encoding="utf-8") as handle:
        json.dump({"journal": report.journal, "heads": heads}, handle, indent=1, sort_keys=True)
    os.replace(tmp, path)


def verify_file(
    storage: JournalStorage, path: str, records: Sequence[ManifestRecord],
) -> VerifyReport:
    """Check one data file against its manifest record(s), as :func:`verify_journal` checks
    every file: bytes (SHA-256, size), object version, row count, Merkle root, time and sequence
    ranges.

    ``records`` are the file's manifest records, oldest first (the one whose SHA-256 matches the
    file is used, else the newest); there must be at least one. The report counts one file;
    ``report.ok`` says whether the file verifies and ``report.problems`` what differs. Chains,
    checkpoints and sequence continuity are not checked here: use :func:`verify_journal` for those.
    """
    if not records:
        raise ValueError(f"verify_file needs at least one manifest record for {path}")
    report = VerifyReport(journal=storage.uri, files=1)
    _check_file(storage, path, list(records), report)
    return report
