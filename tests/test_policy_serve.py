"""Risk tiers, fail-closed refusals, exact counters, metrics, JWT callers and verify, end to end
on a real Serve app, a real MLflow registry and real files."""

from __future__ import annotations

import base64
import concurrent.futures
import json
import time
import urllib.request
import uuid

import pytest
import requests
from ray import serve

from serve_journal import flush_journal, journaled
from serve_journal.examples.fraud import MODEL_NAME
from serve_journal.read.stats import load_counters
from serve_journal.read.verify import verify_journal
from serve_journal.storage import open_storage
from tests.helpers.deployments import Failing, Rules
from tests.helpers.journal import read_journal

pytestmark = pytest.mark.timeout(300)

POLICY = {
    "tiers": {
        "high": {"sample_rate": 1.0, "overflow": "refuse"},
        "low": {"sample_rate": 0.5, "overflow": "drop"},
    },
    "rules": [{"tier": "high", "decision": "block"}],
    "default_tier": "low",
}


@pytest.fixture
def app_name():
    name = f"p{uuid.uuid4().hex[:8]}"
    yield name
    try:
        serve.delete(name)
    except Exception:  # noqa: BLE001
        pass


def test_full_buffer_keeps_every_high_risk_decision_and_counts_every_low_risk_drop(
        serve_instance, mlflow_registry, tmp_path, app_name):
    tracking_uri, _ = mlflow_registry
    root = tmp_path / "journal"
    # A tiny buffer (4 entries, drained every 0.25 s, ~16 entries/s) under ~100 requests/s: full
    # most of the time, yet some dozens of low-risk entries pass it and meet the 0.5 sampler.
    dep = journaled(model=f"models:/{MODEL_NAME}@champion", tracking_uri=tracking_uri,
                    journal_uri=str(root), threshold=0.5, risk_policy=POLICY, buffer_capacity=4,
                    flush_interval_s=0.25, flush_batch_size=10_000, reserve_capacity=500)(Rules)
    serve.run(dep.bind(), name=app_name, route_prefix=f"/{app_name}")
    url = f"{serve_instance}/{app_name}"

    def send(i: int) -> tuple[str, int, dict | None]:
        rid = f"q-{i}"
        r = requests.post(url, json={"subject_id": f"s{i % 7}", "features": {"amount": float(i % 100)}},
                          headers={"x-request-id": rid}, timeout=60)
        return rid, r.status_code, r.json()

    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        results = list(pool.map(send, range(300)))
    assert flush_journal(str(root), timeout=60)
    serve.delete(app_name)  # replicas close: their counters are flushed

    served_high = {rid for rid, status, body in results if status == 200 and body["decision"] == "block"}
    served_low = {rid for rid, status, body in results if status == 200 and body["decision"] == "allow"}
    refused = {rid for rid, status, body in results if status == 503}
    assert {status for _, status, _ in results} <= {200, 503}
    assert refused, "the buffer never filled: the test did not exercise fail-closed"
    assert all("not served unjournaled" in body["error"] for rid, s, body in results if s == 503)

    rows = {r["request_id"]: r for r in read_journal(root).to_pylist()}
    # Every served high-risk decision has its entry, kept at rate 1.0.
    assert served_high <= set(rows)
    assert all(rows[rid]["risk_tier"] == "high" and rows[rid]["sample_rate"] == 1.0 for rid in served_high)
    # Every refusal is journaled as such.
    for rid in refused:
        assert rows[rid]["outcome"] == "rejected" and rows[rid]["error_type"] == "journal_full"
    # Low risk: journaled + sampled out + dropped == served, exactly, per the counters.
    storage = open_storage(str(root))
    counters = load_counters(storage).to_pylist()
    low = [c for c in counters if c["risk_tier"] == "low" and c["outcome"] == "ok"]
    by_disposition = {d: sum(c["count"] for c in low if c["disposition"] == d)
                      for d in ("kept", "sampled_out", "dropped")}
    journaled_low = {rid for rid in served_low if rid in rows}
    assert by_disposition["kept"] == len(journaled_low)
    assert sum(by_disposition.values()) == len(served_low)
    print(f"[policy] {len(results)} requests: {len(refused)} refused, low-risk {by_disposition}")
    assert by_disposition["dropped"] > 0
    assert by_disposition["sampled_out"] > 0
    # ... and verify explains every sequence gap with the counted drops and samples.
    public_key = root.parent / "journal-signing" / "manifest-signing.pub.pem"
    report = verify_journal(storage, public_key=str(public_key))
    assert report.ok, report.to_json()


def test_errors_meeting_a_full_buffer_in_a_refusing_tier_are_journaled_or_counted(
        serve_instance, mlflow_registry, tmp_path, app_name):
    """A failing method serves no decision, so there is nothing to refuse; with the buffer and its
    reserve full, its entry is still journaled or counted as dropped, never lost uncounted."""
    tracking_uri, _ = mlflow_registry
    root = tmp_path / "journal"
    policy = {"tiers": {"high": {"sample_rate": 1.0, "overflow": "refuse"}}, "rules": [],
              "default_tier": "high"}
    dep = journaled(model=f"models:/{MODEL_NAME}@champion", tracking_uri=tracking_uri,
                    journal_uri=str(root), threshold=0.5, risk_policy=policy, buffer_capacity=2,
                    flush_interval_s=0.25, flush_batch_size=10_000, reserve_capacity=2)(Failing)
    serve.run(dep.bind(), name=app_name, route_prefix=f"/{app_name}")
    url = f"{serve_instance}/{app_name}"

    def send(i: int) -> int:
        return requests.post(url, json={"subject_id": f"s{i % 5}", "features": {"amount": 1.0}},
                             headers={"x-request-id": f"e-{i}"}, timeout=60).status_code

    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        statuses = list(pool.map(send, range(120)))
    assert set(statuses) == {500}
    assert flush_journal(str(root), timeout=60)
    serve.delete(app_name)  # replicas close: their counters are flushed

    rows = read_journal(root).to_pylist()
    assert all(r["outcome"] == "error" and r["error_type"] == "ValueError" for r in rows)
    storage = open_storage(str(root))
    counted = load_counters(storage).to_pylist()
    dropped = sum(c["count"] for c in counted if c["disposition"] == "dropped")
    assert dropped > 0, "the buffer never filled: the test did not exercise the full buffer"
    assert len(rows) + dropped == len(statuses)
    public_key = root.parent / "journal-signing" / "manifest-signing.pub.pem"
    report = verify_journal(storage, public_key=str(public_key))
    assert report.ok, report.to_json()


def test_verify_catches_an_unaccounted_gap_in_a_served_journal(serve_instance, mlflow_registry,
                                                             tmp_path, app_name):
    tracking_uri, _ = mlflow_registry
    root = tmp_path / "journal"
    dep = journaled(model=f"models:/{MODEL_NAME}@champion", tracking_uri=tracking_uri,
                    journal_uri=str(root), threshold=0.5, roll_seconds=0.2)(Rules)
    serve.run(dep.bind(), name=app_name, route_prefix=f"/{app_name}")
    for i in range(30):
        assert requests.post(f"{serve_instance}/{app_name}", json={"features": {"amount": 1.0 * i}},
                             timeout=60).status_code == 200
        if i == 14:
            assert flush_journal(str(root), timeout=60)  # two files at least
    assert flush_journal(str(root), timeout=60)
    storage = open_storage(str(root))
    public_key = str(root.parent / "journal-signing" / "manifest-signing.pub.pem")
    assert verify_journal(storage, public_key=public_key).ok
    # Delete one data file: its records' entries are now a loss verify must name.
    victim = sorted(storage.list_files("hot/", ".parquet"))[0]
    (root / victim).chmod(0o644)
    (root / victim).unlink()
    report = verify_journal(storage, public_key=public_key)
    assert not report.ok
    assert victim in report.to_json()


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _jwt(private_key, claims: dict) -> str:
    header = _b64(json.dumps({"alg": "EdDSA", "typ": "JWT"}).encode())
    payload = _b64(json.dumps(claims).encode())
    signature = private_key.sign(f"{header}.{payload}".encode())
    return f"{header}.{payload}.{_b64(signature)}"


def test_jwt_callers_are_verified_and_bad_tokens_are_journaled_as_rejected(
        serve_instance, mlflow_registry, tmp_path, app_name):
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    tracking_uri, _ = mlflow_registry
    key = Ed25519PrivateKey.generate()
    pem = key.public_key().public_bytes(serialization.Encoding.PEM,
                                        serialization.PublicFormat.SubjectPublicKeyInfo).decode()
    root = tmp_path / "journal"
    dep = journaled(model=f"models:/{MODEL_NAME}@champion", tracking_uri=tracking_uri,
                    journal_uri=str(root), threshold=0.5, caller_jwt_public_key=pem,
                    caller_header="x-spoofed-caller")(Rules)
    serve.run(dep.bind(), name=app_name, route_prefix=f"/{app_name}")
    url = f"{serve_instance}/{app_name}"
    now = int(time.time())
    good = _jwt(key, {"sub": "svc-payments", "exp": now + 600})
    expired = _jwt(key, {"sub": "svc-payments", "exp": now - 3600})
    forged = _jwt(Ed25519PrivateKey.generate(), {"sub": "svc-admin", "exp": now + 600})
    body = {"features": {"amount": 70.0}}
    cases = {"ok-1": good, "exp-1": expired, "forged-1": forged, "none-1": None}
    statuses = {}
    for rid, token in cases.items():
        headers = {"x-request-id": rid, "x-spoofed-caller": "svc-admin"}
        if token:
            headers["authorization"] = f"Bearer {token}"
        statuses[rid] = requests.post(url, json=body, headers=headers, timeout=60).status_code
    assert statuses == {"ok-1": 200, "exp-1": 401, "forged-1": 401, "none-1": 401}
    assert flush_journal(str(root), timeout=60)
    rows = {r["request_id"]: r for r in read_journal(root).to_pylist()}
    assert rows["ok-1"]["caller"] == "svc-payments" and rows["ok-1"]["outcome"] == "ok"
    assert rows["exp-1"]["outcome"] == "rejected" and rows["exp-1"]["error_type"] == "caller_expired"
    assert rows["forged-1"]["error_type"] == "caller_bad_signature"
    assert rows["none-1"]["error_type"] == "caller_malformed"
    assert all(r["decision"] is None for k, r in rows.items() if k != "ok-1")
    assert not any(r["caller"] == "svc-admin" for r in rows.values())


def test_metrics_reach_the_prometheus_endpoint(serve_instance, mlflow_registry, tmp_path, app_name):
    import ray

    tracking_uri, _ = mlflow_registry
    root = tmp_path / "journal"
    dep = journaled(model=f"models:/{MODEL_NAME}@champion", tracking_uri=tracking_uri,
                    journal_uri=str(root), threshold=0.5)(Rules)
    serve.run(dep.bind(), name=app_name, route_prefix=f"/{app_name}")
    for i in range(20):
        requests.post(f"{serve_instance}/{app_name}", json={"features": {"amount": float(i)}}, timeout=60)
    port = next(int(n["MetricsExportPort"]) for n in ray.nodes() if n.get("Alive") and n.get("MetricsExportPort"))
    wanted = ["serve_journal_entries_captured", "serve_journal_entries_kept",
              "serve_journal_enqueue_latency_us_bucket", "serve_journal_buffer_depth",
              "serve_journal_sink_rows", "serve_journal_persistence_lag_ms_bucket"]
    deadline = time.monotonic() + 90
    missing = wanted
    while time.monotonic() < deadline:
        text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
        missing = [name for name in wanted if name not in text]
        if not missing:
            break
        time.sleep(1.0)  # Ray exports metrics every few seconds; poll until a deadline
    assert not missing, f"metrics not exported: {missing}"
