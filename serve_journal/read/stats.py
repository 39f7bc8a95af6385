"""Exact, unsampled counters beside the journal, and statistics that combine them with the sample.

Every captured entry is counted in the replica, whatever happens to it afterwards: kept, sampled
out by its tier's rate, or dropped under backpressure (with a reason). The counts are grouped by
``(model, version, minute, decision, tier, sample rate, outcome, disposition, reason)``; in
addition the sequence numbers of entries that were *not* kept are recorded per producer as
run-length ranges, so that ``verify`` can explain every gap in a producer's sequence.

The flusher persists a :class:`CounterSet` every few seconds as small create-only Parquet files::

    <root>/_counters/model=<model>/date=<YYYY-MM-DD>/<producer_id>-<n>.parquet

Each file holds two kinds of rows (column ``kind``): ``"count"`` rows with the counter key and a
count, and ``"gap"`` rows with a sequence range ``[seq_lo, seq_hi]`` of entries that are not in the
journal and why (``disposition`` and ``reason``).

:func:`stats` reports exact counts from the counters and Horvitz-Thompson estimates from the kept
sample (each kept entry weighs ``1 / sample_rate``), with a standard error and a 95 % interval, for
groupings the counters do not have (a caller, a score band).
"""

from __future__ import annotations

import datetime as dt
import math
import threading
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from serve_journal.catalog.layout import COLD, DEFAULT_SPEC, HOT, PARQUET_SUFFIX, escape_value
from serve_journal.schema import ENTRY_SCHEMA
from serve_journal.storage import JournalStorage, ObjectExistsError, StoredObject

COUNTERS_DIR = "_counters"

KEPT = "kept"
SAMPLED_OUT = "sampled_out"
DROPPED = "dropped"
DISPOSITIONS = (KEPT, SAMPLED_OUT, DROPPED)

KIND_COUNT = "count"
KIND_GAP = "gap"

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

    def __bool__(self) -> bool:
        return bool(self.counts) or bool(self.ranges)

    def parts(self) -> dict[tuple[str, str], CounterSnapshot]:
        """This snapshot split by (model, date), one part per counters file."""
        out: dict[tuple[str, str], CounterSnapshot] = {}
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

        for key, n in sorted(self.counts.items(), key=lambda item: _sort_key(item[0])):
            model, version, minute_us, decision, tier, rate, outcome, disposition, reason = key
            row(kind=KIND_COUNT, producer_id=self.producer_id, model_name=model,
                model_version=version, minute=minute_us, decision=decision, risk_tier=tier,
                sample_rate=rate, outcome=outcome, disposition=disposition, reason=reason, count=n)
        for key in sorted(self.ranges, key=_sort_key):
            model, _day, disposition, reason = key
            for lo, hi in merge_runs(self.ranges[key]):
                row(kind=KIND_GAP, producer_id=self.producer_id, model_name=model,
                    disposition=disposition, reason=reason, count=hi - lo + 1, seq_lo=lo, seq_hi=hi)
        return pa.table(cols, schema=COUNTER_SCHEMA)


def _sort_key(key: tuple) -> tuple:
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

    def __init__(self, producer_id: str) -> None:
        if not isinstance(producer_id, str) or not producer_id:
            raise ValueError("producer_id must be a non-empty string")
        self.producer_id = producer_id
        self._lock = threading.Lock()
        self._counts: dict[_CountKey, int] = {}
        self._ranges: dict[_RangeKey, list[list[int]]] = {}
        self._file_no = 0

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

    def totals(self) -> dict[str, int]:
        """Current (unflushed) counts by disposition."""
        out = dict.fromkeys(DISPOSITIONS, 0)
        with self._lock:
            for key, n in self._counts.items():
                out[key[7]] = out.get(key[7], 0) + n
        return out

    def flush_to(self, storage: JournalStorage, max_attempts: int = 1000) -> list[StoredObject]:
        """Persist everything counted so far as counters files; what fails is restored.

        A file name that exists already (a producer id reused) moves on to the next number.
        """
        snapshot = self.snapshot_and_reset()
        written: list[StoredObject] = []
        pending = list(snapshot.parts().items())
        try:
            while pending:
                (model, date), part = pending[0]
                data = encode_counters(part.to_table())
                for _ in range(max_attempts):
                    with self._lock:
                        number = self._file_no
                        self._file_no += 1
                    path = counters_path(model, date, self.producer_id, number)
                    try:
                        written.append(storage.put_new(path, data))
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


def counters_path(model: str, date: str, producer_id: str, number: int) -> str:
    """Relative path of counters file ``number`` of ``producer_id`` for ``model`` on ``date``."""
    return (
        f"{COUNTERS_DIR}/model={escape_value(model)}/date={date}/"
        f"{escape_value(producer_id)}-{number:08d}{PARQUET_SUFFIX}"
    )


def encode_counters(table: pa.Table) -> bytes:
    """A counters table as Parquet bytes (zstd; dictionary encoding does the rest)."""
    sink = pa.BufferOutputStream()
    pq.write_table(table.cast(COUNTER_SCHEMA), sink, compression="zstd")
    return sink.getvalue().to_pybytes()


def decode_counters(data: bytes) -> pa.Table:
    """Parquet bytes of a counters file as a table with :data:`COUNTER_SCHEMA`."""
    # ParquetFile, not read_table: see sink.parquet.decode_parquet.
    return pq.ParquetFile(pa.BufferReader(data)).read().cast(COUNTER_SCHEMA)


# --------------------------------------------------------------------------- readers


def _as_utc(value: dt.datetime | None) -> dt.datetime | None:
    if value is None:
        return None
    if value.tzinfo is None:
        return value.replace(tzinfo=dt.UTC)
    return value.astimezone(dt.UTC)


def _floor_minute(value: dt.datetime | None) -> dt.datetime | None:
    value = _as_utc(value)
    return None if value is None else value.replace(second=0, microsecond=0)


def _counter_files(
    storage: JournalStorage, since: dt.datetime | None, until: dt.datetime | None, model: str | None
) -> list[str]:
    prefix = f"{COUNTERS_DIR}/model={escape_value(model)}/" if model else f"{COUNTERS_DIR}/"
    first = since.strftime("%Y-%m-%d") if since else None
    last = until.strftime("%Y-%m-%d") if until else None
    out = []
    for path in storage.list_files(prefix, PARQUET_SUFFIX):
        parts = path.split("/")
        if len(parts) != 4 or not parts[2].startswith("date="):
            continue
        date = parts[2][len("date="):]
        if (first and date < first) or (last and date > last):
            continue
        out.append(path)
    return out


def _read_counter_rows(
    storage: JournalStorage, since: dt.datetime | None, until: dt.datetime | None, model: str | None
) -> pa.Table:
    tables = []
    for path in _counter_files(storage, since, until, model):
        try:
            tables.append(decode_counters(storage.read(path)))
        except (pa.ArrowInvalid, pa.ArrowTypeError, ValueError) as exc:
            raise ValueError(f"counters file {path} is not a valid counters Parquet file") from exc
    if not tables:
        return COUNTER_SCHEMA.empty_table()
    return pa.concat_tables(tables)


def load_counters(
    storage: JournalStorage,
    since: dt.datetime | None = None,
    until: dt.datetime | None = None,
    model: str | None = None,
) -> pa.Table:
    """Every ``count`` row of minutes in ``[since, until)`` (rounded down to the minute).

    Columns: :data:`COUNT_DIMENSIONS`, ``producer_id``, ``disposition``, ``reason``, ``count``.
    """
    since, until = _floor_minute(since), _floor_minute(until)
    table = _read_counter_rows(storage, since, until, model)
    mask = pc.equal(table["kind"], KIND_COUNT)
    if since is not None:
        mask = pc.and_(mask, pc.greater_equal(table["minute"], pa.scalar(since, table["minute"].type)))
    if until is not None:
        mask = pc.and_(mask, pc.less(table["minute"], pa.scalar(until, table["minute"].type)))
    if model is not None:
        mask = pc.and_(mask, pc.equal(table["model_name"], model))
    return table.filter(mask).drop_columns(["kind", "seq_lo", "seq_hi"])


def accounted_gaps(
    storage: JournalStorage, model: str | None = None
) -> dict[str, list[tuple[int, int, str]]]:
    """Sequence ranges of entries that are not in the journal, and why, per producer.

    The shape ``verify`` takes as ``accounted_gaps``: ``{producer_id: [(lo, hi, reason)]}``, ranges
    inclusive, sorted, adjacent ranges with the same reason merged; reasons are ``sampled_out``
    and ``dropped:<reason>``.
    """
    table = _read_counter_rows(storage, None, None, model)
    table = table.filter(pc.equal(table["kind"], KIND_GAP))
    grouped: dict[str, dict[str, list[tuple[int, int]]]] = {}
    for producer, disposition, reason, lo, hi in zip(
        table["producer_id"].to_pylist(), table["disposition"].to_pylist(),
        table["reason"].to_pylist(), table["seq_lo"].to_pylist(), table["seq_hi"].to_pylist(),
        strict=True,
    ):
        grouped.setdefault(producer, {}).setdefault(gap_reason(disposition, reason), []).append((lo, hi))
    out: dict[str, list[tuple[int, int, str]]] = {}
    for producer, by_reason in grouped.items():
        ranges = [
            (lo, hi, why) for why, runs in by_reason.items() for lo, hi in merge_runs(runs)
        ]
        out[producer] = sorted(ranges)
    return out


# --------------------------------------------------------------------------- statistics

Z95 = 1.959963984540054


@dataclass(frozen=True)
class GroupStats:
    """One group of a :class:`StatsReport`."""

    group: dict[str, Any]
    exact: int | None
    """Exact number of captured entries (counters), when the grouping is one the counters have."""
    dropped: int | None
    """Of those, dropped under backpressure (never had a chance to be kept)."""
    kept: int
    """Entries of the group in the journal."""
    estimate: float
    """Horvitz-Thompson estimate of the group's entries (kept and sampled out): sum of weights."""
    se: float
    """Standard error of ``estimate`` (Poisson sampling: sqrt(sum (1 - p) / p**2))."""
    ci95: tuple[float, float]
    rate: float | None
    """``estimate`` as a share of the sampled population (exact count of kept + sampled out)."""
    rate_ci95: tuple[float, float] | None


@dataclass(frozen=True)
class StatsReport:
    """What ``serve-journal stats`` prints."""

    group_by: tuple[str, ...]
    captured: int
    """Exact entries captured in the window (counters), every disposition."""
    kept: int
    sampled_out: int
    dropped: int
    dropped_by_reason: dict[str, int]
    journal_rows: int
    groups: list[GroupStats]

    @property
    def population(self) -> int:
        """Entries that went through sampling (captured minus dropped): what estimates estimate."""
        return self.kept + self.sampled_out

    def format_text(self) -> str:
        """A plain-text table for the CLI."""
        lines = [
            f"captured {self.captured} (exact): kept {self.kept}, sampled out {self.sampled_out}, "
            f"dropped {self.dropped}"
            + (f" {self.dropped_by_reason}" if self.dropped_by_reason else "")
            + f"; journal rows {self.journal_rows}",
            "  ".join([*self.group_by, "exact", "dropped", "kept", "estimate", "+-95%", "rate",
                       "rate 95% CI"]),
        ]
        for g in self.groups:
            half = g.ci95[1] - g.estimate
            rate = "-" if g.rate is None else f"{g.rate:.4f}"
            rate_ci = "-" if g.rate_ci95 is None else f"[{g.rate_ci95[0]:.4f}, {g.rate_ci95[1]:.4f}]"
            lines.append("  ".join([
                *(str(g.group[c]) for c in self.group_by),
                "-" if g.exact is None else str(g.exact),
                "-" if g.dropped is None else str(g.dropped),
                str(g.kept), f"{g.estimate:.1f}", f"{half:.1f}", rate, rate_ci,
            ]))
        return "\n".join(lines)


def estimate_groups(
    sample: pa.Table, group_by: Sequence[str], z: float = Z95
) -> dict[tuple, tuple[int, float, float]]:
    """Horvitz-Thompson estimates from kept entries: ``{group: (kept, estimate, se)}``.

    ``sample`` needs the ``group_by`` columns and ``sample_rate``; each row weighs ``1/rate``;
    under independent (Poisson) sampling the variance estimate is ``sum((1 - p) / p**2)``.
    """
    group_by = list(group_by)
    rate = pc.cast(sample["sample_rate"], pa.float64())
    weight = pc.divide(1.0, rate)
    var = pc.multiply(weight, pc.subtract(weight, 1.0))  # (1 - p) / p**2 = w (w - 1)
    table = pa.table({**{c: sample[c] for c in group_by}, "_w": weight, "_v": var})
    agg = table.group_by(group_by, use_threads=False).aggregate(
        [("_w", "count"), ("_w", "sum"), ("_v", "sum")]
    )
    out = {}
    keys = [agg[c].to_pylist() for c in group_by]
    for i, (n, w, v) in enumerate(zip(
        agg["_w_count"].to_pylist(), agg["_w_sum"].to_pylist(), agg["_v_sum"].to_pylist(),
        strict=True,
    )):
        out[tuple(k[i] for k in keys)] = (int(n), float(w), math.sqrt(max(float(v), 0.0)))
    return out


def _journal_sample(
    storage: JournalStorage,
    columns: Sequence[str],
    since: dt.datetime | None,
    until: dt.datetime | None,
    model: str | None,
    tiers: Sequence[str],
) -> pa.Table:
    wanted = sorted(
        (set(columns) - {"minute"}) | {"sample_rate", "ts", "producer_id", "seq", "model_name"}
    )
    first = since.replace(minute=0) if since else None
    tables = []
    for tier in tiers:
        prefix = f"{tier}/model={escape_value(model)}/" if model else f"{tier}/"
        for path in storage.list_files(prefix, PARQUET_SUFFIX):
            try:
                _, key = DEFAULT_SPEC.parse(path)
            except ValueError:
                continue
            if (first and key.end <= first) or (until and key.start >= until):
                continue
            parquet = pq.ParquetFile(pa.BufferReader(storage.read(path)))
            tables.append(parquet.read(columns=wanted))
    if not tables:
        table = ENTRY_SCHEMA.empty_table().select(wanted)
    else:
        table = pa.concat_tables(tables, promote_options="default")
    mask = None
    if since is not None:
        mask = pc.greater_equal(table["ts"], pa.scalar(since, table["ts"].type))
    if until is not None:
        upper = pc.less(table["ts"], pa.scalar(until, table["ts"].type))
        mask = upper if mask is None else pc.and_(mask, upper)
    if mask is not None:
        table = table.filter(mask)
    # A file briefly present in both tiers (hot -> cold move) must not count twice.
    if table.num_rows:
        indexed = table.append_column("_i", pa.array(range(table.num_rows), pa.int64()))
        firsts = indexed.group_by(["producer_id", "seq"], use_threads=False).aggregate(
            [("_i", "min")]
        )
        if firsts.num_rows != table.num_rows:
            table = table.take(pc.sort(firsts["_i_min"]))
    if "minute" in columns:
        table = table.append_column("minute", pc.floor_temporal(table["ts"], unit="minute"))
    return table


def stats(
    storage: JournalStorage,
    since: dt.datetime | None = None,
    until: dt.datetime | None = None,
    model: str | None = None,
    group_by: Sequence[str] = ("model_name", "decision", "risk_tier"),
    tiers: Sequence[str] = (HOT, COLD),
    z: float = Z95,
) -> StatsReport:
    """Exact counts from the counters and weighted estimates from the kept sample.

    ``group_by`` may name any journal column. Where every grouping column is one the counters
    have (:data:`COUNT_DIMENSIONS`), each group also shows its exact count. Times are rounded down
    to the minute (the counters' resolution).
    """
    group_by = tuple(group_by)
    if not group_by:
        raise ValueError("group_by must name at least one column")
    since, until = _floor_minute(since), _floor_minute(until)
    counters = load_counters(storage, since, until, model)
    by_disposition = dict.fromkeys(DISPOSITIONS, 0)
    dropped_by_reason: dict[str, int] = {}
    for disposition, reason, n in zip(
        counters["disposition"].to_pylist(), counters["reason"].to_pylist(),
        counters["count"].to_pylist(), strict=True,
    ):
        by_disposition[disposition] = by_disposition.get(disposition, 0) + n
        if disposition == DROPPED:
            dropped_by_reason[reason or "unknown"] = dropped_by_reason.get(reason or "unknown", 0) + n

    sample = _journal_sample(storage, group_by, since, until, model, tiers)
    estimates = estimate_groups(sample, group_by, z)

    exact: dict[tuple, int] = {}
    dropped: dict[tuple, int] = {}
    if set(group_by) <= set(COUNT_DIMENSIONS) and counters.num_rows:
        cols = [counters[c].to_pylist() for c in group_by]
        for i, (disposition, n) in enumerate(zip(
            counters["disposition"].to_pylist(), counters["count"].to_pylist(), strict=True
        )):
            key = tuple(_normalise(c[i]) for c in cols)
            exact[key] = exact.get(key, 0) + n
            if disposition == DROPPED:
                dropped[key] = dropped.get(key, 0) + n
    estimates = {tuple(_normalise(v) for v in k): e for k, e in estimates.items()}

    population = by_disposition[KEPT] + by_disposition[SAMPLED_OUT]
    has_exact = set(group_by) <= set(COUNT_DIMENSIONS)
    groups = []
    for key in sorted(set(estimates) | set(exact), key=_sort_key):
        kept, estimate, se = estimates.get(key, (0, 0.0, 0.0))
        rate = rate_ci = None
        if population:
            rate = estimate / population
            rate_ci = (max(0.0, (estimate - z * se) / population), min(1.0, (estimate + z * se) / population))
        groups.append(GroupStats(
            group=dict(zip(group_by, key, strict=True)),
            exact=exact.get(key, 0) if has_exact else None,
            dropped=dropped.get(key, 0) if has_exact else None,
            kept=kept,
            estimate=estimate,
            se=se,
            ci95=(max(0.0, estimate - z * se), estimate + z * se),
            rate=rate,
            rate_ci95=rate_ci,
        ))
    return StatsReport(
        group_by=group_by,
        captured=sum(by_disposition.values()),
        kept=by_disposition[KEPT],
        sampled_out=by_disposition[SAMPLED_OUT],
        dropped=by_disposition[DROPPED],
        dropped_by_reason=dropped_by_reason,
        journal_rows=sample.num_rows,
        groups=groups,
    )


def _normalise(value: Any) -> Any:
    """Make counter and journal values comparable (float32 rates, minute timestamps)."""
    if isinstance(value, float):
        return float(pa.scalar(value, pa.float32()).as_py())
    if isinstance(value, dt.datetime):
        return value.astimezone(dt.UTC).replace(second=0, microsecond=0)
    return value


__all__ = [
    "COUNTERS_DIR", "COUNTER_SCHEMA", "COUNT_DIMENSIONS", "DISPOSITIONS", "DROPPED", "KEPT",
    "SAMPLED_OUT", "CounterSet", "CounterSnapshot", "GroupStats", "StatsReport", "accounted_gaps",
    "counters_path", "decode_counters", "encode_counters", "estimate_groups", "gap_reason",
    "load_counters", "merge_runs", "stats",
]
