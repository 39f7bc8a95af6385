"""Per-model pages: the model's charts (PNG, drawn on the server) and the stats page.

Charts read kept entries through :class:`~serve_journal.read.query.JournalQuery` (so every chart
query is in the access log), the exact counters through :func:`serve_journal.read.stats.load_counters`
and the persistence lag from the manifest records; the performance chart joins the kept entries
to their outcomes (:func:`serve_journal.outcomes.performance.performance`, weighted by the sample
rates; aggregates only, like the sampling chart, under the page's ``model_charts`` view record).
"""

import datetime as dt
import urllib.parse

from fastapi import APIRouter, Request
from fastapi.responses import HTMLResponse, Response

from serve_journal.console.charts import (
    counts_over_time,
    labelled_performance,
    persistence_lag,
    sampling_and_drops,
    score_distribution,
)
from serve_journal.console.deps import ConsoleDep, allowed
from serve_journal.console.state import ConsoleState
from serve_journal.outcomes.performance import performance
from serve_journal.read.stats import load_counters, stats
from serve_journal.times import as_utc

router = APIRouter()

CHART_KINDS = ("decisions", "outcomes", "scores", "sampling", "lag", "performance")

Charts = allowed("charts")
Stats = allowed("stats")


@router.get("/models/{model}", response_class=HTMLResponse)
def model_page(request: Request, console: ConsoleDep, model: str, auth: Charts,
               since: str | None = None, until: str | None = None) -> HTMLResponse:
    """The model's charts over a window (default: the 24 hours up to its newest partition)."""
    user, csrf = auth
    try:
        window = console.window(model, since, until)
    except ValueError as exc:
        return console.render(request, "error.html", status=400, user=user, csrf=csrf,
                              message=str(exc))
    console.log_view(user.name, "model_charts", model=model)
    query = urllib.parse.urlencode({"since": window[0].isoformat(),
                                    "until": window[1].isoformat()})
    return console.render(request, "model.html", user=user, csrf=csrf, model=model,
                          window=window, kinds=CHART_KINDS, query=query)


def _lag_points(console: ConsoleState, model: str, start: dt.datetime,
                end: dt.datetime) -> list[tuple[dt.datetime, float, float]]:
    """Per data file of ``model`` in the window: (newest entry, its lag s, oldest entry's lag s)."""
    lo_us, hi_us = int(start.timestamp() * 1e6), int(end.timestamp() * 1e6)
    points = []
    for records in console.manifest_records().values():
        r = records[-1]
        if r.model != model or r.min_ts_us is None or r.max_ts_us < lo_us \
                or r.min_ts_us >= hi_us or not r.created or r.replaces:
            continue
        created = as_utc(r.created, "created").timestamp()
        newest = dt.datetime.fromtimestamp(r.max_ts_us / 1e6, dt.UTC)
        points.append((newest, created - r.max_ts_us / 1e6, created - r.min_ts_us / 1e6))
    points.sort()
    return points


@router.get("/models/{model}/chart/{kind}.png")
def model_chart(console: ConsoleDep, model: str, kind: str, auth: Charts,
                since: str | None = None, until: str | None = None) -> Response:
    """One chart of the model page (PNG); 404 for an unknown kind, 400 for a bad window."""
    user, _ = auth
    if kind not in CHART_KINDS:
        return Response(f"chart must be one of {CHART_KINDS}", status_code=404,
                        media_type="text/plain")
    try:
        start, end = console.window(model, since, until)
    except ValueError as exc:
        return Response(str(exc), status_code=400, media_type="text/plain")
    label = f"{model}, {start:%Y-%m-%d %H:%M} .. {end:%Y-%m-%d %H:%M} UTC"
    if kind == "sampling":
        png = sampling_and_drops(load_counters(console.storage, start, end, model),
                                 f"captured entries by disposition (exact), {label}")
    elif kind == "performance":
        report = performance(console.storage, start, end, model)
        png = labelled_performance(
            [(m.model_version, {**m.rates, "labelled": None if m.unlabelled_share is None
                                else 1.0 - m.unlabelled_share}) for m in report.models],
            f"performance on labelled decisions (weighted), {label}")
    elif kind == "lag":
        png = persistence_lag(_lag_points(console, model, start, end),
                              f"end-to-end persistence lag, {label}")
    else:
        with console.query(user) as q:
            table = q.find(model=model, since=start, until=end, tier="all")
        if kind == "decisions":
            png = counts_over_time(table["ts"].to_pylist(), table["decision"].to_pylist(),
                                   f"decisions (kept entries), {label}")
        elif kind == "outcomes":
            png = counts_over_time(table["ts"].to_pylist(), table["outcome"].to_pylist(),
                                   f"outcomes (kept entries), {label}")
        else:
            png = score_distribution(table["score"].to_pylist(), table["threshold"].to_pylist(),
                                     f"score distribution, {label}")
    return Response(png, media_type="image/png")


@router.get("/stats", response_class=HTMLResponse)
def stats_page(request: Request, console: ConsoleDep, auth: Stats, model: str | None = None,
               since: str | None = None, until: str | None = None) -> HTMLResponse:
    """Exact counts and Horvitz-Thompson estimates by model, version, decision and outcome."""
    user, csrf = auth
    try:
        report = stats(console.storage, as_utc(since or None, "since"),
                       as_utc(until or None, "until"),
                       model or None,
                       group_by=("model_name", "model_version", "decision", "outcome"))
    except ValueError as exc:
        return console.render(request, "error.html", status=400, user=user, csrf=csrf,
                              message=str(exc))
    console.log_view(user.name, "stats", rows=report.journal_rows, model=model)
    return console.render(request, "stats.html", user=user, csrf=csrf, report=report,
                          model=model, models=console.models())
