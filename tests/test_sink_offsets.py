"""Where a restarted Kafka sink resumes: from signed records only, through compaction, and never
moved by someone who can write the storage but holds no key.

The attacker tests build a sink's journal with its real manifest chain (signed), then plant
files, records and checkpoints as a storage writer could, and check what ``recover_offsets``
and the sink's write path make of them. The end-to-end tests run the sink through
``KafkaSinkRunner`` against the tansu broker, compact the journal (which deletes the sink-named
files), restart, and check exactly once and verify, locally and on the moto S3 server.
"""

from __future__ import annotations

import asyncio
import base64
import dataclasses
import datetime as dt
import json
import time
from pathlib import Path
from urllib.parse import urlparse

import pyarrow as pa
import pytest

from serve_journal.catalog.layout import DEFAULT_SPEC
from serve_journal.fileformat import encode_parquet
from serve_journal.integrity.manifest import (
    Checkpoint,
    ManifestLog,
    ManifestSigner,
    build_file_record,
    checkpoint_path,
    record_path,
)
from serve_journal.maintain.compaction import run_compaction
from serve_journal.read.verify import format_report, verify_journal
from serve_journal.sink.kafka import KafkaSink, KafkaSinkSettings, _Chunk, build_chunk_parts
from serve_journal.sink.kafka_app import KafkaSinkRunner
from serve_journal.sink.offsets import ChunkFileName, recover_offsets, unsigned_tails
from serve_journal.sink.settings import SinkSettings, manifest_hook
from serve_journal.storage import LocalJournalStorage, open_storage
from serve_journal.transport import wire
from serve_journal.transport.kafka import KafkaSettings, KafkaTransport
from tests.fixtures.kafka import check_delivery, journal_table, make_entries
from tests.helpers.journal import signing_key_files

pytestmark = pytest.mark.timeout(300)

TOPIC = "journal"
PARTITIONS = 2


# -- a sink's journal, built without a broker ------------------------------------------------


def _messages(n: int, start_offset: int = 0, start_seq: int = 0, per_message: int = 1):
    """``(offset, value, headers)`` of ``n`` messages as the transport puts them on the wire
    (wire v2), each carrying ``per_message`` entries, seqs from ``start_seq``."""
    batch = make_entries(n * per_message, start_seq=start_seq)
    keys = [str(i // per_message).encode() for i in range(n * per_message)]
    messages = wire.encode_messages(batch, keys)
    assert len(messages) == n
    return [(start_offset + i, m.value, tuple(wire.HEADERS)) for i, m in enumerate(messages)]


def _sink(root: Path, signer: ManifestSigner | None = None, chain: str = "k-journal-p0-1-aaaa"):
    """A sink on ``root`` recording into a signed chain (its consumer is never started)."""
    settings = KafkaSinkSettings(bootstrap_servers="127.0.0.1:1", topic=TOPIC,
                                 partitions=tuple(range(PARTITIONS)))
    storage = LocalJournalStorage(str(root))
    journal = SinkSettings(str(root), dev_mode=True)
    log = journal.manifest(storage, chain)
    sink = KafkaSink(settings, storage, on_file_written=manifest_hook(log),
                     public_key=log.signer.public_key)
    return sink, log, storage


def _write_chunk(sink: KafkaSink, partition: int, messages) -> None:
    chunk = _Chunk()
    chunk.messages.extend(messages)
    sink._write_parts(partition, chunk)


def _public_key(root: Path) -> str:
    return str(root.parent / "journal-signing" / "manifest-signing.pub.pem")


def test_offsets_come_from_signed_records_only(tmp_path):
    root = tmp_path / "journal"
    sink, log, storage = _sink(root)
    _write_chunk(sink, 0, _messages(10, 0, 0))
    _write_chunk(sink, 0, _messages(10, 10, 10))
    log.checkpoint()
    _write_chunk(sink, 0, _messages(10, 20, 20))  # recorded, never signed (the run died)
    key = log.signer.public_key
    recovered = recover_offsets(storage, TOPIC, [0, 1], key)
    assert recovered.next_offset == {0: 20}
    # The unsigned chunk is rebuilt with its own cut, and adopted: same name, same entries.
    assert recovered.rebuild == {0: [(20, 29)]}
    # Without the key the names are taken at their word (tests of the consumer logic only).
    assert recover_offsets(storage, TOPIC, [0, 1]).next_offset == {0: 30}


def test_a_storage_writer_without_the_key_cannot_make_the_sink_skip(tmp_path):
    root = tmp_path / "journal"
    sink, log, storage = _sink(root)
    _write_chunk(sink, 0, _messages(10, 0, 0))
    log.checkpoint()
    key = log.signer.public_key
    before = recover_offsets(storage, TOPIC, [0, 1], key)
    assert before.next_offset == {0: 10}
    data_path = storage.list_files(suffix=".parquet")[0]
    planted_key = DEFAULT_SPEC.parse(data_path)[1]
    far = pa.Table.from_batches([make_entries(5, start_seq=900)])

    # 1. A data file named far ahead, and one for partition 1 at a high offset.
    for name in ("k-journal-p0-o5000-5004-1of1", "k-journal-p1-o7000-7004-1of1"):
        storage.put_new(DEFAULT_SPEC.file_path(planted_key, name), encode_parquet(far))
    # 2. A chain of its own, records and a checkpoint signed with another key.
    other = ManifestSigner.generate()
    forged_chain = "k-journal-p0-1-ffff"
    stored = storage.put_new(DEFAULT_SPEC.file_path(planted_key, "k-journal-p0-o9000-9004-1of1"),
                             encode_parquet(far))
    forged = ManifestLog(storage, forged_chain, other)
    forged.append(build_file_record(stored, far, "hot"))
    forged.checkpoint()
    # 3. An unsigned record appended to the real chain, and a checkpoint with a bad signature.
    real = log.chain_id
    stored = storage.put_new(DEFAULT_SPEC.file_path(planted_key, "k-journal-p0-o10-8000-1of1"),
                             encode_parquet(far))
    appended = ManifestLog(storage, real)  # no signer: what someone without the key can do
    head = appended.append(build_file_record(stored, far, "hot"))
    fake = Checkpoint(chain_id=real, length=head.index + 1, head_hash=head.record_hash,
                      time="2026-12-05T00:00:00+00:00", key_id=log.signer.key_id,
                      signature=base64.b64encode(other.sign(b"x")).decode())
    storage.put_new(checkpoint_path(real, head.index + 1), fake.to_json())

    after = recover_offsets(storage, TOPIC, [0, 1], key)
    assert after.next_offset == {0: 10}  # no skip on 0, nothing invented for 1
    # The planted 10..8000 name is only a cut hint: the sink rebuilds from Kafka, never skips.
    assert after.rebuild == {0: [(10, 8000)]}

    # 4. A signed record altered to claim a later chunk: the chain stops vouching there.
    first = record_path(real, 0)
    doc = json.loads(storage.read(first))
    doc["path"] = doc["path"].replace("-o0-9-", "-o0-99999-")
    (root / first).chmod(0o644)
    (root / first).write_bytes(json.dumps(doc, sort_keys=True, separators=(",", ":")).encode())
    altered = recover_offsets(storage, TOPIC, [0, 1], key)
    assert altered.next_offset == {}  # rewinds to Kafka's beginning, where rebuilding adopts


def test_a_planted_file_under_the_next_chunks_name_is_not_adopted(tmp_path):
    """Someone writes a file under the name the sink is about to use, with other entries: the
    sink writes its part beside it (``-r1``), records only its own, and verify names the
    stranger; nothing is lost."""
    root = tmp_path / "journal"
    sink, log, storage = _sink(root)
    messages = _messages(10, 0, 0)
    parts, _ = build_chunk_parts(TOPIC, 0, messages)
    planted = parts[0].table.slice(0, 9)  # 9 of the 10 rows ...
    planted = planted.set_column(planted.schema.get_field_index("decision"), "decision",
                                 _flip(planted.column("decision")))  # ... with altered decisions
    path = DEFAULT_SPEC.file_path(parts[0].key, str(parts[0].name))
    storage.put_new(path, encode_parquet(planted))
    _write_chunk(sink, 0, messages)
    log.checkpoint()
    assert sink.stats["existing_parts_foreign"] == 1
    beside = DEFAULT_SPEC.file_path(parts[0].key, str(dataclasses.replace(parts[0].name, retry=1)))
    assert storage.exists(beside)
    report = verify_journal(storage, public_key=_public_key(root))
    assert [p.path for p in report.errors if p.kind == "file-without-record"] == [path]
    assert recover_offsets(storage, TOPIC, [0], log.signer.public_key).next_offset == {0: 10}


def test_an_orphan_part_of_a_killed_run_is_adopted_and_signed(tmp_path):
    """The race of issue 15: a run writes a part and dies before its record. The next run
    rebuilds the chunk, finds the part holding exactly Kafka's entries, and records it."""
    root = tmp_path / "journal"
    sink, log, storage = _sink(root)
    _write_chunk(sink, 0, _messages(10, 0, 0))
    log.checkpoint()
    messages = _messages(10, 10, 10)
    parts, _ = build_chunk_parts(TOPIC, 0, messages)
    orphan = DEFAULT_SPEC.file_path(parts[0].key, str(parts[0].name))
    storage.put_new(orphan, encode_parquet(parts[0].table))  # written, never recorded: killed
    recovered = recover_offsets(storage, TOPIC, [0], log.signer.public_key)
    assert recovered.next_offset == {0: 10} and recovered.rebuild == {0: [(10, 19)]}
    restarted, log2, _ = _sink(root, chain="k-journal-p0-1-bbbb")
    _write_chunk(restarted, 0, messages)
    log2.checkpoint()
    assert restarted.stats["existing_parts_recorded"] == 1
    report = verify_journal(storage, public_key=_public_key(root))
    assert report.ok, format_report(report)
    assert report.files == 2


def _flip(column):
    return pa.array(["allow" if v == "block" else "block" for v in column.to_pylist()],
                    type=column.type)


# -- end to end: sink, compaction, restart ---------------------------------------------------


def _transport(bootstrap: str, tmp_path: Path, name: str) -> KafkaTransport:
    return KafkaTransport(KafkaSettings(
        bootstrap_servers=bootstrap, topic=TOPIC, enable_idempotence=False, client_id=name,
        spool_dir=str(tmp_path / f"spool-{name}"), send_timeout_s=2.0, request_timeout_ms=2000,
        retry_backoff_s=0.2, retry_backoff_max_s=1.0, shards_per_model=PARTITIONS))


def _send(transport: KafkaTransport, batches) -> None:
    for batch in batches:
        transport.send(batch)
    assert transport.flush(60)
    assert transport.counters()["dropped"] == {}


def _run_sink(bootstrap: str, journal: SinkSettings, storage, rows: int) -> KafkaSinkRunner:
    """Run a sink (its runner: signed chain, metrics) until the journal holds ``rows`` rows."""
    settings = KafkaSinkSettings(bootstrap_servers=bootstrap, topic=TOPIC,
                                 partitions=tuple(range(PARTITIONS)), roll_seconds=0.3)
    runner = KafkaSinkRunner(settings, journal)

    async def main() -> None:
        stop = asyncio.Event()
        await runner.start()
        task = asyncio.create_task(runner.run(stop))
        deadline = time.monotonic() + 90
        while await asyncio.to_thread(lambda: journal_table(storage).num_rows) < rows:
            assert time.monotonic() < deadline, runner.lag_state()
            assert not task.done(), task.result()
            await asyncio.sleep(0.2)  # polling pace of the check, not synchronisation
        stop.set()
        await task
    asyncio.run(main())
    return runner


def _compact_restart_scenario(bootstrap: str, tmp_path: Path, journal: SinkSettings,
                              public_key: str, witness=None) -> None:
    storage = journal.storage()
    transport = _transport(bootstrap, tmp_path, "a")
    first = [make_entries(600, producer_id=p, ts_step_us=20_000) for p in ("replica-a", "replica-b")]
    _send(transport, first)
    runner = _run_sink(bootstrap, journal, storage, 1_200)
    assert runner.metrics.totals()["serve_journal_sink_rows"] == {(): 1_200}
    sink_files = [f for f in storage.list_files(suffix=".parquet")
                  if ChunkFileName.parse(TOPIC, f.rsplit("/", 1)[-1])]
    assert sink_files

    report = run_compaction(journal.journal_uri, apply=True, settings=journal)
    assert report.compacted and not report.refused, report.describe()
    left = [f for f in storage.list_files(suffix=".parquet")
            if ChunkFileName.parse(TOPIC, f.rsplit("/", 1)[-1])]
    assert left == [], "compaction deleted the sink-named files"

    more = [make_entries(300, producer_id="replica-a", start_seq=600, ts_step_us=20_000)]
    _send(transport, more)
    transport.close(10)
    restarted = _run_sink(bootstrap, journal, storage, 1_500)
    assert restarted.sink.stats["parts_already_present"] == 0
    assert restarted.metrics.totals()["serve_journal_sink_rows"] == {(): 300}
    delivery = check_delivery(journal_table(storage), first + more)
    assert delivery.exactly_once, delivery.summary()
    verified = verify_journal(storage, public_key=public_key, witness=witness)
    assert verified.ok, format_report(verified)


def test_restart_after_compaction_resumes_without_duplicates(kafka_broker, tmp_path):
    kafka_broker.create_topic(TOPIC, PARTITIONS)
    root = tmp_path / "journal"
    journal = SinkSettings(str(root), dev_mode=True, checkpoint_interval_s=1.0)
    _compact_restart_scenario(kafka_broker.bootstrap, tmp_path, journal, _public_key(root))


@pytest.mark.slow  # over 1.5 s: kept out of the fast tier, runs in the full suite
def test_restart_after_compaction_on_s3(kafka_broker, s3_bucket, tmp_path, monkeypatch):
    server = s3_bucket.server
    for name, value in server.env.items():
        monkeypatch.setenv(name, value)
    endpoint = urlparse(server.endpoint_url)
    query = f"?endpoint_override={endpoint.netloc}&scheme={endpoint.scheme}"
    key_file, public = signing_key_files(tmp_path)
    kafka_broker.create_topic(TOPIC, PARTITIONS)
    journal = SinkSettings(f"s3://{s3_bucket.name}/journal{query}", signing_key_file=str(key_file),
                           checkpoint_interval_s=1.0, dev_mode=False)
    _compact_restart_scenario(kafka_broker.bootstrap, tmp_path, journal, str(public))
    assert open_storage(journal.journal_uri).list_files("_checkpoints")


def test_the_runner_records_rows_and_persistence_lag(tmp_path):
    """Metrics of a Kafka sink come from the files it makes durable: rows, bytes, and one lag
    observation per entry (entry time to durable)."""
    root = tmp_path / "journal"
    settings = KafkaSinkSettings(bootstrap_servers="127.0.0.1:1", topic=TOPIC, partitions=(0,))
    runner = KafkaSinkRunner(settings, SinkSettings(str(root), dev_mode=True))
    chunk = _Chunk()
    chunk.messages.extend(_messages(25))
    runner.sink._write_parts(0, chunk)
    totals = runner.metrics.totals()
    assert totals["serve_journal_sink_rows"] == {(): 25}
    assert totals["serve_journal_sink_bytes"][()] > 0
    assert totals["serve_journal_persistence_lag_ms"] == 25
    assert runner.metrics._base["deployment"] == "kafka-sink"


def _runner(root: Path) -> KafkaSinkRunner:
    settings = KafkaSinkSettings(bootstrap_servers="127.0.0.1:1", topic=TOPIC,
                                 partitions=tuple(range(PARTITIONS)))
    return KafkaSinkRunner(settings, SinkSettings(str(root), dev_mode=True))


@pytest.mark.parametrize(("forged_tail", "per"), [(False, 1), (True, 1), (False, 7), (True, 7)])
def test_the_next_run_signs_a_dead_runs_tail_only_when_it_re_derived_every_record(
        tmp_path, forged_tail, per):
    """A run killed after recording files but before signing them leaves an unsigned tail,
    which verify accepts only for 300 s. The next run rebuilds those chunks, adopts the files
    and, once each tail record matches a record of its own (signed), signs the dead tail. A
    record someone without the key appended to that tail keeps it unsigned (and reported).
    ``per``: entries a message carries (wire v2 carries many; offsets count messages)."""
    root = tmp_path / "journal"
    dead = _runner(root)
    _write_chunk(dead.sink, 0, _messages(10, 0, 0, per))
    dead.checkpoint()
    _write_chunk(dead.sink, 0, _messages(10, 10, 10 * per, per))  # recorded, then SIGKILL: never signed
    storage = dead.sink.storage
    if forged_tail:
        far = pa.Table.from_batches([make_entries(5, start_seq=500)])
        stored = storage.put_new(DEFAULT_SPEC.file_path(DEFAULT_SPEC.parse(
            storage.list_files(suffix=".parquet")[0])[1], "k-journal-p0-o20-24-1of1"),
            encode_parquet(far))
        ManifestLog(storage, dead.log.chain_id).append(build_file_record(stored, far, "hot"))
    later = dt.datetime.now(dt.UTC) + dt.timedelta(hours=1)  # past the unsigned grace period
    before = verify_journal(storage, public_key=_public_key(root), now=later)
    assert "chain-tail-unsigned" in {p.kind for p in before.errors}

    restarted = _runner(root)
    restarted._tails = unsigned_tails(storage, TOPIC, range(PARTITIONS),
                                      restarted.log.signer.public_key, restarted.log.chain_id)
    assert restarted._tails == {dead.log.chain_id: 1}
    recovered = recover_offsets(storage, TOPIC, range(PARTITIONS), restarted.log.signer.public_key)
    assert recovered.next_offset[0] == 10 and recovered.rebuild[0][0] == (10, 19)
    _write_chunk(restarted.sink, 0, _messages(10, 10, 10 * per, per))  # the rebuild: adopted
    if forged_tail:
        _write_chunk(restarted.sink, 0, _messages(5, 20, 6000, per))  # Kafka's 20..24: other entries
    restarted.checkpoint()
    assert restarted.sink.stats["existing_parts_recorded"] == 1
    assert restarted.sink.stats["rows_written"] == (5 * per if forged_tail else 0)  # none twice
    after = verify_journal(storage, public_key=_public_key(root), now=later)
    if forged_tail:
        assert restarted._tails  # not signed: its record 2 is no file this run re-derived
        assert "chain-tail-unsigned" in {p.kind for p in after.errors}
    else:
        assert not restarted._tails
        assert after.ok, format_report(after)
