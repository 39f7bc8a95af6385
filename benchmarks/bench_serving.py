"""Serving overhead: the same Serve app with and without an audit trail, A/B alternated.

One real Serve app (the fraud logistic regression from the MLflow registry, callable over HTTP
and through a ``DeploymentHandle``) is deployed once per variant, all side by side, one replica
each. A load generator in a separate process (``python -m benchmarks.bench_serving --loadgen``,
asyncio + aiohttp for HTTP, a Ray driver with ``serve.get_app_handle`` for handles) sends a fixed
number of requests at a fixed concurrency, one variant at a time, in a new shuffled order every
round. Variants: no journal; serve_journal (actor path); serve_journal (Kafka path, tansu broker on
loopback, Kafka sink actors writing Parquet); JSON line per request with flush + fsync; stdlib
logging ``QueueHandler`` JSON; MLflow tracing into a local sqlite store.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import random
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks._common import fraud_registry, free_port, percentiles_ms, ship_by_value, wait_until

SIZES = {
    "tiny": {"rounds": 1, "requests": 60, "concurrency": 4, "warmup": 10,
             "variants": ("no_journal", "serve_journal_actors", "json_fsync")},
    "quick": {"rounds": 3, "requests": 500, "concurrency": 8, "warmup": 50, "variants": None},
    "full": {"rounds": 6, "requests": 4000, "concurrency": 16, "warmup": 200, "variants": None},
}
ALL_VARIANTS = ("no_journal", "serve_journal_actors", "serve_journal_kafka", "json_fsync",
                "queue_handler", "mlflow_tracing")
BASE = "no_journal"
TARGET_RATIO = 0.97
TARGET_ADDED_P99_MS = 0.3
NAMESPACE = "serve_journal_bench"

# -- load generator (separate process) --------------------------------------------------------


def _bodies(n: int, seed: int) -> list[dict]:
    from serve_journal.examples.fraud import random_features

    rng = np.random.default_rng(seed)
    return [{"subject_id": f"user-{int(rng.integers(0, 50_000)):06d}", "features": random_features(rng)}
            for _ in range(n)]


async def _drive(call, n: int, concurrency: int, bodies: list[dict]) -> dict[str, Any]:
    latencies: list[float] = []
    errors = 0
    counter = iter(range(n))

    async def worker() -> None:
        nonlocal errors
        for i in counter:
            t0 = time.perf_counter()
            try:
                await call(bodies[i % len(bodies)])
            except Exception:  # noqa: BLE001 - counted; the load goes on
                errors += 1
                continue
            latencies.append(time.perf_counter() - t0)

    start = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    wall = time.perf_counter() - start
    return {"latencies": latencies, "wall_s": wall, "errors": errors}


async def _loadgen_main(address: str) -> None:
    import aiohttp

    bodies = _bodies(2048, 5)
    session = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=256))
    handles: dict[str, Any] = {}
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader()
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
    try:
        while True:
            line = await reader.readline()
            if not line:
                return
            cmd = json.loads(line)
            if cmd["op"] == "quit":
                return
            if cmd["mode"] == "http":
                url = cmd["url"]

                async def call(body, url=url):
                    async with session.post(url, json=body, headers={"x-caller-id": "svc-bench"}) as resp:
                        resp.raise_for_status()
                        await resp.read()
            else:
                import ray
                from ray import serve

                if not ray.is_initialized():
                    ray.init(address=address, namespace=NAMESPACE, log_to_driver=False)
                if cmd["app"] not in handles:
                    handles[cmd["app"]] = serve.get_app_handle(cmd["app"])
                handle = handles[cmd["app"]]

                async def call(body, handle=handle):
                    await handle.remote(body)

            out = await _drive(call, cmd["n"], cmd["concurrency"], bodies)
            sys.stdout.write(json.dumps(out) + "\n")
            sys.stdout.flush()
    finally:
        await session.close()


class LoadGenerator:
    """The load generator subprocess; stopped by its own pid."""

    def __init__(self, address: str, log_dir: Path) -> None:
        env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(Path(__file__).resolve().parent.parent),
                                                           os.environ.get("PYTHONPATH", "")])}
        self._log = open(log_dir / "loadgen.log", "ab")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen([sys.executable, "-m", "benchmarks.bench_serving", "--loadgen",
                                      "--address", address], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     stderr=self._log, env=env, text=True, start_new_session=True)

    def run(self, **cmd: Any) -> dict[str, Any]:
        assert self.proc.stdin is not None and self.proc.stdout is not None
        self.proc.stdin.write(json.dumps({"op": "run", **cmd}) + "\n")
        self.proc.stdin.flush()
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError(f"load generator exited ({self.proc.poll()}); see loadgen.log")
        return json.loads(line)

    def stop(self) -> None:
        with contextlib.suppress(Exception):
            self.proc.stdin.write(json.dumps({"op": "quit"}) + "\n")
            self.proc.stdin.flush()
        try:
            self.proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            self.proc.kill()  # our own child, by its pid
            self.proc.wait(timeout=10)
        self._log.close()


# -- the variants -----------------------------------------------------------------------------


def _deployment(cls: type):
    from ray import serve

    return serve.deployment(cls, num_replicas=1, max_ongoing_requests=64,
                            ray_actor_options={"num_cpus": 0})


def _build_variants(names, tracking_uri: str, root: Path, stack: contextlib.ExitStack,
                    notes: list[str]) -> dict[str, Any]:
    from benchmarks import baselines
    from serve_journal import journaled

    journal_options = dict(model="models:/fraud@champion", threshold=0.75, tracking_uri=tracking_uri,
                           writer_namespace=NAMESPACE)
    apps: dict[str, Any] = {}
    for name in names:
        if name == "no_journal":
            apps[name] = _deployment(baselines.BenchFraud).bind(tracking_uri)
        elif name == "serve_journal_actors":
            journal = root / "journal-actors"
            dep = journaled(journal_uri=str(journal), transport="actors", **journal_options)(
                _deployment(baselines.BenchFraud))
            apps[name] = dep.bind(tracking_uri)
            stack.callback(_stop_pool, journal)
        elif name == "serve_journal_kafka":
            kafka = _kafka_variant(tracking_uri, root, stack, notes, journal_options)
            if kafka is not None:
                apps[name] = kafka
        elif name == "json_fsync":
            apps[name] = _deployment(baselines.JsonFsyncFraud).bind(str(root / "audit.jsonl"), tracking_uri)
        elif name == "queue_handler":
            apps[name] = _deployment(baselines.QueueLogFraud).bind(str(root / "audit-queue.log"), tracking_uri)
        elif name == "mlflow_tracing":
            apps[name] = _deployment(baselines.MlflowTracedFraud).bind(
                f"sqlite:///{root / 'traces.db'}", tracking_uri)
        else:
            raise ValueError(f"variant must be one of {ALL_VARIANTS}, got {name!r}")
    return apps


def _stop_pool(journal: Path) -> None:
    from serve_journal.api import shutdown_journal

    with contextlib.suppress(Exception):
        shutdown_journal(str(journal), namespace=NAMESPACE, timeout=10)


def _kafka_variant(tracking_uri, root, stack, notes, journal_options):
    try:
        import serve_journal.sink.kafka  # noqa: F401
        import serve_journal.transport.kafka  # noqa: F401
        from benchmarks._common import tansu_broker
        from benchmarks.baselines import BenchFraud
        from benchmarks.bench_pipeline import _Path
    except ImportError as exc:
        notes.append(f"serve_journal_kafka skipped: {exc}")
        return None
    from serve_journal import journaled

    topic = f"journal-{uuid.uuid4().hex[:6]}"
    try:
        bootstrap = stack.enter_context(tansu_broker(root, topic, 4))
    except Exception as exc:  # noqa: BLE001 - reported
        notes.append(f"serve_journal_kafka skipped: broker failed to start ({type(exc).__name__}: {exc})")
        return None
    journal = root / "journal-kafka"
    path = _Path("kafka", tracking_uri, root, bootstrap, topic, 4)
    path.start_sinks(journal)
    stack.callback(path.stop_sinks)
    kafka = {"bootstrap_servers": bootstrap, "topic": topic, "enable_idempotence": False, "num_partitions": 4,
             "spool_dir": str(root / "spool-serving")}
    dep = journaled(journal_uri=str(journal), transport="kafka", extra={"kafka": kafka}, **journal_options)(
        _deployment(BenchFraud))
    return dep.bind(tracking_uri)


def _deploy(apps: dict[str, Any], timeout: float = 300.0) -> dict[str, str]:
    from ray import serve

    names = {}
    for variant, app in apps.items():
        name = f"sjb-{variant.replace('_', '-')}-{uuid.uuid4().hex[:4]}"
        serve._run(app, _blocking=False, name=name, route_prefix=f"/{name}")
        names[variant] = name

    def running() -> bool:
        status = serve.status().applications
        states = [str(getattr(status.get(n), "status", "")) for n in names.values()]
        if any("FAILED" in s for s in states):
            raise RuntimeError(f"a benchmark app failed to deploy: {dict(zip(names, states, strict=True))}")
        return all(s.endswith("RUNNING") for s in states)

    if not wait_until(running, timeout, interval=0.5):
        raise RuntimeError(f"benchmark apps not running within {timeout}s")
    return names


def _summarise(results: dict[tuple[str, str], list[dict]], variants: list[str]) -> list[dict[str, Any]]:
    rows = []
    for path in ("http", "handle"):
        base = results.get((BASE, path))
        base_lat = np.concatenate([r["latencies"] for r in base]) if base else None
        base_tput = (sum(len(r["latencies"]) for r in base) / sum(r["wall_s"] for r in base)) if base else None
        for variant in variants:
            runs = results.get((variant, path))
            if not runs:
                continue
            lat = np.concatenate([r["latencies"] for r in runs])
            tput = len(lat) / sum(r["wall_s"] for r in runs)
            row = {"variant": variant, "path": path, "rounds": len(runs), "throughput_rps": tput,
                   "errors": sum(r["errors"] for r in runs), **percentiles_ms(lat)}
            per_round = [len(r["latencies"]) / r["wall_s"] for r in runs]
            row["throughput_min_rps"], row["throughput_max_rps"] = min(per_round), max(per_round)
            if base_tput:
                bp = percentiles_ms(base_lat)
                row["throughput_ratio"] = tput / base_tput
                row["added_p50_ms"] = row["p50_ms"] - bp["p50_ms"]
                row["added_p99_ms"] = row["p99_ms"] - bp["p99_ms"]
            rows.append(row)
    return rows


def run(size: str = "quick", workdir: str | os.PathLike[str] | None = None,
        tracking_uri: str | None = None, http_url: str | None = None,
        variants: tuple[str, ...] | None = None) -> dict[str, Any]:
    """Run the serving benchmark on the Ray already initialised in this process.

    ``http_url`` is the base URL of a Serve already started with HTTP; without it Serve is
    started here on a free loopback port (and shut down at the end).
    """
    import ray
    from ray import serve

    if not ray.is_initialized():
        raise RuntimeError("bench_serving.run needs ray.init() first (benchmarks.run does it)")
    ship_by_value()
    params = dict(SIZES[size])
    names = list(variants or params["variants"] or ALL_VARIANTS)
    notes: list[str] = []
    started_serve = False
    if http_url is None:
        port = free_port()
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        http_url = f"http://127.0.0.1:{port}"
        started_serve = True
    results: dict[tuple[str, str], list[dict]] = {}
    with tempfile.TemporaryDirectory(prefix="sj-bench-serving-", dir=workdir) as tmp, \
            contextlib.ExitStack() as stack:
        root = Path(tmp)
        tracking_uri = tracking_uri or fraud_registry(root / "mlflow")
        apps = _build_variants(names, tracking_uri, root, stack, notes)
        deployed = _deploy(apps)
        for app_name in deployed.values():
            stack.callback(lambda n=app_name: serve.delete(n))
        gen = LoadGenerator(ray.get_runtime_context().gcs_address, root)
        stack.callback(gen.stop)
        order = list(deployed)
        for variant in order:  # warm every variant and path once (connections, handles, JIT caches)
            for mode in ("http", "handle"):
                gen.run(mode=mode, url=f"{http_url}/{deployed[variant]}", app=deployed[variant],
                        n=params["warmup"], concurrency=params["concurrency"])
        rng = random.Random(1234)
        for _ in range(params["rounds"]):
            rng.shuffle(order)
            for variant in order:
                for mode in ("http", "handle"):
                    out = gen.run(mode=mode, url=f"{http_url}/{deployed[variant]}", app=deployed[variant],
                                  n=params["requests"], concurrency=params["concurrency"])
                    results.setdefault((variant, mode), []).append(out)
        if "serve_journal_actors" in deployed:
            from serve_journal.api import flush_journal

            ok = flush_journal(str(root / "journal-actors"), timeout=60, namespace=NAMESPACE)
            from benchmarks._common import parquet_rows

            notes.append(f"actor path: journal flushed={ok}, {parquet_rows(root / 'journal-actors' / 'hot'):,} "
                         f"entries on disk")
    if started_serve:
        with contextlib.suppress(Exception):
            serve.shutdown()
    missing = [v for v in names if v not in {k[0] for k in results}]
    for v in missing:
        if not any(v in n for n in notes):
            notes.append(f"{v}: not measured")
    return {"rows": _summarise(results, [v for v in ALL_VARIANTS if v in names]), "notes": notes,
            "params": {"size": size, **{k: v for k, v in params.items() if k != "variants"},
                       "variants": names}}


def _main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--loadgen", action="store_true")
    parser.add_argument("--address")
    parser.add_argument("--size", default="tiny")
    args = parser.parse_args()
    if args.loadgen:
        asyncio.run(_loadgen_main(args.address))
        return
    from benchmarks._common import json_dump, ray_session

    with ray_session():
        print(json_dump(run(args.size)))


if __name__ == "__main__":
    _main()
