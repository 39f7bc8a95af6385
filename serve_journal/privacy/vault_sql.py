"""SQL storage of the subject key vault: one set of statements for SQLite and PostgreSQL.

Both backends run the statements of :class:`VaultStatements`, rendered from a :class:`Dialect`
that holds only what truly differs between the two databases:

- the parameter placeholder: ``?`` (sqlite3) or ``%s`` (psycopg);
- column types (``BLOB`` / ``bytea``, ``REAL`` / ``double precision``) and the auto-numbered key
  of the tombstone table;
- how a list of values travels: one placeholder per value in SQLite (``IN (?, ?, ..)``, and
  ``executemany`` of one row at a time for new keys); one array parameter in PostgreSQL
  (``= ANY(%s::bytea[])``, and ``unnest(..) ORDER BY`` for new keys).

:class:`SqlBackend` holds the logic both share: a connection per process (never one inherited
through fork), batches of :data:`CHUNK` values, new keys inserted in blind-index order with
``ON CONFLICT DO NOTHING``, a forget and its tombstone in one serialised transaction. The two
subclasses only connect, open transactions and (SQLite) truncate the WAL after a shred.

**Wrap fence.** A row ``wrap_key`` of the ``<namespace>_meta`` table names the wrap key new
subject keys must be wrapped under. Every insert batch checks it inside its transaction (shared
with other inserters; exclusive with :meth:`SqlBackend.set_wrap_fence`) and refuses with
:class:`WrapFenceMoved` when the rows were wrapped under another key. So once
:meth:`~serve_journal.privacy.vault.SubjectVault.rewrap` has moved the fence, no process,
however stale its keyring, can add a row under the old wrap key, and a scan after the move
finds every row still under it.

**No long read transactions.** Every statement runs in autocommit mode and is read to its end
before the call returns, so a connection of this module never holds a read snapshot between
calls: a SQLite checkpoint waits at most for statements in flight (see
:meth:`SqliteBackend.checkpoint`).
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import os
import re
import sqlite3
import threading
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar, Protocol

from serve_journal.errors import VaultError
from serve_journal.retry import retry_call

CHUNK = 500
"""Values per statement (select) or per insert batch."""
DEADLOCK_RETRIES = 5
"""Tries of one PostgreSQL insert batch that a foreign writer keeps deadlocking."""

_KEY_COLUMNS = "blind_index, key_ref, token, wrapped"
_FENCE = "wrap_key"
"""Name of the meta row holding the wrap key id new rows must be wrapped under."""


class WrapFenceMoved(Exception):
    """An insert batch was wrapped under another wrap key than the vault's fence names."""

    def __init__(self, wrap_id: str) -> None:
        super().__init__(f"new subject keys must be wrapped under wrap key {wrap_id!r}")
        self.wrap_id = wrap_id


@dataclass(frozen=True)
class KeyRow:
    """One stored subject key: its blind index, reference, token and wrapped key bytes."""

    blind_index: bytes
    key_ref: str
    token: str
    wrapped: bytes


class VaultBackend(Protocol):
    """What :class:`~serve_journal.privacy.vault.SubjectVault` needs of its storage (the
    methods are described on :class:`SqlBackend`, the one implementation)."""

    def select(self, indexes: Sequence[bytes]) -> list[KeyRow]: ...
    def select_tokens(self, tokens: Sequence[str]) -> list[KeyRow]: ...
    def insert_missing(self, rows: Sequence[KeyRow], created: float, wrap_id: str) -> None: ...
    def delete(self, index: bytes, deleted_at: float,
               tombstone_tag: Callable[[KeyRow], bytes]) -> str | None: ...
    def checkpoint(self) -> bool | None: ...
    def set_wrap_fence(self, wrap_id: str) -> None: ...
    def wrap_fence(self) -> str | None: ...
    def scan(self, after: bytes, limit: int) -> list[KeyRow]: ...
    def replace_wrapped(self, pairs: Sequence[tuple[KeyRow, bytes]]) -> int: ...
    def tombstones_since(self, cursor: int, limit: int) -> list[tuple[int, bytes]]: ...
    def latest_cursor(self) -> int: ...
    def count(self) -> int: ...
    def prune_tombstones(self, before: float) -> int: ...
    def close(self) -> None: ...
    def config(self) -> tuple[str, str, str]: ...


@dataclass(frozen=True)
class Dialect:
    """What differs between the vault's SQL on two databases (see the module docstring)."""

    mark: str
    """Parameter placeholder."""
    bytes_type: str
    text_type: str
    float_type: str
    serial_key: str
    """Column definition of an auto-numbered primary key."""
    arrays: bool
    """A list of values travels as one array parameter (else one placeholder per value)."""


SQLITE = Dialect(mark="?", bytes_type="BLOB", text_type="TEXT", float_type="REAL",
                 serial_key="INTEGER PRIMARY KEY AUTOINCREMENT", arrays=False)
POSTGRES = Dialect(mark="%s", bytes_type="bytea", text_type="text", float_type="double precision",
                   serial_key="bigserial PRIMARY KEY", arrays=True)


def table_names(namespace: str) -> tuple[str, str]:
    """(subject keys table, tombstones table) of a vault namespace."""
    return f"{namespace}_subject_keys", f"{namespace}_tombstones"


def meta_table(namespace: str) -> str:
    """The table of a vault namespace's settings (the wrap fence)."""
    return f"{namespace}_meta"


class VaultStatements:
    """Every statement of the vault, rendered once for one dialect and namespace."""

    def __init__(self, dialect: Dialect, namespace: str) -> None:
        d, m = dialect, dialect.mark
        self.dialect = d
        self.keys, self.tombs = keys, tombs = table_names(namespace)
        self.meta = meta = meta_table(namespace)
        self._types = {"blind_index": d.bytes_type, "token": d.text_type}
        # The tombstones' second column keeps the name it had in earlier versions (existing
        # vaults), but holds a tombstone tag, HMAC(subject key, "tombstone"), never the blind
        # index: a forget leaves nothing in the vault that relates to the subject's id.
        self.create_tables = (
            f"CREATE TABLE IF NOT EXISTS {keys} (blind_index {d.bytes_type} PRIMARY KEY, "
            f"key_ref {d.text_type} NOT NULL UNIQUE, token {d.text_type} NOT NULL UNIQUE, "
            f"wrapped {d.bytes_type} NOT NULL, created {d.float_type} NOT NULL)",
            f"CREATE TABLE IF NOT EXISTS {tombs} (seq {d.serial_key}, "
            f"blind_index {d.bytes_type} NOT NULL, deleted_at {d.float_type} NOT NULL)",
            f"CREATE TABLE IF NOT EXISTS {meta} (name {d.text_type} PRIMARY KEY, "
            f"value {d.text_type} NOT NULL)",
        )
        self.select_fence = f"SELECT value FROM {meta} WHERE name = '{_FENCE}'"
        self.init_fence = (f"INSERT INTO {meta} (name, value) VALUES ('{_FENCE}', {m}) "
                           "ON CONFLICT DO NOTHING")
        self.set_fence = (f"INSERT INTO {meta} (name, value) VALUES ('{_FENCE}', {m}) "
                          "ON CONFLICT (name) DO UPDATE SET value = excluded.value")
        self.scan = (f"SELECT {_KEY_COLUMNS} FROM {keys} WHERE blind_index > {m} "
                     f"ORDER BY blind_index LIMIT {m}")
        self.replace_wrapped = (f"UPDATE {keys} SET wrapped = {m} "
                                f"WHERE blind_index = {m} AND wrapped = {m}")
        if d.arrays:
            new_rows = (f"SELECT i, r, t, w, {m} FROM unnest({m}::{d.bytes_type}[], "
                        f"{m}::{d.text_type}[], {m}::{d.text_type}[], {m}::{d.bytes_type}[]) "
                        "AS u(i, r, t, w) ORDER BY i")
        else:
            new_rows = f"VALUES ({m}, {m}, {m}, {m}, {m})"
        self.insert_if_absent = (f"INSERT INTO {keys} ({_KEY_COLUMNS}, created) {new_rows} "
                                 "ON CONFLICT DO NOTHING")
        self.delete_key = f"DELETE FROM {keys} WHERE blind_index = {m} RETURNING {_KEY_COLUMNS}"
        self.insert_tombstone = f"INSERT INTO {tombs} (blind_index, deleted_at) VALUES ({m}, {m})"
        self.tombstones_since = (f"SELECT seq, blind_index FROM {tombs} WHERE seq > {m} "
                                 f"ORDER BY seq LIMIT {m}")
        self.latest_cursor = f"SELECT COALESCE(MAX(seq), 0) FROM {tombs}"
        self.count = f"SELECT COUNT(*) FROM {keys}"
        self.prune_tombstones = f"DELETE FROM {tombs} WHERE deleted_at < {m}"

    def select_where(self, column: str, n: int) -> str:
        """Rows whose ``column`` (``blind_index`` or ``token``) is one of ``n`` values."""
        m = self.dialect.mark
        if self.dialect.arrays:
            match = f"{column} = ANY({m}::{self._types[column]}[])"
        else:
            match = f"{column} IN ({', '.join([m] * n)})"
        return f"SELECT {_KEY_COLUMNS} FROM {self.keys} WHERE {match}"

    def list_params(self, values: Sequence[Any]) -> Sequence[Any]:
        """Parameters of :meth:`select_where` for ``values``."""
        return (list(values),) if self.dialect.arrays else list(values)

    def new_row_params(self, rows: Sequence[KeyRow], created: float) -> Any:
        """Parameters of :attr:`insert_if_absent`: one set (arrays), or one per row."""
        if self.dialect.arrays:
            return (created, [r.blind_index for r in rows], [r.key_ref for r in rows],
                    [r.token for r in rows], [r.wrapped for r in rows])
        return [(r.blind_index, r.key_ref, r.token, r.wrapped, created) for r in rows]


def chunks(items: Sequence[Any]) -> Iterable[Sequence[Any]]:
    """``items`` in slices of at most :data:`CHUNK`."""
    for start in range(0, len(items), CHUNK):
        yield items[start:start + CHUNK]


def mask_dsn(dsn: str) -> str:
    """``dsn`` with any password replaced by ``***``."""
    return re.sub(r"(://[^:/@]*:)[^@]*@", r"\1***@", re.sub(r"(password\s*=\s*)\S+", r"\1***", dsn))


class SqlBackend:
    """The vault's storage logic on any :class:`Dialect`; subclasses connect and lock.

    Thread-safe (one lock around this process's connection) and process-safe (the database).
    """

    kind: ClassVar[str]
    dialect: ClassVar[Dialect]
    retry_on: tuple[type[BaseException], ...] = ()
    """Errors after which an insert batch is tried again (it is idempotent)."""

    def __init__(self, where: str, namespace: str) -> None:
        self.where = where
        self.namespace = namespace
        self.sql = VaultStatements(self.dialect, namespace)
        self._lock = threading.Lock()
        self._conn: Any = None
        self._pid = 0
        with self._lock:
            self._connection()

    # -- what differs -------------------------------------------------------------------------

    def _connect(self) -> Any:
        """A new connection in autocommit mode."""
        raise NotImplementedError

    def _usable(self, conn: Any) -> bool:
        """Whether this process's open connection can still be used."""
        return True

    def _serialised(self, conn: Any) -> contextlib.AbstractContextManager[Any]:
        """A transaction that no other writer of the vault runs at the same time."""
        raise NotImplementedError

    def _batch_transaction(self, conn: Any) -> contextlib.AbstractContextManager[Any]:
        """The transaction one batch of new keys is inserted in: it may run alongside other
        batches, never alongside :meth:`_fence_transaction`."""
        raise NotImplementedError

    def _fence_transaction(self, conn: Any) -> contextlib.AbstractContextManager[Any]:
        """The transaction that moves the wrap fence: no insert batch runs at the same time."""
        raise NotImplementedError

    def checkpoint(self) -> bool | None:
        """Remove what the database keeps of deleted rows outside its live pages, where it can.

        True when done (SQLite: the WAL was checkpointed and truncated), False when it could
        not be done now, ``None`` when the database offers no such thing (PostgreSQL: dead
        tuples, WAL, replicas and backups; see docs/security.md).
        """
        return None

    # -- shared -------------------------------------------------------------------------------

    def config(self) -> tuple[str, str, str]:
        """(kind, file or DSN, namespace): enough to open the same vault elsewhere."""
        return (self.kind, self.where, self.namespace)

    def _connection(self) -> Any:
        if self._conn is not None and self._pid == os.getpid() and self._usable(self._conn):
            return self._conn
        # A connection inherited through fork is never reused; open our own.
        conn = self._connect()
        with self._serialised(conn):
            for statement in self.sql.create_tables:
                conn.execute(statement)
        self._conn, self._pid = conn, os.getpid()
        return conn

    def close(self) -> None:
        """Close this process's connection (reopened on next use)."""
        with self._lock:
            if self._conn is not None and self._pid == os.getpid():
                self._conn.close()
            self._conn = None

    def _select_where(self, column: str, values: Sequence[Any]) -> list[KeyRow]:
        out = []
        with self._lock:
            conn = self._connection()
            for chunk in chunks(values):
                out += [_key_row(r) for r in conn.execute(
                    self.sql.select_where(column, len(chunk)), self.sql.list_params(chunk))]
        return out

    def select(self, indexes: Sequence[bytes]) -> list[KeyRow]:
        """The rows of these blind indexes (those that exist)."""
        return self._select_where("blind_index", indexes)

    def select_tokens(self, tokens: Sequence[str]) -> list[KeyRow]:
        """The rows of these subject tokens (those that exist)."""
        return self._select_where("token", tokens)

    def insert_missing(self, rows: Sequence[KeyRow], created: float, wrap_id: str) -> None:
        """Insert the rows whose blind index has no row yet; existing rows win.

        ``wrap_id`` is the wrap key the rows are wrapped under; :class:`WrapFenceMoved` (and
        nothing inserted by that batch) when the vault's fence names another one. The first
        insert into a vault without a fence sets it to ``wrap_id``.
        """
        # Every process inserts in blind-index order, so two batches that overlap wait on each
        # other's rows in the same order and cannot deadlock (in arbitrary order they can on
        # PostgreSQL: each holds a row the other's ON CONFLICT check waits for). A deadlock
        # reported anyway (a foreign writer to the table) is retried: the insert is idempotent.
        ordered = sorted(rows, key=lambda r: r.blind_index)
        with self._lock:
            conn = self._connection()
            for chunk in chunks(ordered):
                retry_call(functools.partial(self._insert_batch, conn, chunk, created, wrap_id),
                           retry_on=self.retry_on, attempts=DEADLOCK_RETRIES,
                           delay_s=0.0, max_delay_s=0.0)

    def _insert_batch(self, conn: Any, rows: Sequence[KeyRow], created: float,
                      wrap_id: str) -> None:
        params = self.sql.new_row_params(rows, created)
        with self._batch_transaction(conn):
            fence = conn.execute(self.sql.select_fence).fetchone()
            if fence is None:
                conn.execute(self.sql.init_fence, (wrap_id,))
                fence = conn.execute(self.sql.select_fence).fetchone()
            if fence[0] != wrap_id:
                raise WrapFenceMoved(fence[0])
            if self.dialect.arrays:
                conn.execute(self.sql.insert_if_absent, params)
            else:
                conn.executemany(self.sql.insert_if_absent, params)

    def delete(self, index: bytes, deleted_at: float,
               tombstone_tag: Callable[[KeyRow], bytes]) -> str | None:
        """Delete the row of ``index``; the deleted ``key_ref``, or ``None`` when there was none.

        In the same transaction, a tombstone records ``tombstone_tag(row)`` (a value derived
        from the destroyed key, so that replicas holding it can evict it); nothing is recorded
        when there was no row. Then :meth:`checkpoint` (SQLite) removes the deleted row's
        copies from the WAL.
        """
        with self._lock:
            conn = self._connection()
            with self._serialised(conn):
                found = conn.execute(self.sql.delete_key, (index,)).fetchone()
                row = _key_row(found) if found is not None else None
                if row is not None:
                    conn.execute(self.sql.insert_tombstone, (tombstone_tag(row), deleted_at))
        return row.key_ref if row is not None else None

    def set_wrap_fence(self, wrap_id: str) -> None:
        """From the commit on, every new row must be wrapped under ``wrap_id``."""
        with self._lock:
            conn = self._connection()
            with self._fence_transaction(conn):
                conn.execute(self.sql.set_fence, (wrap_id,))

    def wrap_fence(self) -> str | None:
        """The wrap key id new rows must be wrapped under (``None``: not set yet)."""
        with self._lock:
            row = self._connection().execute(self.sql.select_fence).fetchone()
        return row[0] if row is not None else None

    def scan(self, after: bytes, limit: int) -> list[KeyRow]:
        """Up to ``limit`` rows whose blind index sorts after ``after``, in blind-index order."""
        with self._lock:
            return [_key_row(r) for r in self._connection().execute(self.sql.scan, (after, limit))]

    def replace_wrapped(self, pairs: Sequence[tuple[KeyRow, bytes]]) -> int:
        """Set each row's wrapped key to the new bytes, if the row still holds the wrapped bytes
        it was read with (a row forgotten or re-created meanwhile is left alone); how many were
        replaced."""
        replaced = 0
        with self._lock:
            conn = self._connection()
            for chunk in chunks(pairs):
                with self._serialised(conn):
                    for row, wrapped in chunk:
                        replaced += conn.execute(self.sql.replace_wrapped,
                                                 (wrapped, row.blind_index, row.wrapped)).rowcount
        return replaced

    def tombstones_since(self, cursor: int, limit: int) -> list[tuple[int, bytes]]:
        """(sequence number, blind index) of up to ``limit`` tombstones after ``cursor``."""
        with self._lock:
            return [(r[0], bytes(r[1])) for r in self._connection().execute(
                self.sql.tombstones_since, (cursor, limit))]

    def latest_cursor(self) -> int:
        """The sequence number of the latest tombstone (0 when none)."""
        with self._lock:
            return self._connection().execute(self.sql.latest_cursor).fetchone()[0]

    def count(self) -> int:
        """Number of subject keys held."""
        with self._lock:
            return self._connection().execute(self.sql.count).fetchone()[0]

    def prune_tombstones(self, before: float) -> int:
        """Delete tombstones recorded before ``before`` (epoch seconds); how many were deleted."""
        with self._lock:
            return self._connection().execute(self.sql.prune_tombstones, (before,)).rowcount


def _key_row(r: Sequence[Any]) -> KeyRow:
    return KeyRow(bytes(r[0]), r[1], r[2], bytes(r[3]))


class SqliteBackend(SqlBackend):
    """A SQLite file (mode 0600; WAL, busy timeout, synchronous=FULL, secure_delete=ON)."""

    kind = "sqlite"
    dialect = SQLITE

    def __init__(self, path: str, namespace: str, busy_timeout_s: float) -> None:
        self.busy_timeout_s = busy_timeout_s
        super().__init__(path, namespace)

    def _connect(self) -> sqlite3.Connection:
        path = self.where
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        with contextlib.suppress(FileExistsError):
            os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))
        conn = sqlite3.connect(path, timeout=self.busy_timeout_s, isolation_level=None,
                               check_same_thread=False)
        conn.execute(f"PRAGMA busy_timeout = {int(self.busy_timeout_s * 1000)}")
        conn.execute("PRAGMA journal_mode = WAL")
        conn.execute("PRAGMA synchronous = FULL")
        # Deleted content is overwritten with zeros in the page (and so in the page's next WAL
        # frame and, after a checkpoint, in the database file), whatever the build's default.
        conn.execute("PRAGMA secure_delete = ON")
        return conn

    def checkpoint(self) -> bool:
        """Copy the WAL into the database file and truncate the WAL to zero bytes.

        A WAL frame is a whole page as it was when written: after a delete the older frames
        still hold the deleted row until the WAL is truncated. A truncating checkpoint waits
        (the busy timeout) for writers and for readers still using the WAL; connections of this
        module hold no read transaction between calls, so only a foreign connection (a
        ``sqlite3`` shell, a backup tool) with a transaction open longer than the busy timeout
        makes it fail. Then False: the residue stays until the next successful checkpoint (the
        next forget or rewrap, :meth:`SubjectVault.checkpoint`, or the last connection closing).
        """
        with self._lock:
            busy = self._connection().execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchone()[0]
        return busy == 0

    @contextlib.contextmanager
    def _serialised(self, conn: sqlite3.Connection) -> Iterator[None]:
        # BEGIN IMMEDIATE takes the database's write lock up front: writers run one at a time.
        conn.execute("BEGIN IMMEDIATE")
        try:
            yield
            conn.execute("COMMIT")
        except BaseException:
            conn.execute("ROLLBACK")
            raise

    # SQLite has one writer at a time: every write transaction excludes all others.
    _batch_transaction = _serialised
    _fence_transaction = _serialised


class PostgresBackend(SqlBackend):
    """A PostgreSQL database (psycopg 3, autocommit)."""

    kind = "postgres"
    dialect = POSTGRES

    def __init__(self, dsn: str, namespace: str) -> None:
        try:
            import psycopg  # inside: psycopg is optional (pip install 'serve-journal[postgres]')
        except ImportError:
            raise VaultError("the PostgreSQL vault needs psycopg 3: pip install 'psycopg[binary]>=3.1'") from None
        self._psycopg = psycopg
        self.retry_on = (psycopg.errors.DeadlockDetected,)
        # Forgets serialise on this lock so tombstone sequence numbers commit in order and a
        # reader's cursor never skips a tombstone committed late.
        self._lock_id = _advisory_lock_id(table_names(namespace)[1])
        # Insert batches hold this lock shared, moving the wrap fence holds it exclusively.
        self._fence_lock_id = _advisory_lock_id(meta_table(namespace))
        super().__init__(dsn, namespace)

    def _connect(self) -> Any:
        psycopg = self._psycopg
        try:
            return psycopg.connect(self.where, autocommit=True)
        except psycopg.OperationalError as exc:
            raise VaultError(f"cannot connect to the PostgreSQL vault at {mask_dsn(self.where)} "
                             f"({type(exc).__name__})") from None

    def _usable(self, conn: Any) -> bool:
        return not conn.closed

    @contextlib.contextmanager
    def _serialised(self, conn: Any) -> Iterator[None]:
        with conn.transaction():
            conn.execute("SELECT pg_advisory_xact_lock(%s)", (self._lock_id,))
            yield

    @contextlib.contextmanager
    def _batch_transaction(self, conn: Any) -> Iterator[None]:
        with conn.transaction():
            conn.execute("SELECT pg_advisory_xact_lock_shared(%s)", (self._fence_lock_id,))
            yield

    @contextlib.contextmanager
    def _fence_transaction(self, conn: Any) -> Iterator[None]:
        with conn.transaction():
            conn.execute("SELECT pg_advisory_xact_lock(%s)", (self._fence_lock_id,))
            yield


def _advisory_lock_id(name: str) -> int:
    return int.from_bytes(hashlib.sha256(name.encode()).digest()[:8], "big", signed=True)
