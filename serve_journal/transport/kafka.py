"""The durable transport: journal entries to a Kafka topic, with a local disk spool for outages.

``send()`` is called by the replica's flusher thread and only enqueues (bounded); a background
thread runs an asyncio loop with an ``aiokafka`` producer that routes every entry by ``(model, time
bucket, shard)``, encodes the entries of each route as Arrow IPC messages of the wire format
(``transport/wire.py``, version 2: several entries a message, each at most ``wire.MAX_MESSAGE_BYTES``)
and waits for ``acks="all"``. Acknowledgement, spooling and resending are per message, so an
entry is never split from the others of its message. Whatever the broker does not acknowledge within ``send_timeout_s`` (broker down,
partition leader gone, request failed) goes to the disk spool (``transport/spool.py``); while the
spool holds anything, new batches are spooled behind it and a drainer resends spooled batches
oldest first, so entries reach Kafka in the order they were handed over.

Delivery is at-least-once: a batch that timed out may still land in Kafka and then be resent from
the spool. The Kafka sink deduplicates by ``(producer_id, seq)``. With a real Kafka cluster keep
``enable_idempotence=True`` (the default) so that producer retries do not duplicate either; the
tansu broker used in tests does not implement ``InitProducerId``, so tests turn it off.

**Fail-closed: backpressure, never a drop.** An entry the transport accepted was already served,
so dropping it would serve a decision without its entry. A full queue or a full spool therefore
never drops: :meth:`KafkaTransport.has_room` turns false while ``queue_max_batches`` batches wait,
and the replica's flusher stops handing over batches while it is false (``send`` itself waits for
room if called anyway). A batch the spool cannot take is held by the loop, which retries as the
drainer frees space (``held_entries`` in :meth:`~KafkaTransport.counters`); the queue behind it
fills, the replica's buffer fills, and the request path applies each risk tier's overflow policy
(drop counted, wait, or refuse with 503). Memory stays bounded by ``queue_max_batches``.

Drops happen only where nothing else is possible, and are never silent: entries still held when
the transport closes and the spool cannot take them (``spool_full``, or ``spool_error`` when its
disk failed: a failing disk is held and retried like a full spool), a batch the loop could not
take after close or a crash (``transport_closed`` / ``transport_failed``), a spool record of an
unknown frame version (``spool_unreadable``); each is also reported to the optional
``on_drop(reason, count, entries)`` hook.

With ``metrics`` (a :class:`~serve_journal.metrics.JournalMetrics`) the spool gauges
``serve_journal_spool_depth`` (entries) and ``serve_journal_spool_bytes`` follow every append and
acknowledgement of this producer's spool.

A producer that dies (a replica killed, a node rebooted) leaves its spool on disk. Every live
transport looks for such spools beside its own (same parent directory, marked with the same
brokers and topic, no longer locked by a living process) at start and every
``orphan_scan_interval_s``, drains them to Kafka and removes them; counters ``adopted_spools``
and ``adopted_drained``. The entries keep their own ``producer_id`` and ``seq``.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import os
import threading
import time
from collections.abc import Callable
from typing import Any

import pyarrow as pa
from aiokafka import AIOKafkaProducer

from serve_journal.metrics import JournalMetrics
from serve_journal.retry import Backoff
from serve_journal.transport import TransportError, wire
from serve_journal.transport.kafka_settings import (
    KafkaSettings,
    ModelBucketShardPartitioner,
    stable_hash,
)
from serve_journal.transport.spool import DiskSpool, find_spools

logger = logging.getLogger(__name__)

DropHook = Callable[[str, int, "pa.Table | None"], None]
"""``on_drop(reason, count, entries)``: ``entries`` is a table of the dropped entries when the
transport still has them (held at close, a dead loop's batches), so the replica can account their
sequence numbers; ``None`` when it does not (an unreadable spool record)."""


_STOP = object()

Outgoing = list[tuple[bytes, bytes, int]]
"""Messages to send: ``(key, value, entries)``, all of one wire version."""


class KafkaTransport:
    """A :class:`~serve_journal.transport.Transport` to Kafka; see the module docstring."""

    def __init__(self, settings: KafkaSettings, *, on_drop: DropHook | None = None,
                 metrics: JournalMetrics | None = None) -> None:
        self.settings = settings
        self._metrics = metrics
        self.partitioner = ModelBucketShardPartitioner(settings.shards_per_model, settings.bucket_seconds)
        self._on_drop = on_drop
        self._spool = DiskSpool(settings.resolved_spool_dir(), settings.spool_max_bytes,
                                settings.spool_segment_bytes, label=settings.spool_label)
        self._cond = threading.Condition()
        self._handed = 0  # batches accepted by send()
        self._settled = 0  # batches acked, spooled or dropped
        self._pending = 0
        self._counts = {"sent": 0, "spooled": 0, "drained": 0, "adopted_spools": 0, "adopted_drained": 0}
        self._spool_entries = 0  # entries in our own spool (the depth gauge)
        self._acking = 0  # drains whose records are being acked and not yet counted
        self._held = 0  # entries the loop holds because the spool is full
        self._current: pa.RecordBatch | None = None  # the batch the loop is handling
        self._dropped: collections.Counter[str] = collections.Counter()
        self._closed = False
        self._closing = False
        self._failed: BaseException | None = None
        self._producer = None
        self._producer_lock: asyncio.Lock | None = None
        self._num_partitions = settings.num_partitions
        self._next_connect = 0.0
        self._loop = asyncio.new_event_loop()
        self._ready = threading.Event()
        self._thread = threading.Thread(target=self._run, name="serve-journal-kafka", daemon=True)
        self._thread.start()
        self._ready.wait(10)

    def __repr__(self) -> str:
        return f"KafkaTransport(topic={self.settings.topic!r}, bootstrap={self.settings.bootstrap_servers!r})"

    # -- Transport protocol (called from the flusher thread) -----------------------------------

    def has_room(self) -> bool:
        """Whether :meth:`send` would enqueue at once (the flusher's backpressure gate).

        False while ``queue_max_batches`` batches wait for the loop (the broker and the spool
        cannot keep up), after close and after the loop died: the replica then keeps its entries
        in its buffer, and its risk tiers decide what a request does when that is full."""
        with self._cond:
            return (self._pending < self.settings.queue_max_batches and not self._closed
                    and self._failed is None)

    def send(self, batch: pa.RecordBatch) -> None:
        """Enqueue ``batch``; never waits on the network and never drops it.

        When the queue is full (:meth:`has_room` is false) this waits for room: backpressure.
        Raises ``TransportError`` when the transport is closed or its loop died."""
        rows = batch.num_rows
        with self._cond:
            self._cond.wait_for(lambda: self._pending < self.settings.queue_max_batches
                                or self._closed or self._failed is not None)
            if self._closed:
                raise TransportError("KafkaTransport is closed; create a new one to send")
            if self._failed is not None:
                raise TransportError(
                    f"KafkaTransport's background loop died ({type(self._failed).__name__})")
            self._pending += 1
            self._handed += 1
        try:
            self._loop.call_soon_threadsafe(self._queue.put_nowait, batch)
        except RuntimeError:  # loop closed between the check and the call
            self._settle()
            self._drop("transport_closed", rows, entries=batch)
            raise TransportError("KafkaTransport is closed; create a new one to send") from None

    def in_flight(self) -> int:
        """Batches handed over and not yet acked by the broker nor durably spooled."""
        with self._cond:
            return self._pending

    def flush(self, timeout: float | None = None) -> bool:
        """Wait until every batch handed over is acked by the broker or durably spooled."""
        with self._cond:
            target = self._handed
            done = self._cond.wait_for(lambda: self._settled >= target or self._failed is not None, timeout)
            return bool(done) and self._failed is None

    def close(self, timeout: float | None = None) -> None:
        """Flush within ``timeout``, spool what is left, stop the producer. Harmless twice.

        A fifth of ``timeout`` is kept for stopping the loop: entries it still holds (the spool
        full) are then dropped and counted (``spool_full``), never left unaccounted."""
        if self._closed:
            return
        deadline = None if timeout is None else time.monotonic() + timeout
        self.flush(None if timeout is None else timeout * 0.8)
        with self._cond:
            self._closed = True
            self._cond.notify_all()  # a send() waiting for room raises instead
        self._closing = True  # the loop spools whatever is still queued instead of sending it
        with contextlib.suppress(RuntimeError):
            self._loop.call_soon_threadsafe(self._space.set)  # a held batch stops waiting
            self._loop.call_soon_threadsafe(self._queue.put_nowait, _STOP)
        remaining = None if deadline is None else max(0.0, deadline - time.monotonic())
        self._thread.join(remaining)
        if self._thread.is_alive():
            logger.warning("Kafka transport loop did not stop within the close timeout")
        self._spool.close()

    # -- observation ---------------------------------------------------------------------------

    def counters(self) -> dict[str, Any]:
        """Entries ``sent``, ``spooled``, ``drained`` and ``dropped`` (by reason), entries the
        loop ``held_entries`` (spool full), spool health."""
        with self._cond:
            out: dict[str, Any] = dict(self._counts)
            out["dropped"] = dict(self._dropped)
            out["held_entries"] = self._held
            out["spool_entries"] = self._spool_entries
        out["spool_records"] = len(self._spool)
        out["spool_bytes"] = self._spool.bytes_used
        out["spool_corrupt_records"] = self._spool.stats["corrupt_records"]
        out["spool_torn_tails"] = self._spool.stats["torn_tails"]
        return out

    def wait_drained(self, timeout: float | None = None) -> bool:
        """Wait until everything handed over is settled and the spool is empty (tests, shutdown)."""
        with self._cond:
            target = self._handed
            return bool(self._cond.wait_for(
                lambda: (self._settled >= target and len(self._spool) == 0 and not self._acking)
                or self._failed is not None,
                timeout,
            )) and self._failed is None

    # -- background loop -----------------------------------------------------------------------

    def _run(self) -> None:
        asyncio.set_event_loop(self._loop)
        self._queue: asyncio.Queue = asyncio.Queue()
        self._spool_event = asyncio.Event()
        self._space = asyncio.Event()  # the drainer freed spool space (or we are closing)
        self._producer_lock = asyncio.Lock()
        self._ready.set()
        try:
            self._loop.run_until_complete(self._main())
        except BaseException as exc:  # noqa: BLE001 - fail loudly, never hang callers
            logger.exception("Kafka transport loop died")
            lost = [] if self._current is None else [self._current]
            while not self._queue.empty():  # the loop is dead: nobody else takes from it now
                item = self._queue.get_nowait()
                if item is not _STOP:
                    lost.append(item)
            with self._cond:
                self._failed = exc
                self._cond.notify_all()
            for batch in lost:  # counted with their sequence numbers, so verify names them
                self._drop("transport_failed", batch.num_rows, entries=batch)
        finally:
            self._loop.close()

    async def _main(self) -> None:
        if len(self._spool):
            self._spool_event.set()
            self._spool_entries = await asyncio.to_thread(_entries_in, self._spool)
        self._update_spool_gauges()
        # Connect now, not on the first batch: the first entries would wait for it otherwise.
        helpers = [asyncio.create_task(self._producer_or_none()), asyncio.create_task(self._drainer())]
        if self.settings.adopt_orphan_spools:
            helpers.append(asyncio.create_task(self._adopter()))
        try:
            while True:
                batch = await self._queue.get()
                if batch is _STOP:
                    break
                self._current = batch
                try:
                    await self._handle(batch)
                    self._current = None
                finally:
                    self._settle()
                for helper in helpers[1:]:
                    if helper.done():
                        helper.result()  # re-raise: a dead drainer must not go unnoticed
        finally:
            for helper in helpers:
                helper.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await helper
            if self._producer is not None:
                with contextlib.suppress(Exception):
                    await asyncio.wait_for(self._producer.stop(), self.settings.send_timeout_s)

    def _settle(self) -> None:
        with self._cond:
            self._pending -= 1
            self._settled += 1
            self._cond.notify_all()

    def _drop(self, reason: str, count: int, locked: bool = False,
              entries: pa.RecordBatch | pa.Table | None = None) -> None:
        if locked:
            self._dropped[reason] += count
        else:
            with self._cond:
                self._dropped[reason] += count
        logger.warning("journal transport dropped %d entries: %s", count, reason)
        if self._on_drop is not None:
            try:
                if isinstance(entries, pa.RecordBatch):
                    entries = pa.Table.from_batches([entries])
                self._on_drop(reason, count, entries)
            except Exception:  # noqa: BLE001 - a broken hook must not break the transport
                logger.exception("on_drop hook raised")

    async def _handle(self, batch: pa.RecordBatch) -> None:
        """Send ``batch``, or spool it; while the spool is full, hold it (see the module doc)."""
        pairs = self._encode(batch)
        version = wire.WIRE_VERSION
        backoff = self._backoff()
        try:
            while True:
                self._space.clear()
                if not self._closing and not len(self._spool):
                    unacked = await self._produce(pairs, version)
                    with self._cond:
                        self._counts["sent"] += _entries(pairs) - _entries(unacked)
                    pairs = unacked
                    if not pairs:
                        return
                spooled = await self._spool_pairs(pairs, version)
                if spooled is True:
                    return
                if self._closing:  # nowhere left to keep them: counted, with their seqs
                    self._drop_pairs(spooled, pairs, version)
                    return
                self._set_held(_entries(pairs))
                # Hold the batch: the queue behind it fills and the replica pushes back.
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._space.wait(), backoff.next_delay())
        finally:
            self._set_held(0)

    def _encode(self, batch: pa.RecordBatch) -> Outgoing:
        """``batch`` as version 2 messages, one or more per message key (route)."""
        key = self.partitioner.key
        models = batch.column("model_name").to_pylist()
        stamps = batch.column("ts").cast(pa.int64()).to_pylist()
        ids = batch.column("request_id").to_pylist()
        keys = [key(m, t, r) for m, t, r in zip(models, stamps, ids, strict=True)]
        limit = min(wire.MAX_MESSAGE_BYTES, max(1024, self.settings.max_batch_size - 4096))
        return [(m.key, m.value, m.entries)
                for m in wire.encode_messages(batch, keys, max_bytes=limit)]

    def _set_held(self, entries: int) -> None:
        with self._cond:
            self._held = entries

    async def _spool_pairs(self, pairs: Outgoing, version: int) -> bool | str:
        """Append ``pairs`` to our spool durably: ``True``, or why not (``"spool_full"``, or
        ``"spool_error"`` when the disk failed: held and retried like a full spool)."""
        entries = _entries(pairs)
        frame = wire.pack_frame([(k, v) for k, v, _ in pairs], version=version, entries=entries)
        try:
            if not await asyncio.to_thread(self._spool.append, frame):
                return "spool_full"
        except OSError as exc:
            logger.warning("spool append failed (%s); holding %d entries", type(exc).__name__,
                           entries)
            return "spool_error"
        with self._cond:
            self._counts["spooled"] += entries
            self._spool_entries += entries
        self._update_spool_gauges()
        self._spool_event.set()
        return True

    def _drop_pairs(self, reason: str, pairs: Outgoing, version: int) -> None:
        try:
            lost = wire.decode_messages([value for _, value, _ in pairs], version)
        except Exception:  # noqa: BLE001 - count them even if they cannot be decoded
            lost = None
        self._drop(reason, _entries(pairs), entries=lost)

    def _update_spool_gauges(self) -> None:
        if self._metrics is not None:
            self._metrics.set_spool_depth(self._spool_entries, self._spool.bytes_used)

    async def _producer_or_none(self) -> AIOKafkaProducer | None:
        if self._producer is not None:
            return self._producer
        assert self._producer_lock is not None
        async with self._producer_lock:  # the drainer and the adopter must not both connect
            return await self._connect()

    async def _connect(self) -> AIOKafkaProducer | None:
        if self._producer is not None:
            return self._producer
        if time.monotonic() < self._next_connect:
            return None
        producer = AIOKafkaProducer(**self.settings.producer_kwargs())
        try:
            await asyncio.wait_for(producer.start(), self.settings.send_timeout_s)
            if self._num_partitions is None:
                partitions = await asyncio.wait_for(
                    producer.partitions_for(self.settings.topic), self.settings.send_timeout_s)
                self._num_partitions = len(partitions)
        except Exception as exc:  # noqa: BLE001 - any failure means: spool and retry later
            logger.warning("Kafka producer could not start (%s); spooling", type(exc).__name__)
            with contextlib.suppress(Exception):
                await producer.stop()
            self._next_connect = time.monotonic() + self.settings.retry_backoff_s
            return None
        self._producer = producer
        return producer

    async def _produce(self, pairs: Outgoing, version: int) -> Outgoing:
        """Send ``pairs`` (messages of wire ``version``) with acks=all; return those not
        acknowledged within the timeout."""
        producer = await self._producer_or_none()
        if producer is None:
            return pairs
        assert self._num_partitions is not None
        by_partition: dict[int, list[int]] = collections.defaultdict(list)
        for i, (key, _, _) in enumerate(pairs):
            by_partition[self.partitioner.partition(key, self._num_partitions)].append(i)
        sends: list[tuple[list[int], asyncio.Future]] = []
        headers = list(wire.headers_for(version))
        try:
            async with asyncio.timeout(self.settings.send_timeout_s):
                for partition, indices in by_partition.items():
                    start = 0
                    while start < len(indices):
                        builder = producer.create_batch()
                        end = start
                        while end < len(indices):
                            key, value, _ = pairs[indices[end]]
                            if builder.append(key=key, value=value, timestamp=None, headers=headers) is None:
                                break
                            end += 1
                        if end == start:
                            raise ValueError("one journal message is larger than max_batch_size")
                        future = await producer.send_batch(builder, self.settings.topic, partition=partition)
                        sends.append((indices[start:end], future))
                        start = end
                await asyncio.gather(*(future for _, future in sends))
        except Exception as exc:  # noqa: BLE001 - timeout, broker error: spool what is unacked
            logger.warning("Kafka send failed (%s); spooling unacknowledged entries", type(exc).__name__)
        acked: set[int] = set()
        for indices, future in sends:
            if future.done() and not future.cancelled() and future.exception() is None:
                acked.update(indices)
            else:
                future.add_done_callback(_consume_result)
        return [pair for i, pair in enumerate(pairs) if i not in acked]

    async def _drain_once(self, spool: DiskSpool) -> int | None:
        """Resend up to 64 of ``spool``'s oldest records (of one wire version) and ack them.

        Returns the entries drained (0 when the spool was empty or its head was unreadable and
        skipped), or ``None`` when the broker did not take them all: the records stay and are
        resent whole later; the sink drops the part that did arrive by ``(producer_id, seq)``.
        """
        try:
            return await self._drain_records(spool)
        except OSError as exc:  # the spool's disk failed: retried with back-off, nothing skipped
            logger.warning("draining the spool failed (%s); retrying", type(exc).__name__)
            return None

    async def _drain_records(self, spool: DiskSpool) -> int | None:
        records = await asyncio.to_thread(spool.peek_many, 64)
        pairs: Outgoing = []
        readable = []
        version = None
        for record in records:
            try:
                frame = wire.read_frame(record.payload)
                if version is not None and frame.version != version:
                    break  # the next drain sends it, with its own version's headers
                version = frame.version
                # A v2 frame counts its entries in its header (drained whole or not at all).
                counts = ([1] * len(frame.messages) if frame.version == wire.JSON_WIRE_VERSION
                          else [frame.entries] + [0] * (len(frame.messages) - 1))
                pairs.extend((k, v, n) for (k, v), n in zip(frame.messages, counts, strict=False))
                readable.append(record)
            except wire.WireFormatError:
                # Checksummed, so a frame of another version: counted, never replayed.
                if readable:
                    break
                await asyncio.to_thread(spool.ack, record)
                self._drop("spool_unreadable", 1)
                break
        if not readable:
            return 0
        assert version is not None
        if await self._produce(pairs, version):
            return None
        drained = _entries(pairs)
        # The ack empties the spool in a worker thread: until the drain is counted (same lock),
        # wait_drained must not see an empty spool with ``drained`` short of ``spooled``.
        with self._cond:
            self._acking += 1
        acked = False
        try:
            await asyncio.to_thread(_ack_all, spool, readable)
            acked = True
        finally:
            with self._cond:
                self._acking -= 1
                if acked and spool is self._spool:
                    self._spool_entries = max(0, self._spool_entries - drained)
                    self._counts["drained"] += drained
                self._cond.notify_all()
        self._space.set()
        if spool is self._spool:
            self._update_spool_gauges()
        return drained

    def _backoff(self) -> Backoff:
        return Backoff(self.settings.retry_backoff_s, self.settings.retry_backoff_max_s)

    async def _drainer(self) -> None:
        backoff = self._backoff()
        while True:
            await self._spool_event.wait()
            if self._closing:
                return
            drained = await self._drain_once(self._spool)
            if drained is None:
                await asyncio.sleep(backoff.next_delay())  # retry pacing, not synchronisation
                continue
            backoff.reset()
            with self._cond:  # the drain was counted by _drain_records, with its ack
                if not drained and not len(self._spool):
                    self._spool_event.clear()
                self._cond.notify_all()

    async def _adopter(self) -> None:
        """Every ``orphan_scan_interval_s``: drain and remove spools left by dead producers."""
        own = self._spool.directory
        base = os.path.dirname(own)
        while not self._closing:
            for directory in await asyncio.to_thread(find_spools, base, self.settings.spool_label, own):
                if self._closing:
                    return
                await self._adopt(directory)
            await asyncio.sleep(self.settings.orphan_scan_interval_s)  # a period, not a wait for state

    async def _adopt(self, directory: str) -> None:
        spool = await asyncio.to_thread(DiskSpool.adopt, directory, self.settings.spool_label,
                                        self.settings.spool_max_bytes, self.settings.spool_segment_bytes)
        if spool is None:
            return  # its producer is alive (or it is gone already)
        try:
            logger.info("adopting the spool of a stopped producer: %d records in %s",
                        len(spool), os.path.basename(directory))
            backoff = self._backoff()
            while len(spool) and not self._closing:
                drained = await self._drain_once(spool)
                if drained is None:
                    await asyncio.sleep(backoff.next_delay())  # retry pacing, not synchronisation
                    continue
                backoff.reset()
                with self._cond:
                    self._counts["adopted_drained"] += drained
            if not len(spool):
                await asyncio.to_thread(spool.remove)
                with self._cond:
                    self._counts["adopted_spools"] += 1
                    self._cond.notify_all()
        finally:
            spool.close()  # anything left stays on disk for the next adopter


def _entries_in(spool: DiskSpool) -> int:
    """Entries in the frames ``spool`` holds (read once, when a transport opens a spool)."""
    return sum(wire.frame_length(record.payload) for record in spool.peek_many(len(spool), spool.max_bytes))


def _entries(pairs: Outgoing) -> int:
    return sum(n for _, _, n in pairs)


def _ack_all(spool: DiskSpool, records: list) -> None:
    for record in records:
        spool.ack(record)


def _consume_result(future: asyncio.Future) -> None:
    if not future.cancelled():
        future.exception()  # retrieved, so asyncio does not log "exception never retrieved"


__all__ = ["KafkaSettings", "KafkaTransport", "ModelBucketShardPartitioner", "stable_hash"]
