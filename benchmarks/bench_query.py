"""Investigation query benchmark: one day of synthetic fraud entries, point lookups, warm cache.

Writes the day through the real writer encoding (``encode_parquet`` + ``put_new``, several files
per hour partition as rolling writers leave them), compacts it (day-level: one day partition),
then measures subject, request-id and absent-subject lookups with
:class:`serve_journal.read.query.JournalQuery` (access log included), the row groups the footer pruner
probed and read, the row groups DuckDB alone would scan (EXPLAIN ANALYZE), and bytes per entry hot
and cold. The cold tier (zstd 19 is slow to write: ~4 min per million entries here) is measured
on a separate day of ``--cold-rows`` entries.

    .venv/bin/python -m benchmarks.bench_query --rows 10000000
    .venv/bin/python -m benchmarks.bench_query --quick        # 200k rows, no docs update

Results go to stdout and, unless ``--no-docs``, into docs/benchmarks.md between
``<!-- bench_query:start -->`` and ``<!-- bench_query:end -->``.
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import platform
import re
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa

from benchmarks._common import write_docs_section
from serve_journal.catalog import live_files
from serve_journal.catalog.layout import DEFAULT_SPEC
from serve_journal.fileformat import HOT_OPTIONS, encode_parquet
from serve_journal.maintain import lifecycle
from serve_journal.maintain.compaction import CompactionOptions, compact
from serve_journal.read.query import JournalQuery
from serve_journal.schema import ENTRY_SCHEMA, OUTPUT_TYPE, SCHEMA_VERSION, conform_entries
from serve_journal.storage import LocalJournalStorage

DAY = dt.datetime(2025, 6, 1, tzinfo=dt.UTC)
START, END = "<!-- bench_query:start -->", "<!-- bench_query:end -->"
HEX = np.frombuffer(b"0123456789abcdef", dtype="S1")


def hex_strings(rng: np.random.Generator, n: int, nbytes: int) -> np.ndarray:
    raw = rng.integers(0, 256, size=(n, nbytes), dtype=np.uint8)
    chars = np.empty((n, nbytes * 2), dtype="S1")
    chars[:, 0::2] = HEX[raw >> 4]
    chars[:, 1::2] = HEX[raw & 15]
    return chars.view(f"S{nbytes * 2}").ravel()


def strings(values: np.ndarray) -> pa.Array:
    return pa.array(values).cast(pa.string())


def hour_of_entries(rng, hour: int, n: int, subjects: np.ndarray, seq_base: np.ndarray) -> pa.Table:
    """``n`` fraud-shaped entries decided during ``hour`` of DAY."""
    start_us = int((DAY + dt.timedelta(hours=hour)).timestamp() * 1_000_000)
    ts = np.sort(rng.integers(start_us, start_us + 3_600_000_000, n))
    producers = rng.integers(0, 8, n)
    seq = np.empty(n, dtype=np.int64)
    for p in range(8):  # per-producer consecutive sequence numbers
        mask = producers == p
        count = int(mask.sum())
        seq[mask] = seq_base[p] + np.arange(count)
        seq_base[p] += count
    score = rng.beta(0.5, 8, n)
    decision = np.where(score >= 0.5, "block", "allow")
    outcome = np.where(rng.random(n) < 0.001, "error", "ok")
    fraud = pa.StructArray.from_arrays(
        [pa.array(["fraud"] * n), pa.array(score)], fields=list(OUTPUT_TYPE)
    )
    legit = pa.StructArray.from_arrays(
        [pa.array(["legit"] * n), pa.array(1 - score)], fields=list(OUTPUT_TYPE)
    )
    interleaved = pa.concat_arrays([fraud, legit]).take(
        pa.array(np.stack([np.arange(n), np.arange(n) + n], axis=1).ravel())
    )
    outputs = pa.ListArray.from_arrays(pa.array(np.arange(0, 2 * n + 1, 2, dtype=np.int32)), interleaved)
    columns = {
        "schema_version": pa.array(np.full(n, SCHEMA_VERSION, dtype=np.int16)),
        "request_id": strings(hex_strings(rng, n, 16)),
        "ts": pa.array(ts, pa.timestamp("us", tz="UTC")),
        "caller": pa.array(np.array(["payments-api", "checkout", "mobile"])[rng.integers(0, 3, n)]),
        "subject_token": strings(subjects[rng.integers(0, len(subjects), n)]),
        "model_name": pa.array(["fraud"] * n),
        "model_version": pa.array(["7"] * n),
        "dataset_hash": pa.array(["sha256:" + "5e" * 32] * n),
        "dataset_hash_source": pa.array(["tag"] * n),
        "features_hmac": strings(hex_strings(rng, n, 32)),
        "key_id": pa.array(["k-2025-06"] * n),
        "outputs": outputs,
        "score": pa.array(score),
        "threshold": pa.array(np.full(n, 0.5)),
        "decision": pa.array(decision),
        "explanation_ref": pa.nulls(n, pa.string()),
        "outcome": pa.array(outcome),
        "error_type": pa.array(np.where(outcome == "error", "TimeoutError", None).tolist(), pa.string()),
        "latency_ms": pa.array(rng.gamma(2.0, 1.5, n).astype(np.float32)),
        "risk_tier": pa.array(["high"] * n),
        "sample_rate": pa.array(np.ones(n, dtype=np.float32)),
        "producer_id": pa.array(np.array([f"replica-{p}-{p * 7919:08x}" for p in range(8)])[producers]),
        "seq": pa.array(seq),
        "app_name": pa.array(["fraud-app"] * n),
        "deployment": pa.array(["FraudModel"] * n),
        "replica": pa.array(np.array([f"FraudModel#{p}" for p in range(8)])[producers]),
        # Schema v2: the serving model's identity, constant per replica (one model here).
        "model_run_id": pa.array(["8f2c1e4b7a9d4c0e9b1f3a6d2e5c7b80"] * n),
        "model_digest": pa.array(["sha256:" + "3c" * 32] * n),
        "models": pa.nulls(n, ENTRY_SCHEMA.field("models").type),
    }
    return conform_entries(pa.table(columns))


def build(storage, rows: int, files_per_hour: int, seed: int):
    rng = np.random.default_rng(seed)
    subjects = hex_strings(rng, max(1000, rows // 10), 16)
    seq_base = np.zeros(8, dtype=np.int64)
    samples_subject, samples_request = [], []
    per_hour = rows // 24
    for hour in range(24):
        n = per_hour if hour < 23 else rows - per_hour * 23
        table = hour_of_entries(rng, hour, n, subjects, seq_base)
        picks = rng.integers(0, n, 20)
        samples_subject += table["subject_token"].take(pa.array(picks)).to_pylist()
        samples_request += table["request_id"].take(pa.array(picks)).to_pylist()
        key = DEFAULT_SPEC.key_for("fraud", DAY + dt.timedelta(hours=hour))
        step = -(-n // files_per_hour)
        for j, offset in enumerate(range(0, n, step)):  # rolled by age: consecutive time slices
            storage.put_new(
                DEFAULT_SPEC.file_path(key, f"w-{hour:02d}-{j:04d}"),
                encode_parquet(table.slice(offset, step), HOT_OPTIONS),
            )
    return samples_subject, samples_request, rng


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(q * (len(ordered) - 1))))]


def timed(q: JournalQuery, keys: list[str], field: str, rounds: int, tier: str = "hot") -> tuple[list[float], int]:
    times, found = [], 0
    for _ in range(rounds):
        for key in keys:
            t = time.perf_counter()
            found += q.find(tier=tier, **{field: key}).num_rows
            times.append((time.perf_counter() - t) * 1000)
    return times, found


def row_groups(q: JournalQuery, keys: list[str], field: str) -> tuple[float, int, float, float]:
    """(DuckDB EXPLAIN ANALYZE row groups scanned, of total; pruner row groups probed, read)."""
    scanned, probed, read = [], [], []
    total = 0
    for key in keys:
        profile = q.explain_analyze(**{field: key})
        scanned.append(profile["query"]["total_row_groups_scanned"])
        total = profile["query"]["total_row_groups_to_scan"]
        q.find(**{field: key})
        probed.append(q.last_stats.row_groups_probed or 0)
        read.append(q.last_stats.row_groups_read or 0)
    return statistics.mean(scanned), total, statistics.mean(probed), statistics.mean(read)


def machine() -> str:
    cpu = platform.processor() or "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem = "unknown"
    try:
        kb = int(re.search(r"MemTotal:\s+(\d+)", Path("/proc/meminfo").read_text()).group(1))
        mem = f"{kb / 1024 / 1024:.1f} GiB"
    except (OSError, AttributeError):
        pass
    import duckdb

    return (
        f"Machine: {os.cpu_count()} cores, {cpu}, {mem} RAM; Python {platform.python_version()}, "
        f"pyarrow {pa.__version__}, duckdb {duckdb.__version__}; {platform.platform()}."
    )


def write_docs(section: str, path: Path) -> None:
    write_docs_section(path, START, END, section)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=10_000_000)
    parser.add_argument("--quick", action="store_true", help="200k rows, fewer lookups, no docs")
    parser.add_argument("--files-per-hour", type=int, default=24)
    parser.add_argument("--lookups", type=int, default=100, help="distinct keys per lookup kind")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--no-cold", action="store_true", help="skip the cold-tier rewrite")
    parser.add_argument("--cold-rows", type=int, default=500_000,
                        help="entries of the separate day moved to the cold tier")
    parser.add_argument("--no-docs", action="store_true")
    parser.add_argument("--dir", default=None, help="work directory (default: a temp dir)")
    parser.add_argument("--seed", type=int, default=7)
    args = parser.parse_args(argv)
    if args.quick:
        args.rows, args.lookups, args.rounds, args.no_docs = 200_000, 30, 2, True
        args.cold_rows = 100_000

    workdir = Path(args.dir or tempfile.mkdtemp(prefix="bench-query-"))
    root = workdir / "journal"
    if root.exists():
        shutil.rmtree(root)
    storage = LocalJournalStorage(str(root))
    out: list[str] = []

    t = time.perf_counter()
    subjects, requests, rng = build(storage, args.rows, args.files_per_hour, args.seed)
    write_s = time.perf_counter() - t
    raw_files = len(live_files(storage))
    raw_bpe = lifecycle.bytes_per_entry(storage, "hot")
    t = time.perf_counter()
    compact(storage, now=DAY + dt.timedelta(days=1, hours=1), options=CompactionOptions())
    compact_s = time.perf_counter() - t
    hot_bpe = lifecycle.bytes_per_entry(storage, "hot")
    files = len(live_files(storage))
    print(f"wrote {args.rows:,} rows in {raw_files} files ({write_s:.1f} s), compacted to {files} "
          f"files ({compact_s:.1f} s)", file=sys.stderr)

    lookups = min(args.lookups, len(subjects))
    picks = rng.choice(len(subjects), lookups, replace=False)
    subject_keys = [subjects[i] for i in picks]
    request_keys = [requests[i] for i in picks]
    absent_keys = [bytes(hex_strings(rng, 1, 16)[0]).decode() for _ in range(lookups)]

    results = []
    day_files = live_files(storage)
    row_groups_day = sum(
        __import__("pyarrow.parquet").parquet.ParquetFile(storage.full_path(f.path)).num_row_groups
        for f in day_files
    )
    q = JournalQuery(storage, actor="bench_query")
    t = time.perf_counter()
    q.find(subject_token=subject_keys[0])
    first_ms = (time.perf_counter() - t) * 1000
    for field, keys, label in (
        ("subject_token", subject_keys, "subject lookup"),
        ("request_id", request_keys, "request-id lookup"),
        ("subject_token", absent_keys, "absent subject"),
    ):
        timed(q, keys[:10], field, 1)  # warm the metadata cache
        times, found = timed(q, keys, field, args.rounds)
        rg, total, probed, read = row_groups(q, keys[:20], field)
        q.prune_point_lookups = False  # DuckDB alone over the same files, for comparison
        timed(q, keys[:5], field, 1)
        duck, _ = timed(q, keys[:20], field, 1)
        q.prune_point_lookups = True
        results.append((label, pct(times, 0.5), pct(times, 0.99), found / args.rounds / len(keys),
                        rg, total, probed, read, pct(duck, 0.5)))
    q.close()

    cold_bpe = cold_rows = None
    if not args.no_cold:
        cold_storage = LocalJournalStorage(str(workdir / "journal-cold"))
        cold_subjects, _, _ = build(cold_storage, args.cold_rows, args.files_per_hour, args.seed + 1)
        compact(cold_storage, now=DAY + dt.timedelta(days=1, hours=1))
        cold_hot_bpe = lifecycle.bytes_per_entry(cold_storage, "hot")
        t = time.perf_counter()
        report = lifecycle.apply(cold_storage,
                                 lifecycle.plan(cold_storage, DAY + dt.timedelta(days=31)),
                                 dry_run=False)
        cold_s = time.perf_counter() - t
        cold_bpe = lifecycle.bytes_per_entry(cold_storage, "cold")
        qc = JournalQuery(cold_storage, actor="bench_query")
        keys = cold_subjects[:lookups]
        timed(qc, keys[:10], "subject_token", 1, tier="all")
        times, _ = timed(qc, keys, "subject_token", 1, tier="all")
        cold_rows = (pct(times, 0.5), pct(times, 0.99), cold_s, len(report.moved), cold_hot_bpe)
        qc.close()

    out.append("## Investigation queries (`benchmarks/bench_query.py`)\n")
    out.append(f"Run {dt.datetime.now(dt.UTC):%Y-%m-%d %H:%M} UTC. {machine()}\n")
    out.append(
        f"One day of {args.rows:,} synthetic fraud entries ({len(subjects) and args.rows // max(1000, args.rows // 10)} "
        f"entries per subject on average, 8 producers), written through `encode_parquet` + "
        f"`put_new` as {raw_files} files ({args.files_per_hour} per hour partition) in "
        f"{write_s:.0f} s, compacted (day level) into {files} files of the day partition "
        f"`hour=all`, {row_groups_day} row groups of {CompactionOptions().row_group_size // 1024}k "
        f"rows, in {compact_s:.0f} s. "
        f"Times are `JournalQuery.find` end to end (listing, footer pruning, DuckDB, access-log "
        f"write with fsync), warm cache, {lookups} distinct keys x {args.rounds} rounds. Row "
        f"groups (mean over 20 keys): *probed* = key column read because statistics and bloom "
        f"filter said maybe, *read* = read in full; *DuckDB alone* = EXPLAIN ANALYZE "
        f"`total_row_groups_scanned` when the same SQL runs over the files without the pruner, "
        f"and its p50 over 20 keys.\n"
    )
    out.append("| lookup | p50 ms | p99 ms | rows found (mean) | row groups probed / read | "
               "DuckDB alone: row groups scanned, p50 ms | target |")
    out.append("|---|---|---|---|---|---|---|")
    targets = {"subject lookup": "p99 <= 50", "request-id lookup": "p50 <= 50, p99 <= 200",
               "absent subject": "<= 20"}
    for label, p50, p99, found, rg, total, probed, read, duck in results:
        out.append(f"| {label} | {p50:.1f} | {p99:.1f} | {found:.1f} | {probed:.1f} / {read:.1f} "
                   f"of {total} | {rg:.1f} of {total}, {duck:.0f} ms | {targets[label]} |")
    out.append(f"\nFirst query after opening (cold metadata cache): {first_ms:.0f} ms.\n")
    out.append("| bytes per entry on disk | value | target |")
    out.append("|---|---|---|")
    out.append(f"| hot, as written ({args.files_per_hour} files/hour) | {raw_bpe:.1f} | |")
    out.append(f"| hot, compacted | {hot_bpe:.1f} | <= 90 |")
    if cold_bpe is not None and cold_rows is not None:
        out.append(f"| cold (zstd 19, 1M-row groups, subject bloom only; separate day of "
                   f"{args.cold_rows:,} entries, {cold_rows[4]:.1f} B hot) | {cold_bpe:.1f} | <= 72 |")
        out.append(
            f"\nLifecycle moved {cold_rows[3]} partition(s) ({args.cold_rows:,} entries) to cold "
            f"in {cold_rows[2]:.0f} s; subject lookups on the cold tier: p50 {cold_rows[0]:.1f} "
            f"ms, p99 {cold_rows[1]:.1f} ms."
        )
    section = "\n".join(out)
    print(section)
    if not args.no_docs:
        write_docs(section, Path(__file__).resolve().parent.parent / "docs" / "benchmarks.md")
    if args.dir is None:
        shutil.rmtree(workdir, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
