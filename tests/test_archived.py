"""Cold files the recommended bucket lifecycle moved to Glacier (moto S3 server, Object Lock).

The journal is written the production way (signed writer chains, compaction and lifecycle from
the CLI with a signing key and retention), then the bucket's lifecycle transition is applied:
moto implements GLACIER objects (GETs refused with InvalidObjectState, RestoreObject) but not
lifecycle rules, so the test moves each cold object's stored version to GLACIER in the server,
as S3 does (same version id, no new version). Then: verify reports "restore needed" or checks
the archived files from their signed records; forget and replay say "restore needed" with the
command instead of a traceback; ``serve-journal restore`` restores them and everything reads.
"""

from __future__ import annotations

import json

import pytest
from click.testing import CliRunner

from serve_journal.catalog.layout import split_by_partition
from serve_journal.cli import main
from serve_journal.errors import ArchivedObjectError
from serve_journal.privacy.forget import count_subject_entries, count_subject_index
from serve_journal.privacy.keyring import Keyring
from serve_journal.privacy.subjects import VaultPseudonymizer
from serve_journal.privacy.vault import SubjectVault
from serve_journal.read.verify import format_report, verify_journal
from serve_journal.replay.driver import replay
from serve_journal.replay.featurestore import ParquetFeatureStore
from serve_journal.replay.verifiers import StaticKeyVerifier
from serve_journal.sink.settings import SinkSettings, manifest_hook
from serve_journal.sink.writer import PartitionFileWriter
from serve_journal.storage.archive import archive_states, unreadable_archived
from tests.fixtures.s3 import signed_s3_journal
from tests.helpers.entries import DAY, make_entries, token
from tests.helpers.journal import signing_key_files

pytestmark = pytest.mark.slow

RETENTION = {"hot": {"name": "custom", "days": 1, "mode": "GOVERNANCE"},
             "cold": {"name": "custom", "days": 2, "mode": "COMPLIANCE"}}
SUBJECT = token("bg-3")


def transition_to_glacier(storage, prefix: str = "cold/") -> list[str]:
    """What the bucket lifecycle rule does after ``glacier_after_days``: every stored version
    below ``prefix`` changes storage class in place (moto has no lifecycle engine)."""
    from moto.s3.models import s3_backends  # the in-process ThreadedMotoServer's state

    moved = []
    for account in s3_backends.values():
        for backend in account.values():
            bucket = backend.buckets.get(storage.bucket)
            if bucket is None:
                continue
            for name in list(bucket.keys.keys()):
                if name.startswith(storage.key(prefix)):
                    for version in bucket.keys.getlist(name):
                        version.set_storage_class("GLACIER")
                    moved.append(storage._relative(name))
    assert moved, f"nothing under {prefix}"
    return sorted(moved)


@pytest.fixture
def archived_journal(s3_bucket, tmp_path, monkeypatch):
    journal, _ = signed_s3_journal(s3_bucket, monkeypatch, witness=False)
    key_file, public = signing_key_files(tmp_path)
    settings = SinkSettings(journal, signing_key_file=str(key_file), retention=RETENTION)
    storage = settings.storage()
    log = settings.manifest(storage, "w00-s3")
    writer = PartitionFileWriter(storage, "w00-s3", roll_seconds=3600.0, roll_bytes=1 << 40,
                                 on_file_written=[manifest_hook(log)])
    monkeypatch.delenv("SERVE_JOURNAL_KEK", raising=False)
    privacy = tmp_path / "privacy"
    ring = Keyring.local_default(privacy)
    vault = SubjectVault.local_default(privacy, ring)
    (alice,) = [p.subject_token for p in VaultPseudonymizer(ring, vault).protect(["alice"], [None])]
    vault.close()
    table = make_entries(60, start=DAY, spread_s=36 * 3600,
                         tokens=[alice, *(token(f"bg-{i}") for i in range(6))])
    for start in range(0, 60, 20):
        for batch in table.slice(start, 20).to_batches():
            for key, part in split_by_partition(batch):
                writer.add(key, part)
        writer.roll_all()
    log.checkpoint()
    options = ["--journal", journal, "--signing-key-file", str(key_file),
               "--retention", json.dumps(RETENTION)]
    runner = CliRunner()
    assert runner.invoke(main, ["compact", "--apply", *options]).exit_code == 0
    moved = runner.invoke(main, ["lifecycle", "run", "--apply", "--hot-days", "30", *options])
    assert moved.exit_code == 0, moved.output
    clean = verify_journal(storage, public_key=str(public))
    assert clean.ok and clean.archived_unchecked == 0, format_report(clean)
    cold = transition_to_glacier(storage)
    assert not storage.list_files("hot/", ".parquet")
    return {"journal": journal, "storage": storage, "public": str(public), "cold": cold,
            "table": table, "tmp": tmp_path, "privacy": str(privacy), "alice": alice}


def test_reading_an_archived_file_is_a_typed_restore_needed_error(archived_journal):
    storage, cold = archived_journal["storage"], archived_journal["cold"]
    with pytest.raises(ArchivedObjectError) as info:
        storage.read(cold[0])
    assert info.value.paths == (cold[0],)
    assert info.value.restore_command == f"serve-journal restore --journal {storage.uri}"
    assert "restore needed" in str(info.value)
    assert unreadable_archived(storage) == cold and len(cold) == 2
    assert {s.storage_class for s in archive_states(storage).values()} == {"GLACIER"}


def test_verify_reports_restore_needed_and_checks_from_signed_records_when_asked(archived_journal):
    storage, public, cold = (archived_journal[k] for k in ("storage", "public", "cold"))
    report = verify_journal(storage, public_key=public)
    assert report.ok, format_report(report)
    (warning,) = [p for p in report.warnings if p.kind == "restore-needed"]
    assert f"{len(cold)} archived file(s) not checked" in warning.detail
    assert f"serve-journal restore --journal {storage.uri}" in warning.detail
    assert report.archived_unchecked == len(cold) and report.archived_from_records == 0
    assert "NOT checked (restore needed)" in format_report(report)

    by_records = verify_journal(storage, public_key=public, archived="records")
    assert by_records.ok, format_report(by_records)
    assert not [p for p in by_records.problems if p.kind == "restore-needed"]
    assert by_records.archived_from_records == len(cold) and by_records.archived_unchecked == 0
    assert by_records.entries == archived_journal["table"].num_rows
    assert "content not re-hashed" in format_report(by_records)

    result = CliRunner().invoke(main, ["verify", "--journal", archived_journal["journal"],
                                       "--public-key", public, "--archived", "records",
                                       "--reports-dir", str(archived_journal["tmp"] / "r")])
    assert result.exit_code == 0, result.output
    assert "checked from their signed manifest records only" in result.output


def test_records_mode_still_catches_an_archived_file_replaced_without_the_key(archived_journal):
    """The attacker writes the bucket (a new version of an archived file, archived too) but
    holds no key: the current version is not the recorded one, and it is an extra version."""
    storage, public, cold = (archived_journal[k] for k in ("storage", "public", "cold"))
    storage.client.put_object(Bucket=storage.bucket, Key=storage.key(cold[0]),
                              Body=b"PAR1 forged", StorageClass="GLACIER")
    for mode in ("records", "report"):
        report = verify_journal(storage, public_key=public, archived=mode)
        assert not report.ok, format_report(report)
        kinds = {p.kind for p in report.errors if p.path == cold[0]}
        assert "extra-object-version" in kinds, format_report(report)
        if mode == "records":  # the record names another version than the current one
            assert "file-version-mismatch" in kinds, format_report(report)


def test_forget_and_replay_say_restore_needed_then_restore_makes_everything_readable(
        archived_journal, monkeypatch):
    storage, journal, cold = (archived_journal[k] for k in ("storage", "journal", "cold"))
    count = count_subject_index(storage, SUBJECT)
    assert not count.complete and count.archived == tuple(cold) and count.entries == 0
    with pytest.raises(ArchivedObjectError, match="restore needed"):
        count_subject_entries(storage, SUBJECT)

    forgot = CliRunner().invoke(main, ["forget", "--journal", journal, "--subject", "-",
                                       "--privacy-dir", archived_journal["privacy"]],
                                input="alice\n")
    assert forgot.exit_code == 3, forgot.output
    receipt = json.loads(forgot.stdout[forgot.stdout.index("{"):forgot.stdout.rindex("}") + 1])
    assert receipt["status"] == "shredded" and receipt["entries_unlinkable"] is None
    assert receipt["uncounted_files"] == cold and receipt["entries_counted"] == 0
    assert receipt["restore_command"] == f"serve-journal restore --journal {journal}"
    assert "restore needed" in forgot.stderr and "Traceback" not in forgot.output

    tmp = archived_journal["tmp"]
    key_file = tmp / "static.key"
    key_file.write_text(("6b" * 32) + "\n")
    with pytest.raises(ArchivedObjectError) as info:
        replay(journal, model="fraud", feature_store=ParquetFeatureStore(tmp / "features"),
               verifier=StaticKeyVerifier("k1", b"k" * 32), progress=False)
    assert set(info.value.paths) == set(cold)
    result = CliRunner().invoke(main, ["replay", "--model", "fraud", "--journal", journal,
                                       "--features", str(tmp / "features"),
                                       "--static-key-file", str(key_file)])
    assert result.exit_code == 3 and "restore needed" in result.output
    assert "serve-journal restore --journal" in result.output and "Traceback" not in result.output

    runner = CliRunner()
    first = runner.invoke(main, ["restore", "--journal", journal, "--days", "2",
                                 "--tier", "Bulk"])
    assert first.exit_code == 75, first.output  # asked for; readable is known on the next run
    assert f"archived files: {len(cold)}; restore started {len(cold)}" in first.output
    again = runner.invoke(main, ["restore", "--journal", journal])
    assert again.exit_code == 0 and f"restored (readable) {len(cold)}" in again.output
    assert unreadable_archived(storage) == []
    assert storage.read(cold[0])[:4] == b"PAR1"
    full = verify_journal(storage, public_key=archived_journal["public"])
    assert full.ok and full.archived_unchecked == 0 and not full.warnings, format_report(full)
    expected = sum(1 for t in archived_journal["table"]["subject_token"].to_pylist()
                   if t == archived_journal["alice"])
    assert count_subject_entries(storage, archived_journal["alice"]) == (expected, [("fraud", "3")])


def test_restore_range_and_local_journals(archived_journal, tmp_path):
    journal = archived_journal["journal"]
    none = CliRunner().invoke(main, ["restore", "--journal", journal, "--since", "2030-01-01"])
    assert none.exit_code == 0 and "no archived files" in none.output
    local = CliRunner().invoke(main, ["restore", "--journal", str(tmp_path / "j")])
    assert local.exit_code == 0 and "no archived files" in local.output
