"""The Ray Data step of replay: what one task does with one batch of journal entries.

:func:`replay_batch` selects the entries (time, decision, subject tokens), links tokens to
feature-store entities, fetches each entry's features as of its timestamp, re-encodes them with
the canonical encoder (:func:`~serve_journal.integrity.encoding.canonical_encode_fast`), checks
the HMAC with the :class:`~serve_journal.replay.verifiers.Verifier` and, with a rescorer,
re-runs the journaled model version: for an entry that names its artifact (run id, digest), only
after the rescorer's ``check`` found exactly that artifact (else ``artifact_mismatch``). Raw subject ids and features exist only inside the task:
its output (:data:`RESULT_SCHEMA`) carries tokens, statuses and scores. The driver
(:mod:`serve_journal.replay.driver`) builds the :class:`TaskSpec` and runs the pipeline.

Nor do they leave it inside an error: a Ray task's exception travels to the driver, its logs and
the job's output. Every call into a part that sees subject ids or features (the feature store,
the verifier, the rescorer's ``score``) goes through :func:`_guarded`: an exception of a type
whose messages are known to name paths, types and options only (:data:`SAFE_ERRORS`) passes
through; any other is replaced by a :class:`~serve_journal.errors.ReplayDataError` naming the
stage and the exception's type, its message withheld (``float("<value>")`` quotes the value).
"""

from __future__ import annotations

import datetime as dt
import functools
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar

import pyarrow as pa
import pyarrow.compute as pc

from serve_journal.errors import (
    ConfigError,
    KeyringError,
    ModelNotFoundError,
    ReplayDataError,
    TokenFormatError,
    VaultError,
)
from serve_journal.integrity.encoding import CanonicalEncodingError, canonical_encode_fast
from serve_journal.registry import MLMODEL_DIGEST_PREFIX
from serve_journal.replay.featurestore import FeatureStore, parse_features_json
from serve_journal.replay.rescore import Rescorer, checks_artifacts
from serve_journal.replay.statuses import (
    ARTIFACT_DIFFERS,
    ARTIFACT_DIGEST_DIFFERS,
    ARTIFACT_MISMATCH,
    ARTIFACT_MLMODEL_ONLY,
    ARTIFACT_NOT_CHECKED,
    ARTIFACT_NOT_PINNED,
    ARTIFACT_PINNED,
    ARTIFACT_RUN_ID_DIFFERS,
    ARTIFACT_RUN_ID_ONLY,
    DECISION_MISMATCH,
    MISSING,
    MODEL_MISSING,
    NO_HMAC,
    SCORE_MISMATCH,
    VERIFIED,
)
from serve_journal.replay.verifiers import Verifier

__all__ = ["JOURNAL_COLUMNS", "RESULT_SCHEMA", "SAFE_ERRORS", "TaskSpec", "replay_batch"]

SAFE_ERRORS: tuple[type[BaseException], ...] = (
    ReplayDataError, ConfigError, CanonicalEncodingError, KeyringError, VaultError,
    TokenFormatError,
)
"""Exception types whose messages never hold a feature value or a subject id (each one's
docstring in :mod:`serve_journal.errors` says so): they pass through replay unchanged."""

_T = TypeVar("_T")


def _guarded(stage: str, call: Callable[..., _T], *args: Any) -> _T:
    """``call(*args)``; an exception not in :data:`SAFE_ERRORS` becomes a
    :class:`ReplayDataError` naming ``stage`` and its type only. It is raised outside the
    ``except`` block, so the original is not even its ``__context__``."""
    try:
        return call(*args)
    except SAFE_ERRORS:
        raise
    except Exception as exc:  # noqa: BLE001 - re-raised below without its message
        failure = type(exc).__name__
    raise ReplayDataError(f"replay: {stage} failed with {failure}; its message is withheld "
                          "because it may quote feature values or subject ids")

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
    pa.field("model_run_id", pa.string()),
    pa.field("model_digest", pa.string()),
    pa.field("artifact_status", pa.string()),
    pa.field("artifact_reason", pa.string()),
    pa.field("several_models", pa.bool_()),
])
"""Per-entry result rows: tokens, statuses and scores; never a raw feature or subject id.
``artifact_status`` (:data:`~serve_journal.replay.statuses.ARTIFACT_STATUSES`) says which
artifact a re-scored entry was scored with, or what differed (``artifact_reason``, naming run
ids or digests); null when the entry was not re-scored. ``several_models``: the entry lists
several models (``models``) and was re-scored with the deciding one only."""

JOURNAL_COLUMNS = ["request_id", "ts", "subject_token", "model_name", "model_version",
                   "features_hmac", "key_id", "score", "threshold", "decision", "outcome",
                   "model_run_id", "model_digest", "models"]
"""The journal columns a replay reads (the last three are null in files of schema version 1)."""


@dataclass(frozen=True)
class TaskSpec:
    """Everything a replay task needs; pickled into the tasks (no keys, no raw ids)."""

    run_id: str
    feature_store: FeatureStore
    verifier: Verifier
    rescorer: Rescorer | None
    tokens: frozenset[str] | None
    since_us: int | None
    until_us: int | None
    decision: str | None
    tolerance: float


class _WorkerState:
    """Per worker process and run: the token -> entity index and the rescorer's model checks."""

    def __init__(self, spec: TaskSpec) -> None:
        entities = _guarded("listing the feature store's entities", spec.feature_store.entity_ids)
        tokens = _guarded("tokenizing entity ids", spec.verifier.tokens_for, entities) \
            if entities else []
        self.index: dict[str, str] = {}
        for entity, token in zip(entities, tokens, strict=True):
            if token is not None and (spec.tokens is None or token in spec.tokens):
                self.index[token] = entity
        self.available: dict[tuple[str, str], bool] = {}
        self.checks: dict[tuple[str, str, str | None, str | None], Any] = {}


_STATES: dict[str, _WorkerState] = {}
_STATES_LOCK = threading.Lock()


def _state(spec: TaskSpec) -> _WorkerState:
    """This worker's state for the run, built on its first batch."""
    with _STATES_LOCK:
        state = _STATES.get(spec.run_id)
        if state is None:
            while len(_STATES) >= 4:  # worker processes are reused across runs: keep a few
                _STATES.pop(next(iter(_STATES)))
            state = _STATES[spec.run_id] = _WorkerState(spec)
        return state


def _select(batch: pa.Table, spec: TaskSpec) -> pa.Table:
    """The entries of ``batch`` the replay selected (time range, decision, subject tokens)."""
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


def _features_for(store: Any, entities: list[str], ts_us: list[int]) -> list[Any]:
    """Per position: (canonical encoding, parsed mapping) of the features as of ``ts_us``, or None."""
    if hasattr(store, "features_json_as_of"):
        texts = _guarded("reading features", store.features_json_as_of, entities, ts_us).to_pylist()
        values = [None if t is None else parse_features_json(t, i) for i, t in enumerate(texts)]
    else:
        stamps = [dt.datetime.fromtimestamp(t / 1e6, tz=dt.UTC) for t in ts_us]
        values = _guarded("reading features", store.get_as_of, entities, stamps)
    out: list[Any] = []
    for value in values:
        if value is None:
            out.append(None)
            continue
        try:
            out.append((canonical_encode_fast(value), value))
        except CanonicalEncodingError:
            out.append((b"", value))  # cannot be what the replica hashed: reported as mismatch
    return out


def replay_batch(batch: pa.Table, spec: TaskSpec) -> pa.Table:
    """Classify one batch of journal entries (``JOURNAL_COLUMNS``); runs in a Ray Data task.

    Returns one :data:`RESULT_SCHEMA` row per selected entry.
    """
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
        statuses = _guarded("classifying unlinked tokens", spec.verifier.unlinked_status,
                            [tokens[i] for i in unlinked])
        for i, status in zip(unlinked, statuses, strict=True):
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
            results = _guarded(
                "verifying feature HMACs", spec.verifier.verify_batch,
                [entities[i] for i in check], [features[i][0] for i in check],
                [key_ids[i] for i in check], [hmacs[i] for i in check], [tokens[i] for i in check])
            for i, status in zip(check, results, strict=True):
                hmac_status[i] = str(status)

    scores = batch["score"].to_pylist()
    decisions = batch["decision"].to_pylist()
    rescore_status: list[str | None] = [None] * n
    replayed_score: list[float | None] = [None] * n
    replayed_decision: list[str | None] = [None] * n
    artifact = _Artifacts(n)
    if spec.rescorer is not None:
        _rescore(batch, spec, state, hmac_status, features, scores, decisions, rescore_status,
                 replayed_score, replayed_decision, artifact)
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
        "model_run_id": _column(batch, "model_run_id", pa.string()),
        "model_digest": _column(batch, "model_digest", pa.string()),
        "artifact_status": pa.array(artifact.status, pa.string()),
        "artifact_reason": pa.array(artifact.reason, pa.string()),
        "several_models": pa.array(artifact.several, pa.bool_()),
    }, schema=RESULT_SCHEMA)


def _column(batch: pa.Table, name: str, typ: pa.DataType) -> pa.ChunkedArray | pa.Array:
    """``batch[name]``, or nulls when the batch comes from a file of an earlier schema version."""
    if name in batch.column_names:
        return batch[name]
    return pa.nulls(batch.num_rows, typ)


class _Artifacts:
    """Per entry of a batch: the artifact status, what differed, and whether several models
    took part in the call."""

    def __init__(self, n: int) -> None:
        self.status: list[str | None] = [None] * n
        self.reason: list[str | None] = [None] * n
        self.several: list[bool | None] = [None] * n


def _pinned_status(run_id: str | None, digest: str | None) -> str:
    """What a passed check of (run id, digest) pins."""
    if digest and digest.startswith(MLMODEL_DIGEST_PREFIX):
        return ARTIFACT_MLMODEL_ONLY
    return ARTIFACT_PINNED if digest else ARTIFACT_RUN_ID_ONLY


def _differs_status(check: Any) -> str:
    """The artifact status of a failed check, by what it says differs."""
    differs = getattr(check, "differs", None)
    if differs == "run_id":
        return ARTIFACT_RUN_ID_DIFFERS
    if differs == "digest":
        return ARTIFACT_DIGEST_DIFFERS
    return ARTIFACT_DIFFERS


def _rescore(batch: pa.Table, spec: TaskSpec, state: _WorkerState, hmac_status: list[str | None],
             features: list[Any], scores: list[float | None], decisions: list[str | None],
             rescore_status: list[str | None], replayed_score: list[float | None],
             replayed_decision: list[str | None], artifact: _Artifacts) -> None:
    """Re-run the journaled model version on the entries whose features verified.

    Entries are grouped by the artifact they name (name, version, run id, digest). A group with
    a run id or digest is checked once per worker with the rescorer's ``check``; on a mismatch
    every entry of it is ``artifact_mismatch`` and none is scored. Entries listing several
    models are scored with the deciding one (the top-level columns)."""
    names = batch["model_name"].to_pylist()
    versions = batch["model_version"].to_pylist()
    outcomes = batch["outcome"].to_pylist()
    thresholds = batch["threshold"].to_pylist()
    run_ids = _column(batch, "model_run_id", pa.string()).to_pylist()
    digests = _column(batch, "model_digest", pa.string()).to_pylist()
    several = pc.is_valid(_column(batch, "models", pa.null())).to_pylist()
    groups: dict[tuple[str, str, str | None, str | None], list[int]] = {}
    for i in range(len(names)):
        # Only entries whose features verified are re-run: other features are not what was used.
        if hmac_status[i] == VERIFIED and outcomes[i] == "ok":
            key = (names[i], versions[i], run_ids[i] or None, digests[i] or None)
            groups.setdefault(key, []).append(i)
    rescorer = spec.rescorer
    checking = checks_artifacts(rescorer)
    for (name, version, run_id, digest), rows in groups.items():
        available = state.available.get((name, version))
        if available is None:
            available = state.available[(name, version)] = rescorer.available(name, version)
        pinned = bool(run_id or digest)
        check = None
        if available and pinned and checking:
            check = state.checks.get((name, version, run_id, digest))
            if check is None:
                try:
                    check = rescorer.check(name, version, run_id, digest)
                except ModelNotFoundError:
                    # Deleted since ``available`` answered? Ask again: an outage is raised.
                    if rescorer.available(name, version):
                        raise
                    available = state.available[(name, version)] = False
                else:
                    state.checks[(name, version, run_id, digest)] = check
        if not available:
            for i in rows:
                rescore_status[i] = MODEL_MISSING
            continue
        if check is not None and not check.ok:
            status = _differs_status(check)
            for i in rows:
                rescore_status[i] = ARTIFACT_MISMATCH
                artifact.status[i] = status
                artifact.reason[i] = check.reason
            continue
        if not pinned:
            kind = ARTIFACT_NOT_PINNED
        else:
            kind = _pinned_status(run_id, digest) if checking else ARTIFACT_NOT_CHECKED
        if pinned and checking:
            got = _guarded("re-scoring", functools.partial(rescorer.score, run_id=run_id,
                                                           digest=digest),
                           name, version, [features[i][1] for i in rows])
        else:
            got = _guarded("re-scoring", rescorer.score, name, version,
                           [features[i][1] for i in rows])
        for i, score in zip(rows, got, strict=True):
            artifact.status[i] = kind
            artifact.several[i] = bool(several[i])
            replayed_score[i] = score
            decision = rescorer.decide(score, thresholds[i])
            replayed_decision[i] = decision
            if scores[i] is None or not abs(score - scores[i]) <= spec.tolerance:
                rescore_status[i] = SCORE_MISMATCH
            elif decisions[i] is not None and decision != decisions[i]:
                rescore_status[i] = DECISION_MISMATCH
            else:
                rescore_status[i] = VERIFIED
