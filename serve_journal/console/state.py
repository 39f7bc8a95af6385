"""The console's per-process state (:class:`ConsoleState`) and how pages are rendered.

:func:`~serve_journal.console.app.create_app` builds one ``ConsoleState`` per app (per Serve
replica) and keeps it in ``app.state.console``; routes receive it through
:data:`~serve_journal.console.deps.ConsoleDep`. It holds the journal storage, the users file, the
session codec and the revocation list of signed-out sessions, the subject tokenizer and
forgetter, the Jinja templates, the sign-in throttle and a cache of manifest records, and writes
every page view to the journal's access log.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import time
from typing import Any

import jinja2
from fastapi import Request
from fastapi.responses import HTMLResponse

from serve_journal.catalog import live_files
from serve_journal.console.auth import (
    ROLES,
    LoginThrottle,
    SessionCodec,
    SessionRevocations,
    User,
    UserStore,
    load_or_create_secret,
)
from serve_journal.console.settings import ConsoleSettings
from serve_journal.integrity.manifest import MANIFEST_PREFIX, ManifestError, ManifestRecord
from serve_journal.read.access_log import record_access
from serve_journal.read.query import JournalQuery
from serve_journal.storage import open_storage
from serve_journal.times import as_utc

TEMPLATES_DIR = os.path.join(os.path.dirname(__file__), "templates")


def cell(value: Any) -> str:
    """A table cell's text (the templates' ``cell`` filter): UTC times to the millisecond."""
    if value is None:
        return ""
    if isinstance(value, dt.datetime):
        return value.astimezone(dt.UTC).strftime("%Y-%m-%d %H:%M:%S.%f")[:-3] + "Z"
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, list | dict):
        return json.dumps(value, default=str)
    return str(value)


def base_path(request: Request) -> str:
    """The prefix the console is mounted under (Serve ``route_prefix``), without trailing slash."""
    return request.scope.get("root_path", "").rstrip("/")


class ConsoleState:
    """One console's storage, accounts, sessions, templates and caches (see the module doc)."""

    def __init__(self, settings: ConsoleSettings) -> None:
        self.settings = settings
        self.storage = open_storage(settings.journal_uri)
        self.users = UserStore(settings.users_file)
        self.codec = SessionCodec(load_or_create_secret(settings.resolved_secret_file()),
                                  settings.session_ttl_s)
        self.tokenizer = settings.tokenizer_factory() if settings.tokenizer_factory else None
        self.forgetter = settings.forgetter_factory() if settings.forgetter_factory else None
        self.env = jinja2.Environment(
            loader=jinja2.FileSystemLoader(TEMPLATES_DIR),
            autoescape=jinja2.select_autoescape(["html"]),
            undefined=jinja2.StrictUndefined,
        )
        self.env.filters["cell"] = cell
        self.throttle = LoginThrottle(directory=settings.resolved_failures_dir())
        self.revocations = SessionRevocations(settings.resolved_revocations_dir())
        self._records: dict[str, ManifestRecord] = {}  # manifest object path -> record (immutable)

    def query(self, user: User) -> JournalQuery:
        """A journal query whose access-log records name ``user`` as the actor."""
        return JournalQuery(self.storage, tokenizer=self.tokenizer, actor=user.name)

    def log_view(self, actor: str, view: str, rows: int = 0, **details: Any) -> None:
        """One access-log record for a page view (tokens only; never a raw subject id)."""
        started = time.perf_counter()
        record_access(self.storage, actor=actor, filters={"view": view, **details}, rows=rows,
                      tier="console", files_scanned=0,
                      elapsed_ms=(time.perf_counter() - started) * 1000)

    def models(self) -> list[str]:
        """The models with live data files in any tier."""
        return sorted({f.key.model for f in live_files(self.storage, tier="all")})

    def manifest_records(self) -> dict[str, list[ManifestRecord]]:
        """Data file path -> its manifest records (cached: record objects never change)."""
        for path in self.storage.list_files(f"{MANIFEST_PREFIX}/", ".json"):
            if path not in self._records:
                try:
                    self._records[path] = ManifestRecord.from_json(self.storage.read(path))
                except (ManifestError, OSError):
                    continue
        by_file: dict[str, list[ManifestRecord]] = {}
        for record in self._records.values():
            by_file.setdefault(record.path, []).append(record)
        return by_file

    def default_window(self, model: str) -> tuple[dt.datetime, dt.datetime]:
        """The 24 hours up to the end of ``model``'s newest partition (or up to this hour)."""
        keys = [f.key for f in live_files(self.storage, tier="all", model=model)]
        until = max(k.end for k in keys) if keys else \
            dt.datetime.now(dt.UTC).replace(minute=0, second=0, microsecond=0)
        return until - dt.timedelta(hours=24), until

    def window(self, model: str, since: str | None,
               until: str | None) -> tuple[dt.datetime, dt.datetime]:
        """The chart window: ``since``/``until`` (ISO 8601) or the default window's ends.

        Raises ``ValueError`` naming the parameter when one is not a time.
        """
        default_since, default_until = self.default_window(model)
        return (as_utc(since or None, "since") or default_since,
                as_utc(until or None, "until") or default_until)

    def render(self, request: Request, template: str, status: int = 200,
               user: User | None = None, csrf: str | None = None,
               **context: Any) -> HTMLResponse:
        """``template`` rendered with the common context (base path, user, CSRF token, title)."""
        html = self.env.get_template(template).render(
            base=base_path(request), user=user, csrf=csrf, title=self.settings.title, roles=ROLES,
            now=dt.datetime.now(dt.UTC), **context,
        )
        return HTMLResponse(html, status_code=status)


__all__ = ["TEMPLATES_DIR", "ConsoleState", "base_path", "cell"]
