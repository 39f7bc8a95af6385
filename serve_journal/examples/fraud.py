"""The fraud example: a small real model, registered in MLflow, served and journaled.

``train_and_register`` makes a synthetic transactions dataset, trains a logistic regression,
registers it as ``fraud`` with the alias ``champion`` and tags it with the dataset manifest hash.
``FraudModel`` is the Serve deployment (it loads the model with ``serve_journal.load_model``, so
entries name the exact version that scored them); ``build_app`` journals it. The request shape is the
common one the journal understands with no extra code::

    {"subject_id": "user-0042", "features": {"amount": 120.5, "hour": 23, ...}}
    -> {"score": 0.81, "decision": "block"}
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import numpy as np
from ray import serve

from serve_journal import journaled, load_model
from serve_journal.registry import register_dataset_manifest

MODEL_NAME = "fraud"
ALIAS = "champion"
THRESHOLD = 0.75
FEATURES = ("amount", "hour", "merchant_risk", "distance_km", "card_age_days", "foreign")


def synthetic_transactions(n: int, seed: int = 7) -> tuple[np.ndarray, np.ndarray]:
    """Feature matrix and fraud labels with a learnable signal."""
    rng = np.random.default_rng(seed)
    amount = rng.lognormal(3.5, 1.2, n)
    hour = rng.integers(0, 24, n)
    merchant_risk = rng.beta(2, 5, n)
    distance = rng.exponential(20.0, n)
    card_age = rng.integers(1, 3000, n)
    foreign = rng.integers(0, 2, n)
    logit = (-6.0 + 0.9 * np.log1p(amount) + 3.0 * merchant_risk + 0.02 * distance
             - 0.0006 * card_age + 1.2 * foreign + 0.8 * ((hour < 6) | (hour > 22)))
    y = rng.random(n) < 1 / (1 + np.exp(-logit))
    x = np.column_stack([amount, hour, merchant_risk, distance, card_age, foreign]).astype(float)
    return x, y.astype(int)


def random_features(rng: np.random.Generator) -> dict[str, Any]:
    """One request's feature dict."""
    return {
        "amount": round(float(rng.lognormal(3.5, 1.2)), 2),
        "hour": int(rng.integers(0, 24)),
        "merchant_risk": round(float(rng.beta(2, 5)), 4),
        "distance_km": round(float(rng.exponential(20.0)), 3),
        "card_age_days": int(rng.integers(1, 3000)),
        "foreign": int(rng.integers(0, 2)),
    }


def train_and_register(workdir: str | os.PathLike[str], tracking_uri: str, *, rows: int = 5000,
                       seed: int = 7, model_name: str = MODEL_NAME) -> str:
    """Train, log and register the model; returns the registered version."""
    import mlflow  # inside: MLflow, pandas and scikit-learn take seconds to import
    import pandas as pd  # inside: as above
    from mlflow.tracking import MlflowClient  # inside: as above
    from sklearn.linear_model import LogisticRegression  # inside: as above

    data_dir = Path(workdir) / "data" / f"transactions-{seed}"
    data_dir.mkdir(parents=True, exist_ok=True)
    x, y = synthetic_transactions(rows, seed)
    frame = pd.DataFrame(x, columns=list(FEATURES))
    frame["label"] = y
    frame.to_csv(data_dir / "train.csv", index=False)

    mlflow.set_tracking_uri(tracking_uri)
    mlflow.set_registry_uri(tracking_uri)
    mlflow.set_experiment("fraud")
    with mlflow.start_run() as run:
        model = LogisticRegression(max_iter=1000).fit(x, y)
        mlflow.log_metric("train_accuracy", float(model.score(x, y)))
        mlflow.sklearn.log_model(model, name="model")
    client = MlflowClient(tracking_uri=tracking_uri, registry_uri=tracking_uri)
    mv = mlflow.register_model(f"runs:/{run.info.run_id}/model", model_name)
    client.set_registered_model_alias(model_name, ALIAS, mv.version)
    register_dataset_manifest(model_name, mv.version, data_dir, tracking_uri=tracking_uri)
    return str(mv.version)


def score_features(model: Any, features: dict[str, Any]) -> float:
    row = np.array([[float(features[name]) for name in FEATURES]])
    return float(model.predict_proba(row)[0, 1])


class FraudModel:
    """Scores a transaction with the model the ``champion`` alias names.

    It loads the model through :func:`serve_journal.load_model`, so every entry names the exact
    version, run and artifact digest that scored it, and a moved alias never relabels entries
    behind its back. To follow the alias, give the deployment a new ``user_config`` (for example
    ``{"reload": 2}``): ``reconfigure`` loads the alias again, and entries switch with the model.
    Outside a journaled deployment ``load_model`` just loads the model.
    """

    def __init__(self, tracking_uri: str | None = None, threshold: float = THRESHOLD,
                 model_name: str = MODEL_NAME) -> None:
        self.tracking_uri = tracking_uri or os.environ.get("MLFLOW_TRACKING_URI")
        self.model_uri = f"models:/{model_name}@{ALIAS}"
        self.model = load_model(self.model_uri, flavor="sklearn", tracking_uri=self.tracking_uri)
        self.threshold = threshold

    def reconfigure(self, user_config: dict[str, Any]) -> None:
        """A new ``user_config``: load the alias again (the journal follows the new model)."""
        self.model = load_model(self.model_uri, flavor="sklearn", tracking_uri=self.tracking_uri)

    async def __call__(self, request) -> dict[str, Any]:
        body = await request.json()
        score = score_features(self.model, body["features"])
        return {"score": round(score, 6), "decision": "block" if score >= self.threshold else "allow"}


def build_app(tracking_uri: str | None = None, journal_uri: str | None = None, *,
              num_replicas: int = 1, model_name: str = MODEL_NAME,
              user_config: dict[str, Any] | None = None, **journal_options: Any):
    """The journaled fraud application, ready for ``serve.run``; a new ``user_config`` on a
    running app makes its replicas load the alias again (:meth:`FraudModel.reconfigure`)."""
    tracking_uri = tracking_uri or os.environ.get("MLFLOW_TRACKING_URI")
    options = dict(journal_options)
    if journal_uri:
        options["journal_uri"] = journal_uri
    deployment = journaled(model=f"models:/{model_name}@{ALIAS}", threshold=THRESHOLD,
                           tracking_uri=tracking_uri, **options)(
        serve.deployment(FraudModel, num_replicas=num_replicas, ray_actor_options={"num_cpus": 0.5},
                         user_config=user_config)
    )
    return deployment.bind(tracking_uri=tracking_uri, model_name=model_name)


def app_builder(args: dict[str, Any]):
    """Serve config entry point (``deployments/fraud.yaml``, ``deployments/production.yaml``).

    ``tracking_uri``, ``journal_uri`` and ``num_replicas`` as for :func:`build_app`; ``journal``
    (a mapping, or its JSON) holds any other ``@journaled`` option, e.g. ``transport: kafka`` with
    a ``kafka`` mapping (bootstrap servers, topic, partitions, spool folder), ``privacy_dir`` and
    ``counters_key_file``. Secrets never go in the YAML: the KEK, the vault URL and storage
    credentials come from each node's environment (``SERVE_JOURNAL_KEK``,
    ``SERVE_JOURNAL_VAULT_URL``, ``AWS_*``).
    """
    journal = args.get("journal") or {}
    if isinstance(journal, str):
        journal = json.loads(journal)
    options = dict(journal)
    kafka = options.pop("kafka", None)
    if kafka is not None:
        options.setdefault("transport", "kafka")
        options["extra"] = {**options.get("extra", {}), "kafka": dict(kafka)}
    return build_app(args.get("tracking_uri"), args.get("journal_uri"),
                     num_replicas=int(args.get("num_replicas", 1)), **options)
