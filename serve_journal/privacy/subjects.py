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

That path needs the tombstone. Independently of it, every cached key has a maximum age
(``max_key_age_s``, at most :data:`~serve_journal.privacy.vault.MAX_KEY_AGE_S`): an older entry is
never used but read again from the vault, and a per-process sweeper thread drops expired entries
from memory even when the replica is idle (:func:`expire_periodically`). So a forgotten key is
used for at most ``max_key_age_s`` and held for at most ``max_key_age_s + sweep_interval_s`` after
it was read, even by a replica that never saw the tombstone (idle, or pruned before it looked).
"""

from __future__ import annotations

import enum
import hmac
import logging
import os
import threading
import time
import weakref
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Protocol

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from serve_journal.privacy.keyring import Keyring, KeyringError
from serve_journal.privacy.pseudonymizer import Protected
from serve_journal.privacy.vault import MAX_KEY_AGE_S, SubjectKey, SubjectVault

__all__ = [
    "SWEEP_INTERVAL_S",
    "CacheStats",
    "VaultPseudonymizer",
    "VerifyStatus",
    "expire_periodically",
    "features_hmac",
]

log = logging.getLogger(__name__)

SWEEP_INTERVAL_S = 5.0
"""How often the sweeper thread drops expired keys from idle caches (default)."""

_FEATURES_PREFIX = b"features\0"
_SUBJECTS_PER_KEY = 4
"""Raw ids kept per cached key (ids whose ``str`` is equal share a key: ``7`` and ``"7"``)."""
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
    return hmac.digest(key, _FEATURES_PREFIX + encoded, "sha256").hex()


@dataclass
class CacheStats:
    """Counters of the subject key cache (for metrics)."""

    hits: int = 0
    misses: int = 0
    evicted_lru: int = 0
    evicted_forgotten: int = 0
    expired: int = 0
    """Keys dropped because they reached ``max_key_age_s`` (then read again when needed)."""
    refreshes: int = 0


@dataclass
class _Cached:
    key: SubjectKey
    token: str
    loaded_at: float
    tag: bytes
    """The key's tombstone tag."""
    feature_keys: dict[str, bytes] = field(default_factory=dict)
    subjects: list[str] = field(default_factory=list, repr=False)
    """The raw ids this entry is reachable by in :attr:`VaultPseudonymizer._by_subject`
    (memory only; never shown)."""


class Expiring(Protocol):
    """A cache the sweeper thread sweeps (:func:`expire_periodically`)."""

    sweep_interval_s: float

    def sweep(self) -> None:
        """Drop the entries older than the cache's maximum age (and whatever else is due)."""


class _Sweeper:
    """One daemon thread per process calling ``expire()`` on every registered cache.

    Holds the caches weakly (a cache that is no longer used goes away as usual). The thread is
    started on first registration in each process, and again after a fork.
    """

    def __init__(self) -> None:
        self._caches: weakref.WeakSet[Expiring] = weakref.WeakSet()
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._pid = 0

    def watch(self, cache: Expiring) -> None:
        with self._lock:
            new = cache not in self._caches
            if new:
                self._caches.add(cache)
            if self._pid != os.getpid():
                self._pid = os.getpid()
                threading.Thread(target=self._run, name="serve-journal-key-sweeper",
                                 daemon=True).start()
        if new:
            self._wake.set()  # it may want a shorter interval than the thread waits now

    def after_fork(self) -> None:
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._pid = 0

    def _interval(self) -> float:
        with self._lock:
            return min((c.sweep_interval_s for c in self._caches), default=SWEEP_INTERVAL_S)

    def _run(self) -> None:
        while True:
            self._wake.wait(self._interval())
            self._wake.clear()
            with self._lock:
                caches = list(self._caches)
            for cache in caches:
                try:
                    cache.sweep()
                except Exception as exc:  # noqa: BLE001 - the sweeper must survive; never the message
                    # Its expiry ran first (memory only); what failed is the keyring reload, e.g.
                    # of a runtime closed with its key files gone. Stop sweeping it: a cache in
                    # use registers itself again (expire_periodically) on its next vault read.
                    with self._lock:
                        self._caches.discard(cache)
                    log.warning("key cache sweep failed (%s); no longer swept until it is used "
                                "again", type(exc).__name__)
            del caches


_SWEEPER = _Sweeper()
os.register_at_fork(after_in_child=_SWEEPER.after_fork)


def expire_periodically(cache: Expiring) -> None:
    """Have this process's sweeper thread call ``cache.sweep()`` every
    ``cache.sweep_interval_s`` seconds (or more often), so expired keys leave memory even when
    nothing else touches the cache. Idempotent; the cache is held weakly."""
    _SWEEPER.watch(cache)


def _check_seconds(name: str, value: object, maximum: float | None = None) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or not value > 0:
        raise ValueError(f"{name} must be a positive number of seconds, got {value!r}")
    if maximum is not None and value > maximum:
        raise ValueError(f"{name} must be at most {maximum} s (the documented bound), got {value!r}")
    return float(value)


class VaultPseudonymizer:
    """Implements :class:`~serve_journal.privacy.pseudonymizer.Pseudonymizer` with a vault.

    Thread-safe; meant to be called in batches from the flusher's background thread. Pickling
    carries configuration only (keyring and vault configuration, cache settings): no key bytes
    and no cache.

    ``max_key_age_s`` (default and maximum :data:`~serve_journal.privacy.vault.MAX_KEY_AGE_S`)
    bounds how long a cached key is used before it is read from the vault again;
    ``sweep_interval_s`` how often an idle cache is swept; ``clock`` (monotonic seconds) is
    injectable for tests.
    """

    def __init__(self, keyring: Keyring, vault: SubjectVault, *, cache_size: int = 100_000,
                 invalidation_interval_s: float = 1.0, max_key_age_s: float = MAX_KEY_AGE_S,
                 sweep_interval_s: float = SWEEP_INTERVAL_S,
                 clock: Callable[[], float] = time.monotonic) -> None:
        if not isinstance(cache_size, int) or isinstance(cache_size, bool) or cache_size < 1:
            raise ValueError(f"cache_size must be a positive integer, got {cache_size!r}")
        self.keyring = keyring
        self.vault = vault
        self.cache_size = cache_size
        self.invalidation_interval_s = _check_seconds("invalidation_interval_s",
                                                      invalidation_interval_s)
        self.max_key_age_s = _check_seconds("max_key_age_s", max_key_age_s, MAX_KEY_AGE_S)
        self.sweep_interval_s = _check_seconds("sweep_interval_s", sweep_interval_s)
        self.clock = clock
        self.stats = CacheStats()
        self._lock = threading.RLock()
        self._cache: OrderedDict[bytes, _Cached] = OrderedDict()
        """blind index -> entry, least recently used first."""
        self._loaded: OrderedDict[bytes, float] = OrderedDict()
        """blind index -> time read from the vault, oldest first (for expiry)."""
        self._by_tag: dict[bytes, bytes] = {}
        """tombstone tag -> blind index of the cached keys."""
        self._by_subject: dict[str, _Cached] = {}
        """raw subject id -> its cached entry, so a subject seen before costs no blind-index
        HMAC. Memory only (never pickled, logged or shown); an id leaves it whenever its entry
        leaves the cache (:meth:`_drop`: forget, expiry, LRU), so a forgotten subject's token is
        never found here after its tombstone was seen or its key aged out."""
        # Taken before any key is cached, so no forget after a cached read can be missed.
        self._cursor = vault.latest_cursor()
        self._last_refresh = self._last_reload = clock()

    def __repr__(self) -> str:
        return (f"VaultPseudonymizer(vault={self.vault!r}, key_id={self.keyring.current_key_id!r}, "
                f"cache={len(self._cache)}/{self.cache_size})")

    def __reduce__(self):
        return (_rebuild, (self.keyring, self.vault, self.cache_size, self.invalidation_interval_s,
                           self.max_key_age_s, self.sweep_interval_s))

    # -- the Pseudonymizer protocol ------------------------------------------------------------

    def protect(self, subjects: Sequence[str | None],
                encoded_features: Sequence[bytes | None]) -> list[Protected]:
        """One :class:`Protected` per position; creates keys for subjects seen the first time."""
        tokens, digests, key_id = self.protect_columns(subjects, encoded_features)
        return [Protected(token, digest, key_id)
                for token, digest in zip(tokens, digests, strict=True)]

    def protect_columns(self, subjects: Sequence[str | None],
                        encoded_features: Sequence[bytes | None]
                        ) -> tuple[list[str | None], list[str | None], str]:
        """:meth:`protect` as columns: the subject tokens, the feature HMACs and the one key id
        they were all made under (what the finalizer writes, without an object per entry).

        Each distinct subject of the batch costs one cache look-up; the ones not cached (or
        too old) are read or created in one vault round trip."""
        if len(subjects) != len(encoded_features):
            raise ValueError(f"subjects and encoded_features must have the same length, got "
                             f"{len(subjects)} and {len(encoded_features)}")
        with self._lock:
            if self.clock() - self._last_refresh >= self.invalidation_interval_s:
                self.refresh_invalidations()
            self.expire()
            key_id = self.keyring.current_key_id
            data_key = self.keyring.data_key(key_id)
            distinct = dict.fromkeys(subjects)
            distinct.pop(None, None)
            cached = self._lookup(list(distinct))  # type: ignore[arg-type]
            # Per distinct subject: (token, features key under key_id).
            per_subject: dict[str | None, tuple[str | None, bytes]] = {None: (None, data_key)}
            for subject, entry in cached.items():
                fkey = entry.feature_keys.get(key_id)
                if fkey is None:
                    fkey = entry.feature_keys[key_id] = _features_key(data_key, entry.key.key)
                per_subject[subject] = (entry.token, fkey)
            digest = hmac.digest
            prefix = _FEATURES_PREFIX
            tokens: list[str | None] = []
            digests: list[str | None] = []
            add_token = tokens.append
            add_digest = digests.append
            for subject, encoded in zip(subjects, encoded_features, strict=True):
                token, fkey = per_subject[subject]
                add_token(token)
                add_digest(None if encoded is None else digest(fkey, prefix + encoded, "sha256").hex())
            return tokens, digests, key_id

    def _lookup(self, subjects: list[str]) -> dict[str, _Cached]:
        """The cached entries of ``subjects`` (distinct), reading or creating the others in one
        vault round trip."""
        found: dict[str, _Cached] = {}
        misses: list[str] = []
        now = self.clock()
        max_age = self.max_key_age_s
        cache = self._cache
        by_subject = self._by_subject
        for subject in subjects:
            exact = type(subject) is str  # only exact strs are remembered (no 1 == True games)
            entry = by_subject.get(subject) if exact else None
            if entry is None:
                index = self.vault.blind_index(subject)
                entry = cache.get(index)
                if entry is not None and exact and len(entry.subjects) < _SUBJECTS_PER_KEY:
                    entry.subjects.append(subject)
                    by_subject[subject] = entry
            else:
                index = entry.key.blind_index
            if entry is not None and now - entry.loaded_at >= max_age:
                self._drop(index)  # too old to use: read it again, as if never cached
                self.stats.expired += 1
                entry = None
            if entry is None:
                misses.append(subject)
            else:
                cache.move_to_end(index)
                found[subject] = entry
        self.stats.hits += len(found)
        self.stats.misses += len(misses)
        if misses:
            loaded_at = self.clock()
            for subject, key in self.vault.get_or_create_many(misses).items():
                entry = _Cached(key, key.token, loaded_at, key.tombstone_tag)
                self._drop(key.blind_index)
                cache[key.blind_index] = entry
                self._loaded[key.blind_index] = loaded_at
                self._by_tag[entry.tag] = key.blind_index
                if type(subject) is str:
                    entry.subjects.append(subject)
                    by_subject[subject] = entry
                found[subject] = entry
            while len(cache) > self.cache_size:
                self._drop(next(iter(cache)))
                self.stats.evicted_lru += 1
            expire_periodically(self)
        return found

    def _drop(self, index: bytes) -> _Cached | None:
        """Remove one cached key (all four maps); the entry, or ``None`` if not cached."""
        entry = self._cache.pop(index, None)
        if entry is not None:
            self._loaded.pop(index, None)
            self._by_tag.pop(entry.tag, None)
            for subject in entry.subjects:
                if self._by_subject.get(subject) is entry:
                    del self._by_subject[subject]
            entry.subjects.clear()
        return entry

    def expire(self) -> int:
        """Drop the cached keys read from the vault ``max_key_age_s`` ago or longer; how many.

        :meth:`protect` runs it, and so does the process's sweeper thread every
        ``sweep_interval_s`` (:func:`expire_periodically`), so an idle replica holds no key
        longer than ``max_key_age_s + sweep_interval_s`` either.
        """
        with self._lock:
            limit = self.clock() - self.max_key_age_s
            expired = 0
            while self._loaded:
                index, loaded_at = next(iter(self._loaded.items()))
                if loaded_at > limit:
                    break
                self._drop(index)
                expired += 1
            self.stats.expired += expired
            return expired

    def sweep(self) -> None:
        """What the sweeper thread runs: :meth:`expire`, and a keyring reload when none
        happened for ``max_key_age_s``, so that an idle replica also drops wrap keys destroyed
        by a rewrap (:meth:`Keyring.destroy_wrap_key`) within that bound."""
        self.expire()
        with self._lock:
            if self.clock() - self._last_reload >= self.max_key_age_s:
                self.keyring.reload()
                self._last_reload = self.clock()

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
                tags, cursor = self.vault.changes_since(self._cursor)
                for tag in tags:
                    index = self._by_tag.get(tag)
                    if index is not None and self._drop(index) is not None:
                        evicted += 1
                if cursor == self._cursor:
                    break
                self._cursor = cursor
            self.keyring.reload()
            self.stats.evicted_forgotten += evicted
            self.stats.refreshes += 1
            self._last_refresh = self._last_reload = self.clock()
            return evicted

    def cached_subjects(self) -> int:
        """Number of subject keys currently cached."""
        return len(self._cache)


def _rebuild(keyring: Keyring, vault: SubjectVault, cache_size: int,
             invalidation_interval_s: float, max_key_age_s: float = MAX_KEY_AGE_S,
             sweep_interval_s: float = SWEEP_INTERVAL_S) -> VaultPseudonymizer:
    return VaultPseudonymizer(keyring, vault, cache_size=cache_size,
                              invalidation_interval_s=invalidation_interval_s,
                              max_key_age_s=max_key_age_s, sweep_interval_s=sweep_interval_s)
