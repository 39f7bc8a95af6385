"""Subject key vault: one random key per data subject, stored encrypted, never the raw id.

Rows are found by a *blind index*, ``HMAC-SHA256(index key, "subject-index\\0" || id)``, where the
index key is the keyring's ``subject-index`` purpose key; a subject key is stored wrapped with
AES-256-GCM under the keyring's ``subject-wrap`` key, bound to its blind index. Deleting a row
(:meth:`SubjectVault.forget`) crypto-shreds the subject: every journal entry tokenised or HMACed
with that key becomes unlinkable and unverifiable. A forget also records a tombstone (sequence
number, blind index, time) so that running replicas evict cached keys (:meth:`changes_since`).

Backends (:mod:`serve_journal.privacy.vault_sql`, one set of SQL statements for both): a SQLite
file (embedded default; WAL, busy timeout) and PostgreSQL (psycopg 3).
:meth:`SubjectVault.get_or_create_many` is one batch and is safe when several processes see a new
subject at once: ``INSERT .. ON CONFLICT DO NOTHING`` then ``SELECT``, so every process ends up
with the one key that won.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import re
import secrets
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from serve_journal.errors import VaultError
from serve_journal.privacy.keyring import PURPOSE_SUBJECT_INDEX, PURPOSE_SUBJECT_WRAP, Keyring
from serve_journal.privacy.vault_sql import (
    KeyRow,
    PostgresBackend,
    SqliteBackend,
    VaultBackend,
    mask_dsn,
)

__all__ = ["SubjectKey", "SubjectVault", "VaultError", "subject_token_from_key"]

_NAMESPACE = re.compile(r"^[a-z_][a-z0-9_]{0,40}$")
_NONCE = 12
TOKEN_HEX_CHARS = 32


def subject_token_from_key(key: bytes) -> str:
    """``subject_token`` = HMAC-SHA256(subject key, "token"), first 32 hex characters.

    It depends only on the subject's random key, so once the key is destroyed nobody (not even
    with every other key and the raw id) can derive the token from the id again.
    """
    return hmac.new(key, b"token", hashlib.sha256).hexdigest()[:TOKEN_HEX_CHARS]


@dataclass(frozen=True, repr=False)
class SubjectKey:
    """One subject's key as held in memory; ``repr`` shows the key reference only."""

    key_ref: str
    """Random id of this key (``sk-<hex>``): names it in receipts without naming the subject."""
    blind_index: bytes
    key: bytes

    def __repr__(self) -> str:
        return f"SubjectKey(key_ref={self.key_ref!r})"

    @property
    def token(self) -> str:
        """The subject token journal entries carry for this key."""
        return subject_token_from_key(self.key)


class SubjectVault:
    """Per-subject keys, batch get-or-create, forget with tombstones. Thread- and process-safe."""

    def __init__(self, backend: VaultBackend, keyring: Keyring) -> None:
        self._backend = backend
        self.keyring = keyring
        self._index_key = keyring.purpose_key(PURPOSE_SUBJECT_INDEX)
        self._wrap = AESGCM(keyring.purpose_key(PURPOSE_SUBJECT_WRAP))

    # -- construction --------------------------------------------------------------------------

    @classmethod
    def sqlite(cls, path: str | os.PathLike[str], keyring: Keyring, *,
               namespace: str = "serve_journal", busy_timeout_s: float = 30.0) -> SubjectVault:
        """A vault in a SQLite file (created with mode 0600); the embedded default."""
        return cls(SqliteBackend(os.fspath(path), _check_namespace(namespace), busy_timeout_s),
                   keyring)

    @classmethod
    def postgres(cls, dsn: str, keyring: Keyring, *, namespace: str = "serve_journal") -> SubjectVault:
        """A vault in PostgreSQL (psycopg 3). Put the password in PGPASSWORD or ~/.pgpass, not the DSN,
        if the vault is pickled to other processes."""
        return cls(PostgresBackend(dsn, _check_namespace(namespace)), keyring)

    @classmethod
    def open(cls, url: str, keyring: Keyring, *, namespace: str = "serve_journal") -> SubjectVault:
        """``postgresql://..`` / ``postgres://..`` for PostgreSQL; a path or ``sqlite:///path`` else."""
        if url.startswith(("postgresql://", "postgres://")):
            return cls.postgres(url, keyring, namespace=namespace)
        path = url[len("sqlite://"):] if url.startswith("sqlite://") else url
        return cls.sqlite(path, keyring, namespace=namespace)

    @classmethod
    def local_default(cls, directory: str | os.PathLike[str], keyring: Keyring) -> SubjectVault:
        """The embedded default vault: ``<directory>/vault.sqlite3``."""
        os.makedirs(directory, mode=0o700, exist_ok=True)
        return cls.sqlite(os.path.join(os.fspath(directory), "vault.sqlite3"), keyring)

    def __repr__(self) -> str:
        kind, where, namespace = self._backend.config()
        if kind == "postgres":
            where = mask_dsn(where)
        return f"SubjectVault({kind}, {where!r}, namespace={namespace!r})"

    def __reduce__(self) -> tuple[Callable[..., SubjectVault], tuple[str, str, str, Keyring]]:
        kind, where, namespace = self._backend.config()
        if kind == "postgres" and _dsn_has_password(where):
            raise TypeError("this SubjectVault's DSN holds a password and must not travel in a pickle; "
                            "put the password in PGPASSWORD or ~/.pgpass instead")
        return (_reopen, (kind, where, namespace, self.keyring))

    def close(self) -> None:
        """Close this process's connection (reopened on next use)."""
        self._backend.close()

    # -- keys ----------------------------------------------------------------------------------

    def blind_index(self, subject_id: str) -> bytes:
        """The vault's row id for ``subject_id``: a keyed HMAC, not reversible without the index key."""
        return hmac.new(self._index_key, b"subject-index\0" + _subject_bytes(subject_id),
                        hashlib.sha256).digest()

    def get_many(self, subject_ids: Iterable[str]) -> dict[str, SubjectKey]:
        """Keys of the subjects that have one; never creates a key."""
        by_index = {self.blind_index(s): s for s in set(subject_ids)}
        return {by_index[row.blind_index]: self._unwrap(row)
                for row in self._backend.select(list(by_index))}

    def get_or_create_many(self, subject_ids: Iterable[str]) -> dict[str, SubjectKey]:
        """Keys of all ``subject_ids``, creating missing ones; one batch, safe across processes."""
        by_index = {self.blind_index(s): s for s in set(subject_ids)}
        found = {row.blind_index: row for row in self._backend.select(list(by_index))}
        missing = [index for index in by_index if index not in found]
        if missing:
            new_rows = [self._new_row(index) for index in missing]
            self._backend.insert_missing(new_rows, time.time())
            # Read back: where another process won the race, its key is the one to use.
            found.update({row.blind_index: row for row in self._backend.select(missing)})
        lost = [index for index in by_index if index not in found]
        if lost:  # a concurrent forget deleted a key we just created: create again
            return {**{by_index[i]: self._unwrap(r) for i, r in found.items()},
                    **self.get_or_create_many(by_index[i] for i in lost)}
        return {by_index[index]: self._unwrap(row) for index, row in found.items()}

    def get_by_tokens(self, tokens: Iterable[str]) -> dict[str, SubjectKey]:
        """Keys by subject token (what journal entries carry); missing ones were shredded."""
        return {row.token: self._unwrap(row) for row in self._backend.select_tokens(list(set(tokens)))}

    def forget(self, subject_id: str) -> str | None:
        """Delete the subject's key (crypto-shredding) and record a tombstone.

        Returns the deleted key's ``key_ref``, or ``None`` when the subject had no key.
        """
        return self._backend.delete(self.blind_index(subject_id), time.time())

    # -- invalidation --------------------------------------------------------------------------

    def changes_since(self, cursor: int, limit: int = 10_000) -> tuple[list[bytes], int]:
        """Blind indexes forgotten after ``cursor`` and the cursor to pass next time."""
        rows = self._backend.tombstones_since(cursor, limit)
        if not rows:
            return [], cursor
        return [index for _, index in rows], rows[-1][0]

    def latest_cursor(self) -> int:
        """The cursor as of now: :meth:`changes_since` of it reports only later forgets."""
        return self._backend.latest_cursor()

    def prune_tombstones(self, older_than_s: float) -> int:
        """Delete tombstones older than ``older_than_s`` seconds (longer than any replica's
        invalidation interval); returns how many were deleted."""
        return self._backend.prune_tombstones(time.time() - older_than_s)

    def count(self) -> int:
        """Number of subject keys held."""
        return self._backend.count()

    # -- wrapping ------------------------------------------------------------------------------

    def _new_row(self, index: bytes) -> KeyRow:
        key = secrets.token_bytes(32)
        nonce = secrets.token_bytes(_NONCE)
        wrapped = nonce + self._wrap.encrypt(nonce, key, b"subject-key\0" + index)
        return KeyRow(index, "sk-" + secrets.token_hex(8), subject_token_from_key(key), wrapped)

    def _unwrap(self, row: KeyRow) -> SubjectKey:
        try:
            key = self._wrap.decrypt(row.wrapped[:_NONCE], row.wrapped[_NONCE:],
                                     b"subject-key\0" + row.blind_index)
        except InvalidTag:
            raise VaultError(f"subject key {row.key_ref} does not unwrap: wrong keyring for this "
                             "vault, or the row was altered") from None
        return SubjectKey(row.key_ref, row.blind_index, key)


def _subject_bytes(subject_id: str) -> bytes:
    if isinstance(subject_id, bool) or not isinstance(subject_id, str | int):
        raise TypeError(f"subject id must be str (or int), got {type(subject_id).__name__}")
    # surrogatepass: a malformed id from the wire still has one stable identity
    return str(subject_id).encode("utf-8", "surrogatepass")


def _check_namespace(namespace: str) -> str:
    if not isinstance(namespace, str) or not _NAMESPACE.match(namespace):
        raise ValueError(f"namespace must match {_NAMESPACE.pattern} (it prefixes table names), "
                         f"got {namespace!r}")
    return namespace


def _dsn_has_password(dsn: str) -> bool:
    return mask_dsn(dsn) != dsn


def _reopen(kind: str, where: str, namespace: str, keyring: Keyring) -> SubjectVault:
    if kind == "sqlite":
        return SubjectVault.sqlite(where, keyring, namespace=namespace)
    return SubjectVault.postgres(where, keyring, namespace=namespace)

