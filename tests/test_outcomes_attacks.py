"""Outcomes under attack (issue 18 review): an attacker who can create, overwrite and delete
objects in the journal's storage but holds no key. Real parts only: local folders, signed
manifest chains, real subprocesses killed with SIGKILL."""

from __future__ import annotations

import datetime as dt
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pyarrow as pa
import pytest

from serve_journal.catalog.layout import DEFAULT_SPEC
from serve_journal.fileformat import encode_parquet
from serve_journal.outcomes.record import load_outcomes, record_outcomes
from serve_journal.read.verify import format_report, verify_journal
from serve_journal.sink.settings import SinkSettings
from tests.helpers.entries import DAY, make_entries
from tests.helpers.journal import write_signed

RECORDED = DAY + dt.timedelta(days=30)


@pytest.fixture
def journal(tmp_path):
    root = str(tmp_path / "journal")
    settings = SinkSettings(journal_uri=root)
    storage = settings.storage()
    entries = make_entries(30, start=DAY, spread_s=3600)
    write_signed(settings, storage, "w00", entries, files=2)
    return root, settings, storage, entries


def _plant_entries(storage, table: pa.Table, name: str) -> str:
    """An entry file put straight into the hot tier: no manifest record, nothing signed."""
    key = DEFAULT_SPEC.key_for(table["model_name"][0].as_py(), table["ts"][0].as_py())
    path = DEFAULT_SPEC.file_path(key, name)
    storage.put_new(path, encode_parquet(table))
    return path


def test_an_outcome_for_a_request_id_only_a_planted_entry_file_holds_is_rejected(journal):
    root, _, storage, _ = journal
    fake = make_entries(3, start=DAY + dt.timedelta(minutes=5), producer="p-planted")
    _plant_entries(storage, fake, "planted")
    later = DAY + dt.timedelta(days=2)
    batch = [{"request_id": r, "label": True, "outcome_time": later}
             for r in fake["request_id"].to_pylist()]
    report = record_outcomes(root, batch, source="chargebacks", now=RECORDED)
    assert (report.accepted, report.rejected_by_kind) == (0, {"unknown_request_id": 3})
    assert load_outcomes(root).num_rows == 0


def test_an_outcome_for_a_request_id_planted_into_a_recorded_file_is_rejected(journal):
    """The attacker overwrites a recorded entry file with one that also holds a made-up request:
    its bytes no longer match the signed record, so the file vouches for no request id."""
    root, _, storage, entries = journal
    path = sorted(storage.list_files("hot", ".parquet"))[0]
    original = __import__("serve_journal.fileformat", fromlist=["decode_parquet"]).decode_parquet(
        storage.read(path))
    fake = make_entries(1, start=original["ts"][0].as_py(), producer="p-planted")
    full = os.path.join(root, path)
    os.chmod(full, 0o644)
    with open(full, "wb") as handle:
        handle.write(encode_parquet(pa.concat_tables([original, fake])))
    later = DAY + dt.timedelta(days=2)
    report = record_outcomes(root, [{"request_id": fake["request_id"][0].as_py(), "label": True,
                                     "outcome_time": later}], source="chargebacks", now=RECORDED)
    assert report.rejected_by_kind == {"unknown_request_id": 1}, report


def _later(entries: pa.Table, n: int) -> list[dict]:
    when = DAY + dt.timedelta(days=2)
    return [{"request_id": r, "label": "legit", "outcome_time": when}
            for r in entries["request_id"].to_pylist()[:n]]


@pytest.fixture
def short_wait(monkeypatch):
    """An ingest waits TAIL_WAIT_S for a concurrent ingest to sign; refusals need not wait 5 s."""
    import serve_journal.outcomes.record as record

    monkeypatch.setattr(record, "TAIL_WAIT_S", 0.1)


def test_a_record_appended_to_a_source_chain_is_never_signed_by_the_next_ingest(journal,
                                                                                 short_wait):
    """Between two ingests the attacker appends a record (valid hash, linked to the signed head)
    for a planted outcome file to the source's chain. The next ingest must not sign it."""
    import dataclasses

    from serve_journal.catalog.layout import OUTCOME_SPEC
    from serve_journal.errors import ManifestError
    from serve_journal.integrity.manifest import ManifestLog, ManifestRecord, record_path
    from serve_journal.outcomes.schema import decode_outcomes, encode_outcomes, outcome_merkle_root

    root, settings, storage, entries = journal
    first = record_outcomes(root, _later(entries, 3), source="cb", now=RECORDED)
    table = decode_outcomes(storage.read(first.files[0]))
    forged = table.set_column(table.schema.get_field_index("label"), "label",
                              pa.array(["fraud"] * table.num_rows, pa.string()))
    forged = forged.set_column(table.schema.get_field_index("recorded_at"), "recorded_at",
                               pa.array([RECORDED + dt.timedelta(days=9)] * table.num_rows,
                                        pa.timestamp("us", tz="UTC")))
    path = OUTCOME_SPEC.file_path(RECORDED, "o-planted")
    stored = storage.put_new(path, encode_outcomes(forged))
    head = ManifestRecord.from_json(storage.read(record_path("outcomes.cb", 0)))
    attacker = ManifestLog(storage, "outcomes.cb")  # no signer: appends, cannot sign
    attacker.append(dataclasses.replace(head, path=path, sha256=stored.sha256, size=stored.size,
                                        merkle_root=outcome_merkle_root(decode_outcomes(
                                            storage.read(path))), created=""))
    with pytest.raises(ManifestError, match="unsigned record"):
        record_outcomes(root, _later(entries, 1), source="cb", now=RECORDED + dt.timedelta(days=1))
    report = verify_journal(storage, public_key=settings.signer().export_public_key())
    tail = [p for p in report.problems if p.kind == "chain-tail-unsigned"]
    assert tail and tail[0].path == "_manifest/outcomes.cb/000000000001.json", format_report(report)
    assert set(load_outcomes(root)["label"].to_pylist()) == {"legit"}  # readers: signed only


CRASH_SCRIPT = """
import datetime as dt, json, os, signal, sys
from serve_journal.outcomes.record import record_outcomes
root, stage, batch = sys.argv[1], sys.argv[2], json.loads(sys.argv[3])
def crash(point):
    if point == stage:
        os.kill(os.getpid(), signal.SIGKILL)
record_outcomes(root, batch, source="cb", now=dt.datetime.fromisoformat(sys.argv[4]), _crash=crash)
print("finished")
"""


def _ingest_killed_at(root: str, stage: str, batch: list[dict]) -> None:
    rows = [{**b, "outcome_time": b["outcome_time"].isoformat()} for b in batch]
    proc = subprocess.run([sys.executable, "-c", CRASH_SCRIPT, root, stage, json.dumps(rows),
                           RECORDED.isoformat()], capture_output=True, timeout=120, check=False)
    assert proc.returncode == -signal.SIGKILL, proc.stderr.decode()[-2000:]


def test_kill_9_between_storing_the_outcome_file_and_recording_it(journal):
    """The file is stored, its record never written: verify names the orphan, readers ignore it,
    and the retried batch is recorded once (its outcomes are not counted twice)."""
    root, settings, storage, entries = journal
    batch = _later(entries, 3)
    _ingest_killed_at(root, "file-stored", batch)
    orphans = storage.list_files("outcomes/", ".parquet")
    assert len(orphans) == 1
    report = verify_journal(storage, public_key=settings.signer().export_public_key())
    assert [p.path for p in report.errors if p.kind == "file-without-record"] == orphans, \
        format_report(report)
    assert load_outcomes(root).num_rows == 0
    retry = record_outcomes(root, batch, source="cb", now=RECORDED)
    assert retry.accepted == 3
    assert load_outcomes(root).num_rows == 3
    report = verify_journal(storage, public_key=settings.signer().export_public_key())
    assert [p.kind for p in report.errors] == ["file-without-record"], format_report(report)
    assert report.outcomes == 3  # the orphan's records are not counted


def test_kill_9_between_recording_and_signing_refuses_a_blind_retry(journal, short_wait):
    """The record is written, its checkpoint not: a retry is refused (it would sign the record
    and count the batch twice); after verify shows it is the crashed ingest's, signing the tail
    alone makes the batch count, once."""
    from serve_journal.outcomes.record import UnsignedTailError

    root, settings, storage, entries = journal
    batch = _later(entries, 3)
    _ingest_killed_at(root, "recorded", batch)
    report = verify_journal(storage, public_key=settings.signer().export_public_key())
    assert any(p.kind == "chain-tail-unsigned" for p in report.problems), format_report(report)
    assert load_outcomes(root).num_rows == 0  # unsigned: readers holding the key skip it
    with pytest.raises(UnsignedTailError, match="--sign-unsigned-tail"):
        record_outcomes(root, batch, source="cb", now=RECORDED)
    signed = record_outcomes(root, [], source="cb", now=RECORDED, sign_unsigned_tail=True)
    assert signed.accepted == 0
    assert load_outcomes(root).num_rows == 3
    report = verify_journal(storage, public_key=settings.signer().export_public_key())
    assert report.ok and report.outcomes == 3, format_report(report)


def test_a_raw_subject_id_in_an_ingested_file_is_never_read_stored_or_echoed(journal, tmp_path):
    """Outcome exports often carry the customer id. Only the outcome columns are read: the id is
    not converted (so no type error can quote it), stored, logged, or printed."""
    from click.testing import CliRunner

    from serve_journal.cli import main

    root, _, storage, entries = journal
    rid = entries["request_id"][0].as_py()
    when = (DAY + dt.timedelta(days=2)).isoformat()
    lines = ["request_id,label,outcome_time,customer_id"]
    lines += [f"{rid},legit,{when},{100000 + i}" for i in range(15_000)]  # > one 1 MiB CSV block
    lines.append(f"{rid},fraud,{when},CUST-RAW-4242")  # not an integer: would fail conversion
    csv_file = tmp_path / "chargebacks.csv"
    csv_file.write_text("\n".join(lines) + "\n")
    result = CliRunner().invoke(main, ["outcomes", "ingest", str(csv_file), "--journal", root,
                                       "--source", "cb"])
    assert "CUST-RAW-4242" not in result.output
    assert result.exit_code == 0, result.output
    assert result.output.startswith("accepted 2, rejected 14999 (duplicate_in_batch 14999)")
    for dirpath, _, names in os.walk(os.path.dirname(root)):
        for name in names:
            if os.path.join(dirpath, name) == str(csv_file):
                continue
            with open(os.path.join(dirpath, name), "rb") as handle:
                assert b"CUST-RAW-4242" not in handle.read(), name


def test_forget_over_an_unreadable_journal_does_not_claim_zero_outcomes(tmp_path, monkeypatch):
    """A garbage file planted in the hot tier makes the subject's entries uncountable; the
    receipt must then say the outcomes could not be counted either (None), not 0."""
    from serve_journal.privacy.forget import forget
    from serve_journal.privacy.keyring import Keyring
    from serve_journal.privacy.subjects import VaultPseudonymizer
    from serve_journal.privacy.vault import SubjectVault

    monkeypatch.delenv("SERVE_JOURNAL_KEK", raising=False)
    privacy = tmp_path / "privacy"
    ring = Keyring.local_default(privacy)
    vault = SubjectVault.local_default(privacy, ring)
    try:
        tokens = [p.subject_token for p in VaultPseudonymizer(ring, vault).protect(
            ["alice-4711"], [None])]
        root = str(tmp_path / "journal")
        settings = SinkSettings(journal_uri=root)
        storage = settings.storage()
        entries = make_entries(6, start=DAY, spread_s=3000, tokens=tokens)
        write_signed(settings, storage, "w00", entries, files=1)
        assert record_outcomes(root, _later(entries, 6), source="cb", now=RECORDED).accepted == 6
        key = DEFAULT_SPEC.key_for("fraud", DAY)
        storage.put_new(DEFAULT_SPEC.file_path(key, "garbage"), b"PAR1 not a parquet file")
        receipt = forget("alice-4711", vault=vault, journal_storage=storage)
        assert receipt.entries_unlinkable is None
        assert receipt.outcomes_unlinkable is None
    finally:
        vault.close()


def test_readers_without_a_trust_anchor_skip_a_garbage_record_in_a_source_chain(journal,
                                                                                monkeypatch):
    """No key for readers (production without SERVE_JOURNAL_PUBLIC_KEY_FILE): a garbage object
    planted in a source chain is skipped, not a crash of every outcome reader."""
    import serve_journal.integrity.trust as trust

    root, _, storage, entries = journal
    record_outcomes(root, _later(entries, 2), source="cb", now=RECORDED)
    storage.put_new("_manifest/outcomes.cb/000000000007.json", b"{not json")
    monkeypatch.setenv("SERVE_JOURNAL_DEV_MODE", "0")
    monkeypatch.delenv("SERVE_JOURNAL_PUBLIC_KEY_FILE", raising=False)
    monkeypatch.delenv("SERVE_JOURNAL_KEY_FINGERPRINT", raising=False)
    assert trust.reader_trust(root) is None
    assert load_outcomes(root).num_rows == 2


def test_concurrent_ingests_of_one_source_all_land_and_sign(journal):
    """The unsigned-tail check must not refuse a concurrent ingest of the same source whose
    record is momentarily ahead of its checkpoint: every batch lands once, the chain verifies."""
    import threading

    root, settings, storage, entries = journal
    ids = entries["request_id"].to_pylist()
    when = DAY + dt.timedelta(days=2)
    barrier = threading.Barrier(4)
    results, errors = [], []

    def ingest(k: int) -> None:
        batch = [{"request_id": r, "label": "legit", "outcome_time": when}
                 for r in ids[k * 5:(k + 1) * 5]]
        barrier.wait()
        try:
            results.append(record_outcomes(root, batch, source="cb", now=RECORDED).accepted)
        except Exception as exc:  # noqa: BLE001 - collected and asserted below
            errors.append(exc)

    threads = [threading.Thread(target=ingest, args=(k,)) for k in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert errors == [] and sorted(results) == [5, 5, 5, 5]
    assert load_outcomes(root).num_rows == 20
    report = verify_journal(storage, public_key=settings.signer().export_public_key())
    assert report.ok and report.outcomes == 20, format_report(report)


def test_a_rewritten_head_record_of_a_source_chain_is_never_signed_over(journal, short_wait):
    """The attacker replaces the signed head record of the source's chain (new content, hash
    recomputed): the next ingest must not link to it and sign it."""
    import dataclasses

    from serve_journal.errors import ManifestError
    from serve_journal.integrity.manifest import ManifestRecord, record_path

    root, settings, storage, entries = journal
    record_outcomes(root, _later(entries, 2), source="cb", now=RECORDED)
    head_path = os.path.join(root, record_path("outcomes.cb", 0))
    head = ManifestRecord.from_json(Path(head_path).read_bytes())
    edited = dataclasses.replace(head, row_count=head.row_count + 1, record_hash="")
    edited = dataclasses.replace(edited, record_hash=edited.compute_hash())
    os.chmod(head_path, 0o644)
    with open(head_path, "wb") as handle:
        handle.write(edited.to_json())
    with pytest.raises(ManifestError, match="rewritten"):
        record_outcomes(root, _later(entries, 1), source="cb", now=RECORDED)
