"""Manifest records, hash-chained manifest logs and Ed25519-signed checkpoints.

Every stored data file gets a :class:`ManifestRecord` (its bytes' SHA-256, object version, row
count, time range, per-producer sequence ranges and the RFC 6962 Merkle root of its entries).
Records form an append-only log per writer, a *chain*: object stores cannot append and several
writers write at once, so each writer owns one chain and no coordination is needed. Each record is
one create-only object::

    _manifest/<chain_id>/<n:012d>.json        record n, carrying the hash of record n-1
    _checkpoints/<chain_id>/<length:012d>.json signed (chain id, length, head hash, time)

A record's hash is SHA-256 over its canonical JSON (sorted keys, no whitespace, ASCII) without the
``record_hash`` field; ``prev_hash`` of record 0 is 64 zeros. A checkpoint signs the canonical JSON
of its fields other than ``signature`` with Ed25519 and may be copied to a *witness* storage (a
second folder or bucket), so a rewrite of a whole chain, or its truncation, no longer matches what
the witness holds.
"""

from __future__ import annotations

import base64
import contextlib
import dataclasses
import datetime as dt
import hashlib
import json
import os
import re
import stat
import threading
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from serve_journal.catalog.layout import DEFAULT_SPEC
from serve_journal.errors import ChainConflictError, ManifestError
from serve_journal.fileformat import sort_for_lookup
from serve_journal.integrity.merkle import table_merkle_root
from serve_journal.schema import conform_entries
from serve_journal.storage import JournalStorage, ObjectExistsError, StoredObject

MANIFEST_PREFIX = "_manifest"
CHECKPOINT_PREFIX = "_checkpoints"
MANIFEST_FORMAT = 1
"""Format of checkpoints (and of records written before :data:`RECORD_FORMAT` 2)."""
RECORD_FORMAT = 2
"""Format of the manifest records written now: each producer's sequence runs packed into one
string (:func:`pack_runs`) where format 1 wrote a JSON list of ``[lo, hi]`` pairs (a compacted
file's 2.2 million runs took 36 MB of JSON, 10.8 bytes per entry; packed, ~2). Records of
format 1 are read and verified as they are."""
_PACKED = "r1:"
GENESIS_HASH = "0" * 64
SIGNING_KEY_FILE = "manifest-signing.pem"

_CHAIN_ID = re.compile(r"^[A-Za-z0-9_.\-]{1,128}$")
_OBJECT_NAME = re.compile(r"^(\d{12})\.json$")


def canonical_json(value: Mapping[str, Any]) -> bytes:
    """The byte form hashed and signed: sorted keys, no whitespace, ASCII only."""
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=True,
                      allow_nan=False).encode("ascii")


def validate_chain_id(chain_id: str) -> str:
    """A chain id is one path segment: letters, digits, ``_ . -``, at most 128 characters."""
    if not isinstance(chain_id, str) or not _CHAIN_ID.match(chain_id) or chain_id in {".", ".."}:
        raise ValueError(f"chain_id must match {_CHAIN_ID.pattern}, got {chain_id!r}")
    return chain_id


def record_path(chain_id: str, index: int) -> str:
    return f"{MANIFEST_PREFIX}/{chain_id}/{index:012d}.json"


def checkpoint_path(chain_id: str, length: int) -> str:
    return f"{CHECKPOINT_PREFIX}/{chain_id}/{length:012d}.json"


def parse_object_index(path: str) -> int | None:
    """``n`` of ``.../<n:012d>.json``, or ``None`` for any other name."""
    match = _OBJECT_NAME.match(path.rsplit("/", 1)[-1])
    return int(match.group(1)) if match else None


def decode_b64(text: str) -> bytes:
    """Strict base64: the one encoding of the bytes, so an object holding a signature or a key
    has one byte form (another spelling of the same bytes is an alteration, not a no-op)."""
    raw = base64.b64decode(text, validate=True)
    if base64.b64encode(raw).decode("ascii") != text:
        raise ValueError("not the canonical base64 encoding")
    return raw


def _utc_now() -> str:
    return dt.datetime.now(dt.UTC).isoformat(timespec="microseconds")


# -- records -------------------------------------------------------------------------------------


def _varints(values: np.ndarray) -> bytes:
    """LEB128 of non-negative int64 ``values``: 7 bits a byte, low first, high bit = more."""
    values = values.astype(np.uint64)
    width = 1
    while width < 10 and np.any(values >> np.uint64(7 * width)):
        width += 1
    shifts = np.arange(width, dtype=np.uint64) * np.uint64(7)
    groups = ((values[:, None] >> shifts) & np.uint64(0x7F)).astype(np.uint8)
    used = np.ones((len(values), width), dtype=bool)
    used[:, 1:] = (values[:, None] >> shifts[1:]) != 0
    more = np.zeros_like(used)
    more[:, :-1] = used[:, 1:]
    return (groups | (more.astype(np.uint8) << 7))[used].tobytes()


def _from_varints(data: bytes) -> np.ndarray:
    """The non-negative int64 values of :func:`_varints` bytes (malformed -> ManifestError)."""
    raw = np.frombuffer(data, dtype=np.uint8)
    if not len(raw):
        return np.empty(0, dtype=np.int64)
    last = (raw & 0x80) == 0
    if not last[-1]:
        raise ManifestError("packed sequence runs end inside a number")
    starts = np.flatnonzero(np.concatenate(([True], last[:-1])))
    lengths = np.diff(np.append(starts, len(raw)))
    if lengths.max() > 9:  # 9 bytes hold 63 bits: anything longer is past int64
        raise ManifestError("packed sequence runs hold a number past 64-bit")
    position = np.arange(len(raw)) - np.repeat(starts, lengths)
    parts = (raw & 0x7F).astype(np.uint64) << (position.astype(np.uint64) * np.uint64(7))
    return np.bitwise_or.reduceat(parts, starts).astype(np.int64)


def pack_runs(array: np.ndarray) -> str | None:
    """One producer's runs as the string a format-2 record stores, or ``None`` when they are not
    sorted, disjoint and non-negative (such runs stay a list; no writer makes them).

    Each run is two LEB128 numbers, the gap since the previous run's end (the first run: its
    start) and its length minus one, the bytes base64-encoded after ``r1:``. One string for one
    list of runs, and back: :func:`unpack_runs`."""
    if not len(array):
        return _PACKED
    lo, hi = array[:, 0], array[:, 1]
    if lo[0] < 0 or np.any(hi < lo) or np.any(lo[1:] <= hi[:-1]):
        return None
    gaps = np.empty(len(lo), dtype=np.int64)
    gaps[0] = lo[0]
    gaps[1:] = lo[1:] - hi[:-1] - 1
    return _PACKED + base64.b64encode(_varints(np.column_stack((gaps, hi - lo)).ravel())).decode()


def unpack_runs(text: str) -> np.ndarray:
    """The ``(n, 2)`` runs of a :func:`pack_runs` string (malformed -> ManifestError)."""
    if not text.startswith(_PACKED):
        raise ManifestError("packed sequence runs must start with r1:")
    try:
        data = base64.b64decode(text[len(_PACKED):].encode("ascii"), validate=True)
    except (ValueError, UnicodeEncodeError) as exc:
        raise ManifestError("packed sequence runs are not base64") from exc
    values = _from_varints(data)
    if len(values) % 2:
        raise ManifestError("packed sequence runs hold an odd count of numbers")
    # The last run ends at the sum of every number plus one per run but the first: in Python
    # integers (exact), it must stay within int64, so the sums below cannot wrap.
    if len(values) and int(values.astype(object).sum()) + len(values) // 2 > 2**63:
        raise ManifestError("packed sequence runs reach past 64-bit")
    gaps, spans = values[0::2], values[1::2]
    lo = np.cumsum(gaps) + np.cumsum(spans) - spans + np.arange(len(gaps))
    return np.column_stack((lo, lo + spans))


class SeqRuns(Sequence[list[int]]):
    """One producer's sequence runs ``[[lo, hi], ...]`` of a manifest record, 16 bytes a run.

    A compacted or cold file is sorted by subject, so its record holds about two runs for every
    three entries (2.2 million for a file of 3.3 million); as Python lists they took ~136 bytes
    a run in every reader that loads the records (verify, compaction, lifecycle), which grew
    with the journal. It reads as the list of ``[lo, hi]`` lists it replaces (iteration,
    indexing, ``len``, equality with such a list); :attr:`array` is the ``(n, 2)`` int64 array.
    """

    def __init__(self, runs: Iterable[Sequence[int]] | np.ndarray) -> None:
        if isinstance(runs, SeqRuns):
            array = runs.array
        elif isinstance(runs, str):
            array = unpack_runs(runs)
        else:
            try:  # a record is anyone's JSON: ragged, nested or huge values are a finding
                array = np.array(runs if isinstance(runs, np.ndarray) else list(runs))
            except (ValueError, TypeError, OverflowError) as exc:
                raise ManifestError("sequence ranges must be [lo, hi] pairs of integers") from exc
        if array.size == 0:
            array = np.empty((0, 2), dtype=np.int64)
        # Signed 64-bit only: no floats or booleans, and nothing at or past 2**63 (it would come
        # back as unsigned and wrap on the cast, so the runs would differ from the hashed JSON).
        if array.ndim != 2 or array.shape[1] != 2 or array.dtype.kind != "i":
            raise ManifestError("sequence ranges must be [lo, hi] pairs of 64-bit integers")
        self.array = array.astype(np.int64, copy=False)
        self.array.flags.writeable = False

    def __len__(self) -> int:
        return len(self.array)

    def __getitem__(self, index):  # type: ignore[override]
        if isinstance(index, slice):
            return SeqRuns(self.array[index])
        return [int(v) for v in self.array[index]]

    def __iter__(self) -> Iterator[list[int]]:
        return iter(self.array.tolist())

    def __eq__(self, other: object) -> bool:
        if isinstance(other, SeqRuns):
            return np.array_equal(self.array, other.array)
        if isinstance(other, (list, tuple)):
            return self.array.tolist() == [list(run) for run in other]
        return NotImplemented

    __hash__ = None  # type: ignore[assignment]

    def packed(self) -> str | list[list[int]]:
        """What a format-2 record stores: :func:`pack_runs`, or the list when not packable."""
        text = pack_runs(self.array)
        return self.tolist() if text is None else text

    def tolist(self) -> list[list[int]]:
        """The runs as the ``[[lo, hi], ...]`` lists of the record's JSON."""
        return self.array.tolist()

    @property
    def max_hi(self) -> int | None:
        """The highest sequence number covered, ``None`` for no runs."""
        return int(self.array[:, 1].max()) if len(self.array) else None

    def __repr__(self) -> str:
        return f"SeqRuns({len(self)} runs)"


@dataclass(frozen=True)
class ManifestRecord:
    """What the journal promises about one data file. Chain fields are set by :meth:`ManifestLog.append`."""

    path: str
    """Data file path relative to the journal root."""
    sha256: str
    size: int
    row_count: int
    min_ts_us: int | None
    max_ts_us: int | None
    seq_ranges: Mapping[str, SeqRuns]
    """``{producer_id: [[lo, hi], ...]}``, inclusive, sorted, non-overlapping; given as lists or
    :class:`SeqRuns`, held as :class:`SeqRuns`."""
    merkle_root: str
    """Hex RFC 6962 Merkle root over the file's entries in file order."""
    tier: str
    version_id: str | None = None
    """Object version the store returned (S3 VersionId), ``None`` where there are no versions."""
    replaces: list[str] = field(default_factory=list)
    """Paths this file supersedes (compaction): their entries are all in this file."""
    created: str = ""
    chain_id: str = ""
    index: int = -1
    prev_hash: str = ""
    record_hash: str = ""
    format: int = RECORD_FORMAT

    def __post_init__(self) -> None:
        if type(self.format) is not int or self.format not in (1, RECORD_FORMAT):
            raise ManifestError(f"unknown manifest record format {self.format!r}")
        if not isinstance(self.seq_ranges, Mapping):
            raise ManifestError("seq_ranges must map producer ids to sequence ranges")
        object.__setattr__(self, "seq_ranges",
                           {producer: SeqRuns(runs) for producer, runs in self.seq_ranges.items()})

    def to_dict(self, *, with_hash: bool = True) -> dict[str, Any]:
        out = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        out["seq_ranges"] = {producer: runs.packed() if self.format >= 2 else runs.tolist()
                             for producer, runs in self.seq_ranges.items()}
        out["replaces"] = list(self.replaces)
        if not with_hash:
            out.pop("record_hash")
        return out

    def compute_hash(self) -> str:
        """SHA-256 of the canonical JSON of every field but ``record_hash``."""
        return hashlib.sha256(canonical_json(self.to_dict(with_hash=False))).hexdigest()

    def to_json(self) -> bytes:
        return canonical_json(self.to_dict())

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> ManifestRecord:
        known = {f.name for f in dataclasses.fields(cls)}
        missing = sorted(f.name for f in dataclasses.fields(cls)
                         if f.name not in data and f.default is dataclasses.MISSING
                         and f.default_factory is dataclasses.MISSING)
        if missing:
            raise ManifestError(f"manifest record lacks field(s) {missing}")
        return cls(**{k: v for k, v in data.items() if k in known})

    @classmethod
    def from_json(cls, data: bytes) -> ManifestRecord:
        return cls.from_json_checked(data)[0]

    @classmethod
    def from_json_checked(cls, data: bytes) -> tuple[ManifestRecord, bool, bool]:
        """``(record, canonical, hash_ok)``: the record in ``data``; whether ``data`` is exactly
        the bytes its writer stored (canonical JSON of every field, no other); whether its
        ``record_hash`` is the hash of its content. One parse, no copy of the record (a
        compacted file's record holds a million sequence runs: verify reads every record)."""
        try:
            parsed = json.loads(data)
        except (ValueError, UnicodeDecodeError) as exc:
            raise ManifestError("manifest record is not valid JSON") from exc
        if not isinstance(parsed, dict):
            raise ManifestError("manifest record must be a JSON object")
        record = cls.from_dict(parsed)
        canonical = parsed.keys() == _RECORD_FIELDS and canonical_json(parsed) == data \
            and _runs_as_written(record, parsed["seq_ranges"])
        if canonical:  # then the parsed fields are exactly the record's: hash them as they are
            body = {k: v for k, v in parsed.items() if k != "record_hash"}
            hash_ok = record.record_hash == hashlib.sha256(canonical_json(body)).hexdigest()
        else:
            hash_ok = record.record_hash == record.compute_hash()
        return record, canonical, hash_ok

    @property
    def model(self) -> str | None:
        """Model name from the hive path, or ``None`` when the path is not a partition path."""
        try:
            return DEFAULT_SPEC.parse(self.path)[1].model
        except ValueError:
            return None


_RECORD_FIELDS = frozenset(f.name for f in dataclasses.fields(ManifestRecord))


def _runs_as_written(record: ManifestRecord, stored: Mapping[str, Any]) -> bool:
    """Each producer's runs are stored in the one form a writer of the record's format gives
    them (format 1: a list; format 2: the packed string, or a list where they cannot be
    packed), so a record has one canonical form and :meth:`ManifestRecord.to_json` is it."""
    for producer, runs in record.seq_ranges.items():
        value = stored[producer]
        if record.format >= 2:
            packed = pack_runs(runs.array)
            if (value != packed) if isinstance(value, str) else packed is not None:
                return False
        elif isinstance(value, str):
            return False
    return True


def sequence_ranges(producers: pa.Array | pa.ChunkedArray, seqs: pa.Array | pa.ChunkedArray
                    ) -> dict[str, list[list[int]]]:
    """``{producer_id: [[lo, hi], ...]}``: maximal runs of consecutive sequence numbers."""
    out: dict[str, list[list[int]]] = {}
    pairs = sorted(zip(producers.to_pylist(), seqs.to_pylist(), strict=True),
                   key=lambda p: (p[0] is None, p[0] or "", p[1]))
    for producer, seq in pairs:
        key = "" if producer is None else str(producer)
        runs = out.setdefault(key, [])
        if runs and seq <= runs[-1][1] + 1:
            runs[-1][1] = max(runs[-1][1], seq)
        else:
            runs.append([seq, seq])
    return out


def build_file_record(
    stored: StoredObject, table: pa.Table, tier: str, chain_id: str = "",
    replaces: list[str] | None = None,
) -> ManifestRecord:
    """The record of a data file written from ``table``.

    ``table`` is what was handed to ``encode_parquet``; it is cast and ordered the same way
    (``sort_for_lookup`` is stable, so an already sorted table is unchanged) so the Merkle root is
    over the file's rows in file order.
    """
    table = sort_for_lookup(conform_entries(table))
    if table.num_rows:
        ts = table.column("ts").cast(pa.int64())
        bounds = pc.min_max(ts)
        min_ts, max_ts = bounds["min"].as_py(), bounds["max"].as_py()
    else:
        min_ts = max_ts = None
    return ManifestRecord(
        path=stored.path, sha256=stored.sha256, size=stored.size, row_count=table.num_rows,
        min_ts_us=min_ts, max_ts_us=max_ts,
        seq_ranges=sequence_ranges(table.column("producer_id"), table.column("seq")),
        merkle_root=table_merkle_root(table), tier=tier, version_id=stored.version_id,
        replaces=list(replaces or []), chain_id=chain_id,
    )


# -- signing -------------------------------------------------------------------------------------


def public_key_id(public_key: Ed25519PublicKey) -> str:
    """Short fingerprint of a public key: the first 16 hex digits of SHA-256 of its raw bytes."""
    raw = public_key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return hashlib.sha256(raw).hexdigest()[:16]


def load_public_key(value: Ed25519PublicKey | bytes | str | os.PathLike[str]) -> Ed25519PublicKey:
    """An Ed25519 public key from a key object, PEM bytes, or the path of a PEM file."""
    if isinstance(value, Ed25519PublicKey):
        return value
    if isinstance(value, str | os.PathLike) and not str(value).lstrip().startswith("-----BEGIN"):
        with open(value, "rb") as handle:
            value = handle.read()
    pem = value.encode("ascii") if isinstance(value, str) else value
    key = serialization.load_pem_public_key(pem)
    if not isinstance(key, Ed25519PublicKey):
        raise ValueError(f"public_key must be an Ed25519 key, got {type(key).__name__}")
    return key


class ManifestSigner:
    """Signs checkpoints with an Ed25519 private key; the key never appears in a repr or message."""

    def __init__(self, private_key: Ed25519PrivateKey, *, source: str = "memory") -> None:
        if not isinstance(private_key, Ed25519PrivateKey):
            raise TypeError(f"private_key must be an Ed25519PrivateKey, got {type(private_key).__name__}")
        self._key = private_key
        self._source = source
        self.public_key = private_key.public_key()
        self.key_id = public_key_id(self.public_key)

    def __repr__(self) -> str:
        return f"ManifestSigner(key_id={self.key_id!r}, source={self._source!r})"

    def __reduce__(self) -> Any:
        raise TypeError("ManifestSigner is not picklable: load it where it is used (from_pem_file)")

    @classmethod
    def generate(cls) -> ManifestSigner:
        """A fresh in-memory key (tests, or before :meth:`save`)."""
        return cls(Ed25519PrivateKey.generate())

    @classmethod
    def from_pem_file(cls, path: str | os.PathLike[str]) -> ManifestSigner:
        """Load an unencrypted PKCS#8 PEM key; the file must not be readable by group or others."""
        path = os.fspath(path)
        mode = stat.S_IMODE(os.stat(path).st_mode)
        if mode & 0o077:
            raise PermissionError(
                f"signing key file {path} has mode {mode:o}; it must be 0600 (owner only)"
            )
        with open(path, "rb") as handle:
            key = serialization.load_pem_private_key(handle.read(), password=None)
        if not isinstance(key, Ed25519PrivateKey):
            raise ValueError(f"signing key file {path} must hold an Ed25519 key, got {type(key).__name__}")
        return cls(key, source=path)

    @classmethod
    def load_or_generate(cls, keys_dir: str | os.PathLike[str],
                         filename: str = SIGNING_KEY_FILE) -> ManifestSigner:
        """The embedded default: ``<keys_dir>/<filename>`` (``manifest-signing.pem``), created
        0600 when absent."""
        keys_dir = os.fspath(keys_dir)
        os.makedirs(keys_dir, mode=0o700, exist_ok=True)
        path = os.path.join(keys_dir, filename)
        if os.path.exists(path):
            return cls.from_pem_file(path)
        signer = cls.generate()
        try:
            signer.save(path)
        except FileExistsError:  # another process generated it first: use theirs
            return cls.from_pem_file(path)
        return cls.from_pem_file(path)

    def save(self, path: str | os.PathLike[str]) -> None:
        """Write the private key as PEM to a new file with mode 0600 (never overwrites)."""
        pem = self._key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
        fd = os.open(os.fspath(path), os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "wb") as handle:
            handle.write(pem)
            handle.flush()
            os.fsync(handle.fileno())

    def export_public_key(self) -> bytes:
        """The public key as PEM (SubjectPublicKeyInfo), for auditors."""
        return self.public_key.public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )

    def sign(self, message: bytes) -> bytes:
        return self._key.sign(message)


# -- checkpoints ---------------------------------------------------------------------------------


class SignedDocument:
    """A frozen dataclass with a ``signature`` field: Ed25519 over the canonical JSON of every
    other field (checkpoints, key certificates)."""

    signature: str

    def signed_bytes(self) -> bytes:
        body = dataclasses.asdict(self)  # type: ignore[call-overload]
        body.pop("signature")
        return canonical_json(body)

    def to_json(self) -> bytes:
        return canonical_json(dataclasses.asdict(self))  # type: ignore[call-overload]

    def verify(self, public_key: Ed25519PublicKey) -> bool:
        """True when the signature (canonical base64) is valid for ``public_key``."""
        try:
            public_key.verify(decode_b64(self.signature), self.signed_bytes())
        except (InvalidSignature, ValueError, TypeError):
            return False
        return True


@dataclass(frozen=True)
class Checkpoint(SignedDocument):
    """A signed statement: chain ``chain_id`` had ``length`` records, the last with ``head_hash``."""

    chain_id: str
    length: int
    head_hash: str
    time: str
    key_id: str
    signature: str = ""
    """Base64 Ed25519 signature over :meth:`signed_bytes`."""
    format: int = MANIFEST_FORMAT

    @classmethod
    def from_json(cls, data: bytes) -> Checkpoint:
        try:
            parsed = json.loads(data)
            known = {f.name for f in dataclasses.fields(cls)}
            return cls(**{k: v for k, v in parsed.items() if k in known})
        except (ValueError, TypeError, AttributeError, UnicodeDecodeError) as exc:
            raise ManifestError("checkpoint is not a valid checkpoint JSON object") from exc


# -- the log -------------------------------------------------------------------------------------


class ManifestLog:
    """The append-only, hash-chained manifest of one writer.

    ``append`` links each record to the previous one and stores it create-only; on construction the
    head is recovered by listing the chain, so a restarted writer continues where it stopped.
    ``checkpoint`` signs the head and copies the checkpoint to the ``witness`` storage if given.
    A new chain opened with a signer is announced at once by a signed checkpoint of length 0, so
    ``verify`` can tell a writer's chain from one an attacker made up. Thread-safe; one ``ManifestLog`` per chain id at a time.
    """

    def __init__(
        self, storage: JournalStorage, chain_id: str, signer: ManifestSigner | None = None,
        witness: JournalStorage | None = None,
    ) -> None:
        self.storage = storage
        self.chain_id = validate_chain_id(chain_id)
        self.signer = signer
        self.witness = witness
        self._lock = threading.Lock()
        self._length = 0
        self._head_hash = GENESIS_HASH
        self._checkpointed = 0
        self._announced = False
        self._recover()
        if signer is not None and not self._announced and self._length == 0:
            self._sign(genesis=True)  # announce the chain: signed history knows it from now on

    def __repr__(self) -> str:
        return f"ManifestLog(chain_id={self.chain_id!r}, length={self._length})"

    @property
    def length(self) -> int:
        return self._length

    @property
    def head_hash(self) -> str:
        return self._head_hash

    def _recover(self) -> None:
        indices = [parse_object_index(p) for p in
                   self.storage.list_files(f"{MANIFEST_PREFIX}/{self.chain_id}/", ".json")]
        indices = sorted(i for i in indices if i is not None)
        if indices:
            last = indices[-1]
            record = ManifestRecord.from_json(self.storage.read(record_path(self.chain_id, last)))
            if record.index != last or record.record_hash != record.compute_hash():
                raise ManifestError(
                    f"manifest chain {self.chain_id}: head record {record_path(self.chain_id, last)} "
                    "does not verify; run `serve-journal verify` before writing to it"
                )
            self._length = last + 1
            self._head_hash = record.record_hash
        checkpoints = [parse_object_index(p) for p in
                       self.storage.list_files(f"{CHECKPOINT_PREFIX}/{self.chain_id}/", ".json")]
        self._checkpointed = max((i for i in checkpoints if i is not None), default=0)
        self._announced = any(i is not None for i in checkpoints)

    def append(self, record: ManifestRecord) -> ManifestRecord:
        """Link ``record`` after the head, store it create-only and return the stored record."""
        with self._lock:
            linked = dataclasses.replace(
                record, chain_id=self.chain_id, index=self._length, prev_hash=self._head_hash,
                created=record.created or _utc_now(), record_hash="",
            )
            linked = dataclasses.replace(linked, record_hash=linked.compute_hash())
            try:
                self.storage.put_new(record_path(self.chain_id, linked.index), linked.to_json())
            except ObjectExistsError as exc:
                self._recover()
                raise ChainConflictError(
                    f"manifest chain {self.chain_id} has another writer: record {linked.index} "
                    "exists already; give each writer its own chain_id"
                ) from exc
            self._length += 1
            self._head_hash = linked.record_hash
            return linked

    def checkpoint(self) -> Checkpoint | None:
        """Sign the current head and store it (and its witness copy); ``None`` when nothing is new."""
        return self._sign(genesis=False)

    def _sign(self, *, genesis: bool) -> Checkpoint | None:
        """Sign the head; ``genesis`` signs the empty chain (length 0) when a writer first opens
        it, so verify knows the chain from signed history before its first file."""
        if self.signer is None:
            raise ManifestError(f"manifest chain {self.chain_id} has no signer to checkpoint with")
        with self._lock:
            if not genesis and (self._length == 0 or self._length == self._checkpointed):
                return None
            unsigned = Checkpoint(
                chain_id=self.chain_id, length=self._length, head_hash=self._head_hash,
                time=_utc_now(), key_id=self.signer.key_id,
            )
            signature = base64.b64encode(self.signer.sign(unsigned.signed_bytes())).decode("ascii")
            checkpoint = dataclasses.replace(unsigned, signature=signature)
            path = checkpoint_path(self.chain_id, checkpoint.length)
            data = checkpoint.to_json()
            for target in (self.storage, self.witness):
                if target is None:
                    continue
                # Exists already: a retry after a crash between the two puts; verify compares copies.
                with contextlib.suppress(ObjectExistsError):
                    target.put_new(path, data)
            self._checkpointed = checkpoint.length
            self._announced = True
            return checkpoint
