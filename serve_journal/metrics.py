"""Journal metrics: aggregated in the process, reported through ``ray.util.metrics`` periodically.

Recording a Ray metric costs microseconds per call, so nothing here calls Ray on the request
path. Counters and gauges are plain numbers under a lock; latency observations are appended to a
list (atomic under the GIL, no lock). :meth:`JournalMetrics.report`, called by the background
flusher every few seconds, hands the accumulated deltas to Ray in one go: one ``inc`` per counter
series and one ``set`` per gauge, off the request path.

Histograms are pre-aggregated: replaying every observation through ``Histogram.observe`` measured
about 5.6 us per call inside a Ray actor (28 ms per report for 5,000 requests, a tenth of a core at
20k requests/s), so a histogram ``<name>`` is exported as three Ray counters instead, in
Prometheus' own histogram layout: ``<name>_bucket`` with a cumulative ``le`` label (including
``+Inf``), ``<name>_sum`` and ``<name>_count``. Ray appends ``_total`` to counters, so
``histogram_quantile(0.99, sum by (le) (rate(ray_<name>_bucket_total[5m])))`` gives the p99.
Cost per report: one call per non-empty bucket, whatever the traffic; counts and sums stay exact.

Outside Ray (tests, the CLI) :meth:`report` exports nothing and returns ``False``; the totals are
still kept (:meth:`JournalMetrics.totals`). The metric names, kinds, labels and meanings are listed
once in :data:`METRICS` (docs/operations.md explains each and the alert to set on it).
"""

from __future__ import annotations

import bisect
import threading
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

BASE_TAGS = ("model", "deployment", "replica")

ENQUEUE_US_BUCKETS = (1.0, 2.0, 5.0, 10.0, 20.0, 50.0, 100.0, 200.0, 500.0, 1_000.0, 5_000.0, 20_000.0)
FLUSH_MS_BUCKETS = (1.0, 2.0, 5.0, 10.0, 25.0, 50.0, 100.0, 250.0, 500.0, 1_000.0, 5_000.0)
LAG_MS_BUCKETS = (10.0, 25.0, 50.0, 100.0, 250.0, 500.0, 1_000.0, 2_000.0, 5_000.0, 10_000.0, 30_000.0)


@dataclass(frozen=True)
class MetricSpec:
    """One exported metric."""

    name: str
    kind: str  # "counter" | "gauge" | "histogram"
    tags: tuple[str, ...]
    description: str
    boundaries: tuple[float, ...] = ()


CAPTURED = MetricSpec("serve_journal_entries_captured", "counter", (*BASE_TAGS, "tier"),
                      "Entries captured (every journaled call, before sampling and drops).")
KEPT = MetricSpec("serve_journal_entries_kept", "counter", (*BASE_TAGS, "tier"),
                  "Entries kept by sampling and handed to the transport.")
SAMPLED_OUT = MetricSpec("serve_journal_entries_sampled_out", "counter", (*BASE_TAGS, "tier"),
                         "Entries not kept by their tier's sample rate (counted exactly).")
DROPPED = MetricSpec("serve_journal_entries_dropped", "counter", (*BASE_TAGS, "tier", "reason"),
                     "Entries dropped under backpressure, by reason (buffer_full, spool_full, "
                     "wait_timeout, transport_error, ...).")
REFUSED = MetricSpec("serve_journal_requests_refused", "counter", (*BASE_TAGS, "tier"),
                     "Requests refused with HTTP 503 because their entry could not be journaled "
                     "(fail-closed tier).")
BUFFER_DEPTH = MetricSpec("serve_journal_buffer_depth", "gauge", BASE_TAGS,
                          "Entries waiting in the replica's buffer.")
BUFFER_CAPACITY = MetricSpec("serve_journal_buffer_capacity", "gauge", BASE_TAGS,
                             "Capacity of the replica's buffer (entries).")
ENQUEUE_LATENCY = MetricSpec("serve_journal_enqueue_latency_us", "histogram", BASE_TAGS,
                             "Time the request path spends capturing an entry (microseconds).",
                             ENQUEUE_US_BUCKETS)
FLUSH_LATENCY = MetricSpec("serve_journal_flush_latency_ms", "histogram", BASE_TAGS,
                           "Time to finalize and hand one batch to the transport (milliseconds).",
                           FLUSH_MS_BUCKETS)
PERSISTENCE_LAG = MetricSpec("serve_journal_persistence_lag_ms", "histogram", BASE_TAGS,
                             "From decision time to the entry being durable in storage "
                             "(milliseconds).", LAG_MS_BUCKETS)
SINK_ROWS = MetricSpec("serve_journal_sink_rows", "counter", BASE_TAGS,
                       "Rows written to journal files by the sink.")
SINK_BYTES = MetricSpec("serve_journal_sink_bytes", "counter", BASE_TAGS,
                        "Bytes of journal files written by the sink.")
SPOOL_DEPTH = MetricSpec("serve_journal_spool_depth", "gauge", BASE_TAGS,
                         "Entries held in the local disk spool while the broker is unreachable.")
SPOOL_BYTES = MetricSpec("serve_journal_spool_bytes", "gauge", BASE_TAGS,
                         "Bytes held in the local disk spool.")
REGISTRY_ERRORS = MetricSpec("serve_journal_registry_refresh_errors", "counter", BASE_TAGS,
                             "Failed refreshes of the model's registry metadata (alias resolution).")
MODEL_STALE = MetricSpec("serve_journal_model_stale", "gauge", BASE_TAGS,
                         "1 while the registry alias the replica's model was loaded from points at "
                         "another version than the one serving (entries keep naming the version "
                         "that serves; reload the model to follow the alias), else 0.")

METRICS: tuple[MetricSpec, ...] = (
    CAPTURED, KEPT, SAMPLED_OUT, DROPPED, REFUSED, BUFFER_DEPTH, BUFFER_CAPACITY, ENQUEUE_LATENCY,
    FLUSH_LATENCY, PERSISTENCE_LAG, SINK_ROWS, SINK_BYTES, SPOOL_DEPTH, SPOOL_BYTES, REGISTRY_ERRORS,
    MODEL_STALE,
)

# Ray metric objects, one per name per process (Ray registers a name once per process).
_RAY_METRICS: dict[str, Any] = {}
_RAY_LOCK = threading.Lock()


def _ray_metric(name: str, kind: str, description: str, tags: tuple[str, ...]) -> Any:
    with _RAY_LOCK:
        metric = _RAY_METRICS.get(name)
        if metric is None:
            from ray.util import metrics as ray_metrics  # inside: imports Ray (~2 s)

            if kind == "counter":
                metric = ray_metrics.Counter(name, description, tags)
            else:
                metric = ray_metrics.Gauge(name, description, tags)
            _RAY_METRICS[name] = metric
        return metric


def exported_names(spec: MetricSpec) -> tuple[str, ...]:
    """Names under which ``spec`` appears on Ray's Prometheus endpoint."""
    if spec.kind == "counter":
        return (f"ray_{spec.name}_total",)
    if spec.kind == "gauge":
        return (f"ray_{spec.name}",)
    return tuple(f"ray_{spec.name}_{part}_total" for part in ("bucket", "sum", "count"))


def _le(bound: float) -> str:
    return f"{bound:g}"


def ray_available() -> bool:
    """Whether this process is connected to Ray (a driver, task, actor or Serve replica)."""
    try:
        import ray  # inside: imports Ray (~2 s); tests and the CLI run without it
    except ImportError:
        return False
    return bool(ray.is_initialized())


def bucketize(values: Iterable[float], boundaries: Sequence[float]) -> tuple[list[int], list[float]]:
    """Counts and sums per bucket (``le`` boundaries, plus the +Inf bucket at the end)."""
    counts = [0] * (len(boundaries) + 1)
    sums = [0.0] * (len(boundaries) + 1)
    for value in values:
        i = bisect.bisect_left(boundaries, value)
        counts[i] += 1
        sums[i] += value
    return counts, sums


class JournalMetrics:
    """Metrics of one journaled deployment replica (or one sink writer).

    Request path: :meth:`observe_enqueue_us`, :meth:`add_dropped`, :meth:`add_refused` (each a
    few hundred nanoseconds, never raising). Flusher: everything else and :meth:`report`.
    """

    def __init__(self, model: str, deployment: str, replica: str) -> None:
        self._base = {"model": str(model), "deployment": str(deployment), "replica": str(replica)}
        self._lock = threading.Lock()
        self._pending: dict[tuple[str, tuple[tuple[str, str], ...]], float] = {}
        self._totals: dict[tuple[str, tuple[tuple[str, str], ...]], float] = {}
        self._gauges: dict[str, float] = {}
        self._enqueue_us: list[float] = []
        self._flush_ms: list[float] = []
        self._lag_ms: list[float] = []
        self._histogram_totals = {ENQUEUE_LATENCY.name: 0, FLUSH_LATENCY.name: 0, PERSISTENCE_LAG.name: 0}
        self.last_report_calls = 0
        """Ray recording calls made by the last :meth:`report` (for cost measurements)."""

    def __repr__(self) -> str:
        return f"JournalMetrics({self._base})"

    # -- counters --------------------------------------------------------

    def _add(self, spec: MetricSpec, n: float, **tags: str) -> None:
        if n <= 0:
            return
        key = (spec.name, tuple(sorted(tags.items())))
        with self._lock:
            self._pending[key] = self._pending.get(key, 0) + n
            self._totals[key] = self._totals.get(key, 0) + n

    def add_captured(self, tier: str, n: int = 1) -> None:
        """Entries captured in ``tier``."""
        self._add(CAPTURED, n, tier=tier)

    def add_kept(self, tier: str, n: int = 1) -> None:
        """Entries of ``tier`` kept by sampling."""
        self._add(KEPT, n, tier=tier)

    def add_sampled_out(self, tier: str, n: int = 1) -> None:
        """Entries of ``tier`` not kept by sampling."""
        self._add(SAMPLED_OUT, n, tier=tier)

    def add_dropped(self, reason: str, tier: str, n: int = 1) -> None:
        """Entries dropped (and captured: a dropped entry is counted as captured too)."""
        self._add(DROPPED, n, tier=tier, reason=reason)
        self._add(CAPTURED, n, tier=tier)

    def add_refused(self, tier: str, n: int = 1) -> None:
        """Requests of ``tier`` refused (fail-closed)."""
        self._add(REFUSED, n, tier=tier)

    def add_batch(self, tiers: Sequence[str], keep: Sequence[bool]) -> None:
        """Count a finalized batch: captured, kept and sampled out per tier, in one lock."""
        counts: dict[tuple[str, bool], int] = {}
        for tier, k in zip(tiers, keep, strict=True):
            counts[(tier, bool(k))] = counts.get((tier, bool(k)), 0) + 1
        with self._lock:
            for (tier, k), n in counts.items():
                for spec in (CAPTURED, KEPT if k else SAMPLED_OUT):
                    key = (spec.name, (("tier", tier),))
                    self._pending[key] = self._pending.get(key, 0) + n
                    self._totals[key] = self._totals.get(key, 0) + n

    def add_sink(self, rows: int, nbytes: int) -> None:
        """Rows and bytes a sink wrote to journal files."""
        self._add(SINK_ROWS, rows)
        self._add(SINK_BYTES, nbytes)

    def observe_sink_file(self, ts_us: Sequence[int], nbytes: int, now_us: int) -> None:
        """A file a sink made durable at ``now_us``: its rows and bytes, and the persistence lag
        (entry time to durable) of each of its entries (``ts_us``: their times, microseconds)."""
        self.add_sink(len(ts_us), nbytes)
        self._lag_ms.extend((now_us - ts) / 1000.0 for ts in ts_us)

    def add_registry_refresh_error(self, n: int = 1) -> None:
        """A failed refresh of the model's registry metadata."""
        self._add(REGISTRY_ERRORS, n)

    # -- gauges ----------------------------------------------------------

    def set_model_stale(self, stale: bool) -> None:
        """Whether the registry alias now names another version than the one serving."""
        self._gauges[MODEL_STALE.name] = 1 if stale else 0

    def set_buffer_depth(self, depth: int, capacity: int | None = None) -> None:
        """Entries in the replica's buffer now (and its capacity)."""
        self._gauges[BUFFER_DEPTH.name] = depth
        if capacity is not None:
            self._gauges[BUFFER_CAPACITY.name] = capacity

    def set_spool_depth(self, entries: int, nbytes: int | None = None) -> None:
        """Entries (and bytes) in the local disk spool now."""
        self._gauges[SPOOL_DEPTH.name] = entries
        if nbytes is not None:
            self._gauges[SPOOL_BYTES.name] = nbytes

    # -- histograms (lock-free appends) -----------------------------------

    def observe_enqueue_us(self, microseconds: float) -> None:
        """One capture's time on the request path."""
        self._enqueue_us.append(microseconds)

    def observe_flush_ms(self, milliseconds: float) -> None:
        """One batch's time to finalize and hand to the transport."""
        self._flush_ms.append(milliseconds)

    def observe_persistence_lag_ms(self, milliseconds: float | Iterable[float]) -> None:
        """Decision-to-durable lag of one entry, or of several."""
        if isinstance(milliseconds, int | float):
            self._lag_ms.append(milliseconds)
        else:
            self._lag_ms.extend(milliseconds)

    # -- reading and reporting --------------------------------------------

    def totals(self) -> dict[str, Any]:
        """Cumulative values since creation: ``{metric name: {label tuple: value}}`` for counters,
        the last value for gauges and the number of observations for histograms."""
        out: dict[str, Any] = {}
        with self._lock:
            for (name, tags), value in self._totals.items():
                out.setdefault(name, {})[tags] = value
            out.update(self._gauges)
            for name, n in self._histogram_totals.items():
                pending = {
                    ENQUEUE_LATENCY.name: self._enqueue_us,
                    FLUSH_LATENCY.name: self._flush_ms,
                    PERSISTENCE_LAG.name: self._lag_ms,
                }[name]
                out[name] = n + len(pending)
        return out

    def _drain(self) -> tuple[dict, dict, dict[str, list[float]]]:
        with self._lock:
            pending, self._pending = self._pending, {}
            gauges = dict(self._gauges)
            lists = {
                ENQUEUE_LATENCY.name: self._enqueue_us,
                FLUSH_LATENCY.name: self._flush_ms,
                PERSISTENCE_LAG.name: self._lag_ms,
            }
            self._enqueue_us, self._flush_ms, self._lag_ms = [], [], []
            for name, values in lists.items():
                self._histogram_totals[name] += len(values)
        return pending, gauges, lists

    def report(self) -> bool:
        """Hand everything accumulated since the last report to Ray; ``False`` outside Ray.

        Never raises: metrics must not break the flusher.
        """
        pending, gauges, lists = self._drain()
        if not ray_available():
            return False
        calls = 0
        try:
            specs = {spec.name: spec for spec in METRICS}
            for (name, tags), value in pending.items():
                spec = specs[name]
                _ray_metric(name, "counter", spec.description, spec.tags).inc(
                    value, tags={**self._base, **dict(tags)}
                )
                calls += 1
            for name, value in gauges.items():
                spec = specs[name]
                _ray_metric(name, "gauge", spec.description, spec.tags).set(value, tags=self._base)
                calls += 1
            for name, values in lists.items():
                if values:
                    calls += self._report_histogram(specs[name], values)
        except Exception:  # noqa: BLE001 - reporting is best effort; totals stay exact locally
            self.last_report_calls = calls
            return False
        self.last_report_calls = calls
        return True

    def _report_histogram(self, spec: MetricSpec, values: list[float]) -> int:
        counts, sums = bucketize(values, spec.boundaries)
        bucket = _ray_metric(f"{spec.name}_bucket", "counter",
                             f"{spec.description} Cumulative bucket counts.", (*spec.tags, "le"))
        calls = 0
        cumulative = 0
        for bound, count in zip([*map(_le, spec.boundaries), "+Inf"], counts, strict=True):
            # Prometheus buckets are cumulative: le=X counts every observation <= X. A Ray
            # counter cannot be incremented by 0, so a bucket appears with its first observation.
            cumulative += count
            if cumulative:
                bucket.inc(cumulative, tags={**self._base, "le": bound})
                calls += 1
        total = sum(sums)
        if total > 0:
            _ray_metric(f"{spec.name}_sum", "counter", f"{spec.description} Sum.", spec.tags).inc(
                total, tags=self._base
            )
            calls += 1
        _ray_metric(f"{spec.name}_count", "counter", f"{spec.description} Count.", spec.tags).inc(
            len(values), tags=self._base
        )
        return calls + 1
