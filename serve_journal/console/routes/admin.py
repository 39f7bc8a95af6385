"""Administrative pages: forget a subject, the day's access log, the lifecycle dry run.

Forget takes the subject id from a POST form with a confirmation box, runs the configured
forgetter (crypto-shredding the subject's key) and shows the receipt, which holds neither the id
nor the token.
"""

import dataclasses
import datetime as dt

from fastapi import APIRouter, Request
from fastapi.responses import HTMLResponse

from serve_journal.console.deps import ConsoleDep, allowed, posted
from serve_journal.errors import ForgetIncompleteError
from serve_journal.maintain.lifecycle import plan
from serve_journal.read.access_log import read_access_log

router = APIRouter()

#: The newest records shown on the access-log page.
ACCESS_LOG_ROWS = 500


@router.get("/forget", response_class=HTMLResponse)
def forget_page(request: Request, console: ConsoleDep,
                auth: allowed("forget")) -> HTMLResponse:
    """The forget form."""
    user, csrf = auth
    console.log_view(user.name, "forget_form")
    return console.render(request, "forget.html", user=user, csrf=csrf, receipt=None,
                          error=None, hooks=console.settings.forget_hooks)


@router.post("/forget", response_class=HTMLResponse)
def forget(request: Request, console: ConsoleDep, auth: posted("forget")) -> HTMLResponse:
    """Forget the typed subject (after the confirmation box) and show the receipt."""
    user, csrf, data = auth
    subject = data.get("subject", "").strip()
    if not subject or data.get("confirm") != "yes":
        return console.render(request, "forget.html", status=400, user=user, csrf=csrf,
                              receipt=None,
                              error="Type the subject id and tick the confirmation box.")
    if console.forgetter is None:
        return console.render(request, "forget.html", status=400, user=user, csrf=csrf,
                              receipt=None,
                              error="This console has no forget configured (forgetter_factory).")
    error = None
    try:
        receipt = console.forgetter(subject)
    except ForgetIncompleteError as exc:  # the key is destroyed; a hook failed
        receipt = exc.receipt
        failed = ", ".join(k for k, v in sorted(receipt.hooks.items()) if v.startswith("failed"))
        error = (f"The key is destroyed, but hook(s) failed: {failed}. Run them again; the "
                 "receipt below records it.")
    if receipt.uncounted_files:
        error = ((error + " ") if error else "") + (
            f"Restore needed: {len(receipt.uncounted_files)} archived file(s) were not counted "
            f"(their entries are unlinkable all the same); run {receipt.restore_command}")
    console.log_view(user.name, "forget", receipt_id=receipt.receipt_id,
                     status=receipt.status, entries_unlinkable=receipt.entries_unlinkable,
                     hooks=dict(receipt.hooks))
    return console.render(request, "forget.html", user=user, csrf=csrf, error=error,
                          receipt=dataclasses.asdict(receipt), hooks=console.settings.forget_hooks)


@router.get("/access", response_class=HTMLResponse)
def access_page(request: Request, console: ConsoleDep, auth: allowed("access_log"),
                date: str | None = None) -> HTMLResponse:
    """One day's access-log records (default today, UTC), newest first."""
    user, csrf = auth
    day = date or dt.datetime.now(dt.UTC).strftime("%Y-%m-%d")
    try:
        dt.date.fromisoformat(day)
    except ValueError:
        return console.render(request, "error.html", status=400, user=user, csrf=csrf,
                              message="date must look like 2025-03-04")
    console.log_view(user.name, "access_log", date=day)
    records = read_access_log(console.storage, date=day)
    return console.render(request, "access.html", user=user, csrf=csrf, day=day,
                          total=len(records),
                          records=list(reversed(records[-ACCESS_LOG_ROWS:])))


@router.get("/lifecycle", response_class=HTMLResponse)
def lifecycle_page(request: Request, console: ConsoleDep,
                   auth: allowed("lifecycle")) -> HTMLResponse:
    """The hot -> cold lifecycle plan (dry run only: nothing is moved from here)."""
    user, csrf = auth
    hot_days = console.settings.hot_days
    lifecycle_plan = plan(console.storage) if hot_days is None else \
        plan(console.storage, hot_days=hot_days)
    console.log_view(user.name, "lifecycle_dry_run", rows=len(lifecycle_plan.moves))
    return console.render(request, "lifecycle.html", user=user, csrf=csrf, plan=lifecycle_plan)
