"""Verifiers: re-check journaled feature HMACs with the keys the replicas used.

A :class:`Verifier` turns subject ids into the tokens entries carry and checks the HMAC of
replayed features. Both implementations compute tokens and HMACs through
:mod:`serve_journal.privacy` (the pseudonymizers and :func:`~serve_journal.privacy.subjects.
features_hmac`), never with their own copy of the key hierarchy:

- :class:`StaticKeyVerifier` for journals written with one static HMAC key;
- :class:`VaultVerifier` for journals written with per-subject keys from the vault.

Verifiers travel into Ray tasks: they pickle as key *locations* (a key file, an environment
variable, a keyring folder and vault URL), never as key bytes.

Subject keys are read from the vault for every batch; the only thing kept across batches is the
per-process cache of derived feature keys (:class:`DerivedKeyCache`), whose entries expire after
:data:`~serve_journal.privacy.vault.MAX_KEY_AGE_S` and are swept from memory even while replay is
idle, so a forgotten subject's key material leaves a replay process within that bound too.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Sequence
from typing import Any, Protocol, runtime_checkable

from serve_journal.config import JournalConfig
from serve_journal.errors import KeyringError
from serve_journal.privacy.keyring import Keyring
from serve_journal.privacy.pseudonymizer import StaticKeyPseudonymizer

# _features_key is the HKDF step of features_hmac; it is not public API of privacy.subjects yet
# (docs/replay.md, "Keys"), and replay needs it to cache derived keys across entries.
from serve_journal.privacy.subjects import (
    SWEEP_INTERVAL_S,
    VaultPseudonymizer,
    _features_key,
    expire_periodically,
    features_hmac,
)
from serve_journal.privacy.vault import MAX_KEY_AGE_S, SubjectVault
from serve_journal.replay.statuses import MISMATCH, MISSING, SHREDDED, UNKNOWN_KEY, VERIFIED
from serve_journal.storage import local_root

__all__ = ["DerivedKeyCache", "StaticKeyVerifier", "VaultVerifier", "Verifier"]


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


# -- one static key ----------------------------------------------------------------------------


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
        self.key_id = key_id
        self._pseudonymizer = StaticKeyPseudonymizer(key_id, key)
        self._source = _source

    def __repr__(self) -> str:
        return f"StaticKeyVerifier(key_id={self.key_id!r})"

    def __reduce__(self) -> tuple[Any, tuple[Any, ...]]:
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
        """The pseudonymizer's token of each subject."""
        protected = self._pseudonymizer.protect(list(subject_ids), [None] * len(subject_ids))
        return [p.subject_token for p in protected]

    def verify(self, subject_id: str | None, encoded: bytes, key_id: str, expected_hmac: str) -> str:
        """One entry (the protocol's batch method does the same for many)."""
        return self.verify_batch([subject_id], [encoded], [key_id], [expected_hmac], [None])[0]

    def verify_batch(self, subject_ids: Sequence[str | None], encoded: Sequence[bytes],
                     key_ids: Sequence[str | None], expected: Sequence[str],
                     subject_tokens: Sequence[str | None]) -> list[str]:
        """Per position: the pseudonymizer's HMAC of ``encoded`` compared with ``expected``."""
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
        """Always ``missing``: a static key cannot be shredded."""
        return [MISSING] * len(subject_tokens)


def _static_from_file(path: str, key_id: str | None) -> StaticKeyVerifier:
    return StaticKeyVerifier.from_key_file(path, key_id)


def _static_from_env(variable: str, id_variable: str) -> StaticKeyVerifier:
    return StaticKeyVerifier.from_env(variable, id_variable)


# -- per-subject keys from the vault -------------------------------------------------------------


class DerivedKeyCache:
    """HKDF(data key || subject key) by (data key, subject key): HKDF costs more than the HMAC.

    Only keys the vault returned for the current batch are looked up, so a forgotten subject
    (no key in the vault) is never *used* from here; and no entry is *kept* longer than
    ``max_age_s`` after it was derived (dropped on the next use, or by the process's sweeper
    thread every ``sweep_interval_s`` while nothing uses it), nor beyond ``max_entries``
    (oldest first). ``clock`` (monotonic seconds) is injectable for tests.
    """

    def __init__(self, max_entries: int = 200_000, *, max_age_s: float = MAX_KEY_AGE_S,
                 sweep_interval_s: float = SWEEP_INTERVAL_S,
                 clock: Callable[[], float] = time.monotonic) -> None:
        if not 0 < max_age_s <= MAX_KEY_AGE_S:
            raise ValueError(f"max_age_s must be in (0, {MAX_KEY_AGE_S}], got {max_age_s!r}")
        self.max_entries = max_entries
        self.max_age_s = float(max_age_s)
        self.sweep_interval_s = float(sweep_interval_s)
        self.clock = clock
        self._lock = threading.Lock()
        self._entries: OrderedDict[tuple[bytes, bytes], tuple[bytes, float]] = OrderedDict()
        """(data key, subject key) -> (derived key, time derived), oldest first."""

    def __repr__(self) -> str:
        return f"DerivedKeyCache({len(self)}/{self.max_entries}, max_age_s={self.max_age_s})"

    def __len__(self) -> int:
        return len(self._entries)

    def get(self, data_key: bytes, subject_key: bytes) -> bytes:
        """The derived feature key, from the cache when it is young enough."""
        cache_key = (data_key, subject_key)
        with self._lock:
            now = self.clock()
            self._expire(now)
            found = self._entries.get(cache_key)
            if found is not None:
                return found[0]
            derived = _features_key(data_key, subject_key)
            self._entries[cache_key] = (derived, now)
            while len(self._entries) > self.max_entries:
                self._entries.popitem(last=False)
        expire_periodically(self)
        return derived

    def expire(self) -> int:
        """Drop the entries derived ``max_age_s`` ago or longer; how many were dropped."""
        with self._lock:
            return self._expire(self.clock())

    def sweep(self) -> None:
        """What the process's sweeper thread runs: :meth:`expire`."""
        self.expire()

    def _expire(self, now: float) -> int:
        limit = now - self.max_age_s
        dropped = 0
        while self._entries:
            _, derived_at = next(iter(self._entries.values()))
            if derived_at > limit:
                break
            self._entries.popitem(last=False)
            dropped += 1
        return dropped


_FEATURE_KEYS = DerivedKeyCache()
"""The process's cache, shared by every :class:`VaultVerifier` (Ray tasks reuse workers)."""


def _subject_features_hmac(encoded: bytes, data_key: bytes, subject_key: bytes,
                           cache: DerivedKeyCache | None = None) -> str:
    """``features_hmac(encoded, data_key, subject_key)`` with the derived key cached.

    :func:`~serve_journal.privacy.subjects.features_hmac` with a subject key is the HMAC keyed
    by the derived key, which is what it computes when given that key and no subject key.
    """
    cache = cache if cache is not None else _FEATURE_KEYS
    return features_hmac(encoded, cache.get(data_key, subject_key))


class VaultVerifier:
    """Verifier for journals written with :class:`~serve_journal.privacy.VaultPseudonymizer`.

    Looks subject keys up in batches (one vault query per batch, not per entry). A subject whose
    key was destroyed, or whose current key made a different token than the entry carries (the
    subject was forgotten and came back), is ``shredded``. Pickles as configuration (keyring and
    vault locations), like the pseudonymizer. Derived feature keys are cached in
    ``derived_keys`` (default: the process's :class:`DerivedKeyCache`); no subject key is kept
    across batches.
    """

    def __init__(self, pseudonymizer: VaultPseudonymizer, *,
                 derived_keys: DerivedKeyCache | None = None) -> None:
        self.pseudonymizer = pseudonymizer
        self.derived_keys = derived_keys if derived_keys is not None else _FEATURE_KEYS

    def __repr__(self) -> str:
        return f"VaultVerifier({self.pseudonymizer!r})"

    def __reduce__(self) -> tuple[Any, tuple[Any, ...]]:
        return (VaultVerifier, (self.pseudonymizer,))

    @classmethod
    def from_journal(cls, journal_uri: str, *, privacy_dir: str | None = None,
                     vault_url: str | None = None) -> VaultVerifier:
        """The keyring and vault the replicas of ``journal_uri`` use (same defaults as the wrapper)."""
        config = JournalConfig(model="unused", journal_uri=local_root(journal_uri) or journal_uri,
                               privacy_dir=privacy_dir, vault_url=vault_url)
        directory = config.resolved_privacy_dir()
        if not os.path.isdir(directory):
            raise FileNotFoundError(f"privacy_dir {directory} does not exist; pass the folder of "
                                    "the keyring the replicas used (--privacy-dir)")
        keyring = Keyring.local_default(directory)
        vault = (SubjectVault.open(vault_url, keyring) if vault_url
                 else SubjectVault.local_default(directory, keyring))
        return cls(VaultPseudonymizer(keyring, vault))

    def tokens_for(self, subject_ids: Sequence[str]) -> list[str | None]:
        """Each subject's current token; ``None`` when it has no key (never seen, or forgotten)."""
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
        """What :meth:`verify` gives per position, with one vault query for the whole batch."""
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
                actual = _subject_features_hmac(enc, data_key, key.key, self.derived_keys)
            out.append(VERIFIED if hmac.compare_digest(actual, want) else MISMATCH)
        return out

    def unlinked_status(self, subject_tokens: Sequence[str]) -> list[str]:
        """``missing`` when the token's key still exists, ``shredded`` when it was destroyed."""
        unique = list(dict.fromkeys(subject_tokens))
        live = self.pseudonymizer.vault.get_by_tokens(unique) if unique else {}
        return [MISSING if t in live else SHREDDED for t in subject_tokens]
