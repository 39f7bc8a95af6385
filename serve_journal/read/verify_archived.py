"""Verify's handling of archived data files (S3 GLACIER / DEEP_ARCHIVE, not restored).

An archived file's bytes cannot be read until it is restored, so verify cannot re-hash it. Two
modes (``verify --archived``):

- ``report`` (default): the file is not checked; one ``restore-needed`` warning gives the count
  and the restore command (``serve-journal restore``), and the summary says how many files went
  unchecked. Verification does not fail on it: the journal is not known to be wrong, only not
  fully checked.
- ``records``: the file is checked from its signed manifest record alone. The record must be
  covered by a valid signed checkpoint (the chains and checkpoints are checked as always), and
  what S3 keeps about the current object version without reading it must match the record: its
  version id, its size and the SHA-256 S3 checked the body against on upload. The content is not
  re-hashed and its Merkle root not recomputed; the summary says so.

Files that become unreadable between the listing and the read are handled the same way.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from serve_journal.errors import ArchivedObjectError
from serve_journal.integrity.manifest import ManifestRecord
from serve_journal.storage import JournalStorage
from serve_journal.storage.archive import archive_states, archived_error, restore_command, s3_view

__all__ = ["ARCHIVED_MODES", "ArchivedFiles"]

ARCHIVED_MODES = ("report", "records")

WARNING = "warning"
ERROR = "error"

FileCheck = Callable[[JournalStorage, str, list[ManifestRecord], Any], bool]


class ArchivedFiles:
    """The journal's unreadable archived files and how one verify run treats them."""

    def __init__(self, storage: JournalStorage, report: Any, mode: str,
                 is_signed: Callable[[ManifestRecord], bool]) -> None:
        if mode not in ARCHIVED_MODES:
            raise ValueError(f"archived must be one of {', '.join(ARCHIVED_MODES)}, got {mode!r}")
        self.storage = storage
        self.report = report
        self.mode = mode
        self.is_signed = is_signed
        self.paths = {p for p, s in archive_states(storage).items() if not s.readable}
        self.unchecked: list[str] = []
        self.from_records: list[str] = []

    def __contains__(self, path: str) -> bool:
        return path in self.paths

    def check(self, path: str, candidates: Sequence[ManifestRecord], fallback: FileCheck) -> bool:
        """Check ``path`` with ``fallback`` (verify's full file check) when it can be read, else
        as the mode says. True when the file verifies (or, in ``report`` mode, is left to a
        restore: its record still vouches for it in the rest of the run)."""
        if path not in self.paths:
            try:
                return fallback(self.storage, path, list(candidates), self.report)
            except (ArchivedObjectError, OSError) as exc:  # archived after the listing?
                if archived_error(self.storage, path, exc) is None:
                    raise
                self.paths.add(path)
        if self.mode == "report":
            self.unchecked.append(path)
            return True
        return self._check_record(path, candidates)

    def _check_record(self, path: str, candidates: Sequence[ManifestRecord]) -> bool:
        self.from_records.append(path)
        signed = [r for r in candidates if self.is_signed(r)]
        if not signed:
            self.report._add("archived-record-unsigned", path, (
                "archived file whose manifest record no signed checkpoint covers: it cannot be "
                "checked from its record; restore it and verify again"), candidates[-1].chain_id)
            return False
        s3 = s3_view(self.storage)
        if s3 is None:  # pragma: no cover - only S3 has archive classes
            return False
        head = s3.head_record(path)
        record = next((r for r in reversed(signed) if r.sha256 == head["sha256"]), signed[-1])
        chain = record.chain_id
        ok = True
        if record.version_id is not None and head["version_id"] != record.version_id:
            self.report._add("file-version-mismatch", path, (
                f"current object version {head['version_id']} is not the recorded version "
                f"{record.version_id}"), chain)
            ok = False
        if head["size"] != record.size or (head["sha256"] is not None
                                           and head["sha256"] != record.sha256):
            self.report._add("file-altered", path, (
                "the stored object's size or S3 checksum differs from the manifest record "
                f"(size {head['size']}, recorded {record.size})"), chain)
            ok = False
        self.report.entries += record.row_count
        return ok

    def finish(self) -> None:
        """Put the counts in the report, and the ``restore-needed`` warning when files went
        unchecked."""
        self.report.archived_mode = self.mode
        self.report.archived_unchecked = len(self.unchecked)
        self.report.archived_from_records = len(self.from_records)
        if self.unchecked:
            first = sorted(self.unchecked)[0]
            self.report._add("restore-needed", first, (
                f"{len(self.unchecked)} archived file(s) not checked (their bytes cannot be read "
                f"until restored); run `{restore_command(self.storage)}` and verify again, or "
                "verify --archived=records to check them from their signed manifest records"),
                severity=WARNING)


def summary_lines(report: Any) -> list[str]:
    """The summary lines verify prints about archived files (none when there were none)."""
    lines = []
    if getattr(report, "archived_from_records", 0):
        lines.append(f"  archived files: {report.archived_from_records} checked from their signed "
                     "manifest records only (version, size, S3 checksum; content not re-hashed)")
    if getattr(report, "archived_unchecked", 0):
        lines.append(f"  archived files: {report.archived_unchecked} NOT checked (restore needed)")
    return lines
