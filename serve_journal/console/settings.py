"""What a console process needs: :class:`ConsoleSettings` and the default factories it names.

The factories are module-level functions so that ``functools.partial`` of them pickles by
reference into Ray Serve replicas: keys never travel in a pickle, each process that serves builds
its own tokenizer and forgetter.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from serve_journal.api import subject_tokenizer
from serve_journal.config import JournalConfig, dev_mode_from_env
from serve_journal.integrity.trust import TrustAnchor, resolve_trust
from serve_journal.privacy.forget import ForgetHooks, forget_subject
from serve_journal.storage import local_root

#: ``subject id -> token`` (``None`` when the subject has no key, e.g. after a forget).
Tokenizer = Callable[[str], str | None]


@dataclass(frozen=True)
class ConsoleSettings:
    """Everything a console process (or Serve replica) needs; picklable.

    ``tokenizer_factory()`` returns ``subject id -> token | None`` (built in the process that
    serves, since keys must not travel in a pickle); ``forgetter_factory()`` returns
    ``subject id -> ForgetReceipt``. ``reports_dir`` holds ``verify-*.json`` and ``replay-*.json``
    summaries (written by the CLI or by the console's "run verify now").
    """

    journal_uri: str
    users_file: str
    secret_file: str | None = None
    """32+ random bytes signing session cookies; default ``<users_file>.secret`` (created 0600)."""
    state_dir: str | None = None
    """Where replicas share signed-out sessions (``revoked/``) and failed sign-ins per account
    (``failures/``); default beside the users file: ``<users_file>.revoked`` and
    ``<users_file>.failures``. Every replica must see the same folder."""
    session_ttl_s: float = 1800.0
    secure_cookies: bool = True
    tokenizer_factory: Callable[[], Tokenizer | None] | None = None
    forgetter_factory: Callable[[], Callable[[str], Any]] | None = None
    public_key: str | None = None
    """The auditor's Ed25519 public key (PEM file) "run verify now" checks with."""
    key_fingerprint: str | None = None
    """Instead of ``public_key``: the key exported beside a local journal, pinned by this
    SHA-256 fingerprint (see :mod:`serve_journal.integrity.trust`)."""
    reports_dir: str | None = None
    forget_hooks: ForgetHooks | None = None
    """The purge and retraining hooks the default forgetter calls, by name (shown on the forget
    page); ``None``: ``SERVE_JOURNAL_PURGE_HOOK`` / ``SERVE_JOURNAL_RETRAINING_HOOK`` of the
    process that serves."""
    hot_days: int | None = None
    max_rows: int = 500
    title: str = "serve-journal console"

    def resolved_secret_file(self) -> str:
        """The session signing key file: ``secret_file`` or ``<users_file>.secret``."""
        return self.secret_file or f"{os.path.abspath(self.users_file)}.secret"

    def resolved_revocations_dir(self) -> str:
        """The folder of signed-out sessions (see ``state_dir``)."""
        if self.state_dir:
            return os.path.join(os.path.abspath(self.state_dir), "revoked")
        return f"{os.path.abspath(self.users_file)}.revoked"

    def resolved_failures_dir(self) -> str:
        """The folder of failed sign-ins per account (see ``state_dir``)."""
        if self.state_dir:
            return os.path.join(os.path.abspath(self.state_dir), "failures")
        return f"{os.path.abspath(self.users_file)}.failures"

    def resolved_trust(self) -> TrustAnchor:
        """The key "run verify now" checks signatures with: ``public_key``, the pinned key
        beside the journal, or (development mode only) that key unpinned; raises
        :class:`~serve_journal.integrity.trust.TrustError` otherwise."""
        return resolve_trust(self.journal_uri, public_key=self.public_key,
                             fingerprint=self.key_fingerprint, dev=dev_mode_from_env())

    def resolved_reports_dir(self) -> str | None:
        """``reports_dir``, else ``<journal parent>/journal-reports`` for a local journal."""
        if self.reports_dir:
            return os.path.abspath(self.reports_dir)
        root = local_root(self.journal_uri)
        if root is None:
            return None
        return os.path.join(os.path.dirname(root), "journal-reports")


def journal_tokenizer(journal_uri: str, **options: Any) -> Tokenizer:
    """The journal's own subject tokenizer (:func:`serve_journal.api.subject_tokenizer`)."""
    return subject_tokenizer(journal_uri, **options)


def journal_forgetter(journal_uri: str, privacy_dir: str | None = None,
                      vault_url: str | None = None,
                      hooks: ForgetHooks | None = None) -> Callable[[str], Any]:
    """``subject id -> ForgetReceipt`` over the journal's keyring and vault, calling the purge
    and retraining ``hooks`` (default: from ``SERVE_JOURNAL_PURGE_HOOK`` /
    ``SERVE_JOURNAL_RETRAINING_HOOK``; a hook that cannot be loaded fails here, at start)."""
    if privacy_dir is None:
        privacy_dir = JournalConfig.resolve(model="unused", journal_uri=journal_uri) \
            .resolved_privacy_dir()
    if hooks is None:
        hooks = ForgetHooks.resolve()
    else:
        hooks.callables()  # load them now: a wrong name fails at start, not at the first forget
    return functools.partial(forget_subject, journal_uri=journal_uri, privacy_dir=privacy_dir,
                             vault_url=vault_url, hooks=hooks)


__all__ = ["ConsoleSettings", "Tokenizer", "journal_forgetter", "journal_tokenizer"]
