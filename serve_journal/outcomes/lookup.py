"""Which request ids the journal holds, and when each was first decided: the check every outcome
record passes before it is recorded.

The journal's live files (the catalog's view, hot and cold) are searched through their footers
(:mod:`serve_journal.read.pruning`): for a small batch, each id is tested against every row
group's ``request_id`` bloom filter and only the row groups that may hold one are read; a large
batch reads the ``request_id`` and ``ts`` columns of each file (two columns, not the entries),
where probing a bloom block per id and row group would cost more than the read. Files whose
partition starts after the batch's latest outcome time cannot hold a decision it is about (an
outcome follows its decision) and are skipped. Archived files (S3 Glacier, not restored) cannot
be read: they are skipped and named, so the caller can say an id they alone hold was not found.

Only signed history vouches for a request id. With the journal's public key (the ingest holds the
signing key, so it always has it), the catalog follows only commit markers that key signed, a file
is searched only when a manifest record covered by a signed checkpoint names its path, and a file
in which an id is found counts only when its bytes have the SHA-256 of such a record: an entry
file planted in the hot tier, or a recorded file overwritten with one more request, vouches for
nothing.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Collection

import pyarrow as pa
import pyarrow.compute as pc
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from serve_journal.catalog import MarkerCache, live_files
from serve_journal.catalog.layout import TIERS
from serve_journal.read.pruning import FooterCache
from serve_journal.read.verify import signed_records
from serve_journal.retry import retry_call
from serve_journal.storage import JournalStorage
from serve_journal.storage.archive import archive_states

BLOOM_LOOKUP_MAX_IDS = 64
"""Batches up to this many distinct ids probe bloom filters; larger ones read the id column."""

_COLUMNS = ["request_id", "ts"]


def decision_times(storage: JournalStorage, request_ids: Collection[str],
                   until: dt.datetime | None = None, *,
                   public_key: Ed25519PublicKey | None = None) -> tuple[dict[str, int], list[str]]:
    """``({request_id: earliest decision time in µs}, archived files not searched)`` for the ids
    of ``request_ids`` the journal's readable live files hold; ids they do not hold are absent.
    ``until``: no decision about these ids is later (partitions starting after it are not
    searched). ``public_key``: only files whose bytes match a record signed by it count (see the
    module docstring); without it every live file counts."""
    wanted = sorted({r for r in request_ids if isinstance(r, str) and r})
    if not wanted:
        return {}, []
    signed = _signed_files(storage, public_key) if public_key is not None else None
    return retry_call(lambda: _lookup_once(storage, wanted, until, public_key, signed),
                      attempts=3, delay_s=0.01, max_delay_s=0.05, retry_on=FileNotFoundError)


def _signed_files(storage: JournalStorage, public_key: Ed25519PublicKey) -> dict[str, set[str]]:
    """``{entry file path: {sha256, ...}}`` of the records covered by a checkpoint signed by
    ``public_key``."""
    out: dict[str, set[str]] = {}
    for record in signed_records(storage, public_key):
        if record.path.split("/", 1)[0] in TIERS:
            out.setdefault(record.path, set()).add(record.sha256)
    return out


def _lookup_once(storage: JournalStorage, wanted: list[str], until: dt.datetime | None,
                 public_key: Ed25519PublicKey | None, signed: dict[str, set[str]] | None
                 ) -> tuple[dict[str, int], list[str]]:
    footers = FooterCache(storage)
    value_set = pa.array(wanted, pa.string())
    found: dict[str, int] = {}
    files = live_files(storage, tier="all", cache=MarkerCache(public_key))
    if signed is not None:  # a file no signed record names vouches for no request id
        files = [f for f in files if f.path in signed]
    blocked = {p for p, s in archive_states(storage).items() if not s.readable} if files else set()
    archived = sorted(f.path for f in files if f.path in blocked)
    try:
        for data_file in files:
            if (until is not None and data_file.key.start > until) or data_file.path in blocked:
                continue
            index = footers.get(data_file.path)
            if len(wanted) <= BLOOM_LOOKUP_MAX_IDS:
                groups = sorted({g for r in wanted for g in index.candidates("request_id", r)})
                if not groups:
                    continue
                rows = index.parquet.read_row_groups(groups, columns=_COLUMNS, use_threads=False)
            else:
                rows = index.parquet.read(columns=_COLUMNS, use_threads=False)
            rows = rows.filter(pc.is_in(rows["request_id"], value_set=value_set))
            if not rows.num_rows:
                continue
            if signed is not None and storage.sha256(data_file.path) not in signed[data_file.path]:
                continue  # overwritten since it was recorded: its rows prove nothing
            for request_id, ts in zip(rows["request_id"].to_pylist(),
                                      rows["ts"].cast(pa.int64()).to_pylist(), strict=True):
                if request_id not in found or ts < found[request_id]:
                    found[request_id] = ts
    finally:
        footers.clear()
    return found, archived


__all__ = ["BLOOM_LOOKUP_MAX_IDS", "decision_times"]
