"""Verify-only replay benchmark: N journal entries, their feature history, Ray Data on this machine.

Builds a journal of ``N`` fraud-shaped entries made by the real :class:`VaultPseudonymizer`
(per-subject keys in a SQLite vault), written with the real writer encoding into one hour
partition (files of 100k rows, as compaction leaves them), and a :class:`ParquetFeatureStore`
holding the features each entry was decided on (one history row per entry, written before it
and after every earlier decision). Then times :func:`serve_journal.replay.replay` (verify only,
per-entry results written to Parquet) on a local Ray with the machine's cores, and checks every
entry verified.

    .venv/bin/python -m benchmarks.bench_replay --entries 1000000
    .venv/bin/python -m benchmarks.bench_replay --entries 100000 --no-docs

Results go to stdout and, unless ``--no-docs``, into docs/benchmarks.md between
``<!-- bench_replay:start -->`` and ``<!-- bench_replay:end -->``.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path

import duckdb
import numpy as np
import pyarrow as pa
import ray

from benchmarks._common import write_docs_section
from serve_journal.catalog.layout import DEFAULT_SPEC
from serve_journal.fileformat import encode_parquet
from serve_journal.integrity.encoding import canonical_encode
from serve_journal.privacy.keyring import Keyring
from serve_journal.privacy.subjects import VaultPseudonymizer
from serve_journal.privacy.vault import SubjectVault
from serve_journal.replay import ParquetFeatureStore, VaultVerifier, replay
from serve_journal.schema import ENTRY_SCHEMA, conform_entries
from serve_journal.storage import LocalJournalStorage

START, END = "<!-- bench_replay:start -->", "<!-- bench_replay:end -->"
HOUR = dt.datetime(2025, 6, 1, 10, tzinfo=dt.UTC)
FILE_ROWS = 100_000


def _features(rng: np.random.Generator, n: int) -> list[dict]:
    amount = np.round(rng.lognormal(3.5, 1.2, n), 2)
    hour = rng.integers(0, 24, n)
    risk = np.round(rng.beta(2, 5, n), 4)
    distance = np.round(rng.exponential(20.0, n), 3)
    card_age = rng.integers(1, 3000, n)
    foreign = rng.integers(0, 2, n)
    return [{"amount": float(a), "hour": int(h), "merchant_risk": float(r), "distance_km": float(d),
             "card_age_days": int(c), "foreign": int(f)}
            for a, h, r, d, c, f in zip(amount, hour, risk, distance, card_age, foreign, strict=True)]


def build(workdir: Path, n: int, subjects: int, seed: int) -> dict:
    """Journal + feature store + keys under ``workdir``; returns build figures."""
    started = time.monotonic()
    rng = np.random.default_rng(seed)
    privacy = workdir / "journal-keys"
    keyring = Keyring.local_default(privacy)
    vault = SubjectVault.local_default(privacy, keyring)
    pseudonymizer = VaultPseudonymizer(keyring, vault, cache_size=subjects + 1)
    storage = LocalJournalStorage(str(workdir / "journal"))
    store = ParquetFeatureStore(workdir / "features", batch_rows=FILE_ROWS)
    start_us = int(HOUR.timestamp() * 1_000_000)
    # Entry i is decided in slot i (random point in its first half); its features are written at
    # the slot's start, after every earlier decision: so "latest at or before" is always its own
    # row, also for a subject with two decisions a few microseconds apart.
    step = 3_600_000_000 // n
    slots = start_us + np.arange(n, dtype=np.int64) * step
    ts_all = slots + rng.integers(0, max(1, step // 2), n)
    key = DEFAULT_SPEC.key_for("fraud", HOUR)
    for chunk, begin in enumerate(range(0, n, FILE_ROWS)):
        ts = ts_all[begin:begin + FILE_ROWS]
        feature_ts = slots[begin:begin + FILE_ROWS]
        m = len(ts)
        users = [f"user-{int(u):06d}" for u in rng.integers(0, subjects, m)]
        feats = _features(rng, m)
        store.write_many(users, feats, [int(t) for t in feature_ts])
        protected = pseudonymizer.protect(users, [canonical_encode(f) for f in feats])
        scores = rng.random(m)
        # Entries of schema v1 (no model identity columns), conformed as a reader does.
        table = conform_entries(pa.table({
            "schema_version": pa.array([1] * m, pa.int16()),
            "request_id": pa.array([f"req-{begin + i:09d}" for i in range(m)], pa.string()),
            "ts": pa.array(ts, pa.int64()).cast(pa.timestamp("us", tz="UTC")),
            "caller": pa.array(["checkout"] * m, pa.string()),
            "subject_token": pa.array([p.subject_token for p in protected], pa.string()),
            "model_name": pa.array(["fraud"] * m, pa.string()),
            "model_version": pa.array(["1"] * m, pa.string()),
            "dataset_hash": pa.array(["sha256:" + "0" * 64] * m, pa.string()),
            "dataset_hash_source": pa.array(["tag"] * m, pa.string()),
            "features_hmac": pa.array([p.features_hmac for p in protected], pa.string()),
            "key_id": pa.array([p.key_id for p in protected], pa.string()),
            "outputs": pa.array([[{"label": "fraud", "score": float(s)}] for s in scores],
                                ENTRY_SCHEMA.field("outputs").type),
            "score": pa.array(scores, pa.float64()),
            "threshold": pa.array([0.75] * m, pa.float64()),
            "decision": pa.array(np.where(scores >= 0.75, "block", "allow"), pa.string()),
            "explanation_ref": pa.nulls(m, pa.string()),
            "outcome": pa.array(["ok"] * m, pa.string()),
            "error_type": pa.nulls(m, pa.string()),
            "latency_ms": pa.array(rng.random(m) * 5, pa.float32()),
            "risk_tier": pa.array(["standard"] * m, pa.string()),
            "sample_rate": pa.array([1.0] * m, pa.float32()),
            "producer_id": pa.array(["bench"] * m, pa.string()),
            "seq": pa.array(np.arange(begin, begin + m), pa.int64()),
            "app_name": pa.array(["fraud"] * m, pa.string()),
            "deployment": pa.array(["FraudModel"] * m, pa.string()),
            "replica": pa.array(["r1"] * m, pa.string()),
        }))
        storage.put_new(DEFAULT_SPEC.file_path(key, f"bench-{chunk:05d}"), encode_parquet(table))
    store.close()
    vault.close()
    return {"build_s": time.monotonic() - started, "journal_files": -(-n // FILE_ROWS),
            "feature_rows": n, "subjects": subjects}


def bench_replay(n: int, *, subjects: int = 20_000, seed: int = 7, workdir: Path | None = None,
                 num_cpus: int | None = None, batch_size: int = 65_536) -> dict:
    """Build ``n`` entries and time a verify-only replay of them; returns the figures."""
    own = workdir is None
    workdir = Path(tempfile.mkdtemp(prefix="bench_replay_")) if own else workdir
    try:
        figures = build(workdir, n, subjects, seed)
        os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
        ray.init(num_cpus=num_cpus or os.cpu_count(), include_dashboard=False, log_to_driver=False)
        try:
            journal = str(workdir / "journal")
            report = replay(journal, model="fraud",
                            feature_store=ParquetFeatureStore(workdir / "features"),
                            verifier=VaultVerifier.from_journal(journal),
                            output=workdir / "replay.parquet", keep_results=False,
                            progress=False, batch_size=batch_size)
        finally:
            ray.shutdown()
        if report.total != n or not report.ok:
            raise RuntimeError(f"benchmark replay did not verify everything: {report.counts}")
        figures.update(entries=report.total, replay_s=report.elapsed_s,
                       entries_per_s=report.entries_per_s, counts=report.counts,
                       files=report.files, batch_size=batch_size)
        return figures
    finally:
        if own:
            shutil.rmtree(workdir, ignore_errors=True)


def machine() -> str:
    """One line naming the machine and the versions that matter for the figures."""
    cpu = platform.processor() or "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return (f"{os.cpu_count()} cores, {cpu}; Python {platform.python_version()}, ray {ray.__version__}, "
            f"duckdb {duckdb.__version__}, pyarrow {pa.__version__}; load average before the run "
            f"{os.getloadavg()[0]:.2f}")


def section(figures: dict, note: str) -> str:
    return "\n".join([
        "## Replay: verify-only reproduction (benchmarks/bench_replay.py)",
        "",
        f"Measured {dt.datetime.now(dt.UTC):%Y-%m-%d %H:%M} UTC on {machine()}.",
        "",
        f"{figures['entries']:,} journal entries of {figures['subjects']:,} subjects (vault "
        f"pseudonymizer, per-subject keys in SQLite) in {figures['files']} files; a Parquet "
        f"feature store with {figures['feature_rows']:,} history rows. Replay on a local Ray with "
        f"all cores: Ray Data reads the journal, each task joins features as of each entry's "
        f"time (DuckDB ASOF join, batches of {figures['batch_size']:,}), re-encodes, recomputes "
        "the HMAC with the subject's key and writes per-entry results to Parquet.",
        "",
        "| figure | value |",
        "|---|---|",
        f"| entries replayed | {figures['entries']:,} |",
        f"| all verified | {figures['counts'] == {'verified': figures['entries']}} |",
        f"| replay wall time (incl. Ray Data start, feature joins, result file) | "
        f"{figures['replay_s']:.1f} s |",
        f"| **throughput** | **{figures['entries_per_s']:,.0f} entries/s** (target >= 50,000) |",
        f"| building the data set (not timed above) | {figures['build_s']:.0f} s |",
        "",
        note,
    ])


def write_docs(text: str, path: Path) -> None:
    write_docs_section(path, START, END, text)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--entries", type=int, default=1_000_000)
    parser.add_argument("--subjects", type=int, default=20_000)
    parser.add_argument("--batch-size", type=int, default=65_536)
    parser.add_argument("--num-cpus", type=int, default=None)
    parser.add_argument("--dir", default=None, help="work directory (default: a temp dir, removed)")
    parser.add_argument("--note", default="", help="text added under the table in the docs")
    parser.add_argument("--no-docs", action="store_true")
    args = parser.parse_args(argv)
    workdir = Path(args.dir) if args.dir else None
    if workdir is not None:
        workdir.mkdir(parents=True, exist_ok=True)
    figures = bench_replay(args.entries, subjects=args.subjects, workdir=workdir,
                           num_cpus=args.num_cpus, batch_size=args.batch_size)
    print(json.dumps(figures, indent=1, default=str))
    if not args.no_docs:
        write_docs(section(figures, args.note),
                   Path(__file__).resolve().parent.parent / "docs" / "benchmarks.md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
