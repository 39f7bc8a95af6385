"""Replay: reproduce journaled decisions from a feature store, the HMAC keys and the registry.

- ``driver.py``: :func:`replay` and the ``serve-journal replay`` command; it runs the Ray Data
  pipeline.
- ``report.py``: :class:`ReplayReport` (counts, artifact checks, summary) and
  :class:`ArtifactMismatch`.
- ``tasks.py``: what each Ray task does with a batch of journal entries.
- ``verifiers.py``: :class:`Verifier`, :class:`StaticKeyVerifier`, :class:`VaultVerifier`.
- ``rescore.py``: :class:`Rescorer`, :class:`ArtifactRescorer`, :class:`MlflowRescorer`,
  :func:`threshold_decision`.
- ``featurestore.py``: :class:`FeatureStore` and the built-in :class:`ParquetFeatureStore`.
- ``feast_store.py``: :class:`FeastFeatureStore`, replay through Feast's historical retrieval.
- ``statuses.py``: the per-entry statuses.

See docs/replay.md.
"""

from serve_journal.replay.driver import (
    RESULT_SCHEMA,
    ensure_ray,
    replay,
    replay_command,
    run_replay_cli,
)
from serve_journal.replay.feast_store import FeastFeatureStore
from serve_journal.replay.featurestore import (
    FeatureStore,
    ParquetFeatureStore,
    default_feature_store_uri,
    record_features,
)
from serve_journal.replay.report import ArtifactMismatch, ReplayReport
from serve_journal.replay.rescore import (
    ArtifactRescorer,
    MlflowRescorer,
    Rescorer,
    checks_artifacts,
    threshold_decision,
)
from serve_journal.replay.statuses import (
    ARTIFACT_MISMATCH,
    ARTIFACT_STATUSES,
    DECISION_MISMATCH,
    MISMATCH,
    MISSING,
    MODEL_MISSING,
    NO_HMAC,
    SCORE_MISMATCH,
    SHREDDED,
    STATUSES,
    UNKNOWN_KEY,
    VERIFIED,
)
from serve_journal.replay.verifiers import StaticKeyVerifier, VaultVerifier, Verifier

__all__ = [
    "ARTIFACT_MISMATCH",
    "ARTIFACT_STATUSES",
    "DECISION_MISMATCH",
    "MISMATCH",
    "MISSING",
    "MODEL_MISSING",
    "NO_HMAC",
    "RESULT_SCHEMA",
    "SCORE_MISMATCH",
    "SHREDDED",
    "STATUSES",
    "UNKNOWN_KEY",
    "VERIFIED",
    "ArtifactMismatch",
    "ArtifactRescorer",
    "FeastFeatureStore",
    "FeatureStore",
    "MlflowRescorer",
    "ParquetFeatureStore",
    "ReplayReport",
    "Rescorer",
    "StaticKeyVerifier",
    "VaultVerifier",
    "Verifier",
    "checks_artifacts",
    "default_feature_store_uri",
    "ensure_ray",
    "record_features",
    "replay",
    "replay_command",
    "run_replay_cli",
    "threshold_decision",
]
