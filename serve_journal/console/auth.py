"""Who may use the console: the users file, password hashes, signed session cookies and CSRF tokens.

The operator configures every account in a users file (JSON, mode 0600)::

    {"version": 1, "users": {"ana": {"roles": ["auditor"], "password": "scrypt$15$8$1$<salt>$<hash>"}}}

Passwords are stored only as salted scrypt hashes (``hashlib.scrypt``, N=2**15, r=8, p=1) and
compared in constant time. There are no built-in accounts: a console without a users file, or with
an empty one, refuses to start (the ``--dev`` mode creates a throw-away account with a random
password instead).

A session is a cookie signed with the console's secret key by ``itsdangerous``
(``URLSafeTimedSerializer``, HMAC-SHA256, its own salt): the payload names the user and a random
session id, the signature carries the time of issue, and a cookie older than the session lifetime
is refused. The cookie is HttpOnly and SameSite=Strict (and Secure unless the console is bound to
loopback); roles are looked up in the users file on every request, so removing an account or a
role takes effect at once. Every state-changing form carries a CSRF token derived from the session
id (before sign-in: from a signed pre-session cookie), also signed by ``itsdangerous`` under a salt
of its own.

Signing out revokes the session on the server (:class:`SessionRevocations`, a folder beside the
users file shared by every replica), so a copied cookie stops working at once. Failed sign-ins are
throttled per client address and per account name (:class:`LoginThrottle`).
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import hmac
import json
import math
import os
import re
import secrets
import tempfile
import threading
import time
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from itsdangerous import BadData, Signer, TimestampSigner, URLSafeTimedSerializer

AUDITOR = "auditor"
OPERATOR = "operator"
PRIVACY_OFFICER = "privacy_officer"
ROLES = (AUDITOR, OPERATOR, PRIVACY_OFFICER)

#: What each permission needs: any one of these roles.
PERMISSIONS: dict[str, frozenset[str]] = {
    "query": frozenset({AUDITOR}),
    "read": frozenset({AUDITOR}),
    "charts": frozenset({AUDITOR, OPERATOR}),
    "reports": frozenset({AUDITOR, OPERATOR}),
    "access_log": frozenset({AUDITOR, OPERATOR, PRIVACY_OFFICER}),
    "stats": frozenset({OPERATOR}),
    "lifecycle": frozenset({OPERATOR}),
    "run_verify": frozenset({OPERATOR}),
    "forget": frozenset({PRIVACY_OFFICER}),
}

MIN_PASSWORD_LENGTH = 12
_USERNAME = re.compile(r"^[A-Za-z0-9_.@\-]{1,64}$")
_SCRYPT_LOG_N, _SCRYPT_R, _SCRYPT_P = 15, 8, 1
_SCRYPT_MAXMEM = 64 * 1024 * 1024


class UsersFileError(ValueError):
    """The users file is missing, unreadable or holds an invalid account."""


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def hash_password(password: str, *, log_n: int = _SCRYPT_LOG_N) -> str:
    """A salted scrypt hash of ``password`` in the users file's format."""
    if not isinstance(password, str) or len(password) < MIN_PASSWORD_LENGTH:
        raise ValueError(f"password must be a string of at least {MIN_PASSWORD_LENGTH} characters")
    salt = secrets.token_bytes(16)
    digest = hashlib.scrypt(password.encode(), salt=salt, n=2**log_n, r=_SCRYPT_R, p=_SCRYPT_P,
                            maxmem=_SCRYPT_MAXMEM, dklen=32)
    return f"scrypt${log_n}${_SCRYPT_R}${_SCRYPT_P}${_b64(salt)}${_b64(digest)}"


def check_password(password: str, stored: str) -> bool:
    """True when ``password`` matches the ``stored`` hash (constant-time comparison)."""
    try:
        scheme, log_n, r, p, salt, digest = stored.split("$")
        if scheme != "scrypt":
            return False
        expected = _unb64(digest)
        actual = hashlib.scrypt(password.encode(), salt=_unb64(salt), n=2 ** int(log_n), r=int(r),
                                p=int(p), maxmem=_SCRYPT_MAXMEM, dklen=len(expected))
    except (ValueError, TypeError):
        return False
    return hmac.compare_digest(actual, expected)


_DUMMY_HASH = None


def _dummy_hash() -> str:
    global _DUMMY_HASH
    if _DUMMY_HASH is None:
        _DUMMY_HASH = hash_password(secrets.token_urlsafe(16))
    return _DUMMY_HASH


@dataclass(frozen=True)
class User:
    """A signed-in account."""

    name: str
    roles: frozenset[str]

    def can(self, permission: str) -> bool:
        """True when one of the user's roles grants ``permission``."""
        return bool(self.roles & PERMISSIONS[permission])


def _validate_roles(roles: Iterable[str]) -> list[str]:
    roles = sorted(set(roles))
    if not roles:
        raise ValueError(f"roles must name at least one of {ROLES}")
    unknown = [r for r in roles if r not in ROLES]
    if unknown:
        raise ValueError(f"roles must be among {ROLES}, got unknown role(s) {unknown}")
    return roles


def _read_users(path: str) -> dict[str, dict]:
    try:
        with open(path, encoding="utf-8") as handle:
            doc = json.load(handle)
    except FileNotFoundError:
        return {}
    except (OSError, ValueError) as exc:
        raise UsersFileError(f"users file {path} is not readable JSON") from exc
    users = doc.get("users") if isinstance(doc, dict) else None
    if not isinstance(users, dict):
        raise UsersFileError(f"users file {path} must hold an object with a 'users' mapping")
    return users


def _write_users(path: str, users: dict[str, dict]) -> None:
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=".users-")
    try:
        os.fchmod(fd, 0o600)
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            json.dump({"version": 1, "users": users}, handle, indent=1, sort_keys=True)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def add_user(path: str, username: str, roles: Iterable[str], password: str) -> None:
    """Create or update ``username`` in the users file at ``path`` (created 0600 if absent)."""
    if not isinstance(username, str) or not _USERNAME.match(username):
        raise ValueError(f"username must match {_USERNAME.pattern}")
    roles = _validate_roles(roles)
    users = _read_users(path)
    users[username] = {"roles": roles, "password": hash_password(password)}
    _write_users(path, users)


def remove_user(path: str, username: str) -> bool:
    """Remove ``username``; ``True`` when it existed."""
    users = _read_users(path)
    if users.pop(username, None) is None:
        return False
    _write_users(path, users)
    return True


class UserStore:
    """The users file, re-read when it changes (so revocations apply to live sessions)."""

    def __init__(self, path: str) -> None:
        self.path = os.path.abspath(path)
        self._lock = threading.Lock()
        self._stamp: tuple[int, int] | None = None
        self._users: dict[str, dict] = {}
        self.reload()
        if not self._users:
            raise UsersFileError(
                f"no console users configured in {self.path}: add one with "
                "`serve-journal console-user add --users-file PATH NAME --role auditor`"
            )

    def __repr__(self) -> str:
        return f"UserStore({self.path!r}, users={len(self._users)})"

    def reload(self) -> None:
        """Re-read the file if its modification time or size changed."""
        try:
            st = os.stat(self.path)
        except FileNotFoundError:
            with self._lock:
                self._users, self._stamp = {}, None
            return
        stamp = (st.st_mtime_ns, st.st_size)
        with self._lock:
            if stamp == self._stamp:
                return
            users = _read_users(self.path)
            for name, account in users.items():
                if not _USERNAME.match(name) or not isinstance(account, dict):
                    raise UsersFileError(f"users file {self.path}: invalid account entry")
                _validate_roles(account.get("roles", []))
            self._users, self._stamp = users, stamp

    def user(self, name: str) -> User | None:
        """The account ``name`` with its current roles, or ``None``."""
        self.reload()
        with self._lock:
            account = self._users.get(name)
        if account is None:
            return None
        return User(name, frozenset(account.get("roles", [])))

    def authenticate(self, name: str, password: str) -> User | None:
        """The user when ``password`` is right; the same work is done for unknown names."""
        self.reload()
        with self._lock:
            account = self._users.get(name)
        stored = account.get("password", "") if account else _dummy_hash()
        ok = check_password(password, stored)
        if not ok or account is None:
            return None
        return User(name, frozenset(account.get("roles", [])))


def load_or_create_secret(path: str) -> bytes:
    """The console's 32-byte signing key from ``path`` (created 0600 with random bytes if absent)."""
    try:
        with open(path, "rb") as handle:
            data = handle.read()
    except FileNotFoundError:
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        data = secrets.token_bytes(32)
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        except FileExistsError:  # another replica created it first
            return load_or_create_secret(path)
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        return data
    if len(data) < 32:
        raise ValueError(f"console secret file {path} must hold at least 32 bytes")
    return data


@dataclass(frozen=True)
class Session:
    """A verified session cookie."""

    username: str
    sid: str
    expires: float


CLOCK_SKEW_S = 30.0
"""How far ahead of this replica's clock another console replica's clock may be."""
SESSION_SALT = "serve-journal.console.session"
CSRF_SALT = "serve-journal.console.csrf"
PRESESSION_SALT = "serve-journal.console.pre-session"


class _ClockSigner(TimestampSigner):
    """An ``itsdangerous`` timestamp signer whose clock can be pinned (``now``) for one call."""

    def __init__(self, *args: Any, now: float | None = None, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._now = now

    def get_timestamp(self) -> int:
        """Now (or the pinned ``now``) in whole seconds: the issue time, and the clock for age."""
        return int(time.time() if self._now is None else self._now)


class SessionCodec:
    """Signs and checks session cookies and derives CSRF tokens from them (``itsdangerous``).

    Session cookies are ``URLSafeTimedSerializer`` values (salt :data:`SESSION_SALT`, HMAC-SHA256)
    holding ``{"u": user name, "s": random session id}``; one older than ``ttl_s`` seconds, or
    issued more than :data:`CLOCK_SKEW_S` in the future, is refused. CSRF tokens and pre-session cookies are HMAC-SHA256 signatures under salts of their
    own, so no value signed for one purpose is accepted for another.
    """

    def __init__(self, secret: bytes, ttl_s: float) -> None:
        if len(secret) < 32:
            raise ValueError("secret must be at least 32 bytes")
        if ttl_s <= 0:
            raise ValueError(f"session ttl must be positive seconds, got {ttl_s!r}")
        self._secret = secret
        self.ttl_s = ttl_s
        self._csrf = Signer(secret, salt=CSRF_SALT, digest_method=hashlib.sha256)
        self._presession = Signer(secret, salt=PRESESSION_SALT, digest_method=hashlib.sha256)

    def __repr__(self) -> str:  # never show the secret
        return f"SessionCodec(ttl_s={self.ttl_s})"

    def _sessions(self, now: float | None) -> URLSafeTimedSerializer:
        return URLSafeTimedSerializer(
            self._secret, salt=SESSION_SALT, signer=_ClockSigner,
            signer_kwargs={"digest_method": hashlib.sha256, "now": now},
        )

    def issue(self, username: str, now: float | None = None) -> str:
        """A new cookie value for ``username``, valid for ``ttl_s`` seconds from ``now``."""
        return self._sessions(now).dumps({"u": username, "s": secrets.token_urlsafe(18)})

    def parse(self, value: str | None, now: float | None = None) -> Session | None:
        """The session in ``value``; ``None`` when it is absent, forged, malformed or expired."""
        if not value:
            return None
        try:
            # Age is checked here, not by itsdangerous, which refuses a cookie issued even one
            # second "in the future": with several console replicas, clocks differ a little.
            doc, issued = self._sessions(now).loads(value, return_timestamp=True)
        except BadData:  # bad signature or not our payload
            return None
        clock = time.time() if now is None else now
        age = clock - issued.timestamp()
        if age > self.ttl_s or age < -CLOCK_SKEW_S:
            return None
        if not isinstance(doc, dict) or not isinstance(doc.get("u"), str) \
                or not isinstance(doc.get("s"), str):
            return None
        return Session(doc["u"], doc["s"], issued.timestamp() + self.ttl_s)

    def csrf_token(self, sid: str) -> str:
        """The CSRF token of the session (or pre-session) id ``sid``."""
        return self._csrf.get_signature(sid).decode("ascii")

    def check_csrf(self, sid: str, token: str | None) -> bool:
        """True when ``token`` is the CSRF token of ``sid`` (constant-time comparison)."""
        return bool(token) and self._csrf.verify_signature(sid, token)

    def issue_presession(self) -> str:
        """A signed random id for the sign-in form's CSRF token (before there is a session)."""
        return self._presession.sign(secrets.token_urlsafe(18)).decode("ascii")

    def parse_presession(self, value: str | None) -> str | None:
        """The random id of a pre-session cookie ``value``; ``None`` when absent or forged."""
        if not value:
            return None
        try:
            return self._presession.unsign(value).decode("ascii")
        except (BadData, UnicodeDecodeError):
            return None


def _private_dir(directory: str) -> str:
    directory = os.path.abspath(directory)
    os.makedirs(directory, mode=0o700, exist_ok=True)
    return directory


def _create_only(path: str, data: bytes) -> bool:
    """Publish ``data`` at ``path`` (0600) all at once, never replacing a file; ``False`` when
    ``path`` exists already. Written to a temporary name, then hard-linked into place."""
    directory = os.path.dirname(path)
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=".tmp-")
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        try:
            os.link(tmp, path)
        except FileExistsError:
            return False
        except OSError:  # a filesystem without hard links: exclusive create, then write
            try:
                fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            except FileExistsError:
                return False
            with os.fdopen(fd, "wb") as handle:
                handle.write(data)
                handle.flush()
                os.fsync(handle.fileno())
        return True
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)


class SessionRevocations:
    """Signed-out sessions, refused until they would have expired anyway; shared by every console
    replica that sees ``directory`` (default ``<users file>.revoked``, beside the users file).

    A sign-out creates one create-only file named by a hash of the session id (the id itself is
    never written) holding the session's expiry time. Checking a session is one ``stat``; files
    of sessions past their expiry (plus :data:`CLOCK_SKEW_S`) are deleted by :meth:`prune`, which
    :meth:`revoke` runs at most once a minute.
    """

    PRUNE_INTERVAL_S = 60.0

    def __init__(self, directory: str) -> None:
        self.directory = _private_dir(directory)
        self._last_prune = -math.inf

    def __repr__(self) -> str:
        return f"SessionRevocations({self.directory!r})"

    def _path(self, sid: str) -> str:
        digest = hashlib.sha256(b"serve-journal revoked session\0" + sid.encode("utf-8", "surrogatepass"))
        return os.path.join(self.directory, digest.hexdigest()[:40])

    def revoke(self, sid: str, expires: float, now: float | None = None) -> None:
        """Refuse session ``sid`` from now on, on every replica (until ``expires``)."""
        _create_only(self._path(sid), json.dumps({"expires": expires}).encode("ascii"))
        clock = time.time() if now is None else now
        if clock - self._last_prune >= self.PRUNE_INTERVAL_S:
            self.prune(clock)

    def is_revoked(self, sid: str) -> bool:
        """True when session ``sid`` was signed out (on any replica)."""
        return os.path.exists(self._path(sid))

    def prune(self, now: float | None = None) -> int:
        """Delete the records of sessions that have expired anyway; returns how many."""
        clock = time.time() if now is None else now
        self._last_prune = clock
        removed = 0
        for name in os.listdir(self.directory):
            if name.startswith("."):
                continue
            path = os.path.join(self.directory, name)
            try:
                with open(path, encoding="ascii") as handle:
                    expires = float(json.load(handle)["expires"])
            except FileNotFoundError:
                continue  # another replica pruned it
            except (OSError, ValueError, KeyError, TypeError):
                continue  # not ours: left alone
            if expires + CLOCK_SKEW_S < clock:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(path)
                    removed += 1
        return removed


class LoginThrottle:
    """Failed sign-ins: at most ``limit`` per client address and at most ``account_limit`` per
    account name within ``window_s`` seconds.

    Per address, counts live in this process. Per account, they live in ``directory`` when given
    (one empty create-only file per failure, named by a hash of the typed name and the time), so
    every console replica sharing that folder counts the same failures: guessing one account's
    password from many addresses, through many replicas, is throttled all the same. Typed names
    that are no account are counted the same way, so throttling does not tell which names exist.
    Stale records are deleted as they are read.
    """

    MAX_KEYS = 10_000
    """In-memory counters kept at most (the oldest are forgotten first)."""

    def __init__(self, limit: int = 10, window_s: float = 300.0, *,
                 account_limit: int | None = None, directory: str | None = None) -> None:
        self.limit, self.window_s = limit, window_s
        self.account_limit = limit if account_limit is None else account_limit
        self.directory = None if directory is None else _private_dir(directory)
        self._failures: dict[str, list[float]] = {}
        self._accounts: dict[str, list[float]] = {}
        self._lock = threading.Lock()

    def _recent(self, table: dict[str, list[float]], key: str, now: float) -> list[float]:
        recent = [t for t in table.get(key, []) if now - t < self.window_s]
        if recent:
            table[key] = recent
        else:
            table.pop(key, None)
        return recent

    def _remember(self, table: dict[str, list[float]], key: str, now: float) -> None:
        table.setdefault(key, []).append(now)
        while len(table) > self.MAX_KEYS:
            table.pop(next(iter(table)))

    def blocked(self, client: str, now: float | None = None) -> bool:
        """True when ``client`` has used up its failed sign-ins in the current window."""
        now = time.monotonic() if now is None else now
        with self._lock:
            return len(self._recent(self._failures, client, now)) >= self.limit

    def account_blocked(self, account: str, now: float | None = None) -> bool:
        """True when the account name ``account`` has used up its failed sign-ins in the window
        (counted over every replica sharing ``directory``)."""
        now = time.time() if now is None else now
        key = _account_key(account)
        if self.directory is None:
            with self._lock:
                return len(self._recent(self._accounts, key, now)) >= self.account_limit
        return self._shared_count(key, now) >= self.account_limit

    def failed(self, client: str, now: float | None = None, *, account: str | None = None,
               wall: float | None = None) -> None:
        """Count one failed sign-in from ``client`` (and for the typed ``account`` name)."""
        now = time.monotonic() if now is None else now
        with self._lock:
            self._remember(self._failures, client, now)
        if account is None:
            return
        wall = time.time() if wall is None else wall
        key = _account_key(account)
        if self.directory is None:
            with self._lock:
                self._remember(self._accounts, key, wall)
            return
        name = f"{key}.{int(wall * 1e6)}.{secrets.token_hex(4)}"
        _create_only(os.path.join(self.directory, name), b"")

    def _shared_count(self, key: str, now: float) -> int:
        count = 0
        for name in os.listdir(self.directory or "."):
            parts = name.split(".")
            if len(parts) != 3 or name.startswith("."):
                continue
            try:
                stamp = int(parts[1]) / 1e6
            except ValueError:
                continue
            if now - stamp >= self.window_s:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(os.path.join(self.directory or ".", name))
            elif parts[0] == key:
                count += 1
        return count


def _account_key(account: str) -> str:
    """What the throttle keeps of a typed account name: a hash (it may be a mistyped password)."""
    return hashlib.sha256(b"serve-journal sign-in\0" + account.encode("utf-8", "surrogatepass")
                          ).hexdigest()[:32]


__all__ = [
    "AUDITOR", "CSRF_SALT", "OPERATOR", "PERMISSIONS", "PRESESSION_SALT", "PRIVACY_OFFICER", "ROLES",
    "SESSION_SALT", "LoginThrottle", "Session", "SessionCodec", "SessionRevocations", "User",
    "UserStore", "UsersFileError", "add_user", "check_password", "hash_password",
    "load_or_create_secret", "remove_user",
]
