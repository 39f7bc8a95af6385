"""Smoke runs of the benchmarks at a tiny size, only to keep the scripts from rotting.

They assert that every benchmark produces rows with the expected keys and positive numbers, and
that the report keeps other benchmarks' marker sections; never how fast anything is. Ray and
Serve are the session's (``ray_cluster`` / ``serve_instance``): the benchmarks accept an
already-initialised Ray.
"""

from __future__ import annotations

import math
import os

import pytest

from benchmarks import bench_enqueue, bench_pipeline, bench_serving, bench_storage, profile, report
from benchmarks.machine import machine_info, versions

pytestmark = [pytest.mark.timeout(300), pytest.mark.slow]


def _positive(row: dict, *keys: str) -> None:
    for key in keys:
        value = row[key]
        assert isinstance(value, int | float) and not math.isnan(value) and value > 0, (key, value)


@pytest.fixture(scope="module")
def results():
    return {"size": "tiny", "machine": machine_info(), "versions": versions()}


def test_enqueue_tiny(mlflow_registry, tmp_path, results):
    tracking_uri, _ = mlflow_registry
    res = bench_enqueue.run("tiny", workdir=tmp_path, tracking_uri=tracking_uri, busy=True)
    names = {(r["name"], r["condition"]) for r in res["rows"]}
    for condition in ("idle", "busy"):
        assert ("serve_journal runtime.capture()", condition) in names
        assert ("bare loop (call does nothing)", condition) in names
        assert ("baseline: logging QueueHandler JSON line", condition) in names
    assert any("fsync" in n for n, _ in names)
    assert res["params"]["spinners"] == bench_enqueue.SPINNERS
    for capture in (r for r in res["rows"] if r["name"] == "serve_journal runtime.capture()"):
        assert capture["n"] == bench_enqueue.SIZES["tiny"]["calls"]
        assert capture["journaled"] + capture["dropped"] == capture["n"]  # every call accounted for
    for row in res["rows"]:
        if row.get("n"):
            _positive(row, "p50_us", "p99_us", "p999_us", "max_us")
            assert row["p50_us"] <= row["p99_us"] <= row["p999_us"] <= row["max_us"]
        if "loop_late_p99_us" in row:
            _positive(row, "achieved_rate", "loop_late_max_us", "thread_late_max_us")
    results["enqueue"] = res


def test_busy_cores_are_killed():
    with bench_enqueue.busy_cores(2) as pids:
        assert len(pids) == 2
        for pid in pids:
            os.kill(pid, 0)  # running
    for pid in pids:
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)


def test_storage_tiny(mlflow_registry, tmp_path, results):
    tracking_uri, _ = mlflow_registry
    res = bench_storage.run("tiny", workdir=tmp_path, tracking_uri=tracking_uri)
    assert res["params"]["entries"] == bench_storage.SIZES["tiny"]["entries"]
    kinds = [r["name"] for r in res["rows"]]
    assert any(k.startswith("hot") for k in kinds) and any(k.startswith("cold") for k in kinds)
    for row in res["rows"]:
        _positive(row, "bytes_per_entry", "vs_raw_json")
    results["storage"] = res


def test_pipeline_tiny(ray_cluster, mlflow_registry, tmp_path, results):
    tracking_uri, _ = mlflow_registry
    res = bench_pipeline.run("tiny", workdir=tmp_path, tracking_uri=tracking_uri, kafka=False)
    assert res["rows"], res["notes"]
    for row in res["rows"]:
        assert row["path"] == "actors"
        _positive(row, "captured", "capture_rate", "rows_on_disk", "durable_rate")
        assert row["rows_on_disk"] + row["dropped"] >= row["captured"]
    assert res["latency"], res["notes"]
    _positive(res["latency"][0], "n", "p50_ms", "p99_ms")
    results["pipeline"] = res


def test_pipeline_latency_levels_tiny(ray_cluster, mlflow_registry, tmp_path):
    """The A/B helper (``bench_pipeline --latency``): one latency level per round. The session's
    registry is passed: a registry of its own would be this process's tracking URI after its
    temporary folder is gone (the doctor's CLI test then found no registry)."""
    tracking_uri, _ = mlflow_registry
    rows = bench_pipeline.latency_levels("actors", 1_000, 1.0, 1, workdir=tmp_path,
                                         tracking_uri=tracking_uri)
    assert len(rows) == 1 and rows[0]["path"] == "actors"
    _positive(rows[0], "n", "p50_ms", "p99_ms", "rows_on_disk")


def test_serving_tiny(serve_instance, mlflow_registry, tmp_path, results):
    tracking_uri, _ = mlflow_registry
    res = bench_serving.run("tiny", workdir=tmp_path, tracking_uri=tracking_uri, http_url=serve_instance,
                            variants=("no_journal", "serve_journal_actors"))
    got = {(r["variant"], r["path"]) for r in res["rows"]}
    assert got == {("no_journal", "http"), ("serve_journal_actors", "http")}
    for row in res["rows"]:
        assert row["errors"] == 0
        assert row["rounds"] == bench_serving.SIZES["tiny"]["rounds"]
        _positive(row, "throughput_rps", "completed", "p50_ms", "p99_ms")
        cpu = row["cpu_ms_per_request"]
        assert set(cpu) == set(bench_serving.ROLES)
        assert cpu["replica"] > 0 and cpu["proxy"] > 0 and cpu["load_generator"] > 0, cpu
    journaled = next(r for r in res["rows"] if r["variant"] == "serve_journal_actors")
    assert journaled["cpu_ms_per_request"]["journal_writers"] > 0
    _positive(journaled, "throughput_ratio")
    assert journaled["ratio_ci_low"] <= journaled["throughput_ratio"] <= journaled["ratio_ci_high"]
    results["serving"] = res


def test_paired_ratio_interval():
    ci = bench_serving.paired_ratio_ci([0.9, 1.0, 1.1])
    assert ci["ratio"] == pytest.approx(1.0)
    # t(0.975, 2) = 4.303; sd = 0.1; half width = 4.303 * 0.1 / sqrt(3)
    assert ci["ci_high"] - ci["ratio"] == pytest.approx(4.303 * 0.1 / math.sqrt(3), rel=1e-3)
    assert math.isnan(bench_serving.paired_ratio_ci([1.0])["ci_low"])


def test_profile_frames_and_labels():
    raw = ["main (a.py:1);profiled_region (benchmarks/profile.py:70);f (x.py:3);g (x.py:9) 3",
           "main (a.py:1);profiled_region (benchmarks/profile.py:70);f (x.py:3) 1",
           "main (a.py:1);setup (a.py:5) 50"]
    top = profile.top_frames(raw)
    assert top["samples"] == 4  # set-up outside the region is left out
    assert top["own"][0] == ("g (x.py:9)", 0.75)
    assert dict(top["inclusive"])["f (x.py:3)"] == 1.0
    section = profile.merge_section(None, "before", "### before\n\nold figures")
    section = profile.merge_section(section, "after", "### after\n\nnew figures")
    section = profile.merge_section(section, "after", "### after\n\nnewer figures")
    assert "old figures" in section and "newer figures" in section and "new figures\n" not in section
    assert section.index("### before") < section.index("### after")


def test_report_keeps_other_sections(tmp_path, results):
    doc = tmp_path / "benchmarks.md"
    doc.write_text("# old\n\n<!-- bench_query:start -->\nquery figures\n<!-- bench_query:end -->\n"
                   "<!-- bench_main:start -->\nstale\n<!-- bench_main:end -->\n")
    text = report.write(results, doc)
    assert "<!-- bench_query:start -->\nquery figures\n<!-- bench_query:end -->" in text
    assert "stale" not in text
    assert text.count("<!-- bench_main:start -->") == 1
    for section in ("## Run", "## Scaling model"):
        assert section in text
    for key, title in (("enqueue", "## Enqueue"), ("storage", "## Storage"), ("pipeline", "## Pipeline"),
                       ("serving", "## Serving")):
        if key in results:
            assert title in text
    assert report.write(results, doc) == text  # stable when rewritten


def test_run_writes_each_benchmarks_section(tmp_path, results):
    from benchmarks import run

    doc = tmp_path / "benchmarks.md"
    doc.write_text("<!-- bench_query:start -->\nold query\n<!-- bench_query:end -->\n"
                   "<!-- findings:start -->\nhand-written\n<!-- findings:end -->\n")
    fresh = {**results, "query": {"section": "## Investigation queries\n\nnew query", "size": "tiny rows"},
             "profile": {"markdown": "### run-tiny\n\nprofiled", "label": "run-tiny", "size": "profile size tiny"},
             "durations_s": {"query": 1.5, "profile": 2.0}, "wall_s": 4.0}
    run.write(fresh, doc, only=("query", "profile"))
    text = doc.read_text()
    assert "new query" in text and "old query" not in text
    assert "hand-written" in text and "profiled" in text
    assert "| Investigation queries | tiny: tiny rows | 1.5 |" in text  # which size made the table


def test_compaction_append_keeps_the_notes_after_its_table():
    from benchmarks.bench_compaction import _notes_after_table

    block = ["<!-- bench_compaction:start -->", "## Compaction", "", "- `.venv/bin/python x`", "",
             "| step | rows |", "|---|---|", "| compact | 10 |", "Before range passes: a note",
             "that runs over two lines."]
    notes = ["", "Before range passes: a note", "that runs over two lines."]
    assert _notes_after_table(block) == notes  # a blank line first: the table ends before them
    assert _notes_after_table([*block[:8], "", "", *block[8:]]) == notes
    assert _notes_after_table(block[:8]) == []
    assert _notes_after_table(["## no table yet"]) == []
    from benchmarks.bench_compaction import _commands_before_table

    quoted = [*block, "", "- `.venv/bin/python y` (a command a note quotes)"]
    assert _commands_before_table(quoted) == ["- `.venv/bin/python x`"]


def test_a_benchmark_child_reports_its_own_peak_not_its_parents():
    """``ru_maxrss`` of a child started by subprocess holds the parent's peak (vfork, then exec):
    a 50M-entry compaction child reported 3.06 GiB while its own high-water mark was 1.42 GiB,
    the parent having generated the day. ``peak_rss_bytes`` reads the child's own VmHWM."""
    import subprocess
    import sys

    import numpy as np

    from benchmarks._common import PEAK_RSS_CODE

    big = np.ones(400 * 2**20 // 8)  # this process now peaks 400 MiB higher
    big[:] = 2.0
    del big
    script = PEAK_RSS_CODE + (
        "import resource\nprint(peak_rss_bytes(), "
        "resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)\n")
    own, inherited = map(int, subprocess.run([sys.executable, "-c", script], capture_output=True,
                                             text=True, check=True).stdout.split())
    assert own < 100 * 2**20, (own, inherited)  # a bare interpreter; inherited: >= 400 MiB here
