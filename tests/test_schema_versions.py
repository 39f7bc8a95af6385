"""Entry schema v2 reads, verifies, rewrites and replays journals the previous release wrote.

The journal under tests/data/journal_v1/ was written by release a672f9f (entry schema v1; see
tests/data/make_journal_v1.py): hot files of two hours, a compacted day, signed manifests and
checkpoints, the keyring its HMACs were made with and a feature store. Every test works on a copy.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import shutil
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from serve_journal.catalog import live_files
from serve_journal.catalog.layout import split_by_partition
from serve_journal.fileformat import decode_parquet, encode_parquet
from serve_journal.integrity.fingerprint import fingerprint, fingerprint_files
from serve_journal.integrity.manifest import ManifestLog, ManifestRecord, ManifestSigner
from serve_journal.integrity.merkle import entry_leaf, table_leaves, table_merkle_root
from serve_journal.maintain.compaction import run_compaction
from serve_journal.maintain.lifecycle import run_lifecycle
from serve_journal.read.query import JournalQuery
from serve_journal.read.stats import stats
from serve_journal.read.verify import format_report, verify_journal
from serve_journal.replay.featurestore import ParquetFeatureStore
from serve_journal.replay.tasks import JOURNAL_COLUMNS, TaskSpec, replay_batch
from serve_journal.replay.verifiers import VaultVerifier
from serve_journal.schema import ADDED_COLUMNS, DERIVED_SCORES, ENTRY_SCHEMA, conform_entries
from serve_journal.sink.settings import SinkSettings, manifest_hook
from serve_journal.sink.writer import PartitionFileWriter
from serve_journal.storage import LocalJournalStorage
from serve_journal.transport import wire
from tests.fixtures.kafka import make_entries

DATA = Path(__file__).parent / "data" / "journal_v1"
V1_ENTRIES = 170
DAY2 = dt.datetime(2026, 11, 21, tzinfo=dt.UTC)


class V1Journal:
    """A writable copy of the v1 journal and its keys."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.uri = str(root / "journal")
        self.storage = LocalJournalStorage(self.uri)
        self.public_key = str(root / "auditor.pub.pem")
        self.key_file = str(root / "journal-signing" / "signing.pem")
        self.settings = SinkSettings(journal_uri=self.uri, signing_key_file=self.key_file)

    def verify(self, **kwargs):
        return verify_journal(self.storage, public_key=self.public_key, **kwargs)

    def query(self, **filters) -> pa.Table:
        return JournalQuery(self.storage, actor="test-schema-versions").find(model="fraud", tier="all",
                                                                            **filters)

    def records(self) -> dict[str, ManifestRecord]:
        out = {}
        for path in self.storage.list_files("_manifest/", ".json"):
            record = ManifestRecord.from_json(self.storage.read(path))
            out[record.path] = record
        return out

    def add_v2_file(self, n: int = 40) -> str:
        """``n`` v2 entries of a new producer in hour 10 of day 2, written the way a writer actor
        writes them (current encoder, manifest record, signed checkpoint); returns the path."""
        signer = ManifestSigner.from_pem_file(self.key_file)
        log = ManifestLog(self.storage, "writer-replica-c", signer)
        writer = PartitionFileWriter(self.storage, "replica-c", roll_seconds=3600, roll_bytes=1 << 30,
                                     on_file_written=[manifest_hook(log)])
        base = int((DAY2 + dt.timedelta(hours=10, minutes=30)).timestamp() * 1_000_000)
        batch = make_entries(n, producer_id="replica-c", base_ts_us=base, ts_step_us=1_000_000)
        ((key, rows),) = split_by_partition(pa.Table.from_batches([batch]))
        stored = writer.write_file(key, rows, name="replica-c-v2")
        log.checkpoint()
        return stored.path

    def overwrite(self, path: str, data: bytes) -> None:
        """What someone with write access to the storage (and no key) can do."""
        full = self.storage.full_path(path)
        os.chmod(full, 0o644)
        with open(full, "wb") as handle:
            handle.write(data)


@pytest.fixture
def v1(tmp_path) -> V1Journal:
    shutil.copytree(DATA, tmp_path / "v1")
    # git keeps no 0600: the secrets of the committed journal get back the mode their readers
    # require (a fresh clone checks them out 0644).
    for secret in ("journal-signing/signing.pem", "journal-keys/keys/kek"):
        os.chmod(tmp_path / "v1" / secret, 0o600)
    return V1Journal(tmp_path / "v1")


def _assert_clean(report) -> None:
    assert report.ok and not report.errors, format_report(report)


def _ids(table: pa.Table) -> list[tuple[str, int]]:
    return list(zip(table["producer_id"].to_pylist(), table["seq"].to_pylist(), strict=True))


def _hot_files(v1: V1Journal) -> list[str]:
    return sorted(f.path for f in live_files(v1.storage, tier="hot"))


def test_the_test_data_is_a_v1_journal_and_small():
    files = [p for p in DATA.rglob("*") if p.is_file()]
    assert sum(p.stat().st_size for p in files) < 300_000
    for path in DATA.joinpath("journal").rglob("*.parquet"):
        schema = pq.read_schema(path)
        assert not set(ADDED_COLUMNS) & set(schema.names), path
        assert set(pq.read_table(path, columns=["schema_version"])["schema_version"].to_pylist()) == {1}


def test_v1_journal_verifies_clean_with_the_public_key(v1):
    report = v1.verify()
    _assert_clean(report)
    assert report.entries == V1_ENTRIES


def test_v1_leaves_and_roots_are_unchanged_by_conform_entries(v1):
    """The old release's Merkle roots (in its manifest records) are what the current code computes
    over the same rows read under v2, leaf for leaf."""
    records = v1.records()
    for data_file in live_files(v1.storage, tier="all"):
        raw = pq.ParquetFile(pa.BufferReader(v1.storage.read(data_file.path))).read()
        conformed = conform_entries(raw)
        assert conformed.schema == ENTRY_SCHEMA
        assert table_leaves(raw) == table_leaves(conformed)
        assert [entry_leaf(r) for r in conformed.to_pylist()] == table_leaves(raw)
        assert table_merkle_root(conformed) == records[data_file.path].merkle_root
        assert fingerprint(raw) == fingerprint(conformed)


def test_query_returns_v1_rows_with_null_new_columns(v1):
    table = v1.query()
    assert table.schema == ENTRY_SCHEMA
    assert table.num_rows == V1_ENTRIES and len(set(_ids(table))) == V1_ENTRIES
    for name in ADDED_COLUMNS:
        assert table[name].null_count == table.num_rows
    token = next(t for t in table["subject_token"].to_pylist() if t)
    point = v1.query(subject_token=token)  # the pruned point-lookup path
    assert point.num_rows == table["subject_token"].to_pylist().count(token)
    assert point["model_digest"].null_count == point.num_rows


def test_v2_file_in_a_v1_partition_verifies_and_reads_mixed(v1):
    path = v1.add_v2_file()
    assert "model_digest" in pq.read_schema(v1.storage.full_path(path)).names
    report = v1.verify()
    _assert_clean(report)
    assert report.entries == V1_ENTRIES + 40
    table = v1.query()
    assert table.num_rows == V1_ENTRIES + 40
    v2_rows = table.filter(pa.compute.equal(table["producer_id"], "replica-c"))
    v1_rows = table.filter(pa.compute.not_equal(table["producer_id"], "replica-c"))
    assert v2_rows["model_digest"].null_count < v2_rows.num_rows  # the new values came through
    assert v2_rows["models"].null_count < v2_rows.num_rows
    assert v1_rows["model_digest"].null_count == v1_rows.num_rows
    assert set(v1_rows["schema_version"].to_pylist()) == {1}
    summary = stats(v1.storage, group_by=("model_name", "model_digest"))
    assert summary is not None


def test_compaction_of_a_mixed_partition_writes_one_v2_file_with_the_inputs_fingerprint(v1):
    v1.add_v2_file()
    day2_inputs = [p for p in _hot_files(v1) if "date=2026-11-21" in p]
    assert len(day2_inputs) == 7
    expected = fingerprint_files(v1.storage, day2_inputs)
    report = run_compaction(v1.uri, apply=True, settings=v1.settings,
                            now=DAY2 + dt.timedelta(days=1, hours=1))
    (new_files,) = report.compacted.values()
    assert len(new_files) == 1
    assert fingerprint_files(v1.storage, new_files) == expected
    rewritten = decode_parquet(v1.storage.read(new_files[0]))
    assert set(ADDED_COLUMNS) <= set(pq.read_schema(v1.storage.full_path(new_files[0])).names)
    old_rows = rewritten.filter(pa.compute.equal(rewritten["schema_version"], 1))
    assert old_rows.num_rows == 90  # the v1 rows keep their version and null new columns
    assert all(old_rows[name].null_count == old_rows.num_rows for name in ADDED_COLUMNS)
    _assert_clean(v1.verify())
    table = v1.query()
    assert table.num_rows == V1_ENTRIES + 40 and len(set(_ids(table))) == V1_ENTRIES + 40


def test_lifecycle_moves_v1_and_mixed_partitions_to_cold_and_verifies(v1):
    v1.add_v2_file()
    before = v1.query()
    run_compaction(v1.uri, apply=True, settings=v1.settings, now=DAY2 + dt.timedelta(days=1, hours=1))
    report = run_lifecycle(v1.uri, apply=True, hot_days=1, settings=v1.settings,
                           now=DAY2 + dt.timedelta(days=5))
    assert report.manifest_chain is not None
    cold = sorted(f.path for f in live_files(v1.storage, tier="cold"))
    assert cold and not _hot_files(v1)
    for path in cold:
        assert set(ADDED_COLUMNS) <= set(pq.read_schema(v1.storage.full_path(path)).names)
    _assert_clean(v1.verify())
    after = v1.query()
    assert sorted(_ids(after)) == sorted(_ids(before))
    assert len(set(_ids(after))) == after.num_rows
    assert fingerprint(after) == fingerprint(before)


def test_replay_verifies_the_hmacs_of_v1_entries(v1):
    """HMAC verification (no rescore) of the v1 entries against the keyring and feature store
    the old release wrote, on the batches a replay task gets."""
    table = v1.query().select(JOURNAL_COLUMNS)
    spec = TaskSpec(run_id="v1-replay", feature_store=ParquetFeatureStore(v1.root / "features"),
                    verifier=VaultVerifier.from_journal(v1.uri), rescorer=None, tokens=None,
                    since_us=None, until_us=None, decision=None, tolerance=1e-6)
    results = replay_batch(table, spec)
    with_subject = table["subject_token"].drop_null()
    statuses = dict(zip(results["request_id"].to_pylist(), results["hmac_status"].to_pylist(),
                        strict=True))
    assert len(with_subject) > 100
    wanted = [r for r, t in zip(table["request_id"].to_pylist(), table["subject_token"].to_pylist(),
                                strict=True) if t is not None]
    assert {statuses[r] for r in wanted} == {"verified"}


def _assert_every_subject_verified(v1, report) -> None:
    """Every v1 entry (not the added v2 file's) with a subject replayed as ``verified``."""
    assert report.total == V1_ENTRIES + 40
    statuses = {r["request_id"]: r["hmac_status"] for r in report.results.to_pylist()}
    entries = v1.query().filter(pa.compute.not_equal(v1.query()["producer_id"], "replica-c"))
    wanted = [r for r, t in zip(entries["request_id"].to_pylist(),
                                entries["subject_token"].to_pylist(), strict=True) if t]
    assert len(wanted) > 100 and {statuses[r] for r in wanted} == {"verified"}


def test_replay_reads_v1_files_end_to_end(ray_cluster, v1):
    from serve_journal.replay.driver import replay

    v1.add_v2_file()
    report = replay(v1.uri, model="fraud", progress=False)
    _assert_every_subject_verified(v1, report)


def test_replay_reads_v1_entries_moved_to_cold_end_to_end(ray_cluster, v1):
    """The cold files the lifecycle writes from v1 files (derived output scores left out, the
    ``outputs_derived`` column) replay like the hot ones: every entry with a subject verifies."""
    from serve_journal.replay.driver import replay

    v1.add_v2_file()
    run_compaction(v1.uri, apply=True, settings=v1.settings, now=DAY2 + dt.timedelta(days=1, hours=1))
    run_lifecycle(v1.uri, apply=True, hot_days=1, settings=v1.settings, now=DAY2 + dt.timedelta(days=5))
    cold = sorted(f.path for f in live_files(v1.storage, tier="cold"))
    assert cold and not _hot_files(v1)
    codes = pa.concat_tables([pq.read_table(v1.storage.full_path(p), columns=[DERIVED_SCORES])
                              for p in cold])[DERIVED_SCORES]
    assert codes.null_count < len(codes)  # scores were left out of the cold files
    report = replay(v1.uri, model="fraud", tier="cold", progress=False)
    _assert_every_subject_verified(v1, report)


def test_v1_kafka_messages_decode_to_v2_tables_with_nulls():
    messages = json.loads((DATA / "kafka_v1_messages.json").read_text())
    for message in messages:
        wire.check_headers((k, v.encode()) for k, v in message["headers"].items())
    values = [m["value"].encode() for m in messages]
    slow = wire.decode_values(values)
    fast = wire.decode_values_fast(values)
    assert slow.schema == ENTRY_SCHEMA and fast is not None and fast.equals(slow)
    assert set(slow["schema_version"].to_pylist()) == {1}
    assert all(slow[name].null_count == slow.num_rows for name in ADDED_COLUMNS)
    # The leaf is that of the message's own (v1) columns: v1 sinks and v2 sinks agree on it.
    assert table_leaves(slow) == [entry_leaf(json.loads(v)) for v in values]
    # Re-encoded by this version: v2 headers, same entries.
    again = wire.decode_values([m.value for m in wire.encode_batch(slow)])
    assert again.equals(slow)


def test_setting_model_digest_on_a_v1_row_is_caught_by_verify(v1):
    """Someone who can write the storage but holds no key re-encodes a v1 file with a
    model_digest on one row: both the file hash and the Merkle root give it away."""
    path = next(p for p in _hot_files(v1) if "hour=10" in p)
    table = decode_parquet(v1.storage.read(path))
    digest = pa.array(["sha256:" + "ee" * 32] + [None] * (table.num_rows - 1), pa.string())
    forged = table.set_column(table.schema.get_field_index("model_digest"),
                              ENTRY_SCHEMA.field("model_digest"), digest)
    v1.overwrite(path, encode_parquet(forged))
    report = v1.verify()
    kinds = {(p.kind, p.path) for p in report.errors}
    assert ("file-altered", path) in kinds
    assert ("file-entries-altered", path) in kinds


def test_reencoding_a_v1_file_as_v2_keeps_its_merkle_root(v1):
    """The same entries re-encoded in the v2 layout (new columns null): the bytes differ from the
    record, the entries do not. Verify names the file as altered, not its entries."""
    path = next(p for p in _hot_files(v1) if "hour=11" in p)
    v1.overwrite(path, encode_parquet(decode_parquet(v1.storage.read(path))))
    kinds = {(p.kind, p.path) for p in v1.verify().errors}
    assert ("file-altered", path) in kinds
    assert ("file-entries-altered", path) not in kinds


def test_kafka_sink_writes_v2_files_from_v1_and_v2_messages(kafka_broker, tmp_path):
    """A topic holding messages of the previous release (schema version header 1) and of this one:
    the sink writes current-schema files, v1 entries with null new columns."""
    import asyncio

    from aiokafka import AIOKafkaProducer

    from serve_journal.sink.kafka import KafkaSink, KafkaSinkSettings

    old = json.loads((DATA / "kafka_v1_messages.json").read_text())
    new = make_entries(6, producer_id="replica-c", nulls=False)
    messages = [([(k, v.encode()) for k, v in m["headers"].items()], m["value"].encode()) for m in old]
    messages += [(list(wire.JSON_HEADERS), m.value) for m in wire.encode_batch(new.slice(0, 3))]
    messages += [(list(wire.HEADERS), m.value)  # wire v2: this release's Arrow IPC messages
                 for m in wire.encode_messages(new.slice(3), [b"fraud|0|0"] * 3)]
    entries = len(old) + new.num_rows
    kafka_broker.create_topic("journal-v1v2", 1)
    storage = LocalJournalStorage(str(tmp_path / "journal"))

    async def scenario() -> None:
        producer = AIOKafkaProducer(bootstrap_servers=kafka_broker.bootstrap)
        await producer.start()
        try:
            for headers, value in messages:
                await producer.send_and_wait("journal-v1v2", value, key=b"fraud|0|0", partition=0,
                                             headers=headers)
        finally:
            await producer.stop()
        sink = KafkaSink(KafkaSinkSettings(bootstrap_servers=kafka_broker.bootstrap,
                                           topic="journal-v1v2", partitions=(0,), roll_seconds=0.2),
                         storage)
        await sink.start()
        try:
            deadline = time.monotonic() + 90
            while sum(pq.ParquetFile(storage.full_path(p)).metadata.num_rows
                      for p in storage.list_files(suffix=".parquet")) < entries:
                assert time.monotonic() < deadline, sink.lag_state()
                await sink.poll_once()
        finally:
            await sink.stop()

    asyncio.run(scenario())
    files = storage.list_files(suffix=".parquet")
    assert files
    for path in files:
        assert set(ADDED_COLUMNS) <= set(pq.read_schema(storage.full_path(path)).names)
    table = pa.concat_tables([decode_parquet(storage.read(p)) for p in files])
    assert table.num_rows == entries
    by_version = {v: table.filter(pa.compute.equal(table["schema_version"], v)) for v in (1, 3)}
    assert by_version[1].num_rows == len(old) and by_version[3].num_rows == new.num_rows
    assert all(by_version[1][name].null_count == len(old) for name in ADDED_COLUMNS)
    assert by_version[3]["model_digest"].to_pylist() == new.column("model_digest").to_pylist()


def test_point_reads_of_new_columns_from_v1_files_give_nulls(v1):
    from serve_journal.read.pruning import open_index

    path = next(p for p in _hot_files(v1) if "hour=10" in p)
    token = next(t for t in decode_parquet(v1.storage.read(path))["subject_token"].to_pylist() if t)
    index = open_index(v1.storage, path)
    try:
        rows = index.read_matching("subject_token", token, ["model_name", "model_digest", "models"])
    finally:
        index.handle.close()
    assert rows is not None and rows.num_rows >= 1
    assert rows["model_digest"].null_count == rows["models"].null_count == rows.num_rows


@pytest.mark.parametrize("tier", ["hot", "cold"])
def test_v2_columns_are_dictionary_encoded(tier):
    from serve_journal.fileformat import COLD_OPTIONS, HOT_OPTIONS

    options = HOT_OPTIONS if tier == "hot" else COLD_OPTIONS
    data = encode_parquet(pa.Table.from_batches([make_entries(500)]), options)
    meta = pq.ParquetFile(pa.BufferReader(data)).metadata.row_group(0)
    for i in range(meta.num_columns):
        column = meta.column(i)
        added = ADDED_COLUMNS.get(column.path_in_schema.split(".")[0])
        if added == 2:
            assert "RLE_DICTIONARY" in column.encodings, column.path_in_schema
        elif added == 3:  # trace and span ids: random hex, like the request id
            assert "DELTA_LENGTH_BYTE_ARRAY" in column.encodings, column.path_in_schema


def test_query_on_s3_reads_mixed_v1_and_v2_files_through_pyarrow(s3_bucket, v1):
    """Remote storage goes through pyarrow's dataset scan (not DuckDB's union_by_name)."""
    from serve_journal.storage.s3 import S3WormStorage

    v1.add_v2_file()
    server = s3_bucket.server
    remote = S3WormStorage(s3_bucket.name, "journal", endpoint_url=server.endpoint_url,
                           region=server.region, access_key=server.access_key,
                           secret_key=server.secret_key)
    for path in v1.storage.list_files():
        remote.put_new(path, v1.storage.read(path))
    table = JournalQuery(remote, actor="test-schema-versions").find(model="fraud", tier="all")
    assert table.schema == ENTRY_SCHEMA and table.num_rows == V1_ENTRIES + 40
    old = table.filter(pa.compute.equal(table["schema_version"], 1))
    assert old.num_rows == V1_ENTRIES and old["model_digest"].null_count == V1_ENTRIES
    new = table.filter(pa.compute.not_equal(table["schema_version"], 1))  # this release's rows
    assert new.num_rows == 40 and new["model_digest"].null_count < new.num_rows
    _assert_clean(verify_journal(remote, public_key=v1.public_key))


def test_v1_commit_marker_fingerprint_matches_its_files_under_v2(v1):
    """The fingerprint the old release signed into its compaction marker is what the current code
    computes over the compacted file (the check the catalog makes of markers without hashes)."""
    (marker_path,) = v1.storage.list_files("_commits/", ".json")
    marker = json.loads(v1.storage.read(marker_path))
    got = fingerprint_files(v1.storage, marker["new_files"])
    assert got.as_dict() == marker["fingerprint"]
    assert fingerprint(decode_parquet(v1.storage.read(marker["new_files"][0]))).as_dict() == \
        marker["fingerprint"]


_KILLED_COMPACTION = """
import datetime as dt, os, signal, sys
from serve_journal.integrity.manifest import ManifestLog, ManifestSigner
from serve_journal.maintain.compaction import compact, manifest_recorder, recorded_hashes
from serve_journal.storage import LocalJournalStorage
root, key_file, stage = sys.argv[1], sys.argv[2], sys.argv[3]
storage = LocalJournalStorage(root)
signer = ManifestSigner.from_pem_file(key_file)
log = ManifestLog(storage, "compactor-killed", signer)
def crash(point):
    if point == stage:
        os.kill(os.getpid(), signal.SIGKILL)
compact(storage, now=dt.datetime(2026, 11, 22, 1, tzinfo=dt.UTC), on_file_written=manifest_recorder(log),
        recorded=recorded_hashes(storage, signer.export_public_key()), before_delete=log.checkpoint,
        signer=signer, _crash=crash)
"""


@pytest.mark.parametrize("stage", ["hot-file-written", "committed", "replaced-file-deleted"])
def test_kill_9_while_compacting_a_mixed_partition_loses_and_doubles_nothing(v1, stage):
    import signal
    import subprocess
    import sys

    v1.add_v2_file()
    before = sorted(_ids(v1.query()))
    proc = subprocess.run([sys.executable, "-c", _KILLED_COMPACTION, v1.uri, v1.key_file, stage],
                          capture_output=True, timeout=300, check=False)
    assert proc.returncode == -signal.SIGKILL, proc.stderr.decode()[-2000:]
    assert sorted(_ids(v1.query())) == before  # mid-way: every entry exactly once
    run_compaction(v1.uri, apply=True, settings=v1.settings, now=DAY2 + dt.timedelta(days=1, hours=1))
    after = v1.query()
    assert sorted(_ids(after)) == before
    assert [f.path for f in live_files(v1.storage, tier="hot") if "2026-11-21" in f.path] == \
        [p for p in _hot_files(v1) if "2026-11-21" in p and "/hour=all/" in p]
    # The killed compactor's unsigned record (if it wrote one) is within verify's grace period:
    # a warning now, an error later, as for any writer that died before signing.
    _assert_clean(v1.verify())
