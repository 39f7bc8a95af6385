"""Keyring: KEK sources, wrapped storage, rotation, no key bytes in reprs, errors or pickles."""

from __future__ import annotations

import base64
import hashlib
import json
import multiprocessing
import os
import pickle
import secrets
import stat

import pytest
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from serve_journal.privacy.keyring import (
    KEK_ENV,
    LEGACY_WRAP_KEY_ID,
    PURPOSE_SAMPLING,
    PURPOSE_SUBJECT_INDEX,
    PURPOSE_SUBJECT_WRAP,
    EnvKek,
    FileKek,
    Keyring,
    KeyringError,
    StaticKek,
)


def all_secrets(ring: Keyring) -> list[bytes]:
    keys = [ring.data_key(k) for k in ring.key_ids()]
    keys += [ring.purpose_key(PURPOSE_SUBJECT_INDEX), ring.purpose_key(PURPOSE_SUBJECT_WRAP)]
    return keys


def assert_no_secret_in(blob: bytes | str, secrets_: list[bytes]) -> None:
    data = blob.encode("utf-8", "surrogatepass") if isinstance(blob, str) else blob
    for secret in secrets_:
        for form in (secret, secret.hex().encode(), base64.b64encode(secret),
                     base64.urlsafe_b64encode(secret).rstrip(b"=")):
            assert form not in data


def test_local_default_creates_kek_0600_and_wrapped_keyring(tmp_path, monkeypatch):
    monkeypatch.delenv(KEK_ENV, raising=False)
    ring = Keyring.local_default(tmp_path)
    kek_path = tmp_path / "keys" / "kek"
    assert stat.S_IMODE(kek_path.stat().st_mode) == 0o600
    assert stat.S_IMODE((tmp_path / "keys" / "keyring.json").stat().st_mode) == 0o600
    doc = json.loads((tmp_path / "keys" / "keyring.json").read_text())
    assert doc["current"] == ring.current_key_id and set(doc["keys"]) == {ring.current_key_id}
    assert set(doc["purposes"]) == {PURPOSE_SUBJECT_INDEX, PURPOSE_SUBJECT_WRAP, PURPOSE_SAMPLING}
    keys = all_secrets(ring)
    assert all(len(k) == 32 for k in keys) and len(set(keys)) == len(keys)
    # at rest only wrapped: no clear key in any form in the file
    assert_no_secret_in((tmp_path / "keys" / "keyring.json").read_bytes(), keys)
    # a second opening resolves the same keys
    again = Keyring.local_default(tmp_path)
    assert all_secrets(again) == keys


def test_env_kek_hex_and_base64(tmp_path, monkeypatch):
    kek = secrets.token_bytes(32)
    monkeypatch.setenv(KEK_ENV, kek.hex())
    ring = Keyring(tmp_path / "ring.json")
    key = ring.data_key()
    monkeypatch.setenv(KEK_ENV, base64.b64encode(kek).decode())
    assert Keyring(tmp_path / "ring.json").data_key() == key
    monkeypatch.setenv(KEK_ENV, base64.urlsafe_b64encode(kek).decode())
    assert Keyring(tmp_path / "ring.json").data_key() == key
    # a different KEK cannot unwrap: clear error naming where the KEK came from, not the key
    other = secrets.token_bytes(32).hex()
    monkeypatch.setenv(KEK_ENV, other)
    with pytest.raises(KeyringError, match="cannot unwrap") as info:
        Keyring(tmp_path / "ring.json").data_key()
    assert other not in str(info.value) and kek.hex() not in str(info.value)
    assert "EnvKek('SERVE_JOURNAL_KEK')" in str(info.value)


def test_env_kek_malformed_or_missing(tmp_path, monkeypatch):
    monkeypatch.setenv(KEK_ENV, "not-a-key-but-a-secret-value")
    with pytest.raises(KeyringError, match="64 hex digits or base64") as info:
        Keyring(tmp_path / "ring.json")
    assert "secret-value" not in str(info.value)
    monkeypatch.setenv(KEK_ENV, secrets.token_bytes(16).hex())  # 16 bytes: too short
    with pytest.raises(KeyringError, match="32-byte"):
        Keyring(tmp_path / "ring.json")
    monkeypatch.delenv(KEK_ENV)
    with pytest.raises(KeyringError, match="SERVE_JOURNAL_KEK is not set"):
        Keyring(tmp_path / "ring.json")


@pytest.mark.parametrize("mode", [0o644, 0o640, 0o604, 0o660])
def test_kek_file_with_loose_permissions_is_refused(tmp_path, mode):
    path = tmp_path / "kek"
    FileKek.create(path)
    os.chmod(path, mode)
    with pytest.raises(KeyringError, match=rf"mode {mode:04o}.*chmod 600"):
        Keyring(tmp_path / "ring.json", FileKek(path))
    assert not (tmp_path / "ring.json").exists()


def test_kek_file_missing_or_not_regular(tmp_path):
    with pytest.raises(KeyringError, match="does not exist"):
        Keyring(tmp_path / "ring.json", FileKek(tmp_path / "nope"))
    with pytest.raises(KeyringError, match="not a regular file"):
        Keyring(tmp_path / "ring.json", FileKek(tmp_path))


def test_rotation_keeps_old_ids_resolvable_across_instances(tmp_path):
    kek = FileKek.create(tmp_path / "kek")
    ring = Keyring(tmp_path / "ring.json", kek)
    other = Keyring(tmp_path / "ring.json", FileKek(tmp_path / "kek"))  # e.g. another replica
    first_id, first_key = ring.current_key_id, ring.data_key()
    new_id = ring.rotate()
    assert new_id != first_id and ring.current_key_id == new_id
    assert ring.data_key(first_id) == first_key
    assert ring.data_key(new_id) != first_key
    # the other instance resolves the new id on demand and switches current on reload
    assert other.data_key(new_id) == ring.data_key(new_id)
    other.reload()
    assert other.current_key_id == new_id
    assert other.key_ids() == [first_id, new_id]
    # purpose keys never rotate
    assert other.purpose_key(PURPOSE_SUBJECT_INDEX) == ring.purpose_key(PURPOSE_SUBJECT_INDEX)
    with pytest.raises(KeyringError, match="'k-nope' is not in keyring"):
        ring.data_key("k-nope")


def test_no_key_bytes_in_repr_str_errors_or_pickles(tmp_path, caplog):
    caplog.set_level("DEBUG")
    ring = Keyring.local_default(tmp_path)
    ring.rotate()
    kek = FileKek(tmp_path / "keys" / "kek")._kek()
    keys = all_secrets(ring) + [kek]
    assert_no_secret_in(repr(ring) + str(ring) + repr(ring.kek), keys)
    blob = pickle.dumps(ring)
    assert_no_secret_in(blob, keys)
    clone = pickle.loads(blob)
    assert clone.current_key_id == ring.current_key_id
    assert all_secrets(clone) == all_secrets(ring)
    assert_no_secret_in(caplog.text, keys)
    with pytest.raises(TypeError, match="cannot be pickled"):
        pickle.dumps(Keyring(tmp_path / "static.json", StaticKek(secrets.token_bytes(32))))
    assert "hidden" in repr(StaticKek(secrets.token_bytes(32)))


def test_env_kek_pickle_carries_the_variable_name_only(tmp_path, monkeypatch):
    kek = secrets.token_bytes(32)
    monkeypatch.setenv(KEK_ENV, kek.hex())
    ring = Keyring(tmp_path / "ring.json", EnvKek())
    blob = pickle.dumps(ring)
    assert_no_secret_in(blob, all_secrets(ring) + [kek])
    assert pickle.loads(blob).data_key() == ring.data_key()


def test_tampered_keyring_is_detected(tmp_path):
    ring = Keyring(tmp_path / "ring.json", FileKek.create(tmp_path / "kek"))
    doc = json.loads((tmp_path / "ring.json").read_text())
    current = doc["current"]
    wrapped = bytearray(base64.b64decode(doc["keys"][current]["wrapped"]))
    wrapped[-1] ^= 1
    doc["keys"][current]["wrapped"] = base64.b64encode(bytes(wrapped)).decode()
    (tmp_path / "ring.json").write_text(json.dumps(doc))
    del ring
    with pytest.raises(KeyringError, match="altered"):
        Keyring(tmp_path / "ring.json", FileKek(tmp_path / "kek")).data_key()
    (tmp_path / "ring.json").write_text('{"format": 1}')
    with pytest.raises(KeyringError, match="malformed"):
        Keyring(tmp_path / "ring.json", FileKek(tmp_path / "kek"))


# A KMS stand-in: the "service" holds the master key; the hook object only names it, so it pickles
# without secrets, like a real hook holding a KMS key ARN.
_KMS_SERVICE: dict[str, bytes] = {}


class FakeKmsHook:
    calls = 0

    def __init__(self, key_name: str) -> None:
        self.key_name = key_name

    def wrap(self, plaintext: bytes, context: bytes) -> bytes:
        FakeKmsHook.calls += 1
        nonce = os.urandom(12)
        return nonce + AESGCM(_KMS_SERVICE[self.key_name]).encrypt(nonce, plaintext, context)

    def unwrap(self, wrapped: bytes, context: bytes) -> bytes:
        FakeKmsHook.calls += 1
        return AESGCM(_KMS_SERVICE[self.key_name]).decrypt(wrapped[:12], wrapped[12:], context)


def test_kms_hook(tmp_path):
    _KMS_SERVICE["alias/journal"] = secrets.token_bytes(32)
    before = FakeKmsHook.calls
    ring = Keyring(tmp_path / "ring.json", FakeKmsHook("alias/journal"))
    assert FakeKmsHook.calls - before == 4  # one data key and three purpose keys wrapped
    clone = pickle.loads(pickle.dumps(ring))
    assert clone.data_key() == ring.data_key()
    assert FakeKmsHook.calls - before == 5  # the clone unwrapped once, then cached
    clone.data_key()
    assert FakeKmsHook.calls - before == 5
    with pytest.raises(KeyringError, match="wrap"):
        Keyring(tmp_path / "other.json", object())  # type: ignore[arg-type]


def _open_and_fingerprint(directory: str, barrier) -> tuple[str, str, str]:
    barrier.wait(timeout=60)
    ring = Keyring.local_default(directory)
    return (ring.current_key_id, hashlib.sha256(ring.data_key()).hexdigest(),
            hashlib.sha256(ring.purpose_key(PURPOSE_SUBJECT_INDEX)).hexdigest())


def test_concurrent_first_use_from_processes_agrees_on_one_keyring(tmp_path, monkeypatch):
    monkeypatch.delenv(KEK_ENV, raising=False)
    ctx = multiprocessing.get_context("spawn")
    with ctx.Manager() as manager:
        barrier = manager.Barrier(4)
        with ctx.Pool(4) as pool:
            results = pool.starmap(_open_and_fingerprint, [(str(tmp_path), barrier)] * 4)
    assert len(set(results)) == 1
    assert Keyring.local_default(tmp_path).current_key_id == results[0][0]


def test_wrap_key_rotation_and_destruction_across_instances(tmp_path):
    ring = Keyring(tmp_path / "ring.json", FileKek.create(tmp_path / "kek"))
    other = Keyring(tmp_path / "ring.json", FileKek(tmp_path / "kek"))  # another process
    assert ring.current_wrap_key_id == LEGACY_WRAP_KEY_ID == PURPOSE_SUBJECT_WRAP
    first = ring.wrap_key(LEGACY_WRAP_KEY_ID)
    assert first == ring.purpose_key(PURPOSE_SUBJECT_WRAP) == other.wrap_key(LEGACY_WRAP_KEY_ID)
    assert json.loads((tmp_path / "ring.json").read_text())["format"] == 1  # old readers still read it
    new_id = ring.rotate_wrap_key()
    assert new_id.startswith("w-") and ring.current_wrap_key_id == new_id
    assert ring.wrap_key_ids() == [LEGACY_WRAP_KEY_ID, new_id]
    new_key = ring.wrap_key(new_id)
    assert len(new_key) == 32 and new_key != first
    assert other.wrap_key(new_id) == new_key  # resolved on demand, like data keys
    doc = json.loads((tmp_path / "ring.json").read_text())
    assert doc["format"] == 2 and doc["current_wrap"] == new_id
    assert_no_secret_in((tmp_path / "ring.json").read_bytes(), [first, new_key])
    with pytest.raises(KeyringError, match="current wrap key"):
        ring.destroy_wrap_key(new_id)
    with pytest.raises(KeyringError, match="not in keyring"):
        ring.destroy_wrap_key("w-000000000000")
    legacy_entry = doc["purposes"][PURPOSE_SUBJECT_WRAP]["wrapped"]
    ring.destroy_wrap_key(LEGACY_WRAP_KEY_ID)
    ring.destroy_wrap_key(LEGACY_WRAP_KEY_ID)  # idempotent
    text = (tmp_path / "ring.json").read_text()
    assert legacy_entry not in text  # the wrapped old key is gone from the file
    assert json.loads(text)["destroyed_wrap_keys"] == [LEGACY_WRAP_KEY_ID]
    for keyring in (ring, Keyring(tmp_path / "ring.json", FileKek(tmp_path / "kek"))):
        with pytest.raises(KeyringError, match="destroyed"):
            keyring.wrap_key(LEGACY_WRAP_KEY_ID)
        with pytest.raises(KeyringError, match="destroyed"):
            keyring.purpose_key(PURPOSE_SUBJECT_WRAP)  # never silently made again
        assert keyring.existing_purpose_key(PURPOSE_SUBJECT_WRAP) is None
        assert keyring.wrap_key_ids() == [new_id]
    # the other process still has the old key in memory until it reloads; then it is dropped
    assert "purpose:subject-wrap" in other._clear
    other.reload()
    assert "purpose:subject-wrap" not in other._clear
    with pytest.raises(KeyringError, match="destroyed"):
        other.wrap_key(LEGACY_WRAP_KEY_ID)
    # a second rotation retires the first rotated key the same way
    newer = other.rotate_wrap_key()
    ring.destroy_wrap_key(new_id)
    assert ring.wrap_key_ids() == [newer]
    other.reload()
    with pytest.raises(KeyringError, match=f"wrap key '{new_id}' was destroyed"):
        other.wrap_key(new_id)
    # data and other purpose keys are untouched
    assert other.purpose_key(PURPOSE_SUBJECT_INDEX) == ring.purpose_key(PURPOSE_SUBJECT_INDEX)
    assert other.data_key() == ring.data_key()
