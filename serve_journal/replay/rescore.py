"""Re-scoring: run the exact model version an entry names on its replayed features.

A :class:`Rescorer` loads ``models:/<name>/<version>`` (the journaled version, never an alias),
scores feature mappings with it and applies the served application's decision rule.
:class:`MlflowRescorer` is the implementation for MLflow registries: it needs the model's input
feature order, given explicitly (``feature_names``; ``--feature-names`` on the command line) or
read from the model version's MLflow signature. :func:`threshold_decision` is the usual
"positive at or above the threshold" rule.

Entries of schema version 2 also name the artifact (run id and digest). A rescorer that can
check it implements :class:`ArtifactRescorer` (``check``, and ``score`` taking ``run_id`` and
``digest``); replay detects it with :func:`checks_artifacts`, so a rescorer written for the
three-method protocol keeps working (its pinned entries are re-scored by version and counted
``not_checked``). :class:`MlflowRescorer` checks through
:func:`serve_journal.registry.check_artifact` and loads the model from the very files it checked.
"""

from __future__ import annotations

import contextlib
import math
import tempfile
import threading
from collections.abc import Iterator, Sequence
from dataclasses import replace
from typing import Any, Protocol, runtime_checkable

import numpy as np

from serve_journal.errors import ConfigError, ReplayDataError
from serve_journal.registry import MLMODEL_DIGEST_PREFIX, ArtifactCheck, check_artifact

__all__ = ["ArtifactRescorer", "MlflowRescorer", "Rescorer", "checks_artifacts",
           "threshold_decision"]


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


@runtime_checkable
class ArtifactRescorer(Rescorer, Protocol):
    """A :class:`Rescorer` that checks the journaled artifact before scoring with it."""

    def check(self, model_name: str, model_version: str, run_id: str | None,
              digest: str | None) -> ArtifactCheck:
        """Whether ``models:/<name>/<version>`` still is the artifact of run ``run_id`` with
        ``digest`` (either may be ``None``: not compared). ``reason`` names what differs (run id
        or digest, never a feature value), ``differs`` says which. Raises
        :class:`~serve_journal.errors.ModelNotFoundError` when the version is gone."""

    def score(self, model_name: str, model_version: str, features: Sequence[dict], *,
              run_id: str | None = None, digest: str | None = None) -> list[float]:
        """One score per feature mapping, from the artifact ``check`` accepted for this
        identity (by version when ``run_id`` and ``digest`` are both ``None``)."""


def checks_artifacts(rescorer: Rescorer) -> bool:
    """True when ``rescorer`` has ``check`` (:class:`ArtifactRescorer`): replay then checks every
    pinned entry's artifact and passes ``run_id`` and ``digest`` to its ``score``."""
    return callable(getattr(rescorer, "check", None))


_Identity = tuple[str | None, str, str, str | None, str | None]
"""(tracking URI, name, version, run id, digest): one artifact; both ``None``: by version."""

_MODEL_CACHE: dict[_Identity, Any] = {}
_INPUTS_CACHE: dict[_Identity, tuple[str, ...] | None] = {}
_CHECKS: dict[_Identity, ArtifactCheck] = {}
_CHECKED_DIRS: dict[_Identity, tempfile.TemporaryDirectory] = {}
"""The checked artifact directories of loaded models, kept for the process's life: a flavor
that reads files after ``load_model`` reads the checked copy, never the store again."""
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

    def check(self, model_name: str, model_version: str, run_id: str | None,
              digest: str | None) -> ArtifactCheck:
        """Download the version and compare it with the journaled identity
        (:func:`~serve_journal.registry.check_artifact`); every call asks the registry again
        (replay calls it once per run and worker). When it matches a ``sha256:`` digest (or a
        run id alone), the model is loaded here from the files just checked, so a swap in the
        store after the check cannot reach the scores (a model already loaded for the same
        ``sha256:`` digest is the same bytes and is kept); an ``mlmodel-sha256:`` digest checks
        the ``MLmodel`` file only, and :meth:`score` loads the weights by version. The returned
        check's ``path`` is ``None``: the directory belongs to this rescorer."""
        key = self._identity(model_name, model_version, run_id, digest)
        content_addressed = bool(digest) and not str(digest).startswith(MLMODEL_DIGEST_PREFIX)
        with _MODEL_LOCK:
            folder = tempfile.TemporaryDirectory(prefix="serve-journal-artifact-")
            try:
                result = check_artifact(model_name, str(model_version), run_id, digest,
                                        folder.name, self.tracking_uri)
                keep = content_addressed and key in _MODEL_CACHE
                if result.ok and result.path is not None and not keep:
                    _MODEL_CACHE[key] = _load_local(result.path)
                    _INPUTS_CACHE[key] = _signature_inputs(result.path)
                    _CHECKED_DIRS[key] = folder
                else:
                    folder.cleanup()
                    if not result.ok:  # never score this identity from an earlier check
                        _MODEL_CACHE.pop(key, None)
                        _CHECKED_DIRS.pop(key, None)
            except BaseException:
                folder.cleanup()
                raise
            result = _CHECKS[key] = replace(result, path=None)
            return result

    @staticmethod
    def _pinned(run_id: str | None, digest: str | None) -> bool:
        return bool(run_id or digest)

    def _identity(self, model_name: str, model_version: str, run_id: str | None,
                  digest: str | None) -> _Identity:
        return (self.tracking_uri, model_name, str(model_version), run_id or None, digest or None)

    def feature_order(self, model_name: str, model_version: str, *, run_id: str | None = None,
                      digest: str | None = None) -> tuple[str, ...]:
        """The input feature order of ``models:/<name>/<version>``: ``feature_names``, else its
        MLflow signature's input names (of the checked files when ``run_id``/``digest`` pin a
        checked artifact); ``ValueError`` naming the option when neither exists."""
        if self.feature_names is not None:
            return self.feature_names
        key = self._identity(model_name, model_version, run_id, digest)
        with _MODEL_LOCK:
            if key not in _INPUTS_CACHE:
                key = self._identity(model_name, model_version, None, None)
            if key not in _INPUTS_CACHE:
                with _registry(self.tracking_uri) as mlflow:
                    info = mlflow.models.get_model_info(f"models:/{model_name}/{model_version}")
                _INPUTS_CACHE[key] = _input_names(info.signature)
            names = _INPUTS_CACHE[key]
        if names is None:
            raise ConfigError(
                f"the feature order of models:/{model_name}/{model_version} is unknown: the model "
                "was logged without a signature naming its inputs. Pass the model's input "
                "features in order: MlflowRescorer(feature_names=[...]) or "
                "replay(feature_names=[...]), or --feature-names a,b,c on `serve-journal replay`")
        return names

    def _model(self, model_name: str, model_version: str) -> Any:
        """The model loaded by version (``models:/<name>/<version>``), cached per process."""
        key = self._identity(model_name, model_version, None, None)
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

    def score(self, model_name: str, model_version: str, features: Sequence[dict], *,
              run_id: str | None = None, digest: str | None = None) -> list[float]:
        """One score per feature mapping, from the exact version ``model_version``; with
        ``run_id`` or ``digest``, from the artifact :meth:`check` accepted for them (checked
        first if it was not yet: a mismatch raises :class:`ReplayDataError` naming what
        differs, a version that is gone :class:`~serve_journal.errors.ModelNotFoundError`)."""
        model = None
        if self._pinned(run_id, digest):
            with _MODEL_LOCK:
                checked = _CHECKS.get(self._identity(model_name, model_version, run_id, digest))
            if checked is None:
                checked = self.check(model_name, model_version, run_id, digest)
            if not checked.ok:
                raise ReplayDataError(f"refusing to re-score with models:/{model_name}/"
                                      f"{model_version}: {checked.reason}")
            model = _MODEL_CACHE.get(self._identity(model_name, model_version, run_id, digest))
        names = self.feature_order(model_name, model_version, run_id=run_id, digest=digest)
        if model is None:  # not pinned, or an MLmodel-only digest: the weights load by version
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


def _load_local(path: str) -> Any:
    """The model in a downloaded artifact directory: the sklearn flavor, else pyfunc."""
    import mlflow  # inside: MLflow takes over a second to import (see _registry)

    try:
        return mlflow.sklearn.load_model(path)
    except Exception:  # noqa: BLE001 - not a sklearn flavour: use the generic one
        return mlflow.pyfunc.load_model(path)


def _input_names(signature: Any) -> tuple[str, ...] | None:
    """The input column names of an MLflow signature, or ``None`` when it names none."""
    schema = signature.inputs if signature is not None else None
    if schema is not None and schema.has_input_names():
        found = schema.input_names()
        if found and all(isinstance(n, str) for n in found):
            return tuple(found)
    return None


def _signature_inputs(path: str) -> tuple[str, ...] | None:
    """The input names of the signature in a downloaded artifact's own ``MLmodel`` file."""
    from mlflow.models import Model  # inside: MLflow takes over a second to import

    return _input_names(Model.load(path).signature)


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
