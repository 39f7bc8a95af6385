"""Cold files leave out the output scores that follow from ``score`` (``score`` itself and
``1 - score``, bit for bit): the round trip is exact for any outputs (property), the DuckDB SQL
for other engines gives the same bits, every reader of the package sees the scores, and an
attacker who edits only the code column of a cold file is named by verify."""

from __future__ import annotations

import dataclasses
import math
import os
import struct

import duckdb
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from serve_journal.catalog import live_files
from serve_journal.catalog.layout import COLD
from serve_journal.fileformat import COLD_OPTIONS, decode_parquet, encode_parquet
from serve_journal.integrity.fingerprint import fingerprint, fingerprint_files
from serve_journal.maintain import lifecycle
from serve_journal.maintain.compaction import run_compaction
from serve_journal.read.query import JournalQuery
from serve_journal.read.verify import format_report
from serve_journal.schema import (
    DERIVED_SCORES,
    ENTRY_SCHEMA,
    OUTPUT_TYPE,
    RESTORE_OUTPUTS_SQL,
    conform_entries,
    derive_output_scores,
    restore_output_scores,
)
from tests.helpers.entries import make_entries, token
from tests.test_tiers_verify import COMPACT_AT, LIFECYCLE_AT, Journal

OUTPUTS = pa.list_(OUTPUT_TYPE)


def bits(value: float | None) -> int | None:
    return None if value is None else struct.unpack("<q", struct.pack("<d", value))[0]


def as_bits(table: pa.Table) -> list:
    """Each row's score and outputs with floats as their bit patterns (NaN payloads, -0.0)."""
    return [(bits(s), None if o is None else [x and (x["label"], bits(x["score"])) for x in o])
            for s, o in zip(table["score"].to_pylist(), table["outputs"].to_pylist(), strict=True)]


def minimal(rows: list[tuple[float | None, list | None]]) -> pa.Table:
    return pa.table({"score": pa.array([s for s, _ in rows], pa.float64()),
                     "outputs": pa.array([o for _, o in rows], OUTPUTS)})


FLOATS = st.one_of(st.floats(allow_nan=True, allow_infinity=True),
                   st.sampled_from([0.0, -0.0, 0.5, 1.0, math.nan, 0.1, 0.9]))


@st.composite
def rows(draw) -> tuple[float | None, list | None]:
    score = draw(st.one_of(st.none(), FLOATS))
    if draw(st.integers(0, 9)) == 0:
        return score, None
    outputs = []
    for i in range(draw(st.integers(0, 20))):
        kind = draw(st.sampled_from(["score", "complement", "other", "null", "no output"]))
        value = {"score": score, "complement": None if score is None else 1.0 - score,
                 "other": draw(FLOATS), "null": None, "no output": None}[kind]
        outputs.append(None if kind == "no output" else {"label": f"c{i % 3}", "score": value})
    return score, outputs


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(rows(), max_size=12))
def test_derive_then_restore_gives_back_every_bit(drawn):
    table = minimal(drawn)
    stored = derive_output_scores(table)
    assert stored.column_names == ["score", "outputs", DERIVED_SCORES]
    assert as_bits(restore_output_scores(stored)) == as_bits(table)
    # split into chunks, as a reader's batches arrive: the same
    halves = pa.concat_tables([stored.slice(0, len(drawn) // 2), stored.slice(len(drawn) // 2)])
    assert as_bits(restore_output_scores(halves)) == as_bits(table)
    for (score, outputs), kept in zip(drawn, stored["outputs"].to_pylist(), strict=True):
        if outputs and score is not None and outputs[0] and outputs[0]["score"] is not None and \
                bits(outputs[0]["score"]) == bits(score):
            assert kept[0]["score"] is None  # the first output equal to score is left out


def test_a_binary_classifier_stores_neither_score_in_either_order():
    table = minimal([(0.25, [{"label": "fraud", "score": 0.25}, {"label": "legit", "score": 0.75}]),
                     (0.25, [{"label": "legit", "score": 0.75}, {"label": "fraud", "score": 0.25}]),
                     (0.3, [{"label": "a", "score": 0.3}, {"label": "b", "score": 0.1}])])
    stored = derive_output_scores(table)
    assert stored[DERIVED_SCORES].to_pylist() == [1 + 16 * 2, 2 + 16 * 1, 1]
    assert [[o["score"] for o in row] for row in stored["outputs"].to_pylist()] == [
        [None, None], [None, None], [None, 0.1]]
    assert as_bits(restore_output_scores(stored)) == as_bits(table)


def test_the_sql_for_other_engines_restores_the_same_bits(tmp_path):
    drawn = [(0.5, [{"label": "a", "score": 0.5}, {"label": "b", "score": 0.5}]),
             (-0.0, [{"label": "a", "score": 0.0}, {"label": "b", "score": -0.0},
                     {"label": "c", "score": 1.0}]),
             (None, [{"label": "a", "score": None}]),
             (0.1, None), (0.1, []),
             (0.5, [{"label": "a", "score": 0.5}, None, {"label": "b", "score": 0.5}]),
             (0.7, [{"label": f"c{i}", "score": 0.7 if i == 16 else 0.01 * i} for i in range(18)]
              + [{"label": "x", "score": 1.0 - 0.7}]),
             (1e-300, [{"label": "n", "score": math.nan}, {"label": "c", "score": 1.0 - 1e-300},
                       {"label": "s", "score": 1e-300}])]
    table = minimal(drawn)
    path = tmp_path / "stored.parquet"
    pq.write_table(derive_output_scores(table), path)
    read = duckdb.sql(f"SELECT score, {RESTORE_OUTPUTS_SQL} AS outputs "
                      f"FROM read_parquet('{path}')").to_arrow_table()
    restored = pa.table({"score": read["score"], "outputs": read["outputs"].cast(OUTPUTS)})
    assert as_bits(restored) == as_bits(table) == as_bits(restore_output_scores(
        pq.read_table(path)))


def binary_entries(n: int, producer: str, seq_start: int = 0, **kwargs) -> pa.Table:
    """``make_entries`` with a binary classifier's outputs, fraud first or best first."""
    table = make_entries(n, producer=producer, seq_start=seq_start, **kwargs)
    outputs = []
    for i, score in enumerate(table["score"].to_pylist()):
        pair = [{"label": "fraud", "score": score}, {"label": "legit", "score": 1.0 - score}]
        outputs.append(pair if i % 3 else sorted(pair, key=lambda o: -o["score"]))
    if n > 5:  # a model whose outputs are not its score: both kept
        outputs[5] = [{"label": "fraud", "score": 0.123}, {"label": "legit", "score": 0.877}]
    return table.set_column(table.schema.get_field_index("outputs"), ENTRY_SCHEMA.field("outputs"),
                            pa.array(outputs, OUTPUTS))


@pytest.fixture
def cold(tmp_path) -> tuple[Journal, pa.Table, str]:
    """A signed journal written by the writer path, compacted, and moved to the cold tier."""
    j = Journal(str(tmp_path / "journal"))
    written = pa.concat_tables([binary_entries(300, "p-1", spread_s=3 * 3600),
                                binary_entries(300, "p-2", spread_s=3 * 3600),
                                binary_entries(5, "p-3", tokens=[token("alice")])])
    j.write("w00-test", [written])
    run_compaction(j.uri, apply=True, now=COMPACT_AT)
    report = lifecycle.run_lifecycle(j.uri, apply=True, hot_days=30, now=LIFECYCLE_AT)
    assert report.refused == []
    files = [f.path for f in live_files(j.storage, tier=COLD)]
    assert len(files) == 1 and not live_files(j.storage, tier="hot")
    return j, written, files[0]


def by_request(table: pa.Table) -> dict:
    return dict(zip(table["request_id"].to_pylist(), as_bits(table), strict=True))


def test_a_cold_file_leaves_them_out_and_every_reader_restores_them(cold):
    j, written, path = cold
    raw = pq.read_table(j.storage.full_path(path))
    assert raw.schema.names[-1] == DERIVED_SCORES
    stored = pc.list_flatten(raw["outputs"])
    # all but the two entries whose outputs were not their score's: both of their scores kept
    assert pc.struct_field(stored, "score").null_count == 2 * written.num_rows - 4
    assert pq.ParquetFile(j.storage.full_path(path)).schema_arrow.field(DERIVED_SCORES).type == pa.int16()

    expected = by_request(written)
    assert by_request(decode_parquet(j.storage.read(path))) == expected
    with JournalQuery(j.storage, actor="test") as q:
        assert by_request(q.find(tier="cold")) == expected
        alice = q.find(tier="cold", subject_token=token("alice"))  # the pruned point lookup
        assert alice.num_rows == 5
        assert by_request(alice) == {k: expected[k] for k in alice["request_id"].to_pylist()}
    assert fingerprint_files(j.storage, [path]) == fingerprint(written)
    j.assert_verifies()


def test_cold_files_are_smaller_with_them_left_out():
    table = conform_entries(make_entries(20_000, spread_s=3600))
    score = np.random.default_rng(7).beta(0.5, 8, table.num_rows)  # distinct: no dictionary
    outputs = [[{"label": "fraud", "score": s}, {"label": "legit", "score": 1.0 - s}]
               for s in score.tolist()]
    table = table.set_column(table.schema.get_field_index("score"), ENTRY_SCHEMA.field("score"),
                             pa.array(score))
    table = table.set_column(table.schema.get_field_index("outputs"),
                             ENTRY_SCHEMA.field("outputs"), pa.array(outputs, OUTPUTS))
    kept = encode_parquet(table, dataclasses.replace(COLD_OPTIONS, derive_scores=False))
    left_out = encode_parquet(table, COLD_OPTIONS)
    assert len(left_out) < len(kept) - 10 * table.num_rows  # ~13 B per entry
    assert as_bits(decode_parquet(left_out)) == as_bits(decode_parquet(kept))


def test_an_attacker_who_edits_only_the_code_column_is_named_by_verify(cold):
    """Without a key, someone swaps which output takes ``score`` in one entry of the cold file
    and rewrites it with every other column as it was: readers would see the two scores
    swapped; verify names the file as altered, bytes and entries."""
    j, written, path = cold
    full = j.storage.full_path(path)
    raw = pq.read_table(full)
    codes = raw[DERIVED_SCORES].to_pylist()
    victim = codes.index(1 + 16 * 2)
    codes[victim] = 2 + 16 * 1
    raw = raw.set_column(raw.schema.get_field_index(DERIVED_SCORES), raw.schema.field(DERIVED_SCORES),
                         pa.array(codes, pa.int16()))
    os.chmod(full, 0o644)
    pq.write_table(raw, full, compression="zstd")
    with JournalQuery(j.storage, actor="test") as q:
        seen = by_request(q.find(tier="cold"))
    assert seen != by_request(written)  # the edit is what readers see ...
    report = j.verify()
    assert not report.ok  # ... and verify says where
    named = {(p.kind, p.path) for p in report.errors}
    assert {("file-altered", path), ("file-entries-altered", path)} <= named, format_report(report)


def test_garbage_codes_never_crash_a_reader():
    """Codes no writer wrote: in range they restore something (verify names the file), out of
    range, of another type or without the columns they refer to they are a clear ValueError."""
    table = minimal([(0.2, [{"label": "a", "score": 0.2}]), (0.4, None), (None, [])])
    stored = derive_output_scores(table)
    for garbage in ([255, 255, 255], [0, 0, 7], [17, 240, 3]):
        forged = stored.set_column(2, stored.schema.field(2), pa.array(garbage, pa.int16()))
        restored = restore_output_scores(forged)
        assert restored.num_rows == 3 and DERIVED_SCORES not in restored.column_names
    assert np.isnan(restore_output_scores(minimal([(math.nan, [])])
                                          .append_column(DERIVED_SCORES, pa.array([1], pa.int16())))
                    ["score"][0].as_py())
    refused = [stored.set_column(2, DERIVED_SCORES, pa.array([-1, 0, 7], pa.int16())),
               stored.set_column(2, DERIVED_SCORES, pa.array([256, 0, 7], pa.int32())),
               stored.set_column(2, DERIVED_SCORES, pa.array(["1", "x", None])),
               stored.drop_columns(["outputs"]), stored.drop_columns(["score"])]
    for forged in refused:
        with pytest.raises(ValueError, match="not a journal file"):
            restore_output_scores(forged)


def test_a_null_list_over_child_values_and_a_null_output_round_trip():
    """Arrow lets a null list's offsets span child values (``ListArray.from_arrays`` with a
    mask); a null output inside a list keeps its place. Both come back as they were."""
    children = pa.StructArray.from_arrays([pa.array(["a", "b", "c", "d"]),
                                           pa.array([0.9, 0.1, 0.3, 0.7])], names=["label", "score"])
    hidden = pa.ListArray.from_arrays(pa.array([0, 2, 4], pa.int32()), children,
                                      mask=pa.array([True, False])).cast(OUTPUTS)
    table = pa.table({"score": pa.array([0.9, 0.3]), "outputs": hidden})
    stored = derive_output_scores(table)
    assert stored[DERIVED_SCORES].to_pylist() == [None, 1 + 16 * 2]
    assert as_bits(restore_output_scores(stored)) == as_bits(table)
    with_null = minimal([(0.5, [{"label": "a", "score": 0.5}, None, {"label": "b", "score": 0.5}])])
    assert as_bits(restore_output_scores(derive_output_scores(with_null))) == as_bits(with_null)


def test_a_kafka_message_carrying_the_file_only_column_is_undecodable_not_a_storage_fault():
    """The code column belongs to cold files. A message that carries it (with or without the
    columns it refers to) is refused as undecodable: the sink counts and skips it, its
    partition goes on (a KeyError here stalled the partition as a storage fault), and the
    code is never applied."""
    from serve_journal.sink.kafka import _decode_run
    from serve_journal.transport import wire

    table = conform_entries(make_entries(2))
    stored = derive_output_scores(table)
    good = wire.encode_messages(table, [b"k", b"k"])[0].value
    for forged in (stored, stored.drop_columns(["outputs"]), stored.drop_columns(["score"])):
        poison = wire._ipc_bytes(forged.combine_chunks().to_batches()[0])
        with pytest.raises(wire.WireFormatError):
            wire.decode_message(poison)
        stats = {"undecodable": 0, "duplicates": 0}
        out = _decode_run("topic", 0, 2, [(7, poison), (8, good)], stats)
        assert stats["undecodable"] == 1 and out.num_rows == table.num_rows
