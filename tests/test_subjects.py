"""VaultPseudonymizer: tokens, feature HMACs, rotation, LRU, invalidation across replicas."""

from __future__ import annotations

import hashlib
import hmac
import pickle
import time

import pytest

from serve_journal.integrity.encoding import canonical_encode
from serve_journal.privacy.forget import forget
from serve_journal.privacy.keyring import (
    PURPOSE_SUBJECT_INDEX,
    FileKek,
    Keyring,
)
from serve_journal.privacy.pseudonymizer import Protected, Pseudonymizer
from serve_journal.privacy.subjects import VaultPseudonymizer, VerifyStatus
from serve_journal.privacy.vault import MAX_KEY_AGE_S, SubjectVault


def open_replica(directory, **options) -> VaultPseudonymizer:
    """What one replica builds: its own keyring and vault objects over the shared files."""
    ring = Keyring.local_default(directory, kek=FileKek(directory / "keys" / "kek")
                                 if (directory / "keys" / "kek").exists() else None)
    return VaultPseudonymizer(ring, SubjectVault.local_default(directory, ring), **options)


@pytest.fixture
def replica(tmp_path, monkeypatch) -> VaultPseudonymizer:
    monkeypatch.delenv("SERVE_JOURNAL_KEK", raising=False)
    return open_replica(tmp_path)


def enc(features) -> bytes:
    return canonical_encode(features)


def test_protect_shapes_and_protocol(replica):
    import inspect

    assert (list(inspect.signature(replica.protect).parameters)
            == list(inspect.signature(Pseudonymizer.protect).parameters)[1:])
    out = replica.protect(["alice", None, "alice", "bob", None],
                          [enc({"x": 1}), enc({"x": 1}), None, enc({"x": 1}), None])
    assert len(out) == 5 and all(isinstance(p, Protected) for p in out)
    key_id = replica.keyring.current_key_id
    assert all(p.key_id == key_id for p in out)
    alice, anon, alice2, bob, empty = out
    assert alice.subject_token == alice2.subject_token and len(alice.subject_token) == 32
    assert int(alice.subject_token, 16) >= 0
    assert bob.subject_token != alice.subject_token
    assert anon.subject_token is None and empty.subject_token is None
    assert alice2.features_hmac is None and empty.features_hmac is None
    # same features: per-subject keys give different HMACs; no subject uses the data key alone
    assert len({alice.features_hmac, bob.features_hmac, anon.features_hmac}) == 3
    assert anon.features_hmac == hmac.new(replica.keyring.data_key(key_id),
                                          b"features\0" + enc({"x": 1}), hashlib.sha256).hexdigest()
    # within one subject, equal features give equal HMACs (the one thing the journal reveals)
    again = replica.protect(["alice", "alice"], [enc({"x": 1}), enc({"x": 2})])
    assert again[0].features_hmac == alice.features_hmac != again[1].features_hmac
    with pytest.raises(ValueError, match="same length"):
        replica.protect(["a"], [])


def test_token_is_hmac_of_subject_key_and_token_for_never_creates(replica):
    [p] = replica.protect(["carol"], [None])
    key = replica.vault.get_many(["carol"])["carol"].key
    assert p.subject_token == hmac.new(key, b"token", hashlib.sha256).hexdigest()[:32]
    count = replica.vault.count()
    assert replica.token_for("carol") == p.subject_token
    assert replica.token_for("dave") is None
    assert replica.vault.count() == count


@pytest.mark.slow  # over 6 s: kept out of the fast tier, runs in the full suite
def test_tokens_are_not_derivable_from_ids_by_brute_force(replica):
    """An attacker with the journal, the keyring, and even the vault's index key, but not the
    subject keys, tries every 6-digit id: nothing they can compute matches a token."""
    ids = [f"{i:06d}" for i in range(0, 1_000_000, 20_000)]  # 50 real subjects
    tokens = {p.subject_token for p in replica.protect(ids, [None] * len(ids))}
    assert len(tokens) == len(ids)
    ring = replica.keyring
    # (key, prefix): the plain-HMAC derivations someone holding these keys would try
    attempts = [(b"", b""), (b"", b"token"), (ring.data_key(), b"subject\0"),
                (ring.purpose_key(PURPOSE_SUBJECT_INDEX), b"subject-index\0")]
    bases = [(hmac.new(key, prefix, digestmod=hashlib.sha256)) for key, prefix in attempts]
    hits = 0
    for i in range(1_000_000):
        candidate = f"{i:06d}".encode()
        if hashlib.sha256(candidate).hexdigest()[:32] in tokens:
            hits += 1
        for base in bases:
            mac = base.copy()
            mac.update(candidate)
            if mac.hexdigest()[:32] in tokens:
                hits += 1
    assert hits == 0
    # the check is not vacuous: the one derivation that works needs the subject's own key
    key = replica.vault.get_many([ids[0]])[ids[0]].key
    assert hmac.new(key, b"token", hashlib.sha256).hexdigest()[:32] in tokens


def test_rotation_new_entries_new_key_id_old_entries_still_verify(replica):
    features = enc({"amount": 12.5, "country": "FR"})
    [old] = replica.protect(["erin"], [features])
    [old_anon] = replica.protect([None], [features])
    old_id = replica.keyring.current_key_id
    new_id = replica.keyring.rotate()
    [new] = replica.protect(["erin"], [features])
    assert new.key_id == new_id != old.key_id == old_id
    assert new.subject_token == old.subject_token  # the subject key did not change
    assert new.features_hmac != old.features_hmac
    for entry in (old, new):
        assert replica.verify_features(features, entry.key_id, entry.features_hmac,
                                       subject_token=entry.subject_token) is VerifyStatus.VERIFIED
        assert replica.verify_features(features, entry.key_id, entry.features_hmac,
                                       subject_id="erin") is VerifyStatus.VERIFIED
    assert replica.verify_features(features, old_id, old_anon.features_hmac) is VerifyStatus.VERIFIED
    assert replica.verify_features(enc({"amount": 12.6, "country": "FR"}), old_id, old.features_hmac,
                                   subject_token=old.subject_token) is VerifyStatus.MISMATCH
    assert replica.verify_features(features, "k-unknown", old.features_hmac,
                                   subject_id="erin") is VerifyStatus.UNKNOWN_KEY


def test_rotation_by_another_process_is_picked_up_on_refresh(tmp_path, monkeypatch):
    monkeypatch.delenv("SERVE_JOURNAL_KEK", raising=False)
    a = open_replica(tmp_path)
    b = open_replica(tmp_path)
    new_id = a.keyring.rotate()
    assert b.protect(["f"], [b""])[0].key_id != new_id
    b.refresh_invalidations()
    assert b.protect(["f"], [b""])[0].key_id == new_id


def test_lru_is_bounded(tmp_path, monkeypatch):
    monkeypatch.delenv("SERVE_JOURNAL_KEK", raising=False)
    replica = open_replica(tmp_path, cache_size=10)
    first = replica.protect([f"s{i}" for i in range(50)], [None] * 50)
    assert replica.cached_subjects() == 10
    assert replica.stats.evicted_lru == 40 and replica.stats.misses == 50
    # evicted subjects are fetched again from the vault, with the same key
    again = replica.protect([f"s{i}" for i in range(50)], [None] * 50)
    assert [p.subject_token for p in again] == [p.subject_token for p in first]
    assert replica.vault.count() == 50
    with pytest.raises(ValueError, match="cache_size"):
        VaultPseudonymizer(replica.keyring, replica.vault, cache_size=0)


def test_forget_across_two_replicas(tmp_path, monkeypatch):
    monkeypatch.delenv("SERVE_JOURNAL_KEK", raising=False)
    r1 = open_replica(tmp_path, invalidation_interval_s=3600)
    r2 = open_replica(tmp_path, invalidation_interval_s=3600)
    features = enc([1, 2, 3])
    [a1] = r1.protect(["target"], [features])
    [a2] = r2.protect(["target"], [features])
    [other1] = r1.protect(["bystander"], [features])
    assert a1 == a2  # both replicas agree before the forget
    receipt = forget("target", vault=r1.vault, receipts_dir=tmp_path / "receipts")
    assert receipt.status == "shredded"
    assert r1.refresh_invalidations() == 1
    assert r2.refresh_invalidations() == 1
    for replica in (r1, r2):
        assert replica.token_for("target") is None
        assert replica.verify_features(features, a1.key_id, a1.features_hmac,
                                       subject_token=a1.subject_token) is VerifyStatus.SHREDDED
        assert replica.verify_features(features, a1.key_id, a1.features_hmac,
                                       subject_id="target") is VerifyStatus.SHREDDED
    [b1] = r1.protect(["target"], [features])
    [b2] = r2.protect(["target"], [features])
    assert b1.subject_token == b2.subject_token != a1.subject_token
    assert b1.features_hmac != a1.features_hmac
    # the old entry stays unverifiable even though the subject has a key again
    assert r2.verify_features(features, a1.key_id, a1.features_hmac, subject_id="target",
                              subject_token=a1.subject_token) is VerifyStatus.SHREDDED
    # other subjects are unchanged
    assert r2.protect(["bystander"], [features])[0] == other1


def test_invalidation_bound_is_enforced_by_protect_itself(tmp_path, monkeypatch, capsys):
    """No explicit refresh: protect() evicts within invalidation_interval_s. Measures the time."""
    monkeypatch.delenv("SERVE_JOURNAL_KEK", raising=False)
    interval = 0.2
    replica = open_replica(tmp_path, invalidation_interval_s=interval)
    writer = open_replica(tmp_path)
    [before] = replica.protect(["gone"], [None])
    forget("gone", vault=writer.vault, receipts_dir=tmp_path / "receipts")
    forgotten_at = time.monotonic()
    deadline = forgotten_at + 30
    while replica.protect(["gone"], [None])[0].subject_token == before.subject_token:
        assert time.monotonic() < deadline, "replica kept using a forgotten key"
    elapsed = time.monotonic() - forgotten_at
    assert replica.stats.evicted_forgotten == 1
    with capsys.disabled():
        print(f"\n[figure] stale-key window after forget: {elapsed * 1000:.0f} ms "
              f"(invalidation_interval_s={interval})")


def test_pickle_carries_configuration_only(replica):
    [p] = replica.protect(["pickled"], [b"f"])
    blob = pickle.dumps(replica)
    ring = replica.keyring
    for secret in [ring.data_key(), ring.purpose_key(PURPOSE_SUBJECT_INDEX),
                   replica.vault.get_many(["pickled"])["pickled"].key]:
        assert secret not in blob and secret.hex().encode() not in blob
    assert b"pickled" not in blob  # no cache travels
    clone = pickle.loads(blob)
    assert clone.cached_subjects() == 0
    assert clone.protect(["pickled"], [b"f"]) == [p]
    assert "pickled" not in repr(replica)


def test_pickle_carries_the_key_age_bound(tmp_path, monkeypatch):
    monkeypatch.delenv("SERVE_JOURNAL_KEK", raising=False)
    replica = open_replica(tmp_path, max_key_age_s=10, sweep_interval_s=2)
    clone = pickle.loads(pickle.dumps(replica))
    assert (clone.max_key_age_s, clone.sweep_interval_s) == (10.0, 2.0)
    assert open_replica(tmp_path).max_key_age_s == MAX_KEY_AGE_S == 60.0


def test_tombstones_evict_by_tag_and_the_lru_keeps_its_maps_in_step(tmp_path, monkeypatch):
    monkeypatch.delenv("SERVE_JOURNAL_KEK", raising=False)
    replica = open_replica(tmp_path, cache_size=3, invalidation_interval_s=3600)
    writer = open_replica(tmp_path)
    subjects = [f"s{i}" for i in range(5)]
    replica.protect(subjects, [None] * 5)  # two of them fall out of the LRU
    assert replica.cached_subjects() == 3
    assert len(replica._by_tag) == len(replica._loaded) == 3
    # Which two fell out depends on the order the vault returned the batch in (blind-index
    # order), so ask the cache rather than assume.
    keys = writer.vault.get_many(subjects)
    cached = [s for s in subjects if keys[s].blind_index in replica._cache]
    gone = [s for s in subjects if s not in cached]
    assert len(cached) == 3 and len(gone) == 2
    for subject in (gone[0], cached[0]):
        forget(subject, vault=writer.vault, receipts_dir=tmp_path / "receipts")
    assert replica.refresh_invalidations() == 1  # only the cached one was evicted
    assert len(replica._by_tag) == len(replica._loaded) == replica.cached_subjects() == 2
