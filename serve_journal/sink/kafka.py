"""The Kafka sink: journal entries from manually assigned Kafka partitions to Parquet, exactly once.

Each sink owns a fixed set of partitions of the topic (manual assignment; no consumer-group
rebalancing). Messages of one Kafka partition are collected into a *chunk* until it holds
``roll_bytes`` of values or is ``roll_seconds`` old; a chunk covering offsets ``S..E`` is written
as one Parquet file per journal partition (model, hour) it touches, named deterministically::

    <tier>/model=<m>/date=<d>/hour=<h>/k-<topic>-p<partition>-o<S>-<E>-<i>of<n>.parquet

and stored create-only (``JournalStorage.put_new``: exclusive create locally, If-None-Match on
S3). Why this is exactly once:

* **No loss.** The next offset of a partition is recovered from the journal, not from Kafka:
  from the sink's *signed* manifest records (:mod:`serve_journal.sink.offsets`), which
  compaction never deletes; it is ``E + 1`` of the newest chunk whose ``n`` parts are all
  recorded under a valid signature. Kafka commits happen after the durable write and serve lag
  monitoring only. Nothing written by someone without the signing key moves a sink forward.
* **No duplicate.** A chunk written (wholly or partly) by a run that died before its records
  were signed is rebuilt on restart from the same offsets ``S..E``, cut where the file names in
  storage say that run cut it: the same messages give the same parts with the same names.
  Create-only refuses to overwrite an existing part; the sink *adopts* it (records it in its own
  chain) when it holds exactly the entries Kafka has at those offsets, so a killed run's orphan
  file gets its signed record. An existing file that holds anything else (altered or planted) is
  not adopted: the part is written beside it as ``...-<i>of<n>-r1`` and verify reports the
  stranger. Duplicate *messages* (the transport is at-least-once: a batch that timed out may be
  resent from its spool) are dropped by ``(producer_id, seq)`` within a chunk and against a
  window of recently written entries.

Rows are split by journal partition with :func:`serve_journal.catalog.layout.split_by_partition`
and every part is encoded and stored create-only by the shared
:class:`~serve_journal.sink.writer.PartitionFileWriter`, under its chunk file name. This module is
the consumer logic only; ``sink/kafka_app.py`` runs a sink (the ``serve-journal sink`` command,
the Serve application, a Ray actor) with the manifest records of every file it writes.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import dataclasses
import hashlib
import logging
import re
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import pyarrow as pa

from serve_journal.catalog.layout import (
    DEFAULT_SPEC,
    PartitionKey,
    PartitionSpec,
    split_by_partition,
)
from serve_journal.fileformat import HOT_OPTIONS, ParquetOptions, decode_parquet
from serve_journal.integrity.fingerprint import fingerprint
from serve_journal.integrity.merkle import table_leaf_hashes
from serve_journal.retry import Backoff
from serve_journal.schema import ENTRY_SCHEMA, conform_entries
from serve_journal.sink.offsets import ChunkFileName, RecoveredOffsets, recover_offsets
from serve_journal.sink.writer import PartitionFileWriter, synthetic_entries, warm_up
from serve_journal.storage import JournalStorage, ObjectExistsError, StoredObject
from serve_journal.transport import wire
from serve_journal.transport.kafka_security import KafkaSecurity

logger = logging.getLogger(__name__)

SinkFileHook = Callable[[StoredObject, pa.Table], None]
RowsHook = Callable[[StoredObject, pa.Table], None]
"""``on_file_written(stored, table)`` of a sink: each file it wrote, or found written by a run
that died before recording it (for manifest records)."""

MAX_RETRY_NAMES = 8
"""How many ``-r<n>`` names a part may try before the sink gives up on it (retried, loudly)."""

REBUILD_SLACK = 4
"""A chunk being rebuilt to a cut found in storage is given up (cut normally) past this many
times ``roll_bytes``: a planted name must not make a sink hold the whole topic in memory."""

OFFSET_SOURCES = ("storage", "kafka")

MAX_READY_CHUNKS = 2
"""Closed chunks of a partition waiting to be written before the sink stops fetching it (memory:
at most this many plus the open one, each up to ``roll_bytes``)."""
FETCH_WHILE_WRITING_MS = 20
"""A fetch's longest wait while a chunk is being written (how late the next write may start)."""

DEFAULT_ROLL_SECONDS = 0.4
"""A chunk's age limit. Below the actor writers' 0.5 s: the broker hop takes part of the 1 s budget."""


@dataclass(frozen=True)
class KafkaSinkSettings(KafkaSecurity):
    """What a sink consumes and how it rolls files."""

    bootstrap_servers: str
    topic: str
    partitions: tuple[int, ...]
    group_id: str | None = None
    """Consumer group used only to commit offsets for lag monitoring; default per topic."""
    roll_seconds: float = DEFAULT_ROLL_SECONDS
    roll_bytes: int = 16 * 1024 * 1024
    max_poll_records: int = 10_000
    poll_timeout_ms: int = 100
    fetch_max_wait_ms: int = 100
    """How long the broker may hold a fetch that has no data yet (aiokafka's default, 500 ms,
    would add up to half a second to the persistence latency of a quiet partition)."""
    write_retry_backoff_s: float = 0.25
    write_retry_backoff_max_s: float = 5.0
    dedupe_window: int = 1_000_000
    """How many recently written ``(producer_id, seq)`` pairs are remembered to drop duplicates."""
    parquet: ParquetOptions = HOT_OPTIONS
    offset_source: str = "storage"
    """``storage`` (exactly once). ``kafka`` trusts committed offsets: only for the control test."""
    unsafe_commit_before_write: bool = False
    """Commit to Kafka *before* the durable write. Loses entries on a crash; control test only."""

    def __post_init__(self) -> None:
        if not isinstance(self.topic, str) or not re.fullmatch(r"[A-Za-z0-9._\-]+", self.topic):
            raise ValueError(f"topic must be a Kafka topic name of [A-Za-z0-9._-], got {self.topic!r}")
        parts = tuple(self.partitions)
        if not parts or any(not isinstance(p, int) or p < 0 for p in parts) or len(set(parts)) != len(parts):
            raise ValueError(f"partitions must be distinct non-negative integers, got {self.partitions!r}")
        object.__setattr__(self, "partitions", parts)
        if self.offset_source not in OFFSET_SOURCES:
            raise ValueError(f"offset_source must be one of {OFFSET_SOURCES}, got {self.offset_source!r}")
        for name in ("roll_seconds", "write_retry_backoff_s", "write_retry_backoff_max_s"):
            value = getattr(self, name)
            if not isinstance(value, int | float) or value <= 0:
                raise ValueError(f"{name} must be a positive number of seconds, got {value!r}")
        for name in ("roll_bytes", "max_poll_records", "poll_timeout_ms", "fetch_max_wait_ms", "dedupe_window"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        if self.write_retry_backoff_s > self.write_retry_backoff_max_s:
            raise ValueError(f"write_retry_backoff_s ({self.write_retry_backoff_s}) must not exceed "
                             f"write_retry_backoff_max_s ({self.write_retry_backoff_max_s})")
        super().__post_init__()  # the TLS/SASL fields

    @property
    def resolved_group_id(self) -> str:
        """``group_id``, or ``serve-journal-sink-<topic>``."""
        return self.group_id or f"serve-journal-sink-{self.topic}"

    def consumer_kwargs(self) -> dict[str, Any]:
        """Keyword arguments for ``aiokafka.AIOKafkaConsumer`` (no auto commit, from earliest)."""
        return {
            "bootstrap_servers": self.bootstrap_servers,
            "group_id": self.resolved_group_id,
            "enable_auto_commit": False,
            "auto_offset_reset": "earliest",
            "fetch_max_wait_ms": self.fetch_max_wait_ms,
            **self.client_kwargs(),
        }


# ---------------------------------------------------------------------------------------------
# Chunks: what one write covers.

@dataclass
class _Chunk:
    messages: list[tuple[int, bytes, Sequence[tuple[str, bytes]]]] = field(default_factory=list)
    nbytes: int = 0
    born: float = field(default_factory=time.monotonic)
    first_sent: float | None = None
    """Wall-clock time the first message was produced (its Kafka timestamp), when known."""
    closed: bool = False
    closed_at: float = 0.0
    """Monotonic time it was closed (chunks are written oldest closed first)."""
    rebuild_end: int | None = None
    """The offset this chunk must end at: a chunk an earlier run wrote, rebuilt with its cut."""

    @property
    def start(self) -> int:
        return self.messages[0][0]

    @property
    def end(self) -> int:
        return self.messages[-1][0]


@dataclass(frozen=True)
class ChunkPart:
    """One file of a chunk: its name, its journal partition and its rows."""

    name: ChunkFileName
    key: PartitionKey
    table: pa.Table


def build_chunk_parts(topic: str, partition: int, messages: Sequence[tuple[int, bytes, Sequence[tuple[str, bytes]]]],
                      spec: PartitionSpec = DEFAULT_SPEC) -> tuple[list[ChunkPart], dict[str, int]]:
    """Decode a chunk's messages into one table per journal partition, deterministically.

    A message may carry many entries (wire version 2) or one (version 1); either way the chunk
    covers whole messages, offsets ``S..E``, so the same offsets always give the same rows.
    Within the chunk a ``(producer_id, seq)`` seen twice is kept once (first occurrence); a
    message this version cannot read is skipped and counted (its offset is logged, its payload
    never). Returns the parts, named ``1ofN..NofN`` in journal-partition order, and counters.
    """
    stats = {"undecodable": 0, "duplicates": 0}
    # Runs of consecutive messages of one wire version, decoded run by run in offset order.
    runs: list[tuple[int, list[tuple[int, bytes]]]] = []
    versions: dict[tuple, int] = {}
    for offset, value, headers in messages:
        headers = tuple(headers)
        version = versions.get(headers)
        if version is None:
            try:
                version = versions[headers] = wire.check_headers(headers)
            except wire.WireFormatError as exc:
                logger.warning("skipping undecodable message %s[%d]@%d: %s", topic, partition, offset, exc)
                stats["undecodable"] += 1
                continue
        if not runs or runs[-1][0] != version:
            runs.append((version, []))
        runs[-1][1].append((offset, value))
    tables = [_decode_run(topic, partition, version, run, stats) for version, run in runs]
    tables = [t for t in tables if t.num_rows]
    table = pa.concat_tables(tables) if tables else ENTRY_SCHEMA.empty_table()
    table = _first_occurrences(table, stats)
    # One part per journal partition, rows in offset order, numbered in partition order.
    groups = sorted(split_by_partition(table, spec), key=lambda group: group[0])
    start, end = messages[0][0], messages[-1][0]
    parts = [ChunkPart(ChunkFileName(topic, partition, start, end, i, len(groups)), key, rows)
             for i, (key, rows) in enumerate(groups, start=1)]
    return parts, stats


def _first_occurrences(table: pa.Table, stats: dict[str, int]) -> pa.Table:
    """``table`` without the rows whose ``(producer_id, seq)`` came earlier (counted)."""
    seen: set[tuple[str, int]] = set()
    keep = []
    for ident in zip(table.column("producer_id").to_pylist(), table.column("seq").to_pylist(),
                     strict=True):
        keep.append(ident not in seen)
        seen.add(ident)
    dropped = keep.count(False)
    if not dropped:
        return table
    stats["duplicates"] += dropped
    return table.filter(pa.array(keep, type=pa.bool_()))


def _rows_missing(found: pa.Table, rebuilt: pa.Table) -> pa.Table | None:
    """The rows of ``rebuilt`` (a part as Kafka's messages give it) that ``found`` (the file an
    earlier run wrote under its name) lacks, when every entry of ``found`` is one of
    ``rebuilt``'s (that run dropped the others as duplicates of earlier files); ``None`` when
    ``found`` holds any entry Kafka does not have there."""
    found, rebuilt = conform_entries(found), conform_entries(rebuilt)
    available = collections.Counter(table_leaf_hashes(rebuilt))
    have = collections.Counter(table_leaf_hashes(found))
    if have - available:
        return None
    keep, used = [], collections.Counter()
    for leaf in table_leaf_hashes(rebuilt):
        used[leaf] += 1
        keep.append(used[leaf] > have[leaf])
    return rebuilt.filter(pa.array(keep, type=pa.bool_()))


def _decode_run(topic: str, partition: int, version: int, run: Sequence[tuple[int, bytes]],
                stats: dict[str, int]) -> pa.Table:
    """Consecutive messages of one wire version to one table; an unreadable message is skipped
    and counted (its offset logged, its payload never)."""
    if version == wire.JSON_WIRE_VERSION:
        table = wire.decode_values_fast([value for _, value in run])
        return table if table is not None else _decode_one_by_one(topic, partition, run, stats)
    tables = []
    for offset, value in run:
        try:
            tables.append(wire.decode_message(value))
        except wire.WireFormatError as exc:
            logger.warning("skipping undecodable message %s[%d]@%d: %s", topic, partition, offset, exc)
            stats["undecodable"] += 1
    return pa.concat_tables(tables) if tables else ENTRY_SCHEMA.empty_table()


def _decode_one_by_one(topic: str, partition: int, messages: Sequence[tuple[int, bytes]],
                       stats: dict[str, int]) -> pa.Table:
    """The slow path: decode message by message, skipping (and counting) each unreadable one."""
    rows = []
    for offset, value in messages:
        try:
            rows.append(wire.decode_value(value))
        except wire.WireFormatError as exc:
            logger.warning("skipping undecodable message %s[%d]@%d: %s", topic, partition, offset, exc)
            stats["undecodable"] += 1
            continue
        rows[-1]["_offset"] = offset
    try:
        return wire.rows_to_table(rows)
    except wire.WireFormatError:
        pass  # some row's values do not fit the schema: find it, keep the others
    tables = []
    for row in rows:
        try:
            tables.append(wire.rows_to_table([row]))
        except wire.WireFormatError as exc:
            logger.warning("skipping undecodable message %s[%d]@%d: %s", topic, partition,
                           row["_offset"], exc)
            stats["undecodable"] += 1
    return pa.concat_tables(tables) if tables else ENTRY_SCHEMA.empty_table()


class KafkaSink:
    """Consumes assigned partitions of a topic into the journal; see the module docstring."""

    def __init__(self, settings: KafkaSinkSettings, storage: JournalStorage, *,
                 on_file_written: SinkFileHook | None = None, spec: PartitionSpec = DEFAULT_SPEC,
                 public_key: Any = None, on_rows_durable: RowsHook | None = None) -> None:
        """``public_key``: the journal's manifest key; offsets are then recovered from signed
        records only (the runner always passes it; without, from file names, for tests of the
        consumer alone). ``on_rows_durable(stored, table)``: every file this sink wrote or
        adopted, after its record (metrics)."""
        self.settings = settings
        self.storage = storage
        self.spec = spec
        self.on_file_written = on_file_written
        self.public_key = public_key
        self.on_rows_durable = on_rows_durable
        # Count and remember a file before the caller's hook runs: when that hook (the manifest
        # record) fails, the file is written all the same and the retry finds it present.
        hooks = [self._count_written]
        if on_file_written is not None:
            hooks.append(lambda stored, table, key: on_file_written(stored, table))
        hooks.append(self._durable)
        self._files = PartitionFileWriter(
            storage, f"k-{settings.topic}", roll_seconds=settings.roll_seconds,
            roll_bytes=settings.roll_bytes, on_file_written=hooks, parquet=settings.parquet, spec=spec)
        self._consumer: Any = None
        self._tps: dict[int, Any] = {}
        self._chunks: dict[int, _Chunk] = {}
        self._ready: dict[int, collections.deque[_Chunk]] = collections.defaultdict(collections.deque)
        self._rebuild: dict[int, collections.deque[tuple[int, int]]] = {}
        self._retry_at: dict[int, float] = {}
        self._backoff = {p: Backoff(settings.write_retry_backoff_s, settings.write_retry_backoff_max_s)
                         for p in settings.partitions}
        self._recent: collections.OrderedDict[tuple[str, int], None] = collections.OrderedDict()
        self.next_offsets: dict[int, int] = {}
        self.stats: collections.Counter[str] = collections.Counter()

    def __repr__(self) -> str:
        return (f"KafkaSink(topic={self.settings.topic!r}, partitions={list(self.settings.partitions)}, "
                f"storage={self.storage!r})")

    async def start(self) -> None:
        """Recover offsets, connect, assign the partitions and seek to where the journal ends."""
        from aiokafka import AIOKafkaConsumer, TopicPartition  # inside: slow import; CLI start-up

        await asyncio.to_thread(self.warm_up)
        self._consumer = AIOKafkaConsumer(**self.settings.consumer_kwargs())
        await self._consumer.start()
        self._tps = {p: TopicPartition(self.settings.topic, p) for p in self.settings.partitions}
        self._consumer.assign(list(self._tps.values()))
        beginnings = await self._consumer.beginning_offsets(list(self._tps.values()))
        first = {p: beginnings[tp] for p, tp in self._tps.items()}
        if self.settings.offset_source == "storage":
            recovered = await asyncio.to_thread(
                recover_offsets, self.storage, self.settings.topic, self.settings.partitions,
                self.public_key, first)
            self._rebuild = {p: collections.deque(c) for p, c in recovered.rebuild.items()}
            starts = recovered.next_offset
        else:
            starts = {}
            for p, tp in self._tps.items():
                committed = await self._consumer.committed(tp)
                if committed is not None:
                    starts[p] = committed
        for p, tp in self._tps.items():
            offset = starts.get(p, first[p])
            self._consumer.seek(tp, offset)
            self.next_offsets[p] = offset
        logger.info("kafka sink %s resumes at %s (rebuilding %s)", self.settings.topic,
                    self.next_offsets, {p: len(c) for p, c in self._rebuild.items()})

    def warm_up(self) -> None:
        """Decode, split, encode and record one synthetic message in memory (nothing is stored):
        the first chunk of a new sink process then does not pay for lazy imports and first-use
        set-up (it took 0.3-0.6 s longer than the next ones, the start of the persistence tail)."""
        try:
            message, = wire.encode_messages(synthetic_entries(), [b"warm-up"])
            parts, _ = build_chunk_parts("warm-up", 0, [(0, message.value, wire.HEADERS)], self.spec)
        except Exception:  # noqa: BLE001 - only a speed-up: the real chunks report their own errors
            logger.warning("kafka sink: warming up the decoder failed", exc_info=True)
            return
        for part in parts:
            warm_up(self.settings.parquet, part.table)

    async def stop(self) -> None:
        """Stop consuming. Chunks not yet written are simply consumed again next time."""
        if self._consumer is not None:
            consumer, self._consumer = self._consumer, None
            with contextlib.suppress(Exception):
                await consumer.stop()

    async def run(self, stop: asyncio.Event | None = None) -> None:
        """Poll and write until ``stop`` is set (or forever)."""
        while stop is None or not stop.is_set():
            await self.poll_once()

    async def poll_once(self) -> int:
        """One poll, then write every chunk that is due, consuming on while they are written.
        Returns the rows written.

        While a chunk is written (in a thread), the loop keeps fetching, so the next chunks fill
        and close meanwhile instead of after the write: a sink that stopped consuming during
        each write added its write time (hundreds of milliseconds on a busy machine) to the
        persistence latency of the entries behind it. Chunks that close during the writes are
        written by the next call, which then does not wait for more messages first."""
        assert self._consumer is not None, "call start() first"
        await self._fetch(0 if self._writable() else self.settings.poll_timeout_ms)
        due = sum(len(self._ready[p]) for p in self.settings.partitions)
        if not self._writable():
            return 0
        writing = asyncio.create_task(self._write_ready(due))
        try:
            while not writing.done():
                await self._fetch(FETCH_WHILE_WRITING_MS, writing)
            return writing.result()
        finally:
            if not writing.done():  # cancelled: as before, the chunk is consumed again next time
                writing.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await writing

    async def _fetch(self, timeout_ms: int, writing: asyncio.Task | None = None) -> None:
        """One fetch of the partitions with room (fewer than :data:`MAX_READY_CHUNKS` chunks
        waiting to be written), then close the chunks that are due."""
        active = [tp for p, tp in self._tps.items() if len(self._ready[p]) < MAX_READY_CHUNKS]
        if active:
            batches = await self._consumer.getmany(
                *active, timeout_ms=timeout_ms, max_records=self.settings.max_poll_records)
        else:
            batches = {}
            if writing is None:
                await asyncio.sleep(min(self._retry_delay(), timeout_ms / 1000))
            else:
                await asyncio.wait({writing}, timeout=timeout_ms / 1000)
        # Caught up: a whole poll's wait brought nothing more (the producers' batches are in). A
        # shorter fetch (while writing, or with chunks to write) that brought nothing says less.
        drained = set()
        if timeout_ms >= self.settings.poll_timeout_ms:
            drained = {tp.partition for tp in active} - {tp.partition for tp, r in batches.items() if r}
        for tp, records in batches.items():
            for record in records:
                self._add(tp.partition, record.offset, record.value or b"", record.headers or (),
                          record.timestamp)
        now, wall = time.monotonic(), time.time()
        for p, chunk in self._chunks.items():
            if chunk.rebuild_end is not None:
                if chunk.nbytes < REBUILD_SLACK * self.settings.roll_bytes:
                    continue  # cut where the earlier run cut it, not by time
                logger.warning("kafka sink %s[%d]: chunk from %d grew past %d bytes before the "
                               "cut at %d found in storage; cutting it here", self.settings.topic,
                               p, chunk.start, chunk.nbytes, chunk.rebuild_end)
                self.stats["rebuild_cuts_abandoned"] += 1
                self._rebuild.pop(p, None)
                chunk.rebuild_end = None
            if chunk.messages and not chunk.closed and self.chunk_due(chunk, now, wall, p in drained):
                self._close(p, chunk)
        self._chunks = {p: c for p, c in self._chunks.items() if not c.closed}

    def _close(self, partition: int, chunk: _Chunk) -> None:
        chunk.closed = True
        chunk.closed_at = time.monotonic()
        self._ready[partition].append(chunk)

    def _writable(self) -> list[int]:
        """Partitions with a chunk to write now (not waiting out a failed write's back-off),
        the one whose chunk closed first first."""
        now = time.monotonic()
        ready = [p for p in self.settings.partitions
                 if self._ready[p] and now >= self._retry_at.get(p, 0.0)]
        return sorted(ready, key=lambda p: self._ready[p][0].closed_at)

    async def _write_ready(self, limit: int) -> int:
        """Write up to ``limit`` chunks, oldest closed first, one at a time, each partition's in
        offset order; a partition whose write failed waits for its back-off. Returns the rows."""
        written = 0
        for _ in range(limit):
            writable = self._writable()
            if not writable:
                break
            p = writable[0]
            rows = await self._write(p, self._ready[p][0])
            if rows is not None:
                self._ready[p].popleft()
                written += rows
        return written

    @property
    def rebuilt(self) -> bool:
        """No chunk an earlier run wrote is waiting to be rebuilt or written."""
        # Read from the checkpoint thread while the loop runs: iterate over snapshots.
        return not (any(tuple(self._rebuild.values())) or any(tuple(self._ready.values()))
                    or any(c.rebuild_end is not None for c in tuple(self._chunks.values())))

    def chunk_due(self, chunk: _Chunk, now: float, wall: float, drained: bool = False) -> bool:
        """Whether ``chunk`` is to be written now (``now``: monotonic, ``wall``: epoch seconds).

        ``roll_seconds`` counts from when the chunk's first message was sent (its Kafka
        timestamp), so the time it spent in the producer and the broker is not added on top; a
        producer clock far behind the sink's still leaves chunks of at least ``roll_seconds / 4``
        of consuming. Without a timestamp it counts from when the sink received the message.
        When its partition is ``drained`` (the last poll brought nothing more) a chunk is written
        at half that age: nothing would join it soon, so waiting only adds latency.
        """
        roll = self.settings.roll_seconds
        if now - chunk.born >= roll or chunk.nbytes >= self.settings.roll_bytes:
            return True
        if drained:
            roll /= 2
            if now - chunk.born >= roll:
                return True
        return chunk.first_sent is not None and wall - chunk.first_sent >= roll and now - chunk.born >= roll / 4

    def _retry_delay(self) -> float:
        if not self._retry_at:
            return 0.0
        return max(0.0, min(self._retry_at.values()) - time.monotonic())

    def _add(self, partition: int, offset: int, value: bytes, headers, timestamp_ms: int | None = None) -> None:
        chunk = self._chunks.get(partition)
        if chunk is None:
            chunk = self._chunks[partition] = _Chunk()
            if timestamp_ms is not None and timestamp_ms >= 0:
                chunk.first_sent = timestamp_ms / 1000
            plan = self._rebuild.get(partition)
            while plan and plan[0][1] < offset:
                plan.popleft()  # a cut that ends before this chunk starts: not this run's history
            if plan and plan[0][0] <= offset:
                chunk.rebuild_end = plan.popleft()[1]
        chunk.messages.append((offset, value, tuple(headers)))
        chunk.nbytes += len(value)
        if chunk.rebuild_end is not None and offset >= chunk.rebuild_end:
            # Rebuilding a chunk an earlier run wrote: cut exactly where it was cut before.
            self._close(partition, chunk)
            del self._chunks[partition]

    async def _write(self, partition: int, chunk: _Chunk) -> int | None:
        """Write a chunk's parts create-only, then commit; ``None`` when storage failed."""
        tp = self._tps[partition]
        if self.settings.unsafe_commit_before_write:
            await self._commit(tp, chunk.end + 1)
        try:
            rows = await asyncio.to_thread(self._write_parts, partition, chunk)
        except Exception as exc:  # noqa: BLE001 - storage fault: keep the chunk, retry later
            delay = self._backoff[partition].next_delay()
            self._retry_at[partition] = time.monotonic() + delay
            self.stats["write_failures"] += 1
            logger.warning("journal write for %s[%d] offsets %d-%d failed (%s); retrying in %.2fs",
                           self.settings.topic, partition, chunk.start, chunk.end,
                           type(exc).__name__, delay)
            return None
        self._retry_at.pop(partition, None)
        self._backoff[partition].reset()
        self.next_offsets[partition] = chunk.end + 1
        if not self.settings.unsafe_commit_before_write:
            await self._commit(tp, chunk.end + 1)
        return rows

    def _write_parts(self, partition: int, chunk: _Chunk) -> int:
        parts, stats = build_chunk_parts(self.settings.topic, partition, chunk.messages, self.spec)
        self.stats.update(stats)
        return sum(self._place(part, self._drop_recent(part.table)) for part in parts)

    def _place(self, part: ChunkPart, table: pa.Table) -> int:
        """Write ``table`` (``part``'s rows less recent duplicates) under ``part``'s name, or
        settle with the file already there; returns the rows written now."""
        try:
            self._files.write_file(part.key, table, str(part.name))
        except ObjectExistsError:
            return self._settle_existing(part, table)
        return table.num_rows

    def _settle_existing(self, part: ChunkPart, table: pa.Table) -> int:
        """A part whose name exists: written by an earlier run that may have died before its
        record was signed. Adopt it (record it in this run's chain) when it holds exactly
        ``table``, or only entries of ``part`` (Kafka's messages at those offsets: that run
        dropped the others as duplicates of earlier files), then write what it lacks; when it
        holds anything else, write ``table`` beside it. Extra rows go to ``<name>-r<n>``.
        Returns the rows written now."""
        path = self.spec.file_path(part.key, str(part.name))
        existing = self._read_existing(path)
        if existing is None:
            rest: pa.Table | None = table
        else:
            data, version, found = existing
            exact = fingerprint(found) == fingerprint(table)
            lacking = None if exact else _rows_missing(found, part.table)
            if exact or lacking is not None:
                logger.info("journal file %s was written by an earlier run: adopted (%s)", path,
                            "exact" if exact else f"{lacking.num_rows} row(s) it lacks follow")
                self.stats["parts_already_present"] += 1
                self._remember(found)
                if self.on_file_written is not None:
                    stored = StoredObject(path, len(data), hashlib.sha256(data).hexdigest(), version)
                    self.on_file_written(stored, found)
                    self.stats["existing_parts_recorded"] += 1
                rest = None if lacking is None else self._drop_recent(lacking)
                if rest is None or not rest.num_rows:
                    return 0
                self.stats["existing_parts_completed"] += 1
            else:
                rest = table
                self.stats["existing_parts_foreign"] += 1
                logger.warning("journal file %s holds entries Kafka does not have at its offsets "
                               "(altered or planted); not adopted, writing the part beside it", path)
        if part.name.retry >= MAX_RETRY_NAMES:
            raise RuntimeError(f"{path}: {MAX_RETRY_NAMES} files of this part's names exist "
                               "already and none holds its entries; run `serve-journal verify`")
        retry = dataclasses.replace(part.name, retry=part.name.retry + 1)
        return self._place(ChunkPart(retry, part.key, rest), rest)

    def _read_existing(self, path: str) -> tuple[bytes, str | None, pa.Table] | None:
        """An existing file's bytes, version and entries; ``None`` when it is unreadable."""
        read_versioned = getattr(self.storage, "read_versioned", None)
        data, version = read_versioned(path) if read_versioned else (self.storage.read(path), None)
        try:
            return data, version, decode_parquet(data)
        except Exception as exc:  # noqa: BLE001 - not a journal file: not adopted, verify reports it
            self.stats["existing_parts_unreadable"] += 1
            logger.warning("existing journal file %s is unreadable (%s); not adopted", path,
                           type(exc).__name__)
            return None

    def _count_written(self, stored: StoredObject, table: pa.Table, key: PartitionKey) -> None:
        self.stats["files_written"] += 1
        self.stats["rows_written"] += table.num_rows
        self._remember(table)

    def _durable(self, stored: StoredObject, table: pa.Table, key: PartitionKey) -> None:
        if self.on_rows_durable is not None:
            self.on_rows_durable(stored, table)

    def _drop_recent(self, table: pa.Table) -> pa.Table:
        if not self._recent:
            return table
        keep = [(p, s) not in self._recent for p, s in zip(
            table.column("producer_id").to_pylist(), table.column("seq").to_pylist(), strict=True)]
        dropped = keep.count(False)
        if not dropped:
            return table
        self.stats["duplicates"] += dropped
        return table.filter(pa.array(keep, type=pa.bool_()))

    def _remember(self, table: pa.Table) -> None:
        recent = self._recent
        for ident in zip(table.column("producer_id").to_pylist(), table.column("seq").to_pylist(), strict=True):
            recent[ident] = None
        while len(recent) > self.settings.dedupe_window:
            recent.popitem(last=False)

    async def _commit(self, tp: Any, offset: int) -> None:
        try:
            await self._consumer.commit({tp: offset})
        except Exception as exc:  # noqa: BLE001 - commits are for lag monitoring only
            self.stats["commit_failures"] += 1
            logger.warning("offset commit for %s failed (%s)", tp, type(exc).__name__)

    def lag_state(self) -> dict[str, Any]:
        """Next offsets and counters, for monitoring."""
        return {"next_offsets": dict(self.next_offsets), **dict(self.stats)}


def parse_partitions(text: str) -> tuple[int, ...]:
    """``"0-3,7"`` -> ``(0, 1, 2, 3, 7)``."""
    out: list[int] = []
    for piece in text.split(","):
        piece = piece.strip()
        if not piece:
            continue
        low, sep, high = piece.partition("-")
        try:
            out.extend(range(int(low), int(high) + 1) if sep else [int(low)])
        except ValueError:
            raise ValueError(f"partitions must look like '0-3,7', got {text!r}") from None
    if not out:
        raise ValueError(f"partitions must look like '0-3,7', got {text!r}")
    return tuple(out)


__all__ = [
    "DEFAULT_ROLL_SECONDS",
    "ChunkFileName",
    "ChunkPart",
    "KafkaSink",
    "KafkaSinkSettings",
    "RecoveredOffsets",
    "SinkFileHook",
    "build_chunk_parts",
    "parse_partitions",
    "recover_offsets",
]
