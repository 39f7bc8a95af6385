"""Capture cost on the request path inside a loaded process.

A real :class:`~serve_journal._private.wrapper.JournalRuntime` (in-memory transport, so the
flusher thread really finalizes every entry: JSON parse, HMAC, subject token, Arrow) is fed
fraud-shaped Starlette requests at a steady offered rate; each ``runtime.capture(...)`` and each
call of a journaled method is timed with ``time.perf_counter_ns``. The flusher works on the same
GIL in the background, as in a replica. Baselines, same process, same pacing: a stdlib
``QueueHandler`` JSON log call and a ``json.dumps`` + write + flush + fsync per call (the latter
capped in count: fsync is milliseconds on many disks).
"""

from __future__ import annotations

import os
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

from benchmarks._common import (
    fraud_bodies,
    fraud_registry,
    fraud_result,
    percentiles_us,
    starlette_request,
)
from benchmarks.baselines import JsonLinesFsyncLog, MlflowTraceLog, QueueHandlerJsonLog, log_record

SIZES = {
    "tiny": {"calls": 5_000, "rate": 20_000, "fsync_calls": 200, "mlflow_calls": 0},
    "quick": {"calls": 100_000, "rate": 20_000, "fsync_calls": 2_000, "mlflow_calls": 1_000},
    "full": {"calls": 1_000_000, "rate": 20_000, "fsync_calls": 20_000, "mlflow_calls": 5_000},
}
TARGET_P99_US = 20.0
TARGET_P999_US = 100.0
POOL = 4096


def _paced(n: int, rate: float, call) -> list[int]:
    """Call ``call(i)`` ``n`` times at ``rate`` calls/s; returns each call's duration in ns."""
    samples = [0] * n
    clock = time.perf_counter_ns
    interval = int(1e9 / rate) if rate else 0
    next_at = clock()
    for i in range(n):
        if interval:
            while clock() < next_at:  # pacing spin between calls, outside the timed region
                pass
            next_at += interval
        t0 = clock()
        call(i)
        samples[i] = clock() - t0
    return samples


def _runtime_config(tracking_uri: str, root: Path, name: str):
    from serve_journal.config import JournalConfig

    return JournalConfig.resolve(
        model="models:/fraud@champion", threshold=0.75, tracking_uri=tracking_uri,
        journal_uri=str(root / "journal"), transport="memory", extra={"memory_transport": name},
    )


def runtime_counts(runtime: Any) -> tuple[int, int]:
    """(entries exported, entries dropped) of a runtime, read from its counters."""
    drops = getattr(runtime, "drops", None)
    dropped = getattr(drops, "total", 0) if drops is not None else 0
    return int(getattr(runtime, "exported", 0)), int(dropped)


def _row(name: str, samples: list[int], rate: float, notes: str = "", **extra: Any) -> dict[str, Any]:
    row = {"name": name, "offered_rate": rate, **percentiles_us(samples), "notes": notes, **extra}
    return row


def run(size: str = "quick", workdir: str | os.PathLike[str] | None = None,
        tracking_uri: str | None = None) -> dict[str, Any]:
    """Run the enqueue benchmark; returns ``{"rows": [...], "params": {...}}``."""
    from serve_journal._private.wrapper import JournalRuntime, wrap_class
    from serve_journal.schema import OUTCOME_OK
    from serve_journal.testing import InMemoryTransport

    params = dict(SIZES[size])
    n, rate = params["calls"], params["rate"]
    with tempfile.TemporaryDirectory(prefix="sj-bench-enqueue-", dir=workdir) as tmp:
        root = Path(tmp)
        tracking_uri = tracking_uri or fraud_registry(root / "mlflow")
        bodies = fraud_bodies(POOL)
        requests = [starlette_request(b) for b in bodies]
        results = [fraud_result(b) for b in bodies]
        args = [(r,) for r in requests]
        mask = POOL - 1
        rows = []

        # timer overhead: an empty timed region
        rows.append(_row("perf_counter_ns pair (timer overhead)", _paced(min(n, 100_000), 0, lambda i: None), 0))

        # 1. runtime.capture on the request path, flusher finalizing in the background
        name = f"bench-{uuid.uuid4().hex[:8]}"
        runtime = JournalRuntime(_runtime_config(tracking_uri, root, name))
        memory = InMemoryTransport.shared(name)
        capture = runtime.capture
        empty: dict = {}

        def do_capture(i: int) -> None:
            j = i & mask
            capture(args[j], empty, results[j], OUTCOME_OK, None, time.perf_counter(), None)
            if j == mask:
                memory.clear()  # keep memory flat; a lock-protected list swap, rare

        started = time.monotonic()
        samples = _paced(n, rate, do_capture)
        elapsed = time.monotonic() - started
        flushed = runtime.flush(60)
        exported, dropped = runtime_counts(runtime)
        runtime.close(30)
        rows.append(_row("serve_journal runtime.capture()", samples, rate,
                         notes=f"flusher finalized in background; flushed={flushed}",
                         journaled=exported, dropped=dropped, seconds=elapsed,
                         target_p99_us=TARGET_P99_US, target_p999_us=TARGET_P999_US))
        del samples

        # 2. the full journaled-method wrapper around a trivial method, and the bare method
        class Trivial:
            def __call__(self, request):
                return results[0]

        plain = Trivial()
        rows.append(_row("bare method call (no journal)", _paced(n, rate, lambda i: plain(requests[i & mask])), rate))
        name2 = f"bench-{uuid.uuid4().hex[:8]}"
        journaled_cls = wrap_class(Trivial, _runtime_config(tracking_uri, root, name2))
        instance = journaled_cls()
        memory2 = InMemoryTransport.shared(name2)

        def do_call(i: int) -> None:
            j = i & mask
            instance(requests[j])
            if j == mask:
                memory2.clear()

        samples = _paced(n, rate, do_call)
        from serve_journal._private.wrapper import journal_runtime

        rt2 = journal_runtime(instance)
        rt2.flush(60)
        rt2.close(30)
        rows.append(_row("serve_journal journaled method (wrapper + capture)", samples, rate,
                         notes="includes the trivial method itself and a uuid4 request id (outside Serve)",
                         target_p99_us=TARGET_P99_US, target_p999_us=TARGET_P999_US))
        del samples

        # 3. baselines
        qlog = QueueHandlerJsonLog(root / "queue.log")
        samples = _paced(n, rate, lambda i: qlog.log(log_record(uuid.uuid4().hex, bodies[i & mask].decode(),
                                                              results[i & mask], 1.0)))
        qlog.close()
        rows.append(_row("baseline: logging QueueHandler JSON line", samples, rate,
                         notes="json.dumps on the request thread; listener thread writes, no fsync"))
        del samples

        fsync_n = params["fsync_calls"]
        flog = JsonLinesFsyncLog(root / "audit.jsonl")
        samples = _paced(fsync_n, 0, lambda i: flog.log(log_record(uuid.uuid4().hex, bodies[i & mask].decode(),
                                                                   results[i & mask], 1.0)))
        flog.close()
        rows.append(_row("baseline: json.dumps + write + flush + fsync", samples, 0,
                         notes=f"{fsync_n} calls, unpaced (cannot reach the offered rate)"))

        mlflow_n = params["mlflow_calls"]
        try:
            if not mlflow_n:
                raise LookupError("skipped at this size")
            mlog = MlflowTraceLog(f"sqlite:///{root / 'traces.db'}")
            samples = _paced(mlflow_n, 0, lambda i: mlog.log(log_record(
                uuid.uuid4().hex, {"features": "synthetic", "i": i}, results[i & mask], 1.0)))
            mlog.close()
            rows.append(_row("baseline: MLflow tracing span (sqlite store)", samples, 0,
                             notes=f"{mlflow_n} calls, unpaced"))
        except Exception as exc:  # noqa: BLE001 - reported, not fatal
            rows.append({"name": "baseline: MLflow tracing span (sqlite store)", "n": 0,
                         "notes": f"not measured: {type(exc).__name__}: {exc}"})
    return {"rows": rows, "params": {"size": size, **params}}


if __name__ == "__main__":  # pragma: no cover
    import json
    import sys

    print(json.dumps(run(sys.argv[1] if len(sys.argv) > 1 else "tiny"), indent=1, default=str))
