"""Where a Kafka sink resumes: its progress read back from *signed* manifest records.

A sink names every file after the Kafka offsets it holds (:class:`ChunkFileName`) and records it
in a manifest chain of its own (``k-<topic>-p<first>-<last>-<run>``), signed every few seconds.
Those chains are the sink's offsets document: compaction and lifecycle replace and delete the
*data files* (their records then say what they ``replace``), never a chain, so what a sink has
consumed survives any number of rewrites.

:func:`recover_offsets` trusts only signed evidence. For each chain of the topic it takes the
newest checkpoint whose Ed25519 signature verifies under the journal's key and whose head hash
is the hash of the chain's record at that length, then walks the chain backwards from there,
checking each record's own hash and the ``prev_hash`` link, until it has seen, for every
partition the chain covers, the newest chunk whose parts are all recorded. The next offset of a
partition is the end of the newest such chunk, plus one. So:

* a file, record or checkpoint written by someone without the key never moves a sink forward
  (no skip, no loss), and unsigned records of a run that died (its last seconds) do not either;
* a chunk whose files exist but whose records are missing or unsigned (the run died between
  writing and signing) is *rebuilt* from the same offsets: the file names in storage, unsigned,
  serve only as hints of where that run cut its chunks (:attr:`RecoveredOffsets.rebuild`), so
  the rebuild produces the same names, and the sink adopts each existing file only when it holds
  exactly the entries Kafka has at those offsets (``sink/kafka.py``).

Without a public key (tests of the consumer logic alone) the file names are taken at their word.
"""

from __future__ import annotations

import collections
import logging
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import pyarrow.fs as pafs

from serve_journal.errors import ManifestError
from serve_journal.integrity.manifest import (
    CHECKPOINT_PREFIX,
    Checkpoint,
    ManifestRecord,
    load_public_key,
    parse_object_index,
    record_path,
)
from serve_journal.storage import JournalStorage

logger = logging.getLogger(__name__)


@dataclass(frozen=True, order=True)
class ChunkFileName:
    """``k-<topic>-p<partition>-o<start>-<end>-<part>of<parts>[-r<retry>]``.

    ``retry`` > 0 names a part written beside an existing file of the plain name that did not
    hold what Kafka has at those offsets (an altered or planted file): either name completes
    the part."""

    topic: str
    partition: int
    start: int
    end: int
    part: int
    parts: int
    retry: int = 0

    def __str__(self) -> str:
        name = f"k-{self.topic}-p{self.partition}-o{self.start}-{self.end}-{self.part}of{self.parts}"
        return f"{name}-r{self.retry}" if self.retry else name

    @classmethod
    def parse(cls, topic: str, file_name: str) -> ChunkFileName | None:
        """The name's fields if ``file_name`` (base name, suffix optional) is a chunk of ``topic``."""
        stem = file_name.removesuffix(".parquet")
        prefix = f"k-{topic}-p"
        if not stem.startswith(prefix):
            return None
        match = re.fullmatch(r"(\d+)-o(\d+)-(\d+)-(\d+)of(\d+)(?:-r(\d+))?", stem[len(prefix):])
        if match is None:
            return None
        p, s, e, i, n = (int(g) for g in match.groups()[:5])
        if not (s <= e and 1 <= i <= n):
            return None
        return cls(topic, p, s, e, i, n, int(match.group(6) or 0))

    @property
    def chunk(self) -> tuple[int, int, int]:
        """``(partition, start, end)``: the chunk this part belongs to."""
        return (self.partition, self.start, self.end)


def sink_chain_prefix(topic: str) -> str:
    """Every chain of a sink of ``topic`` starts with this."""
    return f"k-{topic}-p"


@dataclass(frozen=True)
class RecoveredOffsets:
    """Per partition: where to resume, and the chunks to rebuild first, as ``(start, end)`` in
    offset order (the first starts at the resume offset, each next one where the last ended)."""

    next_offset: dict[int, int]
    rebuild: dict[int, list[tuple[int, int]]]

    @property
    def rebuild_until(self) -> dict[int, int]:
        """The end of the first chunk to rebuild, per partition."""
        return {p: chunks[0][1] for p, chunks in self.rebuild.items() if chunks}


def recover_offsets(storage: JournalStorage, topic: str, partitions: Iterable[int],
                    public_key: Any = None,
                    beginnings: Mapping[int, int] | None = None) -> RecoveredOffsets:
    """Where the sink of ``topic`` resumes on ``partitions``: see the module docstring.

    ``public_key``: the journal's manifest key (key object, PEM bytes or file); progress is then
    read from signed records only. ``None``: from the file names in storage (no manifest).
    ``beginnings``: each partition's first offset in Kafka (default 0), where a partition with
    no signed progress starts, and so where its first chunk to rebuild must start."""
    wanted = set(partitions)
    hints = _names_in_storage(storage, topic, wanted)
    if public_key is None:
        done = hints
    else:
        done = signed_chunk_names(storage, topic, wanted, load_public_key(public_key))
    next_offset = _complete_until(done)
    complete = set(_complete_chunks(done))
    by_start: dict[tuple[int, int], set[int]] = collections.defaultdict(set)
    for name in hints:
        if name.chunk not in complete:
            by_start[(name.partition, name.start)].add(name.end)
    rebuild: dict[int, list[tuple[int, int]]] = {}
    for partition in wanted:
        offset = next_offset.get(partition, (beginnings or {}).get(partition, 0))
        chain: list[tuple[int, int]] = []
        while ends := by_start.get((partition, offset)):
            end = min(ends)  # two hints from one start (one planted): the shorter cut
            chain.append((offset, end))
            offset = end + 1
        if chain:
            rebuild[partition] = chain
    return RecoveredOffsets(next_offset, rebuild)


def _complete_chunks(names: Iterable[ChunkFileName]) -> list[tuple[int, int, int]]:
    """The chunks ``(partition, start, end)`` whose parts are all in ``names``."""
    parts: dict[tuple[int, int, int], set[int]] = collections.defaultdict(set)
    totals: dict[tuple[int, int, int], int] = {}
    for name in names:
        parts[name.chunk].add(name.part)
        totals[name.chunk] = name.parts
    return [chunk for chunk, have in parts.items() if len(have) == totals[chunk]]


def _complete_until(names: Iterable[ChunkFileName]) -> dict[int, int]:
    """Per partition, the end of the newest chunk whose parts are all in ``names``, plus one."""
    out: dict[int, int] = {}
    for partition, _start, end in _complete_chunks(names):
        out[partition] = max(out.get(partition, 0), end + 1)
    return out


def _names_in_storage(storage: JournalStorage, topic: str, wanted: set[int]) -> set[ChunkFileName]:
    out = set()
    for path in storage.list_files(suffix=".parquet"):
        name = ChunkFileName.parse(topic, path.rsplit("/", 1)[-1])
        if name is not None and name.partition in wanted:
            out.add(name)
    return out


def _chain_ids(storage: JournalStorage, prefix: str) -> list[str]:
    """Chain ids under ``_checkpoints/`` starting with ``prefix`` (one directory listing)."""
    selector = pafs.FileSelector(storage.full_path(CHECKPOINT_PREFIX), recursive=False,
                                 allow_not_found=True)
    out = []
    for info in storage.filesystem.get_file_info(selector):
        name = info.base_name
        if info.type == pafs.FileType.Directory and name.startswith(prefix):
            out.append(name)
    return sorted(out)


def _chain_partitions(topic: str, chain_id: str) -> range | None:
    match = re.fullmatch(rf"{re.escape(sink_chain_prefix(topic))}(\d+)-(\d+)-[A-Za-z0-9]+", chain_id)
    return None if match is None else range(int(match.group(1)), int(match.group(2)) + 1)


def _signed_length(storage: JournalStorage, chain_id: str, key: Any) -> tuple[int, str]:
    """``(length, head_hash)`` of the newest checkpoint of ``chain_id`` that verifies."""
    lengths = sorted((i for i in (parse_object_index(p) for p in storage.list_files(
        f"{CHECKPOINT_PREFIX}/{chain_id}/", ".json")) if i is not None), reverse=True)
    for length in lengths:
        try:
            checkpoint = Checkpoint.from_json(storage.read(f"{CHECKPOINT_PREFIX}/{chain_id}/"
                                                           f"{length:012d}.json"))
        except (ManifestError, OSError):
            continue
        if checkpoint.chain_id == chain_id and checkpoint.length == length \
                and checkpoint.verify(key):
            return length, checkpoint.head_hash
    return 0, ""


def unsigned_tails(storage: JournalStorage, topic: str, partitions: Iterable[int], public_key: Any,
                   skip: str = "") -> dict[str, int]:
    """Chains of sinks of ``topic`` on any of ``partitions`` (other than ``skip``) with records
    after their newest valid signed checkpoint: ``{chain_id: signed length}``. A run killed
    before its next checkpoint leaves one; the next run re-derives those files from Kafka and
    may then sign that tail (``KafkaSinkRunner``)."""
    key = load_public_key(public_key)
    wanted = set(partitions)
    out: dict[str, int] = {}
    for chain_id in _chain_ids(storage, sink_chain_prefix(topic)):
        covers = _chain_partitions(topic, chain_id)
        if chain_id == skip or covers is None or not wanted.intersection(covers):
            continue
        signed, _ = _signed_length(storage, chain_id, key)
        if storage.exists(record_path(chain_id, signed)):
            out[chain_id] = signed
    return out


def signed_chunk_names(storage: JournalStorage, topic: str, partitions: Iterable[int],
                       public_key: Any) -> set[ChunkFileName]:
    """The chunk files of ``topic`` on ``partitions`` that signed records vouch for: per chain,
    walking back from its newest valid signed head until each partition it covers has a chunk
    with all its parts (or the chain's start)."""
    key = load_public_key(public_key)
    wanted = set(partitions)
    out: set[ChunkFileName] = set()
    for chain_id in _chain_ids(storage, sink_chain_prefix(topic)):
        covers = _chain_partitions(topic, chain_id)
        if covers is None or not wanted.intersection(covers):
            continue
        length, expected = _signed_length(storage, chain_id, key)
        pending = wanted.intersection(covers)
        seen: set[ChunkFileName] = set()
        for index in range(length - 1, -1, -1):
            try:
                record, _canonical, hash_ok = ManifestRecord.from_json_checked(
                    storage.read(record_path(chain_id, index)))
            except (ManifestError, OSError, TypeError):
                logger.warning("sink chain %s: record %d unreadable; older records not used",
                               chain_id, index)
                break
            if not hash_ok or record.record_hash != expected or record.index != index \
                    or record.chain_id != chain_id:
                logger.warning("sink chain %s: record %d does not match its signed chain; older "
                               "records not used", chain_id, index)
                break
            expected = record.prev_hash
            name = ChunkFileName.parse(topic, record.path.rsplit("/", 1)[-1])
            if name is None or name.partition not in wanted:
                continue
            seen.add(name)
            if name.partition in pending and _complete_chunks(
                    n for n in seen if n.chunk == name.chunk):
                pending.discard(name.partition)
            if not pending:
                break
        out |= seen
    return out


__all__ = [
    "ChunkFileName",
    "RecoveredOffsets",
    "recover_offsets",
    "signed_chunk_names",
    "sink_chain_prefix",
    "unsigned_tails",
]
