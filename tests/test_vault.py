"""Subject key vault: one suite, run against a SQLite file and a real PostgreSQL server."""

from __future__ import annotations

import multiprocessing
import os
import pickle
import random
import secrets
import stat
import time

import pytest

from serve_journal.privacy.keyring import FileKek, Keyring
from serve_journal.privacy.vault import (
    MAX_KEY_AGE_S,
    MIN_TOMBSTONE_AGE_S,
    SubjectVault,
    VaultError,
)


@pytest.fixture
def ring(tmp_path) -> Keyring:
    return Keyring(tmp_path / "keys" / "ring.json", FileKek.create(_mkdir(tmp_path / "keys") / "kek"))


def _mkdir(path):
    path.mkdir(parents=True, exist_ok=True)
    return path


@pytest.fixture(params=["sqlite", "postgres"])
def make_vault(request, tmp_path):
    """Factory of vaults sharing one store (same file / same tables) for this test."""
    namespace = "t" + secrets.token_hex(6)
    opened: list[SubjectVault] = []

    if request.param == "sqlite":
        def make(keyring: Keyring) -> SubjectVault:
            vault = SubjectVault.sqlite(tmp_path / "vault.sqlite3", keyring, namespace=namespace)
            opened.append(vault)
            return vault
    else:
        dsn = request.getfixturevalue("postgres_dsn")

        def make(keyring: Keyring) -> SubjectVault:
            vault = SubjectVault.postgres(dsn, keyring, namespace=namespace)
            opened.append(vault)
            return vault

    make.kind = request.param
    yield make
    for vault in opened:
        vault.close()


def test_get_or_create_then_get(make_vault, ring):
    vault = make_vault(ring)
    ids = [f"{i:06d}" for i in range(50)]
    assert vault.get_many(ids) == {}
    assert vault.count() == 0
    created = vault.get_or_create_many(ids)
    assert set(created) == set(ids) and vault.count() == 50
    assert len({k.key for k in created.values()}) == 50
    assert len({k.key_ref for k in created.values()}) == 50
    assert all(len(k.key) == 32 and k.key_ref.startswith("sk-") for k in created.values())
    # a second call and a plain get see the same keys, without creating any
    again = vault.get_or_create_many(ids + ids[:5])
    assert {s: k.key for s, k in again.items()} == {s: k.key for s, k in created.items()}
    assert {s: k.key for s, k in vault.get_many(ids[:10] + ["never"]).items()} == {
        s: created[s].key for s in ids[:10]}
    assert vault.count() == 50
    # lookup by the token journal entries carry
    tokens = {created[s].token: s for s in ids[:3]}
    assert {t: k.key for t, k in vault.get_by_tokens(list(tokens) + ["0" * 32]).items()} == {
        t: created[s].key for t, s in tokens.items()}


def test_repr_shows_no_key(make_vault, ring):
    vault = make_vault(ring)
    key = vault.get_or_create_many(["alice"])["alice"]
    assert key.key.hex() not in repr(key) and "alice" not in repr(key)
    assert key.key_ref in repr(key)


def test_another_process_view_shares_keys(make_vault, ring, tmp_path):
    vault = make_vault(ring)
    other = make_vault(Keyring(ring.path, FileKek(ring.kek.path)))
    a = vault.get_or_create_many(["x", "y"])
    b = other.get_or_create_many(["y", "z"])
    assert a["y"].key == b["y"].key
    assert vault.get_many(["z"])["z"].key == b["z"].key


def test_forget_deletes_key_records_tombstone_and_recreates_fresh(make_vault, ring):
    vault = make_vault(ring)
    cursor = vault.latest_cursor()
    keys = vault.get_or_create_many(["a", "b", "c"])
    assert vault.forget("b") == keys["b"].key_ref
    assert vault.get_many(["a", "b", "c"]).keys() == {"a", "c"}
    assert vault.get_by_tokens([keys["b"].token]) == {}
    # the tombstone holds a tag derived from the destroyed key, not the blind index
    tags, new_cursor = vault.changes_since(cursor)
    assert tags == [keys["b"].tombstone_tag] and new_cursor > cursor
    assert vault.blind_index("b") not in tags and len(tags[0]) == 16
    assert vault.changes_since(new_cursor) == ([], new_cursor)
    # forgetting a subject without a key is harmless; there is nothing to tombstone
    assert vault.forget("never-seen") is None
    assert vault.changes_since(new_cursor) == ([], new_cursor)
    # the subject comes back: a new, different key
    fresh = vault.get_or_create_many(["b"])["b"]
    assert fresh.key != keys["b"].key and fresh.token != keys["b"].token
    assert fresh.tombstone_tag != keys["b"].tombstone_tag
    assert vault.get_many(["a"])["a"].key == keys["a"].key
    assert vault.prune_tombstones(older_than_s=3600) == 0
    assert vault.changes_since(cursor)[0] == tags


def test_pruning_keeps_tombstones_younger_than_the_key_age_bound(make_vault, ring):
    vault = make_vault(ring)
    vault.get_or_create_many(["p1", "p2"])
    forgotten_at = time.time()
    vault.forget("p1")
    # however short the caller's retention, a tombstone younger than the bound stays
    assert vault.prune_tombstones(older_than_s=-1) == 0
    assert vault.prune_tombstones(older_than_s=0, now=forgotten_at + MIN_TOMBSTONE_AGE_S - 5) == 0
    assert len(vault.changes_since(0)[0]) == 1
    assert MIN_TOMBSTONE_AGE_S >= MAX_KEY_AGE_S + 30
    # past the bound plus margin, it goes
    assert vault.prune_tombstones(older_than_s=0, now=forgotten_at + MIN_TOMBSTONE_AGE_S + 5) == 1
    assert vault.changes_since(0)[0] == []


def test_vault_rows_hold_no_raw_id_and_need_the_keyring(make_vault, ring, tmp_path):
    vault = make_vault(ring)
    vault.get_or_create_many(["subject-123456"])
    stranger = Keyring(tmp_path / "other" / "ring.json",
                       FileKek.create(_mkdir(tmp_path / "other") / "kek"))
    other = make_vault(stranger)
    # another keyring has another index key: it cannot even find the row
    assert other.get_many(["subject-123456"]) == {}
    # and cannot unwrap it when found by token
    token = vault.get_many(["subject-123456"])["subject-123456"].token
    with pytest.raises(VaultError, match="does not unwrap") as info:
        other.get_by_tokens([token])
    assert "subject-123456" not in str(info.value)


def test_pickle_carries_configuration_only(make_vault, ring):
    vault = make_vault(ring)
    key = vault.get_or_create_many(["p"])["p"]
    blob = pickle.dumps(vault)
    assert key.key not in blob and key.key.hex().encode() not in blob
    clone = pickle.loads(blob)
    try:
        assert clone.get_many(["p"])["p"].key == key.key
    finally:
        clone.close()


def test_sqlite_file_is_private_and_in_wal_mode(tmp_path, ring):
    vault = SubjectVault.local_default(tmp_path / "privacy", ring)
    vault.get_or_create_many(["q"])
    path = tmp_path / "privacy" / "vault.sqlite3"
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert (tmp_path / "privacy" / "vault.sqlite3-wal").exists()
    conn = vault._backend._connection()
    assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    assert conn.execute("PRAGMA secure_delete").fetchone()[0] == 1
    vault.close()


def test_postgres_dsn_password_is_masked_and_not_pickled(ring):
    with pytest.raises(VaultError, match=r"postgresql://u:\*\*\*@127.0.0.1:1/db") as info:
        SubjectVault.postgres("postgresql://u:hunter2@127.0.0.1:1/db?connect_timeout=2", ring)
    assert "hunter2" not in str(info.value)


def _race_worker(vault_blob: bytes, ids: list[str], seed: int, barrier) -> dict[str, tuple[str, str]]:
    vault = pickle.loads(vault_blob)
    order = list(ids)
    random.Random(seed).shuffle(order)
    barrier.wait(timeout=120)
    out = {}
    for start in range(0, len(order), 40):  # several batches, interleaving with the others
        for subject, key in vault.get_or_create_many(order[start:start + 40]).items():
            out[subject] = (key.key_ref, key.key.hex())
    vault.close()
    return out


@pytest.mark.slow  # over 1.5 s: kept out of the fast tier, runs in the full suite
def test_processes_racing_on_new_subjects_agree_on_one_key_each(make_vault, ring):
    vault = make_vault(ring)
    ids = [f"race-{i}" for i in range(200)]
    blob = pickle.dumps(vault)
    processes = 4
    ctx = multiprocessing.get_context("spawn")
    with ctx.Manager() as manager:
        barrier = manager.Barrier(processes)
        with ctx.Pool(processes) as pool:
            results = pool.starmap(_race_worker, [(blob, ids, seed, barrier) for seed in range(processes)])
    assert all(result == results[0] for result in results[1:])
    assert set(results[0]) == set(ids)
    assert vault.count() == 200
    assert {s: k.key.hex() for s, k in vault.get_many(ids).items()} == {
        s: v[1] for s, v in results[0].items()}


def _forget_worker(vault_blob: bytes, subject: str, barrier) -> str | None:
    vault = pickle.loads(vault_blob)
    barrier.wait(timeout=120)
    try:
        return vault.forget(subject)
    finally:
        vault.close()


@pytest.mark.slow  # over 1.5 s: kept out of the fast tier, runs in the full suite
def test_concurrent_forgets_destroy_once_and_tombstone_in_order(make_vault, ring):
    vault = make_vault(ring)
    cursor = vault.latest_cursor()
    subjects = [f"f-{i}" for i in range(6)]
    keys = vault.get_or_create_many(subjects)
    blob = pickle.dumps(vault)
    ctx = multiprocessing.get_context("spawn")
    with ctx.Manager() as manager:
        barrier = manager.Barrier(len(subjects) + 2)
        args = [(blob, s, barrier) for s in subjects] + [(blob, subjects[0], barrier)] * 2
        with ctx.Pool(len(args)) as pool:
            refs = pool.starmap(_forget_worker, args)
    # the first subject was forgotten three times at once: exactly one call destroyed its key
    assert sorted(r for r in refs if r is not None) == sorted(k.key_ref for k in keys.values())
    assert vault.count() == 0
    tags, _ = vault.changes_since(cursor)
    assert sorted(tags) == sorted(k.tombstone_tag for k in keys.values())  # one per destroyed key


def test_namespace_is_validated(tmp_path, ring):
    with pytest.raises(ValueError, match="namespace must match"):
        SubjectVault.sqlite(tmp_path / "v.sqlite3", ring, namespace="x; DROP TABLE y")


def test_open_by_url(tmp_path, ring):
    vault = SubjectVault.open(f"sqlite://{tmp_path}/u.sqlite3", ring)
    assert "sqlite" in repr(vault) and os.path.exists(tmp_path / "u.sqlite3")
    vault.close()


def test_a_batch_naming_one_subject_as_int_and_as_str_gets_the_key_under_both(make_vault, ring):
    """7 and "7" are one subject (the same blind index): a batch holding both gets that one key
    under each spelling, so a caller's look-up finds both (it raised KeyError for the spelling
    the vault did not echo back; the finalizer passes ``str`` ids and never met it)."""
    vault = make_vault(ring)
    created = vault.get_or_create_many([7, "7", "8"])
    assert set(created) == {7, "7", "8"} and vault.count() == 2
    assert created[7].key == created["7"].key != created["8"].key
    found = vault.get_many(["7", 7, 8])
    assert set(found) == {"7", 7, 8} and found[7].key == created[7].key


def test_the_finalizers_batch_with_one_subject_spelled_two_ways(make_vault, ring):
    from serve_journal.privacy.subjects import VaultPseudonymizer

    protector = VaultPseudonymizer(ring, make_vault(ring))
    tokens, digests, _ = protector.protect_columns([7, "7", None], [b"a", b"a", b"a"])
    assert tokens[0] == tokens[1] is not None and tokens[2] is None
    assert digests[0] == digests[1] != digests[2]
