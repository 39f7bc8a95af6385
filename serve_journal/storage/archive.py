"""Archived journal files: which cannot be read until restored, and restoring them.

A bucket lifecycle rule (``maintain/lifecycle.s3_lifecycle_configuration``) moves ``cold/`` to
GLACIER and then DEEP_ARCHIVE. The transition keeps the object version (the manifest record still
names it), but a GET fails until the object is restored (S3 RestoreObject) for a number of days.
This module is the one front for that, whatever the backend: local folders and plain
``pyarrow.fs`` roots have no archive classes, so nothing there is ever archived.

Readers ask before reading (:func:`unreadable_archived`, :func:`raise_if_archived`), or turn a
failed read into :class:`~serve_journal.errors.ArchivedObjectError` (:func:`archived_error`),
so an operator sees "restore needed" and the command, never a raw ``InvalidObjectState``.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

from serve_journal.errors import ArchivedObjectError
from serve_journal.storage.base import JournalStorage
from serve_journal.storage.s3 import ARCHIVE_CLASSES, RESTORE_TIERS, ArchiveState, S3WormStorage

__all__ = [
    "ARCHIVE_CLASSES",
    "RESTORE_TIERS",
    "ArchiveState",
    "ArchivedObjectError",
    "archive_states",
    "archived_error",
    "raise_if_archived",
    "restore_archived",
    "restore_command",
    "s3_view",
    "unreadable_archived",
]

DATA_PREFIXES = ("hot/", "cold/")
"""Where journal data files live (``catalog.layout.TIERS``; storage imports no catalog)."""


def _s3(storage: JournalStorage) -> S3WormStorage | None:
    """The boto3 view of an ``s3://`` journal (archive classes and RestoreObject are S3 API
    calls pyarrow's filesystem does not make); ``None`` for other backends. A journal opened as
    a plain pyarrow ``s3://`` root gets one, built once, from its URI (same endpoint and
    credentials chain)."""
    if isinstance(storage, S3WormStorage):
        return storage
    if not storage.uri.startswith("s3://"):
        return None
    view = storage.__dict__.get("_archive_view")
    if view is None:
        view = S3WormStorage.from_uri(storage.uri)
        storage.__dict__["_archive_view"] = view
    return view


def s3_view(storage: JournalStorage) -> S3WormStorage | None:
    """The S3 API view of ``storage`` (see :func:`_s3`); ``None`` when it is not on S3."""
    return _s3(storage)


def restore_command(storage: JournalStorage) -> str:
    """The command that restores the journal's archived files."""
    return f"serve-journal restore --journal {storage.uri}"


def archive_states(storage: JournalStorage,
                   prefixes: Sequence[str] = DATA_PREFIXES) -> dict[str, ArchiveState]:
    """Every object below ``prefixes`` in an archive storage class, restored or not (one listing
    per prefix, one HEAD per archived object); empty for backends without archive classes."""
    s3 = _s3(storage)
    if s3 is None:
        return {}
    out: dict[str, ArchiveState] = {}
    for prefix in prefixes:
        out.update(s3.archive_states(prefix))
    return out


def unreadable_archived(storage: JournalStorage, paths: Iterable[str] | None = None,
                        states: dict[str, ArchiveState] | None = None) -> list[str]:
    """The archived, not (yet) restored files among ``paths`` (default: every data file)."""
    states = archive_states(storage) if states is None else states
    wanted = None if paths is None else set(paths)
    return sorted(p for p, s in states.items()
                  if not s.readable and (wanted is None or p in wanted))


def raise_if_archived(storage: JournalStorage, paths: Iterable[str]) -> None:
    """:class:`ArchivedObjectError` naming the files and the restore command when any of
    ``paths`` (relative to the root) cannot be read until restored."""
    blocked = unreadable_archived(storage, paths)
    if blocked:
        raise ArchivedObjectError(blocked, restore_command(storage))


def archived_error(storage: JournalStorage, path: str,
                   exc: BaseException) -> ArchivedObjectError | None:
    """After a failed read of ``path``: the typed error when the file is archived, else ``None``.

    pyarrow's S3 filesystem reports a GET of an archived object as a generic ``OSError``; one
    HEAD tells that apart from a real I/O failure."""
    if isinstance(exc, ArchivedObjectError):
        return exc
    s3 = _s3(storage)
    if s3 is None:
        return None
    try:
        state = s3.archive_state(path)
    except Exception:  # noqa: BLE001 - the original failure is the one to report
        return None
    if state is None or state.readable:
        return None
    return ArchivedObjectError([path], restore_command(storage))


def restore_archived(storage: JournalStorage, paths: Iterable[str] | None = None, *,
                     days: int = 7, tier: str = "Standard") -> dict[str, str]:
    """Ask for a restore of every archived file among ``paths`` (default: all data files) that
    is not readable yet, and refresh nothing that is. Idempotent. Returns ``{path: state}`` with
    state ``started``, ``in-progress`` or ``restored`` for every archived file considered."""
    if tier not in RESTORE_TIERS:
        raise ValueError(f"tier must be one of {', '.join(RESTORE_TIERS)}, got {tier!r}")
    if not isinstance(days, int) or isinstance(days, bool) or days < 1:
        raise ValueError(f"days must be a positive number of days, got {days!r}")
    states = archive_states(storage)
    wanted = None if paths is None else set(paths)
    out: dict[str, str] = {}
    for path, state in sorted(states.items()):
        if wanted is not None and path not in wanted:
            continue
        if state.restore == "none":
            s3 = _s3(storage)
            assert s3 is not None  # only S3 reports archived objects
            out[path] = s3.restore(path, days=days, tier=tier)
        else:
            out[path] = state.restore
    return out
