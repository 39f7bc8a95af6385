"""What a manifest record says about a journal file, computed by streaming the file.

A manifest record holds a data file's row count, time range, sequence ranges and Merkle root.
The writers compute them from the table they hold; a rewrite (compaction, lifecycle) and verify
compute them from a stored file of any size, so :func:`summarize` reads it a batch at a time: its
memory is one batch of Arrow plus the Merkle tree's ``O(log n)`` subtree roots plus the sequence
runs, kept as integer arrays and merged as they grow (a file sorted by subject holds its
producers' sequence numbers in no order, so the runs of one batch are many and short; they join
up as the file goes on).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from serve_journal.integrity.manifest import SeqRuns
from serve_journal.integrity.merkle import MerkleRootBuilder, table_leaf_hashes
from serve_journal.schema import conform_entries

log = logging.getLogger(__name__)

BATCH_ROWS = 64 * 1024
"""Rows read at a time (a cold file's 1M-row group would be ~0.5 GiB of Arrow, and its leaf
hashes more)."""

_MERGE_AT = 1 << 20
"""Unmerged runs of one producer at which they are merged (16 bytes each)."""


@dataclass(frozen=True)
class FileSummary:
    """What a manifest record says about a data file, computed by streaming the file."""

    rows: int
    min_ts_us: int | None
    max_ts_us: int | None
    seq_ranges: dict[str, SeqRuns] = field(default_factory=dict)
    merkle_root: str = ""


def apart(later: np.ndarray, earlier: np.ndarray) -> np.ndarray:
    """``later > earlier + 1`` elementwise, without wrapping at the ends of int64 (a sequence
    number of ``2**63 - 1`` plus one is not ``-2**63``)."""
    # later > earlier makes the true difference >= 1; it is 1 exactly when the wrapped one is.
    return (later > earlier) & (later - earlier != 1)


def _merged(starts: np.ndarray, ends: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Sorted, maximal, non-overlapping runs covering the runs ``[starts[i], ends[i]]``."""
    order = np.argsort(starts, kind="stable")
    starts, ends = starts[order], ends[order]
    reach = np.maximum.accumulate(ends)
    begins = np.ones(len(starts), dtype=bool)
    begins[1:] = apart(starts[1:], reach[:-1])
    first = np.flatnonzero(begins)
    last = np.append(first[1:] - 1, len(starts) - 1)
    return starts[first], reach[last]


class SequenceRuns:
    """Maximal runs of consecutive sequence numbers per producer, added a batch at a time.

    :meth:`result` is what :func:`serve_journal.integrity.manifest.sequence_ranges` gives for
    all the rows added (null sequence numbers are left out; a null producer is ``""``).
    """

    def __init__(self) -> None:
        self._parts: dict[str, list[tuple[np.ndarray, np.ndarray]]] = {}
        self._pending: dict[str, int] = {}  # runs added since the last merge
        self._merged: dict[str, int] = {}  # runs after it (merging again waits for as many)

    def add(self, producers: pa.Array | pa.ChunkedArray, seqs: pa.Array | pa.ChunkedArray) -> None:
        """Add the rows whose producer ids and sequence numbers are ``producers`` / ``seqs``."""
        if isinstance(producers, pa.ChunkedArray):
            producers = producers.combine_chunks()
        if isinstance(seqs, pa.ChunkedArray):
            seqs = seqs.combine_chunks()
        if pa.types.is_dictionary(producers.type):
            producers = producers.cast(pa.string())
        keep = pc.is_valid(seqs)
        seq = pc.filter(seqs, keep).to_numpy(zero_copy_only=False).astype(np.int64, copy=False)
        if not len(seq):
            return
        encoded = pc.dictionary_encode(pc.filter(producers, keep).fill_null(""))
        names = encoded.dictionary.to_pylist()
        ids = encoded.indices.to_numpy(zero_copy_only=False)
        order = np.lexsort((seq, ids))
        ids, seq = ids[order], seq[order]
        begins = np.ones(len(seq), dtype=bool)
        begins[1:] = (ids[1:] != ids[:-1]) | apart(seq[1:], seq[:-1])
        first = np.flatnonzero(begins)
        last = np.append(first[1:] - 1, len(seq) - 1)
        run_ids, starts, ends = ids[first], seq[first], seq[last]
        for index in np.unique(run_ids).tolist():
            name = str(names[index])
            mine = run_ids == index
            self._parts.setdefault(name, []).append((starts[mine], ends[mine]))
            self._pending[name] = self._pending.get(name, 0) + int(np.count_nonzero(mine))
            if self._pending[name] >= max(_MERGE_AT, self._merged.get(name, 0)):
                self._compact(name)

    def _compact(self, name: str) -> None:
        parts = self._parts[name]
        if len(parts) > 1 or self._pending.get(name, 0):
            parts = [_merged(np.concatenate([s for s, _ in parts]),
                             np.concatenate([e for _, e in parts]))]
            self._parts[name] = parts
        self._merged[name] = len(parts[0][0])
        self._pending[name] = 0

    def result(self) -> dict[str, SeqRuns]:
        """``{producer_id: [[lo, hi], ...]}``, producers sorted, runs sorted and maximal."""
        out: dict[str, SeqRuns] = {}
        for name in sorted(self._parts):
            self._compact(name)
            starts, ends = self._parts[name][0]
            out[name] = SeqRuns(np.column_stack((starts, ends)))
        return out


def summarize(source: Any) -> FileSummary:
    """Row count, time range, sequence ranges and Merkle root of a journal Parquet file.

    ``source`` is what :class:`pyarrow.parquet.ParquetFile` opens: a local path, or a readable,
    seekable binary file. The file is read :data:`BATCH_ROWS` rows at a time and each batch is
    conformed to the current entry schema as :func:`serve_journal.fileformat.decode_parquet`
    conforms a whole file, so the figures equal those of the whole table's manifest record.
    """
    parquet = pq.ParquetFile(source)
    merkle = MerkleRootBuilder()
    runs = SequenceRuns()
    lo = hi = None
    for batch in parquet.iter_batches(batch_size=BATCH_ROWS, use_threads=False):
        table = conform_entries(pa.Table.from_batches([batch]), stored=True)
        merkle.extend(table_leaf_hashes(table))
        if table.num_rows:
            bounds = pc.min_max(table.column("ts").cast(pa.int64()))
            lo = _pick(min, lo, bounds["min"].as_py())
            hi = _pick(max, hi, bounds["max"].as_py())
        runs.add(table.column("producer_id"), table.column("seq"))
    return FileSummary(rows=merkle.size, min_ts_us=lo, max_ts_us=hi,
                       seq_ranges=runs.result(), merkle_root=merkle.root().hex())


def _pick(fn, current, value):
    if value is None:
        return current
    return value if current is None else fn(current, value)


__all__ = ["BATCH_ROWS", "FileSummary", "SequenceRuns", "apart", "summarize"]
