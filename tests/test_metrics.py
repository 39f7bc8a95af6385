"""Journal metrics: local aggregation, and export through Ray to its Prometheus endpoint."""

from __future__ import annotations

import re
import threading
import time
import urllib.request
import uuid

import pytest

from serve_journal.metrics import (
    BUFFER_DEPTH,
    CAPTURED,
    DROPPED,
    ENQUEUE_LATENCY,
    ENQUEUE_US_BUCKETS,
    KEPT,
    METRICS,
    REFUSED,
    SAMPLED_OUT,
    JournalMetrics,
    bucketize,
    exported_names,
    ray_available,
)


def test_batches_drops_and_refusals_are_counted_per_tier():
    m = JournalMetrics("fraud", "Fraud", "r1")
    m.add_batch(["low", "low", "high", "low"], [False, True, True, False])
    m.add_dropped("buffer_full", "low", 3)
    m.add_refused("high")
    m.add_dropped("buffer_full", "low", 0)  # zero is not a change
    totals = m.totals()
    assert totals[CAPTURED.name] == {(("tier", "low"),): 6, (("tier", "high"),): 1}
    assert totals[KEPT.name] == {(("tier", "low"),): 1, (("tier", "high"),): 1}
    assert totals[SAMPLED_OUT.name] == {(("tier", "low"),): 2}
    assert totals[DROPPED.name] == {(("reason", "buffer_full"), ("tier", "low")): 3}
    assert totals[REFUSED.name] == {(("tier", "high"),): 1}


def test_request_path_recording_is_thread_safe():
    m = JournalMetrics("fraud", "Fraud", "r1")
    n = 20_000

    def work():
        for i in range(n):
            m.observe_enqueue_us(i % 50)
            m.add_dropped("buffer_full", "low")

    threads = [threading.Thread(target=work) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    totals = m.totals()
    assert totals[DROPPED.name][(("reason", "buffer_full"), ("tier", "low"))] == 4 * n
    assert totals[ENQUEUE_LATENCY.name] == 4 * n


def test_bucketize_keeps_counts_and_sums_exact():
    counts, sums = bucketize([0.5, 1.0, 1.5, 3.0, 30_000.0], ENQUEUE_US_BUCKETS)
    assert len(counts) == len(ENQUEUE_US_BUCKETS) + 1
    assert counts[0] == 2 and counts[1] == 1 and counts[2] == 1 and counts[-1] == 1  # le=1, 2, 5, +Inf
    assert sum(sums) == pytest.approx(30_006.0)


def test_report_outside_ray_is_a_safe_no_op():
    if ray_available():
        pytest.skip("this process is connected to Ray")
    m = JournalMetrics("fraud", "Fraud", "r1")
    m.add_batch(["low"], [True])
    m.observe_flush_ms(3.0)
    m.set_buffer_depth(5, 100)
    assert m.report() is False
    assert m.totals()[KEPT.name] == {(("tier", "low"),): 1}
    assert m.totals()[BUFFER_DEPTH.name] == 5


class _Recorder:
    """A Ray actor recording metrics the way a replica's flusher does."""

    def __init__(self, replica: str) -> None:
        self.metrics = JournalMetrics("fraud", "Fraud", replica)

    def record_and_report(self, n: int) -> dict:
        m = self.metrics
        start = time.perf_counter_ns()
        for i in range(n):
            m.observe_enqueue_us(1.0 + i % 40)
        request_path_ns = (time.perf_counter_ns() - start) / n
        m.add_batch(["low"] * 9 + ["high"], [False] * 8 + [True, True])
        m.add_dropped("buffer_full", "low", 2)
        m.add_refused("high")
        m.set_buffer_depth(7, 100)
        m.observe_flush_ms(4.0)
        m.observe_persistence_lag_ms([120.0, 300.0])
        m.add_sink(10, 4096)
        m.set_spool_depth(0, 0)
        m.add_registry_refresh_error()
        m.set_model_stale(False)
        start = time.perf_counter_ns()
        exported = m.report()
        report_ns = time.perf_counter_ns() - start
        return {"exported": exported, "request_path_ns": request_path_ns, "report_ns": report_ns,
                "calls": m.last_report_calls}


def _metrics_port() -> int:
    import ray

    for node in ray.nodes():
        if node.get("Alive") and node.get("MetricsExportPort"):
            return int(node["MetricsExportPort"])
    raise AssertionError("no alive Ray node reports a MetricsExportPort")


def test_metrics_reach_rays_prometheus_endpoint(ray_cluster, capsys):
    import ray

    replica = f"test-{uuid.uuid4().hex[:8]}"
    actor = ray.remote(num_cpus=0)(_Recorder).remote(replica)
    try:
        result = ray.get(actor.record_and_report.remote(5_000), timeout=120)
        assert result["exported"] is True
        with capsys.disabled():
            print(f"\n[metrics] request-path observe: {result['request_path_ns']:.0f} ns/call; "
                  f"report: {result['calls']} Ray calls in {result['report_ns'] / 1e6:.1f} ms "
                  f"({result['report_ns'] / 1e3 / max(result['calls'], 1):.2f} us/call)")
        url = f"http://127.0.0.1:{_metrics_port()}/metrics"
        wanted = {name for spec in METRICS for name in exported_names(spec)}
        found: set[str] = set()
        text = ""
        deadline = time.monotonic() + 90
        while time.monotonic() < deadline:
            try:
                with urllib.request.urlopen(url, timeout=5) as response:
                    text = response.read().decode()
            except OSError:
                text = ""
            found = {
                name for name in wanted
                if re.search(rf"^{name}{{[^}}]*replica=\"{replica}\"", text, re.MULTILINE)
            }
            if found == wanted:
                break
            time.sleep(1.0)  # polling interval of a deadline loop, not synchronisation
        assert found == wanted, f"missing on {url}: {sorted(wanted - found)}"
        # Exact values survive the aggregation: 5000 enqueue observations of 1..40 us, 2 drops.
        def value(name, extra=""):
            match = re.search(
                rf"^{name}{{[^}}]*{extra}[^}}]*replica=\"{replica}\"[^}}]*}} (\S+)|"
                rf"^{name}{{[^}}]*replica=\"{replica}\"[^}}]*{extra}[^}}]*}} (\S+)",
                text, re.MULTILINE,
            )
            assert match, f"{name} {extra} not on the endpoint"
            return float(match.group(1) or match.group(2))

        enqueue = ENQUEUE_LATENCY.name
        assert value(f"ray_{enqueue}_count_total") == 5_000
        assert value(f"ray_{enqueue}_bucket_total", 'le="\\+Inf"') == 5_000
        assert value(f"ray_{enqueue}_bucket_total", 'le="10"') == 5_000 // 40 * 10
        assert value(f"ray_{enqueue}_sum_total") == sum(1.0 + i % 40 for i in range(5_000))
        assert value(f"ray_{DROPPED.name}_total") == 2
    finally:
        ray.kill(actor)


def test_operations_doc_lists_every_metric():
    from pathlib import Path

    doc = (Path(__file__).parent.parent / "docs" / "operations.md").read_text()
    missing = [spec.name for spec in METRICS if f"ray_{spec.name}" not in doc]
    assert not missing, f"docs/operations.md does not describe {missing}"
