"""Server-side charts of the console, rendered to PNG with matplotlib (no JavaScript, no CDN).

Each function takes data already read from the journal (entries, counters, manifest records) and
returns PNG bytes. Only aggregate values are drawn: counts, scores, rates and lags, never a token
or an identifier.
"""

from __future__ import annotations

import datetime as dt
import io
import threading
from collections.abc import Sequence
from typing import Any

import pyarrow as pa

_LOCK = threading.Lock()  # matplotlib's font cache and text layout are not thread-safe
_SIZE = (8.0, 3.2)
_DPI = 96


def _figure() -> tuple[Any, Any]:
    """A new figure of the console's size and its one axes."""
    from matplotlib.figure import Figure  # inside: matplotlib costs ~0.5 s; only charts need it

    fig = Figure(figsize=_SIZE, dpi=_DPI, layout="constrained")
    return fig, fig.add_subplot(1, 1, 1)


def _png(fig: Any) -> bytes:
    """``fig`` drawn with the Agg backend, as PNG bytes."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg  # inside: as in _figure

    FigureCanvasAgg(fig)
    out = io.BytesIO()
    fig.savefig(out, format="png")
    return out.getvalue()


def _empty(ax: Any, message: str) -> None:
    ax.text(0.5, 0.5, message, ha="center", va="center", transform=ax.transAxes, color="#666")
    ax.set_xticks([])
    ax.set_yticks([])


def _bucket_width(times: Sequence[dt.datetime]) -> dt.timedelta:
    span = (max(times) - min(times)) if times else dt.timedelta(0)
    for width in (dt.timedelta(minutes=1), dt.timedelta(minutes=5), dt.timedelta(minutes=15),
                  dt.timedelta(hours=1), dt.timedelta(hours=6), dt.timedelta(days=1)):
        if span / width <= 60:
            return width
    return dt.timedelta(days=7)


def _floor(ts: dt.datetime, width: dt.timedelta) -> dt.datetime:
    epoch = dt.datetime(1970, 1, 1, tzinfo=dt.UTC)
    return epoch + ((ts - epoch) // width) * width


def counts_over_time(times: Sequence[dt.datetime], labels: Sequence[str | None], title: str,
                     weights: Sequence[int] | None = None) -> bytes:
    """Stacked bars of how many entries per label fall in each time bucket."""
    with _LOCK:
        fig, ax = _figure()
        ax.set_title(title, fontsize=10)
        if not times:
            _empty(ax, "no entries in this window")
            return _png(fig)
        width = _bucket_width(times)
        weights = weights if weights is not None else [1] * len(times)
        buckets = sorted({_floor(t, width) for t in times})
        names = sorted({label or "(none)" for label in labels})
        counts = {name: dict.fromkeys(buckets, 0) for name in names}
        for t, label, w in zip(times, labels, weights, strict=True):
            counts[label or "(none)"][_floor(t, width)] += w
        bottom = [0] * len(buckets)
        bar = width.total_seconds() / 86400 * 0.9
        for name in names:
            values = [counts[name][b] for b in buckets]
            ax.bar(buckets, values, width=bar, bottom=bottom, label=name, align="edge")
            bottom = [a + b for a, b in zip(bottom, values, strict=True)]
        ax.set_ylabel(f"entries per {_describe(width)}")
        ax.legend(fontsize=8, loc="upper left")
        fig.autofmt_xdate()
        return _png(fig)


def _describe(width: dt.timedelta) -> str:
    minutes = int(width.total_seconds() // 60)
    if minutes < 60:
        return f"{minutes} min"
    if minutes < 1440:
        return f"{minutes // 60} h"
    return f"{minutes // 1440} d"


def score_distribution(scores: Sequence[float | None], thresholds: Sequence[float | None],
                       title: str) -> bytes:
    """Histogram of scores with the threshold(s) in force drawn as vertical lines."""
    with _LOCK:
        fig, ax = _figure()
        ax.set_title(title, fontsize=10)
        values = [s for s in scores if s is not None]
        if not values:
            _empty(ax, "no scores in this window")
            return _png(fig)
        ax.hist(values, bins=40, color="#4c72b0")
        for threshold in sorted({t for t in thresholds if t is not None}):
            ax.axvline(threshold, color="#c44e52", linestyle="--", label=f"threshold {threshold:g}")
        ax.set_xlabel("score")
        ax.set_ylabel("entries")
        if any(t is not None for t in thresholds):
            ax.legend(fontsize=8)
        return _png(fig)


def sampling_and_drops(counters: pa.Table, title: str) -> bytes:
    """Exact counters per minute by disposition (kept / sampled out / dropped) and the sample rates."""
    with _LOCK:
        fig, ax = _figure()
        ax.set_title(title, fontsize=10)
        if counters.num_rows == 0:
            _empty(ax, "no counters in this window (the replicas write them every few seconds)")
            return _png(fig)
        minutes = counters["minute"].to_pylist()
        dispositions = counters["disposition"].to_pylist()
        reasons = counters["reason"].to_pylist()
        counts = counters["count"].to_pylist()
        width = _bucket_width(minutes)
        buckets = sorted({_floor(m, width) for m in minutes})
        labels = sorted({d if d != "dropped" else f"dropped:{r or 'unknown'}"
                         for d, r in zip(dispositions, reasons, strict=True)})
        table = {label: dict.fromkeys(buckets, 0) for label in labels}
        for m, d, r, n in zip(minutes, dispositions, reasons, counts, strict=True):
            label = d if d != "dropped" else f"dropped:{r or 'unknown'}"
            table[label][_floor(m, width)] += n
        bottom = [0] * len(buckets)
        bar = width.total_seconds() / 86400 * 0.9
        for label in labels:
            values = [table[label][b] for b in buckets]
            ax.bar(buckets, values, width=bar, bottom=bottom, label=label, align="edge")
            bottom = [a + b for a, b in zip(bottom, values, strict=True)]
        ax.set_ylabel(f"captured per {_describe(width)}")
        rates = sorted({float(r) for r in counters["sample_rate"].to_pylist() if r is not None})
        if rates:
            ax.text(0.99, 0.97, "sample rates: " + ", ".join(f"{r:g}" for r in rates),
                    ha="right", va="top", transform=ax.transAxes, fontsize=8)
        ax.legend(fontsize=8, loc="upper left")
        fig.autofmt_xdate()
        return _png(fig)


def persistence_lag(points: Sequence[tuple[dt.datetime, float, float]], title: str) -> bytes:
    """Per data file: (newest entry time, lag of its newest entry s, lag of its oldest entry s)."""
    with _LOCK:
        fig, ax = _figure()
        ax.set_title(title, fontsize=10)
        if not points:
            _empty(ax, "no manifest records for this window")
            return _png(fig)
        xs = [p[0] for p in points]
        ax.vlines(xs, [p[1] for p in points], [p[2] for p in points], color="#8172b2", alpha=0.6,
                  label="oldest .. newest entry of a file")
        ax.scatter(xs, [p[1] for p in points], s=8, color="#55a868", label="newest entry")
        ax.set_ylabel("seconds from decision to recorded file")
        ax.set_yscale("symlog", linthresh=1.0)
        ax.legend(fontsize=8, loc="upper left")
        fig.autofmt_xdate()
        return _png(fig)


def subject_timeline(times: Sequence[dt.datetime], scores: Sequence[float | None],
                     decisions: Sequence[str | None], thresholds: Sequence[float | None],
                     title: str) -> bytes:
    """One subject's decisions over time: score per entry, coloured by decision."""
    with _LOCK:
        fig, ax = _figure()
        ax.set_title(title, fontsize=10)
        if not times:
            _empty(ax, "no entries for this subject")
            return _png(fig)
        for decision in sorted({d or "(none)" for d in decisions}):
            idx = [i for i, d in enumerate(decisions) if (d or "(none)") == decision]
            ax.scatter([times[i] for i in idx],
                       [scores[i] if scores[i] is not None else 0.0 for i in idx],
                       label=decision, s=24)
        for threshold in sorted({t for t in thresholds if t is not None}):
            ax.axhline(threshold, color="#c44e52", linestyle="--", linewidth=1,
                       label=f"threshold {threshold:g}")
        ax.set_ylabel("score")
        ax.legend(fontsize=8, loc="upper left")
        fig.autofmt_xdate()
        return _png(fig)


PERFORMANCE_MEASURES = (("tpr", "true positive rate"), ("fpr", "false positive rate"),
                        ("precision", "precision"), ("accuracy", "accuracy"),
                        ("labelled", "share labelled"))


def labelled_performance(versions: Sequence[tuple[str, dict[str, float | None]]],
                         title: str) -> bytes:
    """Per model version, grouped bars of its rates over labelled decisions and the share of
    its decisions labelled: ``versions`` is ``[(version, {measure: value or None}), ...]`` with
    the measures of :data:`PERFORMANCE_MEASURES` (weighted values, between 0 and 1)."""
    with _LOCK:
        fig, ax = _figure()
        ax.set_title(title, fontsize=10)
        if not versions:
            _empty(ax, "no decisions in this window")
            return _png(fig)
        width = 0.8 / len(PERFORMANCE_MEASURES)
        for j, (measure, label) in enumerate(PERFORMANCE_MEASURES):
            xs = [i + (j - (len(PERFORMANCE_MEASURES) - 1) / 2) * width for i in range(len(versions))]
            values = [v.get(measure) for _, v in versions]
            ax.bar(xs, [0.0 if x is None else x for x in values], width=width, label=label)
            for x, value in zip(xs, values, strict=True):
                if value is None:  # no labelled decision of that class: say so, not 0
                    ax.text(x, 0.02, "n/a", ha="center", va="bottom", fontsize=7, rotation=90)
        ax.set_xticks(range(len(versions)), [f"version {name}" for name, _ in versions])
        ax.set_ylim(0, 1.3)  # room for the legend above the bars
        ax.set_yticks([0, 0.2, 0.4, 0.6, 0.8, 1.0])
        ax.set_ylabel("weighted rate")
        ax.legend(fontsize=8, loc="upper center", ncols=len(PERFORMANCE_MEASURES))
        return _png(fig)


__all__ = [
    "PERFORMANCE_MEASURES", "counts_over_time", "labelled_performance", "persistence_lag",
    "sampling_and_drops", "score_distribution", "subject_timeline",
]
