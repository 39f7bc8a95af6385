"""The ``outcomes`` command group (registered by ``serve_journal.cli``), and the options with
which ``stats`` adds its "performance on labelled decisions" section."""

from __future__ import annotations

import dataclasses
import datetime as dt
import getpass
import json
import os
from typing import Any

import click
import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.parquet as pq

from serve_journal.api import subject_tokenizer
from serve_journal.cli_input import (
    expand_subjects,
    parse_retention,
    subject_token_option,
    writer_options,
)
from serve_journal.outcomes.join import find_outcomes
from serve_journal.outcomes.performance import (
    NEGATIVE_LABELS,
    POSITIVE_DECISIONS,
    POSITIVE_LABELS,
    performance,
)
from serve_journal.outcomes.record import UnsignedTailError, record_outcomes
from serve_journal.read.query import JournalQuery, format_table, to_json
from serve_journal.sink.settings import SinkSettings
from serve_journal.storage import open_storage
from serve_journal.times import as_utc

SHOW_COLUMNS = ("entry_ts", "request_id", "entry_model_name", "entry_model_version",
                "entry_decision", "label", "value", "outcome_time", "recorded_at", "source",
                "latest")


def _time(value: str | None, name: str) -> dt.datetime | None:
    try:
        return as_utc(value, name)
    except ValueError as exc:
        raise click.BadParameter(str(exc), param_hint=name) from None


def read_outcome_file(path: str) -> pa.Table:
    """A batch of outcomes from a ``.parquet`` or ``.csv`` file (columns as
    :func:`~serve_journal.outcomes.record.record_outcomes` takes them). CSV request ids and
    sources are read as text; labels keep the type the CSV reader infers (``true``/``false``,
    integers, text)."""
    lowered = path.lower()
    if lowered.endswith(".parquet"):
        return pq.ParquetFile(path).read()
    if lowered.endswith(".csv"):
        options = pacsv.ConvertOptions(column_types={"request_id": pa.string(),
                                                     "source": pa.string()})
        return pacsv.read_csv(path, convert_options=options)
    raise click.BadParameter(f"must end in .parquet or .csv, got {os.path.basename(path)!r}",
                             param_hint="FILE")


def performance_options(command: Any) -> Any:
    for option in reversed((
        click.option("--positive-decision", "positive_decisions", multiple=True,
                     help="A decision that predicts the positive class (repeat; default: "
                          + ", ".join(sorted(POSITIVE_DECISIONS)) + ")."),
        click.option("--positive-label", "positive_labels", multiple=True,
                     help="A label of the positive class (repeat; default: "
                          + ", ".join(sorted(POSITIVE_LABELS)) + ")."),
        click.option("--negative-label", "negative_labels", multiple=True,
                     help="A label of the negative class (repeat; default: "
                          + ", ".join(sorted(NEGATIVE_LABELS)) + ")."),
        click.option("--outcome-source", "source", default=None,
                     help="Only outcomes from this source count."),
    )):
        command = option(command)
    return command


def performance_classes(positive_decisions: tuple[str, ...], positive_labels: tuple[str, ...],
             negative_labels: tuple[str, ...], source: str | None) -> dict[str, Any]:
    return {"positive_decisions": positive_decisions or POSITIVE_DECISIONS,
            "positive_labels": positive_labels or POSITIVE_LABELS,
            "negative_labels": negative_labels or NEGATIVE_LABELS, "source": source}


@click.group("outcomes")
def outcomes_group() -> None:
    """Outcomes that arrive after the decision: labels (chargebacks, defaults) and values."""


@outcomes_group.command("ingest")
@click.argument("file", type=click.Path(exists=True, dir_okay=False))
@click.option("--journal", "journal_uri", default="./journal", show_default=True)
@click.option("--source", required=True, help="Who supplied the outcomes (names their chain).")
@writer_options
@click.option("--sign-unsigned-tail", is_flag=True,
              help="Sign the source chain's records after its last signed checkpoint too: only "
                   "once verify showed they are an ingest of yours killed before signing (its "
                   "batch then counts: do not ingest that batch again).")
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON.")
def ingest(file: str, journal_uri: str, source: str, signing_key_file: str | None,
           witness_uri: str | None, retention: str | None, sign_unsigned_tail: bool,
           as_json: bool) -> None:
    """Append the outcomes of FILE (.parquet or .csv: request_id, label or value, outcome_time,
    optional source) to the journal; prints accepted N, rejected M and why."""
    settings = SinkSettings(journal_uri=journal_uri, signing_key_file=signing_key_file,
                            witness_uri=witness_uri,
                            retention=parse_retention(retention))
    try:
        report = record_outcomes(journal_uri, read_outcome_file(file), source=source,
                                 settings=settings, sign_unsigned_tail=sign_unsigned_tail)
    except UnsignedTailError as exc:
        raise click.ClickException(str(exc)) from None
    except ValueError as exc:
        raise click.UsageError(str(exc)) from None
    if as_json:
        click.echo(json.dumps(dataclasses.asdict(report), indent=1, sort_keys=True))
    else:
        click.echo(report.format_text())


@outcomes_group.command("show")
@click.option("--journal", "journal_uri", default="./journal", show_default=True)
@click.option("--request-id", default=None)
@click.option("--subject", default=None,
              help="Subject id (turned into its token; never stored); '-' reads it from standard "
                   "input.")
@click.option("--subject-token", default=None, callback=subject_token_option)
@click.option("--model", default=None)
@click.option("--since", default=None, help="Decisions from this ISO time (UTC).")
@click.option("--until", default=None, help="Decisions before this ISO time (UTC).")
@click.option("--history", is_flag=True, help="Every record, not only the latest per request.")
@click.option("--tier", default="hot", type=click.Choice(["hot", "cold", "all"]), show_default=True)
@click.option("--as", "actor", default=None, help="Who is asking (recorded in the access log).")
@click.option("--json", "as_json", is_flag=True)
def show(journal_uri: str, request_id: str | None, subject: str | None,
         subject_token: str | None, model: str | None, since: str | None, until: str | None,
         history: bool, tier: str, actor: str | None, as_json: bool) -> None:
    """The outcomes of the entries a query finds (the query is in the access log)."""
    if subject == "-":
        subject = expand_subjects([subject])[0]
    query = JournalQuery(journal_uri, tokenizer=subject_tokenizer(journal_uri) if subject else None,
                         actor=actor or getpass.getuser())
    try:
        table = find_outcomes(query, history=history, request_id=request_id, subject=subject,
                              subject_token=subject_token, model=model,
                              since=_time(since, "--since"), until=_time(until, "--until"),
                              tier=tier)
    except UnicodeError:  # its message would quote a piece of the id
        raise click.UsageError("--subject must be valid UTF-8 text") from None
    finally:
        query.close()
    if as_json:
        click.echo(to_json(table, indent=1))
    else:
        click.echo(format_table(table, SHOW_COLUMNS).replace(" entries)", " outcomes)")
                   .replace(" entry)", " outcome)"))


@outcomes_group.command("performance")
@click.option("--journal", "journal_uri", default="./journal", show_default=True)
@click.option("--since", default=None)
@click.option("--until", default=None)
@click.option("--model", default=None)
@performance_options
@click.option("--json", "as_json", is_flag=True)
def performance_command(journal_uri: str, since: str | None, until: str | None,
                        model: str | None, positive_decisions: tuple[str, ...],
                        positive_labels: tuple[str, ...], negative_labels: tuple[str, ...],
                        source: str | None, as_json: bool) -> None:
    """Per model version: confusion counts, rates, label delay and unlabelled share."""
    try:
        report = performance(open_storage(journal_uri), _time(since, "--since"),
                             _time(until, "--until"), model,
                             **performance_classes(positive_decisions, positive_labels,
                                                   negative_labels, source))
    except ValueError as exc:
        raise click.UsageError(str(exc)) from None
    click.echo(json.dumps(report.to_dict(), indent=1) if as_json else report.format_text())


COMMANDS: list[tuple[click.Command, str]] = [(outcomes_group, "outcomes")]
