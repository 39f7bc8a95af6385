"""Bytes per entry on disk for fraud-shaped entries, hot and cold, against raw JSON.

Entries are produced by the real finalizer (a ``JournalRuntime`` on the in-memory transport fed
fraud requests), then encoded exactly as the sinks encode them: ``encode_parquet`` with
``HOT_OPTIONS`` in files of the size a writer rolls (one file per second of traffic at a given
rate), and with ``COLD_OPTIONS`` as one compacted file. The comparison is the JSON a user would
have logged for the same predictions (raw request with features and subject id, response), plain
and zstd-compressed, and the journal entries themselves as JSON lines.
"""

from __future__ import annotations

import json
import os
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

import pyarrow as pa

from benchmarks._common import fraud_bodies, fraud_registry, fraud_result, starlette_request
from benchmarks.baselines import log_record

SIZES = {
    "tiny": {"entries": 4_000, "rows_per_hot_file": (1_000,)},
    "quick": {"entries": 60_000, "rows_per_hot_file": (1_000, 10_000)},
    "full": {"entries": 500_000, "rows_per_hot_file": (1_000, 10_000, 50_000)},
}
TARGET_HOT_BYTES = 90.0
"""The design numbers (issue 17): <= 90 bytes per entry hot, <= 72 cold."""


def journal_entries(n: int, tracking_uri: str, root: Path) -> tuple[pa.Table, list[bytes], list[dict]]:
    """``n`` real journal entries for fraud requests, with the bodies and results behind them."""
    from serve_journal._private.wrapper import JournalRuntime
    from serve_journal.config import JournalConfig
    from serve_journal.schema import OUTCOME_OK
    from serve_journal.testing import InMemoryTransport

    name = f"storage-{uuid.uuid4().hex[:8]}"
    config = JournalConfig.resolve(model="models:/fraud@champion", threshold=0.75,
                                   tracking_uri=tracking_uri, journal_uri=str(root / "journal"),
                                   transport="memory", extra={"memory_transport": name})
    runtime = JournalRuntime(config)
    bodies = fraud_bodies(n, seed=23)
    results = [fraud_result(b) for b in bodies]
    try:
        for i, (body, result) in enumerate(zip(bodies, results, strict=True)):
            runtime.capture((starlette_request(body),), {}, result, OUTCOME_OK, None,
                            time.perf_counter() - 0.0004, None)
            if i % 20_000 == 19_999:
                runtime.flush(60)  # keep the buffer below capacity: nothing may be dropped here
        runtime.flush(60)
    finally:
        runtime.close(30)
    table = InMemoryTransport.shared(name).table()
    InMemoryTransport.shared(name).clear()
    return table, bodies, results


def run(size: str = "quick", workdir: str | os.PathLike[str] | None = None,
        tracking_uri: str | None = None) -> dict[str, Any]:
    """Run the storage benchmark; returns ``{"rows": [...], "params": {...}}``."""
    from serve_journal.fileformat import COLD_OPTIONS, HOT_OPTIONS, encode_parquet

    params = SIZES[size]
    with tempfile.TemporaryDirectory(prefix="sj-bench-storage-", dir=workdir) as tmp:
        root = Path(tmp)
        tracking_uri = tracking_uri or fraud_registry(root / "mlflow")
        table, bodies, results = journal_entries(params["entries"], tracking_uri, root)
    n = table.num_rows
    user_json = "".join(
        json.dumps(log_record(uuid.uuid4().hex, json.loads(b), r, 1.0)) + "\n"
        for b, r in zip(bodies, results, strict=True)).encode()
    entry_json = "".join(json.dumps(row, default=str) + "\n" for row in table.to_pylist()).encode()
    user_json_zstd = pa.compress(user_json, codec="zstd", asbytes=True)
    raw = len(user_json) / n
    rows: list[dict[str, Any]] = [
        {"name": "user JSON log line (raw features + subject id)", "bytes_per_entry": raw,
         "vs_raw_json": 1.0},
        {"name": "user JSON log, zstd-compressed file", "bytes_per_entry": len(user_json_zstd) / n,
         "vs_raw_json": len(user_json_zstd) / len(user_json)},
        {"name": "journal entries as JSON lines (no raw values)", "bytes_per_entry": len(entry_json) / n,
         "vs_raw_json": len(entry_json) / len(user_json)},
    ]
    for per_file in params["rows_per_hot_file"]:
        total = 0
        files = 0
        for start in range(0, n, per_file):
            total += len(encode_parquet(table.slice(start, per_file), HOT_OPTIONS))
            files += 1
        rows.append({"name": f"hot Parquet (zstd-3), {per_file:,} rows per file", "bytes_per_entry": total / n,
                     "vs_raw_json": total / len(user_json), "files": files,
                     "target_bytes": TARGET_HOT_BYTES})
    cold = len(encode_parquet(table, COLD_OPTIONS))
    rows.append({"name": f"cold Parquet (COLD_OPTIONS, zstd-19), one file of {n:,} rows",
                 "bytes_per_entry": cold / n, "vs_raw_json": cold / len(user_json), "files": 1})
    return {"rows": rows, "params": {"size": size, "entries": n,
                                     "rows_per_hot_file": list(params["rows_per_hot_file"])}}


if __name__ == "__main__":  # pragma: no cover
    import sys

    print(json.dumps(run(sys.argv[1] if len(sys.argv) > 1 else "tiny"), indent=1, default=str))
