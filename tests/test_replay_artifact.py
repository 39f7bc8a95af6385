"""`replay --rescore` re-scores with exactly the journaled model artifact and refuses a mismatch.

Each test builds its own real MLflow registry (a sqlite file and an artifact root in tmp_path,
so attacks on the artifact store touch nothing shared) and a journal written the way replicas
write it: features in a ParquetFeatureStore before the call, tokens and feature HMACs from the
subject vault, the score of the model loaded from ``registry.fetch_model``'s download, and the
schema v2 identity (``model_run_id``, ``model_digest``). Some entries come from a schema v1 file
(no identity columns at all): they re-score by version and are counted as not pinned.

The attackers can write the registry or its artifact store and hold no key: they delete and
recreate a registered model (same version number, another run), overwrite the weights in place
(same run id), or edit the MLmodel file. Each ends in ``artifact_mismatch`` and a non-zero exit
naming what differs.
"""

from __future__ import annotations

import datetime as dt
import io
import json
import uuid
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from click.testing import CliRunner

from serve_journal.catalog.layout import DEFAULT_SPEC
from serve_journal.examples.fraud import (
    FEATURES,
    MODEL_NAME,
    THRESHOLD,
    random_features,
    synthetic_transactions,
    train_and_register,
)
from serve_journal.integrity.encoding import canonical_encode
from serve_journal.privacy.keyring import Keyring
from serve_journal.privacy.subjects import VaultPseudonymizer
from serve_journal.privacy.vault import SubjectVault
from serve_journal.registry import fetch_model, mlmodel_digest
from serve_journal.replay import (
    ARTIFACT_MISMATCH,
    MlflowRescorer,
    ParquetFeatureStore,
    VaultVerifier,
    record_features,
    replay,
    replay_command,
)
from serve_journal.schema import ADDED_COLUMNS, ENTRY_SCHEMA
from serve_journal.storage import open_storage

pytestmark = pytest.mark.timeout(600)

USERS = [f"user-{i:02d}" for i in range(6)]
PINNED_PER_USER = 4
V1_PER_USER = 2
SEVERAL = 3  # pinned entries that list a shadow model beside the deciding one
DECISION_LABELS = ("block", "allow")


@dataclass
class World:
    """One registry, one journal of its model's decisions, the feature store and the keys."""

    root: Path
    tracking_uri: str
    artifact_root: Path
    version: str
    run_id: str
    digest: str
    model: object
    sent: list[dict]

    @property
    def journal(self) -> Path:
        return self.root / "journal"

    @property
    def features(self) -> Path:
        return self.root / "features"

    def pinned(self) -> set[str]:
        return {s["request_id"] for s in self.sent if s["pinned"]}

    def unpinned(self) -> set[str]:
        return {s["request_id"] for s in self.sent if not s["pinned"]}

    def replay(self, **options):
        return replay(str(self.journal), model=MODEL_NAME,
                      feature_store=ParquetFeatureStore(self.features),
                      verifier=VaultVerifier.from_journal(str(self.journal)), subjects=USERS,
                      rescore=True, tracking_uri=self.tracking_uri, feature_names=FEATURES,
                      decision_labels=DECISION_LABELS, progress=False, **options)

    def cli(self, *extra: str) -> tuple[int, str]:
        """``serve-journal replay --rescore`` on this world: (exit code, output)."""
        result = CliRunner().invoke(replay_command, [
            "--model", MODEL_NAME, "--journal", str(self.journal), "--features",
            str(self.features), "--rescore", "--tracking-uri", self.tracking_uri,
            "--feature-names", ",".join(FEATURES), "--decision-labels", ",".join(DECISION_LABELS),
            "--output", str(self.root / f"cli-{uuid.uuid4().hex[:6]}.parquet"), *extra])
        return result.exit_code, result.output


def new_registry(root: Path) -> tuple[str, Path]:
    """A sqlite registry whose ``fraud`` experiment keeps its artifacts under ``root``."""
    from mlflow.tracking import MlflowClient  # inside: MLflow takes seconds to import

    tracking_uri = f"sqlite:///{root / 'mlflow.db'}"
    artifact_root = root / "artifacts"
    MlflowClient(tracking_uri).create_experiment("fraud", artifact_location=artifact_root.as_uri())
    return tracking_uri, artifact_root


def build_world(root: Path, *, digest_kind: str = "sha256") -> World:
    """Train and register ``fraud``, then journal its decisions for USERS (see module docstring)."""
    import mlflow  # inside: MLflow takes seconds to import

    tracking_uri, artifact_root = new_registry(root)
    version = train_and_register(root / "train", tracking_uri, rows=2000)
    info, local = fetch_model(MODEL_NAME, root / "serving-copy", version, tracking_uri)
    model = mlflow.sklearn.load_model(local)
    digest = info.digest if digest_kind == "sha256" else mlmodel_digest(Path(local) / "MLmodel")
    assert info.run_id and digest

    privacy = root / "journal-keys"
    keyring = Keyring.local_default(privacy)
    vault = SubjectVault.local_default(privacy, keyring)
    pseudonymizer = VaultPseudonymizer(keyring, vault)
    store = ParquetFeatureStore(root / "features", batch_rows=8)
    rng = np.random.default_rng(21)
    start = dt.datetime.now(dt.UTC).replace(microsecond=0) - dt.timedelta(hours=2)
    sent: list[dict] = []
    rows_v2: list[dict] = []
    rows_v1: list[dict] = []
    try:
        seq = 0
        for user in USERS:
            for i in range(PINNED_PER_USER + V1_PER_USER):
                seq += 1
                features = random_features(rng)
                feature_ts = start + dt.timedelta(seconds=10 * seq)
                record_features(store, user, features, int(feature_ts.timestamp() * 1_000_000))
                protected = pseudonymizer.protect([user], [canonical_encode(features)])[0]
                row = np.array([[float(features[n]) for n in FEATURES]])
                score = float(model.predict_proba(row)[0, 1])
                pinned = i < PINNED_PER_USER
                several = pinned and seq <= SEVERAL
                entry = _entry(seq, feature_ts + dt.timedelta(seconds=1), protected, version,
                               score, pinned=pinned, run_id=info.run_id, digest=digest,
                               several=several)
                (rows_v2 if pinned else rows_v1).append(entry)
                sent.append({"request_id": entry["request_id"], "pinned": pinned,
                             "several": several, "score": score, "features": features})
        store.close()
    finally:
        vault.close()
    storage = open_storage(str(root / "journal"))
    v2 = pa.Table.from_pylist(rows_v2, schema=ENTRY_SCHEMA)
    v1 = pa.Table.from_pylist(rows_v1, schema=ENTRY_SCHEMA).drop_columns(list(ADDED_COLUMNS))
    _write(storage, v2, "w-v2")
    _write(storage, v1, "w-v1")  # a file of schema version 1: no identity columns at all
    return World(root, tracking_uri, artifact_root, version, info.run_id, digest, model, sent)


def _entry(seq: int, ts: dt.datetime, protected, version: str, score: float, *, pinned: bool,
           run_id: str, digest: str, several: bool) -> dict:
    models = None
    if several:
        models = [{"name": MODEL_NAME, "version": version, "run_id": run_id, "digest": digest,
                   "role": "decision"},
                  {"name": "fraud-challenger", "version": "7", "run_id": "c" * 32,
                   "digest": "sha256:" + "0" * 64, "role": "shadow"}]
    return {
        "schema_version": 2 if pinned else 1, "request_id": uuid.uuid4().hex, "ts": ts,
        "caller": "checkout", "subject_token": protected.subject_token, "model_name": MODEL_NAME,
        "model_version": version, "dataset_hash": None, "dataset_hash_source": "none",
        "features_hmac": protected.features_hmac, "key_id": protected.key_id,
        "outputs": [{"label": "fraud", "score": score}], "score": score, "threshold": THRESHOLD,
        "decision": "block" if score >= THRESHOLD else "allow", "explanation_ref": None,
        "outcome": "ok", "error_type": None, "latency_ms": 1.0, "risk_tier": "high",
        "sample_rate": 1.0, "producer_id": "p-test", "seq": seq, "app_name": "app",
        "deployment": "FraudModel", "replica": "r1",
        "model_run_id": run_id if pinned else None, "model_digest": digest if pinned else None,
        "models": models,
    }


def _write(storage, table: pa.Table, prefix: str) -> None:
    """One file per hour partition, as a writer publishes them (create-only)."""
    keys = [DEFAULT_SPEC.key_for(MODEL_NAME, ts) for ts in table["ts"].to_pylist()]
    for key in sorted(set(keys)):
        part = table.take([i for i, k in enumerate(keys) if k == key])
        sink = io.BytesIO()
        pq.write_table(part, sink)
        storage.put_new(DEFAULT_SPEC.file_path(key, f"{prefix}-{key.hour:02d}"), sink.getvalue())


def model_file(world: World) -> Path:
    """The weights of the registered version in the artifact store (the only model there)."""
    found = sorted(world.artifact_root.rglob("model.*"))
    assert len(found) == 1, found
    return found[0]


def overwrite_weights(world: World) -> None:
    """Replace the version's weights in place with a real model of the same shape (other
    weights), serialized the way MLflow serializes it, so loading it works."""
    import mlflow  # inside: MLflow, scikit-learn take seconds to import
    from sklearn.linear_model import LogisticRegression  # inside: as above

    x, y = synthetic_transactions(2000, seed=99)
    other = LogisticRegression(max_iter=1000, C=0.01).fit(x, y)
    saved = world.root / f"evil-{uuid.uuid4().hex[:6]}"
    mlflow.sklearn.save_model(other, saved)
    target = model_file(world)
    target.write_bytes((saved / target.name).read_bytes())


def assert_refused(world: World, report, differs: str, *needles: str) -> None:
    """Every pinned entry is artifact_mismatch (not re-scored); the summary names what differs."""
    got = {r["request_id"]: r for r in report.results.to_pylist()}
    for request_id in world.pinned():
        row = got[request_id]
        assert row["status"] == ARTIFACT_MISMATCH and row["hmac_status"] == "verified", row
        assert row["replayed_score"] is None and row["artifact_status"] == differs
    assert report.counts[ARTIFACT_MISMATCH] == len(world.pinned())
    assert report.exit_code == 1 and not report.ok
    [mismatch] = report.artifact_mismatches
    assert mismatch.model == f"models:/{MODEL_NAME}/{world.version}"
    assert mismatch.differs == differs and mismatch.entries == len(world.pinned())
    summary = report.format_summary()
    assert f"ARTIFACT MISMATCH models:/{MODEL_NAME}/{world.version}" in summary
    for needle in needles:
        assert needle in summary and needle in mismatch.reason
    assert not any(u in summary for u in USERS)  # no subject id in what an auditor reads


def assert_cli_refuses(world: World, differs: str, *needles: str) -> None:
    code, output = world.cli()
    assert code == 1, output
    assert f"ARTIFACT MISMATCH models:/{MODEL_NAME}/{world.version}" in output
    assert all(n in output for n in needles), output
    code, output = world.cli("--json")
    assert code == 1, output
    data = json.loads(output.strip().splitlines()[-1])
    assert data["counts"][ARTIFACT_MISMATCH] == len(world.pinned())
    assert data["artifacts"][differs] == len(world.pinned())
    assert [m["differs"] for m in data["artifact_mismatches"]] == [differs]
    assert data["exit_code"] == 1 and not data["ok"]


# -- d. the honest case --------------------------------------------------------------------


def test_same_artifact_verifies_and_unpinned_entries_are_counted(ray_cluster, tmp_path):
    world = build_world(tmp_path)
    report = world.replay()
    assert report.counts == {"verified": len(world.sent)}, report.format_summary()
    assert report.artifacts == {"pinned": len(world.pinned()), "not_pinned": len(world.unpinned())}
    assert report.several_models == SEVERAL and report.artifact_mismatches == ()
    rows = {r["request_id"]: r for r in report.results.to_pylist()}
    for sent in world.sent:
        row = rows[sent["request_id"]]
        assert row["replayed_score"] == pytest.approx(sent["score"], abs=1e-9)
        assert row["artifact_status"] == ("pinned" if sent["pinned"] else "not_pinned")
        assert row["several_models"] is sent["several"]
        assert row["model_digest"] == (world.digest if sent["pinned"] else None)
    summary = report.format_summary()
    assert f"{len(world.unpinned())} entries: artifact not pinned" in summary
    assert f"{len(world.pinned())} entries: re-scored with the checked artifact" in summary
    assert f"{SEVERAL} entries of calls with several models" in summary
    code, output = world.cli("--json")
    assert code == 0, output
    data = json.loads(output.strip().splitlines()[-1])
    assert data["counts"] == {"verified": len(world.sent)} and data["exit_code"] == 0
    assert data["artifacts"]["not_pinned"] == len(world.unpinned())


# -- a. delete and recreate: "version 1" now belongs to another run -----------------------


def test_recreated_version_of_another_run_is_refused(ray_cluster, tmp_path):
    from mlflow.tracking import MlflowClient  # inside: MLflow takes seconds to import

    world = build_world(tmp_path)
    client = MlflowClient(tracking_uri=world.tracking_uri, registry_uri=world.tracking_uri)
    client.delete_registered_model(MODEL_NAME)
    again = train_and_register(tmp_path / "retrain", world.tracking_uri, rows=2000, seed=99)
    assert again == world.version  # the same number, for other weights
    new_run = client.get_model_version(MODEL_NAME, again).run_id
    assert new_run != world.run_id

    report = world.replay()
    assert_refused(world, report, "run_id_differs", world.run_id, new_run)
    # Entries that pinned nothing can only be re-scored by version: with the new weights.
    unpinned = [r for r in report.results.to_pylist() if r["request_id"] in world.unpinned()]
    assert {r["artifact_status"] for r in unpinned} == {"not_pinned"}
    assert "artifact not pinned" in report.format_summary()
    assert_cli_refuses(world, "run_id_differs", "run id differs", world.run_id, new_run)


# -- b. the weights overwritten in place (same run id) -------------------------------------


def test_weights_overwritten_in_the_artifact_store_are_refused(ray_cluster, tmp_path):
    world = build_world(tmp_path)
    overwrite_weights(world)
    report = world.replay()
    assert_refused(world, report, "digest_differs", world.digest)
    assert_cli_refuses(world, "digest_differs", "digest differs", world.digest)


# -- c. the mlmodel-sha256 kind: the MLmodel file edited -----------------------------------


def test_mlmodel_digest_checks_the_mlmodel_file(ray_cluster, tmp_path):
    world = build_world(tmp_path, digest_kind="mlmodel")
    assert world.digest.startswith("mlmodel-sha256:")
    honest = world.replay()
    assert honest.counts == {"verified": len(world.sent)}, honest.format_summary()
    assert honest.artifacts == {"mlmodel_only": len(world.pinned()),
                                "not_pinned": len(world.unpinned())}
    assert "the weights are not pinned" in honest.format_summary()

    mlmodel = model_file(world).parent / "MLmodel"
    text = mlmodel.read_text()
    assert world.run_id in text
    mlmodel.write_text(text.replace(world.run_id, "f" * len(world.run_id)))
    report = world.replay()
    assert_refused(world, report, "digest_differs", world.digest)
    assert_cli_refuses(world, "digest_differs", "digest differs", world.digest)


# -- the model is loaded from the checked files (no Ray) -----------------------------------


@pytest.mark.slow  # over 6 s: kept out of the fast tier, runs in the full suite
def test_the_model_is_loaded_from_the_checked_directory(tmp_path):
    world = build_world(tmp_path)
    sample = [s["features"] for s in world.sent[:12]]
    journaled = [s["score"] for s in world.sent[:12]]
    rescorer = MlflowRescorer(world.tracking_uri, feature_names=FEATURES)
    check = rescorer.check(MODEL_NAME, world.version, world.run_id, world.digest)
    assert check.ok and check.reason is None
    # Swapped in the store right after the check returned: the scores are still the checked ones.
    overwrite_weights(world)
    pinned = rescorer.score(MODEL_NAME, world.version, sample, run_id=world.run_id,
                            digest=world.digest)
    assert pinned == pytest.approx(journaled, abs=1e-12)
    # The swap is real: a rescorer loading by version now scores with the other weights.
    by_version = MlflowRescorer(world.tracking_uri, feature_names=FEATURES)
    swapped = by_version.score(MODEL_NAME, world.version, sample)
    assert max(abs(a - b) for a, b in zip(swapped, journaled, strict=True)) > 1e-3
    # And the next check sees it; score then refuses instead of using what it loaded before.
    again = rescorer.check(MODEL_NAME, world.version, world.run_id, world.digest)
    assert not again.ok and again.differs == "digest" and world.digest in again.reason
    with pytest.raises(Exception, match="refusing to re-score"):
        rescorer.score(MODEL_NAME, world.version, sample, run_id=world.run_id,
                       digest=world.digest)


def test_a_rescorer_without_check_still_works_and_pinned_entries_say_not_checked(
        ray_cluster, tmp_path):
    world = build_world(tmp_path)
    inner = MlflowRescorer(world.tracking_uri, feature_names=FEATURES, positive="block",
                           negative="allow")

    class ThreeMethods:
        """A rescorer written for the protocol before artifact checks."""

        def available(self, name, version):
            return inner.available(name, version)

        def score(self, name, version, features):
            return inner.score(name, version, features)

        def decide(self, score, threshold):
            return inner.decide(score, threshold)

    report = replay(str(world.journal), model=MODEL_NAME,
                    feature_store=ParquetFeatureStore(world.features),
                    verifier=VaultVerifier.from_journal(str(world.journal)), subjects=USERS,
                    rescore=True, rescorer=ThreeMethods(), progress=False)
    assert report.counts == {"verified": len(world.sent)}
    assert report.artifacts == {"not_checked": len(world.pinned()),
                                "not_pinned": len(world.unpinned())}
    assert "artifact not checked" in report.format_summary()
