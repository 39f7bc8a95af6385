"""The attacker on S3: a versioned bucket with Object Lock (moto server), someone who can put,
overwrite and delete objects through the S3 API but holds no key and no governance bypass.

The journal is written the production way on S3 (writer chains through the writer path, signed
checkpoints, a compaction with its signed commit marker, signed exact counters with their key
certificate). For every area of the journal and every kind of write the attacker has, one object
is attacked; verify (with the chain heads the auditor kept from the run before) must fail and
name the object. Overwrites leave the locked version and add a new one; deletes add a delete
marker: verify names both, and the content checks of the local suite apply to what a reader now
gets. Readers, holding the journal's key (``SERVE_JOURNAL_PUBLIC_KEY_FILE``), never show what
verify rejects when verify passes. The randomized suite over every object is
``tests/test_adversary.py`` (local folder).
"""

from __future__ import annotations

import uuid

import pyarrow as pa
import pytest

from serve_journal.integrity.certificates import PURPOSE_COUNTERS, certify, publish
from serve_journal.integrity.manifest import ManifestLog, ManifestSigner
from serve_journal.maintain.compaction import compact, manifest_recorder, recorded_hashes
from serve_journal.read.query import JournalQuery
from serve_journal.read.verify import format_report, verify_journal
from serve_journal.storage.retention import RetentionPolicy, TieredRetention
from serve_journal.storage.s3 import S3WormStorage
from tests.helpers.attack import COMPACT_AT, write_journal_to_attack
from tests.helpers.entries import ids

pytestmark = pytest.mark.slow

AREAS = ("hot/", "_manifest/", "_checkpoints/", "_commits/", "_counters/", "_keys/")


def _journal(s3_bucket) -> tuple[S3WormStorage, ManifestSigner, pa.Table]:
    server = s3_bucket.server
    retention = TieredRetention(hot=RetentionPolicy.custom(days=1, mode="GOVERNANCE"),
                                cold=RetentionPolicy.custom(days=2))
    storage = S3WormStorage(s3_bucket.name, f"j-{uuid.uuid4().hex[:8]}", retention=retention,
                            endpoint_url=server.endpoint_url, region=server.region,
                            access_key=server.access_key, secret_key=server.secret_key)
    signer = ManifestSigner.generate()
    counters_key = ManifestSigner.generate()
    publish(storage, certify(signer, counters_key.public_key, PURPOSE_COUNTERS))
    written = write_journal_to_attack(storage, lambda c: ManifestLog(storage, c, signer),
                                      counters_key)
    log = ManifestLog(storage, "compactor-s3", signer)
    report = compact(storage, now=COMPACT_AT, on_file_written=manifest_recorder(log),
                     recorded=recorded_hashes(storage, signer.public_key),
                     before_delete=log.checkpoint, signer=signer)
    log.checkpoint()
    assert report.compacted, report.describe()
    return storage, signer, written


@pytest.mark.parametrize("area", AREAS)
@pytest.mark.parametrize("op", ["overwrite", "delete", "create"])
def test_an_attack_through_the_s3_api_fails_verify_and_names_the_object(
        s3_bucket, tmp_path, monkeypatch, area, op):
    storage, signer, written = _journal(s3_bucket)
    public = tmp_path / "auditor.pub.pem"
    public.write_bytes(signer.export_public_key())
    monkeypatch.setenv("SERVE_JOURNAL_PUBLIC_KEY_FILE", str(public))
    before = verify_journal(storage, public_key=signer.public_key)
    assert before.ok, format_report(before)
    objects = sorted(storage.list_files(area.rstrip("/"), suffix=""))
    assert objects, area
    target = objects[len(objects) // 2]
    data = storage.read(target)
    if op == "overwrite":  # a plain PutObject: S3 keeps the locked version, adds a new one
        flipped = bytearray(data)
        flipped[len(flipped) // 2] ^= 0x01
        storage.client.put_object(Bucket=storage.bucket, Key=storage.key(target),
                                  Body=bytes(flipped))
        named = target
    elif op == "delete":  # without a version id: a delete marker hides the object
        storage.delete(target)
        named = target
    else:  # a new object with the bytes of a genuine one, under another name
        folder, name = target.rsplit("/", 1)
        stem = name.split(".")[0]
        named = f"{folder}/{int(stem) + 100:012d}.json" if stem.isdigit() else f"{folder}/x{name}"
        storage.put_new(named, data)
    report = verify_journal(storage, public_key=signer.public_key, expected_heads=before.heads)
    text = format_report(report)
    problems = report.errors + (report.warnings if op == "create" else [])
    assert problems, f"{op} {named} went unnoticed:\n{text}"
    assert named in text, f"{op} {named} not named:\n{text}"
    if report.ok:  # readers never show what verify would reject
        with JournalQuery(storage, actor="adversary-test") as query:
            assert ids(query.find(tier="all")) == ids(written)
