"""The ``outcomes`` command group (registered by ``serve_journal.cli``)."""

from __future__ import annotations

import click

COMMANDS: list[tuple[click.Command, str]] = []
