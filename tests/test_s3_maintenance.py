"""Compaction and lifecycle on ``s3://`` from the CLI, the production way: a signing key from a
file outside the journal, a witness bucket, and write-once retention (Object Lock) for the files
they write. Afterwards verify, with the auditor's key and the witness, is clean; the cold files
are locked under the cold policy; the rewrites' chains are witnessed. (Moto S3 server.)"""

from __future__ import annotations

import json
from urllib.parse import urlparse

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest
from click.testing import CliRunner

from serve_journal.catalog.layout import split_by_partition
from serve_journal.cli import main
from serve_journal.read.verify import format_report, verify_journal
from serve_journal.schema import DERIVED_SCORES
from serve_journal.sink.settings import SinkSettings, manifest_hook
from serve_journal.sink.writer import PartitionFileWriter
from serve_journal.storage import open_storage
from tests.fixtures.s3 import signed_s3_journal
from tests.helpers.entries import DAY, ids, make_entries
from tests.helpers.journal import signing_key_files

pytestmark = pytest.mark.slow

RETENTION = {"hot": {"name": "custom", "days": 1, "mode": "GOVERNANCE"},
             "cold": {"name": "custom", "days": 2, "mode": "COMPLIANCE"}}


def test_compact_and_lifecycle_on_s3_sign_witness_and_lock(s3_bucket, tmp_path, monkeypatch):
    journal, witness = signed_s3_journal(s3_bucket, monkeypatch)
    key_file, public = signing_key_files(tmp_path)

    settings = SinkSettings(journal, witness_uri=witness, signing_key_file=str(key_file),
                            retention=RETENTION)
    storage = settings.storage()
    log = settings.manifest(storage, "w00-s3")
    writer = PartitionFileWriter(storage, "w00-s3", roll_seconds=3600.0, roll_bytes=1 << 40,
                                 on_file_written=[manifest_hook(log)])
    table = make_entries(60, start=DAY, spread_s=3 * 3600)
    for start in range(0, 60, 20):  # several files per hour partition
        for batch in table.slice(start, 20).to_batches():
            for key, part in split_by_partition(batch):
                writer.add(key, part)
        writer.roll_all()
    log.checkpoint()

    options = ["--journal", journal, "--signing-key-file", str(key_file), "--witness", witness,
               "--retention", json.dumps(RETENTION)]
    runner = CliRunner()
    compacted = runner.invoke(main, ["compact", "--apply", *options])
    assert compacted.exit_code == 0, compacted.output
    assert "manifest chain: compactor-" in compacted.output
    moved = runner.invoke(main, ["lifecycle", "run", "--apply", "--hot-days", "30", *options])
    assert moved.exit_code == 0, moved.output
    assert "manifest chain: lifecycle-" in moved.output

    report = verify_journal(storage, public_key=str(public), witness=open_storage(witness))
    assert report.ok, format_report(report)
    assert report.truncation_excluded
    cold = storage.list_files("cold/", ".parquet")
    assert cold and not storage.list_files("hot/", ".parquet")
    head = storage.client.head_object(Bucket=storage.bucket, Key=storage.key(cold[0]))
    assert head["ObjectLockMode"] == "COMPLIANCE"
    witnessed = {path.split("/")[1] for path in open_storage(witness).list_files("_checkpoints")}
    assert any(c.startswith("compactor-") for c in witnessed)
    assert any(c.startswith("lifecycle-") for c in witnessed)
    from serve_journal.read.query import JournalQuery

    monkeypatch.setenv("SERVE_JOURNAL_PUBLIC_KEY_FILE", str(public))
    with JournalQuery(storage, actor="s3-maintenance-test") as query:
        found = query.find(tier="all")
        assert ids(found) == ids(table)
        # the cold file left out the output scores that follow from score; the dataset scan of
        # s3:// (not DuckDB's local read) restores them
        stored = pq.ParquetFile(pa.BufferReader(storage.read(cold[0])))
        assert DERIVED_SCORES in stored.schema_arrow.names
        assert pc.struct_field(pc.list_flatten(stored.read()["outputs"]), "score").null_count > 0

        def outputs(t):
            return dict(zip(t["request_id"].to_pylist(), t["outputs"].to_pylist(), strict=True))

        assert outputs(found) == outputs(table)


def test_compact_on_s3_without_a_signing_key_says_so(s3_bucket, monkeypatch):
    for name, value in s3_bucket.server.env.items():
        monkeypatch.setenv(name, value)
    endpoint = urlparse(s3_bucket.server.endpoint_url)
    journal = (f"s3://{s3_bucket.name}/journal?endpoint_override={endpoint.netloc}"
               f"&scheme={endpoint.scheme}")
    result = CliRunner().invoke(main, ["compact", "--apply", "--journal", journal])
    assert result.exit_code != 0
    assert "signing_key_file" in str(result.exception)
