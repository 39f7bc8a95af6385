"""Serving overhead: the same Serve app with and without an audit trail, measured so the
answer is not noise.

One real Serve app (the fraud logistic regression from the MLflow registry) is deployed once per
variant, all side by side, one replica each. An external load generator - ``clients`` separate
processes (``python -m benchmarks.bench_serving --loadgen``), each an aiohttp client with
keep-alive connections running a closed loop at ``concurrency`` requests in flight over HTTP
through Serve's proxy - drives one variant at a time for a short round of fixed duration; all
client processes start a round at the same monotonic instant and each request completed inside
the round counts. Rounds interleave the variants, in order in even rounds and reversed in odd
ones (ABAB / BABA), with a short pause between rounds so one variant's background work (the
journal's flusher and writers) settles before the next is measured.

The answer is the ratio of throughputs journaled / plain, **per round** (each round's variant
against the plain run of the same round, measured seconds apart), summarised as the mean of
those paired ratios with a 95% Student-t confidence interval over rounds (and the range). Variants:
no journal; serve_journal (actor path); serve_journal (Kafka path, tansu broker on loopback, Kafka
sink actors writing Parquet); JSON line per request with flush + fsync; stdlib logging
``QueueHandler`` JSON; MLflow tracing into a local sqlite store.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import math
import os
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
    "tiny": {"rounds": 2, "seconds": 1.0, "clients": 1, "concurrency": 4, "warmup_s": 1.0, "pause_s": 0.2,
             "variants": ("no_journal", "serve_journal_actors", "json_fsync")},
    "quick": {"rounds": 10, "seconds": 1.5, "clients": 2, "concurrency": 12, "warmup_s": 2.0, "pause_s": 0.5,
              "variants": ("no_journal", "serve_journal_actors", "queue_handler")},
    "full": {"rounds": 20, "seconds": 5.0, "clients": 2, "concurrency": 16, "warmup_s": 5.0, "pause_s": 1.0,
             "variants": None},
}
ALL_VARIANTS = ("no_journal", "serve_journal_actors", "serve_journal_kafka", "json_fsync",
                "queue_handler", "mlflow_tracing")
BASE = "no_journal"
TARGET_RATIO = 0.97
NAMESPACE = "serve_journal_bench"

# -- load generator (separate processes) ------------------------------------------------------


def _bodies(n: int, seed: int) -> list[dict]:
    from serve_journal.examples.fraud import random_features

    rng = np.random.default_rng(seed)
    return [{"subject_id": f"user-{int(rng.integers(0, 50_000)):06d}", "features": random_features(rng)}
            for _ in range(n)]


async def _closed_loop(session, url: str, start_at: float, seconds: float, concurrency: int,
                       bodies: list[bytes]) -> dict[str, Any]:
    """``concurrency`` workers sending back to back from ``start_at`` (monotonic) for ``seconds``."""
    latencies: list[float] = []
    errors = 0
    end_at = start_at + seconds
    headers = {"x-caller-id": "svc-bench", "content-type": "application/json"}

    async def worker(k: int) -> None:
        nonlocal errors
        i = k
        while True:
            t0 = time.monotonic()
            if t0 >= end_at:
                return
            try:
                async with session.post(url, data=bodies[i % len(bodies)], headers=headers) as resp:
                    await resp.read()
                    ok = resp.status == 200
            except Exception:  # noqa: BLE001 - counted; the load goes on
                ok = False
            t1 = time.monotonic()
            if t1 <= end_at:  # completed inside the round: counts
                if ok:
                    latencies.append(t1 - t0)
                else:
                    errors += 1
            i += concurrency

    await asyncio.sleep(max(0.0, start_at - time.monotonic()))
    await asyncio.gather(*(worker(k) for k in range(concurrency)))
    return {"latencies": latencies, "errors": errors}


async def _loadgen_main(seed: int) -> None:
    import aiohttp

    bodies = [json.dumps(b).encode() for b in _bodies(2048, seed)]
    session = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=256, force_close=False))
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
            out = await _closed_loop(session, cmd["url"], cmd["start_at"], cmd["seconds"], cmd["concurrency"],
                                     bodies)
            sys.stdout.write(json.dumps(out) + "\n")
            sys.stdout.flush()
    finally:
        await session.close()


# -- CPU time by role ---------------------------------------------------------------------------

ROLES = ("replica", "proxy", "journal_writers", "load_generator", "rest")


def _role(cmdline: str, replica: str) -> str:
    """Which part of the set-up a process is: the measured variant's replica, Serve's proxy,
    the journal's writer actors, the load generator, or the rest (other replicas, Ray's
    daemons, the controller, this driver)."""
    if cmdline.startswith("ray::ServeReplica:"):
        return "replica" if cmdline.startswith(f"ray::ServeReplica:{replica}:") else "rest"
    if cmdline.startswith("ray::ProxyActor"):
        return "proxy"
    if cmdline.startswith("ray::JournalWriter"):
        return "journal_writers"
    if "bench_serving --loadgen" in cmdline:
        return "load_generator"
    return "rest"


def _cpu_snapshot() -> dict[int, tuple[str, float]]:
    """CPU seconds (user + system) of every process on the machine, with its command line."""
    import psutil

    out = {}
    for proc in psutil.process_iter(["cmdline", "cpu_times"]):
        times, cmdline = proc.info["cpu_times"], proc.info["cmdline"]
        if times is not None:
            out[proc.pid] = (" ".join(cmdline or ()), times.user + times.system)
    return out


def cpu_by_role(before: dict[int, tuple[str, float]], after: dict[int, tuple[str, float]],
                replica: str) -> dict[str, float]:
    """CPU seconds each role used between two snapshots (processes alive at both)."""
    used = dict.fromkeys(ROLES, 0.0)
    for pid, (cmdline, seconds) in after.items():
        if pid in before:
            used[_role(cmdline, replica)] += max(0.0, seconds - before[pid][1])
    return used


class LoadGenerator:
    """``clients`` load generator processes driven together; each stopped by its own pid."""

    def __init__(self, clients: int, log_dir: Path) -> None:
        env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(Path(__file__).resolve().parent.parent),
                                                           os.environ.get("PYTHONPATH", "")])}
        self._log = open(log_dir / "loadgen.log", "ab")  # noqa: SIM115 - closed in stop()
        self.procs: list[subprocess.Popen] = []
        try:
            for k in range(clients):
                self.procs.append(subprocess.Popen(
                    [sys.executable, "-m", "benchmarks.bench_serving", "--loadgen", "--seed", str(k + 5)],
                    stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self._log, env=env, text=True,
                    start_new_session=True))
        except BaseException:
            self.stop()
            raise

    def run(self, url: str, seconds: float, concurrency: int) -> dict[str, Any]:
        """One round: every client from the same instant; completions, latencies and errors pooled."""
        start_at = time.monotonic() + 0.3
        for proc in self.procs:
            assert proc.stdin is not None
            proc.stdin.write(json.dumps({"op": "run", "url": url, "start_at": start_at, "seconds": seconds,
                                         "concurrency": concurrency}) + "\n")
            proc.stdin.flush()
        latencies: list[float] = []
        errors = 0
        for proc in self.procs:
            assert proc.stdout is not None
            line = proc.stdout.readline()
            if not line:
                raise RuntimeError(f"load generator exited ({proc.poll()}); see loadgen.log")
            out = json.loads(line)
            latencies += out["latencies"]
            errors += out["errors"]
        return {"completed": len(latencies), "seconds": seconds, "rps": len(latencies) / seconds,
                "latencies": latencies, "errors": errors}

    def stop(self) -> None:
        for proc in self.procs:
            with contextlib.suppress(Exception):
                proc.stdin.write(json.dumps({"op": "quit"}) + "\n")
                proc.stdin.flush()
        for proc in self.procs:
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                proc.kill()  # our own child, by its pid
                proc.wait(timeout=10)
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


def paired_ratio_ci(ratios: list[float], confidence: float = 0.95) -> dict[str, float]:
    """Mean of paired per-round ratios with a Student-t confidence interval over the rounds."""
    arr = np.asarray(ratios, dtype=np.float64)
    n = arr.size
    if n == 0:
        return {"ratio": math.nan, "ci_low": math.nan, "ci_high": math.nan, "n": 0}
    mean = float(arr.mean())
    if n < 2:
        return {"ratio": mean, "ci_low": math.nan, "ci_high": math.nan, "n": 1}
    from scipy import stats

    half = float(stats.t.ppf(0.5 + confidence / 2, n - 1) * arr.std(ddof=1) / math.sqrt(n))
    return {"ratio": mean, "ci_low": mean - half, "ci_high": mean + half, "n": int(n)}


def _summarise(rounds: list[dict[str, dict]], variants: list[str]) -> list[dict[str, Any]]:
    rows = []
    base_lat = np.concatenate([r[BASE]["latencies"] for r in rounds if BASE in r] or [np.array([])])
    base_p = percentiles_ms(base_lat)
    for variant in variants:
        runs = [r[variant] for r in rounds if variant in r]
        if not runs:
            continue
        lat = np.concatenate([x["latencies"] for x in runs] or [np.array([])])
        per_round = [x["rps"] for x in runs]
        completed = sum(x["completed"] for x in runs)
        cpu_ms = {role: 1000.0 * sum(x["cpu"][role] for x in runs if "cpu" in x) / max(1, completed)
                  for role in ROLES}
        row = {"variant": variant, "path": "http", "rounds": len(runs),
               "throughput_rps": float(np.mean(per_round)), "throughput_min_rps": min(per_round),
               "throughput_max_rps": max(per_round), "errors": sum(x["errors"] for x in runs),
               "completed": completed, "cpu_ms_per_request": cpu_ms, **percentiles_ms(lat)}
        if variant != BASE:
            ratios = [r[variant]["rps"] / r[BASE]["rps"] for r in rounds
                      if variant in r and BASE in r and r[BASE]["rps"] > 0]
            ci = paired_ratio_ci(ratios)
            row.update(throughput_ratio=ci["ratio"], ratio_ci_low=ci["ci_low"], ratio_ci_high=ci["ci_high"],
                       ratio_min=min(ratios, default=math.nan), ratio_max=max(ratios, default=math.nan),
                       added_p50_ms=row["p50_ms"] - base_p["p50_ms"], added_p99_ms=row["p99_ms"] - base_p["p99_ms"])
        rows.append(row)
    return rows


def run(size: str = "quick", workdir: str | os.PathLike[str] | None = None,
        tracking_uri: str | None = None, http_url: str | None = None,
        variants: tuple[str, ...] | None = None, rounds: int | None = None) -> dict[str, Any]:
    """Run the serving benchmark on the Ray already initialised in this process.

    ``variants`` and ``rounds`` override the size's (a long two-variant A/B narrows the
    interval: its half-width falls with the square root of the rounds).

    ``http_url`` is the base URL of a Serve already started with HTTP; without it Serve is
    started here on a free loopback port (and shut down at the end).
    """
    import ray
    from ray import serve

    if not ray.is_initialized():
        raise RuntimeError("bench_serving.run needs ray.init() first (benchmarks.run does it)")
    ship_by_value()
    params = dict(SIZES[size])
    if rounds is not None:
        params["rounds"] = rounds
    names = list(variants or params["variants"] or ALL_VARIANTS)
    if BASE not in names:
        names.insert(0, BASE)
    notes: list[str] = []
    started_serve = False
    if http_url is None:
        port = free_port()
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        http_url = f"http://127.0.0.1:{port}"
        started_serve = True
    rounds: list[dict[str, dict]] = []
    with tempfile.TemporaryDirectory(prefix="sj-bench-serving-", dir=workdir) as tmp, \
            contextlib.ExitStack() as stack:
        root = Path(tmp)
        tracking_uri = tracking_uri or fraud_registry(root / "mlflow")
        apps = _build_variants(names, tracking_uri, root, stack, notes)
        deployed = _deploy(apps)
        for app_name in deployed.values():
            stack.callback(lambda n=app_name: serve.delete(n))
        gen = LoadGenerator(params["clients"], root)
        stack.callback(gen.stop)
        order = [v for v in ALL_VARIANTS if v in deployed]
        for variant in order:  # warm every variant once (connections, caches, the writers' start)
            gen.run(f"{http_url}/{deployed[variant]}", params["warmup_s"], params["concurrency"])
        for k in range(params["rounds"]):
            this_round: dict[str, dict] = {}
            for variant in (order if k % 2 == 0 else order[::-1]):
                time.sleep(params["pause_s"])  # the previous variant's background work settles
                before = _cpu_snapshot()
                this_round[variant] = gen.run(f"{http_url}/{deployed[variant]}", params["seconds"],
                                              params["concurrency"])
                this_round[variant]["cpu"] = cpu_by_role(before, _cpu_snapshot(), deployed[variant])
            rounds.append(this_round)
        if "serve_journal_actors" in deployed:
            from serve_journal.api import flush_journal

            ok = flush_journal(str(root / "journal-actors"), timeout=60, namespace=NAMESPACE)
            from benchmarks._common import parquet_rows

            notes.append(f"actor path: journal flushed={ok}, {parquet_rows(root / 'journal-actors' / 'hot'):,} "
                         f"entries on disk")
    if started_serve:
        with contextlib.suppress(Exception):
            serve.shutdown()
    missing = [v for v in names if not any(v in r for r in rounds)]
    for v in missing:
        if not any(v in n for n in notes):
            notes.append(f"{v}: not measured")
    return {"rows": _summarise(rounds, [v for v in ALL_VARIANTS if v in names]), "notes": notes,
            "params": {"size": size, **{k: v for k, v in params.items() if k != "variants"},
                       "variants": names}}


def _main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--loadgen", action="store_true")
    parser.add_argument("--seed", type=int, default=5)
    parser.add_argument("--size", default="tiny")
    parser.add_argument("--rounds", type=int, default=None, help="override the size's rounds")
    parser.add_argument("--variants", default=None,
                        help=f"comma-separated subset of {ALL_VARIANTS} (no_journal always runs)")
    parser.add_argument("--markdown", action="store_true",
                        help="print the report's Serving section instead of the raw JSON")
    args = parser.parse_args()
    if args.loadgen:
        asyncio.run(_loadgen_main(args.seed))
        return
    from benchmarks._common import json_dump, ray_session

    variants = tuple(v.strip() for v in args.variants.split(",")) if args.variants else None
    with ray_session():
        res = run(args.size, variants=variants, rounds=args.rounds)
    if args.markdown:
        from benchmarks import report

        print(report.render_serving(res))
    else:
        print(json_dump(res))


if __name__ == "__main__":
    _main()
