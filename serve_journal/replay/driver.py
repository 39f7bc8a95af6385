"""Reproduce journaled decisions: point-in-time features, HMAC check by key id, re-scoring.

The journal holds no raw features. :func:`replay` reads the selected journal partitions with Ray
Data, fetches each entry's features from a :class:`~serve_journal.replay.featurestore.FeatureStore` *as
of the entry's timestamp*, recomputes the canonical encoding and the HMAC with the entry's key and
classifies the entry (:data:`STATUSES`). With ``rescore=True`` it also loads the exact model
version the entry names (``models:/<name>/<version>``, never the alias) from MLflow and compares
score and decision.

Linking entries to entities: the journal has only ``subject_token``. Replay takes the subject ids
to check (default: every entity id of the feature store), turns them into tokens with the
:class:`Verifier` (the same keys the replicas use) and joins entries on the token. This happens
inside the Ray tasks: raw subject ids and raw features never enter Ray's object store, the output
or a log line; the per-entry results carry tokens, statuses and scores only.

See docs/replay.md for statuses, the CLI and running it as a Ray job on a cluster.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import functools
import hashlib
import hmac
import json
import logging
import math
import os
import struct
import threading
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

import pyarrow as pa
import pyarrow.compute as pc

from serve_journal.integrity.encoding import CanonicalEncodingError, canonical_encode
from serve_journal.replay.featurestore import (
    FeatureStore,
    ParquetFeatureStore,
    default_feature_store_uri,
)

__all__ = [
    "RESULT_SCHEMA",
    "STATUSES",
    "MlflowRescorer",
    "ReplayReport",
    "Rescorer",
    "StaticKeyVerifier",
    "VaultVerifier",
    "Verifier",
    "ensure_ray",
    "replay",
    "replay_command",
    "run_replay_cli",
    "threshold_decision",
]

logger = logging.getLogger("serve_journal.replay.driver")

VERIFIED = "verified"
"""The features as of the entry's time hash to the journaled HMAC (and, with rescore, the model
version gives the journaled score and decision)."""
MISMATCH = "mismatch"
"""Features were found but do not hash to the journaled HMAC: history changed, or they are not
the features the model received."""
MISSING = "missing"
"""No features as of that time: the entity has no row at or before the entry's timestamp, or the
entry's token belongs to no entity replay was given (or the entry names no subject)."""
SHREDDED = "shredded"
"""The subject's key was destroyed (forgotten): the entry can no longer be linked or checked."""
UNKNOWN_KEY = "unknown_key"
"""The entry's ``key_id`` is not a key this verifier holds."""
NO_HMAC = "no_hmac"
"""The entry carries no ``features_hmac`` (its features could not be encoded when journaled)."""
MODEL_MISSING = "model_missing"
"""Rescore: the journaled model version no longer exists in the registry."""
SCORE_MISMATCH = "score_mismatch"
"""Rescore: the journaled version's score differs from the journaled score by more than the tolerance."""
DECISION_MISMATCH = "decision_mismatch"
"""Rescore: same score within tolerance, but the threshold rule gives another decision."""

STATUSES = (VERIFIED, MISMATCH, MISSING, SHREDDED, UNKNOWN_KEY, NO_HMAC, MODEL_MISSING,
            SCORE_MISMATCH, DECISION_MISMATCH)

RESULT_SCHEMA = pa.schema([
    pa.field("request_id", pa.string()),
    pa.field("ts", pa.timestamp("us", tz="UTC")),
    pa.field("model_name", pa.string()),
    pa.field("model_version", pa.string()),
    pa.field("subject_token", pa.string()),
    pa.field("key_id", pa.string()),
    pa.field("status", pa.string()),
    pa.field("hmac_status", pa.string()),
    pa.field("rescore_status", pa.string()),
    pa.field("journaled_score", pa.float64()),
    pa.field("replayed_score", pa.float64()),
    pa.field("journaled_decision", pa.string()),
    pa.field("replayed_decision", pa.string()),
])
"""Per-entry result rows: tokens, statuses and scores; never a raw feature or subject id."""

_JOURNAL_COLUMNS = ["request_id", "ts", "subject_token", "model_name", "model_version",
                    "features_hmac", "key_id", "score", "threshold", "decision", "outcome"]


# -- verifiers ---------------------------------------------------------------------------------


@runtime_checkable
class Verifier(Protocol):
    """Checks journaled HMACs with the keys the replicas used. Must pickle without key bytes."""

    def tokens_for(self, subject_ids: Sequence[str]) -> list[str | None]:
        """The token entries of each subject carry; ``None`` when it has no (live) key."""

    def verify_batch(self, subject_ids: Sequence[str | None], encoded: Sequence[bytes],
                     key_ids: Sequence[str | None], expected: Sequence[str],
                     subject_tokens: Sequence[str | None]) -> list[str]:
        """Per position: ``verified``, ``mismatch``, ``shredded`` or ``unknown_key``."""

    def unlinked_status(self, subject_tokens: Sequence[str]) -> list[str]:
        """Status of entries whose token matched no entity: ``shredded`` or ``missing``."""


def _static_key_id(key: bytes) -> str:
    # The skeleton's public key fingerprint: identifies the key without revealing it.
    return "k-" + hashlib.sha256(b"serve_journal key id\0" + key).hexdigest()[:12]


class StaticKeyVerifier:
    """Verifier for journals written with :class:`~serve_journal.privacy.StaticKeyPseudonymizer`.

    One key for everything, so nothing can be crypto-shredded: unlinked tokens are ``missing``.
    Build it with :meth:`from_key_file` or :meth:`from_env` to run replay on Ray (it then pickles
    as the key's *location* and reloads the key in each task); a verifier made from raw key bytes
    refuses to be pickled.
    """

    def __init__(self, key_id: str, key: bytes, *, _source: tuple[str, ...] | None = None) -> None:
        from serve_journal.privacy.pseudonymizer import StaticKeyPseudonymizer

        self.key_id = key_id
        self._pseudonymizer = StaticKeyPseudonymizer(key_id, key)
        self._source = _source

    def __repr__(self) -> str:
        return f"StaticKeyVerifier(key_id={self.key_id!r})"

    def __reduce__(self):
        if self._source is None:
            raise TypeError("a StaticKeyVerifier made from key bytes cannot be pickled; build it "
                            "with StaticKeyVerifier.from_key_file(path) or .from_env()")
        if self._source[0] == "file":
            return (_static_from_file, self._source[1:])
        return (_static_from_env, self._source[1:])

    @classmethod
    def from_key_file(cls, path: str | os.PathLike[str], key_id: str | None = None) -> StaticKeyVerifier:
        """Key from a hex key file (0600), as the walking skeleton wrote next to the journal."""
        path = os.path.abspath(os.fspath(path))
        try:
            with open(path) as handle:
                text = handle.read().strip()
            key = bytes.fromhex(text)
        except FileNotFoundError:
            raise FileNotFoundError(f"HMAC key file not found: {path}") from None
        except ValueError:
            raise ValueError(f"HMAC key file {path} must hold the key as hex digits") from None
        return cls(key_id or _static_key_id(key), key, _source=("file", path, key_id))

    @classmethod
    def from_env(cls, variable: str = "SERVE_JOURNAL_HMAC_KEY",
                 id_variable: str = "SERVE_JOURNAL_HMAC_KEY_ID") -> StaticKeyVerifier:
        """Key from a hex environment variable (set it on every node, e.g. in the job's runtime_env)."""
        raw = os.environ.get(variable)
        if not raw:
            raise ValueError(f"{variable} is not set; it must hold the HMAC key as hex digits")
        try:
            key = bytes.fromhex(raw)
        except ValueError:
            raise ValueError(f"{variable} must hold the HMAC key as hex digits") from None
        return cls(os.environ.get(id_variable) or _static_key_id(key), key,
                   _source=("env", variable, id_variable))

    def tokens_for(self, subject_ids: Sequence[str]) -> list[str | None]:
        protected = self._pseudonymizer.protect(list(subject_ids), [None] * len(subject_ids))
        return [p.subject_token for p in protected]

    def verify(self, subject_id: str | None, encoded: bytes, key_id: str, expected_hmac: str) -> str:
        """One entry (the protocol's batch method does the same for many)."""
        return self.verify_batch([subject_id], [encoded], [key_id], [expected_hmac], [None])[0]

    def verify_batch(self, subject_ids: Sequence[str | None], encoded: Sequence[bytes],
                     key_ids: Sequence[str | None], expected: Sequence[str],
                     subject_tokens: Sequence[str | None]) -> list[str]:
        protected = self._pseudonymizer.protect([None] * len(encoded), list(encoded))
        out = []
        for p, key_id, want in zip(protected, key_ids, expected, strict=True):
            if key_id != self.key_id:
                out.append(UNKNOWN_KEY)
            elif hmac.compare_digest(p.features_hmac or "", want):
                out.append(VERIFIED)
            else:
                out.append(MISMATCH)
        return out

    def unlinked_status(self, subject_tokens: Sequence[str]) -> list[str]:
        return [MISSING] * len(subject_tokens)


def _static_from_file(path: str, key_id: str | None) -> StaticKeyVerifier:
    return StaticKeyVerifier.from_key_file(path, key_id)


def _static_from_env(variable: str, id_variable: str) -> StaticKeyVerifier:
    return StaticKeyVerifier.from_env(variable, id_variable)


class VaultVerifier:
    """Verifier for journals written with :class:`~serve_journal.privacy.VaultPseudonymizer`.

    Looks subject keys up in batches (one vault query per batch, not per entry). A subject whose
    key was destroyed, or whose current key made a different token than the entry carries (the
    subject was forgotten and came back), is ``shredded``. Pickles as configuration (keyring and
    vault locations), like the pseudonymizer.
    """

    def __init__(self, pseudonymizer: Any) -> None:
        self.pseudonymizer = pseudonymizer

    def __repr__(self) -> str:
        return f"VaultVerifier({self.pseudonymizer!r})"

    def __reduce__(self):
        return (VaultVerifier, (self.pseudonymizer,))

    @classmethod
    def from_journal(cls, journal_uri: str, *, privacy_dir: str | None = None,
                     vault_url: str | None = None) -> VaultVerifier:
        """The keyring and vault the replicas of ``journal_uri`` use (same defaults as the wrapper)."""
        from serve_journal.config import JournalConfig
        from serve_journal.privacy.keyring import Keyring
        from serve_journal.privacy.subjects import VaultPseudonymizer
        from serve_journal.privacy.vault import SubjectVault

        uri = journal_uri
        if "://" not in uri or uri.startswith("file://"):
            uri = os.path.abspath(uri.removeprefix("file://"))
        config = JournalConfig(model="unused", journal_uri=uri, privacy_dir=privacy_dir,
                               vault_url=vault_url)
        directory = config.resolved_privacy_dir()
        if not os.path.isdir(directory):
            raise FileNotFoundError(f"privacy_dir {directory} does not exist; pass the folder of "
                                    "the keyring the replicas used (--privacy-dir)")
        keyring = Keyring.local_default(directory)
        vault = (SubjectVault.open(vault_url, keyring) if vault_url
                 else SubjectVault.local_default(directory, keyring))
        return cls(VaultPseudonymizer(keyring, vault))

    def tokens_for(self, subject_ids: Sequence[str]) -> list[str | None]:
        keys = self.pseudonymizer.vault.get_many(list(dict.fromkeys(subject_ids)))
        return [keys[s].token if s in keys else None for s in subject_ids]

    def verify(self, subject_id: str | None, encoded: bytes, key_id: str, expected_hmac: str,
               subject_token: str | None = None) -> str:
        """One entry, through :meth:`VaultPseudonymizer.verify_features`."""
        return str(self.pseudonymizer.verify_features(
            encoded, key_id, expected_hmac, subject_id=subject_id, subject_token=subject_token))

    def verify_batch(self, subject_ids: Sequence[str | None], encoded: Sequence[bytes],
                     key_ids: Sequence[str | None], expected: Sequence[str],
                     subject_tokens: Sequence[str | None]) -> list[str]:
        from serve_journal.privacy.keyring import KeyringError
        from serve_journal.privacy.subjects import features_hmac

        wanted = list(dict.fromkeys(s for s in subject_ids if s is not None))
        keys = self.pseudonymizer.vault.get_many(wanted) if wanted else {}
        data_keys: dict[str, bytes | None] = {}
        out = []
        for sid, enc, key_id, want, token in zip(subject_ids, encoded, key_ids, expected,
                                                 subject_tokens, strict=True):
            if key_id is None:
                out.append(UNKNOWN_KEY)
                continue
            if key_id not in data_keys:
                try:
                    data_keys[key_id] = self.pseudonymizer.keyring.data_key(key_id)
                except KeyringError:
                    data_keys[key_id] = None
            data_key = data_keys[key_id]
            if data_key is None:
                out.append(UNKNOWN_KEY)
                continue
            if sid is None:
                actual = features_hmac(enc, data_key)
            else:
                key = keys.get(sid)
                if key is None or (token is not None and key.token != token):
                    out.append(SHREDDED)
                    continue
                fkey = _derived_feature_key(data_key, key.key)
                actual = hmac.new(fkey, _FEATURES_PREFIX + enc, hashlib.sha256).hexdigest()
            out.append(VERIFIED if hmac.compare_digest(actual, want) else MISMATCH)
        return out

    def unlinked_status(self, subject_tokens: Sequence[str]) -> list[str]:
        unique = list(dict.fromkeys(subject_tokens))
        live = self.pseudonymizer.vault.get_by_tokens(unique) if unique else {}
        return [MISSING if t in live else SHREDDED for t in subject_tokens]


# -- re-scoring --------------------------------------------------------------------------------


_FEATURES_PREFIX = b"features\0"
_FEATURE_KEYS: dict[tuple[bytes, bytes], bytes] = {}
_FEATURE_KEYS_MAX = 200_000


def _derived_feature_key(data_key: bytes, subject_key: bytes) -> bytes:
    """HKDF(data key || subject key), cached per process: HKDF costs more than the HMAC itself.

    Only keys the vault returned for this batch are looked up here, so a forgotten subject
    (no key in the vault) never reaches the cache; entries are dropped oldest first.
    """
    cache_key = (data_key, subject_key)
    derived = _FEATURE_KEYS.get(cache_key)
    if derived is None:
        from serve_journal.privacy.subjects import _features_key  # see docs/replay.md, "Keys"

        derived = _FEATURE_KEYS[cache_key] = _features_key(data_key, subject_key)
        if len(_FEATURE_KEYS) > _FEATURE_KEYS_MAX:
            _FEATURE_KEYS.pop(next(iter(_FEATURE_KEYS)))
    return derived


def threshold_decision(score: float | None, threshold: float | None, positive: str = "block",
                       negative: str = "allow") -> str | None:
    """The fraud example's rule: ``positive`` when ``score >= threshold``, else ``negative``."""
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
_MODEL_LOCK = threading.Lock()


class MlflowRescorer:
    """Scores with ``models:/<name>/<version>`` from an MLflow registry (never an alias).

    The default feature order, labels and rule are the fraud example's (a scikit-learn
    classifier's ``predict_proba[:, 1]`` over ``feature_names``; ``threshold_decision``).
    Loaded models are cached per worker process.
    """

    def __init__(self, tracking_uri: str | None, *, feature_names: Sequence[str] | None = None,
                 positive: str = "block", negative: str = "allow") -> None:
        if feature_names is None:
            from serve_journal.examples.fraud import FEATURES

            feature_names = FEATURES
        self.tracking_uri = tracking_uri
        self.feature_names = tuple(feature_names)
        self.positive = positive
        self.negative = negative

    def __repr__(self) -> str:
        return f"MlflowRescorer({self.tracking_uri!r}, features={len(self.feature_names)})"

    def _client(self):
        from mlflow.tracking import MlflowClient

        return MlflowClient(tracking_uri=self.tracking_uri, registry_uri=self.tracking_uri)

    def available(self, model_name: str, model_version: str) -> bool:
        from mlflow.exceptions import MlflowException

        try:
            self._client().get_model_version(model_name, str(model_version))
        except MlflowException as exc:
            if getattr(exc, "error_code", None) == "RESOURCE_DOES_NOT_EXIST":
                return False
            raise
        return True

    def _model(self, model_name: str, model_version: str) -> Any:
        key = (self.tracking_uri, model_name, str(model_version))
        with _MODEL_LOCK:
            model = _MODEL_CACHE.get(key)
            if model is None:
                import mlflow

                uri = f"models:/{model_name}/{model_version}"
                # models:/ URIs resolve through the global registry URI: set it for the load
                # only, so the caller's MLflow settings are left as they were.
                before = (mlflow.get_tracking_uri(), mlflow.get_registry_uri())
                if self.tracking_uri:
                    mlflow.set_tracking_uri(self.tracking_uri)
                    mlflow.set_registry_uri(self.tracking_uri)
                try:
                    try:
                        model = mlflow.sklearn.load_model(uri)
                    except Exception:  # noqa: BLE001 - not a sklearn flavour: use the generic one
                        model = mlflow.pyfunc.load_model(uri)
                finally:
                    mlflow.set_tracking_uri(before[0])
                    mlflow.set_registry_uri(before[1])
                _MODEL_CACHE[key] = model
            return model

    def score(self, model_name: str, model_version: str, features: Sequence[dict]) -> list[float]:
        import numpy as np

        model = self._model(model_name, model_version)
        try:
            matrix = np.array([[float(f[name]) for name in self.feature_names] for f in features],
                              dtype=float)
        except KeyError as exc:
            raise ValueError(f"replayed features lack {exc.args[0]!r}; pass feature_names= "
                             "matching the model's inputs") from None
        if hasattr(model, "predict_proba"):
            return [float(v) for v in model.predict_proba(matrix)[:, 1]]
        return [float(v) for v in np.asarray(model.predict(matrix)).reshape(len(features), -1)[:, -1]]

    def decide(self, score: float | None, threshold: float | None) -> str | None:
        return threshold_decision(score, threshold, self.positive, self.negative)


# -- the Ray Data step -------------------------------------------------------------------------


@dataclass(frozen=True)
class _Spec:
    """Everything a replay task needs; pickled into the tasks (no keys, no raw ids)."""

    run_id: str
    feature_store: Any
    verifier: Any
    rescorer: Any
    tokens: frozenset[str] | None
    since_us: int | None
    until_us: int | None
    decision: str | None
    tolerance: float


class _WorkerState:
    def __init__(self, spec: _Spec) -> None:
        entities = spec.feature_store.entity_ids()
        tokens = spec.verifier.tokens_for(entities) if entities else []
        self.index: dict[str, str] = {}
        for entity, token in zip(entities, tokens, strict=True):
            if token is not None and (spec.tokens is None or token in spec.tokens):
                self.index[token] = entity
        self.available: dict[tuple[str, str], bool] = {}


_STATES: dict[str, _WorkerState] = {}
_STATES_LOCK = threading.Lock()


def _state(spec: _Spec) -> _WorkerState:
    with _STATES_LOCK:
        state = _STATES.get(spec.run_id)
        if state is None:
            while len(_STATES) >= 4:  # worker processes are reused across runs: keep a few
                _STATES.pop(next(iter(_STATES)))
            state = _STATES[spec.run_id] = _WorkerState(spec)
        return state


def _select(batch: pa.Table, spec: _Spec) -> pa.Table:
    masks = []
    if spec.since_us is not None or spec.until_us is not None:
        ts = batch["ts"].cast(pa.timestamp("us", tz="UTC")).cast(pa.int64())
        if spec.since_us is not None:
            masks.append(pc.greater_equal(ts, spec.since_us))
        if spec.until_us is not None:
            masks.append(pc.less(ts, spec.until_us))
    if spec.decision is not None:
        masks.append(pc.fill_null(pc.equal(batch["decision"], spec.decision), False))
    if spec.tokens is not None:
        masks.append(pc.fill_null(pc.is_in(batch["subject_token"],
                                           value_set=pa.array(sorted(spec.tokens), pa.string())),
                                  False))
    if not masks:
        return batch
    return batch.filter(functools.reduce(pc.and_, masks))


_PACK_LEN = struct.Struct(">Q").pack
_PACK_DOUBLE = struct.Struct(">d").pack
_NAN = b"D" + struct.pack(">Q", 0x7FF8000000000000)


def _flat_encode(value: Any) -> bytes | None:
    """``canonical_encode`` of a flat ``{str: None|bool|int|float|str}`` mapping, or ``None``.

    Byte-identical to :func:`canonical_encode` (tests compare them on random and edge-case
    inputs) but without the error-path bookkeeping, which dominates replay's CPU time; any other
    shape returns ``None`` and goes through ``canonical_encode``.
    """
    if type(value) is not dict:
        return None
    try:
        items = sorted((k.encode("utf-8"), v) for k, v in value.items())
    except (AttributeError, UnicodeEncodeError):
        return None
    out = [b"M", _PACK_LEN(len(items))]
    for raw_key, v in items:
        out += (b"S", _PACK_LEN(len(raw_key)), raw_key)
        kind = type(v)
        if kind is float:
            out.append(_NAN if v != v else b"D" + _PACK_DOUBLE(v))
        elif kind is int:
            raw = v.to_bytes(v.bit_length() // 8 + 1, "big", signed=True)
            out += (b"I", _PACK_LEN(len(raw)), raw)
        elif kind is str:
            try:
                raw = v.encode("utf-8")
            except UnicodeEncodeError:
                return None
            out += (b"S", _PACK_LEN(len(raw)), raw)
        elif v is None:
            out.append(b"N")
        elif v is True:
            out.append(b"T")
        elif v is False:
            out.append(b"F")
        else:
            return None
    return b"".join(out)


def _features_for(store: Any, entities: list[str], ts_us: list[int]) -> list[Any]:
    """Per position: (bytes encoding, parsed mapping) or None."""
    if hasattr(store, "features_json_as_of"):
        texts = store.features_json_as_of(entities, ts_us).to_pylist()
        values = [None if t is None else json.loads(t) for t in texts]
    else:
        stamps = [dt.datetime.fromtimestamp(t / 1e6, tz=dt.UTC) for t in ts_us]
        values = store.get_as_of(entities, stamps)
    out: list[Any] = []
    for value in values:
        if value is None:
            out.append(None)
            continue
        encoded = _flat_encode(value)
        if encoded is not None:
            out.append((encoded, value))
            continue
        try:
            out.append((canonical_encode(value), value))
        except CanonicalEncodingError:
            out.append((b"", value))  # cannot be what the replica hashed: reported as mismatch
    return out


def _replay_batch(batch: pa.Table, spec: _Spec) -> pa.Table:
    """Classify one batch of journal entries (runs in a Ray Data task)."""
    batch = _select(batch, spec)
    n = batch.num_rows
    if n == 0:
        return RESULT_SCHEMA.empty_table()
    state = _state(spec)
    tokens = batch["subject_token"].to_pylist()
    hmacs = batch["features_hmac"].to_pylist()
    key_ids = batch["key_id"].to_pylist()
    ts_us = batch["ts"].cast(pa.timestamp("us", tz="UTC")).cast(pa.int64()).to_pylist()
    hmac_status: list[str | None] = [None] * n
    entities: list[str | None] = [None] * n
    unlinked: list[int] = []
    linked: list[int] = []
    for i in range(n):
        if hmacs[i] is None:
            hmac_status[i] = NO_HMAC
        elif tokens[i] is None:
            hmac_status[i] = MISSING  # no subject: nothing to look features up by
        else:
            entity = state.index.get(tokens[i])
            if entity is None:
                unlinked.append(i)
            else:
                entities[i] = entity
                linked.append(i)
    if unlinked:
        for i, status in zip(unlinked, spec.verifier.unlinked_status([tokens[i] for i in unlinked]),
                             strict=True):
            hmac_status[i] = status
    features: list[Any] = [None] * n
    if linked:
        found = _features_for(spec.feature_store, [entities[i] for i in linked],
                              [ts_us[i] for i in linked])
        check = []
        for i, item in zip(linked, found, strict=True):
            if item is None:
                hmac_status[i] = MISSING
            else:
                features[i] = item
                check.append(i)
        if check:
            results = spec.verifier.verify_batch(
                [entities[i] for i in check], [features[i][0] for i in check],
                [key_ids[i] for i in check], [hmacs[i] for i in check], [tokens[i] for i in check])
            for i, status in zip(check, results, strict=True):
                hmac_status[i] = str(status)

    scores = batch["score"].to_pylist()
    decisions = batch["decision"].to_pylist()
    rescore_status: list[str | None] = [None] * n
    replayed_score: list[float | None] = [None] * n
    replayed_decision: list[str | None] = [None] * n
    if spec.rescorer is not None:
        _rescore(batch, spec, state, hmac_status, features, scores, decisions, rescore_status,
                 replayed_score, replayed_decision)
    status = [h if h != VERIFIED or r is None or r == VERIFIED else r
              for h, r in zip(hmac_status, rescore_status, strict=True)]
    return pa.table({
        "request_id": batch["request_id"],
        "ts": batch["ts"].cast(pa.timestamp("us", tz="UTC")),
        "model_name": batch["model_name"],
        "model_version": batch["model_version"],
        "subject_token": batch["subject_token"],
        "key_id": batch["key_id"],
        "status": pa.array(status, pa.string()),
        "hmac_status": pa.array(hmac_status, pa.string()),
        "rescore_status": pa.array(rescore_status, pa.string()),
        "journaled_score": batch["score"],
        "replayed_score": pa.array(replayed_score, pa.float64()),
        "journaled_decision": batch["decision"],
        "replayed_decision": pa.array(replayed_decision, pa.string()),
    }, schema=RESULT_SCHEMA)


def _rescore(batch, spec, state, hmac_status, features, scores, decisions, rescore_status,
             replayed_score, replayed_decision) -> None:
    names = batch["model_name"].to_pylist()
    versions = batch["model_version"].to_pylist()
    outcomes = batch["outcome"].to_pylist()
    thresholds = batch["threshold"].to_pylist()
    groups: dict[tuple[str, str], list[int]] = {}
    for i in range(len(names)):
        # Only entries whose features verified are re-run: other features are not what was used.
        if hmac_status[i] == VERIFIED and outcomes[i] == "ok":
            groups.setdefault((names[i], versions[i]), []).append(i)
    rescorer = spec.rescorer
    for (name, version), rows in groups.items():
        available = state.available.get((name, version))
        if available is None:
            available = state.available[(name, version)] = rescorer.available(name, version)
        if not available:
            for i in rows:
                rescore_status[i] = MODEL_MISSING
            continue
        got = rescorer.score(name, version, [features[i][1] for i in rows])
        for i, score in zip(rows, got, strict=True):
            replayed_score[i] = score
            decision = rescorer.decide(score, thresholds[i])
            replayed_decision[i] = decision
            if scores[i] is None or not abs(score - scores[i]) <= spec.tolerance:
                rescore_status[i] = SCORE_MISMATCH
            elif decisions[i] is not None and decision != decisions[i]:
                rescore_status[i] = DECISION_MISMATCH
            else:
                rescore_status[i] = VERIFIED


# -- the driver --------------------------------------------------------------------------------


@dataclass(frozen=True)
class ReplayReport:
    """What a replay found."""

    journal_uri: str
    model: str
    total: int
    counts: dict[str, int]
    rescored: bool
    files: int
    elapsed_s: float
    output: str | None = None
    subjects_requested: int | None = None
    """How many subject ids were given (``None``: every entity of the feature store)."""
    subjects_without_key: int = 0
    """Given subjects with no live key (never seen, or forgotten): their entries cannot be found."""
    results: pa.Table | None = dataclasses.field(default=None, repr=False, compare=False)
    """Per-entry results (``RESULT_SCHEMA``) when kept in memory."""

    @property
    def ok(self) -> bool:
        """True when every selected entry verified."""
        return self.counts.get(VERIFIED, 0) == self.total

    @property
    def exit_code(self) -> int:
        """0 when everything verified, 1 otherwise (the CLI's exit code)."""
        return 0 if self.ok else 1

    @property
    def entries_per_s(self) -> float:
        return self.total / self.elapsed_s if self.elapsed_s > 0 else math.inf

    def format_summary(self) -> str:
        """The summary table the CLI prints."""
        lines = [f"replay of model {self.model!r} in {self.journal_uri}"
                 f"{' (with rescore)' if self.rescored else ''}",
                 f"{self.total} entries from {self.files} files in {self.elapsed_s:.1f} s "
                 f"({self.entries_per_s:,.0f} entries/s)", "",
                 f"{'status':<20}{'entries':>12}{'share':>9}", "-" * 41]
        for status in (*STATUSES, *sorted(set(self.counts) - set(STATUSES))):
            count = self.counts.get(status, 0)
            if count or status == VERIFIED:
                share = count / self.total if self.total else 0.0
                lines.append(f"{status:<20}{count:>12,}{share:>9.1%}")
        lines.append("-" * 41)
        if self.subjects_without_key:
            lines.append(f"{self.subjects_without_key} of {self.subjects_requested} given subjects "
                         "have no live key (never seen or forgotten)")
        if self.total == 0:
            lines.append("no journal entries matched the selection")
        lines.append("result: " + ("all entries verified" if self.ok else "NOT everything verified"))
        if self.output:
            lines.append(f"per-entry results: {self.output}")
        return "\n".join(lines)


def ensure_ray() -> None:
    """Connect to the cluster when ``RAY_ADDRESS`` is set (``ray job submit``), else start locally."""
    import ray

    if ray.is_initialized():
        return
    if os.environ.get("RAY_ADDRESS"):
        ray.init(address="auto", log_to_driver=False)
    else:
        ray.init(include_dashboard=False, log_to_driver=False)


def _as_utc(value: dt.datetime | str | None, name: str) -> dt.datetime | None:
    if value is None:
        return None
    if isinstance(value, str):
        try:
            value = dt.datetime.fromisoformat(value.replace("Z", "+00:00"))
        except ValueError:
            raise ValueError(f"{name} must be an ISO-8601 time like 2025-01-15T10:00:00Z") from None
    if not isinstance(value, dt.datetime):
        raise TypeError(f"{name} must be a datetime or ISO-8601 string, got {type(value).__name__}")
    return value.replace(tzinfo=dt.UTC) if value.tzinfo is None else value.astimezone(dt.UTC)


def _micros(value: dt.datetime | None) -> int | None:
    if value is None:
        return None
    delta = value - dt.datetime(1970, 1, 1, tzinfo=dt.UTC)
    return (delta.days * 86_400 + delta.seconds) * 1_000_000 + delta.microseconds


def _journal_files(storage: Any, model: str, since: dt.datetime | None, until: dt.datetime | None,
                   tier: str) -> list[str]:
    from serve_journal.catalog import live_files

    out = []
    for f in live_files(storage, tier=tier, model=model):
        start = f.key.start
        if until is not None and start >= until:
            continue
        if since is not None and f.key.end <= since:
            continue
        out.append(storage.full_path(f.path))
    return out


def _progress_bar(total: int | None):
    try:
        from tqdm import tqdm
    except ImportError:
        return None
    return tqdm(total=total, unit="entries", desc="replay", smoothing=0.1)


def replay(
    journal_uri: str,
    *,
    model: str,
    since: dt.datetime | str | None = None,
    until: dt.datetime | str | None = None,
    decision: str | None = None,
    rescore: bool = False,
    feature_store: FeatureStore | None = None,
    verifier: Verifier | None = None,
    tracking_uri: str | None = None,
    output: str | os.PathLike[str] | None = None,
    tolerance: float = 1e-6,
    subjects: Sequence[str] | None = None,
    tier: str = "all",
    rescorer: Rescorer | None = None,
    batch_size: int = 32_768,
    progress: bool = True,
    keep_results: bool = True,
) -> ReplayReport:
    """Reproduce the journaled decisions of ``model`` as a Ray Data pipeline.

    ``feature_store`` defaults to the :class:`ParquetFeatureStore` beside a local journal,
    ``verifier`` to the :class:`VaultVerifier` of the journal's keyring and vault. ``subjects``
    restricts replay to those subject ids (default: every entity of the feature store; entries of
    other tokens are then ``missing`` or ``shredded``). ``since`` is inclusive, ``until``
    exclusive. With ``rescore`` the journaled model version is loaded from ``tracking_uri`` (or
    ``rescorer``). Per-entry results go to ``output`` (one Parquet file) and, with
    ``keep_results``, into the report.
    """
    from serve_journal.catalog.layout import TIERS
    from serve_journal.storage import open_storage

    started = time.monotonic()
    if not isinstance(model, str) or not model:
        raise ValueError("model must be the registered model name whose entries to replay")
    if tier not in (*TIERS, "all"):
        raise ValueError(f"tier must be 'hot', 'cold' or 'all', got {tier!r}")
    if not (isinstance(tolerance, int | float) and tolerance >= 0):
        raise ValueError(f"tolerance must be a non-negative number, got {tolerance!r}")
    since_utc, until_utc = _as_utc(since, "since"), _as_utc(until, "until")
    if feature_store is None:
        feature_store = ParquetFeatureStore(default_feature_store_uri(journal_uri))
    if verifier is None:
        verifier = VaultVerifier.from_journal(journal_uri)
    if rescore and rescorer is None:
        rescorer = MlflowRescorer(tracking_uri or os.environ.get("MLFLOW_TRACKING_URI"))
    flush = getattr(feature_store, "flush", None)
    if flush is not None:
        flush()  # rows the caller buffered must be visible to the tasks

    tokens: frozenset[str] | None = None
    without_key = 0
    if subjects is not None:
        subjects = list(subjects)
        found = verifier.tokens_for(subjects)
        tokens = frozenset(t for t in found if t is not None)
        without_key = sum(1 for t in found if t is None)

    storage = open_storage(journal_uri)
    files = _journal_files(storage, model, since_utc, until_utc, tier)
    spec = _Spec(uuid.uuid4().hex, feature_store, verifier, rescorer if rescore else None, tokens,
                 _micros(since_utc), _micros(until_utc), decision, float(tolerance))
    counts: dict[str, int] = {}
    total = 0
    kept: list[pa.Table] = []
    writer = None
    output_path = None if output is None else os.fspath(output)
    if files and (tokens is None or tokens):
        import ray.data

        ensure_ray()
        context = ray.data.DataContext.get_current()
        bar = _progress_bar(None) if progress else None
        context.enable_progress_bars = bool(progress and bar is None)
        ds = ray.data.read_parquet(files, filesystem=storage.filesystem, columns=_JOURNAL_COLUMNS,
                                   partitioning=None)
        ds = ds.map_batches(functools.partial(_replay_batch, spec=spec), batch_format="pyarrow",
                            batch_size=batch_size, zero_copy_batch=True)
        try:
            for out in ds.iter_batches(batch_format="pyarrow", batch_size=None):
                if out.num_rows == 0:
                    continue
                out = out.cast(RESULT_SCHEMA)
                total += out.num_rows
                for item in pc.value_counts(out["status"]).to_pylist():
                    counts[item["values"]] = counts.get(item["values"], 0) + item["counts"]
                if output_path is not None:
                    if writer is None:
                        writer = _open_writer(output_path)
                    writer.write_table(out)
                if keep_results:
                    kept.append(out)
                if bar is not None:
                    bar.update(out.num_rows)
        finally:
            if bar is not None:
                bar.close()
            if writer is not None:
                writer.close()
    if output_path is not None and writer is None:
        _open_writer(output_path).close()  # an empty result is a file too
    results = None
    if keep_results:
        results = pa.concat_tables(kept) if kept else RESULT_SCHEMA.empty_table()
    report = ReplayReport(journal_uri=journal_uri, model=model, total=total, counts=counts,
                          rescored=bool(rescore), files=len(files),
                          elapsed_s=time.monotonic() - started, output=output_path,
                          subjects_requested=None if subjects is None else len(subjects),
                          subjects_without_key=without_key, results=results)
    logger.info("replay of %s: %d entries, %s", model, total, counts)
    return report


def _open_writer(path: str):
    import pyarrow.fs as pafs
    import pyarrow.parquet as pq

    if "://" in path:
        filesystem, target = pafs.FileSystem.from_uri(path)
    else:
        filesystem, target = pafs.LocalFileSystem(), os.path.abspath(path)
        os.makedirs(os.path.dirname(target), exist_ok=True)
    return pq.ParquetWriter(target, RESULT_SCHEMA, filesystem=filesystem, compression="zstd")


# -- command line ------------------------------------------------------------------------------


def run_replay_cli(
    *,
    model: str,
    journal_uri: str = "./journal",
    since: str | None = None,
    until: str | None = None,
    decision: str | None = None,
    rescore: bool = False,
    features_uri: str | None = None,
    tracking_uri: str | None = None,
    output: str | None = None,
    subjects: Sequence[str] = (),
    privacy_dir: str | None = None,
    vault_url: str | None = None,
    static_key_file: str | None = None,
    tolerance: float = 1e-6,
    tier: str = "all",
    echo: Any = print,
) -> int:
    """What ``serve-journal replay`` runs: prints the summary, returns the exit code (0 = all verified)."""
    store = ParquetFeatureStore(features_uri or default_feature_store_uri(journal_uri))
    if static_key_file:
        verifier: Verifier = StaticKeyVerifier.from_key_file(static_key_file)
    else:
        verifier = VaultVerifier.from_journal(journal_uri, privacy_dir=privacy_dir,
                                              vault_url=vault_url)
    if output is None:
        stamp = dt.datetime.now(dt.UTC).strftime("%Y%m%dT%H%M%SZ")
        output = os.path.abspath(f"replay-{model}-{stamp}.parquet")
    report = replay(journal_uri, model=model, since=since, until=until, decision=decision,
                    rescore=rescore, feature_store=store, verifier=verifier,
                    tracking_uri=tracking_uri, output=output, tolerance=tolerance,
                    subjects=list(subjects) or None, tier=tier, keep_results=False)
    echo(report.format_summary())
    return report.exit_code


def _make_command():
    import click

    @click.command("replay")
    @click.option("--model", required=True, help="Registered model name whose entries to replay.")
    @click.option("--journal", "journal_uri", default="./journal", show_default=True)
    @click.option("--since", default=None, help="ISO time, inclusive (UTC).")
    @click.option("--until", default=None, help="ISO time, exclusive (UTC).")
    @click.option("--decision", default=None, help="Only entries with this decision.")
    @click.option("--rescore", is_flag=True,
                  help="Also re-run the journaled model version and compare score and decision.")
    @click.option("--features", "features_uri", default=None,
                  help="Feature store folder (default: 'features' beside a local journal).")
    @click.option("--tracking-uri", default=None, help="MLflow registry (default MLFLOW_TRACKING_URI).")
    @click.option("--output", default=None, help="Per-entry results Parquet file.")
    @click.option("--subject", "subjects", multiple=True,
                  help="Only this subject id (repeatable; never stored or logged).")
    @click.option("--privacy-dir", default=None, help="Keyring folder (default beside a local journal).")
    @click.option("--vault-url", default=None, help="postgresql://... subject key vault.")
    @click.option("--static-key-file", default=None,
                  help="Verify a journal written with one static HMAC key (hex file).")
    @click.option("--tolerance", default=1e-6, show_default=True, type=float)
    @click.option("--tier", default="all", show_default=True,
                  type=click.Choice(["hot", "cold", "all"]))
    def replay_cmd(**options: Any) -> None:
        """Reproduce decisions: features as of each entry, HMAC check, optional re-scoring.

        Exit code 0 only when every selected entry verified. Runs on the cluster named by
        RAY_ADDRESS (e.g. under `ray job submit`), else on a local Ray.
        """
        import sys

        sys.exit(run_replay_cli(**options, echo=click.echo))

    return replay_cmd


replay_command = _make_command()
"""The click command; ``serve_journal.cli`` adds it with ``main.add_command(replay_command)``."""
