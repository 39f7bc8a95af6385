"""The statuses replay gives each journal entry (docs/replay.md, "Statuses")."""

from __future__ import annotations

__all__ = [
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

STATUSES = (VERIFIED, MISMATCH, MISSING, SHREDDED, UNKNOWN_KEY, NO_HMAC, MODEL_MISSING,
            SCORE_MISMATCH, DECISION_MISMATCH)
"""Every status, in the order the summary lists them."""
