"""Replay through Feast gives the same verdicts as through the built-in Parquet store.

Each test builds a real local Feast repository in tmp_path (file offline store over a Parquet
file, SQL registry on sqlite, online store on sqlite never used) and ``apply``s it through the
Python API; the same feature history goes into a ``ParquetFeatureStore``. The journal entries
carry the subject tokens and feature HMACs of a static key, as the replicas write them. Both
stores then classify the same entries with the real replay task (``replay_batch``) and, in the
slow test, with ``replay()`` on Ray and the ``serve-journal replay`` command.

The history covers: features that changed after a decision (point in time must pick the old
row), a subject with no features yet at decision time, a subject with none at all, an integer
feature with a gap (pandas turns that column into floats), two decisions of one subject at the
same instant, and two attacks: the journaled HMAC forged, and a feature row rewritten in place
after the decision. Feast runs without network (FEAST_USAGE=False).
"""

from __future__ import annotations

import datetime as dt
import io
import json
import logging
import os
import pickle
import sys
import uuid
from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from click.testing import CliRunner

from serve_journal.catalog.layout import DEFAULT_SPEC
from serve_journal.errors import ConfigError, ReplayDataError
from serve_journal.examples.fraud import FEATURES, MODEL_NAME
from serve_journal.integrity.encoding import canonical_encode
from serve_journal.privacy.pseudonymizer import StaticKeyPseudonymizer
from serve_journal.replay import (
    FeastFeatureStore,
    FeatureStore,
    ParquetFeatureStore,
    StaticKeyVerifier,
    replay,
    replay_command,
)
from serve_journal.replay.tasks import JOURNAL_COLUMNS, TaskSpec, replay_batch
from serve_journal.schema import ENTRY_SCHEMA
from serve_journal.storage import open_storage

os.environ["FEAST_USAGE"] = "False"  # no telemetry, no network: before feast is first imported

T0 = dt.datetime(2025, 3, 4, 10, 0, tzinfo=dt.UTC)
KEY = bytes(range(32))
VIEW = "transactions"
REFS = [f"{VIEW}:{name}" for name in FEATURES]
INT_FEATURES = {"hour", "card_age_days", "foreign"}
SUBJECT_CANARY = "CANARY-SUBJ-f3a9c1"


def at(seconds: float) -> dt.datetime:
    return T0 + dt.timedelta(seconds=seconds)


def features(amount: float, hour: int, card_age: int | None = 400, foreign: int = 0) -> dict:
    """A feature mapping exactly as the fraud model receives it (ints and floats apart)."""
    return {"amount": amount, "hour": hour, "merchant_risk": 0.125, "distance_km": 3.5,
            "card_age_days": card_age, "foreign": foreign}


A1, A2 = features(12.5, 9), features(980.0, 3, foreign=1)
B1 = features(40.25, 11)
C1 = features(7.0, 23, card_age=None)  # a new card: no age yet, a gap in an int column
D1 = features(55.0, 14)
E1 = features(64.0, 15)
E1_REWRITTEN = {**E1, "amount": 6.4}  # the attacker's edit of the stored row, after the decision

HISTORY = [  # (subject, valid from, stored features): the same rows in both stores
    ("alice", at(0), A1), ("alice", at(60), A2),   # changed after alice's first decisions
    ("bob", at(120), B1),                           # nothing before t+120
    ("carol", at(0), C1),
    ("dave", at(0), D1),
    ("erin", at(0), E1_REWRITTEN),                  # served E1, rewritten in place later
]

# (name, subject, decision time, the features the model received or None, expected verdict)
DECISIONS = [
    ("alice-before-change", "alice", at(30), A1, "verified"),
    ("alice-same-instant-1", "alice", at(45), A1, "verified"),
    ("alice-same-instant-2", "alice", at(45), A1, "verified"),
    ("alice-after-change", "alice", at(90), A2, "verified"),
    ("alice-on-the-row-time", "alice", at(60), A2, "verified"),
    ("bob-before-any-features", "bob", at(30), B1, "missing"),
    ("bob-later", "bob", at(150), B1, "verified"),
    ("carol-int-gap", "carol", at(10), C1, "verified"),
    ("dave-forged-hmac", "dave", at(20), features(1.0, 1), "mismatch"),
    ("erin-row-rewritten", "erin", at(20), E1, "mismatch"),
    ("ghost-no-features-at-all", "ghost", at(20), B1, "missing"),
    ("no-hmac", "alice", at(30), None, "no_hmac"),
]
EXPECTED = {name: verdict for name, _, _, _, verdict in DECISIONS}


def write_feast_repo(root: Path, history=HISTORY, *, created: dict | None = None,
                     second_view: bool = False, int_keys: bool = False) -> Path:
    """A Feast repository in ``root``: feature_store.yaml, the source Parquet, ``apply``.

    One entity (join key ``user_id``, a string, or an integer with ``int_keys``), the view
    ``transactions`` of FEATURES, and the feature service ``fraud_model`` (FEATURES reversed)."""
    from feast import (
        Entity,
        FeatureService,
        FeatureStore,
        FeatureView,
        Field,
        FileSource,
        ValueType,
    )
    from feast.types import Float64, Int64

    root.mkdir(parents=True, exist_ok=True)
    (root / "feature_store.yaml").write_text(
        "project: serve_journal_test\nprovider: local\n"
        f"registry:\n  registry_type: sql\n  path: sqlite:///{root / 'registry.db'}\n"
        "offline_store:\n  type: file\n"
        f"online_store:\n  type: sqlite\n  path: {root / 'online.db'}\n"
        "entity_key_serialization_version: 3\n")
    created = created or {}
    schema = pa.schema([("user_id", pa.int64() if int_keys else pa.string()), ("event_timestamp", pa.timestamp("us", tz="UTC")),
                        ("created", pa.timestamp("us", tz="UTC")),
                        *[(n, pa.int64() if n in INT_FEATURES else pa.float64())
                          for n in FEATURES]])
    rows = [{"user_id": int(s) if int_keys else s, "event_timestamp": ts, "created": created.get((s, ts), ts), **f}
            for s, ts, f in history]
    pq.write_table(pa.Table.from_pylist(rows, schema=schema), root / "transactions.parquet")
    user = Entity(name="user", join_keys=["user_id"],
                  value_type=ValueType.INT64 if int_keys else ValueType.STRING)
    source = FileSource(path=str(root / "transactions.parquet"), timestamp_field="event_timestamp",
                        created_timestamp_column="created")
    views = [FeatureView(name=VIEW, entities=[user], ttl=dt.timedelta(0), source=source,
                         schema=[Field(name=n, dtype=Int64 if n in INT_FEATURES else Float64)
                                 for n in FEATURES])]
    if second_view:  # another view that also has an 'amount' feature
        views.append(FeatureView(name="refunds", entities=[user], ttl=dt.timedelta(0),
                                 source=source, schema=[Field(name="amount", dtype=Float64)]))
    service = FeatureService(name="fraud_model",
                             features=[views[0][list(reversed(FEATURES))]])
    FeatureStore(repo_path=str(root)).apply([user, *views, service])
    return root


def write_parquet_store(root: Path, history=HISTORY) -> ParquetFeatureStore:
    store = ParquetFeatureStore(root)
    for subject, ts, values in history:
        store.write(subject, values, ts)
    store.close()
    return ParquetFeatureStore(root)


@dataclass
class World:
    root: Path
    feast_repo: Path
    parquet: ParquetFeatureStore
    key_file: Path
    entries: pa.Table
    names: dict[str, str]  # request id -> decision name

    def feast(self, **options) -> FeastFeatureStore:
        return FeastFeatureStore(self.feast_repo, feature_names=FEATURES, **options)

    def verifier(self) -> StaticKeyVerifier:
        return StaticKeyVerifier.from_key_file(self.key_file)

    def verdicts(self, store: FeatureStore) -> dict[str, str]:
        """The real replay task over every entry: decision name -> status."""
        spec = TaskSpec(uuid.uuid4().hex, store, self.verifier(), None, None, None, None, None,
                        1e-6)
        out = replay_batch(self.entries.select(JOURNAL_COLUMNS), spec)
        return {self.names[r]: s for r, s in zip(out["request_id"].to_pylist(),
                                                   out["status"].to_pylist(), strict=True)}


def journal_entries(key_id: str) -> tuple[pa.Table, dict[str, str]]:
    """Journal rows of DECISIONS: tokens and HMACs of the served features, as a replica writes."""
    pseudonymizer = StaticKeyPseudonymizer(key_id, KEY)
    rows, names = [], {}
    for seq, (name, subject, ts, served, _) in enumerate(DECISIONS):
        protected = pseudonymizer.protect([subject], [canonical_encode(served or {})])[0]
        hmac = protected.features_hmac
        if name == "dave-forged-hmac":  # the attacker edits the entry: the HMAC of other features
            hmac = pseudonymizer.protect([subject], [canonical_encode(D1 | {"hour": 2})])[0] \
                .features_hmac
        request_id = uuid.uuid4().hex
        names[request_id] = name
        rows.append({
            "schema_version": 2, "request_id": request_id, "ts": ts, "caller": "checkout",
            "subject_token": protected.subject_token, "model_name": MODEL_NAME,
            "model_version": "1", "dataset_hash": None, "dataset_hash_source": "none",
            "features_hmac": None if served is None else hmac, "key_id": protected.key_id,
            "outputs": [{"label": "fraud", "score": 0.25}], "score": 0.25, "threshold": 0.5,
            "decision": "allow", "explanation_ref": None, "outcome": "ok", "error_type": None,
            "latency_ms": 1.0, "risk_tier": "high", "sample_rate": 1.0, "producer_id": "p-feast",
            "seq": seq, "app_name": "app", "deployment": "FraudModel", "replica": "r1",
        })
    return pa.Table.from_pylist(rows, schema=ENTRY_SCHEMA), names


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> World:
    root = tmp_path_factory.mktemp("feast-world")
    key_file = root / "hmac.key"
    key_file.write_text(KEY.hex())
    key_file.chmod(0o600)
    entries, names = journal_entries(StaticKeyVerifier.from_key_file(key_file).key_id)
    return World(root, write_feast_repo(root / "feast"), write_parquet_store(root / "features"),
                 key_file, entries, names)


# -- the same verdicts ---------------------------------------------------------------------


def test_feast_and_parquet_give_the_same_verdict_for_every_entry(world):
    feast = world.feast()
    assert isinstance(feast, FeatureStore)
    through_parquet = world.verdicts(world.parquet)
    through_feast = world.verdicts(feast)
    assert through_parquet == EXPECTED
    assert through_feast == through_parquet
    assert feast.retrievals == 1  # the whole batch in one historical retrieval


def test_point_in_time_reads_agree_value_for_value(world):
    subjects = ["alice", "alice", "alice", "alice", "alice", "bob", "bob", "carol", "ghost"]
    times = [at(-1), at(0), at(59.999999), at(60), at(3600), at(119), at(120), at(1), at(1)]
    from_parquet = world.parquet.get_as_of(subjects, times)
    from_feast = world.feast().get_as_of(subjects, times)
    assert from_feast == [None, A1, A1, A2, A2, None, B1, C1, None]
    assert from_feast == from_parquet
    # Equal is not enough: 3 == 3.0 in Python, not in the canonical encoding the HMAC covers.
    for got, want in zip(from_feast, from_parquet, strict=True):
        assert (got is None) == (want is None)
        if got is not None:
            assert canonical_encode(got) == canonical_encode(want)
            assert list(got) == list(FEATURES)  # the model's feature order
            assert all(type(got[n]) is int for n in INT_FEATURES if got[n] is not None)


def test_feature_references_and_order_map_to_the_model_names(world):
    order = ["foreign", "amount", "hour"]
    store = FeastFeatureStore(world.feast_repo, features=[f"{VIEW}:{n}" for n in order],
                              feature_names=["is_foreign", "amt", "hour_of_day"])
    [got] = store.get_as_of(["alice"], [at(30)])
    assert list(got.items()) == [("is_foreign", 0), ("amt", 12.5), ("hour_of_day", 9)]
    assert store.plan().refs == tuple(f"{VIEW}:{n}" for n in order)


def test_a_feature_service_names_the_features(world):
    store = FeastFeatureStore(world.feast_repo, feature_service="fraud_model")
    [got] = store.get_as_of(["alice"], [at(90)])
    assert got == A2 and list(got) == list(reversed(FEATURES))


def test_integer_join_keys_take_subject_ids_as_their_decimal_text(tmp_path):
    history = [("1001", at(0), A1), ("1002", at(0), B1), ("1001", at(60), A2)]
    repo = write_feast_repo(tmp_path / "feast", history, int_keys=True)
    store = FeastFeatureStore(repo, features=REFS)
    assert store.entity_ids() == ["1001", "1002"]
    assert store.get_as_of(["1001", "1002", "1001"], [at(1), at(1), at(61)]) == [A1, B1, A2]
    with pytest.raises(ReplayDataError, match="not a valid value of the integer") as info:
        store.get_as_of(["1001", SUBJECT_CANARY], [at(1), at(1)])
    assert SUBJECT_CANARY not in str(info.value)
    assert store.purge(SUBJECT_CANARY) == 0 and store.purge("1002") == 1


def test_entity_ids_are_the_subjects_with_rows_in_both_stores(world):
    assert world.feast().entity_ids() == world.parquet.entity_ids() == [
        "alice", "bob", "carol", "dave", "erin"]


def test_pickles_as_its_settings_and_reopens_the_repository(world):
    store = world.feast()
    store.get_as_of(["alice"], [at(1)])
    data = pickle.dumps(store)
    assert b"alice" not in data and len(data) < 1000
    copy = pickle.loads(data)
    assert copy._store is None and copy.repo_path == store.repo_path
    assert copy.get_as_of(["alice"], [at(1)]) == [A1]


# -- point in time, created timestamps, purge ----------------------------------------------


def test_a_backfill_created_after_the_decision_is_not_what_the_model_saw(tmp_path):
    # A row valid from t+5 but written at t+500: the decision at t+10 was made on the t+0 row.
    backfill = ("alice", at(5), features(1.0, 1))
    repo = write_feast_repo(tmp_path / "feast", [*HISTORY, backfill],
                            created={("alice", at(5)): at(500)})
    assert FeastFeatureStore(repo, feature_names=FEATURES).get_as_of(["alice"], [at(10)]) == [A1]
    without = FeastFeatureStore(repo, feature_names=FEATURES, created_cutoff=False)
    assert without.get_as_of(["alice"], [at(10)]) == [backfill[2]]
    assert FeastFeatureStore(repo, feature_names=FEATURES).get_as_of(["alice"], [at(600)]) == [A2]


def test_purge_removes_a_subject_from_the_offline_store(tmp_path):
    repo = write_feast_repo(tmp_path / "feast")
    store = FeastFeatureStore(repo, feature_names=FEATURES)
    assert store.purge("alice") == 2
    assert store.entity_ids() == ["bob", "carol", "dave", "erin"]
    assert store.get_as_of(["alice", "bob"], [at(100), at(200)]) == [None, B1]
    assert store.purge("alice") == 0
    assert b"alice" not in (repo / "transactions.parquet").read_bytes()
    assert [p.name for p in repo.iterdir() if p.name.startswith(".tmp")] == []


# -- configuration and failures ------------------------------------------------------------


def test_features_are_named_or_found_in_the_registry(tmp_path, world):
    repo = write_feast_repo(tmp_path / "feast", second_view=True)
    with pytest.raises(ConfigError, match=r"'amount' is in views \['refunds', 'transactions'\]"):
        FeastFeatureStore(repo, feature_names=FEATURES).plan()
    explicit = FeastFeatureStore(repo, features=REFS)
    assert explicit.get_as_of(["alice"], [at(1)]) == [A1]
    both = FeastFeatureStore(repo, features=["transactions:amount", "refunds:amount"],
                             feature_names=["amount", "refund_amount"])
    assert both.get_as_of(["alice"], [at(1)]) == [{"amount": 12.5, "refund_amount": 12.5}]
    with pytest.raises(ConfigError, match="'velocity' is in no feature view"):
        FeastFeatureStore(world.feast_repo, feature_names=["velocity"]).plan()
    with pytest.raises(ConfigError, match="has no feature 'velocity'"):
        FeastFeatureStore(world.feast_repo, features=[f"{VIEW}:velocity"]).plan()
    with pytest.raises(ValueError, match="not both"):
        FeastFeatureStore(repo, features=REFS, feature_service="fraud")
    with pytest.raises(ValueError, match="name the features to fetch"):
        FeastFeatureStore(repo)
    with pytest.raises(ConfigError, match="no feature_store.yaml"):
        FeastFeatureStore(tmp_path, features=REFS).plan()


def test_without_feast_the_error_says_what_to_install(world, monkeypatch):
    monkeypatch.setitem(sys.modules, "feast", None)  # import feast now raises ImportError
    with pytest.raises(ConfigError, match=r"pip install 'serve-journal\[feast\]'"):
        world.feast().get_as_of(["alice"], [at(1)])


def test_a_failed_retrieval_does_not_carry_subject_ids(tmp_path, caplog):
    history = [(SUBJECT_CANARY, at(0), A1)]
    repo = write_feast_repo(tmp_path / "feast", history)
    store = FeastFeatureStore(repo, feature_names=FEATURES)
    store.plan()
    (repo / "transactions.parquet").write_bytes(b"not parquet " + SUBJECT_CANARY.encode())
    with caplog.at_level(logging.DEBUG), pytest.raises(ReplayDataError,
                                                       match="message is withheld") as info:
        store.get_as_of([SUBJECT_CANARY], [at(1)])
    seen = [str(info.value), repr(info.value.__dict__), *(r.getMessage() for r in caplog.records)]
    assert info.value.__context__ is None and info.value.__cause__ is None
    assert not any(SUBJECT_CANARY in text for text in seen)


def test_cli_options_for_feast_are_checked_before_anything_runs(tmp_path):
    runner = CliRunner()
    result = runner.invoke(replay_command, ["--model", "fraud", "--feature-store", "feast"])
    assert result.exit_code == 2 and "needs --feast-repo" in result.output
    result = runner.invoke(replay_command, ["--model", "fraud", "--feast-repo", str(tmp_path)])
    assert result.exit_code == 2 and "need --feature-store feast" in result.output
    result = runner.invoke(replay_command, ["--model", "fraud", "--feature-store", "feast",
                                            "--feast-repo", str(tmp_path)])
    assert result.exit_code == 2 and "needs the features to fetch" in result.output


# -- end to end on Ray ---------------------------------------------------------------------


def write_journal(world: World) -> Path:
    """The entries as hour-partition files of a local journal, as a writer publishes them."""
    journal = world.root / "journal"
    storage = open_storage(str(journal))
    table = world.entries
    keys = [DEFAULT_SPEC.key_for(MODEL_NAME, ts) for ts in table["ts"].to_pylist()]
    for key in sorted(set(keys)):
        sink = io.BytesIO()
        pq.write_table(table.take([i for i, k in enumerate(keys) if k == key]), sink)
        storage.put_new(DEFAULT_SPEC.file_path(key, f"w-{key.hour:02d}"), sink.getvalue())
    return journal


def test_replay_and_its_command_through_feast_match_the_parquet_store(ray_cluster, world):
    journal = world.root / "journal"
    if not journal.exists():
        write_journal(world)
    reports = {}
    for kind, store in (("parquet", world.parquet), ("feast", world.feast())):
        reports[kind] = replay(str(journal), model=MODEL_NAME, feature_store=store,
                               verifier=world.verifier(), progress=False)
    by_name = {kind: {world.names[r["request_id"]]: r["status"]
                      for r in report.results.to_pylist()} for kind, report in reports.items()}
    assert by_name["parquet"] == by_name["feast"] == EXPECTED
    assert reports["feast"].counts == reports["parquet"].counts
    assert reports["feast"].exit_code == 1  # the attacks and the missing features do not verify

    common = ["--model", MODEL_NAME, "--journal", str(journal), "--static-key-file",
              str(world.key_file), "--json"]
    outputs = {}
    for kind, extra in (("parquet", ["--features", str(world.parquet.root)]),
                        ("feast", ["--feature-store", "feast", "--feast-repo",
                                   str(world.feast_repo), "--feature-names", ",".join(FEATURES)])):
        result = CliRunner().invoke(replay_command, [
            *common, *extra, "--output", str(world.root / f"cli-{kind}.parquet")])
        assert result.exit_code == 1, result.output
        outputs[kind] = json.loads(result.output.strip().splitlines()[-1])
        assert not any(s in result.output for s in ("alice", "bob", "carol", "dave", "erin"))
    assert outputs["feast"]["counts"] == outputs["parquet"]["counts"]
    assert outputs["feast"]["counts"] == reports["parquet"].counts
    rows = {kind: pq.read_table(world.root / f"cli-{kind}.parquet")
            .sort_by("request_id").select(["request_id", "status"]).to_pylist()
            for kind in outputs}
    assert rows["feast"] == rows["parquet"]
