"""The statuses replay gives each journal entry (docs/replay.md, "Statuses")."""

from __future__ import annotations

__all__ = [
    "ARTIFACT_DIFFERS",
    "ARTIFACT_DIGEST_DIFFERS",
    "ARTIFACT_MISMATCH",
    "ARTIFACT_MLMODEL_ONLY",
    "ARTIFACT_NOT_CHECKED",
    "ARTIFACT_NOT_PINNED",
    "ARTIFACT_PINNED",
    "ARTIFACT_RUN_ID_DIFFERS",
    "ARTIFACT_RUN_ID_ONLY",
    "ARTIFACT_STATUSES",
    "DECISION_MISMATCH",
    "MISMATCH",
    "MISSING",
    "MODEL_MISSING",
    "NO_HMAC",
    "SCORE_MISMATCH",
    "SHREDDED",
    "STATUSES",
    "UNKNOWN_KEY",
    "VERIFIED",
]

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
ARTIFACT_MISMATCH = "artifact_mismatch"
"""Rescore: the registry no longer holds the artifact the entry names: the version now belongs to
another run, or the artifact's digest differs (its files were replaced). Not re-scored."""

STATUSES = (VERIFIED, MISMATCH, MISSING, SHREDDED, UNKNOWN_KEY, NO_HMAC, MODEL_MISSING,
            ARTIFACT_MISMATCH, SCORE_MISMATCH, DECISION_MISMATCH)
"""Every status, in the order the summary lists them."""

# -- the artifact a re-scored entry was scored with (result column ``artifact_status``) --------

ARTIFACT_PINNED = "pinned"
"""The entry's ``sha256:`` artifact digest (and run id, when recorded) matched; the model was
loaded from exactly the files checked."""
ARTIFACT_MLMODEL_ONLY = "mlmodel_only"
"""The entry's ``mlmodel-sha256:`` digest (and run id) matched: the ``MLmodel`` file is the
journaled one, the weights are not pinned (loaded by version)."""
ARTIFACT_RUN_ID_ONLY = "run_id_only"
"""Only the run id was recorded, and it matched; the weights are not pinned by a digest."""
ARTIFACT_NOT_PINNED = "not_pinned"
"""The entry records no run id and no digest (schema version 1, or unknown when journaled):
re-scored by version, which a registry admin can delete and recreate."""
ARTIFACT_NOT_CHECKED = "not_checked"
"""The entry is pinned, but the rescorer has no ``check``: re-scored by version, unchecked."""
ARTIFACT_RUN_ID_DIFFERS = "run_id_differs"
"""``artifact_mismatch`` because the version now belongs to another run."""
ARTIFACT_DIGEST_DIFFERS = "digest_differs"
"""``artifact_mismatch`` because the artifact's digest differs from the journaled one."""
ARTIFACT_DIFFERS = "differs"
"""``artifact_mismatch`` by a custom rescorer's check that does not say what differs."""

ARTIFACT_STATUSES = (ARTIFACT_PINNED, ARTIFACT_MLMODEL_ONLY, ARTIFACT_RUN_ID_ONLY,
                     ARTIFACT_NOT_PINNED, ARTIFACT_NOT_CHECKED, ARTIFACT_RUN_ID_DIFFERS,
                     ARTIFACT_DIGEST_DIFFERS, ARTIFACT_DIFFERS)
"""Every artifact status, in the order the summary lists them."""
