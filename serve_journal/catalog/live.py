"""The catalog: which journal files are live. The one place that answers "which files does a
reader see", for query, console, replay, forget, compaction, lifecycle and verify.

Writers (sinks) publish data files create-only. A rewrite (compaction merging small files, a
lifecycle move from hot to cold) writes its new files, then commits with one create-only *commit
marker* ``_commits/<tier>/model=../date=../hour=../<name>.json`` naming the new files and the
files they replace. Readers apply one rule (:func:`resolve_live`): a file named in some marker's
``replaces`` is gone; a derived file (``c-*`` compacted, or anything in the cold tier) is visible
only once a marker names it. Before the marker readers see the inputs only, after it the new
files only.
"""

from __future__ import annotations

import base64
import datetime as dt
import hashlib
import json
import logging
import threading
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, replace
from typing import Protocol

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from serve_journal.catalog.layout import (
    COLD,
    DEFAULT_SPEC,
    PARQUET_SUFFIX,
    TIERS,
    PartitionKey,
    escape_value,
)
from serve_journal.errors import CompactionError, ObjectExistsError
from serve_journal.integrity.fingerprint import Fingerprint, fingerprint_files
from serve_journal.integrity.manifest import SignedDocument
from serve_journal.integrity.trust import reader_trust
from serve_journal.storage import JournalStorage

log = logging.getLogger(__name__)

COMMITS_PREFIX = "_commits"
COMPACTED_PREFIX = "c-"
MARKER_VERSION = 1


class MarkerSigner(Protocol):
    """What signs a commit marker: the journal's manifest signer."""

    key_id: str
    public_key: Ed25519PublicKey

    def sign(self, message: bytes) -> bytes: ...


@dataclass(frozen=True)
class CommitMarker(SignedDocument):
    """A committed rewrite: ``new_files`` now hold exactly the entries of ``replaces``.

    Markers are part of signed history: the rewrite signs every field, its own path included,
    with the journal's manifest key (``key_id``, ``signature``), so a marker forged, edited,
    or copied to another name does not verify and readers holding the key ignore it."""

    kind: str  # "compaction" or "lifecycle"
    path: str
    new_files: tuple[str, ...]
    replaces: tuple[str, ...]
    fingerprint: Fingerprint
    created_at: str
    file_sha256: tuple[tuple[str, str], ...] = ()
    """``(new file, SHA-256 of its bytes)`` as verified before the commit (empty in markers
    written before this field existed: those are checked by fingerprint)."""
    key_id: str = ""
    signature: str = ""
    """Base64 Ed25519 signature over :meth:`signed_bytes` (empty: unsigned)."""

    def _doc(self) -> dict:
        doc = {
            "marker_version": MARKER_VERSION,
            "kind": self.kind,
            "new_files": list(self.new_files),
            "replaces": list(self.replaces),
            "fingerprint": self.fingerprint.as_dict(),
            "created_at": self.created_at,
        }
        if self.file_sha256:
            doc["file_sha256"] = dict(self.file_sha256)
        if self.key_id:
            doc["key_id"] = self.key_id
        return doc

    def signed_bytes(self) -> bytes:
        """What the signature covers: every field but the signature, and the marker's path."""
        doc = {**self._doc(), "path": self.path}
        return json.dumps(doc, sort_keys=True, separators=(",", ":"), ensure_ascii=True).encode()

    def signed_by(self, signer: MarkerSigner) -> CommitMarker:
        """This marker signed by ``signer``."""
        unsigned = replace(self, key_id=signer.key_id, signature="")
        signature = base64.b64encode(signer.sign(unsigned.signed_bytes())).decode("ascii")
        return replace(unsigned, signature=signature)

    def to_json(self) -> bytes:
        doc = self._doc()
        if self.signature:
            doc["signature"] = self.signature
        return json.dumps(doc, sort_keys=True, indent=1).encode()

    @classmethod
    def from_json(cls, path: str, data: bytes) -> CommitMarker:
        doc = json.loads(data)
        fp = doc["fingerprint"]
        return cls(
            kind=doc["kind"],
            path=path,
            new_files=tuple(doc["new_files"]),
            replaces=tuple(doc["replaces"]),
            fingerprint=Fingerprint(fp["rows"], fp["entry_ids"], fp["entries"]),
            created_at=doc["created_at"],
            file_sha256=tuple(sorted(doc.get("file_sha256", {}).items())),
            key_id=doc.get("key_id", ""),
            signature=doc.get("signature", ""),
        )


def marker_path(key: PartitionKey, tier: str, name: str) -> str:
    """Where the commit marker of derived file set ``name`` of partition ``key`` lives."""
    return f"{COMMITS_PREFIX}/{key.path(tier)}/{name}.json"


class MarkerCache:
    """Markers are create-only and never change: read each once per process (per journal root:
    marker names are deterministic, two journals can hold the same name).

    With ``public_key``, :meth:`load` returns only the markers signed by it: a forged or altered
    marker neither hides nor commits anything for a reader holding the journal's key."""

    def __init__(self, public_key: Ed25519PublicKey | None = None) -> None:
        self.public_key = public_key
        self._cache: dict[tuple[str, str], tuple[CommitMarker, bool]] = {}

    def load(self, storage: JournalStorage, paths: Sequence[str]) -> list[CommitMarker]:
        out = []
        for path in paths:
            hit = self._cache.get((storage.full_path(path), path))
            if hit is None:
                marker = CommitMarker.from_json(path, storage.read(path))
                valid = self.public_key is None or marker.verify(self.public_key)
                if not valid:
                    log.warning("ignoring commit marker %s: not signed by the journal's key", path)
                hit = self._cache[(storage.full_path(path), path)] = (marker, valid)
            if hit[1]:
                out.append(hit[0])
        return out


_READER_CACHES: dict[str, MarkerCache] = {}
_READER_LOCK = threading.Lock()


def reader_cache(storage: JournalStorage) -> MarkerCache:
    """The marker cache readers of ``storage`` share: checked against the readers' trust anchor
    (:func:`serve_journal.integrity.trust.reader_trust`) when there is one."""
    with _READER_LOCK:
        cache = _READER_CACHES.get(storage.uri)
        if cache is None or cache.public_key is None:  # a key may have been provisioned since
            anchor = reader_trust(storage.uri)
            if cache is None or anchor is not None:
                cache = _READER_CACHES[storage.uri] = MarkerCache(
                    anchor.public_key if anchor is not None else None)
        return cache


def load_markers(
    storage: JournalStorage, prefix: str = "", cache: MarkerCache | None = None
) -> list[CommitMarker]:
    """Every commit marker below ``_commits/<prefix>`` that ``cache`` accepts (default: the
    readers' cache of ``storage``, see :func:`reader_cache`)."""
    base = f"{COMMITS_PREFIX}/{prefix}".rstrip("/")
    paths = storage.list_files(base, suffix=".json")
    return (cache or reader_cache(storage)).load(storage, paths)


def is_derived(path: str) -> bool:
    """Compacted files and cold files exist only once a commit marker names them."""
    name = path.rsplit("/", 1)[-1]
    return path.startswith(f"{COLD}/") or name.startswith(COMPACTED_PREFIX)


@dataclass(frozen=True)
class DataFile:
    """One live journal data file."""

    path: str
    tier: str
    key: PartitionKey


def resolve_live(paths: Iterable[str], markers: Iterable[CommitMarker]) -> list[str]:
    """Apply the reader's rule to a file listing: drop replaced files and uncommitted derived ones."""
    replaced: set[str] = set()
    committed: set[str] = set()
    for marker in markers:
        replaced.update(marker.replaces)
        committed.update(marker.new_files)
    return [
        p for p in paths if p not in replaced and (not is_derived(p) or p in committed)
    ]


def live_files(
    storage: JournalStorage,
    tier: str = "all",
    model: str | None = None,
    cache: MarkerCache | None = None,
) -> list[DataFile]:
    """The files a reader must scan to see every entry of ``tier`` exactly once.

    Markers are listed before and after the data files; if a rewrite committed in between, the
    listing is taken again, so a concurrent compaction or lifecycle run never makes entries vanish
    or double.
    """
    tiers = TIERS if tier == "all" else (tier,)
    if any(t not in TIERS for t in tiers):
        raise ValueError(f"tier must be 'hot', 'cold' or 'all', got {tier!r}")
    for _ in range(20):
        before = load_markers(storage, cache=cache)
        paths: list[str] = []
        for t in TIERS:  # both tiers: a hot file replaced by a cold one must be judged together
            prefix = f"{t}/model={_escape(model)}" if model is not None else t
            paths.extend(storage.list_files(prefix, suffix=PARQUET_SUFFIX))
        after = load_markers(storage, cache=cache)
        if [m.path for m in before] == [m.path for m in after]:
            break
    else:  # pragma: no cover - needs a rewrite committing on every one of 20 listings
        raise RuntimeError("journal listing kept changing; retry the query")
    out = []
    for path in resolve_live(paths, after):
        file_tier, key = DEFAULT_SPEC.parse(path)
        if file_tier in tiers:
            out.append(DataFile(path, file_tier, key))
    return out


def _escape(model: str | None) -> str:
    return escape_value(model or "")


def set_name(prefix: str, inputs: Sequence[str]) -> str:
    """Deterministic name of the file set derived from ``inputs``: ``<prefix><hash>``."""
    digest = hashlib.sha256("\n".join(sorted(inputs)).encode()).hexdigest()[:24]
    return f"{prefix}{digest}"


def commit(
    storage: JournalStorage,
    *,
    kind: str,
    path: str,
    new_files: Sequence[str] | Sequence[tuple[str, str]],
    replaces: Sequence[str],
    expected: Fingerprint,
    signer: MarkerSigner | None,
    now: dt.datetime | None = None,
) -> CommitMarker:
    """Write the commit marker (create-only), signed by ``signer`` (the run's manifest signer;
    ``None`` writes an unsigned marker, which verify rejects and keyed readers ignore); an
    existing marker from an earlier run is kept. ``new_files`` are paths or ``(path, sha256)``
    pairs (as :func:`write_verified` returns)."""
    pairs = [f if isinstance(f, tuple) else (f, "") for f in new_files]
    new_files = [p for p, _ in pairs]
    marker = CommitMarker(
        kind=kind,
        path=path,
        new_files=tuple(new_files),
        replaces=tuple(sorted(replaces)),
        fingerprint=expected,
        created_at=(now or dt.datetime.now(dt.UTC)).isoformat(),
        file_sha256=tuple(sorted((p, h) for p, h in pairs if h)),
    )
    if signer is not None:
        marker = marker.signed_by(signer)
    try:
        storage.put_new(path, marker.to_json())
    except ObjectExistsError:
        marker = CommitMarker.from_json(path, storage.read(path))
        if set(marker.new_files) != set(new_files) or marker.fingerprint != expected:
            raise CompactionError(f"commit marker {path} exists with other content") from None
        if signer is not None and not marker.verify(signer.public_key):
            raise CompactionError(f"commit marker {path} exists but is not signed by this "
                                  "journal's key (forged?); run verify") from None
    return marker


def marker_checks(storage: JournalStorage, marker: CommitMarker) -> bool:
    """Do the marker's new files (still) hold exactly the entries it promises?

    Files whose SHA-256 the marker recorded are checked by their bytes (they were verified entry
    by entry before the commit); older markers by recomputing the fingerprint."""
    try:
        if marker.file_sha256 and {p for p, _ in marker.file_sha256} == set(marker.new_files):
            return all(_sha256_of(storage, p) == h for p, h in marker.file_sha256)
        return fingerprint_files(storage, marker.new_files) == marker.fingerprint
    except Exception as exc:  # unreadable, missing or damaged: it does not check
        log.warning("files of %s do not check: %s", marker.path, type(exc).__name__)
        return False


def _sha256_of(storage: JournalStorage, path: str) -> str:
    digest = hashlib.sha256()
    with storage.filesystem.open_input_stream(storage.full_path(path)) as stream:
        while chunk := stream.read(8 * 1024 * 1024):
            digest.update(chunk)
    return digest.hexdigest()
