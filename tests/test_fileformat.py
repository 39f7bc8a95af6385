"""Per-file encoding choices: scores with few distinct values get a dictionary, full-precision
scores keep BYTE_STREAM_SPLIT, and the choice never changes a value or a Merkle root."""

from __future__ import annotations

import random

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest

from serve_journal.fileformat import (
    COLD_OPTIONS,
    HOT_OPTIONS,
    decode_parquet,
    dictionary_pays,
    encode_parquet,
    sort_for_lookup,
)
from serve_journal.integrity.merkle import table_merkle_root
from serve_journal.maintain.rewrite import RewriteWorkspace
from serve_journal.schema import conform_entries
from serve_journal.storage import open_storage
from tests.helpers.entries import make_entries

SCORES = ("score", "outputs.list.element.score")


def _with_scores(table: pa.Table, scores: list[float]) -> pa.Table:
    outputs = pa.array([[{"label": "fraud", "score": s}] for s in scores],
                       type=table.schema.field("outputs").type)
    table = table.set_column(table.schema.get_field_index("score"), "score", pa.array(scores))
    return table.set_column(table.schema.get_field_index("outputs"), "outputs", outputs)


def _encodings(source) -> dict[str, set[str]]:
    meta = pq.ParquetFile(source).metadata
    out: dict[str, set[str]] = {}
    for rg in range(meta.num_row_groups):
        for c in range(meta.num_columns):
            column = meta.row_group(rg).column(c)
            out.setdefault(column.path_in_schema, set()).update(column.encodings)
    return out


def _table(n: int, *, rounded: bool) -> pa.Table:
    rng = random.Random(7)
    scores = [round(rng.random(), 3) if rounded else rng.random() for _ in range(n)]
    return _with_scores(make_entries(n), scores)


def test_dictionary_pays_only_for_few_repeated_values():
    assert dictionary_pays(1_000, 100_000)
    assert not dictionary_pays(30_000, 100_000)     # fewer than four rows per value
    assert not dictionary_pays(70_000, 10_000_000)  # dictionary page over its limit
    assert not dictionary_pays(0, 100)


@pytest.mark.slow  # over 1.5 s: kept out of the fast tier, runs in the full suite
def test_rounded_scores_get_a_dictionary_and_keep_their_values_and_root():
    table = _table(20_000, rounded=True)
    data = encode_parquet(table, COLD_OPTIONS)
    encodings = _encodings(pa.BufferReader(data))
    for column in SCORES:
        assert "RLE_DICTIONARY" in encodings[column], encodings[column]
        assert "BYTE_STREAM_SPLIT" not in encodings[column]
    back = conform_entries(pq.ParquetFile(pa.BufferReader(data)).read(), stored=True)
    expected = sort_for_lookup(conform_entries(table))
    assert back.equals(expected)
    assert table_merkle_root(back) == table_merkle_root(expected)


def test_full_precision_scores_keep_byte_stream_split():
    data = encode_parquet(_table(20_000, rounded=False), COLD_OPTIONS)
    encodings = _encodings(pa.BufferReader(data))
    for column in SCORES:
        assert "BYTE_STREAM_SPLIT" in encodings[column], encodings[column]
        assert "RLE_DICTIONARY" not in encodings[column]


def test_small_hot_files_of_rounded_scores_keep_byte_stream_split():
    # 1,000 rows with ~1,000 distinct values: a dictionary would only add its page
    encodings = _encodings(pa.BufferReader(encode_parquet(_table(1_000, rounded=False),
                                                          HOT_OPTIONS)))
    assert "BYTE_STREAM_SPLIT" in encodings["score"]


def test_rewrite_picks_the_same_encoding_from_its_distinct_estimates(tmp_path):
    storage = open_storage(str(tmp_path / "journal"))
    rounded, precise = _table(12_000, rounded=True), _table(12_000, rounded=False)
    for name, table in (("rounded", rounded), ("precise", precise)):
        parts = [table.slice(i, 3_000) for i in range(0, table.num_rows, 3_000)]
        paths = []
        for i, part in enumerate(parts):
            path = f"{name}/{i}.parquet"
            storage.put_new(path, encode_parquet(part, HOT_OPTIONS))
            paths.append(path)
        with RewriteWorkspace(memory_limit="256MiB", temp_dir=str(tmp_path)) as workspace:
            files = workspace.spool(storage, paths)
            [out] = workspace.write_sorted(files, [name], COLD_OPTIONS, rows_per_file=12_000)
            encodings = _encodings(out)
            written = conform_entries(pq.read_table(out), stored=True)
        want = "RLE_DICTIONARY" if name == "rounded" else "BYTE_STREAM_SPLIT"
        for column in SCORES:
            assert want in encodings[column], (name, column, encodings[column])
        assert sorted(pc.round(written["score"], 12).to_pylist()) == sorted(
            pc.round(table["score"], 12).to_pylist())
        assert table_merkle_root(written) == table_merkle_root(sort_for_lookup(table))


def test_a_rewrite_under_a_small_limit_writes_smaller_row_groups(tmp_path):
    storage = open_storage(str(tmp_path / "journal"))
    storage.put_new("in/0.parquet", encode_parquet(_table(2_000, rounded=True), HOT_OPTIONS))
    for limit, expect_full in (("4GiB", True), ("256MiB", False)):
        with RewriteWorkspace(memory_limit=limit, temp_dir=str(tmp_path)) as workspace:
            files = workspace.spool(storage, ["in/0.parquet"])
            rows = workspace.row_group_rows(files, COLD_OPTIONS)
        assert (rows == COLD_OPTIONS.row_group_size) == expect_full, (limit, rows)
        assert 64 * 1024 <= rows <= COLD_OPTIONS.row_group_size


def _codecs(data: bytes) -> set[str]:
    meta = pq.ParquetFile(pa.BufferReader(data)).metadata
    return {meta.row_group(rg).column(c).compression
            for rg in range(meta.num_row_groups) for c in range(meta.num_columns)}


@pytest.mark.parametrize("rows", [1, 110, 511, 512, 2_000])
def test_small_hot_files_are_lz4_and_larger_ones_and_cold_files_zstd(rows):
    """zstd's set-up per column chunk is half the cost of writing a file of ~100 entries, which a
    writer at a low rate rolls every half second: such files are LZ4 (compaction rewrites them);
    from 512 rows on, and in the cold tier always, zstd. The codec never changes a row."""
    table = _table(rows, rounded=False)
    hot, cold = encode_parquet(table, HOT_OPTIONS), encode_parquet(table, COLD_OPTIONS)
    assert _codecs(hot) == ({"LZ4"} if rows < 512 else {"ZSTD"})
    assert _codecs(cold) == {"ZSTD"}
    expected = sort_for_lookup(conform_entries(table)).to_pylist()
    for data in (hot, cold):
        assert decode_parquet(data).to_pylist() == expected


def test_small_hot_files_are_lz4_raw_for_other_readers(tmp_path):
    """Parquet's ``LZ4_RAW`` (not the deprecated Hadoop-framed ``LZ4``), which DuckDB reads."""
    import duckdb

    path = tmp_path / "small.parquet"
    path.write_bytes(encode_parquet(_table(110, rounded=False), HOT_OPTIONS))
    codecs = duckdb.sql(f"SELECT DISTINCT compression FROM parquet_metadata('{path}')").fetchall()
    assert codecs == [("LZ4_RAW",)]
    assert duckdb.sql(f"SELECT count(*) FROM '{path}'").fetchall() == [(110,)]
