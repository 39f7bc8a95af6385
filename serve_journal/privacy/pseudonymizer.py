"""Turns subject ids and feature encodings into tokens and HMACs, in batches, off the request path."""

from __future__ import annotations

import hmac
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol


@dataclass(frozen=True)
class Protected:
    """What the journal stores in place of a subject id and a feature vector."""

    subject_token: str | None
    features_hmac: str | None
    key_id: str


class Pseudonymizer(Protocol):
    """Batch interface the flusher calls; implementations may look keys up in a vault."""

    def protect(
        self, subjects: Sequence[str | None], encoded_features: Sequence[bytes | None]
    ) -> list[Protected]:
        """One :class:`Protected` per input position."""


class StaticKeyPseudonymizer:
    """One HMAC key for everything: the walking skeleton's pseudonymizer.

    ``subject_token`` = HMAC(key, "subject\\0" + id), ``features_hmac`` = HMAC(key, "features\\0" +
    encoding). The per-subject-key vault (crypto-shredding) replaces this in production.
    """

    def __init__(self, key_id: str, key: bytes) -> None:
        if len(key) < 16:
            raise ValueError("HMAC key must be at least 16 bytes")
        self._key_id = key_id
        self._key = key

    def __repr__(self) -> str:  # never show the key
        return f"StaticKeyPseudonymizer(key_id={self._key_id!r})"

    def __reduce__(self):  # pragma: no cover - a key must not travel in a pickle
        raise TypeError("StaticKeyPseudonymizer holds a secret key and cannot be pickled")

    def token_for(self, subject: str) -> str | None:
        """The token entries of ``subject`` carry (for investigators' lookups)."""
        return self.protect([subject], [None])[0].subject_token

    def protect(
        self, subjects: Sequence[str | None], encoded_features: Sequence[bytes | None]
    ) -> list[Protected]:
        out = []
        for subject, encoded in zip(subjects, encoded_features, strict=True):
            token = None
            if subject is not None:
                token = hmac.digest(self._key, b"subject\0" + subject.encode("utf-8", "surrogatepass"),
                                    "sha256").hex()[:32]
            digest = None
            if encoded is not None:
                digest = hmac.digest(self._key, b"features\0" + encoded, "sha256").hex()
            out.append(Protected(token, digest, self._key_id))
        return out
