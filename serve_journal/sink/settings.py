"""What every writer of journal files needs, in one picklable object.

The Ray writer actors (``sink/actor.py``) and the Kafka sinks (``sink/kafka_app.py``) both build
their storage (local, generic ``pyarrow.fs`` or write-once S3), their manifest chain and its
signer from :class:`SinkSettings`, and record every file they write through :func:`manifest_hook`.
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import pyarrow as pa

from serve_journal.catalog.iceberg import IcebergSettings, PublishReport, publish_iceberg
from serve_journal.catalog.layout import HOT, PartitionKey
from serve_journal.config import JournalConfig, dev_mode_from_env
from serve_journal.integrity.manifest import (
    SIGNING_KEY_FILE,
    ManifestLog,
    ManifestSigner,
    build_file_record,
)
from serve_journal.integrity.trust import exported_public_key_path, signing_dir
from serve_journal.retry import retry_call
from serve_journal.storage import JournalStorage, StoredObject, open_storage

logger = logging.getLogger("serve_journal")


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
    dev_mode: bool = field(default_factory=dev_mode_from_env)
    """Generate a missing signing key beside a local journal (development only); otherwise a
    missing key is an error (``serve-journal init-keys`` provisions it)."""
    iceberg: IcebergSettings | None = field(default_factory=IcebergSettings.from_env)
    """Publish the live files to this Iceberg table after every checkpoint (sinks) and commit
    (compaction, lifecycle); default ``SERVE_JOURNAL_ICEBERG_CATALOG``, unset: not published."""

    @classmethod
    def from_config(cls, config: JournalConfig) -> SinkSettings:
        """The sink side of a journal's configuration."""
        return cls(
            journal_uri=config.journal_uri, roll_seconds=config.roll_seconds,
            roll_bytes=config.roll_bytes,
            retention=config.extra.get("retention", config.retention),
            witness_uri=config.witness_uri, signing_key_file=config.signing_key_file,
            checkpoint_interval_s=config.checkpoint_interval_s, dev_mode=config.dev_mode,
            iceberg=(IcebergSettings.parse(config.iceberg_catalog) if config.iceberg_catalog
                     else IcebergSettings.from_env()),
        )

    def storage(self) -> JournalStorage:
        """The journal root's storage, with the configured retention."""
        return open_storage(self.journal_uri, retention=self.retention)

    def witness(self) -> JournalStorage | None:
        """Where checkpoints are copied too, if configured."""
        return None if not self.witness_uri else open_storage(self.witness_uri)

    def keys_dir(self) -> str | None:
        """``journal-signing`` beside a local journal root (apart from ``journal-keys``, the
        privacy folder with the KEK and the vault); ``None`` for a remote one."""
        return signing_dir(self.journal_uri)

    def signer(self) -> ManifestSigner:
        """The checkpoint signer: the configured key file, else the one beside a local journal
        (generated there only in development mode)."""
        if self.signing_key_file:
            return ManifestSigner.from_pem_file(self.signing_key_file)
        keys = self.keys_dir()
        if keys is None:
            raise ValueError(
                "a remote journal needs signing_key_file (an Ed25519 PEM key, mode 0600) to sign "
                "manifest checkpoints"
            )
        if not self.dev_mode and not os.path.exists(os.path.join(keys, SIGNING_KEY_FILE)):
            raise ValueError(
                f"no manifest signing key in {keys}: provision one with `serve-journal init-keys "
                f"--journal {self.journal_uri}` (or pass signing_key_file); dev_mode=True "
                "generates it (development only)")
        # Several writers may start at once; the loser of the create race may read the key file
        # while the winner is still writing it.
        return retry_call(lambda: ManifestSigner.load_or_generate(keys), retry_on=(ValueError, OSError),
                          deadline_s=5.0, delay_s=0.02, max_delay_s=0.02)

    def public_key_path(self) -> str | None:
        """The public key file verify checks checkpoints with (local journals only)."""
        return exported_public_key_path(self.journal_uri)

    def manifest(self, storage: JournalStorage, chain_id: str) -> ManifestLog:
        """A manifest chain ``chain_id`` in ``storage``, signed by :meth:`signer`; writes the
        public key beside a local journal on first use."""
        signer = self.signer()
        public = self.public_key_path()
        if public and not os.path.exists(public):
            os.makedirs(os.path.dirname(public), exist_ok=True)  # a journal not yet written
            tmp = f"{public}.{os.getpid()}.tmp"
            with open(tmp, "wb") as handle:
                handle.write(signer.export_public_key())
            os.replace(tmp, public)
        return ManifestLog(storage, chain_id, signer, self.witness())


def publish_table(settings: SinkSettings, storage: JournalStorage, reason: str,
                  **options: Any) -> PublishReport | None:
    """Publish the live files of ``storage`` to the configured Iceberg table (``None`` when
    none is configured); see :func:`serve_journal.catalog.iceberg.publish_iceberg`."""
    if settings.iceberg is None:
        return None
    return publish_iceberg(storage, settings.iceberg, reason=reason, **options)


def publish_table_quietly(settings: SinkSettings, storage: JournalStorage, reason: str) -> bool:
    """:func:`publish_table` for a sink's checkpoint: a failure is logged and retried at the next
    checkpoint (the next publish commits whatever is missing); ``False`` when it failed."""
    try:
        publish_table(settings, storage, reason)
    except Exception as exc:  # noqa: BLE001 - the table catches up at the next checkpoint
        logger.warning("serve_journal sink: publishing to Iceberg failed (%s); retried at the next "
                       "checkpoint", type(exc).__name__)
        return False
    return True


class BackgroundPublisher:
    """Publishes a sink's signed files to the Iceberg table off its write path: a writer's roll
    thread calls :meth:`request` after a checkpoint and goes on rolling while one daemon thread
    publishes (one publish at a time; requests made meanwhile fold into the next one). A failed
    publish is logged and counted; the next request publishes whatever is missing."""

    def __init__(self, settings: SinkSettings, storage: JournalStorage, reason: str = "sink") -> None:
        self.settings = settings
        self.storage = storage
        self.reason = reason
        self.published = 0
        self.failures = 0
        self._wake = threading.Event()
        self._idle = threading.Event()
        self._idle.set()
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None

    def request(self) -> None:
        """Publish soon (nothing when no Iceberg catalog is configured)."""
        if self.settings.iceberg is None:
            return
        with self._lock:
            self._idle.clear()
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="iceberg-publisher",
                                                daemon=True)
                self._thread.start()
            self._wake.set()

    def wait(self, timeout: float) -> bool:
        """Wait until no publish is requested or running; ``False`` on timeout."""
        return self._idle.wait(timeout)

    def _run(self) -> None:
        while True:
            self._wake.wait()
            self._wake.clear()
            if publish_table_quietly(self.settings, self.storage, self.reason):
                self.published += 1
            else:
                self.failures += 1
            with self._lock:
                if not self._wake.is_set():
                    self._idle.set()


def settings_for(journal_uri: str, settings: SinkSettings | None = None) -> SinkSettings:
    """``settings`` (checked to be for ``journal_uri``), or the defaults for it."""
    if settings is None:
        return SinkSettings(journal_uri=journal_uri)
    if settings.journal_uri != journal_uri:
        raise ValueError(f"settings are for {settings.journal_uri!r}, not {journal_uri!r}")
    return settings


ManifestHook = Callable[..., None]
"""``hook(stored, table, key=None)``: fits both the writer's and the Kafka sink's hooks."""


def manifest_hook(log: ManifestLog, tier: str = HOT) -> ManifestHook:
    """A ``(stored, table, key)`` callback that appends each written file's manifest record."""

    def record(stored: StoredObject, table: pa.Table, key: PartitionKey | None = None) -> None:
        log.append(build_file_record(stored, table, tier, log.chain_id))

    return record
