"""``serve-journal evidence``: export the entries of some requests or of one subject as a
self-contained bundle an examiner can take away and check offline
(:func:`serve_journal.evidence.verify.verify_evidence`).

The entries are found in the files the catalog says are live now (a sink's hot file, or the
compacted or cold file that replaced it), with commit markers checked against the auditor's key.
Each file the entries sit in is read whole: its bytes must have the SHA-256 of a manifest record
covered by a signed checkpoint, and its entries the record's Merkle root; only then are the
entries' inclusion proofs built (a file failing this is skipped and named, so a planted copy of
an entry cannot block the evidence of the genuine one). Per manifest chain involved, the bundle holds the records from
the first one an entry relies on up to the latest signed checkpoint, the checkpoint covering the
entries' records and that latest checkpoint: the chain is a hash chain, so the records between
the two checkpoints are the proof that the later one extends the earlier one.

Every export is written to the access log (subject as its token only, and the bundle's SHA-256)
before the bundle is written. A subject id given in the clear is turned into its token by the
caller's tokenizer and never stored, logged or put in the bundle.
"""

from __future__ import annotations

import datetime as dt
import getpass
import io
import json
import os
import time
import zipfile
from collections import defaultdict
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from serve_journal.catalog import MarkerCache, live_files
from serve_journal.errors import ManifestError
from serve_journal.evidence.bundle import (
    BUNDLE_FORMAT,
    ENTRIES,
    EVIDENCE,
    KEY,
    MANIFEST,
    PROOFS,
    VERIFY_JSON,
    VERIFY_TEXT,
    render_manifest,
    sha256_hex,
)
from serve_journal.fileformat import decode_parquet
from serve_journal.integrity.manifest import (
    CHECKPOINT_PREFIX,
    Checkpoint,
    ManifestRecord,
    load_public_key,
    parse_object_index,
    public_key_id,
    record_path,
)
from serve_journal.integrity.merkle import leaf_hash, node_hash, root_from_leaf_hashes, table_leaves
from serve_journal.integrity.trust import key_fingerprint
from serve_journal.privacy.tokens import check_subject_token
from serve_journal.read.access_log import record_access
from serve_journal.read.pruning import open_index
from serve_journal.read.verify import (
    VerifyReport,
    format_report,
    signed_records,
    verify_file,
    verify_journal,
)
from serve_journal.storage import JournalStorage, open_storage
from serve_journal.times import as_utc

VERIFY_SCOPES = ("journal", "files")
"""``journal``: the bundle's verify summary is a whole-journal verify run; ``files``: only the
data files the entries sit in are checked against their records (faster on a large journal)."""

_ZIP_TIME = (1980, 1, 1, 0, 0, 0)
"""Member time in the zip: fixed, so the same evidence gives the same bundle bytes."""
_MEMO_MIN = 64
"""Subtree hashes of at least this many leaves are kept while the proofs of one file are built."""


class EvidenceError(RuntimeError):
    """The evidence cannot be exported as asked; the message says why and what to do."""


@dataclass(frozen=True)
class EvidenceExport:
    """What :func:`export_evidence` wrote."""

    path: str
    bundle_sha256: str
    entries: int
    files: tuple[str, ...]
    chains: tuple[str, ...]
    members: tuple[str, ...]
    journal_verify_ok: bool
    access_record: str
    """Path of the access-log record of this export (relative to the journal root)."""
    skipped_files: tuple[str, ...] = ()
    """Live files holding selected rows that no signed record vouches for (planted, altered, or
    a writer's last seconds not yet signed): their rows are not in the bundle."""

    def describe(self) -> str:
        text = (f"wrote {self.path}: {self.entries} entr{'y' if self.entries == 1 else 'ies'} "
                f"from {len(self.files)} file(s), {len(self.members)} members, sha256 "
                f"{self.bundle_sha256}; verify summary "
                f"{'OK' if self.journal_verify_ok else 'FAILED (see verify-summary.txt)'}")
        if self.skipped_files:
            text += (f"\nskipped {len(self.skipped_files)} file(s) holding selected rows that no "
                     "signed manifest record vouches for (run `serve-journal verify`): "
                     + ", ".join(self.skipped_files))
        return text


@dataclass
class _Found:
    """The selected entries of one live data file, with their proofs."""

    path: str
    record: ManifestRecord
    rows: pa.Table
    indices: list[int]
    proofs: list[list[bytes]]


def export_evidence(
    journal: str | JournalStorage,
    out: str | os.PathLike[str],
    *,
    public_key: str | os.PathLike[str] | bytes | Ed25519PublicKey,
    request_ids: Sequence[str] = (),
    subject: str | None = None,
    subject_token: str | None = None,
    tokenizer: Callable[[str], str | None] | None = None,
    since: dt.datetime | str | None = None,
    until: dt.datetime | str | None = None,
    actor: str | None = None,
    verify_scope: str = "journal",
    witness: JournalStorage | None = None,
) -> EvidenceExport:
    """Write the evidence bundle of the selected entries to ``out`` (a new local zip file).

    Select by ``request_ids`` or by one subject: ``subject`` (a raw id, turned into its token
    with ``tokenizer``, e.g. :func:`serve_journal.subject_tokenizer`, and never kept) or
    ``subject_token``; ``since`` (inclusive) and ``until`` (exclusive) bound the entries' time.
    ``public_key`` is the auditor's copy of the journal's key: only records and commit markers
    signed by it are used. ``verify_scope`` (``journal`` or ``files``) says what the bundled
    verify summary covers. ``actor`` (default: the OS user) is recorded in the access log.

    A live file holding selected rows whose bytes and entries no signed record vouches for is
    skipped and named (:attr:`EvidenceExport.skipped_files`, ``skipped_files`` in
    ``evidence.json``). Raises :class:`EvidenceError` when nothing matches, or when only such
    files hold the selection (run ``serve-journal verify``), and ``ValueError`` for a wrong
    selection; the message never holds a subject id.
    """
    started = time.perf_counter()
    storage = journal if isinstance(journal, JournalStorage) else open_storage(journal)
    key = load_public_key(public_key)
    if verify_scope not in VERIFY_SCOPES:
        raise ValueError(f"verify_scope must be one of {VERIFY_SCOPES}, got {verify_scope!r}")
    out = os.fspath(out)
    if os.path.exists(out):
        raise ValueError(f"--out {out} exists already; a bundle is never overwritten")
    ids = list(dict.fromkeys(request_ids))
    if sum((bool(ids), subject is not None, subject_token is not None)) != 1:
        raise ValueError("select by request ids, or by subject or subject_token (exactly one)")
    if any(not isinstance(r, str) or not r for r in ids):
        raise ValueError("request ids must be non-empty strings")
    if subject is not None:
        if tokenizer is None:
            raise ValueError("subject= needs a tokenizer (serve_journal.subject_tokenizer); "
                             "or pass subject_token=")
        subject_token = tokenizer(subject)
        if subject_token is None:
            raise EvidenceError("the subject is unknown or was forgotten: it has no token, so "
                                "the journal holds no entry of it to export")
    if subject_token is not None:
        check_subject_token(subject_token, "subject_token")
    since_utc, until_utc = as_utc(since, "since"), as_utc(until, "until")
    selection: dict[str, Any] = {"request_ids": ids} if ids else {"subject_token": subject_token}
    if since_utc is not None:
        selection["since"] = since_utc.isoformat()
    if until_utc is not None:
        selection["until"] = until_utc.isoformat()

    records = _signed_records_by_file(storage, key)
    found, skipped, scanned = _find(storage, key, records, ids, subject_token, since_utc,
                                    until_utc)
    if not found and skipped:
        raise EvidenceError(
            "the selected entries sit only in file(s) no manifest record covered by a signed "
            "checkpoint vouches for (a writer's last seconds not yet signed, or an altered or "
            "planted file): " + ", ".join(f"{p} ({why})" for p, why in skipped)
            + "; run `serve-journal verify`, or retry after the next checkpoint")
    if not found:
        raise EvidenceError("no live journal entry matches the selection: nothing to export")
    chains = _chain_evidence(storage, key, found)
    summary = _verify_summary(storage, key, found, verify_scope, witness)

    members, entries, file_list = _members(storage, key, found, chains, summary, selection,
                                           actor or getpass.getuser(), verify_scope, skipped)
    data = _zip(members)
    digest = sha256_hex(data)
    filters = {**selection, "purpose": "evidence-export", "bundle_sha256": digest,
               "verify_scope": verify_scope}
    access = record_access(storage, actor=actor or getpass.getuser(), filters=filters,
                           rows=entries, tier="all", files_scanned=scanned,
                           elapsed_ms=(time.perf_counter() - started) * 1000)
    _write_new(out, data)
    return EvidenceExport(path=out, bundle_sha256=digest, entries=entries, files=file_list,
                          chains=tuple(sorted(chains)), members=tuple(sorted(members)),
                          journal_verify_ok=summary.ok, access_record=access.path,
                          skipped_files=tuple(p for p, _ in skipped))


# -- finding the entries -------------------------------------------------------------------------


def _signed_records_by_file(storage: JournalStorage, key: Ed25519PublicKey
                            ) -> dict[tuple[str, str], ManifestRecord]:
    """``(path, sha256) -> record`` for every record covered by a signed checkpoint."""
    out: dict[tuple[str, str], ManifestRecord] = {}
    for record in signed_records(storage, key):
        out.setdefault((record.path, record.sha256), record)
    return out


def _find(storage: JournalStorage, key: Ed25519PublicKey,
          records: dict[tuple[str, str], ManifestRecord], ids: Sequence[str],
          token: str | None, since: dt.datetime | None, until: dt.datetime | None
          ) -> tuple[list[_Found], list[tuple[str, str]], int]:
    """The selected entries of files signed history vouches for; ``(path, reason)`` of the live
    files holding selected rows that it does not (skipped: a planted copy of an entry must not
    block the evidence of the genuine one); the number of files scanned."""
    column, values = ("request_id", list(ids)) if ids else ("subject_token", [token])
    found: list[_Found] = []
    skipped: list[tuple[str, str]] = []
    scanned = 0
    for data_file in live_files(storage, tier="all", cache=MarkerCache(key)):
        if until is not None and data_file.key.start >= until:
            continue
        if since is not None and data_file.key.end <= since:
            continue
        scanned += 1
        index = open_index(storage, data_file.path)
        try:  # statistics and bloom filters rule most files out without reading them
            maybe = any(index.candidates(column, v) for v in values)
        finally:
            index.handle.close()
        if not maybe:
            continue
        hit = _file_evidence(storage, data_file.path, records, column, values, since, until)
        if isinstance(hit, str):
            skipped.append((data_file.path, hit))
        elif hit is not None:
            found.append(hit)
    return found, skipped, scanned


def _file_evidence(storage: JournalStorage, path: str,
                   records: dict[tuple[str, str], ManifestRecord], column: str,
                   values: Sequence[str], since: dt.datetime | None, until: dt.datetime | None
                   ) -> _Found | str | None:
    """The file's selected entries with their proofs; ``None`` when it holds none; the reason
    (``no-signed-record``, ``bytes-not-recorded``, ``merkle-root-mismatch``) when it holds some
    but signed history does not vouch for the file."""
    data = storage.read(path)
    table = decode_parquet(data)  # in file order: the order the Merkle tree is over
    mask = pc.is_in(table.column(column), value_set=pa.array(values, pa.string()))
    if since is not None:
        mask = pc.and_(mask, pc.greater_equal(table.column("ts"), pa.scalar(since, table.schema.field("ts").type)))
    if until is not None:
        mask = pc.and_(mask, pc.less(table.column("ts"), pa.scalar(until, table.schema.field("ts").type)))
    indices = [i for i, hit in enumerate(mask.to_pylist()) if hit]
    if not indices:
        return None
    record = records.get((path, sha256_hex(data)))
    if record is None:
        return ("bytes-not-recorded" if any(p == path for p, _ in records)
                else "no-signed-record")
    hashes = [leaf_hash(leaf) for leaf in table_leaves(table)]
    if len(hashes) != record.row_count or root_from_leaf_hashes(hashes).hex() != record.merkle_root:
        return "merkle-root-mismatch"
    return _Found(path=path, record=record, rows=table.take(indices), indices=indices,
                  proofs=audit_paths(hashes, indices))


def audit_paths(hashes: Sequence[bytes], indices: Iterable[int]) -> list[list[bytes]]:
    """RFC 9162 audit paths (``PATH``) of the leaves at ``indices`` in the tree over the leaf
    hashes ``hashes``; the same as :func:`serve_journal.integrity.merkle.inclusion_proof` for
    each, but the subtree hashes the paths share are computed once."""
    memo: dict[tuple[int, int], bytes] = {}

    def mth(lo: int, hi: int) -> bytes:
        n = hi - lo
        if n == 1:
            return hashes[lo]
        cached = memo.get((lo, hi))
        if cached is not None:
            return cached
        k = 1 << ((n - 1).bit_length() - 1)
        digest = node_hash(mth(lo, lo + k), mth(lo + k, hi))
        if n >= _MEMO_MIN:
            memo[(lo, hi)] = digest
        return digest

    out = []
    for index in indices:
        if not 0 <= index < len(hashes):
            raise ValueError(f"index must be in [0, {len(hashes)}), got {index}")
        path: list[bytes] = []
        lo, hi = 0, len(hashes)
        while hi - lo > 1:  # top-down; PATH lists the siblings bottom-up
            k = 1 << ((hi - lo - 1).bit_length() - 1)
            if index < lo + k:
                path.append(mth(lo + k, hi))
                hi = lo + k
            else:
                path.append(mth(lo, lo + k))
                lo = lo + k
        out.append(path[::-1])
    return out


# -- the chains ----------------------------------------------------------------------------------


@dataclass
class _ChainEvidence:
    chain_id: str
    first: int
    covering: int
    latest: int
    checkpoints: dict[int, bytes]
    records: dict[int, bytes]


def _chain_evidence(storage: JournalStorage, key: Ed25519PublicKey, found: Sequence[_Found]
                    ) -> dict[str, _ChainEvidence]:
    needed: dict[str, list[int]] = defaultdict(list)
    for hit in found:
        needed[hit.record.chain_id].append(hit.record.index)
    out = {}
    for chain_id, indices in sorted(needed.items()):
        valid: dict[int, bytes] = {}
        for path in storage.list_files(f"{CHECKPOINT_PREFIX}/{chain_id}/", ".json"):
            length = parse_object_index(path)
            data = storage.read(path)
            try:
                checkpoint = Checkpoint.from_json(data)
            except ManifestError:
                continue
            if (length is not None and data == checkpoint.to_json() and checkpoint.verify(key)
                    and checkpoint.chain_id == chain_id and checkpoint.length == length):
                valid[length] = data
        first, last = min(indices), max(indices)
        covering = min((n for n in valid if n > last), default=None)
        if covering is None:
            raise EvidenceError(f"manifest chain {chain_id}: no signed checkpoint covers record "
                                f"{last}; run `serve-journal verify`")
        latest = max(valid)
        chosen = {n: valid[n] for n in {covering, latest}}
        records = {i: storage.read(record_path(chain_id, i)) for i in range(first, latest)}
        out[chain_id] = _ChainEvidence(chain_id, first, covering, latest, chosen, records)
    return out


def _verify_summary(storage: JournalStorage, key: Ed25519PublicKey, found: Sequence[_Found],
                    scope: str, witness: JournalStorage | None) -> VerifyReport:
    if scope == "journal":
        return verify_journal(storage, public_key=key, witness=witness)
    report = VerifyReport(journal=storage.uri)
    for hit in found:
        one = verify_file(storage, hit.path, [hit.record])
        report.files += one.files
        report.problems.extend(one.problems)
    report.truncation_excluded = False
    return report


# -- the bundle ----------------------------------------------------------------------------------


def _json_bytes(value: Any) -> bytes:
    return (json.dumps(value, indent=1, sort_keys=True, ensure_ascii=True) + "\n").encode("ascii")


def _members(storage: JournalStorage, key: Ed25519PublicKey, found: Sequence[_Found],
             chains: dict[str, _ChainEvidence], summary: VerifyReport, selection: dict[str, Any],
             actor: str, scope: str, skipped: Sequence[tuple[str, str]] = ()
             ) -> tuple[dict[str, bytes], int, tuple[str, ...]]:
    rows: list[tuple[Any, ...]] = []
    for n, hit in enumerate(found):
        values = hit.rows.select(["ts", "producer_id", "seq"]).to_pylist()
        for j, v in enumerate(values):
            rows.append((v["ts"], v["producer_id"] or "", v["seq"], hit.path, n, j))
    rows.sort()
    tables, proofs = [], []
    for row, (_, _, _, path, n, j) in enumerate(rows):
        hit = found[n]
        tables.append(hit.rows.slice(j, 1))
        record = hit.record
        proofs.append({
            "row": row,
            "request_id": hit.rows.column("request_id")[j].as_py(),
            "file": path,
            "record": f"records/{record.chain_id}/{record.index:012d}.json",
            "index": hit.indices[j],
            "tree_size": record.row_count,
            "audit_path": [p.hex() for p in hit.proofs[j]],
        })
    entries = pa.concat_tables(tables)
    buffer = io.BytesIO()
    pq.write_table(entries, buffer, compression="zstd")
    files = tuple(sorted({hit.path for hit in found}))
    evidence = {
        "format": BUNDLE_FORMAT,
        "exported_at": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "actor": actor,
        "journal": storage.uri,
        "selection": selection,
        "entries": entries.num_rows,
        "files": [{"path": hit.path, "tier": hit.record.tier, "sha256": hit.record.sha256,
                   "row_count": hit.record.row_count, "merkle_root": hit.record.merkle_root,
                   "record": f"records/{hit.record.chain_id}/{hit.record.index:012d}.json"}
                  for hit in sorted(found, key=lambda h: h.path)],
        "chains": [{"chain_id": c.chain_id, "first_record": c.first,
                    "covering_checkpoint": c.covering, "latest_checkpoint": c.latest}
                   for c in chains.values()],
        "verify_scope": scope,
        "skipped_files": [{"path": p, "reason": why} for p, why in skipped],
    }
    members = {
        EVIDENCE: _json_bytes(evidence),
        KEY: _json_bytes({"algorithm": "Ed25519", "fingerprint_sha256": key_fingerprint(key),
                          "key_id": public_key_id(key)}),
        ENTRIES: buffer.getvalue(),
        PROOFS: _json_bytes({"proofs": proofs}),
        VERIFY_JSON: _json_bytes(summary.to_dict()),
        VERIFY_TEXT: (format_report(summary) + "\n").encode("utf-8"),
    }
    for chain in chains.values():
        for index, data in chain.records.items():
            members[f"records/{chain.chain_id}/{index:012d}.json"] = data
        for length, data in chain.checkpoints.items():
            members[f"checkpoints/{chain.chain_id}/{length:012d}.json"] = data
    members[MANIFEST] = render_manifest({n: sha256_hex(d) for n, d in members.items()})
    return members, entries.num_rows, files


def _zip(members: dict[str, bytes]) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", compression=zipfile.ZIP_DEFLATED) as archive:
        for name in [MANIFEST, *sorted(n for n in members if n != MANIFEST)]:
            info = zipfile.ZipInfo(name, date_time=_ZIP_TIME)
            info.compress_type = zipfile.ZIP_DEFLATED
            info.external_attr = 0o644 << 16
            archive.writestr(info, members[name])
    return buffer.getvalue()


def _write_new(path: str, data: bytes) -> None:
    """Write ``data`` to the new file ``path`` (create-only, complete or not at all)."""
    tmp = f"{path}.{os.getpid()}.tmp"
    with open(tmp, "wb") as handle:
        handle.write(data)
        handle.flush()
        os.fsync(handle.fileno())
    try:
        os.link(tmp, path)  # fails if path appeared meanwhile: never overwrite
    finally:
        os.unlink(tmp)
