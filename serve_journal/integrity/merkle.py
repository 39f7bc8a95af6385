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
(UTC). Every column of the file's schema takes part, so any edited value changes the leaf.
"""

from __future__ import annotations

import datetime as dt
import hashlib
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from serve_journal.integrity.encoding import canonical_encode

_LEAF_PREFIX = b"\x00"
_NODE_PREFIX = b"\x01"
HASH_SIZE = 32

EMPTY_ROOT = hashlib.sha256(b"").digest()
"""MTH of the empty tree: SHA-256 of the empty string."""

_EPOCH = dt.datetime(1970, 1, 1, tzinfo=dt.UTC)


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
    level = list(hashes)
    while len(level) > 1:
        nxt = [node_hash(level[i], level[i + 1]) for i in range(0, len(level) - 1, 2)]
        if len(level) % 2:
            nxt.append(level[-1])
        level = nxt
    return level[0]


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


def _micros(value: dt.datetime) -> int:
    if value.tzinfo is None:
        value = value.replace(tzinfo=dt.UTC)
    delta = value - _EPOCH
    return (delta.days * 86_400 + delta.seconds) * 1_000_000 + delta.microseconds


def entry_leaf(row: Mapping[str, Any]) -> bytes:
    """Leaf data of one journal entry: ``canonical_encode`` of the row with ``ts`` as int µs.

    ``row`` maps column names to Python values as ``pyarrow.Table.to_pylist`` yields them;
    ``ts`` may be an aware or UTC-naive ``datetime`` or already an integer of microseconds.
    """
    values = dict(row)
    ts = values.get("ts")
    if isinstance(ts, dt.datetime):
        values["ts"] = _micros(ts)
    return canonical_encode(values)


def table_leaves(table: pa.Table) -> list[bytes]:
    """Leaf data of every row of ``table``, in table (file) order.

    Byte-for-byte ``entry_leaf(row)`` for each row of ``table.to_pylist()``, built column-wise with
    Arrow kernels (tens of times faster than encoding row dictionaries one by one); tables with a
    column type the vectorised encoder does not know fall back to the row-by-row path.
    """
    if "ts" in table.column_names:
        # Integer microseconds straight from Arrow: exact, and no datetime round trip per row.
        index = table.column_names.index("ts")
        table = table.set_column(index, "ts", table.column("ts").cast(pa.int64()))
    try:
        return _vector_leaves(table)
    except _Unsupported:
        return [canonical_encode(row) for row in table.to_pylist()]


# Column-wise canonical encoding: each column becomes a binary array holding, per row, exactly the
# bytes canonical_encode writes for that value; a row is the mapping header, then for each column
# name in UTF-8 order the encoded name and the value's fragment.


class _Unsupported(Exception):
    pass


def _len8(lengths: Any) -> pa.Array:
    """Per-row 8-byte big-endian lengths (canonical_encode's length prefix) as a binary array."""
    values = np.asarray(lengths, dtype=np.int64).astype(">u8")
    fixed = pa.FixedSizeBinaryArray.from_buffers(pa.binary(8), len(values),
                                                 [None, pa.py_buffer(values.tobytes())])
    return fixed.cast(pa.binary())


def _join(*parts: Any) -> pa.Array:
    return pc.binary_join_element_wise(*parts, b"")


def _with_nulls(frag: pa.Array, arr: pa.Array) -> pa.Array:
    if arr.null_count:
        frag = pc.if_else(arr.is_valid(), frag, pa.scalar(b"N", pa.binary()))
    return frag


def _length_prefixed(tag: bytes, raw: pa.Array, arr: pa.Array) -> pa.Array:
    lengths = pc.fill_null(pc.binary_length(raw), 0).to_numpy(zero_copy_only=False)
    return _with_nulls(_join(pa.scalar(tag, pa.binary()), _len8(lengths), pc.fill_null(raw, b"")), arr)


def _fragments(arr: pa.Array) -> pa.Array:
    typ = arr.type
    n = len(arr)
    if n == 0:
        return pa.array([], pa.binary())
    if pa.types.is_null(typ):
        return pa.array([b"N"] * n, pa.binary())
    if pa.types.is_boolean(typ):
        frag = pc.if_else(pc.fill_null(arr, False), pa.scalar(b"T", pa.binary()),
                          pa.scalar(b"F", pa.binary()))
        return _with_nulls(frag, arr)
    if pa.types.is_integer(typ):
        if typ == pa.uint64():
            raise _Unsupported(str(typ))
        return _with_nulls(_int_fragments(arr), arr)
    if pa.types.is_floating(typ):
        values = arr.cast(pa.float64()).to_numpy(zero_copy_only=False).astype(">f8")
        bits = values.view(">u8").copy()
        bits[np.isnan(values)] = 0x7FF8000000000000  # one NaN, as canonical_encode writes it
        fixed = pa.FixedSizeBinaryArray.from_buffers(pa.binary(8), n, [None, pa.py_buffer(bits.tobytes())])
        return _with_nulls(_join(pa.scalar(b"D", pa.binary()), fixed.cast(pa.binary())), arr)
    if pa.types.is_string(typ) or pa.types.is_large_string(typ):
        return _length_prefixed(b"S", arr.cast(pa.binary()), arr)
    if pa.types.is_binary(typ) or pa.types.is_large_binary(typ):
        return _length_prefixed(b"B", arr.cast(pa.binary()), arr)
    if pa.types.is_struct(typ):
        names = sorted((typ.field(i).name for i in range(typ.num_fields)), key=lambda k: k.encode("utf-8"))
        parts: list[Any] = [pa.scalar(_DICT_TAG + _length_bytes(len(names)), pa.binary())]
        for name in names:
            parts.append(pa.scalar(canonical_encode(name), pa.binary()))
            parts.append(_fragments(pc.struct_field(arr, name)))
        return _with_nulls(_join(*parts), arr)
    if pa.types.is_list(typ) or pa.types.is_large_list(typ):
        lengths = pc.fill_null(pc.list_value_length(arr), 0).to_numpy(zero_copy_only=False)
        children = _fragments(pc.list_flatten(arr))
        offsets = np.concatenate([[0], np.cumsum(lengths, dtype=np.int64)]).astype(np.int32)
        grouped = pa.ListArray.from_arrays(pa.array(offsets, pa.int32()), children)
        joined = pc.binary_join(grouped, b"")
        return _with_nulls(_join(pa.scalar(b"L", pa.binary()), _len8(lengths), joined), arr)
    raise _Unsupported(str(typ))


_DICT_TAG = b"M"


def _int_fragments(arr: pa.Array) -> pa.Array:
    """``b"I" u64(n)`` + the n-byte big-endian two's complement, n = bit_length(|v|) // 8 + 1."""
    values = pc.fill_null(arr.cast(pa.int64()), 0).to_numpy(zero_copy_only=False).astype(np.int64)
    n_rows = len(values)
    unsigned = values.view(np.uint64)
    magnitude = np.where(values < 0, np.uint64(0) - unsigned, unsigned)  # |v|, exact for -2**63
    bits = np.zeros(n_rows, dtype=np.int64)
    rest = magnitude.copy()
    for shift in (32, 16, 8, 4, 2, 1):
        big = rest >= (np.uint64(1) << np.uint64(shift))
        bits += big * shift
        rest = np.where(big, rest >> np.uint64(shift), rest)
    bits += (rest > 0).astype(np.int64)
    sizes = bits // 8 + 1  # 1..9 bytes
    wide = np.empty((n_rows, 9), dtype=np.uint8)
    wide[:, 0] = np.where(values < 0, 0xFF, 0x00)  # sign extension for the 9-byte case (-2**63)
    wide[:, 1:] = values.astype(">i8").view(np.uint8).reshape(n_rows, 8)
    keep = np.arange(9)[None, :] >= (9 - sizes)[:, None]
    payload = wide[keep]
    offsets = np.concatenate([[0], np.cumsum(sizes)]).astype(np.int32)
    raw = pa.BinaryArray.from_buffers(
        pa.binary(), n_rows, [None, pa.py_buffer(offsets.tobytes()), pa.py_buffer(payload.tobytes())]
    )
    return _join(pa.scalar(b"I", pa.binary()), _len8(sizes), raw)


def _length_bytes(n: int) -> bytes:
    return int(n).to_bytes(8, "big")


def _vector_leaves(table: pa.Table) -> list[bytes]:
    if table.num_rows == 0:
        return []
    table = table.combine_chunks()
    names = sorted(table.column_names, key=lambda k: k.encode("utf-8"))
    parts: list[Any] = [pa.scalar(_DICT_TAG + _length_bytes(len(names)), pa.binary())]
    for name in names:
        column = table.column(name)
        array = column.chunk(0) if column.num_chunks == 1 else pa.concat_arrays(column.chunks)
        parts.append(pa.scalar(canonical_encode(name), pa.binary()))
        parts.append(_fragments(array))
    return _join(*parts).to_pylist()


def table_leaf_hashes(table: pa.Table) -> list[bytes]:
    """RFC 6962 leaf hashes of every row of ``table``, in table order."""
    return [leaf_hash(leaf) for leaf in table_leaves(table)]


def table_merkle_root(table: pa.Table) -> str:
    """Hex Merkle root over a file's rows, in file order (see :func:`entry_leaf`)."""
    return root_from_leaf_hashes(table_leaf_hashes(table)).hex()


def entry_inclusion_proof(table: pa.Table, row_index: int) -> list[str]:
    """Hex audit path for row ``row_index`` of a file, checkable against its manifest root."""
    return [p.hex() for p in inclusion_proof(table_leaves(table), row_index)]
