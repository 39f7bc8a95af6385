"""How each model version performed on the decisions it made, once their outcomes arrived.

Per ``(model_name, model_version)`` over the decisions (entries with ``outcome == "ok"``) of a
window: the confusion counts of the decision against the latest label (TP, FP, TN, FN), the rates
over labelled decisions (true and false positive rate, precision, accuracy), the label delay
(``outcome_time - ts``: p50, p90, max) and the share of decisions still unlabelled.

The journal keeps a sample: each kept entry weighs ``1 / sample_rate``, and every weighted count
is the Horvitz-Thompson estimate of :func:`serve_journal.read.stats.estimate_groups` (with its
standard error) over the sample :func:`serve_journal.read.stats.journal_sample` reads, as
``serve-journal stats`` does. The unlabelled share divides the weighted labelled decisions by the
exact number of decisions the counters counted (kept and sampled out, outcome ``ok``), or by the
weighted estimate where no counters cover the model version. Delay quantiles are weighted the same
way (the smallest delay whose cumulative weight reaches the quantile).

A decision is positive when it is one of ``positive_decisions``; a label is positive when it is
one of ``positive_labels`` and negative when one of ``negative_labels`` (case-insensitive; a bool
label reads ``true``/``false``, an int ``1``/``0``). Other labels count as ``unmapped`` and
outcomes with a value instead of a label as ``valued``: both are labelled, neither enters the
confusion counts.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Collection, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from serve_journal.catalog.layout import COLD, HOT
from serve_journal.counters import KEPT, SAMPLED_OUT
from serve_journal.outcomes.join import latest_outcomes
from serve_journal.outcomes.record import load_outcomes
from serve_journal.read.stats import estimate_groups, journal_sample, load_counters
from serve_journal.schema import OUTCOME_OK
from serve_journal.storage import JournalStorage
from serve_journal.times import as_utc

POSITIVE_DECISIONS = frozenset({"block", "decline", "deny", "reject", "fraud", "positive", "1",
                                "true", "yes"})
POSITIVE_LABELS = frozenset({"1", "true", "yes", "positive", "fraud", "chargeback", "default",
                             "bad"})
NEGATIVE_LABELS = frozenset({"0", "false", "no", "negative", "legit", "legitimate", "good",
                             "not_fraud"})
CELLS = ("tp", "fp", "tn", "fn", "unmapped", "valued", "unlabelled")
"""Where each decision falls: a confusion cell, a label that maps to no class, an outcome with a
value only, or no outcome yet."""

_ENTRY_COLUMNS = ("request_id", "ts", "model_name", "model_version", "decision", "outcome")


@dataclass(frozen=True)
class Weighted:
    """A count in the sample (``kept``) and its weighted estimate with standard error."""

    kept: int
    estimate: float
    se: float


@dataclass(frozen=True)
class ModelPerformance:
    """One model version's performance on its labelled decisions."""

    model_name: str
    model_version: str
    decisions: Weighted
    """Decisions in the journal's sample and their weighted estimate."""
    decisions_exact: int | None
    """Decisions the exact counters counted (kept and sampled out); ``None`` without counters."""
    labelled: Weighted
    cells: dict[str, Weighted]
    """:data:`CELLS` -> weighted count."""
    rates: dict[str, float | None]
    """``tpr`` (recall), ``fpr``, ``precision``, ``accuracy`` over the weighted confusion counts
    (``None`` when the denominator is zero)."""
    unlabelled_share: float | None
    delay_s: dict[str, float | None]
    """``p50``, ``p90``, ``max`` seconds from decision to outcome (weighted quantiles)."""


@dataclass(frozen=True)
class PerformanceReport:
    """What ``serve-journal outcomes performance`` and the stats section print."""

    since: str | None
    until: str | None
    models: list[ModelPerformance] = field(default_factory=list)
    outcome_records: int = 0
    """Outcome records read (every record, before the latest-label rule)."""

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def format_text(self) -> str:
        """The plain-text section."""
        lines = [f"performance on labelled decisions ({self.outcome_records} outcome records; "
                 "weighted by 1/sample_rate)"]
        if not self.models:
            lines.append("  no decisions in this window")
        header = ["model", "version", "decisions", "labelled", "unlabelled", "TP", "FP", "TN",
                  "FN", "TPR", "FPR", "precision", "accuracy", "delay p50/p90/max"]
        lines.append("  " + "  ".join(header))
        for m in self.models:
            def num(x: float | None, digits: int = 3) -> str:
                return "-" if x is None else f"{x:.{digits}f}"

            decided = (f"{m.decisions_exact}" if m.decisions_exact is not None
                       else f"~{m.decisions.estimate:.1f}")
            delay = "/".join(_duration(m.delay_s[k]) for k in ("p50", "p90", "max"))
            lines.append("  " + "  ".join([
                m.model_name, m.model_version, decided, f"{m.labelled.estimate:.1f}",
                num(m.unlabelled_share), *(f"{m.cells[c].estimate:.1f}" for c in ("tp", "fp", "tn", "fn")),
                num(m.rates["tpr"]), num(m.rates["fpr"]), num(m.rates["precision"]),
                num(m.rates["accuracy"]), delay]))
        return "\n".join(lines)


def _duration(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    if seconds < 3600:
        return f"{seconds:.0f}s"
    if seconds < 86400:
        return f"{seconds / 3600:.1f}h"
    return f"{seconds / 86400:.1f}d"


def _ratio(num: float, den: float) -> float | None:
    return None if den <= 0 else num / den


def weighted_quantile(values: Sequence[float], weights: Sequence[float], q: float) -> float | None:
    """The smallest value whose cumulative weight reaches ``q`` of the total; ``None`` if empty."""
    if not len(values):
        return None
    order = np.argsort(np.asarray(values, dtype=np.float64), kind="stable")
    v = np.asarray(values, dtype=np.float64)[order]
    cum = np.cumsum(np.asarray(weights, dtype=np.float64)[order])
    return float(v[min(int(np.searchsorted(cum, q * cum[-1] - 1e-9 * cum[-1])), len(v) - 1)])


def classify(decision: str | None, label: str | None, value: float | None, *,
             positive_decisions: Collection[str], positive_labels: Collection[str],
             negative_labels: Collection[str]) -> str:
    """The :data:`CELLS` entry of one decision with its latest outcome (``label`` and ``value``
    both ``None``: unlabelled)."""
    if label is None:
        return "unlabelled" if value is None else "valued"
    text = label.strip().lower()
    actual = True if text in positive_labels else False if text in negative_labels else None
    if actual is None:
        return "unmapped"
    predicted = (decision or "").strip().lower() in positive_decisions
    return ("tp" if actual else "fp") if predicted else ("fn" if actual else "tn")


def performance(
    storage: JournalStorage,
    since: dt.datetime | str | None = None,
    until: dt.datetime | str | None = None,
    model: str | None = None,
    *,
    positive_decisions: Collection[str] = POSITIVE_DECISIONS,
    positive_labels: Collection[str] = POSITIVE_LABELS,
    negative_labels: Collection[str] = NEGATIVE_LABELS,
    source: str | None = None,
    tiers: Sequence[str] = (HOT, COLD),
) -> PerformanceReport:
    """Per model version: confusion counts, rates, label delay and unlabelled share over the
    decisions of ``[since, until)`` (rounded down to the minute, the counters' resolution); see the
    module docstring. ``source``: only outcomes from that source count."""
    since_utc, until_utc = (None if t is None else t.replace(second=0, microsecond=0)
                            for t in (as_utc(since, "since"), as_utc(until, "until")))
    positive_decisions = {d.lower() for d in positive_decisions}
    positive_labels = {v.lower() for v in positive_labels}
    negative_labels = {v.lower() for v in negative_labels}
    overlap = positive_labels & negative_labels
    if overlap:
        raise ValueError(f"labels {sorted(overlap)} are both positive and negative")

    sample = journal_sample(storage, _ENTRY_COLUMNS, since_utc, until_utc, model, tiers)
    sample = sample.filter(pc.equal(sample["outcome"], OUTCOME_OK))
    outcomes = load_outcomes(storage, sample["request_id"].to_pylist())
    if source is not None:
        outcomes = outcomes.filter(pc.equal(outcomes["source"], source))
    latest = {row["request_id"]: row for row in latest_outcomes(outcomes).select(
        ["request_id", "label", "value", "outcome_time"]).to_pylist()}

    cells, delays = [], []
    for request_id, decision in zip(sample["request_id"].to_pylist(),
                                    sample["decision"].to_pylist(), strict=True):
        record = latest.get(request_id) or {"label": None, "value": None, "outcome_time": None}
        cells.append(classify(decision, record["label"], record["value"],
                              positive_decisions=positive_decisions,
                              positive_labels=positive_labels, negative_labels=negative_labels))
        delays.append(record["outcome_time"])
    sample = sample.append_column("cell", pa.array(cells, pa.string()))
    estimates = estimate_groups(sample, ["model_name", "model_version", "cell"])
    exact = _exact_decisions(storage, since_utc, until_utc, model)

    models = []
    versions = sorted({(n, v) for n, v, _ in estimates})
    weights = pc.divide(1.0, pc.cast(sample["sample_rate"], pa.float64())).to_pylist()
    ts_us = sample["ts"].cast(pa.int64()).to_pylist()
    names, numbers = sample["model_name"].to_pylist(), sample["model_version"].to_pylist()
    for name, version in versions:
        by_cell = {c: Weighted(*estimates.get((name, version, c), (0, 0.0, 0.0))) for c in CELLS}
        decisions = _sum(by_cell.values())
        labelled = _sum(w for c, w in by_cell.items() if c != "unlabelled")
        tp, fp, tn, fn = (by_cell[c].estimate for c in ("tp", "fp", "tn", "fn"))
        total = exact.get((name, version))
        denominator = total if total else decisions.estimate
        share = None if not denominator else max(0.0, 1.0 - labelled.estimate / denominator)
        lag, lag_w = [], []
        for i in range(sample.num_rows):
            if names[i] == name and numbers[i] == version and delays[i] is not None:
                lag.append((int(as_utc(delays[i]).timestamp() * 1e6) - ts_us[i]) / 1e6)
                lag_w.append(weights[i])
        models.append(ModelPerformance(
            model_name=name, model_version=version, decisions=decisions,
            decisions_exact=total, labelled=labelled, cells=by_cell,
            rates={"tpr": _ratio(tp, tp + fn), "fpr": _ratio(fp, fp + tn),
                   "precision": _ratio(tp, tp + fp), "accuracy": _ratio(tp + tn, tp + fp + tn + fn)},
            unlabelled_share=share,
            delay_s={"p50": weighted_quantile(lag, lag_w, 0.5),
                     "p90": weighted_quantile(lag, lag_w, 0.9),
                     "max": max(lag) if lag else None},
        ))
    return PerformanceReport(
        since=since_utc.isoformat() if since_utc else None,
        until=until_utc.isoformat() if until_utc else None,
        models=models, outcome_records=outcomes.num_rows,
    )


def _sum(items: Any) -> Weighted:
    items = list(items)
    return Weighted(sum(w.kept for w in items), sum(w.estimate for w in items),
                    float(np.sqrt(sum(w.se ** 2 for w in items))))


def _exact_decisions(storage: JournalStorage, since: dt.datetime | None, until: dt.datetime | None,
                     model: str | None) -> dict[tuple[str, str], int]:
    """``{(model, version): decisions}`` the exact counters counted (kept + sampled out, ``ok``)."""
    counters = load_counters(storage, since, until, model)
    out: dict[tuple[str, str], int] = {}
    for name, version, disposition, outcome, n in zip(
            counters["model_name"].to_pylist(), counters["model_version"].to_pylist(),
            counters["disposition"].to_pylist(), counters["outcome"].to_pylist(),
            counters["count"].to_pylist(), strict=True):
        if disposition in (KEPT, SAMPLED_OUT) and outcome == OUTCOME_OK:
            out[(name, version)] = out.get((name, version), 0) + n
    return out


__all__ = [
    "CELLS", "NEGATIVE_LABELS", "POSITIVE_DECISIONS", "POSITIVE_LABELS", "ModelPerformance",
    "PerformanceReport", "Weighted", "classify", "performance", "weighted_quantile",
]
