"""Outcomes on ``s3://`` (moto S3 server, versioned bucket with Object Lock): recorded from
Python and from the CLI with a signing key outside the journal, a witness bucket and write-once
retention; each outcome file is locked under the journal's manifest policy, its chain is
witnessed, readers with the trust anchor take it, verify is clean, and deleting it (a delete
marker over the locked version) is named."""

from __future__ import annotations

import datetime as dt
import json

import pytest
from click.testing import CliRunner

from serve_journal.cli import main
from serve_journal.outcomes.record import load_outcomes, record_outcomes
from serve_journal.read.verify import format_report, verify_journal
from serve_journal.sink.settings import SinkSettings
from serve_journal.storage import open_storage
from tests.fixtures.s3 import signed_s3_journal
from tests.helpers.entries import DAY, make_entries
from tests.helpers.journal import signing_key_files, write_signed

RETENTION = {"hot": {"name": "custom", "days": 1, "mode": "GOVERNANCE"},
             "cold": {"name": "custom", "days": 2, "mode": "COMPLIANCE"}}


@pytest.fixture
def s3_journal(s3_bucket, tmp_path, monkeypatch):
    journal, witness = signed_s3_journal(s3_bucket, monkeypatch)
    key_file, public = signing_key_files(tmp_path)
    settings = SinkSettings(journal, witness_uri=witness, signing_key_file=str(key_file),
                            retention=RETENTION)
    storage = settings.storage()
    entries = make_entries(30, start=DAY, spread_s=3600)
    write_signed(settings, storage, "w00-s3", entries, files=2)
    monkeypatch.setenv("SERVE_JOURNAL_PUBLIC_KEY_FILE", str(public))
    return settings, storage, entries, key_file, public


def test_outcomes_on_s3_are_signed_witnessed_locked_and_verified(s3_journal, tmp_path):
    settings, storage, entries, key_file, public = s3_journal
    ids = entries["request_id"].to_pylist()
    later = DAY + dt.timedelta(days=6)
    report = record_outcomes(settings.journal_uri, [
        {"request_id": ids[0], "label": True, "outcome_time": later},
        {"request_id": "unknown", "label": True, "outcome_time": later},
    ], source="chargebacks", settings=settings)
    assert (report.accepted, report.rejected_by_kind) == (1, {"unknown_request_id": 1})
    csv_file = tmp_path / "labels.csv"
    csv_file.write_text(f"request_id,label,outcome_time\n{ids[1]},false,{later.isoformat()}\n"
                        f"{ids[2]},true,{later.isoformat()}\n")
    cli = CliRunner().invoke(main, [
        "outcomes", "ingest", str(csv_file), "--journal", settings.journal_uri, "--source",
        "reviews", "--signing-key-file", str(key_file), "--witness", settings.witness_uri,
        "--retention", json.dumps(RETENTION)])
    assert cli.exit_code == 0, cli.output
    assert cli.output.startswith("accepted 2, rejected 0")

    files = storage.list_files("outcomes/", ".parquet")
    assert len(files) == 2
    for path in files:
        head = storage.client.head_object(Bucket=storage.bucket, Key=storage.key(path))
        assert head["ObjectLockMode"] == "COMPLIANCE"  # the manifest policy: the longest tier's
    witness = open_storage(settings.witness_uri)
    witnessed = {p.split("/")[1] for p in witness.list_files("_checkpoints")}
    assert {"outcomes.chargebacks", "outcomes.reviews"} <= witnessed
    stored = load_outcomes(storage)
    assert sorted(zip(stored["request_id"].to_pylist(), stored["label"].to_pylist(),
                      strict=True)) == sorted([(ids[0], "true"), (ids[1], "false"),
                                               (ids[2], "true")])
    verified = verify_journal(storage, public_key=str(public), witness=witness)
    assert verified.ok, format_report(verified)
    assert (verified.outcome_files, verified.outcomes) == (2, 3)

    storage.delete(files[0])  # a delete marker over the locked version
    verified = verify_journal(storage, public_key=str(public), witness=witness)
    named = {(p.kind, p.path) for p in verified.errors}
    assert ("file-missing", files[0]) in named, format_report(verified)
    assert ("delete-marker", files[0]) in named, format_report(verified)
