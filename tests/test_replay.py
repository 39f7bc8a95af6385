"""Replay on real Ray Data, a real Serve app, a real MLflow registry and real Parquet files.

One module fixture serves demo-like traffic through the journaled fraud app (vault pseudonymizer,
as the replicas use it) while writing the same features to a ParquetFeatureStore. Tests that
change something (feature history, the vault, the registry) work on copies, so they stay
independent of each other and of the session fixtures.
"""

from __future__ import annotations

import concurrent.futures
import pickle
import shutil
import sqlite3
import time
import uuid
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import requests
from click.testing import CliRunner
from hypothesis import given, settings
from hypothesis import strategies as st

from serve_journal import flush_journal
from serve_journal.examples.fraud import (
    FEATURES,
    MODEL_NAME,
    build_app,
    random_features,
    synthetic_transactions,
    train_and_register,
)
from serve_journal.integrity.encoding import canonical_encode, encode_flat_mapping
from serve_journal.privacy.forget import forget
from serve_journal.privacy.keyring import Keyring
from serve_journal.privacy.pseudonymizer import StaticKeyPseudonymizer
from serve_journal.privacy.subjects import VaultPseudonymizer, features_hmac
from serve_journal.privacy.vault import SubjectVault
from serve_journal.replay import (
    RESULT_SCHEMA,
    MlflowRescorer,
    ParquetFeatureStore,
    StaticKeyVerifier,
    VaultVerifier,
    record_features,
    replay,
    replay_command,
    run_replay_cli,
)
from serve_journal.replay import driver as replay_driver
from serve_journal.replay.verifiers import _subject_features_hmac

pytestmark = pytest.mark.timeout(600)

USERS = [f"user-{i:03d}" for i in range(10)]
NO_FEATURES_USER = "user-nofeatures"
DECISION_LABELS = ("block", "allow")  # the fraud example's decisions, at or above the threshold first
PER_USER = 9


class Traffic:
    """What the fixture sent: per request, the user, the feature row it used, the answer."""

    def __init__(self, root: Path, tracking_uri: str, version: str) -> None:
        self.root = root
        self.journal = root / "journal"
        self.features = root / "features"
        self.tracking_uri = tracking_uri
        self.version = version
        self.sent: list[dict] = []

    def copy(self, tmp_path: Path) -> tuple[Path, Path]:
        """Copies of the feature store and privacy folder (the journal itself is only read)."""
        features = tmp_path / "features"
        privacy = tmp_path / "journal-keys"
        shutil.copytree(self.features, features)
        shutil.copytree(self.root / "journal-keys", privacy)
        return features, privacy


@pytest.fixture(scope="module")
def traffic(serve_instance, mlflow_registry, tmp_path_factory) -> Traffic:
    from ray import serve

    tracking_uri, version = mlflow_registry
    root = tmp_path_factory.mktemp("replay")
    out = Traffic(root, tracking_uri, version)
    store = ParquetFeatureStore(out.features, batch_rows=16)
    name = f"replay{uuid.uuid4().hex[:6]}"
    serve.run(build_app(tracking_uri, str(out.journal)), name=name, route_prefix=f"/{name}")
    url = f"{serve_instance}/{name}"

    def one_user(user: str, seed: int) -> list[dict]:
        # One thread per user: a user's requests are sequential, so the features written before
        # a request are the latest as of its decision (as a feature store serving the model is).
        rng = np.random.default_rng(seed)
        session = requests.Session()
        rows, features, feature_ts = [], None, None
        for i in range(PER_USER):
            if user != NO_FEATURES_USER and (features is None or i % 3 != 2):
                features = random_features(rng)
                feature_ts = time.time_ns() // 1000
                record_features(store, user, features, feature_ts)
            elif features is None:
                features = random_features(rng)
            # every third request reuses the previous row: one feature row, two entries
            request_id = uuid.uuid4().hex
            response = session.post(url, json={"subject_id": user, "features": features},
                                    headers={"x-caller-id": "checkout", "x-request-id": request_id},
                                    timeout=60)
            assert response.status_code == 200
            rows.append({"user": user, "request_id": request_id, "feature_ts": feature_ts,
                         "features": features, "answer": response.json()})
        return rows

    try:
        with concurrent.futures.ThreadPoolExecutor(6) as pool:
            futures = [pool.submit(one_user, u, s) for s, u in enumerate([*USERS, NO_FEATURES_USER])]
            for fut in futures:
                out.sent.extend(fut.result())
        store.close()
        assert flush_journal(str(out.journal), timeout=60), "journal flush did not complete in time"
    finally:
        serve.delete(name)
    return out


def requests_of(traffic: Traffic, user: str | None = None) -> set[str]:
    return {r["request_id"] for r in traffic.sent if user is None or r["user"] == user}


def statuses(report) -> dict[str, str]:
    rows = report.results.select(["request_id", "status"]).to_pylist()
    return {r["request_id"]: r["status"] for r in rows}


# -- end to end --------------------------------------------------------------------------------


def test_all_demo_entries_verify(ray_cluster, traffic, tmp_path):
    store = ParquetFeatureStore(traffic.features)
    report = replay(str(traffic.journal), model=MODEL_NAME, feature_store=store,
                    verifier=VaultVerifier.from_journal(str(traffic.journal)),
                    subjects=USERS, output=tmp_path / "out.parquet", progress=False)
    assert report.total == len(USERS) * PER_USER
    assert report.counts == {"verified": report.total}
    assert report.ok and report.exit_code == 0
    assert set(statuses(report)) == requests_of(traffic) - requests_of(traffic, NO_FEATURES_USER)
    written = pq.ParquetFile(tmp_path / "out.parquet").read()
    assert written.schema.equals(RESULT_SCHEMA) and written.num_rows == report.total
    # No raw subject id and no raw feature value reaches the output file.
    raw = (tmp_path / "out.parquet").read_bytes()
    assert not any(u.encode() in raw for u in USERS)
    assert "verified" in report.format_summary()


def test_every_entity_mode_reports_entries_without_features_as_missing(ray_cluster, traffic):
    report = replay(str(traffic.journal), model=MODEL_NAME,
                    feature_store=ParquetFeatureStore(traffic.features),
                    verifier=VaultVerifier.from_journal(str(traffic.journal)), progress=False)
    got = statuses(report)
    assert set(got) == requests_of(traffic)
    missing = {r for r, s in got.items() if s == "missing"}
    assert missing == requests_of(traffic, NO_FEATURES_USER)
    assert report.counts["verified"] == len(USERS) * PER_USER
    assert not report.ok and report.exit_code == 1


def test_editing_one_feature_row_yields_exactly_the_matching_mismatches(ray_cluster, traffic,
                                                                       tmp_path):
    features, _ = traffic.copy(tmp_path)
    store = ParquetFeatureStore(features)
    # The second row of user-003 was used by two requests (the next one reused it).
    user = "user-003"
    rows = [r for r in traffic.sent if r["user"] == user]
    edited_ts = rows[1]["feature_ts"]
    expected = {r["request_id"] for r in rows if r["feature_ts"] == edited_ts}
    assert len(expected) == 2
    changed = dict(rows[1]["features"], amount=rows[1]["features"]["amount"] + 0.01)
    assert store.replace_rows(user, edited_ts, changed) == 1
    report = replay(str(traffic.journal), model=MODEL_NAME, feature_store=store,
                    verifier=VaultVerifier.from_journal(str(traffic.journal)), subjects=USERS,
                    progress=False)
    got = statuses(report)
    assert {r for r, s in got.items() if s == "mismatch"} == expected
    assert report.counts == {"verified": report.total - 2, "mismatch": 2}


def test_forgotten_subject_yields_shredded_not_an_error(ray_cluster, traffic, tmp_path):
    features, privacy = traffic.copy(tmp_path)
    store = ParquetFeatureStore(features)
    keyring = Keyring.local_default(privacy)
    vault = SubjectVault.local_default(privacy, keyring)
    try:
        receipt = forget("user-005", vault=vault, keyring=keyring, purge_hook=store.purge,
                         receipts_dir=tmp_path / "receipts")
        assert receipt.status == "shredded" and receipt.hooks["purge"] == "ok"
        assert "user-005" not in store.entity_ids()
        verifier = VaultVerifier(VaultPseudonymizer(keyring, vault))
        report = replay(str(traffic.journal), model=MODEL_NAME, feature_store=store,
                        verifier=verifier, progress=False)
        got = statuses(report)
        assert {r for r, s in got.items() if s == "shredded"} == requests_of(traffic, "user-005")
        assert {r for r, s in got.items() if s == "missing"} == requests_of(traffic, NO_FEATURES_USER)
        assert report.counts["verified"] == (len(USERS) - 1) * PER_USER
        # Asking for the forgotten subject by id finds no key, hence no entries: said so.
        only = replay(str(traffic.journal), model=MODEL_NAME, feature_store=store,
                      verifier=verifier, subjects=["user-005", "user-001"], progress=False)
        assert only.subjects_without_key == 1
        assert set(statuses(only)) == requests_of(traffic, "user-001")
        assert "1 of 2 given subjects have no live key" in only.format_summary()
    finally:
        vault.close()


def test_rescore_uses_the_journaled_version(ray_cluster, traffic):
    report = replay(str(traffic.journal), model=MODEL_NAME,
                    feature_store=ParquetFeatureStore(traffic.features),
                    verifier=VaultVerifier.from_journal(str(traffic.journal)), subjects=USERS,
                    rescore=True, tracking_uri=traffic.tracking_uri, feature_names=FEATURES,
                    decision_labels=DECISION_LABELS, progress=False)
    assert report.counts == {"verified": report.total} and report.total == len(USERS) * PER_USER
    rows = report.results.to_pylist()
    answers = {r["request_id"]: r["answer"] for r in traffic.sent}
    for row in rows:
        assert row["rescore_status"] == "verified"
        assert row["replayed_score"] == pytest.approx(answers[row["request_id"]]["score"], abs=1e-6)
        assert row["replayed_decision"] == answers[row["request_id"]]["decision"]


@pytest.fixture
def registry_copy(mlflow_registry, tmp_path) -> str:
    """A copy of the session registry (same artifacts) that this test may change."""
    source = mlflow_registry[0].removeprefix("sqlite:///")
    target = tmp_path / "mlflow-copy.db"
    with sqlite3.connect(source) as src, sqlite3.connect(target) as dst:
        src.backup(dst)
    return f"sqlite:///{target}"


def test_promoting_a_new_version_does_not_change_rescore_and_a_deleted_version_is_reported(
        ray_cluster, traffic, registry_copy, tmp_path):
    from mlflow.tracking import MlflowClient  # inside: MLflow takes seconds to import

    new_version = train_and_register(tmp_path / "v2", registry_copy, rows=2000, seed=99)
    client = MlflowClient(tracking_uri=registry_copy, registry_uri=registry_copy)
    assert str(client.get_model_version_by_alias(MODEL_NAME, "champion").version) == new_version
    assert new_version != traffic.version
    # The promoted version really scores differently: rescoring with it could not pass.
    rescorer = MlflowRescorer(registry_copy, feature_names=FEATURES)
    sample = [r["features"] for r in traffic.sent[:20]]
    old = rescorer.score(MODEL_NAME, traffic.version, sample)
    new = rescorer.score(MODEL_NAME, new_version, sample)
    assert max(abs(a - b) for a, b in zip(old, new, strict=True)) > 1e-3

    common = dict(model=MODEL_NAME, feature_store=ParquetFeatureStore(traffic.features),
                  verifier=VaultVerifier.from_journal(str(traffic.journal)), subjects=USERS,
                  rescore=True, tracking_uri=registry_copy, feature_names=FEATURES,
                  decision_labels=DECISION_LABELS, progress=False)
    report = replay(str(traffic.journal), **common)
    assert report.counts == {"verified": len(USERS) * PER_USER}

    client.delete_model_version(MODEL_NAME, traffic.version)
    report = replay(str(traffic.journal), **common)
    assert report.counts == {"model_missing": len(USERS) * PER_USER}
    assert set(report.results["hmac_status"].to_pylist()) == {"verified"}
    assert "model_missing" in report.format_summary() and report.exit_code == 1
    # Only the copy lost the version: the session registry (and its artifacts) still serve it.
    assert MlflowRescorer(traffic.tracking_uri, feature_names=FEATURES).score(
        MODEL_NAME, traffic.version, sample[:1])


def test_cli_function_returns_non_zero_when_something_did_not_verify(ray_cluster, traffic,
                                                                     tmp_path):
    lines: list[str] = []
    out = tmp_path / "cli.parquet"
    code = run_replay_cli(model=MODEL_NAME, journal_uri=str(traffic.journal),
                          features_uri=str(traffic.features), output=str(out),
                          subjects=USERS[:3], echo=lines.append)
    assert code == 0, lines
    assert pq.ParquetFile(out).metadata.num_rows == 3 * PER_USER
    code = run_replay_cli(model=MODEL_NAME, journal_uri=str(traffic.journal),
                          features_uri=str(traffic.features), output=str(out), echo=lines.append)
    assert code == 1  # the user without features: missing
    assert "missing" in lines[-1]
    code = run_replay_cli(model=MODEL_NAME, journal_uri=str(traffic.journal),
                          features_uri=str(traffic.features), output=str(out),
                          subjects=USERS[:2], rescore=True, tracking_uri=traffic.tracking_uri,
                          feature_names=FEATURES, decision_labels=DECISION_LABELS,
                          echo=lines.append)
    assert code == 0, lines[-1]
    assert "(with rescore)" in lines[-1] and "all entries verified" in lines[-1]


def test_rescore_without_a_feature_order_says_which_option_to_pass(ray_cluster, traffic):
    # The fraud model was logged without a signature: nothing names its input order.
    with pytest.raises(Exception, match="--feature-names") as info:
        replay(str(traffic.journal), model=MODEL_NAME,
               feature_store=ParquetFeatureStore(traffic.features),
               verifier=VaultVerifier.from_journal(str(traffic.journal)), subjects=USERS[:1],
               rescore=True, tracking_uri=traffic.tracking_uri, progress=False)
    assert "feature_names" in str(info.value)


def test_selection_by_decision_and_time(ray_cluster, traffic):
    blocked = {r["request_id"] for r in traffic.sent
               if r["answer"]["decision"] == "block" and r["user"] != NO_FEATURES_USER}
    report = replay(str(traffic.journal), model=MODEL_NAME, decision="block",
                    feature_store=ParquetFeatureStore(traffic.features),
                    verifier=VaultVerifier.from_journal(str(traffic.journal)), subjects=USERS,
                    progress=False)
    assert set(statuses(report)) == blocked
    future = replay(str(traffic.journal), model=MODEL_NAME, since="2999-01-01T00:00:00Z",
                    feature_store=ParquetFeatureStore(traffic.features),
                    verifier=VaultVerifier.from_journal(str(traffic.journal)), progress=False)
    assert future.total == 0 and future.files == 0 and future.ok


# -- encoding and verifiers (no Ray) ---------------------------------------------------------


def test_flat_fast_path_encodes_exactly_like_canonical_encode():
    rng = np.random.default_rng(5)
    edge = {"neg": -1, "zero": 0, "big": 2**70, "small": -(2**63), "t": True, "f": False,
            "none": None, "nan": float("nan"), "inf": float("-inf"), "negzero": -0.0,
            "é键": "ünï", "": "", "b": 1.5}
    samples = [edge, {}, *(random_features(rng) for _ in range(500))]
    for features in samples:
        assert encode_flat_mapping(features) == canonical_encode(features)
    # Anything else is left to canonical_encode.
    for other in ({"x": [1]}, {"x": np.float64(1.0)}, {1: 2}, {"x": "\ud800"}, [1], {"x": b"1"}):
        assert encode_flat_mapping(other) is None


# -- verifiers (no Ray) ---------------------------------------------------------------------


def test_static_key_verifier_matches_the_static_pseudonymizer(tmp_path):
    key = bytes(range(32))
    key_file = tmp_path / "hmac.key"
    key_file.write_text(key.hex())
    verifier = StaticKeyVerifier.from_key_file(key_file, key_id="k1")
    pseudonymizer = StaticKeyPseudonymizer("k1", key)
    features = {"amount": 12.5, "hour": 3}
    protected = pseudonymizer.protect(["alice"], [canonical_encode(features)])[0]
    assert verifier.tokens_for(["alice"]) == [protected.subject_token]
    assert verifier.verify("alice", canonical_encode(features), "k1", protected.features_hmac) == "verified"
    assert verifier.verify("alice", canonical_encode({**features, "hour": 4}), "k1",
                           protected.features_hmac) == "mismatch"
    assert verifier.verify("alice", canonical_encode(features), "k2",
                           protected.features_hmac) == "unknown_key"
    assert verifier.unlinked_status([protected.subject_token]) == ["missing"]
    copy = pickle.loads(pickle.dumps(verifier))
    assert copy.tokens_for(["alice"]) == [protected.subject_token]
    assert key.hex() not in repr(verifier) and key not in pickle.dumps(verifier)
    with pytest.raises(TypeError, match="cannot be pickled"):
        pickle.dumps(StaticKeyVerifier("k1", key))


def test_vault_verifier_batch_agrees_with_verify_features(tmp_path, monkeypatch):
    monkeypatch.delenv("SERVE_JOURNAL_KEK", raising=False)
    keyring = Keyring.local_default(tmp_path / "privacy")
    vault = SubjectVault.local_default(tmp_path / "privacy", keyring)
    try:
        pseudonymizer = VaultPseudonymizer(keyring, vault)
        verifier = VaultVerifier(pseudonymizer)
        subjects = ["alice", "bob", None, "carol"]
        encoded = [canonical_encode({"x": i}) for i in range(4)]
        protected = pseudonymizer.protect(subjects, encoded)
        tokens = [p.subject_token for p in protected]
        hmacs = [p.features_hmac for p in protected]
        key_ids = [p.key_id for p in protected]
        vault.forget("carol")
        tampered = [*encoded[:1], canonical_encode({"x": 99}), *encoded[2:]]
        got = verifier.verify_batch(subjects, tampered, key_ids, hmacs, tokens)
        assert got == ["verified", "mismatch", "verified", "shredded"]
        single = [verifier.verify(s, e, k, h, t)
                  for s, e, k, h, t in zip(subjects, tampered, key_ids, hmacs, tokens, strict=True)]
        assert single == got
        assert verifier.verify_batch(["alice"], encoded[:1], ["k-nope"], hmacs[:1],
                                     tokens[:1]) == ["unknown_key"]
        assert verifier.tokens_for(["alice", "carol", "dave"]) == [tokens[0], None, None]
        assert verifier.unlinked_status([tokens[0], tokens[3]]) == ["missing", "shredded"]
        assert pickle.loads(pickle.dumps(verifier)).tokens_for(["bob"]) == [tokens[1]]
    finally:
        vault.close()


# -- rescorer and command options (no Ray) ---------------------------------------------------


def test_rescorer_needs_an_explicit_feature_order_or_a_signature(mlflow_registry):
    tracking_uri, version = mlflow_registry
    rescorer = MlflowRescorer(tracking_uri)
    sample = [random_features(np.random.default_rng(3)) for _ in range(3)]
    with pytest.raises(ValueError, match="feature_names") as info:
        rescorer.score(MODEL_NAME, version, sample)
    assert "--feature-names" in str(info.value) and f"models:/{MODEL_NAME}/{version}" in str(info.value)
    explicit = MlflowRescorer(tracking_uri, feature_names=FEATURES)
    assert explicit.feature_order(MODEL_NAME, version) == FEATURES
    assert len(explicit.score(MODEL_NAME, version, sample)) == 3
    with pytest.raises(TypeError, match="not one string"):
        MlflowRescorer(tracking_uri, feature_names="amount,hour")
    with pytest.raises(ValueError, match="twice"):
        MlflowRescorer(tracking_uri, feature_names=["amount", "amount"])
    with pytest.raises(ValueError, match="non-empty"):
        MlflowRescorer(tracking_uri, feature_names=[])
    with pytest.raises(ValueError, match="give them to that rescorer"):
        replay("./no-journal", model=MODEL_NAME, rescore=True, rescorer=explicit,
               feature_names=FEATURES)


@pytest.mark.slow  # over 3 s: kept out of the fast tier, runs in the full suite
def test_rescorer_reads_the_feature_order_from_the_model_signature(registry_copy, tmp_path):
    import mlflow  # inside: MLflow, pandas and scikit-learn take seconds to import
    import pandas as pd  # inside: as above
    from mlflow.models import infer_signature  # inside: as above
    from sklearn.linear_model import LogisticRegression  # inside: as above

    # Trained on the columns in reverse order: only the signature can tell the rescorer so.
    order = tuple(reversed(FEATURES))
    x, y = synthetic_transactions(1000, seed=11)
    frame = pd.DataFrame(x, columns=list(FEATURES))[list(order)]
    model = LogisticRegression(max_iter=1000).fit(frame.to_numpy(), y)
    before = (mlflow.get_tracking_uri(), mlflow.get_registry_uri())
    mlflow.set_tracking_uri(registry_copy)
    mlflow.set_registry_uri(registry_copy)
    try:
        mlflow.set_experiment("signed")
        with mlflow.start_run() as run:
            mlflow.sklearn.log_model(model, name="model", signature=infer_signature(frame))
        version = str(mlflow.register_model(f"runs:/{run.info.run_id}/model", "signed").version)
    finally:
        mlflow.set_tracking_uri(before[0])
        mlflow.set_registry_uri(before[1])
    rng = np.random.default_rng(4)
    sample = [random_features(rng) for _ in range(20)]
    from_signature = MlflowRescorer(registry_copy)
    assert from_signature.feature_order("signed", version) == order
    expected = model.predict_proba(np.array([[float(f[n]) for n in order] for f in sample]))[:, 1]
    assert from_signature.score("signed", version, sample) == pytest.approx(list(expected), abs=1e-12)
    assert MlflowRescorer(registry_copy, feature_names=order).score("signed", version, sample) == \
        from_signature.score("signed", version, sample)
    wrong = MlflowRescorer(registry_copy, feature_names=FEATURES).score("signed", version, sample)
    assert max(abs(a - b) for a, b in zip(wrong, expected, strict=True)) > 1e-6


def test_replay_command_passes_the_feature_order(monkeypatch):
    seen: dict = {}

    def fake(**options):
        seen.update(options)
        return 0

    monkeypatch.setattr(replay_driver, "run_replay_cli", fake)
    runner = CliRunner()
    result = runner.invoke(replay_command, ["--model", MODEL_NAME, "--rescore",
                                            "--feature-names", "amount, hour,merchant_risk",
                                            "--decision-labels", "block,allow"])
    assert result.exit_code == 0, result.output
    assert seen["feature_names"] == ("amount", "hour", "merchant_risk") and seen["rescore"]
    assert seen["decision_labels"] == ("block", "allow")
    seen.clear()
    assert runner.invoke(replay_command, ["--model", MODEL_NAME]).exit_code == 0
    assert seen["feature_names"] is None and seen["decision_labels"] is None
    assert runner.invoke(replay_command, ["--model", MODEL_NAME, "--decision-labels", "x"]).exit_code == 2
    bad = runner.invoke(replay_command, ["--model", MODEL_NAME, "--feature-names", "amount,,hour"])
    assert bad.exit_code == 2 and "--feature-names" in bad.output


def test_replay_command_reads_subject_ids_from_stdin(monkeypatch):
    seen: dict = {}

    def fake(**options):
        seen.update(options)
        return 0

    monkeypatch.setattr(replay_driver, "run_replay_cli", fake)
    runner = CliRunner()
    result = runner.invoke(replay_command, ["--model", MODEL_NAME, "--subject", "user-001",
                                            "--subject", "-"], input="user-002\n\nuser-003\n")
    assert result.exit_code == 0, result.output
    assert seen["subjects"] == ("user-001", "user-002", "user-003")
    assert "user-00" not in result.output
    empty = runner.invoke(replay_command, ["--model", MODEL_NAME, "--subject", "-"], input="")
    assert empty.exit_code == 2 and "standard input holds no subject id" in empty.output


@given(st.binary(max_size=64), st.binary(min_size=32, max_size=32),
       st.binary(min_size=32, max_size=32))
@settings(max_examples=200, deadline=None)
def test_vault_verifier_fast_hmac_is_privacy_features_hmac(encoded, data_key, subject_key):
    expected = features_hmac(encoded, data_key, subject_key)
    assert _subject_features_hmac(encoded, data_key, subject_key) == expected
    assert _subject_features_hmac(encoded, data_key, subject_key) == expected  # from the cache
    assert _subject_features_hmac(encoded + b"x", data_key, subject_key) != expected
