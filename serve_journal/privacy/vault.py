"""Subject key vault: one random key per data subject, stored encrypted, never the raw id.

Rows are found by a *blind index*, ``HMAC-SHA256(index key, "subject-index\\0" || id)``, where the
index key is the keyring's ``subject-index`` purpose key; a subject key is stored wrapped with
AES-256-GCM under the keyring's ``subject-wrap`` key, bound to its blind index. Deleting a row
(:meth:`SubjectVault.forget`) crypto-shreds the subject: every journal entry tokenised or HMACed
with that key becomes unlinkable and unverifiable. A forget also records a tombstone (sequence
number, blind index, time) so that running replicas evict cached keys (:meth:`changes_since`).

Backends: a SQLite file (embedded default; WAL, busy timeout) and PostgreSQL (psycopg 3).
:meth:`SubjectVault.get_or_create_many` is one batch and is safe when several processes see a new
subject at once: ``INSERT .. ON CONFLICT DO NOTHING`` then ``SELECT``, so every process ends up
with the one key that won.
"""

from __future__ import annotations

import contextlib
import hashlib
import hmac
import os
import re
import secrets
import sqlite3
import threading
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from serve_journal.errors import VaultError
from serve_journal.privacy.keyring import PURPOSE_SUBJECT_INDEX, PURPOSE_SUBJECT_WRAP, Keyring

__all__ = ["SubjectKey", "SubjectVault", "VaultError", "subject_token_from_key"]

_NAMESPACE = re.compile(r"^[a-z_][a-z0-9_]{0,40}$")
_CHUNK = 500
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


@dataclass(frozen=True)
class _Row:
    blind_index: bytes
    key_ref: str
    token: str
    wrapped: bytes


class _Backend(Protocol):
    def select(self, indexes: Sequence[bytes]) -> list[_Row]: ...
    def select_tokens(self, tokens: Sequence[str]) -> list[_Row]: ...
    def insert_missing(self, rows: Sequence[_Row], created: float) -> None: ...
    def delete(self, index: bytes, deleted_at: float) -> str | None: ...
    def tombstones_since(self, cursor: int, limit: int) -> list[tuple[int, bytes]]: ...
    def latest_cursor(self) -> int: ...
    def count(self) -> int: ...
    def prune_tombstones(self, before: float) -> int: ...
    def close(self) -> None: ...
    def config(self) -> tuple[str, str, str]: ...


class SubjectVault:
    """Per-subject keys, batch get-or-create, forget with tombstones. Thread- and process-safe."""

    def __init__(self, backend: _Backend, keyring: Keyring) -> None:
        self._backend = backend
        self.keyring = keyring
        self._index_key = keyring.purpose_key(PURPOSE_SUBJECT_INDEX)
        self._wrap = AESGCM(keyring.purpose_key(PURPOSE_SUBJECT_WRAP))

    # -- construction --------------------------------------------------------------------------

    @classmethod
    def sqlite(cls, path: str | os.PathLike[str], keyring: Keyring, *,
               namespace: str = "serve_journal", busy_timeout_s: float = 30.0) -> SubjectVault:
        """A vault in a SQLite file (created with mode 0600); the embedded default."""
        return cls(_SqliteBackend(os.fspath(path), _check_namespace(namespace), busy_timeout_s),
                   keyring)

    @classmethod
    def postgres(cls, dsn: str, keyring: Keyring, *, namespace: str = "serve_journal") -> SubjectVault:
        """A vault in PostgreSQL (psycopg 3). Put the password in PGPASSWORD or ~/.pgpass, not the DSN,
        if the vault is pickled to other processes."""
        return cls(_PostgresBackend(dsn, _check_namespace(namespace)), keyring)

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
            where = _mask_dsn(where)
        return f"SubjectVault({kind}, {where!r}, namespace={namespace!r})"

    def __reduce__(self):
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

    def _new_row(self, index: bytes) -> _Row:
        key = secrets.token_bytes(32)
        nonce = secrets.token_bytes(_NONCE)
        wrapped = nonce + self._wrap.encrypt(nonce, key, b"subject-key\0" + index)
        return _Row(index, "sk-" + secrets.token_hex(8), subject_token_from_key(key), wrapped)

    def _unwrap(self, row: _Row) -> SubjectKey:
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


def _mask_dsn(dsn: str) -> str:
    return re.sub(r"(://[^:/@]*:)[^@]*@", r"\1***@", re.sub(r"(password\s*=\s*)\S+", r"\1***", dsn))


def _dsn_has_password(dsn: str) -> bool:
    return _mask_dsn(dsn) != dsn


def _reopen(kind: str, where: str, namespace: str, keyring: Keyring) -> SubjectVault:
    if kind == "sqlite":
        return SubjectVault.sqlite(where, keyring, namespace=namespace)
    return SubjectVault.postgres(where, keyring, namespace=namespace)


def _chunks(items: Sequence[Any]) -> Iterable[Sequence[Any]]:
    for start in range(0, len(items), _CHUNK):
        yield items[start:start + _CHUNK]


# -- SQLite ------------------------------------------------------------------------------------


class _SqliteBackend:
    def __init__(self, path: str, namespace: str, busy_timeout_s: float) -> None:
        self.path = path
        self.namespace = namespace
        self.busy_timeout_s = busy_timeout_s
        self.keys = f"{namespace}_subject_keys"
        self.tombs = f"{namespace}_tombstones"
        self._lock = threading.Lock()
        self._conn: sqlite3.Connection | None = None
        self._pid = 0
        with self._lock:
            self._connection()

    def config(self) -> tuple[str, str, str]:
        return ("sqlite", self.path, self.namespace)

    def _connection(self) -> sqlite3.Connection:
        if self._conn is not None and self._pid == os.getpid():
            return self._conn
        # A connection inherited through fork is never reused; open our own.
        parent = os.path.dirname(os.path.abspath(self.path))
        os.makedirs(parent, exist_ok=True)
        with contextlib.suppress(FileExistsError):
            os.close(os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))
        conn = sqlite3.connect(self.path, timeout=self.busy_timeout_s, isolation_level=None,
                               check_same_thread=False)
        conn.execute(f"PRAGMA busy_timeout = {int(self.busy_timeout_s * 1000)}")
        conn.execute("PRAGMA journal_mode = WAL")
        conn.execute("PRAGMA synchronous = FULL")
        conn.execute(
            f"CREATE TABLE IF NOT EXISTS {self.keys} (blind_index BLOB PRIMARY KEY, "
            "key_ref TEXT NOT NULL UNIQUE, token TEXT NOT NULL UNIQUE, wrapped BLOB NOT NULL, "
            "created REAL NOT NULL)"
        )
        conn.execute(
            f"CREATE TABLE IF NOT EXISTS {self.tombs} (seq INTEGER PRIMARY KEY AUTOINCREMENT, "
            "blind_index BLOB NOT NULL, deleted_at REAL NOT NULL)"
        )
        self._conn, self._pid = conn, os.getpid()
        return conn

    def close(self) -> None:
        with self._lock:
            if self._conn is not None and self._pid == os.getpid():
                self._conn.close()
            self._conn = None

    def _select_where(self, column: str, values: Sequence[Any]) -> list[_Row]:
        out = []
        with self._lock:
            conn = self._connection()
            for chunk in _chunks(values):
                marks = ",".join("?" * len(chunk))
                out += [_Row(bytes(r[0]), r[1], r[2], bytes(r[3])) for r in conn.execute(
                    f"SELECT blind_index, key_ref, token, wrapped FROM {self.keys} "
                    f"WHERE {column} IN ({marks})", list(chunk))]
        return out

    def select(self, indexes: Sequence[bytes]) -> list[_Row]:
        return self._select_where("blind_index", indexes)

    def select_tokens(self, tokens: Sequence[str]) -> list[_Row]:
        return self._select_where("token", tokens)

    def insert_missing(self, rows: Sequence[_Row], created: float) -> None:
        with self._lock:
            conn = self._connection()
            conn.execute("BEGIN IMMEDIATE")
            try:
                conn.executemany(
                    f"INSERT INTO {self.keys} (blind_index, key_ref, token, wrapped, created) "
                    "VALUES (?, ?, ?, ?, ?) ON CONFLICT DO NOTHING",
                    [(r.blind_index, r.key_ref, r.token, r.wrapped, created) for r in rows])
                conn.execute("COMMIT")
            except BaseException:
                conn.execute("ROLLBACK")
                raise

    def delete(self, index: bytes, deleted_at: float) -> str | None:
        with self._lock:
            conn = self._connection()
            conn.execute("BEGIN IMMEDIATE")
            try:
                row = conn.execute(f"DELETE FROM {self.keys} WHERE blind_index = ? RETURNING key_ref",
                                   (index,)).fetchone()
                conn.execute(f"INSERT INTO {self.tombs} (blind_index, deleted_at) VALUES (?, ?)",
                             (index, deleted_at))
                conn.execute("COMMIT")
            except BaseException:
                conn.execute("ROLLBACK")
                raise
        return row[0] if row else None

    def tombstones_since(self, cursor: int, limit: int) -> list[tuple[int, bytes]]:
        with self._lock:
            return [(r[0], bytes(r[1])) for r in self._connection().execute(
                f"SELECT seq, blind_index FROM {self.tombs} WHERE seq > ? ORDER BY seq LIMIT ?",
                (cursor, limit))]

    def latest_cursor(self) -> int:
        with self._lock:
            return self._connection().execute(
                f"SELECT COALESCE(MAX(seq), 0) FROM {self.tombs}").fetchone()[0]

    def count(self) -> int:
        with self._lock:
            return self._connection().execute(f"SELECT COUNT(*) FROM {self.keys}").fetchone()[0]

    def prune_tombstones(self, before: float) -> int:
        with self._lock:
            return self._connection().execute(
                f"DELETE FROM {self.tombs} WHERE deleted_at < ?", (before,)).rowcount


# -- PostgreSQL --------------------------------------------------------------------------------


_DEADLOCK_RETRIES = 5


class _PostgresBackend:
    def __init__(self, dsn: str, namespace: str) -> None:
        try:
            import psycopg  # noqa: F401
        except ImportError:
            raise VaultError("the PostgreSQL vault needs psycopg 3: pip install 'psycopg[binary]>=3.1'") from None
        self.dsn = dsn
        self.namespace = namespace
        self.keys = f"{namespace}_subject_keys"
        self.tombs = f"{namespace}_tombstones"
        # Forgets serialise on this lock so tombstone sequence numbers commit in order and a
        # reader's cursor never skips a tombstone committed late.
        self._lock_id = int.from_bytes(hashlib.sha256(self.tombs.encode()).digest()[:8], "big",
                                       signed=True)
        self._lock = threading.Lock()
        self._conn: Any = None
        self._pid = 0
        with self._lock:
            self._connection()

    def config(self) -> tuple[str, str, str]:
        return ("postgres", self.dsn, self.namespace)

    def _connection(self) -> Any:
        import psycopg

        if self._conn is not None and self._pid == os.getpid() and not self._conn.closed:
            return self._conn
        try:
            conn = psycopg.connect(self.dsn, autocommit=True)
        except psycopg.OperationalError as exc:
            raise VaultError(f"cannot connect to the PostgreSQL vault at {_mask_dsn(self.dsn)} "
                             f"({type(exc).__name__})") from None
        with conn.transaction():
            conn.execute("SELECT pg_advisory_xact_lock(%s)", (self._lock_id,))
            conn.execute(
                f"CREATE TABLE IF NOT EXISTS {self.keys} (blind_index bytea PRIMARY KEY, "
                "key_ref text NOT NULL UNIQUE, token text NOT NULL UNIQUE, wrapped bytea NOT NULL, "
                "created double precision NOT NULL)")
            conn.execute(
                f"CREATE TABLE IF NOT EXISTS {self.tombs} (seq bigserial PRIMARY KEY, "
                "blind_index bytea NOT NULL, deleted_at double precision NOT NULL)")
        self._conn, self._pid = conn, os.getpid()
        return conn

    def close(self) -> None:
        with self._lock:
            if self._conn is not None and self._pid == os.getpid():
                self._conn.close()
            self._conn = None

    def _select_where(self, column: str, cast: str, values: Sequence[Any]) -> list[_Row]:
        out = []
        with self._lock:
            conn = self._connection()
            for chunk in _chunks(values):
                out += [_Row(bytes(r[0]), r[1], r[2], bytes(r[3])) for r in conn.execute(
                    f"SELECT blind_index, key_ref, token, wrapped FROM {self.keys} "
                    f"WHERE {column} = ANY(%s::{cast}[])", (list(chunk),))]
        return out

    def select(self, indexes: Sequence[bytes]) -> list[_Row]:
        return self._select_where("blind_index", "bytea", indexes)

    def select_tokens(self, tokens: Sequence[str]) -> list[_Row]:
        return self._select_where("token", "text", tokens)

    def insert_missing(self, rows: Sequence[_Row], created: float) -> None:
        import psycopg

        # Every process inserts in blind-index order, so two batches that overlap wait on each
        # other's rows in the same order and cannot deadlock (in arbitrary order they can: each
        # holds a row the other's ON CONFLICT check waits for). A deadlock reported anyway (a
        # foreign writer to the table) is retried: the statement is idempotent.
        ordered = sorted(rows, key=lambda r: r.blind_index)
        with self._lock:
            conn = self._connection()
            for chunk in _chunks(ordered):
                for attempt in range(_DEADLOCK_RETRIES):
                    try:
                        conn.execute(
                            f"INSERT INTO {self.keys} (blind_index, key_ref, token, wrapped, created) "
                            "SELECT i, r, t, w, %s FROM unnest(%s::bytea[], %s::text[], %s::text[], "
                            "%s::bytea[]) AS u(i, r, t, w) ORDER BY i ON CONFLICT DO NOTHING",
                            (created, [r.blind_index for r in chunk], [r.key_ref for r in chunk],
                             [r.token for r in chunk], [r.wrapped for r in chunk]))
                        break
                    except psycopg.errors.DeadlockDetected:
                        if attempt == _DEADLOCK_RETRIES - 1:
                            raise

    def delete(self, index: bytes, deleted_at: float) -> str | None:
        with self._lock:
            conn = self._connection()
            with conn.transaction():
                conn.execute("SELECT pg_advisory_xact_lock(%s)", (self._lock_id,))
                row = conn.execute(f"DELETE FROM {self.keys} WHERE blind_index = %s RETURNING key_ref",
                                   (index,)).fetchone()
                conn.execute(f"INSERT INTO {self.tombs} (blind_index, deleted_at) VALUES (%s, %s)",
                             (index, deleted_at))
        return row[0] if row else None

    def tombstones_since(self, cursor: int, limit: int) -> list[tuple[int, bytes]]:
        with self._lock:
            return [(r[0], bytes(r[1])) for r in self._connection().execute(
                f"SELECT seq, blind_index FROM {self.tombs} WHERE seq > %s ORDER BY seq LIMIT %s",
                (cursor, limit))]

    def latest_cursor(self) -> int:
        with self._lock:
            return self._connection().execute(
                f"SELECT COALESCE(MAX(seq), 0) FROM {self.tombs}").fetchone()[0]

    def count(self) -> int:
        with self._lock:
            return self._connection().execute(f"SELECT COUNT(*) FROM {self.keys}").fetchone()[0]

    def prune_tombstones(self, before: float) -> int:
        with self._lock:
            return self._connection().execute(
                f"DELETE FROM {self.tombs} WHERE deleted_at < %s", (before,)).rowcount
