"""forget counts a subject's entries through the index (row-group statistics and bloom filters),
not by reading every file: the count equals a full scan, and files and row groups that cannot
hold the subject are never read."""

from __future__ import annotations

import datetime as dt
import random

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest

from serve_journal.catalog import commit, live_files, marker_path
from serve_journal.catalog.layout import COLD, DEFAULT_SPEC
from serve_journal.fileformat import ParquetOptions, encode_parquet
from serve_journal.integrity.fingerprint import fingerprint
from serve_journal.privacy.forget import count_subject_entries, count_subject_index
from serve_journal.storage import LocalJournalStorage
from tests.helpers.entries import DAY, make_entries, token

SMALL_GROUPS = ParquetOptions(row_group_size=16)
"""Small row groups, so one file has many and the statistics prune inside a file too."""


def full_scan(storage, subject_token: str) -> tuple[int, list[tuple[str, str]]]:
    """The blunt answer: every row of every live file, filtered."""
    counts: dict[tuple[str, str], int] = {}
    for f in live_files(storage, tier="all"):
        table = pq.ParquetFile(pa.BufferReader(storage.read(f.path))).read(
            columns=["subject_token", "model_name", "model_version"])
        table = table.filter(pc.equal(table["subject_token"], subject_token))
        for name, version in zip(table["model_name"].to_pylist(),
                                 table["model_version"].to_pylist(), strict=True):
            counts[(name, version)] = counts.get((name, version), 0) + 1
    return sum(counts.values()), sorted(counts)


@pytest.fixture
def journal(tmp_path):
    """20 hot files over 4 hours, each holding a different group of 5 subjects (as a sticky
    router would), plus one committed cold file: 103 subjects in all."""
    storage = LocalJournalStorage(str(tmp_path / "journal"))
    rng = random.Random(15)
    seq = 0
    for i in range(20):
        group = [token(f"s-{i}-{k}") for k in range(5)]
        start = DAY + dt.timedelta(hours=i % 4, minutes=i)
        table = make_entries(rng.randint(20, 60), start=start, spread_s=60, tokens=group,
                             version=str(1 + i % 3), seq_start=seq, producer="p-1")
        seq += table.num_rows
        key = DEFAULT_SPEC.key_for("fraud", start)
        storage.put_new(DEFAULT_SPEC.file_path(key, f"w-{i:03d}"), encode_parquet(table, SMALL_GROUPS))
    cold_start = DAY - dt.timedelta(days=40)
    cold = make_entries(50, start=cold_start, spread_s=60, producer="p-2",
                        tokens=[token("s-0-0"), token("old-1"), token("old-2")], version="1")
    key = DEFAULT_SPEC.key_for("fraud", cold_start)
    path = DEFAULT_SPEC.file_path(key, "l-cold", COLD)
    storage.put_new(path, encode_parquet(cold, SMALL_GROUPS))
    commit(storage, kind="lifecycle", path=marker_path(key, COLD, "l-cold"), new_files=[path],
           replaces=[], expected=fingerprint(cold), signer=None)
    return storage


@pytest.mark.slow  # over 1.5 s: kept out of the fast tier, runs in the full suite
def test_count_through_the_index_equals_a_full_scan(journal):
    subjects = [token(f"s-{i}-{k}") for i in range(20) for k in range(5)]
    subjects += [token("old-1"), token("old-2"), token("never-seen")]
    for subject in subjects:
        assert count_subject_entries(journal, subject) == full_scan(journal, subject), subject
    assert count_subject_entries(journal, token("never-seen")) == (0, [])


def test_pruning_skips_the_files_and_row_groups_that_cannot_hold_the_subject(journal):
    total_groups = sum(pq.ParquetFile(pa.BufferReader(journal.read(f.path))).num_row_groups
                       for f in live_files(journal, tier="all"))
    count = count_subject_index(journal, token("s-0-0"))  # one hot file and the cold file
    assert count.complete and count.entries == full_scan(journal, token("s-0-0"))[0] > 0
    assert count.files == 21, "every live file's footer is consulted"
    assert count.files_read == 2, "only the two files holding the subject are read"
    assert 0 < count.row_groups_read < total_groups // 10
    absent = count_subject_index(journal, token("never-seen"))
    assert (absent.entries, absent.files_read, absent.row_groups_read) == (0, 0, 0)
