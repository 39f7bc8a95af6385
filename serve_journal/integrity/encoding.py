"""Canonical, type-tagged byte encoding of a feature vector (specified in docs/security.md).

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

import math
import struct
import sys
from collections.abc import Mapping
from typing import Any

from serve_journal.errors import CanonicalEncodingError

__all__ = ["MAX_DEPTH", "CanonicalEncodingError", "canonical_encode"]

_NONE = b"N"
_TRUE = b"T"
_FALSE = b"F"
_INT = b"I"
_FLOAT = b"D"
_STR = b"S"
_BYTES = b"B"
_LIST = b"L"
_DICT = b"M"

_CANONICAL_NAN = struct.pack(">Q", 0x7FF8000000000000)

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


def _length(n: int) -> bytes:
    return struct.pack(">Q", n)


def _path_part(key: str) -> str:
    # Feature names go into error paths; escape anything that is not printable ASCII so a
    # surrogate in a key cannot make the error message itself unprintable.
    return key.encode("ascii", "backslashreplace").decode("ascii")


def _numpy_types() -> tuple[type, ...]:
    numpy = sys.modules.get("numpy")
    if numpy is None:  # numpy never imported: the value cannot be a numpy object
        return ()
    return (numpy.generic, numpy.ndarray)


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
        number = int(value)
        raw = number.to_bytes(number.bit_length() // 8 + 1, "big", signed=True)
        out += _INT + _length(len(raw)) + raw
    elif isinstance(value, float):
        number = float(value)
        if math.isnan(number):
            # One NaN: payload bits vary between platforms and libraries, the meaning does not.
            out += _FLOAT + _CANONICAL_NAN
        else:
            out += _FLOAT + struct.pack(">d", number)
    elif isinstance(value, str):
        try:
            raw = str.encode(value, "utf-8")
        except UnicodeEncodeError:
            raise CanonicalEncodingError(
                f"feature at {path} is a string that is not valid UTF-8 (unpaired surrogate); "
                "decode the input with errors='replace' or reject the request"
            ) from None  # the original exception quotes the offending characters
        out += _STR + _length(len(raw)) + raw
    elif isinstance(value, bytes | bytearray | memoryview):
        raw = bytes(value)
        out += _BYTES + _length(len(raw)) + raw
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
        out += _DICT + _length(len(keys))
        for raw_key, key in keys:
            out += _STR + _length(len(raw_key)) + raw_key
            _encode(value[key], out, f"{path}.{_path_part(key)}", depth + 1)
    elif isinstance(value, list | tuple):
        out += _LIST + _length(len(value))
        for i, item in enumerate(value):
            _encode(item, out, f"{path}[{i}]", depth + 1)
    elif isinstance(value, _numpy_types()):
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
