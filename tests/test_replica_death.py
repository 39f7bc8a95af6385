"""A dead replica's loss is never silent: the sequence lease, verify and stats, without Ray.

A replica answers a call only within a sequence lease already durable in its signed counters
chain, and writes a closed mark when it shuts down cleanly. Each test builds a real local journal
in which producer p-1 wrote rows 0..39 (and signed counters saying so) and holds a lease to 255,
then plays one ending: still running, killed, closed cleanly, closed short, or attacked. The
attacker can write the storage but holds no key (see tests/test_counters_trust.py).
"""

from __future__ import annotations

import datetime as dt
import time

import pyarrow as pa
import pyarrow.compute as pc
import pytest

from serve_journal._private.counters import LEASE_MIN, LeasedBuffer, ReplicaCounters
from serve_journal._private.entries import CapturedCall
from serve_journal.catalog.layout import split_by_partition
from serve_journal.counters import (
    CLOSED,
    DEAD,
    KEPT,
    KIND_CLOSED,
    KIND_LEASE,
    LIVE,
    ProducerLease,
    counters_path,
    encode_counters,
    lease_shortfall,
    read_counters_file,
)
from serve_journal.metrics import JournalMetrics
from serve_journal.read.stats import stats
from serve_journal.read.verify import format_report, verify_journal
from serve_journal.read.verify_counters import check_counters
from serve_journal.sink.settings import SinkSettings, manifest_hook
from serve_journal.sink.writer import PartitionFileWriter
from serve_journal.storage import LocalJournalStorage
from tests.helpers.entries import DAY, make_entries
from tests.helpers.journal import counters_signer

ROWS = 40
LATER = dt.datetime.now(dt.UTC) + dt.timedelta(hours=1)
"""A verify run an hour on: a replica that has not closed and wrote nothing since is dead."""
GROUP_BY = ("model_name", "decision")


class Journal:
    def __init__(self, root: str) -> None:
        self.uri = root
        self.settings = SinkSettings(journal_uri=root)
        self.storage = self.settings.storage()

    def verify(self, **kwargs):
        return verify_journal(self.storage, public_key=self.settings.public_key_path(), **kwargs)

    def findings(self, **kwargs) -> dict[str, list[str]]:
        out: dict[str, list[str]] = {}
        for p in self.verify(**kwargs).errors:
            out.setdefault(p.kind, []).append(p.detail)
        return out

    def stats(self, **kwargs):
        return stats(self.storage, group_by=GROUP_BY, **kwargs)


def write_rows(journal: Journal, n: int, producer: str = "p-1") -> None:
    log = journal.settings.manifest(journal.storage, f"w00-{producer}")
    writer = PartitionFileWriter(journal.storage, f"w00-{producer}", roll_seconds=3600.0,
                                 roll_bytes=1 << 40, on_file_written=[manifest_hook(log)])
    for batch in make_entries(n, producer=producer, spread_s=60, decision="allow").to_batches():
        for key, part in split_by_partition(batch):
            writer.add(key, part)
    writer.roll_all()
    log.checkpoint()


def count_kept(counters: ReplicaCounters, seqs: range) -> None:
    ts_us = int((DAY + dt.timedelta(seconds=1)).timestamp() * 1_000_000)
    for seq in seqs:
        counters.exact.record("fraud", "3", ts_us, "allow", "low", 1.0, "ok", seq, KEPT)


@pytest.fixture
def journal(tmp_path):
    j = Journal(str(tmp_path / "journal"))
    write_rows(j, ROWS)
    j.counters = ReplicaCounters("p-1", JournalMetrics("fraud", "d", "r"), "low", j.storage,
                                 counters_signer(j.uri))
    j.counters.extend_lease(0, "fraud")  # what the replica does before it serves
    assert j.counters.lease_through == LEASE_MIN - 1
    count_kept(j.counters, range(ROWS))
    j.counters.flush()
    return j


def test_the_lease_is_durable_before_a_call_within_it_is_admitted(tmp_path):
    storage = FlakyStorage(str(tmp_path / "journal"), fail=1)
    counters = ReplicaCounters("p-9", JournalMetrics("fraud", "d", "r"), "low", storage,
                               counters_signer(storage.uri))
    admitted: list[int] = []
    drops: list[tuple[int, str]] = []
    buffer = LeasedBuffer(lambda item, **_: admitted.append(item.seq) or True, counters,
                          lambda items, reason: drops.extend((i.seq, reason) for i in items))
    with pytest.raises(OSError):
        counters.extend_lease(0, "fraud")  # the store is down: no lease, nothing admitted
    assert counters.lease_through == -1
    assert not buffer.offer(call(0), report_drop=False)
    assert not buffer.offer(call(1)) and drops == [(1, "lease_pending")]
    counters.extend_lease(0, "fraud")  # backs off after a failure (no log line per wake-up)...
    assert counters.lease_through == -1
    counters.flush()  # ...but the next counters flush writes the pending lease
    assert counters.lease_through == LEASE_MIN - 1 == leases(storage)["p-9"]
    assert buffer.offer(call(0)) and buffer.offer(call(LEASE_MIN - 1))
    assert not buffer.offer(call(LEASE_MIN), report_drop=False)
    counters.extend_lease(LEASE_MIN // 2, "fraud")  # half left: nothing written
    assert counters.lease_through == LEASE_MIN - 1
    counters.extend_lease(LEASE_MIN // 2 + 1, "fraud")  # less than half left: extended, durably
    assert counters.lease_through > LEASE_MIN and counters.lease_through == leases(storage)["p-9"]
    assert buffer.offer(call(LEASE_MIN))
    assert admitted == [0, LEASE_MIN - 1, LEASE_MIN]


def test_the_lease_keeper_keeps_ahead_of_traffic_on_its_own_thread(tmp_path):
    """No flusher runs here at all: the keeper alone extends the lease as numbers are used, and
    close stops it and writes the closed mark."""
    storage = LocalJournalStorage(str(tmp_path / "journal"))
    counters = ReplicaCounters("p-8", JournalMetrics("fraud", "d", "r"), "low", storage,
                               counters_signer(storage.uri))
    counters.extend_lease(0, "fraud")
    used = [0]
    counters.start_lease_keeper(lambda: used[0], "fraud")
    try:
        for target in (200, 1_000, 5_000):
            used[0] = target
            deadline = time.monotonic() + 30
            while counters.lease_through < target and time.monotonic() < deadline:
                time.sleep(0.01)  # a deadline-bounded wait for the keeper thread
            assert counters.lease_through >= target
    finally:
        counters.close(used[0] - 1, timeout=10)
    assert counters.lease_through == -1
    check = check_counters(storage, SinkSettings(journal_uri=storage.uri).signer().public_key)
    assert check.leases["p-8"].closed_seq == used[0] - 1
    assert check.leases["p-8"].leased_through >= used[0]


def test_a_live_replicas_in_flight_range_is_no_finding_and_not_exact(journal):
    report = journal.verify()
    assert report.ok, format_report(report)
    assert not [p for p in report.problems if p.kind == "producer-died"]
    summary = journal.stats()
    assert not summary.exact and "still open" in summary.not_exact["p-1"]
    assert summary.captured == ROWS and summary.lost_up_to == {}
    assert "captured at least 40 (not exact" in summary.format_text()
    assert all(not g.complete for g in summary.groups)


def test_a_dead_replicas_unaccounted_lease_is_an_error_and_stats_says_up_to_n_lost(journal):
    findings = journal.findings(now=LATER)
    assert list(findings) == ["producer-died"]
    (detail,) = findings["producer-died"]
    assert "producer p-1" in detail and f"sequence {ROWS}..{LEASE_MIN - 1}" in detail
    assert f"up to {LEASE_MIN - ROWS} entries lost" in detail
    summary = journal.stats(now=LATER)
    assert not summary.exact and summary.lost_up_to == {"p-1": LEASE_MIN - ROWS}
    text = summary.format_text()
    assert f"up to {LEASE_MIN - ROWS} entries lost with replica p-1's death" in text
    assert ">=40" in text and "(exact)" not in text


def test_a_dead_replicas_counted_sampling_and_drops_shrink_the_bound(journal):
    ts_us = int((DAY + dt.timedelta(seconds=2)).timestamp() * 1_000_000)
    for seq in range(ROWS, 100):  # counted before it died: sampled out, and dropped
        journal.counters.exact.record("fraud", "3", ts_us, "allow", "low", 0.5, "ok", seq,
                                      "sampled_out" if seq < 70 else "dropped", "buffer_full")
    journal.counters.flush()
    (detail,) = journal.findings(now=LATER)["producer-died"]
    assert f"sequence 100..{LEASE_MIN - 1}" in detail
    assert journal.stats(now=LATER).lost_up_to == {"p-1": LEASE_MIN - 100}


def test_a_clean_close_is_exact_and_no_finding(journal):
    journal.counters.close(ROWS - 1)
    report = journal.verify(now=LATER)
    assert report.ok and not report.warnings, format_report(report)
    summary = journal.stats(now=LATER)
    assert summary.exact and summary.captured == ROWS
    assert summary.format_text().startswith(f"captured {ROWS} (exact)")
    assert all(g.complete and g.exact == ROWS for g in summary.groups)


def test_a_close_after_entries_that_never_arrived_is_a_sequence_gap(journal):
    journal.counters.close(ROWS + 5)  # 40..45 captured, then lost before the close
    (detail,) = journal.findings(now=LATER)["sequence-gap"]
    assert f"closed cleanly at sequence {ROWS + 5}" in detail and "(6 entries)" in detail
    summary = journal.stats(now=LATER)
    assert not summary.exact and summary.lost_up_to == {"p-1": 6}


def test_more_rows_than_counted_is_never_exact(tmp_path):
    """A producer from before leases (no lease rows) whose last counters never came: the
    1.0038 sample rate of issue 15."""
    j = Journal(str(tmp_path / "journal"))
    write_rows(j, ROWS)
    counters = ReplicaCounters("p-1", JournalMetrics("fraud", "d", "r"), "low", j.storage,
                               counters_signer(j.uri))
    count_kept(counters, range(30))
    counters.exact.flush_to(j.storage)
    summary = j.stats()
    assert summary.journal_rows == ROWS and summary.kept == 30
    assert not summary.exact and "40 rows in the journal but its counters kept 30" in \
        summary.not_exact["p-1"]
    assert "(exact)" not in summary.format_text()


def test_shortfall_of_a_lease():
    now = 10_000_000_000
    live = ProducerLease("p", 99, now - 1_000_000, None)
    assert live.state(now) == LIVE and lease_shortfall(live, [], 0, now) is None
    dead = ProducerLease("p", 99, now - 400_000_000, None)
    assert dead.state(now) == DEAD
    short = lease_shortfall(dead, [(0, 9), (20, 29), (25, 40)], 0, now)
    assert short.missing == [(10, 19), (41, 99)] and short.count == 69
    assert lease_shortfall(dead, [(0, 120)], 0, now).count == 0
    closed = ProducerLease("p", 99, now - 400_000_000, 50)
    assert closed.state(now) == CLOSED
    assert lease_shortfall(closed, [(0, 9)], 5, now).missing == [(10, 50)]


# --------------------------------------------------------------------------- the attacker


def test_a_forged_closed_mark_hides_no_death(journal):
    """The attacker copies the producer's rows with a closed mark at 39 into an unsigned file,
    so the dead replica would look cleanly closed."""
    genuine = next(p for p in journal.storage.list_files("_counters/", ".parquet")
                   if read_counters_file(p, journal.storage.read(p)).lease_rows())
    parsed = read_counters_file(genuine, journal.storage.read(genuine))
    lease = parsed.table.filter(pc.equal(parsed.table["kind"], KIND_LEASE)).to_pylist()[0]
    closed = {**lease, "kind": KIND_CLOSED, "disposition": KIND_CLOSED, "seq_hi": ROWS - 1,
              "count": ROWS}
    forged = counters_path("fraud", genuine.split("date=")[1][:10], "p-1", 99)
    table = pa.concat_tables([parsed.table, pa.Table.from_pylist([closed], parsed.table.schema)])
    journal.storage.put_new(forged, encode_counters(table))
    findings = journal.findings(now=LATER)
    assert "counters-unsigned" in findings and "producer-died" in findings
    assert journal.stats(now=LATER).lost_up_to == {"p-1": LEASE_MIN - ROWS}


def test_deleting_the_newest_lease_is_caught_by_remembered_heads(journal):
    """The replica extends its lease to far beyond 255, then dies; the attacker deletes that
    newest lease file to shrink the bound. Only remembered heads can tell (as for every
    newest counters file)."""
    journal.counters.extend_lease(LEASE_MIN - 1, "fraud")
    newest = journal.counters.exact._prev_path
    heads = journal.verify().heads
    journal.storage.delete(newest)
    assert [k for k in journal.findings(now=LATER)] == ["producer-died"]  # a smaller bound
    errors = journal.findings(now=LATER, expected_heads=heads)
    assert "counters-rolled-back" in errors


# --------------------------------------------------------------------------- helpers


class FlakyStorage(LocalJournalStorage):
    """A real local journal whose next ``fail`` writes raise, like an unreachable bucket."""

    def __init__(self, root, fail):
        super().__init__(root)
        self.fail = fail

    def put_new(self, relative, data):
        if self.fail:
            self.fail -= 1
            raise OSError("storage unavailable")
        return super().put_new(relative, data)


def leases(storage) -> dict[str, int]:
    settings = SinkSettings(journal_uri=storage.uri)
    check = check_counters(storage, settings.signer().public_key)
    return {p: lease.leased_through for p, lease in check.leases.items()}


def call(seq: int) -> CapturedCall:
    return CapturedCall(seq, 0, "r", (), {}, None, None, None, "ok", None, 0.0, None, None)


def test_the_request_path_wakes_the_lease_keeper_when_half_the_lease_is_used(tmp_path, monkeypatch):
    """The keeper does not poll: it sleeps (here: a minute) until a call past half the lease wakes
    it, then extends the lease durably before the rest is used up; a failing store backs it off
    instead of spinning on every wake-up."""
    from serve_journal._private import counters as counters_module

    monkeypatch.setattr(counters_module, "LEASE_IDLE_POLL_S", 60.0)
    storage = FlakyStorage(str(tmp_path / "journal"), fail=0)
    counters = ReplicaCounters("p-7", JournalMetrics("fraud", "d", "r"), "low", storage,
                               counters_signer(storage.uri))
    counters.extend_lease(0, "fraud")
    assert counters.wake_at == LEASE_MIN // 2
    buffer = LeasedBuffer(lambda item, **_: True, counters, lambda items, reason: None)
    used = [0]
    counters.start_lease_keeper(lambda: used[0], "fraud")
    try:
        for seq in range(LEASE_MIN // 2):  # half the lease: the keeper sleeps on
            assert buffer.offer(call(seq))
        used[0] = LEASE_MIN // 2
        time.sleep(0.2)
        assert counters.lease_through == LEASE_MIN - 1
        assert buffer.offer(call(LEASE_MIN // 2))  # past half: woken, extended at once
        used[0] = LEASE_MIN // 2 + 1
        deadline = time.monotonic() + 10
        while counters.lease_through < LEASE_MIN and time.monotonic() < deadline:
            time.sleep(0.01)  # a deadline-bounded wait for the keeper thread
        assert counters.lease_through >= LEASE_MIN
        assert counters.lease_through == leases(storage)["p-7"]
        assert counters.wake_at > LEASE_MIN // 2
        storage.fail = 10**6  # the store goes down: wake-ups past the mark back off, no spin
        used[0] = counters.wake_at + 1
        seq, until = counters.wake_at, time.monotonic() + 0.5  # well within LEASE_RETRY_S
        while time.monotonic() < until:
            buffer.offer(call(seq))
            seq += 1
            time.sleep(0.001)
        assert 10**6 - storage.fail == 1  # one attempt, then LEASE_RETRY_S of back-off
    finally:
        storage.fail = 0
        counters.close(used[0] - 1, timeout=10)
