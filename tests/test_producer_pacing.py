"""The producer side of issue 17: body parsing that means what it meant, a flusher that gives the
GIL back in small steps, and the start-up heap frozen once the replica is up."""

from __future__ import annotations

import gc
import json
import threading
import uuid

import pyarrow as pa
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from serve_journal import journaled
from serve_journal._private.batching import GilPacer
from serve_journal._private.entries import (
    SLICE,
    CapturedCall,
    EntryFinalizer,
    ReplicaIdentity,
    _json_or_none,
)
from serve_journal._private.wrapper import journal_runtime
from serve_journal.config import ConfigError, JournalConfig
from serve_journal.integrity.encoding import canonical_encode
from serve_journal.policy import build_policy
from serve_journal.privacy.pseudonymizer import StaticKeyPseudonymizer
from serve_journal.registry import ModelInfo
from serve_journal.sampling import Sampler
from serve_journal.schema import ENTRY_SCHEMA

# -- orjson parses; what it refuses or reads differently goes through the json module ----------

json_values = st.recursive(
    st.none() | st.booleans() | st.integers(min_value=-(2**130), max_value=2**130)
    | st.floats(allow_nan=True, allow_infinity=True) | st.text(),  # lone surrogates included
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(), inner, max_size=4),
    max_leaves=12,
)


@given(json_values)
@settings(max_examples=500, deadline=None)
def test_body_parsing_gives_the_values_the_json_module_gives(value):
    body = json.dumps(value).encode()  # NaN/Infinity literals, \\ud800 escapes, 39-digit integers
    assert canonical_encode(_json_or_none(body)) == canonical_encode(json.loads(body))


@pytest.mark.parametrize("body", [
    b'{"x": 123456789012345678901234567890}', b'{"x": -9223372036854775809}',
    b'{"x": 18446744073709551615}', b'{"x": NaN, "y": -Infinity}', b'{"x": "\\ud800"}',
    b'\xef\xbb\xbf{"x": 1}', b'{"x": 1, "x": 2}', b'{"x": 1e400}', b'{"x": 1.0000000000000002}',
])
def test_edge_bodies_parse_as_before(body):
    ours, reference = _json_or_none(body), json.loads(body)
    assert repr(ours) == repr(reference)  # NaN != NaN; a lone surrogate cannot be encoded


def test_bodies_that_are_not_json_give_none():
    for body in (b"", b"{", b"\xff\xfe", b"[" * 100_000):
        assert _json_or_none(body) is None


# -- finalize pauses between small steps --------------------------------------------------------


def _finalizer() -> EntryFinalizer:
    cfg = JournalConfig.resolve(model="fraud", threshold=0.5)
    return EntryFinalizer(cfg, StaticKeyPseudonymizer("k1", b"k" * 32),
                          ReplicaIdentity("p1", "app", "Dep", "rep"), Sampler(build_policy(None), b"s" * 32))


def _http_calls(n: int) -> list[CapturedCall]:
    model = ModelInfo("fraud", "3", "sha256:ab", "tag")
    calls = []
    for i in range(n):
        body = json.dumps({"subject_id": f"user-{i % 7}", "features": {"amount": i * 1.5, "n": i}}).encode()
        scope = {"type": "http", "headers": [(b"content-type", b"application/json"),
                                             (b"X-Caller-Id", b"svc-%d" % (i % 3))]}
        calls.append(CapturedCall(i, 1_700_000_000_000_000 + i, f"r{i}", (), {}, scope, body,
                                  {"score": (i % 10) / 10}, "ok", None, 1.0, None, model))
    return calls


def test_finalize_pauses_after_every_call_slice_and_column_and_builds_the_same_batch():
    calls = _http_calls(1000)
    pauses = 0

    def pause() -> None:
        nonlocal pauses
        pauses += 1

    paced = _finalizer().finalize(calls, pause)
    plain = _finalizer().finalize(calls)
    slices = -(-len(calls) // SLICE)
    assert pauses == len(calls) + 2 * slices + len(ENTRY_SCHEMA)
    assert paced.batch.equals(plain.batch) and paced.keep == plain.keep
    rows = pa.Table.from_batches([paced.batch]).to_pylist()
    assert [r["seq"] for r in rows] == list(range(1000))  # capture order kept
    assert {r["caller"] for r in rows} == {"svc-0", "svc-1", "svc-2"}  # the header, any case
    assert not any("user-" in str(v) for r in rows for v in r.values())


def test_the_pacer_gives_the_gil_back_to_a_waiting_thread():
    """With a zero slice every step yields, and a thread waiting for the GIL gets to run while the
    stepping thread never blocks on anything else."""
    pacer = GilPacer(slice_s=0.0)
    go, ran = threading.Event(), threading.Event()
    thread = threading.Thread(target=lambda: (go.wait(), ran.set()))
    thread.start()
    go.set()
    steps = 0
    while not ran.is_set() and steps < 10_000_000:
        pacer()
        steps += 1
    thread.join(10)
    assert ran.is_set() and pacer.yields == steps


def test_the_pacer_keeps_the_gil_within_a_slice():
    pacer = GilPacer(slice_s=3600.0)
    for _ in range(1000):
        pacer()
    assert pacer.yields == 0


# -- gc.freeze once the replica's __init__ finished ---------------------------------------------


@pytest.fixture
def unfrozen():
    gc.unfreeze()
    yield
    gc.unfreeze()


class _Scorer:
    def __init__(self) -> None:
        self.table = [{"weight": i} for i in range(1000)]  # the "model", allocated at start-up
        self.frozen_during_init = gc.get_freeze_count()

    def __call__(self, request: dict) -> dict:
        return {"score": 0.5}


def _instance(mlflow_registry, tmp_path, **options):
    tracking_uri, _ = mlflow_registry
    wrapped = journaled(model="models:/fraud@champion", tracking_uri=tracking_uri, transport="memory",
                        dev_mode=True, journal_uri=str(tmp_path / f"journal-{uuid.uuid4().hex[:6]}"),
                        extra={"memory_transport": f"t-{uuid.uuid4().hex}"}, **options)(_Scorer)
    return wrapped()


def test_the_start_up_heap_is_frozen_after_the_users_init(mlflow_registry, tmp_path, unfrozen):
    instance = _instance(mlflow_registry, tmp_path)
    try:
        assert instance.frozen_during_init == 0  # not before the user's own __init__ ran
        assert gc.get_freeze_count() > len(instance.table)
        assert instance({"subject_id": "a", "features": {"x": 1}}) == {"score": 0.5}
    finally:
        journal_runtime(instance).close(10)


def test_gc_freeze_off_leaves_the_collector_alone(mlflow_registry, tmp_path, unfrozen, monkeypatch):
    monkeypatch.setenv("SERVE_JOURNAL_GC_FREEZE", "0")
    instance = _instance(mlflow_registry, tmp_path)
    try:
        assert gc.get_freeze_count() == 0
    finally:
        journal_runtime(instance).close(10)


def test_gc_freeze_must_be_a_bool():
    with pytest.raises(ConfigError, match="gc_freeze"):
        JournalConfig.resolve(model="m", gc_freeze="yes")
    assert JournalConfig.resolve(model="m").gc_freeze is True


# -- request ids without a system call per capture -----------------------------------------------

def test_request_ids_are_uuid4_and_read_from_the_os_once_per_pool(monkeypatch):
    """A capture outside Serve gets a version-4 UUID, as ``uuid.uuid4().hex`` gave, but reads
    the OS once per pool: ``os.urandom`` gives up the GIL, handing the request path to the
    flusher for up to a pacer slice on every call (docs/benchmarks.md)."""
    import os

    from serve_journal._private import capture

    reads = []
    real = os.urandom
    monkeypatch.setattr(capture.os, "urandom", lambda n: reads.append(n) or real(n))
    ids = capture.RequestIds(per_read=64)
    made = [ids.new() for _ in range(640)]
    assert len(reads) == 10 and set(reads) == {16 * 64}
    assert len(set(made)) == 640
    for rid in made:
        parsed = uuid.UUID(hex=rid)
        assert parsed.hex == rid and parsed.version == 4 and parsed.variant == uuid.RFC_4122


def test_request_ids_are_distinct_across_threads_and_a_fork():
    import os

    from serve_journal._private.capture import REQUEST_IDS

    out: list[list[str]] = [[] for _ in range(8)]

    def make(k: int) -> None:
        out[k] += [REQUEST_IDS.new() for _ in range(2000)]

    threads = [threading.Thread(target=make, args=(k,)) for k in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    seen = [rid for part in out for rid in part]
    assert len(set(seen)) == len(seen) == 16000
    REQUEST_IDS.new()  # this thread's pool is partly read: a child must not read the rest
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child reports through the pipe
        try:
            os.write(write, REQUEST_IDS.new().encode())
        finally:
            os._exit(0)
    os.close(write)
    try:
        child = os.read(read, 64).decode()
    finally:
        os.close(read)
        os.waitpid(pid, 0)
    assert len(child) == 32 and child not in seen and child != REQUEST_IDS.new()


def test_request_ids_are_formatted_ahead_by_the_flusher_only_once_used(monkeypatch):
    """The flusher keeps ids formatted ahead (a periodic task), so a capture only pops one; a
    process inside Serve, which never takes one, formats none."""
    import os

    from serve_journal._private import capture

    reads = []
    real = os.urandom
    monkeypatch.setattr(capture.os, "urandom", lambda n: reads.append(n) or real(n))
    ids = capture.RequestIds(per_read=64, ahead=640)
    ids.top_up()
    assert reads == []  # never used: nothing formatted
    first = ids.new()
    assert len(reads) == 1
    ids.top_up()
    assert len(reads) == 11  # topped up to 640 ready, a pool at a time
    made = [first] + [ids.new() for _ in range(710)]
    assert len(set(made)) == 711 and len(reads) == 12  # 703 were ready: one more pool
    for rid in made:
        parsed = uuid.UUID(hex=rid)
        assert parsed.hex == rid and parsed.version == 4 and parsed.variant == uuid.RFC_4122


def test_the_flusher_tops_up_request_ids_after_a_capture(mlflow_registry, tmp_path):
    from serve_journal._private.capture import REQUEST_IDS as ids
    from serve_journal._private.capture import REQUEST_IDS_AHEAD

    ids.forget()
    instance = _instance(mlflow_registry, tmp_path)
    runtime = journal_runtime(instance)
    try:
        assert "request-ids" in [task.name for task in runtime.worker._periodic]
        runtime.flush(10)
        assert len(ids._ready) == 0  # no id taken yet: none formatted
        instance({"subject_id": "a", "features": {"x": 1}})  # outside Serve: takes an id
        runtime.flush(10)
        runtime.flush(10)  # the periodic tasks after the first flush's export have run
        assert len(ids._ready) >= REQUEST_IDS_AHEAD
    finally:
        runtime.close(10)
