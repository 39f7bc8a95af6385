"""Trace ids on entries (schema v3): capture from the active OpenTelemetry span or the W3C
``traceparent`` header, lookup by trace id (query, console), and every earlier version unchanged.

Real parts: opentelemetry-sdk spans, a journaled class in process (memory transport, the sqlite
MLflow registry), signed local journals written by the writers' own code, compaction and
lifecycle, the moto S3 server, the console app over HTTP (Starlette's test client), the Kafka wire
codec, and (slow) a Ray Serve app behind Serve's own HTTP proxy.
"""

from __future__ import annotations

import datetime as dt
import io
import json
import logging
import re
import sys
import uuid
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from opentelemetry.sdk.trace import TracerProvider
from starlette.requests import Request

from serve_journal import journaled
from serve_journal._private.entries import CapturedCall, EntryFinalizer, ReplicaIdentity
from serve_journal._private.tracing import (
    active_span_reader,
    header_trace_ids,
    parse_traceparent,
    trace_ids,
)
from serve_journal._private.wrapper import journal_runtime
from serve_journal.catalog import live_files
from serve_journal.catalog.layout import DEFAULT_SPEC, split_by_partition
from serve_journal.config import JournalConfig
from serve_journal.fileformat import decode_parquet, encode_parquet, sort_for_lookup
from serve_journal.integrity.fingerprint import fingerprint, fingerprint_files
from serve_journal.integrity.merkle import entry_leaf, table_merkle_root
from serve_journal.maintain.compaction import run_compaction
from serve_journal.maintain.lifecycle import run_lifecycle
from serve_journal.policy import build_policy
from serve_journal.privacy.pseudonymizer import StaticKeyPseudonymizer
from serve_journal.read.query import JournalQuery, read_access_log
from serve_journal.read.verify import format_report, verify_journal
from serve_journal.registry import ModelInfo
from serve_journal.sampling import Sampler
from serve_journal.schema import ADDED_COLUMNS, ENTRY_SCHEMA, SCHEMA_VERSION, check_trace_id
from serve_journal.sink.settings import SinkSettings, manifest_hook
from serve_journal.transport import wire
from tests.fixtures import kafka as kafka_fixture
from tests.helpers.entries import DAY, make_entries
from tests.helpers.journal import signing_key_files, write_signed

TRACE = "4bf92f3577b34da6a3ce929d0e0e4736"
PARENT = "00f067aa0ba902b7"
TRACEPARENT = f"00-{TRACE}-{PARENT}-01"
CANARY = "CANARY-HEADER-7c41"  # in headers that must never be recorded
V3_COLUMNS = ("trace_id", "span_id")

# Computed by release 60f338b (entry schema v2) over tests/fixtures/kafka.make_entries(40):
# the Merkle root its manifest records hold and the fingerprint its commit markers hold.
V2_ROOT = "0ba7dab5474c5e2a1de657b8b2e7e5d7581ed57aad7f025fbb3f3dd7ffe64f45"
V2_FINGERPRINT_IDS = "dc5debeab83c09d107926142d0810d5f0c24d4887b262e4d908791d13ca90fc0"
V2_FINGERPRINT_ENTRIES = "8fe5e4bec234f9ebd243248096fdf6b237345168c57a2f4be002e70d32e74944"


def _hex(root) -> str:
    return root.hex() if isinstance(root, bytes) else str(root)


# ------------------------------------------------------------------------------------------------
# The traceparent header
# ------------------------------------------------------------------------------------------------


def test_a_valid_traceparent_gives_its_trace_and_parent_ids():
    assert parse_traceparent(TRACEPARENT) == (TRACE, PARENT)
    assert parse_traceparent(TRACEPARENT.encode()) == (TRACE, PARENT)
    assert parse_traceparent(f"00-{TRACE}-{PARENT}-00") == (TRACE, PARENT)  # not sampled: still ids
    assert parse_traceparent(f" {TRACEPARENT}\t") == (TRACE, PARENT)  # HTTP optional whitespace


@pytest.mark.parametrize("value", [
    None, "", "garbage", TRACEPARENT.upper(), f"01-{TRACE}-{PARENT}-01", f"ff-{TRACE}-{PARENT}-01",
    f"00-{'0' * 32}-{PARENT}-01", f"00-{TRACE}-{'0' * 16}-01", f"00-{TRACE[:-1]}-{PARENT}-01",
    f"00-{TRACE}-{PARENT}-1", f"00-{TRACE}-{PARENT}-01-extra", f"00-{TRACE}x-{PARENT}-01",
    f"00_{TRACE}_{PARENT}_01", f"00-{TRACE}-{PARENT}-0g", f"00-{TRACE} -{PARENT}-01",
    f"00-{TRACE}-{PARENT}-01\n", b"\xff\xfe" + TRACEPARENT.encode(), "00-" + "é" * 32 + f"-{PARENT}-01",
    12345,
])
def test_a_malformed_traceparent_is_ignored(value):
    assert parse_traceparent(value) is None


@settings(max_examples=200, deadline=None)
@given(st.binary(min_size=16, max_size=16), st.binary(min_size=8, max_size=8),
       st.binary(min_size=1, max_size=1))
def test_every_valid_header_round_trips_and_all_zero_ids_never_do(trace, span, flags):
    value = f"00-{trace.hex()}-{span.hex()}-{flags.hex()}"
    expected = None if not any(trace) or not any(span) else (trace.hex(), span.hex())
    assert parse_traceparent(value) == expected


@settings(max_examples=300, deadline=None)
@given(st.text(max_size=80) | st.binary(max_size=80))
def test_any_header_value_is_ids_or_none_and_never_raises(value):
    out = parse_traceparent(value)
    assert out is None or (re.fullmatch("[0-9a-f]{32}", out[0]) and re.fullmatch("[0-9a-f]{16}", out[1]))


def test_several_traceparent_headers_are_ignored_together():
    one = {"type": "http", "headers": [(b"traceparent", TRACEPARENT.encode())]}
    two = {"type": "http", "headers": [(b"traceparent", TRACEPARENT.encode()),
                                       (b"traceparent", f"00-{'a' * 32}-{'b' * 16}-01".encode())]}
    assert header_trace_ids(one) == (TRACE, PARENT)
    assert header_trace_ids(two) is None
    assert header_trace_ids({"type": "http", "headers": []}) is None
    assert header_trace_ids(None) is None


# ------------------------------------------------------------------------------------------------
# Capture: the active span, else the header; the finalizer writes the columns
# ------------------------------------------------------------------------------------------------


def test_the_active_span_is_read_and_nothing_when_none_is_active():
    read = active_span_reader()
    assert read is not None and read() is None
    tracer = TracerProvider().get_tracer("test")
    with tracer.start_as_current_span("call") as span:
        context = span.get_span_context()
        assert read() == (context.trace_id, context.span_id)
        with tracer.start_as_current_span("inner") as inner:
            assert read() == (context.trace_id, inner.get_span_context().span_id)
    assert read() is None
    assert trace_ids((context.trace_id, context.span_id), None) == (
        f"{context.trace_id:032x}", f"{context.span_id:016x}")


@pytest.mark.parametrize("public_api_only", [False, True])
def test_the_reader_gives_the_same_ids_from_the_context_variable_and_the_public_api(
        monkeypatch, public_api_only):
    """The fast path (OpenTelemetry's context variable, no span -> ``None`` at once) and the
    public API agree: no span, an SDK span, a propagated remote context, an invalid span set
    explicitly, and in a thread started with a copy of the context."""
    import contextvars
    import threading

    from opentelemetry import trace
    from opentelemetry.trace import INVALID_SPAN, NonRecordingSpan, SpanContext, TraceFlags

    from serve_journal._private import tracing

    assert tracing._span_slot() is not None  # the default runtime context is in use here
    if public_api_only:
        monkeypatch.setattr(tracing, "_span_slot", lambda: None)
    read = active_span_reader()
    assert read() is None
    remote = SpanContext(trace_id=0xABC, span_id=0xDEF, is_remote=True, trace_flags=TraceFlags(1))
    with trace.use_span(NonRecordingSpan(remote)):
        assert read() == (0xABC, 0xDEF)
        seen = []
        context = contextvars.copy_context()
        worker = threading.Thread(target=lambda: seen.append(context.run(read)))
        worker.start()
        worker.join()
        assert seen == [(0xABC, 0xDEF)]
    with trace.use_span(INVALID_SPAN):
        assert read() is None
    with TracerProvider().get_tracer("test").start_as_current_span("call") as span:
        ids = span.get_span_context()
        assert read() == (ids.trace_id, ids.span_id)
    assert read() is None


def test_the_reader_follows_a_runtime_context_replaced_after_it_was_made(monkeypatch):
    """Found in review: the fast path kept the context variable of the runtime context it was
    made with; a runtime context installed later must not hide its spans."""
    from opentelemetry import context as otel_context
    from opentelemetry import trace
    from opentelemetry.context.contextvars_context import ContextVarsRuntimeContext
    from opentelemetry.trace import NonRecordingSpan, SpanContext, TraceFlags

    read = active_span_reader()
    monkeypatch.setattr(otel_context, "_RUNTIME_CONTEXT", ContextVarsRuntimeContext())
    with trace.use_span(NonRecordingSpan(SpanContext(1, 2, False, TraceFlags(1)))):
        assert read() == (1, 2)
    assert read() is None


def test_without_opentelemetry_api_only_the_header_is_read(monkeypatch):
    monkeypatch.setitem(sys.modules, "opentelemetry.trace", None)  # as if not installed
    assert active_span_reader() is None
    assert trace_ids(None, _scope((b"traceparent", TRACEPARENT.encode()))) == (TRACE, PARENT)


def _finalizer() -> EntryFinalizer:
    cfg = JournalConfig.resolve(model="fraud", threshold=0.5)
    return EntryFinalizer(cfg, StaticKeyPseudonymizer("k1", b"k" * 32),
                          ReplicaIdentity("p1", "app", "Dep", "rep"),
                          Sampler(build_policy(None), b"s" * 32))


def _scope(*headers: tuple[bytes, bytes]) -> dict:
    return {"type": "http", "headers": [(b"content-type", b"application/json"), *headers]}


def test_finalized_entries_carry_span_ids_else_header_ids_else_nulls(caplog):
    model = ModelInfo("fraud", "3", "sha256:ab", "tag")
    body = json.dumps({"subject_id": "alice", "features": {"x": 1.0}}).encode()
    noisy = ((b"tracestate", f"vendor={CANARY}".encode()), (b"baggage", f"user={CANARY}".encode()),
             (b"x-subject", CANARY.encode()))
    span = (int(TRACE[::-1], 16), 0x1122334455667788)
    cases = [
        (span, _scope((b"traceparent", TRACEPARENT.encode()), *noisy)),   # span wins
        (None, _scope((b"traceparent", TRACEPARENT.encode()), *noisy)),   # header
        (None, _scope((b"traceparent", f"00-{TRACE}-{PARENT}-01-{CANARY}".encode()), *noisy)),
        (None, _scope(*noisy)),                                           # neither
        (span, None),                                                     # handle call, span
        (None, None),                                                     # handle call
        ((0, 0), _scope()),                                               # impossible span ids
    ]
    calls = [CapturedCall(i, 1_700_000_000_000_000 + i, f"r{i}", (), {}, scope, body,
                          {"score": 0.2}, "ok", None, 1.0, None, model, span=s)
             for i, (s, scope) in enumerate(cases)]
    with caplog.at_level(logging.DEBUG, logger="serve_journal"):
        batch = _finalizer().finalize(calls).batch
    assert batch.schema == ENTRY_SCHEMA
    rows = pa.Table.from_batches([batch]).to_pylist()
    got = [(r["trace_id"], r["span_id"]) for r in rows]
    assert got == [(TRACE[::-1], "1122334455667788"), (TRACE, PARENT), (None, None), (None, None),
                   (TRACE[::-1], "1122334455667788"), (None, None), (None, None)]
    assert all(r["schema_version"] == SCHEMA_VERSION == 3 for r in rows)
    # Nothing else of the headers is recorded, and a bad header is never logged.
    sink = io.BytesIO()
    pq.write_table(pa.Table.from_batches([batch]), sink)
    assert CANARY.encode() not in sink.getvalue()
    assert CANARY not in json.dumps(rows, default=str)
    assert CANARY not in caplog.text


class _Scorer:
    def __call__(self, request: Request) -> dict:
        return {"score": 0.25}


def _request(*headers: tuple[bytes, bytes]) -> Request:
    request = Request({"type": "http", "method": "POST", "path": "/", "query_string": b"",
                       "headers": [(b"content-type", b"application/json"), *headers]})
    request._body = json.dumps({"subject_id": "bob", "features": {"amount": 3.0}}).encode()
    return request


def test_a_journaled_call_records_the_active_span_or_the_header(mlflow_registry, tmp_path):
    """The wrapper's request path in process: an application span around the call (what Serve's
    tracing attaches around a replica's request), a traceparent header, both, a bad header."""
    tracking_uri, _ = mlflow_registry
    instance = journaled(model="models:/fraud@champion", tracking_uri=tracking_uri,
                         transport="memory", dev_mode=True, journal_uri=str(tmp_path / "journal"),
                         extra={"memory_transport": f"t-{uuid.uuid4().hex}"})(_Scorer)()
    runtime = journal_runtime(instance)
    tracer = TracerProvider().get_tracer("test")
    try:
        with tracer.start_as_current_span("replica_handle_request") as span:
            assert instance(_request()) == {"score": 0.25}
            assert instance(_request((b"traceparent", TRACEPARENT.encode()))) == {"score": 0.25}
        ids = span.get_span_context()
        instance(_request((b"traceparent", TRACEPARENT.encode())))
        instance(_request((b"traceparent", b"00-" + b"0" * 32 + f"-{PARENT}-01".encode())))
        instance(_request())
        assert runtime.flush(30)
        rows = sorted(runtime.transport.table().to_pylist(), key=lambda r: r["seq"])
    finally:
        runtime.close(10)
    span_ids = (f"{ids.trace_id:032x}", f"{ids.span_id:016x}")
    assert [(r["trace_id"], r["span_id"]) for r in rows] == [
        span_ids, span_ids, (TRACE, PARENT), (None, None), (None, None)]


def test_serve_tracing_span_around_a_journaled_call_is_recorded(mlflow_registry, tmp_path,
                                                                 monkeypatch):
    """What a Serve replica does with tracing on (ray/serve/_private/replica.py
    ``_tracing_context``), with Serve's own helpers: continue the propagated context (here from
    a traceparent) in a ``replica_handle_request`` span attached around the user's method. The
    entry holds the trace id the caller started and the replica span's own id."""
    from ray.serve._private import tracing_utils

    tracer = TracerProvider().get_tracer("serve-test")
    monkeypatch.setattr(tracing_utils, "_tracing_enabled", True)
    monkeypatch.setattr(tracing_utils, "_tracer", tracer)
    tracking_uri, _ = mlflow_registry
    instance = journaled(model="models:/fraud@champion", tracking_uri=tracking_uri,
                         transport="memory", dev_mode=True, journal_uri=str(tmp_path / "journal"),
                         extra={"memory_transport": f"t-{uuid.uuid4().hex}"})(_Scorer)()
    runtime = journal_runtime(instance)
    try:
        context = tracing_utils.extract_propagated_context({"traceparent": TRACEPARENT})
        with tracing_utils.TraceContextManager("replica_handle_request Scorer __call__",
                                               trace_context=context) as manager:
            instance(_request())  # a handle call would carry no header: only the span
        replica_span = manager.span.get_span_context()
        assert runtime.flush(30)
        (row,) = runtime.transport.table().to_pylist()
    finally:
        runtime.close(10)
    assert row["trace_id"] == TRACE == f"{replica_span.trace_id:032x}"
    assert row["span_id"] == f"{replica_span.span_id:016x}" != PARENT


# ------------------------------------------------------------------------------------------------
# Hashes and files of earlier versions are unchanged under v3
# ------------------------------------------------------------------------------------------------


def _v2(table: pa.Table | pa.RecordBatch) -> pa.Table:
    """``table`` as the v2 release had it: no trace columns, v2 schema metadata."""
    table = table if isinstance(table, pa.Table) else pa.Table.from_batches([table])
    table = table.drop_columns(list(V3_COLUMNS))
    return table.replace_schema_metadata({b"serve_journal.schema_version": b"2"})


def test_v2_entries_keep_the_merkle_root_and_fingerprint_the_v2_release_computed():
    conformed = _version(pa.Table.from_batches([kafka_fixture.make_entries(40)]), 2)  # ids null
    v2 = _v2(conformed)
    assert _hex(table_merkle_root(v2)) == V2_ROOT
    assert _hex(table_merkle_root(conformed)) == V2_ROOT
    for table in (v2, conformed):
        fp = fingerprint(table)
        assert (fp.entry_ids, fp.entries) == (V2_FINGERPRINT_IDS, V2_FINGERPRINT_ENTRIES)
    # A trace id set on one entry takes part in its leaf (and so in the root and fingerprint).
    row = conformed.to_pylist()[1]
    assert entry_leaf(row) == entry_leaf({k: v for k, v in row.items() if k not in V3_COLUMNS})
    assert entry_leaf(dict(row, trace_id=TRACE)) != entry_leaf(row)
    assert entry_leaf(dict(row, span_id=PARENT)) != entry_leaf(row)
    traced = conformed.set_column(conformed.schema.get_field_index("trace_id"),
                                  ENTRY_SCHEMA.field("trace_id"),
                                  pa.array([TRACE] + [None] * 39, pa.string()))
    assert _hex(table_merkle_root(traced)) != V2_ROOT
    assert fingerprint(traced).entries != V2_FINGERPRINT_ENTRIES
    assert ADDED_COLUMNS["trace_id"] == ADDED_COLUMNS["span_id"] == 3


def _with_traces(table: pa.Table, every: int = 3) -> pa.Table:
    """Entries grouped in traces of ``every`` consecutive entries (one composed request each,
    every entry its own span); every 4th trace untraced (null)."""
    traces, spans = [], []
    for i in range(table.num_rows):
        group = i // every
        traced = group % 4 != 3
        traces.append(f"{group + 1:08x}" + "ab" * 12 if traced else None)
        spans.append(f"{i + 1:016x}" if traced else None)
    table = table.set_column(table.schema.get_field_index("trace_id"), ENTRY_SCHEMA.field("trace_id"),
                             pa.array(traces, pa.string()))
    table = table.set_column(table.schema.get_field_index("span_id"), ENTRY_SCHEMA.field("span_id"),
                             pa.array(spans, pa.string()))
    return _version(table, SCHEMA_VERSION)


def _version(table: pa.Table, version: int) -> pa.Table:
    return table.set_column(0, ENTRY_SCHEMA.field("schema_version"),
                            pa.array([version] * table.num_rows, pa.int16()))


class TracedJournal:
    """A signed local journal: v3 files with trace ids (producer p-1), v3 files of a deployment
    without tracing (p-2), and one genuine v2 file (p-3, no trace columns) recorded as the v2
    release records one."""

    def __init__(self, base: Path) -> None:
        key_file, self.public_key = signing_key_files(base)
        self.uri = str(base / "journal")
        self.settings = SinkSettings(self.uri, signing_key_file=str(key_file))
        self.storage = self.settings.storage()
        self.traced = _with_traces(make_entries(120, spread_s=2 * 3600, producer="p-1"))
        self.untraced = _version(make_entries(60, spread_s=2 * 3600, producer="p-2"), SCHEMA_VERSION)
        write_signed(self.settings, self.storage, "w00", self.traced, files=3)
        write_signed(self.settings, self.storage, "w01", self.untraced, files=2)
        self.v2 = _v2(_version(make_entries(30, spread_s=1800, producer="p-3"), 2))
        self.v2_path = self._write_v2_file(self.v2)

    def _write_v2_file(self, table: pa.Table) -> str:
        ((key, rows),) = split_by_partition(table)
        rows = sort_for_lookup(rows)  # the order the v2 writer stored (its record's root)
        sink = io.BytesIO()
        pq.write_table(rows, sink, compression="zstd")
        stored = self.storage.put_new(DEFAULT_SPEC.file_path(key, "p-3-v2-000000"), sink.getvalue())
        log = self.settings.manifest(self.storage, "w02")
        manifest_hook(log)(stored, rows, key)
        log.checkpoint()
        return stored.path

    def verify(self):
        return verify_journal(self.storage, public_key=str(self.public_key))

    def expected(self, trace_id: str) -> list[tuple[str, int]]:
        rows = self.traced.filter(pc.equal(self.traced["trace_id"], trace_id))
        return sorted(zip(rows["producer_id"].to_pylist(), rows["seq"].to_pylist(), strict=True))


def _ids(table: pa.Table) -> list[tuple[str, int]]:
    return sorted(zip(table["producer_id"].to_pylist(), table["seq"].to_pylist(), strict=True))


@pytest.fixture
def journal(tmp_path) -> TracedJournal:
    return TracedJournal(tmp_path)


def test_a_v2_file_beside_v3_files_verifies_and_reads_with_null_trace_ids(journal):
    assert not set(V3_COLUMNS) & set(pq.read_schema(journal.storage.full_path(journal.v2_path)).names)
    report = journal.verify()
    assert report.ok and not report.errors, format_report(report)
    assert report.entries == 120 + 60 + 30
    table = JournalQuery(journal.storage, actor="test-trace").find(tier="all")
    old = table.filter(pc.equal(table["schema_version"], 2))
    assert old.num_rows == 30 and all(old[c].null_count == 30 for c in V3_COLUMNS)
    assert table.filter(pc.equal(table["producer_id"], "p-1"))["trace_id"].null_count == 30


def test_setting_a_trace_id_on_a_v2_row_is_caught_by_verify(journal):
    """Someone who can write the storage but holds no key re-encodes the v2 file with a trace id
    on one row (to tie the decision to another request's trace): file hash and Merkle root both
    give it away."""
    table = decode_parquet(journal.storage.read(journal.v2_path))
    forged = table.set_column(table.schema.get_field_index("trace_id"), ENTRY_SCHEMA.field("trace_id"),
                              pa.array([TRACE] + [None] * (table.num_rows - 1), pa.string()))
    full = journal.storage.full_path(journal.v2_path)
    Path(full).chmod(0o644)
    Path(full).write_bytes(encode_parquet(forged))
    kinds = {(p.kind, p.path) for p in journal.verify().errors}
    assert ("file-altered", journal.v2_path) in kinds
    assert ("file-entries-altered", journal.v2_path) in kinds


def test_compaction_and_lifecycle_keep_v2_and_v3_entries_and_trace_lookups(journal):
    hot = sorted(f.path for f in live_files(journal.storage, tier="hot"))
    before = fingerprint_files(journal.storage, hot)
    wanted = journal.traced["trace_id"][0].as_py()
    later = DAY + dt.timedelta(days=3)
    run_compaction(journal.uri, apply=True, settings=journal.settings, now=later)
    compacted = sorted(f.path for f in live_files(journal.storage, tier="hot"))
    assert len(compacted) < len(hot)
    assert fingerprint_files(journal.storage, compacted) == before
    assert journal.verify().ok
    run_lifecycle(journal.uri, apply=True, hot_days=1, settings=journal.settings, now=later)
    cold = sorted(f.path for f in live_files(journal.storage, tier="cold"))
    assert cold and not live_files(journal.storage, tier="hot")
    assert fingerprint_files(journal.storage, cold) == before
    report = journal.verify()
    assert report.ok and not report.errors, format_report(report)
    q = JournalQuery(journal.storage, actor="test-trace")
    assert _ids(q.find(trace_id=wanted, tier="all")) == journal.expected(wanted)
    assert q.find(trace_id=wanted).num_rows == 0  # hot only: nothing left there
    rows = q.find(tier="cold")
    assert rows.filter(pc.equal(rows["schema_version"], 2))["trace_id"].null_count == 30


# ------------------------------------------------------------------------------------------------
# Lookup by trace id
# ------------------------------------------------------------------------------------------------


def test_find_by_trace_id_is_exactly_the_full_scan_and_prunes_by_statistics(journal):
    q = JournalQuery(journal.storage, actor="test-trace")
    everything = q.find(tier="all")
    for trace_id in sorted(set(journal.traced["trace_id"].drop_null().to_pylist()))[:12]:
        found = q.find(trace_id=trace_id)
        full = everything.filter(pc.equal(everything["trace_id"], trace_id))
        assert _ids(found) == _ids(full) == journal.expected(trace_id)
        assert found.schema == ENTRY_SCHEMA
        assert found["ts"].to_pylist() == sorted(found["ts"].to_pylist())  # oldest first
        stats = q.last_stats
        # The v2 file (no column) and the untraced deployment's files (all null) are ruled out
        # from their footers; of the traced files only those whose min/max admit the id are read.
        assert stats.row_groups_total == len(q.files()) and stats.row_groups_probed <= 3
        assert stats.row_groups_read == stats.row_groups_probed
    # Other filters combine; upper case folds to the column's lower case; unknown ids find nothing.
    first = journal.traced["trace_id"][0].as_py()
    assert _ids(q.find(trace_id=first.upper(), model="fraud", limit=2)) == journal.expected(first)[:2]
    assert q.find(trace_id=first, model="other").num_rows == 0
    assert q.find(trace_id="f" * 32).num_rows == 0
    assert q.last_stats.row_groups_probed == 0


def test_a_trace_id_of_the_wrong_format_is_refused_without_echo(journal):
    q = JournalQuery(journal.storage, actor="test-trace")
    for bad in ("cust-0042", "0" * 32, TRACE[:-1], TRACE + "0", TRACEPARENT, 42):
        with pytest.raises(ValueError, match="32 hexadecimal digits") as info:
            q.find(trace_id=bad)
        assert str(bad) not in str(info.value)
    assert check_trace_id(f" {TRACE.upper()} ") == TRACE


def test_trace_lookups_are_in_the_access_log(journal):
    q = JournalQuery(journal.storage, actor="auditor-tracy")
    wanted = journal.traced["trace_id"][3].as_py()
    q.find(trace_id=wanted, tier="all")
    (record,) = [r for r in read_access_log(journal.storage) if r["actor"] == "auditor-tracy"]
    assert record["filters"]["trace_id"] == wanted
    assert record["rows"] == len(journal.expected(wanted))


def test_a_journal_of_v2_files_only_finds_nothing_by_trace_id(tmp_path):
    """Every file lacks the column: the lookup rules them all out (DuckDB never sees them)."""
    journal = TracedJournal.__new__(TracedJournal)
    key_file, journal.public_key = signing_key_files(tmp_path)
    journal.uri = str(tmp_path / "journal")
    journal.settings = SinkSettings(journal.uri, signing_key_file=str(key_file))
    journal.storage = journal.settings.storage()
    journal._write_v2_file(_v2(_version(make_entries(20, spread_s=600), 2)))
    q = JournalQuery(journal.storage, actor="test-trace")
    assert q.find(trace_id=TRACE, tier="all").num_rows == 0
    assert q.find(tier="all").num_rows == 20


def test_find_by_trace_id_on_s3(s3_bucket, journal):
    from serve_journal.storage.s3 import S3WormStorage

    server = s3_bucket.server
    remote = S3WormStorage(s3_bucket.name, "journal", endpoint_url=server.endpoint_url,
                           region=server.region, access_key=server.access_key,
                           secret_key=server.secret_key)
    for path in journal.storage.list_files():
        remote.put_new(path, journal.storage.read(path))
    wanted = journal.traced["trace_id"][7].as_py()
    q = JournalQuery(remote, actor="test-trace")
    assert _ids(q.find(trace_id=wanted, tier="all")) == journal.expected(wanted)
    assert q.find(trace_id=TRACE).num_rows == 0


# ------------------------------------------------------------------------------------------------
# Console
# ------------------------------------------------------------------------------------------------


@pytest.fixture
def console_client(journal, tmp_path):
    from fastapi.testclient import TestClient

    from serve_journal.console import ConsoleSettings, add_user, create_app

    users = str(tmp_path / "console" / "users.json")
    add_user(users, "ana", ["auditor"], "ana-password-123")
    app = create_app(ConsoleSettings(journal_uri=journal.uri, users_file=users, secure_cookies=False,
                                     public_key=str(journal.public_key)))
    with TestClient(app, base_url="http://127.0.0.1") as client:
        page = client.get("/login")
        response = client.post("/login", data={"csrf": _csrf(page), "username": "ana",
                                               "password": "ana-password-123"},
                               follow_redirects=False)
        assert response.status_code == 303
        yield client


def _csrf(page) -> str:
    return re.search(r'name="csrf" value="([^"]+)"', page.text).group(1)


def _request_ids(html: str) -> set[str]:
    return set(re.findall(r"<td><code>([0-9a-f]{32})</code></td>", html))


def test_console_looks_up_a_trace_by_link_and_by_search_form(journal, console_client):
    wanted = journal.traced["trace_id"][4].as_py()
    rows = journal.traced.filter(pc.equal(journal.traced["trace_id"], wanted))
    expected = set(rows["request_id"].to_pylist())
    page = console_client.get(f"/trace/{wanted}")
    assert page.status_code == 200
    assert f'<code id="trace-id">{wanted}</code>' in page.text
    assert _request_ids(page.text) == expected
    form = console_client.post("/search", data={"csrf": _csrf(page), "trace_id": wanted.upper(),
                                                "tier": "all"})
    assert form.status_code == 200 and _request_ids(form.text) == expected
    assert f'value="{wanted.upper()}"' in form.text  # a valid id is echoed into the form
    # Results link each traced entry to its trace; the entry page links back to the trace.
    assert f'href="http://127.0.0.1/trace/{wanted}"' in form.text or f'/trace/{wanted}"' in form.text
    link = re.search(r'href="([^"]*/entry\?[^"]+)"', form.text).group(1).replace("&amp;", "&")
    entry = console_client.get(link)
    assert entry.status_code == 200 and f'/trace/{wanted}"' in entry.text and wanted in entry.text
    views = [r["filters"] for r in read_access_log(journal.storage) if r["actor"] == "ana"]
    assert {"view": "trace", "trace_id": wanted} in [
        {k: v for k, v in f.items() if k in ("view", "trace_id")} for f in views]


def test_console_refuses_what_is_not_a_trace_id_without_echo(console_client):
    pasted = "cust-0042-not-a-trace"
    page = console_client.get(f"/trace/{pasted}")
    assert page.status_code == 404 and pasted not in page.text
    assert console_client.get(f"/trace/{'0' * 32}").status_code == 404
    form = console_client.post("/search", data={"csrf": _csrf(console_client.get("/search")),
                                                "trace_id": pasted})
    assert form.status_code == 400 and "32 hexadecimal digits" in form.text
    assert pasted not in form.text


# ------------------------------------------------------------------------------------------------
# Kafka wire
# ------------------------------------------------------------------------------------------------


def _traced_batch(n: int) -> pa.RecordBatch:
    table = pa.Table.from_batches([kafka_fixture.make_entries(n)])
    return _with_traces(table, every=2).combine_chunks().to_batches()[0]


def test_wire_v2_values_carry_trace_ids_and_v1_json_too():
    batch = _traced_batch(25)
    assert batch.column("trace_id").null_count < 25
    messages = wire.encode_messages(batch, [b"fraud|0|0"] * 25)
    decoded = wire.decode_messages([m.value for m in messages])
    assert decoded.equals(pa.Table.from_batches([batch]))
    assert wire.check_headers(wire.HEADERS) == wire.WIRE_VERSION
    assert dict(wire.HEADERS)[wire.SCHEMA_VERSION_HEADER] == b"3"
    json_messages = wire.encode_batch(batch)  # wire v1 (JSON) of the current schema
    back = wire.decode_values([m.value for m in json_messages])
    assert back["trace_id"].to_pylist() == batch.column("trace_id").to_pylist()
    assert back["span_id"].to_pylist() == batch.column("span_id").to_pylist()


def test_wire_messages_of_earlier_schema_versions_decode_with_null_trace_ids():
    # A v2 producer's Arrow value: the envelope around a ZSTD frame of a v2 stream.
    v2 = _v2(kafka_fixture.make_entries(10)).combine_chunks().to_batches()[0]
    stream = pa.BufferOutputStream()
    with pa.ipc.new_stream(stream, v2.schema) as writer:
        writer.write_batch(v2)
    data = stream.getvalue()
    value = b"SJA2" + data.size.to_bytes(4, "big") + pa.compress(data, codec="zstd", asbytes=True)
    headers = ((wire.SCHEMA_VERSION_HEADER, b"2"), (wire.WIRE_VERSION_HEADER, b"2"))
    assert wire.check_headers(headers) == 2
    table = wire.decode_message(value)
    assert table.schema == ENTRY_SCHEMA and all(table[c].null_count == 10 for c in V3_COLUMNS)
    assert table.drop_columns(list(V3_COLUMNS)).to_pylist() == pa.Table.from_batches([v2]).to_pylist()
    # A v1 JSON value (no v2 or v3 keys).
    row = {k: v for k, v in json.loads(wire.encode_batch(v2)[0].value).items()
           if k not in ADDED_COLUMNS}
    old = wire.decode_values([json.dumps(row).encode()])
    assert old.num_rows == 1 and all(old[c].null_count == 1 for c in ADDED_COLUMNS)


# ------------------------------------------------------------------------------------------------
# Ray Serve, through its own HTTP proxy
# ------------------------------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_serve_http_requests_record_the_callers_traceparent(serve_instance, mlflow_registry, tmp_path):
    """A traceparent sent to Serve's proxy reaches the journaled replica's scope (Serve tracing
    is off in the test cluster: its TracingConfig is set once per Serve instance, see
    docs/schema.md); a malformed one and none give null ids."""
    import requests
    from ray import serve

    from serve_journal import flush_journal
    from serve_journal.examples.fraud import build_app, random_features
    from tests.helpers.journal import read_journal

    tracking_uri, _ = mlflow_registry
    root = tmp_path / "journal"
    name = f"t{uuid.uuid4().hex[:8]}"
    serve.run(build_app(tracking_uri, str(root)), name=name, route_prefix=f"/{name}")
    try:
        import numpy as np

        rng = np.random.default_rng(5)
        sent = {
            "traced": {"traceparent": TRACEPARENT},
            "malformed": {"traceparent": f"00-{TRACE}-{'0' * 16}-01", "tracestate": CANARY},
            "plain": {},
        }
        for rid, headers in sent.items():
            response = requests.post(f"{serve_instance}/{name}", timeout=60,
                                     json={"subject_id": "user-1", "features": random_features(rng)},
                                     headers={"x-request-id": f"{rid}-{name}", **headers})
            assert response.status_code == 200
        assert flush_journal(str(root), timeout=60)
        rows = {r["request_id"].split("-")[0]: r for r in read_journal(root).to_pylist()}
    finally:
        serve.delete(name)
    assert (rows["traced"]["trace_id"], rows["traced"]["span_id"]) == (TRACE, PARENT)
    assert rows["malformed"]["trace_id"] is None and rows["plain"]["trace_id"] is None
    assert not any(CANARY in str(v) for r in rows.values() for v in r.values())


def test_cli_query_by_trace_id_and_request_id(journal, tmp_path, monkeypatch):
    from click.testing import CliRunner

    from serve_journal.cli import main

    monkeypatch.delenv("SERVE_JOURNAL_PRIVACY_DIR", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    wanted = journal.traced["trace_id"][5].as_py()
    runner = CliRunner()
    done = runner.invoke(main, ["query", "--journal", journal.uri, "--trace-id", wanted.upper(),
                                "--json", "--as", "cli-tracy"])
    assert done.exit_code == 0, done.output
    rows = json.loads(done.output)
    assert sorted((r["producer_id"], r["seq"]) for r in rows) == journal.expected(wanted)
    request_id = rows[0]["request_id"]
    by_id = runner.invoke(main, ["query", "--journal", journal.uri, "--request-id", request_id,
                                 "--json"])
    assert by_id.exit_code == 0, by_id.output
    assert [r["request_id"] for r in json.loads(by_id.output)] == [request_id]
    refused = runner.invoke(main, ["query", "--journal", journal.uri, "--trace-id", "cust-0042"])
    assert refused.exit_code == 2 and "cust-0042" not in refused.output
