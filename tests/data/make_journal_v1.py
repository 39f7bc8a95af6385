"""Generate ``tests/data/journal_v1/``: a small journal written by the previous release (entry
schema v1), the test data of tests/test_schema_versions.py.

It must run against the last commit before schema v2 (a672f9f), so the files are what that
release really wrote, not what the current code thinks it wrote::

    git clone /work/main /tmp/v1src && git -C /tmp/v1src checkout a672f9f
    PYTHONPATH=/tmp/v1src /work/main/.venv/bin/python tests/data/make_journal_v1.py

(``PYTHONPATH`` puts the old package first; the script refuses to run on schema v2.) It replaces
``tests/data/journal_v1/`` with:

- ``journal/``: model ``fraud``; day 2026-11-20 written as hour files then compacted into its
  day partition (``hour=all``, commit marker, compactor chain), day 2026-11-21 as hot files in
  hours 10 and 11 (two writer chains, several files per hour); every file recorded in a
  hash-chained manifest with signed checkpoints. Entries of three risk tiers, subject tokens and
  feature HMACs from the keyring below; no raw subject id or feature value.
- ``journal-signing/signing.pem`` and ``auditor.pub.pem``: the manifest signing key and the
  auditor's copy of its public key (test keys, nothing else uses them).
- ``journal-keys/``: the privacy folder (KEK file, keyring, subject vault) the HMACs were made
  with, as replay's verifier reads it.
- ``features/``: a Parquet feature store of synthetic feature values, as of each entry's time,
  to replay against.
- ``kafka_v1_messages.json``: two entries as that release's Kafka wire format carried them
  (headers and value, value as text).

Deterministic apart from keys, tokens and HMACs (fresh keys each run).
"""

from __future__ import annotations

import datetime as dt
import json
import os
import shutil
import sys
from pathlib import Path

import pyarrow as pa

from serve_journal import schema
from serve_journal.catalog.layout import split_by_partition
from serve_journal.integrity.encoding import canonical_encode
from serve_journal.integrity.manifest import ManifestLog, ManifestSigner
from serve_journal.maintain.compaction import run_compaction
from serve_journal.privacy.keyring import Keyring
from serve_journal.privacy.subjects import SubjectVault, VaultPseudonymizer
from serve_journal.replay.featurestore import ParquetFeatureStore
from serve_journal.sink.settings import SinkSettings, manifest_hook
from serve_journal.sink.writer import PartitionFileWriter
from serve_journal.storage import LocalJournalStorage
from serve_journal.transport import wire

OUT = Path(__file__).resolve().parent / "journal_v1"
MODEL = "fraud"
SUBJECTS = [f"user-{i:02d}" for i in range(12)]  # synthetic ids; only their tokens are journaled
TIERS = ("high", "medium", "low")
DAY1 = dt.datetime(2026, 11, 20, tzinfo=dt.UTC)
DAY2 = dt.datetime(2026, 11, 21, tzinfo=dt.UTC)


def features_of(n: int) -> dict:
    """Synthetic feature values of entry ``n``."""
    return {"amount": round(10 + (n * 37 % 500) / 3, 2), "hour": n % 24, "country": "NL" if n % 3 else "DE",
            "new_device": n % 5 == 0}


def entries(pseudonymizer: VaultPseudonymizer, producer: str, start: dt.datetime, count: int,
            first_seq: int, store: ParquetFeatureStore) -> pa.Table:
    """``count`` v1 entries of ``producer``, one every 90 s from ``start``."""
    rows, subjects, encoded = [], [], []
    for i in range(count):
        n = first_seq + i + (0 if producer.endswith("a") else 1000)
        ts = start + dt.timedelta(seconds=90 * i)
        subject = SUBJECTS[n % len(SUBJECTS)] if n % 7 else None  # some calls name no subject
        features = features_of(n)
        if subject is not None:
            store.write(subject, features, ts - dt.timedelta(seconds=1))
        subjects.append(subject)
        encoded.append(canonical_encode(features))
        score = (n * 29 % 100) / 100
        tier = TIERS[n % 3]
        rows.append({
            "schema_version": schema.SCHEMA_VERSION, "request_id": f"req-{producer}-{first_seq + i}",
            "ts": ts, "caller": "svc-checkout", "model_name": MODEL, "model_version": "3",
            "dataset_hash": "sha256:" + "ab" * 32, "dataset_hash_source": "tag",
            "outputs": [{"label": "fraud", "score": score}, {"label": "ok", "score": 1 - score}],
            "score": score, "threshold": 0.5, "decision": "block" if score >= 0.5 else "allow",
            "explanation_ref": None, "outcome": "ok", "error_type": None,
            "latency_ms": 1.5 + n % 4, "risk_tier": tier, "sample_rate": 1.0,
            "producer_id": producer, "seq": first_seq + i, "app_name": "fraud-app",
            "deployment": "FraudModel", "replica": f"FraudModel#{producer}",
        })
    for row, protected in zip(rows, pseudonymizer.protect(subjects, encoded), strict=True):
        row.update(subject_token=protected.subject_token, features_hmac=protected.features_hmac,
                   key_id=protected.key_id)
    return pa.Table.from_pylist(rows, schema=schema.ENTRY_SCHEMA)


def write(writer: PartitionFileWriter, table: pa.Table, name: str) -> None:
    for key, rows in split_by_partition(table):
        writer.write_file(key, pa.Table.from_batches([rows]) if isinstance(rows, pa.RecordBatch)
                          else rows, name=f"{writer.name_prefix}-{name}-{key.hour:02d}")


def main() -> None:
    if schema.SCHEMA_VERSION != 1:
        sys.exit(f"run against the previous release (a672f9f, schema v1), not schema "
                 f"v{schema.SCHEMA_VERSION}: see this file's docstring")
    os.environ.pop("SERVE_JOURNAL_KEK", None)
    shutil.rmtree(OUT, ignore_errors=True)
    (OUT / "journal-signing").mkdir(parents=True)
    signer = ManifestSigner.generate()
    key_file = OUT / "journal-signing" / "signing.pem"
    signer.save(key_file)
    (OUT / "auditor.pub.pem").write_bytes(signer.export_public_key())
    journal_uri = str(OUT / "journal")
    storage = LocalJournalStorage(journal_uri)
    settings = SinkSettings(journal_uri=journal_uri, signing_key_file=str(key_file))

    keyring = Keyring.local_default(OUT / "journal-keys")
    vault = SubjectVault.local_default(OUT / "journal-keys", keyring)
    store = ParquetFeatureStore(OUT / "features")
    try:
        pseudonymizer = VaultPseudonymizer(keyring, vault)
        seq = {"replica-a": 0, "replica-b": 0}
        logs = {p: ManifestLog(storage, f"writer-{p}", signer) for p in seq}
        writers = {p: PartitionFileWriter(storage, p, roll_seconds=3600, roll_bytes=1 << 30,
                                          on_file_written=[manifest_hook(logs[p])]) for p in seq}

        def batch(producer: str, start: dt.datetime, count: int, name: str) -> None:
            table = entries(pseudonymizer, producer, start, count, seq[producer], store)
            seq[producer] += count
            write(writers[producer], table, name)

        # Day 1: hour files, compacted below into the day partition.
        for producer in seq:
            batch(producer, DAY1 + dt.timedelta(hours=9), 20, "d1a")
            batch(producer, DAY1 + dt.timedelta(hours=9, minutes=30), 20, "d1b")
        for log in logs.values():
            log.checkpoint()
        report = run_compaction(journal_uri, apply=True, settings=settings,
                                now=DAY2 + dt.timedelta(minutes=30))
        assert report.compacted, report
        # Day 2: hot files in hours 10 and 11, left as written.
        for producer in seq:
            batch(producer, DAY2 + dt.timedelta(hours=10), 15, "d2a")
            batch(producer, DAY2 + dt.timedelta(hours=10, minutes=25), 15, "d2b")
            batch(producer, DAY2 + dt.timedelta(hours=11, minutes=5), 15, "d2c")
        for log in logs.values():
            log.checkpoint()
        sample = entries(pseudonymizer, "replica-k", DAY2 + dt.timedelta(hours=12), 2, 0, store)
        messages = [{"headers": {k: v.decode() for k, v in wire.HEADERS}, "value": m.value.decode()}
                    for m in wire.encode_batch(sample)]
        (OUT / "kafka_v1_messages.json").write_text(json.dumps(messages, indent=1) + "\n")
    finally:
        store.close()
        vault.close()
    for lock in OUT.rglob("*.lock"):
        lock.unlink()  # a lock file of the keyring, not data
    total = sum(f.stat().st_size for f in OUT.rglob("*") if f.is_file())
    print(f"wrote {OUT} ({total} bytes, entries per producer {seq})")


if __name__ == "__main__":
    main()
