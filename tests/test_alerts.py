"""deploy/prometheus/alerts.yaml: valid for Prometheus (``promtool check rules``), and every alert
fires under its condition and stays silent on a healthy journal (``promtool test rules``).

The input series are not written by hand. Each scenario drives the real recording code
(:class:`serve_journal.metrics.JournalMetrics`, as a replica and a Kafka sink hold it) minute by
minute and calls its real :meth:`~JournalMetrics.report`, with Ray's metric objects replaced by
a recorder that names series the way Ray's Prometheus endpoint does (``ray_`` prefix, ``_total``
on counters; histograms as ``_bucket_total{le}``, ``_sum_total``, ``_count_total`` counters). The
recorded values after each report become one sample per minute of a promtool input series, so
the alerts are tested against exactly the names and labels our code exports. The names are
checked against :func:`serve_journal.metrics.exported_names` too (the list tests/test_metrics.py
finds on a live Ray endpoint). The one series that is not ours, Ray Serve's request counter, is
named from Ray Serve's own source.

promtool comes from Debian's ``prometheus`` package (scripts/test.sh installs it).
"""

from __future__ import annotations

import inspect
import json
import re
import shutil
import subprocess
from collections.abc import Callable
from pathlib import Path

import pytest
import yaml

from serve_journal import metrics as metrics_module
from serve_journal.metrics import METRICS, JournalMetrics, exported_names
from serve_journal.sink.kafka_app import METRICS_DEPLOYMENT

ROOT = Path(__file__).resolve().parents[1]
RULES = ROOT / "deploy" / "prometheus" / "alerts.yaml"
DASHBOARD = ROOT / "deploy" / "grafana" / "serve-journal.json"
PROMTOOL = shutil.which("promtool")
needs_promtool = pytest.mark.skipif(
    PROMTOOL is None, reason="promtool not installed (Debian package 'prometheus'; "
                             "scripts/test.sh installs it)")

MINUTES = 70
EVAL = f"{MINUTES - 1}m"
MODEL, DEPLOYMENT, REPLICA = "fraud", "Fraud", "Fraud#r1"
SCRAPE = {"instance": "10.0.0.5:8080", "job": "ray"}
TRAFFIC = "ray_serve_deployment_request_counter_total"  # Ray Serve's, not ours
TRAFFIC_LABELS = {"deployment": DEPLOYMENT, "replica": REPLICA, "application": "app",
                  "route": "/"}


class _RayStandIn:
    """Records what :meth:`JournalMetrics.report` hands ``ray.util.metrics``, as Ray exposes it:
    ``{(exposed name, sorted labels): value}``."""

    def __init__(self) -> None:
        self.values: dict[tuple[str, tuple[tuple[str, str], ...]], float] = {}

    def metric(self, name: str, kind: str, description: str, tags: tuple[str, ...]) -> _Series:
        exposed = f"ray_{name}_total" if kind == "counter" else f"ray_{name}"
        return _Series(self, exposed, kind, tags)


class _Series:
    def __init__(self, ray: _RayStandIn, exposed: str, kind: str, tags: tuple[str, ...]) -> None:
        self.ray, self.exposed, self.kind, self.tags = ray, exposed, kind, tags

    def _key(self, tags: dict[str, str]) -> tuple:
        assert set(tags) <= set(self.tags), f"{self.exposed}: undeclared tags {set(tags)}"
        return self.exposed, tuple(sorted({**tags, **SCRAPE}.items()))

    def inc(self, value: float, tags: dict[str, str]) -> None:
        assert self.kind == "counter" and value > 0  # Ray refuses other increments
        key = self._key(tags)
        self.ray.values[key] = self.ray.values.get(key, 0.0) + value

    def set(self, value: float, tags: dict[str, str]) -> None:
        assert self.kind == "gauge"
        self.ray.values[self._key(tags)] = float(value)


Step = Callable[[int, JournalMetrics, JournalMetrics], None]
"""``step(minute, replica metrics, sink metrics)``: what happens during one minute."""


def healthy(minute: int, replica: JournalMetrics, sink: JournalMetrics) -> None:
    """A minute of a healthy journal: 90 low-risk entries (10 % kept) and 10 high-risk ones
    (all kept), captured in 2 us, flushed in 5 ms, durable 200 ms later, 80 bytes per row."""
    tiers = ["low"] * 90 + ["high"] * 10
    keep = [i % 10 == 0 for i in range(90)] + [True] * 10
    replica.add_batch(tiers, keep)
    for _ in range(100):
        replica.observe_enqueue_us(2.0)
    replica.observe_flush_ms(5.0)
    replica.set_buffer_depth(5, 1000)
    replica.set_spool_depth(0, 0)
    replica.set_model_stale(False)
    kept = sum(keep)
    sink.observe_persistence_lag_ms([200.0] * kept)
    sink.add_sink(kept, kept * 80)


def from_minute(start: int, change: Step, *, instead: bool = False) -> Step:
    """Healthy minutes, with ``change`` from minute ``start`` on (``instead``: in place of the
    healthy minute, not on top of it)."""
    def step(minute: int, replica: JournalMetrics, sink: JournalMetrics) -> None:
        if minute < start or not instead:
            healthy(minute, replica, sink)
        if minute >= start:
            change(minute, replica, sink)
    return step


def _no_capture(minute: int, replica: JournalMetrics, sink: JournalMetrics) -> None:
    replica.set_buffer_depth(0, 1000)  # the journal runs (reports its buffer) but captures nothing
    replica.set_spool_depth(0, 0)


def _stalled_sink(minute: int, replica: JournalMetrics, sink: JournalMetrics) -> None:
    replica.add_batch(["high"] * 10, [True] * 10)
    replica.set_buffer_depth(10, 1000)


def _slow(observe: str, value: float) -> Step:
    def change(minute: int, replica: JournalMetrics, sink: JournalMetrics) -> None:
        target = sink if observe == "observe_persistence_lag_ms" else replica
        for _ in range(200):  # outweighs the healthy observations of the same minute
            getattr(target, observe)(value)
    return change


def _bulky(minute: int, replica: JournalMetrics, sink: JournalMetrics) -> None:
    sink.add_sink(19, 19 * 320)  # with the healthy minute's rows: 200 bytes per row


REPLICA_LABELS = {"model": MODEL, "deployment": DEPLOYMENT}
SINK_LABELS = {"model": "*", "deployment": METRICS_DEPLOYMENT}

# alert -> (scenario, labels the alert carries besides severity)
CASES: dict[str, tuple[Step, dict[str, str]]] = {
    "ServeJournalRequestsRefused": (
        from_minute(60, lambda m, r, s: r.add_refused("high", 3)),
        {**REPLICA_LABELS, "tier": "high"}),
    "ServeJournalEntriesDropped": (
        from_minute(60, lambda m, r, s: r.add_dropped("buffer_full", "low", 5)),
        {**REPLICA_LABELS, "tier": "low", "reason": "buffer_full"}),
    "ServeJournalHighRiskSampledOut": (
        from_minute(60, lambda m, r, s: r.add_batch(["high"] * 4, [False] * 4)),
        {**REPLICA_LABELS, "tier": "high"}),
    "ServeJournalNotCapturing": (
        from_minute(30, _no_capture, instead=True), {"deployment": DEPLOYMENT}),
    "ServeJournalBufferNearlyFull": (
        from_minute(60, lambda m, r, s: r.set_buffer_depth(900, 1000)),
        {**REPLICA_LABELS, "replica": REPLICA}),
    "ServeJournalEnqueueLatencyHigh": (
        from_minute(40, _slow("observe_enqueue_us", 60.0)), REPLICA_LABELS),
    "ServeJournalFlushLatencyHigh": (
        from_minute(40, _slow("observe_flush_ms", 400.0)), REPLICA_LABELS),
    "ServeJournalPersistenceLagHigh": (
        from_minute(40, _slow("observe_persistence_lag_ms", 3000.0)), SINK_LABELS),
    "ServeJournalSinkStalled": (from_minute(30, _stalled_sink, instead=True), {}),
    "ServeJournalHotTierTooLarge": (from_minute(0, _bulky), {}),
    "ServeJournalSpoolNotEmpty": (
        from_minute(55, lambda m, r, s: r.set_spool_depth(500, 10**6)),
        {**REPLICA_LABELS, "replica": REPLICA}),
    "ServeJournalRegistryRefreshFailing": (
        from_minute(40, lambda m, r, s: r.add_registry_refresh_error()), REPLICA_LABELS),
    "ServeJournalModelStale": (
        from_minute(30, lambda m, r, s: r.set_model_stale(True)), REPLICA_LABELS),
}


def simulate(step: Step, monkeypatch) -> list[dict[str, str]]:
    """promtool input series of ``MINUTES`` one-minute scrapes of a replica and a sink driven
    by ``step``, from what their real ``report()`` exported."""
    ray = _RayStandIn()
    monkeypatch.setattr(metrics_module, "ray_available", lambda: True)
    monkeypatch.setattr(metrics_module, "_ray_metric", ray.metric)
    replica = JournalMetrics(MODEL, DEPLOYMENT, REPLICA)
    sink = JournalMetrics("*", METRICS_DEPLOYMENT, "kafka-sink-0")
    samples: dict[tuple, list[str]] = {}
    for minute in range(MINUTES):
        step(minute, replica, sink)
        assert replica.report() and sink.report()
        for key, value in ray.values.items():
            samples.setdefault(key, ["_"] * minute).append(format(value, ".17g"))
    exported = {name for spec in METRICS for name in exported_names(spec)}
    strays = {name for name, _ in samples} - exported
    assert not strays, f"series named unlike Ray exports them: {strays}"
    series = [{"series": _selector(name, dict(labels)), "values": " ".join(values)}
              for (name, labels), values in sorted(samples.items())]
    series.append({"series": _selector(TRAFFIC, {**TRAFFIC_LABELS, **SCRAPE}),
                   "values": f"0+120x{MINUTES - 1}"})
    return series


def _selector(name: str, labels: dict[str, str]) -> str:
    inner = ",".join(f'{k}={json.dumps(v)}' for k, v in sorted(labels.items()))
    return f"{name}{{{inner}}}"


def _rules() -> dict[str, dict]:
    doc = yaml.safe_load(RULES.read_text())
    return {rule["alert"]: rule for group in doc["groups"] for rule in group["rules"]}


def _expected(alert: str, labels: dict[str, str]) -> dict:
    """The alert as promtool reports it: its labels and its annotations rendered for them."""
    rule = _rules()[alert]
    full = {**labels, **rule.get("labels", {})}

    def render(text: str) -> str:
        return re.sub(r"\{\{ \$labels\.(\w+) \}\}", lambda m: labels[m.group(1)], text)

    return {"exp_labels": full,
            "exp_annotations": {k: render(v) for k, v in rule.get("annotations", {}).items()}}


def _promtool_test(tmp_path: Path, tests: list[dict]) -> subprocess.CompletedProcess:
    spec = tmp_path / "alerts-test.yaml"
    spec.write_text(yaml.safe_dump({"rule_files": [str(RULES)], "evaluation_interval": "1m",
                                    "tests": tests}, sort_keys=False))
    return subprocess.run([PROMTOOL, "test", "rules", str(spec)], capture_output=True, text=True,
                          timeout=120, check=False)


@needs_promtool
def test_promtool_accepts_the_rules():
    result = subprocess.run([PROMTOOL, "check", "rules", str(RULES)], capture_output=True,
                            text=True, timeout=60, check=False)
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"SUCCESS: {len(_rules())} rules found" in result.stdout


def test_every_alert_reads_exported_metrics_and_has_a_case():
    exported = {name for spec in METRICS for name in exported_names(spec)} | {TRAFFIC}
    for alert, rule in _rules().items():
        used = set(re.findall(r"\bray_[a-z_]+\b", rule["expr"]))
        assert used and used <= exported, f"{alert} reads {used - exported}"
        assert rule["labels"]["severity"] in ("page", "warning", "ticket")
    assert set(CASES) == set(_rules()), "every alert needs a firing scenario"
    # Ray Serve's request counter, which ServeJournalNotCapturing compares with, is named so by Ray.
    from ray.serve._private import replica  # inside: Ray Serve is heavy; this test reads its source

    assert f'"{TRAFFIC.removeprefix("ray_").removesuffix("_total")}"' in inspect.getsource(replica)


@pytest.mark.slow  # over 1.5 s: kept out of the fast tier, runs in the full suite
@needs_promtool
def test_each_alert_fires_under_its_condition_and_not_when_healthy(tmp_path, monkeypatch):
    tests = [{"name": "healthy journal: every alert silent", "interval": "1m",
              "input_series": simulate(healthy, monkeypatch),
              "alert_rule_test": [{"eval_time": EVAL, "alertname": alert, "exp_alerts": []}
                                  for alert in _rules()]}]
    for alert, (scenario, labels) in CASES.items():
        tests.append({"name": alert, "interval": "1m",
                      "input_series": simulate(scenario, monkeypatch),
                      "alert_rule_test": [{"eval_time": EVAL, "alertname": alert,
                                           "exp_alerts": [_expected(alert, labels)]}]})
    result = _promtool_test(tmp_path, tests)
    assert result.returncode == 0, result.stdout + result.stderr


@needs_promtool
def test_an_alert_waits_for_its_duration(tmp_path, monkeypatch):
    """A condition shorter than the rule's ``for`` does not fire: the model went stale 20 min ago."""
    scenario = from_minute(MINUTES - 20, lambda m, r, s: r.set_model_stale(True))
    result = _promtool_test(tmp_path, [{
        "interval": "1m", "input_series": simulate(scenario, monkeypatch),
        "alert_rule_test": [{"eval_time": EVAL, "alertname": "ServeJournalModelStale",
                             "exp_alerts": []}]}])
    assert result.returncode == 0, result.stdout + result.stderr


def test_the_grafana_dashboard_plots_exported_metrics():
    dashboard = json.loads(DASHBOARD.read_text())
    exported = {name for spec in METRICS for name in exported_names(spec)}
    exprs = [(panel["title"], target["expr"]) for panel in dashboard["panels"]
             for target in panel.get("targets", [])]
    assert exprs, "no panel queries anything"
    plotted = set()
    for title, expr in exprs:
        used = set(re.findall(r"\bray_[a-z_]+\b", expr))
        assert used and used <= exported, f"panel {title!r} reads {used - exported}"
        plotted |= used
    wanted = {f"ray_{spec.name}{'_total' if spec.kind == 'counter' else ''}" for spec in METRICS
              if spec.kind != "histogram"}
    wanted |= {f"ray_{spec.name}_bucket_total" for spec in METRICS if spec.kind == "histogram"}
    assert wanted <= plotted, f"metrics without a panel: {sorted(wanted - plotted)}"
    assert len({p["id"] for p in dashboard["panels"]}) == len(dashboard["panels"])
