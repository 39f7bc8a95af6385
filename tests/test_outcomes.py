"""Outcomes that arrive after the decision (issue 18 items 3-5): recorded as their own signed,
append-only partition; checked against the journal's request ids; joined to entries for
performance per model version (weighted by the sample rates, against the exact counters);
covered by verify and by forget. Real parts only: local folders, signed manifest chains, the
vault and keyring, Parquet and CSV files, the CLI through click's runner."""

from __future__ import annotations

import dataclasses
import datetime as dt
import glob
import hashlib
import json
import os
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from click.testing import CliRunner

from serve_journal.catalog.layout import OUTCOME_SPEC
from serve_journal.cli import main
from serve_journal.counters import KEPT, SAMPLED_OUT, CounterSet
from serve_journal.integrity.manifest import ManifestRecord, record_path
from serve_journal.outcomes.join import find_outcomes, latest_outcomes
from serve_journal.outcomes.performance import performance as outcome_performance
from serve_journal.outcomes.performance import weighted_quantile
from serve_journal.outcomes.record import load_outcomes, record_outcomes
from serve_journal.outcomes.schema import decode_outcomes, encode_outcomes, outcome_merkle_root
from serve_journal.privacy.forget import forget
from serve_journal.privacy.keyring import Keyring
from serve_journal.privacy.subjects import VaultPseudonymizer
from serve_journal.privacy.vault import SubjectVault
from serve_journal.read.query import JournalQuery
from serve_journal.read.verify import format_report, verify_journal
from serve_journal.sink.settings import SinkSettings
from tests.helpers.entries import DAY, make_entries
from tests.helpers.journal import counters_signer, write_signed

RECORDED = DAY + dt.timedelta(days=30)
"""The recording clock of the tests: a month after the decisions."""


def _journal(tmp_path, table: pa.Table):
    root = str(tmp_path / "journal")
    settings = SinkSettings(journal_uri=root)
    storage = settings.storage()
    write_signed(settings, storage, "w00", table, files=2)
    return root, settings, storage


def _verify(settings: SinkSettings, storage):
    return verify_journal(storage, public_key=settings.signer().export_public_key())


def _outcome_files(root: str) -> list[str]:
    return sorted(glob.glob(os.path.join(root, "outcomes", "date=*", "*.parquet")))


@pytest.fixture
def journal(tmp_path):
    entries = make_entries(40, start=DAY, spread_s=7200)
    root, settings, storage = _journal(tmp_path, entries)
    return root, settings, storage, entries


def test_record_accepts_known_ids_and_counts_every_rejection_by_kind(journal):
    root, settings, storage, entries = journal
    ids, times = entries["request_id"].to_pylist(), entries["ts"].to_pylist()
    later = times[0] + dt.timedelta(days=3)
    batch = [
        {"request_id": ids[0], "label": True, "outcome_time": later},                # ok
        {"request_id": ids[1], "label": 0, "outcome_time": later.isoformat()},       # ok
        {"request_id": ids[2], "value": 125.5, "outcome_time": later},               # ok
        {"request_id": "no-such-request", "label": True, "outcome_time": later},     # unknown
        {"request_id": ids[3], "outcome_time": later},                               # no label
        {"request_id": ids[4], "label": 1.5, "outcome_time": later},                 # bad label
        {"request_id": ids[5], "label": "x", "value": 2.0, "outcome_time": later},   # both
        {"request_id": ids[6], "value": float("inf"), "label": None, "outcome_time": later},
        {"request_id": ids[7], "label": "fraud", "outcome_time": "last tuesday"},    # bad time
        {"request_id": ids[8], "label": "fraud", "outcome_time": RECORDED + dt.timedelta(days=1)},
        {"request_id": ids[0], "label": True, "outcome_time": later},                # duplicate
        {"request_id": ids[9], "label": True, "outcome_time": times[9] - dt.timedelta(hours=1)},
        {"request_id": ids[10], "label": True, "outcome_time": later, "source": "other"},
        {"request_id": "", "label": True, "outcome_time": later},
    ]
    report = record_outcomes(root, batch, source="chargebacks", now=RECORDED)
    assert report.accepted == 3
    assert report.rejected == 11
    assert report.rejected_by_kind == {
        "missing_request_id": 1, "bad_label": 2, "bad_value": 2, "bad_time": 2,
        "source_mismatch": 1, "duplicate_in_batch": 1, "unknown_request_id": 1,
        "outcome_before_decision": 1}
    assert report.rejected_rows["unknown_request_id"] == [3]
    assert report.rejected_rows["outcome_before_decision"] == [11]
    assert report.format_text().startswith("accepted 3, rejected 11 (missing_request_id 1, ")
    files = _outcome_files(root)
    assert [os.path.relpath(f, root) for f in files] == report.files
    assert report.files[0].startswith(f"outcomes/date={RECORDED:%Y-%m-%d}/")
    stored = load_outcomes(root)
    assert sorted(zip(stored["request_id"].to_pylist(), stored["label"].to_pylist(),
                      stored["label_type"].to_pylist(), stored["value"].to_pylist(), strict=True)) \
        == sorted([(ids[0], "true", "bool", None), (ids[1], "0", "int", None),
                   (ids[2], None, None, 125.5)])
    assert set(stored["source"].to_pylist()) == {"chargebacks"}
    verified = _verify(settings, storage)
    assert verified.ok, format_report(verified)
    assert (verified.outcome_files, verified.outcomes, verified.entries) == (1, 3, 40)
    assert "outcomes.chargebacks" in verified.heads


def test_nothing_accepted_writes_nothing_and_a_bad_source_is_refused(journal):
    root, _, _, _ = journal
    report = record_outcomes(root, [{"request_id": "nope", "label": 1,
                                     "outcome_time": RECORDED}], source="s", now=RECORDED)
    assert (report.accepted, report.rejected_by_kind, report.files) == (
        0, {"unknown_request_id": 1}, [])
    assert not os.path.exists(os.path.join(root, "outcomes"))
    with pytest.raises(ValueError, match="source must match"):
        record_outcomes(root, [], source="../x")


def test_ingest_parquet_and_csv_from_the_cli(journal, tmp_path):
    root, settings, storage, entries = journal
    ids = entries["request_id"].to_pylist()
    when = (DAY + dt.timedelta(days=5)).isoformat()
    parquet_file = tmp_path / "labels.parquet"
    pq.write_table(pa.table({"request_id": [ids[0], ids[1], "unknown-1"],
                             "label": [True, False, True],
                             "outcome_time": pa.array([DAY + dt.timedelta(days=5)] * 3,
                                                      pa.timestamp("us", tz="UTC"))}),
                   parquet_file)
    csv_file = tmp_path / "labels.csv"
    csv_file.write_text("request_id,label,outcome_time,source\n"
                        f"{ids[2]},fraud,{when},cb\n{ids[3]},legit,{when},cb\n"
                        f"{ids[3]},legit,{when},cb\nunknown-2,fraud,{when},cb\n")
    runner = CliRunner()
    first = runner.invoke(main, ["outcomes", "ingest", str(parquet_file), "--journal", root,
                                 "--source", "cb"])
    assert first.exit_code == 0, first.output
    assert first.output.startswith("accepted 2, rejected 1 (unknown_request_id 1)")
    second = runner.invoke(main, ["outcomes", "ingest", str(csv_file), "--journal", root,
                                  "--source", "cb", "--json"])
    assert second.exit_code == 0, second.output
    doc = json.loads(second.output)
    assert (doc["accepted"], doc["rejected_by_kind"]) == (
        2, {"duplicate_in_batch": 1, "unknown_request_id": 1})
    assert doc["chain_id"] == "outcomes.cb"
    assert len(_outcome_files(root)) == 2
    shown = runner.invoke(main, ["outcomes", "show", "--journal", root, "--request-id", ids[2],
                                 "--json", "--as", "tester"])
    assert shown.exit_code == 0, shown.output
    rows = json.loads(shown.output)
    assert [(r["request_id"], r["label"], r["label_type"], r["entry_decision"]) for r in rows] \
        == [(ids[2], "fraud", "str", entries["decision"][2].as_py())]
    bad = runner.invoke(main, ["outcomes", "ingest", str(csv_file), "--journal", root,
                               "--source", "no/slash"])
    assert bad.exit_code != 0 and "source must match" in bad.output
    verified = _verify(settings, storage)
    assert verified.ok, format_report(verified)
    assert verified.outcome_files == 2


def test_a_repeated_label_is_a_new_record_and_the_latest_recorded_wins(journal):
    root, settings, storage, entries = journal
    request = entries["request_id"][0].as_py()
    first = record_outcomes(root, [{"request_id": request, "label": "legit",
                                    "outcome_time": DAY + dt.timedelta(days=2)}],
                            source="cb", now=RECORDED)
    first_bytes = Path(root, first.files[0]).read_bytes()
    # A chargeback weeks later, then a correction recorded later still whose outcome time is
    # earlier: the latest recorded record wins, whatever its outcome time.
    record_outcomes(root, [{"request_id": request, "label": "fraud",
                            "outcome_time": DAY + dt.timedelta(days=20)}],
                    source="cb", now=RECORDED + dt.timedelta(days=1))
    record_outcomes(root, [{"request_id": request, "label": "legit",
                            "outcome_time": DAY + dt.timedelta(days=10)}],
                    source="review", now=RECORDED + dt.timedelta(days=2))
    history = load_outcomes(root, [request])
    assert history["label"].to_pylist() == ["legit", "fraud", "legit"]
    assert len(set(history["outcome_id"].to_pylist())) == 3
    latest = latest_outcomes(history)
    assert (latest.num_rows, latest["source"][0].as_py(), latest["label"][0].as_py()) == (
        1, "review", "legit")
    assert Path(root, first.files[0]).read_bytes() == first_bytes  # never edited
    with JournalQuery(root, actor="tester") as q:
        shown = find_outcomes(q, request_id=request, history=True)
        assert shown["latest"].to_pylist() == [False, False, True]
        assert find_outcomes(q, request_id=request)["source"].to_pylist() == ["review"]
    verified = _verify(settings, storage)
    assert verified.ok, format_report(verified)
    assert verified.outcome_files == 3 and {"outcomes.cb", "outcomes.review"} <= set(verified.heads)


# -- performance on a sampled journal --------------------------------------------------------

# (decision, sample_rate, label or None, delay in days); version "3" of model "fraud".
PLAN = [
    ("block", 0.5, True, 1),      # TP, weight 2
    ("block", 1.0, False, 2),     # FP, weight 1
    ("allow", 0.25, False, 3),    # TN, weight 4
    ("allow", 1.0, True, 4),      # FN, weight 1
    ("allow", 0.5, 0, 5),         # TN, weight 2 (an int label)
    ("block", 1.0, None, None),   # unlabelled, weight 1
    ("allow", 0.5, None, None),   # unlabelled, weight 2
    ("allow", 1.0, "maybe", 10),  # unmapped label, weight 1
]
SAMPLED_OUT_V3 = 12
"""Decisions of version 3 the replica sampled out (counted exactly, not in the journal)."""


def _sampled_journal(tmp_path):
    v3 = make_entries(len(PLAN), start=DAY, spread_s=3000, seq_start=1)
    for column, values in (("decision", [p[0] for p in PLAN]), ("sample_rate", [p[1] for p in PLAN])):
        field = v3.schema.field(column)
        v3 = v3.set_column(v3.schema.get_field_index(column), field, pa.array(values, field.type))
    v4 = make_entries(1, start=DAY + dt.timedelta(minutes=55), version="4", producer="p-2",
                      seq_start=1)
    root, settings, storage = _journal(tmp_path, pa.concat_tables([v3, v4]))
    counters = CounterSet("p-1", counters_signer(root))
    for i, (decision, rate, _, _) in enumerate(PLAN):
        ts_us = int(v3["ts"][i].as_py().timestamp() * 1e6)
        counters.record("fraud", "3", ts_us, decision, "high", rate, "ok", i + 1, KEPT)
    for seq in range(len(PLAN) + 1, len(PLAN) + 1 + SAMPLED_OUT_V3):
        counters.record("fraud", "3", int(DAY.timestamp() * 1e6), "allow", "high", 0.5, "ok",
                        seq, SAMPLED_OUT)
    counters.flush_to(storage)
    outcomes = [{"request_id": v3["request_id"][i].as_py(), "label": label,
                 "outcome_time": v3["ts"][i].as_py() + dt.timedelta(days=delay)}
                for i, (_, _, label, delay) in enumerate(PLAN) if label is not None]
    report = record_outcomes(root, outcomes, source="cb", now=RECORDED)
    assert report.accepted == 6, report
    return root, settings, storage


def test_confusion_counts_rates_delay_and_unlabelled_share_against_hand_computed(tmp_path):
    root, settings, storage = _sampled_journal(tmp_path)
    report = outcome_performance(storage, DAY, DAY + dt.timedelta(days=1))
    by_version = {m.model_version: m for m in report.models}
    v3 = by_version["3"]
    assert {c: v3.cells[c].estimate for c in ("tp", "fp", "tn", "fn", "unmapped", "unlabelled")} \
        == {"tp": 2.0, "fp": 1.0, "tn": 6.0, "fn": 1.0, "unmapped": 1.0, "unlabelled": 3.0}
    assert {c: v3.cells[c].kept for c in ("tp", "fp", "tn", "fn")} == {
        "tp": 1, "fp": 1, "tn": 2, "fn": 1}
    assert (v3.decisions.kept, v3.decisions.estimate) == (8, 14.0)
    assert (v3.labelled.kept, v3.labelled.estimate) == (6, 11.0)
    assert v3.decisions_exact == len(PLAN) + SAMPLED_OUT_V3  # 20, from the counters
    assert v3.unlabelled_share == pytest.approx(1 - 11 / 20)
    assert v3.rates == pytest.approx({"tpr": 2 / 3, "fpr": 1 / 7, "precision": 2 / 3,
                                      "accuracy": 8 / 10})
    # Delays 1,2,3,4,5,10 days weighing 2,1,4,1,2,1: cumulative 2,3,7,8,10,11 of 11.
    assert v3.delay_s == {"p50": 3 * 86400.0, "p90": 5 * 86400.0, "max": 10 * 86400.0}
    # The TP cell's standard error: one entry kept at rate 0.5, variance w (w - 1) = 2.
    assert v3.cells["tp"].se == pytest.approx(2 ** 0.5)
    v4 = by_version["4"]
    assert (v4.decisions_exact, v4.unlabelled_share, v4.rates["tpr"], v4.delay_s["p50"]) == (
        None, 1.0, None, None)
    assert report.outcome_records == 6

    runner = CliRunner()
    out = runner.invoke(main, ["stats", "--journal", root, "--since", DAY.isoformat(),
                               "--until", (DAY + dt.timedelta(days=1)).isoformat(), "--json"])
    assert out.exit_code == 0, out.output
    doc = json.loads(out.output)
    perf = {m["model_version"]: m for m in doc["performance"]["models"]}
    assert perf["3"]["cells"]["tn"]["estimate"] == 6.0
    assert perf["3"]["unlabelled_share"] == pytest.approx(0.45)
    assert doc["stats"]["journal_rows"] == 9
    text = runner.invoke(main, ["stats", "--journal", root])
    assert text.exit_code == 0, text.output
    assert "performance on labelled decisions" in text.output
    line = next(x for x in text.output.splitlines() if x.strip().startswith("fraud  3 "))
    assert line.split()[2:5] == ["20", "11.0", "0.450"]
    only = runner.invoke(main, ["outcomes", "performance", "--journal", root,
                                "--positive-label", "maybe", "--negative-label", "false",
                                "--negative-label", "0", "--json"])
    assert only.exit_code == 0, only.output
    cells = {m["model_version"]: m["cells"] for m in json.loads(only.output)["models"]}["3"]
    # 'maybe' is now the positive class and 'true' maps to nothing.
    assert (cells["fn"]["estimate"], cells["unmapped"]["estimate"]) == (1.0, 3.0)


def test_weighted_quantile_edges():
    assert weighted_quantile([], [], 0.5) is None
    assert weighted_quantile([5.0], [3.0], 0.9) == 5.0
    assert weighted_quantile([1.0, 2.0], [1.0, 1.0], 0.5) == 1.0
    assert weighted_quantile([2.0, 1.0], [1.0, 3.0], 0.5) == 1.0


# -- verify: the attacker ----------------------------------------------------------------------


def _recorded(journal) -> tuple[str, SinkSettings, object, str]:
    root, settings, storage, entries = journal
    rows = [{"request_id": r, "label": i % 2 == 0, "outcome_time": DAY + dt.timedelta(days=4)}
            for i, r in enumerate(entries["request_id"].to_pylist()[:6])]
    report = record_outcomes(root, rows, source="cb", now=RECORDED)
    assert _verify(settings, storage).ok
    return root, settings, storage, report.files[0]


def _named(report, kind: str, path: str) -> bool:
    return any(p.kind == kind and p.path == path for p in report.errors)


def test_verify_names_a_planted_outcome_file(journal):
    root, settings, storage, path = _recorded(journal)
    planted = path.replace(".parquet", "-x.parquet")
    table = decode_outcomes(Path(root, path).read_bytes())
    with open(os.path.join(root, planted), "wb") as handle:
        handle.write(encode_outcomes(table.slice(0, 2)))
    report = _verify(settings, storage)
    assert not report.ok and _named(report, "file-without-record", planted), format_report(report)
    assert load_outcomes(root).num_rows == 6  # readers do not take the planted file


def test_verify_names_an_edited_outcome_file(journal):
    root, settings, storage, path = _recorded(journal)
    table = decode_outcomes(Path(root, path).read_bytes())
    flipped = table.set_column(table.schema.get_field_index("label"), "label",
                               pa.array(["true"] * table.num_rows, pa.string()))
    full = os.path.join(root, path)
    os.chmod(full, 0o644)
    with open(full, "wb") as handle:
        handle.write(encode_outcomes(flipped))
    report = _verify(settings, storage)
    assert _named(report, "file-altered", path), format_report(report)
    assert _named(report, "file-entries-altered", path), format_report(report)
    assert load_outcomes(root).num_rows == 0  # readers do not take the altered file


def test_verify_names_a_deleted_outcome_file(journal):
    root, settings, storage, path = _recorded(journal)
    os.remove(os.path.join(root, path))
    report = _verify(settings, storage)
    assert _named(report, "file-missing", path), format_report(report)


def test_verify_names_an_outcome_file_whose_manifest_record_was_edited(journal):
    root, settings, storage, path = _recorded(journal)
    record_file = os.path.join(root, record_path("outcomes.cb", 0))
    record = ManifestRecord.from_json(Path(record_file).read_bytes())
    assert record.path == path
    # Edit the file and its record to match (new hash, root and record hash): the signed
    # checkpoint still holds the old head.
    table = decode_outcomes(Path(root, path).read_bytes())
    edited = encode_outcomes(table.slice(1))
    full = os.path.join(root, path)
    os.chmod(full, 0o644)
    with open(full, "wb") as handle:
        handle.write(edited)
    forged = dataclasses.replace(record, sha256=hashlib.sha256(edited).hexdigest(),
                                 size=len(edited), row_count=table.num_rows - 1,
                                 merkle_root=outcome_merkle_root(decode_outcomes(edited)))
    forged = dataclasses.replace(forged, record_hash=forged.compute_hash())
    os.chmod(record_file, 0o644)
    with open(record_file, "wb") as handle:
        handle.write(forged.to_json())
    report = _verify(settings, storage)
    assert not report.ok
    assert _named(report, "manifest-rewritten", record_path("outcomes.cb", 0)), format_report(report)
    # Only the record's bytes edited (its hash left alone): named as altered.
    with open(record_file, "wb") as handle:
        handle.write(forged.to_json().replace(b'"row_count":5', b'"row_count":6'))
    report = _verify(settings, storage)
    assert _named(report, "manifest-record-altered", record_path("outcomes.cb", 0)), \
        format_report(report)


# -- forget and privacy --------------------------------------------------------------------------


def test_forget_makes_outcomes_unlinkable_and_raw_ids_are_never_written(tmp_path, monkeypatch):
    monkeypatch.delenv("SERVE_JOURNAL_KEK", raising=False)
    privacy = tmp_path / "privacy"
    ring = Keyring.local_default(privacy)
    vault = SubjectVault.local_default(privacy, ring)
    try:
        pseudonymizer = VaultPseudonymizer(ring, vault)
        subjects = ["alice-4711", "bob-0815"]
        tokens = [p.subject_token for p in pseudonymizer.protect(subjects, [None, None])]
        entries = make_entries(12, start=DAY, spread_s=3000, tokens=tokens)
        root, settings, storage = _journal(tmp_path, entries)
        rows = [{"request_id": r, "label": True, "outcome_time": DAY + dt.timedelta(days=9),
                 "customer_id": subjects[i % 2]}  # an extra column the batch happens to carry
                for i, r in enumerate(entries["request_id"].to_pylist())]
        rows.append({**rows[0], "label": False, "outcome_time": DAY + dt.timedelta(days=11)})
        assert record_outcomes(root, rows, source="cb", now=RECORDED).accepted == 13
        query = JournalQuery(storage, tokenizer=pseudonymizer.token_for, actor="tester")
        assert find_outcomes(query, subject="alice-4711", history=True).num_rows == 7
        assert find_outcomes(query, subject="alice-4711").num_rows == 6

        receipt = forget("alice-4711", vault=vault, journal_storage=storage)
        assert (receipt.entries_unlinkable, receipt.outcomes_unlinkable) == (6, 7)
        assert find_outcomes(query, subject="alice-4711", history=True).num_rows == 0
        assert find_outcomes(query, subject="bob-0815").num_rows == 6
        query.close()
        assert _verify(settings, storage).ok

        for folder in ("outcomes", "_manifest", "_checkpoints", "_receipts", "_access"):
            for path in glob.glob(os.path.join(root, folder, "**", "*"), recursive=True):
                if os.path.isfile(path):
                    data = Path(path).read_bytes()
                    for raw in subjects:
                        assert raw.encode() not in data, path
        files = _outcome_files(root)
        assert files and "customer_id" not in pq.ParquetFile(files[0]).schema_arrow.names
        assert OUTCOME_SPEC.contains(os.path.relpath(files[0], root))
    finally:
        vault.close()


def test_query_with_outcomes_shows_each_entry_beside_its_latest_outcome(journal):
    """Item 4 for query: `serve-journal query --with-outcomes` (and join_outcomes over a
    JournalQuery result) adds the latest recorded outcome to each entry; entries without one
    have empty outcome columns; the rows are the query's, in its order."""
    from serve_journal.outcomes.join import join_outcomes

    root, _, _, entries = journal
    ids = entries["request_id"].to_pylist()
    record_outcomes(root, [{"request_id": ids[0], "label": "legit",
                            "outcome_time": DAY + dt.timedelta(days=2)},
                           {"request_id": ids[1], "value": 80.0,
                            "outcome_time": DAY + dt.timedelta(days=3)}],
                    source="cb", now=RECORDED)
    record_outcomes(root, [{"request_id": ids[0], "label": "fraud",
                            "outcome_time": DAY + dt.timedelta(days=9)}],
                    source="cb", now=RECORDED + dt.timedelta(days=1))
    with JournalQuery(root, actor="tester") as q:
        found = q.find(model="fraud")
    joined = join_outcomes(found, root)
    assert joined["request_id"].to_pylist() == found["request_id"].to_pylist()
    by_id = {r["request_id"]: r for r in joined.to_pylist()}
    assert (by_id[ids[0]]["outcome_label"], by_id[ids[0]]["outcome_time"]) == (
        "fraud", DAY + dt.timedelta(days=9))
    assert (by_id[ids[1]]["outcome_label"], by_id[ids[1]]["outcome_value"]) == (None, 80.0)
    assert by_id[ids[2]]["outcome_time"] is None and by_id[ids[2]]["outcome_source"] is None
    runner = CliRunner()
    text = runner.invoke(main, ["query", "--journal", root, "--request-id", ids[0],
                                "--with-outcomes", "--as", "tester"])
    assert text.exit_code == 0, text.output
    header = text.output.splitlines()[0].split()
    assert header[-4:] == ["outcome_label", "outcome_value", "outcome_time", "outcome_source"]
    assert "fraud" in text.output.splitlines()[2]
    as_json = runner.invoke(main, ["query", "--journal", root, "--request-id", ids[1],
                                   "--with-outcomes", "--json", "--as", "tester"])
    assert as_json.exit_code == 0, as_json.output
    row = json.loads(as_json.output)[0]
    assert (row["outcome_value"], row["outcome_source"]) == (80.0, "cb")
    plain = runner.invoke(main, ["query", "--journal", root, "--request-id", ids[0], "--json",
                                 "--as", "tester"])
    assert "outcome_label" not in plain.output
