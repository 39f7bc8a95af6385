"""The end-to-end demo on embedded defaults: local Ray, sqlite MLflow, local Parquet journal.

Trains and registers the fraud model, serves it journaled, sends a few thousand HTTP requests
from synthetic users; halfway through it trains version 2, moves the ``champion`` alias and gives
the app a new ``user_config``, so the replicas reload the model (``serve_journal.load_model``) and
the entries switch versions exactly when the model does. Then it flushes, prints how many entries
each model version decided and what one user received today, and replays every entry (features
recomputed, HMAC checked, each version's exact artifact re-run). Everything it writes stays under
one folder.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import datetime as dt
import os
import socket
import threading
import time
import uuid
from pathlib import Path
from typing import Any

import numpy as np
import ray
import requests
from ray import serve

from serve_journal import JournalQuery, flush_journal, producer_reports, replay, subject_tokenizer
from serve_journal.examples.fraud import (
    FEATURES,
    build_app,
    random_features,
    train_and_register,
)
from serve_journal.read.query import format_table
from serve_journal.replay.featurestore import ParquetFeatureStore, record_features


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def send_traffic(url: str, n: int, users: list[str], *, seed: int = 1, concurrency: int = 8,
                 caller: str = "checkout-service", feature_store: Any = None) -> list[dict[str, Any]]:
    """POST ``n`` requests as the given synthetic users; returns what each request got.

    With a ``feature_store``, each request's features are recorded there first (with history),
    as a feature pipeline would, so replay can recompute them as of decision time. Each worker
    thread owns a subset of the users, so one user's requests never race each other.
    """
    rng = np.random.default_rng(seed)
    plan = [(users[int(rng.integers(0, len(users)))], random_features(rng)) for _ in range(n)]
    lanes: list[list[tuple[int, str, dict]]] = [[] for _ in range(concurrency)]
    for i, (user, features) in enumerate(plan):
        lanes[users.index(user) % concurrency].append((i, user, features))
    results: list[dict[str, Any] | None] = [None] * n
    store_lock = threading.Lock()

    def lane(items: list[tuple[int, str, dict]]) -> None:
        session = requests.Session()
        for i, user, features in items:
            if feature_store is not None:
                with store_lock:
                    record_features(feature_store, user, features)
            request_id = uuid.uuid4().hex
            response = session.post(url, json={"subject_id": user, "features": features},
                                    headers={"x-caller-id": caller, "x-request-id": request_id},
                                    timeout=60)
            results[i] = {"user": user, "request_id": request_id, "status": response.status_code,
                          "body": response.json() if response.ok else None}

    with concurrent.futures.ThreadPoolExecutor(concurrency) as pool:
        list(pool.map(lane, lanes))
    return [r for r in results if r is not None]


def run_demo(workdir: str = "./demo-output", requests_count: int = 3000, users: int = 25,
             num_cpus: int = 2) -> dict[str, Any]:
    """Run the demo; returns its figures (also printed)."""
    started = time.monotonic()
    root = Path(workdir).resolve()
    root.mkdir(parents=True, exist_ok=True)
    tracking_uri = f"sqlite:///{root / 'mlflow.db'}"
    journal_uri = str(root / "journal")
    os.environ["MLFLOW_TRACKING_URI"] = tracking_uri
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    print(f"demo folder: {root}")
    # Development mode for this process too: its readers (query, replay) check commit markers
    # and counters against the key generated beside the journal.
    os.environ["SERVE_JOURNAL_DEV_MODE"] = "1"
    print("development mode: the journal's keys (KEK, keyring, counters key, signing key) are "
          "generated beside it; in production provision them with `serve-journal init-keys` and "
          "give auditors the public key")

    version = train_and_register(root, tracking_uri)
    print(f"registered model fraud version {version} (alias champion) with its dataset manifest")

    ray.init(num_cpus=num_cpus, include_dashboard=False, log_to_driver=False,
             namespace="serve_journal_demo")
    try:
        port = _free_port()
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        serve.run(build_app(tracking_uri, journal_uri, dev_mode=True, user_config={"reload": 0}),
                  name="fraud", route_prefix="/fraud")
        user_ids = [f"user-{i:04d}" for i in range(users)]
        store = ParquetFeatureStore(root / "features")
        url = f"http://127.0.0.1:{port}/fraud"
        first = requests_count // 2
        t0 = time.monotonic()
        results = send_traffic(url, first, user_ids, feature_store=store)
        elapsed = time.monotonic() - t0
        # A new version is promoted: the alias moves, and a new user_config makes the replicas
        # reload it in place (reconfigure -> serve_journal.load_model). Until then they serve,
        # and their entries name, version 1; the journal never relabels behind their back.
        version2 = train_and_register(root, tracking_uri, seed=8)
        print(f"registered fraud version {version2} and moved the alias champion to it; "
              "reloading the replicas with a new user_config")
        serve.run(build_app(tracking_uri, journal_uri, dev_mode=True, user_config={"reload": 1}),
                  name="fraud", route_prefix="/fraud")
        t0 = time.monotonic()
        results += send_traffic(url, requests_count - first, user_ids, seed=2, feature_store=store)
        store.close()
        elapsed += time.monotonic() - t0
        ok = sum(1 for r in results if r["status"] == 200)
        print(f"sent {len(results)} requests from {users} users in {elapsed:.1f} s "
              f"({len(results) / elapsed:.0f} req/s), {ok} answered 200")
        if not flush_journal(journal_uri, timeout=60):
            print("warning: the journal did not confirm the flush within 60 s")
        reports = producer_reports(journal_uri)
        captured = sum(r["captured"] for r in reports.values())
        dropped = sum(sum(r["dropped"].values()) for r in reports.values())
        serve.delete("fraud")

        query = JournalQuery(journal_uri, tokenizer=subject_tokenizer(journal_uri), actor="demo")
        entries = query.find()
        journaled = entries.num_rows
        print(f"journal entries: {journaled} (captured {captured}, dropped {dropped})")
        by_version: dict[str, list] = {}
        for version, digest in zip(entries.column("model_version").to_pylist(),
                                   entries.column("model_digest").to_pylist(), strict=True):
            by_version.setdefault(version, [0, set()])
            by_version[version][0] += 1
            by_version[version][1].add(digest)
        print("entries by the model version that decided them, with its artifact digest:")
        for version in sorted(by_version, key=int):
            count, digests = by_version[version]
            print(f"  version {version}: {count} entries, {', '.join(sorted(map(str, digests)))}")
        subject = user_ids[0]
        today = dt.datetime.now(dt.UTC).replace(hour=0, minute=0, second=0, microsecond=0)
        table = query.find(subject=subject, since=today)
        print(f"\nWhat predictions did {subject} receive today? ({table.num_rows} entries)")
        print(format_table(table, columns=["ts", "request_id", "model_version", "score",
                                           "threshold", "decision", "outcome"], max_rows=20))
        report = replay(journal_uri, model="fraud", rescore=True, tracking_uri=tracking_uri,
                        feature_store=ParquetFeatureStore(root / "features"),
                        feature_names=FEATURES, decision_labels=("block", "allow"),
                        output=str(root / "replay-results.parquet"), progress=False)
        print("\nReplay: features recomputed as of each decision, HMAC checked, model re-run")
        print(report.format_summary())
        print(f"\nfinished in {time.monotonic() - started:.0f} s; files under {root}")
        return {"requests": len(results), "ok": ok, "journaled": journaled, "captured": captured,
                "dropped": dropped, "subject_rows": table.num_rows, "replay_ok": report.ok,
                "by_version": {v: c for v, (c, _) in by_version.items()}}
    finally:
        serve.shutdown()
        ray.shutdown()


def main(argv: list[str] | None = None) -> int:
    """``python -m serve_journal.examples.demo``: run the demo; exit 1 if an answered request has
    no journal entry."""
    parser = argparse.ArgumentParser(prog="python -m serve_journal.examples.demo",
                                     description=run_demo.__doc__)
    parser.add_argument("--workdir", default="./demo-output",
                        help="folder for everything the demo writes (default: %(default)s)")
    parser.add_argument("--requests", dest="requests_count", type=int, default=3000)
    parser.add_argument("--users", type=int, default=25)
    parser.add_argument("--num-cpus", type=int, default=2)
    args = parser.parse_args(argv)
    result = run_demo(args.workdir, args.requests_count, args.users, args.num_cpus)
    if result["journaled"] + result["dropped"] < result["ok"]:
        print("error: some answered requests have no journal entry")
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
