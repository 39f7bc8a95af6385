"""System test: a reduced form of the production topology, run as scripts/cluster-demo.sh runs it.

A Ray cluster of a head and two worker nodes (``ray.cluster_utils``), the tansu Kafka broker,
moto S3 with an Object Lock bucket and a witness bucket, PostgreSQL for the vault and an HTTP
``mlflow server``; ``serve deploy deployments/production.yaml``; traffic with a worker node
drained and removed mid-way; then compaction, lifecycle, verify, forget, query and replay as
``ray job submit`` jobs. It runs in its own process (its own Ray cluster, apart from the test
session's) and must finish within 10 minutes; every process it starts is stopped by pid.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys

import pytest

pytestmark = [pytest.mark.slow, pytest.mark.timeout(720)]

DEADLINE_S = 600


def test_reduced_topology_end_to_end(ray_cluster, tmp_path):
    # ``ray_cluster``: the session's own Ray instance stays up beside the demo's on purpose. With
    # two instances on one host, a job driver that resolves "auto" may join the wrong one (the
    # replay job once failed that way in CI); the demo must pin its own.
    workdir = tmp_path / "cluster"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SERVE_JOURNAL_", "RAY_"))}
    proc = subprocess.Popen(
        [sys.executable, "-m", "serve_journal.examples.cluster_demo", "--workdir", str(workdir),
         "--requests", "400", "--users", "12", "--concurrency", "6"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env,
        start_new_session=True)
    try:
        output, _ = proc.communicate(timeout=DEADLINE_S)
    except subprocess.TimeoutExpired:
        proc.send_signal(signal.SIGTERM)  # the demo stops what it started on SIGTERM
        try:
            output, _ = proc.communicate(timeout=120)
        finally:
            os.killpg(proc.pid, signal.SIGKILL)
        pytest.fail(f"the reduced topology did not finish within {DEADLINE_S} s:\n{output[-4000:]}")
    assert (workdir / "summary.json").exists(), output[-4000:]
    summary = json.loads((workdir / "summary.json").read_text())
    # The specific checks first, each with what its step printed; the exit code last.
    assert summary["answered"] > 0 and summary["lost"] == 0 and summary["duplicated"] == 0
    assert summary["removed_node"]["nodes_before"] == 3
    assert summary["verify_ok"], output[-4000:]
    assert summary["replay"]["rc"] == 0, summary["replay"].get("output", "")[-4000:]
    assert summary["forgotten_subject"]["entries_before"] > 0
    assert summary["forgotten_subject"]["found_after"] == 0
    assert proc.returncode == 0, output[-4000:]
