"""The investigation console: a web UI for auditors over the journal, with sign-in and roles.

``run_console(journal_uri, host, port, users_file)`` serves it locally; ``build_serve_app(settings)``
gives the same app as a Ray Serve application. See docs/console.md.
"""

from serve_journal.console.app import (
    ConsoleSettings,
    build_serve_app,
    create_app,
    dev_users_file,
    journal_forgetter,
    journal_tokenizer,
    run_console,
    write_report,
)
from serve_journal.console.auth import ROLES, add_user, remove_user

__all__ = [
    "ROLES", "ConsoleSettings", "add_user", "build_serve_app", "create_app", "dev_users_file",
    "journal_forgetter", "journal_tokenizer", "remove_user", "run_console", "write_report",
]
