"""Fail-closed on the Kafka transport, against a real tansu broker: a full queue or a full spool
holds entries and pushes back (``has_room`` false, ``send`` waits) instead of dropping them, and
the spool gauges follow the spool. The request-path side (503s, tiers) is in
tests/test_fail_closed_serve.py."""

from __future__ import annotations

import threading

import pytest

from serve_journal.metrics import SPOOL_BYTES, SPOOL_DEPTH, JournalMetrics
from serve_journal.transport.kafka import KafkaSettings, KafkaTransport
from tests.fixtures.kafka import TansuBroker, entries_of, free_port, make_entries, wait_for

pytestmark = pytest.mark.timeout(240)

BATCH = 100


def _settings(bootstrap: str, tmp_path, **overrides) -> KafkaSettings:
    values = dict(bootstrap_servers=bootstrap, topic="journal", enable_idempotence=False,
                  spool_dir=str(tmp_path / "spool"), send_timeout_s=2.0, request_timeout_ms=2000,
                  retry_backoff_s=0.1, retry_backoff_max_s=0.5, num_partitions=2,
                  adopt_orphan_spools=False)
    values.update(overrides)
    return KafkaSettings(**values)


def _gauges(metrics: JournalMetrics) -> tuple[float, float]:
    totals = metrics.totals()
    return totals.get(SPOOL_DEPTH.name, 0), totals.get(SPOOL_BYTES.name, 0)


@pytest.mark.slow  # over 1.5 s: kept out of the fast tier, runs in the full suite
def test_full_spool_and_queue_hold_every_entry_and_push_back_until_the_broker_returns(tmp_path):
    broker = TansuBroker(free_port(), "memory://tansu/", tmp_path / "tansu.log")  # not started
    metrics = JournalMetrics("fraud", "dep", "r1")
    drops: list[tuple[str, int]] = []
    # ~50 KB per 100-entry frame: the spool takes three frames, the queue two batches.
    transport = KafkaTransport(
        _settings(broker.bootstrap, tmp_path, spool_max_bytes=160_000, queue_max_batches=2),
        on_drop=lambda reason, n, entries: drops.append((reason, n)), metrics=metrics)
    blocked: threading.Thread | None = None
    try:
        sent = 0

        def pushed_back() -> bool:  # what the replica's flusher does: send while there is room
            nonlocal sent
            if transport.has_room():
                assert sent < 40, "the transport never pushed back"
                transport.send(make_entries(BATCH, start_seq=sent * BATCH))
                sent += 1
                return False
            return transport.counters()["held_entries"] == BATCH

        # Pushed back: the spool is full, one batch is held, the queue behind it is full.
        wait_for(pushed_back, 60, message="backpressure")
        assert not transport.has_room()
        counters = transport.counters()
        assert counters["dropped"] == {} and drops == []
        assert counters["spool_entries"] == counters["spooled"] > 0
        depth, nbytes = _gauges(metrics)
        assert depth == counters["spool_entries"] and 0 < nbytes <= 160_000
        assert not transport.flush(0.5)  # not durable, and says so

        # A send() made anyway waits for room; it neither drops nor raises.
        blocked = threading.Thread(target=transport.send,
                                   args=(make_entries(BATCH, start_seq=sent * BATCH),))
        blocked.start()
        blocked.join(1.0)
        assert blocked.is_alive(), "send() on a full queue must wait (backpressure), not drop"
        sent += 1

        broker.start()
        broker.create_topic("journal", 2)
        blocked.join(120)
        assert not blocked.is_alive()
        assert transport.wait_drained(120)
        counters = transport.counters()
        assert counters["dropped"] == {} and drops == []
        assert counters["sent"] + counters["drained"] == sent * BATCH
        assert counters["held_entries"] == 0 and counters["spool_entries"] == 0
        assert _gauges(metrics) == (0, 0)
        records = broker.read_all("journal", 2, expected=sent * BATCH)
        assert sorted(row["seq"] for row in entries_of(records)) == list(range(sent * BATCH))
    finally:
        transport.close(10)
        if blocked is not None:
            blocked.join(10)
        broker.stop()


def test_gauges_count_a_reopened_spools_entries(tmp_path):
    dead = f"127.0.0.1:{free_port()}"
    first = KafkaTransport(_settings(dead, tmp_path))
    for i in range(3):
        first.send(make_entries(BATCH, start_seq=i * BATCH))
    assert first.flush(30)
    first.close(10)
    metrics = JournalMetrics("fraud", "dep", "r1")
    second = KafkaTransport(_settings(dead, tmp_path), metrics=metrics)  # same spool directory
    try:
        wait_for(lambda: _gauges(metrics)[0] == 3 * BATCH, 30, message="depth of the reopened spool")
        assert second.counters()["spool_entries"] == 3 * BATCH and _gauges(metrics)[1] > 0
    finally:
        second.close(10)


@pytest.mark.slow  # over 6 s: kept out of the fast tier, runs in the full suite
@pytest.mark.parametrize("disk_returns", [True, False])
def test_a_failing_spool_disk_holds_entries_instead_of_killing_the_transport(tmp_path, disk_returns):
    dead = f"127.0.0.1:{free_port()}"
    drops: list[tuple[str, list]] = []
    transport = KafkaTransport(  # one segment per record: every append opens a file
        _settings(dead, tmp_path, spool_segment_bytes=1),
        on_drop=lambda reason, n, entries: drops.append((reason, sorted(entries.column("seq").to_pylist()))))
    try:
        transport.send(make_entries(BATCH))
        assert transport.flush(30)
        (tmp_path / "spool").rename(tmp_path / "gone")  # the disk under the spool goes away
        transport.send(make_entries(BATCH, start_seq=BATCH))
        wait_for(lambda: transport.counters()["held_entries"] == BATCH, 30, message="batch held")
        assert transport.has_room() and transport.counters()["dropped"] == {}  # the loop lives
        if disk_returns:
            (tmp_path / "gone").rename(tmp_path / "spool")
            assert transport.flush(30)
            counters = transport.counters()
            assert counters["spooled"] == 2 * BATCH and counters["spool_entries"] == 2 * BATCH
            assert counters["spool_corrupt_records"] == 0 and drops == []
    finally:
        transport.close(10)
    if not disk_returns:  # closed while the disk was still gone: counted, with the seqs
        assert drops == [("spool_error", list(range(BATCH, 2 * BATCH)))]
