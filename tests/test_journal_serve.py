"""End to end on a real local Ray cluster, real Serve, a real sqlite MLflow registry, real Parquet.

Each test deploys its own Serve app with its own journal root (so its own writer pool) and reads
the files back.
"""

from __future__ import annotations

import concurrent.futures
import glob
import threading
import time
import uuid
from pathlib import Path

import pyarrow as pa
import pytest
import requests
from ray import serve

from serve_journal import caller_tokenizer, flush_journal, journaled, producer_reports
from serve_journal.examples.fraud import MODEL_NAME, FraudModel, build_app, random_features
from tests.helpers.journal import read_journal

pytestmark = pytest.mark.timeout(300)


def post(url: str, body: dict, request_id: str | None = None, caller: str = "svc-a") -> requests.Response:
    headers = {"x-caller-id": caller}
    if request_id:
        headers["x-request-id"] = request_id
    return requests.post(url, json=body, headers=headers, timeout=60)


def wait_for_rows(root: Path, expected: int, timeout: float = 60.0) -> pa.Table:
    assert flush_journal(str(root), timeout=timeout), "journal flush did not complete in time"
    return read_journal(root)


@pytest.fixture
def journal_root(tmp_path) -> Path:
    return tmp_path / "journal"


@pytest.fixture
def app_name(request) -> str:
    name = f"t{uuid.uuid4().hex[:8]}"
    yield name
    try:
        serve.delete(name)
    except Exception:  # noqa: BLE001 - already gone
        pass


def test_http_requests_each_leave_exactly_one_correct_entry(serve_instance, mlflow_registry,
                                                            journal_root, app_name):
    tracking_uri, version = mlflow_registry
    serve.run(build_app(tracking_uri, str(journal_root)), name=app_name, route_prefix=f"/{app_name}")
    url = f"{serve_instance}/{app_name}"
    import numpy as np

    rng = np.random.default_rng(3)
    sent = {}
    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        futures = {}
        for i in range(200):
            rid = f"req-{i:04d}-{uuid.uuid4().hex[:6]}"
            body = {"subject_id": f"user-{i % 17}", "features": random_features(rng)}
            futures[pool.submit(post, url, body, rid)] = rid
        for fut in concurrent.futures.as_completed(futures):
            response = fut.result()
            assert response.status_code == 200
            sent[futures[fut]] = response.json()

    table = wait_for_rows(journal_root, len(sent))
    rows = table.to_pylist()
    assert len(rows) == len(sent) == 200
    assert {r["request_id"] for r in rows} == set(sent)
    for row in rows:
        answer = sent[row["request_id"]]
        assert row["model_name"] == MODEL_NAME
        assert row["model_version"] == version
        assert row["dataset_hash"].startswith("sha256:") and row["dataset_hash_source"] == "tag"
        assert row["threshold"] == 0.75
        assert row["decision"] == answer["decision"]
        assert row["score"] == pytest.approx(answer["score"])
        assert row["outcome"] == "ok"
        assert row["caller"] == "svc-a"
        assert row["subject_token"] and len(row["subject_token"]) == 32
        assert len(row["features_hmac"]) == 64
    # Files land in the hive layout and the producer's sequence numbers have no gap.
    files = glob.glob(str(journal_root / "hot" / f"model={MODEL_NAME}" / "date=*" / "hour=*" / "*.parquet"))
    assert files
    seqs = sorted(r["seq"] for r in rows)
    assert seqs == list(range(len(rows)))


def test_response_is_byte_for_byte_the_same_as_without_journal(serve_instance, mlflow_registry,
                                                               journal_root, app_name):
    tracking_uri, _ = mlflow_registry
    plain = serve.deployment(FraudModel, name="Plain").bind(tracking_uri=tracking_uri)
    serve.run(plain, name=app_name + "p", route_prefix=f"/{app_name}p")
    serve.run(build_app(tracking_uri, str(journal_root)), name=app_name, route_prefix=f"/{app_name}")
    try:
        import numpy as np

        rng = np.random.default_rng(11)
        for _ in range(5):
            body = {"subject_id": "user-1", "features": random_features(rng)}
            a = post(f"{serve_instance}/{app_name}p", body)
            b = post(f"{serve_instance}/{app_name}", body)
            assert a.status_code == b.status_code == 200
            assert a.content == b.content
            assert a.headers["content-type"] == b.headers["content-type"]
    finally:
        serve.delete(app_name + "p")


def test_canary_values_never_reach_files_or_logs(ray_cluster, serve_instance, mlflow_registry,
                                                journal_root, app_name):
    tracking_uri, _ = mlflow_registry
    serve.run(build_app(tracking_uri, str(journal_root)), name=app_name, route_prefix=f"/{app_name}")
    subject_canary = "CANARY-SUBJ-7f3a91"
    feature_canary = "CANARY-FEAT-2c44d0"
    import numpy as np

    features = random_features(np.random.default_rng(5))
    features["merchant_name"] = feature_canary
    for _ in range(20):
        assert post(f"{serve_instance}/{app_name}", {"subject_id": subject_canary,
                                                      "features": features}).status_code == 200
    table = wait_for_rows(journal_root, 20)
    assert table.num_rows == 20
    assert table.column("subject_token").null_count == 0

    import ray

    session_dir = Path(ray._private.worker._global_node.get_session_dir_path())
    scanned = 0
    for base in (journal_root.parent, session_dir / "logs"):
        for path in base.rglob("*"):
            if path.is_file():
                data = path.read_bytes()
                scanned += 1
                for canary in (subject_canary, feature_canary):
                    assert canary.encode() not in data, f"{canary} found in {path}"
    assert scanned > 5


def test_caller_tokens_are_the_same_on_every_replica_and_the_caller_never_written(
        serve_instance, mlflow_registry, journal_root, app_name):
    tracking_uri, _ = mlflow_registry
    serve.run(build_app(tracking_uri, str(journal_root), num_replicas=2, caller_privacy="token"),
              name=app_name, route_prefix=f"/{app_name}")
    caller = "CANARY-CALLER-end-user-0d9e1b"
    import numpy as np

    rng = np.random.default_rng(11)
    bodies = [{"subject_id": f"user-{i % 5}", "features": random_features(rng)} for i in range(60)]
    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        answers = list(pool.map(
            lambda i: post(f"{serve_instance}/{app_name}", bodies[i],
                           caller=caller if i % 2 else "svc-batch"),
            range(60)))
    assert all(a.status_code == 200 for a in answers)
    table = wait_for_rows(journal_root, 60)
    assert table.num_rows == 60
    assert len(set(table["replica"].to_pylist())) == 2  # both replicas journaled
    callers = set(table["caller"].to_pylist())
    expected = caller_tokenizer(str(journal_root))
    assert callers == {expected(caller), expected("svc-batch")}
    assert all(c.startswith("ct-") for c in callers)
    for path in journal_root.parent.rglob("*"):
        if path.is_file():
            assert caller.encode() not in path.read_bytes(), f"raw caller in {path}"


def test_failing_inference_is_journaled_as_error_and_still_raises(serve_instance, mlflow_registry,
                                                                 journal_root, app_name):
    tracking_uri, _ = mlflow_registry
    serve.run(build_app(tracking_uri, str(journal_root)), name=app_name, route_prefix=f"/{app_name}")
    url = f"{serve_instance}/{app_name}"
    good = post(url, {"subject_id": "u1", "features": random_features(__import__("numpy").random.default_rng(1))},
                request_id="good-1")
    bad = post(url, {"subject_id": "u1", "features": {"amount": 3.0}}, request_id="bad-1")  # KeyError
    assert good.status_code == 200
    assert bad.status_code == 500
    rows = {r["request_id"]: r for r in wait_for_rows(journal_root, 2).to_pylist()}
    assert rows["good-1"]["outcome"] == "ok"
    assert rows["bad-1"]["outcome"] == "error"
    assert rows["bad-1"]["error_type"] == "KeyError"
    assert rows["bad-1"]["decision"] is None and rows["bad-1"]["score"] is None


@serve.deployment
class Scorer:
    """A handle-called deployment with a sync method and the common dict shape."""

    def __init__(self, weight: float) -> None:
        self.weight = weight

    def __call__(self, payload: dict) -> dict:
        score = min(1.0, self.weight * payload["features"]["amount"] / 100.0)
        return {"score": score, "decision": "block" if score >= 0.75 else "allow"}


@serve.deployment
class Ingress:
    def __init__(self, a, b) -> None:
        self.a, self.b = a, b

    async def __call__(self, request) -> dict:
        body = await request.json()
        ra, rb = await self.a.remote(body), await self.b.remote(body)
        return {"a": ra, "b": rb}


def test_composed_app_entries_share_the_top_level_request_id(serve_instance, mlflow_registry,
                                                            journal_root, app_name):
    tracking_uri, _ = mlflow_registry
    opts = dict(model=f"models:/{MODEL_NAME}@champion", tracking_uri=tracking_uri,
                journal_uri=str(journal_root), threshold=0.75)
    a = journaled(**opts)(Scorer.options(name="ScorerA")).bind(0.5)
    b = journaled(**opts)(Scorer.options(name="ScorerB")).bind(2.0)
    serve.run(Ingress.bind(a, b), name=app_name, route_prefix=f"/{app_name}")
    ids = [f"top-{i}-{uuid.uuid4().hex[:6]}" for i in range(10)]
    for i, rid in enumerate(ids):
        response = post(f"{serve_instance}/{app_name}",
                        {"subject_id": f"s{i}", "features": {"amount": 10.0 * i}}, request_id=rid)
        assert response.status_code == 200
        assert response.headers.get("x-request-id") == rid
    rows = wait_for_rows(journal_root, 20).to_pylist()
    assert len(rows) == 20
    by_deployment = {"ScorerA": set(), "ScorerB": set()}
    for row in rows:
        by_deployment[row["deployment"]].add(row["request_id"])
    assert by_deployment["ScorerA"] == by_deployment["ScorerB"] == set(ids)


def test_handle_calls_of_a_sync_method_are_journaled(serve_instance, mlflow_registry, journal_root,
                                                   app_name):
    tracking_uri, _ = mlflow_registry
    scorer = journaled(model=f"models:/{MODEL_NAME}@champion", tracking_uri=tracking_uri,
                       journal_uri=str(journal_root), threshold=0.75)(Scorer)
    handle = serve.run(scorer.bind(1.0), name=app_name, route_prefix=None)
    answers = [handle.remote({"subject_id": "h1", "features": {"amount": float(i)}}).result()
               for i in range(30)]
    rows = wait_for_rows(journal_root, 30).to_pylist()
    assert len(rows) == 30
    assert len({r["request_id"] for r in rows}) == 30
    assert sorted(r["score"] for r in rows) == sorted(a["score"] for a in answers)
    assert all(r["caller"] == "anonymous" for r in rows)


@serve.deployment(max_ongoing_requests=64)
class BatchedScorer:
    @serve.batch(max_batch_size=8, batch_wait_timeout_s=0.05)
    async def score_many(self, amounts: list[float]) -> list[float]:
        return [min(1.0, a / 100.0) for a in amounts]

    async def __call__(self, request) -> dict:
        body = await request.json()
        score = await self.score_many(body["features"]["amount"])
        return {"score": score}


def test_serve_batch_inside_still_gives_one_entry_per_request(serve_instance, mlflow_registry,
                                                             journal_root, app_name):
    tracking_uri, _ = mlflow_registry
    dep = journaled(model=f"models:/{MODEL_NAME}@champion", tracking_uri=tracking_uri,
                    journal_uri=str(journal_root), threshold=0.5)(BatchedScorer)
    serve.run(dep.bind(), name=app_name, route_prefix=f"/{app_name}")
    url = f"{serve_instance}/{app_name}"
    with concurrent.futures.ThreadPoolExecutor(16) as pool:
        responses = list(pool.map(lambda i: post(url, {"features": {"amount": float(i)}},
                                                 request_id=f"b-{i}"), range(48)))
    assert all(r.status_code == 200 for r in responses)
    rows = wait_for_rows(journal_root, 48).to_pylist()
    assert sorted(r["request_id"] for r in rows) == sorted(f"b-{i}" for i in range(48))
    for row in rows:
        i = int(row["request_id"].split("-")[1])
        assert row["decision"] == ("positive" if i / 100.0 >= 0.5 else "negative")


def test_replica_stopped_mid_traffic_loses_nothing_it_acknowledged(serve_instance, mlflow_registry,
                                                                  journal_root, app_name):
    tracking_uri, _ = mlflow_registry
    serve.run(build_app(tracking_uri, str(journal_root), num_replicas=2), name=app_name,
              route_prefix=f"/{app_name}")
    url = f"{serve_instance}/{app_name}"
    import numpy as np

    answered: list[str] = []
    stop = threading.Event()
    lock = threading.Lock()

    def client(seed: int) -> None:
        rng = np.random.default_rng(seed)
        session = requests.Session()
        n = 0
        while not stop.is_set():
            rid = f"c{seed}-{n}"
            n += 1
            try:
                r = session.post(url, json={"subject_id": f"u{n % 9}", "features": random_features(rng)},
                                 headers={"x-request-id": rid}, timeout=30)
            except requests.RequestException:
                continue
            if r.status_code == 200:
                with lock:
                    answered.append(rid)

    threads = [threading.Thread(target=client, args=(s,)) for s in range(4)]
    for t in threads:
        t.start()
    deadline = time.monotonic() + 60
    while len(answered) < 100 and time.monotonic() < deadline:
        time.sleep(0.05)
    # Scale down to one replica while traffic flows: Serve stops a replica gracefully.
    serve.run(build_app(tracking_uri, str(journal_root), num_replicas=1), name=app_name,
              route_prefix=f"/{app_name}")
    target = len(answered) + 100
    while len(answered) < target and time.monotonic() < deadline + 60:
        time.sleep(0.05)
    stop.set()
    for t in threads:
        t.join(timeout=60)

    rows = wait_for_rows(journal_root, len(answered)).to_pylist()
    journaled_ids = [r["request_id"] for r in rows]
    assert len(journaled_ids) == len(set(journaled_ids)), "an entry was written twice"
    missing = set(answered) - set(journaled_ids)
    assert not missing, f"{len(missing)} answered requests have no entry"
    reports = producer_reports(str(journal_root))
    assert len(reports) >= 2
    assert any(r["closed"] for r in reports.values()), "the stopped replica never reported closing"
    assert sum(sum(r["dropped"].values()) for r in reports.values()) == 0


def test_unknown_model_fails_replica_start_with_a_clear_message(serve_instance, mlflow_registry,
                                                              journal_root, app_name):
    tracking_uri, _ = mlflow_registry
    dep = journaled(model="models:/no-such-model@champion", tracking_uri=tracking_uri,
                    journal_uri=str(journal_root))(Scorer.options(name="Missing"))
    with pytest.raises(Exception) as excinfo:
        serve.run(dep.bind(1.0), name=app_name, route_prefix=None)
    message = str(excinfo.value)
    if "not found in the MLflow registry" not in message:
        status = serve.status().applications[app_name]
        message = status.message + " ".join(d.message for d in status.deployments.values())
    assert "models:/no-such-model@champion was not found in the MLflow registry" in message

