"""Statistics that combine the exact counters (``serve_journal.counters``) with the sample.

:func:`stats` reports exact counts from the counters and Horvitz-Thompson estimates from the kept
sample (each kept entry weighs ``1 / sample_rate``), with a standard error and a 95 % interval, for
groupings the counters do not have (a caller, a score band). :func:`accounted_gaps` tells verify
which sequence ranges the producers declared not kept, and why.

A count is labelled exact only when it is: every producer that touched it closed cleanly with
nothing unaccounted, and no producer has more rows in the journal than its counters kept. A
producer still open (its latest counters not yet written) makes its groups "at least"; one that
died (see :func:`serve_journal.counters.lease_shortfall`) adds "up to N lost with its death".
"""


from __future__ import annotations

import datetime as dt
import logging
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from serve_journal.catalog import live_files
from serve_journal.catalog.layout import COLD, HOT, PARQUET_SUFFIX, escape_value
from serve_journal.counters import (
    CLOSED,
    COUNT_DIMENSIONS,
    COUNTER_SCHEMA,
    COUNTERS_DIR,
    DISPOSITIONS,
    DROPPED,
    KEPT,
    KIND_COUNT,
    KIND_GAP,
    LIVE,
    PRODUCER_STALE_S,
    SAMPLED_OUT,
    CounterSet,
    CounterSnapshot,
    counter_sort_key,
    counters_path,
    decode_counters,
    encode_counters,
    gap_reason,
    lease_shortfall,
    merge_runs,
    producer_leases,
    read_counters_file,
)
from serve_journal.integrity.certificates import PURPOSE_COUNTERS, certified_keys
from serve_journal.integrity.trust import reader_trust
from serve_journal.schema import DERIVED_SCORES, ENTRY_SCHEMA, restore_output_scores, stored_columns
from serve_journal.storage import JournalStorage
from serve_journal.times import as_utc

log = logging.getLogger(__name__)

CounterKeys = Mapping[str, Ed25519PublicKey]
"""``{key id: public key}`` of the certified counters keys (see :func:`counter_keys`)."""

# --------------------------------------------------------------------------- readers


def counter_keys(storage: JournalStorage, public_key: Ed25519PublicKey) -> dict[str, Ed25519PublicKey]:
    """The counters keys the journal's key ``public_key`` certified."""
    return certified_keys(storage, public_key, PURPOSE_COUNTERS)[0]


def reader_counter_keys(storage: JournalStorage) -> dict[str, Ed25519PublicKey] | None:
    """The counters keys readers accept: certified by the readers' trust anchor, or ``None``
    (every file) when readers have none (see :func:`serve_journal.integrity.trust.reader_trust`)."""
    anchor = reader_trust(storage.uri)
    return None if anchor is None else counter_keys(storage, anchor.public_key)


def _floor_minute(value: dt.datetime | None) -> dt.datetime | None:
    value = as_utc(value)
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
    storage: JournalStorage, since: dt.datetime | None, until: dt.datetime | None,
    model: str | None, keys: CounterKeys | None,
) -> pa.Table:
    tables = []
    for path in _counter_files(storage, since, until, model):
        counters = read_counters_file(path, storage.read(path))
        if keys is not None and not counters.verify(keys):
            log.warning("ignoring counters file %s: not signed by a certified counters key", path)
            continue
        tables.append(counters.table)
    if not tables:
        return COUNTER_SCHEMA.empty_table()
    return pa.concat_tables(tables)


def load_counters(
    storage: JournalStorage,
    since: dt.datetime | None = None,
    until: dt.datetime | None = None,
    model: str | None = None,
) -> pa.Table:
    """Every ``count`` row of minutes in ``[since, until)`` (rounded down to the minute), from
    counters files signed by a key the readers' trust anchor certified (all files without one).

    Columns: :data:`COUNT_DIMENSIONS`, ``producer_id``, ``disposition``, ``reason``, ``count``.
    """
    since, until = _floor_minute(since), _floor_minute(until)
    table = _read_counter_rows(storage, since, until, model, reader_counter_keys(storage))
    return _count_rows(table, since, until, model)


def _count_rows(table: pa.Table, since: dt.datetime | None, until: dt.datetime | None,
                model: str | None) -> pa.Table:
    mask = pc.equal(table["kind"], KIND_COUNT)
    if since is not None:
        mask = pc.and_(mask, pc.greater_equal(table["minute"], pa.scalar(since, table["minute"].type)))
    if until is not None:
        mask = pc.and_(mask, pc.less(table["minute"], pa.scalar(until, table["minute"].type)))
    if model is not None:
        mask = pc.and_(mask, pc.equal(table["model_name"], model))
    return table.filter(mask).drop_columns(["kind", "seq_lo", "seq_hi"])


def accounted_gaps(
    storage: JournalStorage, model: str | None = None, keys: CounterKeys | None = None,
) -> dict[str, list[tuple[int, int, str]]]:
    """Sequence ranges of entries that are not in the journal, and why, per producer; with
    ``keys`` (see :func:`counter_keys`), only from counters files one of them signed.

    The shape ``verify`` takes as ``accounted_gaps``: ``{producer_id: [(lo, hi, reason)]}``, ranges
    inclusive, sorted, adjacent ranges with the same reason merged; reasons are ``sampled_out``
    and ``dropped:<reason>``.
    """
    table = _read_counter_rows(storage, None, None, model, keys)
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
    complete: bool = True
    """``exact`` is the group's exact count; false: a lower bound (a producer of the group is
    still open, died, or has more rows in the journal than its counters kept)."""


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
    not_exact: dict[str, str] = field(default_factory=dict)
    """``{producer_id: why}`` for every producer whose counts are not (yet) exact."""
    lost_up_to: dict[str, int] = field(default_factory=dict)
    """``{producer_id: n}``: up to ``n`` entries lost with that producer's death (or unaccounted
    after its clean close)."""

    @property
    def exact(self) -> bool:
        """Whether :attr:`captured` and every group's ``exact`` are exact."""
        return not self.not_exact

    @property
    def population(self) -> int:
        """Entries that went through sampling (captured minus dropped): what estimates estimate."""
        return self.kept + self.sampled_out

    def format_text(self) -> str:
        """A plain-text table for the CLI."""
        if self.exact:
            label = f"captured {self.captured} (exact)"
        else:
            lost = sum(self.lost_up_to.values())
            label = (f"captured at least {self.captured} (not exact: "
                     + "; ".join(f"{p} {why}" for p, why in sorted(self.not_exact.items())) + ")"
                     + (f"; up to {lost} entries lost with "
                        + ", ".join(f"replica {p}'s death" if "died" in self.not_exact.get(p, "")
                                    else f"replica {p}" for p in sorted(self.lost_up_to))
                        if lost else ""))
        lines = [
            f"{label}: kept {self.kept}, sampled out {self.sampled_out}, "
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
                "-" if g.exact is None else (str(g.exact) if g.complete else f">={g.exact}"),
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
    for data_file in live_files(storage, tier="all", model=model):
        if data_file.tier not in tiers:
            continue
        path, key = data_file.path, data_file.key
        if (first and key.end <= first) or (until and key.start >= until):
            continue
        parquet = pq.ParquetFile(pa.BufferReader(storage.read(path)))
        present = set(parquet.schema_arrow.names)
        part = restore_output_scores(parquet.read(columns=stored_columns(wanted, present)))
        present.discard(DERIVED_SCORES)
        for name in wanted:  # a column added after this file's schema version: nulls
            if name not in present:
                part = part.append_column(ENTRY_SCHEMA.field(name),
                                          pa.nulls(part.num_rows, ENTRY_SCHEMA.field(name).type))
        tables.append(part.select(wanted))
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


def journal_sample(
    storage: JournalStorage,
    columns: Sequence[str],
    since: dt.datetime | None = None,
    until: dt.datetime | None = None,
    model: str | None = None,
    tiers: Sequence[str] = (HOT, COLD),
) -> pa.Table:
    """The kept entries of ``[since, until)`` that :func:`stats` weighs, each once (a file briefly
    in both tiers counts once): ``columns`` plus ``sample_rate``, ``ts``, ``producer_id``,
    ``seq`` and ``model_name``, from the live files of ``tiers``. Feed it to
    :func:`estimate_groups` for weighted counts (each entry weighs ``1 / sample_rate``)."""
    return _journal_sample(storage, columns, as_utc(since, "since"), as_utc(until, "until"),
                           model, tiers)


def stats(
    storage: JournalStorage,
    since: dt.datetime | None = None,
    until: dt.datetime | None = None,
    model: str | None = None,
    group_by: Sequence[str] = ("model_name", "decision", "risk_tier"),
    tiers: Sequence[str] = (HOT, COLD),
    z: float = Z95,
    now: dt.datetime | None = None,
    stale_s: float = PRODUCER_STALE_S,
) -> StatsReport:
    """Exact counts from the counters and weighted estimates from the kept sample.

    ``group_by`` may name any journal column. Where every grouping column is one the counters
    have (:data:`COUNT_DIMENSIONS`), each group also shows its exact count, labelled exact only
    when it is (:attr:`GroupStats.complete`, :attr:`StatsReport.not_exact`). Times are rounded
    down to the minute (the counters' resolution). ``now`` and ``stale_s``: the clock and the
    silence after which an unclosed producer is presumed dead.
    """
    group_by = tuple(group_by)
    if not group_by:
        raise ValueError("group_by must name at least one column")
    since, until = _floor_minute(since), _floor_minute(until)
    # Files from the window's first day on, with no upper bound: a producer's newest lease row
    # (or its closed mark) may be in a later file than its counts.
    every_row = _read_counter_rows(storage, since, None, model, reader_counter_keys(storage))
    counters = _count_rows(every_row, since, until, model)
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

    now_us = int((now or dt.datetime.now(dt.UTC)).timestamp() * 1_000_000)
    not_exact, lost = _not_exact(every_row, counters, sample, since is not None, now_us, stale_s)
    incomplete: set[tuple] = set()
    if not_exact:
        bad = pa.array(sorted(not_exact))
        for table in (counters, sample):
            touched = table.filter(pc.is_in(table["producer_id"], value_set=bad))
            if touched.num_rows and set(group_by) <= set(touched.column_names):
                cols = [touched[c].to_pylist() for c in group_by]
                incomplete.update(tuple(_normalise(c[i]) for c in cols)
                                  for i in range(touched.num_rows))

    population = by_disposition[KEPT] + by_disposition[SAMPLED_OUT]
    has_exact = set(group_by) <= set(COUNT_DIMENSIONS)
    groups = []
    for key in sorted(set(estimates) | set(exact), key=counter_sort_key):
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
            complete=key not in incomplete,
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
        not_exact=not_exact,
        lost_up_to=lost,
    )


def _seq_runs(seqs: pa.Array | pa.ChunkedArray) -> list[tuple[int, int]]:
    """Sorted, merged inclusive runs of the sequence numbers ``seqs``."""
    values = np.unique(np.asarray(seqs, dtype=np.int64))
    if not len(values):
        return []
    breaks = np.nonzero(np.diff(values) != 1)[0]
    starts = values[np.r_[0, breaks + 1]]
    ends = values[np.r_[breaks, len(values) - 1]]
    return list(zip(starts.tolist(), ends.tolist(), strict=True))


def _not_exact(every_row: pa.Table, counts: pa.Table, sample: pa.Table, windowed: bool,
               now_us: int, stale_s: float) -> tuple[dict[str, str], dict[str, int]]:
    """``({producer: why its counts are not exact}, {producer: up to n entries lost})``.

    A leasing producer is exact only once closed with every sequence number up to its last one
    accounted for; a dead one's unaccounted range up to its lease is "lost"; any producer with
    more rows in the journal than its counters kept is not exact (its last counters are
    missing)."""
    leases = producer_leases(every_row)
    gap_rows = every_row.filter(pc.equal(every_row["kind"], KIND_GAP))
    gaps: dict[str, list[tuple[int, int]]] = {}
    for producer, lo, hi in zip(gap_rows["producer_id"].to_pylist(),
                                gap_rows["seq_lo"].to_pylist(), gap_rows["seq_hi"].to_pylist(),
                                strict=True):
        gaps.setdefault(producer, []).append((lo, hi))
    kept_rows = counts.filter(pc.equal(counts["disposition"], KEPT))
    kept: dict[str, int] = {}
    for producer, n in zip(kept_rows["producer_id"].to_pylist(), kept_rows["count"].to_pylist(),
                           strict=True):
        kept[producer] = kept.get(producer, 0) + n
    rows: dict[str, int] = {}
    if sample.num_rows:
        agg = sample.group_by("producer_id", use_threads=False).aggregate([("seq", "count")])
        rows = dict(zip(agg["producer_id"].to_pylist(), agg["seq_count"].to_pylist(), strict=True))
    not_exact: dict[str, str] = {}
    lost: dict[str, int] = {}
    for producer in sorted(set(leases) | set(rows) | set(kept)):
        lease = leases.get(producer)
        if lease is not None:
            state = lease.state(now_us, stale_s)
            if state == LIVE:
                not_exact[producer] = "still open (its latest counts may not be written yet)"
                continue
            seqs = sample.filter(pc.equal(sample["producer_id"], producer))["seq"]
            if windowed and not len(seqs):
                start = lease.leased_through + 1  # nothing of it in the window
            else:
                start = int(pc.min(seqs).as_py()) if windowed else 0
            short = lease_shortfall(lease, _seq_runs(seqs) + gaps.get(producer, []), start,
                                    now_us, stale_s)
            if short is not None and short.count:
                lost[producer] = short.count
                not_exact[producer] = (f"died (silent for over {stale_s:g} s, never closed)"
                                       if state != CLOSED else
                                       "closed with sequence numbers unaccounted for")
                continue
        if rows.get(producer, 0) > kept.get(producer, 0):
            not_exact[producer] = (f"has {rows[producer]} rows in the journal but its counters "
                                   f"kept {kept.get(producer, 0)} (its latest counters are "
                                   "missing)")
    return not_exact, lost


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
    "counter_keys", "reader_counter_keys",
    "counters_path", "decode_counters", "encode_counters", "estimate_groups", "gap_reason",
    "journal_sample", "load_counters", "merge_runs", "stats",
]
