"""The production topology end to end, on one machine: ``bash scripts/cluster-demo.sh``.

What it does, in the order an operator would:

1. Starts the services (:class:`~serve_journal.examples.stack.LocalStack`): moto S3 with an Object
   Lock journal bucket and a separate witness bucket, the tansu Kafka broker, PostgreSQL for the
   subject-key vault, ``mlflow server`` over HTTP.
2. Provisions key material in files outside the journal (``serve-journal init-keys``): keyring and
   counters key (every node), manifest signing key (journal nodes only), the auditor's copy of the
   public key. The KEK is a secret in the environment only, as a secrets manager would provide it.
3. Trains and registers the fraud model on the MLflow server; starts a Ray cluster of a head and
   two worker nodes; deploys ``deployments/production.yaml`` (the fraud app on the Kafka transport
   and the Kafka sink app on S3) with ``serve deploy``.
4. Sends traffic; mid-traffic it drains one worker node (as the autoscaler does before
   terminating a node) and removes it: replicas and sinks reschedule to the other node.
5. Checks every answered request has exactly one entry, then runs compaction, lifecycle, verify,
   forget (one subject), a query for that subject and replay through ``ray job submit``.
6. Prints a summary (also ``summary.json``) and stops everything it started.
"""

from __future__ import annotations

import argparse
import collections
import concurrent.futures
import datetime as dt
import json
import os
import re
import secrets
import shlex
import shutil
import signal
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path
from typing import Any

import numpy as np
import requests

from serve_journal import JournalQuery
from serve_journal.examples.fraud import FEATURES, random_features, train_and_register
from serve_journal.examples.stack import LocalStack, free_port
from serve_journal.replay.featurestore import ParquetFeatureStore, record_features

TOPIC_PARTITIONS = 8
DEPLOYMENTS = Path(__file__).resolve().parents[2] / "deployments" / "production.yaml"
WORKER = {"num_cpus": 3, "resources": {"serving": 1, "journal": 2}}
MARKER = ".serve-journal-cluster-demo"
JOB_SUBMIT_ATTEMPTS = 6
DEPLOY_ATTEMPTS = 3
JOB_DEADLINE_S = 1800


class Demo:
    """One run of the cluster demo; see the module docstring."""

    def __init__(self, workdir: Path, requests_count: int, users: int, concurrency: int) -> None:
        self.workdir = workdir
        self.requests_count = requests_count
        self.users = [f"user-{i:04d}" for i in range(users)]
        self.concurrency = concurrency
        self.summary: dict[str, Any] = {"requests": requests_count}
        self.timings: dict[str, float] = {}
        self.stack = LocalStack(workdir)
        self.keys = workdir / "keys"
        self.auditor_key = workdir / "auditor" / "manifest-signing.pub.pem"
        self.features = ParquetFeatureStore(str(workdir / "features"))
        self._store_lock = threading.Lock()
        self.attempts: list[dict[str, Any]] = []

    # -- steps ---------------------------------------------------------------------------------

    def _step(self, name: str, started: float) -> None:
        self.timings[name] = round(time.monotonic() - started, 1)
        print(f"[cluster-demo] {name}: {self.timings[name]} s", flush=True)

    def services(self) -> None:
        t = time.monotonic()
        s3 = self.stack.start_s3()
        self.journal_uri = s3.uri(s3.journal_bucket, "prod")
        self.witness_uri = s3.uri(s3.witness_bucket, "prod")
        self.bootstrap = self.stack.start_kafka("serve-journal", TOPIC_PARTITIONS)
        self.vault_url = self.stack.start_postgres()
        self.tracking_uri = self.stack.start_mlflow()
        # What every node's environment holds (cluster.yaml: from the secrets manager). Set here
        # before Ray starts, so every node of the cluster and every job inherits it.
        os.environ.update(s3.env)
        os.environ.update({
            "SERVE_JOURNAL_KEK": secrets.token_hex(32),
            "SERVE_JOURNAL_VAULT_URL": self.vault_url,
            "SERVE_JOURNAL_PRIVACY_DIR": str(self.keys / "privacy"),
            "SERVE_JOURNAL_PUBLIC_KEY_FILE": str(self.auditor_key),
            "SERVE_JOURNAL_DEV_MODE": "0",
            "MLFLOW_TRACKING_URI": self.tracking_uri,
            "RAY_USAGE_STATS_ENABLED": "0",
            "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
        })
        self._step("services (S3, Kafka, PostgreSQL, MLflow server)", t)

    def key_material(self) -> None:
        t = time.monotonic()
        signing = self.keys / "signing" / "manifest-signing.pem"
        signing.parent.mkdir(parents=True, exist_ok=True)
        out = self._cli("init-keys", "--journal", self.journal_uri,
                        "--privacy-dir", str(self.keys / "privacy"),
                        "--signing-key-file", str(signing))
        self.auditor_key.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(f"{signing}.pub.pem", self.auditor_key)  # the auditor's own copy
        self.summary["key_fingerprint"] = out.strip().rsplit(" ", 1)[-1]
        self._step("key material (init-keys)", t)

    def model(self) -> None:
        t = time.monotonic()
        self.summary["model_version"] = train_and_register(self.workdir, self.tracking_uri)
        self._step("model trained and registered on the MLflow server", t)

    def cluster(self) -> None:
        t = time.monotonic()
        self.stack.start_ray(head_cpus=0, workers=[dict(WORKER), dict(WORKER)])
        self._step("Ray cluster: head + 2 worker nodes", t)

    def deploy(self) -> None:
        t = time.monotonic()
        from ray import serve  # inside: seconds to import

        self.http_port = free_port()
        values = {
            "PROXY_LOCATION": "HeadOnly",  # every node shares this host's ports
            "HTTP_PORT": str(self.http_port), "JOURNAL_URI": self.journal_uri,
            "WITNESS_URI": self.witness_uri, "KAFKA_BOOTSTRAP": self.bootstrap,
            "MLFLOW_TRACKING_URI": self.tracking_uri, "KEYS_DIR": str(self.keys),
            "SPOOL_DIR": str(self.workdir / "spool"),
            "KAFKA_IDEMPOTENCE": "false",  # tansu has no idempotent producer (InitProducerId)
        }
        rendered = self.workdir / "serve.yaml"
        rendered.write_text(render(DEPLOYMENTS.read_text(), values))
        for attempt in range(DEPLOY_ATTEMPTS):
            # `serve deploy` is declarative, so submitting it again is safe. On a loaded host
            # Serve's controller may kill a proxy that was slow to start, and the dashboard then
            # answers 500 (ActorDiedError) while the controller starts a new one.
            last = attempt == DEPLOY_ATTEMPTS - 1
            argv = ["serve", "deploy", str(rendered), "-a", self.stack.dashboard_url]
            out = self._run(argv, "serve-deploy", check=last)
            if out is not None:
                break
            print(f"[cluster-demo] serve deploy failed (attempt {attempt + 1}); submitting again",
                  flush=True)
            time.sleep(5.0 * (attempt + 1))  # backoff: let the controller settle its proxies
        deadline = time.monotonic() + 300
        while True:
            apps = serve.status().applications
            states = {name: str(app.status) for name, app in apps.items()}
            if len(apps) == 2 and all(s.endswith("RUNNING") for s in states.values()):
                break
            if any(s.endswith("DEPLOY_FAILED") for s in states.values()) or time.monotonic() > deadline:
                raise RuntimeError(f"serve deploy did not reach RUNNING: {states}")
            time.sleep(0.5)  # polling interval of a deadline loop
        self.url = f"http://127.0.0.1:{self.http_port}/fraud"
        self._step("serve deploy deployments/production.yaml", t)

    def traffic(self) -> None:
        """Requests from synthetic users; a worker node is drained and removed mid-traffic."""
        t = time.monotonic()
        rng = np.random.default_rng(11)
        plan = [(self.users[int(rng.integers(0, len(self.users)))], random_features(rng))
                for _ in range(self.requests_count)]
        first = int(len(plan) * 0.4)
        self._send(plan[:first])
        mover = threading.Thread(target=self._remove_worker, name="remove-worker")
        mover.start()
        self._send(plan[first:])
        mover.join()
        answered = [a for a in self.attempts if a["status"] == 200]
        self.summary.update(
            answered=len({a["request_id"] for a in answered}),
            attempts=len(self.attempts),
            not_answered=collections.Counter(str(a["status"]) for a in self.attempts
                                             if a["status"] != 200),
        )
        self._step("traffic (a worker node removed mid-traffic)", t)

    def _send(self, plan: list[tuple[str, dict]]) -> None:
        lanes: list[list[tuple[str, dict]]] = [[] for _ in range(self.concurrency)]
        for user, features in plan:  # one lane per user: a user's requests never race
            lanes[self.users.index(user) % self.concurrency].append((user, features))
        with concurrent.futures.ThreadPoolExecutor(self.concurrency) as pool:
            for done in pool.map(self._lane, lanes):
                self.attempts.extend(done)

    def _lane(self, items: list[tuple[str, dict]]) -> list[dict[str, Any]]:
        session = requests.Session()
        out = []
        for user, features in items:
            with self._store_lock:
                record_features(self.features, user, features)
            for attempt in range(30):  # a client retries a refused or failed request
                request_id = uuid.uuid4().hex  # each attempt is its own request
                try:
                    response = session.post(self.url, json={"subject_id": user, "features": features},
                                            headers={"x-request-id": request_id,
                                                     "x-caller-id": "checkout-service"},
                                            timeout=60)
                    status = response.status_code
                except requests.RequestException as exc:
                    status = type(exc).__name__
                out.append({"request_id": request_id, "status": status})
                if status == 200:
                    break
                time.sleep(min(0.05 * 2 ** attempt, 1.0))  # backoff between a client's retries
        return out

    def _remove_worker(self) -> None:
        """Drain the worker node hosting the most Serve replicas, wait until Serve moved them,
        then remove the node (its processes are killed)."""
        import ray  # inside: seconds to import
        from ray.util.state import list_actors  # inside: as above

        time.sleep(1.0)  # mid-traffic, not before it
        started = time.monotonic()
        alive = {n["NodeID"]: n for n in ray.nodes() if n["Alive"]}
        replicas = collections.Counter(
            a.node_id for a in list_actors(address=self.stack.dashboard_url,
                                           filters=[("state", "=", "ALIVE")], limit=1000)
            if "ServeReplica" in (a.class_name or ""))
        workers = {node.node_id: node for node in self.stack.worker_nodes()}
        victim_id = max(workers, key=lambda nid: replicas.get(nid, 0))
        victim = workers[victim_id]
        self.summary["removed_node"] = {"replicas_before": replicas.get(victim_id, 0),
                                        "nodes_before": len(alive)}
        self._run(["ray", "drain-node", "--address", self.stack.ray_address, "--node-id", victim_id,
                   "--reason", "DRAIN_NODE_REASON_PREEMPTION", "--reason-message", "cluster demo",
                   "--deadline-remaining-seconds", "60"], "drain-node")
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            # The dashboard's own address: without it the state API picks "the latest" local
            # Ray instance, which is another cluster when one runs beside this one (tests).
            left = [a for a in list_actors(address=self.stack.dashboard_url,
                                           filters=[("state", "=", "ALIVE")], limit=1000)
                    if a.node_id == victim_id and "ServeReplica" in (a.class_name or "")]
            if not left:
                break
            time.sleep(0.5)  # polling interval of a deadline loop
        self.stack.cluster.remove_node(victim)
        self.summary["removed_node"]["seconds"] = round(time.monotonic() - started, 1)
        print(f"[cluster-demo] worker node removed after {self.summary['removed_node']['seconds']} s"
              " (drained first)", flush=True)

    def settle(self) -> None:
        """Stop serving (replicas flush to Kafka), let the sinks catch up, then stop them."""
        t = time.monotonic()
        from ray import serve  # inside: seconds to import

        serve.delete("fraud")
        answered = {a["request_id"] for a in self.attempts if a["status"] == 200}
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline:
            ids = self._journal_ids()
            if answered <= set(ids):
                break
            time.sleep(2.0)  # polling interval of a deadline loop (each query is access-logged)
        serve.delete("journal-sink")  # each sink commits its last file and checkpoints
        self.features.close()
        ids = self._journal_ids()
        counts = collections.Counter(ids)
        self.summary.update(
            entries=len(ids),
            lost=len(answered - set(counts)),
            duplicated=sum(1 for rid in answered if counts.get(rid, 0) > 1),
        )
        self._step("replicas and sinks stopped; entries counted", t)

    def _journal_ids(self) -> list[str]:
        with JournalQuery(self.journal_uri, actor="cluster-demo") as query:
            table = query.find(tier="all")
        return table.column("request_id").to_pylist()

    def maintenance(self) -> None:
        """Compaction, lifecycle, verify, forget, a query and replay, each as a Ray job."""
        t = time.monotonic()
        writer = ["--journal", self.journal_uri, "--witness", self.witness_uri,
                  "--signing-key-file", str(self.keys / "signing" / "manifest-signing.pem")]
        tomorrow = (dt.datetime.now(dt.UTC) + dt.timedelta(days=1)).strftime("%Y-%m-%dT%H:%M:%S")
        self.summary["compact"] = self._job("compact", "compact", "--apply", "--as-of", tomorrow,
                                            *writer)
        self.summary["lifecycle"] = self._job(
            "lifecycle", "lifecycle", "run", "--apply", "--hot-days", "0", "--as-of", tomorrow,
            "--retention", '{"cold": {"days": 1, "mode": "COMPLIANCE"}}', *writer)
        verify = self._job("verify", "verify", "--journal", self.journal_uri,
                           "--public-key", str(self.auditor_key), "--witness", self.witness_uri,
                           "--heads", str(self.workdir / "auditor" / "verify-heads.json"),
                           "--json", check=False)
        self.summary["verify_ok"] = verify["rc"] == 0
        # Replay before forget: afterwards the forgotten subject's entries replay as "shredded".
        self.summary["replay"] = self._job(
            "replay", "replay", "--model", "fraud", "--journal", self.journal_uri, "--rescore",
            "--features", str(self.workdir / "features"), "--decision-labels", "block,allow",
            "--feature-names", ",".join(FEATURES),
            "--tier", "all", "--output", str(self.workdir / "replay.parquet"), check=False)
        subject = self.users[0]
        subject_file = self.workdir / "erasure-request.txt"  # never on a command line
        subject_file.write_text(subject + "\n")
        subject_file.chmod(0o600)
        before = self._query_subject(subject_file)
        self.summary["forget"] = self._job(
            "forget", "forget", "--journal", self.journal_uri, "--subject", "-",
            stdin=subject_file)
        after = self._query_subject(subject_file)
        self.summary["forgotten_subject"] = {"entries_before": before, "found_after": after}
        self._step("compaction, lifecycle, verify, replay, forget, query as Ray jobs", t)

    def _query_subject(self, subject_file: Path) -> int:
        job = self._job("query", "query", "--journal", self.journal_uri, "--subject", "-",
                        "--tier", "all", "--json", stdin=subject_file, quiet=True)
        rows = [line for line in job["output"].splitlines() if line.startswith("[")]
        if not rows:
            raise RuntimeError(f"query printed no JSON result; see {self.stack.logs}/job-query.log")
        return len(json.loads(rows[-1]))

    # -- helpers -------------------------------------------------------------------------------

    def _cli(self, *args: str) -> str:
        return self._run([sys.executable, "-m", "serve_journal.cli", *args], args[0])

    def _run(self, argv: list[str], name: str, check: bool = True) -> str | None:
        """``argv``'s output; a failure raises with ``check``, else gives None."""
        proc = subprocess.run(argv, capture_output=True, text=True, timeout=900)
        with open(self.stack.logs / f"{name}.log", "a") as handle:
            handle.write(proc.stdout + proc.stderr)
        if proc.returncode != 0:
            if check:
                raise RuntimeError(
                    f"{name} failed ({proc.returncode}); see {self.stack.logs}/{name}.log")
            return None
        return proc.stdout

    def _job(self, name: str, *args: str, stdin: Path | None = None, check: bool = True,
             quiet: bool = False) -> dict[str, Any]:
        """``ray job submit -- serve-journal ARGS`` on the cluster; its output and exit code."""
        entry = " ".join(_quote(a) for a in ("serve-journal", *args))
        if stdin is not None:
            entry += f" < {_quote(str(stdin))}"
        started = time.monotonic()
        for attempt in range(JOB_SUBMIT_ATTEMPTS):
            submission_id = f"{name}-{uuid.uuid4().hex[:8]}"  # a fresh one for each attempt
            proc = subprocess.run(["ray", "job", "submit", "--address", self.stack.dashboard_url,
                                   "--submission-id", submission_id, "--", "sh", "-c", entry],
                                  capture_output=True, text=True, timeout=1800)
            # Ray's own transient answer while the head's job agent (re)registers, e.g. just
            # after a node left: "No available agent to submit job, please try again later".
            if "No available agent" not in proc.stdout + proc.stderr:
                break
            time.sleep(min(2.0 * 2 ** attempt, 15.0))  # backoff between submission attempts
        log = self.stack.logs / f"job-{name}.log"
        with open(log, "a") as handle:
            handle.write(proc.stdout + proc.stderr)
        # The job's own record is the answer, not the submit command's log tail: that tail is a
        # websocket, and when it breaks on a loaded host the command fails for a job that ran.
        rc, output = self._job_result(submission_id, proc)
        if not quiet:
            print(f"[cluster-demo] job {name}: exit {rc} in {time.monotonic() - started:.1f} s",
                  flush=True)
        if rc != 0:  # what the job said, so a failure can be read where it is reported
            tail = "\n".join(output.splitlines()[-40:])
            print(f"[cluster-demo] job {name} failed; the last lines of its output:\n{tail}",
                  flush=True)
            if check:
                raise RuntimeError(f"job {name} failed ({rc}); see {log}")
        return {"rc": rc, "output": output, "seconds": round(time.monotonic() - started, 1)}

    def _job_result(self, submission_id: str,
                    proc: subprocess.CompletedProcess) -> tuple[int, str]:
        """The job's exit (0 when it succeeded) and its entrypoint's output, from the Jobs API;
        waits while the job still runs. A job never accepted gives the submit command's output."""
        from ray.job_submission import JobStatus, JobSubmissionClient  # inside: seconds

        client = JobSubmissionClient(self.stack.dashboard_url)
        try:
            client.get_job_info(submission_id)
        except RuntimeError:  # the dashboard has no such job: it was never submitted
            return proc.returncode or 1, proc.stdout + proc.stderr
        deadline = time.monotonic() + JOB_DEADLINE_S
        while not (status := client.get_job_status(submission_id)).is_terminal():
            if time.monotonic() > deadline:
                client.stop_job(submission_id)
                return 1, f"job {submission_id} still {status} after {JOB_DEADLINE_S} s; stopped"
            time.sleep(1.0)  # polling interval of a deadline loop
        output = client.get_job_logs(submission_id)
        if status == JobStatus.SUCCEEDED:
            return 0, output
        message = client.get_job_info(submission_id).message or ""
        return 1, f"{output}\njob {submission_id} {status}: {message}"

    def run(self) -> dict[str, Any]:
        started = time.monotonic()
        try:
            self.services()
            self.key_material()
            self.model()
            self.cluster()
            self.deploy()
            self.traffic()
            self.settle()
            self.maintenance()
        finally:
            self.stack.close()
        self.summary["seconds"] = round(time.monotonic() - started, 1)
        self.summary["timings"] = self.timings
        return self.summary


def render(template: str, values: dict[str, str]) -> str:
    """``template`` with each ``${NAME}`` replaced as ``envsubst`` would; an unknown name fails."""
    def value(match: re.Match) -> str:
        if match.group(1) not in values:
            raise KeyError(f"deployments template names ${{{match.group(1)}}}, which has no value")
        return values[match.group(1)]

    return re.sub(r"\$\{([A-Z][A-Z0-9_]*)\}", value, template)


def _quote(arg: str) -> str:
    return shlex.quote(arg)


def summarize(summary: dict[str, Any]) -> str:
    """The lines the demo ends with."""
    replay_lines = [ln.strip() for ln in summary.get("replay", {}).get("output", "").splitlines()
                    if " entries from " in ln]
    forgotten = summary.get("forgotten_subject", {})
    lines = [
        f"requests {summary['requests']}, answered {summary.get('answered')}, "
        f"client attempts {summary.get('attempts')} (not answered: "
        f"{dict(summary.get('not_answered', {})) or 'none'})",
        f"entries {summary.get('entries')}, lost {summary.get('lost')}, "
        f"duplicated {summary.get('duplicated')}",
        f"worker node removed mid-traffic: {summary.get('removed_node')}",
        f"verify {'OK' if summary.get('verify_ok') else 'FAILED'}",
        f"forgotten subject: {forgotten.get('entries_before')} entries before, "
        f"{forgotten.get('found_after')} found after forget "
        f"({'unfindable' if forgotten.get('found_after') == 0 else 'STILL FINDABLE'})",
        f"replay: {'verified' if summary.get('replay', {}).get('rc') == 0 else 'NOT verified'}"
        + (f" ({replay_lines[-1]})" if replay_lines else ""),
        f"total {summary.get('seconds')} s",
    ]
    return "\n".join(lines)


def _exit_on_signal(signum: int, _frame: Any) -> None:
    raise SystemExit(128 + signum)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", default="./cluster-demo-output")
    parser.add_argument("--requests", type=int, default=600)
    parser.add_argument("--users", type=int, default=25)
    parser.add_argument("--concurrency", type=int, default=8)
    args = parser.parse_args(argv)
    # SIGTERM/SIGHUP unwind like Ctrl-C, so that everything started is stopped (finally blocks).
    for sig in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, _exit_on_signal)
    workdir = Path(args.workdir).resolve()
    if workdir.exists():
        if not (workdir / MARKER).exists():
            parser.error(f"{workdir} exists and is not a cluster-demo folder; pick another")
        shutil.rmtree(workdir)
    workdir.mkdir(parents=True)
    (workdir / MARKER).touch()
    summary = Demo(workdir, args.requests, args.users, args.concurrency).run()
    (workdir / "summary.json").write_text(json.dumps(summary, indent=1, default=str))
    print(summarize(summary), flush=True)
    ok = (summary.get("lost") == 0 and summary.get("duplicated") == 0 and summary.get("verify_ok")
          and summary.get("forgotten_subject", {}).get("found_after") == 0
          and summary.get("replay", {}).get("rc") == 0)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
