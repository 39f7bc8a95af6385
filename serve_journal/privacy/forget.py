"""The right to be forgotten by crypto-shredding: destroy a subject's key, never rewrite the journal.

:func:`forget` computes the subject's token while the key still exists, counts the journal
entries carrying it (and which model versions decided about the subject), deletes the key from
the vault (which records a tombstone so running replicas evict their cached copy), calls the
feature store's purge hook and the operator's forget hook when configured, and writes a receipt
under ``<journal root>/_receipts/``. The receipt names the destroyed key by its random key
reference, never the subject id or token.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import os
import secrets
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from serve_journal.catalog import live_files
from serve_journal.duckdb_paths import UnreadableByDuckDB, duckdb_literal_paths
from serve_journal.errors import ForgetIncompleteError
from serve_journal.privacy.keyring import Keyring
from serve_journal.privacy.tokens import check_subject_token
from serve_journal.privacy.vault import SubjectVault
from serve_journal.storage import JournalStorage, open_storage

__all__ = [
    "RECEIPTS_PREFIX",
    "ForgetEvent",
    "ForgetIncompleteError",
    "ForgetReceipt",
    "count_subject_entries",
    "forget",
    "forget_subject",
]

log = logging.getLogger(__name__)

RECEIPTS_PREFIX = "_receipts"


@dataclass(frozen=True)
class ForgetEvent:
    """What the forget hook receives: enough to trigger retraining, no raw identifier."""

    subject_token: str | None
    """The token the subject's journal entries carry (now unlinkable to the subject)."""
    model_versions: tuple[tuple[str, str], ...]
    """(model_name, model_version) pairs that decided about the subject."""
    subject_key_ref: str | None
    forgotten_at: str


@dataclass(frozen=True)
class ForgetReceipt:
    """Proof of a forget; written as JSON, contains no raw identifier and no token."""

    receipt_id: str
    forgotten_at: str
    subject_key_ref: str | None
    """Random id of the destroyed key; ``None`` when the subject had no key."""
    status: str
    """``shredded`` (a key was destroyed) or ``no_key`` (nothing in the vault for that subject)."""
    entries_unlinkable: int | None
    """Entries of the subject in the journal's live files; ``None`` when the journal could not be
    read (the key is destroyed all the same: counting never stands in the way of erasure)."""
    model_versions: list[dict[str, str]]
    hooks: dict[str, str] = field(default_factory=dict)
    """``purge`` / ``forget`` -> ``ok``, ``not_configured`` or ``failed:<ExceptionType>``."""
    path: str | None = None
    """Where the receipt was written (relative to the journal root, or an absolute path)."""

    @property
    def complete(self) -> bool:
        """True when every configured hook succeeded."""
        return not any(v.startswith("failed") for v in self.hooks.values())

    def to_json(self) -> str:
        doc = asdict(self)
        doc.pop("path")
        return json.dumps(doc, indent=1, sort_keys=True)


def count_subject_entries(storage: JournalStorage, subject_token: str) -> tuple[int, list[tuple[str, str]]]:
    """Entries carrying ``subject_token`` in the live files of the hot and cold tiers (the
    catalog's view, so a compacted or moved entry counts once), and their model versions.

    ``subject_token`` must have a subject token's format (``TokenFormatError`` otherwise). File
    paths reach DuckDB with their glob characters escaped, so each file is read exactly once.
    """
    check_subject_token(subject_token, "subject_token")
    files = [f.path for f in live_files(storage, tier="all")]
    if not files:
        return 0, []
    local = storage.local_path()
    paths: list[str] | None = None
    if local is not None:
        try:
            paths = duckdb_literal_paths(os.path.join(local, f) for f in files)
        except UnreadableByDuckDB:
            paths = None  # read with pyarrow below, which never globs
    if paths is not None:
        import duckdb  # inside: 0.2 s to import; the pyarrow path needs none

        with duckdb.connect() as conn:
            rows = conn.execute(
                "SELECT model_name, model_version, count(*) FROM read_parquet(?, "
                "hive_partitioning = false, union_by_name = true) WHERE subject_token = ? "
                "GROUP BY ALL ORDER BY ALL", [paths, subject_token]).fetchall()
    else:
        rows = _count_with_pyarrow(storage, files, subject_token)
    total = sum(int(r[2]) for r in rows)
    return total, [(str(r[0]), str(r[1])) for r in rows]


def _count_with_pyarrow(storage: JournalStorage, files: list[str], token: str) -> list[tuple]:
    counts: dict[tuple[str, str], int] = {}
    for relative in files:
        # ParquetFile, not read_table (see sink/parquet.decode_parquet).
        table = pq.ParquetFile(pa.BufferReader(storage.read(relative))).read(
            columns=["subject_token", "model_name", "model_version"])
        table = table.filter(pc.equal(table["subject_token"], token))
        for name, version in zip(table["model_name"].to_pylist(), table["model_version"].to_pylist(),
                                 strict=True):
            counts[(name, version)] = counts.get((name, version), 0) + 1
    return sorted((n, v, c) for (n, v), c in counts.items())


def forget(
    subject_id: str,
    *,
    vault: SubjectVault,
    keyring: Keyring | None = None,
    journal_storage: JournalStorage | None = None,
    purge_hook: Callable[[str], Any] | None = None,
    forget_hook: Callable[[ForgetEvent], Any] | None = None,
    receipts_dir: str | os.PathLike[str] | None = None,
) -> ForgetReceipt:
    """Crypto-shred ``subject_id`` and return the receipt (also written to storage).

    The receipt goes to ``<journal_storage root>/_receipts/`` (create-only), or to
    ``receipts_dir`` when given; at least one of them is required. ``purge_hook(subject_id)``
    deletes the subject's features in the feature store; ``forget_hook(event)`` lets an operator
    act on models that decided about the subject. When a hook fails the key is still destroyed
    and the receipt written; :class:`ForgetIncompleteError` then carries the receipt.
    ``keyring`` is accepted for symmetry with the CLI (the vault holds its own).
    """
    if journal_storage is None and receipts_dir is None:
        raise ValueError("forget needs journal_storage or receipts_dir to write the receipt to")
    if keyring is not None and keyring is not vault.keyring and keyring.path != vault.keyring.path:
        raise ValueError("keyring must be the vault's keyring (same keyring file)")
    now = dt.datetime.now(dt.UTC).isoformat(timespec="microseconds")
    key = vault.get_many([subject_id]).get(subject_id)
    token = key.token if key is not None else None  # before the key is gone
    entries: int | None = 0
    versions: list[tuple[str, str]] = []
    if token is not None and journal_storage is not None:
        try:
            entries, versions = count_subject_entries(journal_storage, token)
        except Exception as exc:  # noqa: BLE001 - an unreadable journal must not block erasure
            log.warning("forget: could not count the subject's entries (%s); shredding the key "
                        "anyway", type(exc).__name__)
            entries = None
    key_ref = vault.forget(subject_id)
    if key_ref is None and key is not None:
        key_ref = key.key_ref  # a concurrent forget destroyed it between our read and delete
    hooks = {
        "purge": _call(purge_hook, "purge", subject_id),
        "forget": _call(forget_hook, "forget", ForgetEvent(token, tuple(versions), key_ref, now)),
    }
    receipt = ForgetReceipt(
        receipt_id=secrets.token_hex(8),
        forgotten_at=now,
        subject_key_ref=key_ref,
        status="shredded" if key_ref is not None else "no_key",
        entries_unlinkable=entries,
        model_versions=[{"model_name": n, "model_version": v} for n, v in versions],
        hooks=hooks,
    )
    receipt = _write_receipt(receipt, journal_storage, receipts_dir)
    if not receipt.complete:
        raise ForgetIncompleteError(receipt)
    return receipt


def _call(hook: Callable[[Any], Any] | None, name: str, argument: Any) -> str:
    if hook is None:
        return "not_configured"
    try:
        hook(argument)
    except Exception as exc:  # noqa: BLE001 - recorded in the receipt, raised after it is written
        log.error("forget: %s hook failed with %s", name, type(exc).__name__)  # never the message
        return f"failed:{type(exc).__name__}"
    return "ok"


def _write_receipt(receipt: ForgetReceipt, storage: JournalStorage | None,
                   receipts_dir: str | os.PathLike[str] | None) -> ForgetReceipt:
    stamp = receipt.forgotten_at[:19].replace(":", "").replace("-", "")
    name = f"forget-{stamp}-{receipt.receipt_id}.json"
    data = receipt.to_json().encode("utf-8")
    if receipts_dir is not None:
        directory = os.fspath(receipts_dir)
        os.makedirs(directory, exist_ok=True)
        path = os.path.join(directory, name)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
    else:
        assert storage is not None
        path = f"{RECEIPTS_PREFIX}/{name}"
        storage.put_new(path, data)
    return ForgetReceipt(**{**asdict(receipt), "path": path})


def forget_subject(
    subject_id: str,
    *,
    journal_uri: str,
    privacy_dir: str | os.PathLike[str],
    vault_url: str | None = None,
    purge_hook: Callable[[str], Any] | None = None,
    forget_hook: Callable[[ForgetEvent], Any] | None = None,
) -> ForgetReceipt:
    """What ``serve-journal forget --subject ID`` calls.

    Opens the keyring with :meth:`Keyring.local_default` (``privacy_dir``; the KEK from
    ``SERVE_JOURNAL_KEK`` when set), the vault at ``vault_url`` (default
    ``<privacy_dir>/vault.sqlite3``) and the journal at ``journal_uri``, then runs :func:`forget`.
    """
    keyring = Keyring.local_default(privacy_dir)
    if vault_url is None:
        vault = SubjectVault.local_default(privacy_dir, keyring)
    else:
        vault = SubjectVault.open(vault_url, keyring)
    try:
        return forget(subject_id, vault=vault, keyring=keyring,
                      journal_storage=open_storage(journal_uri),
                      purge_hook=purge_hook, forget_hook=forget_hook)
    finally:
        vault.close()
