"""Canonical feature encoding: equal in, equal out; different in, different out; same everywhere."""

from __future__ import annotations

import math
import struct
import subprocess
import sys

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from serve_journal.integrity.encoding import MAX_DEPTH, CanonicalEncodingError, canonical_encode

# --- a decoder written for the test: decode(encode(x)) must give back x's canonical form ---------


def decode(data: bytes):
    value, end = _decode(data, 0)
    assert end == len(data), "trailing bytes after one value"
    return value


def _u64(data: bytes, pos: int) -> tuple[int, int]:
    return struct.unpack(">Q", data[pos:pos + 8])[0], pos + 8


def _decode(data: bytes, pos: int):
    tag, pos = data[pos:pos + 1], pos + 1
    if tag == b"N":
        return None, pos
    if tag == b"T":
        return True, pos
    if tag == b"F":
        return False, pos
    if tag == b"I":
        n, pos = _u64(data, pos)
        raw = data[pos:pos + n]
        assert len(raw) == n and n >= 1
        value = int.from_bytes(raw, "big", signed=True)
        assert n == value.bit_length() // 8 + 1, "int length is not the canonical one"
        return value, pos + n
    if tag == b"D":
        (value,) = struct.unpack(">d", data[pos:pos + 8])
        if math.isnan(value):
            assert data[pos:pos + 8] == bytes.fromhex("7ff8000000000000")
        return value, pos + 8
    if tag in (b"S", b"B"):
        n, pos = _u64(data, pos)
        raw = data[pos:pos + n]
        assert len(raw) == n
        return (raw.decode("utf-8") if tag == b"S" else raw), pos + n
    if tag == b"L":
        n, pos = _u64(data, pos)
        items = []
        for _ in range(n):
            item, pos = _decode(data, pos)
            items.append(item)
        return items, pos
    if tag == b"M":
        n, pos = _u64(data, pos)
        out = {}
        previous = None
        for _ in range(n):
            key, pos = _decode(data, pos)
            assert isinstance(key, str)
            raw_key = key.encode("utf-8")
            assert previous is None or previous < raw_key, "keys not strictly sorted"
            previous = raw_key
            out[key], pos = _decode(data, pos)
        return out, pos
    raise AssertionError(f"unknown tag {tag!r}")


def shape(value):
    """A structural key that tells apart everything the encoding must tell apart."""
    if value is None or isinstance(value, bool):
        return ("atom", repr(value))
    if isinstance(value, int):
        return ("int", int(value))
    if isinstance(value, float):
        if math.isnan(value):
            return ("float", "nan")
        return ("float", struct.pack(">d", value))
    if isinstance(value, str):
        return ("str", value)
    if isinstance(value, bytes | bytearray):
        return ("bytes", bytes(value))
    if isinstance(value, list | tuple):
        return ("list", tuple(shape(v) for v in value))
    if isinstance(value, dict):
        return ("dict", tuple(sorted((k, shape(v)) for k, v in value.items())))
    raise TypeError(type(value))


# --- strategies -------------------------------------------------------------------------------

text = st.text(alphabet=st.characters(blacklist_categories=("Cs",)), max_size=12)
atoms = (
    st.none()
    | st.booleans()
    | st.integers()
    | st.integers(min_value=-(2**200), max_value=2**200)
    | st.floats(allow_nan=True, allow_infinity=True)
    | text
    | st.binary(max_size=12)
)
values = st.recursive(
    atoms,
    lambda children: st.lists(children, max_size=4)
    | st.tuples(children, children)
    | st.dictionaries(text, children, max_size=4),
    max_leaves=20,
)


@given(values)
@settings(max_examples=400, deadline=None)
def test_decode_gives_back_the_value(value):
    encoded = canonical_encode(value)
    assert shape(decode(encoded)) == shape(value)
    assert canonical_encode(value) == encoded


@given(values, values)
@settings(max_examples=400, deadline=None)
def test_different_values_give_different_bytes(a, b):
    assert (canonical_encode(a) == canonical_encode(b)) == (shape(a) == shape(b))


@given(st.dictionaries(text, values, max_size=6), st.randoms(use_true_random=False))
@settings(max_examples=200, deadline=None)
def test_dict_insertion_order_does_not_matter(mapping, rnd):
    items = list(mapping.items())
    rnd.shuffle(items)
    assert canonical_encode(dict(items)) == canonical_encode(mapping)


@given(st.lists(st.integers(min_value=-(2**63), max_value=2**63 - 1), max_size=8))
@settings(max_examples=200, deadline=None)
def test_numpy_int_arrays_equal_python_lists(ints):
    arr = np.array(ints, dtype=np.int64)
    assert canonical_encode(arr) == canonical_encode(ints)
    for i in ints:
        assert canonical_encode(np.int64(i)) == canonical_encode(i)


@given(st.lists(st.floats(allow_nan=True, allow_infinity=True), max_size=8))
@settings(max_examples=200, deadline=None)
def test_numpy_float_arrays_equal_python_lists(floats):
    arr = np.array(floats, dtype=np.float64)
    assert canonical_encode(arr) == canonical_encode(floats)
    for f in floats:
        assert canonical_encode(np.float64(f)) == canonical_encode(f)
        with np.errstate(over="ignore"):  # large doubles become float32 inf, as intended
            single = np.float32(f)
        assert canonical_encode(single) == canonical_encode(float(single))


def test_numpy_scalar_kinds_match_python():
    assert canonical_encode(np.bool_(True)) == canonical_encode(True)
    assert canonical_encode(np.bool_(False)) == canonical_encode(False)
    assert canonical_encode(np.uint64(2**64 - 1)) == canonical_encode(2**64 - 1)
    assert canonical_encode(np.int8(-3)) == canonical_encode(-3)
    assert canonical_encode(np.str_("é")) == canonical_encode("é")
    assert canonical_encode(np.bytes_(b"ab")) == canonical_encode(b"ab")
    assert canonical_encode(np.array([[1, 2], [3, 4]])) == canonical_encode([[1, 2], [3, 4]])
    assert canonical_encode({"a": np.float16(0.5)}) == canonical_encode({"a": 0.5})


def test_special_floats_are_distinct_and_stable():
    specials = [0.0, -0.0, math.inf, -math.inf, math.nan]
    encodings = [canonical_encode(v) for v in specials]
    assert len(set(encodings)) == len(specials)
    # every NaN (payload, sign, numpy) is the one NaN
    other_nan = struct.unpack(">d", bytes.fromhex("fff8000000000001"))[0]
    assert math.isnan(other_nan)
    assert canonical_encode(other_nan) == canonical_encode(math.nan)
    assert canonical_encode(np.float32("nan")) == canonical_encode(math.nan)
    # type tags keep 1, 1.0, True and "1" apart
    assert len({canonical_encode(v) for v in (1, 1.0, True, "1", b"1", [1], None, 0, False)}) == 9


def test_spec_examples_from_docs():
    # The byte-level examples of docs/security.md ("Canonical feature encoding").
    assert canonical_encode(None) == b"N"
    assert canonical_encode(True) == b"T"
    assert canonical_encode(5) == b"I" + (1).to_bytes(8, "big") + b"\x05"
    assert canonical_encode(-128) == b"I" + (2).to_bytes(8, "big") + b"\xff\x80"
    assert canonical_encode(1.5) == b"D" + bytes.fromhex("3ff8000000000000")
    assert canonical_encode("é") == b"S" + (2).to_bytes(8, "big") + "é".encode()
    assert canonical_encode({"b": 1, "a": None}) == (
        b"M" + (2).to_bytes(8, "big")
        + b"S" + (1).to_bytes(8, "big") + b"a" + b"N"
        + b"S" + (1).to_bytes(8, "big") + b"b" + b"I" + (1).to_bytes(8, "big") + b"\x01"
    )


def test_unpaired_surrogate_names_the_path_not_the_value():
    secret = "4111-1111\udc80-canary"
    with pytest.raises(CanonicalEncodingError) as info:
        canonical_encode({"card": {"number": [secret]}})
    message = str(info.value)
    assert "$.card.number[0]" in message
    assert "4111" not in message and "canary" not in message
    assert info.value.__cause__ is None and info.value.__suppress_context__


def test_surrogate_in_key_is_rejected_without_echo():
    with pytest.raises(CanonicalEncodingError) as info:
        canonical_encode({"name\ud800secret": 1})
    assert "secret" not in str(info.value)
    str(info.value).encode("utf-8")  # the message itself is printable


def test_unsupported_types_and_cycles_are_clear_errors():
    with pytest.raises(CanonicalEncodingError, match=r"\$\.when has unsupported type datetime"):
        import datetime

        canonical_encode({"when": datetime.datetime(2024, 1, 1)})
    with pytest.raises(CanonicalEncodingError, match="keys must be str"):
        canonical_encode({1: "x"})
    with pytest.raises(CanonicalEncodingError, match="unsupported type complex"):
        canonical_encode([1j])
    loop: list = []
    loop.append(loop)
    with pytest.raises(CanonicalEncodingError, match=f"deeper than {MAX_DEPTH}"):
        canonical_encode(loop)

    class HasItem:  # not numpy: duck-typed .item()/.tolist() must not be trusted
        def item(self):
            return 1

    with pytest.raises(CanonicalEncodingError, match="unsupported type HasItem"):
        canonical_encode(HasItem())


def test_huge_ints_have_no_digit_limit():
    big = 10**5000  # beyond Python's int->str conversion limit
    assert decode(canonical_encode(big)) == big
    assert canonical_encode(big) != canonical_encode(big + 1)


_CORPUS = (
    "[None, True, False, 0, -1, 255, -(2**70), 0.0, -0.0, float('inf'), float('-inf'), "
    "float('nan'), 1e-310, 'x', 'é\\u4e2d\\U0001f600', b'\\x00\\xff', [], {}, (1, 2), "
    "{'z': [1.5, None], 'a': {'k': b''}, 'é': 3}]"
)


def test_stable_across_processes():
    script = (
        "import sys\n"
        "from serve_journal.integrity.encoding import canonical_encode\n"
        f"sys.stdout.write(canonical_encode({_CORPUS}).hex())\n"
    )
    # A different hash seed changes dict/set iteration order of str keys in the child.
    env = {"PYTHONHASHSEED": "12345", "PATH": "/usr/bin:/bin"}
    child = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                           check=True, env=env, timeout=120)
    assert child.stdout == canonical_encode(eval(_CORPUS)).hex()  # noqa: S307 - literal corpus
