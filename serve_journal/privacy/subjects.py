"""Subject tokens and feature HMACs from per-subject keys: the production :class:`Pseudonymizer`.

For an entry naming a subject (docs/security.md, "Key hierarchy")::

    subject_token = HMAC-SHA256(subject key, "token")[:32 hex]
    features_hmac = HMAC-SHA256(HKDF-SHA256(data key || subject key), "features\\0" || encoding)

and for an entry without a subject, ``features_hmac = HMAC-SHA256(data key, "features\\0" ||
encoding)``; ``key_id`` names the data key. Destroying the subject key (crypto-shredding) makes
both the token and the feature HMAC underivable.

Replicas cache subject keys in a bounded LRU. Forgotten subjects are evicted by
:meth:`VaultPseudonymizer.refresh_invalidations`, which :meth:`protect` also runs itself whenever
``invalidation_interval_s`` has passed; so a replica stops using a forgotten key at most
``invalidation_interval_s`` plus one ``protect`` batch after the forget committed.
"""

from __future__ import annotations

import enum
import hashlib
import hmac
import threading
import time
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass, field

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from serve_journal.privacy.keyring import Keyring, KeyringError
from serve_journal.privacy.pseudonymizer import Protected
from serve_journal.privacy.vault import SubjectKey, SubjectVault

__all__ = ["CacheStats", "VaultPseudonymizer", "VerifyStatus", "features_hmac"]

_FEATURES_PREFIX = b"features\0"
_HKDF_INFO = b"serve_journal features v1"


class VerifyStatus(enum.StrEnum):
    """Outcome of re-checking a journaled ``features_hmac`` against replayed features."""

    VERIFIED = "verified"
    MISMATCH = "mismatch"
    SHREDDED = "shredded"
    """The subject's key was destroyed (forgotten): the HMAC can no longer be checked."""
    UNKNOWN_KEY = "unknown_key"
    """The entry's ``key_id`` is not in this keyring."""


def _features_key(data_key: bytes, subject_key: bytes) -> bytes:
    return HKDF(algorithm=hashes.SHA256(), length=32, salt=None, info=_HKDF_INFO).derive(
        data_key + subject_key)


def features_hmac(encoded: bytes, data_key: bytes, subject_key: bytes | None = None) -> str:
    """Hex ``features_hmac`` of a canonical encoding (see the module docstring)."""
    key = data_key if subject_key is None else _features_key(data_key, subject_key)
    return hmac.new(key, _FEATURES_PREFIX + encoded, hashlib.sha256).hexdigest()


@dataclass
class CacheStats:
    """Counters of the subject key cache (for metrics)."""

    hits: int = 0
    misses: int = 0
    evicted_lru: int = 0
    evicted_forgotten: int = 0
    refreshes: int = 0


@dataclass
class _Cached:
    key: SubjectKey
    token: str
    feature_keys: dict[str, bytes] = field(default_factory=dict)


class VaultPseudonymizer:
    """Implements :class:`~serve_journal.privacy.pseudonymizer.Pseudonymizer` with a vault.

    Thread-safe; meant to be called in batches from the flusher's background thread. Pickling
    carries configuration only (keyring and vault configuration, cache settings): no key bytes
    and no cache.
    """

    def __init__(self, keyring: Keyring, vault: SubjectVault, *, cache_size: int = 100_000,
                 invalidation_interval_s: float = 1.0) -> None:
        if not isinstance(cache_size, int) or isinstance(cache_size, bool) or cache_size < 1:
            raise ValueError(f"cache_size must be a positive integer, got {cache_size!r}")
        if not isinstance(invalidation_interval_s, int | float) or not invalidation_interval_s > 0:
            raise ValueError("invalidation_interval_s must be a positive number of seconds, "
                             f"got {invalidation_interval_s!r}")
        self.keyring = keyring
        self.vault = vault
        self.cache_size = cache_size
        self.invalidation_interval_s = float(invalidation_interval_s)
        self.stats = CacheStats()
        self._lock = threading.RLock()
        self._cache: OrderedDict[bytes, _Cached] = OrderedDict()
        # Taken before any key is cached, so no forget after a cached read can be missed.
        self._cursor = vault.latest_cursor()
        self._last_refresh = time.monotonic()

    def __repr__(self) -> str:
        return (f"VaultPseudonymizer(vault={self.vault!r}, key_id={self.keyring.current_key_id!r}, "
                f"cache={len(self._cache)}/{self.cache_size})")

    def __reduce__(self):
        return (_rebuild, (self.keyring, self.vault, self.cache_size, self.invalidation_interval_s))

    # -- the Pseudonymizer protocol ------------------------------------------------------------

    def protect(self, subjects: Sequence[str | None],
                encoded_features: Sequence[bytes | None]) -> list[Protected]:
        """One :class:`Protected` per position; creates keys for subjects seen the first time."""
        if len(subjects) != len(encoded_features):
            raise ValueError(f"subjects and encoded_features must have the same length, got "
                             f"{len(subjects)} and {len(encoded_features)}")
        with self._lock:
            if time.monotonic() - self._last_refresh >= self.invalidation_interval_s:
                self.refresh_invalidations()
            key_id = self.keyring.current_key_id
            data_key = self.keyring.data_key(key_id)
            cached = self._lookup([s for s in subjects if s is not None])
            out = []
            for subject, encoded in zip(subjects, encoded_features, strict=True):
                entry = cached[subject] if subject is not None else None
                digest = None
                if encoded is not None:
                    if entry is None:
                        digest = features_hmac(encoded, data_key)
                    else:
                        fkey = entry.feature_keys.get(key_id)
                        if fkey is None:
                            fkey = entry.feature_keys[key_id] = _features_key(data_key, entry.key.key)
                        digest = hmac.new(fkey, _FEATURES_PREFIX + encoded, hashlib.sha256).hexdigest()
                out.append(Protected(entry.token if entry else None, digest, key_id))
            return out

    def _lookup(self, subjects: list[str]) -> dict[str, _Cached]:
        found: dict[str, _Cached] = {}
        misses: list[str] = []
        for subject in dict.fromkeys(subjects):
            index = self.vault.blind_index(subject)
            entry = self._cache.get(index)
            if entry is None:
                misses.append(subject)
            else:
                self._cache.move_to_end(index)
                found[subject] = entry
        self.stats.hits += len(found)
        self.stats.misses += len(misses)
        if misses:
            for subject, key in self.vault.get_or_create_many(misses).items():
                entry = _Cached(key, key.token)
                self._cache[key.blind_index] = entry
                found[subject] = entry
            while len(self._cache) > self.cache_size:
                self._cache.popitem(last=False)
                self.stats.evicted_lru += 1
        return found

    # -- investigators and replay --------------------------------------------------------------

    def token_for(self, subject_id: str) -> str | None:
        """The subject's current token, or ``None`` (never seen, or forgotten). Never creates a key."""
        key = self.vault.get_many([subject_id]).get(subject_id)
        return key.token if key is not None else None

    def verify_features(self, encoded: bytes, key_id: str, expected_hmac: str, *,
                        subject_id: str | None = None,
                        subject_token: str | None = None) -> VerifyStatus:
        """Re-check a journaled ``features_hmac`` against replayed features.

        Pass the entry's ``subject_token`` (and/or the ``subject_id`` the features belong to); with
        neither, the entry had no subject and only the data key is used. ``SHREDDED`` when the
        subject's key, or the key that made that token, no longer exists.
        """
        try:
            data_key = self.keyring.data_key(key_id)
        except KeyringError:
            return VerifyStatus.UNKNOWN_KEY
        subject_key: bytes | None = None
        if subject_id is not None or subject_token is not None:
            key: SubjectKey | None
            if subject_id is not None:
                key = self.vault.get_many([subject_id]).get(subject_id)
                if key is not None and subject_token is not None and key.token != subject_token:
                    key = None  # the subject came back with a new key; the entry's key is gone
            else:
                key = self.vault.get_by_tokens([subject_token]).get(subject_token)
            if key is None:
                return VerifyStatus.SHREDDED
            subject_key = key.key
        actual = features_hmac(encoded, data_key, subject_key)
        if hmac.compare_digest(actual, expected_hmac):
            return VerifyStatus.VERIFIED
        return VerifyStatus.MISMATCH

    # -- invalidation --------------------------------------------------------------------------

    def refresh_invalidations(self) -> int:
        """Evict keys of subjects forgotten since the last call and pick up key rotation.

        Returns how many cached keys were evicted. Called by :meth:`protect` every
        ``invalidation_interval_s``; callers may call it more often.
        """
        with self._lock:
            evicted = 0
            while True:
                indexes, cursor = self.vault.changes_since(self._cursor)
                for index in indexes:
                    if self._cache.pop(index, None) is not None:
                        evicted += 1
                if cursor == self._cursor:
                    break
                self._cursor = cursor
            self.keyring.reload()
            self.stats.evicted_forgotten += evicted
            self.stats.refreshes += 1
            self._last_refresh = time.monotonic()
            return evicted

    def cached_subjects(self) -> int:
        """Number of subject keys currently cached."""
        return len(self._cache)


def _rebuild(keyring: Keyring, vault: SubjectVault, cache_size: int,
             invalidation_interval_s: float) -> VaultPseudonymizer:
    return VaultPseudonymizer(keyring, vault, cache_size=cache_size,
                              invalidation_interval_s=invalidation_interval_s)
