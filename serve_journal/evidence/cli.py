"""The ``evidence`` and ``verify-evidence`` commands (registered by ``serve_journal.cli``)."""

from __future__ import annotations

import click

COMMANDS: list[tuple[click.Command, str]] = []
