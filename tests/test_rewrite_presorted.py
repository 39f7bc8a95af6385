"""Inputs already in lookup order are streamed, not sorted (a compacted day moved to the cold
tier): the check reads the rows, never the files' claims; it agrees with a stable sort for any
NULLs and ties; and the files written are the sort's byte for byte."""

from __future__ import annotations

import datetime as dt
import os
import tempfile

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from serve_journal.catalog import live_files
from serve_journal.fileformat import SORT_KEYS
from serve_journal.maintain import lifecycle, rewrite
from serve_journal.maintain.compaction import CompactionOptions, compact, in_written_order
from serve_journal.maintain.rewrite import RewriteWorkspace, SpooledFile, in_lookup_order
from serve_journal.read.query import JournalQuery
from serve_journal.storage import LocalJournalStorage
from tests.helpers.entries import DAY, ids, make_entries, token, write_rolled

LATER = DAY + dt.timedelta(days=2)


def _keys_table(rows: list[tuple[str | None, int | None]]) -> pa.Table:
    return pa.table({
        "subject_token": pa.array([t for t, _ in rows], pa.string()),
        "ts": pa.array([None if s is None else s * 1_000_000 for _, s in rows],
                       pa.timestamp("us", tz="UTC")),
    })


def _lookup_order(table: pa.Table) -> pa.Array:
    return pc.sort_indices(table, sort_keys=[(n, o) for n, o, _ in SORT_KEYS],
                           null_placement="at_end")


_row = st.tuples(st.sampled_from([None, "a", "ab", "b", "ba"]),
                 st.one_of(st.none(), st.integers(0, 3)))


@settings(max_examples=150, deadline=None)
@given(files=st.lists(st.lists(_row, max_size=6), min_size=1, max_size=4),
       presorted=st.booleans())
def test_the_check_agrees_with_a_stable_sort(files, presorted):
    """NULL tokens and times last, ties, empty files, keys equal across a file boundary: the
    check says "in order" exactly when a stable sort would leave the rows where they are."""
    whole = _keys_table([row for rows in files for row in rows])
    if presorted:  # half the examples in order (random rows rarely are)
        whole = whole.take(_lookup_order(whole))
    with tempfile.TemporaryDirectory() as folder:
        paths, start = [], 0
        for i, rows in enumerate(files):  # the same rows, cut where the drawn files end
            path = os.path.join(folder, f"{i}.parquet")
            pq.write_table(whole.slice(start, len(rows)), path, row_group_size=2)
            start += len(rows)
            paths.append(path)
        in_order = _lookup_order(whole).to_pylist() == list(range(whole.num_rows))
        assert in_lookup_order(paths) == in_order


def test_rows_out_of_order_behind_a_sorted_claim_are_sorted(tmp_path):
    """A file whose footer claims it is sorted by subject token (every journal file does) but
    whose rows are not, and files each sorted but overlapping: the check reads the rows, so the
    rewrite sorts them; what it yields is the stable sort of all rows."""
    from serve_journal.fileformat import sort_for_lookup
    from serve_journal.schema import ENTRY_SCHEMA, conform_entries

    table = sort_for_lookup(make_entries(300, tokens=[token(f"s{i}") for i in range(25)]))
    claim = [pq.SortingColumn(ENTRY_SCHEMA.get_field_index("subject_token"), nulls_first=False)]
    cases = {
        "reversed": [table.take(pa.array(range(299, -1, -1)))],
        "overlapping": [table.take(pa.array(range(0, 300, 2))), table.take(pa.array(range(1, 300, 2)))],
        "sorted": [table.slice(0, 100), table.slice(100, 100), table.slice(200)],
    }
    for case, parts in cases.items():
        paths = []
        for i, part in enumerate(parts):
            path = str(tmp_path / f"{case}-{i}.parquet")
            pq.write_table(part, path, sorting_columns=claim, row_group_size=64)
            paths.append(path)
        assert in_lookup_order(paths) == (case == "sorted"), case
        files = [SpooledFile(p, p, os.path.getsize(p), "") for p in paths]
        with RewriteWorkspace("1GiB", str(tmp_path)) as ws:
            got = pa.concat_tables(ws.sorted_tables(files))
        want = sort_for_lookup(conform_entries(pa.concat_tables(parts)))
        assert got.equals(want), case


def _compacted_in_parts(root) -> LocalJournalStorage:
    """A day of 900 entries from three producers, compacted into 12 parts ``c-…-0`` to
    ``c-…-11`` (names whose plain string order is not the order they were written in)."""
    storage = LocalJournalStorage(str(root))
    write_rolled(storage, pa.concat_tables([
        make_entries(300, tokens=[token(f"s{i}") for i in range(40)], producer=f"p-{p}",
                     spread_s=6 * 3600)
        for p in range(3)]), files_per_partition=3)
    report = compact(storage, now=LATER, options=CompactionOptions(max_rows_per_file=80))
    assert report.compacted and not report.refused
    return storage


@pytest.mark.slow  # ~4 s: two journals compacted and moved
def test_a_compacted_day_moves_to_cold_unsorted_and_writes_the_sorts_bytes(tmp_path,
                                                                            monkeypatch):
    queries: list[str] = []
    real = RewriteWorkspace._reader

    def spy(self, con, rows, query, *args, **kwargs):
        queries.append(query)
        return real(self, con, rows, query, *args, **kwargs)
    monkeypatch.setattr(RewriteWorkspace, "_reader", spy)
    stored = []
    for streamed in (True, False):
        if not streamed:
            monkeypatch.setattr(rewrite, "in_lookup_order", lambda paths: False)
        storage = _compacted_in_parts(tmp_path / f"journal-{streamed}")
        plan = lifecycle.plan(storage, LATER, hot_days=0)
        [move] = plan.moves
        assert len(move.hot_files) == 12
        assert list(move.hot_files) == in_written_order(move.hot_files)
        assert move.hot_files[2].endswith("-2.parquet") and move.hot_files[-1].endswith("-11.parquet")
        queries.clear()
        report = lifecycle.apply(storage, plan, dry_run=False)
        assert report.moved and not report.refused
        lookup_sorts = [q for q in queries if 'ORDER BY "subject_token"' in q]
        assert (not lookup_sorts) if streamed else lookup_sorts
        cold = sorted((f.path, storage.sha256(f.path)) for f in live_files(storage))
        with JournalQuery(storage, actor="test") as q:
            stored.append((cold, ids(q.find(tier="cold"))))
    assert stored[0] == stored[1]  # the same cold files, byte for byte
    assert len(stored[0][1]) == 900


@pytest.mark.slow  # ~15 s: 140k entries written five ways
def test_files_written_do_not_depend_on_how_the_rows_arrive(tmp_path, monkeypatch):
    """Past one 64k batch, streamed from row groups of 5,000 rows or sorted by DuckDB in one or
    five passes, the rows reach the writer in different chunks; a Parquet page ends where a
    chunk does, so unless the rows are re-cut into the same batches, the same rows give other
    bytes (seen at 2M entries: 1,439 bytes apart)."""
    import dataclasses

    import numpy as np

    from benchmarks.bench_query import hex_strings, hour_of_entries
    from serve_journal.fileformat import COLD_OPTIONS, HOT_OPTIONS, sort_for_lookup

    rng = np.random.default_rng(5)
    table = sort_for_lookup(hour_of_entries(rng, 0, 140_000, hex_strings(rng, 14_000, 16),
                                            np.zeros(8, np.int64)))
    paths = []
    for i, (start, end) in enumerate([(0, 33_333), (33_333, 100_001), (100_001, 140_000)]):
        path = str(tmp_path / f"in-{i}.parquet")
        pq.write_table(table.slice(start, end - start), path, row_group_size=5_000)
        paths.append(path)
    files = [SpooledFile(p, p, os.path.getsize(p), "") for p in paths]
    written = {}
    for way, passes, presorted in [("streamed", None, True), ("one sort", 1, False),
                                   ("five passes", 5, False)]:
        monkeypatch.setattr(rewrite, "_FORCED_PASSES", passes)
        monkeypatch.setattr(rewrite, "in_lookup_order",
                            in_lookup_order if presorted else (lambda paths: False))
        with RewriteWorkspace("1GiB", str(tmp_path)) as ws:
            out = []
            for options in (dataclasses.replace(HOT_OPTIONS, data_page_size=64 * 1024),
                            dataclasses.replace(COLD_OPTIONS, row_group_size=100_000,
                                                compression_level=3)):
                [local] = ws.write_sorted(files, [f"{options.row_group_size}"], options,
                                          rows_per_file=140_000)
                with open(local, "rb") as f:
                    out.append(f.read())
            written[way] = out
    assert written["one sort"] == written["streamed"]
    assert written["five passes"] == written["streamed"]


def test_files_whose_keys_do_not_cast_fall_back_to_the_sort(tmp_path):
    """A later file whose key columns do not cast to the first file's types is not "in order"
    (the sort reconciles the types), and the check does not raise."""
    first = str(tmp_path / "a.parquet")
    pq.write_table(pa.table({"subject_token": pa.array([1, 2], pa.int64()),
                             "ts": pa.array([1, 2], pa.timestamp("us", tz="UTC"))}), first)
    later = str(tmp_path / "b.parquet")
    pq.write_table(_keys_table([("x3", 1), ("x4", 2)]), later)
    assert in_lookup_order([first]) and in_lookup_order([later])
    assert not in_lookup_order([first, later])


_CRASH = """
import datetime as dt, os, signal, sys
from serve_journal.maintain import lifecycle
from serve_journal.storage import LocalJournalStorage
root, stage, nth, now = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4]
seen = {"n": 0}
def crash(point):
    if point == stage:
        seen["n"] += 1
        if seen["n"] == nth:
            os.kill(os.getpid(), signal.SIGKILL)
storage = LocalJournalStorage(root)
plan = lifecycle.plan(storage, dt.datetime.fromisoformat(now), hot_days=0)
lifecycle.apply(storage, plan, dry_run=False, _crash=crash)
"""


@pytest.mark.slow  # ~3 s each: a compaction, a killed move and its re-run
@pytest.mark.parametrize("stage,nth", [("cold-file-written", 1), ("committed", 1),
                                       ("replaced-file-deleted", 5)])
def test_kill_9_during_a_streamed_move_loses_and_doubles_nothing(tmp_path, stage, nth):
    """The streamed move (no sort) killed at its worst moments: readers see every entry once
    throughout, and the next run finishes the move, the hot parts gone."""
    import signal
    import subprocess
    import sys

    storage = _compacted_in_parts(tmp_path / "journal")
    with JournalQuery(storage, actor="test") as q:
        before = sorted(ids(q.find(tier="all")))
    proc = subprocess.run([sys.executable, "-c", _CRASH, storage.root, stage, str(nth),
                           LATER.isoformat()], capture_output=True, timeout=300, check=False)
    assert proc.returncode == -signal.SIGKILL, proc.stderr.decode()[-2000:]
    with JournalQuery(storage, actor="test") as q:
        assert sorted(ids(q.find(tier="all"))) == before
    report = lifecycle.apply(storage, lifecycle.plan(storage, LATER, hot_days=0), dry_run=False)
    assert not report.refused
    with JournalQuery(storage, actor="test") as q:
        assert sorted(ids(q.find(tier="cold"))) == before
        assert sorted(ids(q.find(tier="all"))) == before
    assert not storage.list_files("hot")
