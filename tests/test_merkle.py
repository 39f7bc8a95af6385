"""RFC 6962/9162 Merkle trees: known answers, and property tests that the proof checkers accept
every genuine proof and nothing else."""

from __future__ import annotations

import datetime as dt
import hashlib

import pyarrow as pa
import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from serve_journal.integrity.encoding import canonical_encode
from serve_journal.integrity.merkle import (
    EMPTY_ROOT,
    _mth,
    consistency_proof,
    entry_inclusion_proof,
    entry_leaf,
    inclusion_proof,
    leaf_hash,
    merkle_root,
    node_hash,
    table_leaves,
    table_merkle_root,
    verify_consistency,
    verify_inclusion,
)

leaves_st = st.lists(st.binary(max_size=8), min_size=1, max_size=40)
hash_st = st.binary(min_size=32, max_size=32)


def test_hash_prefixes_and_small_trees_follow_rfc_6962():
    a, b, c = b"a", b"b", b"c"
    assert leaf_hash(a) == hashlib.sha256(b"\x00a").digest()
    assert node_hash(b"L" * 32, b"R" * 32) == hashlib.sha256(b"\x01" + b"L" * 32 + b"R" * 32).digest()
    assert merkle_root([]) == EMPTY_ROOT == hashlib.sha256(b"").digest()
    assert merkle_root([a]) == leaf_hash(a)
    # Three leaves split 2 + 1 (largest power of two below n on the left).
    assert merkle_root([a, b, c]) == node_hash(node_hash(leaf_hash(a), leaf_hash(b)), leaf_hash(c))


def test_rfc_6962_reference_vectors():
    # Test vectors of the reference implementation (certificate-transparency-go merkle tests).
    vectors = [bytes.fromhex(h) for h in
               ["", "00", "10", "2021", "3031", "40414243", "5051525354555657",
                "606162636465666768696a6b6c6d6e6f"]]
    roots = [
        "6e340b9cffb37a989ca544e6bb780a2c78901d3fb33738768511a30617afa01d",
        "fac54203e7cc696cf0dfcb42c92a1d9dbaf70ad9e621f4bd8d98662f00e3c125",
        "aeb6bcfe274b70a14fb067a5e5578264db0fa9b51af5e0ba159158f329e06e77",
        "d37ee418976dd95753c1c73862b9398fa2a2cf9b4ff0fdfe8b30cd95209614b7",
        "4e3bbb1f7b478dcfe71fb631631519a3bca12c9aefca1612bfce4c13a86264d4",
        "76e67dadbcdf1e10e1b74ddc608abd2f98dfb16fbce75277b5232a127f2087ef",
        "ddb89be403809e325750d3d263cd78929c2942b7942a34b77e122c9594a74c8c",
        "5dc9da79a70659a9ad559cb701ded9a2ab9d823aad2f4960cfe370eff4604328",
    ]
    for n, expected in enumerate(roots, start=1):
        assert merkle_root(vectors[:n]).hex() == expected


@settings(deadline=None)  # a shared 2-core machine: timing is not what is tested
@given(leaves_st)
def test_iterative_root_equals_recursive_definition(leaves):
    hashes = [leaf_hash(x) for x in leaves]
    assert merkle_root(leaves) == _mth(hashes, 0, len(hashes))


@settings(deadline=None)  # a shared 2-core machine: timing is not what is tested
@given(leaves_st, st.data())
def test_every_genuine_inclusion_proof_verifies(leaves, data):
    index = data.draw(st.integers(0, len(leaves) - 1))
    proof = inclusion_proof(leaves, index)
    assert verify_inclusion(leaves[index], index, len(leaves), proof, merkle_root(leaves))


def _mutations(proof: list[bytes], data) -> list[bytes]:
    kind = data.draw(st.sampled_from(["flip", "truncate", "extend", "swap", "replace", "drop"]))
    mutated = list(proof)
    if kind == "flip" and mutated:
        i = data.draw(st.integers(0, len(mutated) - 1))
        bit = data.draw(st.integers(0, 255))
        item = bytearray(mutated[i])
        item[bit // 8] ^= 1 << (bit % 8)
        mutated[i] = bytes(item)
    elif kind == "truncate" and mutated:
        mutated = mutated[: data.draw(st.integers(0, len(mutated) - 1))]
    elif kind == "extend":
        mutated = mutated + data.draw(st.lists(hash_st, min_size=1, max_size=3))
    elif kind == "swap" and len(mutated) >= 2:
        i, j = data.draw(st.lists(st.integers(0, len(mutated) - 1), min_size=2, max_size=2, unique=True))
        mutated[i], mutated[j] = mutated[j], mutated[i]
    elif kind == "replace" and mutated:
        mutated[data.draw(st.integers(0, len(mutated) - 1))] = data.draw(hash_st)
    elif kind == "drop" and mutated:
        del mutated[data.draw(st.integers(0, len(mutated) - 1))]
    return mutated


def _attack(genuine: list[bytes], data) -> list[bytes]:
    mode = data.draw(st.sampled_from(["genuine", "mutated", "random"]))
    if mode == "genuine":
        return genuine
    if mode == "mutated":
        return _mutations(genuine, data)
    return data.draw(st.lists(hash_st, max_size=8))


@settings(max_examples=300, deadline=None)
@given(leaves_st, st.data())
def test_adversarial_inclusion_proofs_are_never_accepted(leaves, data):
    n = len(leaves)
    index = data.draw(st.integers(0, n - 1))
    genuine = inclusion_proof(leaves, index)
    # An attacker picks any claim (index, size, leaf) and any proof; the root is the genuine root
    # of the first `size` leaves (or of an extension of the tree).
    extra = data.draw(st.lists(st.binary(max_size=8), max_size=5))
    full = leaves + extra
    claim_size = data.draw(st.integers(1, len(full)))
    claim_index = data.draw(st.one_of(st.just(index), st.integers(-2, claim_size + 2)))
    claim_leaf = data.draw(st.one_of(st.just(leaves[index]), st.binary(max_size=8)))
    proof = _attack(genuine, data)
    root = merkle_root(full[:claim_size])
    accepted = verify_inclusion(claim_leaf, claim_index, claim_size, proof, root)
    # Soundness: only a true claim with exactly the genuine proof is ever accepted.
    truth = (0 <= claim_index < claim_size and full[claim_index] == claim_leaf
             and proof == inclusion_proof(full[:claim_size], claim_index))
    assert accepted == truth


@settings(deadline=None)  # a shared 2-core machine: timing is not what is tested
@given(leaves_st, st.data())
def test_inclusion_rejects_random_roots_and_garbage(leaves, data):
    index = data.draw(st.integers(0, len(leaves) - 1))
    proof = inclusion_proof(leaves, index)
    root = data.draw(hash_st)
    assume(root != merkle_root(leaves))
    assert not verify_inclusion(leaves[index], index, len(leaves), proof, root)
    # Malformed inputs are rejected, not raised.
    assert not verify_inclusion(leaves[index], index, len(leaves), [*proof, b"short"], merkle_root(leaves))
    assert not verify_inclusion(leaves[index], index, 0, proof, merkle_root(leaves))


@settings(deadline=None)  # a shared 2-core machine: timing is not what is tested
@given(leaves_st, st.data())
def test_every_genuine_consistency_proof_verifies(leaves, data):
    old = data.draw(st.integers(0, len(leaves)))
    proof = consistency_proof(leaves, old)
    assert verify_consistency(old, len(leaves), merkle_root(leaves[:old]), merkle_root(leaves), proof)


@settings(max_examples=300, deadline=None)
@given(leaves_st, st.data())
def test_adversarial_consistency_proofs_are_never_accepted(leaves, data):
    n = len(leaves)
    old = data.draw(st.integers(1, n))
    genuine = consistency_proof(leaves, old)
    # The attacker's history: the same tree, or one whose old part was rewritten.
    rewritten = list(leaves)
    if data.draw(st.booleans()):
        i = data.draw(st.integers(0, n - 1))
        rewritten[i] = rewritten[i] + b"!"
    # Roots are the genuine roots of the claimed sizes (sizes are signed together with roots).
    claim_old = data.draw(st.one_of(st.just(old), st.integers(0, n)))
    claim_new = data.draw(st.one_of(st.just(n), st.integers(0, n)))
    proof = _attack(genuine, data)
    old_root = merkle_root(rewritten[:claim_old])
    new_root = merkle_root(leaves[:claim_new])
    accepted = verify_consistency(claim_old, claim_new, old_root, new_root, proof)
    truth = (claim_old <= claim_new and rewritten[:claim_old] == leaves[:claim_old]
             and proof == consistency_proof(leaves[:claim_new], claim_old))
    assert accepted == truth


def _row(**overrides):
    row = {"schema_version": 1, "request_id": "r-1",
           "ts": dt.datetime(2026, 1, 2, 3, 4, 5, 678901, tzinfo=dt.UTC), "seq": 7,
           "outputs": [{"label": "fraud", "score": 0.25}], "score": 0.25}
    row.update(overrides)
    return row


def test_entry_leaf_encodes_ts_as_integer_microseconds():
    row = _row()
    expected = dict(row, ts=1767323045678901)
    assert entry_leaf(row) == canonical_encode(expected)
    assert entry_leaf(dict(row, ts=1767323045678901)) == entry_leaf(row)
    assert entry_leaf(_row(score=0.26)) != entry_leaf(row)


def test_table_root_binds_every_row_and_the_order():
    rows = [_row(request_id=f"r-{i}", seq=i) for i in range(5)]
    schema = pa.schema([("schema_version", pa.int16()), ("request_id", pa.string()),
                        ("ts", pa.timestamp("us", tz="UTC")), ("seq", pa.int64()),
                        ("outputs", pa.list_(pa.struct([("label", pa.string()), ("score", pa.float64())]))),
                        ("score", pa.float64())])
    table = pa.Table.from_pylist(rows, schema=schema)
    assert table_leaves(table) == [entry_leaf(r) for r in rows]
    root = table_merkle_root(table)
    assert root == merkle_root([entry_leaf(r) for r in rows]).hex()
    assert table_merkle_root(table.take([1, 0, 2, 3, 4])) != root
    assert table_merkle_root(table.slice(0, 4)) != root
    proof = [bytes.fromhex(h) for h in entry_inclusion_proof(table, 3)]
    assert verify_inclusion(entry_leaf(rows[3]), 3, 5, proof, bytes.fromhex(root))
    assert not verify_inclusion(entry_leaf(rows[2]), 3, 5, proof, bytes.fromhex(root))


_OUT = pa.struct([("label", pa.string()), ("score", pa.float64())])
_FUZZ_SCHEMA = pa.schema([
    ("ts", pa.timestamp("us", tz="UTC")), ("schema_version", pa.int16()), ("seq", pa.int64()),
    ("name", pa.string()), ("score", pa.float64()), ("latency_ms", pa.float32()),
    ("flag", pa.bool_()), ("outputs", pa.list_(_OUT)), ("ünïcode key", pa.string()),
])
_floats = st.one_of(st.none(), st.floats(allow_nan=True, allow_infinity=True),
                    st.sampled_from([0.0, -0.0, float("nan")]))
_rows = st.fixed_dictionaries({
    "ts": st.datetimes(min_value=dt.datetime(1960, 1, 1), max_value=dt.datetime(2100, 1, 1),
                       timezones=st.just(dt.UTC)),
    "schema_version": st.integers(-(2**15), 2**15 - 1),
    "seq": st.one_of(st.none(), st.integers(-(2**63), 2**63 - 1)),
    "name": st.one_of(st.none(), st.text(max_size=6)),
    "score": _floats,
    "latency_ms": st.one_of(st.none(), st.floats(width=32)),
    "flag": st.one_of(st.none(), st.booleans()),
    "outputs": st.one_of(st.none(), st.lists(st.one_of(st.none(), st.fixed_dictionaries(
        {"label": st.one_of(st.none(), st.text(max_size=4)), "score": _floats})), max_size=3)),
    "ünïcode key": st.one_of(st.none(), st.text(max_size=3)),
})


@settings(max_examples=150, deadline=None)
@given(st.lists(_rows, max_size=12), st.data())
def test_columnwise_leaves_equal_row_by_row_canonical_encoding(rows, data):
    table = pa.Table.from_pylist(rows, schema=_FUZZ_SCHEMA)
    start = data.draw(st.integers(0, len(rows)))
    table = table.slice(start)  # offsets into buffers must not matter
    expected = [entry_leaf(row) for row in table.to_pylist()]
    assert table_leaves(table) == expected


def test_columnwise_leaves_on_journal_entries_and_chunked_tables():
    from tests.helpers.manifest_tables import make_table

    table = pa.concat_tables([make_table("p1", range(0, 5)), make_table("p2", range(3, 9))])
    assert table.column("seq").num_chunks == 2
    assert table_leaves(table) == [entry_leaf(row) for row in table.to_pylist()]


def test_leaves_are_encoded_in_row_chunks_with_the_same_root(monkeypatch):
    """A compacted file holds millions of ~1 KB entries, more than one Arrow binary array can
    (2 GiB): leaves are encoded a chunk of rows at a time, and the chunking changes nothing."""
    from serve_journal.integrity import merkle
    from tests.helpers.manifest_tables import make_table

    table = pa.concat_tables([make_table("p1", range(0, 23)), make_table("p2", range(0, 4))])
    whole = table_merkle_root(table)
    monkeypatch.setattr(merkle, "LEAF_CHUNK_ROWS", 5)
    assert table_merkle_root(table) == whole
    assert table_leaves(table) == [entry_leaf(row) for row in table.to_pylist()]


# -- schema versions: columns added after v1 ---------------------------------------------------

_MODEL = pa.struct([("name", pa.string()), ("version", pa.string()), ("run_id", pa.string()),
                    ("digest", pa.string()), ("role", pa.string())])
_V2_FUZZ_SCHEMA = pa.schema([*_FUZZ_SCHEMA, ("model_run_id", pa.string()),
                             ("model_digest", pa.string()), ("models", pa.list_(_MODEL))])
_models = st.one_of(st.none(), st.lists(st.one_of(st.none(), st.fixed_dictionaries(
    {k: st.one_of(st.none(), st.text(max_size=3))
     for k in ("name", "version", "run_id", "digest", "role")})), max_size=2))
_v2_rows = _rows.flatmap(lambda row: st.fixed_dictionaries({
    "model_run_id": st.one_of(st.none(), st.text(max_size=4)),
    "model_digest": st.one_of(st.none(), st.text(max_size=4)),
    "models": _models,
}).map(lambda added: {**row, **added}))


@pytest.mark.slow  # over 1.5 s: kept out of the fast tier, runs in the full suite
@settings(max_examples=150, deadline=None)
@given(st.lists(_v2_rows, max_size=12), st.data())
def test_columnwise_leaves_with_added_columns_null_and_set_mixed(rows, data):
    """Per row, a null added column is left out of the leaf and a set one takes part; the
    column-wise leaves equal entry_leaf row by row, and a row whose added columns are all null
    has exactly the leaf of the same row without those columns (its v1 form)."""
    table = pa.Table.from_pylist(rows, schema=_V2_FUZZ_SCHEMA)
    table = table.slice(data.draw(st.integers(0, len(rows))))
    pylist = table.to_pylist()
    leaves = table_leaves(table)
    assert leaves == [entry_leaf(row) for row in pylist]
    v1 = table_leaves(table.select(_FUZZ_SCHEMA.names))
    for row, leaf, old in zip(pylist, leaves, v1, strict=True):
        added = [row[k] for k in ("model_run_id", "model_digest", "models")]
        assert (leaf == old) == all(v is None for v in added)


def test_setting_or_clearing_an_added_column_changes_the_leaf():
    row = _row()
    base = entry_leaf(row)
    assert entry_leaf(dict(row, model_digest=None, models=None)) == base
    assert entry_leaf(dict(row, model_digest="sha256:" + "00" * 32)) != base
    assert entry_leaf(dict(row, model_digest="")) != base  # empty is a value, not null
    assert entry_leaf(dict(row, models=[])) != base
    assert entry_leaf(dict(row, score=None)) != entry_leaf(row)  # a v1 column's null takes part
