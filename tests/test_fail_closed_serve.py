"""Fail-closed on the Kafka path, end to end on a real Serve app, a real MLflow registry and a
real tansu broker that is down at first: with the spool and queue full, no high-risk decision is
served without its entry (it is journaled, or the request got 503 and the refusal is journaled),
low-risk entries are dropped with a counted reason, and caller and attribute rules pick the tier
on the normal path and on the overflow path alike."""

from __future__ import annotations

import concurrent.futures
import uuid

import pytest
import requests
from ray import serve

from serve_journal import annotate, journaled
from serve_journal.examples.fraud import MODEL_NAME
from serve_journal.read.stats import load_counters
from serve_journal.read.verify import verify_journal
from serve_journal.storage import open_storage
from tests.fixtures.kafka import TansuBroker, free_port, wait_for
from tests.helpers.journal import read_journal
from tests.test_kafka_serve import PARTITIONS, TOPIC, SinkThread

pytestmark = pytest.mark.timeout(420)

POLICY = {
    "tiers": {
        "high": {"sample_rate": 1.0, "overflow": "refuse"},
        "low": {"sample_rate": 0.5, "overflow": "drop"},
    },
    "rules": [
        {"tier": "high", "decision": "block"},
        {"tier": "high", "caller": "partner-a"},
        {"tier": "high", "attributes": {"region": ["eu"]}},
    ],
    "default_tier": "low",
}


@serve.deployment(max_ongoing_requests=64)
class RegionRules:
    """Blocks amounts >= 50 and names the request's region as a risk attribute."""

    async def __call__(self, request) -> dict:
        body = await request.json()
        annotate(attributes={"region": body["region"]})
        amount = body["features"]["amount"]
        return {"score": min(1.0, amount / 100.0), "decision": "block" if amount >= 50 else "allow"}


def _request(i: int) -> tuple[dict, dict]:
    """Request ``i``: a quarter each is blocked, from partner-a, from the eu, or plain low risk."""
    kind = i % 4
    amount = 75.0 if kind == 0 else float(i % 40)
    caller = "partner-a" if kind == 1 else "shop"
    region = "eu" if kind == 2 else "us"
    body = {"subject_id": f"s{i % 9}", "features": {"amount": amount}, "region": region}
    return body, {"x-request-id": f"fc-{i}", "x-caller-id": caller}


def _high(i: int) -> bool:
    return i % 4 != 3


def test_dead_broker_full_spool_never_serves_a_high_risk_decision_without_its_entry(
        serve_instance, mlflow_registry, tmp_path):
    tracking_uri, _ = mlflow_registry
    root = tmp_path / "journal"
    app = f"fc{uuid.uuid4().hex[:8]}"
    broker = TansuBroker(free_port(), "memory://tansu/", tmp_path / "tansu.log")  # down at first
    kafka = {"bootstrap_servers": broker.bootstrap, "topic": TOPIC, "enable_idempotence": False,
             "num_partitions": PARTITIONS, "spool_dir": str(tmp_path / "spool"),
             "spool_max_bytes": 24_000, "queue_max_batches": 1, "send_timeout_s": 2.0,
             "request_timeout_ms": 2000, "retry_backoff_s": 0.1, "retry_backoff_max_s": 0.5}
    dep = journaled(model=f"models:/{MODEL_NAME}@champion", tracking_uri=tracking_uri,
                    journal_uri=str(root), threshold=0.5, risk_policy=POLICY, transport="kafka",
                    extra={"kafka": kafka}, buffer_capacity=8, reserve_capacity=2_000,
                    flush_batch_size=4, flush_interval_s=0.05)(RegionRules)
    sink = None
    try:
        serve.run(dep.bind(), name=app, route_prefix=f"/{app}")
        url = f"{serve_instance}/{app}"

        def send(i: int) -> tuple[int, int, dict]:
            body, headers = _request(i)
            r = requests.post(url, json=body, headers=headers, timeout=120)
            return i, r.status_code, r.json()

        # The first dozen one by one, with room everywhere: the normal path classifies them.
        results = [send(i) for i in range(12)]
        assert all(status == 200 for _, status, _ in results), [(i, s, b) for i, s, b in results
                                                                if s != 200]
        with concurrent.futures.ThreadPoolExecutor(8) as pool:
            results += list(pool.map(send, range(12, 400)))
        refused = {i for i, status, _ in results if status == 503}
        served = {i for i, status, _ in results if status == 200}
        assert served | refused == set(range(400))
        assert refused, "the spool never filled: the test did not exercise fail-closed"
        assert all(_high(i) for i in refused), "a low-risk request was refused instead of dropped"
        # Caller and attribute rules decided on the overflow path too: those requests were refused.
        assert any(i % 4 == 1 for i in refused) and any(i % 4 == 2 for i in refused)

        broker.start()
        broker.create_topic(TOPIC, PARTITIONS)
        sink = SinkThread(broker.bootstrap, str(root))
        serve.delete(app)  # the replica drains its buffer and transport into the broker
        expected = {f"fc-{i}" for i in served if _high(i)} | {f"fc-{i}" for i in refused}
        wait_for(lambda: expected <= set(read_journal(root).column("request_id").to_pylist()),
                 timeout=180, interval=0.5, message="every high-risk entry and refusal persisted")
    finally:
        if sink is not None:
            sink.stop()
        try:
            serve.delete(app)
        except Exception:  # noqa: BLE001
            pass
        broker.stop()

    rows = {r["request_id"]: r for r in read_journal(root).to_pylist()}
    for i in served:
        if _high(i):  # every served high-risk decision has its entry, in the high tier
            row = rows[f"fc-{i}"]
            assert row["risk_tier"] == "high" and row["outcome"] == "ok", (i, row["risk_tier"])
    for i in refused:  # every refusal is journaled as such, in the tier that refused it
        row = rows[f"fc-{i}"]
        assert (row["outcome"], row["error_type"], row["risk_tier"]) == ("rejected", "journal_full", "high")
    assert all(rows[rid]["risk_tier"] == "low" for rid in rows if not _high(int(rid[3:])))
    # Attributes choose the tier only: no column holds them.
    assert not any(value in ("eu", "us") for row in rows.values() for value in row.values())

    storage = open_storage(str(root))
    counters = load_counters(storage).to_pylist()
    low = [c for c in counters if c["risk_tier"] == "low"]
    by_disposition = {d: sum(c["count"] for c in low if c["disposition"] == d)
                      for d in ("kept", "sampled_out", "dropped")}
    served_low = [i for i in served if not _high(i)]
    assert sum(by_disposition.values()) == len(served_low)
    assert by_disposition["dropped"] > 0
    assert {c["reason"] for c in low if c["disposition"] == "dropped"} == {"buffer_full"}
    assert not [c for c in counters if c["risk_tier"] == "high" and c["disposition"] == "dropped"]
    print(f"[fail-closed kafka] {len(served)} served, {len(refused)} refused, low {by_disposition}")
    public_key = root.parent / "journal-signing" / "manifest-signing.pub.pem"
    report = verify_journal(storage, public_key=str(public_key))
    assert report.ok, report.to_json()
