"""The streaming fingerprint (a rewrite's, in bounded memory) equals the in-memory one for any
entries, chunking, input order, schema-version mix and doubled entry."""

from __future__ import annotations

import datetime as dt
import random

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from serve_journal.integrity.fingerprint import (
    fingerprint,
    fingerprint_local_files,
    fingerprint_ordered,
)
from serve_journal.maintain.rewrite import RewriteWorkspace
from serve_journal.schema import ADDED_COLUMNS, ENTRY_SCHEMA, conform_entries
from tests.helpers.entries import make_entries


def _messy(n: int, seed: int, *, v2: bool) -> pa.Table:
    """Entries with nulls in strings, lists and struct fields, empty lists, NaN and -0.0."""
    rng = random.Random(seed)
    table = make_entries(n, producer=f"p-{seed % 3}", seq_start=rng.randrange(0, 50))
    rows = table.to_pylist()
    for row in rows:
        pick = rng.random()
        if pick < 0.1:
            row["outputs"] = None
        elif pick < 0.2:
            row["outputs"] = []
        elif pick < 0.3:
            row["outputs"] = [{"label": None, "score": float("nan")},
                              {"label": "x" * rng.randrange(0, 40), "score": -0.0}]
        if rng.random() < 0.2:
            row["explanation_ref"] = "é" * rng.randrange(0, 5) if rng.random() < 0.5 else ""
        if rng.random() < 0.1:
            row["app_name"] = None
        if v2:
            row["schema_version"] = 2
            row["model_run_id"] = rng.choice([None, "run-1", "run-2"])
            row["models"] = rng.choice([None, [], [{"name": "fraud", "version": "3", "run_id": None,
                                                     "digest": "sha256:00", "role": "shadow"}]])
    return pa.Table.from_pylist(rows, schema=ENTRY_SCHEMA)


def _write(path, table: pa.Table, *, v1: bool = False, row_group: int = 37) -> str:
    if v1:
        table = table.drop_columns([c for c in ADDED_COLUMNS if c in table.column_names])
    pq.write_table(table, path, row_group_size=row_group)
    return str(path)


@pytest.mark.parametrize("chunk", [1, 7, 8, 64, 1000])
def test_ordered_chunks_fingerprint_like_one_table(chunk):
    table = conform_entries(pa.concat_tables([_messy(300, 1, v2=True), _messy(200, 2, v2=False)]))
    ordered = table.sort_by([("producer_id", "ascending"), ("seq", "ascending")])

    def column(name):
        def chunks():
            values = ordered.column(name).combine_chunks()
            for start in range(0, len(values), chunk):
                yield values.slice(start, chunk)
        return chunks

    assert fingerprint_ordered(ordered.num_rows, column) == fingerprint(table)


@pytest.mark.parametrize("seed", range(4))
def test_workspace_fingerprint_equals_the_in_memory_one(tmp_path, seed):
    rng = random.Random(seed)
    paths = []
    for i in range(5):
        v1 = rng.random() < 0.4
        table = _messy(rng.randrange(1, 400), seed * 10 + i, v2=not v1)
        paths.append(_write(tmp_path / f"{i}.parquet", table, v1=v1,
                            row_group=rng.choice([5, 64, 1000])))
    if seed % 2:  # a doubled entry with other content: input order decides the tie
        dup = _messy(3, seed * 10 + 1, v2=True)
        dup = dup.set_column(dup.schema.get_field_index("latency_ms"), "latency_ms",
                             pa.array([9.0, 8.0, 7.0], pa.float32()))
        paths.append(_write(tmp_path / "dup.parquet", dup))
    with RewriteWorkspace(memory_limit="64MiB", temp_dir=str(tmp_path)) as workspace:
        got = workspace.fingerprint(paths)
        reversed_ = workspace.fingerprint(paths[::-1])
    assert got == fingerprint_local_files(paths)
    assert reversed_ == fingerprint_local_files(paths[::-1])


def test_workspace_fingerprint_of_v1_files_leaves_added_columns_out(tmp_path):
    table = _messy(120, 5, v2=False)
    path = _write(tmp_path / "v1.parquet", table, v1=True)
    with RewriteWorkspace(memory_limit="64MiB", temp_dir=str(tmp_path)) as workspace:
        assert workspace.fingerprint([path]) == fingerprint(table)


def test_workspace_fingerprint_sees_a_changed_value(tmp_path):
    table = _messy(200, 9, v2=True)
    changed = table.set_column(table.schema.get_field_index("ts"), "ts", pa.array(
        [t + dt.timedelta(microseconds=1 if i == 150 else 0)
         for i, t in enumerate(table.column("ts").to_pylist())], table.schema.field("ts").type))
    a = _write(tmp_path / "a.parquet", table)
    b = _write(tmp_path / "b.parquet", changed)
    with RewriteWorkspace(memory_limit="64MiB", temp_dir=str(tmp_path)) as workspace:
        assert workspace.fingerprint([a]) != workspace.fingerprint([b])
