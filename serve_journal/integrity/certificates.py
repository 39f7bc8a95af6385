"""Delegated keys: the journal's manifest key certifies narrower keys for other signers.

Replicas sign their exact counters (``_counters/``), which explain gaps in their sequence
numbers, but must never hold the manifest key that vouches for data files. ``serve-journal
init-keys`` (or a development-mode replica) generates a *counters key*, and the manifest key signs
a certificate for it, stored create-only in the journal::

    _keys/<purpose>/<key id>.json   {"purpose", "public_key", "issuer_key_id", "created", "signature"}

Verify accepts a counters signature only from a key with a certificate that the auditor's key
signed, so the auditor pins one key, and whoever holds a counters key can explain gaps of its
own producers' sequences but cannot vouch for a data file.
"""

from __future__ import annotations

import base64
import dataclasses
import datetime as dt
import json
import logging
import os
from dataclasses import dataclass

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from serve_journal.errors import ObjectExistsError
from serve_journal.integrity.manifest import (
    ManifestSigner,
    SignedDocument,
    decode_b64,
    public_key_id,
)
from serve_journal.storage import JournalStorage

log = logging.getLogger(__name__)

KEYS_PREFIX = "_keys"
PURPOSE_COUNTERS = "counters"
COUNTERS_KEY_FILE = "counters-signing.pem"
"""File name of the replicas' counters key in ``<privacy_dir>/keys/``."""


@dataclass(frozen=True)
class KeyCertificate(SignedDocument):
    """The issuer (the journal's manifest key) vouches for ``public_key`` for ``purpose``."""

    purpose: str
    public_key: str
    """Base64 of the raw 32-byte Ed25519 public key."""
    issuer_key_id: str
    created: str
    signature: str = ""

    @property
    def key(self) -> Ed25519PublicKey:
        return Ed25519PublicKey.from_public_bytes(decode_b64(self.public_key))

    @property
    def key_id(self) -> str:
        return public_key_id(self.key)

    @classmethod
    def from_json(cls, data: bytes) -> KeyCertificate:
        doc = json.loads(data)
        return cls(**{f.name: str(doc[f.name]) for f in dataclasses.fields(cls)})

    def verify(self, public_key: Ed25519PublicKey) -> bool:
        """True when ``public_key`` (the issuer's) signed this certificate for a well-formed key."""
        try:
            self.key  # noqa: B018 - a certificate for a malformed key is not valid
        except ValueError:
            return False
        return super().verify(public_key)


def certificate_path(purpose: str, key_id: str) -> str:
    return f"{KEYS_PREFIX}/{purpose}/{key_id}.json"


def certify(issuer: ManifestSigner, public_key: Ed25519PublicKey, purpose: str) -> KeyCertificate:
    """A certificate of ``public_key`` for ``purpose``, signed by ``issuer``."""
    raw = public_key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    unsigned = KeyCertificate(purpose=purpose, public_key=base64.b64encode(raw).decode("ascii"),
                              issuer_key_id=issuer.key_id,
                              created=dt.datetime.now(dt.UTC).isoformat(timespec="seconds"))
    signature = base64.b64encode(issuer.sign(unsigned.signed_bytes())).decode("ascii")
    return dataclasses.replace(unsigned, signature=signature)


def publish(storage: JournalStorage, certificate: KeyCertificate) -> str:
    """Store ``certificate`` create-only in the journal; an existing one for the key is kept."""
    path = certificate_path(certificate.purpose, certificate.key_id)
    try:
        storage.put_new(path, certificate.to_json())
    except ObjectExistsError:
        pass
    return path


def is_published(storage: JournalStorage, purpose: str, public_key: Ed25519PublicKey) -> bool:
    """Is a certificate for ``public_key`` stored in the journal (not checked: verify does)."""
    return storage.exists(certificate_path(purpose, public_key_id(public_key)))


def certified_keys(storage: JournalStorage, issuer: Ed25519PublicKey, purpose: str
                   ) -> tuple[dict[str, Ed25519PublicKey], list[str]]:
    """``({key id: key} certified by issuer for purpose, [paths of certificates that are not])``."""
    keys: dict[str, Ed25519PublicKey] = {}
    bad: list[str] = []
    for path in storage.list_files(f"{KEYS_PREFIX}/{purpose}", suffix=".json"):
        try:
            cert = KeyCertificate.from_json(storage.read(path))
        except (ValueError, KeyError, TypeError, OSError):
            bad.append(path)
            continue
        if cert.purpose != purpose or not cert.verify(issuer) \
                or path != certificate_path(purpose, cert.key_id):
            bad.append(path)
            continue
        keys[cert.key_id] = cert.key
    return keys, bad


def provision_key(key_file: str | os.PathLike[str], issuer: ManifestSigner,
                  storage: JournalStorage, purpose: str = PURPOSE_COUNTERS) -> ManifestSigner:
    """Load (or create, 0600) the delegated key at ``key_file`` and publish its certificate,
    signed by ``issuer``, in the journal (``serve-journal init-keys``, development mode)."""
    folder, name = os.path.split(os.path.abspath(os.fspath(key_file)))
    signer = ManifestSigner.load_or_generate(folder, name)
    if not is_published(storage, purpose, signer.public_key):
        publish(storage, certify(issuer, signer.public_key, purpose))
    return signer
