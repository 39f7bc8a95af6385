"""Object storage for the journal, over ``pyarrow.fs``.

Every write is a create-only put of a whole object: a reader never sees half a file and an
existing file is never replaced. This module holds the protocol every
backend follows (:class:`JournalStorage` over any ``pyarrow.fs`` filesystem, which publishes an
object only when its upload completes); ``local.py`` and ``s3.py`` hold the local and S3
write-once backends, and :func:`serve_journal.storage.open_storage` picks one by URI scheme.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import pyarrow.fs as pafs

from serve_journal.errors import ObjectExistsError


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

    def read(self, relative: str) -> bytes:
        with self.filesystem.open_input_stream(self.full_path(relative)) as stream:
            return stream.read()

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
