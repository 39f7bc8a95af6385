"""Verify and replay summaries: the latest of each for readers, "run verify now" for operators.

"Run verify now" runs :func:`serve_journal.read.verify.verify_journal` over the whole journal
with the checkpoint public key and the counted gaps, and writes a new ``verify-*.json`` summary
(naming who ran it) into the reports directory.
"""

import datetime as dt

from fastapi import APIRouter, Request
from fastapi.responses import HTMLResponse

from serve_journal.console.auth import User
from serve_journal.console.deps import ConsoleDep, allowed, posted
from serve_journal.console.reports import (
    REPLAY_REPORT_PREFIX,
    VERIFY_REPORT_PREFIX,
    latest_report,
    write_report,
)
from serve_journal.console.state import ConsoleState
from serve_journal.integrity.trust import TrustError
from serve_journal.read.verify import verify_journal

router = APIRouter()


def _page(request: Request, console: ConsoleState, user: User, csrf: str,
          directory: str | None, message: str | None) -> HTMLResponse:
    return console.render(request, "reports.html", user=user, csrf=csrf, directory=directory,
                          verify=latest_report(directory, VERIFY_REPORT_PREFIX),
                          replay=latest_report(directory, REPLAY_REPORT_PREFIX), message=message)


@router.get("/reports", response_class=HTMLResponse)
def reports_page(request: Request, console: ConsoleDep,
                 auth: allowed("reports")) -> HTMLResponse:
    """The latest verify and replay summaries."""
    user, csrf = auth
    directory = console.settings.resolved_reports_dir()
    console.log_view(user.name, "reports")
    return _page(request, console, user, csrf, directory, None)


@router.post("/reports/verify", response_class=HTMLResponse)
def run_verify(request: Request, console: ConsoleDep,
               auth: posted("run_verify")) -> HTMLResponse:
    """Verify the journal now and write the summary (needs the public key and a reports dir)."""
    user, csrf, _ = auth
    directory = console.settings.resolved_reports_dir()
    try:
        anchor = console.settings.resolved_trust()
    except (TrustError, OSError, ValueError) as exc:
        anchor, problem = None, str(exc)
    if anchor is None or directory is None:
        message = ("cannot verify here: configure the auditor's public key (public_key, or "
                   "key_fingerprint to pin the key beside the journal) and a reports directory "
                   f"(reports_dir): {problem if anchor is None else 'no reports directory'}")
    else:
        report = verify_journal(console.storage, public_key=anchor.public_key)
        document = report.to_dict()
        document["run_by"] = user.name
        document["run_at"] = dt.datetime.now(dt.UTC).isoformat()
        write_report(directory, VERIFY_REPORT_PREFIX, document)
        message = f"verify finished: {'OK' if report.ok else 'FAILED'}"
    console.log_view(user.name, "run_verify")
    return _page(request, console, user, csrf, directory, message)
