"""Where a replica gets its HMAC key in the embedded default setup.

``SERVE_JOURNAL_HMAC_KEY`` (hex, >= 16 bytes) with ``SERVE_JOURNAL_HMAC_KEY_ID`` wins; otherwise
a key file (0600) is read, created on first use next to a local journal (not inside it, so the
journal can be shared without the key). A remote journal needs an explicit key.
"""

from __future__ import annotations

import hashlib
import os
import secrets
import stat
import time

from serve_journal.config import ConfigError, JournalConfig


def default_key_file(config: JournalConfig) -> str | None:
    if config.key_file:
        return config.key_file
    if "://" in config.journal_uri and not config.journal_uri.startswith("file://"):
        return None
    root = os.path.abspath(config.journal_uri.removeprefix("file://"))
    return os.path.join(os.path.dirname(root), "journal-keys", "hmac.key")


def load_hmac_key(config: JournalConfig) -> tuple[str, bytes]:
    """(key id, key bytes); creates the local key file on first use."""
    env_key = os.environ.get("SERVE_JOURNAL_HMAC_KEY")
    if env_key:
        try:
            key = bytes.fromhex(env_key)
        except ValueError as exc:
            raise ConfigError("SERVE_JOURNAL_HMAC_KEY must be hex-encoded (>= 32 hex digits)") from exc
        if len(key) < 16:
            raise ConfigError("SERVE_JOURNAL_HMAC_KEY must be at least 16 bytes (32 hex digits)")
        return os.environ.get("SERVE_JOURNAL_HMAC_KEY_ID") or _key_id(key), key
    path = default_key_file(config)
    if path is None:
        raise ConfigError(
            "a remote journal needs an explicit HMAC key: set SERVE_JOURNAL_HMAC_KEY (hex) or "
            "key_file=<path of a 0600 key file>"
        )
    os.makedirs(os.path.dirname(path), mode=0o700, exist_ok=True)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        pass
    else:
        with os.fdopen(fd, "w") as handle:
            handle.write(secrets.token_hex(32))
            handle.flush()
            os.fsync(handle.fileno())
    mode = stat.S_IMODE(os.stat(path).st_mode)
    if mode & 0o077:
        raise ConfigError(f"HMAC key file {path} must not be readable by group or others (chmod 600)")
    deadline = time.monotonic() + 5.0
    while True:
        with open(path) as handle:
            text = handle.read().strip()
        if len(text) >= 32 or time.monotonic() > deadline:
            break
        time.sleep(0.01)  # another replica created the file a moment ago and is still writing it
    if len(text) < 32:
        raise ConfigError(f"HMAC key file {path} is empty or too short")
    key = bytes.fromhex(text)
    return _key_id(key), key


def _key_id(key: bytes) -> str:
    # A public fingerprint: identifies the key without revealing it.
    return "k-" + hashlib.sha256(b"serve_journal key id\0" + key).hexdigest()[:12]
