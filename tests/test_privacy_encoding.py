"""Canonical feature encoding: equal in, equal out; different in, different out; same everywhere."""

from __future__ import annotations

import datetime
import enum
import math
import struct
import subprocess
import sys
from collections import OrderedDict

import numpy as np
import pyarrow as pa
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from serve_journal.integrity.encoding import (
    MAX_DEPTH,
    CanonicalEncodingError,
    canonical_encode,
    canonical_encode_fast,
    encode_arrow_rows,
    encode_arrow_values,
    encode_flat_mapping,
)

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


@pytest.mark.slow  # over 1.5 s: kept out of the fast tier, runs in the full suite
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


# --- the fast forms: byte-identical to canonical_encode, falling back to it ---------------------

flat_scalars = (
    st.none()
    | st.booleans()
    | st.integers()
    | st.integers(min_value=-(2**200), max_value=2**200)
    | st.floats(allow_nan=True, allow_infinity=True)
    | text
)


@given(st.dictionaries(text, flat_scalars, max_size=8))
@settings(max_examples=400, deadline=None)
def test_flat_mapping_fast_path_takes_flat_mappings_and_is_byte_identical(mapping):
    fast = encode_flat_mapping(mapping)
    assert fast is not None
    assert fast == canonical_encode(mapping)
    assert canonical_encode_fast(mapping) == fast


@given(values)
@settings(max_examples=400, deadline=None)
def test_fast_encoder_equals_canonical_encode_for_every_value(value):
    fast = encode_flat_mapping(value)
    assert fast is None or fast == canonical_encode(value)
    assert canonical_encode_fast(value) == canonical_encode(value)


class _Level(enum.IntEnum):
    HIGH = 3


def test_fast_path_declines_other_shapes_and_the_fallback_behaves_like_canonical_encode():
    declined = [{"x": [1]}, {"x": np.float64(1.0)}, {"x": np.int64(1)}, {1: 2}, {"x": "\ud800"},
                {"\ud800": 1}, [1], {"x": b"1"}, {"x": {"y": 1}}, {"x": _Level.HIGH},
                OrderedDict(x=1), None, 1.5]
    for other in declined:
        assert encode_flat_mapping(other) is None
    for ok in ({"x": np.float64(1.0)}, {"x": _Level.HIGH}, OrderedDict(x=1), {"x": {"y": [1]}}):
        assert canonical_encode_fast(ok) == canonical_encode(ok)
    for bad in ({"x": "4111\ud800"}, {1: 2}, {"k\ud800": 1}, {"x": object()}, {"x": [1j]}):
        with pytest.raises(CanonicalEncodingError) as reference:
            canonical_encode(bad)
        with pytest.raises(CanonicalEncodingError) as fast:
            canonical_encode_fast(bad)
        assert str(fast.value) == str(reference.value)


_field_names = st.text(alphabet=st.characters(blacklist_categories=("Cs",)), max_size=4)
_leaf_types = st.sampled_from([
    pa.null(), pa.bool_(), pa.int8(), pa.int16(), pa.int32(), pa.int64(), pa.uint8(),
    pa.uint16(), pa.uint32(), pa.uint64(), pa.float32(), pa.float64(), pa.string(),
    pa.large_string(), pa.binary(), pa.large_binary(), pa.dictionary(pa.int32(), pa.string()),
])
arrow_types = st.recursive(
    _leaf_types,
    lambda inner: st.builds(pa.list_, inner)
    | st.builds(pa.large_list, inner)
    | st.lists(st.tuples(_field_names, inner), min_size=1, max_size=3,
               unique_by=lambda f: f[0]).map(pa.struct),
    max_leaves=6,
)


def arrow_values(typ: pa.DataType) -> st.SearchStrategy:
    """Python values of Arrow type ``typ``, nulls included."""
    if pa.types.is_null(typ):
        return st.none()
    if pa.types.is_boolean(typ):
        base = st.booleans()
    elif pa.types.is_integer(typ):
        width = typ.bit_width
        signed = pa.types.is_signed_integer(typ)
        base = (st.integers(-(2 ** (width - 1)), 2 ** (width - 1) - 1) if signed
                else st.integers(0, 2**width - 1))
    elif pa.types.is_floating(typ):
        special = st.sampled_from([0.0, -0.0, float("nan"), float("inf"), float("-inf")])
        base = st.floats(width=typ.bit_width, allow_nan=True) | special
    elif pa.types.is_dictionary(typ) or pa.types.is_string(typ) or pa.types.is_large_string(typ):
        base = text
    elif pa.types.is_binary(typ) or pa.types.is_large_binary(typ):
        base = st.binary(max_size=6)
    elif pa.types.is_list(typ) or pa.types.is_large_list(typ):
        base = st.lists(arrow_values(typ.value_type), max_size=3)
    else:
        base = st.fixed_dictionaries({typ.field(i).name: arrow_values(typ.field(i).type)
                                      for i in range(typ.num_fields)})
    return st.none() | base


@given(st.data())
@settings(max_examples=300, deadline=None)
def test_arrow_values_equal_canonical_encode_of_each_element(data):
    typ = data.draw(arrow_types)
    items = data.draw(st.lists(arrow_values(typ), max_size=8))
    array = pa.array(items, typ)
    array = array.slice(data.draw(st.integers(0, len(items))))  # buffer offsets must not matter
    expected = [canonical_encode(v) for v in array.to_pylist()]
    assert encode_arrow_values(array).to_pylist() == expected
    assert encode_arrow_values(pa.chunked_array([array, array], typ)).to_pylist() == expected * 2


@pytest.mark.slow  # over 1.5 s: kept out of the fast tier, runs in the full suite
@given(st.data())
@settings(max_examples=200, deadline=None)
def test_arrow_rows_equal_canonical_encode_of_each_row(data):
    columns = data.draw(st.lists(st.tuples(text, arrow_types), min_size=1, max_size=4,
                                 unique_by=lambda c: c[0]))
    n = data.draw(st.integers(0, 6))
    table = pa.table({name: pa.array(data.draw(st.lists(arrow_values(typ), min_size=n, max_size=n)),
                                     typ) for name, typ in columns})
    expected = [canonical_encode(row) for row in table.to_pylist()]
    assert encode_arrow_rows(table) == expected
    assert encode_arrow_rows(pa.concat_tables([table, table])) == expected * 2


@pytest.mark.slow  # over 1.5 s: kept out of the fast tier, runs in the full suite
@given(st.data())
@settings(max_examples=200, deadline=None)
def test_arrow_rows_leave_out_null_optional_columns_exactly_like_canonical_encode(data):
    """``omit_null``: a column named there is left out of a row's mapping where it is null (the
    header counts fewer entries), per row, and takes part where it is not."""
    columns = data.draw(st.lists(st.tuples(text, arrow_types), min_size=1, max_size=5,
                                 unique_by=lambda c: c[0]))
    optional = data.draw(st.sets(st.sampled_from([name for name, _ in columns])))
    n = data.draw(st.integers(0, 6))
    table = pa.table({name: pa.array(data.draw(st.lists(arrow_values(typ), min_size=n, max_size=n)),
                                     typ) for name, typ in columns})
    table = table.slice(data.draw(st.integers(0, n)))  # buffer offsets must not matter
    expected = [canonical_encode({k: v for k, v in row.items() if not (k in optional and v is None)})
                for row in table.to_pylist()]
    assert encode_arrow_rows(table, omit_null=optional) == expected
    assert encode_arrow_rows(pa.concat_tables([table, table]), omit_null=optional) == expected * 2


def test_omitted_null_column_encodes_like_a_table_without_it():
    with_nulls = pa.table({"a": [1, 2, 3], "b": ["x", None, None], "c": pa.array([None] * 3, pa.string())})
    without = pa.table({"a": [1, 2, 3]})
    got = encode_arrow_rows(with_nulls, omit_null={"b", "c"})
    assert got[1:] == encode_arrow_rows(without)[1:]
    assert got[0] == canonical_encode({"a": 1, "b": "x"}) != encode_arrow_rows(without)[0]
    # Not named in omit_null: a null takes part as b"N", as before.
    assert encode_arrow_rows(with_nulls)[1] == canonical_encode({"a": 2, "b": None, "c": None})


def test_arrow_forms_fall_back_for_types_they_do_not_vectorise():
    big = pa.array([2**64 - 1, None, 0], pa.uint64())
    assert encode_arrow_values(big).to_pylist() == [canonical_encode(2**64 - 1), b"N",
                                                   canonical_encode(0)]
    assert encode_arrow_rows(pa.table({"u": big, "s": ["a", "b", None]})) == [
        canonical_encode({"u": 2**64 - 1, "s": "a"}), canonical_encode({"u": None, "s": "b"}),
        canonical_encode({"u": 0, "s": None})]
    empty = pa.array([{}, None], pa.struct([]))
    assert encode_arrow_values(empty).to_pylist() == [canonical_encode({}), b"N"]
    # A type canonical_encode refuses is refused here too, not encoded some other way.
    stamps = pa.array([datetime.datetime(2025, 1, 1)], pa.timestamp("us"))
    with pytest.raises(CanonicalEncodingError, match="unsupported type datetime"):
        encode_arrow_values(stamps)
    with pytest.raises(CanonicalEncodingError, match="unsupported type datetime"):
        encode_arrow_rows(pa.table({"ts": stamps}))
    assert encode_arrow_rows(pa.table({"x": pa.array([], pa.int64())})) == []


@given(st.lists(text, min_size=1, max_size=6, unique=True),
       st.lists(st.lists(flat_scalars, min_size=6, max_size=6), min_size=2, max_size=5),
       st.randoms(use_true_random=False))
@settings(max_examples=300, deadline=None)
def test_flat_fast_path_with_cached_key_shapes_is_byte_identical(keys, rows, rnd):
    """The same keys call after call (the cached shape), in any insertion order, with any values:
    the bytes of the general encoder every time."""
    for row in rows:
        order = list(keys)
        rnd.shuffle(order)
        mapping = {k: row[keys.index(k)] for k in order}
        assert encode_flat_mapping(mapping) == canonical_encode(mapping)
        assert canonical_encode_fast(mapping) == canonical_encode(mapping)


class _LooksLikeStr:
    """A key equal to (and hashing like) a str without being one: the cache must not be fooled."""

    def __init__(self, text: str) -> None:
        self.text = text

    def __eq__(self, other: object) -> bool:
        return other == self.text

    def __hash__(self) -> int:
        return hash(self.text)


def test_flat_fast_path_cache_is_not_fooled_by_keys_equal_to_a_cached_shape():
    assert encode_flat_mapping({"amount": 1.0}) == canonical_encode({"amount": 1.0})  # cached now
    impostor = {_LooksLikeStr("amount"): 1.0}
    assert encode_flat_mapping(impostor) is None
    with pytest.raises(CanonicalEncodingError):
        canonical_encode_fast(impostor)


@given(st.data())
@settings(max_examples=300, deadline=None)
def test_arrow_rows_with_constant_and_all_null_columns_equal_canonical_encode(data):
    """A column holding one value in every row (a file's model, producer, schema version ...) is
    encoded once; one that differs in a single element, or only in the sign of a zero or the
    payload of a NaN, or is null everywhere, must still give each row's own bytes."""
    columns = {}
    n = data.draw(st.integers(1, 7))
    for k in range(data.draw(st.integers(1, 4))):
        typ = data.draw(_leaf_types | st.builds(pa.list_, _leaf_types))
        value = data.draw(arrow_values(typ))
        items = [value] * n
        if data.draw(st.booleans()):  # one element differs (or is null)
            items[data.draw(st.integers(0, n - 1))] = data.draw(arrow_values(typ))
        columns[f"c{k}"] = pa.array(items, typ)
    if data.draw(st.booleans()):
        columns["z"] = pa.array([0.0] * (n - 1) + [-0.0])
        columns["nan"] = pa.array([float("nan")] * n)
    table = pa.table(columns)
    table = table.slice(data.draw(st.integers(0, n - 1)))  # buffer offsets must not matter
    expected = [canonical_encode(row) for row in table.to_pylist()]
    assert encode_arrow_rows(table) == expected
    assert encode_arrow_rows(table, prefix=b"\x00") == [b"\x00" + e for e in expected]


class _Ext(pa.ExtensionType):
    def __init__(self, storage: pa.DataType) -> None:
        super().__init__(storage, "tests.ext")

    def __arrow_ext_serialize__(self) -> bytes:
        return b""

    @classmethod
    def __arrow_ext_deserialize__(cls, storage, serialized):  # noqa: ANN001, ANN206
        return cls(storage)


def test_a_python_extension_type_column_still_encodes_row_by_row():
    """Such a type is not hashable: looking it up among the constant-checked types must not
    raise (found in review)."""
    for values in ([1, 2], [7, 7]):
        table = pa.table({"c": pa.ExtensionArray.from_storage(_Ext(pa.int64()), pa.array(values))})
        assert encode_arrow_rows(table) == [canonical_encode(row) for row in table.to_pylist()]


def test_a_constant_string_column_of_invalid_utf8_encodes_its_bytes_as_a_varying_one_does():
    """A string column read from a tampered file is not checked for UTF-8: constant or not, its
    bytes are encoded as they are (never an exception that only a constant column raises)."""
    def strings(data: bytes) -> pa.Array:
        return pa.Array.from_buffers(pa.string(), 2, [None, pa.py_buffer(np.array([0, 1, 2], np.int32).tobytes()),
                                                      pa.py_buffer(data)])

    same, different = encode_arrow_rows(pa.table({"c": strings(b"\xff\xff")})), \
        encode_arrow_rows(pa.table({"c": strings(b"\xff\xfe")}))
    assert same[0] == same[1] == different[0] != different[1]
    assert same[0].endswith(b"S" + (1).to_bytes(8, "big") + b"\xff")
