"""The console app: :func:`create_app` wires settings, state, error pages and the page routers;
:func:`build_serve_app` and :func:`run_console` serve it with Ray Serve or uvicorn.

The pages live in ``serve_journal/console/routes/`` (one ``APIRouter`` per concern: session,
investigate, models, reports, admin); who may see what is declared there with the dependencies
of :mod:`serve_journal.console.deps`. Reads go through
:class:`~serve_journal.read.query.JournalQuery` (whose access log records every query with the
signed-in user as actor), :mod:`serve_journal.read.stats` (exact counters and estimates) and
:mod:`serve_journal.read.verify`. Every page view is written to the same access log.

Subject ids are only ever typed into POST forms (search, forget); they are turned into tokens with
the configured tokenizer at once, and pages, URLs, logs and the access log carry the token only.
"""

import functools
import os
import secrets
import tempfile
import time
from collections.abc import Awaitable, Callable
from typing import Any

import uvicorn
from fastapi import FastAPI, Request, Response
from fastapi.staticfiles import StaticFiles

from serve_journal.console.auth import ROLES, add_user, load_or_create_secret
from serve_journal.console.deps import install_error_pages
from serve_journal.console.reports import write_report
from serve_journal.console.routes.admin import router as admin_router
from serve_journal.console.routes.investigate import router as investigate_router
from serve_journal.console.routes.models import CHART_KINDS
from serve_journal.console.routes.models import router as models_router
from serve_journal.console.routes.reports import router as reports_router
from serve_journal.console.routes.session import router as session_router
from serve_journal.console.settings import (
    ConsoleSettings,
    Tokenizer,
    journal_forgetter,
    journal_tokenizer,
)
from serve_journal.console.state import ConsoleState
from serve_journal.privacy.forget import ForgetHooks

STATIC_DIR = os.path.join(os.path.dirname(__file__), "static")
ROUTERS = (session_router, investigate_router, models_router, reports_router, admin_router)
SECURITY_HEADERS = {
    "Content-Security-Policy": (
        "default-src 'none'; img-src 'self'; style-src 'self'; form-action 'self'; "
        "frame-ancestors 'none'; base-uri 'none'"
    ),
    "X-Content-Type-Options": "nosniff",
    "X-Frame-Options": "DENY",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-store",
}


async def _security_headers(request: Request,
                            call_next: Callable[[Request], Awaitable[Response]]) -> Response:
    response = await call_next(request)
    response.headers.update(SECURITY_HEADERS)
    return response


def create_app(settings: ConsoleSettings) -> FastAPI:
    """The console as a FastAPI app (serve it with uvicorn, or through :func:`build_serve_app`)."""
    app = FastAPI(title=settings.title, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.console = ConsoleState(settings)
    app.mount("/static", StaticFiles(directory=STATIC_DIR), name="static")
    app.middleware("http")(_security_headers)
    install_error_pages(app)
    for router in ROUTERS:
        app.include_router(router)
    return app


# ------------------------------------------------------------------------------------------------
# Ray Serve and local runs
# ------------------------------------------------------------------------------------------------


class ConsoleIngress:
    """The Serve deployment class: builds the FastAPI app inside each replica."""

    def __init__(self, settings: ConsoleSettings) -> None:
        self._settings = settings

    def __serve_build_asgi_app__(self) -> FastAPI:
        return create_app(self._settings)


def build_serve_app(settings: ConsoleSettings, *, num_replicas: int = 1,
                    name: str = "JournalConsole") -> Any:
    """The console as a Serve application (``serve.run(build_serve_app(s), route_prefix=...)``).

    Replicas share the session secret through ``settings.secret_file`` (create it before
    deploying several replicas, on storage every node sees).
    """
    from ray import serve  # inside: Ray costs seconds at import; only Serve deployments need it

    load_or_create_secret(settings.resolved_secret_file())
    deployment = serve.deployment(
        serve.ingress()(ConsoleIngress), name=name, num_replicas=num_replicas,
        ray_actor_options={"num_cpus": 0},
    )
    return deployment.bind(settings)


def dev_users_file(directory: str | None = None) -> tuple[str, str]:
    """A throw-away users file with one account ``dev`` holding every role.

    Returns ``(path, password)``; the random password is shown once by the caller and never logged.
    """
    directory = directory or tempfile.mkdtemp(prefix="sj-console-dev-")
    path = os.path.join(directory, "users.json")
    password = secrets.token_urlsafe(18)
    add_user(path, "dev", ROLES, password)
    return path, password


def run_console(
    journal_uri: str,
    host: str = "127.0.0.1",
    port: int = 8265,
    users_file: str | None = None,
    *,
    dev: bool = False,
    use_serve: bool = False,
    secret_file: str | None = None,
    reports_dir: str | None = None,
    public_key: str | None = None,
    key_fingerprint: str | None = None,
    session_ttl_s: float = 1800.0,
    tokenizer_factory: Callable[[], Tokenizer | None] | None = None,
    forgetter_factory: Callable[[], Callable[[str], Any]] | None = None,
    forget_hooks: ForgetHooks | None = None,
    echo: Callable[[str], None] = print,
) -> None:
    """Serve the console until interrupted (what ``serve-journal console`` calls).

    Production mode needs ``users_file`` with at least one account. ``dev=True`` without a users
    file creates a one-time account ``dev`` and shows its random password once through ``echo``.
    ``use_serve=True`` deploys it as a Ray Serve app on ``host:port`` instead of plain uvicorn.
    ``forget_hooks``: the purge and retraining hooks of the default forgetter (by name; default
    from ``SERVE_JOURNAL_PURGE_HOOK`` / ``SERVE_JOURNAL_RETRAINING_HOOK``).
    """
    if users_file is None:
        if not dev:
            raise ValueError(
                "users_file is required (create one with `serve-journal console-user add`); "
                "or pass dev=True for a throw-away account"
            )
        users_file, password = dev_users_file()
        echo(f"dev mode: sign in as 'dev' with password {password} (shown once, not stored)")
    loopback = host in ("127.0.0.1", "localhost", "::1")
    settings = ConsoleSettings(
        journal_uri=journal_uri, users_file=users_file, secret_file=secret_file,
        session_ttl_s=session_ttl_s, secure_cookies=not loopback,
        tokenizer_factory=tokenizer_factory or functools.partial(journal_tokenizer, journal_uri),
        forgetter_factory=forgetter_factory or functools.partial(journal_forgetter, journal_uri,
                                                                 hooks=forget_hooks),
        forget_hooks=forget_hooks,
        public_key=public_key, key_fingerprint=key_fingerprint, reports_dir=reports_dir,
    )
    if not loopback:
        echo("note: session cookies are Secure; put the console behind TLS (a reverse proxy)")
    if use_serve:
        from ray import serve  # inside: Ray costs seconds at import; only --serve needs it

        serve.start(http_options={"host": host, "port": port})
        serve.run(build_serve_app(settings), name="journal-console", route_prefix="/")
        echo(f"console on http://{host}:{port}/ (Ray Serve); Ctrl-C stops")
        try:
            while True:
                time.sleep(3600)
        except KeyboardInterrupt:
            serve.delete("journal-console")
        return
    app = create_app(settings)
    echo(f"console on http://{host}:{port}/ ; Ctrl-C stops")
    uvicorn.run(app, host=host, port=port, log_level="info", server_header=False)


__all__ = [
    "CHART_KINDS", "ROUTERS", "SECURITY_HEADERS", "ConsoleIngress", "ConsoleSettings",
    "build_serve_app", "create_app", "dev_users_file", "journal_forgetter", "journal_tokenizer",
    "run_console", "write_report",
]
