"""Click commands for the console, ready to attach to the ``serve-journal`` group::

    main.add_command(console_command, "console")
    main.add_command(console_user, "console-user")
"""

from __future__ import annotations

import sys

import click

from serve_journal.console.app import run_console
from serve_journal.console.auth import ROLES, add_user, remove_user
from serve_journal.privacy.forget import ForgetHooks


@click.command("console")
@click.option("--journal", "journal_uri", default="./journal", show_default=True)
@click.option("--host", default="127.0.0.1", show_default=True)
@click.option("--port", default=8265, show_default=True, type=int)
@click.option("--users-file", default=None,
              help="Users file (see `serve-journal console-user add`); required unless --dev.")
@click.option("--secret-file", default=None,
              help="Session signing key (default <users-file>.secret, created 0600).")
@click.option("--reports-dir", default=None, help="Where verify-*.json / replay-*.json live.")
@click.option("--public-key", default=None,
              help="The auditor's public key (PEM) \"run verify now\" checks with.")
@click.option("--key-fingerprint", default=None,
              help="Instead of --public-key: pin the key exported beside a local journal.")
@click.option("--session-minutes", default=30, show_default=True, type=int)
@click.option("--dev", is_flag=True,
              help="Without --users-file: a throw-away account 'dev' with a one-time password.")
@click.option("--serve", "use_serve", is_flag=True, help="Run as a Ray Serve application.")
@click.option("--purge-hook", default=None,
              help="Forget's feature-store purge: 'module:function' or 'features:PATH' "
                   "(default SERVE_JOURNAL_PURGE_HOOK).")
@click.option("--retraining-hook", default=None,
              help="Forget's retraining hook: 'module:function' (default "
                   "SERVE_JOURNAL_RETRAINING_HOOK).")
def console_command(journal_uri: str, host: str, port: int, users_file: str | None,
                    secret_file: str | None, reports_dir: str | None, public_key: str | None,
                    key_fingerprint: str | None, session_minutes: int, dev: bool,
                    use_serve: bool, purge_hook: str | None, retraining_hook: str | None) -> None:
    """Serve the investigation console (sign-in required; see docs/console.md)."""
    try:
        run_console(journal_uri, host, port, users_file, dev=dev, use_serve=use_serve,
                    secret_file=secret_file, reports_dir=reports_dir, public_key=public_key,
                    key_fingerprint=key_fingerprint,
                    session_ttl_s=session_minutes * 60.0,
                    forget_hooks=ForgetHooks.resolve(purge_hook, retraining_hook),
                    echo=click.echo)
    except ValueError as exc:
        raise click.UsageError(str(exc)) from exc


@click.group("console-user")
def console_user() -> None:
    """Manage console accounts (salted scrypt hashes in a 0600 users file)."""


@console_user.command("add")
@click.option("--users-file", required=True)
@click.option("--role", "roles", multiple=True, required=True, type=click.Choice(ROLES))
@click.option("--password-stdin", is_flag=True, help="Read the password from standard input.")
@click.argument("username")
def add_command(users_file: str, roles: tuple[str, ...], password_stdin: bool,
                username: str) -> None:
    """Create USERNAME (or replace its roles and password)."""
    if password_stdin:
        password = sys.stdin.readline().rstrip("\n")
    else:
        password = click.prompt("password", hide_input=True, confirmation_prompt=True)
    try:
        add_user(users_file, username, roles, password)
    except ValueError as exc:
        raise click.UsageError(str(exc)) from exc
    click.echo(f"user {username} saved with roles {', '.join(sorted(roles))}")


@console_user.command("remove")
@click.option("--users-file", required=True)
@click.argument("username")
def remove_command(users_file: str, username: str) -> None:
    """Remove USERNAME; its live sessions stop working at their next request."""
    if not remove_user(users_file, username):
        raise click.UsageError(f"no user {username} in {users_file}")
    click.echo(f"user {username} removed")


__all__ = ["console_command", "console_user"]
