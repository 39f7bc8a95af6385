"""The investigation console: a FastAPI app over the journal, run alone or as a Ray Serve app.

Reads go through :class:`~serve_journal.read.query.JournalQuery` (whose access log records every query
with the signed-in user as actor), :mod:`serve_journal.read.stats` (exact counters and estimates)
and :func:`serve_journal.read.verify.verify_journal`. Every page view is written to the same access log.

Subject ids are only ever typed into POST forms (search, forget); they are turned into tokens with
the configured tokenizer at once, and pages, URLs, logs and the access log carry the token only.
"""

import dataclasses
import datetime as dt
import functools
import json
import logging
import os
import secrets
import tempfile
import time
import urllib.parse
from collections.abc import Callable
from dataclasses import dataclass
from typing import Annotated, Any

import pyarrow as pa
import pyarrow.parquet as pq

from serve_journal.console.auth import (
    ROLES,
    SessionCodec,
    User,
    UserStore,
    add_user,
    load_or_create_secret,
)
from serve_journal.read.access_log import record_access
from serve_journal.storage import open_storage

logger = logging.getLogger("serve_journal.console")

SESSION_COOKIE = "sj_session"
PRESESSION_COOKIE = "sj_pre"
TEMPLATES_DIR = os.path.join(os.path.dirname(__file__), "templates")
STATIC_DIR = os.path.join(os.path.dirname(__file__), "static")
CHART_KINDS = ("decisions", "outcomes", "scores", "sampling", "lag")
VERIFY_REPORT_PREFIX = "verify-"
REPLAY_REPORT_PREFIX = "replay-"
_SEARCH_FIELDS = ("subject", "subject_token", "request_id", "model", "model_version", "decision",
                  "outcome", "since", "until", "limit", "tier")

Tokenizer = Callable[[str], "str | None"]


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
    session_ttl_s: float = 1800.0
    secure_cookies: bool = True
    tokenizer_factory: Callable[[], Tokenizer | None] | None = None
    forgetter_factory: Callable[[], Callable[[str], Any]] | None = None
    public_key: str | None = None
    """Ed25519 public key (PEM file) checkpoints are verified with; default next to the journal."""
    reports_dir: str | None = None
    hot_days: int | None = None
    max_rows: int = 500
    title: str = "serve-journal console"

    def resolved_secret_file(self) -> str:
        return self.secret_file or f"{os.path.abspath(self.users_file)}.secret"

    def resolved_public_key(self) -> str | None:
        if self.public_key:
            return self.public_key
        from serve_journal.sink.settings import SinkSettings

        return SinkSettings(self.journal_uri).public_key_path()

    def resolved_reports_dir(self) -> str | None:
        if self.reports_dir:
            return os.path.abspath(self.reports_dir)
        uri = self.journal_uri
        if "://" in uri and not uri.startswith("file://"):
            return None
        root = os.path.abspath(uri.removeprefix("file://"))
        return os.path.join(os.path.dirname(root), "journal-reports")


# ------------------------------------------------------------------------------------------------
# Default factories (module-level so that they pickle by reference into Serve replicas)
# ------------------------------------------------------------------------------------------------


def journal_tokenizer(journal_uri: str, **options: Any) -> Tokenizer:
    """The journal's own subject tokenizer (:func:`serve_journal.api.subject_tokenizer`)."""
    from serve_journal.api import subject_tokenizer

    return subject_tokenizer(journal_uri, **options)


def journal_forgetter(journal_uri: str, privacy_dir: str | None = None,
                      vault_url: str | None = None) -> Callable[[str], Any]:
    """``subject id -> ForgetReceipt`` over the journal's keyring and vault."""
    from serve_journal.config import JournalConfig
    from serve_journal.privacy.forget import forget_subject

    if privacy_dir is None:
        privacy_dir = JournalConfig.resolve(model="unused", journal_uri=journal_uri) \
            .resolved_privacy_dir()
    return functools.partial(forget_subject, journal_uri=journal_uri, privacy_dir=privacy_dir,
                             vault_url=vault_url)


# ------------------------------------------------------------------------------------------------
# Errors turned into pages
# ------------------------------------------------------------------------------------------------


class SignInRequired(Exception):
    """No valid session: redirect to the sign-in page."""


class Forbidden(Exception):
    """The signed-in user lacks the permission; rendered as the 403 page."""

    def __init__(self, user: User, permission: str) -> None:
        super().__init__(permission)
        self.user = user
        self.permission = permission


class BadForm(Exception):
    """A state-changing form without a valid CSRF token."""


# ------------------------------------------------------------------------------------------------
# The console state
# ------------------------------------------------------------------------------------------------


class _Console:
    def __init__(self, settings: ConsoleSettings) -> None:
        import jinja2

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
        self.env.filters["cell"] = _cell
        from serve_journal.console.auth import LoginThrottle

        self.throttle = LoginThrottle()
        self._records: dict[str, Any] = {}  # manifest object path -> ManifestRecord (immutable)

    # -- helpers -------------------------------------------------------------------------------

    def query(self, user: User):
        from serve_journal.read.query import JournalQuery

        return JournalQuery(self.storage, tokenizer=self.tokenizer, actor=user.name)

    def log_view(self, actor: str, view: str, rows: int = 0, **details: Any) -> None:
        """One access-log record for a page view (tokens only; never a raw subject id)."""
        started = time.perf_counter()
        record_access(self.storage, actor=actor, filters={"view": view, **details}, rows=rows,
                      tier="console", files_scanned=0,
                      elapsed_ms=(time.perf_counter() - started) * 1000)

    def models(self) -> list[str]:
        from serve_journal.catalog import live_files

        return sorted({f.key.model for f in live_files(self.storage, tier="all")})

    def manifest_records(self) -> dict[str, list[Any]]:
        """Data file path -> its manifest records (cached: record objects never change)."""
        from serve_journal.integrity.manifest import MANIFEST_PREFIX, ManifestError, ManifestRecord

        for path in self.storage.list_files(f"{MANIFEST_PREFIX}/", ".json"):
            if path not in self._records:
                try:
                    self._records[path] = ManifestRecord.from_json(self.storage.read(path))
                except (ManifestError, OSError):
                    continue
        by_file: dict[str, list[Any]] = {}
        for record in self._records.values():
            by_file.setdefault(record.path, []).append(record)
        return by_file

    def default_window(self, model: str) -> tuple[dt.datetime, dt.datetime]:
        from serve_journal.catalog import live_files

        keys = [f.key for f in live_files(self.storage, tier="all", model=model)]
        until = max(k.end for k in keys) if keys else \
            dt.datetime.now(dt.UTC).replace(minute=0, second=0, microsecond=0)
        return until - dt.timedelta(hours=24), until


def _cell(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, dt.datetime):
        return value.astimezone(dt.UTC).strftime("%Y-%m-%d %H:%M:%S.%f")[:-3] + "Z"
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, list | dict):
        return json.dumps(value, default=str)
    return str(value)


def _parse_time(value: str | None, name: str) -> dt.datetime | None:
    if not value:
        return None
    try:
        parsed = dt.datetime.fromisoformat(value.strip().replace("Z", "+00:00"))
    except ValueError as exc:
        raise ValueError(f"{name} must be an ISO-8601 time such as 2025-03-04T10:00") from exc
    return parsed.replace(tzinfo=dt.UTC) if parsed.tzinfo is None else parsed.astimezone(dt.UTC)


def _latest_report(directory: str | None, prefix: str) -> tuple[str, dict] | None:
    if not directory or not os.path.isdir(directory):
        return None
    names = sorted(n for n in os.listdir(directory) if n.startswith(prefix) and n.endswith(".json"))
    for name in reversed(names):
        try:
            with open(os.path.join(directory, name), encoding="utf-8") as handle:
                return name, json.load(handle)
        except (OSError, ValueError):
            continue
    return None


def write_report(directory: str, prefix: str, document: dict) -> str:
    """Write a ``<prefix><UTC time>.json`` summary the console shows as the latest one."""
    os.makedirs(directory, exist_ok=True)
    name = f"{prefix}{dt.datetime.now(dt.UTC):%Y%m%dT%H%M%S%fZ}.json"
    path = os.path.join(directory, name)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o640)
    with os.fdopen(fd, "w", encoding="utf-8") as handle:
        json.dump(document, handle, indent=1, sort_keys=True, default=str)
    return path


# ------------------------------------------------------------------------------------------------
# The app
# ------------------------------------------------------------------------------------------------


def create_app(settings: ConsoleSettings):
    """The console as a FastAPI app (serve it with uvicorn, or through :func:`build_serve_app`)."""
    from fastapi import Depends, FastAPI, Request
    from fastapi.responses import HTMLResponse, RedirectResponse, Response
    from fastapi.staticfiles import StaticFiles
    from starlette.concurrency import run_in_threadpool

    console = _Console(settings)
    app = FastAPI(title=settings.title, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.console = console
    app.mount("/static", StaticFiles(directory=STATIC_DIR), name="static")

    @app.middleware("http")
    async def security_headers(request: Request, call_next):
        response = await call_next(request)
        response.headers["Content-Security-Policy"] = (
            "default-src 'none'; img-src 'self'; style-src 'self'; form-action 'self'; "
            "frame-ancestors 'none'; base-uri 'none'"
        )
        response.headers["X-Content-Type-Options"] = "nosniff"
        response.headers["X-Frame-Options"] = "DENY"
        response.headers["Referrer-Policy"] = "no-referrer"
        response.headers["Cache-Control"] = "no-store"
        return response

    def base(request: Request) -> str:
        return request.scope.get("root_path", "").rstrip("/")

    def render(request: Request, template: str, status: int = 200,
               user: User | None = None, csrf: str | None = None, **context: Any) -> HTMLResponse:
        html = console.env.get_template(template).render(
            base=base(request), user=user, csrf=csrf, title=settings.title, roles=ROLES,
            now=dt.datetime.now(dt.UTC), **context,
        )
        return HTMLResponse(html, status_code=status)

    # -- authentication ------------------------------------------------------------------------

    def signed_in(request: Request) -> tuple[User, str]:
        session = console.codec.parse(request.cookies.get(SESSION_COOKIE))
        if session is None:
            raise SignInRequired()
        user = console.users.user(session.username)
        if user is None:
            raise SignInRequired()
        return user, console.codec.csrf_token(session.sid)

    def require(permission: str):
        def dependency(auth: Annotated[tuple[User, str], Depends(signed_in)]) -> tuple[User, str]:
            user, _ = auth
            if not user.can(permission):
                raise Forbidden(user, permission)
            return auth

        return dependency

    async def form(request: Request) -> dict[str, str]:
        # application/x-www-form-urlencoded only: no multipart parser needed, nothing in the URL.
        body = (await request.body()).decode("utf-8", errors="replace")
        return {k: v[-1] for k, v in urllib.parse.parse_qs(body, keep_blank_values=True).items()}

    def checked_form(permission: str | None = None):
        needed = require(permission) if permission else signed_in

        async def dependency(request: Request, auth: Annotated[tuple[User, str], Depends(needed)]
                             ) -> tuple[User, str, dict[str, str]]:
            data = await form(request)
            user, token = auth
            session = console.codec.parse(request.cookies.get(SESSION_COOKIE))
            if session is None or not console.codec.check_csrf(session.sid, data.get("csrf")):
                raise BadForm()
            return user, token, data

        return dependency

    Auth = tuple[User, str]
    FormAuth = tuple[User, str, dict[str, str]]
    SignedIn = Annotated[Auth, Depends(signed_in)]

    def allowed(permission: str):
        return Annotated[Auth, Depends(require(permission))]

    def posted(permission: str | None = None):
        return Annotated[FormAuth, Depends(checked_form(permission))]

    @app.exception_handler(SignInRequired)
    async def to_sign_in(request: Request, exc: SignInRequired):
        response = RedirectResponse(f"{base(request)}/login", status_code=303)
        response.delete_cookie(SESSION_COOKIE, path="/")
        return response

    @app.exception_handler(Forbidden)
    async def forbidden(request: Request, exc: Forbidden):
        await run_in_threadpool(console.log_view, exc.user.name, "denied",
                                permission=exc.permission, path=request.url.path)
        return render(request, "forbidden.html", status=403, user=exc.user,
                      permission=exc.permission)

    @app.exception_handler(BadForm)
    async def bad_form(request: Request, exc: BadForm):
        return render(request, "error.html", status=403,
                      message="This form has expired or did not come from this console "
                              "(CSRF token missing or wrong). Go back, reload and try again.")

    def cookie_args() -> dict[str, Any]:
        return {"httponly": True, "samesite": "strict", "secure": settings.secure_cookies,
                "path": "/"}

    @app.get("/healthz", include_in_schema=False)
    def healthz() -> Response:
        return Response("ok", media_type="text/plain")

    @app.get("/login", response_class=HTMLResponse)
    def login_page(request: Request):
        pre = console.codec.issue_presession()
        nonce = console.codec.parse_presession(pre)
        response = render(request, "login.html", csrf=console.codec.csrf_token(nonce), error=None)
        response.set_cookie(PRESESSION_COOKIE, pre, max_age=900, **cookie_args())
        return response

    @app.post("/login")
    async def login(request: Request):
        data = await form(request)
        nonce = console.codec.parse_presession(request.cookies.get(PRESESSION_COOKIE))
        if nonce is None or not console.codec.check_csrf(nonce, data.get("csrf")):
            raise BadForm()
        client = request.client.host if request.client else "unknown"
        if console.throttle.blocked(client):
            return render(request, "login.html", status=429, csrf=data.get("csrf"),
                          error="Too many failed sign-ins from this address; wait a few minutes.")
        user = await run_in_threadpool(console.users.authenticate, data.get("username", ""),
                                       data.get("password", ""))
        if user is None:
            console.throttle.failed(client)
            # The typed name is not logged: it is sometimes a password typed in the wrong field.
            await run_in_threadpool(console.log_view, "anonymous", "sign_in_failed")
            return render(request, "login.html", status=401, csrf=data.get("csrf"),
                          error="Wrong user name or password.")
        await run_in_threadpool(console.log_view, user.name, "sign_in")
        response = RedirectResponse(f"{base(request)}/", status_code=303)
        response.set_cookie(SESSION_COOKIE, console.codec.issue(user.name),
                            max_age=int(settings.session_ttl_s), **cookie_args())
        response.delete_cookie(PRESESSION_COOKIE, path="/")
        return response

    @app.post("/logout")
    def logout(request: Request, auth: posted()):
        user, _, _ = auth
        console.log_view(user.name, "sign_out")
        response = RedirectResponse(f"{base(request)}/login", status_code=303)
        response.delete_cookie(SESSION_COOKIE, path="/")
        return response

    # -- pages ---------------------------------------------------------------------------------

    @app.get("/", response_class=HTMLResponse)
    def home(request: Request, auth: SignedIn):
        user, csrf = auth
        console.log_view(user.name, "home")
        models = console.models() if user.can("charts") else []
        return render(request, "home.html", user=user, csrf=csrf, models=models,
                      values={}, error=None)

    @app.get("/search", response_class=HTMLResponse)
    def search_page(request: Request, auth: allowed("query")):
        user, csrf = auth
        console.log_view(user.name, "search_form")
        return render(request, "search.html", user=user, csrf=csrf, values={}, error=None)

    @app.post("/search", response_class=HTMLResponse)
    def search(request: Request, auth: posted("query")):
        user, csrf, data = auth
        values = {k: data.get(k, "").strip() for k in _SEARCH_FIELDS}
        echo = {k: v for k, v in values.items() if k != "subject"}  # never echo a subject id
        try:
            limit = int(values["limit"]) if values["limit"] else settings.max_rows
            if not 1 <= limit <= 10_000:
                raise ValueError("limit must be between 1 and 10000")
            tier = values["tier"] or "hot"
            if tier not in ("hot", "cold", "all"):
                raise ValueError("tier must be hot, cold or all")
            filters = {
                "subject": values["subject"] or None,
                "subject_token": values["subject_token"] or None,
                "request_id": values["request_id"] or None,
                "model": values["model"] or None,
                "model_version": values["model_version"] or None,
                "decision": values["decision"] or None,
                "outcome": values["outcome"] or None,
                "since": _parse_time(values["since"], "since"),
                "until": _parse_time(values["until"], "until"),
            }
            if filters["subject"] and console.tokenizer is None:
                raise ValueError("this console has no subject tokenizer: search by subject token")
            with console.query(user) as q:
                table = q.find(**filters, limit=limit, tier=tier)
                stats = q.last_stats
        except (ValueError, TypeError) as exc:
            console.log_view(user.name, "search_rejected")
            return render(request, "search.html", status=400, user=user, csrf=csrf, values=echo,
                          error=str(exc))
        token = None
        if filters["subject"] and console.tokenizer is not None:
            token = console.tokenizer(filters["subject"])
        elif filters["subject_token"]:
            token = filters["subject_token"]
        console.log_view(user.name, "search_results", rows=table.num_rows,
                         subject_token=token)
        return render(request, "results.html", user=user, csrf=csrf, values=echo,
                      rows=table.to_pylist(), stats=stats, subject_token=token,
                      subject_searched=bool(filters["subject"]), limit=limit)

    @app.get("/entry", response_class=HTMLResponse)
    def entry(request: Request, model: str, request_id: str, producer: str, seq: int,
              auth: allowed("read")):
        from serve_journal.read.verify import VerifyReport, _check_file
        from serve_journal.schema import COLUMNS

        user, csrf = auth
        with console.query(user) as q:
            table = q.find(request_id=request_id, model=model, tier="all")
            rows = [r for r in table.to_pylist()
                    if r["producer_id"] == producer and r["seq"] == seq]
            files = []
            if rows:
                ts = rows[0]["ts"]
                files = q.files(model=model, since=ts, until=ts + dt.timedelta(microseconds=1),
                                tier="all")
        console.log_view(user.name, "entry", rows=len(rows), request_id=request_id, model=model)
        if not rows:
            return render(request, "error.html", status=404, user=user, csrf=csrf,
                          message="No such entry in the journal (or it is not live any more).")
        row = rows[0]
        holder = None
        for f in files:
            data = console.storage.read(f.path)
            part = pq.ParquetFile(pa.BufferReader(data)).read(columns=["producer_id", "seq"])
            if any(p == producer and s == seq for p, s in zip(
                    part["producer_id"].to_pylist(), part["seq"].to_pylist(), strict=True)):
                holder = f
                break
        record = None
        verify_status = "no data file found holding this entry"
        problems: list[Any] = []
        if holder is not None:
            records = console.manifest_records().get(holder.path, [])
            if records:
                record = records[-1]
                report = VerifyReport(journal=console.storage.uri)
                ok = _check_file(console.storage, holder.path, records, report)
                problems = report.problems
                verify_status = ("verified: bytes, row count, time and sequence ranges and Merkle "
                                 "root match the manifest record") if ok else "FAILED"
            else:
                verify_status = "no manifest record for this file (written without manifests?)"
        columns = [(name, doc, row[name]) for name, _, _, doc in COLUMNS]
        return render(request, "entry.html", user=user, csrf=csrf, row=row, columns=columns,
                      file=holder, record=dataclasses.asdict(record) if record else None,
                      verify_status=verify_status, problems=problems)

    @app.get("/subject/{token}", response_class=HTMLResponse)
    def timeline(request: Request, token: str, auth: allowed("read")):
        user, csrf = auth
        with console.query(user) as q:
            table = q.find(subject_token=token, tier="all", limit=settings.max_rows)
        console.log_view(user.name, "subject_timeline", rows=table.num_rows, subject_token=token)
        return render(request, "timeline.html", user=user, csrf=csrf, token=token,
                      rows=table.to_pylist())

    @app.get("/subject/{token}/chart.png")
    def timeline_chart(token: str, auth: allowed("read")):
        from serve_journal.console import charts

        user, _ = auth
        with console.query(user) as q:
            table = q.find(subject_token=token, tier="all", limit=settings.max_rows)
        png = charts.subject_timeline(table["ts"].to_pylist(), table["score"].to_pylist(),
                                      table["decision"].to_pylist(),
                                      table["threshold"].to_pylist(),
                                      "decisions about this subject (score, by decision)")
        return Response(png, media_type="image/png")

    @app.get("/models/{model}", response_class=HTMLResponse)
    def model_page(request: Request, model: str, auth: allowed("charts"),
                   since: str | None = None, until: str | None = None):
        user, csrf = auth
        try:
            window = _window(model, since, until)
        except ValueError as exc:
            return render(request, "error.html", status=400, user=user, csrf=csrf,
                          message=str(exc))
        console.log_view(user.name, "model_charts", model=model)
        query = urllib.parse.urlencode({"since": window[0].isoformat(),
                                        "until": window[1].isoformat()})
        return render(request, "model.html", user=user, csrf=csrf, model=model, window=window,
                      kinds=CHART_KINDS, query=query)

    def _window(model: str, since: str | None, until: str | None):
        default_since, default_until = console.default_window(model)
        return (_parse_time(since, "since") or default_since,
                _parse_time(until, "until") or default_until)

    @app.get("/models/{model}/chart/{kind}.png")
    def model_chart(model: str, kind: str, auth: allowed("charts"), since: str | None = None,
                    until: str | None = None):
        from serve_journal.console import charts

        user, _ = auth
        if kind not in CHART_KINDS:
            return Response(f"chart must be one of {CHART_KINDS}", status_code=404,
                            media_type="text/plain")
        try:
            start, end = _window(model, since, until)
        except ValueError as exc:
            return Response(str(exc), status_code=400, media_type="text/plain")
        label = f"{model}, {start:%Y-%m-%d %H:%M} .. {end:%Y-%m-%d %H:%M} UTC"
        if kind == "sampling":
            from serve_journal.read.stats import load_counters

            png = charts.sampling_and_drops(load_counters(console.storage, start, end, model),
                                            f"captured entries by disposition (exact), {label}")
        elif kind == "lag":
            lo_us, hi_us = int(start.timestamp() * 1e6), int(end.timestamp() * 1e6)
            points = []
            for records in console.manifest_records().values():
                r = records[-1]
                if r.model != model or r.min_ts_us is None or r.max_ts_us < lo_us \
                        or r.min_ts_us >= hi_us or not r.created or r.replaces:
                    continue
                created = dt.datetime.fromisoformat(r.created).timestamp()
                newest = dt.datetime.fromtimestamp(r.max_ts_us / 1e6, dt.UTC)
                points.append((newest, created - r.max_ts_us / 1e6, created - r.min_ts_us / 1e6))
            points.sort()
            png = charts.persistence_lag(points, f"end-to-end persistence lag, {label}")
        else:
            with console.query(user) as q:
                table = q.find(model=model, since=start, until=end, tier="all")
            if kind == "decisions":
                png = charts.counts_over_time(table["ts"].to_pylist(),
                                              table["decision"].to_pylist(),
                                              f"decisions (kept entries), {label}")
            elif kind == "outcomes":
                png = charts.counts_over_time(table["ts"].to_pylist(),
                                              table["outcome"].to_pylist(),
                                              f"outcomes (kept entries), {label}")
            else:
                png = charts.score_distribution(table["score"].to_pylist(),
                                                table["threshold"].to_pylist(),
                                                f"score distribution, {label}")
        return Response(png, media_type="image/png")

    @app.get("/stats", response_class=HTMLResponse)
    def stats_page(request: Request, auth: allowed("stats"), model: str | None = None,
                   since: str | None = None, until: str | None = None):
        from serve_journal.read.stats import stats

        user, csrf = auth
        try:
            report = stats(console.storage, _parse_time(since, "since"),
                           _parse_time(until, "until"), model or None,
                           group_by=("model_name", "model_version", "decision", "outcome"))
        except ValueError as exc:
            return render(request, "error.html", status=400, user=user, csrf=csrf,
                          message=str(exc))
        console.log_view(user.name, "stats", rows=report.journal_rows, model=model)
        return render(request, "stats.html", user=user, csrf=csrf, report=report, model=model,
                      models=console.models())

    @app.get("/lifecycle", response_class=HTMLResponse)
    def lifecycle_page(request: Request, auth: allowed("lifecycle")):
        from serve_journal.maintain import lifecycle

        user, csrf = auth
        kwargs = {} if settings.hot_days is None else {"hot_days": settings.hot_days}
        plan = lifecycle.plan(console.storage, **kwargs)
        console.log_view(user.name, "lifecycle_dry_run", rows=len(plan.moves))
        return render(request, "lifecycle.html", user=user, csrf=csrf, plan=plan)

    @app.get("/reports", response_class=HTMLResponse)
    def reports_page(request: Request, auth: allowed("reports")):
        user, csrf = auth
        directory = settings.resolved_reports_dir()
        console.log_view(user.name, "reports")
        return render(request, "reports.html", user=user, csrf=csrf, directory=directory,
                      verify=_latest_report(directory, VERIFY_REPORT_PREFIX),
                      replay=_latest_report(directory, REPLAY_REPORT_PREFIX), message=None)

    @app.post("/reports/verify", response_class=HTMLResponse)
    def run_verify(request: Request, auth: posted("run_verify")):
        from serve_journal.read.stats import accounted_gaps
        from serve_journal.read.verify import verify_journal

        user, csrf, _ = auth
        directory = settings.resolved_reports_dir()
        key = settings.resolved_public_key()
        if not key or not os.path.exists(key) or directory is None:
            message = ("cannot verify here: configure the checkpoint public key (public_key) "
                       "and a reports directory (reports_dir)")
        else:
            report = verify_journal(console.storage, public_key=key,
                                    accounted_gaps=accounted_gaps(console.storage))
            document = report.to_dict()
            document["run_by"] = user.name
            document["run_at"] = dt.datetime.now(dt.UTC).isoformat()
            write_report(directory, VERIFY_REPORT_PREFIX, document)
            message = f"verify finished: {'OK' if report.ok else 'FAILED'}"
        console.log_view(user.name, "run_verify")
        return render(request, "reports.html", user=user, csrf=csrf, directory=directory,
                      verify=_latest_report(directory, VERIFY_REPORT_PREFIX),
                      replay=_latest_report(directory, REPLAY_REPORT_PREFIX), message=message)

    @app.get("/forget", response_class=HTMLResponse)
    def forget_page(request: Request, auth: allowed("forget")):
        user, csrf = auth
        console.log_view(user.name, "forget_form")
        return render(request, "forget.html", user=user, csrf=csrf, receipt=None, error=None)

    @app.post("/forget", response_class=HTMLResponse)
    def forget(request: Request, auth: posted("forget")):
        user, csrf, data = auth
        subject = data.get("subject", "").strip()
        if not subject or data.get("confirm") != "yes":
            return render(request, "forget.html", status=400, user=user, csrf=csrf, receipt=None,
                          error="Type the subject id and tick the confirmation box.")
        if console.forgetter is None:
            return render(request, "forget.html", status=400, user=user, csrf=csrf, receipt=None,
                          error="This console has no forget configured (forgetter_factory).")
        receipt = console.forgetter(subject)
        console.log_view(user.name, "forget", receipt_id=receipt.receipt_id,
                         status=receipt.status, entries_unlinkable=receipt.entries_unlinkable)
        return render(request, "forget.html", user=user, csrf=csrf, error=None,
                      receipt=dataclasses.asdict(receipt))

    @app.get("/access", response_class=HTMLResponse)
    def access_page(request: Request, auth: allowed("access_log"), date: str | None = None):
        from serve_journal.read.query import read_access_log

        user, csrf = auth
        day = date or dt.datetime.now(dt.UTC).strftime("%Y-%m-%d")
        try:
            dt.date.fromisoformat(day)
        except ValueError:
            return render(request, "error.html", status=400, user=user, csrf=csrf,
                          message="date must look like 2025-03-04")
        console.log_view(user.name, "access_log", date=day)
        records = read_access_log(console.storage, date=day)
        return render(request, "access.html", user=user, csrf=csrf, day=day,
                      total=len(records), records=list(reversed(records[-500:])))

    return app


# ------------------------------------------------------------------------------------------------
# Ray Serve and local runs
# ------------------------------------------------------------------------------------------------


class ConsoleIngress:
    """The Serve deployment class: builds the FastAPI app inside each replica."""

    def __init__(self, settings: ConsoleSettings) -> None:
        self._settings = settings

    def __serve_build_asgi_app__(self):
        return create_app(self._settings)


def build_serve_app(settings: ConsoleSettings, *, num_replicas: int = 1,
                    name: str = "JournalConsole"):
    """The console as a Serve application (``serve.run(build_serve_app(s), route_prefix=...)``).

    Replicas share the session secret through ``settings.secret_file`` (create it before
    deploying several replicas, on storage every node sees).
    """
    from ray import serve

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
    session_ttl_s: float = 1800.0,
    tokenizer_factory: Callable[[], Tokenizer | None] | None = None,
    forgetter_factory: Callable[[], Callable[[str], Any]] | None = None,
    echo: Callable[[str], None] = print,
) -> None:
    """Serve the console until interrupted (what ``serve-journal console`` calls).

    Production mode needs ``users_file`` with at least one account. ``dev=True`` without a users
    file creates a one-time account ``dev`` and shows its random password once through ``echo``.
    ``use_serve=True`` deploys it as a Ray Serve app on ``host:port`` instead of plain uvicorn.
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
        forgetter_factory=forgetter_factory or functools.partial(journal_forgetter, journal_uri),
        public_key=public_key, reports_dir=reports_dir,
    )
    if not loopback:
        echo("note: session cookies are Secure; put the console behind TLS (a reverse proxy)")
    if use_serve:
        from ray import serve

        serve.start(http_options={"host": host, "port": port})
        serve.run(build_serve_app(settings), name="journal-console", route_prefix="/")
        echo(f"console on http://{host}:{port}/ (Ray Serve); Ctrl-C stops")
        try:
            while True:
                time.sleep(3600)
        except KeyboardInterrupt:
            serve.delete("journal-console")
        return
    import uvicorn

    app = create_app(settings)
    echo(f"console on http://{host}:{port}/ ; Ctrl-C stops")
    uvicorn.run(app, host=host, port=port, log_level="info", server_header=False)


__all__ = [
    "CHART_KINDS", "ConsoleIngress", "ConsoleSettings", "build_serve_app", "create_app",
    "dev_users_file", "journal_forgetter", "journal_tokenizer", "run_console", "write_report",
]
