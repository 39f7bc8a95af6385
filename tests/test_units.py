"""Unit tests of the skeleton's pure parts: config, layout, buffer, entry finalizing, manifests."""

from __future__ import annotations

import threading
import time

import pyarrow as pa
import pytest

from serve_journal._private.batching import BatchWorker
from serve_journal._private.entries import CapturedCall, EntryFinalizer, ReplicaIdentity
from serve_journal.catalog.layout import DEFAULT_SPEC, PartitionKey
from serve_journal.config import ConfigError, JournalConfig
from serve_journal.policy import build_policy
from serve_journal.privacy.pseudonymizer import StaticKeyPseudonymizer
from serve_journal.registry import ModelInfo, ModelRef, dataset_manifest
from serve_journal.sampling import Sampler
from serve_journal.schema import ENTRY_SCHEMA


def test_config_precedence_argument_then_environment_then_default(monkeypatch):
    monkeypatch.setenv("SERVE_JOURNAL_BUFFER_CAPACITY", "77")
    monkeypatch.setenv("SERVE_JOURNAL_JOURNAL_URI", "/tmp/from-env")
    cfg = JournalConfig.resolve(model="m", journal_uri="/tmp/from-arg")
    assert cfg.journal_uri == "/tmp/from-arg"
    assert cfg.buffer_capacity == 77
    assert cfg.flush_interval_s is None and cfg.flush_interval() == 0.25  # the actor path's
    assert JournalConfig.resolve(model="m", transport="kafka").flush_interval() == 0.1
    monkeypatch.setenv("SERVE_JOURNAL_FLUSH_INTERVAL_S", "0.5")
    assert JournalConfig.resolve(model="m", transport="kafka").flush_interval() == 0.5
    monkeypatch.delenv("SERVE_JOURNAL_FLUSH_INTERVAL_S")
    monkeypatch.setenv("SERVE_JOURNAL_BUFFER_CAPACITY", "lots")
    with pytest.raises(ConfigError, match="SERVE_JOURNAL_BUFFER_CAPACITY must be a int"):
        JournalConfig.resolve(model="m")


@pytest.mark.parametrize("bad, field", [
    ({"buffer_capacity": 0}, "buffer_capacity"),
    ({"flush_interval_s": -1}, "flush_interval_s"),
    ({"transport": "carrier-pigeon"}, "transport"),
    ({"outputs": "not callable"}, "outputs"),
    ({"no_such_option": 1}, "unknown option"),
])
def test_config_errors_name_the_field(bad, field):
    with pytest.raises(ConfigError, match=field):
        JournalConfig.resolve(model="m", **bad)


def test_partition_paths_escape_model_names_and_parse_back():
    key = DEFAULT_SPEC.key_for_micros("fraud/v=2", 1_700_000_000_000_000)
    path = DEFAULT_SPEC.file_path(key, "w00-abc-000001")
    assert path.startswith("hot/model=fraud%2Fv%3D2/date=2023-11-14/hour=22/")
    tier, parsed = DEFAULT_SPEC.parse(path)
    assert tier == "hot" and parsed == key
    with pytest.raises(ValueError):
        DEFAULT_SPEC.file_path(key, "../escape")


def test_model_refs_parse():
    assert ModelRef.parse("models:/fraud@champion") == ModelRef("fraud", alias="champion")
    assert ModelRef.parse("models:/fraud/3") == ModelRef("fraud", version="3")
    assert ModelRef.parse("fraud", "4") == ModelRef("fraud", version="4")
    with pytest.raises(ValueError, match="models:/"):
        ModelRef.parse("models:/@x")


def test_full_buffer_drops_newest_and_counts_every_drop():
    release = threading.Event()
    exported: list = []
    drops: list = []

    def export(items):
        release.wait(10)
        exported.extend(items)

    worker = BatchWorker(export, capacity=10, batch_size=5, interval_s=0.01,
                         on_drop=lambda items, reason: drops.extend((i, reason) for i in items))
    # Fill: the first batch is taken by the blocked export, the rest fills the buffer.
    offered = [worker.offer(i) for i in range(40)]
    release.set()
    assert worker.close(timeout=10)
    accepted = [i for i, ok in zip(range(40), offered, strict=True) if ok]
    dropped = [i for i, _ in drops]
    assert sorted(exported) == accepted
    assert sorted(accepted + dropped) == list(range(40))
    assert dropped and all(reason == "buffer_full" for _, reason in drops)
    # Drop-newest: every dropped item is newer than every accepted one of the full buffer.
    assert min(dropped) > sorted(accepted)[-10]


def test_flush_and_close_honour_timeouts_and_closing_twice_is_harmless():
    gate = threading.Event()
    worker = BatchWorker(lambda items: gate.wait(5), capacity=10, batch_size=1, interval_s=0.01,
                         on_drop=lambda items, reason: None)
    worker.offer(1)
    started = time.monotonic()
    assert worker.flush(timeout=0.2) is False
    assert time.monotonic() - started < 2
    gate.set()
    assert worker.flush(timeout=5)
    assert worker.close(timeout=5)
    assert worker.close(timeout=5)
    assert worker.offer(2) is False


def _call(seq, args=(), result=None, annotations=None, outcome="ok"):
    model = ModelInfo("fraud", "3", "sha256:ab", "tag")
    return CapturedCall(seq, 1_700_000_000_000_000 + seq, f"r{seq}", args, {}, None, None, result,
                        outcome, None, 1.5, annotations or {}, model)


def test_finalizer_builds_entries_with_tokens_not_raw_values():
    cfg = JournalConfig.resolve(model="fraud", threshold=0.5)
    fin = EntryFinalizer(cfg, StaticKeyPseudonymizer("k1", b"k" * 32),
                         ReplicaIdentity("p1", "app", "Dep", "rep"),
                         Sampler(build_policy(None), b"s" * 32))
    calls = [
        _call(0, ({"subject_id": "alice", "features": {"x": 1.0}},), {"score": 0.9}),
        _call(1, ({"subject_id": "alice", "features": {"x": 1.0}},), {"scores": {"a": 0.1, "b": 0.7}}),
        _call(2, ({"features": [float("nan")]},), None, {"decision": "manual", "explanation_ref": "e-1"}),
        _call(3, ({"subject_id": "bob", "features": {"x": object()}},), {"score": 0.2}),
    ]
    result = fin.finalize(calls)
    batch = result.batch
    assert result.keep == [True] * 4 and result.tiers == ["default"] * 4
    assert batch.schema == ENTRY_SCHEMA
    rows = pa.Table.from_batches([batch]).to_pylist()
    assert rows[0]["decision"] == "positive" and rows[0]["score"] == 0.9
    assert rows[1]["outputs"] == [{"label": "b", "score": 0.7}, {"label": "a", "score": 0.1}]
    assert rows[1]["score"] == 0.7
    assert rows[0]["subject_token"] == rows[1]["subject_token"] != rows[3]["subject_token"]
    assert rows[0]["features_hmac"] == rows[1]["features_hmac"]
    assert rows[2]["subject_token"] is None and rows[2]["decision"] == "manual"
    assert rows[2]["explanation_ref"] == "e-1" and rows[2]["features_hmac"]
    assert rows[3]["features_hmac"] is None and fin.unencodable_features == 1
    assert "alice" not in repr(rows) and "bob" not in repr(rows)


def test_dataset_manifest_is_independent_of_location(tmp_path):
    for base in ("a", "b"):
        (tmp_path / base / "sub").mkdir(parents=True)
        (tmp_path / base / "x.csv").write_text("1,2\n")
        (tmp_path / base / "sub" / "y.csv").write_text("3,4\n")
    one, two = dataset_manifest(tmp_path / "a"), dataset_manifest(tmp_path / "b")
    assert one.digest == two.digest and one.digest.startswith("sha256:")
    (tmp_path / "b" / "x.csv").write_text("1,3\n")
    assert dataset_manifest(tmp_path / "b").digest != one.digest
    assert [f[0] for f in one.files] == ["sub/y.csv", "x.csv"]


def test_partition_key_start():
    assert PartitionKey("m", "2024-01-15", 10).start.isoformat() == "2024-01-15T10:00:00+00:00"


def test_docs_schema_table_matches_the_code():
    from pathlib import Path

    from serve_journal.schema import schema_markdown

    doc = (Path(__file__).parent.parent / "docs" / "schema.md").read_text()
    table = doc.split("<!-- schema:start -->")[1].split("<!-- schema:end -->")[0].strip()
    assert table == schema_markdown()


def test_one_time_parser_for_every_time_option():
    import datetime as dt

    from serve_journal.times import as_utc, to_micros

    utc = dt.datetime(2025, 1, 15, 10, 0, tzinfo=dt.UTC)
    assert as_utc("2025-01-15T10:00:00Z") == utc
    assert as_utc("2025-01-15T12:00:00+02:00") == utc
    assert as_utc("2025-01-15T10:00:00") == utc  # no offset: UTC
    assert as_utc(dt.datetime(2025, 1, 15, 10)) == utc
    assert as_utc(None) is None
    assert to_micros("1970-01-01T00:00:01Z") == 1_000_000
    for bad in ("", "yesterday", "2025-13-01"):
        with pytest.raises(ValueError, match="since must be an ISO-8601 time"):
            as_utc(bad, "since")
    with pytest.raises(TypeError, match="until"):
        as_utc(12345, "until")  # type: ignore[arg-type]
