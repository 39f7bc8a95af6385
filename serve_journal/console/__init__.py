"""The investigation console: a web UI for auditors over the journal, with sign-in and roles.

``run_console(journal_uri, host, port, users_file)`` serves it locally; ``build_serve_app(settings)``
gives the same app as a Ray Serve application. See docs/console.md.

Modules: ``app`` (the app factory, Serve and uvicorn runs), ``settings`` (``ConsoleSettings`` and
its default factories), ``state`` (per-process state, rendering), ``deps`` (sign-in and
permission dependencies, refusal pages), ``routes/`` (the pages, one router per concern),
``auth`` (users file, passwords, session cookies, CSRF), ``charts`` (PNG charts), ``reports``
(verify/replay summaries on disk) and ``commands`` (the click commands).
"""

from serve_journal.console.app import build_serve_app, create_app, dev_users_file, run_console
from serve_journal.console.auth import ROLES, add_user, remove_user
from serve_journal.console.reports import write_report
from serve_journal.console.settings import ConsoleSettings, journal_forgetter, journal_tokenizer

__all__ = [
    "ROLES", "ConsoleSettings", "add_user", "build_serve_app", "create_app", "dev_users_file",
    "journal_forgetter", "journal_tokenizer", "remove_user", "run_console", "write_report",
]
