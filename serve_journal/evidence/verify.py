"""``serve-journal verify-evidence``: check an evidence bundle offline.

Everything is checked from the bundle's bytes and the auditor's own copy of the public key: no
journal, no key vault, no network. This module imports the integrity primitives (Merkle proofs,
manifest records, checkpoints), pyarrow and zipfile, nothing that opens storage.

What holds when :attr:`EvidenceReport.ok` is true:

1. the zip holds only the members a bundle has, under safe names (a ``../x`` or absolute name is
   refused before anything is read; nothing is ever extracted), each listed in ``README.txt``
   with its SHA-256, and ``README.txt`` is exactly the manifest of those members;
2. every checkpoint is canonical and signed by the auditor's key; ``key.json`` names that key;
3. every manifest record is canonical and its ``record_hash`` is the hash of its content; the
   records of each chain are consecutive and hash-linked (``prev_hash``) up to the head hash of a
   signed checkpoint, so each record an entry relies on is covered by a signature; every link is
   checked, so records from two chains of one key do not pass as one; and every record from the
   first the bundle holds up to the newest checkpoint's head is there and linked, so each older
   checkpoint is a prefix of the newest (a hash chain's consistency proof, from the signed data
   alone: ``evidence.json``'s claims are only checked against it);
4. every entry is at the index its proof names in its file, under the Merkle root of the file's
   signed record (RFC 6962 inclusion proof over the entry's leaf, recomputed from the entry);
   as many entries as proofs, no entry twice (not even from two files: an entry's leaf is its
   identity, so its hot and its compacted copy are one decision), each inside the selection
   ``evidence.json`` states.

What it cannot tell: which journal the entries come from (checkpoints name a chain, not a
journal: the key identifies the journal, so use one signing key per journal) and whether a newer
checkpoint exists than the newest in the bundle (:attr:`EvidenceReport.signed_heads` shows its
signed time; compare with the journal's or the witness's).

The exporter's verify run (``verify-summary.json``) is reported, not re-proven: it is the
exporter's unsigned statement about the whole journal.
"""

from __future__ import annotations

import datetime as dt
import io
import json
import os
import zipfile
from collections import defaultdict
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from serve_journal.errors import ManifestError
from serve_journal.evidence.bundle import (
    CHECKPOINT_NAME,
    ENTRIES,
    EVIDENCE,
    FIXED_MEMBERS,
    KEY,
    MANIFEST,
    PROOFS,
    RECORD_NAME,
    VERIFY_JSON,
    parse_manifest,
    render_manifest,
    role_of,
    sha256_hex,
    unsafe_name,
)
from serve_journal.integrity.manifest import (
    GENESIS_HASH,
    Checkpoint,
    ManifestRecord,
    load_public_key,
    parse_object_index,
)
from serve_journal.integrity.merkle import table_leaves, verify_inclusion
from serve_journal.integrity.trust import key_fingerprint

ERROR = "error"
NOTE = "note"

MAX_BUNDLE_BYTES = 4 << 30
"""Largest total uncompressed size a bundle may declare (a zip bomb is refused unread)."""
MAX_MEMBERS = 1_000_000


@dataclass(frozen=True)
class EvidenceProblem:
    """One finding: ``kind`` (e.g. ``inclusion-proof-failed``), the bundle member it concerns."""

    kind: str
    member: str
    detail: str
    severity: str = ERROR

    def line(self) -> str:
        return f"{self.severity.upper()} {self.kind}: {self.member}: {self.detail}"


@dataclass
class EvidenceReport:
    """The outcome of :func:`verify_evidence`; :attr:`ok` only when every proof holds."""

    bundle: str
    problems: list[EvidenceProblem] = field(default_factory=list)
    entries: int = 0
    """Entries proven (inclusion proof against a signed record)."""
    files: int = 0
    records: int = 0
    checkpoints: int = 0
    chains: int = 0
    key_fingerprint: str = ""
    """Fingerprint of the auditor's key the bundle was checked with."""
    selection: dict[str, Any] = field(default_factory=dict)
    exported_at: str = ""
    journal_verify_ok: bool | None = None
    """The exporter's verify run: passed, failed, or ``None`` when unreadable."""
    signed_heads: list[dict[str, Any]] = field(default_factory=list)
    """Per chain, the newest valid checkpoint in the bundle (``chain_id``, ``length``, signed
    ``time``, ``head_hash``): the proof holds as of then. A bundle cut down to an older checkpoint
    is genuine but proves less; compare with the journal's (or its witness's) own checkpoint."""
    stated_journal: str = ""
    """The journal ``evidence.json`` names: the exporter's unsigned statement (checkpoints do not
    name their journal; one signing key per journal makes the key say it)."""
    table: pa.Table | None = field(default=None, repr=False)
    """The entries (only once their proofs hold)."""

    @property
    def errors(self) -> list[EvidenceProblem]:
        return [p for p in self.problems if p.severity == ERROR]

    @property
    def ok(self) -> bool:
        return not self.errors

    def _add(self, kind: str, member: str, detail: str, severity: str = ERROR) -> None:
        self.problems.append(EvidenceProblem(kind, member, detail, severity))

    def to_dict(self) -> dict[str, Any]:
        return {
            "bundle": self.bundle, "ok": self.ok, "entries": self.entries, "files": self.files,
            "records": self.records, "checkpoints": self.checkpoints, "chains": self.chains,
            "key_fingerprint": self.key_fingerprint, "selection": self.selection,
            "exported_at": self.exported_at, "journal_verify_ok": self.journal_verify_ok,
            "signed_heads": self.signed_heads, "stated_journal": self.stated_journal,
            "problems": [p.__dict__ for p in self.problems],
        }

    def describe(self) -> str:
        """Verdict, counts, then one line per problem (errors first)."""
        verdict = "OK" if self.ok else f"FAILED ({len(self.errors)} error(s))"
        lines = [f"evidence {self.bundle}: {verdict}",
                 f"  entries proven {self.entries} in {self.files} file(s); manifest records "
                 f"{self.records} in {self.chains} chain(s); signed checkpoints {self.checkpoints}",
                 f"  key {self.key_fingerprint[:16]}... (the --public-key given)"]
        if self.selection:
            lines.append(f"  selection {json.dumps(self.selection, sort_keys=True)}; "
                         f"exported {self.exported_at}")
        if self.stated_journal:
            lines.append(f"  journal {self.stated_journal} (the exporter's statement, unsigned)")
        lines.extend(f"  signed as of: chain {h['chain_id']} length {h['length']} signed "
                     f"{h['time']} (newest checkpoint in the bundle; compare with the journal's)"
                     for h in self.signed_heads)
        if self.journal_verify_ok is not None:
            lines.append("  exporter's verify run (unsigned statement): "
                         + ("OK" if self.journal_verify_ok else "FAILED, see verify-summary.txt"))
        lines.extend("  " + p.line() for p in
                     sorted(self.problems, key=lambda p: (p.severity != ERROR, p.member, p.kind)))
        return "\n".join(lines)


class _Stop(Exception):
    """The bundle cannot be read further; the report says why."""


def verify_evidence(
    bundle: str | os.PathLike[str] | bytes,
    public_key: str | os.PathLike[str] | bytes | Ed25519PublicKey,
    *,
    max_bytes: int = MAX_BUNDLE_BYTES,
) -> EvidenceReport:
    """Check the evidence bundle ``bundle`` (a zip path, or its bytes) against ``public_key``,
    the auditor's own copy of the journal's Ed25519 public key (PEM path, PEM bytes or key).

    Offline: reads nothing but the bundle. Returns a report; ``report.ok`` is true only when every
    proof holds, and each problem names the member and what is wrong. Never extracts a member.
    """
    key = load_public_key(public_key)
    name = os.fspath(bundle) if not isinstance(bundle, bytes) else "<bytes>"
    report = EvidenceReport(bundle=str(name), key_fingerprint=key_fingerprint(key))
    try:
        source = io.BytesIO(bundle) if isinstance(bundle, bytes) else open(bundle, "rb")  # noqa: SIM115
    except OSError as exc:
        report._add("bundle-unreadable", str(name), f"cannot open: {exc.strerror or exc}")
        return report
    try:
        with source, zipfile.ZipFile(source) as archive:
            members = _read_members(archive, report, max_bytes)
            _check(members, key, report)
    except zipfile.BadZipFile as exc:
        report._add("bundle-unreadable", str(name), f"not a readable zip file ({exc})")
    except _Stop:
        pass
    return report


def _read_members(archive: zipfile.ZipFile, report: EvidenceReport, max_bytes: int
                  ) -> dict[str, bytes]:
    infos = archive.infolist()
    names = [i.filename for i in infos]
    unsafe = [n for n in names if unsafe_name(n)]
    if unsafe:
        report._add("unsafe-member-name", unsafe[0],
                    f"{len(unsafe)} member name(s) could write outside a folder or hide as "
                    "another name (absolute, '..', backslash): bundle refused, nothing extracted")
        raise _Stop
    if len(set(names)) != len(names):
        twice = sorted({n for n in names if names.count(n) > 1})
        report._add("member-duplicated", twice[0], "the zip holds this name more than once")
        raise _Stop
    if len(infos) > MAX_MEMBERS or sum(i.file_size for i in infos) > max_bytes:
        report._add("bundle-too-large", "(zip)", f"declares more than {max_bytes} bytes or "
                    f"{MAX_MEMBERS} members: refused unread")
        raise _Stop
    members: dict[str, bytes] = {}
    for info in infos:
        if info.is_dir():
            report._add("member-unexpected", info.filename, "a bundle holds no folders")
            continue
        try:
            members[info.filename] = archive.read(info)
        except (zipfile.BadZipFile, OSError, EOFError) as exc:  # CRC or stream damage
            report._add("member-unreadable", info.filename, f"damaged in the zip ({exc})")
    return members


def _check(members: dict[str, bytes], key: Ed25519PublicKey, report: EvidenceReport) -> None:
    _check_listing(members, report)
    evidence = _json_member(members, EVIDENCE, report)
    if evidence is not None:
        report.selection = dict(evidence.get("selection") or {})
        report.exported_at = str(evidence.get("exported_at", ""))
        report.stated_journal = str(evidence.get("journal", ""))
    _check_key(members, report)
    checkpoints = _check_checkpoints(members, key, report)
    records = _check_records(members, report)
    proven = _check_chains(records, checkpoints, evidence, report)
    _check_entries(members, records, proven, evidence, report)
    summary = _json_member(members, VERIFY_JSON, report)
    if summary is not None:
        report.journal_verify_ok = bool(summary.get("ok")) if "ok" in summary else None
        if report.journal_verify_ok is False:
            report._add("journal-verify-failed", VERIFY_JSON,
                        "the exporter's verify run found errors (see verify-summary.txt); the "
                        "entries' own proofs are checked above", NOTE)


def _check_listing(members: Mapping[str, bytes], report: EvidenceReport) -> None:
    if MANIFEST not in members:
        report._add("member-missing", MANIFEST, "the bundle's manifest is missing")
        listed: dict[str, str] = {}
    else:
        listed = parse_manifest(members[MANIFEST])
    present = {n: sha256_hex(d) for n, d in members.items() if n != MANIFEST}
    for name in sorted(set(present) | set(listed)):
        if role_of(name) is None:
            report._add("member-unexpected", name, "not a member an evidence bundle holds")
        elif name not in present:
            report._add("member-missing", name, f"listed in {MANIFEST} but not in the zip")
        elif name not in listed:
            if MANIFEST in members:
                report._add("member-unlisted", name, f"in the zip but not listed in {MANIFEST}")
        elif present[name] != listed[name]:
            report._add("member-altered", name, f"its SHA-256 is {present[name][:16]}..., "
                        f"{MANIFEST} lists {listed[name][:16]}...")
    for name in FIXED_MEMBERS:
        if name not in present and name not in listed:
            report._add("member-missing", name, "every bundle holds it")
    if MANIFEST in members and members[MANIFEST] != render_manifest(
            {n: h for n, h in present.items() if role_of(n) is not None}):
        report._add("manifest-altered", MANIFEST,
                    "not the manifest of the bundle's members (its text was changed)")


def _json_member(members: Mapping[str, bytes], name: str, report: EvidenceReport
                 ) -> dict[str, Any] | None:
    if name not in members:
        return None
    try:
        value = json.loads(members[name])
    except (ValueError, UnicodeDecodeError):
        report._add("member-unreadable", name, "not valid JSON")
        return None
    if not isinstance(value, dict):
        report._add("member-unreadable", name, "not a JSON object")
        return None
    return value


def _check_key(members: Mapping[str, bytes], report: EvidenceReport) -> None:
    doc = _json_member(members, KEY, report)
    if doc is None:
        return
    stated = str(doc.get("fingerprint_sha256", ""))
    if stated != report.key_fingerprint:
        report._add("key-mismatch", KEY, (
            f"the bundle was exported for key {stated[:16]}..., the --public-key given is "
            f"{report.key_fingerprint[:16]}...: check with the journal's key, obtained out of band"))


def _check_checkpoints(members: Mapping[str, bytes], key: Ed25519PublicKey,
                       report: EvidenceReport) -> dict[str, dict[int, Checkpoint]]:
    """Valid checkpoints by chain and length: canonical, signed by ``key``, at their name."""
    out: dict[str, dict[int, Checkpoint]] = defaultdict(dict)
    for name, data in sorted(members.items()):
        match = CHECKPOINT_NAME.match(name)
        if not match:
            continue
        chain_id, length = match.group(1).split("/")[0], parse_object_index(name)
        try:
            checkpoint = Checkpoint.from_json(data)
        except ManifestError as exc:
            report._add("checkpoint-unreadable", name, str(exc))
            continue
        if data != checkpoint.to_json():
            report._add("checkpoint-altered", name, "not the bytes its writer stored "
                        "(checkpoints are canonical JSON)")
            continue
        if not checkpoint.verify(key):
            report._add("checkpoint-bad-signature", name, (
                "signature does not verify under the auditor's public key (signed as key id "
                f"{checkpoint.key_id!r})"))
            continue
        if checkpoint.chain_id != chain_id or checkpoint.length != length:
            report._add("checkpoint-misplaced", name, (
                f"signs chain {checkpoint.chain_id!r} length {checkpoint.length}"))
            continue
        out[chain_id][checkpoint.length] = checkpoint
        report.checkpoints += 1
    return out


def _check_records(members: Mapping[str, bytes], report: EvidenceReport
                   ) -> dict[str, dict[int, ManifestRecord]]:
    """Records whose bytes are canonical and whose hash is their content's, by chain and index."""
    out: dict[str, dict[int, ManifestRecord]] = defaultdict(dict)
    for name, data in sorted(members.items()):
        match = RECORD_NAME.match(name)
        if not match:
            continue
        chain_id, index = match.group(1).split("/")[0], parse_object_index(name)
        try:
            record, canonical, hash_ok = ManifestRecord.from_json_checked(data)
        except (ManifestError, TypeError) as exc:
            report._add("manifest-record-unreadable", name, str(exc))
            continue
        if not canonical:
            report._add("manifest-record-altered", name,
                        "not the bytes its writer stored (records are canonical JSON)")
            continue
        if not hash_ok:
            report._add("manifest-record-altered", name,
                        "content does not match its record_hash (edited after writing)")
            continue
        if record.chain_id != chain_id or record.index != index:
            report._add("manifest-record-misplaced", name,
                        f"record says chain {record.chain_id!r} index {record.index}")
            continue
        out[chain_id][index] = record
        report.records += 1
    return out


def _record_name(chain_id: str, index: int) -> str:
    return f"records/{chain_id}/{index:012d}.json"


def _checkpoint_name(chain_id: str, length: int) -> str:
    return f"checkpoints/{chain_id}/{length:012d}.json"


def _check_chains(records: Mapping[str, Mapping[int, ManifestRecord]],
                  checkpoints: Mapping[str, Mapping[int, Checkpoint]],
                  evidence: Mapping[str, Any] | None, report: EvidenceReport
                  ) -> dict[str, set[int]]:
    """Indices of each chain's records that hash-link to the head of a valid signed checkpoint."""
    proven: dict[str, set[int]] = {}
    for chain_id in sorted(set(records) | set(checkpoints)):
        by_index = records.get(chain_id, {})
        signed = checkpoints.get(chain_id, {})
        chain_proven: set[int] = set()
        for length, checkpoint in sorted(signed.items()):
            if length == 0:
                if checkpoint.head_hash != GENESIS_HASH:
                    report._add("checkpoint-misplaced", _checkpoint_name(chain_id, 0),
                                "a length-0 checkpoint must sign the genesis hash")
                continue
            head = by_index.get(length - 1)
            if head is None:
                report._add("checkpoint-unlinked", _checkpoint_name(chain_id, length),
                            f"the bundle lacks record {length - 1}, the head this checkpoint signs")
                continue
            if head.record_hash != checkpoint.head_hash:
                report._add("manifest-rewritten", _record_name(chain_id, length - 1),
                            f"not the head hash checkpoint {length} signed")
                continue
            index = length - 1
            chain_proven.add(index)
            # Down to the first record held, checking every link, also the one into records an
            # earlier checkpoint proved: two signed halves from two chains of one key (another
            # journal's chain of the same id) do not make one chain.
            while index - 1 in by_index:
                if by_index[index].prev_hash != by_index[index - 1].record_hash:
                    report._add("manifest-chain-broken", _record_name(chain_id, index),
                                "prev_hash does not match the previous record's hash")
                    break
                index -= 1
                if index in chain_proven:
                    break
                chain_proven.add(index)
        for index in sorted(set(by_index) - chain_proven):
            report._add("record-unsigned", _record_name(chain_id, index),
                        "no signed checkpoint in the bundle covers this record through the chain")
        proven[chain_id] = chain_proven
    report.chains = len(proven)
    for claim in (evidence or {}).get("chains", []) or []:
        if not isinstance(claim, dict):
            continue
        chain_id = str(claim.get("chain_id", ""))
        for what in ("covering_checkpoint", "latest_checkpoint"):
            length = claim.get(what)
            if isinstance(length, int) and length not in checkpoints.get(chain_id, {}):
                report._add("checkpoint-missing", _checkpoint_name(chain_id, length),
                            f"{EVIDENCE} names it as the {what.replace('_', ' ')}, but the bundle "
                            "holds no valid checkpoint of that length")
    # Consistency from the signed data alone (evidence.json is unsigned): every record from the
    # first one the bundle holds up to the head of its newest valid checkpoint links to that
    # checkpoint, so every older checkpoint in the bundle is a prefix of the newest.
    for chain_id, chain_proven in proven.items():
        by_index = records.get(chain_id, {})
        signed = checkpoints.get(chain_id, {})
        if not by_index or not signed:
            continue
        first, latest = min(by_index), max(signed)
        gaps = [i for i in range(first, latest) if i not in chain_proven]
        if gaps:
            report._add("consistency-unproven", _record_name(chain_id, gaps[0]), (
                f"{len(gaps)} record(s) between the first record in the bundle ({first}) and "
                f"the newest checkpoint ({latest}) are missing or do not link to it"))
        head = signed[latest]
        report.signed_heads.append({"chain_id": chain_id, "length": latest, "time": head.time,
                                    "head_hash": head.head_hash})
    return proven


def _check_entries(members: Mapping[str, bytes],
                   records: Mapping[str, Mapping[int, ManifestRecord]],
                   proven: Mapping[str, set[int]], evidence: Mapping[str, Any] | None,
                   report: EvidenceReport) -> None:
    if ENTRIES not in members or PROOFS not in members:
        return
    try:
        table = pq.ParquetFile(pa.BufferReader(members[ENTRIES])).read()
        leaves = table_leaves(table)
    except Exception as exc:  # any damage to the Parquet bytes: named, never a traceback
        report._add("entries-unreadable", ENTRIES, f"not a readable entries file ({type(exc).__name__})")
        return
    doc = _json_member(members, PROOFS, report)
    if doc is None:
        return
    proofs = doc.get("proofs")
    if not isinstance(proofs, list):
        report._add("member-unreadable", PROOFS, "has no 'proofs' list")
        return
    stated = (evidence or {}).get("entries")
    if len(proofs) != table.num_rows or (isinstance(stated, int) and stated != table.num_rows):
        report._add("entry-count-mismatch", ENTRIES, (
            f"holds {table.num_rows} entries, {PROOFS} proves {len(proofs)}, {EVIDENCE} states "
            f"{stated}: an entry was removed or added"))
    request_ids = table.column("request_id").to_pylist() if "request_id" in table.column_names \
        else [None] * table.num_rows
    seen: dict[tuple[str, int], int] = {}
    same: dict[bytes, int] = {}  # leaf -> row: an entry's bytes are its identity across files
    files: set[str] = set()
    for row in range(min(len(proofs), table.num_rows)):
        proof = proofs[row]
        where = f"{ENTRIES} row {row} (request_id {request_ids[row]})"
        if not isinstance(proof, dict) or proof.get("row") != row:
            report._add("proof-unreadable", PROOFS, f"proof {row} is not the proof of row {row}")
            continue
        if proof.get("request_id") != request_ids[row]:
            report._add("proof-mismatch", where, (
                f"its proof is for request_id {proof.get('request_id')}: proofs swapped or "
                "entries reordered"))
        ref = str(proof.get("record", ""))
        match = RECORD_NAME.match(ref)
        chain_id, index = (match.group(1).split("/")[0], parse_object_index(ref)) if match \
            else ("", None)
        record = records.get(chain_id, {}).get(index) if index is not None else None
        if record is None:
            report._add("record-missing", where, f"its proof names record {ref!r}, which the "
                        "bundle does not hold intact")
            continue
        if index not in proven.get(chain_id, set()):
            report._add("record-unsigned", where, f"its record {ref} is not covered by a signed "
                        "checkpoint")
            continue
        if record.path != proof.get("file"):
            report._add("proof-mismatch", where, f"its proof names file {proof.get('file')!r}, "
                        f"its record {ref} is of {record.path}")
            continue
        position = proof.get("index")
        try:
            path = [bytes.fromhex(h) for h in proof.get("audit_path", [])]
            root = bytes.fromhex(record.merkle_root)
        except (TypeError, ValueError):
            report._add("proof-unreadable", where, "audit path or root is not hex")
            continue
        if proof.get("tree_size") != record.row_count or not verify_inclusion(
                leaves[row], position, record.row_count, path, root):
            report._add("inclusion-proof-failed", where, (
                f"not entry {position} of {record.path} under the Merkle root its signed record "
                f"{ref} holds (entry altered, forged, or its proof swapped)"))
            continue
        if (record.path, position) in seen or leaves[row] in same:
            twin = seen.get((record.path, position), same.get(leaves[row]))
            report._add("entry-duplicated", where, f"the same entry as row {twin} (one "
                        "decision proven twice, e.g. from its hot and its compacted file)")
            continue
        seen[record.path, position] = row
        same[leaves[row]] = row
        outside = _outside_selection(table, row, report.selection)
        if outside:
            report._add("entry-outside-selection", where, outside)
            continue
        files.add(record.path)
        report.entries += 1
    report.files = len(files)
    if report.ok:
        report.table = table


def _outside_selection(table: pa.Table, row: int, selection: Mapping[str, Any]) -> str | None:
    """Why entry ``row`` is not one the stated selection picks, or ``None``."""
    values = table.slice(row, 1).to_pylist()[0]
    wanted_ids = selection.get("request_ids")
    if wanted_ids is not None and values.get("request_id") not in wanted_ids:
        return "its request_id is not one of the selection's"
    token = selection.get("subject_token")
    if token is not None and values.get("subject_token") != token:
        return "its subject token is not the selection's"
    ts = values.get("ts")
    if not isinstance(ts, dt.datetime):
        return None
    if ts.tzinfo is None:
        ts = ts.replace(tzinfo=dt.UTC)
    for bound in ("since", "until"):
        text = selection.get(bound)
        if not text:
            continue
        try:
            limit = dt.datetime.fromisoformat(str(text))
        except ValueError:
            return f"the selection's {bound} is not an ISO time"
        if limit.tzinfo is None:
            limit = limit.replace(tzinfo=dt.UTC)
        if (ts < limit) if bound == "since" else (ts >= limit):
            return f"its time is outside the selection's {bound}"
    return None
