"""Object storage for the journal, over ``pyarrow.fs``.

Every write is a create-only put of a whole object: a reader never sees half a file and an
existing file is never replaced. The local backend creates through a hidden temporary file and a
hard link (atomic and exclusive) and makes the result read-only; other ``pyarrow.fs`` filesystems
(S3, GCS) publish an object only when its upload completes. The S3 write-once backend (Object
Lock, ``If-None-Match``) extends :class:`JournalStorage` where configured.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import urllib.parse
import uuid
from dataclasses import dataclass
from typing import Any

import pyarrow.fs as pafs


class ObjectExistsError(FileExistsError):
    """A create-only write found an object at that path already."""


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

    @classmethod
    def from_uri(cls, uri: str, *, retention: Any = None, worm: bool | None = None) -> JournalStorage:
        """Local path (``./journal``, ``file:///..``) or any URI ``pyarrow.fs`` understands.

        ``s3://`` with ``worm=True`` (or ``?worm=1`` in the URI, or a ``retention`` policy) gives
        the write-once S3 backend: ``If-None-Match`` puts with Object Lock and checksums.
        """
        if "://" not in uri or uri.startswith("file://"):
            path = uri[len("file://"):] if uri.startswith("file://") else uri
            return LocalJournalStorage(os.path.abspath(path))
        parsed = urllib.parse.urlparse(uri)
        query = dict(urllib.parse.parse_qsl(parsed.query))
        if worm is None:
            worm = query.get("worm", "").lower() in ("1", "true", "yes") or retention is not None
        if parsed.scheme == "s3" and worm:
            from serve_journal._private.s3_worm import S3WormStorage
            from serve_journal.retention import TieredRetention

            return S3WormStorage.from_uri(uri, retention=TieredRetention.from_config(retention))
        if "worm" in query:
            query.pop("worm")
            uri = urllib.parse.urlunparse(parsed._replace(query=urllib.parse.urlencode(query)))
        filesystem, root = pafs.FileSystem.from_uri(uri)
        return cls(filesystem, root, uri)

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


class LocalJournalStorage(JournalStorage):
    """A journal in a local directory: exclusive create via hard link, files made read-only."""

    def __init__(self, root: str) -> None:
        super().__init__(pafs.LocalFileSystem(), root, root)

    def put_new(self, relative: str, data: bytes) -> StoredObject:
        path = self.full_path(relative)
        directory = os.path.dirname(path)
        os.makedirs(directory, exist_ok=True)
        tmp = os.path.join(directory, f".tmp-{uuid.uuid4().hex}")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        try:
            with os.fdopen(fd, "wb") as handle:
                handle.write(data)
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
        _fsync_dir(directory)
        return StoredObject(relative, len(data), hashlib.sha256(data).hexdigest())

    def delete(self, relative: str) -> None:
        os.unlink(self.full_path(relative))

    def local_path(self) -> str | None:
        return self.root


def _fsync_dir(directory: str) -> None:
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
