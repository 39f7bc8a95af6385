"""Sampling profiles of the producer side and the sinks, written into docs/benchmarks.md.

    .venv/bin/python -m benchmarks.profile [--size tiny|quick|full] [--label before|after]
                                          [--paths finalize,wire_encode,...] [--docs FILE | --docs -]

Each profiled path runs in its own child process under ``py-spy record -f raw --function``
(py-spy launches the child, so no ptrace permission is needed). The child builds its inputs
first, outside the measured region, then calls the path's work inside :func:`profiled_region`;
only samples whose stack passes through that function count, so set-up, imports and the
interpreter's start never show. The child prints the throughput it measured (under py-spy's
sampling, which pauses it ~100 times a second: a few percent at most).

Paths:

* ``finalize``: :class:`~serve_journal._private.entries.EntryFinalizer` (built by
  ``wire(config)`` as a replica builds it) finalizing fraud-shaped captured Starlette calls in
  batches of 2,000 (the flusher's batch);
* ``wire_encode``: ``KafkaTransport._encode`` of finalized batches: version 2 message values
  (ZSTD-framed Arrow IPC of up to 512 KiB, keyed per route), what the Kafka producer sends;
* ``actor_send``: ``RayActorTransport.send`` of finalized batches to a real writer pool on a
  private Ray, then ``flush`` (the replica's side only: the writers run in other processes);
* ``kafka_sink``: a ``KafkaSinkRunner``'s sink decoding chunks of 50 version 2 messages and
  writing them as Parquet with a manifest record per file (``_write_parts``, what a poll does
  once a chunk is due; no broker);
* ``actor_writer``: the writer actor's class run in-process: ``write`` per partition part, a roll
  every 20,000 rows (what its roll timer does at ~40,000 entries/s), ``flush`` at the end.

The section between ``<!-- profiles:start -->`` and ``<!-- profiles:end -->`` keeps one
subsection per label (``before``, ``after``, ...); a run replaces only its own label's.
"""

from __future__ import annotations

import argparse
import collections
import datetime as dt
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
DOCS = REPO / "docs" / "benchmarks.md"
START, END = "<!-- profiles:start -->", "<!-- profiles:end -->"
ANCHOR = "profiled_region ("
PATHS = ("finalize", "wire_encode", "actor_send", "kafka_sink", "actor_writer")
SIZES = {"tiny": 4_000, "quick": 100_000, "full": 400_000}
BATCH = 2_000
SAMPLE_RATE = 100
TOP = 12

DESCRIPTIONS = {
    "finalize": "`EntryFinalizer.finalize`, fraud-shaped captured Starlette calls, batches of 2,000",
    "wire_encode": "`KafkaTransport._encode`: version 2 messages (ZSTD-framed Arrow IPC, up to 512 KiB) keyed per route",
    "actor_send": "`RayActorTransport.send` to 2 writer actors + `flush` (replica side only)",
    "kafka_sink": "Kafka sink `_write_parts`: decode chunks of 50 version 2 messages (~5,000 entries), Parquet + manifest record",
    "actor_writer": "writer actor class in-process: `write` per part, roll every 20,000 rows, `flush`",
}


# -- the child: inputs, then the measured region ---------------------------------------------


def profiled_region(work: Callable[[], int]) -> int:
    """Run ``work`` (returns how many entries it handled); the profile counts only what runs here."""
    return work()


def _config(tracking_uri: str, root: Path):
    from serve_journal.config import JournalConfig

    return JournalConfig.resolve(
        model="models:/fraud@champion", threshold=0.75, tracking_uri=tracking_uri,
        journal_uri=str(root / "journal"), transport="memory", dev_mode=True,
        extra={"memory_transport": f"profile-{os.getpid()}"})


def _captured_calls(n: int, model) -> list:
    from benchmarks._common import fraud_bodies, fraud_result, starlette_request
    from serve_journal._private.entries import CapturedCall
    from serve_journal.schema import OUTCOME_OK

    pool = 4096
    bodies = fraud_bodies(pool)
    requests = [starlette_request(b) for b in bodies]
    results = [fraud_result(b) for b in bodies]
    now_us = time.time_ns() // 1000
    calls = []
    for i in range(n):
        r = requests[i % pool]
        calls.append(CapturedCall(i, now_us + i, f"{i:032x}", (r,), {}, r.scope, r._body,
                                  results[i % pool], OUTCOME_OK, None, 1.0, None, model))
    return calls


def _finalized_batches(parts, n: int) -> list:
    calls = _captured_calls(n, parts.model)
    return [parts.finalizer.finalize(calls[s:s + BATCH]).batch for s in range(0, n, BATCH)]


def _kafka_encode(batch) -> list:
    """``batch`` as the Kafka transport sends it: version 2 messages keyed by its partitioner
    (``KafkaTransport._encode``), as ``(key, value, entries)``."""
    from serve_journal.transport.kafka import KafkaTransport

    return KafkaTransport._encode(_EncodeOnly(), batch)


class _EncodeOnly:
    """What ``KafkaTransport._encode`` reads of its transport: the default partitioner and
    batch size (no producer, no broker)."""

    def __init__(self) -> None:
        from serve_journal.transport.kafka_settings import (
            KafkaSettings,
            ModelBucketShardPartitioner,
        )

        self.settings = KafkaSettings(bootstrap_servers="127.0.0.1:9", topic="journal-profile")
        self.partitioner = ModelBucketShardPartitioner(self.settings.shards_per_model,
                                                       self.settings.bucket_seconds)


def _child(path: str, n: int, tracking_uri: str, workdir: Path) -> dict[str, Any]:
    from serve_journal._private.wiring import wire

    parts = wire(_config(tracking_uri, workdir))
    if path == "finalize":
        calls = _captured_calls(n, parts.model)
        finalize = parts.finalizer.finalize

        def work() -> int:
            for s in range(0, n, BATCH):
                finalize(calls[s:s + BATCH])
            return n
    elif path == "wire_encode":
        import serve_journal.transport.kafka  # noqa: F401  (imported outside the region)

        batches = _finalized_batches(parts, n)

        def work() -> int:
            return sum(entries for b in batches for _, _, entries in _kafka_encode(b))
    elif path == "kafka_sink":
        from serve_journal.sink.kafka import KafkaSinkSettings, _Chunk
        from serve_journal.sink.kafka_app import KafkaSinkRunner
        from serve_journal.sink.settings import SinkSettings
        from serve_journal.transport.wire import HEADERS

        values = [v for b in _finalized_batches(parts, n) for _, v, _ in _kafka_encode(b)]
        chunk_size = 50  # v2 messages of up to 512 KiB: ~5,000 entries per chunk
        chunks = []
        for s in range(0, len(values), chunk_size):
            chunk = _Chunk()
            chunk.messages = [(s + i, v, HEADERS) for i, v in enumerate(values[s:s + chunk_size])]
            chunks.append(chunk)
        settings = KafkaSinkSettings(bootstrap_servers="127.0.0.1:9", topic="journal-profile", partitions=(0,))
        runner = KafkaSinkRunner(settings, SinkSettings(journal_uri=str(workdir / "sink-journal"), dev_mode=True))

        def work() -> int:
            return sum(runner.sink._write_parts(0, chunk) for chunk in chunks)
    elif path == "actor_writer":
        from serve_journal.catalog.layout import split_by_partition
        from serve_journal.sink.actor import JournalWriter
        from serve_journal.sink.settings import SinkSettings

        batches = _finalized_batches(parts, n)
        settings = SinkSettings(journal_uri=str(workdir / "writer-journal"), roll_seconds=3600.0,
                                checkpoint_interval_s=3600.0, dev_mode=True)
        writer = JournalWriter.__ray_actor_class__(settings, 0)

        def work() -> int:
            rows = since_roll = 0
            for batch in batches:
                for key, part in split_by_partition(batch):
                    rows += writer.write(key, part)
                since_roll += batch.num_rows
                if since_roll >= 20_000:
                    writer.files.roll_all()
                    since_roll = 0
            if writer.flush():
                raise RuntimeError("the writer kept rows buffered after flush")
            return rows
    elif path == "actor_send":
        return _child_actor_send(parts, n, workdir)
    else:
        raise ValueError(f"path must be one of {PATHS}, got {path!r}")
    started = time.perf_counter()
    done = profiled_region(work)
    seconds = time.perf_counter() - started
    return {"path": path, "entries": done, "seconds": seconds, "rate": done / seconds}


def _child_actor_send(parts, n: int, workdir: Path) -> dict[str, Any]:
    from benchmarks._common import ray_session
    from serve_journal.sink.settings import SinkSettings
    from serve_journal.transport.actors import RayActorTransport

    batches = _finalized_batches(parts, n)
    with ray_session(num_cpus=2):
        transport = RayActorTransport(SinkSettings(journal_uri=str(workdir / "actor-journal"), dev_mode=True),
                                      pool_size=2, namespace=f"profile-{os.getpid()}", producer_id="profile")
        transport.send(batches[0])  # the writers start (not measured)
        if not transport.flush(120):
            raise RuntimeError("writer actors did not start within 120 s")

        def work() -> int:
            for batch in batches[1:]:
                transport.send(batch)
            if not transport.flush(120):
                raise RuntimeError("writers did not acknowledge within 120 s")
            return sum(b.num_rows for b in batches[1:])

        started = time.perf_counter()
        done = profiled_region(work)
        seconds = time.perf_counter() - started
        transport.close(30)  # the private Ray (and its detached writers) stops with the session
    return {"path": "actor_send", "entries": done, "seconds": seconds, "rate": done / seconds}


# -- the parent: py-spy, raw stacks, the docs section -----------------------------------------

_FRAME = re.compile(r"^(?P<func>.*) \((?P<file>.*):(?P<line>\d+)\)$")


def _short(frame: str) -> str:
    """``func (file:line)`` with the file relative to site-packages or the repository."""
    m = _FRAME.match(frame)
    if not m:
        return frame
    file = m.group("file")
    for marker in ("site-packages/", f"{REPO}/", "lib/python3.11/"):
        if marker in file:
            file = file.split(marker, 1)[1]
            break
    return f"{m.group('func')} ({file}:{m.group('line')})"


def top_frames(raw_lines: Iterable[str], anchor: str = ANCHOR, top: int = TOP) -> dict[str, Any]:
    """Own-time and inclusive-time shares of the frames below ``anchor`` in py-spy raw output.

    Each line is ``frame;frame;... count`` (root first). Stacks that do not pass through the
    anchor are left out; shares are of the samples that do.
    """
    own: collections.Counter[str] = collections.Counter()
    inclusive: collections.Counter[str] = collections.Counter()
    total = 0
    for line in raw_lines:
        line = line.rstrip("\n")
        if not line or " " not in line:
            continue
        stack, count_text = line.rsplit(" ", 1)
        frames = stack.split(";")
        at = next((i for i, f in enumerate(frames) if f.startswith(anchor)), None)
        if at is None:
            continue
        count = int(count_text)
        total += count
        # The benchmark's own closures around the work are not part of what is profiled.
        below = [_short(f) for f in frames[at + 1:] if "benchmarks/profile.py:" not in f] \
            or ["(the benchmark's own loop)"]
        own[below[-1]] += count
        for frame in set(below):
            inclusive[frame] += count
    share = (lambda c: c / total) if total else (lambda c: 0.0)
    return {"samples": total,
            "own": [(f, share(c)) for f, c in own.most_common(top)],
            "inclusive": [(f, share(c)) for f, c in inclusive.most_common(top)]}


def py_spy() -> str | None:
    """The py-spy executable beside this interpreter, or on PATH."""
    beside = Path(sys.executable).parent / "py-spy"
    return str(beside) if beside.exists() else shutil.which("py-spy")


def profile_path(path: str, n: int, tracking_uri: str, workdir: Path, rate: int = SAMPLE_RATE) -> dict[str, Any]:
    """Run one path in a child under py-spy; its throughput and top frames."""
    spy = py_spy()
    if spy is None:
        raise RuntimeError("py-spy is not installed: pip install py-spy")
    raw = workdir / f"{path}.raw.txt"
    out = workdir / f"{path}.json"
    child_dir = workdir / path
    child_dir.mkdir(parents=True, exist_ok=True)
    cmd = [spy, "record", "-f", "raw", "--function", "-r", str(rate), "-o", str(raw), "--",
           sys.executable, "-m", "benchmarks.profile", "--child", path, "--entries", str(n),
           "--tracking-uri", tracking_uri, "--workdir", str(child_dir), "--result", str(out)]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.run(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                          text=True, timeout=1800)
    if proc.returncode != 0 or not out.exists():
        tail = "\n".join(proc.stdout.splitlines()[-15:])
        raise RuntimeError(f"profiling {path} failed (exit {proc.returncode}):\n{tail}")
    result = json.loads(out.read_text())
    with open(raw, encoding="utf-8") as lines:
        result.update(top_frames(lines))
    return result


def code_state() -> str:
    """The commit benchmarks run at, and whether serve_journal/ had uncommitted changes."""
    def git(*args: str) -> str:
        return subprocess.run(["git", *args], cwd=REPO, capture_output=True, text=True).stdout.strip()

    head = git("rev-parse", "--short", "HEAD") or "unknown"
    dirty = git("status", "--porcelain", "--", "serve_journal")
    return f"`{head}`" + (" (serve_journal/ has uncommitted changes)" if dirty else " (serve_journal/ clean)")


def render_label(label: str, results: list[dict[str, Any]], size: str, command: str) -> str:
    """The subsection of one labelled run."""
    from benchmarks.machine import machine_info

    m = machine_info()
    load = " / ".join(f"{x:.2f}" for x in m.get("load_avg_at_start") or [])
    lines = [f"### {label}", "",
             f"Run {dt.datetime.now(dt.UTC):%Y-%m-%d %H:%M} UTC at commit {code_state()}; `{command}` "
             f"(size {size}); {m.get('cores')} cores, {m.get('cpu_model', '-')}; load average at start {load}.",
             "", "| path | what | entries | entries/s | samples |", "|---|---|---|---|---|"]
    for r in results:
        if "error" in r:
            lines.append(f"| {r['path']} | {DESCRIPTIONS[r['path']]} | - | not measured | - |")
            continue
        lines.append(f"| {r['path']} | {DESCRIPTIONS[r['path']]} | {r['entries']:,} | {r['rate']:,.0f} | "
                     f"{r['samples']:,} |")
    lines.append("")
    for r in results:
        lines += [f"#### {label}: {r['path']}", ""]
        if "error" in r:
            lines += [f"Not measured: `{r['error'].splitlines()[0]}`", ""]
            continue
        lines += ["| # | own time: function (file:first line) | share | inclusive: function (file:first line) | share |",
                  "|---|---|---|---|---|"]
        for i in range(max(len(r["own"]), len(r["inclusive"]))):
            own = r["own"][i] if i < len(r["own"]) else ("", None)
            inc = r["inclusive"][i] if i < len(r["inclusive"]) else ("", None)
            lines.append(f"| {i + 1} | {_code(own[0])} | {_pct(own[1])} | {_code(inc[0])} | {_pct(inc[1])} |")
        lines.append("")
    return "\n".join(lines)


def _code(frame: str) -> str:
    return f"`{frame}`" if frame else ""


def _pct(share: float | None) -> str:
    return "" if share is None else f"{share:.1%}"


_LABEL = re.compile(r"^### (\S+)$", re.M)


def merge_section(old: str | None, label: str, text: str) -> str:
    """The profiles section with ``label``'s subsection replaced (or added after the others)."""
    intro = ["## Profiles (`benchmarks/profile.py`)", "",
             "py-spy (`record -f raw --function`, 100 samples/s) over each path in its own process; "
             "only samples inside the measured region count (inputs are built before it). *Own time*: "
             "the sampled frame was this function itself; *inclusive*: the function was anywhere on "
             "the stack. Shares are of the region's samples; throughput was measured in the same run "
             "(py-spy's sampling costs it a few percent). A later run with `--label after` adds its "
             "own subsection and keeps this one.", ""]
    subsections: dict[str, str] = {}
    order: list[str] = []
    if old:
        marks = list(_LABEL.finditer(old))
        for i, m in enumerate(marks):
            end = marks[i + 1].start() if i + 1 < len(marks) else len(old)
            subsections[m.group(1)] = old[m.start():end].rstrip()
            order.append(m.group(1))
    if label not in subsections:
        order.append(label)
    subsections[label] = text.rstrip()
    return "\n".join(intro) + "\n" + "\n\n".join(subsections[x] for x in order) + "\n"


def write_profiles(docs: Path, label: str, text: str) -> None:
    """Put ``label``'s subsection into the profiles section of ``docs``."""
    from benchmarks._common import write_docs_section

    current = docs.read_text(encoding="utf-8") if docs.exists() else ""
    old = None
    if START in current and END in current:
        old = current[current.index(START) + len(START):current.index(END)]
    write_docs_section(docs, START, END, merge_section(old, label, text))


def run(size: str = "quick", label: str = "before", paths: tuple[str, ...] = PATHS,
        docs: Path | None = DOCS, workdir: str | None = None, tracking_uri: str | None = None,
        command: str | None = None) -> dict[str, Any]:
    """Profile ``paths`` at ``size``; write ``label``'s subsection into ``docs`` unless ``None``."""
    from benchmarks._common import fraud_registry

    n = SIZES[size]
    results = []
    with tempfile.TemporaryDirectory(prefix="sj-profile-", dir=workdir) as tmp:
        root = Path(tmp)
        tracking_uri = tracking_uri or fraud_registry(root / "mlflow")
        for path in paths:
            print(f"[profile] {path} ...", flush=True)
            try:
                results.append(profile_path(path, n, tracking_uri, root))
            except Exception as exc:  # noqa: BLE001 - reported in the document
                results.append({"path": path, "error": f"{type(exc).__name__}: {exc}"})
                print(results[-1]["error"], file=sys.stderr)
    command = command or f".venv/bin/python -m benchmarks.profile --size {size} --label {label}"
    text = render_label(label, results, size, command)
    if docs is not None:
        write_profiles(docs, label, text)
    return {"size": size, "label": label, "rows": results, "markdown": text}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.profile", description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", choices=tuple(SIZES), default="quick")
    parser.add_argument("--label", default="before", help="subsection name, e.g. before / after")
    parser.add_argument("--paths", default=",".join(PATHS), help=f"comma-separated subset of {PATHS}")
    parser.add_argument("--docs", default=str(DOCS), help="Markdown file to update ('-' for none)")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--entries", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--tracking-uri", help=argparse.SUPPRESS)
    parser.add_argument("--workdir", help=argparse.SUPPRESS)
    parser.add_argument("--result", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        os.environ.setdefault("SERVE_JOURNAL_DEV_MODE", "1")
        result = _child(args.child, args.entries, args.tracking_uri, Path(args.workdir))
        Path(args.result).write_text(json.dumps(result))
        return
    if not re.fullmatch(r"[A-Za-z0-9_.-]+", args.label):
        parser.error(f"--label must be a word of [A-Za-z0-9_.-], got {args.label!r}")
    paths = tuple(p.strip() for p in args.paths.split(",") if p.strip())
    unknown = sorted(set(paths) - set(PATHS))
    if unknown:
        parser.error(f"--paths got unknown path(s) {unknown}; known: {list(PATHS)}")
    docs = None if args.docs == "-" else Path(args.docs)
    command = ".venv/bin/python -m benchmarks.profile " + " ".join(argv if argv is not None else sys.argv[1:])
    out = run(args.size, args.label, paths, docs, command=command.strip())
    print(out["markdown"])


if __name__ == "__main__":
    main()
