"""forget(): crypto-shredding with receipts and hooks, over real Parquet journal files; canary scan."""

from __future__ import annotations

import dataclasses
import datetime as dt
import json
import logging
import os

import pyarrow as pa
import pytest

from serve_journal.catalog import commit, is_derived, marker_path
from serve_journal.catalog.layout import COLD, DEFAULT_SPEC, HOT
from serve_journal.errors import TokenFormatError
from serve_journal.fileformat import encode_parquet
from serve_journal.integrity.encoding import canonical_encode
from serve_journal.integrity.fingerprint import fingerprint
from serve_journal.privacy.forget import (
    ForgetEvent,
    ForgetIncompleteError,
    ForgetReceipt,
    count_subject_entries,
    forget,
    forget_subject,
)
from serve_journal.privacy.keyring import Keyring
from serve_journal.privacy.subjects import VaultPseudonymizer, VerifyStatus
from serve_journal.privacy.vault import SubjectVault
from serve_journal.schema import ENTRY_SCHEMA
from serve_journal.storage import LocalJournalStorage

TS = dt.datetime(2025, 3, 4, 10, 30, tzinfo=dt.UTC)


def journal_table(pseudonymizer: VaultPseudonymizer, requests: list[tuple[str | None, dict, str, str]],
                  ) -> pa.Table:
    """Entries as the flusher would build them: only tokens and HMACs, never the raw values."""
    protected = pseudonymizer.protect([r[0] for r in requests],
                                      [canonical_encode(r[1]) for r in requests])
    rows = []
    for i, ((_, _, model, version), p) in enumerate(zip(requests, protected, strict=True)):
        rows.append({
            "schema_version": 1, "request_id": f"req-{i}", "ts": TS, "caller": "svc",
            "subject_token": p.subject_token, "model_name": model, "model_version": version,
            "dataset_hash": None, "dataset_hash_source": "none", "features_hmac": p.features_hmac,
            "key_id": p.key_id, "outputs": [{"label": "fraud", "score": 0.9}], "score": 0.9,
            "threshold": 0.5, "decision": "block", "explanation_ref": None, "outcome": "ok",
            "error_type": None, "latency_ms": 1.5, "risk_tier": "high", "sample_rate": 1.0,
            "producer_id": "p1", "seq": i, "app_name": "app", "deployment": "d", "replica": "r1",
        })
    return pa.Table.from_pylist(rows, schema=ENTRY_SCHEMA)


def write_journal(storage: LocalJournalStorage, table: pa.Table, tier: str, name: str) -> None:
    """Write ``table`` as a data file; a derived file (cold, or ``c-*``) is committed with a
    marker, as lifecycle and compaction do, so the catalog shows it to readers."""
    key = DEFAULT_SPEC.key_for(table["model_name"][0].as_py(), TS)
    path = DEFAULT_SPEC.file_path(key, name, tier)
    storage.put_new(path, encode_parquet(table))
    if is_derived(path):
        commit(storage, kind="lifecycle", path=marker_path(key, tier, name), new_files=[path],
               replaces=[], expected=fingerprint(table), signer=None)


@pytest.fixture
def world(tmp_path, monkeypatch):
    monkeypatch.delenv("SERVE_JOURNAL_KEK", raising=False)
    privacy = tmp_path / "privacy"
    ring = Keyring.local_default(privacy)
    vault = SubjectVault.local_default(privacy, ring)
    pseudonymizer = VaultPseudonymizer(ring, vault)
    storage = LocalJournalStorage(str(tmp_path / "journal"))
    yield tmp_path, privacy, ring, vault, pseudonymizer, storage
    vault.close()


def test_forget_counts_entries_calls_hooks_and_writes_a_clean_receipt(world):
    tmp_path, _, ring, vault, pseudonymizer, storage = world
    hot = journal_table(pseudonymizer, [
        ("alice", {"amount": 10}, "fraud", "3"), ("alice", {"amount": 11}, "fraud", "4"),
        ("bob", {"amount": 12}, "fraud", "4"), (None, {"amount": 13}, "fraud", "4"),
    ])
    cold = journal_table(pseudonymizer, [
        ("alice", {"amount": 14}, "fraud", "3"), ("bob", {"amount": 15}, "fraud", "3"),
    ])
    write_journal(storage, hot, HOT, "f-hot")
    write_journal(storage, cold, COLD, "f-cold")
    alice_token = pseudonymizer.token_for("alice")
    bob_token = pseudonymizer.token_for("bob")
    assert count_subject_entries(storage, bob_token) == (2, [("fraud", "3"), ("fraud", "4")])

    purged: list[str] = []
    events: list[ForgetEvent] = []
    receipt = forget("alice", vault=vault, keyring=ring, journal_storage=storage,
                     purge_hook=purged.append, forget_hook=events.append)

    assert receipt.status == "shredded" and receipt.complete
    assert receipt.entries_unlinkable == 3
    assert receipt.model_versions == [{"model_name": "fraud", "model_version": "3"},
                                      {"model_name": "fraud", "model_version": "4"}]
    assert receipt.hooks == {"purge": "ok", "forget": "ok"}
    assert purged == ["alice"]
    [event] = events
    assert event.subject_token == alice_token
    assert event.model_versions == (("fraud", "3"), ("fraud", "4"))
    assert event.subject_key_ref == receipt.subject_key_ref
    # the receipt file: under <root>/_receipts/, no raw id, no token
    assert receipt.path.startswith("_receipts/") and receipt.path.endswith(".json")
    raw = storage.read(receipt.path)
    doc = json.loads(raw)
    assert doc["subject_key_ref"].startswith("sk-") and doc["entries_unlinkable"] == 3
    assert b"alice" not in raw and alice_token.encode() not in raw
    # afterwards: lookups return nothing, reproduction reports shredded, others unchanged
    assert pseudonymizer.token_for("alice") is None
    pseudonymizer.refresh_invalidations()
    row = hot.to_pylist()[0]
    assert pseudonymizer.verify_features(canonical_encode({"amount": 10}), row["key_id"],
                                         row["features_hmac"], subject_token=row["subject_token"]
                                         ) is VerifyStatus.SHREDDED
    assert pseudonymizer.token_for("bob") == bob_token
    assert count_subject_entries(storage, bob_token) == (2, [("fraud", "3"), ("fraud", "4")])
    assert count_subject_entries(storage, alice_token)[0] == 3  # files untouched: append-only
    anon = hot.to_pylist()[3]
    assert pseudonymizer.verify_features(canonical_encode({"amount": 13}), anon["key_id"],
                                         anon["features_hmac"]) is VerifyStatus.VERIFIED


def test_forget_unknown_subject_writes_no_key_receipt(world):
    tmp_path, _, ring, vault, _, storage = world
    purged: list[str] = []
    receipt = forget("nobody", vault=vault, journal_storage=storage, purge_hook=purged.append)
    assert receipt.status == "no_key" and receipt.subject_key_ref is None
    assert receipt.entries_unlinkable == 0 and purged == ["nobody"]  # the feature store may hold data
    assert receipt.hooks["forget"] == "not_configured"
    assert storage.exists(receipt.path)


def test_failing_hook_still_shreds_and_reports(world, caplog):
    tmp_path, _, ring, vault, pseudonymizer, storage = world
    pseudonymizer.protect(["carol"], [None])

    def purge(subject_id: str) -> None:
        raise ConnectionError(f"feature store down while purging {subject_id}")

    caplog.set_level(logging.DEBUG)
    with pytest.raises(ForgetIncompleteError, match=r"\['purge'\] failed") as info:
        forget("carol", vault=vault, journal_storage=storage, purge_hook=purge)
    receipt = info.value.receipt
    assert receipt.hooks == {"purge": "failed:ConnectionError", "forget": "not_configured"}
    assert pseudonymizer.token_for("carol") is None
    assert storage.exists(receipt.path)
    assert "carol" not in caplog.text and "carol" not in str(info.value)


def test_forget_needs_somewhere_to_write_the_receipt(world):
    _, _, ring, vault, _, _ = world
    with pytest.raises(ValueError, match="journal_storage or receipts_dir"):
        forget("x", vault=vault)


def test_forget_subject_is_what_the_cli_calls(world):
    tmp_path, privacy, ring, vault, pseudonymizer, storage = world
    table = journal_table(pseudonymizer, [("dave", {"a": 1}, "m", "1")] * 2)
    write_journal(storage, table, HOT, "f1")
    receipt = forget_subject("dave", journal_uri=str(tmp_path / "journal"), privacy_dir=privacy)
    assert receipt.entries_unlinkable == 2 and receipt.status == "shredded"
    assert pseudonymizer.token_for("dave") is None


CANARY_SUBJECT = "canary-subject-4711"
CANARY_NUMERIC = "987123"
CANARY_FEATURE = "canary-feature-0815"


def _forms(text: str) -> list[bytes]:
    raw = text.encode()
    return [raw, text.encode("utf-16-le"), text.encode("utf-16-be"), raw.hex().encode()]


def test_canary_scan_over_every_byte_written(world, caplog):
    tmp_path, privacy, ring, vault, pseudonymizer, storage = world
    caplog.set_level(logging.DEBUG)
    features = {"note": CANARY_FEATURE, "amount": 42.0, "tags": [CANARY_FEATURE]}
    # a second replica over the same files, as in production
    replica2 = VaultPseudonymizer(Keyring.local_default(privacy),
                                  SubjectVault.local_default(privacy, Keyring.local_default(privacy)))
    hot = journal_table(pseudonymizer, [(CANARY_SUBJECT, features, "fraud", "1"),
                                        (CANARY_NUMERIC, features, "fraud", "1"),
                                        (None, features, "fraud", "1")])
    cold = journal_table(replica2, [(CANARY_SUBJECT, features, "fraud", "2")])
    write_journal(storage, hot, HOT, "c-hot")
    write_journal(storage, cold, COLD, "c-cold")
    ring.rotate()
    receipt = forget(CANARY_SUBJECT, vault=vault, journal_storage=storage,
                     purge_hook=lambda s: None, forget_hook=lambda e: None)
    assert receipt.entries_unlinkable == 2
    replica2.refresh_invalidations()
    replica2.protect([CANARY_SUBJECT, CANARY_NUMERIC], [canonical_encode(features)] * 2)
    vault.close()
    replica2.vault.close()

    written = [os.path.join(d, f) for d, _, files in os.walk(tmp_path) for f in files]
    names = {os.path.relpath(p, tmp_path) for p in written}
    assert {"privacy/vault.sqlite3", "privacy/keys/keyring.json", "privacy/keys/kek"} <= names
    assert any(n.startswith("journal/_receipts/") for n in names)
    assert sum(n.endswith(".parquet") for n in names) == 2
    hits = []
    for path in written:
        with open(path, "rb") as handle:
            data = handle.read()
        for canary in (CANARY_SUBJECT, CANARY_NUMERIC, CANARY_FEATURE):
            if any(form in data for form in _forms(canary)):
                hits.append((os.path.relpath(path, tmp_path), canary))
    assert hits == []
    for canary in (CANARY_SUBJECT, CANARY_NUMERIC, CANARY_FEATURE):
        assert canary not in caplog.text


def test_forget_counts_through_the_catalog_so_a_compacted_entry_counts_once(world):
    """A compaction committed but its inputs not yet deleted (retention keeps them): the inputs
    and the compacted file hold the same entries; the catalog shows each once."""
    _, _, _, _, pseudonymizer, storage = world
    first = journal_table(pseudonymizer, [("alice", {"amount": 1}, "fraud", "3")])
    second = journal_table(pseudonymizer, [("alice", {"amount": 2}, "fraud", "3")])
    write_journal(storage, first, HOT, "w-1")
    write_journal(storage, second, HOT, "w-2")
    key = DEFAULT_SPEC.key_for("fraud", TS)
    inputs = [DEFAULT_SPEC.file_path(key, n, HOT) for n in ("w-1", "w-2")]
    merged = pa.concat_tables([first, second])
    compacted = DEFAULT_SPEC.file_path(key, "c-merged", HOT)
    storage.put_new(compacted, encode_parquet(merged))
    commit(storage, kind="compaction", path=marker_path(key, HOT, "c-merged"),
           new_files=[compacted], replaces=inputs, expected=fingerprint(merged), signer=None)
    assert all(storage.exists(p) for p in inputs)  # still there, as retention would keep them
    assert count_subject_entries(storage, pseudonymizer.token_for("alice")) == (2, [("fraud", "3")])


def test_an_unreadable_journal_never_blocks_the_erasure(world):
    """Someone drops a file the catalog cannot place: counting fails, the key is shredded anyway
    and the receipt says the count is unknown."""
    _, _, _, vault, pseudonymizer, storage = world
    write_journal(storage, journal_table(pseudonymizer, [("alice", {"amount": 1}, "fraud", "3")]),
                  HOT, "w-1")
    storage.put_new("hot/stray.parquet", b"not a partition path")
    receipt = forget("alice", vault=vault, journal_storage=storage)
    assert receipt.status == "shredded" and receipt.entries_unlinkable is None
    assert vault.get_many(["alice"]) == {} or vault.get_many(["alice"]).get("alice") is None


def test_count_subject_entries_refuses_what_is_not_a_token(tmp_path):
    storage = LocalJournalStorage(str(tmp_path / "journal"))
    for bad in ("alice", "A" * 32, "0" * 31, None):
        with pytest.raises(TokenFormatError, match="^subject_token must be a subject token") as info:
            count_subject_entries(storage, bad)
        assert "alice" not in str(info.value)
    assert count_subject_entries(storage, "0" * 32) == (0, [])


def test_cli_forget_reads_subject_ids_from_stdin(tmp_path, monkeypatch):
    from click.testing import CliRunner

    from serve_journal import cli

    forgotten: list[str] = []

    def fake_forget(subject_id: str, **options) -> ForgetReceipt:
        forgotten.append(subject_id)
        receipt = ForgetReceipt(f"r-{len(forgotten)}", "2025-03-04T00:00:00", "k", "shredded", 0,
                                [], hooks={"purge": "ok", "forget": "not_configured"})
        if subject_id == "carol":
            raise ForgetIncompleteError(dataclasses.replace(
                receipt, hooks={"purge": "failed:OSError", "forget": "not_configured"}))
        return receipt

    monkeypatch.setattr(cli, "forget_subject", fake_forget)
    runner = CliRunner()
    journal = str(tmp_path / "journal")
    result = runner.invoke(cli.main, ["forget", "--journal", journal, "--subject", "-"],
                           input="alice\nbob\n")
    assert result.exit_code == 0, result.output
    assert forgotten == ["alice", "bob"] and "alice" not in result.output
    result = runner.invoke(cli.main, ["forget", "--journal", journal, "--subject", "-"],
                           input="carol\ndave\n")
    assert result.exit_code == 2 and forgotten[2:] == ["carol", "dave"]  # every id is tried
    assert runner.invoke(cli.main, ["forget", "--journal", journal, "--subject", "-"],
                         input="").exit_code == 2
