"""Only signed, chained counters explain a gap: the attacker's side of the exact counters.

The attacker can create, overwrite and delete any object in the journal's storage but holds
neither the manifest key nor a replica's counters key. A counters file declaring a sequence range
"sampled out" or "dropped" turns a gap from loss into an accounted gap, so it is worth forging.
Each test starts from a journal whose producer p-1 has a gap (seq 20..29) that genuine signed
counters explain, then attacks the counters and checks verify names what was done (and readers
of the exact counts ignore forged rows).
"""

from __future__ import annotations

import datetime as dt

import pyarrow as pa
import pyarrow.compute as pc
import pytest

from serve_journal.catalog.layout import split_by_partition
from serve_journal.counters import (
    DROPPED,
    KEPT,
    SAMPLED_OUT,
    CounterSet,
    counters_path,
    encode_counters,
    read_counters_file,
)
from serve_journal.integrity.certificates import PURPOSE_COUNTERS, certify, publish
from serve_journal.integrity.manifest import ManifestSigner
from serve_journal.read.stats import load_counters
from serve_journal.read.verify import format_report, verify_journal
from serve_journal.sink.settings import SinkSettings, manifest_hook
from serve_journal.sink.writer import PartitionFileWriter
from tests.helpers.entries import DAY, make_entries
from tests.helpers.journal import counters_signer

TS_US = int((DAY + dt.timedelta(minutes=5)).timestamp() * 1_000_000)


class Journal:
    def __init__(self, root: str) -> None:
        self.uri = root
        self.settings = SinkSettings(journal_uri=root)
        self.storage = self.settings.storage()

    def verify(self, **kwargs):
        return verify_journal(self.storage, public_key=self.settings.public_key_path(), **kwargs)

    def errors(self, **kwargs) -> set[tuple[str, str]]:
        return {(p.kind, p.path) for p in self.verify(**kwargs).errors}


@pytest.fixture
def journal(tmp_path):
    j = Journal(str(tmp_path / "journal"))
    log = j.settings.manifest(j.storage, "w00-counters")
    writer = PartitionFileWriter(j.storage, "w00-counters", roll_seconds=3600.0,
                                 roll_bytes=1 << 40, on_file_written=[manifest_hook(log)])
    for seq_start in (0, 30):  # seq 20..29 never written: sampled out and dropped
        table = make_entries(20, producer="p-1", seq_start=seq_start, spread_s=600)
        for batch in table.to_batches():
            for key, part in split_by_partition(batch):
                writer.add(key, part)
        writer.roll_all()
    log.checkpoint()
    counters = CounterSet("p-1", counters_signer(j.uri))
    files = []
    for seqs, disposition in ((range(20, 25), SAMPLED_OUT), (range(25, 30), DROPPED),
                              (range(0, 20), KEPT)):
        for seq in seqs:
            counters.record("fraud", "3", TS_US, "allow", "low", 0.1, "ok", seq, disposition,
                            "buffer_full" if disposition == DROPPED else None)
        files.extend(o.path for o in counters.flush_to(j.storage))
    report = j.verify()
    assert report.ok, format_report(report)
    assert report.accounted_gaps == 1
    j.counter_files = files
    return j


def test_signed_counters_explain_the_gap_and_their_heads_are_remembered(journal):
    report = journal.verify()
    head = report.heads["counters/p-1"]
    assert head["length"] == 3 and head["path"] == journal.counter_files[-1]


def test_a_forged_counters_file_explains_nothing(journal):
    """Replace the genuine file explaining 20..24 by an unsigned one with the same rows."""
    genuine = journal.counter_files[0]
    rows = read_counters_file(genuine, journal.storage.read(genuine)).table
    journal.storage.delete(genuine)
    forged = counters_path("fraud", "2025-03-04", "p-1", 7)
    journal.storage.put_new(forged, encode_counters(rows))
    errors = journal.errors()
    assert ("counters-unsigned", forged) in errors
    assert ("counters-chain-broken", journal.counter_files[1]) in errors
    assert "sequence-gap" in {kind for kind, _ in errors}


def test_counters_signed_by_the_attackers_own_key_explain_nothing(journal):
    """The attacker makes a key, a certificate for it signed by that same key, and signs a
    counters file declaring p-1's 30..49 dropped."""
    attacker = ManifestSigner.generate()
    cert_path = publish(journal.storage, certify(attacker, attacker.public_key, PURPOSE_COUNTERS))
    fake = CounterSet("p-1", attacker)
    for seq in range(60, 70):
        fake.record("fraud", "3", TS_US, "allow", "low", 0.1, "ok", seq, DROPPED, "x")
    (written,) = fake.flush_to(journal.storage)
    errors = journal.errors()
    assert ("key-certificate-invalid", cert_path) in errors
    assert ("counters-unsigned", written.path) in errors


@pytest.mark.parametrize("change", ["copy-to-other-producer", "edit-a-count", "rename"])
def test_a_genuine_counters_file_copied_edited_or_renamed_fails(journal, change):
    genuine = journal.counter_files[2]
    data = journal.storage.read(genuine)
    if change == "copy-to-other-producer":
        target = counters_path("fraud", "2025-03-04", "p-2", 0)
        journal.storage.put_new(target, data)
    elif change == "rename":
        target = counters_path("fraud", "2025-03-04", "p-1", 9)
        journal.storage.put_new(target, data)
        journal.storage.delete(genuine)
    else:
        parsed = read_counters_file(genuine, data)
        table = parsed.table
        counts = pc.multiply(table["count"], pa.scalar(2, pa.int64()))
        edited = table.set_column(table.schema.get_field_index("count"), "count", counts)
        journal.storage.delete(genuine)
        journal.storage.put_new(genuine, encode_counters(edited, {
            b"serve_journal.counters_key_id": parsed.key_id.encode(),
            b"serve_journal.counters_signature": parsed.signature.encode(),
            b"serve_journal.counters_prev": parsed.prev.encode(),
            b"serve_journal.counters_prev_path": parsed.prev_path.encode()}))
        target = genuine
    assert ("counters-unsigned", target) in journal.errors()
    # Readers of the exact counts (stats, console) ignore it too: 30 counted entries, less the
    # 20 of the genuine file where it was replaced.
    total = sum(load_counters(journal.storage)["count"].to_pylist())
    assert total == (30 if change == "copy-to-other-producer" else 10)


def test_deleting_the_newest_counters_file_is_caught_by_remembered_heads(journal):
    heads = journal.verify().heads
    journal.storage.delete(journal.counter_files[-1])
    assert journal.verify().ok  # no other evidence names it: only the auditor's memory can
    assert ("counters-rolled-back", journal.counter_files[-1]) in journal.errors(
        expected_heads=heads)
