"""Canonical, type-tagged byte encoding of a feature vector (specified in docs/security.md).

Equal feature vectors give equal bytes in every process; different vectors give different bytes.
Each value is a one-byte type tag followed by a length-prefixed or fixed-size payload, so no two
distinct values share an encoding and concatenations cannot be ambiguous.
"""

from __future__ import annotations

import math
import struct
from collections.abc import Mapping
from typing import Any

_NONE = b"N"
_TRUE = b"T"
_FALSE = b"F"
_INT = b"I"
_FLOAT = b"D"
_STR = b"S"
_BYTES = b"B"
_LIST = b"L"
_DICT = b"M"


class CanonicalEncodingError(ValueError):
    """A feature value cannot be encoded. The message names the type and path, never the value."""


def canonical_encode(value: Any) -> bytes:
    """Encode ``value`` canonically; raises :class:`CanonicalEncodingError` for unsupported input."""
    out = bytearray()
    _encode(value, out, "$")
    return bytes(out)


def _length(n: int) -> bytes:
    return struct.pack(">Q", n)


def _encode(value: Any, out: bytearray, path: str) -> None:
    # Order matters: bool is an int subclass, numpy scalars are handled through .item().
    if value is None:
        out += _NONE
    elif value is True:
        out += _TRUE
    elif value is False:
        out += _FALSE
    elif isinstance(value, int):
        raw = str(int(value)).encode("ascii")
        out += _INT + _length(len(raw)) + raw
    elif isinstance(value, float):
        if math.isnan(value):
            # One NaN: payload bits vary between platforms and libraries, the meaning does not.
            out += _FLOAT + struct.pack(">Q", 0x7FF8000000000000)
        else:
            out += _FLOAT + struct.pack(">d", value)
    elif isinstance(value, str):
        try:
            raw = value.encode("utf-8")
        except UnicodeEncodeError as exc:
            raise CanonicalEncodingError(
                f"feature at {path} is a string that is not valid UTF-8 (unpaired surrogate)"
            ) from exc
        out += _STR + _length(len(raw)) + raw
    elif isinstance(value, bytes | bytearray | memoryview):
        raw = bytes(value)
        out += _BYTES + _length(len(raw)) + raw
    elif isinstance(value, Mapping):
        items = []
        for key in value:
            if not isinstance(key, str):
                raise CanonicalEncodingError(
                    f"feature mapping at {path} has a key of type {type(key).__name__}; keys must be str"
                )
            items.append(key)
        items.sort(key=lambda k: k.encode("utf-8", "surrogatepass"))
        out += _DICT + _length(len(items))
        for key in items:
            _encode(key, out, f"{path}.<key>")
            _encode(value[key], out, f"{path}.{key}")
    elif isinstance(value, list | tuple):
        out += _LIST + _length(len(value))
        for i, item in enumerate(value):
            _encode(item, out, f"{path}[{i}]")
    elif hasattr(value, "tolist") and hasattr(value, "dtype"):
        # numpy arrays and scalars: their Python equivalents encode identically.
        _encode(value.tolist(), out, path)
    elif hasattr(value, "item") and callable(value.item):
        _encode(value.item(), out, path)
    else:
        raise CanonicalEncodingError(
            f"feature at {path} has unsupported type {type(value).__name__}; "
            "use int, float, bool, None, str, bytes, list or dict"
        )
