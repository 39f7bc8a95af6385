"""KafkaTransport against a real tansu broker: routing, spooling while the broker is away, drops."""

from __future__ import annotations

import collections
import subprocess
import sys
import time
from pathlib import Path

import pytest

from serve_journal.transport import TransportError, wire
from serve_journal.transport.kafka import KafkaSettings, KafkaTransport, ModelBucketShardPartitioner
from serve_journal.transport.spool import DiskSpool, find_spools
from tests.fixtures.kafka import TansuBroker, entries_of, free_port, make_entries, wait_for

pytestmark = pytest.mark.timeout(180)


def _settings(bootstrap: str, tmp_path, **overrides) -> KafkaSettings:
    values = dict(bootstrap_servers=bootstrap, topic="journal", enable_idempotence=False,
                  spool_dir=str(tmp_path / "spool"), send_timeout_s=2.0, request_timeout_ms=2000,
                  retry_backoff_s=0.1, retry_backoff_max_s=0.5)
    values.update(overrides)
    return KafkaSettings(**values)


@pytest.mark.slow  # over 3 s: kept out of the fast tier, runs in the full suite
def test_one_hot_model_spreads_evenly_over_partitions(kafka_broker, tmp_path):
    partitions = 8
    kafka_broker.create_topic("journal", partitions)
    transport = KafkaTransport(_settings(kafka_broker.bootstrap, tmp_path, shards_per_model=partitions))
    for i in range(50):
        transport.send(make_entries(2_000, start_seq=i * 2_000, model="hot-model"))
    assert transport.flush(120)
    counters = transport.counters()
    transport.close(10)
    assert counters["sent"] == 100_000 and counters["dropped"] == {}
    records = kafka_broker.read_all("journal", partitions, expected=100_000)
    rows = entries_of(records)
    assert len(rows) == 100_000
    assert len(records) < 1_000  # wire v2: many entries a message
    loads = collections.Counter(row["_partition"] for row in rows)  # as stored by the broker
    assert len(loads) == partitions
    mean = 100_000 / partitions
    ratio = max(loads.values()) / mean
    print(f"partition loads {sorted(loads.values())}, max/mean {ratio:.3f}")
    assert ratio <= 1.2


def test_buckets_rotate_a_models_partitions():
    partitioner = ModelBucketShardPartitioner(shards_per_model=2, bucket_seconds=60)
    starts = set()
    for bucket in range(40):
        ts_us = bucket * 60_000_000
        used = {partitioner.partition(partitioner.key("m", ts_us, f"r{i}"), 16) for i in range(200)}
        assert len(used) == 2  # the two shards of a bucket never collide
        starts.add(frozenset(used))
    assert len(starts) >= 8  # and different buckets use different partitions


def test_broker_down_spools_then_drains_in_order(tmp_path):
    port = free_port()
    broker = TansuBroker(port, "memory://tansu/", tmp_path / "tansu.log")
    transport = KafkaTransport(_settings(broker.bootstrap, tmp_path, num_partitions=4, shards_per_model=4))
    try:
        batches = [make_entries(500, start_seq=i * 500) for i in range(6)]
        started = time.monotonic()
        for batch in batches:
            transport.send(batch)
        send_time = time.monotonic() - started
        assert transport.flush(60)  # durable = spooled, with nobody listening
        counters = transport.counters()
        assert counters["spooled"] == 3_000 and counters["sent"] == 0
        assert counters["spool_records"] >= 1
        assert send_time < 1.0, "send() must not wait for the broker"

        broker.start()
        broker.create_topic("journal", 4)
        assert transport.wait_drained(90)
        counters = transport.counters()
        assert counters["drained"] == 3_000 and counters["spool_records"] == 0
        records = broker.read_all("journal", 4, expected=3_000)
        rows = entries_of(records)
        seqs = [row["seq"] for row in rows]
        assert sorted(seqs) == list(range(3_000))
        by_partition: dict[int, list[int]] = {}
        for row in rows:
            by_partition.setdefault(row["_partition"], []).append(row["seq"])
        for values in by_partition.values():
            assert values == sorted(values)  # drained in the order handed over
        assert all(tuple(r.headers) == wire.HEADERS for r in records)  # wire v2, current schema
    finally:
        transport.close(10)
        broker.stop()


@pytest.mark.slow  # over 3 s: kept out of the fast tier, runs in the full suite
def test_a_batch_larger_than_the_spool_is_held_until_close_then_counted(tmp_path):
    """Nowhere to keep it (broker dead, spool too small): held, not dropped, until close; then the
    drop is counted with the entries' sequence numbers (fail-closed: see test_fail_closed_kafka)."""
    drops: list[tuple[str, int, list]] = []
    dead = f"127.0.0.1:{free_port()}"
    transport = KafkaTransport(
        _settings(dead, tmp_path, num_partitions=2, spool_max_bytes=4096),
        on_drop=lambda reason, n, entries: drops.append((reason, n, sorted(entries.column("seq").to_pylist()))))
    transport.send(make_entries(100))  # ~8 KB wire-encoded (4 messages): larger than the spool
    wait_for(lambda: transport.counters()["held_entries"] == 100, 30, message="batch held")
    assert not transport.flush(0.5)
    assert transport.counters()["dropped"] == {}
    transport.close(5)
    assert transport.counters()["dropped"] == {"spool_full": 100}
    assert drops == [("spool_full", 100, list(range(100)))]
    with pytest.raises(TransportError, match="closed"):
        transport.send(make_entries(1))
    transport.close(5)  # twice is harmless


def test_settings_validate_and_hide_secrets():
    with pytest.raises(ValueError, match="topic"):
        KafkaSettings(bootstrap_servers="x:1", topic="bad topic")
    with pytest.raises(ValueError, match="sasl_mechanism"):
        KafkaSettings(bootstrap_servers="x:1", security_protocol="SASL_SSL")
    settings = KafkaSettings(bootstrap_servers="x:1", security_protocol="SASL_PLAINTEXT",
                             sasl_mechanism="PLAIN", sasl_plain_username="u", sasl_plain_password="hunter2")
    assert "hunter2" not in repr(settings)
    assert settings.producer_kwargs()["acks"] == "all"
    assert settings.producer_kwargs()["sasl_plain_password"] == "hunter2"
    with pytest.raises(ValueError, match="unknown Kafka setting"):
        KafkaSettings.from_mapping({"bootstrap_servers": "x:1", "acks": 1})


_SPOOLING_PRODUCER = """
import sys, time
from serve_journal.transport.kafka import KafkaSettings, KafkaTransport
from tests.fixtures.kafka import make_entries
settings = KafkaSettings(bootstrap_servers=sys.argv[1], topic="journal", enable_idempotence=False,
                         spool_dir=sys.argv[2], num_partitions=4, send_timeout_s=1.0,
                         request_timeout_ms=1000, retry_backoff_s=0.1, retry_backoff_max_s=0.5)
transport = KafkaTransport(settings)
for i in range(3):
    transport.send(make_entries(500, producer_id="dead-replica", start_seq=i * 500))
assert transport.flush(60)
print("spooled", transport.counters()["spooled"], flush=True)
time.sleep(600)
"""


def test_spool_of_a_killed_producer_is_adopted_by_a_live_one(tmp_path):
    broker = TansuBroker(free_port(), "memory://tansu/", tmp_path / "tansu.log")
    base = tmp_path / "spools"
    orphan = base / "dead-replica"
    producer = subprocess.Popen(  # a replica process: spools 1,500 entries while the broker is down
        [sys.executable, "-c", _SPOOLING_PRODUCER, broker.bootstrap, str(orphan)],
        cwd=Path(__file__).resolve().parents[1], stdout=subprocess.PIPE, text=True)
    live = None
    try:
        assert producer.stdout.readline().split() == ["spooled", "1500"]
        # While its owner lives, nobody may take the spool over.
        assert DiskSpool.adopt(str(orphan), _settings(broker.bootstrap, tmp_path).spool_label) is None
        producer.kill()  # kill -9 with the entries still in its spool
        producer.wait(10)

        broker.start()
        broker.create_topic("journal", 4)
        live = KafkaTransport(_settings(broker.bootstrap, tmp_path, spool_dir=str(base / "live-replica"),
                                        num_partitions=4, orphan_scan_interval_s=0.2))
        wait_for(lambda: live.counters()["adopted_spools"] == 1, 60, message="orphaned spool adopted")
        counters = live.counters()
        assert counters["adopted_drained"] == 1_500 and counters["dropped"] == {}
        assert not orphan.exists()  # drained and removed
        records = broker.read_all("journal", 4, expected=1_500)
        rows = entries_of(records)
        assert {r["producer_id"] for r in rows} == {"dead-replica"}
        assert sorted(r["seq"] for r in rows) == list(range(1_500))  # each once, none lost
    finally:
        if producer.poll() is None:
            producer.kill()
            producer.wait(10)
        if live is not None:
            live.close(10)
        broker.stop()


def test_spools_of_other_topics_and_unmarked_directories_are_left_alone(tmp_path):
    base = tmp_path / "spools"
    other = DiskSpool(str(base / "other-topic"), label="kafka 127.0.0.1:1 other-topic")
    assert other.append(b"frame")
    other.close()
    plain = DiskSpool(str(base / "unlabelled"))
    assert plain.append(b"frame")
    plain.close()
    mine = DiskSpool(str(base / "mine"), label="kafka 127.0.0.1:1 journal")
    mine.close()
    assert find_spools(str(base), "kafka 127.0.0.1:1 journal") == [str(base / "mine")]
    assert DiskSpool.adopt(str(base / "other-topic"), "kafka 127.0.0.1:1 journal") is None
    assert DiskSpool.adopt(str(base / "unlabelled"), "kafka 127.0.0.1:1 journal") is None
    adopted = DiskSpool.adopt(str(base / "mine"), "kafka 127.0.0.1:1 journal")
    assert adopted is not None and len(adopted) == 0
    adopted.remove()
    assert sorted(p.name for p in base.iterdir()) == ["other-topic", "unlabelled"]
    full = DiskSpool.adopt(str(base / "other-topic"), "kafka 127.0.0.1:1 other-topic")
    assert full is not None
    try:
        with pytest.raises(ValueError, match="still holds 1 records"):
            full.remove()  # never deletes undrained entries
    finally:
        full.close()
    assert (base / "other-topic").is_dir()


def test_a_spool_of_the_previous_release_drains_with_its_own_wire_version(kafka_broker, tmp_path):
    """An upgrade finds v1 frames (one JSON entry a message) in the spool: they are resent as v1
    messages (JSON headers) before the new v2 messages behind them, and the sink reads both."""
    kafka_broker.create_topic("journal", 2)
    settings = _settings(kafka_broker.bootstrap, tmp_path, num_partitions=2)
    partitioner = ModelBucketShardPartitioner(settings.shards_per_model, settings.bucket_seconds)
    old = DiskSpool(settings.resolved_spool_dir(), label=settings.spool_label)
    messages = wire.encode_batch(make_entries(30, producer_id="old"))
    assert old.append(wire.pack_frame(
        [(partitioner.key(m.model_name, m.ts_us, m.request_id), m.value) for m in messages], version=1))
    old.close()
    transport = KafkaTransport(settings)
    try:
        transport.send(make_entries(50, producer_id="new"))
        assert transport.wait_drained(60)
        counters = transport.counters()
        # the new batch queues behind the spool (order kept), so it may be spooled and drained
        assert counters["drained"] >= 30 and counters["drained"] + counters["sent"] == 80
        assert counters["dropped"] == {}
    finally:
        transport.close(10)
    records = kafka_broker.read_all("journal", 2, expected=80)
    versions = collections.Counter(wire.check_headers(r.headers) for r in records)
    assert versions[1] == 30 and 1 <= versions[2] <= 8
    rows = entries_of(records)
    assert sorted((r["producer_id"], r["seq"]) for r in rows) == sorted(
        [("old", s) for s in range(30)] + [("new", s) for s in range(50)])


def test_wait_drained_waits_until_an_acked_drain_is_counted(tmp_path, monkeypatch):
    """The drainer acks spooled records in a worker thread: the spool is empty before the loop
    counts the drain. wait_drained must not return in that window (it once did: 'drained' read
    short of 'spooled' with the spool empty)."""
    import threading

    from serve_journal.transport import kafka

    acked, release = threading.Event(), threading.Event()
    ack_all = kafka._ack_all

    def ack_then_hold(spool, records):
        ack_all(spool, records)
        acked.set()
        release.wait(60)  # the worker thread holds here: acked, not yet counted

    monkeypatch.setattr(kafka, "_ack_all", ack_then_hold)
    port = free_port()
    broker = TansuBroker(port, "memory://tansu/", tmp_path / "tansu.log")
    transport = KafkaTransport(_settings(broker.bootstrap, tmp_path, num_partitions=2))
    try:
        transport.send(make_entries(200))
        assert transport.flush(60) and transport.counters()["spooled"] == 200
        broker.start()
        broker.create_topic("journal", 2)
        assert acked.wait(90)
        counters = transport.counters()
        assert counters["spool_records"] == 0 and counters["drained"] == 0  # the window
        assert not transport.wait_drained(0.3)
        release.set()
        assert transport.wait_drained(60)
        counters = transport.counters()
        assert counters["drained"] == counters["spooled"] == 200 and counters["dropped"] == {}
    finally:
        release.set()
        transport.close(10)
        broker.stop()
