"""Command-line input that must not leak: subject ids from standard input, checked subject tokens.

Shared by ``serve-journal query`` / ``forget`` (:mod:`serve_journal.cli`) and ``serve-journal
replay`` (:mod:`serve_journal.replay.driver`); the options of every command that writes signed
journal files (:func:`writer_options`, :func:`parse_retention`) too. ``--subject -`` reads the ids from standard input,
one per line, so they stay out of shell history and the process list (``ps``);
``--subject-token`` is checked for a subject token's format, and a wrong value is refused
without being echoed.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Sequence
from typing import Any, TextIO

import click

from serve_journal.errors import TokenFormatError
from serve_journal.privacy.tokens import SUBJECT_TOKEN_FORMAT, check_subject_token

__all__ = ["STDIN", "expand_subjects", "parse_retention", "read_ids", "subject_token_option",
           "writer_options"]

STDIN = "-"
"""The ``--subject`` value meaning "read the ids from standard input"."""


def read_ids(stream: TextIO) -> list[str]:
    """One id per line of ``stream``; line endings removed, blank lines skipped."""
    return [line.rstrip("\r\n") for line in stream if line.strip()]


def expand_subjects(values: Sequence[str], stream: TextIO | None = None,
                    option: str = "--subject") -> list[str]:
    """``values`` with ``-`` replaced by the ids read from ``stream`` (default: standard input).

    Raises :class:`click.UsageError` when ``-`` is given twice or standard input holds no id.
    """
    if values.count(STDIN) > 1:
        raise click.UsageError(f"{option} - (read from standard input) may be given once")
    out: list[str] = []
    for value in values:
        if value != STDIN:
            out.append(value)
            continue
        ids = read_ids(stream if stream is not None else sys.stdin)  # CliRunner swaps it too
        if not ids:
            raise click.UsageError(f"{option} -: standard input holds no subject id "
                                   "(give one per line)")
        out.extend(ids)
    return out


def subject_token_option(ctx: click.Context, param: click.Parameter,
                         value: str | None) -> str | None:
    """Click callback: ``value`` when it is a subject token, else a usage error naming the
    option (never the value: it may be a raw subject id pasted in the wrong place)."""
    if value is None:
        return None
    try:
        return check_subject_token(value, param.name or "subject_token")
    except TokenFormatError:
        raise click.BadParameter(f"must be {SUBJECT_TOKEN_FORMAT}") from None


def writer_options(command: Any) -> Any:
    """The options of every command that writes journal files: signing key, witness, retention."""
    command = click.option(
        "--retention", default=None,
        help="Write-once retention on s3:// (Object Lock): a policy name (e.g. 'SEC 17a-4') or "
             'JSON, e.g. \'{"hot": {"days": 35}, "cold": {"years": 7, "mode": "COMPLIANCE"}}\'.'
    )(command)
    command = click.option("--signing-key-file", default=None,
                           help="Ed25519 PEM key signing the manifests (required for s3://).")(command)
    return click.option("--witness", "witness_uri", default=None,
                        help="Witness copy of the checkpoints (a second folder or bucket).")(command)


def parse_retention(value: str | None) -> Any:
    """``--retention``: a policy name, or a JSON mapping (validated where it is used)."""
    if value is None or not value.lstrip().startswith("{"):
        return value
    try:
        return json.loads(value)
    except ValueError as exc:
        raise click.BadParameter(f"not JSON: {exc}", param_hint="--retention") from None
