"""Investigation pages: home, search, one entry with its verify status, a subject's timeline,
the entries of one trace.

A subject id is only ever typed into the search form (a POST): it is turned into a token at once
and the pages, links and access-log records carry the token only. A subject token (search field
or ``/subject/<token>``) must have a token's format; another value is refused without being
echoed (it may be a subject id pasted into the wrong field). A trace id (search field or
``/trace/<trace id>``, the link a tracing UI can point at) must have a W3C trace id's format.
"""

import datetime as dt
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
from fastapi import APIRouter, Request
from fastapi.responses import HTMLResponse, Response

from serve_journal.catalog import DataFile
from serve_journal.console.charts import subject_timeline
from serve_journal.console.deps import ConsoleDep, SignedIn, allowed, posted
from serve_journal.console.state import ConsoleState
from serve_journal.privacy.tokens import is_subject_token
from serve_journal.read.verify import verify_file
from serve_journal.schema import COLUMNS, check_trace_id
from serve_journal.times import as_utc

router = APIRouter()

#: The search form's fields (``subject`` is never echoed back into a page).
SEARCH_FIELDS = ("subject", "subject_token", "request_id", "trace_id", "model", "model_version",
                 "decision", "outcome", "since", "until", "limit", "tier")
TIERS = ("hot", "cold", "all")
MAX_LIMIT = 10_000

Querier = allowed("query")
Reader = allowed("read")


@router.get("/", response_class=HTMLResponse)
def home(request: Request, console: ConsoleDep, auth: SignedIn) -> HTMLResponse:
    """The home page: the search form, and the models with charts for those who may see them."""
    user, csrf = auth
    console.log_view(user.name, "home")
    models = console.models() if user.can("charts") else []
    return console.render(request, "home.html", user=user, csrf=csrf, models=models,
                          values={}, error=None)


@router.get("/search", response_class=HTMLResponse)
def search_page(request: Request, console: ConsoleDep, auth: Querier) -> HTMLResponse:
    """The empty search form."""
    user, csrf = auth
    console.log_view(user.name, "search_form")
    return console.render(request, "search.html", user=user, csrf=csrf, values={}, error=None)


def _filters(values: dict[str, str], console: ConsoleState) -> tuple[dict[str, Any], int, str]:
    """The query filters, row limit and tier of a search form; ``ValueError`` when invalid."""
    limit = int(values["limit"]) if values["limit"] else console.settings.max_rows
    if not 1 <= limit <= MAX_LIMIT:
        raise ValueError(f"limit must be between 1 and {MAX_LIMIT}")
    tier = values["tier"] or "hot"
    if tier not in TIERS:
        raise ValueError("tier must be hot, cold or all")
    filters = {
        "subject": values["subject"] or None,
        "subject_token": values["subject_token"] or None,
        "request_id": values["request_id"] or None,
        "trace_id": check_trace_id(values["trace_id"]) if values["trace_id"] else None,
        "model": values["model"] or None,
        "model_version": values["model_version"] or None,
        "decision": values["decision"] or None,
        "outcome": values["outcome"] or None,
        "since": as_utc(values["since"] or None, "since"),
        "until": as_utc(values["until"] or None, "until"),
    }
    if filters["subject"] and console.tokenizer is None:
        raise ValueError("this console has no subject tokenizer: search by subject token")
    return filters, limit, tier


@router.post("/search", response_class=HTMLResponse)
def search(request: Request, console: ConsoleDep, auth: posted("query")) -> HTMLResponse:
    """Run a search; the results page names the subject by token only."""
    user, csrf, data = auth
    values = {k: data.get(k, "").strip() for k in SEARCH_FIELDS}
    echo = {k: v for k, v in values.items() if k != "subject"}  # never echo a subject id
    if values["subject_token"] and not is_subject_token(values["subject_token"]):
        echo["subject_token"] = ""  # nor what may be one, pasted into the token field
    if values["trace_id"] and not _is_trace_id(values["trace_id"]):
        echo["trace_id"] = ""  # nor into the trace id field
    try:
        filters, limit, tier = _filters(values, console)
        with console.query(user) as q:
            table = q.find(**filters, limit=limit, tier=tier)
            stats = q.last_stats
    except (ValueError, TypeError) as exc:
        console.log_view(user.name, "search_rejected")
        return console.render(request, "search.html", status=400, user=user, csrf=csrf,
                              values=echo, error=str(exc))
    token = None
    if filters["subject"] and console.tokenizer is not None:
        token = console.tokenizer(filters["subject"])
    elif filters["subject_token"]:
        token = filters["subject_token"]
    console.log_view(user.name, "search_results", rows=table.num_rows, subject_token=token)
    return console.render(request, "results.html", user=user, csrf=csrf, values=echo,
                          rows=table.to_pylist(), stats=stats, subject_token=token,
                          subject_searched=bool(filters["subject"]), limit=limit,
                          trace_id=filters["trace_id"])


def _is_trace_id(value: str) -> bool:
    try:
        check_trace_id(value)
    except ValueError:
        return False
    return True


@router.get("/trace/{trace_id}", response_class=HTMLResponse)
def trace(request: Request, console: ConsoleDep, trace_id: str, auth: Querier) -> HTMLResponse:
    """The entries of one trace (every journaled deployment it reached; hot and cold tiers),
    oldest first: the page a tracing UI links to from a span."""
    user, csrf = auth
    try:
        trace_id = check_trace_id(trace_id)
    except ValueError:
        console.log_view(user.name, "trace_rejected")
        return console.render(request, "error.html", status=404, user=user, csrf=csrf,
                              message="Not a trace id (32 hexadecimal characters, not all zeros).")
    limit = console.settings.max_rows
    with console.query(user) as q:
        table = q.find(trace_id=trace_id, tier="all", limit=limit)
        stats = q.last_stats
    console.log_view(user.name, "trace", rows=table.num_rows, trace_id=trace_id)
    return console.render(request, "results.html", user=user, csrf=csrf,
                          values={"trace_id": trace_id, "tier": "all"}, rows=table.to_pylist(),
                          stats=stats, subject_token=None, subject_searched=False, limit=limit,
                          trace_id=trace_id)


def _holder(console: ConsoleState, files: list[DataFile], producer: str,
            seq: int) -> DataFile | None:
    """The live data file among ``files`` that holds entry ``(producer, seq)``, or ``None``."""
    for f in files:
        data = console.storage.read(f.path)
        part = pq.ParquetFile(pa.BufferReader(data)).read(columns=["producer_id", "seq"])
        if any(p == producer and s == seq for p, s in zip(
                part["producer_id"].to_pylist(), part["seq"].to_pylist(), strict=True)):
            return f
    return None


@router.get("/entry", response_class=HTMLResponse)
def entry(request: Request, console: ConsoleDep, model: str, request_id: str, producer: str,
          seq: int, auth: Reader) -> HTMLResponse:
    """One entry: every column with its meaning, its data file, manifest record and verify status."""
    user, csrf = auth
    with console.query(user) as q:
        table = q.find(request_id=request_id, model=model, tier="all")
        rows = [r for r in table.to_pylist()
                if r["producer_id"] == producer and r["seq"] == seq]
        files: list[DataFile] = []
        if rows:
            ts = rows[0]["ts"]
            files = q.files(model=model, since=ts, until=ts + dt.timedelta(microseconds=1),
                            tier="all")
    console.log_view(user.name, "entry", rows=len(rows), request_id=request_id, model=model)
    if not rows:
        return console.render(request, "error.html", status=404, user=user, csrf=csrf,
                              message="No such entry in the journal (or it is not live any more).")
    row = rows[0]
    holder = _holder(console, files, producer, seq)
    record = None
    verify_status = "no data file found holding this entry"
    problems: list[Any] = []
    if holder is not None:
        records = console.manifest_records().get(holder.path, [])
        if records:
            record = records[-1]
            report = verify_file(console.storage, holder.path, records)
            problems = report.problems
            verify_status = ("verified: bytes, row count, time and sequence ranges and Merkle "
                             "root match the manifest record") if report.ok else "FAILED"
        else:
            verify_status = "no manifest record for this file (written without manifests?)"
    columns = [(name, doc, row[name]) for name, _, _, doc in COLUMNS]
    return console.render(request, "entry.html", user=user, csrf=csrf, row=row, columns=columns,
                          file=holder, record=record.to_dict() if record else None,
                          verify_status=verify_status, problems=problems)


@router.get("/subject/{token}", response_class=HTMLResponse)
def timeline(request: Request, console: ConsoleDep, token: str, auth: Reader) -> HTMLResponse:
    """One subject's decisions over time (chart and table, hot and cold tiers)."""
    user, csrf = auth
    if not is_subject_token(token):
        console.log_view(user.name, "subject_timeline_rejected")
        return console.render(request, "error.html", status=404, user=user, csrf=csrf,
                              message="Not a subject token (32 lowercase hexadecimal characters).")
    with console.query(user) as q:
        table = q.find(subject_token=token, tier="all", limit=console.settings.max_rows)
    console.log_view(user.name, "subject_timeline", rows=table.num_rows, subject_token=token)
    return console.render(request, "timeline.html", user=user, csrf=csrf, token=token,
                          rows=table.to_pylist())


@router.get("/subject/{token}/chart.png")
def timeline_chart(console: ConsoleDep, token: str, auth: Reader) -> Response:
    """The subject timeline chart (PNG)."""
    user, _ = auth
    if not is_subject_token(token):
        return Response(status_code=404)
    with console.query(user) as q:
        table = q.find(subject_token=token, tier="all", limit=console.settings.max_rows)
    png = subject_timeline(table["ts"].to_pylist(), table["score"].to_pylist(),
                           table["decision"].to_pylist(), table["threshold"].to_pylist(),
                           "decisions about this subject (score, by decision)")
    return Response(png, media_type="image/png")
