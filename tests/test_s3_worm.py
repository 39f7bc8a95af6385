"""Write-once S3 storage against a real S3 API (moto server, Object Lock bucket), and the
retention policies it applies."""

from __future__ import annotations

import base64
import datetime as dt
import hashlib

import pytest
from botocore.exceptions import ClientError

from serve_journal.storage import ObjectExistsError
from serve_journal.storage.retention import (
    FINRA_4511,
    SEC_17A_4,
    RetentionError,
    RetentionPolicy,
    TieredRetention,
    policy,
)
from serve_journal.storage.s3 import S3WormStorage


def worm(bucket, *, prefix="journal", retention=None) -> S3WormStorage:
    server = bucket.server
    return S3WormStorage(
        bucket.name, prefix, retention=retention, endpoint_url=server.endpoint_url,
        region=server.region, access_key=server.access_key, secret_key=server.secret_key,
    )


def test_overwrite_is_refused_with_412(s3_bucket):
    storage = worm(s3_bucket, retention=TieredRetention(hot=RetentionPolicy.custom(days=1)))
    first = storage.put_new("hot/a.parquet", b"first")
    assert first.version_id and first.sha256 == hashlib.sha256(b"first").hexdigest()
    with pytest.raises(ObjectExistsError, match="hot/a.parquet") as caught:
        storage.put_new("hot/a.parquet", b"second")
    assert caught.value.__cause__.response["ResponseMetadata"]["HTTPStatusCode"] == 412
    assert storage.read_versioned("hot/a.parquet") == (b"first", first.version_id)
    assert [v.version_id for v in storage.list_versions("hot/")] == [first.version_id]


def test_locked_version_cannot_be_deleted(s3_bucket):
    storage = worm(s3_bucket, retention=SEC_17A_4)
    stored = storage.put_new("cold/a.parquet", b"entries")
    with pytest.raises(ClientError) as caught:
        storage.delete_version("cold/a.parquet", stored.version_id)
    assert caught.value.response["ResponseMetadata"]["HTTPStatusCode"] == 403
    with pytest.raises(ClientError):
        storage.delete_version("cold/a.parquet", stored.version_id, bypass_governance=True)
    assert storage.read("cold/a.parquet") == b"entries"


def test_puts_carry_lock_mode_retain_until_and_checksum(s3_bucket):
    hot = RetentionPolicy.custom(days=30, mode="GOVERNANCE", name="hot 30 days")
    storage = worm(s3_bucket, retention=TieredRetention(hot=hot, cold=FINRA_4511))
    before = dt.datetime.now(dt.UTC)
    storage.put_new("hot/h.parquet", b"h")
    storage.put_new("cold/c.parquet", b"c")
    storage.put_new("_manifest/w/000000000000.json", b"{}")
    after = dt.datetime.now(dt.UTC)
    checks = [("hot/h.parquet", hot), ("cold/c.parquet", FINRA_4511),
              ("_manifest/w/000000000000.json", FINRA_4511)]  # manifests: the longest policy
    for path, expected in checks:
        mode, until = storage.retention_of(path)
        assert mode == expected.mode
        low = expected.retain_until(before) - dt.timedelta(seconds=1)
        assert low <= until <= expected.retain_until(after) + dt.timedelta(seconds=1)
    head = storage.client.head_object(Bucket=s3_bucket.name, Key=storage.key("hot/h.parquet"),
                                      ChecksumMode="ENABLED")
    assert head["ChecksumSHA256"] == base64.b64encode(hashlib.sha256(b"h").digest()).decode()


def test_listing_reading_and_delete_markers(s3_bucket):
    storage = worm(s3_bucket)
    other = worm(s3_bucket, prefix="elsewhere")
    other.put_new("hot/z.parquet", b"z")
    storage.put_new("hot/b.parquet", b"b")
    storage.put_new("hot/a.parquet", b"a")
    assert storage.list_files("hot/", ".parquet") == ["hot/a.parquet", "hot/b.parquet"]
    assert storage.exists("hot/a.parquet") and not storage.exists("hot/c.parquet")
    with pytest.raises(FileNotFoundError, match="hot/c.parquet"):
        storage.read("hot/c.parquet")
    storage.delete("hot/a.parquet")  # versioned bucket: only a delete marker
    assert storage.list_files("hot/") == ["hot/b.parquet"]
    versions = [v for v in storage.list_versions("hot/a") if v.path == "hot/a.parquet"]
    assert sorted(v.is_delete_marker for v in versions) == [False, True]
    old = next(v for v in versions if not v.is_delete_marker)
    assert storage.read_versioned("hot/a.parquet", old.version_id) == (b"a", old.version_id)


def test_from_uri_reads_endpoint_and_prefix(s3_bucket):
    server = s3_bucket.server
    host = server.endpoint_url.split("://", 1)[1]
    storage = S3WormStorage.from_uri(
        f"s3://{s3_bucket.name}/deep/prefix?endpoint_override={host}&scheme=http&region={server.region}",
        access_key=server.access_key, secret_key=server.secret_key,
    )
    stored = storage.put_new("hot/a.parquet", b"a")
    assert storage.key("hot/a.parquet") == "deep/prefix/hot/a.parquet"
    assert storage.uri == f"s3://{s3_bucket.name}/deep/prefix"
    assert stored.version_id
    # The pyarrow filesystem beside it sees the same object.
    with storage.filesystem.open_input_stream(storage.full_path("hot/a.parquet")) as stream:
        assert stream.read() == b"a"


def test_retention_policies_are_named_configuration():
    created = dt.datetime(2024, 2, 29, 12, 0, tzinfo=dt.UTC)
    assert SEC_17A_4.retain_until(created) == dt.datetime(2030, 3, 1, 12, 0, tzinfo=dt.UTC)
    assert SEC_17A_4.describe() == "SEC 17a-4: 6 years, COMPLIANCE"
    assert policy("FINRA 4511") is FINRA_4511 and policy("sec 17a-4(f)") is SEC_17A_4
    custom = policy({"name": "bank policy", "years": 7, "days": 10, "mode": "GOVERNANCE"})
    assert custom.retain_until(dt.datetime(2025, 1, 1, tzinfo=dt.UTC)) == dt.datetime(
        2032, 1, 11, tzinfo=dt.UTC)
    tiers = TieredRetention.from_config({"hot": {"name": "hot", "days": 7}, "cold": "SEC 17a-4"})
    assert tiers.for_path("hot/model=m/x.parquet").days == 7
    assert tiers.for_path("cold/model=m/x.parquet") is SEC_17A_4
    assert tiers.for_path("_checkpoints/w/000000000001.json") is SEC_17A_4
    with pytest.raises(RetentionError, match="mode"):
        RetentionPolicy.custom(years=1, mode="LOOSE")
    with pytest.raises(RetentionError, match="retention policy name"):
        policy("SR 11-7")
    with pytest.raises(RetentionError, match="years > 0 or days > 0"):
        RetentionPolicy.custom()
