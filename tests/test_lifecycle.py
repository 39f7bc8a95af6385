"""Lifecycle hot -> cold: exact rows after the move, refusal on a bad cold copy, kill -9 safety."""

from __future__ import annotations

import datetime as dt
import json
import os
import signal
import subprocess
import sys

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from serve_journal.catalog import live_files
from serve_journal.catalog.layout import COLD, DEFAULT_SPEC
from serve_journal.fileformat import decode_parquet, encode_parquet
from serve_journal.maintain import lifecycle
from serve_journal.maintain.compaction import CompactionOptions, compact
from serve_journal.read.query import JournalQuery
from serve_journal.storage import LocalJournalStorage
from tests.helpers.entries import DAY, ids, make_entries, token, write_rolled

NOW = DAY + dt.timedelta(days=30, hours=2)  # hours 00 and 01 of DAY are past the 30-day window


@pytest.fixture
def journal(tmp_path):
    storage = LocalJournalStorage(str(tmp_path / "journal"))
    background = make_entries(800, spread_s=4 * 3600)
    planted = make_entries(8, tokens=[token("alice")], producer="p-9", spread_s=4 * 3600)
    write_rolled(storage, pa.concat_tables([background, planted]), files_per_partition=3)
    return storage, planted


def query_ids(storage, tier="all", **filters):
    with JournalQuery(storage, actor="test", tokenizer={"alice": token("alice")}.get) as q:
        return ids(q.find(tier=tier, **filters))


def test_dry_run_by_default_changes_nothing(journal):
    storage, _ = journal
    files = storage.list_files()
    the_plan = lifecycle.plan(storage, NOW)
    assert [m.key.hour for m in the_plan.moves] == [0, 1]
    report = lifecycle.apply(storage, the_plan)
    assert report.dry_run and len(report.moved) == 2
    assert storage.list_files() == files
    assert "partitions to move to cold: 2" in the_plan.describe()


def test_move_to_cold_keeps_every_entry_once_and_compresses_harder(journal):
    storage, planted = journal
    compact(storage, now=NOW, options=CompactionOptions(day_level=False))
    before = query_ids(storage)
    hot_before = query_ids(storage, tier="hot")
    report = lifecycle.apply(storage, lifecycle.plan(storage, NOW), dry_run=False)
    assert report.refused == [] and len(report.moved) == 2 and len(report.expired) == 2
    assert query_ids(storage) == before
    assert query_ids(storage, subject="alice") == ids(planted)
    cold = query_ids(storage, tier="cold")
    hot = query_ids(storage, tier="hot")
    assert sorted(cold + hot) == before and len(cold) > 0 and set(hot) < set(hot_before)
    assert {f.key.hour for f in live_files(storage, tier=COLD)} == {0, 1}
    assert not [p for p in storage.list_files("hot") if "/hour=00/" in p or "/hour=01/" in p]
    cold_file = live_files(storage, tier=COLD)[0].path
    meta = pq.ParquetFile(storage.full_path(cold_file)).metadata
    assert meta.row_group(0).column(1).compression == "ZSTD"
    assert lifecycle.bytes_per_entry(storage, COLD) > 0
    assert lifecycle.bytes_per_entry(storage, "hot") > 0
    # nothing left to do
    again = lifecycle.plan(storage, NOW)
    assert again.moves == () and again.pending_expiry == ()


def test_refuses_to_expire_when_a_cold_copy_does_not_check(journal):
    storage, _ = journal
    before = query_ids(storage)
    the_plan = lifecycle.plan(storage, NOW)
    move = the_plan.moves[0]
    # a bad cold copy sits at the deterministic name (e.g. left by a broken earlier run)
    wrong = make_entries(3, producer="p-wrong")
    storage.put_new(DEFAULT_SPEC.file_path(move.key, move.cold_name, COLD), encode_parquet(wrong))
    report = lifecycle.apply(storage, the_plan, dry_run=False)
    assert [p for p, _ in report.refused] == [move.key.path("hot")]
    assert all(storage.exists(p) for p in move.hot_files)
    assert query_ids(storage) == before  # the unchecked cold copy is not visible


def test_refuses_to_expire_after_the_cold_copy_was_damaged(journal):
    storage, _ = journal
    before = query_ids(storage)
    report = lifecycle.apply(
        storage, lifecycle.plan(storage, NOW), dry_run=False, retention_allows=lambda p: False
    )
    assert len(report.kept_for_retention) == 6 and report.expired == []
    assert query_ids(storage) == before
    # someone alters a cold file: one decision flipped
    cold_path = live_files(storage, tier=COLD)[0].path
    full = storage.full_path(cold_path)
    table = decode_parquet(storage.read(cold_path))
    flipped = table.set_column(
        table.schema.get_field_index("decision"), "decision",
        pa.array(["allow" if d == "block" else "block" for d in table["decision"].to_pylist()]),
    )
    os.chmod(full, 0o644)
    with open(full, "wb") as handle:
        handle.write(encode_parquet(flipped))
    the_plan = lifecycle.plan(storage, NOW)
    assert len(the_plan.pending_expiry) == 2
    report = lifecycle.apply(storage, the_plan, dry_run=False)
    assert len(report.refused) == 1 and "no longer checks" in report.refused[0][1]
    hour = DEFAULT_SPEC.parse(cold_path)[1].hour
    assert [p for p in storage.list_files("hot") if f"/hour={hour:02d}/" in p]  # hot kept
    assert len(report.expired) == 3  # the other partition's hot copies went


CRASH_SCRIPT = """
import datetime as dt, os, signal, sys
from serve_journal.maintain import lifecycle
from serve_journal.storage import LocalJournalStorage
root, stage, nth = sys.argv[1], sys.argv[2], int(sys.argv[3])
seen = {"n": 0}
def crash(point):
    if point == stage:
        seen["n"] += 1
        if seen["n"] == nth:
            os.kill(os.getpid(), signal.SIGKILL)
storage = LocalJournalStorage(root)
now = dt.datetime.fromisoformat(sys.argv[4])
lifecycle.apply(storage, lifecycle.plan(storage, now), dry_run=False, _crash=crash)
print("finished")
"""


@pytest.mark.parametrize(
    "stage,nth",
    [("cold-file-written", 1), ("cold-file-written", 2), ("committed", 1),
     ("replaced-file-deleted", 1), ("replaced-file-deleted", 4)],
)
def test_kill_9_during_lifecycle_loses_and_doubles_nothing(journal, stage, nth):
    storage, _ = journal
    before = query_ids(storage)
    proc = subprocess.run(
        [sys.executable, "-c", CRASH_SCRIPT, storage.root, stage, str(nth), NOW.isoformat()],
        capture_output=True, timeout=300, check=False,
    )
    assert proc.returncode == -signal.SIGKILL, proc.stderr.decode()[-2000:]
    assert query_ids(storage) == before
    report = lifecycle.apply(storage, lifecycle.plan(storage, NOW), dry_run=False)
    assert report.refused == []
    assert query_ids(storage) == before
    assert {f.key.hour for f in live_files(storage, tier=COLD)} == {0, 1}
    assert not [p for p in storage.list_files("hot") if "/hour=00/" in p or "/hour=01/" in p]


def test_s3_lifecycle_configuration():
    config = lifecycle.s3_lifecycle_configuration(
        prefix="journal", glacier_after_days=30, deep_archive_after_days=120,
        cold_retention_days=3650, access_log_retention_days=2555,
    )
    json.dumps(config)
    cold = config["Rules"][0]
    assert cold["Filter"] == {"Prefix": "journal/cold/"}
    assert [t["StorageClass"] for t in cold["Transitions"]] == ["GLACIER", "DEEP_ARCHIVE"]
    assert cold["Expiration"] == {"Days": 3650}
    assert not any(r["Filter"]["Prefix"].startswith("journal/hot") for r in config["Rules"])
    with pytest.raises(ValueError, match="deep_archive_after_days"):
        lifecycle.s3_lifecycle_configuration(glacier_after_days=90, deep_archive_after_days=30)
    with pytest.raises(ValueError, match="cold_retention_days"):
        lifecycle.s3_lifecycle_configuration(cold_retention_days=10)
