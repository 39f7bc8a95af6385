"""A file's streamed summary equals the manifest record of the whole table, for any batch split
and any order of producers and sequence numbers; verify reads files larger than its in-memory
spool from a private copy and still finds an edited entry, a forged record's sequence ranges
and an unreadable file."""

from __future__ import annotations

import base64
import io
import os
import tempfile

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from serve_journal.fileformat import decode_parquet, encode_parquet
from serve_journal.integrity import summary as summary_mod
from serve_journal.integrity.manifest import (
    ManifestRecord,
    ManifestSigner,
    SeqRuns,
    pack_runs,
    sequence_ranges,
    unpack_runs,
)
from serve_journal.integrity.merkle import table_merkle_root
from serve_journal.integrity.summary import SequenceRuns, summarize
from serve_journal.read import verify as verify_mod
from serve_journal.read.verify import format_report
from serve_journal.schema import conform_entries
from tests.helpers.entries import make_entries
from tests.helpers.manifest_tables import make_table
from tests.test_verify import _local_backend, _s3_backend, errors, run, standard_journal

pairs = st.lists(st.tuples(st.sampled_from(["p-a", "p-b", None, "p-c"]),
                           st.one_of(st.none(), st.integers(0, 60))), max_size=200)


@settings(max_examples=300, deadline=None)
@given(pairs, st.lists(st.integers(1, 50), min_size=1, max_size=8))
def test_runs_added_in_any_batches_equal_sequence_ranges(rows, cuts) -> None:
    producers = pa.array([p for p, _ in rows], pa.string())
    seqs = pa.array([s for _, s in rows], pa.int64())
    runs = SequenceRuns()
    start = 0
    for cut in [*cuts, len(rows)]:
        runs.add(producers.slice(start, cut), seqs.slice(start, cut))
        start += cut
        if start >= len(rows):
            break
    keep = [i for i, (_, s) in enumerate(rows) if s is not None]
    expected = sequence_ranges(pa.array([rows[i][0] for i in keep], pa.string()),
                               pa.array([rows[i][1] for i in keep], pa.int64()))
    assert runs.result() == expected


def test_runs_merge_as_they_grow_and_stay_exact(monkeypatch) -> None:
    """Many short runs (a file sorted by subject) are merged whenever they pile up, and the
    result is still exact."""
    monkeypatch.setattr(summary_mod, "_MERGE_AT", 64)
    rng = np.random.default_rng(3)
    seqs = rng.permutation(np.arange(100_000))
    seqs = seqs[seqs % 997 != 5]  # gaps that stay
    runs = SequenceRuns()
    seen = peak = 0
    for part in np.array_split(seqs, 300):
        runs.add(pa.array(["p"] * len(part)), pa.array(part, pa.int64()))
        seen += len(part)
        peak = max(peak, len(summary_mod._merged(seqs[:seen], seqs[:seen])[0]))
        held = sum(len(s) for s, _ in runs._parts["p"])
        # the runs of the last merge (never more than the most there have been) and at most as
        # many new ones since
        assert held <= 2 * peak + 64 + len(part)
    assert runs.result() == sequence_ranges(pa.array(["p"] * len(seqs)), pa.array(seqs, pa.int64()))


def test_summary_of_a_file_equals_its_record() -> None:
    table = make_entries(3_000, producer="p-0", seq_start=10)
    table = pa.concat_tables([table, make_entries(2_000, producer="p-1", seq_start=0)])
    data = encode_parquet(table)
    whole = conform_entries(pq.ParquetFile(pa.BufferReader(data)).read(), stored=True)
    got = summarize(io.BytesIO(data))
    assert got.rows == 5_000
    assert got.merkle_root == table_merkle_root(whole)
    assert got.seq_ranges == sequence_ranges(whole.column("producer_id"), whole.column("seq"))


@pytest.mark.parametrize("where", ["local", "s3"])
def test_verify_reads_large_files_from_a_private_copy_a_batch_at_a_time(where, tmp_path, request,
                                                                        monkeypatch) -> None:
    """Every file over the in-memory spool (so copied to a temporary file) and read 4 rows at a
    time: a clean journal verifies with every entry counted; an entry edited in a file's last
    batch, a row dropped, and bytes that are no Parquet file are each found; and no copy is left
    in the temporary folder."""
    monkeypatch.setattr(verify_mod, "SPOOL_IN_MEMORY_BYTES", 0)
    monkeypatch.setattr(summary_mod, "BATCH_ROWS", 4)
    spool_dir = tmp_path / "spool"
    spool_dir.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(spool_dir))
    backend = (_local_backend(tmp_path) if where == "local"
               else _s3_backend(request.getfixturevalue("s3_bucket")))
    signer = ManifestSigner.generate()
    paths = standard_journal(backend, signer)
    report = run(backend, signer)
    assert report.ok, format_report(report)
    assert (report.files, report.entries) == (3, 25)

    rows = decode_parquet(backend.storage.read(paths[0])).to_pylist()
    rows[-1]["decision"] = "block"  # the last batch of 4 rows
    backend.overwrite(paths[0], encode_parquet(pa.Table.from_pylist(rows, schema=make_table("p1", []).schema)))
    table = decode_parquet(backend.storage.read(paths[1]))
    backend.overwrite(paths[1], encode_parquet(table.slice(1)))
    backend.overwrite(paths[2], b"PAR1 not a parquet file")
    found = errors(run(backend, signer))
    assert {("file-entries-altered", paths[0]), ("file-row-count", paths[1]),
            ("file-entries-altered", paths[1]), ("file-unreadable", paths[2])} <= found
    assert ("file-row-count", paths[0]) not in found
    assert not os.listdir(spool_dir)


# -- verify's sequence checks on arrays give what the list-based checks gave ----------------------


def _reference_claims(records, replaced, report) -> None:
    """The list-based check verify used before its runs became arrays (``ece1d14``)."""
    claims: dict = {}
    for record in records:
        if record.path in replaced:
            continue
        for producer, ranges in record.seq_ranges.items():
            for lo, hi in ranges:
                claims.setdefault(producer, []).append((int(lo), int(hi), record.path))
    for producer, items in sorted(claims.items()):
        items.sort()
        end, end_path = items[0][1], items[0][2]
        for lo, hi, path in items[1:]:
            if lo <= end and path != end_path:
                report._add("sequence-claimed-twice", path, (
                    f"producer {producer}: sequence {lo}..{min(hi, end)} is also claimed by "
                    f"{end_path}, and neither replaces the other (an entry forged or written twice)"))
            if hi > end:
                end, end_path = hi, path


def _reference_sequences(records, accounted, seq_start, report) -> None:
    """Gap finding as verify did it before its runs became arrays (the reporting is shared)."""
    runs: dict = {}
    for record in records:
        for producer, ranges in record.seq_ranges.items():
            for lo, hi in ranges:
                runs.setdefault(producer, []).append((int(lo), int(hi), record))
    report.producers = len(runs)
    covered = {p: verify_mod._merge((lo, hi) for lo, hi, _ in gaps) for p, gaps in accounted.items()}
    for producer, items in sorted(runs.items()):
        items.sort(key=lambda item: (item[0], item[1]))
        gaps = []
        first_lo, _, first_record = items[0]
        if seq_start is not None and first_lo > seq_start:
            gaps.append((seq_start, first_lo - 1, "", first_record.path))
        end, end_record = items[0][1], items[0][2]
        for lo, hi, record in items[1:]:
            if lo > end + 1:
                gaps.append((end + 1, lo - 1, end_record.path, record.path))
            if hi > end:
                end, end_record = hi, record
        verify_mod._report_gaps(producer, gaps, covered.get(producer, []), report)


runs_of = st.lists(st.tuples(st.integers(0, 40), st.integers(0, 6)).map(lambda t: [t[0], t[0] + t[1]]),
                   max_size=5)
record_specs = st.lists(st.tuples(st.sampled_from(["hot/a", "hot/b", "hot/c", "cold/d"]),
                                  st.dictionaries(st.sampled_from(["p1", "p2", ""]), runs_of,
                                                  max_size=3)), max_size=6)


@settings(max_examples=400, deadline=None)
@given(record_specs, st.dictionaries(st.sampled_from(["p1", "p2"]), st.lists(
           st.tuples(st.integers(0, 50), st.integers(0, 5)).map(lambda t: (t[0], t[0] + t[1], "drop")),
           max_size=3), max_size=2),
       st.sampled_from([0, 3, None]), st.sets(st.sampled_from(["hot/a", "cold/d"])))
def test_sequence_checks_on_arrays_equal_the_list_based_checks(specs, accounted, seq_start,
                                                               replaced) -> None:
    records = [ManifestRecord(path=path, sha256="0" * 64, size=1, row_count=1, min_ts_us=None,
                              max_ts_us=None, seq_ranges=ranges, merkle_root="", tier="hot")
               for path, ranges in specs]
    got, want = verify_mod.VerifyReport(journal="j"), verify_mod.VerifyReport(journal="j")
    verify_mod._check_sequences(records, accounted, seq_start, got)
    _reference_sequences(records, accounted, seq_start, want)
    verify_mod._check_claims(records, {}, replaced, got)
    _reference_claims(records, replaced, want)
    assert got.problems == want.problems
    assert (got.producers, got.accounted_gaps) == (want.producers, want.accounted_gaps)


# -- what an attacker can plant ------------------------------------------------------------------

BAD_RUNS = [[[1, 2], [3]], [[1, [2]]], [[2**63, 2**64 - 1]], [[1.5, 2]], [[True, False]],
            "1-2", [[1, 2**70]], {"lo": 1}, "r1:!!", "r1:gA==", "r1:AQ==",
            "r1:" + base64.b64encode(b"\xff" * 9 + b"\x01\x00").decode(),
            "r1:" + base64.b64encode(b"\xff" * 8 + b"\x7f" + b"\xff" * 8 + b"\x7f").decode()]


@pytest.mark.parametrize("runs", BAD_RUNS, ids=range(len(BAD_RUNS)))
def test_a_planted_record_with_malformed_runs_is_a_finding_not_a_crash(tmp_path, runs) -> None:
    """Anyone who can write the bucket can write a record: ragged, nested, fractional, boolean or
    out-of-range runs make verify report it (and compaction's ``signed_records`` skip it), never
    raise."""
    import json

    from serve_journal.read.verify import signed_records

    backend = _local_backend(tmp_path)
    signer = ManifestSigner.generate()
    standard_journal(backend, signer)
    good = json.loads(backend.storage.read("_manifest/writer-1/000000000000.json"))
    planted = {**good, "chain_id": "evil", "index": 0, "seq_ranges": {"p9": runs}}
    backend.raw_put("_manifest/evil/000000000000.json",
                    json.dumps(planted, sort_keys=True).encode())
    report = run(backend, signer)
    assert ("manifest-record-unreadable", "_manifest/evil/000000000000.json") in errors(report)
    assert len(signed_records(backend.storage, signer.export_public_key())) == 3


def test_an_object_grown_past_its_record_is_not_copied_whole(tmp_path, monkeypatch) -> None:
    """A recorded file grown to a terabyte (sparse here; a huge object on S3): verify stops
    copying it a little past twice the record's size, reports it altered, and leaves no copy."""
    monkeypatch.setattr(verify_mod, "SPOOL_IN_MEMORY_BYTES", 0)
    spool_dir = tmp_path / "spool"
    spool_dir.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(spool_dir))
    backend = _local_backend(tmp_path)
    signer = ManifestSigner.generate()
    paths = standard_journal(backend, signer)
    full = backend.storage.full_path(paths[1])
    os.chmod(full, 0o644)
    os.truncate(full, 1 << 40)  # 1 TiB, sparse: reads as zeros
    seen = []
    real_write = tempfile.SpooledTemporaryFile.write
    monkeypatch.setattr(tempfile.SpooledTemporaryFile, "write",
                        lambda self, chunk: seen.append(len(chunk)) or real_write(self, chunk))
    report = run(backend, signer)
    assert ("file-altered", paths[1]) in errors(report)
    assert any("read stopped there" in p.detail for p in report.errors if p.path == paths[1])
    assert sum(seen) < 3 * os.path.getsize(backend.storage.full_path(paths[0])) + (1 << 24)
    assert not os.listdir(spool_dir)


def test_runs_at_the_top_of_int64_do_not_wrap() -> None:
    top = 2**63 - 1
    producers = pa.array(["p", "p", "p", "q"])
    seqs = pa.array([top, top, top - 1, -(2**63)], pa.int64())
    runs = SequenceRuns()
    runs.add(producers, seqs)
    assert runs.result() == sequence_ranges(producers, seqs) == {"p": [[top - 1, top]],
                                                                 "q": [[-(2**63), -(2**63)]]}
    report = verify_mod.VerifyReport(journal="j")
    record = ManifestRecord(path="hot/a", sha256="0" * 64, size=1, row_count=1, min_ts_us=None,
                            max_ts_us=None, seq_ranges={"p": [[0, top - 1], [top, top]]},
                            merkle_root="", tier="hot")
    verify_mod._check_sequences([record], {}, 0, report)
    assert (report.problems, report.accounted_gaps) == ([], 0)


# -- record format 2: packed runs ----------------------------------------------------------------

sorted_runs = st.lists(st.tuples(st.integers(0, 2**40), st.integers(0, 2**20)), max_size=60).map(
    lambda pairs: _disjoint(pairs))


def _disjoint(pairs):
    out, cursor = [], 0
    for gap, span in pairs:
        lo = cursor + gap
        out.append([lo, lo + span])
        cursor = lo + span + 1
    return out


@settings(max_examples=300, deadline=None)
@given(sorted_runs, st.sampled_from([0, 2**62, 2**63 - 1 - 61 * (2**40 + 2**20 + 1)]))
def test_packed_runs_round_trip(runs, offset) -> None:
    runs = [[lo + offset, hi + offset] for lo, hi in runs]
    text = pack_runs(np.array(runs, dtype=np.int64).reshape(-1, 2))
    assert text is not None and text.startswith("r1:")
    assert unpack_runs(text).tolist() == runs
    assert SeqRuns(text) == runs


def test_runs_not_sorted_disjoint_or_non_negative_stay_a_list() -> None:
    for runs in ([[5, 3]], [[0, 4], [4, 6]], [[3, 4], [0, 1]], [[-1, 2]]):
        assert pack_runs(np.array(runs)) is None
        record = ManifestRecord(path="hot/a", sha256="0" * 64, size=1, row_count=1,
                                min_ts_us=None, max_ts_us=None, seq_ranges={"p": runs},
                                merkle_root="", tier="hot")
        assert record.to_dict()["seq_ranges"] == {"p": runs}
        assert ManifestRecord.from_json(record.to_json()) == record


def test_records_written_now_pack_their_runs_and_format_1_records_still_verify(tmp_path) -> None:
    """A new record stores each producer's runs as one packed string; a journal whose chain
    holds format-1 records (lists) beside format-2 ones verifies, and an edit of either kind of
    record is caught."""
    import dataclasses
    import json

    from serve_journal.integrity.manifest import ManifestLog, build_file_record
    from tests.helpers.manifest_tables import data_path

    backend = _local_backend(tmp_path)
    signer = ManifestSigner.generate()
    log = ManifestLog(backend.storage, "writer-1", signer, backend.witness)
    paths = []
    for i, (fmt, seqs) in enumerate([(1, range(0, 10)), (2, [*range(10, 15), *range(17, 20)])]):
        table = make_table("p1", seqs)
        stored = backend.storage.put_new(data_path(f"f{i}"), encode_parquet(table))
        log.append(dataclasses.replace(build_file_record(stored, table, "hot", log.chain_id),
                                       format=fmt))
        paths.append(stored.path)
    log.checkpoint()
    docs = [json.loads(backend.storage.read(f"_manifest/writer-1/{i:012d}.json")) for i in (0, 1)]
    assert docs[0]["format"] == 1 and docs[0]["seq_ranges"] == {"p1": [[0, 9]]}
    assert docs[1]["format"] == 2 and docs[1]["seq_ranges"]["p1"].startswith("r1:")
    assert ManifestRecord.from_json(json.dumps(docs[1]).encode()).seq_ranges == {
        "p1": [[10, 14], [17, 19]]}
    report = run(backend, signer, accounted_gaps={"p1": [(15, 16, "dropped")]})
    assert report.ok, format_report(report)

    for i, doc in enumerate(docs):  # re-pointed runs, in each record's own form
        runs = doc["seq_ranges"]["p1"]
        forged = [[0, 12]] if isinstance(runs, list) else pack_runs(np.array([[10, 19]]))
        backend.raw_put(f"_manifest/writer-1/{i:012d}.json",
                        json.dumps({**doc, "seq_ranges": {"p1": forged}}, sort_keys=True,
                                   separators=(",", ":")).encode())
        found = {kind for kind, _ in errors(run(backend, signer))}
        assert "manifest-record-altered" in found
        backend.raw_put(f"_manifest/writer-1/{i:012d}.json",
                        json.dumps(doc, sort_keys=True, separators=(",", ":")).encode())


def test_packed_runs_reach_the_top_of_int64() -> None:
    top = 2**63 - 1
    runs = np.array([[0, 0], [top - 1, top]])
    assert unpack_runs(pack_runs(runs)).tolist() == runs.tolist()


def _stored(record: ManifestRecord, runs, fmt: int) -> bytes:
    """``record`` stored with ``runs`` for producer p1 in format ``fmt``, its hash recomputed
    over exactly that (what anyone who can write the bucket can do; only the signature is out of
    reach)."""
    import hashlib

    from serve_journal.integrity.manifest import canonical_json

    doc = {**record.to_dict(), "format": fmt, "seq_ranges": {"p1": runs}}
    doc.pop("record_hash")
    doc["record_hash"] = hashlib.sha256(canonical_json(doc)).hexdigest()
    return canonical_json(doc)


def test_a_record_has_one_stored_form() -> None:
    """Runs stored in a form no writer of that format gives (a packable list in format 2, a
    string in format 1, an over-long number or stray base64 bits) decode to the same runs, but
    the record is not canonical, so verify reports it altered; an unknown format is unreadable."""
    from serve_journal.errors import ManifestError

    record = ManifestRecord(path="hot/a", sha256="0" * 64, size=1, row_count=8, min_ts_us=None,
                            max_ts_us=None, seq_ranges={"p1": [[3, 7]]}, merkle_root="",
                            tier="hot")
    genuine = {1: _stored(record, [[3, 7]], 1), 2: _stored(record, "r1:AwQ=", 2)}
    for fmt, data in genuine.items():
        parsed, canonical, hash_ok = ManifestRecord.from_json_checked(data)
        assert (canonical, hash_ok, parsed.to_json() == data) == (True, True, True), fmt
    odd = [(_stored(record, [[3, 7]], 2)), _stored(record, "r1:AwQ=", 1),
           _stored(record, "r1:" + base64.b64encode(b"\x83\x00\x04").decode(), 2),
           _stored(record, "r1:AwR=", 2)]
    for data in odd:
        parsed, canonical, _ = ManifestRecord.from_json_checked(data)
        assert parsed.seq_ranges == {"p1": [[3, 7]]}
        assert not canonical and parsed.to_json() != data
    for fmt in ("2", None, 3, True):
        with pytest.raises(ManifestError, match="format"):
            ManifestRecord.from_json(_stored(record, [[3, 7]], fmt))


def test_a_dead_sink_of_an_earlier_release_is_sealed_after_the_upgrade() -> None:
    """A Kafka sink that died before the upgrade left format-1 records; the run after it
    re-derives the same files in format 2: the records match as values, so the dead tail is
    signed (not left to fail verify for good once its grace period is over)."""
    import dataclasses

    from serve_journal.sink.kafka_app import KafkaSinkRunner

    ours = ManifestRecord(path="hot/a", sha256="0" * 64, size=1, row_count=8, min_ts_us=None,
                          max_ts_us=None, seq_ranges={"p1": [[3, 7], [9, 9]]}, merkle_root="",
                          tier="hot", index=0, chain_id="new")
    runner = KafkaSinkRunner.__new__(KafkaSinkRunner)
    runner._recorded = {"hot/a": ours}
    theirs = dataclasses.replace(ours, format=1, chain_id="dead", index=4)
    assert runner._matches_recorded(theirs, signed_length=1)
    assert not runner._matches_recorded(
        dataclasses.replace(theirs, seq_ranges={"p1": [[3, 7]]}), signed_length=1)
