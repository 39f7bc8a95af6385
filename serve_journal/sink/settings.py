"""What every writer of journal files needs, in one picklable object.

Ray writer actors and Kafka sink actors both build their storage (local, generic ``pyarrow.fs`` or
write-once S3), their manifest chain and its signer from :class:`SinkSettings`, and record every
file they write through :func:`manifest_hook`.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from typing import Any

import pyarrow as pa

from serve_journal.catalog.layout import HOT, PartitionKey
from serve_journal.config import JournalConfig
from serve_journal.integrity.manifest import ManifestLog, ManifestSigner, build_file_record
from serve_journal.storage import JournalStorage, StoredObject, open_storage


@dataclass(frozen=True)
class SinkSettings:
    """Where and how journal files are written, and how their manifests are signed."""

    journal_uri: str
    roll_seconds: float = 0.5
    roll_bytes: int = 64 * 1024 * 1024
    retention: Any = None
    """A policy name, a mapping, or ``{"hot": .., "cold": ..}`` (see serve_journal.storage.retention)."""
    witness_uri: str | None = None
    signing_key_file: str | None = None
    checkpoint_interval_s: float = 5.0

    @classmethod
    def from_config(cls, config: JournalConfig) -> SinkSettings:
        return cls(
            journal_uri=config.journal_uri, roll_seconds=config.roll_seconds,
            roll_bytes=config.roll_bytes,
            retention=config.extra.get("retention", config.retention),
            witness_uri=config.witness_uri, signing_key_file=config.signing_key_file,
            checkpoint_interval_s=config.checkpoint_interval_s,
        )

    def storage(self) -> JournalStorage:
        return open_storage(self.journal_uri, retention=self.retention)

    def witness(self) -> JournalStorage | None:
        return None if not self.witness_uri else open_storage(self.witness_uri)

    def keys_dir(self) -> str | None:
        uri = self.journal_uri
        if "://" in uri and not uri.startswith("file://"):
            return None
        root = os.path.abspath(uri.removeprefix("file://"))
        return os.path.join(os.path.dirname(root), "journal-keys")

    def signer(self) -> ManifestSigner:
        """The checkpoint signer: the configured key file, else one generated next to the journal."""
        if self.signing_key_file:
            return ManifestSigner.from_pem_file(self.signing_key_file)
        keys = self.keys_dir()
        if keys is None:
            raise ValueError(
                "a remote journal needs signing_key_file (an Ed25519 PEM key, mode 0600) to sign "
                "manifest checkpoints"
            )
        # Several writers may start at once; the loser of the create race may read the key file
        # while the winner is still writing it.
        deadline = time.monotonic() + 5.0
        while True:
            try:
                return ManifestSigner.load_or_generate(keys)
            except (ValueError, OSError):
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.02)

    def public_key_path(self) -> str | None:
        keys = self.keys_dir()
        return None if keys is None else os.path.join(keys, "manifest-signing.pub.pem")

    def manifest(self, storage: JournalStorage, chain_id: str) -> ManifestLog:
        signer = self.signer()
        public = self.public_key_path()
        if public and not os.path.exists(public):
            tmp = f"{public}.{os.getpid()}.tmp"
            with open(tmp, "wb") as handle:
                handle.write(signer.export_public_key())
            os.replace(tmp, public)
        return ManifestLog(storage, chain_id, signer, self.witness())


def manifest_hook(log: ManifestLog, tier: str = HOT):
    """A ``(stored, table, key)`` callback that appends each written file's manifest record."""

    def record(stored: StoredObject, table: pa.Table, key: PartitionKey | None = None) -> None:
        log.append(build_file_record(stored, table, tier, log.chain_id))

    return record
