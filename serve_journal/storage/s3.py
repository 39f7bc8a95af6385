"""Write-once journal storage on S3 (or MinIO) with Object Lock, through boto3.

pyarrow's S3 filesystem cannot send conditional or Object Lock headers, so writes, reads and
listings go through boto3:

* ``PutObject`` with ``If-None-Match: *``: the store refuses to replace an existing key (412,
  raised as :class:`~serve_journal.storage.base.ObjectExistsError`);
* ``ObjectLockMode`` and ``ObjectLockRetainUntilDate`` from the retention policy of the path's
  area (hot / cold / manifests), so the stored version cannot be deleted or overwritten in place
  before that date (the bucket must have Object Lock enabled, which implies versioning);
* ``ChecksumSHA256``: S3 checks the body against it and keeps it with the object;
* the returned ``VersionId`` goes into :class:`~serve_journal.storage.base.StoredObject` and from there
  into the manifest record, so verify can tell the recorded version from a shadow version.

Objects a bucket lifecycle rule moved to an archive class (``GLACIER``, ``DEEP_ARCHIVE``; see
``maintain/lifecycle.s3_lifecycle_configuration``) cannot be read until restored: a read raises
:class:`~serve_journal.errors.ArchivedObjectError` naming the file and the restore command, and
:meth:`S3WormStorage.archive_states` / :meth:`S3WormStorage.restore` find and restore them
(:mod:`serve_journal.storage.archive` is the tier-independent front).

``filesystem`` is still a pyarrow ``S3FileSystem`` on the same endpoint, for readers (DuckDB,
pyarrow.dataset) that want one.
"""

from __future__ import annotations

import base64
import datetime as dt
import hashlib
import urllib.parse
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, BinaryIO

import pyarrow.fs as pafs

from serve_journal.errors import ArchivedObjectError
from serve_journal.storage.base import (
    JournalStorage,
    ObjectExistsError,
    StoredObject,
    copy_stream,
    file_sha256,
)
from serve_journal.storage.retention import RetentionPolicy, TieredRetention


@dataclass(frozen=True)
class ObjectVersion:
    """One version (or delete marker) of a key, as ``ListObjectVersions`` reports it."""

    path: str
    version_id: str
    is_latest: bool
    is_delete_marker: bool
    size: int | None
    last_modified: dt.datetime | None


ARCHIVE_CLASSES = frozenset({"GLACIER", "DEEP_ARCHIVE"})
"""Storage classes whose objects must be restored (S3 RestoreObject) before a GET. Glacier
Instant Retrieval (``GLACIER_IR``) reads like any other class."""

RESTORE_TIERS = ("Standard", "Bulk", "Expedited")


@dataclass(frozen=True)
class ArchiveState:
    """An object in an archive storage class and how far its restore is."""

    path: str
    storage_class: str
    restore: str
    """``none`` (not requested or expired), ``in-progress`` or ``restored`` (readable now)."""
    restored_until: str | None = None

    @property
    def readable(self) -> bool:
        return self.restore == "restored"


def _restore_state(header: str | None) -> tuple[str, str | None]:
    """``(state, expiry)`` from a HEAD ``x-amz-restore`` header."""
    if not header:
        return "none", None
    if 'ongoing-request="true"' in header:
        return "in-progress", None
    expiry = header.split('expiry-date="', 1)[1].split('"', 1)[0] if "expiry-date" in header else None
    return "restored", expiry


def _boto3() -> Any:
    try:
        import boto3  # inside: 0.2 s to import, needed only for s3:// journals
    except ImportError as exc:  # pragma: no cover - boto3 is a dependency
        raise ImportError("S3 write-once storage needs boto3: pip install 'boto3>=1.34'") from exc
    return boto3


def _error_code(exc: Exception) -> tuple[str, int]:
    response = getattr(exc, "response", None) or {}
    code = str(response.get("Error", {}).get("Code", ""))
    status = int(response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0) or 0)
    return code, status


class S3WormStorage(JournalStorage):
    """A journal under ``s3://<bucket>/<prefix>`` written create-only with Object Lock."""

    def __init__(
        self,
        bucket: str,
        prefix: str = "",
        *,
        retention: TieredRetention | RetentionPolicy | None = None,
        endpoint_url: str | None = None,
        region: str | None = None,
        access_key: str | None = None,
        secret_key: str | None = None,
        session_token: str | None = None,
        client: Any = None,
    ) -> None:
        if not bucket or "/" in bucket:
            raise ValueError(f"bucket must be a bucket name without '/', got {bucket!r}")
        self.bucket = bucket
        self.prefix = prefix.strip("/")
        if isinstance(retention, RetentionPolicy):
            retention = TieredRetention(hot=retention, cold=retention, manifest=retention)
        self.retention = retention or TieredRetention()
        self.endpoint_url = endpoint_url
        self.region = region
        if client is None:
            client = _boto3().client(
                "s3", endpoint_url=endpoint_url, region_name=region,
                aws_access_key_id=access_key, aws_secret_access_key=secret_key,
                aws_session_token=session_token,
            )
        self.client = client
        fs_options: dict[str, Any] = {}
        if endpoint_url:
            parsed = urllib.parse.urlparse(endpoint_url)
            fs_options["endpoint_override"] = parsed.netloc
            fs_options["scheme"] = parsed.scheme or "https"
        if region:
            fs_options["region"] = region
        if access_key and secret_key:
            fs_options.update(access_key=access_key, secret_key=secret_key,
                              session_token=session_token)
        root = f"{bucket}/{self.prefix}" if self.prefix else bucket
        uri = f"s3://{root}"
        self._fs_options = fs_options
        super().__init__(None, root, uri)  # type: ignore[arg-type] - built on first use

    @property
    def filesystem(self) -> pafs.FileSystem:  # type: ignore[override]
        """A pyarrow ``S3FileSystem`` on the same endpoint, for readers (DuckDB, datasets), built
        on first use (its AWS SDK start is not free). A real ``FileSystem``: pyarrow's dataset
        API refuses wrappers."""
        if self._filesystem is None:
            self._filesystem = pafs.S3FileSystem(**self._fs_options)
        return self._filesystem

    @filesystem.setter
    def filesystem(self, value: pafs.FileSystem | None) -> None:
        self._filesystem = value

    @classmethod
    def from_uri(
        cls, uri: str, *, retention: TieredRetention | RetentionPolicy | None = None, **options: Any
    ) -> S3WormStorage:
        """From ``s3://bucket/prefix?endpoint_override=host:port&scheme=http&region=..``.

        Query parameters are the ones ``pyarrow.fs.S3FileSystem`` URIs take (``endpoint_override``,
        ``scheme``, ``region``); ``worm`` is ignored here. Keyword ``options`` go to the constructor.
        """
        parsed = urllib.parse.urlparse(uri)
        if parsed.scheme != "s3":
            raise ValueError(f"uri must start with s3://, got scheme {parsed.scheme!r}")
        query = dict(urllib.parse.parse_qsl(parsed.query))
        if "endpoint_url" not in options and "endpoint_override" in query:
            scheme = query.get("scheme", "https")
            options["endpoint_url"] = f"{scheme}://{query['endpoint_override']}"
        if "region" not in options and "region" in query:
            options["region"] = query["region"]
        return cls(parsed.netloc, parsed.path, retention=retention, **options)

    def __repr__(self) -> str:
        return f"S3WormStorage({self.uri!r})"

    def key(self, relative: str) -> str:
        relative = relative.lstrip("/")
        return f"{self.prefix}/{relative}" if self.prefix else relative

    def _relative(self, key: str) -> str:
        return key[len(self.prefix) + 1:] if self.prefix else key

    # -- writes ------------------------------------------------------------------------------

    def put_new(self, relative: str, data: bytes) -> StoredObject:
        """Create ``relative`` once, locked per its retention policy; 412 -> ObjectExistsError."""
        return self._put(relative, data, hashlib.sha256(data).digest(), len(data))

    def put_new_file(self, relative: str, local: str) -> StoredObject:
        """:meth:`put_new` of a local file, streamed from disk (hashed first, then sent)."""
        with open(local, "rb") as handle:
            digest = bytes.fromhex(file_sha256(handle))
            size = handle.tell()
            handle.seek(0)
            return self._put(relative, handle, digest, size)

    def _put(self, relative: str, body: Any, digest: bytes, size: int) -> StoredObject:
        params: dict[str, Any] = {
            "Bucket": self.bucket, "Key": self.key(relative), "Body": body,
            "IfNoneMatch": "*", "ChecksumAlgorithm": "SHA256",
            "ChecksumSHA256": base64.b64encode(digest).decode("ascii"),
        }
        policy = self.retention.for_path(relative)
        if policy is not None:
            params["ObjectLockMode"] = policy.mode
            params["ObjectLockRetainUntilDate"] = policy.retain_until(dt.datetime.now(dt.UTC))
        try:
            response = self.client.put_object(**params)
        except Exception as exc:
            code, status = _error_code(exc)
            # 409 ConditionalRequestConflict: a concurrent create of the same key is in flight.
            if status in (409, 412) or code in ("PreconditionFailed", "ConditionalRequestConflict"):
                raise ObjectExistsError(f"journal object exists already: {relative}") from exc
            raise
        return StoredObject(relative, size, digest.hex(), response.get("VersionId"))

    def delete(self, relative: str) -> None:
        """Delete the current version: on a versioned bucket this only adds a delete marker."""
        self.client.delete_object(Bucket=self.bucket, Key=self.key(relative))

    def delete_version(self, relative: str, version_id: str, *, bypass_governance: bool = False) -> None:
        """Delete one version; refused (403 AccessDenied) while it is locked."""
        params: dict[str, Any] = {"Bucket": self.bucket, "Key": self.key(relative), "VersionId": version_id}
        if bypass_governance:
            params["BypassGovernanceRetention"] = True
        self.client.delete_object(**params)

    # -- reads -------------------------------------------------------------------------------

    def read(self, relative: str) -> bytes:
        return self.read_versioned(relative)[0]

    def read_versioned(self, relative: str, version_id: str | None = None) -> tuple[bytes, str | None]:
        """Bytes and version id of the current (or the given) version of ``relative``."""
        response = self._get(relative, version_id)
        with response["Body"] as body:
            return body.read(), response.get("VersionId")

    def read_into(self, relative: str, out: BinaryIO) -> StoredObject:
        response = self._get(relative)
        with response["Body"] as body:
            size, digest = copy_stream(body.read, out.write)
        return StoredObject(relative, size, digest, response.get("VersionId"))

    def sha256(self, relative: str) -> str:
        with self._get(relative)["Body"] as body:
            return copy_stream(body.read, lambda _: None)[1]

    def _get(self, relative: str, version_id: str | None = None) -> dict[str, Any]:
        """``get_object`` of ``relative``; missing -> FileNotFoundError, archived ->
        ArchivedObjectError."""
        params: dict[str, Any] = {"Bucket": self.bucket, "Key": self.key(relative)}
        if version_id:
            params["VersionId"] = version_id
        try:
            response = self.client.get_object(**params)
        except Exception as exc:
            code, status = _error_code(exc)
            if status == 404 or code in ("NoSuchKey", "NoSuchVersion", "404"):
                raise FileNotFoundError(f"journal object not found: {relative}") from exc
            if code == "InvalidObjectState":
                raise ArchivedObjectError([relative], self.restore_command()) from None
            raise
        return response

    def exists(self, relative: str) -> bool:
        try:
            self.client.head_object(Bucket=self.bucket, Key=self.key(relative))
        except Exception as exc:
            code, status = _error_code(exc)
            if status in (404, 405) or code in ("NoSuchKey", "404", "MethodNotAllowed"):
                return False
            raise
        return True

    def retention_of(self, relative: str, version_id: str | None = None) -> tuple[str | None, dt.datetime | None]:
        """(Object Lock mode, retain-until date) of the current or given version."""
        params: dict[str, Any] = {"Bucket": self.bucket, "Key": self.key(relative)}
        if version_id:
            params["VersionId"] = version_id
        response = self.client.head_object(**params)
        return response.get("ObjectLockMode"), response.get("ObjectLockRetainUntilDate")

    def _full_prefix(self, prefix: str) -> str:
        prefix = prefix.lstrip("/")
        if self.prefix:
            return f"{self.prefix}/{prefix}"
        return prefix

    def list_files(self, prefix: str = "", suffix: str = "") -> list[str]:
        out = []
        paginator = self.client.get_paginator("list_objects_v2")
        for page in paginator.paginate(Bucket=self.bucket, Prefix=self._full_prefix(prefix)):
            for item in page.get("Contents", []):
                relative = self._relative(item["Key"])
                base = relative.rsplit("/", 1)[-1]
                if not relative.endswith(suffix) or base.startswith(".") or base.startswith("_tmp"):
                    continue
                out.append(relative)
        return sorted(out)

    def list_versions(self, prefix: str = "") -> list[ObjectVersion]:
        """Every version and delete marker below ``prefix``, by path then newest first."""
        return list(self._iter_versions(prefix))

    def _iter_versions(self, prefix: str) -> Iterator[ObjectVersion]:
        paginator = self.client.get_paginator("list_object_versions")
        for page in paginator.paginate(Bucket=self.bucket, Prefix=self._full_prefix(prefix)):
            for item in page.get("Versions", []):
                yield ObjectVersion(self._relative(item["Key"]), item["VersionId"],
                                    bool(item.get("IsLatest")), False, item.get("Size"),
                                    item.get("LastModified"))
            for item in page.get("DeleteMarkers", []):
                yield ObjectVersion(self._relative(item["Key"]), item["VersionId"],
                                    bool(item.get("IsLatest")), True, None, item.get("LastModified"))

    # -- archive classes ---------------------------------------------------------------------

    def restore_command(self) -> str:
        """The command that restores this journal's archived files."""
        return f"serve-journal restore --journal {self.uri}"

    def archive_states(self, prefix: str = "") -> dict[str, ArchiveState]:
        """Objects below ``prefix`` in an archive class, with their restore state: one listing,
        then one HEAD per archived object (the listing does not say whether it is restored)."""
        out: dict[str, ArchiveState] = {}
        paginator = self.client.get_paginator("list_objects_v2")
        for page in paginator.paginate(Bucket=self.bucket, Prefix=self._full_prefix(prefix)):
            for item in page.get("Contents", []):
                storage_class = item.get("StorageClass") or "STANDARD"
                if storage_class in ARCHIVE_CLASSES:
                    out[self._relative(item["Key"])] = self.archive_state(
                        self._relative(item["Key"]), storage_class)
        return out

    def archive_state(self, relative: str, storage_class: str | None = None) -> ArchiveState | None:
        """The archive state of ``relative``; ``None`` when it is not in an archive class."""
        head = self.client.head_object(Bucket=self.bucket, Key=self.key(relative))
        storage_class = head.get("StorageClass") or storage_class or "STANDARD"
        if storage_class not in ARCHIVE_CLASSES:
            return None
        state, expiry = _restore_state(head.get("Restore"))
        return ArchiveState(relative, storage_class, state, expiry)

    def head_record(self, relative: str) -> dict[str, Any]:
        """What S3 keeps about the current version without reading it: ``version_id``, ``size``
        and ``sha256`` (hex, the checksum S3 checked the body against on upload; ``None`` when
        the object was stored without one)."""
        head = self.client.head_object(Bucket=self.bucket, Key=self.key(relative),
                                       ChecksumMode="ENABLED")
        checksum = head.get("ChecksumSHA256")
        sha = None
        if checksum and "-" not in checksum:  # "...-N" is a multipart checksum of checksums
            sha = base64.b64decode(checksum).hex()
        return {"version_id": head.get("VersionId"), "size": head.get("ContentLength"),
                "sha256": sha}

    def restore(self, relative: str, *, days: int = 7, tier: str = "Standard") -> str:
        """Ask S3 to restore ``relative`` for ``days`` (RestoreObject). Idempotent; returns
        ``started``, ``in-progress`` or ``restored`` (already readable; the copy's expiry is
        extended to ``days``)."""
        if tier not in RESTORE_TIERS:
            raise ValueError(f"tier must be one of {', '.join(RESTORE_TIERS)}, got {tier!r}")
        if not isinstance(days, int) or isinstance(days, bool) or days < 1:
            raise ValueError(f"days must be a positive number of days, got {days!r}")
        try:
            response = self.client.restore_object(
                Bucket=self.bucket, Key=self.key(relative),
                RestoreRequest={"Days": days, "GlacierJobParameters": {"Tier": tier}})
        except Exception as exc:
            code, _ = _error_code(exc)
            if code == "RestoreAlreadyInProgress":
                return "in-progress"
            raise
        status = int(response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0) or 0)
        return "restored" if status == 200 else "started"
