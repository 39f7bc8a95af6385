"""Canonical, type-tagged byte encoding of a feature vector (specified in docs/security.md).

This module is the one place the encoding is written down: feature HMACs, Merkle leaves of
journal files (tamper evidence) and replay all rest on it. It holds the reference encoder
:func:`canonical_encode` and two faster forms of it, byte-identical to it for every value they
accept and falling back to it for everything else (property tests in
tests/test_privacy_encoding.py):

- :func:`canonical_encode_fast` for one value: a fast path for flat mappings of scalars (what a
  model receives, and what replay re-encodes millions of times);
- :func:`encode_arrow_values` and :func:`encode_arrow_rows`: column-wise with Arrow kernels, per
  value of an Arrow array or per row of a table (the Merkle leaves of a journal file).

Equal feature vectors give equal bytes in every process and on every platform; different vectors
give different bytes. Each value is a one-byte type tag followed by a fixed-size or
length-prefixed payload, so no two distinct values share an encoding and concatenations cannot be
ambiguous. numpy scalars and arrays encode exactly like their Python equivalents (``.tolist()``).

Encoding (``u64`` is an unsigned 64-bit big-endian length)::

    None                 b"N"
    True / False         b"T" / b"F"
    int                  b"I" u64(n) two's-complement big-endian, n = bit_length(v) // 8 + 1
    float                b"D" IEEE-754 binary64 big-endian; every NaN as 0x7FF8000000000000
    str                  b"S" u64(n) UTF-8 bytes (unpaired surrogates are rejected)
    bytes                b"B" u64(n) raw bytes
    list / tuple         b"L" u64(count) items
    dict (str keys)      b"M" u64(count) (key as str, value) pairs, keys sorted by UTF-8 bytes
"""

from __future__ import annotations

import operator
import struct
from collections.abc import Collection, Mapping
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from serve_journal.errors import CanonicalEncodingError

__all__ = [
    "MAX_DEPTH",
    "CanonicalEncodingError",
    "canonical_encode",
    "canonical_encode_fast",
    "encode_arrow_rows",
    "encode_arrow_values",
    "encode_flat_mapping",
    "encode_length",
    "mapping_header",
]

_NONE = b"N"
_TRUE = b"T"
_FALSE = b"F"
_INT = b"I"
_FLOAT = b"D"
_STR = b"S"
_BYTES = b"B"
_LIST = b"L"
_DICT = b"M"

_PACK_LEN = struct.Struct(">Q").pack
_PACK_DOUBLE = struct.Struct(">d").pack
_NAN_BITS = 0x7FF8000000000000
_ENCODED_NAN = _FLOAT + _PACK_LEN(_NAN_BITS)

_NUMPY_TYPES = (np.generic, np.ndarray)

#: Deepest nesting accepted; deeper input (or a self-referencing container) is refused clearly.
MAX_DEPTH = 64


def canonical_encode(value: Any) -> bytes:
    """Encode ``value`` canonically; raises :class:`CanonicalEncodingError` for unsupported input.

    Supported: ``None``, ``bool``, ``int``, ``float``, ``str``, ``bytes``/``bytearray``/
    ``memoryview``, ``list``/``tuple`` (encoded alike), mappings with ``str`` keys, and numpy
    scalars and arrays (encoded as their ``.tolist()``).
    """
    out = bytearray()
    _encode(value, out, "$", 0)
    return bytes(out)


def encode_length(n: int) -> bytes:
    """The ``u64`` length (or count) prefix: 8 bytes, unsigned big-endian."""
    return _PACK_LEN(n)


def mapping_header(count: int) -> bytes:
    """The bytes a mapping of ``count`` entries starts with; its sorted pairs follow."""
    return _DICT + _PACK_LEN(count)


_INT_HEADS = tuple(_INT + _PACK_LEN(n) for n in range(64))
"""``b"I" u64(n)`` for the payload sizes of every int below 2**500: one concatenation per int."""
_SMALL_INT_LOW, _SMALL_INT_HIGH = -1024, 4096
_SMALL_INTS: tuple[bytes, ...] = ()
"""The encodings of ``_SMALL_INT_LOW <= v < _SMALL_INT_HIGH`` (counts, hours, days, flags: most
integer features), looked up instead of built; filled below, once :func:`_int_bytes` exists."""


def _int_bytes(number: int) -> bytes:
    if _SMALL_INT_LOW <= number < _SMALL_INT_HIGH and _SMALL_INTS:
        return _SMALL_INTS[number - _SMALL_INT_LOW]
    size = number.bit_length() // 8 + 1
    raw = number.to_bytes(size, "big", signed=True)
    return (_INT_HEADS[size] if size < 64 else _INT + _PACK_LEN(size)) + raw


_SMALL_INTS = tuple(_int_bytes(v) for v in range(_SMALL_INT_LOW, _SMALL_INT_HIGH))


def _float_bytes(number: float) -> bytes:
    # One NaN: payload bits vary between platforms and libraries, the meaning does not.
    return _ENCODED_NAN if number != number else _FLOAT + _PACK_DOUBLE(number)


def _path_part(key: str) -> str:
    # Feature names go into error paths; escape anything that is not printable ASCII so a
    # surrogate in a key cannot make the error message itself unprintable.
    return key.encode("ascii", "backslashreplace").decode("ascii")


def _encode(value: Any, out: bytearray, path: str, depth: int) -> None:
    if depth > MAX_DEPTH:
        raise CanonicalEncodingError(
            f"feature at {path} is nested deeper than {MAX_DEPTH} levels (or contains itself)"
        )
    # Order matters: bool is an int subclass; numpy float64/str_/bytes_ subclass Python types and
    # encode through those branches with the same result as .tolist().
    if value is None:
        out += _NONE
    elif value is True:
        out += _TRUE
    elif value is False:
        out += _FALSE
    elif isinstance(value, int):
        out += _int_bytes(int(value))
    elif isinstance(value, float):
        out += _float_bytes(float(value))
    elif isinstance(value, str):
        try:
            raw = str.encode(value, "utf-8")
        except UnicodeEncodeError:
            raise CanonicalEncodingError(
                f"feature at {path} is a string that is not valid UTF-8 (unpaired surrogate); "
                "decode the input with errors='replace' or reject the request"
            ) from None  # the original exception quotes the offending characters
        out += _STR + _PACK_LEN(len(raw)) + raw
    elif isinstance(value, bytes | bytearray | memoryview):
        raw = bytes(value)
        out += _BYTES + _PACK_LEN(len(raw)) + raw
    elif isinstance(value, Mapping):
        keys: list[tuple[bytes, str]] = []
        for key in value:
            if not isinstance(key, str):
                raise CanonicalEncodingError(
                    f"feature mapping at {path} has a key of type {type(key).__name__}; "
                    "keys must be str"
                )
            try:
                keys.append((str.encode(key, "utf-8"), key))
            except UnicodeEncodeError:
                raise CanonicalEncodingError(
                    f"feature mapping at {path} has a key that is not valid UTF-8 "
                    "(unpaired surrogate); keys must be valid Unicode text"
                ) from None
        keys.sort(key=lambda pair: pair[0])
        out += mapping_header(len(keys))
        for raw_key, key in keys:
            out += _STR + _PACK_LEN(len(raw_key)) + raw_key
            _encode(value[key], out, f"{path}.{_path_part(key)}", depth + 1)
    elif isinstance(value, list | tuple):
        out += _LIST + _PACK_LEN(len(value))
        for i, item in enumerate(value):
            _encode(item, out, f"{path}[{i}]", depth + 1)
    elif isinstance(value, _NUMPY_TYPES):
        try:
            plain = value.tolist()
        except Exception as exc:  # noqa: BLE001 - exotic dtypes; never echo the value
            raise CanonicalEncodingError(
                f"feature at {path} is a numpy {type(value).__name__} of dtype {value.dtype} "
                "that cannot be converted to Python values"
            ) from exc
        if type(plain) is type(value):  # pragma: no cover - defensive: would recurse forever
            raise CanonicalEncodingError(f"feature at {path} has unsupported numpy dtype {value.dtype}")
        _encode(plain, out, path, depth)
    else:
        raise CanonicalEncodingError(
            f"feature at {path} has unsupported type {type(value).__name__}; "
            "use int, float, bool, None, str, bytes, list, dict or numpy numbers and arrays"
        )


# -- one value, fast ---------------------------------------------------------------------------


_Shape = tuple[bytes, tuple[bytes, ...], tuple[bytes, ...], Any]
_SHAPES: dict[tuple[str, ...], _Shape] = {}
"""Key tuple of a flat mapping (in its own order) -> its mapping header; in canonical order, each
key's encoding, and that encoding followed by the float tag (the commonest value type); and a
getter of the values in that order: a feature mapping's keys repeat call after call, so they are
encoded and sorted once. Bounded by :data:`_MAX_SHAPES` (cleared when full)."""
_MAX_SHAPES = 1024
_ONLY_STR = frozenset({str})


def _shape(keys: tuple[str, ...]) -> _Shape | None:
    """The cached header, sorted encoded keys and value getter of a mapping with ``keys``;
    ``None`` when a key is not valid UTF-8 (the general encoder explains why)."""
    try:
        pairs = sorted((k.encode("utf-8"), k) for k in keys)
    except UnicodeEncodeError:
        return None
    encoded = tuple(_STR + _PACK_LEN(len(raw)) + raw for raw, _ in pairs)
    ordered = [k for _, k in pairs]
    if not ordered:
        def getter(mapping: dict) -> tuple:
            return ()
    elif len(ordered) == 1:
        only = ordered[0]

        def getter(mapping: dict) -> tuple:
            return (mapping[only],)
    else:
        getter = operator.itemgetter(*ordered)  # a tuple of the values, in canonical order
    shape = (mapping_header(len(pairs)), encoded, tuple(k + _FLOAT for k in encoded), getter)
    if len(_SHAPES) >= _MAX_SHAPES:
        _SHAPES.clear()
    _SHAPES[keys] = shape
    return shape


def encode_flat_mapping(value: Any) -> bytes | None:
    """``canonical_encode(value)`` of a flat ``dict`` of ``str`` to ``None | bool | int | float |
    str`` (exact types, no subclasses), else ``None``.

    The same bytes without the error-path bookkeeping of :func:`canonical_encode`, which
    dominates the cost of encoding small feature mappings; the keys' encoding and order are
    computed once per distinct key tuple. Any other shape, and any input
    :func:`canonical_encode` would refuse, returns ``None``: call :func:`canonical_encode_fast`
    to fall back automatically.
    """
    if type(value) is not dict:
        return None
    keys = tuple(value)
    if not _ONLY_STR.issuperset(map(type, keys)):
        return None  # a key that is not exactly a str: the general encoder decides
    shape = _SHAPES.get(keys) or _shape(keys)
    if shape is None:
        return None
    header, encoded_keys, float_keys, getter = shape
    out = [header]
    append = out.append
    pack_double = _PACK_DOUBLE
    for key, float_key, v in zip(encoded_keys, float_keys, getter(value), strict=True):
        kind = type(v)
        if kind is float:
            if v != v:
                append(key)
                append(_ENCODED_NAN)
            else:
                append(float_key)
                append(pack_double(v))
        elif kind is int:
            append(key)
            append(_SMALL_INTS[v - _SMALL_INT_LOW] if _SMALL_INT_LOW <= v < _SMALL_INT_HIGH
                   else _int_bytes(v))
        elif kind is str:
            try:
                raw = v.encode("utf-8")
            except UnicodeEncodeError:
                return None
            append(key)
            append(_STR + _PACK_LEN(len(raw)) + raw)
        elif v is None:
            append(key)
            append(_NONE)
        elif v is True:
            append(key)
            append(_TRUE)
        elif v is False:
            append(key)
            append(_FALSE)
        else:
            return None
    return b"".join(out)


def canonical_encode_fast(value: Any) -> bytes:
    """:func:`canonical_encode`, through :func:`encode_flat_mapping` when ``value`` has that shape.

    Same bytes and same errors as :func:`canonical_encode` for every input.
    """
    encoded = encode_flat_mapping(value)
    return canonical_encode(value) if encoded is None else encoded


# -- Arrow columns, vectorised -----------------------------------------------------------------
#
# Each Arrow array becomes a binary array holding, per element, exactly the bytes canonical_encode
# writes for that element's Python value (``array.to_pylist()[i]``); a row of a table is the
# mapping header, then for each column name in UTF-8 order the encoded name and the value.


class _ArrowUnsupported(Exception):
    """A type the column-wise encoder does not know: the caller falls back to canonical_encode."""


def encode_arrow_values(array: pa.Array | pa.ChunkedArray) -> pa.BinaryArray:
    """Per element of ``array``, ``canonical_encode`` of its Python value, as a binary array.

    Built with Arrow kernels for null, bool, signed and unsigned integers up to 32 bits and
    int64, floats, strings, binaries, structs and lists of those (a null is ``b"N"``); other types
    (uint64, timestamps, dictionaries, maps ...) go through :func:`canonical_encode` element by
    element, which refuses values it cannot encode (:class:`CanonicalEncodingError`).
    """
    if isinstance(array, pa.ChunkedArray):
        array = pa.concat_arrays(array.chunks) if array.num_chunks != 1 else array.chunk(0)
    try:
        return _fragments(array)
    except _ArrowUnsupported:
        return pa.array([canonical_encode(v) for v in array.to_pylist()], pa.binary())


def encode_arrow_rows(table: pa.Table, omit_null: Collection[str] = (), prefix: bytes = b"") -> list[bytes]:
    """Per row of ``table``, ``canonical_encode`` of the row as a mapping of column name to value.

    Byte-for-byte ``[canonical_encode(row) for row in table.to_pylist()]``, built column-wise
    with Arrow kernels (tens of times faster); a table with a column type
    :func:`encode_arrow_values` does not vectorise is encoded row by row instead.

    A column named in ``omit_null`` is left out of a row's mapping where its value is null (the
    mapping then has fewer entries, its header says so): the row encodes exactly like
    ``canonical_encode({k: v for k, v in row.items() if not (k in omit_null and v is None)})``.
    This is how a column added by a later schema version keeps an older row's encoding.

    ``prefix`` is put before every row's bytes (a Merkle leaf's ``0x00``: one copy, not two).
    """
    if table.num_rows == 0:
        return []
    names = sorted(table.column_names, key=lambda k: k.encode("utf-8"))
    if not names:
        return [prefix + mapping_header(0)] * table.num_rows
    table = table.combine_chunks()
    columns = {name: _one_array(table.column(name)) for name in names}
    optional = [name for name in names if name in omit_null and columns[name].null_count]
    always = len(names) - len(optional)
    if optional:
        # Per row, the header counts the optional columns that are valid there.
        valid = np.zeros(table.num_rows, dtype=np.int64)
        for name in optional:
            valid += columns[name].is_valid().to_numpy(zero_copy_only=False)
        headers = sorted({always + int(k) for k in np.unique(valid)})
        header: Any = pc.take(pa.array([mapping_header(c) for c in headers], pa.binary()),
                              pa.array(np.searchsorted(headers, always + valid)))
    else:
        header = mapping_header(len(names))
    parts: list[Any] = [prefix, header] if prefix else [header]
    try:
        for name in names:
            if name in optional and columns[name].null_count == table.num_rows:
                continue  # null in every row: no part of any row
            key = canonical_encode(name)
            if name in optional:
                # Key and value where valid, nothing where null.
                parts.append(pc.if_else(columns[name].is_valid(),
                                        _join(pa.scalar(key, pa.binary()),
                                              _fragments(columns[name])),
                                        pa.scalar(b"", pa.binary())))
            else:
                parts += (key, *_flat_parts(columns[name]))
    except _ArrowUnsupported:
        return [prefix + canonical_encode({k: v for k, v in row.items()
                                           if not (k in omit_null and v is None)})
                for row in table.to_pylist()]
    if all(isinstance(part, bytes) for part in parts):  # every column constant or null
        return [b"".join(parts)] * table.num_rows
    return _join(*_merge_constants(parts)).to_pylist()


def _merge_constants(parts: list[Any]) -> list[Any]:
    """Adjacent constant parts (``bytes``) as one binary scalar each: every row's bytes are
    copied once, by one join, however many columns there are."""
    out: list[Any] = []
    pending = b""
    for part in parts:
        if isinstance(part, bytes):
            pending += part
            continue
        if pending:
            out.append(pa.scalar(pending, pa.binary()))
            pending = b""
        out.append(part)
    if pending or not out:
        out.append(pa.scalar(pending, pa.binary()))
    return out


def _flat_parts(arr: pa.Array) -> list[Any]:
    """:func:`_fragments` of ``arr`` as the parts whose row-wise join it is (constants as
    ``bytes``), for the outer join to copy once; a nested or nullable column stays whole."""
    n = len(arr)
    if n and arr.null_count == n:
        return [_NONE]  # null in every row: the same bytes whatever the type
    if n == 0 or arr.null_count:
        return [_fragments(arr)]
    constant = _constant_part(arr)
    if constant is not None:
        return [constant]  # one value in every row: encoded once
    typ = arr.type
    if pa.types.is_integer(typ) and typ != pa.uint64():
        return _int_parts(arr)
    if pa.types.is_floating(typ):
        return [_FLOAT, _float_bits(arr)]
    if pa.types.is_string(typ) or pa.types.is_large_string(typ):
        raw = arr.cast(pa.binary())
        return [_STR, _binary_lengths(pc.binary_length(raw).to_numpy(zero_copy_only=False)), raw]
    if pa.types.is_binary(typ) or pa.types.is_large_binary(typ):
        raw = arr.cast(pa.binary())
        return [_BYTES, _binary_lengths(pc.binary_length(raw).to_numpy(zero_copy_only=False)), raw]
    return [_fragments(arr)]


_CONSTANT_CHECKED = (pa.int8(), pa.int16(), pa.int32(), pa.int64(), pa.uint8(), pa.uint16(),
                     pa.uint32(), pa.float32(), pa.float64())
_OFFSETS = {pa.string(): np.int32, pa.binary(): np.int32, pa.large_string(): np.int64,
            pa.large_binary(): np.int64}


def _constant_part(arr: pa.Array) -> bytes | None:
    """The encoding of ``arr``'s one value when every element (no nulls) is the same, bit for
    bit (``-0.0`` and ``0.0`` differ, NaNs with other payloads differ), for the flat types
    :func:`_flat_parts` vectorises; ``None`` otherwise and for any other type. A journal file's
    provenance columns (model, producer, deployment, schema version ...) hold one value: each is
    then encoded once, not through a chain of Arrow kernels whose fixed cost dominates a small
    file. Strings and binaries are encoded from their bytes, as the vectorised path does (a
    string column read from a file is not checked for valid UTF-8)."""
    typ = arr.type
    if isinstance(typ, pa.BaseExtensionType):
        return None  # (a Python extension type is not even hashable)
    n = len(arr)
    if typ in _CONSTANT_CHECKED:
        width = typ.byte_width
        values = np.frombuffer(arr.buffers()[1], dtype=f"u{width}", count=arr.offset + n)[arr.offset:]
        if not (values == values[0]).all():
            return None
        return canonical_encode(arr[0].as_py())
    offsets_type = _OFFSETS.get(typ)
    if offsets_type is None:
        return None
    offsets = np.frombuffer(arr.buffers()[1], dtype=offsets_type, count=arr.offset + n + 1)[arr.offset:]
    size = int(offsets[1] - offsets[0])
    if not (np.diff(offsets) == size).all():
        return None
    data = np.frombuffer(arr.buffers()[2], dtype=np.uint8, count=int(offsets[-1]))[int(offsets[0]):] \
        if size else np.zeros((n, 0), dtype=np.uint8)
    rows = data.reshape(n, size)
    if size and not (rows == rows[0]).all():
        return None
    tag = _STR if pa.types.is_string(typ) or pa.types.is_large_string(typ) else _BYTES
    return tag + _PACK_LEN(size) + rows[0].tobytes()


def _one_array(column: pa.ChunkedArray) -> pa.Array:
    return column.chunk(0) if column.num_chunks == 1 else pa.concat_arrays(column.chunks)


def _binary_lengths(lengths: Any) -> pa.Array:
    """Per-row ``u64`` length prefixes as a binary array."""
    values = np.asarray(lengths, dtype=np.int64).astype(">u8")
    fixed = pa.FixedSizeBinaryArray.from_buffers(pa.binary(8), len(values),
                                                 [None, pa.py_buffer(values.tobytes())])
    return fixed.cast(pa.binary())


def _join(*parts: Any) -> pa.Array:
    return pc.binary_join_element_wise(*parts, b"")


def _with_nulls(frag: pa.Array, arr: pa.Array) -> pa.Array:
    if arr.null_count:
        frag = pc.if_else(arr.is_valid(), frag, pa.scalar(_NONE, pa.binary()))
    return frag


def _length_prefixed(tag: bytes, raw: pa.Array, arr: pa.Array) -> pa.Array:
    lengths = pc.fill_null(pc.binary_length(raw), 0).to_numpy(zero_copy_only=False)
    return _with_nulls(_join(pa.scalar(tag, pa.binary()), _binary_lengths(lengths),
                             pc.fill_null(raw, b"")), arr)


def _fragments(arr: pa.Array) -> pa.Array:
    typ = arr.type
    n = len(arr)
    if n == 0:
        return pa.array([], pa.binary())
    if pa.types.is_null(typ):
        return pa.array([_NONE] * n, pa.binary())
    if pa.types.is_boolean(typ):
        frag = pc.if_else(pc.fill_null(arr, False), pa.scalar(_TRUE, pa.binary()),
                          pa.scalar(_FALSE, pa.binary()))
        return _with_nulls(frag, arr)
    if pa.types.is_integer(typ):
        if typ == pa.uint64():
            raise _ArrowUnsupported(str(typ))  # values above 2**63 - 1 do not fit int64
        return _with_nulls(_int_fragments(arr), arr)
    if pa.types.is_floating(typ):
        return _with_nulls(_join(pa.scalar(_FLOAT, pa.binary()), _float_bits(arr)), arr)
    if pa.types.is_string(typ) or pa.types.is_large_string(typ):
        return _length_prefixed(_STR, arr.cast(pa.binary()), arr)
    if pa.types.is_binary(typ) or pa.types.is_large_binary(typ):
        return _length_prefixed(_BYTES, arr.cast(pa.binary()), arr)
    if pa.types.is_struct(typ):
        fields = sorted(range(typ.num_fields), key=lambda i: typ.field(i).name.encode("utf-8"))
        if not fields:
            raise _ArrowUnsupported(str(typ))  # nothing to join element-wise
        parts: list[Any] = [pa.scalar(mapping_header(len(fields)), pa.binary())]
        for i in fields:
            # By index: a name is parsed as a dotted path, so a field named "a.b" would not be found.
            parts.append(pa.scalar(canonical_encode(typ.field(i).name), pa.binary()))
            parts.append(_fragments(pc.struct_field(arr, [i])))
        return _with_nulls(_join(*parts), arr)
    if pa.types.is_list(typ) or pa.types.is_large_list(typ):
        lengths = pc.fill_null(pc.list_value_length(arr), 0).to_numpy(zero_copy_only=False)
        children = _fragments(pc.list_flatten(arr))
        offsets = np.concatenate([[0], np.cumsum(lengths, dtype=np.int64)]).astype(np.int32)
        grouped = pa.ListArray.from_arrays(pa.array(offsets, pa.int32()), children)
        joined = pc.binary_join(grouped, b"")
        return _with_nulls(_join(pa.scalar(_LIST, pa.binary()), _binary_lengths(lengths), joined), arr)
    raise _ArrowUnsupported(str(typ))


def _float_bits(arr: pa.Array) -> pa.Array:
    """Each value's IEEE 754 binary64 bits, big-endian, as an 8-byte binary (one NaN, as
    canonical_encode writes it)."""
    values = arr.cast(pa.float64()).to_numpy(zero_copy_only=False).astype(">f8")
    bits = values.view(">u8").copy()
    bits[np.isnan(values)] = _NAN_BITS
    fixed = pa.FixedSizeBinaryArray.from_buffers(pa.binary(8), len(values),
                                                 [None, pa.py_buffer(bits.tobytes())])
    return fixed.cast(pa.binary())


def _int_fragments(arr: pa.Array) -> pa.Array:
    """``b"I" u64(n)`` + the n-byte big-endian two's complement, n = bit_length(|v|) // 8 + 1."""
    return _join(*(pa.scalar(p, pa.binary()) if isinstance(p, bytes) else p
                   for p in _int_parts(arr)))


def _int_parts(arr: pa.Array) -> list[Any]:
    """The parts of :func:`_int_fragments`: the tag (``bytes``), the lengths, the payloads."""
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
    return [_INT, _binary_lengths(sizes), raw]
