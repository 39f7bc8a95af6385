"""Who may do what: the FastAPI dependencies routes declare, and the pages for refusals.

- ``ConsoleDep``: the app's :class:`~serve_journal.console.state.ConsoleState`;
- ``SignedIn``: any signed-in user, as ``(user, CSRF token)``; without a valid session cookie (or
  with one whose session was signed out) the browser is sent to the sign-in page (and the cookie
  deleted);
- ``allowed(permission)``: a signed-in user holding ``permission``; anyone else gets the 403 page
  and the refusal is written to the access log;
- ``posted(permission)``: the same for a state-changing form, as ``(user, CSRF token, fields)``,
  once the form's CSRF token matched the session (else a 403 "form expired" page).

:func:`install_error_pages` registers the handlers that turn these refusals into pages.
"""

import urllib.parse
from typing import Annotated, Any

from fastapi import Depends, FastAPI, Request
from fastapi.responses import HTMLResponse, RedirectResponse
from starlette.concurrency import run_in_threadpool

from serve_journal.console.auth import User
from serve_journal.console.state import ConsoleState, base_path

SESSION_COOKIE = "sj_session"
PRESESSION_COOKIE = "sj_pre"
PRESESSION_MAX_AGE_S = 900


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


def get_console(request: Request) -> ConsoleState:
    """The console state of the app serving ``request``."""
    return request.app.state.console


ConsoleDep = Annotated[ConsoleState, Depends(get_console)]
#: ``(signed-in user, CSRF token of the session)``
Auth = tuple[User, str]
#: ``(signed-in user, CSRF token of the session, form fields)``
FormAuth = tuple[User, str, dict[str, str]]


def signed_in(request: Request, console: ConsoleDep) -> Auth:
    """The session's user and CSRF token; :class:`SignInRequired` without a valid session (absent,
    forged, expired, or signed out on any replica)."""
    session = console.codec.parse(request.cookies.get(SESSION_COOKIE))
    if session is None or console.revocations.is_revoked(session.sid):
        raise SignInRequired()
    user = console.users.user(session.username)
    if user is None:
        raise SignInRequired()
    return user, console.codec.csrf_token(session.sid)


SignedIn = Annotated[Auth, Depends(signed_in)]


def require(permission: str) -> Any:
    """A dependency giving :data:`Auth` when the user holds ``permission``, else :class:`Forbidden`."""
    def dependency(auth: SignedIn) -> Auth:
        user, _ = auth
        if not user.can(permission):
            raise Forbidden(user, permission)
        return auth

    return dependency


async def read_form(request: Request) -> dict[str, str]:
    """The fields of an ``application/x-www-form-urlencoded`` body (last value of each name).

    No multipart parser is needed, and nothing typed into a form ever goes into the URL.
    """
    body = (await request.body()).decode("utf-8", errors="replace")
    return {k: v[-1] for k, v in urllib.parse.parse_qs(body, keep_blank_values=True).items()}


def checked_form(permission: str | None = None) -> Any:
    """A dependency giving :data:`FormAuth` once the form's CSRF token matches the session."""
    needed = require(permission) if permission else signed_in

    async def dependency(request: Request, console: ConsoleDep,
                         auth: Annotated[Auth, Depends(needed)]) -> FormAuth:
        data = await read_form(request)
        user, token = auth
        session = console.codec.parse(request.cookies.get(SESSION_COOKIE))
        if session is None or not console.codec.check_csrf(session.sid, data.get("csrf")):
            raise BadForm()
        return user, token, data

    return dependency


def allowed(permission: str) -> Any:
    """The parameter type of a page that needs ``permission``: ``auth: allowed("read")``."""
    return Annotated[Auth, Depends(require(permission))]


def posted(permission: str | None = None) -> Any:
    """The parameter type of a form post (CSRF-checked) that needs ``permission`` if given."""
    return Annotated[FormAuth, Depends(checked_form(permission))]


def cookie_args(console: ConsoleState) -> dict[str, Any]:
    """The flags of every console cookie: HttpOnly, SameSite=Strict, Secure as configured."""
    return {"httponly": True, "samesite": "strict", "secure": console.settings.secure_cookies,
            "path": "/"}


async def _to_sign_in(request: Request, exc: SignInRequired) -> RedirectResponse:
    response = RedirectResponse(f"{base_path(request)}/login", status_code=303)
    response.delete_cookie(SESSION_COOKIE, path="/")
    return response


async def _forbidden(request: Request, exc: Forbidden) -> HTMLResponse:
    console = get_console(request)
    await run_in_threadpool(console.log_view, exc.user.name, "denied",
                            permission=exc.permission, path=request.url.path)
    return console.render(request, "forbidden.html", status=403, user=exc.user,
                          permission=exc.permission)


async def _bad_form(request: Request, exc: BadForm) -> HTMLResponse:
    return get_console(request).render(
        request, "error.html", status=403,
        message="This form has expired or did not come from this console "
                "(CSRF token missing or wrong). Go back, reload and try again.")


def install_error_pages(app: FastAPI) -> None:
    """Register the sign-in redirect, the 403 page and the expired-form page on ``app``."""
    app.add_exception_handler(SignInRequired, _to_sign_in)
    app.add_exception_handler(Forbidden, _forbidden)
    app.add_exception_handler(BadForm, _bad_form)


__all__ = [
    "PRESESSION_COOKIE", "PRESESSION_MAX_AGE_S", "SESSION_COOKIE", "Auth", "BadForm",
    "ConsoleDep", "FormAuth", "Forbidden", "SignInRequired", "SignedIn", "allowed", "checked_form",
    "cookie_args", "get_console", "install_error_pages", "posted", "read_form", "require",
    "signed_in",
]
