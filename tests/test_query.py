"""Queries over real Parquet journal files: exact rows across partitions, the access log."""

from __future__ import annotations

import datetime as dt
import json

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest

from serve_journal.catalog.layout import DEFAULT_SPEC
from serve_journal.errors import TokenFormatError
from serve_journal.fileformat import encode_parquet
from serve_journal.privacy.forget import count_subject_entries
from serve_journal.read.query import (
    JournalQuery,
    format_table,
    read_access_log,
    to_json,
    write_parquet,
)
from serve_journal.schema import ENTRY_SCHEMA
from serve_journal.storage import LocalJournalStorage
from tests.helpers.entries import DAY, ids, make_entries, token, write_rolled


@pytest.fixture
def journal(tmp_path):
    """A day of entries in two models plus a planted subject spread over several hours."""
    storage = LocalJournalStorage(str(tmp_path / "journal"))
    background = make_entries(600, spread_s=6 * 3600)
    other_model = make_entries(200, model="churn", producer="p-2", spread_s=3 * 3600)
    planted = make_entries(
        7,
        tokens=[token("alice")],
        producer="p-3",
        start=DAY + dt.timedelta(minutes=30),
        spread_s=5 * 3600,
        decision="block",
    )
    write_rolled(storage, pa.concat_tables([background, other_model, planted]))
    return storage, planted, background, other_model


def make_query(storage, actor="investigator-1"):
    known = {"alice": token("alice"), "bob": token("bob")}
    return JournalQuery(storage, tokenizer=known.get, actor=actor)


def test_subject_lookup_returns_exactly_the_planted_rows_across_partitions(journal):
    storage, planted, *_ = journal
    hours = {DEFAULT_SPEC.key_for("fraud", ts).hour for ts in planted["ts"].to_pylist()}
    assert len(hours) > 1  # the planted entries really span several partitions
    with make_query(storage) as q:
        result = q.find(subject="alice")
        assert ids(result) == ids(planted)
        assert result.schema == ENTRY_SCHEMA
        assert result["ts"].to_pylist() == sorted(result["ts"].to_pylist())
        assert result.sort_by("seq").equals(planted.sort_by("seq"))


def test_filters_combine_and_prune_partitions(journal):
    storage, planted, background, other_model = journal
    with make_query(storage) as q:
        since = DAY + dt.timedelta(hours=2)
        until = DAY + dt.timedelta(hours=4)
        result = q.find(model="fraud", since=since, until=until, outcome="error")
        everything = pa.concat_tables([background, planted])
        expected = [
            (p, s) for p, s, ts, o in zip(
                everything["producer_id"].to_pylist(), everything["seq"].to_pylist(),
                everything["ts"].to_pylist(), everything["outcome"].to_pylist(), strict=True)
            if since <= ts < until and o == "error"
        ]
        assert ids(result) == sorted(expected) and expected
        # partition pruning: only the fraud files of hours 2 and 3 were handed to DuckDB
        scanned = q.files(model="fraud", since=since, until=until)
        assert {f.key.hour for f in scanned} == {2, 3}
        assert {f.key.model for f in scanned} == {"fraud"}
        assert q.last_stats.files_scanned == len(scanned)

        churn = q.find(model="churn", decision="block")
        expected_churn = [
            (p, s) for p, s, d in zip(other_model["producer_id"].to_pylist(),
                                      other_model["seq"].to_pylist(),
                                      other_model["decision"].to_pylist(), strict=True)
            if d == "block"
        ]
        assert ids(churn) == sorted(expected_churn)
        assert q.find(model="fraud", model_version="9").num_rows == 0
        assert q.find(subject="alice", limit=2).num_rows == 2


def test_request_id_and_token_lookups(journal):
    storage, planted, *_ = journal
    with make_query(storage) as q:
        rid = planted["request_id"][3].as_py()
        result = q.find(request_id=rid)
        assert result["request_id"].to_pylist() == [rid]
        assert ids(q.find(subject_token=token("alice"))) == ids(planted)


def test_unknown_or_shredded_subject_returns_nothing_without_a_scan(journal):
    storage, *_ = journal
    with make_query(storage) as q:
        assert q.find(subject="mallory").num_rows == 0
        assert q.last_stats.files_scanned == 0
        assert q.find(subject="bob").num_rows == 0  # known token, no entries
        assert q.last_stats.files_scanned > 0
    records = read_access_log(storage)
    assert records[0]["filters"] == {"subject_unresolved": True}
    assert records[1]["filters"] == {"subject_token": token("bob")}


def test_access_log_grows_with_each_query_and_never_holds_raw_ids(journal, tmp_path):
    storage, planted, *_ = journal
    with make_query(storage, actor="auditor-7") as q:
        q.find(subject="alice")
        q.find(subject="alice", since=DAY, until=DAY + dt.timedelta(hours=1))
        q.find(request_id=planted["request_id"][0].as_py())
    records = read_access_log(storage)
    assert len(records) == 3
    in_first_hour = sum(1 for ts in planted["ts"].to_pylist() if ts < DAY + dt.timedelta(hours=1))
    assert [r["rows"] for r in records] == [7, in_first_hour, 1]
    assert all(r["actor"] == "auditor-7" for r in records)
    assert records[0]["filters"]["subject_token"] == token("alice")
    raw = b"".join(storage.read(r["path"]) for r in records)
    assert b"alice" not in raw
    # and no journal file anywhere holds the raw id
    for path in storage.list_files():
        assert b"alice" not in storage.read(path)


def test_outputs_table_json_parquet(journal, tmp_path):
    storage, planted, *_ = journal
    with make_query(storage) as q:
        result = q.find(subject="alice")
    text = format_table(result)
    assert "(7 entries)" in text and planted["request_id"][0].as_py() in text
    rows = json.loads(to_json(result))
    assert sorted(r["seq"] for r in rows) == sorted(planted["seq"].to_pylist())
    assert rows[0]["ts"].endswith("Z")
    assert rows[0]["outputs"][0]["label"] == "fraud"
    out = tmp_path / "out.parquet"
    write_parquet(result, str(out))
    assert pq.ParquetFile(out).read().equals(result.cast(pq.ParquetFile(out).schema_arrow))


def test_generic_pyarrow_filesystem_path(journal):
    """Non-local storage goes through a pyarrow dataset registered in DuckDB."""
    import pyarrow.fs as pafs

    from serve_journal.storage import JournalStorage

    storage, planted, *_ = journal
    generic = JournalStorage(pafs.LocalFileSystem(), storage.root, "generic://journal")
    assert generic.local_path() is None
    with make_query(generic) as q:
        assert ids(q.find(subject="alice")) == ids(planted)
        assert q.find(subject="alice", since=DAY + dt.timedelta(hours=3)).num_rows < 7


def test_explain_analyze_reports_row_groups(journal):
    storage, *_ = journal
    with make_query(storage) as q:
        profile = q.explain_analyze(subject_token=token("alice"))
    assert profile["query"]["total_row_groups_scanned"] <= profile["query"]["total_row_groups_to_scan"]
    assert profile["query"]["total_row_groups_to_scan"] > 0


def test_bad_arguments_name_the_field(journal):
    storage, *_ = journal
    with make_query(storage) as q:
        with pytest.raises(ValueError, match="outcome"):
            q.find(outcome="maybe")
        with pytest.raises(ValueError, match="tier"):
            q.find(tier="warm")
        with pytest.raises(ValueError, match="since"):
            q.find(since="yesterday-ish")
    with pytest.raises(ValueError, match="tokenizer"):
        JournalQuery(storage, actor="x").find(subject="alice")


def test_xxh64_matches_the_reference_vectors():
    from serve_journal.read.pruning import xxh64

    assert xxh64(b"") == 0xEF46DB3751D8E999
    assert xxh64(b"abc") == 0x44BC2CF5AD770999


def test_pruned_point_lookups_equal_a_full_duckdb_scan(tmp_path):
    """Footer pruning (statistics + bloom filters) returns exactly what DuckDB's scan returns."""
    from serve_journal.maintain.compaction import CompactionOptions, compact

    storage = LocalJournalStorage(str(tmp_path / "journal"))
    tokens = [token(f"s-{i}") for i in range(300)]
    entries = make_entries(3000, tokens=tokens, spread_s=3 * 3600)
    write_rolled(storage, entries, files_per_partition=4)
    compact(storage, now=DAY + dt.timedelta(days=2), options=CompactionOptions(row_group_size=128))
    absent = [token(f"absent-{i}") for i in range(20)]
    rids = entries["request_id"].to_pylist()
    cases = (
        [{"subject_token": t} for t in tokens[:25] + absent]
        + [{"request_id": r} for r in rids[::150]]
        + [{"request_id": "0" * 32}]
        + [{"subject_token": tokens[3], "since": DAY + dt.timedelta(hours=1), "decision": "block"},
           {"subject_token": tokens[4], "limit": 3}, {"request_id": rids[7], "outcome": "ok"}]
    )
    with JournalQuery(storage, actor="t") as pruned, JournalQuery(storage, actor="t") as full:
        full.prune_point_lookups = False
        found = 0
        for filters in cases:
            got = pruned.find(**filters)
            assert got.equals(full.find(**filters)), filters
            found += got.num_rows
            stats = pruned.last_stats
            assert stats.row_groups_read <= stats.row_groups_probed <= stats.row_groups_total
            assert stats.row_groups_total > 20  # one day file of 128-row groups
            if got.num_rows == 0 and len(filters) == 1:  # the key is nowhere
                assert stats.row_groups_read == 0
            elif "subject_token" in filters:
                assert stats.row_groups_read <= 2  # sorted by subject: one group (or two at a border)
        assert found > 25


def test_subject_tokens_are_checked_and_never_echoed(journal):
    storage, *_ = journal
    with make_query(storage) as q:
        for bad in ("alice", token("alice").upper(), token("alice")[:-1], token("alice") + "0",
                    "ct-" + token("alice"), 42):
            with pytest.raises(TokenFormatError, match="^subject_token must be a subject token") \
                    as info:
                q.find(subject_token=bad)
            assert str(bad) not in str(info.value)
            with pytest.raises(TokenFormatError):
                q.explain_analyze(subject_token=bad)
    assert all("alice" not in json.dumps(r) for r in read_access_log(storage))


def _plant(storage, relative: str, table: pa.Table) -> None:
    storage.put_new(relative, encode_parquet(table))


@pytest.mark.parametrize("root_name", ["journal", "jour[n]al*?", "back\\slash[1]"])
def test_file_names_with_glob_characters_are_read_literally(tmp_path, root_name):
    # DuckDB expands *, ? and [..] in every path it reads: escaped, each file reads only itself.
    storage = LocalJournalStorage(str(tmp_path / root_name))
    entries = make_entries(90, tokens=[token("alice"), token("bob")], spread_s=3000)
    write_rolled(storage, entries)
    # What "jour[n]al*?/..." matches as a pattern: the same file names, other entries.
    write_rolled(LocalJournalStorage(str(tmp_path / "journalX")),
                 make_entries(90, tokens=[token("alice")], spread_s=3000, producer="decoy"))
    directory = DEFAULT_SPEC.file_path(DEFAULT_SPEC.key_for("fraud", DAY), "x").rsplit("/", 1)[0]
    planted = {}
    for i, name in enumerate(("*", "w-00-00?", "w-00-00[01]", "[[]w]", "**")):
        row = make_entries(1, tokens=[token("alice")], producer=f"planted-{i}")
        _plant(storage, f"{directory}/{name}.parquet", row)
        planted[name] = row
    expected = pa.concat_tables([entries, *planted.values()])
    with make_query(storage) as q:
        q.prune_point_lookups = False  # every lookup through DuckDB's read_parquet
        assert ids(q.find(model="fraud")) == ids(expected)
        assert ids(q.find(subject_token=token("alice"))) == ids(
            expected.filter(pc.equal(expected["subject_token"], token("alice"))))
        q.prune_point_lookups = True
        assert ids(q.find(subject_token=token("bob"))) == ids(
            entries.filter(pc.equal(entries["subject_token"], token("bob"))))
    alice = [t for t in expected["subject_token"].to_pylist() if t == token("alice")]
    assert count_subject_entries(storage, token("alice")) == (len(alice), [("fraud", "3")])


def test_cli_query_reads_subject_ids_from_stdin_and_checks_tokens(journal, monkeypatch):
    from click.testing import CliRunner

    from serve_journal import cli

    storage, planted, *_ = journal
    known = {"alice": token("alice"), "bob": token("bob")}
    monkeypatch.setattr(cli, "subject_tokenizer", lambda journal_uri: known.get)
    runner = CliRunner()
    base = ["query", "--journal", storage.uri, "--as", "tester", "--json"]
    result = runner.invoke(cli.main, [*base, "--subject", "-"], input="alice\n\nbob\nmallory\n")
    assert result.exit_code == 0, result.output
    assert ids(pa.Table.from_pylist([{"producer_id": r["producer_id"], "seq": r["seq"]}
                                     for r in json.loads(result.output)])) == ids(planted)
    records = read_access_log(storage)
    assert [r["filters"].get("subject_token") for r in records] == [token("alice"), token("bob"),
                                                                    None]
    assert "alice" not in json.dumps(records) and "mallory" not in json.dumps(records)
    empty = runner.invoke(cli.main, [*base, "--subject", "-"], input="\n")
    assert empty.exit_code == 2 and "standard input holds no subject id" in empty.output
    bad = runner.invoke(cli.main, [*base, "--subject-token", "alice"])
    assert bad.exit_code == 2 and "--subject-token" in bad.output and "alice" not in bad.output
    good = runner.invoke(cli.main, [*base, "--subject-token", token("alice")])
    assert good.exit_code == 0 and len(json.loads(good.output)) == planted.num_rows


def test_expand_subjects():
    import io

    import click

    from serve_journal.cli_input import expand_subjects

    assert expand_subjects(["a", "-", "b"], io.StringIO("x\r\n  \ny z\n")) == ["a", "x", "y z", "b"]
    assert expand_subjects(["a"], io.StringIO("ignored\n")) == ["a"]
    with pytest.raises(click.UsageError, match="once"):
        expand_subjects(["-", "-"], io.StringIO("x\n"))
    with pytest.raises(click.UsageError, match="no subject id"):
        expand_subjects(["-"], io.StringIO(""))
