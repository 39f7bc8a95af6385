"""The sink's options from the CLI and from a Serve config reach its consumer and writer: TLS and
SASL for Kafka (passwords from the environment, never in a repr), and the signing key, witness
and write-once retention an ``s3://`` journal needs."""

from __future__ import annotations

import json

from click.testing import CliRunner

from serve_journal import cli
from serve_journal.sink.kafka_app import _mapping, sink_settings


def test_sink_settings_take_security_from_options_and_passwords_from_the_environment(monkeypatch):
    monkeypatch.setenv("SERVE_JOURNAL_KAFKA_SASL_PASSWORD", "s3cret-pw")
    consumer, writer = sink_settings(
        "broker:9093", "journal", "0-3", "s3://bucket/journal",
        kafka={"security_protocol": "SASL_SSL", "sasl_mechanism": "SCRAM-SHA-512",
               "sasl_plain_username": "sink"},
        journal={"signing_key_file": "/keys/signing.pem", "witness_uri": "s3://witness/w",
                 "retention": {"cold": {"name": "custom", "years": 7}}})
    assert consumer.partitions == (0, 1, 2, 3)
    assert consumer.security_protocol == "SASL_SSL" and consumer.sasl_plain_password == "s3cret-pw"
    assert "s3cret-pw" not in repr(consumer)
    assert writer.signing_key_file == "/keys/signing.pem"
    assert writer.witness_uri == "s3://witness/w"
    assert writer.retention == {"cold": {"name": "custom", "years": 7}}


def test_serve_config_options_may_be_mappings_or_json():
    assert _mapping({"kafka": '{"security_protocol": "SSL"}'}, "kafka") == {
        "security_protocol": "SSL"}
    assert _mapping({"journal": {"witness_uri": "w"}}, "journal") == {"witness_uri": "w"}
    assert _mapping({}, "kafka") is None


def test_cli_sink_passes_tls_sasl_signing_witness_and_retention(monkeypatch):
    seen = {}
    monkeypatch.setattr(cli, "run_journal_sink",
                        lambda *args, **kwargs: seen.update(args=args, **kwargs))
    result = CliRunner().invoke(cli.main, [
        "sink", "--bootstrap", "b:9093", "--topic", "t", "--partitions", "0-1",
        "--journal", "s3://bucket/j", "--security-protocol", "SASL_SSL",
        "--sasl-mechanism", "PLAIN", "--sasl-username", "u", "--ssl-cafile", "/ca.pem",
        "--signing-key-file", "/k.pem", "--witness", "s3://w/w",
        "--retention", json.dumps({"hot": {"name": "custom", "days": 35}})])
    assert result.exit_code == 0, result.output
    assert seen["kafka"]["security_protocol"] == "SASL_SSL"
    assert seen["kafka"]["sasl_plain_username"] == "u"
    assert seen["journal"] == {"witness_uri": "s3://w/w", "signing_key_file": "/k.pem",
                               "retention": {"hot": {"name": "custom", "days": 35}}}
