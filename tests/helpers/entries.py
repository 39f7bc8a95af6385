"""Synthetic journal entries for the read and maintenance tests: a day of entries for a few
subjects across models and hours, written as many small rolled files like a writer would."""

from __future__ import annotations

import datetime as dt
import hashlib

import pyarrow as pa

from serve_journal.catalog.layout import DEFAULT_SPEC
from serve_journal.fileformat import encode_parquet
from serve_journal.schema import ENTRY_SCHEMA

DAY = dt.datetime(2025, 3, 4, tzinfo=dt.UTC)


def token(subject_id: str) -> str:
    """A fake subject token (the tests never write raw ids)."""
    return hashlib.sha256(b"test-token\0" + subject_id.encode()).hexdigest()[:32]


def make_entries(
    n: int,
    *,
    start: dt.datetime = DAY,
    spread_s: float = 3600.0,
    model: str = "fraud",
    version: str = "3",
    tokens: list[str | None] | None = None,
    producer: str = "p-1",
    seq_start: int = 0,
    decision: str | None = None,
) -> pa.Table:
    """``n`` synthetic entries with ENTRY_SCHEMA columns; subject tokens cycle through ``tokens``."""
    tokens = tokens or [token(f"bg-{i}") for i in range(17)]
    rows = []
    for i in range(n):
        seq = seq_start + i
        ts = start + dt.timedelta(seconds=spread_s * i / max(n, 1))
        score = (seq * 37 % 100) / 100
        rows.append({
            "schema_version": 1,
            "request_id": hashlib.md5(f"{producer}/{seq}".encode()).hexdigest(),
            "ts": ts,
            "caller": "svc-a",
            "subject_token": tokens[i % len(tokens)],
            "model_name": model,
            "model_version": version,
            "dataset_hash": "sha256:" + "ab" * 32,
            "dataset_hash_source": "tag",
            "features_hmac": hashlib.sha256(f"f{seq}".encode()).hexdigest(),
            "key_id": "k1",
            "outputs": [{"label": "fraud", "score": score}],
            "score": score,
            "threshold": 0.5,
            "decision": decision or ("block" if score >= 0.5 else "allow"),
            "explanation_ref": None,
            "outcome": "ok" if seq % 11 else "error",
            "error_type": None if seq % 11 else "ValueError",
            "latency_ms": 1.5,
            "risk_tier": "high",
            "sample_rate": 1.0,
            "producer_id": producer,
            "seq": seq,
            "app_name": "app",
            "deployment": "Fraud",
            "replica": "r1",
        })
    return pa.Table.from_pylist(rows, schema=ENTRY_SCHEMA)


def write_rolled(storage, table: pa.Table, files_per_partition: int = 3, prefix: str = "w") -> list[str]:
    """Write ``table`` like the writers do: per hour partition, several small files."""
    by_key: dict = {}
    for row_index, (model, ts) in enumerate(
        zip(table["model_name"].to_pylist(), table["ts"].to_pylist(), strict=True)
    ):
        by_key.setdefault(DEFAULT_SPEC.key_for(model, ts), []).append(row_index)
    paths = []
    for key, indices in sorted(by_key.items()):
        part = table.take(indices)
        step = -(-part.num_rows // files_per_partition)
        for j, offset in enumerate(range(0, part.num_rows, step)):
            name = f"{prefix}-{key.hour:02d}-{j:03d}"
            stored = storage.put_new(
                DEFAULT_SPEC.file_path(key, name), encode_parquet(part.slice(offset, step))
            )
            paths.append(stored.path)
    return paths


def ids(table: pa.Table) -> list[tuple[str, int]]:
    return sorted(zip(table["producer_id"].to_pylist(), table["seq"].to_pylist(), strict=True))
