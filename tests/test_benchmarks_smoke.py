"""Smoke runs of the benchmarks at a tiny size, only to keep the scripts from rotting.

They assert that every benchmark produces rows with the expected keys and positive numbers, and
that the report keeps other benchmarks' marker sections; never how fast anything is. Ray and
Serve are the session's (``ray_cluster`` / ``serve_instance``): the benchmarks accept an
already-initialised Ray.
"""

from __future__ import annotations

import math

import pytest

from benchmarks import bench_enqueue, bench_pipeline, bench_serving, bench_storage, report
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
    res = bench_enqueue.run("tiny", workdir=tmp_path, tracking_uri=tracking_uri)
    names = [r["name"] for r in res["rows"]]
    assert any(n.startswith("serve_journal runtime.capture") for n in names)
    assert any("QueueHandler" in n for n in names) and any("fsync" in n for n in names)
    capture = next(r for r in res["rows"] if r["name"].startswith("serve_journal runtime.capture"))
    assert capture["n"] == bench_enqueue.SIZES["tiny"]["calls"]
    assert capture["journaled"] + capture["dropped"] == capture["n"]
    for row in res["rows"]:
        if row.get("n"):
            _positive(row, "p50_us", "p99_us", "p999_us", "max_us")
            assert row["p50_us"] <= row["p99_us"] <= row["p999_us"] <= row["max_us"]
    results["enqueue"] = res


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


def test_serving_tiny(serve_instance, mlflow_registry, tmp_path, results):
    tracking_uri, _ = mlflow_registry
    res = bench_serving.run("tiny", workdir=tmp_path, tracking_uri=tracking_uri, http_url=serve_instance,
                            variants=("no_journal", "serve_journal_actors"))
    got = {(r["variant"], r["path"]) for r in res["rows"]}
    assert got == {(v, p) for v in ("no_journal", "serve_journal_actors") for p in ("http", "handle")}
    for row in res["rows"]:
        assert row["errors"] == 0
        assert row["n"] == bench_serving.SIZES["tiny"]["requests"]
        _positive(row, "throughput_rps", "throughput_ratio", "p50_ms", "p99_ms")
    results["serving"] = res


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
