"""verify across compaction and lifecycle: a journal written by the real writer code (partition
file writer, manifest chain, manifest hook), compacted into a day file, moved to the cold tier;
verify passes after each step, and fails naming the compacted or cold file once it is altered."""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import os

import pyarrow as pa
import pytest

from serve_journal.catalog import COMMITS_PREFIX, commit, live_files, marker_path
from serve_journal.catalog.layout import COLD, DEFAULT_SPEC, HOT, split_by_partition
from serve_journal.fileformat import decode_parquet, encode_parquet
from serve_journal.integrity.fingerprint import fingerprint
from serve_journal.integrity.manifest import ManifestLog, build_file_record
from serve_journal.maintain import lifecycle
from serve_journal.maintain.compaction import (
    CompactionOptions,
    compact,
    manifest_recorder,
    run_compaction,
)
from serve_journal.read.query import JournalQuery
from serve_journal.read.verify import format_report, verify_journal
from serve_journal.sink.settings import SinkSettings, manifest_hook
from serve_journal.sink.writer import PartitionFileWriter
from serve_journal.storage import StoredObject
from tests.helpers.entries import DAY, ids, make_entries, token

COMPACT_AT = DAY + dt.timedelta(days=2)
LIFECYCLE_AT = DAY + dt.timedelta(days=40)


class Journal:
    """A journal written through the writer path, and the means to check it."""

    def __init__(self, root: str) -> None:
        self.uri = root
        self.settings = SinkSettings(journal_uri=root)
        self.storage = self.settings.storage()

    def write(self, chain: str, tables: list[pa.Table]) -> None:
        log = self.settings.manifest(self.storage, chain)
        writer = PartitionFileWriter(self.storage, chain, roll_seconds=3600.0,
                                     roll_bytes=1 << 40, on_file_written=[manifest_hook(log)])
        for table in tables:  # one roll per table: several small files per hour partition
            for batch in table.to_batches():
                for key, part in split_by_partition(batch):
                    writer.add(key, part)
            writer.roll_all()
        log.checkpoint()

    def verify(self):
        return verify_journal(self.storage, public_key=self.settings.public_key_path())

    def assert_verifies(self) -> None:
        report = self.verify()
        assert report.ok, format_report(report)

    def ids(self, tier: str = "all", **filters) -> list[tuple[str, int]]:
        with JournalQuery(self.storage, actor="test") as q:
            return ids(q.find(tier=tier, **filters))


@pytest.fixture
def journal(tmp_path) -> tuple[Journal, pa.Table]:
    j = Journal(str(tmp_path / "journal"))
    chunks = []
    for producer in ("p-1", "p-2"):
        for k in range(4):  # 4 x 150 entries per producer over four hours
            chunks.append(make_entries(150, producer=producer, seq_start=150 * k,
                                       start=DAY + dt.timedelta(minutes=55 * k), spread_s=3000))
    planted = make_entries(6, tokens=[token("alice")], producer="p-3", spread_s=4 * 3600)
    j.write("w00-test", chunks[:4] + [planted])
    j.write("w01-test", chunks[4:])
    return j, pa.concat_tables([*chunks, planted])


def _alter(storage, path: str) -> None:
    """An attacker with write access flips one decision and re-encodes the file."""
    full = storage.full_path(path)
    table = decode_parquet(storage.read(path))
    decisions = table["decision"].to_pylist()
    decisions[0] = "allow" if decisions[0] == "block" else "block"
    table = table.set_column(table.schema.get_field_index("decision"), "decision",
                             pa.array(decisions, pa.string()))
    os.chmod(full, 0o644)
    with open(full, "wb") as handle:
        handle.write(encode_parquet(table))


def test_verify_passes_after_compaction_and_lifecycle_and_names_altered_files(journal):
    j, written = journal
    expected = ids(written)
    hot_files = [f.path for f in live_files(j.storage)]
    assert len(hot_files) > 8 and j.ids() == expected
    j.assert_verifies()

    dry = run_compaction(j.uri, apply=False, now=COMPACT_AT)
    assert dry.dry_run and "would compact 1 partition" in dry.describe()
    assert [f.path for f in live_files(j.storage)] == hot_files  # a dry run writes nothing

    report = run_compaction(j.uri, apply=True, now=COMPACT_AT)
    assert report.manifest_chain and report.manifest_chain.startswith("compactor-")
    assert sorted(report.deleted) == sorted(hot_files)
    day_files = [f.path for f in live_files(j.storage)]
    assert len(day_files) == 1 and "/hour=all/c-" in day_files[0]
    assert j.ids() == expected and j.ids(subject_token=token("alice")) == ids(written.filter(
        pa.compute.equal(written["subject_token"], token("alice"))))
    after_compaction = j.verify()
    assert after_compaction.ok, format_report(after_compaction)
    assert after_compaction.chains == 3 and after_compaction.files == 1
    assert not after_compaction.warnings, format_report(after_compaction)  # checkpointed

    report = lifecycle.run_lifecycle(j.uri, apply=True, hot_days=30, now=LIFECYCLE_AT)
    assert report.refused == [] and report.expired == day_files
    assert report.manifest_chain and report.manifest_chain.startswith("lifecycle-")
    assert "moved to cold: 1 partition" in report.describe()
    cold_files = [f.path for f in live_files(j.storage, tier=COLD)]
    assert live_files(j.storage, tier=HOT) == [] and len(cold_files) == 1
    assert "/hour=all/l-" in cold_files[0]
    assert j.ids() == expected and j.ids(tier="cold") == expected
    j.assert_verifies()  # writer files -> day file (gone) -> cold file (verifies)

    _alter(j.storage, cold_files[0])
    report = j.verify()
    assert not report.ok
    named = {(p.kind, p.path) for p in report.errors}
    assert ("file-altered", cold_files[0]) in named
    # the writers' and the compactor's records are no longer covered either: their chain of
    # replacements ends in the altered cold file
    missing = {p.path for p in report.errors if p.kind == "file-missing"}
    assert missing == set(hot_files) | set(day_files)
    assert all(cold_files[0] in p.detail or day_files[0] in p.detail
               for p in report.errors if p.kind == "file-missing")


def test_altered_compacted_file_fails_verify_and_is_not_moved_to_cold(journal):
    j, _ = journal
    run_compaction(j.uri, apply=True, now=COMPACT_AT)
    day_file = live_files(j.storage)[0].path
    _alter(j.storage, day_file)
    report = j.verify()
    assert ("file-altered", day_file) in {(p.kind, p.path) for p in report.errors}
    assert ("file-entries-altered", day_file) in {(p.kind, p.path) for p in report.errors}
    # lifecycle does not launder the change into a cold copy that would verify
    moved = lifecycle.run_lifecycle(j.uri, apply=True, hot_days=30, now=LIFECYCLE_AT)
    assert [p for p, _ in moved.refused] == ["hot/model=fraud/date=2025-03-04/hour=all"]
    assert "does not match its manifest record" in moved.refused[0][1]
    assert live_files(j.storage, tier=COLD) == [] and j.storage.exists(day_file)
    assert ("file-altered", day_file) in {(p.kind, p.path) for p in j.verify().errors}


def test_compaction_refuses_an_altered_writer_file(journal):
    j, written = journal
    victim = live_files(j.storage)[2].path
    _alter(j.storage, victim)
    report = run_compaction(j.uri, apply=True, now=COMPACT_AT)
    assert [p for p, _ in report.refused] == ["hot/model=fraud/date=2025-03-04/hour=all"]
    assert report.compacted == {} and j.storage.exists(victim)
    assert ("file-altered", victim) in {(p.kind, p.path) for p in j.verify().errors}


def test_rerun_after_crash_between_record_and_commit_verifies(journal):
    """The manifest record is appended, the process dies before the commit marker; the re-run
    (another compactor chain) records the same file again: verify counts it once."""
    j, written = journal
    storage = j.storage
    log = j.settings.manifest(storage, "compactor-crashed")
    record = manifest_recorder(log)

    class Died(Exception):
        pass

    def record_then_die(stored, table, replaces):
        record(stored, table, replaces)
        raise Died

    with pytest.raises(Died):
        compact(storage, now=COMPACT_AT, on_file_written=record_then_die)
    log.checkpoint()
    assert storage.list_files(COMMITS_PREFIX) == []
    j.assert_verifies()  # the recorded but uncommitted day file verifies; inputs still there
    assert j.ids() == ids(written)

    report = run_compaction(j.uri, apply=True, now=COMPACT_AT)
    assert len(report.compacted) == 1
    final = j.verify()
    assert final.ok, format_report(final)
    assert final.files == 1 and j.ids() == ids(written)


def test_uncommitted_unrecorded_rewrite_is_a_warning_not_a_forgery(journal):
    """A rewrite that died after writing its file but before recording it: readers ignore the
    file (no commit marker), and verify warns instead of calling it forged."""
    j, written = journal

    class Died(Exception):
        pass

    def die(point):
        if point == "hot-file-written":
            raise Died

    with pytest.raises(Died):
        compact(j.storage, now=COMPACT_AT, options=CompactionOptions(), _crash=die)
    report = j.verify()
    assert report.ok, format_report(report)
    assert [p.kind for p in report.warnings] == ["uncommitted-derived-file"]
    assert j.ids() == ids(written)
    # a forged file with a writer's name is still an error
    forged = written.slice(0, 3)
    path = live_files(j.storage)[0].path.rsplit("/", 1)[0] + "/w99-forged-000000.parquet"
    j.storage.put_new(path, encode_parquet(forged))
    assert ("file-without-record", path) in {(p.kind, p.path) for p in j.verify().errors}


# -- replaces count only from signed records; forged commit markers --------------------------------


def test_forged_commit_marker_hiding_a_genuine_file_fails_verify(journal):
    """The attacker writes a cold "copy" holding fewer entries and a commit marker (unsigned: no
    key) saying it replaces a genuine hot file. Verify names the marker; readers holding the
    journal's key ignore it and still see every entry once."""
    j, written = journal
    victim = live_files(j.storage)[0]
    table = decode_parquet(j.storage.read(victim.path)).slice(1)  # one entry fewer
    key = victim.key
    forged = DEFAULT_SPEC.file_path(key, "forged-copy", COLD)
    j.storage.put_new(forged, encode_parquet(table))
    marker = marker_path(key, COLD, "forged-copy")
    commit(j.storage, kind="lifecycle", path=marker, new_files=[forged], replaces=[victim.path],
           expected=fingerprint(table), signer=None)
    report = j.verify()
    found = {(p.kind, p.path) for p in report.errors}
    assert ("commit-marker-unsigned", marker) in found, format_report(report)
    assert not {k for k, _ in found} & {"reader-misses-verified", "reader-sees-unverified"}
    assert victim.path in {f.path for f in live_files(j.storage)}
    assert j.ids() == ids(written)


def test_signed_commit_marker_copied_or_edited_does_not_count(journal):
    """A genuine signed marker copied to another name, or with one field changed (its time),
    no longer verifies: verify names it and readers ignore it."""
    j, written = journal
    run_compaction(j.uri, apply=True, now=COMPACT_AT)
    (genuine,) = j.storage.list_files("_commits/", ".json")
    doc = json.loads(j.storage.read(genuine))
    doc["created_at"] = "2020-01-01T00:00:00+00:00"
    edited = genuine.replace("/c-", "/c-0")
    j.storage.put_new(edited, json.dumps(doc, sort_keys=True, indent=1).encode())
    copied = genuine.replace("/c-", "/c-1")
    j.storage.put_new(copied, j.storage.read(genuine))
    report = j.verify()
    found = {(p.kind, p.path) for p in report.errors}
    assert {("commit-marker-unsigned", edited), ("commit-marker-unsigned", copied)} <= found, \
        format_report(report)
    assert j.ids() == ids(written)


def test_a_marker_whose_signature_is_spelled_differently_is_altered(journal):
    """The same signature bytes in another base64 spelling (unused low bits of the last digit),
    written over the genuine marker: it means the same, but its bytes are not what the writer
    stored, and only the canonical spelling verifies."""
    j, written = journal
    run_compaction(j.uri, apply=True, now=COMPACT_AT)
    (genuine,) = j.storage.list_files("_commits/", ".json")
    alphabet = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/"
    doc = json.loads(j.storage.read(genuine))
    sig = doc["signature"]
    doc["signature"] = sig[:-3] + alphabet[alphabet.index(sig[-3]) ^ 1] + sig[-2:]
    full = j.storage.full_path(genuine)
    os.chmod(full, 0o644)
    with open(full, "wb") as handle:
        handle.write(json.dumps(doc, sort_keys=True, indent=1).encode())
    report = j.verify()
    assert ("commit-marker-unsigned", genuine) in {(p.kind, p.path) for p in report.errors}, \
        format_report(report)


def test_unsigned_record_whose_replaces_names_a_deleted_genuine_file_fails_verify(journal):
    """A record in a chain of the attacker's own (no key: never signed) says it replaces a
    genuine file, which the attacker then deletes."""
    j, written = journal
    victim = live_files(j.storage)[0].path
    table = decode_parquet(j.storage.read(victim))
    decoy = victim.rsplit("/", 1)[0] + "/w77-decoy-000000.parquet"
    stored = j.storage.put_new(decoy, encode_parquet(table))
    forged = ManifestLog(j.storage, "attacker-2")  # no signer
    forged.append(build_file_record(stored, table, "hot", "attacker-2", replaces=[victim]))
    os.chmod(j.storage.full_path(victim), 0o644)
    os.unlink(j.storage.full_path(victim))
    report = j.verify()
    assert ("file-missing", victim) in {(p.kind, p.path) for p in report.errors}, format_report(report)


class Died(Exception):
    """The rewrite's process died (a crash hook raised it)."""


def die_when_committed(point: str) -> None:
    """Crash hook: die right after the commit marker is written, before the signature."""
    if point == "committed":
        raise Died


def test_rerun_after_crash_between_commit_and_signature_keeps_verify_green(journal):
    """The compactor commits its marker and dies before signing its records: nothing was
    deleted (deletes wait for the signature), so verify passes with a warning, and readers see
    each entry once."""
    j, written = journal
    log = j.settings.manifest(j.storage, "compactor-died")

    with pytest.raises(Died):
        compact(j.storage, now=COMPACT_AT, on_file_written=manifest_recorder(log),
                _crash=die_when_committed,
                before_delete=log.checkpoint, signer=log.signer)
    report = j.verify()
    assert report.ok, format_report(report)
    assert "commit-marker-unbacked" in {p.kind for p in report.warnings}
    assert j.ids() == ids(written)
    run_compaction(j.uri, apply=True, now=COMPACT_AT)
    final = j.verify()
    assert final.ok, format_report(final)
    assert j.ids() == ids(written)


@pytest.mark.slow  # over 1.5 s: kept out of the fast tier, runs in the full suite
def test_lifecycle_rerun_after_crash_between_commit_and_signature_keeps_verify_green(journal):
    """A lifecycle run commits its cold copy and dies before signing: the hot copies stay, verify
    passes with a warning; the next run adopts the move, signs it, then expires the hot copies."""
    j, written = journal
    log = j.settings.manifest(j.storage, "lifecycle-died")

    the_plan = lifecycle.plan(j.storage, LIFECYCLE_AT, 30)
    with pytest.raises(Died):
        lifecycle.apply(j.storage, the_plan, dry_run=False, on_file_written=manifest_recorder(log),
                        before_delete=log.checkpoint, signer=log.signer, _crash=die_when_committed)
    report = j.verify()
    assert report.ok, format_report(report)
    assert "commit-marker-unbacked" in {p.kind for p in report.warnings}
    assert j.ids() == ids(written)
    lifecycle.run_lifecycle(j.uri, apply=True, hot_days=30, now=LIFECYCLE_AT)
    final = j.verify()
    assert final.ok, format_report(final)
    assert not [p for p in final.warnings if p.kind == "commit-marker-unbacked"]
    assert not j.storage.list_files("hot/", ".parquet")  # the hot copies expired
    assert j.ids() == ids(written)


def test_compaction_never_signs_what_only_an_unsigned_record_vouches_for(journal):
    """The attacker alters a genuine hot file and records the new bytes in a chain of their own
    (no key). Compaction used to accept any record and re-sign the altered entries into its
    compactor chain; it now trusts only signed records and refuses the partition."""
    j, written = journal
    victim = live_files(j.storage)[0].path
    _alter(j.storage, victim)
    data = j.storage.read(victim)
    stored = StoredObject(victim, len(data), hashlib.sha256(data).hexdigest())
    forged = ManifestLog(j.storage, "attacker-3")  # no signer
    forged.append(build_file_record(stored, decode_parquet(data), "hot", "attacker-3"))
    report = run_compaction(j.uri, apply=True, now=COMPACT_AT)
    assert report.refused and not report.compacted, report.describe()
    assert j.storage.exists(victim)  # nothing deleted, nothing laundered
    found = {(p.kind, p.path) for p in j.verify().errors}
    assert ("chain-unknown", "_manifest/attacker-3/") in found and ("file-altered", victim) in found
