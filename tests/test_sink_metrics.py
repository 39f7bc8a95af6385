"""The Kafka sink's metrics reach Ray's Prometheus endpoint on both ways it runs on a cluster:
the Serve application (``sink/kafka_app.py``'s ``KafkaSinkReplica``) and ``serve-journal sink``
started as a Ray job (``RAY_ADDRESS`` set, as ``ray job submit`` sets it). The "sink stalled"
alert of docs/operations.md reads ``ray_serve_journal_sink_rows_total``; the persistence-lag
alert reads ``ray_serve_journal_persistence_lag_ms_*``."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from serve_journal.metrics import PERSISTENCE_LAG, SINK_ROWS, exported_names
from serve_journal.sink.kafka_app import METRICS_DEPLOYMENT
from serve_journal.transport.kafka import KafkaSettings, KafkaTransport
from tests.fixtures.kafka import make_entries, wait_for

pytestmark = pytest.mark.timeout(420)

ROWS = exported_names(SINK_ROWS)[0]
LAG_COUNT = exported_names(PERSISTENCE_LAG)[2]


def _metrics_port() -> int:
    import ray

    for node in ray.nodes():
        if node.get("Alive") and node.get("MetricsExportPort"):
            return int(node["MetricsExportPort"])
    raise AssertionError("no alive Ray node reports a MetricsExportPort")


def _send(bootstrap: str, topic: str, tmp_path: Path, n: int) -> None:
    transport = KafkaTransport(KafkaSettings(
        bootstrap_servers=bootstrap, topic=topic, enable_idempotence=False, client_id=topic,
        spool_dir=str(tmp_path / f"spool-{topic}"), shards_per_model=2))
    try:
        transport.send(make_entries(n, producer_id=f"p-{topic}"))
        assert transport.flush(60)
    finally:
        transport.close(10)


def _chains(root: Path) -> set[str]:
    manifest = root / "_manifest"
    return {p.name for p in manifest.iterdir()} if manifest.is_dir() else set()


def _sink_values(text: str, name: str) -> dict[str, float]:
    """``{replica label: value}`` of ``name`` for series of the Kafka sink deployment."""
    out = {}
    for labels, value in re.findall(rf"^{name}{{([^}}]*)}} (\S+)", text, re.MULTILINE):
        if f'deployment="{METRICS_DEPLOYMENT}"' in labels:
            replica = re.search(r'replica="([^"]*)"', labels)
            if replica:
                out[replica.group(1)] = float(value)
    return out


def test_sink_metrics_from_the_serve_app_and_from_a_ray_job(serve_instance, ray_cluster,
                                                           kafka_broker, tmp_path):
    from ray import serve

    from serve_journal.sink.kafka_app import app_builder

    for topic in ("served", "jobbed"):
        kafka_broker.create_topic(topic, 2)
    served, jobbed = tmp_path / "served", tmp_path / "jobbed"
    serve.run(app_builder({"bootstrap": kafka_broker.bootstrap, "topic": "served",
                           "partitions": "0-1", "journal_uri": str(served), "num_cpus": "0"}),
              name="sink-metrics", route_prefix="/sink-metrics")
    env = {**os.environ, "RAY_ADDRESS": ray_cluster}
    with open(tmp_path / "job.log", "wb") as log:
        job = subprocess.Popen(
            [sys.executable, "-m", "serve_journal.cli", "sink", "--bootstrap",
             kafka_broker.bootstrap, "--topic", "jobbed", "--partitions", "0-1", "--journal",
             str(jobbed)],
            env=env, stdout=log, stderr=subprocess.STDOUT, cwd=str(Path(__file__).parents[1]))
    try:
        _send(kafka_broker.bootstrap, "served", tmp_path, 300)
        _send(kafka_broker.bootstrap, "jobbed", tmp_path, 200)
        wait_for(lambda: len(_chains(served)) == 1 and len(_chains(jobbed)) == 1, 120,
                 interval=0.5, message="both sinks opened their chains")
        expected = {next(iter(_chains(served))): 300, next(iter(_chains(jobbed))): 200}
        url = f"http://127.0.0.1:{_metrics_port()}/metrics"
        rows: dict[str, float] = {}
        lag: dict[str, float] = {}
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline:
            try:
                with urllib.request.urlopen(url, timeout=5) as response:
                    text = response.read().decode()
            except OSError:
                text = ""
            rows, lag = _sink_values(text, ROWS), _sink_values(text, LAG_COUNT)
            if all(rows.get(c) == n and lag.get(c) == n for c, n in expected.items()):
                break
            time.sleep(1.0)  # polling interval of a deadline loop, not synchronisation
        assert {c: rows.get(c) for c in expected} == expected, (rows, lag)
        assert {c: lag.get(c) for c in expected} == expected, (rows, lag)
    finally:
        if job.poll() is None:
            os.kill(job.pid, signal.SIGTERM)
            try:
                job.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.kill(job.pid, signal.SIGKILL)
                job.wait(timeout=10)
        serve.delete("sink-metrics")
