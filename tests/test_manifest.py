"""Manifest records, hash-chained logs, signed checkpoints and the signing key, on a real local
journal directory."""

from __future__ import annotations

import json
import os
import pickle
import stat

import pytest

from serve_journal.fileformat import decode_parquet, encode_parquet
from serve_journal.integrity.manifest import (
    GENESIS_HASH,
    ChainConflictError,
    Checkpoint,
    ManifestLog,
    ManifestRecord,
    ManifestSigner,
    build_file_record,
    checkpoint_path,
    load_public_key,
    record_path,
)
from serve_journal.integrity.merkle import table_merkle_root
from serve_journal.storage import LocalJournalStorage
from tests.helpers.manifest_tables import BASE_TS, data_path, make_table


@pytest.fixture
def storage(tmp_path):
    return LocalJournalStorage(str(tmp_path / "journal"))


def test_file_record_matches_the_encoded_file(storage):
    table = make_table("p1", [5, 3, 4, 9, 10, 0])
    data = encode_parquet(table)
    stored = storage.put_new(data_path("f1"), data)
    record = build_file_record(stored, table, "hot", "w1")
    assert (record.path, record.sha256, record.size, record.row_count) == (
        stored.path, stored.sha256, len(data), 6)
    # The root is over the file's rows in file order, whatever order the writer held them in.
    assert record.merkle_root == table_merkle_root(decode_parquet(storage.read(stored.path)))
    assert record.seq_ranges == {"p1": [[0, 0], [3, 5], [9, 10]]}
    assert record.min_ts_us == int(BASE_TS.timestamp() * 1_000_000)
    assert record.max_ts_us == record.min_ts_us + 100_000
    assert record.model == "fraud"


def test_chain_links_records_and_recovers_its_head_after_restart(storage):
    log = ManifestLog(storage, "writer-1")
    first = log.append(_record("a"))
    second = log.append(_record("b"))
    assert (first.index, first.prev_hash) == (0, GENESIS_HASH)
    assert (second.index, second.prev_hash) == (1, first.record_hash)
    stored = ManifestRecord.from_json(storage.read(record_path("writer-1", 1)))
    assert stored == second and stored.record_hash == stored.compute_hash()

    restarted = ManifestLog(storage, "writer-1")
    assert (restarted.length, restarted.head_hash) == (2, second.record_hash)
    third = restarted.append(_record("c"))
    assert (third.index, third.prev_hash) == (2, second.record_hash)
    # The old instance's head is stale: its next create collides and is refused, not overwritten.
    with pytest.raises(ChainConflictError, match="writer-1"):
        log.append(_record("d"))
    assert ManifestRecord.from_json(storage.read(record_path("writer-1", 2))) == third


def test_record_hash_covers_every_field():
    record = _record("a")
    changed = [
        ManifestRecord(**{**record.to_dict(), name: value})
        for name, value in [("row_count", 11), ("sha256", "1" * 64), ("merkle_root", "2" * 64),
                            ("seq_ranges", {"p": [[0, 11]]}), ("version_id", "v2"),
                            ("replaces", ["x"]), ("tier", "cold")]
    ]
    hashes = {record.compute_hash(), *(r.compute_hash() for r in changed)}
    assert len(hashes) == len(changed) + 1


def test_checked_parse_agrees_with_the_record_methods():
    """Verify parses each record once (``from_json_checked``); it must judge exactly as
    ``to_json`` (canonical bytes) and ``compute_hash`` do."""
    import dataclasses
    import json

    from serve_journal.integrity.manifest import canonical_json

    record = _record("a")
    record = dataclasses.replace(record, record_hash=record.compute_hash())
    doc = record.to_dict()
    variants = {
        "genuine": record.to_json(),
        "pretty": json.dumps(doc, indent=1).encode(),
        "extra-field": canonical_json({**doc, "note": "x"}),
        "missing-default": canonical_json({k: v for k, v in doc.items() if k != "format"}),
        "edited": canonical_json({**doc, "row_count": doc["row_count"] + 1}),
    }
    for name, data in variants.items():
        parsed, canonical, hash_ok = ManifestRecord.from_json_checked(data)
        assert canonical == (data == parsed.to_json()), name
        assert hash_ok == (parsed.record_hash == parsed.compute_hash()), name
    assert ManifestRecord.from_json_checked(variants["genuine"])[1:] == (True, True)


def test_chain_id_must_be_one_path_segment(storage):
    for bad in ("../x", "a/b", "", "."):
        with pytest.raises(ValueError, match="chain_id"):
            ManifestLog(storage, bad)


def test_checkpoint_is_signed_and_copied_to_the_witness(storage, tmp_path):
    witness = LocalJournalStorage(str(tmp_path / "witness"))
    signer = ManifestSigner.generate()
    log = ManifestLog(storage, "w1", signer, witness)
    log.append(_record("a"))
    head = log.append(_record("b"))
    checkpoint = log.checkpoint()
    assert checkpoint is not None
    assert (checkpoint.length, checkpoint.head_hash, checkpoint.key_id) == (2, head.record_hash, signer.key_id)
    path = checkpoint_path("w1", 2)
    assert storage.read(path) == witness.read(path) == checkpoint.to_json()
    loaded = Checkpoint.from_json(witness.read(path))
    assert loaded.verify(load_public_key(signer.export_public_key()))
    assert not loaded.verify(ManifestSigner.generate().public_key)
    forged = Checkpoint(**{**json.loads(loaded.to_json()), "length": 1})
    assert not forged.verify(signer.public_key)
    assert log.checkpoint() is None  # nothing new to sign
    log.append(_record("c"))
    assert log.checkpoint().length == 3
    assert ManifestLog(storage, "w1", signer).checkpoint() is None  # restart knows it is signed


def test_signer_key_file_is_private_and_never_shown(tmp_path):
    keys = tmp_path / "keys"
    signer = ManifestSigner.load_or_generate(keys)
    path = keys / "manifest-signing.pem"
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    again = ManifestSigner.load_or_generate(keys)
    assert again.key_id == signer.key_id
    pem = path.read_bytes()
    assert b"PRIVATE KEY" in pem
    body = pem.decode().splitlines()[1]
    for text in (repr(signer), str(signer)):
        assert body not in text and "PRIVATE" not in text and signer.key_id in text
    with pytest.raises(TypeError, match="not picklable"):
        pickle.dumps(signer)
    os.chmod(path, 0o644)
    with pytest.raises(PermissionError, match="0600"):
        ManifestSigner.from_pem_file(path)
    exported = signer.export_public_key()
    assert exported.startswith(b"-----BEGIN PUBLIC KEY-----")
    assert load_public_key(exported).public_bytes_raw() == signer.public_key.public_bytes_raw()
    (tmp_path / "pub.pem").write_bytes(exported)
    assert load_public_key(str(tmp_path / "pub.pem")).public_bytes_raw() == signer.public_key.public_bytes_raw()


def _record(name: str) -> ManifestRecord:
    return ManifestRecord(
        path=data_path(name), sha256="0" * 64, size=10, row_count=10, min_ts_us=1, max_ts_us=2,
        seq_ranges={"p": [[0, 9]]}, merkle_root="f" * 64, tier="hot",
    )
