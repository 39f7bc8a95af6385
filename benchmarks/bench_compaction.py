"""Compaction and lifecycle of one large day in bounded memory: peak RSS and time per million rows.

Writes a synthetic fraud day (``bench_query``'s generator: v2 entries, ``--files-per-hour`` hot
files per hour) and then, each in a child process of its own so its peak RSS (its
``VmHWM``; not ``ru_maxrss``, which holds the parent's peak from generating the day) is its
own, compacts it at day level and moves it to the cold tier under
``--memory-limit``. Reports rows, input and output bytes, seconds, seconds per million rows,
peak RSS, the load average and the temp space the rewrite used.

    .venv/bin/python -m benchmarks.bench_compaction --rows 10000000
    .venv/bin/python -m benchmarks.bench_compaction --rows 50000000 --no-lifecycle

The section in docs/benchmarks.md is replaced by the run (``--append``: the run's rows and
command are added to it; ``--no-docs`` to leave it).
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from benchmarks._common import PEAK_RSS_CODE, write_docs_section
from benchmarks.bench_query import DAY, build, machine

START, END = "<!-- bench_compaction:start -->", "<!-- bench_compaction:end -->"

CHILD = PEAK_RSS_CODE + """
import datetime as dt, json, logging, sys, time
logging.basicConfig(stream=sys.stderr, format="%(created).3f %(message)s")
logging.getLogger("serve_journal.maintain.rewrite").setLevel(logging.DEBUG)
from serve_journal.maintain import lifecycle
from serve_journal.maintain.compaction import CompactionOptions, compact
from serve_journal.storage import LocalJournalStorage
root, step, limit, temp = sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4]
storage = LocalJournalStorage(root)
day = dt.datetime.fromisoformat(sys.argv[5])
t = time.perf_counter()
if step == "compact":
    report = compact(storage, now=day + dt.timedelta(days=1, hours=1),
                     options=CompactionOptions(memory_limit=limit, temp_dir=temp))
    done = len(report.compacted)
else:
    plan = lifecycle.plan(storage, day + dt.timedelta(days=31))
    report = lifecycle.apply(storage, plan, dry_run=False, memory_limit=limit, temp_dir=temp)
    done = len(report.moved)
    assert not report.refused, report.refused
seconds = time.perf_counter() - t
print(json.dumps({"seconds": seconds, "done": done,
                  "peak_rss": peak_rss_bytes()}))
"""


def _tree_bytes(path: Path) -> int:
    total = 0
    for folder, _, files in os.walk(path):
        for name in files:
            try:
                total += os.path.getsize(os.path.join(folder, name))
            except OSError:
                pass
    return total


def _tier_bytes(root: Path, tier: str) -> tuple[int, int]:
    """Bytes and number of the live-looking data files of ``tier`` (after deletes)."""
    files = [p for p in (root / tier).rglob("*.parquet")]
    return sum(p.stat().st_size for p in files), len(files)


def _commands_before_table(block: list[str]) -> list[str]:
    """The run commands listed above the table in a section's ``block`` (a note after the
    table may quote a command too: it stays in the note)."""
    table_at = next((i for i, line in enumerate(block) if line.startswith("|")), len(block))
    return [line for line in block[:table_at] if line.startswith("- `.venv/bin/python")]


def _notes_after_table(block: list[str]) -> list[str]:
    """The hand-written lines that follow the table in a section's ``block`` (kept by
    ``--append``, which rebuilds everything above them)."""
    rows = [i for i, line in enumerate(block) if line.startswith("|")]
    notes = block[rows[-1] + 1:] if rows else []
    while notes and not notes[0].strip():
        notes = notes[1:]
    return ["", *notes] if notes else []  # a blank line ends the table (else a note is a row)


def _memory(pid: int) -> tuple[int, int]:
    """Resident bytes of process ``pid`` now and at its highest so far (``VmRSS``, ``VmHWM``;
    zeros once it has gone)."""
    found = {}
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith(("VmRSS:", "VmHWM:")):
                    found[line[:5]] = int(line.split()[1]) * 1024
    except OSError:
        pass
    return found.get("VmRSS", 0), found.get("VmHWM", 0)


def _phase_at(stderr: str, when: float) -> str:
    """The child's last rewrite log line (``<unix time> <message>``) logged before ``when``."""
    phase = "start"
    for line in stderr.splitlines():
        stamp, _, message = line.partition(" ")
        try:
            if float(stamp) > when:
                break
        except ValueError:
            continue
        phase = message
    return phase


def _phase_seconds(stderr: str, end: float) -> dict[str, float]:
    """Seconds spent per rewrite phase (the first word of its debug log lines: spool, scatter,
    sort, stream, hash, write, summarize), each line's phase lasting until the next line (the last
    until ``end``)."""
    stamps: list[tuple[float, str]] = []
    for line in stderr.splitlines():
        stamp, _, message = line.partition(" ")
        try:
            stamps.append((float(stamp), message.split(" ", 1)[0]))
        except ValueError:
            continue
    out: dict[str, float] = {}
    for (t, phase), (after, _) in zip(stamps, [*stamps[1:], (end, "")], strict=True):
        out[phase] = round(out.get(phase, 0.0) + after - t, 1)
    return out


def run_step(root: Path, step: str, limit: str, temp: Path) -> dict:
    """Run ``step`` (compact | lifecycle) in a child; sample the temp space it uses and its
    resident memory (the phase it was in at its peak comes from the rewrite's debug log). A peak
    too short for a sample is still seen by the high-water mark: ``hwm_phase`` is the phase of
    the last sample before the mark last rose (the peak came within the next 0.25 s)."""
    peak_temp = [0]
    peak_rss = [0, 0.0]
    hwm = [0, 0.0]
    stop = threading.Event()
    load_before = os.getloadavg()
    proc = subprocess.Popen([sys.executable, "-c", CHILD, str(root), step, limit, str(temp),
                             DAY.isoformat()], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)

    def sample() -> None:
        ticks = 0
        before = time.time()
        while not stop.wait(0.25):
            rss, high = _memory(proc.pid)
            if rss > peak_rss[0]:
                peak_rss[:] = [rss, time.time()]
            if high > hwm[0]:
                hwm[:] = [high, before]
            before = time.time()
            ticks += 1
            if ticks % 8 == 0:
                peak_temp[0] = max(peak_temp[0], _tree_bytes(temp))

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    try:
        stdout, stderr = proc.communicate()
    finally:
        stop.set()
        sampler.join()
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    if proc.returncode != 0:
        raise RuntimeError(f"{step} failed ({proc.returncode}): {stderr[-3000:]}")
    out = json.loads(stdout.strip().splitlines()[-1])
    out.update(load_before=load_before, load_after=os.getloadavg(), peak_temp=peak_temp[0],
               sampled_peak_rss=peak_rss[0], peak_phase=_phase_at(stderr, peak_rss[1]),
               hwm=hwm[0], hwm_phase=_phase_at(stderr, hwm[1]),
               phase_seconds=_phase_seconds(stderr, time.time()))
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=10_000_000)
    parser.add_argument("--files-per-hour", type=int, default=24)
    parser.add_argument("--memory-limit", default="2GiB")
    parser.add_argument("--no-lifecycle", action="store_true", help="compaction only")
    parser.add_argument("--dir", default=None, help="work directory (default: a temp dir)")
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--no-docs", action="store_true")
    parser.add_argument("--append", action="store_true",
                        help="add this run's rows to the docs table instead of replacing it")
    args = parser.parse_args(argv)

    work = Path(args.dir or tempfile.mkdtemp(prefix="bench-compaction-"))
    root, temp = work / "journal", work / "tmp"
    temp.mkdir(parents=True, exist_ok=True)
    from serve_journal.storage import LocalJournalStorage

    t = time.perf_counter()
    build(LocalJournalStorage(str(root)), args.rows, args.files_per_hour, args.seed)
    write_s = time.perf_counter() - t
    hot_in, files_in = _tier_bytes(root, "hot")
    print(f"wrote {args.rows:,} rows in {files_in} files, {hot_in / 2**20:,.0f} MiB "
          f"({write_s:.0f} s)", file=sys.stderr)
    rows = []
    steps = ["compact"] + ([] if args.no_lifecycle else ["lifecycle"])
    for step in steps:
        result = run_step(root, step, args.memory_limit, temp)
        tier = "hot" if step == "compact" else "cold"
        size, files = _tier_bytes(root, tier)
        result.update(step=step, rows=args.rows, bytes_per_entry=size / args.rows, files=files)
        print(json.dumps(result), file=sys.stderr)
        rows.append(result)
    if args.dir is None:
        shutil.rmtree(work, ignore_errors=True)
    table = [
        f"| {r['step']} | {r['rows']:,} | {args.memory_limit} | {r['seconds']:,.0f} | "
        f"{r['seconds'] / (r['rows'] / 1e6):.1f} | {r['peak_rss'] / 2**30:.2f} | "
        f"{r['peak_temp'] / 2**30:.1f} | {r['bytes_per_entry']:.1f} ({r['files']} file(s)) | "
        f"{r['load_before'][0]:.1f} / {r['load_after'][0]:.1f} |"
        for r in rows
    ]
    print("\n".join(table))
    if not args.no_docs:
        path = Path(__file__).resolve().parent.parent / "docs" / "benchmarks.md"
        command = (f"- `.venv/bin/python -m benchmarks.bench_compaction --rows {args.rows} "
                   f"--memory-limit {args.memory_limit}"
                   f"{' --no-lifecycle' if args.no_lifecycle else ''}"
                   f"{' --append' if args.append else ''}` ({dt.datetime.now(dt.UTC):%Y-%m-%d %H:%M}"
                   f" UTC, load average {rows[0]['load_before'][0]:.1f} at its start; "
                   f"{machine().split(', ')[1]})")
        text = path.read_text() if path.exists() else ""
        previous, commands, notes, machines = [], [], [], []
        if args.append and START in text:
            block = text[text.index(START):text.index(END)].splitlines()
            previous = [line for line in block if line.startswith(("| compact", "| lifecycle"))]
            commands = _commands_before_table(block)
            notes = _notes_after_table(block)
            machines = [line for line in block if line.startswith("Machine:")]
        if machine() not in machines:  # rows of an earlier run may come from another machine
            machines.append(machine())
        header = [
            "## Compaction and lifecycle in bounded memory",
            "",
            *(m for line in machines for m in (line, "")),
            "A synthetic fraud day (`bench_query`'s generator, v2 entries, "
            f"{args.files_per_hour} hot files per hour) compacted at day level, then moved to the "
            "cold tier, each step in a child process (peak RSS is its own high-water mark, `VmHWM`). The rewrite "
            "spools the checked inputs to a temp folder and sorts them with DuckDB under 45% of "
            "the limit, in as many passes (one range of the sort key each) as the day's estimated "
            "size needs, streaming the sorted rows into the output files a row group at a time. "
            "Runs, each config once (`--append` adds a run's rows to the table):",
            "",
            *commands, command,
            "",
            "| step | rows | memory limit | seconds | s per million rows | peak RSS GiB | "
            "peak temp GiB | output B/entry | load avg before / after |",
            "|---|---|---|---|---|---|---|---|---|",
        ]
        write_docs_section(path, START, END, "\n".join(header + previous + table + notes))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
