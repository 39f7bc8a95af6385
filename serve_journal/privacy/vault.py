"""Subject key vault: one random key per data subject, stored encrypted, never the raw id.

Rows are found by a *blind index*, ``HMAC-SHA256(index key, "subject-index\\0" || id)``, where the
index key is the keyring's ``subject-index`` purpose key; a subject key is stored wrapped with
AES-256-GCM under one of the keyring's wrap keys (``subject-wrap`` at first; :meth:`SubjectVault.
rewrap` moves every key to a fresh one and destroys the old), bound to its blind index. Deleting a
row (:meth:`SubjectVault.forget`) crypto-shreds the subject: every journal entry tokenised or
HMACed with that key becomes unlinkable and unverifiable. A forget also records a tombstone
(sequence number, a tag derived from the destroyed key, time: nothing that relates to the id) so
that running replicas evict cached keys (:meth:`changes_since`), and on SQLite truncates the WAL
so that no copy of the deleted row stays in it (docs/security.md, "Crypto-shredding").

Backends (:mod:`serve_journal.privacy.vault_sql`, one set of SQL statements for both): a SQLite
file (embedded default; WAL, busy timeout) and PostgreSQL (psycopg 3).
:meth:`SubjectVault.get_or_create_many` is one batch and is safe when several processes see a new
subject at once: ``INSERT .. ON CONFLICT DO NOTHING`` then ``SELECT``, so every process ends up
with the one key that won.
"""

from __future__ import annotations

import hmac
import logging
import os
import re
import secrets
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from serve_journal.errors import KeyringError, VaultError
from serve_journal.privacy.keyring import LEGACY_WRAP_KEY_ID, PURPOSE_SUBJECT_INDEX, Keyring
from serve_journal.privacy.vault_sql import (
    CHUNK,
    KeyRow,
    PostgresBackend,
    SqliteBackend,
    VaultBackend,
    WrapFenceMoved,
    mask_dsn,
)

__all__ = [
    "MAX_KEY_AGE_S",
    "MIN_TOMBSTONE_AGE_S",
    "RewrapReport",
    "SubjectKey",
    "SubjectVault",
    "VaultError",
    "subject_token_from_key",
    "tombstone_tag_from_key",
]

log = logging.getLogger(__name__)

MAX_KEY_AGE_S = 60.0
"""Longest time a process keeps using (or holding) a subject key it read from the vault before
reading it again: the bound on how long a forgotten key survives in any replica or replay cache,
whether or not the replica saw the tombstone (configurable lower, never higher)."""
TOMBSTONE_MARGIN_S = 60.0
MIN_TOMBSTONE_AGE_S = MAX_KEY_AGE_S + TOMBSTONE_MARGIN_S
""":meth:`SubjectVault.prune_tombstones` never deletes a tombstone younger than this."""

_NAMESPACE = re.compile(r"^[a-z_][a-z0-9_]{0,40}$")
_NONCE = 12
_KEY_BYTES = 32
_WRAPPED_BODY = _NONCE + _KEY_BYTES + 16
"""nonce || AES-GCM(key) || tag. A row wrapped under the first wrap key holds just this; under
a later wrap key ``w-<hex>`` it is prefixed with ``w-<hex>:``."""
_FENCE_TRIES = 5
_REWRAP_PASSES = 5
TOKEN_HEX_CHARS = 32
TOMBSTONE_TAG_BYTES = 16


def subject_token_from_key(key: bytes) -> str:
    """``subject_token`` = HMAC-SHA256(subject key, "token"), first 32 hex characters.

    It depends only on the subject's random key, so once the key is destroyed nobody (not even
    with every other key and the raw id) can derive the token from the id again.
    """
    return hmac.digest(key, b"token", "sha256").hex()[:TOKEN_HEX_CHARS]


def tombstone_tag_from_key(key: bytes) -> bytes:
    """What a forget's tombstone records: HMAC-SHA256(subject key, "tombstone"), 16 bytes.

    A replica holding the key can recognise it; once the key is destroyed nobody can relate
    the tag to the id, the blind index or the journal's tokens.
    """
    return hmac.digest(key, b"tombstone", "sha256")[:TOMBSTONE_TAG_BYTES]


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

    @property
    def tombstone_tag(self) -> bytes:
        """What the tombstone of this key's forget records (:func:`tombstone_tag_from_key`)."""
        return tombstone_tag_from_key(self.key)


@dataclass(frozen=True)
class RewrapReport:
    """What :meth:`SubjectVault.rewrap` did."""

    wrap_key_id: str
    """The wrap key every subject key is now wrapped under."""
    rewrapped: int
    """Subject keys re-encrypted."""
    destroyed: tuple[str, ...]
    """Wrap keys destroyed afterwards (empty with ``destroy_old=False``)."""


class SubjectVault:
    """Per-subject keys, batch get-or-create, forget with tombstones. Thread- and process-safe."""

    def __init__(self, backend: VaultBackend, keyring: Keyring) -> None:
        self._backend = backend
        self.keyring = keyring
        self._index_key = keyring.purpose_key(PURPOSE_SUBJECT_INDEX)
        self._fence: str | None = None
        """The wrap key new rows were last accepted under (the vault's fence, as last seen)."""

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
        return hmac.digest(self._index_key, b"subject-index\0" + _subject_bytes(subject_id),
                           "sha256")

    def get_many(self, subject_ids: Iterable[str]) -> dict[str, SubjectKey]:
        """Keys of the subjects that have one; never creates a key."""
        by_index = self._spellings(subject_ids)
        return {subject: key for row in self._backend.select(list(by_index))
                for key in (self._unwrap(row),) for subject in by_index[row.blind_index]}

    def get_or_create_many(self, subject_ids: Iterable[str]) -> dict[str, SubjectKey]:
        """Keys of all ``subject_ids``, creating missing ones; one batch, safe across processes."""
        by_index = self._spellings(subject_ids)
        found = {row.blind_index: row for row in self._backend.select(list(by_index))}
        missing = [index for index in by_index if index not in found]
        if missing:
            self._insert_new(missing)
            # Read back: where another process won the race, its key is the one to use.
            found.update({row.blind_index: row for row in self._backend.select(missing)})
        lost = [index for index in by_index if index not in found]
        ciphers: dict[str, AESGCM] = {}
        keys = {subject: key for index, row in found.items()
                for key in (self._unwrap(row, ciphers),) for subject in by_index[index]}
        if lost:  # a concurrent forget deleted a key we just created: create again
            keys.update(self.get_or_create_many(s for i in lost for s in by_index[i]))
        return keys

    def _spellings(self, subject_ids: Iterable[str]) -> dict[bytes, list[str]]:
        """Blind index -> the distinct ``subject_ids`` that name it: ``7`` and ``"7"`` are one
        subject, and a caller looks its key up under the spelling it holds."""
        by_index: dict[bytes, list[str]] = {}
        for subject in set(subject_ids):
            by_index.setdefault(self.blind_index(subject), []).append(subject)
        return by_index

    def get_by_tokens(self, tokens: Iterable[str]) -> dict[str, SubjectKey]:
        """Keys by subject token (what journal entries carry); missing ones were shredded."""
        return {row.token: self._unwrap(row) for row in self._backend.select_tokens(list(set(tokens)))}

    def forget(self, subject_id: str) -> str | None:
        """Delete the subject's key (crypto-shredding) and record a tombstone.

        Returns the deleted key's ``key_ref``, or ``None`` when the subject had no key (then no
        tombstone is needed: no process can hold a key that never existed). On SQLite the WAL
        is then checkpointed and truncated (:meth:`checkpoint`) so that the deleted row survives
        in no file of the vault; if a foreign connection blocks that, a warning is logged and
        the residue goes at the next checkpoint.
        """
        key_ref = self._backend.delete(self.blind_index(subject_id), time.time(),
                                       self._tombstone_tag)
        self._checkpoint_or_warn("forget")
        return key_ref

    def checkpoint(self) -> bool:
        """SQLite: checkpoint the WAL into the database file and truncate it to zero bytes, so
        deleted rows survive in no file (``secure_delete`` zeroes them in the pages). True when
        done. False when a foreign connection kept a read transaction open longer than the busy
        timeout, and always on PostgreSQL, whose residue (dead tuples, WAL, replicas, backups)
        only :meth:`rewrap` makes useless (docs/security.md)."""
        return self._backend.checkpoint() is True

    def _checkpoint_or_warn(self, what: str) -> None:
        if self._backend.checkpoint() is False:
            log.warning("%s: the vault's WAL could not be truncated now (a connection kept a read "
                        "transaction open longer than the busy timeout); deleted rows stay in it "
                        "until the next checkpoint (SubjectVault.checkpoint)", what)

    # -- wrap key rotation ---------------------------------------------------------------------

    def rewrap(self, wrap_key_id: str | None = None, *, destroy_old: bool = True) -> RewrapReport:
        """Re-encrypt every subject key under a fresh wrap key, then destroy the old wrap keys.

        ``wrap_key_id`` names a wrap key the keyring already holds; by default a new one is
        made (:meth:`Keyring.rotate_wrap_key`). Steps: the vault's wrap fence is moved to it
        (from then on no process adds a row under an older key: a stale one is refused, reloads
        its keyring and wraps again); every row under another key is re-encrypted (compare and
        set, so a concurrent forget or insert is never undone), a second scan checks none is
        left; the SQLite WAL is truncated; then, with ``destroy_old``, every other wrap key is
        destroyed (:meth:`Keyring.destroy_wrap_key`). Afterwards a copy of a row taken before
        (an old page, WAL segment, replica or backup) holds a key wrapped under a key that no
        longer exists: forgotten subjects' keys in those copies are unrecoverable.

        Every process using the vault must run a version with wrap fences (this one). Run one
        rewrap at a time. When several vault namespaces share one keyring, rewrap each with
        ``destroy_old=False`` under the same ``wrap_key_id`` and destroy the old keys last.
        Raises :class:`VaultError` (and destroys nothing) when a row does not unwrap.
        """
        target = wrap_key_id or self.keyring.rotate_wrap_key()
        self._wrap_key(target)  # it must resolve before anything moves
        self._backend.set_wrap_fence(target)
        self._fence = target
        rewrapped = 0
        for _ in range(_REWRAP_PASSES):
            stale_seen, after = 0, b""
            while rows := self._backend.scan(after, CHUNK):
                after = rows[-1].blind_index
                stale = [row for row in rows if _wrap_id_of(row.wrapped) != target]
                stale_seen += len(stale)
                if stale:
                    pairs = [(row, self._wrap(row.blind_index, self._unwrap(row).key, target))
                             for row in stale]
                    rewrapped += self._backend.replace_wrapped(pairs)
            if stale_seen == 0:
                break
        else:
            raise VaultError(f"rewrap: rows under older wrap keys kept appearing after "
                             f"{_REWRAP_PASSES} passes; no wrap key was destroyed")
        self._checkpoint_or_warn("rewrap")
        destroyed: list[str] = []
        if destroy_old:
            fence = self._backend.wrap_fence()
            if fence != target:
                raise VaultError(f"rewrap: the vault's wrap key moved to {fence!r} meanwhile "
                                 "(another rewrap?); no wrap key was destroyed, run it again")
            for old in self.keyring.wrap_key_ids():
                if old != target:
                    self.keyring.destroy_wrap_key(old)
                    destroyed.append(old)
        return RewrapReport(target, rewrapped, tuple(destroyed))

    # -- invalidation --------------------------------------------------------------------------

    def changes_since(self, cursor: int, limit: int = 10_000) -> tuple[list[bytes], int]:
        """Tombstone tags (:attr:`SubjectKey.tombstone_tag`) of the keys destroyed after
        ``cursor``, and the cursor to pass next time."""
        rows = self._backend.tombstones_since(cursor, limit)
        if not rows:
            return [], cursor
        return [index for _, index in rows], rows[-1][0]

    def latest_cursor(self) -> int:
        """The cursor as of now: :meth:`changes_since` of it reports only later forgets."""
        return self._backend.latest_cursor()

    def prune_tombstones(self, older_than_s: float, *, now: float | None = None) -> int:
        """Delete tombstones older than ``older_than_s`` seconds, but never one younger than
        :data:`MIN_TOMBSTONE_AGE_S` (the key age bound plus a margin); returns how many were
        deleted. ``now`` (epoch seconds) defaults to the current time."""
        age = max(float(older_than_s), MIN_TOMBSTONE_AGE_S)
        return self._backend.prune_tombstones((time.time() if now is None else now) - age)

    def count(self) -> int:
        """Number of subject keys held."""
        return self._backend.count()

    # -- wrapping ------------------------------------------------------------------------------

    def _insert_new(self, indexes: list[bytes]) -> None:
        """Insert fresh keys for ``indexes``, wrapped under the key the vault's fence names."""
        keys = {index: secrets.token_bytes(_KEY_BYTES) for index in indexes}
        refs = {index: "sk-" + secrets.token_hex(8) for index in indexes}
        for _ in range(_FENCE_TRIES):
            wrap_id = self._fence or self.keyring.current_wrap_key_id
            aead = AESGCM(self._wrap_key(wrap_id))  # one cipher for the batch
            rows = [KeyRow(index, refs[index], subject_token_from_key(key),
                           self._wrap(index, key, wrap_id, aead)) for index, key in keys.items()]
            try:
                self._backend.insert_missing(rows, time.time(), wrap_id)
            except WrapFenceMoved as moved:  # rewrapped meanwhile: wrap again under its key
                self._fence = moved.wrap_id
                continue
            self._fence = wrap_id
            return
        raise VaultError("the vault's wrap key kept changing while new subject keys were "
                         "inserted; try again")

    def _wrap_key(self, wrap_id: str) -> bytes:
        try:
            return self.keyring.wrap_key(wrap_id)
        except KeyringError as exc:
            raise VaultError(f"this vault needs wrap key {wrap_id!r}: {exc}") from None

    def _wrap(self, index: bytes, key: bytes, wrap_id: str, aead: AESGCM | None = None) -> bytes:
        nonce = secrets.token_bytes(_NONCE)
        aead = aead or AESGCM(self._wrap_key(wrap_id))
        body = nonce + aead.encrypt(nonce, key, _aad(index))
        return body if wrap_id == LEGACY_WRAP_KEY_ID else wrap_id.encode("ascii") + b":" + body

    def _unwrap(self, row: KeyRow, ciphers: dict[str, AESGCM] | None = None) -> SubjectKey:
        """The row's key. ``ciphers`` (wrap key id -> cipher) is shared by the rows of one
        batch, so a batch builds one cipher per wrap key, not one per row."""
        wrap_id = _wrap_id_of(row.wrapped)
        body = row.wrapped[-_WRAPPED_BODY:]
        aead = ciphers.get(wrap_id) if ciphers is not None else None
        if aead is None:
            try:
                aead = AESGCM(self.keyring.wrap_key(wrap_id))
            except KeyringError:
                raise VaultError(f"subject key {row.key_ref} is wrapped under wrap key {wrap_id!r}, "
                                 "which this keyring does not hold (destroyed, or another keyring)"
                                 ) from None
            if ciphers is not None:
                ciphers[wrap_id] = aead
        try:
            key = aead.decrypt(body[:_NONCE], body[_NONCE:], _aad(row.blind_index))
        except InvalidTag:
            raise VaultError(f"subject key {row.key_ref} does not unwrap: wrong keyring for this "
                             "vault, or the row was altered") from None
        return SubjectKey(row.key_ref, row.blind_index, key)

    def _tombstone_tag(self, row: KeyRow) -> bytes:
        try:
            return self._unwrap(row).tombstone_tag
        except VaultError:  # nobody with this keyring can hold that key: any tag will do
            return secrets.token_bytes(TOMBSTONE_TAG_BYTES)


def _aad(index: bytes) -> bytes:
    return b"subject-key\0" + index


def _wrap_id_of(wrapped: bytes) -> str:
    """The wrap key a stored wrapped key is under (see :data:`_WRAPPED_BODY`)."""
    if len(wrapped) == _WRAPPED_BODY:
        return LEGACY_WRAP_KEY_ID
    head = wrapped[:-_WRAPPED_BODY]
    if len(wrapped) < _WRAPPED_BODY or not head.endswith(b":"):
        return "<malformed>"
    return head[:-1].decode("ascii", "replace")


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

