"""The ``serve-journal`` command line: one command per public entry point of the read,
maintenance, privacy and sink tools. The demo is not a command: ``python -m
serve_journal.examples.demo`` (``scripts/demo.sh``) runs it, so library code never imports it."""

from __future__ import annotations

import dataclasses
import datetime as dt
import getpass
import json
import logging
import os
import sys
from collections.abc import Callable
from typing import Any

import click
import pyarrow as pa

from serve_journal import progress
from serve_journal.api import caller_tokenizer, subject_tokenizer
from serve_journal.catalog.layout import DEFAULT_SPEC
from serve_journal.cli_input import (
    expand_subjects,
    parse_retention,
    subject_token_option,
    writer_options,
)
from serve_journal.config import JournalConfig
from serve_journal.console import write_report
from serve_journal.console.commands import console_command, console_user
from serve_journal.doctor import check_deployment
from serve_journal.errors import ArchivedObjectError, ConfigError
from serve_journal.evidence.cli import COMMANDS as EVIDENCE_COMMANDS
from serve_journal.iceberg_cli import COMMANDS as ICEBERG_COMMANDS
from serve_journal.integrity.certificates import COUNTERS_KEY_FILE, provision_key
from serve_journal.integrity.manifest import ManifestSigner
from serve_journal.integrity.trust import TrustError, key_fingerprint, resolve_trust, signing_dir
from serve_journal.maintain.compaction import CompactionOptions, run_compaction
from serve_journal.maintain.lifecycle import (
    bytes_per_entry,
    run_lifecycle,
    s3_lifecycle_configuration,
)
from serve_journal.maintain.rewrite import MEMORY_LIMIT_ENV, parse_memory_limit
from serve_journal.outcomes.cli import COMMANDS as OUTCOME_COMMANDS
from serve_journal.outcomes.cli import performance_classes, performance_options
from serve_journal.outcomes.join import JOINED_COLUMNS, join_outcomes
from serve_journal.outcomes.performance import performance as outcome_performance
from serve_journal.privacy.forget import ForgetHooks, ForgetIncompleteError, forget_subject
from serve_journal.privacy.keyring import Keyring
from serve_journal.privacy.vault import SubjectVault
from serve_journal.read.query import (
    TABLE_COLUMNS,
    JournalQuery,
    format_table,
    to_json,
    write_parquet,
)
from serve_journal.read.stats import stats as journal_stats
from serve_journal.read.verify import format_report, load_heads, save_heads, verify_journal
from serve_journal.read.verify_archived import ARCHIVED_MODES
from serve_journal.registry import dataset_manifest, register_dataset_manifest
from serve_journal.replay.driver import replay_command
from serve_journal.sink.kafka_app import run_journal_sink
from serve_journal.sink.settings import SinkSettings
from serve_journal.storage import local_root, open_storage
from serve_journal.storage.archive import (
    RESTORE_TIERS,
    restore_archived,
    restore_command,
    unreadable_archived,
)
from serve_journal.times import as_utc
from serve_journal.transport.kafka_security import SASL_MECHANISMS, SECURITY_PROTOCOLS


def _echo_json(document: Any) -> None:
    """One JSON document on standard output (``--json``): datetimes and the like as strings."""
    click.echo(json.dumps(document, indent=1, sort_keys=True, default=str))


@click.group()
@click.version_option(package_name="serve-journal")
@click.option("--progress/--no-progress", "show_progress", default=True, show_default=True,
              help="Progress of long commands on standard error: a bar on a terminal, a plain "
                   "line every few seconds otherwise. Standard output (--json) is unaffected.")
@click.option("--progress-interval", default=progress.DEFAULT_INTERVAL_S, show_default=True,
              type=click.FloatRange(min=0), envvar="SERVE_JOURNAL_PROGRESS_INTERVAL",
              help="Seconds between progress lines when standard error is not a terminal.")
@click.pass_context
def main(ctx: click.Context, show_progress: bool, progress_interval: float) -> None:
    """serve-journal: the prediction journal for Ray Serve."""
    if show_progress:
        progress.enable(interval=progress_interval)
        ctx.call_on_close(progress.disable)


@main.command()
@click.argument("paths", nargs=-1, required=True, type=click.Path(exists=True))
@click.option("--model", "model_name", help="Registered model name to tag.")
@click.option("--version", "model_version", help="Model version to tag.")
@click.option("--tracking-uri", default=None, help="MLflow tracking/registry URI.")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON document.")
def manifest(paths: tuple[str, ...], model_name: str | None, model_version: str | None,
             tracking_uri: str | None, as_json: bool) -> None:
    """Compute a dataset manifest hash; with --model/--version, log and tag it in MLflow."""
    if bool(model_name) != bool(model_version):
        raise click.UsageError("give both --model and --version, or neither")
    if model_name:
        result = register_dataset_manifest(model_name, model_version, list(paths),
                                           tracking_uri=tracking_uri)
    else:
        result = dataset_manifest(list(paths))
    if as_json:
        _echo_json({"files": len(result.files), "digest": result.digest})
        return
    click.echo(f"{len(result.files)} files")
    click.echo(result.digest)


@main.command()
@click.option("--journal", "journal_uri", default="./journal", show_default=True)
@click.option("--subject", default=None,
              help="Subject id (turned into its token; never stored). '-' reads ids from "
                   "standard input, one per line, keeping them out of shell history.")
@click.option("--subject-token", default=None, callback=subject_token_option,
              help="A subject token (32 lowercase hex characters).")
@click.option("--caller", default=None,
              help="Caller id (or its ct- token); also finds entries journaled with "
                   "caller_privacy=token.")
@click.option("--request-id", default=None)
@click.option("--trace-id", default=None,
              help="W3C trace id (32 hex digits) the entry recorded from its request's span.")
@click.option("--model", default=None)
@click.option("--model-version", default=None)
@click.option("--decision", default=None)
@click.option("--outcome", default=None)
@click.option("--since", default=None, help="ISO time, inclusive (UTC).")
@click.option("--until", default=None, help="ISO time, exclusive (UTC).")
@click.option("--limit", default=None, type=int)
@click.option("--tier", default="all", type=click.Choice(["hot", "cold", "all"]), show_default=True,
              help="Which tier to search: every tier by default (hot files, compacted days and "
                   "the cold tier); 'hot' or 'cold' to restrict.")
@click.option("--as", "actor", default=None, help="Who is asking (recorded in the access log).")
@click.option("--json", "as_json", is_flag=True, help="Print JSON lines instead of a table.")
@click.option("--parquet", "parquet_path", default=None, help="Write the result to this file.")
@click.option("--with-outcomes", is_flag=True,
              help="Add each entry's latest recorded outcome (outcome_label, outcome_value, "
                   "outcome_time, outcome_source, outcome_recorded_at; docs/outcomes.md).")
def query(journal_uri: str, subject: str | None, subject_token: str | None, caller: str | None,
          request_id: str | None, trace_id: str | None, model: str | None,
          model_version: str | None,
          decision: str | None, outcome: str | None, since: str | None, until: str | None,
          limit: int | None, tier: str, actor: str | None, as_json: bool,
          parquet_path: str | None, with_outcomes: bool) -> None:
    """Find journal entries; every query is recorded in the journal's access log."""
    subjects: list[str | None] = [None] if subject is None else list(expand_subjects([subject]))
    # The subject key is needed only to look a subject up (a request-id or trace lookup on a
    # machine without the privacy folder must not fail for want of it).
    q = JournalQuery(journal_uri, tokenizer=subject_tokenizer(journal_uri) if subject else None,
                     caller_tokenizer=caller_tokenizer(journal_uri) if caller else None,
                     actor=actor or getpass.getuser())
    try:
        tables = [q.find(subject=one, subject_token=subject_token, caller=caller,
                         request_id=request_id, trace_id=trace_id, model=model,
                         model_version=model_version, decision=decision, outcome=outcome,
                         since=since, until=until, limit=limit, tier=tier)
                  for one in subjects]
    except UnicodeError:  # its message would quote a piece of the id
        raise click.UsageError("--subject must be valid UTF-8 text") from None
    except ArchivedObjectError as exc:
        click.echo(f"error: {exc} (or search the hot tier only: --tier hot)", err=True)
        sys.exit(3)
    except ValueError as exc:  # the message names the option, never a subject id
        raise click.UsageError(str(exc)) from None
    except Exception:
        # The scan reports a GET of an archived (Glacier) object as a generic read error: say
        # which files need a restore when that is why, else let the failure through.
        blocked = unreadable_archived(q.storage, [f.path for f in q.files(
            model=model, since=since, until=until, tier=tier)])
        if not blocked:
            raise
        click.echo(f"error: {ArchivedObjectError(blocked, restore_command(q.storage))} "
                   "(or search the hot tier only: --tier hot)", err=True)
        sys.exit(3)
    finally:
        q.close()
    table = tables[0]
    if len(tables) > 1:
        table = pa.concat_tables(tables).sort_by(
            [("ts", "ascending"), ("producer_id", "ascending"), ("seq", "ascending")])
        if limit is not None:
            table = table.slice(0, limit)
    columns = list(TABLE_COLUMNS)
    if with_outcomes:
        table = join_outcomes(table, journal_uri)
        columns += [name for name, _, _ in JOINED_COLUMNS if name != "outcome_recorded_at"]
    if parquet_path:
        write_parquet(table, parquet_path)
        click.echo(f"wrote {table.num_rows} entries to {parquet_path}")
    elif as_json:
        click.echo(to_json(table))
    else:
        click.echo(format_table(table, columns))


AS_OF_HELP = ("ISO time the run treats as now (default: now, UTC). A day counts as finished once "
              "it is over at this time: pass tomorrow to close today early, after its writers "
              "stopped (e.g. a region's end of business).")


def _parse_time(value: str | None, name: str) -> dt.datetime | None:
    try:
        return as_utc(value, name)
    except ValueError as exc:
        raise click.BadParameter(str(exc)) from None


def _reports_dir(journal_uri: str, reports_dir: str | None) -> str | None:
    """``reports_dir``, else ``journal-reports`` beside a local journal; ``None`` for a remote one."""
    if reports_dir is not None:
        return reports_dir
    root = local_root(journal_uri)
    return None if root is None else os.path.join(os.path.dirname(root), "journal-reports")


def _save_report(journal_uri: str, reports_dir: str | None, prefix: str, document: dict) -> None:
    """Keep a summary where the console shows the latest one (next to a local journal)."""
    folder = _reports_dir(journal_uri, reports_dir)
    if folder is not None:
        write_report(folder, prefix, document)


def _default_privacy_dir(journal_uri: str, privacy_dir: str | None) -> str:
    return JournalConfig(model="unused", journal_uri=journal_uri,
                         privacy_dir=privacy_dir).resolved_privacy_dir()


@main.command()
@click.option("--journal", "journal_uri", default="./journal", show_default=True)
@click.option("--since", default=None, help="Only files and records from this ISO time on.")
@click.option("--model", default=None)
@click.option("--public-key", default=None,
              help="The auditor's own copy of the Ed25519 public key (PEM).")
@click.option("--key-fingerprint", default=None,
              help="Instead of --public-key: use the key exported beside a local journal, pinned "
                   "to this SHA-256 fingerprint (hex, at least 16 digits).")
@click.option("--dev", is_flag=True,
              help="Development mode: trust the key beside the journal unpinned.")
@click.option("--witness", "witness_uri", default=None, help="Witness copy of the checkpoints.")
@click.option("--privacy-dir", default=None, envvar="SERVE_JOURNAL_PRIVACY_DIR")
@click.option("--reports-dir", default=None,
              help="Where to keep the summary (default: journal-reports next to a local journal).")
@click.option("--heads", "heads_file", default=None,
              help="Chain heads file: checked against, then updated after a clean run (default: "
                   "verify-heads.json in the reports folder of a local journal).")
@click.option("--expect-heads", "expect_heads_file", default=None,
              help="Chain heads file to check against, left unchanged.")
@click.option("--archived", default="report", show_default=True, type=click.Choice(ARCHIVED_MODES),
              help="Archived (S3 Glacier, not restored) files: 'report' them as restore needed, "
                   "or check them from their signed manifest 'records' (content not re-hashed).")
@click.option("--json", "as_json", is_flag=True)
def verify(journal_uri: str, since: str | None, model: str | None, public_key: str | None,
           witness_uri: str | None, privacy_dir: str | None, reports_dir: str | None,
           heads_file: str | None, expect_heads_file: str | None, key_fingerprint: str | None,
           dev: bool, archived: str, as_json: bool) -> None:
    """Prove the journal complete and unaltered; exit code 0 only when everything checks.

    The signed chain heads of a clean run are kept (--heads), and the next run refuses a journal
    whose signed history went backwards: tail truncation and rollback are caught without a
    witness too."""


    storage = open_storage(journal_uri)
    try:
        anchor = resolve_trust(journal_uri, public_key=public_key, fingerprint=key_fingerprint,
                               dev=dev)
    except (TrustError, OSError, ValueError) as exc:
        raise click.UsageError(str(exc)) from None
    if public_key is None and key_fingerprint is None:
        click.echo(f"{anchor.source}", err=True)
    witness = open_storage(witness_uri) if witness_uri else None
    if heads_file is None and expect_heads_file is None:
        folder = _reports_dir(journal_uri, reports_dir)
        heads_file = os.path.join(folder, "verify-heads.json") if folder else None
    try:
        expected = load_heads(expect_heads_file or heads_file) if (expect_heads_file or heads_file) \
            else None
    except (OSError, ValueError) as exc:
        raise click.UsageError(f"cannot read the chain heads: {exc}") from None
    if expect_heads_file and expected is None:
        raise click.UsageError(f"--expect-heads {expect_heads_file}: no such file")
    report = verify_journal(storage, public_key=anchor.public_key, witness=witness,
                            since=_parse_time(since, "--since"), model=model,
                            expected_heads=expected, archived=archived)
    click.echo(report.to_json() if as_json else format_report(report))
    _save_report(journal_uri, reports_dir, "verify-", report.to_dict())
    if report.ok and heads_file and not expect_heads_file and since is None and model is None:
        save_heads(heads_file, report, expected)
    sys.exit(0 if report.ok else 1)


@main.command()
@click.option("--journal", "journal_uri", default="./journal", show_default=True)
@click.option("--subject", required=True,
              help="The data subject's id (never stored or logged). '-' reads ids from standard "
                   "input, one per line, keeping them out of shell history.")
@click.option("--privacy-dir", default=None, envvar="SERVE_JOURNAL_PRIVACY_DIR", help="Keyring folder (default next to a local journal).")
@click.option("--vault-url", default=None, envvar="SERVE_JOURNAL_VAULT_URL", help="postgresql://... (default: SQLite in privacy dir; env SERVE_JOURNAL_VAULT_URL keeps its password off the command line).")
@click.option("--purge-hook", default=None,
              help="Deletes the subject's feature history: 'module:function' (called with the "
                   "subject id) or 'features:PATH' (the built-in Parquet feature store purge). "
                   "Default: SERVE_JOURNAL_PURGE_HOOK.")
@click.option("--retraining-hook", default=None,
              help="'module:function' called with the forget event (token, model versions; no "
                   "id), e.g. to schedule retraining. Default: SERVE_JOURNAL_RETRAINING_HOOK.")
@click.option("--json", "as_json", is_flag=True,
              help="Print one JSON document: {\"receipts\": [...]} (tokens, never ids).")
def forget(journal_uri: str, subject: str, privacy_dir: str | None, vault_url: str | None,
           purge_hook: str | None, retraining_hook: str | None, as_json: bool) -> None:
    """Right to be forgotten: destroy the subject's key; their entries become unlinkable.

    Exit code 2 when a hook failed, 3 when archived files kept the entry count from being
    complete (the key is destroyed either way; the receipt says which)."""
    try:
        hooks = ForgetHooks.resolve(purge_hook, retraining_hook)
    except ConfigError as exc:
        raise click.UsageError(str(exc)) from None
    subjects = expand_subjects([subject])
    privacy_dir = _default_privacy_dir(journal_uri, privacy_dir)
    incomplete = uncounted = False
    receipts: list[Any] = []
    for one in subjects:
        try:
            receipt = forget_subject(one, journal_uri=journal_uri, privacy_dir=privacy_dir,
                                     vault_url=vault_url, hooks=hooks)
        except ForgetIncompleteError as exc:
            click.echo(f"error: {exc}", err=True)
            incomplete = True
            receipt = exc.receipt
            receipts.append(json.loads(receipt.to_json()))
        else:
            receipts.append(json.loads(receipt.to_json()))
            if not as_json:
                click.echo(receipt.to_json())
        if receipt.uncounted_files:
            uncounted = True
            click.echo(f"restore needed: {len(receipt.uncounted_files)} archived file(s) were not "
                       f"counted (the key is destroyed; their entries are unlinkable too); to "
                       f"count them run: {receipt.restore_command}", err=True)
    if as_json:
        _echo_json({"receipts": receipts, "hooks_failed": incomplete, "uncounted": uncounted})
    if incomplete:
        sys.exit(2)
    if uncounted:
        sys.exit(3)


@main.command()
@click.option("--journal", "journal_uri", required=True, help="s3://bucket/prefix?... journal.")
@click.option("--days", default=7, show_default=True, type=click.IntRange(min=1),
              help="How long the restored copies stay readable.")
@click.option("--tier", default="Standard", show_default=True, type=click.Choice(RESTORE_TIERS),
              help="Retrieval tier (Expedited is not available for DEEP_ARCHIVE).")
@click.option("--since", default=None, help="Only partitions from this ISO date/time on.")
@click.option("--until", default=None, help="Only partitions before this ISO date/time.")
@click.option("--json", "as_json", is_flag=True,
              help="Print one JSON document: the state of each archived file.")
def restore(journal_uri: str, days: int, tier: str, since: str | None, until: str | None,
            as_json: bool) -> None:
    """Restore archived journal files (S3 Glacier / Deep Archive) so verify, forget and replay
    can read them (S3 RestoreObject). Safe to run again: it reports restores in progress and
    done; exit code 0 once every selected file is readable, 75 while restores are in progress."""
    storage = open_storage(journal_uri)
    lo, hi = _parse_time(since, "--since"), _parse_time(until, "--until")
    states = restore_archived(storage, _archived_in_range(storage, lo, hi), days=days, tier=tier)
    pending = sorted(p for p, s in states.items() if s != "restored")
    if as_json:
        _echo_json({"journal": storage.uri, "files": dict(sorted(states.items())),
                    "pending": len(pending),
                    "restore_command": restore_command(storage) if pending else None})
        if pending:
            sys.exit(75)
        return
    if not states:
        click.echo(f"no archived files in {storage.uri}" + (" in that range" if lo or hi else ""))
        return
    tally: dict[str, int] = {}
    for state in states.values():
        tally[state] = tally.get(state, 0) + 1
    click.echo(f"archived files: {len(states)}; " + ", ".join(
        f"{label} {tally.get(key, 0)}" for key, label in (
            ("started", "restore started"), ("in-progress", "restore in progress"),
            ("restored", "restored (readable)"))))
    if pending:
        click.echo(f"run again later to check: {restore_command(storage)}")
        sys.exit(75)


def _archived_in_range(storage: Any, since: dt.datetime | None,
                       until: dt.datetime | None) -> list[str] | None:
    """The data files whose partition overlaps ``[since, until)``; ``None`` for all."""
    if since is None and until is None:
        return None
    out = []
    for path in storage.list_files("", ".parquet"):
        try:
            _, key = DEFAULT_SPEC.parse(path)
        except ValueError:
            continue
        if (since is None or key.end > since) and (until is None or key.start < until):
            out.append(path)
    return out


@main.command("init-keys")
@click.option("--journal", "journal_uri", default="./journal", show_default=True)
@click.option("--privacy-dir", default=None, envvar="SERVE_JOURNAL_PRIVACY_DIR",
              help="Keyring folder (default journal-keys beside a local journal).")
@click.option("--signing-key-file", default=None,
              help="Where to create the manifest signing key (default journal-signing/ beside "
                   "a local journal).")
@click.option("--counters-key-file", default=None,
              help="Where to create the replicas' counters key (default "
                   "<privacy-dir>/keys/counters-signing.pem).")
@click.option("--json", "as_json", is_flag=True,
              help="Print one JSON document: the paths and the public key's fingerprint (never "
                   "key material).")
def init_keys(journal_uri: str, privacy_dir: str | None, signing_key_file: str | None,
              counters_key_file: str | None, as_json: bool) -> None:
    """Provision the key material replicas and writers need outside development mode: the KEK
    (unless SERVE_JOURNAL_KEK is set), the keyring, the replicas' counters key (certified by the
    manifest key; the certificate goes into the journal), and the manifest signing key, kept
    apart. Prints the public key's fingerprint for auditors to pin. Existing keys are kept."""
    folder = _default_privacy_dir(journal_uri, privacy_dir)
    Keyring.local_default(folder)
    if signing_key_file is None:
        signing = signing_dir(journal_uri)
        if signing is None:
            raise click.UsageError("a remote journal needs --signing-key-file")
        signer = ManifestSigner.load_or_generate(signing)
        public = os.path.join(signing, "manifest-signing.pub.pem")
    else:
        if os.path.exists(signing_key_file):
            signer = ManifestSigner.from_pem_file(signing_key_file)
        else:
            signer = ManifestSigner.generate()
            signer.save(signing_key_file)
        public = f"{signing_key_file}.pub.pem"
    with open(public, "wb") as handle:
        handle.write(signer.export_public_key())
    counters_key = counters_key_file or os.path.join(folder, "keys", COUNTERS_KEY_FILE)
    provision_key(counters_key, signer, open_storage(journal_uri))
    if as_json:
        _echo_json({"keyring": os.path.join(folder, "keys"), "counters_key": counters_key,
                    "public_key": public, "fingerprint": key_fingerprint(signer.public_key)})
        return
    click.echo(f"keyring: {os.path.join(folder, 'keys')}")
    click.echo(f"counters key (ship with the keyring): {counters_key}")
    click.echo(f"public key: {public}")
    click.echo(f"fingerprint (pin with verify --key-fingerprint): {key_fingerprint(signer.public_key)}")


@main.command("vault-rewrap")
@click.option("--journal", "journal_uri", default="./journal", show_default=True)
@click.option("--privacy-dir", default=None, envvar="SERVE_JOURNAL_PRIVACY_DIR", help="Keyring folder (default next to a local journal).")
@click.option("--vault-url", default=None, envvar="SERVE_JOURNAL_VAULT_URL", help="postgresql://... (default: SQLite in privacy dir; env SERVE_JOURNAL_VAULT_URL keeps its password off the command line).")
@click.option("--json", "as_json", is_flag=True,
              help="Print the report as JSON (the default output is that JSON already).")
def vault_rewrap(journal_uri: str, privacy_dir: str | None, vault_url: str | None,
                 as_json: bool) -> None:
    """Re-encrypt every subject key under a fresh wrap key and destroy the old one, so copies of
    the vault taken earlier (PostgreSQL dead tuples, WAL archives, replicas, backups) can no longer
    yield a forgotten subject's key. Run it once per deletion deadline; see docs/security.md."""
    folder = _default_privacy_dir(journal_uri, privacy_dir)
    keyring = Keyring.local_default(folder)
    vault = (SubjectVault.local_default(folder, keyring) if vault_url is None
             else SubjectVault.open(vault_url, keyring))
    try:
        report = vault.rewrap()
    finally:
        vault.close()
    click.echo(json.dumps(dataclasses.asdict(report), indent=1, sort_keys=True, default=str))


@main.command("stats")
@click.option("--journal", "journal_uri", default="./journal", show_default=True)
@click.option("--since", default=None)
@click.option("--until", default=None)
@click.option("--model", default=None)
@click.option("--group-by", default="model_name,decision,risk_tier", show_default=True)
@performance_options
@click.option("--json", "as_json", is_flag=True, help="Print one JSON document.")
def stats_command(journal_uri: str, since: str | None, until: str | None, model: str | None,
                  group_by: str, positive_decisions: tuple[str, ...],
                  positive_labels: tuple[str, ...], negative_labels: tuple[str, ...],
                  source: str | None, as_json: bool) -> None:
    """Exact counts (unsampled counters), weighted estimates from the sampled journal, and
    performance on labelled decisions."""
    storage = open_storage(journal_uri)
    start, end = _parse_time(since, "--since"), _parse_time(until, "--until")
    report = journal_stats(storage, start, end, model,
                           group_by=[c.strip() for c in group_by.split(",") if c.strip()])
    try:
        perf = outcome_performance(storage, start, end, model, **performance_classes(
            positive_decisions, positive_labels, negative_labels, source))
    except ValueError as exc:
        raise click.UsageError(str(exc)) from None
    sizes = {tier: bytes_per_entry(storage, tier) for tier in ("hot", "cold")}
    if as_json:
        doc = {"stats": {**dataclasses.asdict(report), "exact": report.exact,
                         "population": report.population},
               "bytes_per_entry": {k: v for k, v in sizes.items() if v is not None},
               "performance": perf.to_dict()}
        click.echo(json.dumps(doc, indent=1, default=str))
        return
    click.echo(report.format_text())
    for tier, value in sizes.items():
        if value is not None:
            click.echo(f"bytes per entry on disk, {tier} tier: {value:.1f}")
    click.echo(perf.format_text())


@main.command()
@click.option("--bootstrap", required=True, help="Kafka bootstrap servers, host:port[,...].")
@click.option("--topic", required=True)
@click.option("--partitions", required=True, help="Partitions this sink consumes, e.g. 0-3,7.")
@click.option("--journal", "journal_uri", required=True, help="Journal root: path or pyarrow.fs URI.")
@click.option("--roll-seconds", default=0.4, show_default=True, type=float)
@click.option("--security-protocol", default="PLAINTEXT", show_default=True,
              type=click.Choice(SECURITY_PROTOCOLS))
@click.option("--sasl-mechanism", default=None, type=click.Choice(SASL_MECHANISMS))
@click.option("--sasl-username", default=None,
              help="SASL user; the password comes from SERVE_JOURNAL_KAFKA_SASL_PASSWORD.")
@click.option("--ssl-cafile", default=None)
@click.option("--ssl-certfile", default=None)
@click.option("--ssl-keyfile", default=None,
              help="Client key; its password comes from SERVE_JOURNAL_KAFKA_SSL_PASSWORD.")
@writer_options
def sink(bootstrap: str, topic: str, partitions: str, journal_uri: str, roll_seconds: float,
         security_protocol: str, sasl_mechanism: str | None, sasl_username: str | None,
         ssl_cafile: str | None, ssl_certfile: str | None, ssl_keyfile: str | None,
         witness_uri: str | None, signing_key_file: str | None, retention: str | None) -> None:
    """Consume journal entries from Kafka into Parquet, exactly once, until SIGINT/SIGTERM."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    kafka = {"security_protocol": security_protocol, "sasl_mechanism": sasl_mechanism,
             "sasl_plain_username": sasl_username, "ssl_cafile": ssl_cafile,
             "ssl_certfile": ssl_certfile, "ssl_keyfile": ssl_keyfile}
    journal = {"witness_uri": witness_uri, "signing_key_file": signing_key_file,
               "retention": parse_retention(retention)}
    run_journal_sink(bootstrap, topic, partitions, journal_uri, roll_seconds=roll_seconds,
                     kafka=kafka, journal=journal)


def _memory_limit(value: str | None) -> int | None:
    """``--memory-limit`` in bytes (``None``: the environment variable or the default)."""
    if value is None:
        return None
    try:
        return parse_memory_limit(value)
    except ValueError as exc:
        raise click.BadParameter(str(exc), param_hint="--memory-limit") from None


def rewrite_options(command: Callable) -> Callable:
    """``--memory-limit`` and ``--temp-dir`` of the commands that rewrite partitions."""
    command = click.option(
        "--temp-dir", default=None, type=click.Path(file_okay=False),
        help="Where a rewrite spools its inputs and spills its sort (default: the system temp "
             "folder); needs about twice the largest partition free.")(command)
    return click.option(
        "--memory-limit", default=None, metavar="SIZE",
        help=f"Memory a rewrite may use, e.g. 2GiB or 512MB (default: ${MEMORY_LIMIT_ENV}, else "
             "2GiB); the sort spills to --temp-dir beyond it, so any day size fits.")(command)


@main.command()
@click.option("--journal", "journal_uri", default="./journal", show_default=True)
@click.option("--apply", "do_apply", is_flag=True, help="Act; without it, only report the plan.")
@click.option("--as-of", "as_of", default=None, help=AS_OF_HELP)
@rewrite_options
@writer_options
@click.option("--json", "as_json", is_flag=True, help="Print the report as one JSON document.")
def compact(journal_uri: str, do_apply: bool, as_of: str | None, memory_limit: str | None,
            temp_dir: str | None, witness_uri: str | None, signing_key_file: str | None,
            retention: str | None, as_json: bool) -> None:
    """Merge the many small files of finished days into few sorted day files (verify-safe)."""
    options = CompactionOptions(memory_limit=_memory_limit(memory_limit), temp_dir=temp_dir)
    settings = SinkSettings(journal_uri, witness_uri=witness_uri,
                            signing_key_file=signing_key_file, retention=parse_retention(retention))
    report = run_compaction(journal_uri, apply=do_apply, now=_parse_time(as_of, "--as-of"),
                            options=options, settings=settings)
    if as_json:
        _echo_json(dataclasses.asdict(report))
    else:
        click.echo(report.describe())


@main.group()
def lifecycle() -> None:
    """Hot -> cold tier moves, and the S3 lifecycle configuration to apply to the bucket."""


@lifecycle.command("run")
@click.option("--journal", "journal_uri", default="./journal", show_default=True)
@click.option("--hot-days", default=30, show_default=True, type=int)
@click.option("--apply", "do_apply", is_flag=True, help="Act; without it (default) a dry run.")
@click.option("--as-of", "as_of", default=None, help=AS_OF_HELP)
@rewrite_options
@writer_options
@click.option("--json", "as_json", is_flag=True, help="Print the report as one JSON document.")
def lifecycle_run(journal_uri: str, hot_days: int, do_apply: bool, as_of: str | None,
                  memory_limit: str | None, temp_dir: str | None, witness_uri: str | None,
                  signing_key_file: str | None, retention: str | None, as_json: bool) -> None:
    """Rewrite partitions older than the hot window into the cold tier, check, then expire."""
    limit = _memory_limit(memory_limit)
    settings = SinkSettings(journal_uri, witness_uri=witness_uri,
                            signing_key_file=signing_key_file, retention=parse_retention(retention))
    report = run_lifecycle(journal_uri, apply=do_apply, hot_days=hot_days,
                           now=_parse_time(as_of, "--as-of"), settings=settings,
                           memory_limit=limit, temp_dir=temp_dir)
    click.echo(json.dumps(_lifecycle_document(report), indent=1, sort_keys=True, default=str)
               if as_json else report.describe())


def _lifecycle_document(report: Any) -> dict[str, Any]:
    """``lifecycle run --json``: the report, its plan's moves named by partition and files."""
    doc = dataclasses.asdict(dataclasses.replace(report, plan=None))
    plan = report.plan
    doc["plan"] = None if plan is None else {
        "now": plan.now.isoformat(), "hot_days": plan.hot_days,
        "pending_expiry": list(plan.pending_expiry),
        "moves": [{"partition": move.key.path("hot"), "hot_files": list(move.hot_files),
                   "cold_partition": move.key.path("cold"), "cold_name": move.cold_name}
                  for move in plan.moves]}
    return doc


@lifecycle.command("s3-config")
@click.option("--prefix", default="", help="Journal prefix inside the bucket.")
@click.option("--glacier-after-days", default=30, show_default=True, type=int)
@click.option("--deep-archive-after-days", default=180, show_default=True, type=int)
@click.option("--json", "as_json", is_flag=True,
              help="Accepted for uniformity: the output is the JSON configuration either way.")
def lifecycle_s3_config(prefix: str, glacier_after_days: int, deep_archive_after_days: int,
                        as_json: bool) -> None:
    """Print the S3 lifecycle configuration (storage-class transitions) for the journal bucket."""
    click.echo(json.dumps(s3_lifecycle_configuration(
        prefix=prefix, glacier_after_days=glacier_after_days,
        deep_archive_after_days=deep_archive_after_days), indent=2))


@main.command("bytes-per-entry")
@click.option("--journal", "journal_uri", default="./journal", show_default=True)
@click.option("--json", "as_json", is_flag=True,
              help="Print {\"hot\": bytes, \"cold\": bytes} (null: no entries).")
def bytes_per_entry_command(journal_uri: str, as_json: bool) -> None:
    """Bytes per entry on disk, hot and cold tiers."""
    storage = open_storage(journal_uri)
    if as_json:
        _echo_json({tier: bytes_per_entry(storage, tier) for tier in ("hot", "cold")})
        return
    for tier in ("hot", "cold"):
        value = bytes_per_entry(storage, tier)
        click.echo(f"{tier}: {'no entries' if value is None else f'{value:.1f} B/entry'}")


@main.command("doctor")
@click.option("--journal", "journal_uri", default="./journal", show_default=True)
@click.option("--privacy-dir", "privacy_dirs", multiple=True,
              help="A node's keyring folder; repeat for each node to check they agree (default: "
                   "SERVE_JOURNAL_PRIVACY_DIR, else journal-keys beside a local journal).")
@click.option("--signing-key-file", default=None,
              help="The manifest signing key (default journal-signing/ beside a local journal).")
@click.option("--public-key", default=None,
              help="The auditors' pinned public key (PEM) the signing key must match.")
@click.option("--key-fingerprint", default=None,
              help="The pinned SHA-256 fingerprint (hex, at least 16 digits) of the signing key.")
@click.option("--bootstrap", default=None, help="Kafka bootstrap servers to reach, host:port[,...].")
@click.option("--topic", default=None, help="With --bootstrap: the journal topic that must exist.")
@click.option("--tracking-uri", default=None, envvar="MLFLOW_TRACKING_URI",
              help="MLflow tracking/registry URI to reach (default MLFLOW_TRACKING_URI).")
@click.option("--timeout", default=5.0, show_default=True, type=click.FloatRange(min=0.1),
              help="Seconds each network check may take.")
@click.option("--json", "as_json", is_flag=True, help="Print the checks as one JSON document.")
def doctor_command(journal_uri: str, privacy_dirs: tuple[str, ...], signing_key_file: str | None,
                   public_key: str | None, key_fingerprint: str | None, bootstrap: str | None,
                   topic: str | None, tracking_uri: str | None, timeout: float,
                   as_json: bool) -> None:
    """Check a deployment's configuration and print what is wrong: key material on each node,
    the signing key against the pinned key, the bucket's Object Lock, the broker and the
    registry. Exit code 0 when every check passes, 1 otherwise."""
    env_dir = os.environ.get("SERVE_JOURNAL_PRIVACY_DIR")
    report = check_deployment(
        journal_uri, privacy_dirs=privacy_dirs or ((env_dir,) if env_dir else ()),
        signing_key_file=signing_key_file, public_key=public_key,
        key_fingerprint=key_fingerprint, bootstrap=bootstrap, topic=topic,
        tracking_uri=tracking_uri, timeout=timeout)
    click.echo(report.to_json() if as_json else report.format_text())
    sys.exit(0 if report.ok else 1)


main.add_command(console_command, "console")
main.add_command(console_user, "console-user")
main.add_command(replay_command, "replay")
for _command, _name in (*EVIDENCE_COMMANDS, *OUTCOME_COMMANDS, *ICEBERG_COMMANDS):
    main.add_command(_command, _name)


if __name__ == "__main__":  # pragma: no cover
    main()
