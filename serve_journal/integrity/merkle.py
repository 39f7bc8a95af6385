"""Merkle tree hashes, inclusion proofs and consistency proofs as in RFC 6962 / RFC 9162.

A journal file's entries are the leaves of one Merkle tree whose root its manifest record holds,
so an auditor can check every entry of a file against the record, or a single entry with an
inclusion proof of ``log2(n)`` hashes, without trusting whoever serves the file.

Hashing follows RFC 9162 section 2.1.1 exactly (SHA-256, domain-separated)::

    MTH({})      = SHA-256()
    leaf hash    = SHA-256(0x00 || leaf data)
    node hash    = SHA-256(0x01 || left || right)
    MTH(D[n])    = node(MTH(D[0:k]), MTH(D[k:n]))   with k the largest power of two < n

Proof generation is section 2.1.3.1 (PATH) and 2.1.4.1 (PROOF / SUBPROOF); verification is the
algorithm of sections 2.1.3.2 and 2.1.4.2, which binds the proof length to the tree size, so the
only proof a verifier accepts for a given (index, size, root) is the genuine one.

The leaf data of a journal entry is :func:`entry_leaf`: the canonical encoding
(:func:`serve_journal.integrity.encoding.canonical_encode`) of the row as a mapping of column name
to value, with the timestamp ``ts`` as an integer number of microseconds since the Unix epoch
(UTC). Every column of the file's schema takes part, so any edited value changes the leaf, with
one exception that keeps hashes valid across schema versions: a column added by a later version
(``serve_journal.schema.ADDED_COLUMNS``) whose value is null is left out of that row's mapping
(the mapping header counts one entry fewer). So an entry written under schema v1 has the same
leaf before and after it is read under v2 (where it has nulls in the added columns), while a
non-null value in an added column always takes part: setting or clearing one changes the leaf.
The value encodings all come from :mod:`serve_journal.integrity.encoding`; :func:`table_leaves`
builds the leaves of a whole file column-wise with its Arrow form.
"""

from __future__ import annotations

import datetime as dt
import hashlib
from collections.abc import Iterable, Iterator, Mapping, Sequence
from typing import Any

import pyarrow as pa

from serve_journal.integrity.encoding import canonical_encode, encode_arrow_rows
from serve_journal.schema import ADDED_COLUMNS
from serve_journal.times import to_micros

_LEAF_PREFIX = b"\x00"
_NODE_PREFIX = b"\x01"
HASH_SIZE = 32

EMPTY_ROOT = hashlib.sha256(b"").digest()
"""MTH of the empty tree: SHA-256 of the empty string."""


def leaf_hash(data: bytes) -> bytes:
    """RFC 6962 leaf hash: SHA-256(0x00 || data)."""
    return hashlib.sha256(_LEAF_PREFIX + data).digest()


def node_hash(left: bytes, right: bytes) -> bytes:
    """RFC 6962 interior node hash: SHA-256(0x01 || left || right)."""
    return hashlib.sha256(_NODE_PREFIX + left + right).digest()


def _split(n: int) -> int:
    """The largest power of two strictly smaller than ``n`` (n >= 2)."""
    return 1 << ((n - 1).bit_length() - 1)


def _mth(hashes: Sequence[bytes], lo: int, hi: int) -> bytes:
    """Merkle tree hash of the leaf hashes ``hashes[lo:hi]`` (non-empty)."""
    n = hi - lo
    if n == 1:
        return hashes[lo]
    k = _split(n)
    return node_hash(_mth(hashes, lo, lo + k), _mth(hashes, lo + k, hi))


def root_from_leaf_hashes(hashes: Sequence[bytes]) -> bytes:
    """Merkle tree hash over already-hashed leaves."""
    if not hashes:
        return EMPTY_ROOT
    # Bottom-up: fold each level pairwise; an odd last node is promoted unchanged. This yields
    # exactly the RFC's largest-power-of-two split, without recursion over large files.
    sha256 = hashlib.sha256
    level = list(hashes)
    while len(level) > 1:
        odd = level[-1] if len(level) % 2 else None
        # Pairs as 64-byte slices of one joined level: node_hash without a call per pair.
        pairs = level[:len(level) - 1] if odd is not None else level
        joined = b"".join(pairs)
        if all(len(h) == HASH_SIZE for h in pairs):
            nxt = [sha256(_NODE_PREFIX + joined[i:i + 2 * HASH_SIZE]).digest()
                   for i in range(0, len(joined), 2 * HASH_SIZE)]
        else:  # not all 32-byte digests: pair them as given
            nxt = [node_hash(pairs[i], pairs[i + 1]) for i in range(0, len(pairs), 2)]
        if odd is not None:
            nxt.append(odd)
        level = nxt
    return level[0]


class MerkleRootBuilder:
    """The Merkle tree hash of leaf hashes given one at a time, in order, in ``O(log n)`` memory:
    a file of any size streams its leaves through it (a rewrite does, row group by row group).

    It keeps the roots of the perfect subtrees the leaves so far fill, largest first (the binary
    digits of the count); :meth:`root` joins them right to left, which is exactly the RFC's
    largest-power-of-two split, so it equals :func:`root_from_leaf_hashes` of all the leaves.
    """

    def __init__(self) -> None:
        self._subtrees: list[tuple[int, bytes]] = []
        self.size = 0

    def add(self, leaf_digest: bytes) -> None:
        """Append one leaf hash (see :func:`leaf_hash`)."""
        size, digest = 1, leaf_digest
        while self._subtrees and self._subtrees[-1][0] == size:
            left_size, left = self._subtrees.pop()
            size, digest = left_size + size, node_hash(left, digest)
        self._subtrees.append((size, digest))
        self.size += 1

    def extend(self, leaf_digests: Iterable[bytes]) -> None:
        """Append leaf hashes in order."""
        for digest in leaf_digests:
            self.add(digest)

    def root(self) -> bytes:
        """The Merkle tree hash of the leaves added so far (:data:`EMPTY_ROOT` for none)."""
        if not self._subtrees:
            return EMPTY_ROOT
        digest = self._subtrees[-1][1]
        for _, left in reversed(self._subtrees[:-1]):
            digest = node_hash(left, digest)
        return digest


def merkle_root(leaves: Sequence[bytes]) -> bytes:
    """Merkle tree hash (MTH) of the leaf data ``leaves``."""
    return root_from_leaf_hashes([leaf_hash(leaf) for leaf in leaves])


def inclusion_proof(leaves: Sequence[bytes], index: int) -> list[bytes]:
    """Audit path (RFC 9162 PATH) proving that ``leaves[index]`` is in the tree of all ``leaves``."""
    n = len(leaves)
    if not 0 <= index < n:
        raise ValueError(f"index must be in [0, {n}) for a tree of {n} leaves, got {index}")
    hashes = [leaf_hash(leaf) for leaf in leaves]
    return _path(hashes, index, 0, n)


def _path(hashes: Sequence[bytes], m: int, lo: int, hi: int) -> list[bytes]:
    n = hi - lo
    if n == 1:
        return []
    k = _split(n)
    if m < k:
        return _path(hashes, m, lo, lo + k) + [_mth(hashes, lo + k, hi)]
    return _path(hashes, m - k, lo + k, hi) + [_mth(hashes, lo, lo + k)]


def consistency_proof(leaves: Sequence[bytes], old_size: int) -> list[bytes]:
    """Proof (RFC 9162 PROOF) that the tree of ``leaves[:old_size]`` is a prefix of the full tree."""
    n = len(leaves)
    if not 0 <= old_size <= n:
        raise ValueError(f"old_size must be in [0, {n}] for a tree of {n} leaves, got {old_size}")
    if old_size == 0 or old_size == n:
        return []
    hashes = [leaf_hash(leaf) for leaf in leaves]
    return _subproof(hashes, old_size, 0, n, True)


def _subproof(hashes: Sequence[bytes], m: int, lo: int, hi: int, complete: bool) -> list[bytes]:
    n = hi - lo
    if m == n:
        return [] if complete else [_mth(hashes, lo, hi)]
    k = _split(n)
    if m <= k:
        return _subproof(hashes, m, lo, lo + k, complete) + [_mth(hashes, lo + k, hi)]
    return _subproof(hashes, m - k, lo + k, hi, False) + [_mth(hashes, lo, lo + k)]


def _well_formed(proof: Sequence[bytes]) -> bool:
    return all(isinstance(p, bytes | bytearray) and len(p) == HASH_SIZE for p in proof)


def verify_inclusion(
    leaf: bytes, index: int, tree_size: int, proof: Sequence[bytes], root: bytes
) -> bool:
    """True when ``proof`` shows that leaf data ``leaf`` sits at ``index`` in the tree of
    ``tree_size`` leaves whose root is ``root`` (RFC 9162 section 2.1.3.2). Never raises for
    malformed input; it is rejected."""
    return verify_inclusion_hash(leaf_hash(leaf), index, tree_size, proof, root)


def verify_inclusion_hash(
    leaf_digest: bytes, index: int, tree_size: int, proof: Sequence[bytes], root: bytes
) -> bool:
    """:func:`verify_inclusion` for an already-hashed leaf."""
    if not isinstance(index, int) or not isinstance(tree_size, int):
        return False
    if not 0 <= index < tree_size or not _well_formed(proof):
        return False
    fn, sn = index, tree_size - 1
    r = leaf_digest
    for p in proof:
        if sn == 0:
            return False  # the path is longer than the tree is deep
        if fn & 1 or fn == sn:
            r = node_hash(p, r)
            if not fn & 1:
                while not (fn & 1 or fn == 0):
                    fn >>= 1
                    sn >>= 1
        else:
            r = node_hash(r, p)
        fn >>= 1
        sn >>= 1
    return sn == 0 and r == root


def verify_consistency(
    old_size: int, new_size: int, old_root: bytes, new_root: bytes, proof: Sequence[bytes]
) -> bool:
    """True when ``proof`` shows the tree of ``old_size`` leaves with ``old_root`` is a prefix of
    the tree of ``new_size`` leaves with ``new_root`` (RFC 9162 section 2.1.4.2)."""
    if not isinstance(old_size, int) or not isinstance(new_size, int):
        return False
    if not 0 <= old_size <= new_size or not _well_formed(proof):
        return False
    if old_size == 0:
        return not proof and old_root == EMPTY_ROOT
    if old_size == new_size:
        return not proof and old_root == new_root
    if not proof:
        return False
    path = list(proof)
    if old_size & (old_size - 1) == 0:  # an exact power of two: the old root is a subtree
        path.insert(0, old_root)
    fn, sn = old_size - 1, new_size - 1
    while fn & 1:
        fn >>= 1
        sn >>= 1
    fr = sr = path[0]
    for c in path[1:]:
        if sn == 0:
            return False
        if fn & 1 or fn == sn:
            fr = node_hash(c, fr)
            sr = node_hash(c, sr)
            if not fn & 1:
                while not (fn & 1 or fn == 0):
                    fn >>= 1
                    sn >>= 1
        else:
            sr = node_hash(sr, c)
        fn >>= 1
        sn >>= 1
    return sn == 0 and fr == old_root and sr == new_root


# -- journal entries -----------------------------------------------------------------------------


def entry_leaf(row: Mapping[str, Any]) -> bytes:
    """Leaf data of one journal entry: ``canonical_encode`` of the row with ``ts`` as int µs.

    ``row`` maps column names to Python values as ``pyarrow.Table.to_pylist`` yields them;
    ``ts`` may be an aware or UTC-naive ``datetime`` or already an integer of microseconds. A
    column of ``ADDED_COLUMNS`` that is null (or absent) is left out (see the module docstring).
    """
    values = {k: v for k, v in row.items() if not (v is None and k in ADDED_COLUMNS)}
    ts = values.get("ts")
    if isinstance(ts, dt.datetime):
        values["ts"] = to_micros(ts, "ts")
    return canonical_encode(values)


LEAF_CHUNK_ROWS = 100_000
"""Rows encoded at a time: one Arrow binary array holds at most 2 GiB (a compacted file of
millions of ~1 KB entries does not fit in one), and hashing a chunk at a time keeps only 32
bytes per row, not the whole encoding, in memory."""


def _leaf_chunks(table: pa.Table, prefix: bytes = b"") -> Iterator[list[bytes]]:
    """Leaf data of ``table``'s rows, :data:`LEAF_CHUNK_ROWS` at a time, each after ``prefix``."""
    if "ts" in table.column_names:
        # Integer microseconds straight from Arrow: exact, and no datetime round trip per row.
        index = table.column_names.index("ts")
        table = table.set_column(index, "ts", table.column("ts").cast(pa.int64()))
    for start in range(0, table.num_rows, LEAF_CHUNK_ROWS):
        yield encode_arrow_rows(table.slice(start, LEAF_CHUNK_ROWS), omit_null=ADDED_COLUMNS,
                                prefix=prefix)


def table_leaves(table: pa.Table) -> list[bytes]:
    """Leaf data of every row of ``table``, in table (file) order.

    Byte-for-byte ``entry_leaf(row)`` for each row of ``table.to_pylist()``, built column-wise
    with Arrow kernels by :func:`~serve_journal.integrity.encoding.encode_arrow_rows` (which
    falls back to encoding row by row for a column type it does not vectorise), in chunks of
    :data:`LEAF_CHUNK_ROWS` rows.
    """
    return [leaf for chunk in _leaf_chunks(table) for leaf in chunk]


def table_leaf_hashes(table: pa.Table) -> list[bytes]:
    """RFC 6962 leaf hashes of every row of ``table``, in table order."""
    sha256 = hashlib.sha256  # the leaves come prefixed with 0x00: one hash call per row
    return [sha256(prefixed).digest() for chunk in _leaf_chunks(table, _LEAF_PREFIX)
            for prefixed in chunk]


def table_merkle_root(table: pa.Table) -> str:
    """Hex Merkle root over a file's rows, in file order (see :func:`entry_leaf`)."""
    return root_from_leaf_hashes(table_leaf_hashes(table)).hex()


def entry_inclusion_proof(table: pa.Table, row_index: int) -> list[str]:
    """Hex audit path for row ``row_index`` of a file, checkable against its manifest root."""
    return [p.hex() for p in inclusion_proof(table_leaves(table), row_index)]
