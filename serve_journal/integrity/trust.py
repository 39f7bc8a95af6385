"""The trust anchor: which Ed25519 public key the journal's signatures are checked against.

One home for the rule every checker follows (``serve-journal verify``, the console's "run verify
now", and readers deciding which commit markers to follow):

- the auditor's own copy of the public key (a PEM file, or ``SERVE_JOURNAL_PUBLIC_KEY_FILE``);
- or the PEM exported beside a local journal (``journal-signing/manifest-signing.pub.pem``),
  *pinned* by its SHA-256 fingerprint (``--key-fingerprint``, ``SERVE_JOURNAL_KEY_FINGERPRINT``):
  that folder sits next to key material an attacker of the journal's host could replace;
- or, in development mode only, that PEM unpinned.

Anything else is refused with :class:`TrustError`: the PEM found beside the journal is never a
trust anchor by itself.
"""

from __future__ import annotations

import hashlib
import logging
import os
from dataclasses import dataclass

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from serve_journal.config import dev_mode_from_env
from serve_journal.errors import ConfigError
from serve_journal.integrity.manifest import load_public_key
from serve_journal.storage import local_root

log = logging.getLogger(__name__)

PUBLIC_KEY_ENV = "SERVE_JOURNAL_PUBLIC_KEY_FILE"
FINGERPRINT_ENV = "SERVE_JOURNAL_KEY_FINGERPRINT"
SIGNING_DIR_NAME = "journal-signing"
PUBLIC_KEY_FILE = "manifest-signing.pub.pem"
MIN_FINGERPRINT_DIGITS = 16


class TrustError(ConfigError):
    """No acceptable trust anchor: the message says what to pass."""


@dataclass(frozen=True)
class TrustAnchor:
    """A public key to check signatures against, and how it was chosen (for reports)."""

    public_key: Ed25519PublicKey
    source: str

    @property
    def fingerprint(self) -> str:
        """Hex SHA-256 of the raw public key."""
        return key_fingerprint(self.public_key)

    def __repr__(self) -> str:
        return f"TrustAnchor({self.fingerprint[:16]}..., {self.source})"


def key_fingerprint(public_key: Ed25519PublicKey) -> str:
    """Hex SHA-256 of the raw 32 bytes of ``public_key``."""
    raw = public_key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return hashlib.sha256(raw).hexdigest()


def signing_dir(journal_uri: str) -> str | None:
    """Where the manifest signing key (and its exported public key) of a local journal live:
    ``journal-signing`` beside the journal root; ``None`` for a remote journal."""
    root = local_root(journal_uri)
    return None if root is None else os.path.join(os.path.dirname(root), SIGNING_DIR_NAME)


def exported_public_key_path(journal_uri: str) -> str | None:
    """The public key PEM exported beside a local journal (not a trust anchor by itself)."""
    folder = signing_dir(journal_uri)
    return None if folder is None else os.path.join(folder, PUBLIC_KEY_FILE)


def resolve_trust(
    journal_uri: str,
    *,
    public_key: str | os.PathLike[str] | bytes | Ed25519PublicKey | None = None,
    fingerprint: str | None = None,
    dev: bool = False,
) -> TrustAnchor:
    """The trust anchor for checking ``journal_uri``; raises :class:`TrustError` when there is
    none acceptable (see the module docstring for the rule)."""
    if public_key is not None:
        key = load_public_key(public_key)
        if fingerprint is not None:
            _check_pinned(key, fingerprint, "the given public key")
        return TrustAnchor(key, "the auditor's public key")
    if fingerprint is None and not dev:
        raise TrustError(
            "give the auditor's public key (--public-key PEM), or pin the key exported beside "
            "the journal with --key-fingerprint HEX; --dev trusts it unpinned (development)")
    path = exported_public_key_path(journal_uri)
    if path is None:
        raise TrustError("a remote journal needs the auditor's public key (--public-key PEM)")
    if not os.path.exists(path):
        raise TrustError(f"no public key at {path}; pass --public-key")
    key = load_public_key(path)
    if fingerprint is not None:
        _check_pinned(key, fingerprint, f"the public key at {path}")
        return TrustAnchor(key, "the key beside the journal, pinned by fingerprint")
    return TrustAnchor(key, "development mode: the key beside the journal, unpinned")


def _check_pinned(key: Ed25519PublicKey, fingerprint: str, what: str) -> None:
    actual = key_fingerprint(key)
    pinned = fingerprint.strip().lower()
    if len(pinned) < MIN_FINGERPRINT_DIGITS or not actual.startswith(pinned):
        raise TrustError(f"{what} is not the pinned one (its fingerprint is {actual[:16]}...; "
                         f"pin at least {MIN_FINGERPRINT_DIGITS} hex digits)")


_warned: set[str] = set()


def reader_trust(journal_uri: str) -> TrustAnchor | None:
    """The anchor readers (query, console, replay, forget, stats) check commit markers with:
    ``SERVE_JOURNAL_PUBLIC_KEY_FILE`` (optionally pinned by ``SERVE_JOURNAL_KEY_FINGERPRINT``),
    the pinned or (development mode) unpinned key beside a local journal; else ``None``, and
    readers follow every marker, with one warning per journal."""
    try:
        return resolve_trust(journal_uri, public_key=os.environ.get(PUBLIC_KEY_ENV) or None,
                             fingerprint=os.environ.get(FINGERPRINT_ENV) or None,
                             dev=dev_mode_from_env())
    except (TrustError, OSError, ValueError):
        if journal_uri not in _warned:
            _warned.add(journal_uri)
            log.warning("no trust anchor for readers of %s (set %s): commit markers are followed "
                        "unchecked until verify runs", journal_uri, PUBLIC_KEY_ENV)
        return None
