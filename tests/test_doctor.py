"""``serve-journal doctor``: each check passes on a good deployment and names the problem on a bad
one, with real parts: a local journal provisioned by ``init-keys``, a moto S3 bucket with and
without Object Lock, a tansu broker and a dead port, an MLflow registry on sqlite and an
unreachable registry URL."""

from __future__ import annotations

import json
import os
import shutil
import socket
import uuid

import pyarrow as pa
import pytest
from click.testing import CliRunner

from serve_journal.cli import main
from serve_journal.doctor import check_deployment
from serve_journal.integrity.manifest import ManifestSigner
from serve_journal.privacy.keyring import KEK_ENV, FileKek, Keyring
from serve_journal.sink.settings import SinkSettings
from tests.helpers.entries import make_entries
from tests.helpers.journal import write_signed


def _dead_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]  # closed again: nothing listens there


def _status(report, check: str) -> list[str]:
    return [c.status for c in report.checks if c.check == check]


def _details(report, check: str) -> str:
    return " | ".join(c.detail for c in report.checks if c.check == check)


@pytest.fixture
def deployment(tmp_path, monkeypatch):
    """A local journal provisioned like production (init-keys) holding signed entries whose
    key id is the keyring's current data key."""
    monkeypatch.delenv(KEK_ENV, raising=False)
    monkeypatch.delenv("SERVE_JOURNAL_PRIVACY_DIR", raising=False)
    journal = str(tmp_path / "journal")
    made = CliRunner().invoke(main, ["--no-progress", "init-keys", "--journal", journal])
    assert made.exit_code == 0, made.output
    keys = tmp_path / "journal-keys"
    ring = Keyring(keys / "keys" / "keyring.json", FileKek(keys / "keys" / "kek"), create=False)
    table = make_entries(40)
    table = table.set_column(table.schema.get_field_index("key_id"), "key_id",
                             pa.array([ring.current_key_id] * table.num_rows))
    settings = SinkSettings(journal)
    write_signed(settings, settings.storage(), "w00", table, files=2)
    return journal, keys, tmp_path


def test_a_good_local_deployment_passes_every_configured_check(deployment):
    journal, keys, tmp_path = deployment
    public = tmp_path / "journal-signing" / "manifest-signing.pub.pem"
    report = check_deployment(journal, public_key=str(public))
    assert report.ok, report.format_text()
    assert _status(report, "keys") == ["ok"] and _status(report, "counters-key") == ["ok"]
    assert _status(report, "signing-key") == ["ok"]
    assert _status(report, "object-lock") == ["skipped"]  # not s3://
    assert _status(report, "broker") == ["skipped"] and _status(report, "registry") == ["skipped"]
    result = CliRunner().invoke(main, ["--no-progress", "doctor", "--journal", journal,
                                       "--public-key", str(public), "--json"])
    assert result.exit_code == 0, result.output
    doc = json.loads(result.stdout)
    assert doc["ok"] is True and {c["check"] for c in doc["checks"]} >= {
        "keys", "counters-key", "signing-key", "object-lock", "broker", "registry"}


def test_a_missing_kek_file_is_named(deployment):
    journal, keys, _ = deployment
    os.remove(keys / "keys" / "kek")
    report = check_deployment(journal)
    assert not report.ok and _status(report, "keys") == ["problem"]
    assert "no KEK" in _details(report, "keys") and str(keys / "keys" / "kek") in _details(
        report, "keys")
    result = CliRunner().invoke(main, ["--no-progress", "doctor", "--journal", journal])
    assert result.exit_code == 1 and "PROBLEM  keys:" in result.stdout, result.output


def test_a_missing_keyring_file_is_named_and_not_created(deployment):
    journal, keys, _ = deployment
    os.remove(keys / "keys" / "keyring.json")
    report = check_deployment(journal)
    assert "no keyring file" in _details(report, "keys")
    assert not (keys / "keys" / "keyring.json").exists()  # doctor never writes


def test_loose_modes_are_named(deployment):
    journal, keys, tmp_path = deployment
    os.chmod(keys / "keys" / "keyring.json", 0o644)
    os.chmod(tmp_path / "journal-signing" / "manifest-signing.pem", 0o640)
    report = check_deployment(journal)
    assert "keyring.json has mode 0644" in _details(report, "keys")
    assert _status(report, "signing-key") == ["problem"]
    assert "mode 640" in _details(report, "signing-key")


def test_a_signing_key_that_is_not_the_pinned_one_is_named(deployment):
    journal, _, tmp_path = deployment
    other = tmp_path / "other.pub.pem"
    other.write_bytes(ManifestSigner.generate().export_public_key())
    report = check_deployment(journal, public_key=str(other))
    assert _status(report, "signing-key") == ["problem"]
    assert "is not the key of the pinned public key" in _details(report, "signing-key")
    pinned = check_deployment(journal, key_fingerprint="00" * 16)
    assert "not the pinned" in _details(pinned, "signing-key")
    cli = CliRunner().invoke(main, ["--no-progress", "doctor", "--journal", journal,
                                    "--public-key", str(other), "--json"])
    assert cli.exit_code == 1
    assert any(c["check"] == "signing-key" and c["status"] == "problem"
               for c in json.loads(cli.stdout)["checks"])


def test_a_signing_key_that_did_not_sign_the_journal_is_named(deployment):
    journal, _, tmp_path = deployment
    stranger = ManifestSigner.generate()
    key_file = tmp_path / "stranger.pem"
    stranger.save(key_file)
    report = check_deployment(journal, signing_key_file=str(key_file))
    assert f"not by this key ({stranger.key_id})" in _details(report, "signing-key")


def test_nodes_with_different_keyrings_and_unknown_key_ids_are_named(deployment, monkeypatch):
    journal, keys, tmp_path = deployment
    node2 = tmp_path / "node2"
    shutil.copytree(keys, node2)
    ring = Keyring(node2 / "keys" / "keyring.json", FileKek(node2 / "keys" / "kek"), create=False)
    ring.rotate()  # node 2 rotated; node 1 never got the new key
    report = check_deployment(journal, privacy_dirs=[str(keys), str(node2)])
    assert _status(report, "keys") == ["ok", "ok"]
    assert _status(report, "keys-consistent") == ["problem"]
    assert "differ" in _details(report, "keys-consistent")
    same = check_deployment(journal, privacy_dirs=[str(keys), str(keys)])
    assert _status(same, "keys-consistent") == ["ok"]
    # Entries written under node 2's new key: node 1's keyring cannot resolve them.
    table = make_entries(5, seq_start=1000, producer="p-2")
    table = table.set_column(table.schema.get_field_index("key_id"), "key_id",
                             pa.array([ring.current_key_id] * table.num_rows))
    settings = SinkSettings(journal)
    write_signed(settings, settings.storage(), "w01", table, files=1)
    lacking = check_deployment(journal, privacy_dirs=[str(keys)])
    assert ring.current_key_id in _details(lacking, "keys") and "lacks" in _details(lacking, "keys")


def _s3_journal(server, bucket: str) -> str:
    host = server.endpoint_url.split("://", 1)[1]
    return f"s3://{bucket}/j?endpoint_override={host}&scheme=http&region={server.region}"


def test_object_lock_on_moto_enabled_and_missing(s3_bucket, monkeypatch):
    server = s3_bucket.server
    for name, value in server.env.items():
        monkeypatch.setenv(name, value)
    good = check_deployment(_s3_journal(server, s3_bucket.name))
    assert _status(good, "object-lock") == ["ok"], good.format_text()
    plain = f"plain-{uuid.uuid4().hex[:10]}"
    server.client().create_bucket(Bucket=plain)  # no Object Lock
    bad = check_deployment(_s3_journal(server, plain))
    assert _status(bad, "object-lock") == ["problem"]
    assert f"bucket {plain}" in _details(bad, "object-lock")
    assert _status(bad, "keys") == ["problem"]  # a remote journal names its privacy folders
    result = CliRunner().invoke(main, ["--no-progress", "doctor", "--journal",
                                       _s3_journal(server, plain), "--json"])
    assert result.exit_code == 1
    assert {c["check"]: c["status"] for c in json.loads(result.stdout)["checks"]}[
        "object-lock"] == "problem"


def test_broker_reachable_and_a_dead_port(deployment, kafka_broker):
    journal, _, _ = deployment
    kafka_broker.create_topic("journal", 1)
    good = check_deployment(journal, bootstrap=kafka_broker.bootstrap, topic="journal")
    assert _status(good, "broker") == ["ok"], _details(good, "broker")
    missing = check_deployment(journal, bootstrap=kafka_broker.bootstrap, topic="nope")
    assert "no topic 'nope'" in _details(missing, "broker")
    dead = f"127.0.0.1:{_dead_port()}"
    bad = check_deployment(journal, bootstrap=dead, timeout=1.0)
    assert _status(bad, "broker") == ["problem"] and dead in _details(bad, "broker")


@pytest.mark.slow  # over 1.5 s: kept out of the fast tier, runs in the full suite
def test_registry_reachable_and_unreachable(deployment, tmp_path):
    journal, _, _ = deployment
    from mlflow.tracking import MlflowClient

    uri = f"sqlite:///{tmp_path / 'registry.db'}"
    MlflowClient(tracking_uri=uri, registry_uri=uri).search_registered_models()  # creates it
    good = check_deployment(journal, tracking_uri=uri)
    assert _status(good, "registry") == ["ok"], _details(good, "registry")
    dead = f"http://127.0.0.1:{_dead_port()}"
    bad = check_deployment(journal, tracking_uri=dead, timeout=1.0)
    assert _status(bad, "registry") == ["problem"] and dead in _details(bad, "registry")
    typo = check_deployment(journal, tracking_uri=f"sqlite:///{tmp_path / 'typo.db'}")
    assert "no registry database" in _details(typo, "registry")
    assert not (tmp_path / "typo.db").exists()
