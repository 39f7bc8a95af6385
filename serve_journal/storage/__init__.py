"""Journal storage: one protocol, a backend per URI scheme, retention policies.

- ``base.py``: :class:`JournalStorage`, the create-only object protocol over ``pyarrow.fs``.
- ``local.py``: local directories (atomic exclusive create, read-only files).
- ``s3.py``: S3 write-once (``If-None-Match`` puts, Object Lock retention, checksums).
- ``retention.py``: retention policies per tier.

:func:`open_storage` is the one way to open a journal root from a URI; :func:`is_local_uri` and
:func:`local_root` are the one test of "is this URI a local folder".
"""

from __future__ import annotations

import os
import urllib.parse
from typing import Any

import pyarrow.fs as pafs

from serve_journal.storage.base import JournalStorage, ObjectExistsError, StoredObject
from serve_journal.storage.local import LocalJournalStorage
from serve_journal.storage.retention import RetentionPolicy, TieredRetention
from serve_journal.storage.s3 import S3WormStorage

_FILE_SCHEME = "file://"


def is_local_uri(uri: str) -> bool:
    """True for a local path (``./journal``, ``/data/j``) or a ``file://`` URI."""
    return "://" not in uri or uri.startswith(_FILE_SCHEME)


def local_root(uri: str) -> str | None:
    """The absolute local folder of a local URI; ``None`` for a remote one (``s3://`` ...)."""
    if not is_local_uri(uri):
        return None
    return os.path.abspath(uri.removeprefix(_FILE_SCHEME))


def open_storage(uri: str, *, retention: Any = None, worm: bool | None = None) -> JournalStorage:
    """Open a journal root: a local path (``./journal``, ``file:///..``) or any URI ``pyarrow.fs``
    understands.

    ``s3://`` with ``worm=True`` (or ``?worm=1`` in the URI, or a ``retention`` policy) gives
    the write-once S3 backend: ``If-None-Match`` puts with Object Lock and checksums.
    """
    root = local_root(uri)
    if root is not None:
        return LocalJournalStorage(root)
    parsed = urllib.parse.urlparse(uri)
    query = dict(urllib.parse.parse_qsl(parsed.query))
    if worm is None:
        worm = query.get("worm", "").lower() in ("1", "true", "yes") or retention is not None
    if parsed.scheme == "s3" and worm:
        return S3WormStorage.from_uri(uri, retention=TieredRetention.from_config(retention))
    if "worm" in query:
        query.pop("worm")
        uri = urllib.parse.urlunparse(parsed._replace(query=urllib.parse.urlencode(query)))
    filesystem, path = pafs.FileSystem.from_uri(uri)
    return JournalStorage(filesystem, path, uri)


__all__ = [
    "JournalStorage",
    "LocalJournalStorage",
    "ObjectExistsError",
    "RetentionPolicy",
    "S3WormStorage",
    "StoredObject",
    "TieredRetention",
    "is_local_uri",
    "local_root",
    "open_storage",
]
