"""ParquetFeatureStore: point-in-time reads (DuckDB ASOF join), batching, purge, history edits."""

from __future__ import annotations

import datetime as dt
import logging
import os
import pickle
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from serve_journal.errors import ReplayDataError
from serve_journal.integrity.encoding import canonical_encode
from serve_journal.privacy.pseudonymizer import StaticKeyPseudonymizer
from serve_journal.replay.featurestore import (
    FEATURE_FILE_SCHEMA,
    FeatureStore,
    ParquetFeatureStore,
    default_feature_store_uri,
    record_features,
)
from serve_journal.replay.rescore import MlflowRescorer
from serve_journal.replay.tasks import JOURNAL_COLUMNS, TaskSpec, replay_batch
from serve_journal.replay.verifiers import StaticKeyVerifier
from serve_journal.schema import ENTRY_SCHEMA

T0 = dt.datetime(2025, 3, 4, 10, 0, tzinfo=dt.UTC)


def at(seconds: float) -> dt.datetime:
    return T0 + dt.timedelta(seconds=seconds)


@pytest.fixture
def store(tmp_path) -> ParquetFeatureStore:
    s = ParquetFeatureStore(tmp_path / "features", batch_rows=4)
    yield s
    s.close()


def test_as_of_returns_latest_row_at_or_before_each_timestamp(store):
    for i in range(6):
        store.write("alice", {"amount": 10.0 * i, "n": i}, at(10 * i))
    store.write("bob", {"amount": 1.5, "n": 0}, at(25))
    got = store.get_as_of(
        ["alice", "alice", "alice", "alice", "bob", "bob", "carol"],
        [at(-1), at(0), at(19.999), at(1000), at(24), at(25), at(30)])
    assert got == [None, {"amount": 0.0, "n": 0}, {"amount": 10.0, "n": 1},
                   {"amount": 50.0, "n": 5}, None, {"amount": 1.5, "n": 0}, None]


def test_writes_are_batched_into_files_and_reads_see_pending_rows(store):
    for i in range(9):
        store.write(f"u{i}", {"x": i}, at(i))
    assert len(store.files()) == 2  # two full batches of 4; one row pending
    assert store.get_as_of(["u8"], [at(8)]) == [{"x": 8}]  # the read flushed it
    assert len(store.files()) == 3
    for path in store.files():
        assert pq.ParquetFile(path).schema_arrow.equals(FEATURE_FILE_SCHEMA)
    assert store.entity_ids() == [f"u{i}" for i in range(9)]


def test_replayed_values_encode_exactly_like_the_served_ones(store):
    # JSON keeps int and float apart: 3 and 3.0 encode differently, and both survive the store.
    served = {"amount": 120.0, "hour": 3, "ratio": 0.1 + 0.2, "foreign": True, "tags": ["a", None],
              "nan": float("nan")}
    store.write("alice", served, at(0))
    replayed = store.get_as_of(["alice"], [at(1)])[0]
    assert canonical_encode(replayed) == canonical_encode(served)
    assert canonical_encode(replayed) != canonical_encode({**served, "hour": 3.0})


def test_numpy_values_are_stored_as_their_python_equivalents(store):
    store.write("alice", {"v": np.float64(2.5), "k": np.int64(7), "arr": np.array([1, 2])}, at(0))
    got = store.get_as_of(["alice"], [at(0)])[0]
    assert got == {"v": 2.5, "k": 7, "arr": [1, 2]}
    assert canonical_encode(got) == canonical_encode({"v": np.float64(2.5), "k": np.int64(7),
                                                      "arr": np.array([1, 2])})


def test_timestamps_as_microseconds_and_naive_utc_are_the_same_instant(store):
    store.write("alice", {"x": 1}, int(at(5).timestamp() * 1_000_000))
    assert store.get_as_of(["alice", "alice"], [at(5).replace(tzinfo=None), at(4.999999)]) == [
        {"x": 1}, None]


def test_purge_removes_every_row_of_one_subject_only(store):
    for i in range(10):
        store.write("alice" if i % 2 else "bob", {"x": i}, at(i))
    store.flush()
    assert store.purge("alice") == 5
    assert store.entity_ids() == ["bob"]
    assert store.get_as_of(["alice", "bob"], [at(100), at(100)]) == [None, {"x": 8}]
    assert store.purge("alice") == 0
    raw = b"".join(Path(p).read_bytes() for p in store.files())
    assert b"alice" not in raw


def test_purge_removes_a_file_that_held_only_that_subject(store):
    for i in range(4):
        store.write("alice", {"x": i}, at(i))
    store.write("bob", {"x": 0}, at(0))
    store.flush()
    assert len(store.files()) == 2
    assert store.purge("alice") == 4
    assert len(store.files()) == 1


def test_replace_rows_changes_history_in_place(store):
    for i in range(3):
        store.write("alice", {"x": i}, at(10 * i))
    assert store.replace_rows("alice", at(10), {"x": 99}) == 1
    assert store.get_as_of(["alice"] * 3, [at(0), at(15), at(25)]) == [{"x": 0}, {"x": 99}, {"x": 2}]
    assert store.replace_rows("alice", at(11), {"x": 0}) == 0
    assert len(store.history("alice")) == 3


def test_empty_store_and_empty_query(tmp_path):
    store = ParquetFeatureStore(tmp_path / "nothing")
    assert store.get_as_of(["a"], [at(0)]) == [None]
    assert store.get_as_of([], []) == []
    assert store.entity_ids() == []
    assert store.purge("a") == 0


def test_pickles_as_its_location_and_settings(store):
    store.write("alice", {"x": 1}, at(0))
    store.flush()
    copy = pickle.loads(pickle.dumps(store))
    assert copy.root == store.root and copy.batch_rows == 4
    assert copy.get_as_of(["alice"], [at(1)]) == [{"x": 1}]


def test_record_features_and_protocol(store):
    assert isinstance(store, FeatureStore)
    record_features(store, "alice", {"x": 1}, at(0))
    assert store.get_as_of(["alice"], [at(0)]) == [{"x": 1}]
    with pytest.raises(TypeError, match="has no write"):
        record_features(object(), "alice", {"x": 1})


def test_bad_input_is_refused_without_echoing_values(store):
    with pytest.raises(ValueError, match=r"entity_ids\[0\] must be a non-empty string"):
        store.write("", {"x": 1})
    with pytest.raises(TypeError, match="features must be a mapping"):
        store.write("alice", [1, 2])  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="not JSON-serializable") as info:
        store.write("alice", {"x": object()})
    assert "alice" not in str(info.value)
    with pytest.raises(ValueError, match="same length"):
        store.get_as_of(["a", "b"], [at(0)])


def test_default_location_is_beside_a_local_journal(tmp_path):
    assert default_feature_store_uri(str(tmp_path / "journal")) == os.path.join(tmp_path, "features")
    with pytest.raises(ValueError, match="no default feature store"):
        default_feature_store_uri("s3://bucket/journal")


SUBJECT_CANARY = "CANARY-SUBJ-51e0d2"
FEATURE_CANARY = "CANARY-FEAT-9a77c3"


def _assert_clean(exc: BaseException, caplog) -> None:
    """No canary in the error, in what it chains to, in its pickle or in any log record."""
    seen = []
    current: BaseException | None = exc
    while current is not None:
        seen += [str(current), repr(current), repr(current.args)]
        current = current.__cause__ or current.__context__
    seen.append(repr(pickle.loads(pickle.dumps(exc)).__dict__))
    seen += [r.getMessage() for r in caplog.records]
    for canary in (SUBJECT_CANARY, FEATURE_CANARY):
        assert not any(canary in text for text in seen), f"{canary} leaked"


def _plant_feature_row(store: ParquetFeatureStore, entity: str, text: str) -> None:
    """A row written behind the store's back (a corrupt or foreign file)."""
    table = pa.table({"entity_id": [entity], "ts": pa.array([at(0)], pa.timestamp("us", tz="UTC")),
                      "features": [text]}, schema=FEATURE_FILE_SCHEMA)
    os.makedirs(store.root, exist_ok=True)
    pq.write_table(table, os.path.join(store.root, "features-planted.parquet"))


def test_unparsable_features_are_reported_without_their_text(store, caplog):
    _plant_feature_row(store, SUBJECT_CANARY, '{"merchant": "' + FEATURE_CANARY)
    with pytest.raises(ReplayDataError, match="position 0 are not valid JSON") as info:
        store.get_as_of([SUBJECT_CANARY], [at(5)])
    _assert_clean(info.value, caplog)
    with pytest.raises(TypeError, match="non-empty string"):
        store.purge(12345)  # type: ignore[arg-type]


def test_feature_store_file_names_are_not_glob_patterns(store):
    store.write("alice", {"x": 1}, at(0))
    store.flush()
    # A planted file whose name is a pattern matching every store file reads only itself.
    table = pa.table({"entity_id": ["mallory"], "ts": pa.array([at(0)], pa.timestamp("us", tz="UTC")),
                      "features": ['{"x": 2}']}, schema=FEATURE_FILE_SCHEMA)
    pq.write_table(table, os.path.join(store.root, "features-*.parquet"))
    assert store.entity_ids() == ["alice", "mallory"]
    assert store.get_as_of(["alice", "mallory"], [at(1), at(1)]) == [{"x": 1}, {"x": 2}]
    assert store.history("alice").num_rows == 1


class _FloatRescorer:
    """A rescorer that converts features the naive way: float()'s message quotes the value."""

    def available(self, model_name: str, model_version: str) -> bool:
        return True

    def score(self, model_name: str, model_version: str, features: list[dict]) -> list[float]:
        return [float(f["merchant"]) for f in features]

    def decide(self, score: float | None, threshold: float | None) -> str | None:
        return None


class _LocalMlflowRescorer(MlflowRescorer):
    """The real MlflowRescorer's conversion, without a registry."""

    def available(self, model_name: str, model_version: str) -> bool:
        return True

    def feature_order(self, model_name: str, model_version: str, **identity) -> tuple[str, ...]:
        return ("amount", "merchant")

    def _model(self, model_name: str, model_version: str):
        return object()  # never asked to predict: the features do not convert


def _replay_spec(store: ParquetFeatureStore, rescorer) -> tuple[pa.Table, TaskSpec]:
    key = bytes(range(32))
    features = {"amount": 12.5, "merchant": FEATURE_CANARY}
    store.write(SUBJECT_CANARY, features, at(0))
    store.flush()
    protected = StaticKeyPseudonymizer("k1", key).protect([SUBJECT_CANARY],
                                                          [canonical_encode(features)])[0]
    batch = pa.table({
        "request_id": ["r1"], "ts": pa.array([at(10)], pa.timestamp("us", tz="UTC")),
        "subject_token": [protected.subject_token], "model_name": ["fraud"],
        "model_version": ["3"], "features_hmac": [protected.features_hmac], "key_id": ["k1"],
        "score": [0.5], "threshold": [0.5], "decision": ["block"], "outcome": ["ok"],
        # Schema v2's artifact identity, unknown here: re-scored by version.
        "model_run_id": pa.nulls(1, pa.string()), "model_digest": pa.nulls(1, pa.string()),
        "models": pa.nulls(1, ENTRY_SCHEMA.field("models").type),
    }).select(JOURNAL_COLUMNS)
    spec = TaskSpec(f"leak-{id(rescorer)}", store, StaticKeyVerifier("k1", key), rescorer, None,
                    None, None, None, 1e-6)
    return batch, spec


@pytest.mark.parametrize("rescorer, message", [
    (_FloatRescorer(), "re-scoring failed with ValueError; its message is withheld"),
    (_LocalMlflowRescorer(None), "feature 'merchant' of replayed row 0 is a str"),
])
def test_replay_conversion_errors_never_carry_the_value(store, caplog, rescorer, message):
    batch, spec = _replay_spec(store, rescorer)
    with caplog.at_level(logging.DEBUG), pytest.raises(ReplayDataError, match=message) as info:
        replay_batch(batch, spec)
    _assert_clean(info.value, caplog)
    assert info.value.__context__ is None and info.value.__cause__ is None
    # Without re-scoring the same entry verifies: the failure was the conversion only.
    plain = TaskSpec("leak-plain", store, spec.verifier, None, None, None, None, None, 1e-6)
    assert replay_batch(batch, plain)["status"].to_pylist() == ["verified"]


def test_replay_task_reports_corrupt_feature_rows_without_their_text(store, caplog):
    batch, spec = _replay_spec(store, None)
    _plant_feature_row(store, SUBJECT_CANARY, "{" + FEATURE_CANARY)  # newer than the good row
    os.utime(os.path.join(store.root, "features-planted.parquet"))
    table = pq.read_table(os.path.join(store.root, "features-planted.parquet"))
    pq.write_table(table.set_column(1, "ts", pa.array([at(5)], pa.timestamp("us", tz="UTC"))),
                   os.path.join(store.root, "features-planted.parquet"))
    with pytest.raises(ReplayDataError, match="not valid JSON") as info:
        replay_batch(batch, spec)
    _assert_clean(info.value, caplog)
