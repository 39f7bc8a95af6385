"""Transport -> tansu broker -> KafkaSink -> Parquet, with real faults: exactly once, or caught.

Every scenario checks the journal with ``check_delivery`` (by request id and by
(producer_id, seq)); the control run shows that this check does report loss when the sink is
configured unsafely.
"""

from __future__ import annotations

import asyncio
import itertools
import os
import random
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from serve_journal.catalog.layout import DEFAULT_SPEC
from serve_journal.read.verify import format_report, verify_journal
from serve_journal.schema import ENTRY_SCHEMA
from serve_journal.sink.kafka import (
    MAX_READY_CHUNKS,
    ChunkFileName,
    KafkaSink,
    KafkaSinkSettings,
    parse_partitions,
    recover_offsets,
)
from serve_journal.sink.kafka_app import KafkaSinkActor, sink_manifest_hook
from serve_journal.sink.writer import synthetic_entries, warm_up
from serve_journal.storage import LocalJournalStorage
from serve_journal.transport.kafka import KafkaSettings, KafkaTransport
from tests.fixtures.kafka import check_delivery, journal_table, make_entries, wait_for

pytestmark = pytest.mark.timeout(300)

TOPIC = "journal"
PARTITIONS = 4


def _transport(bootstrap: str, tmp_path: Path, name: str) -> KafkaTransport:
    return KafkaTransport(KafkaSettings(
        bootstrap_servers=bootstrap, topic=TOPIC, enable_idempotence=False, client_id=name,
        spool_dir=str(tmp_path / f"spool-{name}"), send_timeout_s=2.0, request_timeout_ms=2000,
        retry_backoff_s=0.2, retry_backoff_max_s=1.0, shards_per_model=PARTITIONS))


def _sink_settings(bootstrap: str, **overrides) -> KafkaSinkSettings:
    values = dict(bootstrap_servers=bootstrap, topic=TOPIC, partitions=tuple(range(PARTITIONS)),
                  roll_seconds=0.3, write_retry_backoff_s=0.1, write_retry_backoff_max_s=0.5)
    values.update(overrides)
    return KafkaSinkSettings(**values)


def _rows(storage) -> int:
    return journal_table(storage).num_rows


class RowCounter:
    """Rows in a journal's files, from their Parquet footers, each file read once (files are
    create-only): a wait that polls it every half second does not starve the sink it waits on."""

    def __init__(self, storage) -> None:
        self.storage = storage
        self._rows: dict[str, int] = {}

    def __call__(self) -> int:
        for path in self.storage.list_files(suffix=".parquet"):
            if path not in self._rows:
                data = self.storage.read(path)
                self._rows[path] = pq.ParquetFile(pa.BufferReader(data)).metadata.num_rows
        return sum(self._rows.values())


async def _drive(sink: KafkaSink, until, timeout: float, start: bool = True) -> None:
    """Poll ``sink`` until ``until()`` holds (checked every few polls); fail after ``timeout``."""
    if start:
        await sink.start()
    deadline = time.monotonic() + timeout
    polls = 0
    while True:
        await sink.poll_once()
        polls += 1
        if polls % 5 == 0 and await asyncio.to_thread(until):
            return
        if time.monotonic() > deadline:
            raise AssertionError(f"sink did not get there within {timeout}s: {sink.lag_state()}")


def _send(transport: KafkaTransport, batches) -> None:
    for batch in batches:
        transport.send(batch)
    assert transport.flush(60)
    assert transport.counters()["dropped"] == {}


def test_parse_partitions():
    assert parse_partitions("0-3,7") == (0, 1, 2, 3, 7)
    with pytest.raises(ValueError, match="partitions"):
        parse_partitions("a-b")


def test_roll_counts_from_when_the_first_message_was_sent(tmp_path):
    sink = KafkaSink(_sink_settings("127.0.0.1:1", roll_seconds=1.0, roll_bytes=10_000),
                     LocalJournalStorage(str(tmp_path)))
    sent_at = 1_000_000.0  # wall clock, seconds
    sink._add(0, 0, b"x" * 100, (), timestamp_ms=int(sent_at * 1000))
    chunk = sink._chunks[0]
    born = chunk.born
    assert chunk.first_sent == sent_at
    # Received 0.7 s after it was sent: due 0.3 s later, not a whole roll_seconds later.
    assert not sink.chunk_due(chunk, born + 0.29, sent_at + 0.99)
    assert sink.chunk_due(chunk, born + 0.30, sent_at + 1.0)
    # A producer clock far behind: still at least roll_seconds / 4 of consuming.
    assert not sink.chunk_due(chunk, born + 0.2, sent_at + 60)
    assert sink.chunk_due(chunk, born + 0.26, sent_at + 60)
    # No timestamp, or a producer clock ahead: roll_seconds after it arrived; size rolls too.
    chunk.first_sent = None
    assert not sink.chunk_due(chunk, born + 0.99, sent_at + 60)
    assert sink.chunk_due(chunk, born + 1.01, sent_at + 60)
    chunk.nbytes = 10_000
    assert sink.chunk_due(chunk, born, sent_at)


def test_a_drained_partitions_chunk_rolls_at_half_the_age(tmp_path):
    """Nothing more came in the last poll: the chunk is written at roll_seconds / 2 (persistence
    latency), not before (files do not shrink to one message each)."""
    sink = KafkaSink(_sink_settings("127.0.0.1:1", roll_seconds=1.0, roll_bytes=10_000),
                     LocalJournalStorage(str(tmp_path)))
    sent_at = 1_000_000.0
    sink._add(0, 0, b"x" * 100, (), timestamp_ms=int(sent_at * 1000))
    chunk = sink._chunks[0]
    born = chunk.born
    assert not sink.chunk_due(chunk, born + 0.1, sent_at + 0.1, drained=True)
    assert not sink.chunk_due(chunk, born + 0.49, sent_at + 0.49, drained=False)
    assert sink.chunk_due(chunk, born + 0.5, sent_at + 0.5, drained=True)
    # Sent 0.4 s before it arrived: due 0.1 s after arrival, at half the age, when drained.
    assert not sink.chunk_due(chunk, born + 0.05, sent_at + 0.45, drained=True)
    assert sink.chunk_due(chunk, born + 0.13, sent_at + 0.53, drained=True)


def test_end_to_end_exactly_once_and_restart_resumes(kafka_broker, tmp_path):
    kafka_broker.create_topic(TOPIC, PARTITIONS)
    storage = LocalJournalStorage(str(tmp_path / "journal"))
    a, b = _transport(kafka_broker.bootstrap, tmp_path, "a"), _transport(kafka_broker.bootstrap, tmp_path, "b")
    # 20 ms apart: the run crosses 11:00 UTC, so two journal partitions (hours) per model
    sent = [make_entries(1_500, producer_id=p, start_seq=i * 1_500, ts_step_us=20_000)
            for i in range(2) for p in ("replica-a", "replica-b")]
    _send(a, sent[0::2])
    _send(b, sent[1::2])
    written = []
    sink = KafkaSink(_sink_settings(kafka_broker.bootstrap), storage,
                     on_file_written=lambda stored, table: written.append((stored, table.num_rows)))

    async def scenario():
        try:
            await _drive(sink, lambda: _rows(storage) >= 6_000, 90)
        finally:
            await sink.stop()
    asyncio.run(scenario())

    report = check_delivery(journal_table(storage), sent)
    assert report.exactly_once, report.summary()
    files = storage.list_files(suffix=".parquet")
    assert {DEFAULT_SPEC.parse(f)[1].hour for f in files} == {10, 11}
    for path in files:
        assert ChunkFileName.parse(TOPIC, path.rsplit("/", 1)[-1]) is not None, path
    assert sorted(s.path for s, _ in written) == files
    assert sum(n for _, n in written) == 6_000

    # A new sink (a restart) resumes where the files end: it rewrites nothing, loses nothing.
    recovered = recover_offsets(storage, TOPIC, range(PARTITIONS))
    assert recovered.rebuild_until == {}
    assert recovered.next_offset == sink.next_offsets
    more = [make_entries(300, producer_id="replica-a", start_seq=3_000, ts_step_us=20_000)]
    _send(a, more)
    restarted = KafkaSink(_sink_settings(kafka_broker.bootstrap), storage)

    async def again():
        try:
            await _drive(restarted, lambda: _rows(storage) >= 6_300, 90)
        finally:
            await restarted.stop()
    asyncio.run(again())
    assert restarted.stats["parts_already_present"] == 0
    report = check_delivery(journal_table(storage), sent + more)
    assert report.exactly_once, report.summary()
    a.close(10)
    b.close(10)


@pytest.mark.slow  # over 1.5 s: kept out of the fast tier, runs in the full suite
def test_half_written_chunk_is_rebuilt_with_the_same_names(kafka_broker, tmp_path):
    kafka_broker.create_topic(TOPIC, PARTITIONS)
    storage = LocalJournalStorage(str(tmp_path / "journal"))
    transport = _transport(kafka_broker.bootstrap, tmp_path, "a")
    sent = [make_entries(2_000, ts_step_us=40_000)]  # 80 s: every chunk spans two hours
    _send(transport, sent)
    transport.close(10)
    # one chunk per partition: everything is in Kafka before the sink starts
    settings = _sink_settings(kafka_broker.bootstrap, roll_seconds=3.0)
    sink = KafkaSink(settings, storage)

    async def scenario(s):
        try:
            await _drive(s, lambda: _rows(storage) >= 2_000, 90)
        finally:
            await s.stop()
    asyncio.run(scenario(sink))
    files = storage.list_files(suffix=".parquet")
    second_parts = [f for f in files if f.endswith("-2of2.parquet")]
    assert second_parts, files
    # A crash between the two parts' writes leaves exactly this: part 1 present, part 2 absent.
    for path in second_parts:
        storage.delete(path)
    recovered = recover_offsets(storage, TOPIC, range(PARTITIONS))
    assert len(recovered.rebuild_until) == len(second_parts)
    # The first run kept no manifest, as if it died before recording anything: the rebuilding
    # run must record the parts it finds as well as those it writes, or verify flags them.
    log, hook = sink_manifest_hook(str(tmp_path / "journal"), TOPIC, tuple(range(PARTITIONS)))
    rebuilt = KafkaSink(settings, storage, on_file_written=hook)
    asyncio.run(scenario(rebuilt))
    log.checkpoint()
    assert sorted(storage.list_files(suffix=".parquet")) == sorted(files)  # same names again
    assert rebuilt.stats["parts_already_present"] == len(second_parts)
    assert rebuilt.stats["existing_parts_recorded"] == len(second_parts)
    report = check_delivery(journal_table(storage), sent)
    assert report.exactly_once, report.summary()
    verified = verify_journal(storage, public_key=str(tmp_path / "journal-signing" / "manifest-signing.pub.pem"))
    assert verified.files == len(files)
    assert not [p for p in verified.errors if p.kind == "file-without-record"], format_report(verified)


def test_sink_actor_records_every_file_in_its_manifest(kafka_broker, tmp_path):
    """The Ray actor flavour (its body, driven here without Ray) runs through the one runner:
    exactly once, and every file has a record in a checkpointed manifest chain."""
    kafka_broker.create_topic(TOPIC, PARTITIONS)
    root = tmp_path / "journal"
    storage = LocalJournalStorage(str(root))
    transport = _transport(kafka_broker.bootstrap, tmp_path, "a")
    sent = [make_entries(1_000, ts_step_us=40_000)]  # 40 s: crosses 11:00, two hour partitions
    _send(transport, sent)
    transport.close(10)
    actor = KafkaSinkActor(_sink_settings(kafka_broker.bootstrap), str(root))

    async def scenario():
        offsets = await actor.start()
        assert sorted(offsets) == list(range(PARTITIONS))
        deadline = time.monotonic() + 90
        while await asyncio.to_thread(_rows, storage) < 1_000:
            assert time.monotonic() < deadline, await actor.stats()
            await asyncio.sleep(0.1)  # polling pace
        await actor.stop()
    asyncio.run(scenario())
    report = check_delivery(journal_table(storage), sent)
    assert report.exactly_once, report.summary()
    files = storage.list_files(suffix=".parquet")
    verified = verify_journal(storage, public_key=str(tmp_path / "journal-signing" / "manifest-signing.pub.pem"))
    assert verified.files == len(files) >= 2
    assert verified.ok, format_report(verified)


def _break_storage(root: Path) -> Path:
    """A real filesystem fault: the journal root becomes a regular file, so every create fails."""
    away = root.with_name(root.name + ".away")
    root.rename(away)
    root.write_bytes(b"not a directory")
    return away


def _repair_storage(root: Path, away: Path) -> None:
    root.unlink()
    away.rename(root)


def test_storage_failing_writes_then_recovering_loses_nothing(kafka_broker, tmp_path):
    kafka_broker.create_topic(TOPIC, PARTITIONS)
    root = tmp_path / "journal"
    storage = LocalJournalStorage(str(root))
    transport = _transport(kafka_broker.bootstrap, tmp_path, "a")
    first = [make_entries(500)]
    _send(transport, first)
    sink = KafkaSink(_sink_settings(kafka_broker.bootstrap), storage)

    async def scenario():
        try:
            await _drive(sink, lambda: _rows(storage) >= 500, 60)
            away = _break_storage(root)
            second = [make_entries(700, start_seq=500)]
            await asyncio.to_thread(_send, transport, second)
            await _drive(sink, lambda: sink.stats["write_failures"] >= 3, 60, start=False)
            _repair_storage(root, away)
            await _drive(sink, lambda: _rows(storage) >= 1_200, 60, start=False)
            return second
        finally:
            await sink.stop()
    second = asyncio.run(scenario())
    assert sink.stats["write_failures"] >= 3
    report = check_delivery(journal_table(storage), first + second)
    assert report.exactly_once, report.summary()
    transport.close(10)


class SlowFirstWrite(LocalJournalStorage):
    """Local storage whose first file write blocks until the test releases it."""

    def __init__(self, root: str) -> None:
        super().__init__(root)
        self.entered = threading.Event()
        self.release = threading.Event()
        self._first = True

    def put_new(self, relative: str, data: bytes):
        if self._first and relative.endswith(".parquet"):
            self._first = False
            self.entered.set()
            if not self.release.wait(60):
                raise TimeoutError("the test never released the first write")
        return super().put_new(relative, data)


def test_sink_consumes_while_a_chunk_is_written_and_bounds_what_waits(kafka_broker, tmp_path):
    """While a chunk's file is being written (here: blocked), the sink goes on consuming, so the
    next chunks fill and close meanwhile; at most MAX_READY_CHUNKS per partition wait (memory),
    the rest stays in Kafka. Released, everything lands exactly once, in offset order."""
    kafka_broker.create_topic(TOPIC, PARTITIONS)
    (tmp_path / "journal").mkdir()  # counted from the moment of release, when no file exists yet
    storage = SlowFirstWrite(str(tmp_path / "journal"))
    transport = _transport(kafka_broker.bootstrap, tmp_path, "a")
    # roll_bytes of a few entries: every message arriving in a fetch of its own is its own chunk.
    sink = KafkaSink(_sink_settings(kafka_broker.bootstrap, roll_bytes=2_000), storage)
    batches = [make_entries(200, start_seq=200 * i) for i in range(5)]
    most_waiting = []

    async def scenario():
        await sink.start()
        run = asyncio.create_task(sink.run(stop))
        try:
            await asyncio.to_thread(_send, transport, batches[:1])
            assert await asyncio.to_thread(storage.entered.wait, 60), "no write started"
            for batch in batches[1:]:
                await asyncio.to_thread(_send, transport, [batch])
            # The write is still blocked, and the sink consumed on: chunks closed behind it ...
            deadline = time.monotonic() + 60
            while max(most_waiting, default=0) < MAX_READY_CHUNKS:
                assert time.monotonic() < deadline, f"no chunk closed behind the write: {most_waiting}"
                await asyncio.sleep(0.02)
                most_waiting.append(max(len(q) for q in sink._ready.values()))
            # ... but no more than MAX_READY_CHUNKS per partition, however long the write takes.
            for _ in range(25):
                await asyncio.sleep(0.02)
                most_waiting.append(max(len(q) for q in sink._ready.values()))
            assert not storage.release.is_set() and not run.done()
            assert max(most_waiting) == MAX_READY_CHUNKS, most_waiting
            storage.release.set()
            deadline = time.monotonic() + 60
            while await asyncio.to_thread(_rows, storage) < 1_000:
                assert time.monotonic() < deadline, sink.lag_state()
                await asyncio.sleep(0.2)
        finally:
            storage.release.set()
            stop.set()
            await run
            await sink.stop()

    stop = asyncio.Event()
    asyncio.run(scenario())
    report = check_delivery(journal_table(storage), batches)
    assert report.exactly_once, report.summary()
    # Per Kafka partition, the chunk files cover consecutive offsets: none skipped, none twice.
    covered: dict[int, list[tuple[int, int]]] = {}
    for path in storage.list_files(suffix=".parquet"):
        name = ChunkFileName.parse(TOPIC, path.rsplit("/", 1)[-1])
        covered.setdefault(name.partition, []).append((name.start, name.end))
    for ranges in covered.values():
        ranges = sorted(set(ranges))
        assert ranges[0][0] == 0 and all(b[0] == a[1] + 1 for a, b in itertools.pairwise(ranges)), ranges
    transport.close(10)


def test_sink_warm_up_stores_nothing(tmp_path, caplog):
    """The start-up warm-up encodes one synthetic entry in memory: no file, no record; and it
    runs through (a failing warm-up only logs a warning, so the warning is what is checked)."""
    storage = LocalJournalStorage(str(tmp_path / "journal"))
    written = []
    sink = KafkaSink(_sink_settings("127.0.0.1:1"), storage,
                     on_file_written=lambda stored, table: written.append(stored))
    with caplog.at_level("WARNING", logger="serve_journal"):
        sink.warm_up()
        warm_up()
    assert not [r for r in caplog.records if "warming up" in r.getMessage()], caplog.text
    assert written == [] and not list((tmp_path / "journal").rglob("*"))
    entries = synthetic_entries()
    assert entries.schema == ENTRY_SCHEMA and entries.num_rows == 1


@pytest.mark.slow  # over 1.5 s: kept out of the fast tier, runs in the full suite
def test_control_unsafe_commit_before_write_is_caught_losing_entries(kafka_broker, tmp_path):
    """Same fault, but the sink commits before writing and trusts Kafka's offsets: loss, detected."""
    kafka_broker.create_topic(TOPIC, PARTITIONS)
    root = tmp_path / "journal"
    storage = LocalJournalStorage(str(root))
    transport = _transport(kafka_broker.bootstrap, tmp_path, "a")
    unsafe = _sink_settings(kafka_broker.bootstrap, offset_source="kafka", unsafe_commit_before_write=True,
                            group_id="unsafe-control")
    first = [make_entries(500)]
    _send(transport, first)
    second = [make_entries(700, start_seq=500)]
    marker = [make_entries(50, start_seq=1_200)]
    sink = KafkaSink(unsafe, storage)

    async def crash_during_outage():
        await _drive(sink, lambda: _rows(storage) >= 500, 60)
        away = _break_storage(root)
        await asyncio.to_thread(_send, transport, second)
        await _drive(sink, lambda: sink.stats["write_failures"] >= 1, 60, start=False)
        await sink.stop()  # the crash: chunks in memory are gone, their offsets committed
        _repair_storage(root, away)
    asyncio.run(crash_during_outage())
    _send(transport, marker)
    restarted = KafkaSink(unsafe, storage)

    def marker_written() -> bool:
        ids = set(journal_table(storage).column("request_id").to_pylist())
        return set(marker[0].column("request_id").to_pylist()) <= ids

    async def resume():
        try:
            await _drive(restarted, marker_written, 60)
        finally:
            await restarted.stop()
    asyncio.run(resume())
    report = check_delivery(journal_table(storage), first + second + marker)
    assert not report.exactly_once
    assert report.missing_request_ids  # the checker catches the loss
    assert not report.duplicate_request_ids
    transport.close(10)


class SinkProcess:
    """The ``serve-journal sink`` command as a child process, killed by its pid."""

    def __init__(self, bootstrap: str, journal: Path, log: Path) -> None:
        self.args = [sys.executable, "-m", "serve_journal.cli", "sink", "--bootstrap", bootstrap,
                     "--topic", TOPIC, "--partitions", f"0-{PARTITIONS - 1}", "--journal", str(journal),
                     "--roll-seconds", "0.2"]
        self.log = log
        self.proc: subprocess.Popen | None = None

    def start(self) -> None:
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen(self.args, stdout=log, stderr=subprocess.STDOUT,
                                         cwd=str(Path(__file__).parents[1]))

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGKILL)
            self.proc.wait(timeout=10)

    def terminate(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.kill()


class Load:
    """A background producer: batches of ``size`` entries every ``interval`` seconds."""

    def __init__(self, transport: KafkaTransport, size: int = 100, interval: float = 0.05) -> None:
        self.transport, self.size, self.interval = transport, size, interval
        # Build one batch here first: its lazy imports (numpy.ma) run inspect -> ast.parse, and
        # CPython 3.11.7 corrupts its AST recursion counter when two threads parse at once.
        make_entries(1)
        self.sent: list = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        seq = 0
        while not self._stop.is_set():
            batch = make_entries(self.size, start_seq=seq, ts_step_us=5_000)
            self.transport.send(batch)
            self.sent.append(batch)
            seq += self.size
            self._stop.wait(self.interval)  # pacing of the load, not synchronisation

    def start(self) -> Load:
        self._thread.start()
        return self

    def stop(self) -> list:
        self._stop.set()
        self._thread.join(10)
        return self.sent

    @property
    def entries(self) -> int:
        return len(self.sent) * self.size


def _file_count(root: Path) -> int:
    return sum(1 for _ in root.rglob("k-*.parquet")) if root.is_dir() else 0


def run_sink_kill_scenario(bootstrap: str, tmp_path: Path, kills: int = 2,
                           seed: int = 0) -> tuple[list, Path]:
    """The ``serve-journal sink`` process under load, killed with SIGKILL ``kills`` times at
    whatever point of a chunk it happens to be, restarted each time; returns the batches sent
    and the journal root once every entry is in it. (The soak script runs this 20 times.)

    Each kill comes 0-8 s (from ``seed``) after the sink writes: before or after its first
    checkpoint (every 5 s), so a restart finds unsigned files only, or signed progress with
    an orphan or unsigned tail after it."""
    rng = random.Random(seed)
    root = tmp_path / "journal"
    transport = _transport(bootstrap, tmp_path, "a")
    sink = SinkProcess(bootstrap, root, tmp_path / "sink.log")
    # 1,000 entries/s: a rate a sink keeps up with on two oversubscribed cores, so every run
    # ends with the journal complete; small chunks give many write-then-record windows to die in.
    load = Load(transport, size=50, interval=0.05).start()
    try:
        sink.start()
        wait_for(lambda: _file_count(root) >= 6, 120, message="sink writing files")
        for kill in range(kills):
            time.sleep(rng.uniform(0, 8))  # when the fault strikes, not a wait for state
            sink.kill()  # kill -9, at whatever point of a chunk it happens to be
            killed_at, entries = _file_count(root), load.entries
            wait_for(lambda e=entries: load.entries >= e + 500, 60,
                     message="more load while the sink is down")
            sink.start()
            # Killed again (or finished) once it writes new files: a start-up under load takes
            # seconds, and its first files may be the dead run's, adopted under their names.
            wait_for(lambda k=killed_at: _file_count(root) > k + 1, 180,
                     message=f"restart {kill + 1} writing")
        sent = load.stop()
        assert transport.flush(60)
        total = sum(b.num_rows for b in sent)
        rows = RowCounter(LocalJournalStorage(str(root)))
        wait_for(lambda: rows() >= total, 180, interval=0.5, message="every entry written")
    finally:
        load.stop()
        sink.terminate()  # SIGTERM: the last run checkpoints its chain
        transport.close(10)
    return sent, root


def check_sink_kill_outcome(sent: list, root: Path) -> tuple[bool, str]:
    """Exactly once, and verify clean (no error: every file recorded under a signature, no
    sequence gap); ``(ok, summary)``."""
    storage = LocalJournalStorage(str(root))
    delivery = check_delivery(journal_table(storage), sent)
    verified = verify_journal(storage, public_key=str(root.parent / "journal-signing" / "manifest-signing.pub.pem"))
    summary = (f"{delivery.summary()}; files {verified.files}, records {verified.records}, "
               f"errors {len(verified.errors)}")
    if not verified.ok:
        summary += "\n" + format_report(verified)
    return delivery.exactly_once and verified.ok, summary


@pytest.mark.slow  # over 6 s: kept out of the fast tier, runs in the full suite
@pytest.mark.timeout(900)  # start-ups under a loaded machine's soak take tens of seconds each
@pytest.mark.parametrize("run", range(int(os.environ.get("SERVE_JOURNAL_SOAK_RUNS", "1"))))
def test_sink_killed_mid_batch_and_restarted(kafka_broker, tmp_path, run):
    """SIGKILL twice under load: nothing lost or doubled, and verify clean: a file the killed
    run wrote but never recorded (or never signed) is adopted by the next run.
    ``SERVE_JOURNAL_SOAK_RUNS=20`` runs it 20 times (``scripts/soak-sink-kill.sh``)."""
    kafka_broker.create_topic(TOPIC, PARTITIONS)
    sent, root = run_sink_kill_scenario(kafka_broker.bootstrap, tmp_path, seed=run)
    ok, summary = check_sink_kill_outcome(sent, root)
    assert ok, summary


@pytest.mark.slow  # a 20 s outage by design
def test_broker_stopped_for_20s_under_load(kafka_broker_durable, tmp_path):
    broker = kafka_broker_durable
    broker.create_topic(TOPIC, PARTITIONS)
    root = tmp_path / "journal"
    transport = _transport(broker.bootstrap, tmp_path, "a")
    sink = SinkProcess(broker.bootstrap, root, tmp_path / "sink.log")
    load = Load(transport, size=100, interval=0.05).start()
    try:
        sink.start()
        wait_for(lambda: _file_count(root) >= 4, 60, message="sink writing before the outage")
        broker.stop()
        outage_started = time.monotonic()
        wait_for(lambda: transport.counters()["spooled"] > 0, 30, message="entries spooled")
        # The outage lasts 20 s of continuous load; the condition is the clock itself.
        wait_for(lambda: time.monotonic() - outage_started >= 20, 40, interval=0.5, message="20 s outage")
        spooled_during = transport.counters()["spooled"]
        broker.start()
        wait_for(lambda: transport.counters()["drained"] >= spooled_during, 120, interval=0.2,
                 message="spool drained after the outage")
        sent = load.stop()
        assert transport.wait_drained(120)
        counters = transport.counters()
        assert counters["dropped"] == {} and counters["spool_records"] == 0
        total = sum(b.num_rows for b in sent)
        storage = LocalJournalStorage(str(root))
        wait_for(lambda: _rows(storage) >= total, 120, interval=0.5, message="every entry written")
    finally:
        load.stop()
        sink.terminate()
        transport.close(10)
    print(f"outage run: {total} entries, counters {counters}")
    report = check_delivery(journal_table(storage), sent)
    assert report.exactly_once, report.summary()
    assert counters["spooled"] > 0 and counters["drained"] == counters["spooled"]


def test_sink_replica_killed_by_sigkill_is_restarted_by_serve(serve_instance, kafka_broker, tmp_path):
    """kill -9 of the Ray actor running a sink (the Serve app of deployments/kafka-sink.yaml):
    Serve starts a new replica, which resumes from the files in storage; nothing lost, nothing
    duplicated, and every file has a manifest record."""
    from ray import serve

    from serve_journal.sink.kafka_app import app_builder

    kafka_broker.create_topic(TOPIC, PARTITIONS)
    root = tmp_path / "journal"
    transport = _transport(kafka_broker.bootstrap, tmp_path, "a")
    status = serve.run(app_builder({
        "bootstrap": kafka_broker.bootstrap, "topic": TOPIC, "partitions": f"0-{PARTITIONS - 1}",
        "journal_uri": str(root), "roll_seconds": "0.2", "num_cpus": "0"}),
        name="kafka-sink-kill", route_prefix="/kafka-sink-kill")

    def sink_state() -> dict:
        return status.remote(None).result(timeout_s=30)["sinks"][0]

    load = Load(transport, size=200, interval=0.02).start()
    try:
        wait_for(lambda: _file_count(root) >= 6, 90, message="sink replica writing files")
        victim = sink_state()["pid"]
        os.kill(victim, signal.SIGKILL)  # the actor's worker process, mid-batch or not
        killed_at = _file_count(root)

        def restarted() -> bool:
            try:
                return sink_state()["pid"] != victim
            except Exception:  # noqa: BLE001 - the old replica is gone until Serve replaces it
                return False

        wait_for(restarted, 120, interval=0.5, message="Serve restarted the sink replica")
        wait_for(lambda: _file_count(root) > killed_at + 4, 60, message="new replica writing")
        sent = load.stop()
        assert transport.flush(60)
        total = sum(b.num_rows for b in sent)
        storage = LocalJournalStorage(str(root))
        wait_for(lambda: _rows(storage) >= total, 90, interval=0.5, message="every entry written")
    finally:
        load.stop()
        serve.delete("kafka-sink-kill")  # the replica checkpoints its manifest chain on the way out
        transport.close(10)
    report = check_delivery(journal_table(storage), sent)
    assert report.exactly_once, report.summary()
    verified = verify_journal(storage, public_key=str(tmp_path / "journal-signing" / "manifest-signing.pub.pem"))
    assert verified.files == _file_count(root)
    assert verified.ok, format_report(verified)
