"""Object storage for the journal, over ``pyarrow.fs``.

Every write is a create-only put of a whole object: a reader never sees half a file and an
existing file is never replaced. This module holds the protocol every
backend follows (:class:`JournalStorage` over any ``pyarrow.fs`` filesystem, which publishes an
object only when its upload completes); ``local.py`` and ``s3.py`` hold the local and S3
write-once backends, and :func:`serve_journal.storage.open_storage` picks one by URI scheme.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import BinaryIO

import pyarrow.fs as pafs

from serve_journal.errors import ObjectExistsError

STREAM_CHUNK = 8 * 1024 * 1024
"""Bytes per read or write when a file is streamed rather than held (rewrites of large days)."""


def copy_stream(read: Callable[[int], bytes], write: Callable[[bytes], object]) -> tuple[int, str]:
    """Copy ``read`` to ``write`` in :data:`STREAM_CHUNK` pieces; returns (bytes, SHA-256 hex)."""
    digest = hashlib.sha256()
    size = 0
    while chunk := read(STREAM_CHUNK):
        digest.update(chunk)
        size += len(chunk)
        write(chunk)
    return size, digest.hexdigest()


def file_sha256(handle: BinaryIO) -> str:
    """SHA-256 hex of what is left to read in ``handle``, a chunk at a time."""
    return copy_stream(handle.read, lambda _: None)[1]


@dataclass(frozen=True)
class StoredObject:
    """What storage reports about an object it wrote."""

    path: str
    """Path relative to the journal root."""
    size: int
    sha256: str
    version_id: str | None = None


class JournalStorage:
    """The journal root on a ``pyarrow.fs`` filesystem; paths are relative to the root."""

    def __init__(self, filesystem: pafs.FileSystem, root: str, uri: str) -> None:
        self.filesystem = filesystem
        self.root = root.rstrip("/")
        self.uri = uri

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.uri!r})"

    def full_path(self, relative: str) -> str:
        return f"{self.root}/{relative.lstrip('/')}"

    def put_new(self, relative: str, data: bytes) -> StoredObject:
        """Create ``relative`` with ``data``; :class:`ObjectExistsError` if it exists already."""
        path = self.full_path(relative)
        if self.filesystem.get_file_info(path).type != pafs.FileType.NotFound:
            raise ObjectExistsError(f"journal object exists already: {relative}")
        parent = path.rsplit("/", 1)[0]
        self.filesystem.create_dir(parent, recursive=True)
        with self.filesystem.open_output_stream(path) as stream:
            stream.write(data)
        return StoredObject(relative, len(data), hashlib.sha256(data).hexdigest())

    def put_new_file(self, relative: str, local: str) -> StoredObject:
        """:meth:`put_new` of the bytes of the local file ``local``, streamed: memory holds a
        chunk, not the file (a rewrite's files can be larger than its memory limit)."""
        path = self.full_path(relative)
        if self.filesystem.get_file_info(path).type != pafs.FileType.NotFound:
            raise ObjectExistsError(f"journal object exists already: {relative}")
        self.filesystem.create_dir(path.rsplit("/", 1)[0], recursive=True)
        with open(local, "rb") as source, self.filesystem.open_output_stream(path) as stream:
            size, digest = copy_stream(source.read, stream.write)
        return StoredObject(relative, size, digest)

    def read(self, relative: str) -> bytes:
        with self.filesystem.open_input_stream(self.full_path(relative)) as stream:
            return stream.read()

    def read_into(self, relative: str, out: BinaryIO) -> StoredObject:
        """Stream the current bytes of the object ``relative`` into ``out`` a chunk at a time;
        size, SHA-256 (and on a versioned store the version id) are those of the bytes written."""
        with self.filesystem.open_input_stream(self.full_path(relative)) as stream:
            size, digest = copy_stream(stream.read, out.write)
        return StoredObject(relative, size, digest)

    def copy_to_local(self, relative: str, local: str) -> StoredObject:
        """Stream the object ``relative`` into the new local file ``local``; its size and
        SHA-256 are those of the bytes copied (no file is left behind when the read fails)."""
        out = open(local, "xb")  # noqa: SIM115 - closed below, and removed on failure
        try:
            with out:
                return self.read_into(relative, out)
        except BaseException:
            os.remove(local)
            raise

    def sha256(self, relative: str) -> str:
        """SHA-256 hex of the object's current bytes, read a chunk at a time."""
        with self.filesystem.open_input_stream(self.full_path(relative)) as stream:
            return copy_stream(stream.read, lambda _: None)[1]

    def exists(self, relative: str) -> bool:
        return self.filesystem.get_file_info(self.full_path(relative)).type != pafs.FileType.NotFound

    def list_files(self, prefix: str = "", suffix: str = "") -> list[str]:
        """Relative paths of files below ``prefix`` ending in ``suffix``, sorted; hidden ones skipped."""
        base = self.full_path(prefix) if prefix else self.root
        selector = pafs.FileSelector(base, recursive=True, allow_not_found=True)
        out = []
        for info in self.filesystem.get_file_info(selector):
            if info.type != pafs.FileType.File or not info.path.endswith(suffix):
                continue
            if info.base_name.startswith(".") or info.base_name.startswith("_tmp"):
                continue
            out.append(info.path[len(self.root) + 1:])
        return sorted(out)

    def delete(self, relative: str) -> None:
        self.filesystem.delete_file(self.full_path(relative))

    def local_path(self) -> str | None:
        """The root as a local directory, when it is one (DuckDB reads it directly then)."""
        return None
