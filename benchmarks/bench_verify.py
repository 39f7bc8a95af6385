"""Verify cost: ``verify_journal`` on the query benchmark's day, against hashing every byte.

Builds one day of synthetic fraud entries with ``benchmarks.bench_query``'s generator (same seed,
same entries as its day), written by several writer chains through
:class:`~serve_journal.sink.writer.PartitionFileWriter` with a manifest record per file and a
signed checkpoint after each file (writers sign every few seconds; a file rolls every few
minutes per partition), then compacts it with ``run_compaction(apply=True)`` into the shape the
query benchmark measures (day files of ``hour=all``, their commit marker, a signed compactor
chain). Then it times, rounds interleaved, each round in a fresh subprocess (imports excluded from
the time, included in the peak RSS), page cache warm:

* baseline A: SHA-256 of every live data file's bytes (``live_files`` + ``storage.read``): the
  floor, since verify hashes every byte;
* baseline B: ``verify_journal`` of commit ``c96d2ed`` (before issue 14's stricter verify), run
  from a git worktree on the same journal, when it can read it;
* the current ``serve_journal.read.verify.verify_journal``.

    .venv/bin/python -m benchmarks.bench_verify --max-rows-per-file 1000000   # 10M rows, docs
    .venv/bin/python -m benchmarks.bench_verify --quick      # 200k rows, no docs update

At commit 6f2df48 the compaction default (4M entries per file: the query benchmark's three day
files) cannot be recorded: a file's Merkle leaves are built as one Arrow binary array (at most
2 GiB, ~1,125 bytes per entry of this data), so ``run_compaction`` and verify fail with
``ArrowCapacityError`` on a file above ~1.9M entries; ``--max-rows-per-file`` splits the day
into smaller files.

Results go to stdout and, unless ``--no-docs``, into docs/benchmarks.md between
``<!-- bench_verify:start -->`` and ``<!-- bench_verify:end -->``.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from benchmarks._common import PEAK_RSS_CODE, write_docs_section
from benchmarks.bench_query import DAY, hex_strings, hour_of_entries, machine
from benchmarks.machine import machine_info
from serve_journal.maintain.compaction import CompactionOptions

REPO = Path(__file__).resolve().parent.parent
START, END = "<!-- bench_verify:start -->", "<!-- bench_verify:end -->"
BASE_COMMIT = "c96d2ed"
BASE_TREE = "/tmp/verify-base"

# One timed round, run with ``python -c`` so the same code drives the current tree and the old
# one (``PYTHONPATH`` picks the tree; the old verify lived at ``serve_journal.verify``).
WORKER = PEAK_RSS_CODE + r"""
import hashlib, json, sys, time
mode, root, key = sys.argv[1:4]
import serve_journal
from serve_journal.storage import LocalJournalStorage
try:
    from serve_journal.read.verify import format_report, verify_journal
except ImportError:
    from serve_journal.verify import format_report, verify_journal


def rss_kib():
    with open("/proc/self/status") as fh:
        return next(int(line.split()[1]) for line in fh if line.startswith("VmRSS:"))
storage = LocalJournalStorage(root)
out = {"module": serve_journal.__file__, "rss_before_kib": rss_kib()}
if mode == "hash":
    from serve_journal.catalog import live_files
    t = time.perf_counter()
    nbytes = 0
    for f in live_files(storage, tier="all"):
        data = storage.read(f.path)
        hashlib.sha256(data).hexdigest()
        nbytes += len(data)
    out["seconds"] = time.perf_counter() - t
    out["bytes"] = nbytes
else:
    profile = mode == "profile"
    if profile:
        import cProfile, pstats
        prof = cProfile.Profile()
        prof.enable()
    t = time.perf_counter()
    report = verify_journal(storage, public_key=key, seq_start=0)
    out["seconds"] = time.perf_counter() - t
    if profile:
        prof.disable()
        stats = pstats.Stats(prof)
        rows = [(v[3], f"{k[0].split('serve_journal/', 1)[-1]}:{k[1]} {k[2]}")
                for k, v in stats.stats.items() if "serve_journal/" in k[0]]
        out["profile"] = sorted(rows, reverse=True)[:12]
    out.update(ok=report.ok, errors=len(report.errors), warnings=len(report.warnings),
               files=report.files, entries=report.entries, records=report.records,
               checkpoints=report.checkpoints, chains=report.chains,
               error_kinds=sorted({p.kind for p in report.errors}),
               error_paths=[p.path for p in report.errors],
               report_head=format_report(report).splitlines()[:25])
out["maxrss_kib"] = peak_rss_bytes() // 1024
print(json.dumps(out))
"""


# -- the journal ---------------------------------------------------------------------------------


def build(root: Path, rows: int, files_per_hour: int, writers: int, seed: int,
          max_rows_per_file: int | None = None) -> dict:
    """Write the day (``writers`` chains, each file recorded and signed) and compact it."""
    from serve_journal.catalog import live_files
    from serve_journal.catalog.layout import DEFAULT_SPEC
    from serve_journal.maintain.compaction import run_compaction
    from serve_journal.sink.settings import SinkSettings, manifest_hook
    from serve_journal.sink.writer import PartitionFileWriter

    settings = SinkSettings(journal_uri=str(root))
    storage = settings.storage()
    logs = [settings.manifest(storage, f"w{i:02d}-{seed:04x}b{i:03d}") for i in range(writers)]
    files = [PartitionFileWriter(storage, log.chain_id, roll_seconds=3600.0, roll_bytes=1 << 40,
                                 on_file_written=[manifest_hook(log)]) for log in logs]
    t = time.perf_counter()
    rng = np.random.default_rng(seed)
    subjects = hex_strings(rng, max(1000, rows // 10), 16)
    seq_base = np.zeros(8, dtype=np.int64)
    per_hour = rows // 24
    raw_files = raw_bytes = 0
    for hour in range(24):
        n = per_hour if hour < 23 else rows - per_hour * 23
        table = hour_of_entries(rng, hour, n, subjects, seq_base)
        rng.integers(0, n, 20)  # bench_query draws its lookup keys here: keep its entries
        key = DEFAULT_SPEC.key_for("fraud", DAY + dt.timedelta(hours=hour))
        step = -(-n // files_per_hour)
        for j, offset in enumerate(range(0, n, step)):  # rolled by age: consecutive time slices
            stored = files[j % writers].write_file(key, table.slice(offset, step))
            logs[j % writers].checkpoint()
            raw_files += 1
            raw_bytes += stored.size
    write_s = time.perf_counter() - t
    t = time.perf_counter()
    options = CompactionOptions(**({"max_rows_per_file": max_rows_per_file}
                                   if max_rows_per_file else {}))
    report = run_compaction(str(root), apply=True, now=DAY + dt.timedelta(days=2),
                            options=options)
    compact_s = time.perf_counter() - t
    if not report.compacted or report.refused:
        raise SystemExit(f"compaction did not compact the day:\n{report.describe()}")
    live = live_files(storage, tier="all")
    return {
        "write_s": write_s, "compact_s": compact_s, "raw_files": raw_files,
        "raw_bytes": raw_bytes, "files": len(live),
        "bytes": sum(os.path.getsize(storage.full_path(f.path)) for f in live),
        "records": len(storage.list_files("_manifest/", ".json")),
        "checkpoints": len(storage.list_files("_checkpoints/", ".json")),
        "markers": len(storage.list_files("_commits/", ".json")),
        "compactor": report.manifest_chain,
    }


# -- timed rounds --------------------------------------------------------------------------------


def run_worker(mode: str, root: Path, key: str, tree: str | None = None) -> dict:
    """One round in a fresh interpreter; ``tree``: run that source tree's serve_journal."""
    env = dict(os.environ)
    cwd = str(REPO)
    if tree is not None:
        env["PYTHONPATH"] = tree
        cwd = tree
    proc = subprocess.run([sys.executable, "-c", WORKER, mode, str(root), key], cwd=cwd,
                          env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        return {"failed": (proc.stderr.strip().splitlines() or ["exit " + str(proc.returncode)])[-1],
                "stderr": proc.stderr[-3000:]}
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    expected = tree or str(REPO)
    if not result["module"].startswith(expected):
        raise SystemExit(f"worker imported {result['module']}, expected a module under {expected}")
    return result


def base_tree() -> str | None:
    """A worktree at BASE_COMMIT, or None when git cannot make one."""
    if os.path.exists(BASE_TREE):
        remove_base_tree()
    proc = subprocess.run(["git", "-C", str(REPO), "worktree", "add", "--detach", BASE_TREE,
                           BASE_COMMIT], capture_output=True, text=True)
    if proc.returncode != 0:
        print(f"cannot create the {BASE_COMMIT} worktree: {proc.stderr.strip()}", file=sys.stderr)
        return None
    return BASE_TREE


def remove_base_tree() -> None:
    subprocess.run(["git", "-C", str(REPO), "worktree", "remove", "--force", BASE_TREE],
                   capture_output=True, text=True)
    subprocess.run(["git", "-C", str(REPO), "worktree", "prune"], capture_output=True, text=True)


def code_version() -> str:
    """The commit of the serve_journal measured, and whether its tree had uncommitted changes."""
    def git(*args: str) -> str:
        return subprocess.run(["git", "-C", str(REPO), *args], capture_output=True,
                              text=True).stdout.strip()

    dirty = git("status", "--porcelain", "--", "serve_journal")
    return (f"`{git('rev-parse', '--short', 'HEAD') or 'unknown'}`"
            + (" with uncommitted changes to serve_journal/" if dirty else " (clean tree)"))


def spread(values: list[float]) -> str:
    return f"{min(values):.2f}..{max(values):.2f}"


def write_docs(section: str, path: Path) -> None:
    write_docs_section(path, START, END, section)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=10_000_000)
    parser.add_argument("--quick", action="store_true", help="200k rows, no docs")
    parser.add_argument("--files-per-hour", type=int, default=24)
    parser.add_argument("--writers", type=int, default=2, help="writer chains")
    parser.add_argument("--max-rows-per-file", type=int, default=None,
                        help="compaction's split (default: CompactionOptions' own)")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--no-base", action="store_true", help=f"skip the {BASE_COMMIT} verify")
    parser.add_argument("--profile", action="store_true",
                        help="also profile one verify (cProfile) and print its top functions")
    parser.add_argument("--no-docs", action="store_true")
    parser.add_argument("--docs-file", default=str(REPO / "docs" / "benchmarks.md"),
                        help="the file the section goes into")
    parser.add_argument("--dir", default=None, help="work directory (default: a temp dir)")
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--build-only", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.quick:
        args.rows, args.no_docs = 200_000, True
    os.environ["SERVE_JOURNAL_DEV_MODE"] = "1"  # the signing key beside the journal is generated

    workdir = Path(args.dir or tempfile.mkdtemp(prefix="bench-verify-"))
    root = workdir / "journal"
    if args.build_only:  # in a child, so the compaction's ~13 GiB is gone before the timings
        print(json.dumps(build(root, args.rows, args.files_per_hour, args.writers, args.seed,
                               args.max_rows_per_file)))
        return 0

    load = machine_info()["load_avg_at_start"]
    code = code_version()
    for stale in (root, workdir / "journal-signing"):
        shutil.rmtree(stale, ignore_errors=True)
    tree = None
    try:
        proc = subprocess.run(
            [sys.executable, "-m", "benchmarks.bench_verify", "--build-only", "--dir", str(workdir),
             "--rows", str(args.rows), "--files-per-hour", str(args.files_per_hour),
             "--writers", str(args.writers), "--seed", str(args.seed)]
            + (["--max-rows-per-file", str(args.max_rows_per_file)]
               if args.max_rows_per_file else []),
            cwd=REPO, stdout=subprocess.PIPE, text=True, check=True)
        built = json.loads(proc.stdout.strip().splitlines()[-1])
        print(f"wrote {args.rows:,} rows in {built['raw_files']} files ({built['write_s']:.0f} s), "
              f"compacted to {built['files']} files ({built['compact_s']:.0f} s)", file=sys.stderr)
        key = str(workdir / "journal-signing" / "manifest-signing.pub.pem")

        tree = None if args.no_base else base_tree()
        modes = [("A", "hash", None), ("B", "verify", tree), ("V", "verify", None)]
        runs: dict[str, list[dict]] = {label: [] for label, _, _ in modes}
        base_note = "skipped (--no-base)" if args.no_base else "no worktree"
        for r in range(args.rounds):
            for label, mode, where in modes:
                if label == "B" and (tree is None or (runs["B"] and "failed" in runs["B"][-1])):
                    continue
                result = run_worker(mode, root, key, where)
                runs[label].append(result)
                shown = result.get("failed") or f"{result['seconds']:.2f} s"
                print(f"round {r + 1} {label}: {shown}", file=sys.stderr)
        if runs["B"] and "failed" in runs["B"][0]:
            base_note = f"cannot read this journal: {runs['B'][0]['failed']}"
            print(runs["B"][0]["stderr"], file=sys.stderr)
            runs["B"] = []
        elif runs["B"]:
            b = runs["B"][0]
            base_note = (f"ran to completion ({b['files']} files, {b['entries']:,} entries "
                         f"checked), ok={b['ok']}")
            if not b["ok"]:
                base_note += f", {b['errors']} error(s): {', '.join(b['error_kinds'])}"
                if all(p.endswith("/-00000000001.json") for p in b["error_paths"]):
                    base_note += (" on the length-0 (genesis) checkpoints every chain opens with "
                                  "since 850fc36, which it predates (it looks for a record at "
                                  "index -1); its other checks ran in full")
        profile = run_worker("profile", root, key) if args.profile else None
    finally:
        if tree is not None:
            remove_base_tree()
        if args.dir is None:
            shutil.rmtree(workdir, ignore_errors=True)

    current = runs["V"][-1]
    if not current["ok"]:
        print("\n".join(current["report_head"]), file=sys.stderr)
    if runs["B"] and not runs["B"][0]["ok"]:
        print("\n".join(runs["B"][0]["report_head"]), file=sys.stderr)

    def secs(label: str) -> list[float]:
        return [x["seconds"] for x in runs[label]]

    def ratio(num: str, den: str) -> str:
        per_round = [a / b for a, b in zip(secs(num), secs(den), strict=True)]
        return (f"{statistics.median(secs(num)) / statistics.median(secs(den)):.2f}x "
                f"({spread(per_round)})")

    mib = 1 << 20
    default_split = CompactionOptions().max_rows_per_file
    split = (f"at most {args.max_rows_per_file or default_split:,} entries per file"
             + (f", `--max-rows-per-file`; the default is {default_split:,}"
                if args.max_rows_per_file else ", the default"))
    rows_doc = [
        ("A", "SHA-256 of every live data file (`live_files` + `storage.read` + hashlib): the floor"),
        ("B", f"`verify_journal` of `{BASE_COMMIT}` (before issue 14), same journal"),
        ("V", "`verify_journal` now (`serve_journal.read.verify`)"),
    ]
    nice = os.nice(0)
    command = (f"{f'nice -n {nice} ' if nice else ''}.venv/bin/python -m benchmarks.bench_verify"
               + " ".join([""] + (argv if argv is not None else sys.argv[1:])))
    out = ["## Verify cost (`benchmarks/bench_verify.py`)\n"]
    out.append(f"Run {dt.datetime.now(dt.UTC):%Y-%m-%d %H:%M} UTC. {machine()} Load average at "
               f"start: {', '.join(f'{x:.2f}' for x in load or [])}.\n")
    out.append(f"Command: `{command}`; serve_journal at commit {code}.\n")
    out.append(
        f"The query benchmark's day: {args.rows:,} synthetic fraud entries from its generator "
        f"(seed {args.seed}, the same entries, 8 producers), written by {args.writers} writer "
        f"chains through `PartitionFileWriter` with a manifest record per file and a signed "
        f"checkpoint after each file, as {built['raw_files']} files ({args.files_per_hour} per "
        f"hour partition, {built['raw_bytes'] / mib:,.0f} MiB) in {built['write_s']:.0f} s; "
        f"compacted by `run_compaction(apply=True)` in {built['compact_s']:.0f} s "
        f"({split}). Verified "
        f"journal: {built['files']} live data files of `hour=all`, {built['bytes']:,} bytes "
        f"({built['bytes'] / mib:,.0f} MiB, {built['bytes'] / args.rows:.1f} B/entry), "
        f"{built['records']} manifest records in {args.writers + 1} chains (the writers' and the "
        f"compactor's), {built['checkpoints']} checkpoints, {built['markers']} commit marker(s). "
        f"Each round runs each measure in a fresh subprocess (times exclude interpreter start "
        f"and imports; peak RSS is the subprocess's own high-water mark, `VmHWM`, imports included), the three "
        f"measures interleaved, page cache warm; {args.rounds} rounds.\n")
    out.append(f"Current verify: ok={current['ok']}, {current['errors']} error(s), "
               f"{current['warnings']} warning(s), {current['files']} files, "
               f"{current['entries']:,} entries checked. Baseline B: {base_note}.\n")
    out.append("| measure | median s | min..max s | vs A: ratio of medians (per-round range) | "
               "peak RSS MiB (max) |")
    out.append("|---|---|---|---|---|")
    for label, text in rows_doc:
        if not runs[label]:
            out.append(f"| {label}: {text} | - | - | - | - |")
            continue
        vs_a = "1" if label == "A" else ratio(label, "A")
        rss = max(x["maxrss_kib"] for x in runs[label]) / 1024
        out.append(f"| {label}: {text} | {statistics.median(secs(label)):.2f} | "
                   f"{spread(secs(label))} | {vs_a} | {rss:,.0f} |")
    if runs["B"]:
        out.append(f"\nCurrent verify / {BASE_COMMIT} verify: {ratio('V', 'B')} (ratio of medians, "
                   "per-round range).")
    rss_before = statistics.median(x["rss_before_kib"] for x in runs["V"]) / 1024
    out.append(f"\nRSS of a worker after its imports, before the measured call: ~{rss_before:.0f} MiB.")
    if profile is not None and "profile" in profile:
        out.append(f"\ncProfile of one verify ({profile['seconds']:.1f} s profiled), top "
                   "serve_journal functions by cumulative time:\n")
        out.extend(f"- `{name}`: {cum:.2f} s" for cum, name in profile["profile"][:8])
    section = "\n".join(out)
    print(section)
    if not args.no_docs:
        write_docs(section, Path(args.docs_file))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
