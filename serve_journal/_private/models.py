"""Which model decided a call: models loaded through the journal, and the models one call used.

:func:`load_model` downloads an exact model version (an alias is resolved once), digests the files
it downloaded, loads the model from them and returns it wrapped in a :class:`JournaledModel`. It
pins that version for the replica (:meth:`JournalRuntime.pin_model
<serve_journal._private.runtime.JournalRuntime.pin_model>`): entries are attributed to it until the
deployment loads another, and never because the registry alias moved on its own.

The wrapper also notes, per call, which loaded models were actually called (their ``predict``
and the like, :data:`DEFAULT_METHODS`): the first one called decides the call's ``model_*``
columns, and a call that used several (an ensemble, a shadow challenger) lists them all in the
``models`` column. ``annotate(model_name=..., model_version=...)`` names the deciding model
explicitly, for deployments that route between models themselves.

How a call's deciding model is chosen (:func:`call_models`): an annotation, else the first
decision model the call used, else the replica's pinned model (the one loaded through the
journal, else the version the alias resolved to at replica start).
"""

from __future__ import annotations

import atexit
import contextlib
import contextvars
import functools
import importlib
import logging
import os
import shutil
import tempfile
import threading
import weakref
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any, Protocol

from serve_journal.errors import ConfigError
from serve_journal.registry import SOURCE_NONE, ModelInfo, ModelRef, fetch_model

from .annotations import current_annotations


class JournalRuntime(Protocol):
    """What pinning needs of :class:`serve_journal._private.runtime.JournalRuntime` (named
    structurally: the runtime imports this module)."""

    config: Any
    model: ModelInfo
    closed: bool

    def pin_model(self, model: ModelInfo, loaded_from: str | None = None) -> None: ...

logger = logging.getLogger("serve_journal")

ROLE_DECISION = "decision"
ROLE_SHADOW = "shadow"
ROLES = (ROLE_DECISION, ROLE_SHADOW)

DEFAULT_METHODS = frozenset({"predict", "predict_proba", "predict_log_proba", "decision_function",
                             "predict_stream", "__call__"})
"""Methods of a loaded model whose call counts as the model taking part in the current call."""

USED_KEY = "_models_used"
"""Annotation key (private) under which the current call collects ``(ModelInfo, role)`` pairs."""

_LOADING: contextvars.ContextVar[JournalRuntime | None] = contextvars.ContextVar(
    "serve_journal_loading_runtime", default=None)
_RUNTIMES: weakref.WeakSet[JournalRuntime] = weakref.WeakSet()
_KNOWN: dict[tuple[str, str], ModelInfo] = {}
"""Every model version this process loaded through the journal (or resolved at replica start)."""
_LATEST: dict[str, ModelInfo] = {}
_LOCK = threading.Lock()
_DOWNLOADS: list[str] = []


class JournaledModel:
    """A model loaded by :func:`load_model`: use it as the model itself.

    Attribute access goes to the model; calling one of its prediction methods also records, for
    the journaled call in progress, that this exact model version took part. ``journal_model``
    is its identity (name, version, run id, artifact digest); :meth:`unwrap` the model itself.
    """

    __slots__ = ("__weakref__", "_methods", "_model", "_role", "journal_model")

    def __init__(self, model: Any, info: ModelInfo, role: str = ROLE_DECISION,
                 methods: frozenset[str] = DEFAULT_METHODS) -> None:
        object.__setattr__(self, "_model", model)
        object.__setattr__(self, "journal_model", info)
        object.__setattr__(self, "_role", role)
        object.__setattr__(self, "_methods", methods)

    def __repr__(self) -> str:
        info = self.journal_model
        return f"JournaledModel({info.uri}, role={self._role!r}, model={type(self._model).__name__})"

    @property
    def journal_role(self) -> str:
        """``decision`` or ``shadow``."""
        return self._role

    def unwrap(self) -> Any:
        """The loaded model itself (its calls are not noted)."""
        return self._model

    def note_use(self) -> None:
        """Record that this model took part in the current journaled call (no-op outside one)."""
        note_use(self.journal_model, self._role)

    def __getattr__(self, name: str) -> Any:
        if name in JournaledModel.__slots__:  # not set yet (e.g. while unpickling)
            raise AttributeError(name)
        value = getattr(self._model, name)
        if name in self._methods and callable(value):
            return _noting(value, self.journal_model, self._role)
        return value

    def __setattr__(self, name: str, value: Any) -> None:
        setattr(self._model, name, value)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        if "__call__" in self._methods:
            note_use(self.journal_model, self._role)
        return self._model(*args, **kwargs)


def _noting(method: Callable[..., Any], info: ModelInfo, role: str) -> Callable[..., Any]:
    @functools.wraps(method)
    def call(*args: Any, **kwargs: Any) -> Any:
        note_use(info, role)
        return method(*args, **kwargs)

    return call


def note_use(info: ModelInfo, role: str = ROLE_DECISION) -> None:
    """Record that ``info`` took part in the current journaled call, in ``role``."""
    annotations = current_annotations()
    if annotations is None:
        return
    used = annotations.get(USED_KEY)
    if used is None:
        annotations[USED_KEY] = [(info, role)]
    elif (info, role) not in used:
        used.append((info, role))


def known_model(name: str, version: str | None = None) -> ModelInfo | None:
    """The identity of a model version this process loaded (the latest of ``name`` when no
    version is given), or ``None``."""
    with _LOCK:
        if version is None:
            return _LATEST.get(name)
        return _KNOWN.get((name, str(version)))


def remember(info: ModelInfo) -> None:
    """Make ``info`` known to :func:`known_model` (annotations then get its full identity)."""
    with _LOCK:
        _KNOWN[(info.name, info.version)] = info
        _LATEST[info.name] = info


def register_runtime(runtime: JournalRuntime) -> None:
    """A runtime started in this process (the one :func:`load_model` pins outside a scope).

    Its start-time model (resolved, not loaded: an ``MLmodel`` digest) becomes known only if
    that version is not known yet: it never replaces the identity of a version this process
    loaded (its full artifact digest)."""
    _RUNTIMES.add(runtime)
    info = runtime.model
    with _LOCK:
        _KNOWN.setdefault((info.name, info.version), info)
        _LATEST.setdefault(info.name, info)


def unregister_runtime(runtime: JournalRuntime) -> None:
    """A runtime closed."""
    _RUNTIMES.discard(runtime)


@contextlib.contextmanager
def loading_for(runtime: JournalRuntime) -> Iterator[None]:
    """Within this scope (the deployment's ``__init__`` and ``reconfigure``), :func:`load_model`
    pins to ``runtime``."""
    token = _LOADING.set(runtime)
    try:
        yield
    finally:
        _LOADING.reset(token)


def _runtime_to_pin() -> JournalRuntime | None:
    runtime = _LOADING.get()
    if runtime is not None:
        return runtime
    live = [r for r in list(_RUNTIMES) if not r.closed]
    if len(live) == 1:
        return live[0]
    if live:
        logger.warning("serve_journal: load_model outside a deployment's __init__ or reconfigure, "
                       "with %d journaled deployments in this process: the replica pin is left "
                       "as it was (calls that use the model still record it)", len(live))
    return None


def _download_dir() -> str:
    root = tempfile.mkdtemp(prefix="serve-journal-model-")
    with _LOCK:
        if not _DOWNLOADS:
            atexit.register(_remove_downloads)
        _DOWNLOADS.append(root)
    return root


def _remove_downloads() -> None:
    for path in _DOWNLOADS:
        shutil.rmtree(path, ignore_errors=True)


def _loader(flavor: str | Callable[[str], Any]) -> Callable[[str], Any]:
    if callable(flavor):
        return flavor
    try:
        module = importlib.import_module(f"mlflow.{flavor}")
    except ImportError as exc:
        raise ConfigError(f"load_model(flavor={flavor!r}): mlflow has no flavor module "
                          f"mlflow.{flavor} (e.g. 'pyfunc', 'sklearn', 'xgboost')") from exc
    return module.load_model


def load_model(uri: str, *, flavor: str | Callable[[str], Any] = "pyfunc", role: str = ROLE_DECISION,
               tracking_uri: str | None = None, version: str | None = None,
               methods: Sequence[str] | None = None, pin: bool | None = None) -> JournaledModel:
    """Load a registered MLflow model so the journal records exactly the version that serves.

    ``uri`` is ``models:/<name>@<alias>``, ``models:/<name>/<version>`` or a registered name. The
    alias is resolved once; that exact version is downloaded, its files digested
    (``model_digest``) and the model loaded from them with ``mlflow.<flavor>.load_model`` (or
    ``flavor(path)`` when it is a callable). Call it in the deployment's ``__init__`` and, to
    follow an alias, again in ``reconfigure``::

        @journaled(model="models:/fraud@champion")
        @serve.deployment
        class Fraud:
            def __init__(self):
                self.model = serve_journal.load_model("models:/fraud@champion", flavor="sklearn")

    A ``decision`` model (the default) is pinned for the replica: calls are attributed to it
    until the deployment loads another (``pin=False`` opts out). ``role="shadow"`` loads a model
    whose calls are listed in the ``models`` column without ever deciding. The returned
    :class:`JournaledModel` behaves as the model; calling its ``methods`` (default
    :data:`DEFAULT_METHODS`) records that it took part in the current call. ``tracking_uri``
    defaults to the journal's, then ``MLFLOW_TRACKING_URI``.
    """
    if role not in ROLES:
        raise ConfigError(f"load_model(role={role!r}): role must be one of {list(ROLES)}")
    loader = _loader(flavor)
    runtime = _runtime_to_pin() if pin is not False else None
    if tracking_uri is None and runtime is not None:
        tracking_uri = runtime.config.tracking_uri
    tracking_uri = tracking_uri or os.environ.get("MLFLOW_TRACKING_URI")
    info, local = fetch_model(uri, _download_dir(), version=version, tracking_uri=tracking_uri)
    model = loader(local)
    remember(info)
    chosen = frozenset(methods) if methods is not None else DEFAULT_METHODS
    if runtime is not None and role == ROLE_DECISION:
        # The reference as loaded, a ``version=`` given apart included: a fixed version is
        # never watched for moving (a bare name would be checked against the latest version).
        runtime.pin_model(info, str(ModelRef.parse(uri, version)))
    elif pin and runtime is None:
        logger.warning("serve_journal: load_model(pin=True) found no journaled deployment to pin")
    return JournaledModel(model, info, role, chosen)


def annotated_model(annotations: Mapping[str, Any], pinned: ModelInfo) -> ModelInfo | None:
    """The deciding model an ``annotate(model_name=..., model_version=...)`` named, or ``None``."""
    name = annotations.get("model_name")
    version = annotations.get("model_version")
    if name is None and version is None:
        return None
    name = pinned.name if name is None else str(name)
    if version is None:
        found = known_model(name)
        if found is not None:
            return found
        return pinned if name == pinned.name else ModelInfo(name, "unknown", None, SOURCE_NONE)
    found = known_model(name, str(version))
    if found is not None:
        return found
    if name == pinned.name and str(version) == pinned.version:
        return pinned
    return ModelInfo(name, str(version), None, SOURCE_NONE)


def call_models(annotations: Mapping[str, Any] | None, pinned: ModelInfo
                ) -> tuple[ModelInfo, list[tuple[ModelInfo, str]] | None]:
    """(deciding model, every model the call used with its role, or ``None`` when only one)."""
    if not annotations:
        return pinned, None
    used: list[tuple[ModelInfo, str]] = list(annotations.get(USED_KEY) or ())
    for item in annotations.get("models") or ():
        pair = _as_use(item)
        if pair not in used:
            used.append(pair)
    decider = annotated_model(annotations, pinned)
    if decider is None:
        decider = next((info for info, role in used if role == ROLE_DECISION), pinned)
    if not used or used == [(decider, ROLE_DECISION)]:
        return decider, None
    if all(info != decider for info, _ in used):
        used.insert(0, (decider, ROLE_DECISION))
    return decider, used


def _as_use(item: Any) -> tuple[ModelInfo, str]:
    """One element of ``annotate(models=[...])``: a :class:`JournaledModel`, or a mapping with
    ``name``, ``version`` and optionally ``role``."""
    if isinstance(item, JournaledModel):
        return item.journal_model, item.journal_role
    name, version = str(item["name"]), str(item["version"])
    role = str(item.get("role", ROLE_DECISION))
    return known_model(name, version) or ModelInfo(name, version, None, SOURCE_NONE), role


def check_models_annotation(models: Any) -> None:
    """``annotate(models=...)`` is a list of loaded models or ``{name, version[, role]}`` mappings."""
    if isinstance(models, str | bytes) or not isinstance(models, Sequence):
        raise TypeError("annotate(models=...) must be a list of models loaded with load_model or "
                        "of mappings {'name': ..., 'version': ..., 'role': 'decision'|'shadow'}")
    for item in models:
        if isinstance(item, JournaledModel):
            continue
        if not isinstance(item, Mapping) or "name" not in item or "version" not in item:
            raise TypeError("each element of annotate(models=...) must be a loaded model or a "
                            "mapping with 'name' and 'version'")
        if item.get("role", ROLE_DECISION) not in ROLES:
            raise TypeError(f"annotate(models=...): role must be one of {list(ROLES)}")
