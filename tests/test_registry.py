"""Model metadata against a real sqlite MLflow registry, and the manifest CLI."""

from __future__ import annotations

import mlflow
import pandas as pd
import pytest
from click.testing import CliRunner
from mlflow.tracking import MlflowClient

from serve_journal.cli import main
from serve_journal.registry import (
    DATASET_HASH_TAG,
    ModelNotFoundError,
    dataset_manifest,
    resolve_model,
)


def test_alias_version_and_tagged_dataset_hash(mlflow_registry):
    tracking_uri, version = mlflow_registry
    by_alias = resolve_model("models:/fraud@champion", tracking_uri=tracking_uri)
    by_version = resolve_model("models:/fraud/" + version, tracking_uri=tracking_uri)
    latest = resolve_model("fraud", tracking_uri=tracking_uri)
    assert by_alias == by_version == latest
    assert by_alias.version == version
    assert by_alias.dataset_hash_source == "tag" and by_alias.dataset_hash.startswith("sha256:")
    tag = MlflowClient(tracking_uri, registry_uri=tracking_uri).get_model_version("fraud", version).tags[DATASET_HASH_TAG]
    assert tag == by_alias.dataset_hash


def test_unknown_model_raises_a_clear_error(mlflow_registry):
    tracking_uri, _ = mlflow_registry
    with pytest.raises(ModelNotFoundError, match="models:/ghost@champion was not found"):
        resolve_model("models:/ghost@champion", tracking_uri=tracking_uri)


@pytest.mark.slow  # over 6 s: kept out of the fast tier, runs in the full suite
def test_falls_back_to_mlflow_dataset_input_digests(tmp_path):
    from sklearn.linear_model import LogisticRegression

    tracking_uri = f"sqlite:///{tmp_path / 'm.db'}"
    mlflow.set_tracking_uri(tracking_uri)
    mlflow.set_registry_uri(tracking_uri)
    mlflow.set_experiment("fallback")
    frame = pd.DataFrame({"x": [0.0, 1.0, 2.0, 3.0], "y": [0, 0, 1, 1]})
    with mlflow.start_run() as run:
        mlflow.log_input(mlflow.data.from_pandas(frame, name="train"), context="training")
        model = LogisticRegression().fit(frame[["x"]], frame["y"])
        mlflow.sklearn.log_model(model, name="model")
    mv = mlflow.register_model(f"runs:/{run.info.run_id}/model", "untagged")
    info = resolve_model("untagged", mv.version, tracking_uri=tracking_uri)
    assert info.dataset_hash_source == "mlflow_inputs"
    assert info.dataset_hash.startswith("sha256:")


def test_manifest_cli_prints_the_same_digest_as_the_function(tmp_path):
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "part-0.csv").write_text("a,b\n1,2\n")
    result = CliRunner().invoke(main, ["manifest", str(tmp_path / "d")])
    assert result.exit_code == 0, result.output
    assert dataset_manifest(tmp_path / "d").digest in result.output
    result = CliRunner().invoke(main, ["manifest", str(tmp_path / "d"), "--model", "x"])
    assert result.exit_code != 0 and "both --model and --version" in result.output
