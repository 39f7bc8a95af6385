"""The ``evidence`` and ``verify-evidence`` commands (registered by ``serve_journal.cli``)."""

from __future__ import annotations

import dataclasses
import getpass
import json
import sys

import click

from serve_journal.api import subject_tokenizer
from serve_journal.cli_input import expand_subjects, subject_token_option
from serve_journal.errors import ConfigError
from serve_journal.evidence.export import VERIFY_SCOPES, EvidenceError, export_evidence
from serve_journal.evidence.verify import verify_evidence
from serve_journal.integrity.trust import TrustError, resolve_trust
from serve_journal.read.query import to_json
from serve_journal.storage import open_storage


@click.command("evidence")
@click.option("--journal", "journal_uri", default="./journal", show_default=True)
@click.option("--request-id", "request_ids", multiple=True,
              help="A request id whose entry to export (repeat for several).")
@click.option("--subject", default=None,
              help="Subject id (turned into its token; never stored). '-' reads it from standard "
                   "input, keeping it out of shell history.")
@click.option("--subject-token", default=None, callback=subject_token_option,
              help="A subject token (32 lowercase hex characters).")
@click.option("--since", default=None, help="ISO time, inclusive (UTC).")
@click.option("--until", default=None, help="ISO time, exclusive (UTC).")
@click.option("--out", "out", required=True, help="The bundle to write (a new .zip file).")
@click.option("--public-key", default=None,
              help="The auditor's own copy of the journal's Ed25519 public key (PEM).")
@click.option("--key-fingerprint", default=None,
              help="Instead of --public-key: the key exported beside a local journal, pinned to "
                   "this SHA-256 fingerprint (hex, at least 16 digits).")
@click.option("--dev", is_flag=True, help="Development mode: trust the key beside the journal.")
@click.option("--privacy-dir", default=None, envvar="SERVE_JOURNAL_PRIVACY_DIR",
              help="Keyring folder --subject is tokenized with (default next to a local journal).")
@click.option("--verify-scope", default="journal", show_default=True,
              type=click.Choice(VERIFY_SCOPES),
              help="What the bundled verify summary covers: the whole journal, or the files "
                   "the entries sit in.")
@click.option("--witness", "witness_uri", default=None,
              help="Witness copy of the checkpoints, for the verify summary.")
@click.option("--as", "actor", default=None, help="Who exports (recorded in the access log).")
@click.option("--json", "as_json", is_flag=True,
              help="Print what was written (path, SHA-256, counts, members) as one JSON document.")
def evidence_command(journal_uri: str, request_ids: tuple[str, ...], subject: str | None,
                     subject_token: str | None, since: str | None, until: str | None, out: str,
                     public_key: str | None, key_fingerprint: str | None, dev: bool,
                     privacy_dir: str | None, verify_scope: str, witness_uri: str | None,
                     actor: str | None, as_json: bool = False) -> None:
    """Export the entries of requests or of one subject as an evidence bundle (zip) that
    `verify-evidence` checks offline; the export is recorded in the access log."""
    if sum((bool(request_ids), subject is not None, subject_token is not None)) != 1:
        raise click.UsageError("give --request-id (one or more), or --subject, or --subject-token")
    try:
        anchor = resolve_trust(journal_uri, public_key=public_key, fingerprint=key_fingerprint,
                               dev=dev)
    except (TrustError, OSError, ValueError) as exc:
        raise click.UsageError(str(exc)) from None
    tokenizer = None
    if subject is not None:
        subjects = expand_subjects([subject])
        if len(subjects) != 1:
            raise click.UsageError("--subject: one subject per bundle")
        subject = subjects[0]
        options = {"privacy_dir": privacy_dir} if privacy_dir else {}
        try:
            tokenizer = subject_tokenizer(journal_uri, **options)
        except ConfigError as exc:  # no keyring to tokenize with: says what to provision
            raise click.UsageError(f"--subject: {exc}") from None
    try:
        result = export_evidence(
            journal_uri, out, public_key=anchor.public_key, request_ids=request_ids,
            subject=subject, subject_token=subject_token, tokenizer=tokenizer, since=since,
            until=until, actor=actor or getpass.getuser(), verify_scope=verify_scope,
            witness=open_storage(witness_uri) if witness_uri else None)
    except UnicodeError:  # its message would quote a piece of the id
        raise click.UsageError("--subject must be valid UTF-8 text") from None
    except EvidenceError as exc:
        raise click.ClickException(str(exc)) from None
    except ValueError as exc:  # the message names the option, never a subject id
        raise click.UsageError(str(exc)) from None
    if as_json:
        click.echo(json.dumps(dataclasses.asdict(result), indent=1, sort_keys=True))
        return
    click.echo(result.describe())
    click.echo(f"access log: {result.access_record}")


@click.command("verify-evidence")
@click.argument("bundle", type=click.Path(dir_okay=False))
@click.option("--public-key", required=True,
              help="Your own copy of the journal's Ed25519 public key (PEM), obtained out of band.")
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON.")
@click.option("--show", is_flag=True, help="Then print the proven entries as JSON.")
def verify_evidence_command(bundle: str, public_key: str, as_json: bool, show: bool) -> None:
    """Check an evidence bundle offline (no journal, vault or network): exit code 0 only when
    every proof holds; otherwise 1 and one line per problem."""
    try:
        report = verify_evidence(bundle, public_key)
    except (OSError, ValueError) as exc:
        raise click.UsageError(f"--public-key: {exc}") from None
    click.echo(json.dumps(report.to_dict(), indent=2, sort_keys=True) if as_json
               else report.describe())
    if show and report.ok and report.table is not None:
        click.echo(to_json(report.table, indent=1))
    sys.exit(0 if report.ok else 1)


COMMANDS: list[tuple[click.Command, str]] = [
    (evidence_command, "evidence"),
    (verify_evidence_command, "verify-evidence"),
]
