"""A rewrite's sorts split into range passes give byte for byte what one pass gives, for any
schema-version mix, NULL keys, a key repeated across a range's edge and doubled entries; a day
too big for one pass now sorts under a limit that refused it; one key bigger than the limit is
still a clear refusal."""

from __future__ import annotations

import datetime as dt
import hashlib
import os

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from serve_journal.catalog import live_files
from serve_journal.fileformat import COLD_OPTIONS, HOT_OPTIONS
from serve_journal.integrity.fingerprint import fingerprint
from serve_journal.integrity.summary import summarize
from serve_journal.maintain import lifecycle, rewrite
from serve_journal.maintain.compaction import CompactionOptions, compact
from serve_journal.maintain.rewrite import RewriteWorkspace, SpooledFile
from serve_journal.read.query import JournalQuery
from serve_journal.schema import ADDED_COLUMNS, conform_entries
from serve_journal.storage import LocalJournalStorage
from tests.helpers.entries import DAY, ids, make_entries, token, write_rolled

LATER = DAY + dt.timedelta(days=2)
HOT = token("hot")


def _inputs(folder) -> list[str]:
    """Six files of versions 1, 2 and 3: NULL subject tokens, one token in a third of all rows
    (so it lies on a range's edge), and two entries stored twice (same producer and seq, in two
    files, one with other content: input order decides the tie)."""
    tokens = [HOT, None, token("a"), HOT, token("b"), HOT, *[token(f"s{i}") for i in range(40)]]
    paths = []
    for i in range(6):
        table = make_entries(150, producer=f"p-{i % 2}", seq_start=i * 150, tokens=tokens[i:],
                             spread_s=600)
        if i == 4:  # doubles of file 0's entries 3 and 4 (producer p-0), one altered
            again = make_entries(150, producer="p-0", seq_start=0, tokens=tokens)
            again = again.slice(3, 2).set_column(
                again.schema.get_field_index("caller"), again.schema.field("caller"),
                pa.array(["svc-b", "svc-a"]))
            table = pa.concat_tables([table, again])
        version = i % 3 + 1
        if version == 1:
            table = table.drop_columns(list(ADDED_COLUMNS))
        elif version == 2:
            table = table.drop_columns([c for c, v in ADDED_COLUMNS.items() if v == 3])
        path = str(folder / f"{i}.parquet")
        pq.write_table(table, path, row_group_size=64)
        paths.append(path)
    return paths


def _sha(path: str) -> str:
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


def _rewrite(tmp_path, paths: list[str], passes: int | None, monkeypatch):
    monkeypatch.setattr(rewrite, "_FORCED_PASSES", passes)
    files = [SpooledFile(p, p, os.path.getsize(p), "") for p in paths]
    with RewriteWorkspace("1GiB", str(tmp_path)) as ws:
        source = ws._source(paths)
        con = ws._connect()
        try:
            ranges = ws._ranges(con, source, ["subject_token"], passes or 1, 1)
        finally:
            con.close()
        out = []
        for options in (HOT_OPTIONS, COLD_OPTIONS):
            names = [f"{options.compression_level}-{i}" for i in range(3)]
            written = ws.write_sorted(files, names, options, rows_per_file=350)
            out.append([(_sha(p), summarize(p)) for p in written])
        return ranges, out, ws.fingerprint(paths)


@pytest.mark.parametrize("passes,scatter", [(5, False), (9, False), (5, True), (9, True)])
def test_range_passes_write_the_same_files_and_fingerprint_as_one_pass(tmp_path, monkeypatch,
                                                                       passes, scatter):
    """Filtered per range, or scattered into a spill file per range first: the same bytes."""
    paths = _inputs(tmp_path)
    monkeypatch.setattr(rewrite, "_SCATTER_FROM", 2 if scatter else 10**6)
    one_ranges, one, one_print = _rewrite(tmp_path, paths, 1, monkeypatch)
    split_ranges, split, split_print = _rewrite(tmp_path, paths, passes, monkeypatch)
    assert one_ranges == [""] and len(split_ranges) >= 3
    assert split == one  # same bytes (hot and cold options), rows, time and seq ranges, roots
    everything = conform_entries(pa.concat_tables(
        [conform_entries(pq.read_table(p), stored=True) for p in paths]))
    assert split_print == one_print == fingerprint(everything)


def test_ranges_cover_each_row_once_and_never_split_a_key(tmp_path):
    paths = _inputs(tmp_path)
    with RewriteWorkspace("1GiB", str(tmp_path)) as ws:
        source = ws._source(paths)
        con = ws._connect()
        try:
            total = con.execute(f"SELECT count(*) FROM {source}").fetchone()[0]
            for keys in (["subject_token"], ["producer_id", "seq"]):
                ranges = ws._ranges(con, source, keys, 7, total)
                assert len(ranges) >= 3
                columns = ", ".join(keys)
                seen: dict[tuple, int] = {}
                counted = 0
                for i, where in enumerate(ranges):
                    rows = con.execute(f"SELECT {columns} FROM {source} {where}").fetchall()
                    counted += len(rows)
                    for key in set(rows):
                        assert seen.setdefault(key, i) == i, (key, where)
                assert counted == total
                # NULL subject tokens: the last range, as ORDER BY ... NULLS LAST puts them
                if keys == ["subject_token"]:
                    assert seen[(None,)] == len(ranges) - 1
        finally:
            con.close()


def _journal(root) -> LocalJournalStorage:
    storage = LocalJournalStorage(str(root))
    tokens = [HOT, None, *[token(f"bg-{i}") for i in range(30)]]
    write_rolled(storage, pa.concat_tables([
        make_entries(600, tokens=tokens, spread_s=4 * 3600),
        make_entries(300, tokens=[HOT], producer="p-2", spread_s=4 * 3600)]),
        files_per_partition=4)
    return storage


@pytest.mark.slow  # over 1.5 s: kept out of the fast tier, runs in the full suite
def test_compaction_and_lifecycle_in_range_passes_store_the_same_files(tmp_path, monkeypatch):
    stored = []
    for passes in (None, 6):
        monkeypatch.setattr(rewrite, "_FORCED_PASSES", passes)
        storage = _journal(tmp_path / f"journal-{passes}")
        compact(storage, now=LATER)
        hot = sorted((f.path, storage.sha256(f.path)) for f in live_files(storage))
        report = lifecycle.apply(storage, lifecycle.plan(storage, LATER, hot_days=0),
                                 dry_run=False)
        assert report.moved and not report.refused
        cold = sorted((f.path, storage.sha256(f.path)) for f in live_files(storage))
        with JournalQuery(storage, actor="test") as q:
            stored.append((hot, cold, ids(q.find(tier="cold"))))
    assert stored[0] == stored[1]
    assert len(stored[0][2]) == 900


def _bench_day(tmp_path, subjects: int):
    """200,000 entries of the benchmark's generator over ``subjects`` subject tokens."""
    import numpy as np

    from benchmarks.bench_query import hex_strings, hour_of_entries

    rng = np.random.default_rng(3)
    table = hour_of_entries(rng, 0, 200_000, hex_strings(rng, subjects, 16),
                            np.zeros(8, np.int64))
    storage = LocalJournalStorage(str(tmp_path / "journal"))
    for i in range(3):
        write_rolled(storage, table.slice(i * 66_667, 66_667), files_per_partition=1,
                     prefix=f"w{i}")
    return storage, table


@pytest.mark.slow
def test_a_day_one_pass_refused_sorts_in_range_passes_at_the_same_limit(tmp_path, monkeypatch):
    """200,000 entries at 128 MiB: one pass runs out of memory (the refusal before range
    passes); the estimate's passes compact it, every entry once."""
    from benchmarks.bench_query import DAY as BENCH_DAY

    storage, table = _bench_day(tmp_path, 20_000)
    later = BENCH_DAY + dt.timedelta(days=2)
    spill = tmp_path / "spill"
    spill.mkdir()
    monkeypatch.setattr(rewrite, "_FORCED_PASSES", 1)
    refused = compact(storage, now=later,
                      options=CompactionOptions(memory_limit="128MiB", temp_dir=str(spill)))
    assert not refused.compacted and "raise --memory-limit" in refused.refused[0][1]
    monkeypatch.setattr(rewrite, "_FORCED_PASSES", None)
    done = compact(storage, now=later,
                   options=CompactionOptions(memory_limit="128MiB", temp_dir=str(spill)))
    assert len(done.compacted) == 1 and not done.refused
    with JournalQuery(storage, actor="test") as q:
        assert sorted(ids(q.find())) == sorted(ids(table))
    assert os.listdir(spill) == []


@pytest.mark.slow
def test_one_subject_bigger_than_the_limit_is_still_a_clear_refusal(tmp_path, monkeypatch):
    """A range never splits a key: a day of one subject token cannot be split, and at 128 MiB
    its sort is refused with what to do, nothing written. (Its files, read in order, happen to
    be in lookup order already; without the check that streams such a day, it compacts.)"""
    from benchmarks.bench_query import DAY as BENCH_DAY

    monkeypatch.setattr(rewrite, "in_lookup_order", lambda paths: False)

    storage, _ = _bench_day(tmp_path, 1)
    files_before = sorted(storage.list_files())
    with RewriteWorkspace("128MiB", str(tmp_path)) as ws:
        paths = [f.local for f in ws.spool(storage, files_before)]
        assert ws.passes(paths, 200_000) > 1  # the estimate asks for passes ...
        con = ws._connect()
        try:  # ... but one key gives one range
            assert ws._ranges(con, ws._source(paths), ["subject_token"], 7, 200_000) == [""]
        finally:
            con.close()
    report = compact(storage, now=BENCH_DAY + dt.timedelta(days=2),
                     options=CompactionOptions(memory_limit="128MiB"))
    assert not report.compacted
    [(_, why)] = report.refused
    assert "200,000 entries" in why and "raise --memory-limit" in why, why
    assert sorted(storage.list_files()) == files_before
    monkeypatch.undo()  # the check back: the day needs no sort, it is streamed at the same limit
    report = compact(storage, now=BENCH_DAY + dt.timedelta(days=2),
                     options=CompactionOptions(memory_limit="128MiB"))
    assert len(report.compacted) == 1 and not report.refused


@pytest.mark.parametrize("passes", [1, 5, 9])
def test_a_scattered_sort_reads_the_inputs_twice_whatever_the_number_of_passes(
        tmp_path, monkeypatch, passes):
    """From ``_SCATTER_FROM`` ranges the passes do not each scan every input (that made a
    50M-entry day take twice the time per million of a 10M one): the inputs are read by the
    boundary sample and one scatter, and each pass reads only its own range's spill file,
    removed once sorted, also when the reader stops early."""
    paths = _inputs(tmp_path)
    monkeypatch.setattr(rewrite, "_FORCED_PASSES", passes)
    monkeypatch.setattr(rewrite, "_SCATTER_FROM", 2)
    queries: list[str] = []
    for name in ("_reader", "_fetch"):
        real = getattr(RewriteWorkspace, name)

        def spy(self, con, rows, query, *args, _real=real, **kwargs):
            queries.append(query)
            return _real(self, con, rows, query, *args, **kwargs)
        monkeypatch.setattr(RewriteWorkspace, name, spy)
    files = [SpooledFile(p, p, os.path.getsize(p), "") for p in paths]
    with RewriteWorkspace("1GiB", str(tmp_path)) as ws:
        spill = os.path.join(ws.root, "spill")
        for sort in (lambda: sum(t.num_rows for t in ws.sorted_tables(files)),
                     lambda: ws.fingerprint(paths).rows):
            queries.clear()
            assert sort() == sum(pq.ParquetFile(p).metadata.num_rows for p in paths)
            reading_inputs = [q for q in queries if paths[0] in q]
            ranges = [q for q in queries if "FROM range_" in q]
            if passes == 1:
                assert len(reading_inputs) == 1 and not ranges  # the one sort
            else:
                assert len(reading_inputs) == 2  # the boundary sample, the scatter
                assert 3 <= len(ranges) <= passes  # one sort per range, of its own file only
                assert all(paths[0] not in q for q in ranges)
            assert os.listdir(spill) == []
        # a reader that stops early (an error downstream) leaves no range file behind
        tables = ws.sorted_tables(files)
        next(tables)
        tables.close()
        assert os.listdir(spill) == []
