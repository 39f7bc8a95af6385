"""Sign-in, sign-out and the health check.

The sign-in form's CSRF token comes from a signed pre-session cookie (``sj_pre``); a successful
sign-in sets the session cookie (``sj_session``, lifetime ``session_ttl_s``) and deletes the
pre-session cookie; failures are throttled per client address and per account name (shared by
every replica) and logged without the typed name. Sign-out revokes the session on the server, so
a copy of the cookie is refused from then on, on every replica.
"""

import functools

from fastapi import APIRouter, Request
from fastapi.responses import HTMLResponse, RedirectResponse, Response
from starlette.concurrency import run_in_threadpool

from serve_journal.console.deps import (
    PRESESSION_COOKIE,
    PRESESSION_MAX_AGE_S,
    SESSION_COOKIE,
    BadForm,
    ConsoleDep,
    cookie_args,
    posted,
    read_form,
)
from serve_journal.console.state import base_path

router = APIRouter()


@router.get("/healthz", include_in_schema=False)
def healthz() -> Response:
    """Liveness: ``ok`` without signing in."""
    return Response("ok", media_type="text/plain")


@router.get("/login", response_class=HTMLResponse)
def login_page(request: Request, console: ConsoleDep) -> HTMLResponse:
    """The sign-in form, with a fresh pre-session cookie behind its CSRF token."""
    pre = console.codec.issue_presession()
    nonce = console.codec.parse_presession(pre)
    response = console.render(request, "login.html", csrf=console.codec.csrf_token(nonce),
                              error=None)
    response.set_cookie(PRESESSION_COOKIE, pre, max_age=PRESESSION_MAX_AGE_S,
                        **cookie_args(console))
    return response


@router.post("/login")
async def login(request: Request, console: ConsoleDep) -> Response:
    """Check the password; on success set the session cookie and go to the home page."""
    data = await read_form(request)
    nonce = console.codec.parse_presession(request.cookies.get(PRESESSION_COOKIE))
    if nonce is None or not console.codec.check_csrf(nonce, data.get("csrf")):
        raise BadForm()
    client = request.client.host if request.client else "unknown"
    username = data.get("username", "")
    if console.throttle.blocked(client):
        return console.render(request, "login.html", status=429, csrf=data.get("csrf"),
                              error="Too many failed sign-ins from this address; "
                                    "wait a few minutes.")
    if await run_in_threadpool(console.throttle.account_blocked, username):
        await run_in_threadpool(console.log_view, "anonymous", "sign_in_throttled")
        return console.render(request, "login.html", status=429, csrf=data.get("csrf"),
                              error="Too many failed sign-ins for this account; "
                                    "wait a few minutes.")
    user = await run_in_threadpool(console.users.authenticate, username,
                                   data.get("password", ""))
    if user is None:
        await run_in_threadpool(functools.partial(console.throttle.failed, client,
                                                  account=username))
        # The typed name is not logged: it is sometimes a password typed in the wrong field.
        await run_in_threadpool(console.log_view, "anonymous", "sign_in_failed")
        return console.render(request, "login.html", status=401, csrf=data.get("csrf"),
                              error="Wrong user name or password.")
    await run_in_threadpool(console.log_view, user.name, "sign_in")
    response = RedirectResponse(f"{base_path(request)}/", status_code=303)
    response.set_cookie(SESSION_COOKIE, console.codec.issue(user.name),
                        max_age=int(console.settings.session_ttl_s), **cookie_args(console))
    response.delete_cookie(PRESESSION_COOKIE, path="/")
    return response


@router.post("/logout")
def logout(request: Request, console: ConsoleDep, auth: posted()) -> Response:
    """Revoke the session on the server and delete its cookie (a CSRF-checked form); go to the
    sign-in page."""
    user, _, _ = auth
    session = console.codec.parse(request.cookies.get(SESSION_COOKIE))
    if session is not None:
        console.revocations.revoke(session.sid, session.expires)
    console.log_view(user.name, "sign_out")
    response = RedirectResponse(f"{base_path(request)}/login", status_code=303)
    response.delete_cookie(SESSION_COOKIE, path="/")
    return response
