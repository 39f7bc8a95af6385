"""Re-scoring: run the exact model version an entry names on its replayed features.

A :class:`Rescorer` loads ``models:/<name>/<version>`` (the journaled version, never an alias),
scores feature mappings with it and applies the served application's decision rule.
:class:`MlflowRescorer` is the implementation for MLflow registries: it needs the model's input
feature order, given explicitly (``feature_names``; ``--feature-names`` on the command line) or
read from the model version's MLflow signature. :func:`threshold_decision` is the usual
"positive at or above the threshold" rule.
"""

from __future__ import annotations

import contextlib
import math
import threading
from collections.abc import Iterator, Sequence
from typing import Any, Protocol, runtime_checkable

import numpy as np

from serve_journal.errors import ConfigError, ReplayDataError

__all__ = ["MlflowRescorer", "Rescorer", "threshold_decision"]


POSITIVE = "positive"
NEGATIVE = "negative"
"""The decision labels the journal itself records when a deployment returns a score and no
decision (``_private/entries.py``); a deployment with its own labels (``block``/``allow``) names
them to replay with ``decision_labels=``."""


def threshold_decision(score: float | None, threshold: float | None,
                       positive: str = POSITIVE, negative: str = NEGATIVE) -> str | None:
    """``positive`` when ``score >= threshold``, else ``negative``; ``None`` without a score,
    a threshold, or with a NaN score."""
    if score is None or threshold is None or math.isnan(score):
        return None
    return positive if score >= threshold else negative


@runtime_checkable
class Rescorer(Protocol):
    """Loads an exact model version and scores feature mappings with it."""

    def available(self, model_name: str, model_version: str) -> bool:
        """False when the version no longer exists in the registry."""

    def score(self, model_name: str, model_version: str, features: Sequence[dict]) -> list[float]:
        """One score per feature mapping."""

    def decide(self, score: float | None, threshold: float | None) -> str | None:
        """The decision the served application takes for ``score`` at ``threshold``."""


_MODEL_CACHE: dict[tuple[str | None, str, str], Any] = {}
_INPUTS_CACHE: dict[tuple[str | None, str, str], tuple[str, ...] | None] = {}
_MODEL_LOCK = threading.Lock()


def _feature_names(names: Sequence[str] | None) -> tuple[str, ...] | None:
    if names is None:
        return None
    if isinstance(names, str):
        raise TypeError("feature_names must be a sequence of feature names in the model's input "
                        f"order, not one string ({names!r}); split it, e.g. names.split(',')")
    out = tuple(names)
    if not out or not all(isinstance(n, str) and n for n in out):
        raise ValueError("feature_names must be a non-empty sequence of non-empty strings")
    if len(set(out)) != len(out):
        raise ValueError(f"feature_names names a feature twice: {list(out)}")
    return out


@contextlib.contextmanager
def _registry(tracking_uri: str | None) -> Iterator[Any]:
    """``mlflow`` with its global URIs pointing at ``tracking_uri``, restored afterwards."""
    import mlflow  # inside: MLflow takes over a second to import; replay without rescore never needs it

    # models:/ URIs resolve through the global registry URI: set it for the load only, so the
    # caller's MLflow settings are left as they were.
    before = (mlflow.get_tracking_uri(), mlflow.get_registry_uri())
    if tracking_uri:
        mlflow.set_tracking_uri(tracking_uri)
        mlflow.set_registry_uri(tracking_uri)
    try:
        yield mlflow
    finally:
        mlflow.set_tracking_uri(before[0])
        mlflow.set_registry_uri(before[1])


class MlflowRescorer:
    """Scores with ``models:/<name>/<version>`` from an MLflow registry (never an alias).

    ``feature_names`` is the model's input order: each feature mapping becomes the row
    ``[float(features[name]) for name in feature_names]``. Without it, the input column names of
    the model version's MLflow signature are used; a version with neither cannot be re-scored
    (``ValueError`` naming the option). Scores are ``predict_proba[:, 1]`` for classifiers, else
    the last column of ``predict``; decisions are :func:`threshold_decision` with the labels
    ``positive`` and ``negative``. Loaded models are cached per worker process.
    """

    def __init__(self, tracking_uri: str | None, *, feature_names: Sequence[str] | None = None,
                 positive: str = POSITIVE, negative: str = NEGATIVE) -> None:
        self.tracking_uri = tracking_uri
        self.feature_names = _feature_names(feature_names)
        self.positive = positive
        self.negative = negative

    def __repr__(self) -> str:
        features = "signature" if self.feature_names is None else len(self.feature_names)
        return f"MlflowRescorer({self.tracking_uri!r}, features={features})"

    def _client(self) -> Any:
        from mlflow.tracking import MlflowClient  # inside: MLflow is slow to import (see _registry)

        return MlflowClient(tracking_uri=self.tracking_uri, registry_uri=self.tracking_uri)

    def available(self, model_name: str, model_version: str) -> bool:
        """False when ``models:/<name>/<version>`` no longer exists in the registry."""
        from mlflow.exceptions import MlflowException  # inside: MLflow is slow to import

        try:
            self._client().get_model_version(model_name, str(model_version))
        except MlflowException as exc:
            if getattr(exc, "error_code", None) == "RESOURCE_DOES_NOT_EXIST":
                return False
            raise
        return True

    def feature_order(self, model_name: str, model_version: str) -> tuple[str, ...]:
        """The input feature order of ``models:/<name>/<version>``: ``feature_names``, else its
        MLflow signature's input names; ``ValueError`` naming the option when neither exists."""
        if self.feature_names is not None:
            return self.feature_names
        key = (self.tracking_uri, model_name, str(model_version))
        with _MODEL_LOCK:
            if key not in _INPUTS_CACHE:
                with _registry(self.tracking_uri) as mlflow:
                    info = mlflow.models.get_model_info(f"models:/{model_name}/{model_version}")
                schema = info.signature.inputs if info.signature is not None else None
                names = None
                if schema is not None and schema.has_input_names():
                    found = schema.input_names()
                    if found and all(isinstance(n, str) for n in found):
                        names = tuple(found)
                _INPUTS_CACHE[key] = names
            names = _INPUTS_CACHE[key]
        if names is None:
            raise ConfigError(
                f"the feature order of models:/{model_name}/{model_version} is unknown: the model "
                "was logged without a signature naming its inputs. Pass the model's input "
                "features in order: MlflowRescorer(feature_names=[...]) or "
                "replay(feature_names=[...]), or --feature-names a,b,c on `serve-journal replay`")
        return names

    def _model(self, model_name: str, model_version: str) -> Any:
        key = (self.tracking_uri, model_name, str(model_version))
        with _MODEL_LOCK:
            model = _MODEL_CACHE.get(key)
            if model is None:
                uri = f"models:/{model_name}/{model_version}"
                with _registry(self.tracking_uri) as mlflow:
                    try:
                        model = mlflow.sklearn.load_model(uri)
                    except Exception:  # noqa: BLE001 - not a sklearn flavour: use the generic one
                        model = mlflow.pyfunc.load_model(uri)
                _MODEL_CACHE[key] = model
            return model

    def score(self, model_name: str, model_version: str, features: Sequence[dict]) -> list[float]:
        """One score per feature mapping, from the exact version ``model_version``."""
        names = self.feature_order(model_name, model_version)
        model = self._model(model_name, model_version)
        try:
            matrix = np.array([[float(f[name]) for name in names] for f in features], dtype=float)
        except KeyError as exc:
            raise ConfigError(f"replayed features lack {exc.args[0]!r}, which the feature order "
                              f"of models:/{model_name}/{model_version} names ({list(names)}); "
                              "pass feature_names (--feature-names) matching the model's "
                              "inputs") from None
        except (TypeError, ValueError):
            matrix = None  # float()'s message quotes the value: raised below, without it
        if matrix is None:
            raise _not_a_number(features, names)
        if hasattr(model, "predict_proba"):
            return [float(v) for v in model.predict_proba(matrix)[:, 1]]
        return [float(v) for v in np.asarray(model.predict(matrix)).reshape(len(features), -1)[:, -1]]

    def decide(self, score: float | None, threshold: float | None) -> str | None:
        """:func:`threshold_decision` with this rescorer's labels."""
        return threshold_decision(score, threshold, self.positive, self.negative)


def _not_a_number(features: Sequence[dict], names: Sequence[str]) -> ReplayDataError:
    """Which feature (position and name) is not a number, and its type; never its value."""
    for row, mapping in enumerate(features):
        for name in names:
            try:
                float(mapping[name])
            except (TypeError, ValueError):
                return ReplayDataError(
                    f"feature {name!r} of replayed row {row} is a {type(mapping[name]).__name__} "
                    "that is not a number; the model takes numbers")
    return ReplayDataError("a replayed feature is not a number; the model takes numbers")
