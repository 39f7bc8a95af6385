"""verify_journal against real journals (Parquet files, manifest chains, signed checkpoints) on the
local backend and on a real S3 API (moto server, Object Lock): a clean journal verifies, and each
kind of tampering fails verification and names the file, record or checkpoint concerned."""

from __future__ import annotations

import base64
import dataclasses
import datetime as dt
import hashlib
import json
import os
import uuid
from dataclasses import dataclass
from typing import Any

import pyarrow as pa
import pytest

from serve_journal.catalog import commit, marker_path
from serve_journal.catalog.layout import DEFAULT_SPEC
from serve_journal.fileformat import decode_parquet, encode_parquet
from serve_journal.integrity.fingerprint import fingerprint
from serve_journal.integrity.manifest import (
    Checkpoint,
    ManifestLog,
    ManifestRecord,
    ManifestSigner,
    build_file_record,
    checkpoint_path,
    record_path,
)
from serve_journal.read.verify import format_report, verify_journal
from serve_journal.storage import JournalStorage, LocalJournalStorage, StoredObject
from serve_journal.storage.retention import RetentionPolicy, TieredRetention
from serve_journal.storage.s3 import S3WormStorage
from tests.helpers.manifest_tables import BASE_TS, data_path, make_table

CHAIN = "writer-1"


@dataclass
class Backend:
    """A journal storage, its witness, and the means an attacker with write access has."""

    name: str
    storage: JournalStorage
    witness: JournalStorage
    raw_put: Any  # (path, bytes) -> None, bypassing create-only
    raw_remove: Any  # (path) -> None

    def overwrite(self, path: str, data: bytes) -> None:
        self.raw_put(path, data)


def _local_backend(tmp_path) -> Backend:
    storage = LocalJournalStorage(str(tmp_path / "journal"))
    witness = LocalJournalStorage(str(tmp_path / "witness"))

    def raw_put(path: str, data: bytes) -> None:
        full = storage.full_path(path)
        os.makedirs(os.path.dirname(full), exist_ok=True)
        if os.path.exists(full):
            os.chmod(full, 0o644)  # read-only files stop mistakes, not an owner (or root)
        with open(full, "wb") as handle:
            handle.write(data)
        os.chmod(full, 0o444)

    return Backend("local", storage, witness, raw_put, lambda path: os.unlink(storage.full_path(path)))


def _s3_backend(s3_bucket) -> Backend:
    server = s3_bucket.server
    witness_bucket = f"witness-{uuid.uuid4().hex[:12]}"
    server.client().create_bucket(Bucket=witness_bucket, ObjectLockEnabledForBucket=True)
    retention = TieredRetention(hot=RetentionPolicy.custom(days=1, mode="GOVERNANCE"),
                                cold=RetentionPolicy.custom(days=2))
    options = dict(retention=retention, endpoint_url=server.endpoint_url, region=server.region,
                   access_key=server.access_key, secret_key=server.secret_key)
    storage = S3WormStorage(s3_bucket.name, "journal", **options)
    witness = S3WormStorage(witness_bucket, "", **options)

    def raw_put(path: str, data: bytes) -> None:
        # A plain PutObject: no If-None-Match, so S3 keeps the locked version and adds a new one.
        storage.client.put_object(Bucket=storage.bucket, Key=storage.key(path), Body=data)

    return Backend("s3", storage, witness, raw_put, storage.delete)


@pytest.fixture(params=["local", "s3"])
def backend(request, tmp_path) -> Backend:
    if request.param == "local":
        return _local_backend(tmp_path)
    return _s3_backend(request.getfixturevalue("s3_bucket"))


@pytest.fixture
def signer() -> ManifestSigner:
    return ManifestSigner.generate()


class Writer:
    """Writes journal files the way a writer actor does: encode, put_new, record, append."""

    def __init__(self, backend: Backend, signer: ManifestSigner, chain: str = CHAIN) -> None:
        self.storage = backend.storage
        self.log = ManifestLog(backend.storage, chain, signer, backend.witness)

    def write(self, name: str, producer: str, seqs, *, tier: str = "hot", model: str = "fraud",
              replaces: list[str] | None = None, table: pa.Table | None = None) -> str:
        table = table if table is not None else make_table(producer, seqs, model=model)
        stored = self.storage.put_new(data_path(name, model=model, tier=tier), encode_parquet(table))
        self.log.append(build_file_record(stored, table, tier, self.log.chain_id, replaces))
        return stored.path


def standard_journal(backend: Backend, signer: ManifestSigner) -> list[str]:
    writer = Writer(backend, signer)
    paths = [
        writer.write("f1", "p1", range(0, 10)),
        writer.write("f2", "p1", range(10, 20)),
        writer.write("f3", "p2", range(0, 5)),
    ]
    writer.log.checkpoint()
    return paths


def run(backend: Backend, signer: ManifestSigner, **kwargs):
    return verify_journal(backend.storage, public_key=signer.export_public_key(),
                          witness=backend.witness, **kwargs)


def errors(report) -> set[tuple[str, str]]:
    return {(p.kind, p.path) for p in report.errors}


def test_clean_journal_verifies(backend, signer):
    paths = standard_journal(backend, signer)
    report = run(backend, signer)
    assert report.ok, format_report(report)
    assert (report.files, report.entries, report.records, report.chains) == (3, 25, 3, 1)
    # genesis (the chain announced when the writer opened it) and the head after three files
    assert (report.checkpoints, report.witness_checkpoints, report.producers) == (2, 2, 2)
    text = format_report(report)
    assert text.splitlines()[0].endswith(": OK")
    parsed = json.loads(report.to_json())
    assert parsed["ok"] is True and parsed["files"] == 3
    assert all(path.startswith("hot/model=fraud/") for path in paths)


def test_one_byte_changed_in_a_parquet_file(backend, signer):
    paths = standard_journal(backend, signer)
    data = bytearray(backend.storage.read(paths[1]))
    data[len(data) // 2] ^= 0x01
    backend.overwrite(paths[1], bytes(data))
    report = run(backend, signer)
    assert not report.ok
    assert ("file-altered", paths[1]) in errors(report)
    assert {p.path for p in report.errors} <= {paths[1]}
    assert paths[1] in format_report(report)


def test_row_removed_and_file_rewritten(backend, signer):
    paths = standard_journal(backend, signer)
    table = decode_parquet(backend.storage.read(paths[0]))
    backend.overwrite(paths[0], encode_parquet(table.slice(1)))
    found = errors(run(backend, signer))
    assert {("file-altered", paths[0]), ("file-row-count", paths[0]),
            ("file-entries-altered", paths[0])} <= found


def test_entry_edited_and_file_rewritten(backend, signer):
    paths = standard_journal(backend, signer)
    rows = decode_parquet(backend.storage.read(paths[2])).to_pylist()
    rows[3]["decision"] = "block"
    edited = pa.Table.from_pylist(rows, schema=make_table("p2", []).schema)
    backend.overwrite(paths[2], encode_parquet(edited))
    found = errors(run(backend, signer))
    assert ("file-entries-altered", paths[2]) in found
    assert ("file-row-count", paths[2]) not in found


@pytest.mark.parametrize("column, edit", [
    ("caller", lambda rows: [{**r, "caller": "svc-b"} for r in rows]),  # still one value
    ("threshold", lambda rows: [{**r, "threshold": 0.5000000000000001} for r in rows]),
    ("latency_ms", lambda rows: [{**r, "latency_ms": 1.5 if i else 2.5} for i, r in enumerate(rows)]),
    ("explanation_ref", lambda rows: [{**r, "explanation_ref": "x" if i == 4 else None}
                                      for i, r in enumerate(rows)]),
])
def test_a_column_of_one_value_edited_and_file_rewritten(backend, signer, column, edit):
    """Leaves encode a column holding one value (or null) in every row of a file once: an
    attacker who rewrites that value in every row, in one row, or fills one null, is caught."""
    paths = standard_journal(backend, signer)
    rows = decode_parquet(backend.storage.read(paths[2])).to_pylist()
    assert len({repr(r[column]) for r in rows}) == 1
    edited = pa.Table.from_pylist(edit(rows), schema=make_table("p2", []).schema)
    backend.overwrite(paths[2], encode_parquet(edited))
    found = errors(run(backend, signer))
    assert ("file-entries-altered", paths[2]) in found
    assert ("file-row-count", paths[2]) not in found


def test_file_deleted(backend, signer):
    paths = standard_journal(backend, signer)
    backend.raw_remove(paths[0])
    report = run(backend, signer)
    assert ("file-missing", paths[0]) in errors(report)
    if backend.name == "s3":
        assert ("delete-marker", paths[0]) in errors(report)


def test_forged_file_added(backend, signer):
    standard_journal(backend, signer)
    forged = data_path("forged")
    backend.raw_put(forged, encode_parquet(make_table("p1", range(20, 25))))
    report = run(backend, signer)
    assert ("file-without-record", forged) in errors(report)


def test_two_files_swapped(backend, signer):
    paths = standard_journal(backend, signer)
    first, second = (backend.storage.read(p) for p in paths[:2])
    backend.overwrite(paths[0], second)
    backend.overwrite(paths[1], first)
    found = errors(run(backend, signer))
    assert {("file-altered", paths[0]), ("file-altered", paths[1])} <= found


def test_manifest_truncated(backend, signer):
    paths = standard_journal(backend, signer)
    backend.raw_remove(record_path(CHAIN, 2))
    report = run(backend, signer)
    found = errors(report)
    assert ("file-without-record", paths[2]) in found
    assert any(kind == "manifest-truncated" and CHAIN in path for kind, path in found)


def test_manifest_record_edited(backend, signer):
    paths = standard_journal(backend, signer)
    path = record_path(CHAIN, 1)
    record = json.loads(backend.storage.read(path))
    record["row_count"] = 9
    backend.overwrite(path, json.dumps(record).encode())
    found = errors(run(backend, signer))
    assert ("manifest-record-altered", path) in found
    assert ("file-row-count", paths[1]) in found


def test_manifest_record_edited_with_its_hash_recomputed(backend, signer):
    standard_journal(backend, signer)
    for index in (1, 2):  # a middle record breaks the chain; the head contradicts the checkpoint
        path = record_path(CHAIN, index)
        record = ManifestRecord.from_json(backend.storage.read(path))
        edited = dataclasses.replace(record, seq_ranges={"p9": [[0, 4]]})
        edited = dataclasses.replace(edited, record_hash=edited.compute_hash())
        backend.overwrite(path, edited.to_json())
    found = errors(run(backend, signer))
    assert ("manifest-chain-broken", record_path(CHAIN, 2)) in found
    assert ("manifest-rewritten", record_path(CHAIN, 2)) in found


def test_checkpoint_signed_with_another_key(backend, signer):
    standard_journal(backend, signer)
    path = checkpoint_path(CHAIN, 3)
    attacker = ManifestSigner.generate()
    genuine = Checkpoint.from_json(backend.storage.read(path))
    forged = dataclasses.replace(genuine, key_id=attacker.key_id, signature="")
    forged = dataclasses.replace(
        forged, signature=base64.b64encode(attacker.sign(forged.signed_bytes())).decode())
    backend.overwrite(path, forged.to_json())
    report = run(backend, signer)
    found = errors(report)
    assert ("checkpoint-bad-signature", path) in found
    assert ("checkpoint-copies-differ", path) in found
    # The same journal checked with the attacker's key: the witness copy gives it away.
    assert not verify_journal(backend.storage, public_key=attacker.export_public_key(),
                              witness=backend.witness).ok


def test_whole_chain_rewritten_and_resigned_is_caught_by_the_witness(backend, signer):
    paths = standard_journal(backend, signer)
    # An attacker holding the signing key drops f2: removes it, its records and the checkpoint,
    # re-links f3 as record 1 and signs a new checkpoint (the witness is out of their reach).
    backend.raw_remove(paths[1])
    for path in (record_path(CHAIN, 1), record_path(CHAIN, 2), checkpoint_path(CHAIN, 3)):
        backend.raw_remove(path)
    head = ManifestRecord.from_json(backend.storage.read(record_path(CHAIN, 0)))
    data = backend.storage.read(paths[2])
    stored = StoredObject(paths[2], len(data), hashlib.sha256(data).hexdigest())
    record = build_file_record(stored, decode_parquet(data), "hot", CHAIN)
    linked = dataclasses.replace(record, index=1, prev_hash=head.record_hash, created=head.created)
    linked = dataclasses.replace(linked, record_hash=linked.compute_hash())
    backend.raw_put(record_path(CHAIN, 1), linked.to_json())
    resigned = ManifestLog(backend.storage, CHAIN, signer).checkpoint()
    assert resigned is not None and resigned.length == 2

    without_witness = verify_journal(backend.storage, public_key=signer.export_public_key())
    if backend.name == "local":
        assert without_witness.ok, format_report(without_witness)  # the local journal alone is fooled
    report = run(backend, signer)
    assert ("manifest-truncated", f"_manifest/{CHAIN}/") in errors(report), format_report(report)


def test_sequence_gap_is_loss_unless_accounted(backend, signer):
    writer = Writer(backend, signer)
    writer.write("a", "p1", range(0, 10))
    gap_file = writer.write("b", "p1", range(15, 20))
    writer.write("c", "p2", range(3, 6))  # p2 starts at 3: 0..2 missing too
    writer.log.checkpoint()
    report = run(backend, signer)
    gaps = [p for p in report.errors if p.kind == "sequence-gap"]
    assert {p.path for p in gaps} == {gap_file, data_path("c")}
    assert any("p1: sequence 10..14 (5 entries)" in p.detail for p in gaps)
    assert any("p2: sequence 0..2" in p.detail for p in gaps)

    partly = run(backend, signer, accounted_gaps={"p1": [(10, 12, "buffer full")],
                                                 "p2": [(0, 2, "sampled out")]})
    assert [p.detail.split(" missing")[0] for p in partly.errors] == ["producer p1: sequence 13..14 (2 entries)"]
    accounted = run(backend, signer, accounted_gaps={"p1": [(10, 14, "buffer full")],
                                                    "p2": [(0, 2, "sampled out")]})
    assert accounted.ok, format_report(accounted)
    assert accounted.accounted_gaps == 2


def test_compaction_replaces_files(backend, signer):
    writer = Writer(backend, signer)
    first = writer.write("a", "p1", range(0, 10))
    second = writer.write("b", "p1", range(10, 20))
    merged = pa.concat_tables([make_table("p1", range(0, 10)), make_table("p1", range(10, 20))])
    compacted = writer.write("compacted", "p1", None, tier="cold", table=merged,
                             replaces=[first, second])
    writer.log.checkpoint()
    key = DEFAULT_SPEC.parse(compacted)[1]
    marker = marker_path(key, "cold", "compacted")
    commit(backend.storage, kind="lifecycle", path=marker, new_files=[compacted],
           replaces=[first, second], expected=fingerprint(merged), signer=signer)
    commit_json = backend.storage.read(marker)
    for path in (first, second):
        backend.raw_remove(path)
    if backend.name == "local":  # on S3 a delete leaves markers, which verify reports
        report = run(backend, signer)
        assert report.ok, format_report(report)
        # The commit marker deleted too: readers would lose the entries. Named.
        backend.raw_remove(marker)
        assert ("commit-marker-missing", compacted) in errors(run(backend, signer))
        backend.raw_put(marker, commit_json)
    data = bytearray(backend.storage.read(compacted))
    data[-100] ^= 0xFF
    backend.overwrite(compacted, bytes(data))
    found = errors(run(backend, signer))
    assert {("file-missing", first), ("file-missing", second), ("file-altered", compacted)} <= found


def test_model_and_since_limit_the_files_checked(backend, signer):
    writer = Writer(backend, signer)
    writer.write("a", "p1", range(0, 10))
    other = writer.write("b", "p2", range(0, 10), model="other")
    writer.log.checkpoint()
    data = bytearray(backend.storage.read(other))
    data[len(data) // 2] ^= 0x01
    backend.overwrite(other, bytes(data))
    assert not run(backend, signer).ok
    scoped = run(backend, signer, model="fraud")
    assert scoped.files == 1
    if backend.name == "local":  # on S3 the shadow version of `other` is found by key listing
        assert scoped.ok, format_report(scoped)
    later = run(backend, signer, since=BASE_TS + dt.timedelta(hours=2))
    assert later.files == 0


def test_s3_shadow_version_and_delete_marker(s3_bucket, signer):
    backend = _s3_backend(s3_bucket)
    paths = standard_journal(backend, signer)
    same_bytes = backend.storage.read(paths[0])
    backend.raw_put(paths[0], same_bytes)  # identical content, but a second version
    backend.raw_remove(paths[1])
    found = errors(run(backend, signer))
    assert {("extra-object-version", paths[0]), ("file-version-mismatch", paths[0]),
            ("delete-marker", paths[1]), ("file-missing", paths[1])} <= found
    assert ("file-altered", paths[0]) not in found


# -- truncation and rollback without a witness: remembered chain heads ---------------------------


def _truncate_tail(backend: Backend, path: str, index: int, length: int) -> None:
    """The attacker cuts the journal back one file: its data, its record and the newest
    checkpoint go; what remains is an earlier, genuinely signed state."""
    backend.raw_remove(path)
    backend.raw_remove(record_path(CHAIN, index))
    backend.raw_remove(checkpoint_path(CHAIN, length))


def test_tail_truncation_without_a_witness_is_caught_by_remembered_heads(backend, signer):
    writer = Writer(backend, signer)
    writer.log.witness = None  # the demo's default: no witness
    writer.write("f1", "p1", range(0, 10))
    writer.write("f2", "p1", range(10, 20))
    writer.log.checkpoint()
    last = writer.write("f3", "p1", range(20, 30))
    writer.log.checkpoint()
    clean = verify_journal(backend.storage, public_key=signer.export_public_key())
    assert clean.ok, format_report(clean)
    assert clean.heads == {CHAIN: {"length": 3, "head_hash": writer.log.head_hash}}
    assert not clean.truncation_excluded
    assert "cannot be excluded" in format_report(clean)

    _truncate_tail(backend, last, 2, 3)
    if backend.name == "local":  # S3 keeps versions: its delete markers are errors anyway
        blind = verify_journal(backend.storage, public_key=signer.export_public_key())
        assert blind.ok, "without remembered heads the cut is invisible (the point of this test)"
    report = verify_journal(backend.storage, public_key=signer.export_public_key(),
                            expected_heads=clean.heads)
    assert ("signed-history-rolled-back", f"_manifest/{CHAIN}/") in errors(report)
    assert report.truncation_excluded and "cannot be excluded" not in format_report(report)


def test_a_removed_chain_and_a_rewritten_head_are_caught_by_remembered_heads(backend, signer):
    paths = standard_journal(backend, signer)
    clean = run(backend, signer)
    heads = clean.heads
    # A rewritten head: the remembered hash is not the record's any more.
    forged = {CHAIN: {"length": heads[CHAIN]["length"], "head_hash": "f" * 64}}
    report = run(backend, signer, expected_heads=forged)
    assert ("signed-history-rewritten", record_path(CHAIN, 2)) in errors(report)
    # A chain the auditor saw, deleted whole (records, checkpoints, files).
    for index in range(3):
        backend.raw_remove(record_path(CHAIN, index))
    backend.raw_remove(checkpoint_path(CHAIN, 3))
    for path in paths:
        backend.raw_remove(path)
    report = verify_journal(backend.storage, public_key=signer.export_public_key(),
                            expected_heads=heads)
    assert ("chain-removed", f"_manifest/{CHAIN}/") in errors(report)
    # Heads name a chain the journal never had: removed as well.
    other = run(backend, signer, expected_heads={"someone-else": heads[CHAIN]})
    assert ("chain-removed", "_manifest/someone-else/") in errors(other)


def test_chains_the_remembered_heads_did_not_know_are_listed(backend, signer):
    standard_journal(backend, signer)
    heads = run(backend, signer).heads
    second = Writer(backend, signer, chain="writer-2")
    second.write("g1", "p3", range(0, 4))
    second.log.checkpoint()
    report = run(backend, signer, expected_heads=heads)
    assert report.ok, format_report(report)
    assert report.new_chains == ["writer-2"] and set(report.heads) == {CHAIN, "writer-2"}


def test_heads_file_round_trip_and_the_cli_refuses_a_rolled_back_journal(tmp_path, signer):
    from click.testing import CliRunner

    from serve_journal.cli import main
    from serve_journal.read.verify import load_heads, save_heads

    backend = _local_backend(tmp_path)
    writer = Writer(backend, signer)
    writer.log.witness = None
    writer.write("f1", "p1", range(0, 10))
    writer.log.checkpoint()
    last = writer.write("f2", "p1", range(10, 20))
    writer.log.checkpoint()
    key = tmp_path / "auditor.pub.pem"
    key.write_bytes(signer.export_public_key())
    heads = tmp_path / "heads.json"
    args = ["verify", "--journal", backend.storage.root, "--public-key", str(key),
            "--reports-dir", str(tmp_path / "reports"), "--heads", str(heads)]
    first = CliRunner().invoke(main, args)
    assert first.exit_code == 0, first.output
    assert load_heads(heads) == {CHAIN: {"length": 2, "head_hash": writer.log.head_hash}}
    assert oct(os.stat(heads).st_mode & 0o777) == "0o600"
    _truncate_tail(backend, last, 1, 2)
    second = CliRunner().invoke(main, args)
    assert second.exit_code == 1 and "signed-history-rolled-back" in second.output
    assert load_heads(heads)[CHAIN]["length"] == 2  # a failed run never lowers what is kept
    failed = verify_journal(backend.storage, public_key=signer.export_public_key(),
                            expected_heads=load_heads(heads))
    with pytest.raises(ValueError, match="verified"):
        save_heads(heads, failed)
    assert load_heads(tmp_path / "absent.json") is None


# -- one file, one content; one entry, one live file ----------------------------------------------


@pytest.mark.slow  # over 1.5 s: kept out of the fast tier, runs in the full suite
def test_file_edited_and_recorded_again_in_a_chain_of_the_attackers_own(backend, signer):
    """The attacker edits a data file and records the new bytes in a new chain (no key needed to
    write a record): verify used to pick whichever record matched."""
    paths = standard_journal(backend, signer)
    rows = decode_parquet(backend.storage.read(paths[0])).to_pylist()
    rows[0]["decision"] = "allow" if rows[0]["decision"] != "allow" else "block"
    edited = pa.Table.from_pylist(rows, schema=make_table("p1", []).schema)
    data = encode_parquet(edited)
    backend.overwrite(paths[0], data)
    stored = StoredObject(paths[0], len(data), hashlib.sha256(data).hexdigest())
    forged_log = ManifestLog(backend.storage, "attacker-1")  # no signer: the attacker has none
    forged_log.append(build_file_record(stored, edited, "hot", "attacker-1"))
    report = run(backend, signer)
    found = errors(report)
    # A chain no signature ever announced vouches for nothing: the edit is named as such.
    assert ("chain-unknown", "_manifest/attacker-1/") in found, format_report(report)
    assert ("file-altered", paths[0]) in found
    # Appended to the tail of the writer's own chain instead (no key needed to link a record),
    # within the grace period an unsigned tail gets: two contents for one file.
    tail = ManifestLog(backend.storage, CHAIN)  # recovers the head; no signer
    tail.append(build_file_record(stored, edited, "hot", CHAIN))
    report = run(backend, signer)
    assert ("conflicting-records", paths[0]) in errors(report), format_report(report)
    # Past the grace period the unsigned tail vouches for nothing at all.
    later = run(backend, signer, now=dt.datetime.now(dt.UTC) + dt.timedelta(hours=1))
    assert ("chain-tail-unsigned", record_path(CHAIN, 3)) in errors(later)
    assert ("file-altered", paths[0]) in errors(later)


def test_two_records_claiming_the_same_entries_are_caught(backend, signer):
    """A second file carrying copies of entries another live file holds (forged, or written
    twice), recorded in the writer's own chain so every record is signed."""
    writer = Writer(backend, signer)
    writer.write("f1", "p1", range(0, 10))
    copy = writer.write("f1-copy", "p1", range(5, 12))
    writer.log.checkpoint()
    report = run(backend, signer)
    assert ("sequence-claimed-twice", copy) in errors(report), format_report(report)
    # A rewrite that replaces its inputs is not a double claim.
    clean = Writer(backend, signer, chain="writer-2")
    merged = clean.write("c-merged", "p2", range(0, 20))
    clean.log.checkpoint()
    rewrite = Writer(backend, signer, chain="compactor-1")
    rewrite.write("c-merged-2", "p2", range(0, 20), replaces=[merged])
    rewrite.log.checkpoint()
    assert not {k for k, p in errors(run(backend, signer)) if p.endswith("c-merged-2.parquet")}


def test_cli_verify_never_trusts_the_key_beside_the_journal_unpinned(tmp_path, signer):
    """Whoever can write the key folder beside the journal can swap the public key there for
    their own and re-sign forged checkpoints: verify needs the auditor's key, or a pin."""
    from click.testing import CliRunner

    from serve_journal.cli import main

    backend = _local_backend(tmp_path)
    Writer(backend, signer).write("f1", "p1", range(0, 10))
    keys = tmp_path / "journal-signing"
    keys.mkdir()
    beside = keys / "manifest-signing.pub.pem"
    beside.write_bytes(signer.export_public_key())
    base = ["verify", "--journal", backend.storage.root, "--reports-dir", str(tmp_path / "r")]
    unpinned = CliRunner().invoke(main, base)
    assert unpinned.exit_code == 2 and "--public-key" in unpinned.output
    fingerprint = hashlib.sha256(_raw(signer)).hexdigest()
    ok = CliRunner().invoke(main, [*base, "--key-fingerprint", fingerprint[:16]])
    assert "not the pinned one" not in ok.output
    # The attacker replaces the PEM beside the journal with their own key: the pin refuses it.
    beside.chmod(0o644)
    beside.write_bytes(ManifestSigner.generate().export_public_key())
    swapped = CliRunner().invoke(main, [*base, "--key-fingerprint", fingerprint])
    assert swapped.exit_code == 2 and "not the pinned one" in swapped.output
    dev = CliRunner().invoke(main, [*base, "--dev"])
    assert "development mode" in dev.output


def _raw(signer: ManifestSigner) -> bytes:
    from cryptography.hazmat.primitives import serialization

    from serve_journal.integrity.manifest import load_public_key

    return load_public_key(signer.export_public_key()).public_bytes(
        serialization.Encoding.Raw, serialization.PublicFormat.Raw)
