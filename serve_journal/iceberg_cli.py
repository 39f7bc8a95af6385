"""The ``iceberg`` command group (registered by ``serve_journal.cli``): publish the journal's
live files as an Apache Iceberg table by hand, and show the table's snapshots and agreement."""

from __future__ import annotations

import json
import sys
from typing import Any

import click

from serve_journal.catalog.iceberg import (
    ICEBERG_CATALOG_ENV,
    IcebergSettings,
    publish_iceberg,
    table_status,
)
from serve_journal.catalog.live import MarkerCache
from serve_journal.integrity.manifest import load_public_key
from serve_journal.storage import open_storage


def _table_options(command: Any) -> Any:
    for option in reversed((
        click.option("--journal", "journal_uri", required=True,
                     help="Journal root: a local folder or s3://bucket/prefix."),
        click.option("--catalog", default=None,
                     help=f"Iceberg catalog: sqlite:///<file>, a SQLAlchemy URL, https://<REST "
                          f"catalog>, 'glue', or a JSON object of catalog properties (default: "
                          f"${ICEBERG_CATALOG_ENV})."),
        click.option("--table", default=None,
                     help="<namespace>.<table> (default: $SERVE_JOURNAL_ICEBERG_TABLE, else "
                          "serve_journal.entries)."),
        click.option("--public-key", default=None,
                     help="The journal's Ed25519 public key (PEM): only commit markers it signed "
                          "decide which files are live (default: the readers' trust anchor)."),
        click.option("--json", "as_json", is_flag=True, help="Print one JSON document."),
    )):
        command = option(command)
    return command


def _resolve(catalog: str | None, table: str | None) -> IcebergSettings:
    try:
        settings = (IcebergSettings.parse(catalog, table=table) if catalog
                    else IcebergSettings.from_env())
    except ValueError as exc:
        raise click.BadParameter(str(exc), param_hint="--catalog") from None
    if settings is None:
        raise click.UsageError(f"no Iceberg catalog: pass --catalog or set {ICEBERG_CATALOG_ENV}")
    if table and settings.table != table:
        settings = IcebergSettings(settings.catalog, table, settings.location, settings.retries)
    return settings


def _cache(public_key: str | None) -> MarkerCache | None:
    return MarkerCache(load_public_key(public_key)) if public_key else None


@click.group("iceberg")
def iceberg_group() -> None:
    """The journal as an Apache Iceberg table (see docs/iceberg.md)."""


@iceberg_group.command("publish")
@_table_options
def publish_command(journal_uri: str, catalog: str | None, table: str | None,
                    public_key: str | None, as_json: bool) -> None:
    """Commit the difference between the table and the journal's live files: an append of new
    files, or one replace snapshot for files a rewrite replaced. A second run is a no-op."""
    storage = open_storage(journal_uri)
    report = publish_iceberg(storage, _resolve(catalog, table), cache=_cache(public_key),
                             reason="cli")
    click.echo(json.dumps(report.to_dict(), indent=2) if as_json else report.describe())


@iceberg_group.command("status")
@_table_options
def status_command(journal_uri: str, catalog: str | None, table: str | None,
                   public_key: str | None, as_json: bool) -> None:
    """The table's snapshots, its current files and rows, and where it disagrees with the
    journal's live files. Exit 1 when it disagrees or does not exist."""
    storage = open_storage(journal_uri)
    status = table_status(storage, _resolve(catalog, table), cache=_cache(public_key))
    if as_json:
        click.echo(json.dumps(status.to_dict(), indent=2))
    else:
        click.echo(f"table {status.table} ({status.catalog})")
        if status.metadata_location:
            click.echo(f"metadata: {status.metadata_location}")
        if not status.exists:
            click.echo("does not exist: run `serve-journal iceberg publish`")
        for snap in status.snapshots:
            click.echo(f"  snapshot {snap['snapshot_id']} at {snap['timestamp_ms']} ms: "
                       f"{snap['operation']}, +{snap['added_files']} -{snap['removed_files']} "
                       f"files, {snap['total_files']} files, {snap['total_rows']} rows")
        click.echo(f"current: {status.files} file(s), {status.rows} row(s)")
        for found in status.disagreements:
            click.echo(f"DISAGREES {found.kind} {found.path}: {found.detail}")
        if status.exists and not status.disagreements:
            click.echo("in agreement with the journal's live files")
    sys.exit(0 if status.exists and not status.disagreements else 1)


COMMANDS: list[tuple[click.Command, str]] = [(iceberg_group, "iceberg")]
