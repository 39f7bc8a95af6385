"""The local-disk backend: create-only files through a hidden temporary file and a hard link."""

from __future__ import annotations

import contextlib
import hashlib
import os
import uuid
from collections.abc import Callable
from typing import BinaryIO

import pyarrow.fs as pafs

from serve_journal.storage.base import (
    JournalStorage,
    ObjectExistsError,
    StoredObject,
    copy_stream,
)


class LocalJournalStorage(JournalStorage):
    """A journal in a local directory: exclusive create via hard link, files made read-only."""

    def __init__(self, root: str) -> None:
        super().__init__(pafs.LocalFileSystem(), root, root)

    def put_new(self, relative: str, data: bytes) -> StoredObject:
        self._create(relative, lambda handle: handle.write(data))
        return StoredObject(relative, len(data), hashlib.sha256(data).hexdigest())

    def put_new_file(self, relative: str, local: str) -> StoredObject:
        copied: list[tuple[int, str]] = []

        def write(handle) -> None:
            with open(local, "rb") as source:
                copied.append(copy_stream(source.read, handle.write))

        self._create(relative, write)
        return StoredObject(relative, *copied[0])

    def _create(self, relative: str, write: Callable[[BinaryIO], object]) -> None:
        """Write a hidden temporary file with ``write``, fsync it, and link it to ``relative``
        (fails if that exists: create-only)."""
        path = self.full_path(relative)
        directory = os.path.dirname(path)
        os.makedirs(directory, exist_ok=True)
        tmp = os.path.join(directory, f".tmp-{uuid.uuid4().hex}")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        try:
            with os.fdopen(fd, "wb") as handle:
                write(handle)
                handle.flush()
                os.fsync(handle.fileno())
            os.chmod(tmp, 0o444)
            try:
                os.link(tmp, path)  # atomic, and fails if the target exists: create-only
            except FileExistsError as exc:
                raise ObjectExistsError(f"journal object exists already: {relative}") from exc
        finally:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)
        fsync_dir(directory)

    def delete(self, relative: str) -> None:
        os.unlink(self.full_path(relative))

    def local_path(self) -> str | None:
        return self.root


def fsync_dir(directory: str) -> None:
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
