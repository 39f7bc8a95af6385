"""Crypto-shredding is durable: no copy of a forgotten key in the vault's files, old copies made
useless by re-wrapping, and key caches that forget within a bounded time (fake clocks).

The attacker of these tests reads raw bytes: the SQLite database file and its ``-wal`` and
``-shm`` files while other connections are open, PostgreSQL heap pages and WAL segments, and a
copy of a vault row taken before the forget (what a backup holds).
"""

from __future__ import annotations

import base64
import hashlib
import json
import logging
import secrets
import sqlite3
import threading
import time
from pathlib import Path

import pytest
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from serve_journal.integrity.encoding import canonical_encode
from serve_journal.privacy.keyring import (
    LEGACY_WRAP_KEY_ID,
    PURPOSE_SAMPLING,
    PURPOSE_SUBJECT_INDEX,
    FileKek,
    Keyring,
    KeyringError,
)
from serve_journal.privacy.subjects import VaultPseudonymizer
from serve_journal.privacy.vault import (
    MAX_KEY_AGE_S,
    SubjectKey,
    SubjectVault,
    VaultError,
)
from serve_journal.privacy.vault_sql import KeyRow, SqliteBackend, WrapFenceMoved
from serve_journal.replay.verifiers import DerivedKeyCache, VaultVerifier


class FakeClock:
    """A monotonic clock the test moves by hand."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


@pytest.fixture
def ring(tmp_path) -> Keyring:
    keys = tmp_path / "keys"
    keys.mkdir()
    return Keyring(keys / "ring.json", FileKek.create(keys / "kek"))


def other_process_keyring(ring: Keyring) -> Keyring:
    """What another process (a replica) opens: its own keyring object over the same file."""
    return Keyring(ring.path, FileKek(ring.kek.path))


@pytest.fixture(params=["sqlite", "postgres"])
def make_vault(request, tmp_path):
    """Factory of vaults sharing one store (same file / same tables) for this test."""
    namespace = "s" + secrets.token_hex(6)
    opened: list[SubjectVault] = []
    dsn = request.getfixturevalue("postgres_dsn") if request.param == "postgres" else None

    def make(keyring: Keyring) -> SubjectVault:
        if dsn is None:
            vault = SubjectVault.sqlite(tmp_path / "vault.sqlite3", keyring, namespace=namespace)
        else:
            vault = SubjectVault.postgres(dsn, keyring, namespace=namespace)
        opened.append(vault)
        return vault

    make.kind = request.param
    yield make
    for vault in opened:
        vault.close()


def raw_row(vault: SubjectVault, subject: str) -> KeyRow:
    """The stored row as an attacker with a copy of the database sees it."""
    [row] = vault._backend.select([vault.blind_index(subject)])
    return row


def traces(key: SubjectKey, row: KeyRow) -> dict[str, bytes]:
    """Every byte string that would betray a forgotten subject's key or row."""
    return {"wrapped key": row.wrapped, "key bytes": key.key, "key ref": row.key_ref.encode(),
            "blind index": row.blind_index, "token": row.token.encode()}


def vault_files(path: Path) -> dict[str, bytes]:
    files = {}
    for suffix in ("", "-wal", "-shm"):
        f = Path(str(path) + suffix)
        files[f.name] = f.read_bytes() if f.exists() else b""
    return files


def found_in(files: dict[str, bytes], needles: dict[str, bytes]) -> list[str]:
    return [f"{what} in {name}" for name, data in files.items()
            for what, needle in needles.items() if needle in data]


def unwrap_with(key: bytes, row: KeyRow) -> bytes:
    body = row.wrapped[-60:]
    return AESGCM(key).decrypt(body[:12], body[12:], b"subject-key\0" + row.blind_index)


def every_key_the_keyring_holds(ring: Keyring) -> dict[str, bytes]:
    """All clear keys reachable from the keyring file with the KEK (a fresh reader)."""
    fresh = other_process_keyring(ring)
    held = {f"data:{k}": fresh.data_key(k) for k in fresh.key_ids()}
    for purpose in (PURPOSE_SUBJECT_INDEX, PURPOSE_SAMPLING):
        held[f"purpose:{purpose}"] = fresh.purpose_key(purpose)
    held.update({f"wrap:{w}": fresh.wrap_key(w) for w in fresh.wrap_key_ids()})
    doc = json.loads(Path(ring.path).read_text())
    for section in ("keys", "purposes", "wrap_keys"):
        for name, entry in doc.get(section, {}).items():
            context = {"keys": "data", "purposes": "purpose", "wrap_keys": "wrap"}[section]
            held[f"file:{context}:{name}"] = fresh.kek.unwrap(
                base64.b64decode(entry["wrapped"]), f"{context}:{name}".encode())
    held["kek"] = FileKek(ring.kek.path)._kek()
    return held


# -- 1. SQLite: nothing left in the files -----------------------------------------------------


def _forget_with_replicas_open(tmp_path, ring) -> tuple[dict[str, bytes], dict[str, dict], list]:
    """Two subjects forgotten while two more vault objects (replicas) hold connections: one
    whose row only ever reached the WAL, one checkpointed into the database file first."""
    path = tmp_path / "vault.sqlite3"
    operator = SubjectVault.sqlite(path, ring)
    replica2 = SubjectVault.sqlite(path, other_process_keyring(ring))
    replica3 = SubjectVault.sqlite(path, other_process_keyring(ring))
    bystanders = [f"user-{i:04d}" for i in range(300)]
    replica2.get_or_create_many(bystanders[:150] + ["in-db"])
    in_db = (replica2.get_many(["in-db"])["in-db"], raw_row(operator, "in-db"))
    operator._backend._connection().execute("PRAGMA wal_checkpoint(TRUNCATE)")
    assert in_db[1].wrapped in vault_files(path)["vault.sqlite3"]  # the row is in the db file
    replica3.get_or_create_many(bystanders[150:] + ["in-wal"])
    in_wal = (replica3.get_many(["in-wal"])["in-wal"], raw_row(operator, "in-wal"))
    assert in_wal[1].wrapped in vault_files(path)["vault.sqlite3-wal"]
    # the replicas are live: connections open, reads done, tombstone cursors taken
    replica2.changes_since(0), replica3.count(), replica3.latest_cursor()
    assert operator.forget("in-db") == in_db[1].key_ref
    assert operator.forget("in-wal") == in_wal[1].key_ref
    files = vault_files(path)
    # the replicas still work, and see the forget
    assert replica2.get_many(["in-db", "in-wal", bystanders[0]]).keys() == {bystanders[0]}
    assert replica3.count() == 300
    targets = {"in-db": traces(*in_db), "in-wal": traces(*in_wal)}
    return files, targets, [operator, replica2, replica3]


def test_sqlite_forget_leaves_no_trace_in_db_wal_or_shm_with_other_connections_open(tmp_path, ring):
    files, targets, vaults = _forget_with_replicas_open(tmp_path, ring)
    try:
        for subject, needles in targets.items():
            assert found_in(files, needles) == [], subject
        assert files["vault.sqlite3-wal"] == b""  # checkpointed and truncated
        assert files["vault.sqlite3"]  # the database itself is there, of course
    finally:
        for vault in vaults:
            vault.close()


def test_sqlite_forget_leaves_no_trace_while_replicas_keep_reading_and_writing(tmp_path, ring):
    path = tmp_path / "vault.sqlite3"
    operator = SubjectVault.sqlite(path, ring)
    targets = [f"target-{i}" for i in range(5)]
    keys = operator.get_or_create_many(targets + [f"user-{i}" for i in range(200)])
    rows = {t: raw_row(operator, t) for t in targets}
    stop = threading.Event()
    failures: list[BaseException] = []

    def replica_loop(n: int) -> None:
        vault = SubjectVault.sqlite(path, other_process_keyring(ring))
        try:
            i = 0
            while not stop.is_set():
                vault.get_many([f"user-{(i * 7) % 200}", f"user-{(i * 13) % 200}"])
                vault.get_or_create_many([f"new-{n}-{i}"])
                vault.changes_since(0)
                i += 1
        except BaseException as exc:  # noqa: BLE001 - reported by the main thread
            failures.append(exc)
        finally:
            vault.close()

    threads = [threading.Thread(target=replica_loop, args=(n,)) for n in range(2)]
    for thread in threads:
        thread.start()
    try:
        for target in targets:
            assert operator.forget(target) == rows[target].key_ref
    finally:
        stop.set()
        for thread in threads:
            thread.join(timeout=60)
    assert not failures, failures
    files = vault_files(path)
    for target in targets:
        assert found_in(files, traces(keys[target], rows[target])) == [], target
    operator.close()


def test_the_raw_scan_finds_the_residue_of_the_old_behaviour(tmp_path, ring, monkeypatch):
    """Control: without the WAL truncation and with secure_delete off (the old behaviour on a
    build whose default is off), the same scan finds the forgotten keys."""
    monkeypatch.setattr(SqliteBackend, "checkpoint", lambda self: None)
    connect = SqliteBackend._connect

    def old_connect(self):
        conn = connect(self)
        conn.execute("PRAGMA secure_delete = OFF")
        return conn

    monkeypatch.setattr(SqliteBackend, "_connect", old_connect)
    files, targets, vaults = _forget_with_replicas_open(tmp_path, ring)
    try:
        assert "wrapped key in vault.sqlite3-wal" in found_in(files, targets["in-wal"])
        assert "blind index in vault.sqlite3-wal" in found_in(files, targets["in-wal"])
        assert "key ref in vault.sqlite3-wal" in found_in(files, targets["in-wal"])
        assert "wrapped key in vault.sqlite3" in found_in(files, targets["in-db"])
        # with truncation but still without secure_delete, the db file keeps the deleted cell
        vaults[0]._backend._connection().execute("PRAGMA wal_checkpoint(TRUNCATE)")
        after = vault_files(tmp_path / "vault.sqlite3")
        assert after["vault.sqlite3-wal"] == b""
        assert "wrapped key in vault.sqlite3" in found_in(after, targets["in-db"])
    finally:
        for vault in vaults:
            vault.close()


def test_a_foreign_long_reader_delays_the_truncation_which_a_later_checkpoint_completes(
        tmp_path, ring, caplog):
    """The documented limit: a connection outside serve_journal holding a read transaction
    open longer than the busy timeout keeps the WAL; the next checkpoint removes it."""
    caplog.set_level(logging.DEBUG)
    path = tmp_path / "vault.sqlite3"
    vault = SubjectVault.sqlite(path, ring, busy_timeout_s=0.2)
    replica = SubjectVault.sqlite(path, other_process_keyring(ring))
    key = replica.get_or_create_many(["held"])["held"]
    row = raw_row(vault, "held")
    foreign = sqlite3.connect(path, isolation_level=None)
    try:
        foreign.execute("BEGIN")
        foreign.execute("SELECT count(*) FROM serve_journal_subject_keys").fetchone()
        assert vault.forget("held") == row.key_ref  # the key is gone all the same
        assert found_in(vault_files(path), traces(key, row))  # but the WAL could not be cut
        assert "could not be truncated" in caplog.text
        foreign.execute("COMMIT")
        assert vault.checkpoint() is True
        assert found_in(vault_files(path), traces(key, row)) == []
        for secret in ("held", key.key.hex(), row.token):
            assert secret not in caplog.text
    finally:
        foreign.close()
        vault.close()
        replica.close()


# -- 2. Re-wrapping: old copies become useless ------------------------------------------------


def test_rewrap_then_destroy_makes_a_backup_copy_of_a_forgotten_key_useless(make_vault, ring):
    operator = make_vault(ring)
    stale = make_vault(other_process_keyring(ring))  # a replica that never reloads by itself
    subjects = [f"user-{i:04d}" for i in range(1200)]  # more than one scan chunk
    before = operator.get_or_create_many(subjects + ["target"])
    assert stale.get_many(["user-0001"])["user-0001"].key == before["user-0001"].key
    backup = raw_row(operator, "target")  # what a backup, an old page or WAL segment holds
    old_wrap_id = ring.current_wrap_key_id
    assert old_wrap_id == LEGACY_WRAP_KEY_ID
    old_wrap_key = ring.wrap_key(old_wrap_id)
    assert unwrap_with(old_wrap_key, backup) == before["target"].key  # the copy is live today

    assert operator.forget("target") == backup.key_ref
    report = operator.rewrap()
    assert report.rewrapped == len(subjects)
    assert report.destroyed == (old_wrap_id,) and report.wrap_key_id != old_wrap_id
    assert ring.wrap_key_ids() == [report.wrap_key_id]

    # The attacker holds the backup copy and everything the keyring (file + KEK) still holds.
    held = every_key_the_keyring_holds(ring)
    assert old_wrap_key not in held.values()
    for name, key in held.items():
        with pytest.raises(InvalidTag):
            unwrap_with(key, backup)
        with pytest.raises(InvalidTag):  # in case the binding were the weak spot
            body = backup.wrapped[-60:]
            AESGCM(key).decrypt(body[:12], body[12:], None)
        assert name  # (every name was tried)
    with pytest.raises(KeyringError, match="destroyed"):
        other_process_keyring(ring).wrap_key(old_wrap_id)
    with pytest.raises(KeyringError, match="destroyed"):
        ring.purpose_key("subject-wrap")  # never silently re-created
    doc = json.loads(Path(ring.path).read_text())
    assert "subject-wrap" not in doc["purposes"] and doc["destroyed_wrap_keys"] == [old_wrap_id]

    # Every live subject keeps its key, seen from the operator and from the stale replica.
    after = operator.get_many(subjects)
    assert {s: k.key for s, k in after.items()} == {s: before[s].key for s in subjects}
    assert raw_row(operator, "user-0001").wrapped.startswith(report.wrap_key_id.encode() + b":")
    assert stale.get_many(["user-0002"])["user-0002"].key == before["user-0002"].key
    # The stale replica creates a key: the fence makes it wrap under the new key.
    assert stale._fence in (None, old_wrap_id)
    newcomer = stale.get_or_create_many(["newcomer"])["newcomer"]
    assert stale._fence == report.wrap_key_id
    assert raw_row(operator, "newcomer").wrapped.startswith(report.wrap_key_id.encode() + b":")
    assert operator.get_many(["newcomer"])["newcomer"].key == newcomer.key

    # A second rotation retires the first rotated key the same way.
    second = operator.rewrap()
    assert second.destroyed == (report.wrap_key_id,) and second.rewrapped == len(subjects) + 1
    assert operator.get_many(["newcomer"])["newcomer"].key == newcomer.key


def test_rewrap_refuses_to_destroy_anything_when_a_row_does_not_unwrap(make_vault, ring):
    vault = make_vault(ring)
    keys = vault.get_or_create_many(["subject-271828", "subject-314159"])
    row = raw_row(vault, "subject-271828")
    broken = row.wrapped[:-1] + bytes([row.wrapped[-1] ^ 1])
    assert vault._backend.replace_wrapped([(row, broken)]) == 1
    with pytest.raises(VaultError, match="does not unwrap") as info:
        vault.rewrap()
    assert row.key_ref in str(info.value)
    for secret in ("subject-271828", keys["subject-271828"].key.hex(), row.token):
        assert secret not in str(info.value)
    assert LEGACY_WRAP_KEY_ID in ring.wrap_key_ids()  # nothing destroyed
    assert vault.get_many(["subject-314159"])["subject-314159"].key == keys["subject-314159"].key


def test_insert_under_a_retired_wrap_key_is_refused_by_the_fence(make_vault, ring):
    vault = make_vault(ring)
    vault.get_or_create_many(["a"])
    new_id = ring.rotate_wrap_key()
    vault._backend.set_wrap_fence(new_id)
    stale_row = KeyRow(vault.blind_index("late"), "sk-" + secrets.token_hex(8), "0" * 32,
                       secrets.token_bytes(60))
    with pytest.raises(WrapFenceMoved) as info:
        vault._backend.insert_missing([stale_row], time.time(), LEGACY_WRAP_KEY_ID)
    assert info.value.wrap_id == new_id
    assert vault.get_many(["late"]) == {}  # nothing was inserted


def test_postgres_residue_is_real_and_rewrap_makes_it_useless(postgres_dsn, ring):
    """The residue docs/security.md describes, read as a database superuser: the forgotten row
    stays in the heap page (a dead tuple until VACUUM) and in the WAL. After rewrap and the
    destruction of the old wrap key, those copies unwrap with nothing the keyring holds."""
    import psycopg  # inside: optional dependency, only for the PostgreSQL run

    namespace = "s" + secrets.token_hex(6)
    vault = SubjectVault.postgres(postgres_dsn, ring, namespace=namespace)
    vault.get_or_create_many([f"u{i}" for i in range(20)] + ["target"])
    backup = raw_row(vault, "target")
    vault.forget("target")
    table = f"{namespace}_subject_keys"
    with psycopg.connect(postgres_dsn, autocommit=True) as conn:
        conn.execute("CREATE EXTENSION IF NOT EXISTS pageinspect")
        conn.execute("CHECKPOINT")  # WAL segments and heap pages on disk
        blocks = conn.execute(f"SELECT pg_relation_size('{table}') / 8192").fetchone()[0]
        pages = b"".join(bytes(conn.execute("SELECT get_raw_page(%s, %s)", (table, b)).fetchone()[0])
                         for b in range(blocks))
        wal = b"".join(
            bytes(conn.execute("SELECT pg_read_binary_file('pg_wal/' || %s)", (name,)).fetchone()[0])
            for (name,) in conn.execute("SELECT name FROM pg_ls_waldir() WHERE name ~ '^[0-9A-F]{24}$'"))
    residue = {"heap page": pages, "WAL": wal}
    found = {where: backup.wrapped in data for where, data in residue.items()}
    assert found == {"heap page": True, "WAL": True}, found
    assert vault.rewrap().destroyed == (LEGACY_WRAP_KEY_ID,)
    vault.close()
    for key in every_key_the_keyring_holds(ring).values():
        with pytest.raises(InvalidTag):
            unwrap_with(key, backup)


# -- 3. Caches forget within a bound, without tombstones --------------------------------------


def test_idle_replica_whose_tombstone_was_pruned_stops_using_the_key_at_max_age(tmp_path, ring):
    clock = FakeClock()
    path = tmp_path / "vault.sqlite3"
    replica = VaultPseudonymizer(ring, SubjectVault.sqlite(path, ring), clock=clock)
    writer = SubjectVault.sqlite(path, other_process_keyring(ring))
    features = canonical_encode({"amount": 1})
    [before] = replica.protect(["gone"], [features])
    assert writer.forget("gone") is not None
    # the replica is idle while the tombstone is pruned (far later by the wall clock)
    assert writer.prune_tombstones(0, now=time.time() + 10 * MAX_KEY_AGE_S) == 1
    clock.advance(MAX_KEY_AGE_S - 1)
    assert replica.refresh_invalidations() == 0  # the tombstone is gone: nothing to evict
    assert replica.protect(["gone"], [features])[0] == before  # still within the bound
    clock.advance(1)
    [after] = replica.protect(["gone"], [features])
    assert after.subject_token != before.subject_token
    assert after.features_hmac != before.features_hmac
    assert replica.stats.expired >= 1
    replica.vault.close()
    writer.close()


def test_max_key_age_is_configurable_down_never_up(tmp_path, ring):
    vault = SubjectVault.sqlite(tmp_path / "vault.sqlite3", ring)
    clock = FakeClock()
    quick = VaultPseudonymizer(ring, vault, max_key_age_s=5, clock=clock)
    [first] = quick.protect(["s"], [None])
    clock.advance(4.9)
    quick.protect(["s"], [None])
    assert quick.stats.misses == 1
    clock.advance(0.1)
    assert quick.protect(["s"], [None]) == [first]  # same key (not forgotten), read again
    assert quick.stats.misses == 2 and quick.stats.expired == 1
    with pytest.raises(ValueError, match="at most"):
        VaultPseudonymizer(ring, vault, max_key_age_s=MAX_KEY_AGE_S + 1)
    with pytest.raises(ValueError, match="positive"):
        VaultPseudonymizer(ring, vault, max_key_age_s=0)
    vault.close()


def test_expire_drops_old_keys_from_memory_and_the_sweeper_does_it_for_an_idle_replica(tmp_path,
                                                                                       ring):
    vault = SubjectVault.sqlite(tmp_path / "vault.sqlite3", ring)
    clock = FakeClock()
    # (the process's sweeper may run expire() too, at any moment: the outcome is the same)
    manual = VaultPseudonymizer(ring, vault, clock=clock, sweep_interval_s=3600)
    manual.protect(["a", "b"], [None, None])
    clock.advance(MAX_KEY_AGE_S / 2)
    manual.protect(["c"], [None])
    assert manual.cached_subjects() == 3
    clock.advance(MAX_KEY_AGE_S / 2)
    manual.expire()
    assert manual.cached_subjects() == 1 and manual.stats.expired == 2  # a and b, not c
    assert not manual._by_tag.keys() - {manual._cache[i].tag for i in manual._cache}
    # An idle replica: nobody calls it. The process's sweeper thread drops its keys, and also
    # the wrap key a rewrap destroyed meanwhile (it reloads the keyring at the same bound).
    idle_ring = other_process_keyring(ring)
    idle_vault = SubjectVault.sqlite(tmp_path / "vault.sqlite3", idle_ring)
    idle_clock = FakeClock()
    idle = VaultPseudonymizer(idle_ring, idle_vault, clock=idle_clock, sweep_interval_s=0.01)
    idle.protect(["x", "y"], [None, None])
    assert f"purpose:{LEGACY_WRAP_KEY_ID}" in idle_ring._clear
    assert vault.rewrap().destroyed == (LEGACY_WRAP_KEY_ID,)
    idle_clock.advance(MAX_KEY_AGE_S)
    deadline = time.monotonic() + 30
    while idle.cached_subjects() or f"purpose:{LEGACY_WRAP_KEY_ID}" in idle_ring._clear:
        assert time.monotonic() < deadline, "the sweeper never swept the idle replica"
    assert idle.stats.expired == 2
    idle_vault.close()
    vault.close()


def test_replay_derived_key_cache_expires(tmp_path, ring):
    vault = SubjectVault.sqlite(tmp_path / "vault.sqlite3", ring)
    pseudonymizer = VaultPseudonymizer(ring, vault)
    clock = FakeClock()
    cache = DerivedKeyCache(clock=clock, sweep_interval_s=3600)
    verifier = VaultVerifier(pseudonymizer, derived_keys=cache)
    subjects = ["alice", "bob"]
    encoded = [canonical_encode({"x": i}) for i in range(2)]
    protected = pseudonymizer.protect(subjects, encoded)
    args = (subjects, encoded, [p.key_id for p in protected], [p.features_hmac for p in protected],
            [p.subject_token for p in protected])
    assert verifier.verify_batch(*args) == ["verified", "verified"]
    assert len(cache) == 2
    clock.advance(MAX_KEY_AGE_S - 1)
    cache.expire()  # (the process's sweeper may run it too, at any moment)
    assert len(cache) == 2
    clock.advance(1)
    cache.expire()
    assert len(cache) == 0
    vault.forget("bob")
    assert verifier.verify_batch(*args) == ["verified", "shredded"]
    assert len(cache) == 1  # the forgotten subject's derived key never comes back
    with pytest.raises(ValueError, match="max_age_s"):
        DerivedKeyCache(max_age_s=MAX_KEY_AGE_S * 2)
    vault.close()


# -- 4. No identifier, key or token in logs or errors -------------------------------------------


def test_shredding_paths_log_and_raise_without_identifiers(tmp_path, ring, caplog):
    caplog.set_level(logging.DEBUG)
    subject = "person-8675309"
    path = tmp_path / "vault.sqlite3"
    vault = SubjectVault.sqlite(path, ring)
    key = vault.get_or_create_many([subject])[subject]
    replica = VaultPseudonymizer(ring, SubjectVault.sqlite(path, other_process_keyring(ring)))
    replica.protect([subject], [None])
    report = vault.rewrap(destroy_old=False)
    errors = []
    stranger = SubjectVault.sqlite(path, Keyring(tmp_path / "other.json", FileKek(ring.kek.path)))
    assert stranger.get_many([subject]) == {}  # another keyring: another blind index
    try:
        stranger.get_by_tokens([key.token])  # found, but wrapped under a key it does not hold
    except VaultError as exc:
        errors.append(str(exc))
    stranger.close()
    ring.destroy_wrap_key(LEGACY_WRAP_KEY_ID)
    vault.forget(subject)
    replica.refresh_invalidations()
    assert errors and "does not hold" in errors[0] and report.wrap_key_id in errors[0]
    text = caplog.text + " ".join(errors) + repr(vault) + repr(replica) + repr(report)
    for secret in (subject, key.key.hex(), key.token, base64.b64encode(key.key).decode(),
                   hashlib.sha256(subject.encode()).hexdigest()):
        assert secret not in text
    replica.vault.close()
    vault.close()


def test_vault_rewrap_command_rewraps_and_destroys_the_old_wrap_key(tmp_path, monkeypatch):
    from click.testing import CliRunner

    from serve_journal.cli import main

    monkeypatch.delenv("SERVE_JOURNAL_KEK", raising=False)
    privacy = tmp_path / "privacy"
    ring = Keyring.local_default(privacy)
    vault = SubjectVault.local_default(privacy, ring)
    vault.get_or_create_many(["alice", "bob"])
    vault.close()
    result = CliRunner().invoke(main, ["vault-rewrap", "--journal", str(tmp_path / "journal"),
                                       "--privacy-dir", str(privacy)])
    assert result.exit_code == 0, result.output
    report = json.loads(result.output)
    assert report["rewrapped"] == 2 and len(report["destroyed"]) >= 1
    assert "alice" not in result.output and "bob" not in result.output
    reopened = SubjectVault.local_default(privacy, Keyring.local_default(privacy))
    assert set(reopened.get_many(["alice", "bob"])) == {"alice", "bob"}  # still readable
    reopened.close()


def test_a_cache_whose_keyring_is_gone_stops_being_swept_until_it_is_used_again(
        tmp_path, ring, caplog):
    # A runtime closed in this process with its key files removed: the sweeper's keyring reload
    # fails. It says so once (the kind, never the message), stops sweeping that cache, and a
    # cache that is used again is swept again.
    vault = SubjectVault.sqlite(tmp_path / "vault.sqlite3", ring)
    clock = FakeClock()
    closed = VaultPseudonymizer(ring, vault, clock=clock, sweep_interval_s=0.01)
    closed.protect(["gone"], [None])
    failures = []

    def reload() -> None:
        failures.append(time.monotonic())
        raise RuntimeError("key file /secret/path missing")

    closed.keyring.reload = reload
    clock.advance(MAX_KEY_AGE_S)
    caplog.set_level(logging.WARNING, logger="serve_journal.privacy.subjects")
    deadline = time.monotonic() + 30
    while not failures:
        assert time.monotonic() < deadline, "the sweeper never swept"
        time.sleep(0.01)
    time.sleep(0.3)  # thirty sweep intervals
    assert len(failures) == 1
    assert closed.cached_subjects() == 0  # its expiry ran before the reload failed
    messages = [r.getMessage() for r in caplog.records if "sweep failed" in r.getMessage()]
    assert messages == ["key cache sweep failed (RuntimeError); no longer swept until it is "
                        "used again"]
    reloads = []
    closed.keyring.reload = lambda: reloads.append(time.monotonic())
    closed.protect(["back"], [None])  # used again: swept again
    clock.advance(MAX_KEY_AGE_S)
    deadline = time.monotonic() + 30
    while closed.cached_subjects() or not reloads:
        assert time.monotonic() < deadline, "a cache used again was not swept again"
        time.sleep(0.01)
    vault.close()
