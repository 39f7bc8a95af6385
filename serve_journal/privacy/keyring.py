"""The keyring: journal data keys (rotating) and vault keys, encrypted at rest under a KEK.

Key hierarchy (docs/security.md, "Key hierarchy")::

    KEK  (env SERVE_JOURNAL_KEK, a 0600 file, or a KMS hook: never stored by the keyring)
     └─ keyring file (JSON): every key below wrapped with AES-256-GCM under the KEK
         ├─ data keys  "k-<hex>"  features HMAC; one is current, rotate() adds a new current one
         ├─ purpose keys  "subject-index" (vault blind index), "subject-wrap" (wraps subject keys),
                          "sampling" (sampling decisions), "caller-token" (caller tokens)
         └─ wrap keys  wrap subject keys in the vault: "subject-wrap" (the purpose key) first,
                       then "w-<hex>" from rotate_wrap_key(); destroy_wrap_key() deletes an old one

Key bytes never appear in ``repr``, ``str``, logs or exception messages. Pickling a keyring
carries its configuration (file path, where the KEK comes from), never key bytes: the receiving
process unwraps the keys again with its own access to the KEK.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import datetime as dt
import fcntl
import json
import os
import secrets
import stat
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from serve_journal.errors import KeyringError

__all__ = [
    "KEK_ENV",
    "LEGACY_WRAP_KEY_ID",
    "EnvKek",
    "FileKek",
    "KeyWrapper",
    "Keyring",
    "KeyringError",
    "PURPOSE_CALLER_TOKEN",
    "PURPOSE_SUBJECT_INDEX",
    "PURPOSE_SUBJECT_WRAP",
    "StaticKek",
]

KEK_ENV = "SERVE_JOURNAL_KEK"
KEYRING_FORMAT = 2
"""Newest keyring file format. Format 1 (no rotated or destroyed wrap key) is still read, and still
written while the wrap key was never rotated, so older versions keep reading such files; they
refuse format 2 rather than rewrite it without its wrap keys."""
_READABLE_FORMATS = (1, 2)
PURPOSE_SUBJECT_INDEX = "subject-index"
PURPOSE_SUBJECT_WRAP = "subject-wrap"
PURPOSE_SAMPLING = "sampling"
PURPOSE_CALLER_TOKEN = "caller-token"
_PURPOSES = (PURPOSE_SUBJECT_INDEX, PURPOSE_SUBJECT_WRAP, PURPOSE_SAMPLING, PURPOSE_CALLER_TOKEN)
_CREATED_WITH_KEYRING = (PURPOSE_SUBJECT_INDEX, PURPOSE_SUBJECT_WRAP, PURPOSE_SAMPLING)
"""Purpose keys a new keyring starts with; ``caller-token`` is added on first use (only journals
with ``caller_privacy="token"`` need it)."""
LEGACY_WRAP_KEY_ID = PURPOSE_SUBJECT_WRAP
"""Wrap key id of the ``subject-wrap`` purpose key: the wrap key every vault starts with."""
_NONCE = 12
_KEY_BYTES = 32


@runtime_checkable
class KeyWrapper(Protocol):
    """Where the key-encryption key lives: wraps and unwraps small secrets.

    A KMS hook implements this with the KMS's encrypt/decrypt calls (``context`` maps to an
    encryption context / associated data). It must be picklable without secrets (e.g. hold a
    KMS key ARN, not key bytes) when the keyring is sent to other processes.
    """

    def wrap(self, plaintext: bytes, context: bytes) -> bytes:
        """Encrypt ``plaintext``, binding it to ``context``."""

    def unwrap(self, wrapped: bytes, context: bytes) -> bytes:
        """Decrypt what :meth:`wrap` returned for the same ``context``."""


def _parse_kek(text: str, where: str) -> bytes:
    """32 bytes from 64 hex digits or base64 (standard or URL-safe) text."""
    text = text.strip()
    candidates: list[bytes] = []
    if len(text) == 2 * _KEY_BYTES:
        with contextlib.suppress(ValueError):
            candidates.append(bytes.fromhex(text))
    for decode in (lambda t: base64.b64decode(t, validate=True), base64.urlsafe_b64decode):
        with contextlib.suppress(binascii.Error, ValueError):
            candidates.append(decode(text.encode("ascii")))
    for raw in candidates:
        if len(raw) == _KEY_BYTES:
            return raw
    raise KeyringError(
        f"{where} must hold a 32-byte key as 64 hex digits or base64 (44 characters); "
        f"it holds {len(text)} characters that are neither"
    )


class _AesGcmWrapper:
    """AES-256-GCM with a local KEK; subclasses say where the KEK comes from."""

    def _kek(self) -> bytes:  # pragma: no cover - abstract
        raise NotImplementedError

    def wrap(self, plaintext: bytes, context: bytes) -> bytes:
        nonce = secrets.token_bytes(_NONCE)
        return nonce + AESGCM(self._kek()).encrypt(nonce, plaintext, context)

    def unwrap(self, wrapped: bytes, context: bytes) -> bytes:
        if len(wrapped) < _NONCE + 16:
            raise KeyringError("wrapped key is too short to be AES-GCM output")
        try:
            return AESGCM(self._kek()).decrypt(wrapped[:_NONCE], wrapped[_NONCE:], context)
        except InvalidTag:
            raise KeyringError(
                f"{self!r} cannot unwrap a key: wrong KEK, or the keyring file was altered"
            ) from None


class EnvKek(_AesGcmWrapper):
    """KEK from an environment variable (hex or base64 of 32 bytes), read at each use."""

    def __init__(self, variable: str = KEK_ENV) -> None:
        self.variable = variable

    def __repr__(self) -> str:
        return f"EnvKek({self.variable!r})"

    def _kek(self) -> bytes:
        text = os.environ.get(self.variable)
        if not text:
            raise KeyringError(f"environment variable {self.variable} is not set; it must hold the KEK")
        return _parse_kek(text, f"environment variable {self.variable}")


class FileKek(_AesGcmWrapper):
    """KEK from a file that only its owner may read or write (mode 0600 or stricter)."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = os.fspath(path)
        self._cached: bytes | None = None

    def __repr__(self) -> str:
        return f"FileKek({self.path!r})"

    def __reduce__(self):
        return (FileKek, (self.path,))

    @classmethod
    def create(cls, path: str | os.PathLike[str]) -> FileKek:
        """Write a new random KEK (hex) to ``path`` with mode 0600; refuses to overwrite."""
        path = os.fspath(path)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as handle:
            handle.write(secrets.token_hex(_KEY_BYTES) + "\n")
            handle.flush()
            os.fsync(handle.fileno())
        return cls(path)

    def _kek(self) -> bytes:
        if self._cached is None:
            try:
                info = os.stat(self.path)
            except FileNotFoundError:
                raise KeyringError(f"KEK file {self.path} does not exist") from None
            if not stat.S_ISREG(info.st_mode):
                raise KeyringError(f"KEK file {self.path} is not a regular file")
            if info.st_mode & 0o077:
                raise KeyringError(
                    f"KEK file {self.path} has mode {stat.S_IMODE(info.st_mode):04o}; it must be "
                    "readable by its owner only (chmod 600)"
                )
            with open(self.path, encoding="ascii", errors="replace") as handle:
                self._cached = _parse_kek(handle.read(), f"KEK file {self.path}")
        return self._cached


class StaticKek(_AesGcmWrapper):
    """A KEK given as bytes (tests, or a caller that fetched it itself). Cannot be pickled."""

    def __init__(self, kek: bytes) -> None:
        if not isinstance(kek, bytes) or len(kek) != _KEY_BYTES:
            raise KeyringError("StaticKek needs exactly 32 bytes")
        self._key = kek

    def __repr__(self) -> str:
        return "StaticKek(<hidden>)"

    def __reduce__(self):
        raise TypeError("StaticKek holds key bytes and cannot be pickled; use EnvKek, FileKek or a KMS hook")

    def _kek(self) -> bytes:
        return self._key


@dataclass(frozen=True)
class _Entry:
    wrapped: bytes
    created: str


def _now_iso() -> str:
    return dt.datetime.now(dt.UTC).isoformat(timespec="microseconds")


class Keyring:
    """Data keys with ids and purpose keys, stored wrapped under a KEK in a JSON file.

    Thread-safe. Several processes may share one keyring file: every change happens under an
    exclusive ``flock`` on ``<file>.lock`` after re-reading the file, and is published with an
    atomic rename, so concurrent first use or rotation never loses a key.
    """

    def __init__(self, path: str | os.PathLike[str], kek: KeyWrapper | None = None, *,
                 create: bool = True) -> None:
        """Open (or, with ``create``, create) the keyring at ``path``.

        ``kek`` defaults to :class:`EnvKek` (``SERVE_JOURNAL_KEK``).
        """
        self.path = os.fspath(path)
        self.kek: KeyWrapper = kek if kek is not None else EnvKek()
        if not isinstance(self.kek, KeyWrapper):
            raise KeyringError(f"kek must have wrap(plaintext, context) and unwrap(wrapped, context); "
                               f"got {type(self.kek).__name__}")
        self._create = create
        self._lock = threading.RLock()
        self._current: str | None = None
        self._entries: dict[str, _Entry] = {}
        self._purposes: dict[str, _Entry] = {}
        self._wraps: dict[str, _Entry] = {}
        self._current_wrap: str | None = None
        self._destroyed_wraps: set[str] = set()
        self._clear: dict[str, bytes] = {}
        self._load_or_create()

    # -- construction --------------------------------------------------------------------------

    @classmethod
    def local_default(cls, directory: str | os.PathLike[str], kek: KeyWrapper | None = None) -> Keyring:
        """The embedded default: ``<directory>/keys/keyring.json`` under a KEK.

        The KEK is ``kek`` if given, else ``SERVE_JOURNAL_KEK`` if set, else the file
        ``<directory>/keys/kek`` (created with mode 0600 on first use).
        """
        keys = Path(directory) / "keys"
        keys.mkdir(parents=True, exist_ok=True, mode=0o700)
        if kek is None:
            if os.environ.get(KEK_ENV):
                kek = EnvKek()
            else:
                kek_path = keys / "kek"
                if not kek_path.exists():
                    with contextlib.suppress(FileExistsError):  # another process won the race
                        FileKek.create(kek_path)
                kek = FileKek(kek_path)
        return cls(keys / "keyring.json", kek)

    def __repr__(self) -> str:
        return f"Keyring(path={self.path!r}, current={self._current!r}, kek={self.kek!r})"

    __str__ = __repr__

    def __reduce__(self):
        # Configuration only: the path and where the KEK comes from. Never key bytes.
        return (_reopen, (self.path, self.kek))

    # -- public API ----------------------------------------------------------------------------

    @property
    def current_key_id(self) -> str:
        """Id of the data key new entries are protected with."""
        assert self._current is not None
        return self._current

    def key_ids(self) -> list[str]:
        """Every data key id this keyring resolves, oldest first."""
        with self._lock:
            return sorted(self._entries, key=lambda k: (self._entries[k].created, k))

    def data_key(self, key_id: str | None = None) -> bytes:
        """Clear bytes of data key ``key_id`` (the current one if ``None``); for HMAC only."""
        with self._lock:
            key_id = key_id or self.current_key_id
            if key_id not in self._entries:
                self.reload()  # another process may have rotated
            entry = self._entries.get(key_id)
            if entry is None:
                raise KeyringError(f"key id {key_id!r} is not in keyring {self.path}")
            return self._unwrapped(f"data:{key_id}", entry)

    def purpose_key(self, purpose: str) -> bytes:
        """Clear bytes of a stable, never-rotated key for ``purpose`` (e.g. the vault index).

        A purpose key missing from the file (a keyring made before that purpose existed) is
        added under the file lock after re-reading the file, so every process ends up with the
        same one.
        """
        key = self._purpose_key(purpose, create=True)
        assert key is not None
        return key

    def existing_purpose_key(self, purpose: str) -> bytes | None:
        """Like :meth:`purpose_key`, but ``None`` instead of adding a missing key (read tools)."""
        return self._purpose_key(purpose, create=False)

    def _purpose_key(self, purpose: str, *, create: bool) -> bytes | None:
        if purpose not in _PURPOSES:
            raise KeyringError(f"purpose must be one of {_PURPOSES}, got {purpose!r}")
        with self._lock:
            if purpose not in self._purposes:
                self._read()  # another process may have added it
            if purpose not in self._purposes:
                if create and purpose in self._destroyed_wraps:  # the first wrap key: never re-made
                    raise KeyringError(f"wrap key {purpose!r} was destroyed in keyring {self.path}")
                if not create:
                    return None
                with self._file_lock():
                    self._read()
                    if purpose not in self._purposes:
                        self._purposes[purpose] = self._new_entry(f"purpose:{purpose}")
                        self._write()
            return self._unwrapped(f"purpose:{purpose}", self._purposes[purpose])

    def rotate(self) -> str:
        """Make a new current data key and return its id; older ids keep resolving."""
        with self._lock, self._file_lock():
            self._read()
            key_id = self._new_key_id()
            self._entries[key_id] = self._new_entry(f"data:{key_id}")
            self._current = key_id
            self._write()
            return key_id

    def reload(self) -> None:
        """Re-read the file (picks up rotations made by other processes).

        Keys another process destroyed (:meth:`destroy_wrap_key`) are dropped from memory too.
        """
        with self._lock:
            self._read()

    # -- wrap keys of the subject key vault ----------------------------------------------------

    @property
    def current_wrap_key_id(self) -> str:
        """Id of the newest wrap key (what :meth:`SubjectVault.rewrap` re-encrypts under)."""
        return self._current_wrap or LEGACY_WRAP_KEY_ID

    def wrap_key_ids(self) -> list[str]:
        """Ids of the wrap keys this keyring still holds, oldest first."""
        with self._lock:
            ids = [] if LEGACY_WRAP_KEY_ID in self._destroyed_wraps else [LEGACY_WRAP_KEY_ID]
            return ids + sorted(self._wraps, key=lambda k: (self._wraps[k].created, k))

    def wrap_key(self, wrap_id: str) -> bytes:
        """Clear bytes of wrap key ``wrap_id``; :class:`KeyringError` once it was destroyed."""
        with self._lock:
            if wrap_id == LEGACY_WRAP_KEY_ID:
                return self.purpose_key(PURPOSE_SUBJECT_WRAP)
            if wrap_id not in self._wraps:
                self.reload()  # another process may have rotated
            entry = self._wraps.get(wrap_id)
            if entry is None:
                state = "was destroyed in" if wrap_id in self._destroyed_wraps else "is not in"
                raise KeyringError(f"wrap key {wrap_id!r} {state} keyring {self.path}")
            return self._unwrapped(f"wrap:{wrap_id}", entry)

    def rotate_wrap_key(self) -> str:
        """Make a new current wrap key and return its id; older ones resolve until destroyed.

        :meth:`SubjectVault.rewrap` calls this, re-encrypts every subject key under the new key
        and then destroys the old ones (:meth:`destroy_wrap_key`).
        """
        with self._lock, self._file_lock():
            self._read()
            while True:
                wrap_id = "w-" + secrets.token_hex(6)
                if wrap_id not in self._wraps and wrap_id not in self._destroyed_wraps:
                    break
            self._wraps[wrap_id] = self._new_entry(f"wrap:{wrap_id}")
            self._current_wrap = wrap_id
            self._write()
            return wrap_id

    def destroy_wrap_key(self, wrap_id: str) -> None:
        """Delete wrap key ``wrap_id`` from the keyring file and from this process's memory.

        Irreversible: every subject key still wrapped under it becomes unrecoverable. That is
        the point once the vault was re-encrypted under a newer wrap key
        (:meth:`SubjectVault.rewrap`): the copies of forgotten subjects' keys left in old
        database pages, WAL, replicas and backups are wrapped under the old key. Copies of the
        keyring *file* made before (its backups) still hold it under the KEK. The current wrap
        key cannot be destroyed; other processes drop the key at their next :meth:`reload`.
        """
        with self._lock, self._file_lock():
            self._read()
            if wrap_id == self.current_wrap_key_id:
                raise KeyringError(f"wrap key {wrap_id!r} is the current wrap key; rotate first")
            if wrap_id in self._destroyed_wraps:
                return
            if wrap_id == LEGACY_WRAP_KEY_ID:
                self._purposes.pop(PURPOSE_SUBJECT_WRAP, None)
            elif self._wraps.pop(wrap_id, None) is None:
                raise KeyringError(f"wrap key {wrap_id!r} is not in keyring {self.path}")
            self._destroyed_wraps.add(wrap_id)
            self._write()
            self._forget_cleared()

    # -- internals -----------------------------------------------------------------------------

    def _unwrapped(self, context: str, entry: _Entry) -> bytes:
        key = self._clear.get(context)
        if key is None:
            key = self.kek.unwrap(entry.wrapped, context.encode("utf-8"))
            if len(key) != _KEY_BYTES:
                raise KeyringError(f"key {context!r} in {self.path} does not unwrap to 32 bytes")
            self._clear[context] = key
        return key

    def _new_key_id(self) -> str:
        while True:
            key_id = "k-" + secrets.token_hex(6)
            if key_id not in self._entries:
                return key_id

    def _new_entry(self, context: str) -> _Entry:
        key = secrets.token_bytes(_KEY_BYTES)
        wrapped = self.kek.wrap(key, context.encode("utf-8"))
        self._clear[context] = key
        return _Entry(wrapped, _now_iso())

    @contextlib.contextmanager
    def _file_lock(self) -> Iterator[None]:
        fd = os.open(self.path + ".lock", os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)  # closing releases the flock

    def _load_or_create(self) -> None:
        with self._lock:
            if os.path.exists(self.path):
                self._read()
                return
            if not self._create:
                raise KeyringError(f"keyring file {self.path} does not exist")
            os.makedirs(os.path.dirname(os.path.abspath(self.path)), exist_ok=True)
            with self._file_lock():
                if os.path.exists(self.path):  # another process created it meanwhile
                    self._read()
                    return
                key_id = self._new_key_id()
                self._entries = {key_id: self._new_entry(f"data:{key_id}")}
                self._current = key_id
                self._purposes = {p: self._new_entry(f"purpose:{p}") for p in _CREATED_WITH_KEYRING}
                self._write()

    def _read(self) -> None:
        try:
            with open(self.path, encoding="utf-8") as handle:
                doc = json.load(handle)
        except FileNotFoundError:
            raise KeyringError(f"keyring file {self.path} does not exist") from None
        except (OSError, ValueError) as exc:
            raise KeyringError(f"keyring file {self.path} is unreadable or not JSON "
                               f"({type(exc).__name__})") from None
        try:
            if doc["format"] not in _READABLE_FORMATS:
                raise KeyringError(f"keyring file {self.path} has format {doc['format']!r}; "
                                   f"this version reads formats {_READABLE_FORMATS}")
            entries = {k: _entry_from_json(v) for k, v in doc["keys"].items()}
            purposes = {k: _entry_from_json(v) for k, v in doc.get("purposes", {}).items()}
            current = doc["current"]
            wraps = {k: _entry_from_json(v) for k, v in doc.get("wrap_keys", {}).items()}
            current_wrap = doc.get("current_wrap")
            destroyed = {str(k) for k in doc.get("destroyed_wrap_keys", [])}
        except (KeyError, TypeError, ValueError, binascii.Error):
            raise KeyringError(f"keyring file {self.path} is malformed: it needs 'format', "
                               "'current' and 'keys' with base64 'wrapped' and 'created'") from None
        if current not in entries:
            raise KeyringError(f"keyring file {self.path} names current key {current!r} "
                               "that it does not hold")
        if current_wrap is not None and current_wrap not in wraps:
            raise KeyringError(f"keyring file {self.path} names current wrap key {current_wrap!r} "
                               "that it does not hold")
        self._entries, self._purposes, self._current = entries, purposes, current
        self._wraps, self._current_wrap, self._destroyed_wraps = wraps, current_wrap, destroyed
        if LEGACY_WRAP_KEY_ID in destroyed:
            self._purposes.pop(PURPOSE_SUBJECT_WRAP, None)
        self._forget_cleared()

    def _forget_cleared(self) -> None:
        """Drop the clear bytes of keys the file no longer holds (destroyed wrap keys)."""
        held = ({f"data:{k}" for k in self._entries} | {f"purpose:{p}" for p in self._purposes}
                | {f"wrap:{w}" for w in self._wraps})
        for context in [c for c in self._clear if c not in held]:
            del self._clear[context]

    def _write(self) -> None:
        doc: dict[str, Any] = {
            "format": 1,
            "current": self._current,
            "keys": {k: _entry_to_json(e) for k, e in self._entries.items()},
            "purposes": {k: _entry_to_json(e) for k, e in self._purposes.items()},
        }
        if self._wraps or self._destroyed_wraps:
            doc.update({
                "format": KEYRING_FORMAT,
                "wrap_keys": {k: _entry_to_json(e) for k, e in self._wraps.items()},
                "current_wrap": self._current_wrap,
                "destroyed_wrap_keys": sorted(self._destroyed_wraps),
            })
        tmp = f"{self.path}.tmp-{secrets.token_hex(4)}"
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as handle:
                json.dump(doc, handle, indent=1, sort_keys=True)
                handle.flush()
                os.fsync(handle.fileno())
            os.replace(tmp, self.path)
        except BaseException:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)
            raise


def _entry_to_json(entry: _Entry) -> dict[str, str]:
    return {"wrapped": base64.b64encode(entry.wrapped).decode("ascii"), "created": entry.created}


def _entry_from_json(doc: dict[str, str]) -> _Entry:
    return _Entry(base64.b64decode(doc["wrapped"], validate=True), str(doc["created"]))


def _reopen(path: str, kek: KeyWrapper) -> Keyring:
    return Keyring(path, kek, create=False)
