"""Small entry tables from one producer with chosen sequence numbers, for manifest, Merkle and
verify tests."""

from __future__ import annotations

import datetime as dt

import pyarrow as pa

from serve_journal.catalog.layout import DEFAULT_SPEC
from serve_journal.schema import ENTRY_SCHEMA

BASE_TS = dt.datetime(2026, 3, 1, 10, 0, tzinfo=dt.UTC)


def make_rows(producer: str, seqs, *, model: str = "fraud", start: dt.datetime = BASE_TS) -> list[dict]:
    """Journal entries of ENTRY_SCHEMA: tokens and HMACs only, never raw values."""
    rows = []
    for seq in seqs:
        rows.append({
            "schema_version": 1, "request_id": f"req-{producer}-{seq}",
            "ts": start + dt.timedelta(milliseconds=10 * seq), "caller": "svc-a",
            "subject_token": f"tok{seq % 7:04d}", "model_name": model, "model_version": "3",
            "dataset_hash": "sha256:" + "ab" * 32, "dataset_hash_source": "tag",
            "features_hmac": f"{seq:064x}", "key_id": "k1",
            "outputs": [{"label": "fraud", "score": 0.1 + seq % 10 / 100}], "score": 0.1 + seq % 10 / 100,
            "threshold": 0.5, "decision": "allow", "explanation_ref": None, "outcome": "ok",
            "error_type": None, "latency_ms": 1.5, "risk_tier": "high", "sample_rate": 1.0,
            "producer_id": producer, "seq": seq, "app_name": "app", "deployment": "Model",
            "replica": "Model#abc",
        })
    return rows


def make_table(producer: str, seqs, **kwargs) -> pa.Table:
    return pa.Table.from_pylist(make_rows(producer, seqs, **kwargs), schema=ENTRY_SCHEMA)


def data_path(name: str, *, model: str = "fraud", tier: str = "hot") -> str:
    key = DEFAULT_SPEC.key_for(model, BASE_TS)
    return DEFAULT_SPEC.file_path(key, name, tier)
