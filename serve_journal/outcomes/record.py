"""Recording outcomes: validate a batch, check its request ids against the journal, and append
the accepted records as one new create-only file of the outcome partition, recorded in the
source's signed manifest chain.

Nothing is ever edited: a late or repeated label is a new record with its own ``recorded_at``
(the latest-label rule is applied when reading, :func:`serve_journal.outcomes.join.latest_outcomes`).
Every rejected record is counted by kind (:data:`REJECT_KINDS`) and named by its row number in
the batch, never by its values.

Each source writes its own manifest chain, ``outcomes.<source>``, exactly as a writer of entry
files does (:class:`~serve_journal.integrity.manifest.ManifestLog`, signed checkpoint after each
batch, witness copy when configured), so ``verify`` checks outcome files with the same chains,
checkpoints and remembered heads as entry files. On ``s3://`` the file is written with
If-None-Match and the Object Lock retention of the journal's manifests (the longest tier policy:
an outcome stays as long as any record of the decision it is about).

Reading (:func:`load_outcomes`) takes only outcome files whose bytes match a manifest record, and
with a trust anchor only records its key signed: a file planted in the partition is not read.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import logging
import math
import re
import secrets
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc

from serve_journal.catalog.layout import OUTCOME_SPEC, OUTCOMES_AREA
from serve_journal.errors import ChainConflictError, ManifestError
from serve_journal.integrity.manifest import (
    CHECKPOINT_PREFIX,
    MANIFEST_PREFIX,
    Checkpoint,
    ManifestLog,
    ManifestRecord,
    parse_object_index,
    record_path,
)
from serve_journal.integrity.trust import reader_trust
from serve_journal.outcomes.lookup import decision_times
from serve_journal.outcomes.schema import (
    OUTCOME_SCHEMA,
    OUTCOME_SCHEMA_VERSION,
    decode_outcomes,
    encode_outcomes,
    outcome_merkle_root,
)
from serve_journal.read.verify import signed_records
from serve_journal.sink.settings import SinkSettings, settings_for
from serve_journal.storage import JournalStorage, open_storage
from serve_journal.times import as_utc, to_micros

log = logging.getLogger(__name__)

CHAIN_PREFIX = "outcomes."
"""Manifest chain of source ``S``: ``outcomes.S``."""

_SOURCE = re.compile(r"^[A-Za-z0-9_\-]{1,64}$")
MAX_LABEL_CHARS = 256
FUTURE_SLACK = dt.timedelta(minutes=5)
"""An outcome time later than the recording clock plus this is refused (``bad_time``)."""

MISSING_REQUEST_ID = "missing_request_id"
BAD_LABEL = "bad_label"
BAD_VALUE = "bad_value"
BAD_TIME = "bad_time"
SOURCE_MISMATCH = "source_mismatch"
DUPLICATE_IN_BATCH = "duplicate_in_batch"
UNKNOWN_REQUEST_ID = "unknown_request_id"
BEFORE_DECISION = "outcome_before_decision"
REJECT_KINDS = (MISSING_REQUEST_ID, BAD_LABEL, BAD_VALUE, BAD_TIME, SOURCE_MISMATCH,
                DUPLICATE_IN_BATCH, UNKNOWN_REQUEST_ID, BEFORE_DECISION)
"""Why a record is rejected; each rejected record is counted under the first that applies."""

Outcomes = pa.Table | pa.RecordBatch | Iterable[Mapping[str, Any]]


@dataclass(frozen=True)
class IngestReport:
    """What :func:`record_outcomes` did with a batch."""

    batch_id: str
    source: str
    accepted: int
    rejected: int
    rejected_by_kind: dict[str, int]
    """``{kind: n}`` for every kind with at least one rejected record."""
    rejected_rows: dict[str, list[int]] = field(default_factory=dict)
    """``{kind: [row number in the batch, ...]}`` (0-based): which records to fix, no values."""
    files: list[str] = field(default_factory=list)
    """Outcome files written (relative to the journal root): none when nothing was accepted."""
    chain_id: str | None = None
    recorded_at: str = ""
    unsearched_files: list[str] = field(default_factory=list)
    """Archived journal files (S3 Glacier, not restored) the request-id check could not read: an
    id only they hold was rejected as unknown; restore them and ingest those records again."""

    def format_text(self) -> str:
        """The CLI's summary: accepted N, rejected M, the kinds counted."""
        lines = [f"accepted {self.accepted}, rejected {self.rejected}"
                 + (" (" + ", ".join(f"{k} {n}" for k, n in self.rejected_by_kind.items()) + ")"
                    if self.rejected else "")]
        lines.extend(f"wrote {path} (chain {self.chain_id})" for path in self.files)
        if self.unsearched_files:
            lines.append(f"{len(self.unsearched_files)} archived journal file(s) not searched "
                         "(restore needed): their request ids counted as unknown")
        return "\n".join(lines)


def check_source(source: str) -> str:
    """A source names its manifest chain: 1-64 letters, digits, ``_`` or ``-``."""
    if not isinstance(source, str) or not _SOURCE.match(source):
        raise ValueError(f"source must match {_SOURCE.pattern} (it names the source's manifest "
                         f"chain), got {source!r}")
    return source


def _rows(outcomes: Outcomes) -> list[Mapping[str, Any]]:
    if isinstance(outcomes, pa.Table | pa.RecordBatch):
        return outcomes.to_pylist()
    if isinstance(outcomes, Mapping | str | bytes):
        raise TypeError("outcomes must be a pyarrow Table or an iterable of mappings (one per "
                        f"record), got {type(outcomes).__name__}")
    rows = list(outcomes)
    for i, row in enumerate(rows):
        if not isinstance(row, Mapping):
            raise TypeError(f"outcomes[{i}] must be a mapping, got {type(row).__name__}")
    return rows


def _label(value: Any) -> tuple[str, str] | None:
    """``(text, type)`` of a label, or ``None`` when it is not a usable label."""
    if isinstance(value, bool):
        return ("true" if value else "false"), "bool"
    if isinstance(value, int):
        return str(value), "int"
    if isinstance(value, float) and value.is_integer():  # an int column with nulls reads as float
        return str(int(value)), "int"
    if isinstance(value, str):
        text = value.strip()
        if text and len(text) <= MAX_LABEL_CHARS and text.isprintable():
            return text, "str"
    return None


def _time(value: Any) -> dt.datetime | None:
    if isinstance(value, dt.date) and not isinstance(value, dt.datetime):
        value = dt.datetime(value.year, value.month, value.day)
    try:
        return as_utc(value, "outcome_time") if value is not None else None
    except (TypeError, ValueError):
        return None


def _missing(value: Any) -> bool:
    return value is None or (isinstance(value, float) and math.isnan(value))


def record_outcomes(
    journal: str | JournalStorage,
    outcomes: Outcomes,
    *,
    source: str,
    settings: SinkSettings | None = None,
    signing_key_file: str | None = None,
    witness_uri: str | None = None,
    retention: Any = None,
    now: dt.datetime | None = None,
    sign_unsigned_tail: bool = False,
    _crash: Callable[[str], None] | None = None,
) -> IngestReport:
    """Append a batch of outcomes to the journal's outcome partition; see the module docstring.

    ``outcomes``: a pyarrow Table (or batch) or an iterable of mappings with ``request_id``,
    either ``label`` (bool, int or str) or ``value`` (a finite number), ``outcome_time`` (an
    aware or UTC-naive datetime, a date, or ISO-8601 text) and optionally ``source`` (must equal
    ``source`` when given). ``source`` names who supplied the batch and the manifest chain it is
    recorded in. ``settings`` (or ``signing_key_file`` / ``witness_uri`` / ``retention``) say how
    the file is signed, witnessed and locked, as for the journal's writers. ``now``: the recording
    clock (``recorded_at``; default the current time). Returns an :class:`IngestReport`.

    Raises :class:`UnsignedTailError` (nothing written) when the source's chain holds records
    after its last checkpoint signed by this key: the batch's checkpoint would sign them.
    ``sign_unsigned_tail=True`` signs them anyway, once ``serve-journal verify`` showed they are
    an earlier ingest's that was killed between recording and signing (its file then counts).
    ``_crash``: test hook called at ``file-stored`` and ``recorded``.
    """
    check_source(source)
    uri = journal if isinstance(journal, str) else journal.uri
    if settings is None:
        settings = SinkSettings(journal_uri=uri, signing_key_file=signing_key_file,
                                witness_uri=witness_uri, retention=retention)
    settings = settings_for(uri, settings)
    recorded_at = as_utc(now or dt.datetime.now(dt.UTC), "now")
    storage = settings.storage() if isinstance(journal, str) else journal
    batch_id = secrets.token_hex(8)

    rejected: dict[str, list[int]] = {}
    valid: list[tuple[int, dict[str, Any]]] = []
    seen: set[tuple] = set()
    for i, row in enumerate(_rows(outcomes)):
        kind, record = _validate(row, source, recorded_at)
        if kind is None:
            ident = (record["request_id"], record["label"], record["value"],
                     to_micros(record["outcome_time"]))
            if ident in seen:
                kind = DUPLICATE_IN_BATCH
            seen.add(ident)
        if kind is not None:
            rejected.setdefault(kind, []).append(i)
        else:
            valid.append((i, record))

    latest = max((r["outcome_time"] for _, r in valid), default=None)
    # The ingest holds the signing key: its public key says which entry files vouch for an id.
    decided, archived = decision_times(storage, [r["request_id"] for _, r in valid], until=latest,
                                       public_key=settings.signer().public_key)
    accepted = []
    for i, record in valid:
        decided_us = decided.get(record["request_id"])
        if decided_us is None:
            rejected.setdefault(UNKNOWN_REQUEST_ID, []).append(i)
        elif to_micros(record["outcome_time"]) < decided_us:
            rejected.setdefault(BEFORE_DECISION, []).append(i)
        else:
            accepted.append(record)

    chain_id = files = None
    if accepted:
        chain_id = CHAIN_PREFIX + source
        table = pa.Table.from_pylist([{
            **record, "schema_version": OUTCOME_SCHEMA_VERSION,
            "outcome_id": secrets.token_hex(16), "recorded_at": recorded_at,
            "source": source, "batch_id": batch_id,
        } for record in accepted], schema=OUTCOME_SCHEMA)
        files = [_write(settings, storage, chain_id, table, recorded_at, batch_id,
                        sign_unsigned_tail, _crash)]
    elif sign_unsigned_tail and storage.list_files(f"{MANIFEST_PREFIX}/{CHAIN_PREFIX}{source}/",
                                                   ".json"):
        settings.manifest(storage, CHAIN_PREFIX + source).checkpoint()  # the operator vouches
    kinds = {kind: len(rejected[kind]) for kind in REJECT_KINDS if kind in rejected}
    return IngestReport(
        batch_id=batch_id, source=source, accepted=len(accepted),
        rejected=sum(kinds.values()), rejected_by_kind=kinds,
        rejected_rows={kind: sorted(rejected[kind]) for kind in kinds}, files=files or [],
        chain_id=chain_id, recorded_at=recorded_at.isoformat(), unsearched_files=archived,
    )


def _validate(row: Mapping[str, Any], source: str,
              recorded_at: dt.datetime) -> tuple[str | None, dict[str, Any]]:
    """``(reject kind or None, the record's columns)`` of one input row."""
    request_id = row.get("request_id")
    if not isinstance(request_id, str) or not request_id.strip():
        return MISSING_REQUEST_ID, {}
    label, value = row.get("label"), row.get("value")
    if _missing(label) == _missing(value):  # neither, or both
        return (BAD_LABEL if _missing(value) else BAD_VALUE), {}
    parsed_label = None
    if not _missing(label):
        parsed_label = _label(label)
        if parsed_label is None:
            return BAD_LABEL, {}
    else:
        if isinstance(value, bool) or not isinstance(value, int | float) \
                or not math.isfinite(value):
            return BAD_VALUE, {}
    when = _time(row.get("outcome_time"))
    if when is None or when > recorded_at + FUTURE_SLACK:
        return BAD_TIME, {}
    given_source = row.get("source")
    if not _missing(given_source) and given_source != source:
        return SOURCE_MISMATCH, {}
    return None, {
        "request_id": request_id,
        "label": parsed_label[0] if parsed_label else None,
        "label_type": parsed_label[1] if parsed_label else None,
        "value": None if parsed_label else float(value),
        "outcome_time": when,
    }


def _write(settings: SinkSettings, storage: JournalStorage, chain_id: str, table: pa.Table,
           recorded_at: dt.datetime, batch_id: str, sign_unsigned_tail: bool = False,
           _crash: Callable[[str], None] | None = None) -> str:
    """Store ``table`` as one create-only outcome file, then record it in ``chain_id`` and sign."""
    deadline = time.monotonic() + TAIL_WAIT_S
    log_ = settings.manifest(storage, chain_id)
    log_ = _signed_head(settings, storage, log_, sign_unsigned_tail, deadline)
    data = encode_outcomes(table)
    name = f"o-{recorded_at:%Y%m%dT%H%M%S}-{batch_id}"
    stored = storage.put_new(OUTCOME_SPEC.file_path(recorded_at, name), data)
    if _crash:
        _crash("file-stored")
    written = decode_outcomes(data)  # file order: what the Merkle root is over
    times = written["outcome_time"].cast(pa.int64())
    bounds = pc.min_max(times)
    record = ManifestRecord(
        path=stored.path, sha256=stored.sha256, size=stored.size, row_count=written.num_rows,
        min_ts_us=bounds["min"].as_py(), max_ts_us=bounds["max"].as_py(), seq_ranges={},
        merkle_root=outcome_merkle_root(written), tier=OUTCOMES_AREA, version_id=stored.version_id,
    )
    while True:
        try:
            log_.append(record)
            break
        except ChainConflictError:
            # Another ingest of this source appended first: continue after its signed head.
            if time.monotonic() > deadline:
                raise
            log_ = _signed_head(settings, storage, settings.manifest(storage, chain_id),
                                sign_unsigned_tail, deadline)
    if _crash:
        _crash("recorded")
    log_.checkpoint()
    return stored.path


TAIL_WAIT_S = 5.0
"""How long an ingest waits for another ingest of its source to sign the record it appended
(milliseconds, normally) before it takes the record for an unsigned tail and refuses."""


def _signed_head(settings: SinkSettings, storage: JournalStorage, log_: ManifestLog,
                 sign_anyway: bool, deadline: float) -> ManifestLog:
    """``log_`` (or a fresh one after waiting) once every record of the chain is covered by a
    checkpoint signed by this ingest's key and the chain still holds the head it signed; raises
    :class:`UnsignedTailError` when that does not come true by ``deadline``. The checkpoint
    after this batch would sign everything before it, and anyone who can write the bucket can
    append a record (with a planted outcome file) or replace the head. ``sign_anyway``: the
    operator checked the tail (a killed ingest of theirs, see verify)."""
    signer = log_.signer
    if signer is None or sign_anyway:
        return log_
    while True:
        signed, head = _newest_signed(storage, log_.chain_id, signer.public_key)
        if signed == log_.length and head in (None, log_.head_hash):
            return log_
        if time.monotonic() > deadline:
            break
        time.sleep(0.02)  # a concurrent ingest of this source signs within milliseconds
        log_ = settings.manifest(storage, log_.chain_id)
    if signed >= log_.length:
        raise UnsignedTailError(
            f"manifest chain {log_.chain_id}: its head record is not the one its checkpoint "
            f"{signed} signs (rewritten): run `serve-journal verify`")
    raise UnsignedTailError(
        f"manifest chain {log_.chain_id} holds {log_.length - signed} unsigned record(s) after "
        f"its last signed checkpoint (length {signed}), first "
        f"{record_path(log_.chain_id, signed)}: the next checkpoint would sign them. An ingest "
        "killed before signing leaves one; anyone who can write the bucket can append one. Run "
        "`serve-journal verify`; if they are your killed ingest's, ingest again with "
        "--sign-unsigned-tail")


def _newest_signed(storage: JournalStorage, chain_id: str, public_key: Any
                   ) -> tuple[int, str | None]:
    """``(length, head hash)`` of the chain's newest checkpoint signed by ``public_key``
    (``(0, None)`` when none is)."""
    signed, head = 0, None
    for path in storage.list_files(f"{CHECKPOINT_PREFIX}/{chain_id}/", ".json"):
        length = parse_object_index(path)
        if length is None or length < signed or (length == signed and head is not None):
            continue
        try:
            checkpoint = Checkpoint.from_json(storage.read(path))
        except ManifestError:
            continue
        if (checkpoint.verify(public_key) and checkpoint.chain_id == chain_id
                and checkpoint.length == length):
            signed = length
            head = checkpoint.head_hash if length else None
    return signed, head


class UnsignedTailError(ManifestError):
    """A source chain has records no checkpoint of the ingest's key signs (see the message)."""


# -- reading ------------------------------------------------------------------------------------


def outcome_records(storage: JournalStorage) -> dict[str, set[str]]:
    """``{outcome file path: {sha256, ...}}`` the manifest chains record: with a readers' trust
    anchor (:func:`serve_journal.integrity.trust.reader_trust`) only records its key signed,
    else every record (as readers treat commit markers without one)."""
    anchor = reader_trust(storage.uri)
    out: dict[str, set[str]] = {}
    if anchor is not None:
        records: Iterable[ManifestRecord] = signed_records(storage, anchor.public_key)
    else:
        records = _readable_records(storage, [
            p for p in storage.list_files(f"{MANIFEST_PREFIX}/", ".json")
            if p.split("/")[1].startswith(CHAIN_PREFIX)])
    for record in records:
        if OUTCOME_SPEC.contains(record.path):
            out.setdefault(record.path, set()).add(record.sha256)
    return out


def _readable_records(storage: JournalStorage, paths: Sequence[str]) -> list[ManifestRecord]:
    """The records at ``paths`` that parse and whose hash is their content's: an unreadable
    object planted in a source chain is skipped (verify names it), not a reader's crash."""
    out = []
    for path in paths:
        try:
            record, _, hash_ok = ManifestRecord.from_json_checked(storage.read(path))
        except (ManifestError, TypeError):
            continue
        if hash_ok:
            out.append(record)
    return out


def load_outcomes(journal: str | JournalStorage,
                  request_ids: Sequence[str] | None = None) -> pa.Table:
    """Every outcome record of the journal (outcome schema), or only those about
    ``request_ids``; only files whose bytes match their manifest record are read (see the
    module docstring), oldest record first."""
    storage = open_storage(journal) if isinstance(journal, str) else journal
    recorded = outcome_records(storage)
    tables = []
    for path in storage.list_files(OUTCOME_SPEC.prefix, ".parquet"):
        if not OUTCOME_SPEC.contains(path):
            continue
        hashes = recorded.get(path)
        if not hashes:
            log.warning("ignoring outcome file %s: no manifest record", path)
            continue
        data = storage.read(path)
        if hashlib.sha256(data).hexdigest() not in hashes:
            log.warning("ignoring outcome file %s: its bytes do not match its manifest record", path)
            continue
        tables.append(decode_outcomes(data))
    table = pa.concat_tables(tables) if tables else OUTCOME_SCHEMA.empty_table()
    if request_ids is not None:
        table = table.filter(pc.is_in(table["request_id"],
                                      value_set=pa.array(list(request_ids), pa.string())))
    if table.num_rows > 1:
        table = table.take(pc.sort_indices(table, sort_keys=[
            ("recorded_at", "ascending"), ("outcome_id", "ascending")]))
    return table


__all__ = [
    "BAD_LABEL", "BAD_TIME", "BAD_VALUE", "BEFORE_DECISION", "CHAIN_PREFIX", "DUPLICATE_IN_BATCH",
    "IngestReport", "MISSING_REQUEST_ID", "REJECT_KINDS", "SOURCE_MISMATCH", "UNKNOWN_REQUEST_ID",
    "UnsignedTailError",
    "check_source", "load_outcomes", "outcome_records", "record_outcomes",
]
