"""Evidence bundles (issue 18 items 1 and 2): export from a signed journal, check offline.

The journal is written the writer's way (``write_signed``: files recorded in a signed chain),
locally, on S3 (moto) and after compaction and lifecycle. The attacker holds the bundle and
whatever the journal's bucket holds, but not the signing key: every test changes the bundle
one way and asserts that ``verify-evidence`` fails and names what is wrong.
"""

from __future__ import annotations

import ast
import dataclasses
import datetime as dt
import io
import json
import os
import shutil
import uuid
import zipfile
from pathlib import Path
from urllib.parse import urlparse

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from click.testing import CliRunner

from serve_journal.catalog import live_files
from serve_journal.cli import main
from serve_journal.config import JournalConfig
from serve_journal.evidence.bundle import MANIFEST, render_manifest, sha256_hex
from serve_journal.evidence.export import EvidenceError, audit_paths, export_evidence
from serve_journal.evidence.verify import verify_evidence
from serve_journal.fileformat import decode_parquet
from serve_journal.integrity.encoding import canonical_encode
from serve_journal.integrity.manifest import Checkpoint, ManifestRecord, ManifestSigner
from serve_journal.integrity.merkle import (
    inclusion_proof,
    leaf_hash,
    merkle_root,
    table_leaves,
)
from serve_journal.privacy.keyring import Keyring
from serve_journal.privacy.subjects import VaultPseudonymizer
from serve_journal.privacy.vault import SubjectVault
from serve_journal.read.access_log import read_access_log
from serve_journal.sink.settings import SinkSettings
from tests.helpers.entries import DAY, make_entries, token
from tests.helpers.journal import signing_key_files, write_signed

LATER = DAY + dt.timedelta(days=2)


@dataclasses.dataclass
class Journal:
    root: str
    storage: object
    public: Path
    key_file: Path
    table: pa.Table
    tmp: Path


@pytest.fixture
def journal(tmp_path) -> Journal:
    """A signed local journal: chain w00 signed at 4 records, then grown and signed again at
    7, so a bundle of its first entries has a covering checkpoint before the latest one."""
    key_file, public = signing_key_files(tmp_path)
    root = str(tmp_path / "journal")
    settings = SinkSettings(root, signing_key_file=str(key_file))
    storage = settings.storage()
    first = make_entries(120, spread_s=2 * 3600)
    later = make_entries(60, start=DAY + dt.timedelta(hours=5), spread_s=3600, producer="p-2")
    write_signed(settings, storage, "w00", first, files=3)
    write_signed(settings, storage, "w00", later, files=3)
    return Journal(root, storage, public, key_file, pa.concat_tables([first, later]), tmp_path)


def _rid(table: pa.Table, row: int) -> str:
    return table["request_id"][row].as_py()


def _export(j: Journal, name: str = "bundle.zip", **selection) -> Path:
    out = j.tmp / name
    selection.setdefault("request_ids", [_rid(j.table, 3), _rid(j.table, 50)])
    export_evidence(j.storage, out, public_key=str(j.public), actor="examiner-test", **selection)
    return out


def _members(bundle: Path) -> dict[str, bytes]:
    with zipfile.ZipFile(bundle) as archive:
        return {n: archive.read(n) for n in archive.namelist()}


def _rezip(members: dict[str, bytes], out: Path, *, fix_manifest: bool = True) -> Path:
    """The attacker's bundle: ``members`` zipped again, the manifest recomputed over them
    (unless ``fix_manifest`` is false), so only the proofs themselves can tell."""
    members = dict(members)
    if fix_manifest:
        members[MANIFEST] = render_manifest(
            {n: sha256_hex(d) for n, d in members.items() if n != MANIFEST})
    with zipfile.ZipFile(out, "w") as archive:
        for name, data in members.items():
            archive.writestr(zipfile.ZipInfo(name), data)
    return out


def _kinds(report) -> set[str]:
    return {p.kind for p in report.errors}


def _named(report, kind: str) -> list[str]:
    return [p.member for p in report.errors if p.kind == kind]


def _flip(data: bytes, at: int) -> bytes:
    out = bytearray(data)
    out[at] ^= 0x01
    return bytes(out)


# -- the clean path ------------------------------------------------------------------------------


def test_a_clean_bundle_verifies_from_the_cli_and_the_api(journal, tmp_path):
    out = tmp_path / "cli.zip"
    rids = [_rid(journal.table, 3), _rid(journal.table, 130)]
    runner = CliRunner()
    made = runner.invoke(main, ["evidence", "--journal", journal.root, "--request-id", rids[0],
                                "--request-id", rids[1], "--out", str(out),
                                "--public-key", str(journal.public), "--as", "examiner"])
    assert made.exit_code == 0, made.output
    assert "2 entries from 2 file(s)" in made.output and "verify summary OK" in made.output
    checked = runner.invoke(main, ["verify-evidence", str(out), "--public-key",
                                   str(journal.public), "--show"])
    assert checked.exit_code == 0, checked.output
    assert ": OK" in checked.output and all(r in checked.output for r in rids)

    report = verify_evidence(out, journal.public)
    assert report.ok, report.describe()
    assert report.entries == 2 and report.files == 2 and report.chains == 1
    assert sorted(report.table["request_id"].to_pylist()) == sorted(rids)
    members = _members(out)
    evidence = json.loads(members["evidence.json"])
    assert evidence["chains"] == [{"chain_id": "w00", "first_record": 0,
                                   "covering_checkpoint": 7, "latest_checkpoint": 7}]
    early = _members(_export(journal, "early.zip"))  # entries of records 0 and 1
    assert {"checkpoints/w00/000000000004.json", "checkpoints/w00/000000000007.json"} <= set(early)
    assert {n for n in early if n.startswith("records/")} == {
        f"records/w00/{i:012d}.json" for i in range(7)}
    assert json.loads(early["evidence.json"])["chains"] == [
        {"chain_id": "w00", "first_record": 0, "covering_checkpoint": 4, "latest_checkpoint": 7}]
    assert json.loads(members["verify-summary.json"])["ok"] is True
    readme = members[MANIFEST].decode()
    for name, data in members.items():  # every member listed with its SHA-256
        if name != MANIFEST:
            assert f"{sha256_hex(data)}  {name}" in readme
    # the same evidence gives the same entries, proofs and records (the bundle is reproducible
    # but for its export time)
    again = _members(_export(journal, "again.zip", request_ids=rids))
    assert {n: d for n, d in again.items() if n.startswith(("records/", "checkpoints/"))} == \
        {n: d for n, d in members.items() if n.startswith(("records/", "checkpoints/"))}
    assert again["proofs.json"] == members["proofs.json"]


def test_audit_paths_are_the_rfc_inclusion_proofs():
    for size in (1, 2, 3, 5, 8, 13, 64, 65, 130):
        leaves = [f"leaf {i}".encode() for i in range(size)]
        hashes = [leaf_hash(x) for x in leaves]
        assert audit_paths(hashes, range(size)) == [inclusion_proof(leaves, i) for i in range(size)]


def test_export_refuses_what_it_cannot_prove(journal, tmp_path):
    with pytest.raises(EvidenceError, match="no live journal entry matches"):
        export_evidence(journal.storage, tmp_path / "none.zip", public_key=str(journal.public),
                        request_ids=["no-such-request"], actor="t")
    with pytest.raises(ValueError, match="exactly one"):
        export_evidence(journal.storage, tmp_path / "x.zip", public_key=str(journal.public),
                        request_ids=["a"], subject_token=token("a"), actor="t")
    out = _export(journal)
    with pytest.raises(ValueError, match="never overwritten"):
        _export(journal)
    assert out.exists()
    # an altered data file: its bytes match no signed record, so no proof is made from it
    other = tmp_path / "altered"
    shutil.copytree(journal.root, other / "journal")
    victim = next(f.path for f in live_files(journal.storage))
    path = other / "journal" / victim
    table = decode_parquet(path.read_bytes())
    pq.write_table(table, path)
    from serve_journal.storage import open_storage

    altered = open_storage(str(other / "journal"))
    result = export_evidence(altered, tmp_path / "alt.zip", public_key=str(journal.public),
                             subject_token=table["subject_token"][0].as_py(), actor="t")
    assert result.skipped_files == (victim,) and victim not in result.files  # named, not used
    only_there = table["request_id"].to_pylist()[:1]  # a request's entry is in one file
    with pytest.raises(EvidenceError, match=r"no manifest record covered by a signed checkpoint "
                                            r"vouches for .*bytes-not-recorded"):
        export_evidence(altered, tmp_path / "alt2.zip", public_key=str(journal.public),
                        request_ids=only_there, actor="t")


# -- the attacker --------------------------------------------------------------------------------


def test_any_single_byte_changed_in_any_member_fails(journal, tmp_path):
    members = _members(_export(journal))
    for name, data in members.items():
        for at in sorted({0, len(data) // 2, len(data) - 1}):
            bad = _rezip({**members, name: _flip(data, at)}, tmp_path / "flip.zip",
                         fix_manifest=False)
            report = verify_evidence(bad, journal.public)
            assert not report.ok, (name, at)
            assert name in {p.member for p in report.errors}, (name, at, report.describe())


@pytest.mark.parametrize("target", ["entries", "proof", "record", "checkpoint", "key"])
def test_a_change_with_the_manifest_recomputed_still_fails(journal, tmp_path, target):
    members = _members(_export(journal))
    if target == "entries":  # an entry's decision changed: its leaf no longer proves
        table = pq.read_table(io.BytesIO(members["entries.parquet"]))
        decisions = table["decision"].to_pylist()
        decisions[0] = "allow" if decisions[0] == "block" else "block"
        table = table.set_column(table.schema.get_field_index("decision"), "decision",
                                 pa.array(decisions, pa.string()))
        buffer = io.BytesIO()
        pq.write_table(table, buffer)
        members["entries.parquet"], expected = buffer.getvalue(), "inclusion-proof-failed"
    elif target == "proof":
        proofs = json.loads(members["proofs.json"])
        first = proofs["proofs"][0]["audit_path"][0]
        proofs["proofs"][0]["audit_path"][0] = ("0" if first[0] != "0" else "1") + first[1:]
        members["proofs.json"], expected = json.dumps(proofs).encode(), "inclusion-proof-failed"
    elif target == "record":  # one byte of a record: not canonical, or not its hash
        name = "records/w00/000000000003.json"
        members[name] = members[name].replace(b'"tier":"hot"', b'"tier":"hoT"')
        expected = "manifest-record-altered"
    elif target == "checkpoint":
        name = "checkpoints/w00/000000000004.json"
        members[name] = members[name].replace(b'"length":4', b'"length":5')
        expected = "checkpoint-bad-signature"
    else:
        doc = json.loads(members["key.json"])
        doc["fingerprint_sha256"] = "0" * 64
        members["key.json"], expected = json.dumps(doc).encode(), "key-mismatch"
    report = verify_evidence(_rezip(members, tmp_path / "fixed.zip"), journal.public)
    assert expected in _kinds(report), report.describe()


def test_an_entry_removed_fails(journal, tmp_path):
    members = _members(_export(journal))
    table = pq.read_table(io.BytesIO(members["entries.parquet"]))
    buffer = io.BytesIO()
    pq.write_table(table.slice(1), buffer)
    members["entries.parquet"] = buffer.getvalue()
    report = verify_evidence(_rezip(members, tmp_path / "removed.zip"), journal.public)
    assert _named(report, "entry-count-mismatch") == ["entries.parquet"], report.describe()
    assert "an entry was removed or added" in report.describe()
    # and its proof removed too: the exporter's stated count still differs
    proofs = json.loads(members["proofs.json"])
    proofs["proofs"] = [dict(p, row=p["row"] - 1) for p in proofs["proofs"][1:]]
    members["proofs.json"] = json.dumps(proofs).encode()
    report = verify_evidence(_rezip(members, tmp_path / "removed2.zip"), journal.public)
    assert "entry-count-mismatch" in _kinds(report), report.describe()


def _forge_entry(journal: Journal, members: dict[str, bytes]) -> tuple[dict[str, bytes], str]:
    """Add a forged entry to the first entry's file: appended to the file's entries, the
    file's Merkle root recomputed over them, put in its manifest record, the record's hash
    recomputed; the proof, the count and the manifest updated. Only the signature cannot be."""
    proofs = json.loads(members["proofs.json"])
    first = proofs["proofs"][0]
    file_table = decode_parquet(journal.storage.read(first["file"]))
    forged = file_table.slice(0, 1).to_pylist()[0]
    forged.update(request_id="forged-request", decision="allow", seq=10_000)
    forged_table = pa.Table.from_pylist([forged], schema=file_table.schema)
    leaves = table_leaves(file_table) + table_leaves(forged_table)
    record = ManifestRecord.from_json(members[first["record"]])
    record = dataclasses.replace(record, merkle_root=merkle_root(leaves).hex(),
                                 row_count=len(leaves), record_hash="")
    record = dataclasses.replace(record, record_hash=record.compute_hash())
    members[first["record"]] = record.to_json()
    entries = pq.read_table(io.BytesIO(members["entries.parquet"]))
    entries = pa.concat_tables([entries, forged_table.cast(entries.schema)])
    buffer = io.BytesIO()
    pq.write_table(entries, buffer)
    members["entries.parquet"] = buffer.getvalue()
    for proof in proofs["proofs"]:
        if proof["record"] == first["record"]:
            proof["tree_size"] = len(leaves)
    proofs["proofs"].append({
        "row": entries.num_rows - 1, "request_id": "forged-request", "file": first["file"],
        "record": first["record"], "index": len(leaves) - 1, "tree_size": len(leaves),
        "audit_path": [p.hex() for p in inclusion_proof(leaves, len(leaves) - 1)]})
    members["proofs.json"] = json.dumps(proofs).encode()
    evidence = json.loads(members["evidence.json"])
    evidence["entries"] = entries.num_rows
    evidence["selection"]["request_ids"].append("forged-request")
    members["evidence.json"] = json.dumps(evidence).encode()
    return members, first["record"]


def test_an_entry_added_with_a_recomputed_but_unsigned_root_fails(journal, tmp_path):
    members, record_name = _forge_entry(journal, _members(_export(journal)))
    report = verify_evidence(_rezip(members, tmp_path / "forged.zip"), journal.public)
    assert not report.ok
    index = int(record_name.rsplit("/", 1)[1][:12])
    # the next record's prev_hash no longer matches the forged record's hash
    assert _named(report, "manifest-chain-broken") == [f"records/w00/{index + 1:012d}.json"], \
        report.describe()
    assert any("forged-request" in m for m in _named(report, "record-unsigned")), report.describe()


def test_an_entry_proven_by_a_forged_chain_fails(journal, tmp_path):
    members = _members(_export(journal))
    forger = ManifestSigner.generate()
    proofs = json.loads(members["proofs.json"])
    first = proofs["proofs"][0]
    record = ManifestRecord.from_json(members[first["record"]])
    record = dataclasses.replace(record, chain_id="forged", index=0, prev_hash="0" * 64,
                                 record_hash="")
    record = dataclasses.replace(record, record_hash=record.compute_hash())
    members["records/forged/000000000000.json"] = record.to_json()
    unsigned = Checkpoint(chain_id="forged", length=1, head_hash=record.record_hash,
                          time="2025-03-04T00:00:00+00:00", key_id=forger.key_id)
    import base64

    signature = base64.b64encode(forger.sign(unsigned.signed_bytes())).decode()
    members["checkpoints/forged/000000000001.json"] = dataclasses.replace(
        unsigned, signature=signature).to_json()
    first["record"] = "records/forged/000000000000.json"
    members["proofs.json"] = json.dumps(proofs).encode()
    report = verify_evidence(_rezip(members, tmp_path / "chain.zip"), journal.public)
    assert _named(report, "checkpoint-bad-signature") == ["checkpoints/forged/000000000001.json"]
    assert "record-unsigned" in _kinds(report), report.describe()


def test_a_proof_swapped_between_two_entries_fails(journal, tmp_path):
    members = _members(_export(journal))
    proofs = json.loads(members["proofs.json"])
    a, b = proofs["proofs"][0], proofs["proofs"][1]
    for field_name in ("file", "record", "index", "tree_size", "audit_path"):
        a[field_name], b[field_name] = b[field_name], a[field_name]
    members["proofs.json"] = json.dumps(proofs).encode()
    report = verify_evidence(_rezip(members, tmp_path / "swapped.zip"), journal.public)
    failed = _named(report, "inclusion-proof-failed")
    assert len(failed) == 2 and failed[0].startswith("entries.parquet row 0"), report.describe()
    # the whole proof objects swapped: each names the other entry's request
    a, b = proofs["proofs"][0], proofs["proofs"][1]
    proofs["proofs"][0], proofs["proofs"][1] = dict(b, row=0), dict(a, row=1)
    members["proofs.json"] = json.dumps(proofs).encode()
    report = verify_evidence(_rezip(members, tmp_path / "swapped2.zip"), journal.public)
    assert len(_named(report, "proof-mismatch")) == 2, report.describe()


def test_a_checkpoint_signed_by_another_key_fails(journal, tmp_path):
    members = _members(_export(journal))
    other = ManifestSigner.generate()
    name = "checkpoints/w00/000000000004.json"
    genuine = Checkpoint.from_json(members[name])
    import base64

    unsigned = dataclasses.replace(genuine, key_id=other.key_id, signature="")
    resigned = dataclasses.replace(unsigned, signature=base64.b64encode(
        other.sign(unsigned.signed_bytes())).decode())
    members[name] = resigned.to_json()
    report = verify_evidence(_rezip(members, tmp_path / "other.zip"), journal.public)
    assert _named(report, "checkpoint-bad-signature") == [name], report.describe()
    assert "checkpoint-missing" in _kinds(report)  # evidence.json names it as the covering one
    assert repr(other.key_id) in report.describe()


def test_the_public_key_of_another_key_fails(journal, tmp_path):
    bundle = _export(journal)
    other = tmp_path / "other.pub.pem"
    other.write_bytes(ManifestSigner.generate().export_public_key())
    result = CliRunner().invoke(main, ["verify-evidence", str(bundle), "--public-key", str(other)])
    assert result.exit_code == 1, result.output
    assert "ERROR key-mismatch: key.json" in result.output
    assert "checkpoint-bad-signature" in result.output


@pytest.mark.parametrize("head", [False, True])
def test_a_manifest_record_edited_with_its_hash_recomputed_fails(journal, tmp_path, head):
    members = _members(_export(journal))
    index = 6 if head else 2
    name = f"records/w00/{index:012d}.json"
    record = ManifestRecord.from_json(members[name])
    record = dataclasses.replace(record, row_count=record.row_count + 1, record_hash="")
    members[name] = dataclasses.replace(record, record_hash=record.compute_hash()).to_json()
    report = verify_evidence(_rezip(members, tmp_path / "edited.zip"), journal.public)
    if head:
        assert _named(report, "manifest-rewritten") == [name], report.describe()
    else:
        assert _named(report, "manifest-chain-broken") == [f"records/w00/{index + 1:012d}.json"]
        assert name in _named(report, "record-unsigned"), report.describe()


@pytest.mark.parametrize("victim", ["entries.parquet", "proofs.json", "key.json",
                                   "records/w00/000000000005.json",
                                   "checkpoints/w00/000000000007.json"])
def test_a_bundle_member_missing_fails(journal, tmp_path, victim):
    members = _members(_export(journal))
    del members[victim]
    report = verify_evidence(_rezip(members, tmp_path / "missing.zip", fix_manifest=False),
                             journal.public)
    assert _named(report, "member-missing") == [victim], report.describe()
    # the manifest recomputed without it: the proofs it carried are missing all the same
    report = verify_evidence(_rezip(members, tmp_path / "missing2.zip"), journal.public)
    assert not report.ok, report.describe()
    if victim.startswith("records/"):
        assert "checkpoint-unlinked" in _kinds(report) or "record-unsigned" in _kinds(report)
    if victim.startswith("checkpoints/"):
        assert _named(report, "checkpoint-missing") == [victim]


def test_path_traversal_names_are_refused_without_extracting(journal, tmp_path, monkeypatch):
    members = _members(_export(journal))
    work = tmp_path / "work" / "inner"
    work.mkdir(parents=True)
    monkeypatch.chdir(work)
    for evil in ("../x", "/tmp/abs-evidence-x", "records/../../x", "a\\..\\x"):
        bad = _rezip({**members, evil: b"owned"}, tmp_path / "evil.zip", fix_manifest=False)
        report = verify_evidence(bad, journal.public)
        assert _named(report, "unsafe-member-name") == [evil], report.describe()
        assert "nothing extracted" in report.describe()
    assert not (tmp_path / "work" / "x").exists() and not (tmp_path / "x").exists()
    assert not Path("/tmp/abs-evidence-x").exists()
    result = CliRunner().invoke(main, ["verify-evidence", str(bad), "--public-key",
                                       str(journal.public)])
    assert result.exit_code == 1 and "unsafe-member-name" in result.output


def test_an_extra_member_or_a_damaged_zip_fails(journal, tmp_path):
    bundle = _export(journal)
    members = _members(bundle)
    report = verify_evidence(_rezip({**members, "notes.txt": b"hello"}, tmp_path / "extra.zip"),
                             journal.public)
    assert _named(report, "member-unexpected") == ["notes.txt"], report.describe()
    data = bundle.read_bytes()
    report = verify_evidence(data[: len(data) // 2], journal.public)
    assert _kinds(report) == {"bundle-unreadable"}, report.describe()


def test_an_entry_outside_the_stated_selection_fails(journal, tmp_path):
    members = _members(_export(journal))
    evidence = json.loads(members["evidence.json"])
    evidence["selection"]["request_ids"] = evidence["selection"]["request_ids"][:1]
    members["evidence.json"] = json.dumps(evidence).encode()
    report = verify_evidence(_rezip(members, tmp_path / "sel.zip"), journal.public)
    assert len(_named(report, "entry-outside-selection")) == 1, report.describe()


def test_the_covering_checkpoint_links_to_the_latest(journal, tmp_path):
    """The records between the covering checkpoint (4) and the latest (7) are the consistency
    proof: one of them gone, and the latest no longer links to the entries' records."""
    members = _members(_export(journal))
    del members["records/w00/000000000005.json"]
    report = verify_evidence(_rezip(members, tmp_path / "gap.zip"), journal.public)
    assert "consistency-unproven" in _kinds(report), report.describe()


def test_verifying_needs_only_the_bundle_and_the_key(journal, tmp_path):
    bundle = _export(journal)
    shutil.rmtree(journal.root)  # no journal, no keys folder, no vault beside it
    shutil.rmtree(journal.tmp / "keys")
    assert verify_evidence(bundle, journal.public).ok
    source = Path(__file__).resolve().parents[1] / "serve_journal" / "evidence" / "verify.py"
    imported = set()
    for node in ast.walk(ast.parse(source.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module:
            imported.add(node.module)
        elif isinstance(node, ast.Import):
            imported.update(a.name for a in node.names)
    ours = {m for m in imported if m.startswith("serve_journal")}
    assert ours <= {"serve_journal.errors", "serve_journal.evidence.bundle",
                    "serve_journal.integrity.manifest", "serve_journal.integrity.merkle",
                    "serve_journal.integrity.trust"}, ours
    assert not any(m.split(".")[0] in {"boto3", "duckdb", "requests", "urllib", "socket"}
                   for m in imported)


# -- privacy and the access log ------------------------------------------------------------------


def test_a_subject_export_logs_its_token_only_and_the_raw_id_is_nowhere(tmp_path, monkeypatch):
    monkeypatch.delenv("SERVE_JOURNAL_KEK", raising=False)
    key_file, public = signing_key_files(tmp_path)
    root = str(tmp_path / "journal")
    raw = "customer-4711-DE89370400440532013000"
    privacy = JournalConfig(model="unused", journal_uri=root).resolved_privacy_dir()
    ring = Keyring.local_default(privacy)
    vault = SubjectVault.local_default(privacy, ring)
    try:
        protected = VaultPseudonymizer(ring, vault).protect(
            [raw], [canonical_encode({"amount": 10})])[0]
    finally:
        vault.close()
    subject = protected.subject_token
    settings = SinkSettings(root, signing_key_file=str(key_file))
    storage = settings.storage()
    table = make_entries(90, tokens=[subject, token("a"), token("b")])
    write_signed(settings, storage, "w00", table, files=2)

    out = tmp_path / "subject.zip"
    result = CliRunner().invoke(main, [
        "evidence", "--journal", root, "--subject", "-", "--out", str(out),
        "--public-key", str(public), "--as", "examiner", "--verify-scope", "files"],
        input=raw + "\n")
    assert result.exit_code == 0, result.output
    assert raw not in result.output
    report = verify_evidence(out, public)
    assert report.ok and report.entries == 30, report.describe()
    assert set(report.table["subject_token"].to_pylist()) == {subject}
    assert report.selection == {"subject_token": subject}

    data = out.read_bytes()
    assert raw.encode() not in data
    for name, member in _members(out).items():
        assert raw.encode() not in member, name
    records = [r for r in read_access_log(storage) if r["filters"].get("purpose") == "evidence-export"]
    assert len(records) == 1
    logged = records[0]
    assert logged["actor"] == "examiner" and logged["rows"] == 30
    assert logged["filters"]["subject_token"] == subject
    assert logged["filters"]["bundle_sha256"] == sha256_hex(data)
    for path in storage.list_files("_access"):
        assert raw.encode() not in storage.read(path)

    unknown = CliRunner().invoke(main, [
        "evidence", "--journal", root, "--subject", "someone-never-seen", "--out",
        str(tmp_path / "u.zip"), "--public-key", str(public)])
    assert unknown.exit_code == 1 and "unknown or was forgotten" in unknown.output
    assert "someone-never-seen" not in unknown.output


# -- other journals ------------------------------------------------------------------------------


def test_entries_of_a_compacted_then_cold_journal(journal, tmp_path):
    rids = [_rid(journal.table, 3), _rid(journal.table, 150)]
    runner = CliRunner()
    common = ["--journal", journal.root, "--signing-key-file", str(journal.key_file)]
    later = LATER.strftime("%Y-%m-%dT%H:%M:%S")
    done = runner.invoke(main, ["compact", "--apply", "--as-of", later, *common])
    assert done.exit_code == 0, done.output
    compacted = _export(journal, "compacted.zip", request_ids=rids)
    report = verify_evidence(compacted, journal.public)
    assert report.ok, report.describe()
    evidence = json.loads(_members(compacted)["evidence.json"])
    assert all(f["path"].rsplit("/", 1)[1].startswith("c-") for f in evidence["files"])
    assert {c["chain_id"].split("-")[0] for c in evidence["chains"]} == {"compactor"}

    moved = runner.invoke(main, ["lifecycle", "run", "--apply", "--hot-days", "0", "--as-of",
                                 later, *common])
    assert moved.exit_code == 0, moved.output
    cold = _export(journal, "cold.zip", request_ids=rids)
    report = verify_evidence(cold, journal.public)
    assert report.ok and report.entries == 2, report.describe()
    evidence = json.loads(_members(cold)["evidence.json"])
    assert all(f["path"].startswith("cold/") and f["tier"] == "cold" for f in evidence["files"])


def test_an_s3_journal(s3_bucket, tmp_path, monkeypatch):
    server = s3_bucket.server
    for name, value in server.env.items():
        monkeypatch.setenv(name, value)
    endpoint = urlparse(server.endpoint_url)
    uri = (f"s3://{s3_bucket.name}/j-{uuid.uuid4().hex[:6]}?endpoint_override={endpoint.netloc}"
           f"&scheme={endpoint.scheme}&worm=1")
    key_file, public = signing_key_files(tmp_path)
    settings = SinkSettings(uri, signing_key_file=str(key_file))
    storage = settings.storage()
    table = make_entries(60, spread_s=2 * 3600)
    write_signed(settings, storage, "w00-s3", table, files=2)

    out = tmp_path / "s3.zip"
    result = CliRunner().invoke(main, ["evidence", "--journal", uri, "--request-id",
                                       _rid(table, 7), "--out", str(out), "--public-key",
                                       str(public)])
    assert result.exit_code == 0, result.output
    report = verify_evidence(out, public)
    assert report.ok and report.entries == 1, report.describe()
    assert any(r["filters"].get("purpose") == "evidence-export" for r in read_access_log(storage))
    api = export_evidence(storage, tmp_path / "api.zip", public_key=str(public),
                          subject_token=table["subject_token"][0].as_py(), actor="t")
    assert api.entries == table["subject_token"].to_pylist().count(table["subject_token"][0].as_py())
    assert verify_evidence(tmp_path / "api.zip", public).ok
    assert not os.path.exists(tmp_path / "api.zip.tmp")


def test_a_subject_without_key_material_is_a_usage_error_naming_no_id(journal, monkeypatch):
    monkeypatch.setenv("SERVE_JOURNAL_DEV_MODE", "0")
    monkeypatch.delenv("SERVE_JOURNAL_KEK", raising=False)
    result = CliRunner().invoke(main, [
        "evidence", "--journal", journal.root, "--subject", "customer-0815", "--out",
        str(journal.tmp / "k.zip"), "--public-key", str(journal.public)])
    assert result.exit_code == 2 and "--subject: no key material" in result.output, result.output
    assert "customer-0815" not in result.output and not (journal.tmp / "k.zip").exists()
