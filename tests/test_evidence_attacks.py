"""Evidence bundles under attack (issue 18 review): lies a bundle holder can build from what the
journal's bucket holds, or from a second journal signed by the same key, without the key. Each
test builds one lie and asserts that ``verify-evidence`` fails and names it."""

from __future__ import annotations

import datetime as dt
import json

import pyarrow as pa
import pyarrow.parquet as pq
from click.testing import CliRunner

from serve_journal.cli import main
from serve_journal.evidence.export import export_evidence
from serve_journal.evidence.verify import verify_evidence
from serve_journal.sink.settings import SinkSettings
from tests.helpers.entries import DAY, make_entries
from tests.helpers.journal import write_signed
from tests.test_evidence import Journal, _export, _kinds, _members, _rezip, _rid
from tests.test_evidence import journal as evidence_journal

journal = evidence_journal  # the same signed journal fixture (pytest finds it by this name)

LATER = DAY + dt.timedelta(days=2)


def _twin(j: Journal) -> dict[str, bytes]:
    """A second journal signed by the same key, with the same chain id and shape, written
    later: its bundle of the same rows."""
    root = str(j.tmp / "twin")
    settings = SinkSettings(root, signing_key_file=str(j.key_file))
    storage = settings.storage()
    first = make_entries(120, spread_s=2 * 3600)
    later = make_entries(60, start=DAY + dt.timedelta(hours=5), spread_s=3600, producer="p-3")
    write_signed(settings, storage, "w00", first, files=3)
    write_signed(settings, storage, "w00", later, files=3)
    twin = Journal(root, storage, j.public, j.key_file, pa.concat_tables([first, later]),
                   j.tmp / "twin-out")
    twin.tmp.mkdir()
    return _members(_export(twin))


def test_a_chain_spliced_from_two_journals_signed_by_one_key_fails(journal, tmp_path):
    """The entries' records and covering checkpoint (4) from this journal, the records after
    them and the latest checkpoint (7) from a twin journal with the same key and chain id: each
    half hash-links to a valid signature, but the covering checkpoint does not extend to the
    latest one."""
    members = _members(_export(journal))
    twin = _twin(journal)
    for name in ("records/w00/000000000004.json", "records/w00/000000000005.json",
                 "records/w00/000000000006.json", "checkpoints/w00/000000000007.json"):
        assert members[name] != twin[name]
        members[name] = twin[name]
    report = verify_evidence(_rezip(members, tmp_path / "spliced.zip"), journal.public)
    assert not report.ok, report.describe()
    assert "manifest-chain-broken" in _kinds(report), report.describe()


def test_consistency_to_the_latest_checkpoint_does_not_rest_on_the_unsigned_claims(journal,
                                                                                   tmp_path):
    """evidence.json is the exporter's unsigned statement: with its chain claims removed, the
    records between the covering checkpoint's head and the latest one's gone (so no record is
    left that either signature fails to cover) still fails."""
    members = _members(_export(journal))
    evidence = json.loads(members["evidence.json"])
    evidence["chains"] = []
    members["evidence.json"] = json.dumps(evidence).encode()
    del members["records/w00/000000000004.json"]
    del members["records/w00/000000000005.json"]
    report = verify_evidence(_rezip(members, tmp_path / "unclaimed.zip"), journal.public)
    assert "consistency-unproven" in _kinds(report), report.describe()


def test_the_report_says_how_recent_the_signed_proof_is(journal, tmp_path):
    """A bundle cut down to an older checkpoint (the later records and checkpoint removed, the
    claims edited to match) proves less: the report shows the signed time and length of the
    newest checkpoint per chain, which the examiner compares with the journal's own."""
    members = _members(_export(journal))
    full = verify_evidence(_rezip(dict(members), tmp_path / "full.zip"), journal.public)
    assert full.ok, full.describe()
    for name in ("records/w00/000000000004.json", "records/w00/000000000005.json",
                 "records/w00/000000000006.json", "checkpoints/w00/000000000007.json"):
        del members[name]
    evidence = json.loads(members["evidence.json"])
    evidence["chains"][0]["latest_checkpoint"] = 4
    members["evidence.json"] = json.dumps(evidence).encode()
    cut = verify_evidence(_rezip(members, tmp_path / "cut.zip"), journal.public)
    assert cut.ok, cut.describe()  # a genuine, older proof: it cannot be told from the bundle
    assert [(c["chain_id"], c["length"]) for c in full.signed_heads] == [("w00", 7)]
    assert [(c["chain_id"], c["length"]) for c in cut.signed_heads] == [("w00", 4)]
    assert full.signed_heads[0]["time"] >= cut.signed_heads[0]["time"]
    assert "w00 length 4 signed " + cut.signed_heads[0]["time"] in cut.describe()


def _renumbered(proofs: list[dict], start: int) -> list[dict]:
    return [{**p, "row": start + i} for i, p in enumerate(proofs)]


def test_one_entry_twice_from_its_hot_and_its_compacted_file_fails(journal, tmp_path):
    """Before compaction the entry is proven against its hot file, after it against the
    compacted file: two valid proofs of one decision. Put both in one bundle and it would
    count as two decisions."""
    rid = _rid(journal.table, 3)
    hot = _members(_export(journal, "hot.zip", request_ids=[rid]))
    done = CliRunner().invoke(main, ["compact", "--apply", "--as-of",
                                     LATER.strftime("%Y-%m-%dT%H:%M:%S"), "--journal",
                                     journal.root, "--signing-key-file", str(journal.key_file)])
    assert done.exit_code == 0, done.output
    compacted = _members(_export(journal, "compacted.zip", request_ids=[rid]))
    members = {**hot, **compacted}
    rows = pa.concat_tables([pq.read_table(pa.BufferReader(hot["entries.parquet"])),
                             pq.read_table(pa.BufferReader(compacted["entries.parquet"]))])
    sink = pa.BufferOutputStream()
    pq.write_table(rows, sink)
    members["entries.parquet"] = sink.getvalue().to_pybytes()
    first = json.loads(hot["proofs.json"])["proofs"]
    second = json.loads(compacted["proofs.json"])["proofs"]
    members["proofs.json"] = json.dumps(
        {"proofs": _renumbered(first, 0) + _renumbered(second, len(first))}).encode()
    evidence = json.loads(hot["evidence.json"])
    later = json.loads(compacted["evidence.json"])
    evidence["entries"] = 2
    evidence["files"] += later["files"]
    evidence["chains"] += later["chains"]
    members["evidence.json"] = json.dumps(evidence).encode()
    report = verify_evidence(_rezip(members, tmp_path / "twice.zip"), journal.public)
    assert "entry-duplicated" in _kinds(report), report.describe()
    assert report.entries == 1


def test_a_planted_copy_of_an_entry_does_not_block_its_evidence(journal, tmp_path):
    """The attacker copies an entry into a new hot file (no record): the export proves the
    genuine entry from its signed file, names the unproven file it skipped, and the bundle
    verifies with exactly the genuine entry."""
    from serve_journal.catalog.layout import DEFAULT_SPEC
    from serve_journal.fileformat import encode_parquet

    rid = _rid(journal.table, 3)
    row = journal.table.slice(3, 1)
    key = DEFAULT_SPEC.key_for(row["model_name"][0].as_py(), row["ts"][0].as_py())
    planted = DEFAULT_SPEC.file_path(key, "planted")
    journal.storage.put_new(planted, encode_parquet(row))
    out = tmp_path / "planted.zip"
    result = export_evidence(journal.storage, out, public_key=str(journal.public),
                             request_ids=[rid], actor="examiner-test")
    assert result.entries == 1 and result.skipped_files == (planted,)
    assert planted not in result.files
    assert planted in result.describe()
    report = verify_evidence(out, journal.public)
    assert report.ok and report.entries == 1, report.describe()
    evidence = json.loads(_members(out)["evidence.json"])
    assert evidence["skipped_files"] == [{"path": planted, "reason": "no-signed-record"}]


def test_a_garbage_time_in_the_stated_selection_fails_by_name(journal, tmp_path):
    members = _members(_export(journal))
    evidence = json.loads(members["evidence.json"])
    evidence["selection"]["since"] = "last tuesday"
    members["evidence.json"] = json.dumps(evidence).encode()
    report = verify_evidence(_rezip(members, tmp_path / "since.zip"), journal.public)
    assert "entry-outside-selection" in _kinds(report), report.describe()
