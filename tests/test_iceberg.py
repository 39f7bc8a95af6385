"""The journal as an Iceberg table (serve_journal.catalog.iceberg): pyiceberg reads exactly the
entries verify counts after writing, compaction and lifecycle; files are registered in place;
publishing is idempotent, repairs a crash, survives a race; verify flags a table that disagrees.

Real parts: a pyiceberg SQL catalog on sqlite in the test's folder, signed journals written the
writer's way (``write_signed``), the moto S3 server for an s3:// journal."""

from __future__ import annotations

import copy
import dataclasses
import datetime as dt
import json
import os
import threading
import uuid
from pathlib import Path
from urllib.parse import urlparse

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from click.testing import CliRunner

from serve_journal.catalog import live_files
from serve_journal.catalog.iceberg import (
    IcebergSettings,
    location_of,
    open_table,
    publish_iceberg,
    table_files,
)
from serve_journal.iceberg_cli import iceberg_group
from serve_journal.maintain.compaction import run_compaction
from serve_journal.maintain.lifecycle import run_lifecycle
from serve_journal.read.verify import verify_journal
from serve_journal.schema import ADDED_COLUMNS
from serve_journal.sink.settings import (
    BackgroundPublisher,
    SinkSettings,
    publish_table_quietly,
)
from tests.helpers.entries import DAY, ids, make_entries
from tests.helpers.journal import signing_key_files, write_signed

LATER = DAY + dt.timedelta(days=2)


@dataclasses.dataclass
class Journal:
    root: str
    storage: object
    settings: SinkSettings
    """Sink settings with Iceberg publishing configured."""
    plain: SinkSettings
    """The same without Iceberg (a run that never published)."""
    iceberg: IcebergSettings
    public: Path
    tmp: Path


@pytest.fixture
def journal(tmp_path, monkeypatch) -> Journal:
    monkeypatch.delenv("SERVE_JOURNAL_ICEBERG_CATALOG", raising=False)
    key_file, public = signing_key_files(tmp_path)
    root = str(tmp_path / "journal")
    iceberg = IcebergSettings.parse(f"sqlite:///{tmp_path}/catalog/iceberg.db")
    plain = SinkSettings(root, signing_key_file=str(key_file), iceberg=None)
    settings = dataclasses.replace(plain, iceberg=iceberg)
    return Journal(root, plain.storage(), settings, plain, iceberg, public, tmp_path)


def _write(j: Journal, table: pa.Table, chain: str = "w00", files: int = 3) -> None:
    write_signed(j.plain, j.storage, chain, table, files=files)


def _verify(j: Journal, **kw):
    return verify_journal(j.storage, public_key=str(j.public), iceberg=j.iceberg, **kw)


def _scan(j: Journal, snapshot_id: int | None = None) -> pa.Table:
    table = open_table(j.storage, j.iceberg, create=False)
    return table.scan(snapshot_id=snapshot_id).to_arrow()


def _kinds(report) -> set[str]:
    return {p.kind for p in report.problems}


def test_published_table_reads_exactly_the_entries_verify_counts(journal):
    j = journal
    written = make_entries(240, spread_s=3 * 3600)
    _write(j, written)
    report = publish_iceberg(j.storage, j.iceberg)
    assert report.operation == "append" and len(report.added) == len(live_files(j.storage))

    rows = _scan(j)
    verified = _verify(j)
    assert verified.ok, verified.problems
    assert rows.num_rows == verified.entries == 240
    assert ids(rows) == ids(written)
    # registered in place: the table names the journal's own files, and Iceberg wrote no data
    table = open_table(j.storage, j.iceberg, create=False)
    assert set(table_files(table)) == {location_of(j.storage, f.path) for f in live_files(j.storage)}
    metadata = j.tmp / "journal" / "_iceberg"
    assert not list(metadata.rglob("*.parquet")) and list(metadata.rglob("*.avro"))

    # a second publish is a no-op: no snapshot
    snapshots = len(table.snapshots())
    again = publish_iceberg(j.storage, j.iceberg)
    table.refresh()
    assert again.operation == "none" and not again.added and not again.removed
    assert len(table.snapshots()) == snapshots and again.snapshot_id == report.snapshot_id


def test_compaction_and_lifecycle_commit_one_replace_snapshot_each(journal):
    j = journal
    written = make_entries(300, spread_s=4 * 3600)
    _write(j, written, files=4)
    publish_iceberg(j.storage, j.iceberg)
    hot = {f.path for f in live_files(j.storage)}

    compacted = run_compaction(j.root, apply=True, now=LATER, settings=j.settings)
    assert compacted.iceberg and "replace" in compacted.iceberg, compacted.describe()
    table = open_table(j.storage, j.iceberg, create=False)
    snap = table.current_snapshot()
    assert snap.summary["serve-journal.operation"] == "replace"
    assert snap.summary["deleted-data-files"] == str(len(hot))  # all removed in ONE snapshot
    assert snap.summary["added-data-files"] == "1"
    assert [os.path.basename(p) for p in table_files(table)][0].startswith("c-")
    verified = _verify(j)
    assert verified.ok, verified.problems
    assert _scan(j).num_rows == verified.entries == 300 and ids(_scan(j)) == ids(written)

    moved = run_lifecycle(j.root, apply=True, hot_days=0, now=LATER, settings=j.settings)
    assert moved.iceberg and "replace" in moved.iceberg, moved.describe()
    table.refresh()
    assert all("/cold/" in p for p in table_files(table))
    verified = _verify(j)
    assert verified.ok, verified.problems
    rows = _scan(j)
    assert rows.num_rows == verified.entries == 300 and ids(rows) == ids(written)


def test_time_travel_returns_the_journal_as_of_an_earlier_publish(journal):
    j = journal
    first = make_entries(90, spread_s=2 * 3600)
    _write(j, first)
    early = publish_iceberg(j.storage, j.iceberg).snapshot_id
    later = make_entries(60, start=DAY + dt.timedelta(hours=5), spread_s=3600, producer="p-2")
    _write(j, later)
    now = publish_iceberg(j.storage, j.iceberg).snapshot_id
    assert now != early
    assert ids(_scan(j, early)) == ids(first)
    assert ids(_scan(j, now)) == ids(pa.concat_tables([first, later]))
    assert ids(_scan(j)) == ids(pa.concat_tables([first, later]))


def test_a_crash_between_the_compaction_commit_and_the_publish_is_repaired(journal):
    j = journal
    written = make_entries(200, spread_s=3 * 3600)
    _write(j, written)
    publish_iceberg(j.storage, j.iceberg)
    # the rewrite commits and deletes, but its run dies before publishing (modelled by a run
    # without Iceberg configured): the table still names the replaced files
    run_compaction(j.root, apply=True, now=LATER, settings=j.plain)
    stale = _verify(j)
    assert {"iceberg-extra-file", "iceberg-missing-file"} <= _kinds(stale) and not stale.ok

    repaired = publish_iceberg(j.storage, j.iceberg)
    assert repaired.operation == "replace" and len(repaired.added) == 1
    verified = _verify(j)
    assert verified.ok, verified.problems
    assert ids(_scan(j)) == ids(written)
    assert publish_iceberg(j.storage, j.iceberg).operation == "none"


def test_verify_flags_a_file_someone_else_added_to_the_table(journal):
    j = journal
    _write(j, make_entries(60, spread_s=3600))
    publish_iceberg(j.storage, j.iceberg)
    assert _verify(j).ok
    # an entry file written beside the journal and registered in the table by hand
    planted = j.tmp / "planted.parquet"
    pq.write_table(make_entries(5, producer="p-forged"), planted)
    table = open_table(j.storage, j.iceberg, create=False)
    table.add_files([f"file://{planted}"])
    report = _verify(j)
    assert not report.ok
    assert [p.path for p in report.problems if p.kind == "iceberg-extra-file"] == [f"file://{planted}"]
    # the next publish takes it out again
    assert publish_iceberg(j.storage, j.iceberg).removed == [f"file://{planted}"]
    assert _verify(j).ok


def test_verify_flags_a_live_file_missing_from_the_table_and_a_wrong_size(journal):
    j = journal
    _write(j, make_entries(60, spread_s=3600))
    publish_iceberg(j.storage, j.iceberg)
    table = open_table(j.storage, j.iceberg, create=False)
    current = table_files(table)
    victim, resized = sorted(current)[:2]
    changed = _copy_data_file(current[resized], file_size_in_bytes=current[resized].file_size_in_bytes + 7)
    with table.transaction() as tx, tx.update_snapshot().overwrite() as snapshot:
        snapshot.delete_data_file(current[victim])
        snapshot.delete_data_file(current[resized])
        snapshot.append_data_file(changed)
    report = _verify(j)
    assert not report.ok
    problems = {(p.kind, p.path) for p in report.problems if p.kind.startswith("iceberg")}
    rel = {loc: loc.removeprefix(location_of(j.storage, "")) for loc in (victim, resized)}
    assert problems == {("iceberg-missing-file", rel[victim]), ("iceberg-file-differs", rel[resized])}


def _copy_data_file(data_file, file_size_in_bytes: int):
    """``data_file`` with another size (a pyiceberg Record: field 5 is file_size_in_bytes)."""
    changed = copy.deepcopy(data_file)
    changed[5] = file_size_in_bytes
    assert changed.file_size_in_bytes == file_size_in_bytes
    return changed


def test_a_table_that_was_never_published_is_reported(journal):
    j = journal
    _write(j, make_entries(30, spread_s=600))
    report = _verify(j)
    assert [p.kind for p in report.problems] == ["iceberg-unavailable"] and not report.ok
    assert _verify_without_iceberg(j).ok


def _verify_without_iceberg(j: Journal):
    return verify_journal(j.storage, public_key=str(j.public))


def test_the_table_schema_evolves_with_the_entry_schema(journal):
    """A table created under an earlier entry schema gains the newer columns; a file of an
    earlier schema version (without those columns) reads them as nulls."""
    j = journal
    old_columns = [c for c in make_entries(1).column_names if c not in ADDED_COLUMNS]
    v1 = make_entries(40, spread_s=1800).select(old_columns)
    _write(j, v1)
    catalog = j.iceberg.load_catalog(j.storage)
    catalog.create_namespace("serve_journal")
    catalog.create_table(j.iceberg.table, schema=v1.schema,
                         location=j.iceberg.table_location(j.storage))
    publish_iceberg(j.storage, j.iceberg)
    table = open_table(j.storage, j.iceberg, create=False)
    assert set(ADDED_COLUMNS) <= {f.name for f in table.schema().fields}
    rows = _scan(j)
    assert rows.num_rows == 40 and rows["model_run_id"].null_count == 40
    assert _verify(j).ok


def test_two_publishers_at_once_leave_exactly_the_live_files(journal):
    j = journal
    _write(j, make_entries(120, spread_s=3 * 3600), files=4)
    reports, errors = [], []  # three publishers race to create the table and to commit

    def publish() -> None:
        try:
            reports.append(publish_iceberg(j.storage, j.iceberg))
        except Exception as exc:  # noqa: BLE001 - the assertion below shows it
            errors.append(exc)

    threads = [threading.Thread(target=publish) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    assert "append" in [r.operation for r in reports] and len(reports) == 3
    table = open_table(j.storage, j.iceberg, create=False)
    assert set(table_files(table)) == {location_of(j.storage, f.path) for f in live_files(j.storage)}
    assert _scan(j).num_rows == 120 and _verify(j).ok


def test_the_sink_checkpoint_publish_never_raises(journal, caplog):
    j = journal
    _write(j, make_entries(30, spread_s=600))
    assert publish_table_quietly(j.settings, j.storage, "sink")
    assert _scan(j).num_rows == 30
    broken = dataclasses.replace(j.settings, iceberg=IcebergSettings.parse(
        f"sqlite:///{j.tmp}/not-a-folder.db/x/y.db"))
    (j.tmp / "not-a-folder.db").write_text("a file where the catalog's folder would be")
    assert not publish_table_quietly(broken, j.storage, "sink")
    assert "publishing to Iceberg failed" in caplog.text


def test_settings_from_the_environment_and_catalog_uris(monkeypatch):
    monkeypatch.setenv("SERVE_JOURNAL_ICEBERG_CATALOG", "sqlite:////data/iceberg.db")
    monkeypatch.setenv("SERVE_JOURNAL_ICEBERG_TABLE", "audit.fraud_entries")
    env = IcebergSettings.from_env()
    assert dict(env.catalog) == {"type": "sql", "uri": "sqlite:////data/iceberg.db"}
    assert env.table == "audit.fraud_entries"
    assert SinkSettings("./j").iceberg == env
    assert dict(IcebergSettings.parse("https://rest.example/api").catalog) == {
        "type": "rest", "uri": "https://rest.example/api"}
    assert dict(IcebergSettings.parse("glue://?glue.region=eu-west-1").catalog) == {
        "type": "glue", "glue.region": "eu-west-1"}
    props = IcebergSettings.parse(json.dumps({"type": "rest", "uri": "https://r", "table": "a.b",
                                              "credential": "id:secret"}))
    assert props.table == "a.b" and "secret" not in props.describe()
    with pytest.raises(ValueError, match="Iceberg catalog must be"):
        IcebergSettings.parse("not a catalog")
    monkeypatch.delenv("SERVE_JOURNAL_ICEBERG_CATALOG")
    assert IcebergSettings.from_env() is None and SinkSettings("./j").iceberg is None


def test_cli_publish_and_status(journal, monkeypatch):
    j = journal
    _write(j, make_entries(50, spread_s=1800))
    catalog = dict(j.iceberg.catalog)["uri"]
    runner = CliRunner()
    missing = runner.invoke(iceberg_group, ["status", "--journal", j.root, "--catalog", catalog])
    assert missing.exit_code == 1 and "does not exist" in missing.output
    done = runner.invoke(iceberg_group, ["publish", "--journal", j.root, "--catalog", catalog,
                                         "--public-key", str(j.public), "--json"])
    assert done.exit_code == 0, done.output
    assert json.loads(done.output)["operation"] == "append"
    monkeypatch.setenv("SERVE_JOURNAL_ICEBERG_CATALOG", catalog)  # the default catalog
    again = runner.invoke(iceberg_group, ["publish", "--journal", j.root])
    assert again.exit_code == 0 and ": none," in again.output, again.output
    status = runner.invoke(iceberg_group, ["status", "--journal", j.root, "--json"])
    assert status.exit_code == 0, status.output
    doc = json.loads(status.output)
    assert doc["in_agreement"] and doc["rows"] == 50 and len(doc["snapshots"]) == 1
    text = runner.invoke(iceberg_group, ["status", "--journal", j.root])
    assert "in agreement" in text.output and text.exit_code == 0
    monkeypatch.delenv("SERVE_JOURNAL_ICEBERG_CATALOG")
    unset = runner.invoke(iceberg_group, ["publish", "--journal", j.root])
    assert unset.exit_code == 2 and "SERVE_JOURNAL_ICEBERG_CATALOG" in unset.output


@pytest.mark.slow  # over 6 s: kept out of the fast tier, runs in the full suite
def test_an_s3_journal_on_moto(s3_bucket, tmp_path, monkeypatch):
    server = s3_bucket.server
    for name, value in server.env.items():
        monkeypatch.setenv(name, value)
    monkeypatch.delenv("SERVE_JOURNAL_ICEBERG_CATALOG", raising=False)
    endpoint = urlparse(server.endpoint_url)
    uri = (f"s3://{s3_bucket.name}/j-{uuid.uuid4().hex[:6]}?endpoint_override={endpoint.netloc}"
           f"&scheme={endpoint.scheme}&worm=1")
    key_file, public = signing_key_files(tmp_path)
    iceberg = IcebergSettings.parse(f"sqlite:///{tmp_path}/iceberg.db")
    settings = SinkSettings(uri, signing_key_file=str(key_file), iceberg=iceberg)
    storage = settings.storage()
    written = make_entries(80, spread_s=2 * 3600)
    write_signed(settings, storage, "w00-s3", written, files=2)
    report = publish_iceberg(storage, iceberg)
    assert report.operation == "append"
    table = open_table(storage, iceberg, create=False)
    assert all(p.startswith(f"s3://{s3_bucket.name}/") for p in table_files(table))
    rows = table.scan().to_arrow()
    verified = verify_journal(storage, public_key=str(public), iceberg=iceberg)
    assert verified.ok, verified.problems
    assert rows.num_rows == verified.entries == 80 and ids(rows) == ids(written)
    assert publish_iceberg(storage, iceberg).operation == "none"


def test_a_kafka_sink_publishes_its_files_at_its_checkpoint(journal):
    """The Kafka sink's runner (no broker needed to write and sign): after its checkpoint signs
    the files it wrote, the table holds them; a checkpoint with nothing new commits nothing."""
    from serve_journal.catalog.layout import split_by_partition
    from serve_journal.sink.kafka import KafkaSinkSettings
    from serve_journal.sink.kafka_app import KafkaSinkRunner

    j = journal
    runner = KafkaSinkRunner(KafkaSinkSettings(bootstrap_servers="127.0.0.1:9", topic="journal",
                                               partitions=(0,)), j.settings)
    written = make_entries(70, spread_s=2 * 3600)
    for batch in written.to_batches():
        for key, part in split_by_partition(batch):
            runner.sink._files.write_file(key, pa.Table.from_batches([part]))
    runner.checkpoint()
    rows = _scan(j)
    verified = _verify(j)
    assert verified.ok, verified.problems
    assert rows.num_rows == verified.entries == 70 and ids(rows) == ids(written)
    table = open_table(j.storage, j.iceberg, create=False)
    snapshots = len(table.snapshots())
    runner.checkpoint()
    table.refresh()
    assert len(table.snapshots()) == snapshots
    assert table.current_snapshot().summary["serve-journal.reason"] == "sink"


def test_a_rewrite_whose_publish_fails_keeps_what_it_replaced(journal):
    """Compaction publishes before it deletes: when the catalog cannot be written, the replaced
    files stay (the table never names a deleted file) and the next run deletes them."""
    j = journal
    written = make_entries(150, spread_s=3 * 3600)
    _write(j, written)
    publish_iceberg(j.storage, j.iceberg)
    inputs = [f.path for f in live_files(j.storage)]
    (j.tmp / "blocked").write_text("a file where the catalog's folder would be")
    broken = dataclasses.replace(j.settings, iceberg=IcebergSettings.parse(
        f"sqlite:///{j.tmp}/blocked/iceberg.db"))
    with pytest.raises(Exception):  # noqa: B017 - whatever the catalog raised
        run_compaction(j.root, apply=True, now=LATER, settings=broken)
    assert all(j.storage.exists(p) for p in inputs)
    assert ids(_scan(j)) == ids(written)  # the table still reads: its files are all there
    done = run_compaction(j.root, apply=True, now=LATER, settings=j.settings)
    assert sorted(done.deleted) == sorted(inputs) and "replace" in done.iceberg
    verified = _verify(j)
    assert verified.ok, verified.problems
    assert ids(_scan(j)) == ids(written)


def test_the_writer_actors_publisher_works_off_the_roll_thread(journal):
    """What a Ray writer actor does after its checkpoint: request a publish and go on; the
    publisher's thread commits the signed files; requests while it runs fold into one more."""
    j = journal
    publisher = BackgroundPublisher(j.settings, j.storage)
    _write(j, make_entries(40, spread_s=1800))
    publisher.request()
    assert publisher.wait(30.0)
    _write(j, make_entries(30, start=DAY + dt.timedelta(hours=2), spread_s=600, producer="p-2"),
           chain="w01")
    publisher.request()
    publisher.request()
    assert publisher.wait(30.0)
    assert publisher.failures == 0 and 2 <= publisher.published <= 3
    assert _scan(j).num_rows == 70 and _verify(j).ok
    BackgroundPublisher(j.plain, j.storage).request()  # no catalog: nothing starts


@pytest.mark.slow
def test_a_ray_writer_actor_publishes_after_its_checkpoint(journal, ray_cluster):
    """The real sink path: a Ray writer actor writes, signs at its checkpoint and publishes."""
    import time

    import ray

    from serve_journal.catalog.layout import split_by_partition
    from serve_journal.sink.actor import JournalWriter

    j = journal
    settings = dataclasses.replace(j.settings, checkpoint_interval_s=0.5, roll_seconds=0.2)
    writer = JournalWriter.options(name=f"iceberg-{uuid.uuid4().hex[:6]}").remote(settings, 0)
    try:
        written = make_entries(90, spread_s=2 * 3600)
        for batch in written.to_batches():
            for key, part in split_by_partition(batch):
                ray.get(writer.write.remote(key, part))
        assert ray.get(writer.flush.remote()) == 0
        deadline = time.monotonic() + 60
        while ray.get(writer.stats.remote())["iceberg_publishes"] < 1 and time.monotonic() < deadline:
            time.sleep(0.2)
        stats = ray.get(writer.stats.remote())
        assert stats["iceberg_publishes"] >= 1 and stats["iceberg_failures"] == 0, stats
        rows = _scan(j)
        verified = _verify(j)
        assert verified.ok, verified.problems
        assert rows.num_rows == verified.entries == 90 and ids(rows) == ids(written)
    finally:
        ray.kill(writer)
