"""Exact, unsampled counters beside the journal: what the replica counts and how it is stored.

Every captured entry is counted in the replica, whatever happens to it afterwards: kept, sampled
out by its tier's rate, or dropped under backpressure (with a reason). The counts are grouped by
``(model, version, minute, decision, tier, sample rate, outcome, disposition, reason)``; in
addition the sequence numbers of entries that were *not* kept are recorded per producer as
run-length ranges, so that ``verify`` can explain every gap in a producer's sequence.

The flusher persists a :class:`CounterSet` every few seconds as small create-only Parquet files::

    <root>/_counters/model=<model>/date=<YYYY-MM-DD>/<producer_id>-<n>.parquet

Each file holds up to four kinds of rows (column ``kind``): ``"count"`` rows with the counter key
and a count, ``"gap"`` rows with a sequence range ``[seq_lo, seq_hi]`` of entries that are not in
the journal and why (``disposition`` and ``reason``), a ``"lease"`` row and, in a producer's last
file, a ``"closed"`` row.

The sequence lease makes a dead replica's loss visible. A replica answers a call only when the
call's sequence number is within a lease that is already durable in its signed chain (the lease
row's ``seq_hi``); the lease is extended in the background before it runs out. Every file a
leasing producer writes carries its current lease row, stamped with the time it was written
(``minute``, not rounded), and an idle producer writes a lease-only file every
:data:`LEASE_KEEPALIVE_S`. So a producer whose newest file is older than a staleness bound and
that never wrote a ``"closed"`` row died, and every sequence number up to its lease that the
journal's rows and the signed gaps do not account for is an entry that may have been answered
and lost (:func:`lease_shortfall`; shown by verify and stats).

Each file is signed by the replica's *counters key* (a narrow key the journal's manifest key
certifies, see :mod:`serve_journal.integrity.certificates`) and chained to the producer's previous
counters file: the Parquet schema metadata holds the key id, the signature and the digest of the
previous file's signed message. The signature covers the file's path and every row, so a forged,
edited, renamed or copied counters file explains nothing (:func:`read_counters_file`).

Read them with :mod:`serve_journal.read.stats`.
"""


from __future__ import annotations

import base64
import datetime as dt
import hashlib
import threading
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from serve_journal.catalog.layout import PARQUET_SUFFIX, escape_value
from serve_journal.integrity.manifest import GENESIS_HASH, canonical_json, decode_b64
from serve_journal.storage import JournalStorage, ObjectExistsError, StoredObject

COUNTERS_DIR = "_counters"

KEPT = "kept"
SAMPLED_OUT = "sampled_out"
DROPPED = "dropped"
DISPOSITIONS = (KEPT, SAMPLED_OUT, DROPPED)

KIND_COUNT = "count"
KIND_GAP = "gap"
KIND_LEASE = "lease"
"""A sequence lease: the producer may answer calls with ``seq <= seq_hi`` (``minute`` holds the
time the row was written, to the microsecond, not rounded)."""
KIND_CLOSED = "closed"
"""The producer shut down cleanly; ``seq_hi`` is the last sequence number it used (-1: none)."""

LEASE_KEEPALIVE_S = 60.0
"""An idle leasing producer still writes its lease row this often, so it never looks dead."""
PRODUCER_STALE_S = 300.0
"""A producer that is not closed and wrote nothing for this long is presumed dead (readers'
default bound: several keep-alive intervals, so a slow store or a clock a little off does not
make a live replica look dead)."""

_MINUTE_US = 60_000_000
_DAY_US = 86_400 * 1_000_000
_EPOCH = dt.datetime(1970, 1, 1, tzinfo=dt.UTC)

COUNTER_SCHEMA = pa.schema(
    [
        pa.field("kind", pa.string(), nullable=False),
        pa.field("producer_id", pa.string(), nullable=False),
        pa.field("model_name", pa.string(), nullable=False),
        pa.field("model_version", pa.string()),
        pa.field("minute", pa.timestamp("us", tz="UTC")),
        pa.field("decision", pa.string()),
        pa.field("risk_tier", pa.string()),
        pa.field("sample_rate", pa.float32()),
        pa.field("outcome", pa.string()),
        pa.field("disposition", pa.string(), nullable=False),
        pa.field("reason", pa.string()),
        pa.field("count", pa.int64(), nullable=False),
        pa.field("seq_lo", pa.int64()),
        pa.field("seq_hi", pa.int64()),
    ],
    metadata={b"serve_journal.counters_version": b"1"},
)
"""Columns of a counters file. ``count`` rows leave ``seq_lo``/``seq_hi`` null; ``gap`` rows
leave the counter key (version, minute, decision, tier, rate, outcome) null."""

COUNT_DIMENSIONS = (
    "model_name", "model_version", "minute", "decision", "risk_tier", "sample_rate", "outcome",
)
"""Columns the exact counters are grouped by (besides disposition and reason)."""

META_KEY_ID = b"serve_journal.counters_key_id"
META_SIGNATURE = b"serve_journal.counters_signature"
META_PREV = b"serve_journal.counters_prev"
META_PREV_PATH = b"serve_journal.counters_prev_path"


class CountersSigner(Protocol):
    """What signs counters files: an Ed25519 signer (:class:`ManifestSigner` holding the
    replica's counters key)."""

    key_id: str

    def sign(self, message: bytes) -> bytes: ...


def signed_message(path: str, table: pa.Table, key_id: str, prev: str, prev_path: str) -> bytes:
    """The bytes a counters file's signature covers: its path, key id, the previous file's
    digest and path, and every row."""
    rows = table.cast(COUNTER_SCHEMA).set_column(
        COUNTER_SCHEMA.get_field_index("minute"), "minute",
        table.column("minute").cast(pa.int64())).to_pylist()
    return canonical_json({"path": path, "key_id": key_id, "prev": prev, "prev_path": prev_path,
                           "rows": rows})


@dataclass(frozen=True)
class CountersFile:
    """One counters file as read back: its rows and its signature fields."""

    path: str
    table: pa.Table
    key_id: str
    signature: str
    prev: str
    prev_path: str = ""

    @property
    def producer_id(self) -> str | None:
        ids = set(self.table.column("producer_id").to_pylist())
        return ids.pop() if len(ids) == 1 else None

    def message(self) -> bytes:
        return signed_message(self.path, self.table, self.key_id, self.prev, self.prev_path)

    @property
    def digest(self) -> str:
        """SHA-256 of the signed message: what the producer's next file names as ``prev``."""
        return hashlib.sha256(self.message()).hexdigest()

    def lease_rows(self) -> list[dict[str, Any]]:
        """This file's ``lease`` and ``closed`` rows."""
        mask = pc.is_in(self.table.column("kind"),
                                value_set=pa.array([KIND_LEASE, KIND_CLOSED]))
        return self.table.filter(mask).to_pylist()

    def verify(self, keys: Mapping[str, Ed25519PublicKey]) -> bool:
        """Signed by the certified key it names, for exactly one producer."""
        key = keys.get(self.key_id)
        if key is None or not self.signature or self.producer_id is None:
            return False
        try:
            key.verify(decode_b64(self.signature), self.message())
        except (InvalidSignature, ValueError):
            return False
        return True


def read_counters_file(path: str, data: bytes) -> CountersFile:
    """Parse a counters file (raises ``ValueError`` for one that is not a counters file)."""
    try:
        handle = pq.ParquetFile(pa.BufferReader(data))
        meta = handle.schema_arrow.metadata or {}
        table = handle.read().cast(COUNTER_SCHEMA)
    except (pa.ArrowInvalid, pa.ArrowTypeError, ValueError) as exc:
        raise ValueError(f"counters file {path} is not a valid counters Parquet file") from exc
    return CountersFile(path, table, meta.get(META_KEY_ID, b"").decode("ascii", "replace"),
                        meta.get(META_SIGNATURE, b"").decode("ascii", "replace"),
                        meta.get(META_PREV, b"").decode("ascii", "replace"),
                        meta.get(META_PREV_PATH, b"").decode("utf-8", "replace"))


def gap_reason(disposition: str, reason: str | None) -> str:
    """The reason string verify shows for a gap: ``sampled_out`` or ``dropped:<reason>``."""
    return disposition if disposition != DROPPED else f"{DROPPED}:{reason or 'unknown'}"


# --------------------------------------------------------------------------- in the replica

_CountKey = tuple  # (model, version, minute_us, decision, tier, rate, outcome, disposition, reason)
_RangeKey = tuple  # (model, day_number, disposition, reason)


@dataclass
class CounterSnapshot:
    """Counts and sequence ranges taken out of a :class:`CounterSet`."""

    producer_id: str
    counts: dict[_CountKey, int] = field(default_factory=dict)
    ranges: dict[_RangeKey, list[list[int]]] = field(default_factory=dict)
    lease: LeaseRow | None = None
    """The lease (and, at shutdown, the closed mark) this snapshot's first file carries."""

    def __bool__(self) -> bool:
        return bool(self.counts) or bool(self.ranges) or self.lease is not None

    def parts(self) -> dict[tuple[str, str], CounterSnapshot]:
        """This snapshot split by (model, date), one part per counters file; the part with the
        lease row comes first (the lease is durable once that file is)."""
        out: dict[tuple[str, str], CounterSnapshot] = {}
        if self.lease is not None:
            part = (self.lease.model, _date_of_day(self.lease.written_us // _DAY_US))
            out[part] = CounterSnapshot(self.producer_id, lease=self.lease)
        for key, n in self.counts.items():
            part = (key[0], _date_of_day(key[2] // _DAY_US))
            out.setdefault(part, CounterSnapshot(self.producer_id)).counts[key] = n
        for key, runs in self.ranges.items():
            part = (key[0], _date_of_day(key[1]))
            out.setdefault(part, CounterSnapshot(self.producer_id)).ranges[key] = runs
        return out

    def to_table(self) -> pa.Table:
        """The snapshot as rows of :data:`COUNTER_SCHEMA` (ranges sorted and merged)."""
        cols: dict[str, list[Any]] = {name: [] for name in COUNTER_SCHEMA.names}

        def row(**values: Any) -> None:
            for name in COUNTER_SCHEMA.names:
                cols[name].append(values.get(name))

        for key, n in sorted(self.counts.items(), key=lambda item: counter_sort_key(item[0])):
            model, version, minute_us, decision, tier, rate, outcome, disposition, reason = key
            row(kind=KIND_COUNT, producer_id=self.producer_id, model_name=model,
                model_version=version, minute=minute_us, decision=decision, risk_tier=tier,
                sample_rate=rate, outcome=outcome, disposition=disposition, reason=reason, count=n)
        for key in sorted(self.ranges, key=counter_sort_key):
            model, _day, disposition, reason = key
            for lo, hi in merge_runs(self.ranges[key]):
                row(kind=KIND_GAP, producer_id=self.producer_id, model_name=model,
                    disposition=disposition, reason=reason, count=hi - lo + 1, seq_lo=lo, seq_hi=hi)
        lease = self.lease
        if lease is not None:
            row(kind=KIND_LEASE, producer_id=self.producer_id, model_name=lease.model,
                minute=lease.written_us, disposition=KIND_LEASE, count=lease.through + 1,
                seq_lo=0, seq_hi=lease.through)
            if lease.closed_seq is not None:
                row(kind=KIND_CLOSED, producer_id=self.producer_id, model_name=lease.model,
                    minute=lease.written_us, disposition=KIND_CLOSED, count=lease.closed_seq + 1,
                    seq_lo=0, seq_hi=lease.closed_seq)
        return pa.table(cols, schema=COUNTER_SCHEMA)


@dataclass(frozen=True)
class LeaseRow:
    """The lease a counters file carries: calls up to ``through`` may be answered; written at
    ``written_us``; ``closed_seq`` is the last sequence number used, in a clean shutdown's file."""

    model: str
    through: int
    written_us: int
    closed_seq: int | None = None


def counter_sort_key(key: tuple) -> tuple:
    return tuple((v is None, v if v is not None else 0) for v in key)


def _date_of_day(day: int) -> str:
    return (_EPOCH + dt.timedelta(days=day)).strftime("%Y-%m-%d")


def merge_runs(runs: Iterable[Sequence[int]]) -> list[tuple[int, int]]:
    """Sort inclusive ranges and merge overlapping or adjacent ones."""
    out: list[list[int]] = []
    for lo, hi in sorted((int(lo), int(hi)) for lo, hi in runs):
        if out and lo <= out[-1][1] + 1:
            out[-1][1] = max(out[-1][1], hi)
        else:
            out.append([lo, hi])
    return [(lo, hi) for lo, hi in out]


class CounterSet:
    """Exact counters of one producer (replica process); thread-safe, cheap.

    The request path calls :meth:`record` for an entry it drops (buffer full); the flusher calls
    :meth:`record_batch` once per finalized batch and :meth:`flush_to` every few seconds.
    """

    def __init__(self, producer_id: str, signer: CountersSigner | None = None) -> None:
        if not isinstance(producer_id, str) or not producer_id:
            raise ValueError("producer_id must be a non-empty string")
        self.producer_id = producer_id
        self._signer = signer
        self._prev = GENESIS_HASH
        self._prev_path = ""
        self._lock = threading.Lock()
        self._counts: dict[_CountKey, int] = {}
        self._ranges: dict[_RangeKey, list[list[int]]] = {}
        self._file_no = 0
        self._lease: tuple[str, int] | None = None  # (model, through) to carry in every file
        self._closed_seq: int | None = None
        self._write_lock = threading.Lock()  # one writer of the chain at a time (flusher, lease)
        self.durable_lease = -1
        """The highest ``through`` of a lease row already written (calls up to it may be
        answered); -1 before the first."""
        self.last_written = 0.0
        """``time.time()`` of the last counters file written (0: none yet)."""

    def __repr__(self) -> str:
        return f"CounterSet({self.producer_id!r}, keys={len(self._counts)})"

    def record(
        self,
        model: str,
        version: str,
        ts_us: int,
        decision: str | None,
        tier: str,
        sample_rate: float,
        outcome: str,
        seq: int,
        disposition: str,
        reason: str | None = None,
    ) -> None:
        """Count one entry. ``disposition`` is ``kept``, ``sampled_out`` or ``dropped`` (then
        ``reason`` says why, e.g. ``buffer_full``). Never raises on valid types."""
        minute = ts_us - ts_us % _MINUTE_US
        key = (model, version, minute, decision, tier, sample_rate, outcome, disposition, reason)
        with self._lock:
            self._counts[key] = self._counts.get(key, 0) + 1
            if disposition != KEPT:
                self._add_seq((model, ts_us // _DAY_US, disposition, reason), seq)

    def record_batch(
        self,
        model: str | Sequence[str],
        version: str | Sequence[str],
        ts_us: Sequence[int],
        decisions: Sequence[str | None],
        tiers: Sequence[str],
        sample_rates: Sequence[float],
        outcomes: Sequence[str],
        seqs: Sequence[int],
        keep: Sequence[bool],
    ) -> None:
        """Count a finalized batch: each entry is ``kept`` or ``sampled_out`` per ``keep``.

        ``model`` and ``version`` may be one string for the whole batch or one per entry.
        """
        n = len(seqs)
        models = [model] * n if isinstance(model, str) else model
        versions = [version] * n if isinstance(version, str) else version
        local: dict[_CountKey, int] = {}
        gaps: list[tuple[_RangeKey, int]] = []
        for m, v, ts, d, t, r, o, s, k in zip(
            models, versions, ts_us, decisions, tiers, sample_rates, outcomes, seqs, keep,
            strict=True,
        ):
            disposition = KEPT if k else SAMPLED_OUT
            key = (m, v, ts - ts % _MINUTE_US, d, t, r, o, disposition, None)
            local[key] = local.get(key, 0) + 1
            if not k:
                gaps.append(((m, ts // _DAY_US, SAMPLED_OUT, None), s))
        with self._lock:
            counts = self._counts
            for key, c in local.items():
                counts[key] = counts.get(key, 0) + c
            for range_key, s in gaps:
                self._add_seq(range_key, s)

    def _add_seq(self, key: _RangeKey, seq: int) -> None:
        runs = self._ranges.get(key)
        if runs is None:
            self._ranges[key] = [[seq, seq]]
            return
        last = runs[-1]
        if seq == last[1] + 1:
            last[1] = seq
        else:  # out of order (a drop recorded while an earlier batch was finalized): merged later
            runs.append([seq, seq])

    def snapshot_and_reset(self) -> CounterSnapshot:
        """Take every count and range out, leaving the set empty."""
        with self._lock:
            snap = CounterSnapshot(self.producer_id, self._counts, self._ranges)
            self._counts, self._ranges = {}, {}
        return snap

    def restore(self, snapshot: CounterSnapshot) -> None:
        """Merge a snapshot back (its write failed), so nothing is lost or counted twice."""
        with self._lock:
            for key, n in snapshot.counts.items():
                self._counts[key] = self._counts.get(key, 0) + n
            for key, runs in snapshot.ranges.items():
                self._ranges.setdefault(key, []).extend([list(r) for r in runs])
                self._ranges[key].sort()

    def carry_lease(self, model: str, through: int) -> None:
        """From now on, every counters file carries the lease ``through`` (for ``model``'s
        calls); it is durable once :meth:`flush_to` wrote it (see :attr:`durable_lease`)."""
        with self._lock:
            if self._lease is None or through > self._lease[1]:
                self._lease = (model, through)

    def mark_closed(self, last_seq: int) -> None:
        """The producer shuts down; the next :meth:`flush_to` writes the closed mark."""
        with self._lock:
            self._closed_seq = last_seq

    def _take_lease(self, snapshot: CounterSnapshot, keepalive: bool) -> None:
        """Attach the lease row to ``snapshot`` when there is a file to write anyway, the lease
        grew, the producer closes, or ``keepalive`` asks for a file."""
        with self._lock:
            lease, closed = self._lease, self._closed_seq
        if lease is None and closed is None:
            return
        model, through = lease if lease is not None else (self._any_model(snapshot), -1)
        if model is None:
            return
        if snapshot or through > self.durable_lease or closed is not None or keepalive:
            snapshot.lease = LeaseRow(model, through, int(time.time() * 1_000_000), closed)

    @staticmethod
    def _any_model(snapshot: CounterSnapshot) -> str | None:
        for key in (*snapshot.counts, *snapshot.ranges):
            return key[0]
        return None

    def totals(self) -> dict[str, int]:
        """Current (unflushed) counts by disposition."""
        out = dict.fromkeys(DISPOSITIONS, 0)
        with self._lock:
            for key, n in self._counts.items():
                out[key[7]] = out.get(key[7], 0) + n
        return out

    def flush_to(self, storage: JournalStorage, max_attempts: int = 1000, *,
                 keepalive: bool = False) -> list[StoredObject]:
        """Persist everything counted so far as counters files; what fails is restored.

        With a lease (:meth:`carry_lease`), the first file carries it, and then
        :attr:`durable_lease` moves up; ``keepalive`` writes a lease-only file when there is
        nothing else. A file name that exists already (a producer id reused) moves on to the
        next number.
        """
        with self._write_lock:
            return self._flush_to(storage, max_attempts, keepalive)

    def _flush_to(self, storage: JournalStorage, max_attempts: int, keepalive: bool
                  ) -> list[StoredObject]:
        snapshot = self.snapshot_and_reset()
        self._take_lease(snapshot, keepalive)
        written: list[StoredObject] = []
        pending = list(snapshot.parts().items())
        try:
            while pending:
                (model, date), part = pending[0]
                table = part.to_table()
                for _ in range(max_attempts):
                    with self._lock:
                        number = self._file_no
                        self._file_no += 1
                    path = counters_path(model, date, self.producer_id, number)
                    data, digest = self._encode(path, table)
                    try:
                        written.append(storage.put_new(path, data))
                        self._prev, self._prev_path = digest, path
                        self.last_written = time.time()
                        if part.lease is not None:
                            self.durable_lease = max(self.durable_lease, part.lease.through)
                        break
                    except ObjectExistsError:
                        continue
                else:
                    raise ObjectExistsError(
                        f"no free counters file name for producer after {max_attempts} attempts"
                    )
                pending.pop(0)
        except BaseException:
            for _, part in pending:
                self.restore(part)
            raise
        return written


    def _encode(self, path: str, table: pa.Table) -> tuple[bytes, str]:
        """The file's bytes (signed and chained when there is a signer), and its digest."""
        if self._signer is None:
            return encode_counters(table), self._prev
        key_id = self._signer.key_id
        message = signed_message(path, table, key_id, self._prev, self._prev_path)
        signature = base64.b64encode(self._signer.sign(message)).decode("ascii")
        meta = {META_KEY_ID: key_id.encode(), META_SIGNATURE: signature.encode(),
                META_PREV: self._prev.encode(), META_PREV_PATH: self._prev_path.encode()}
        return encode_counters(table, meta), hashlib.sha256(message).hexdigest()


def counters_path(model: str, date: str, producer_id: str, number: int) -> str:
    """Relative path of counters file ``number`` of ``producer_id`` for ``model`` on ``date``."""
    return (
        f"{COUNTERS_DIR}/model={escape_value(model)}/date={date}/"
        f"{escape_value(producer_id)}-{number:08d}{PARQUET_SUFFIX}"
    )


def encode_counters(table: pa.Table, metadata: Mapping[bytes, bytes] | None = None) -> bytes:
    """A counters table as Parquet bytes (zstd; dictionary encoding does the rest), with
    ``metadata`` (the signature fields) added to the schema metadata."""
    sink = pa.BufferOutputStream()
    table = table.cast(COUNTER_SCHEMA)
    if metadata:
        table = table.replace_schema_metadata({**COUNTER_SCHEMA.metadata, **metadata})
    pq.write_table(table, sink, compression="zstd")
    return sink.getvalue().to_pybytes()


def decode_counters(data: bytes) -> pa.Table:
    """Parquet bytes of a counters file as a table with :data:`COUNTER_SCHEMA`."""
    # ParquetFile, not read_table: see sink.parquet.decode_parquet.
    return pq.ParquetFile(pa.BufferReader(data)).read().cast(COUNTER_SCHEMA)


# --------------------------------------------------------------------------- leases, read back

LIVE = "live"
DEAD = "dead"
CLOSED = "closed"


@dataclass(frozen=True)
class ProducerLease:
    """A producer's sequence lease as its signed counters files state it."""

    producer_id: str
    leased_through: int
    """Highest sequence number the producer was allowed to answer (-1: none)."""
    written_us: int
    """When its newest lease row was written (epoch microseconds, the replica's clock)."""
    closed_seq: int | None
    """Last sequence number used, when the producer shut down cleanly; else ``None``."""

    def state(self, now_us: int, stale_s: float = PRODUCER_STALE_S) -> str:
        """``closed``; ``dead`` (not closed and silent for more than ``stale_s``); or ``live``."""
        if self.closed_seq is not None:
            return CLOSED
        return DEAD if now_us - self.written_us > stale_s * 1_000_000 else LIVE


def producer_leases(table: pa.Table) -> dict[str, ProducerLease]:
    """The lease of every producer with ``lease``/``closed`` rows in ``table`` (counters rows
    from files that verified)."""
    rows = table.filter(pc.is_in(table.column("kind"),
                                 value_set=pa.array([KIND_LEASE, KIND_CLOSED])))
    through: dict[str, int] = {}
    written: dict[str, int] = {}
    closed: dict[str, int] = {}
    minutes = rows.column("minute").cast(pa.int64()).to_pylist()
    for kind, producer, minute, hi in zip(rows.column("kind").to_pylist(),
                                          rows.column("producer_id").to_pylist(), minutes,
                                          rows.column("seq_hi").to_pylist(), strict=True):
        written[producer] = max(written.get(producer, 0), minute or 0)
        if kind == KIND_LEASE:
            through[producer] = max(through.get(producer, -1), hi)
        else:
            closed[producer] = max(closed.get(producer, -1), hi)
    return {p: ProducerLease(p, through.get(p, -1), written[p], closed.get(p)) for p in written}


@dataclass(frozen=True)
class LeaseShortfall:
    """Sequence numbers of a producer up to its bound that nothing accounts for."""

    producer_id: str
    state: str
    bound: int
    """The lease (dead producer) or the last sequence number used (closed producer)."""
    missing: list[tuple[int, int]]

    @property
    def count(self) -> int:
        """How many sequence numbers are missing: an upper bound on the entries lost (some may
        never have been used, or never answered)."""
        return sum(hi - lo + 1 for lo, hi in self.missing)


def lease_shortfall(lease: ProducerLease, accounted: Iterable[Sequence[int]], start: int,
                    now_us: int, stale_s: float = PRODUCER_STALE_S) -> LeaseShortfall | None:
    """Sequence numbers in ``[start, bound]`` that ``accounted`` (ranges of rows in the journal
    and of signed gaps) does not cover, for a dead producer (bound: its lease) or a closed one
    (bound: its last sequence number). ``None`` for a live producer: its in-flight range is no
    loss yet."""
    state = lease.state(now_us, stale_s)
    if state == LIVE:
        return None
    bound = lease.closed_seq if state == CLOSED else lease.leased_through
    assert bound is not None
    missing: list[tuple[int, int]] = []
    cursor = start
    for lo, hi in merge_runs(accounted):
        if hi < cursor:
            continue
        if lo > bound:
            break
        if lo > cursor:
            missing.append((cursor, min(lo - 1, bound)))
        cursor = max(cursor, hi + 1)
    if cursor <= bound:
        missing.append((cursor, bound))
    return LeaseShortfall(lease.producer_id, state, bound, missing)
