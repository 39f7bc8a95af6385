"""Outside development mode nothing makes its own keys: replicas and writers refuse to start
without provisioned key material, and `serve-journal init-keys` provisions it (the signing key
apart from the privacy folder), printing the fingerprint auditors pin."""

from __future__ import annotations

import hashlib
import os

import pytest
from click.testing import CliRunner
from cryptography.hazmat.primitives import serialization

from serve_journal._private.wiring import build_counters_signer, build_privacy
from serve_journal.cli import main
from serve_journal.config import ConfigError, JournalConfig
from serve_journal.integrity.certificates import PURPOSE_COUNTERS, certified_keys
from serve_journal.integrity.manifest import load_public_key
from serve_journal.sink.settings import SinkSettings
from serve_journal.storage import open_storage


@pytest.fixture
def strict(monkeypatch, tmp_path):
    monkeypatch.setenv("SERVE_JOURNAL_DEV_MODE", "0")
    monkeypatch.delenv("SERVE_JOURNAL_KEK", raising=False)
    return str(tmp_path / "journal")


def test_a_replica_without_key_material_refuses_to_start(strict):
    config = JournalConfig.resolve(model="m", journal_uri=strict)
    assert config.dev_mode is False
    with pytest.raises(ConfigError, match="SERVE_JOURNAL_KEK.*init-keys"):
        build_privacy(config)
    assert not os.path.exists(os.path.join(os.path.dirname(strict), "journal-keys", "keys", "kek"))


def test_a_replica_without_a_certified_counters_key_refuses_to_start(strict, tmp_path):
    config = JournalConfig.resolve(model="m", journal_uri=strict)
    with pytest.raises(ConfigError, match="counters signing key.*init-keys"):
        build_counters_signer(config, open_storage(strict))
    # A key someone put there by hand, with no certificate in the journal: refused too.
    from serve_journal.integrity.manifest import ManifestSigner

    path = tmp_path / "counters.pem"
    ManifestSigner.generate().save(path)
    with pytest.raises(ConfigError, match="no certificate"):
        build_counters_signer(config.with_overrides(counters_key_file=str(path)),
                              open_storage(strict))


def test_a_writer_without_a_signing_key_refuses_to_start(strict):
    settings = SinkSettings(journal_uri=strict)
    assert settings.dev_mode is False
    with pytest.raises(ValueError, match="init-keys"):
        settings.signer()
    assert not os.path.exists(os.path.join(os.path.dirname(strict), "journal-signing"))


def test_init_keys_provisions_keys_apart_and_prints_the_fingerprint(strict):
    result = CliRunner().invoke(main, ["init-keys", "--journal", strict])
    assert result.exit_code == 0, result.output
    base = os.path.dirname(strict)
    assert os.path.exists(os.path.join(base, "journal-keys", "keys", "kek"))
    assert os.path.exists(os.path.join(base, "journal-signing", "manifest-signing.pem"))
    assert not os.path.exists(os.path.join(base, "journal-keys", "manifest-signing.pem"))
    public = os.path.join(base, "journal-signing", "manifest-signing.pub.pem")
    raw = load_public_key(public).public_bytes(serialization.Encoding.Raw,
                                               serialization.PublicFormat.Raw)
    assert hashlib.sha256(raw).hexdigest() in result.output
    # Now a replica and a writer start, and running init-keys again keeps the keys.
    config = JournalConfig.resolve(model="m", journal_uri=strict)
    pseudonymizer, _ = build_privacy(config)
    assert SinkSettings(journal_uri=strict).signer() is not None
    # The replicas' counters key sits with the keyring, certified by the manifest key.
    counters = build_counters_signer(config, open_storage(strict))
    assert os.path.exists(os.path.join(base, "journal-keys", "keys", "counters-signing.pem"))
    keys, bad = certified_keys(open_storage(strict), load_public_key(public), PURPOSE_COUNTERS)
    assert list(keys) == [counters.key_id] and not bad
    again = CliRunner().invoke(main, ["init-keys", "--journal", strict])
    assert hashlib.sha256(raw).hexdigest() in again.output


def test_dev_mode_comes_from_the_environment_and_is_validated(monkeypatch):
    monkeypatch.setenv("SERVE_JOURNAL_DEV_MODE", "1")
    assert JournalConfig.resolve(model="m").dev_mode is True
    monkeypatch.setenv("SERVE_JOURNAL_DEV_MODE", "maybe")
    with pytest.raises(ConfigError, match="SERVE_JOURNAL_DEV_MODE"):
        JournalConfig.resolve(model="m")
